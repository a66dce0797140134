/* blip-eval: image-text retrieval recall on COCO 5k / Flickr30k 1k with
 * BLIP's exact protocol (train_retrieval.py `evaluation` + `itm_eval`), and
 * `--bench`: time per phase at the real base geometry, extrapolated.
 *
 * Phases: text features -> image features and vision tokens -> ITC sims ->
 * top-k both ways -> ITM match logits for the union of the top-k pairs,
 * grouped by caption (one caption against many images per engine call) ->
 * score matrices row by row (score = match logit + sim, -100 elsewhere) ->
 * ranks and recall (blip_eval).
 *
 * Cache (--cache DIR): every phase writes fixed-size chunks
 * (txt-N, img-N, itm-N .safetensors) atomically, each tagged with a key
 * hashing the model (fingerprint and precision) and the chunk's inputs; a chunk whose key
 * does not match is recomputed. So a killed run resumes losing at most the
 * chunk in flight, and a changed model or annotation never reuses stale
 * data. Vision tokens are stored f32 (default: mmapped and used in place)
 * or f16 (--cache-f16, half the disk; rounding moves ITM logits slightly).
 * One run per cache at a time (flock on DIR/.lock). Without --cache
 * everything stays in memory. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "blip_err.h"
#include "blip_eval.h"
#include "blip_img.h"
#include "blip_kern.h"
#include "blip_model.h"
#include "blip_st.h"

enum {
  MAX_LEN = 35,     /* BLIP's retrieval tokenization length */
  MAX_WORDS = 30,   /* pre_caption(max_words=30) */
  TXT_BATCH = 64,
  VIS_BATCH = 8,
  ITM_BATCH = 32, /* images per blip_model_itm call */
};

typedef struct {
  const char *model, *ann, *images, *dataset, *cache;
  const char *dump; /* write sims and score matrices here (safetensors) */
  int k_test, itc_only, limit, json, report, threads, bench, f16;
  blip_prec precision;
  /* Cache chunk sizes: images (32 = 57 MB of f32 tokens at base), captions
   * per text chunk, captions per ITM chunk. --chunk N sets all three. */
  int img_chunk, txt_chunk, itm_chunk;
} opts;

typedef struct {    /* one chunk of images: features and (maybe) vision tokens */
  blip_st *st;      /* mmapped cache file, or NULL */
  void *own;        /* tokens in memory when there is no cache */
  const void *emb;  /* [n, T, Dv] f32 or f16, NULL when not kept */
} img_chunk;

typedef struct {
  opts o;
  blip_model *m;
  const blip_cfg *c;
  blip_eval_ann ann;
  int T, Dv, E;
  uint64_t model_key; /* model fingerprint and compute precision */
  uint64_t img_base;  /* model_key, image root and token dtype */
  uint64_t img_all;  /* img_base and every image path, in order */
  int lock_fd;       /* flock on DIR/.lock: one run per cache */
  float *img_feat, *txt_feat;
  int32_t *ids; /* [nt, MAX_LEN] */
  int *len;
  img_chunk *ch;
  int n_ch;
  float *sims, *simsT; /* [ni, nt], [nt, ni] */
  int ki, kt, *i2t_top, *t2i_top;
  blip_eval_plan plan;
  float *match; /* [plan.n_pairs] ITM match logits */
  double sec_text, sec_img, sec_itm, sec_score;
  int cached_text, cached_img, cached_itm; /* chunks reused from the cache */
} ev;

static int g_tty;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Count, rate and ETA, on a tty only. Rate counts the work done in this run. */
static void progress(const char *phase, long done, long total, long fresh, double t0) {
  if (!g_tty) return;
  double el = now() - t0, rate = fresh > 0 && el > 0 ? fresh / el : 0;
  long eta = rate > 0 ? (long)((total - done) / rate) : -1;
  fprintf(stderr, "\r%-7s %ld/%ld  %.2f/s  ETA ", phase, done, total, rate);
  if (eta >= 0) fprintf(stderr, "%ldh%02ldm%02lds   ", eta / 3600, eta / 60 % 60, eta % 60);
  else fprintf(stderr, "?          ");
  if (done == total) fputc('\n', stderr);
}

/* ---- cache ---------------------------------------------------------------- */

static void hex16(uint64_t h, char out[17]) { snprintf(out, 17, "%016llx", (unsigned long long)h); }

static uint64_t hash_str(const char *s, uint64_t h) { return XXH64(s, strlen(s) + 1, h); }

static void chunk_path(const ev *e, char *buf, size_t cap, const char *kind, int idx) {
  snprintf(buf, cap, "%s/%s-%06d.safetensors", e->o.cache, kind, idx);
}

/* Open a cached chunk if it exists and carries `key`; NULL otherwise. */
static blip_st *cache_open(const ev *e, const char *kind, int idx, const char *key) {
  char path[4096];
  blip_st *st = NULL;
  if (!e->o.cache) return NULL;
  chunk_path(e, path, sizeof path, kind, idx);
  if (access(path, R_OK) != 0 || blip_st_open(path, &st) != BLIP_OK) return NULL;
  const char *k = blip_st_meta(st, "key");
  if (!k || strcmp(k, key)) {
    blip_st_close(st);
    return NULL;
  }
  return st;
}

static const void *tensor_of(const blip_st *st, const char *name, blip_dtype dt, int ndim, const int64_t *shape) {
  const blip_st_tensor *t = st ? blip_st_find(st, name) : NULL;
  if (!t || t->dtype != dt || t->ndim != ndim) return NULL;
  for (int d = 0; d < ndim; d++)
    if (t->shape[d] != shape[d]) return NULL;
  return t->data;
}

/* Remove leftovers: temp files of a writer that was killed mid-save. */
static void cache_sweep(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *de;
  char path[4096];
  while ((de = readdir(d)))
    if (strstr(de->d_name, ".safetensors.tmp.")) {
      snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
      unlink(path);
    }
  closedir(d);
}

static int mkdir_p(const char *dir) {
  char buf[4096];
  snprintf(buf, sizeof buf, "%s", dir);
  for (char *p = buf + 1; *p; p++)
    if (*p == '/') {
      *p = 0;
      if (mkdir(buf, 0755) && errno != EEXIST) return blip_err_set(BLIP_EIO, "%s: %s", buf, strerror(errno));
      *p = '/';
    }
  if (mkdir(buf, 0755) && errno != EEXIST) return blip_err_set(BLIP_EIO, "%s: %s", buf, strerror(errno));
  return BLIP_OK;
}

/* Create the cache dir, take its lock (a second run on the same cache would
 * race on chunk files), then sweep temp files left by a killed run. */
static int cache_lock(ev *e) {
  char path[4096];
  int rc = mkdir_p(e->o.cache);
  if (rc) return rc;
  snprintf(path, sizeof path, "%s/.lock", e->o.cache);
  e->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (e->lock_fd < 0) return blip_err_set(BLIP_EIO, "%s: %s", path, strerror(errno));
  if (flock(e->lock_fd, LOCK_EX | LOCK_NB))
    return blip_err_set(BLIP_EIO, "%s: cache in use by another blip-eval (%s)", e->o.cache, strerror(errno));
  cache_sweep(e->o.cache);
  return BLIP_OK;
}

/* Tag w with key and write it atomically as the chunk file; frees w.
 * BLIP_EVAL_KILL_AFTER=N (tests) SIGKILLs the process after N chunk writes,
 * exactly as an external kill between two chunks would. */
static int chunk_save(const ev *e, blip_st_writer *w, const char *kind, int idx, const char *key) {
  static int saved;
  char path[4096];
  chunk_path(e, path, sizeof path, kind, idx);
  int rc = blip_st_writer_meta(w, "key", key);
  if (!rc) rc = blip_st_writer_save(w, path);
  blip_st_writer_free(w);
  const char *k = getenv("BLIP_EVAL_KILL_AFTER");
  if (!rc && k && ++saved >= atoi(k)) raise(SIGKILL);
  return rc;
}

/* ---- phase 1: text features ------------------------------------------------ */

static int phase_text(ev *e) {
  const int nt = e->ann.n_texts, E = e->E;
  int rc = BLIP_OK;
  int32_t *mask = malloc((size_t)nt * MAX_LEN * sizeof *mask + 1);
  if (!mask) return blip_err_set(BLIP_ENOMEM, "out of memory");
  for (int t = 0; t < nt && !rc; t++) {
    int trunc;
    rc = blip_model_tokenize(e->m, e->ann.text[t], MAX_LEN, e->ids + (size_t)t * MAX_LEN, mask + (size_t)t * MAX_LEN,
                             &e->len[t], &trunc);
  }
  double t0 = now();
  long fresh = 0;
  for (int s = 0; s < nt && !rc; s += e->o.txt_chunk) {
    int n = nt - s < e->o.txt_chunk ? nt - s : e->o.txt_chunk, idx = s / e->o.txt_chunk;
    uint64_t h = hash_str("txt", e->model_key);
    for (int t = s; t < s + n; t++) h = hash_str(e->ann.text[t], h);
    char key[17];
    hex16(h, key);
    float *feat = e->txt_feat + (size_t)s * E;
    int64_t shape[2] = {n, E};
    blip_st *st = cache_open(e, "txt", idx, key);
    const void *cached = tensor_of(st, "feat", BLIP_DT_F32, 2, shape);
    if (cached) {
      memcpy(feat, cached, (size_t)n * E * sizeof *feat);
      e->cached_text++;
    }
    blip_st_close(st);
    if (cached) continue;
    for (int b = s; b < s + n && !rc; b += TXT_BATCH) {
      int nb = s + n - b < TXT_BATCH ? s + n - b : TXT_BATCH;
      rc = blip_model_text(e->m, e->ids + (size_t)b * MAX_LEN, mask + (size_t)b * MAX_LEN, nb, MAX_LEN, NULL,
                           e->txt_feat + (size_t)b * E);
      fresh += nb;
      progress("text", b + nb, nt, fresh, t0);
    }
    if (!rc && e->o.cache) {
      blip_st_writer *w = NULL;
      if (!(rc = blip_st_writer_new(&w)) && !(rc = blip_st_writer_add(w, "feat", BLIP_DT_F32, 2, shape, feat)))
        rc = chunk_save(e, w, "txt", idx, key);
      else blip_st_writer_free(w);
    }
  }
  free(mask);
  e->sec_text = now() - t0;
  return rc;
}

/* ---- phase 2: image features and vision tokens ----------------------------- */

static int load_images(ev *e, int s, int n, float *pix) {
  blip_img_opts io;
  blip_img_opts_default(&io);
  io.size = e->c->image_size;
  io.autorotate = 0;     /* BLIP's PIL path ignores EXIF orientation */
  io.shrink_on_load = 0; /* exact resampling */
  io.color_manage = 0;   /* PIL's convert("RGB") ignores ICC profiles */
  size_t px = (size_t)3 * io.size * io.size;
  for (int i = 0; i < n; i++) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", e->o.images, e->ann.image[s + i]);
    int rc = blip_img_load_file(path, &io, pix + i * px, NULL, NULL);
    if (rc) return blip_err_wrap(rc, "image %d", s + i);
  }
  return BLIP_OK;
}

static int phase_images(ev *e) {
  const int ni = e->ann.n_images, E = e->E, need = !e->o.itc_only;
  const size_t tok = (size_t)e->T * e->Dv, px = (size_t)3 * e->c->image_size * e->c->image_size;
  const blip_dtype edt = e->o.f16 ? BLIP_DT_F16 : BLIP_DT_F32;
  int rc = BLIP_OK;
  float *pix = malloc(VIS_BATCH * px * sizeof *pix);
  float *emb = need ? malloc((size_t)e->o.img_chunk * tok * sizeof *emb) : NULL;
  uint16_t *emb16 = need && e->o.f16 ? malloc((size_t)e->o.img_chunk * tok * sizeof *emb16) : NULL;
  if (!pix || (need && !emb) || (need && e->o.f16 && !emb16)) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory (image chunk buffers)");
    goto done;
  }
  double t0 = now();
  long fresh = 0;
  for (int c = 0; c < e->n_ch && !rc; c++) {
    int s = c * e->o.img_chunk, n = ni - s < e->o.img_chunk ? ni - s : e->o.img_chunk;
    uint64_t h = hash_str("img", e->img_base); /* a chunk is reusable by any run over the same paths */
    for (int i = s; i < s + n; i++) h = hash_str(e->ann.image[i], h);
    char key[17];
    hex16(h, key);
    int64_t fshape[2] = {n, E}, eshape[3] = {n, e->T, e->Dv};
    float *feat = e->img_feat + (size_t)s * E;
    blip_st *st = cache_open(e, "img", c, key);
    const void *cf = tensor_of(st, "feat", BLIP_DT_F32, 2, fshape);
    const void *ce = tensor_of(st, "embeds", edt, 3, eshape);
    if (cf && (ce || !need)) {
      memcpy(feat, cf, (size_t)n * E * sizeof *feat);
      if (need) {
        e->ch[c].st = st; /* keep the mapping: tokens are read in place */
        e->ch[c].emb = ce;
      } else {
        blip_st_close(st);
      }
      e->cached_img++;
      continue;
    }
    blip_st_close(st);
    for (int b = 0; b < n && !rc; b += VIS_BATCH) {
      int nb = n - b < VIS_BATCH ? n - b : VIS_BATCH;
      if (!(rc = load_images(e, s + b, nb, pix)))
        rc = blip_model_vision(e->m, pix, nb, need ? emb + b * tok : NULL, feat + (size_t)b * E);
      fresh += nb;
      progress("images", s + b + nb, ni, fresh, t0);
    }
    if (rc) break;
    const void *data = emb;
    if (need && e->o.f16) {
      for (size_t j = 0; j < (size_t)n * tok; j++) emb16[j] = blip_f32_to_f16(emb[j]);
      data = emb16;
    }
    if (e->o.cache) { /* write, then read the tokens back through the mapping */
      char path[4096];
      blip_st_writer *w = NULL;
      chunk_path(e, path, sizeof path, "img", c);
      if (!(rc = blip_st_writer_new(&w)) && (!need || !(rc = blip_st_writer_add(w, "embeds", edt, 3, eshape, data))) &&
          !(rc = blip_st_writer_add(w, "feat", BLIP_DT_F32, 2, fshape, feat)))
        rc = chunk_save(e, w, "img", c, key);
      else blip_st_writer_free(w);
      if (!rc && need) {
        if ((rc = blip_st_open(path, &e->ch[c].st))) break;
        if (!(e->ch[c].emb = tensor_of(e->ch[c].st, "embeds", edt, 3, eshape)))
          rc = blip_err_set(BLIP_EFORMAT, "%s: embeds unreadable after write", path);
      }
    } else if (need) {
      size_t bytes = (size_t)n * tok * (e->o.f16 ? 2 : 4);
      if (!(e->ch[c].own = malloc(bytes))) {
        rc = blip_err_set(BLIP_ENOMEM, "out of memory: keep --cache for large sets");
        break;
      }
      memcpy(e->ch[c].own, data, bytes);
      e->ch[c].emb = e->ch[c].own;
    }
  }
  e->sec_img = now() - t0;
done:
  free(pix);
  free(emb);
  free(emb16);
  return rc;
}

/* Vision tokens of image i as f32: in place when stored f32 and aligned,
 * else converted into scratch. */
static const float *tokens_of(const ev *e, int i, float *scratch) {
  const size_t tok = (size_t)e->T * e->Dv;
  const void *base = e->ch[i / e->o.img_chunk].emb;
  size_t off = (size_t)(i % e->o.img_chunk) * tok;
  if (!e->o.f16) {
    const float *p = (const float *)base + off;
    if (((uintptr_t)p & 3) == 0) return p;
    memcpy(scratch, p, tok * sizeof *scratch);
    return scratch;
  }
  const uint8_t *p = (const uint8_t *)base + off * 2;
  for (size_t j = 0; j < tok; j++) {
    uint16_t h;
    memcpy(&h, p + 2 * j, 2);
    scratch[j] = blip_f16_to_f32(h);
  }
  return scratch;
}

/* ---- phase 3: sims, top-k and the ITM plan --------------------------------- */

static int phase_topk(ev *e) {
  const int ni = e->ann.n_images, nt = e->ann.n_texts;
  int rc = blip_k_gemm(0, 1, ni, nt, e->E, 1.0f, e->img_feat, e->E, e->txt_feat, e->E, 0.0f, e->sims, nt);
  if (rc) return rc;
  for (int i = 0; i < ni; i++)
    for (int t = 0; t < nt; t++) e->simsT[(size_t)t * ni + i] = e->sims[(size_t)i * nt + t];
  if (e->o.itc_only) return BLIP_OK;
  e->ki = e->o.k_test < nt ? e->o.k_test : nt; /* torch.topk would refuse k > n */
  e->kt = e->o.k_test < ni ? e->o.k_test : ni;
  e->i2t_top = malloc(((size_t)ni * e->ki + 1) * sizeof *e->i2t_top);
  e->t2i_top = malloc(((size_t)nt * e->kt + 1) * sizeof *e->t2i_top);
  if (!e->i2t_top || !e->t2i_top) return blip_err_set(BLIP_ENOMEM, "out of memory");
#pragma omp parallel for schedule(dynamic, 16)
  for (int i = 0; i < ni; i++) blip_eval_topk(e->sims + (size_t)i * nt, nt, e->ki, e->i2t_top + (size_t)i * e->ki);
#pragma omp parallel for schedule(dynamic, 16)
  for (int t = 0; t < nt; t++) blip_eval_topk(e->simsT + (size_t)t * ni, ni, e->kt, e->t2i_top + (size_t)t * e->kt);
  return blip_eval_plan_build(e->i2t_top, ni, e->ki, e->t2i_top, nt, e->kt, &e->plan);
}

/* ---- phase 4: ITM match logits, by caption --------------------------------- */

static int itm_caption(ev *e, int t, float *scratch, const float **ptrs, float *logits) {
  const size_t tok = (size_t)e->T * e->Dv;
  int64_t a = e->plan.off[t], z = e->plan.off[t + 1];
  for (int64_t p = a; p < z; p += ITM_BATCH) {
    int nb = z - p < ITM_BATCH ? (int)(z - p) : ITM_BATCH;
    for (int b = 0; b < nb; b++) ptrs[b] = tokens_of(e, e->plan.img[p + b], scratch + b * tok);
    int rc = blip_model_itm(e->m, e->ids + (size_t)t * MAX_LEN, e->len[t], ptrs, nb, BLIP_ITM_ENC, 1, logits, NULL);
    if (rc) return rc;
    for (int b = 0; b < nb; b++) e->match[p + b] = logits[2 * b + 1];
  }
  return BLIP_OK;
}

static int phase_itm(ev *e) {
  const int nt = e->ann.n_texts;
  const size_t tok = (size_t)e->T * e->Dv;
  int rc = BLIP_OK;
  float *scratch = malloc(ITM_BATCH * tok * sizeof *scratch), logits[2 * ITM_BATCH];
  const float *ptrs[ITM_BATCH];
  e->match = malloc(((size_t)e->plan.n_pairs + 1) * sizeof *e->match);
  if (!scratch || !e->match) {
    free(scratch);
    return blip_err_set(BLIP_ENOMEM, "out of memory");
  }
  double t0 = now();
  long fresh = 0;
  for (int s = 0; s < nt && !rc; s += e->o.itm_chunk) {
    int n = nt - s < e->o.itm_chunk ? nt - s : e->o.itm_chunk, idx = s / e->o.itm_chunk;
    int64_t a = e->plan.off[s], z = e->plan.off[s + n];
    uint64_t h = hash_str("itm", e->img_all); /* plan entries index this image list */
    for (int t = s; t < s + n; t++) h = hash_str(e->ann.text[t], h);
    h = XXH64(e->plan.img + a, (size_t)(z - a) * sizeof *e->plan.img, h);
    for (int t = s; t <= s + n; t++) {
      int64_t rel = e->plan.off[t] - a;
      h = XXH64(&rel, sizeof rel, h);
    }
    char key[17];
    hex16(h, key);
    int64_t shape[1] = {z - a};
    blip_st *st = cache_open(e, "itm", idx, key);
    const void *cm = tensor_of(st, "match", BLIP_DT_F32, 1, shape);
    if (cm) {
      memcpy(e->match + a, cm, (size_t)(z - a) * sizeof *e->match);
      e->cached_itm++;
    }
    blip_st_close(st);
    if (cm) continue;
    for (int t = s; t < s + n && !rc; t++) {
      rc = itm_caption(e, t, scratch, ptrs, logits);
      fresh++;
      progress("itm", t + 1, nt, fresh, t0);
    }
    if (!rc && e->o.cache) {
      blip_st_writer *w = NULL;
      if (!(rc = blip_st_writer_new(&w)) && !(rc = blip_st_writer_add(w, "match", BLIP_DT_F32, 1, shape, e->match + a)))
        rc = chunk_save(e, w, "itm", idx, key);
      else blip_st_writer_free(w);
    }
  }
  free(scratch);
  e->sec_itm = now() - t0;
  return rc;
}

/* ---- phase 5: score rows, ranks, recall ------------------------------------ */

/* --dump: the matrices itm_eval sees, for checks outside this program. */
static int dump_matrices(const ev *e, const float *score_i2t, const float *score_t2i) {
  const int ni = e->ann.n_images, nt = e->ann.n_texts;
  int64_t s_it[2] = {ni, nt}, s_ti[2] = {nt, ni}, s_t[1] = {nt};
  blip_st_writer *w = NULL;
  int rc = blip_st_writer_new(&w);
  if (!rc) rc = blip_st_writer_add(w, "sims", BLIP_DT_F32, 2, s_it, e->sims);
  if (!rc && score_i2t) rc = blip_st_writer_add(w, "score_i2t", BLIP_DT_F32, 2, s_it, score_i2t);
  if (!rc && score_t2i) rc = blip_st_writer_add(w, "score_t2i", BLIP_DT_F32, 2, s_ti, score_t2i);
  if (!rc) rc = blip_st_writer_add(w, "txt2img", BLIP_DT_I32, 1, s_t, e->ann.txt2img);
  if (!rc) rc = blip_st_writer_save(w, e->o.dump);
  blip_st_writer_free(w);
  return rc;
}

static int phase_score(ev *e, blip_eval_recall *itc, blip_eval_recall *itm) {
  const int ni = e->ann.n_images, nt = e->ann.n_texts;
  const int dump = e->o.dump && !e->o.itc_only;
  int rc = BLIP_OK, bad = 0;
  double t0 = now();
  int64_t *ri = malloc(((size_t)ni + 1) * sizeof *ri), *rt = malloc(((size_t)nt + 1) * sizeof *rt);
  float *full_i2t = dump ? malloc((size_t)ni * nt * sizeof *full_i2t) : NULL;
  float *full_t2i = dump ? malloc((size_t)ni * nt * sizeof *full_t2i) : NULL;
  if (!ri || !rt || (dump && (!full_i2t || !full_t2i))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  /* ITC-only: ranks straight from the sims matrix. */
  rc = blip_eval_itm_eval(e->sims, e->simsT, ni, nt, e->ann.txt2img, e->ann.img2txt_off, e->ann.img2txt, itc, NULL,
                          NULL);
  if (rc || e->o.itc_only) goto done;
#pragma omp parallel reduction(| : bad)
  {
    int n = nt > ni ? nt : ni;
    float *row = malloc(((size_t)n + e->ki + e->kt) * sizeof *row), *val = row ? row + n : NULL;
    if (!row) bad = 1;
#pragma omp for schedule(dynamic, 8)
    for (int i = 0; i < ni; i++) { /* score_matrix_i2t[i, topk] = itm + sim */
      if (!row) continue;
      const int *top = e->i2t_top + (size_t)i * e->ki;
      for (int j = 0; j < e->ki; j++) val[j] = e->match[blip_eval_plan_find(&e->plan, top[j], i)];
      blip_eval_score_row(e->sims + (size_t)i * nt, nt, top, val, e->ki, row);
      if (full_i2t) memcpy(full_i2t + (size_t)i * nt, row, (size_t)nt * sizeof *row);
      const int *gt = e->ann.img2txt + e->ann.img2txt_off[i];
      bad |= blip_eval_rank(row, nt, gt, e->ann.img2txt_off[i + 1] - e->ann.img2txt_off[i], &ri[i]) != 0;
    }
#pragma omp for schedule(dynamic, 64)
    for (int t = 0; t < nt; t++) { /* score_matrix_t2i[t, topk] = itm + sim */
      if (!row) continue;
      const int *top = e->t2i_top + (size_t)t * e->kt;
      for (int j = 0; j < e->kt; j++) val[j] = e->match[blip_eval_plan_find(&e->plan, t, top[j])];
      blip_eval_score_row(e->simsT + (size_t)t * ni, ni, top, val, e->kt, row);
      if (full_t2i) memcpy(full_t2i + (size_t)t * ni, row, (size_t)ni * sizeof *row);
      bad |= blip_eval_rank(row, ni, &e->ann.txt2img[t], 1, &rt[t]) != 0;
    }
    free(row);
  }
  if (bad) rc = blip_err_set(BLIP_ENOMEM, "ranking failed (out of memory)");
  else blip_eval_recall_from_ranks(ri, ni, rt, nt, itm);
done:
  if (!rc && e->o.dump) rc = dump_matrices(e, full_i2t, full_t2i);
  free(ri);
  free(rt);
  free(full_i2t);
  free(full_t2i);
  e->sec_score = now() - t0;
  return rc;
}

/* ---- report ---------------------------------------------------------------- */

typedef struct {
  const char *name;
  int v_hidden;
  double coco[6], flickr[6]; /* TR@1,5,10, IR@1,5,10 (BLIP paper, Table 5) */
  double zs_tr1, zs_ir1;     /* zero-shot Flickr with the COCO model (Table 6); 0 = not reported */
} paper_row;

static const paper_row PAPER[] = {
    {"ViT-B 14M", 768, {80.6, 95.2, 97.6, 63.1, 85.3, 91.1}, {96.6, 99.8, 100.0, 87.2, 97.5, 98.8}, 94.8, 84.9},
    {"ViT-B 129M", 768, {81.9, 95.4, 97.8, 64.3, 85.7, 91.5}, {97.3, 99.9, 100.0, 87.3, 97.6, 98.9}, 0, 0},
    {"ViT-L 129M", 1024, {82.4, 95.4, 97.9, 65.1, 86.3, 91.8}, {97.4, 99.8, 99.9, 87.6, 97.7, 99.0}, 96.7, 86.7},
};

static void print_row(const char *label, const double v[6]) {
  printf("  %-22s %6.1f %6.1f %6.1f   %6.1f %6.1f %6.1f\n", label, v[0], v[1], v[2], v[3], v[4], v[5]);
}

static void recall6(const blip_eval_recall *r, double v[6]) {
  v[0] = r->tr_r1, v[1] = r->tr_r5, v[2] = r->tr_r10, v[3] = r->ir_r1, v[4] = r->ir_r5, v[5] = r->ir_r10;
}

static void print_text(const ev *e, const blip_eval_recall *itc, const blip_eval_recall *itm) {
  int flickr = !strcmp(e->o.dataset, "flickr");
  double v[6];
  printf("blip-eval: %s, %d images, %d captions, k_test %d, model %s (Dv %d)\n", e->o.dataset, e->ann.n_images,
         e->ann.n_texts, e->o.k_test, blip_model_fingerprint(e->m), e->Dv);
  printf("  %-22s %6s %6s %6s   %6s %6s %6s\n", "", "TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10");
  recall6(itc, v);
  print_row("ITC only", v);
  if (!e->o.itc_only) {
    recall6(itm, v);
    print_row("ITM rerank", v);
    printf("  r_mean: ITC %.2f, ITM %.2f\n", itc->r_mean, itm->r_mean);
  } else {
    printf("  r_mean: ITC %.2f\n", itc->r_mean);
  }
  if (e->o.report) {
    int shown = 0;
    printf("paper (BLIP, Table 5, fine-tuned on %s):\n", flickr ? "Flickr30k" : "COCO");
    for (size_t r = 0; r < sizeof PAPER / sizeof *PAPER; r++) {
      if (PAPER[r].v_hidden != e->Dv) continue;
      print_row(PAPER[r].name, flickr ? PAPER[r].flickr : PAPER[r].coco);
      if (flickr && PAPER[r].zs_tr1 > 0)
        printf("  %-22s %6.1f%17s%6.1f                (zero-shot, COCO model; Table 6)\n", PAPER[r].name,
               PAPER[r].zs_tr1, "", PAPER[r].zs_ir1);
      shown++;
    }
    if (!shown) printf("  no paper row for vision width %d (ViT-B is 768, ViT-L 1024)\n", e->Dv);
    if (e->o.limit > 0) printf("  note: --limit %d; the paper's gallery is the full split\n", e->o.limit);
  }
  printf("time: text %.1f s, images %.1f s, itm %.1f s, scoring %.1f s (cached chunks: %d text, %d image, %d itm)\n",
         e->sec_text, e->sec_img, e->sec_itm, e->sec_score, e->cached_text, e->cached_img, e->cached_itm);
}

static json_t *recall_json(const blip_eval_recall *r) {
  return json_pack("{s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f}", "txt_r1", r->tr_r1, "txt_r5", r->tr_r5, "txt_r10",
                   r->tr_r10, "txt_r_mean", r->tr_mean, "img_r1", r->ir_r1, "img_r5", r->ir_r5, "img_r10", r->ir_r10,
                   "img_r_mean", r->ir_mean, "r_mean", r->r_mean);
}

static int print_json(const ev *e, const blip_eval_recall *itc, const blip_eval_recall *itm) {
  json_t *o = json_pack("{s:s, s:s, s:s, s:i, s:i, s:i, s:o, s:{s:f, s:f, s:f, s:f}, s:{s:i, s:i, s:i}}",
                        "dataset", e->o.dataset, "model", blip_model_fingerprint(e->m), "precision",
                        blip_model_precision_name(e->o.precision), "n_images", e->ann.n_images, "n_texts", e->ann.n_texts, "k_test",
                        e->o.k_test, "itc", recall_json(itc), "seconds", "text", e->sec_text, "images", e->sec_img,
                        "itm", e->sec_itm, "scoring", e->sec_score, "cached_chunks", "text", e->cached_text, "images",
                        e->cached_img, "itm", e->cached_itm);
  if (!o) return blip_err_set(BLIP_ENOMEM, "out of memory");
  if (!e->o.itc_only) {
    json_object_set_new(o, "itm", recall_json(itm));
    json_object_set_new(o, "itm_pairs", json_integer(e->plan.n_pairs));
    json_object_set_new(o, "k_i2t", json_integer(e->ki)); /* k_test clamped to the gallery size */
    json_object_set_new(o, "k_t2i", json_integer(e->kt));
  }
  char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
  json_decref(o);
  if (!s) return blip_err_set(BLIP_ENOMEM, "out of memory");
  puts(s);
  free(s);
  return BLIP_OK;
}

/* ---- the evaluation run ---------------------------------------------------- */

static void ev_free(ev *e) {
  for (int c = 0; e->ch && c < e->n_ch; c++) {
    blip_st_close(e->ch[c].st);
    free(e->ch[c].own);
  }
  free(e->ch);
  free(e->img_feat);
  free(e->txt_feat);
  free(e->ids);
  free(e->len);
  free(e->sims);
  free(e->simsT);
  free(e->i2t_top);
  free(e->t2i_top);
  free(e->match);
  blip_eval_plan_free(&e->plan);
  blip_eval_ann_free(&e->ann);
  blip_model_free(e->m);
  if (e->lock_fd > 0) close(e->lock_fd);
}

static int run_eval(const opts *o) {
  ev e = {.o = *o};
  blip_eval_recall itc = {0}, itm = {0};
  int rc;
  if ((rc = blip_img_init())) return rc;
  blip_model_opts mo = {.precision = o->precision};
  if ((rc = blip_model_load(o->model, &mo, &e.m))) return rc;
  e.c = blip_model_cfg(e.m);
  e.T = e.c->v_tokens, e.Dv = e.c->v_hidden, e.E = e.c->embed_dim;
  if ((rc = blip_eval_ann_load(o->ann, MAX_WORDS, o->limit, &e.ann))) goto done;
  const int ni = e.ann.n_images, nt = e.ann.n_texts;
  if (ni == 0 || nt == 0) {
    rc = blip_err_set(BLIP_EFORMAT, "%s: no images or no captions", o->ann);
    goto done;
  }
  if (o->cache && (rc = cache_lock(&e))) goto done;
  e.model_key = hash_str(blip_model_fingerprint(e.m), (uint64_t)o->precision);
  e.img_base = hash_str(o->images, XXH64("tok", 4, e.model_key) + (o->f16 ? 16 : 32));
  e.img_all = e.img_base;
  for (int i = 0; i < ni; i++) e.img_all = hash_str(e.ann.image[i], e.img_all);
  e.n_ch = (ni + o->img_chunk - 1) / o->img_chunk;
  e.ch = calloc((size_t)e.n_ch, sizeof *e.ch);
  e.img_feat = malloc((size_t)ni * e.E * sizeof *e.img_feat);
  e.txt_feat = malloc((size_t)nt * e.E * sizeof *e.txt_feat);
  e.ids = malloc((size_t)nt * MAX_LEN * sizeof *e.ids);
  e.len = malloc((size_t)nt * sizeof *e.len);
  e.sims = malloc((size_t)ni * nt * sizeof *e.sims);
  e.simsT = malloc((size_t)ni * nt * sizeof *e.simsT);
  if (!e.ch || !e.img_feat || !e.txt_feat || !e.ids || !e.len || !e.sims || !e.simsT) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  if ((rc = phase_text(&e)) || (rc = phase_images(&e)) || (rc = phase_topk(&e))) goto done;
  if (!o->itc_only && (rc = phase_itm(&e))) goto done;
  if ((rc = phase_score(&e, &itc, &itm))) goto done;
  if (o->json) rc = print_json(&e, &itc, &itm);
  else print_text(&e, &itc, &itm);
done:
  ev_free(&e);
  return rc;
}

/* ---- --bench: real base geometry, random weights ---------------------------- */

static void base_cfg(blip_cfg *c) {
  memset(c, 0, sizeof *c);
  c->v_hidden = 768, c->v_layers = 12, c->v_heads = 12, c->v_mlp = 3072, c->image_size = 384, c->patch = 16;
  c->v_eps = 1e-5f, c->v_tokens = (384 / 16) * (384 / 16) + 1;
  c->t_vocab = 30524, c->t_hidden = 768, c->t_layers = 12, c->t_heads = 12, c->t_mlp = 3072, c->t_max_pos = 512;
  c->t_enc_hidden = 768, c->t_eps = 1e-12f, c->pad_id = 0, c->sep_id = 102, c->bos_id = 30522;
  c->embed_dim = 256;
}

/* Seconds per item, measured two ways: wall clock, and process CPU time
 * divided by the thread count (what an otherwise idle machine would take;
 * the two differ when other processes share the cores). */
typedef struct {
  double wall, idle;
} cost;

static double cpu_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static cost cost_since(double w0, double c0, int items) {
  cost k = {(now() - w0) / items, (cpu_now() - c0) / blip_k_threads() / items};
  if (k.idle > k.wall) k.idle = k.wall; /* CPU time also counts spin-waits */
  return k;
}

/* Synthetic COCO-size features (caption t close to image t/5) through the
 * real top-k, plan, scoring and ranking code: times those phases. */
static int bench_scoring(const opts *o, int E, double *s_topk, double *s_score, int64_t *pairs) {
  const int ni = 5000, nt = 25000;
  ev e = {.o = *o};
  e.o.k_test = 256;
  e.E = E;
  e.ann.n_images = ni, e.ann.n_texts = nt;
  e.img_feat = malloc((size_t)ni * E * sizeof *e.img_feat);
  e.txt_feat = malloc((size_t)nt * E * sizeof *e.txt_feat);
  e.sims = malloc((size_t)ni * nt * sizeof *e.sims);
  e.simsT = malloc((size_t)ni * nt * sizeof *e.simsT);
  e.ann.txt2img = malloc(nt * sizeof *e.ann.txt2img);
  e.ann.img2txt = malloc(nt * sizeof *e.ann.img2txt);
  e.ann.img2txt_off = malloc((ni + 1) * sizeof *e.ann.img2txt_off);
  int rc = BLIP_OK;
  if (!e.img_feat || !e.txt_feat || !e.sims || !e.simsT || !e.ann.txt2img || !e.ann.img2txt || !e.ann.img2txt_off) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  uint64_t r = 7;
  for (size_t j = 0; j < (size_t)nt * E; j++) {
    r = r * 6364136223846793005ULL + 1442695040888963407ULL;
    float u = (float)((r >> 40) & 0xffff) / 65536.0f - 0.5f;
    if (j < (size_t)ni * E) e.img_feat[j] = u;
    e.txt_feat[j] = u; /* overwritten below once the image rows exist */
  }
  for (size_t j = 0; j < (size_t)nt * E; j++) e.txt_feat[j] += e.img_feat[(j / E / 5) * E + j % E];
  blip_k_l2norm(e.img_feat, ni, E);
  blip_k_l2norm(e.txt_feat, nt, E);
  for (int t = 0; t < nt; t++) e.ann.txt2img[t] = t / 5, e.ann.img2txt[t] = t;
  for (int i = 0; i <= ni; i++) e.ann.img2txt_off[i] = 5 * i;
  double t0 = now();
  if ((rc = phase_topk(&e))) goto done;
  *s_topk = now() - t0;
  *pairs = e.plan.n_pairs;
  if (!(e.match = malloc(((size_t)e.plan.n_pairs + 1) * sizeof *e.match))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  for (int64_t p = 0; p < e.plan.n_pairs; p++) e.match[p] = (float)(p % 97) / 97.0f;
  blip_eval_recall a, b;
  if (!(rc = phase_score(&e, &a, &b))) *s_score = e.sec_score;
done:
  e.ann.n_images = e.ann.n_texts = 0; /* no strings to free */
  ev_free(&e);
  return rc;
}

static int run_bench(const opts *o) {
  enum { NB_IMG = 2, NB_TXT = 32, NB_PAIR = 32, NB_NAIVE = 8, CAP_LEN = 14 }; /* a COCO caption: ~14 tokens */
  blip_cfg c;
  blip_model *m = NULL;
  base_cfg(&c);
  blip_model_opts mo = {.precision = o->precision};
  int rc = blip_model_random(&c, &mo, 1, &m);
  if (rc) return rc;
  const size_t px = (size_t)3 * c.image_size * c.image_size, tok = (size_t)c.v_tokens * c.v_hidden;
  float *pix = malloc(NB_IMG * px * sizeof *pix), *emb = malloc(NB_IMG * tok * sizeof *emb);
  float *feat = malloc((size_t)(NB_IMG + NB_TXT) * c.embed_dim * sizeof *feat);
  float *logits = malloc(2 * NB_PAIR * sizeof *logits);
  int32_t *ids = malloc((size_t)NB_TXT * CAP_LEN * sizeof *ids), *mask = malloc((size_t)NB_TXT * CAP_LEN * sizeof *mask);
  const float *imgs[NB_PAIR];
  double w0, c0, s_topk = 0, s_score = 0;
  int64_t pairs = 0;
  cost img, txt, pair, naive;
  if (!pix || !emb || !feat || !logits || !ids || !mask) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  uint64_t r = 42;
  for (size_t j = 0; j < NB_IMG * px; j++) {
    r = r * 6364136223846793005ULL + 1442695040888963407ULL;
    pix[j] = (float)((r >> 40) & 0xffff) / 32768.0f - 1.0f;
  }
  for (int i = 0; i < NB_TXT; i++)
    for (int j = 0; j < CAP_LEN; j++) {
      ids[i * CAP_LEN + j] = j == 0 ? 101 : j == CAP_LEN - 1 ? 102 : 1000 + (i * 37 + j * 101) % 28000;
      mask[i * CAP_LEN + j] = 1;
    }
  printf("bench: base geometry (ViT-B/16 at 384, BERT-base, embed 256), random weights, %s, %d threads\n",
         blip_model_precision_name(o->precision), blip_k_threads());
  /* Each measurement follows a warm-up call (arena growth, oneDNN kernel creation). */
  if ((rc = blip_model_vision(m, pix, 1, emb, feat))) goto done;
  w0 = now(), c0 = cpu_now();
  if ((rc = blip_model_vision(m, pix, NB_IMG, emb, feat))) goto done;
  img = cost_since(w0, c0, NB_IMG);
  if ((rc = blip_model_text(m, ids, mask, 4, CAP_LEN, NULL, feat))) goto done;
  w0 = now(), c0 = cpu_now();
  if ((rc = blip_model_text(m, ids, mask, NB_TXT, CAP_LEN, NULL, feat))) goto done;
  txt = cost_since(w0, c0, NB_TXT);
  for (int i = 0; i < NB_PAIR; i++) imgs[i] = emb + (size_t)(i % NB_IMG) * tok;
  if ((rc = blip_model_itm(m, ids, CAP_LEN, imgs, 4, BLIP_ITM_ENC, 1, logits, NULL))) goto done;
  w0 = now(), c0 = cpu_now();
  if ((rc = blip_model_itm(m, ids, CAP_LEN, imgs, NB_PAIR, BLIP_ITM_ENC, 1, logits, NULL))) goto done;
  pair = cost_since(w0, c0, NB_PAIR);
  w0 = now(), c0 = cpu_now();
  if ((rc = blip_model_itm(m, ids, CAP_LEN, imgs, NB_NAIVE, BLIP_ITM_ENC, 0, logits, NULL))) goto done;
  naive = cost_since(w0, c0, NB_NAIVE);
  if ((rc = bench_scoring(o, c.embed_dim, &s_topk, &s_score, &pairs))) goto done;

  printf("per item, wall (idle-machine estimate = CPU time / threads):\n");
  printf("  vision     %8.3f s/image   (%.3f)\n", img.wall, img.idle);
  printf("  text       %8.1f ms/caption (%.1f), %d tokens\n", txt.wall * 1e3, txt.idle * 1e3, CAP_LEN);
  printf("  ITM        %8.1f ms/pair   (%.1f), reassociated cross-attention, %d candidates per call\n",
         pair.wall * 1e3, pair.idle * 1e3, NB_PAIR);
  printf("  ITM naive  %8.1f ms/pair   (%.1f): reassociation saves %.1fx\n", naive.wall * 1e3, naive.idle * 1e3,
         naive.wall / pair.wall);
  printf("COCO 5k scoring, synthetic features, k 256: sims + top-k + ITM plan %.1f s, score rows + ranks %.1f s;\n"
         "  ITM pairs planned %lld (%.1f per caption; upstream runs %d, shared pairs twice)\n",
         s_topk, s_score, (long long)pairs, (double)pairs / 25000, (5000 + 25000) * 256);
  printf("extrapolated hours, idle-machine estimate [measured wall]; ITM runs between k*captions pairs (every\n"
         "i2t pair also a t2i pair) and k*(images+captions) (no overlap):\n");
  printf("  %-9s %4s %7s %6s %15s %23s\n", "set", "k", "vision", "text", "ITM", "total");
  static const int ks[] = {16, 32, 64, 128, 256};
  static const struct {
    const char *name;
    int ni, nt;
  } sets[] = {{"COCO 5k", 5000, 25000}, {"Flickr 1k", 1000, 5000}};
  for (int d = 0; d < 2; d++)
    for (size_t j = 0; j < sizeof ks / sizeof *ks; j++) {
      int k = ks[j], ni = sets[d].ni, nt = sets[d].nt;
      double lo = (double)k * nt, hi = (double)k * (ni + nt);
      double base_i = ni * img.idle + nt * txt.idle, base_w = ni * img.wall + nt * txt.wall;
      printf("  %-9s %4d %7.2f %6.2f %6.1f - %6.1f %6.1f - %6.1f [%.1f - %.1f]%s\n", sets[d].name, k,
             ni * img.idle / 3600, nt * txt.idle / 3600, lo * pair.idle / 3600, hi * pair.idle / 3600,
             (base_i + lo * pair.idle) / 3600, (base_i + hi * pair.idle) / 3600, (base_w + lo * pair.wall) / 3600,
             (base_w + hi * pair.wall) / 3600,
             (k == 256 && d == 0) || (k == 128 && d == 1) ? "  <- paper's k_test" : "");
    }
done:
  free(pix);
  free(emb);
  free(feat);
  free(logits);
  free(ids);
  free(mask);
  blip_model_free(m);
  return rc;
}

/* ---- command line ---------------------------------------------------------- */

static void usage(FILE *f) {
  fprintf(f,
          "usage: blip-eval --model DIR --ann FILE.json --images ROOT [options]\n"
          "       blip-eval --bench [--threads N]\n"
          "BLIP image-text retrieval recall (COCO 5k / Flickr30k 1k protocol of salesforce/BLIP).\n"
          "  --model DIR       checkpoint directory (config.json, model.safetensors, vocab.txt)\n"
          "  --ann FILE        BLIP annotation JSON (coco_karpathy_test.json, flickr30k_test.json)\n"
          "  --images ROOT     directory the annotation's image paths are relative to\n"
          "  --dataset NAME    coco or flickr (default: from the annotation file name)\n"
          "  --k-test N        ITM rerank depth (default 256 for coco, 128 for flickr)\n"
          "  --itc-only        skip the ITM rerank; report ITC recall only\n"
          "  --limit N         first N images and their captions only (quick runs)\n"
          "  --cache DIR       keep features, vision tokens and ITM logits here; a rerun resumes\n"
          "  --cache-f16       store vision tokens as f16 (half the disk, logits move slightly)\n"
          "  --chunk N         items per cache chunk (default 32 images, 1024 captions, 16 ITM captions)\n"
          "  --dump FILE       write sims, score_i2t, score_t2i, txt2img as safetensors\n"
          "  --json            machine-readable output\n"
          "  --report          print the paper's numbers beside ours\n"
          "  --threads N       compute threads (default: all cores)\n"
          "  --precision P     f32 (default), bf16 or int8 linear layers, where the engine has them\n"
          "  --bench           time each phase at the base geometry (random weights) and\n"
          "                    extrapolate COCO 5k and Flickr 1k wall times\n");
}

static int parse_int(const char *s, int *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *end || end == s || v < 0 || v > INT32_MAX) return -1;
  *out = (int)v;
  return 0;
}

int main(int argc, char **argv) {
  opts o = {.k_test = -1, .img_chunk = 32, .txt_chunk = 1024, .itm_chunk = 16};
  int chunk = 0;
  g_tty = isatty(2);
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    int takes = 1;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(a, "--itc-only")) o.itc_only = 1, takes = 0;
    else if (!strcmp(a, "--json")) o.json = 1, takes = 0;
    else if (!strcmp(a, "--report")) o.report = 1, takes = 0;
    else if (!strcmp(a, "--bench")) o.bench = 1, takes = 0;
    else if (!strcmp(a, "--cache-f16")) o.f16 = 1, takes = 0;
    else if (!v) {
      fprintf(stderr, "blip-eval: %s needs a value (or is unknown); see --help\n", a);
      return 2;
    } else if (!strcmp(a, "--model")) o.model = v;
    else if (!strcmp(a, "--ann")) o.ann = v;
    else if (!strcmp(a, "--images")) o.images = v;
    else if (!strcmp(a, "--dataset")) o.dataset = v;
    else if (!strcmp(a, "--cache")) o.cache = v;
    else if (!strcmp(a, "--dump")) o.dump = v;
    else if (!strcmp(a, "--chunk") && !parse_int(v, &chunk) && chunk > 0) o.img_chunk = o.txt_chunk = o.itm_chunk = chunk;
    else if ((!strcmp(a, "--k-test") && !parse_int(v, &o.k_test) && o.k_test > 0) ||
             (!strcmp(a, "--limit") && !parse_int(v, &o.limit)) || (!strcmp(a, "--threads") && !parse_int(v, &o.threads)) ||
             (!strcmp(a, "--precision") && !blip_model_parse_precision(v, &o.precision))) {
    } else {
      fprintf(stderr, "blip-eval: bad option %s %s; see --help\n", a, v);
      return 2;
    }
    i += takes;
  }
  blip_k_set_threads(o.threads);
  int rc;
  if (o.bench) {
    rc = run_bench(&o);
  } else {
    if (!o.model || !o.ann || !o.images) {
      usage(stderr);
      return 2;
    }
    if (!o.dataset) o.dataset = strstr(o.ann, "flickr") ? "flickr" : "coco";
    if (strcmp(o.dataset, "coco") && strcmp(o.dataset, "flickr")) {
      fprintf(stderr, "blip-eval: --dataset must be coco or flickr\n");
      return 2;
    }
    if (o.k_test < 0) o.k_test = !strcmp(o.dataset, "flickr") ? 128 : 256;
    rc = run_eval(&o);
  }
  if (rc) {
    fprintf(stderr, "blip-eval: %s\n", blip_err_last());
    return 1;
  }
  return 0;
}
