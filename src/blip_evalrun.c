/* blip_evalrun: see blip_evalrun.h.
 *
 * Design note. Phases: text features -> image features and vision tokens ->
 * ITC sims -> top-k both ways -> ITM match logits for the union of the top-k
 * pairs, grouped by caption (one caption against many images per engine
 * call) -> score matrices row by row (score = match logit + sim, -100
 * elsewhere) -> ranks and recall (blip_eval).
 *
 * Cache (opts.cache): every phase writes fixed-size chunks (txt-N, img-N,
 * itm-N .safetensors) atomically, each tagged with a key hashing the model
 * (fingerprint and precision) and the chunk's inputs; a chunk whose key does
 * not match is recomputed. So a killed run resumes losing at most the chunk
 * in flight, and a changed model or annotation never reuses stale data.
 * Vision tokens are stored f32 (default: mmapped and used in place) or f16
 * (opts.f16, half the disk; rounding moves ITM logits slightly). One run per
 * cache at a time (flock on DIR/.lock). Without a cache everything stays in
 * memory. */
#include "blip_evalrun.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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

#include "blip_decode.h"
#include "blip_err.h"
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

typedef blip_evalrun_opts opts;

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
  blip_decode *dec; /* the guarded decode path (isolated worker) */
} ev;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define progress(phase, done, total, fresh, t0) \
  do { \
    if (e->o.progress) e->o.progress(e->o.ctx, phase, done, total, fresh, now() - (t0)); \
  } while (0)

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
  io.reference = 1; /* BLIP's PIL path: Image.open(f).convert("RGB"), exact resampling */
  size_t px = (size_t)3 * io.size * io.size;
  for (int i = 0; i < n; i++) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", e->o.images, e->ann.image[s + i]);
    int rc = blip_decode_file(e->dec, path, &io, pix + i * px, NULL, NULL, NULL);
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

/* ---- phase 4: ITM match logits, by image ----------------------------------- */

/* The plan lists pairs by caption; ITM runs them by image so that each image's
 * cross-attention K/V are projected once (blip_model_itm_kv) for all the
 * captions scored against it (~2k/ni + k per image), which then run in batches
 * of equal length (no padding: the same math as the naive per-pair path).
 * A cache chunk holds the match logits of itm_chunk images, in by-image order. */
typedef struct {
  int64_t *off; /* [ni + 1] into pair/txt */
  int64_t *pair; /* [n_pairs] plan pair index, by image, then by caption length, then caption */
  int *txt;      /* [n_pairs] its caption */
} by_image;

static int by_image_build(const ev *e, by_image *bi) {
  const int ni = e->ann.n_images, nt = e->ann.n_texts;
  const int64_t np = e->plan.n_pairs;
  int *order = malloc(((size_t)nt + 1) * sizeof *order), cnt[MAX_LEN + 2] = {0};
  bi->off = calloc((size_t)ni + 1, sizeof *bi->off);
  bi->pair = malloc(((size_t)np + 1) * sizeof *bi->pair);
  bi->txt = malloc(((size_t)np + 1) * sizeof *bi->txt);
  if (!order || !bi->off || !bi->pair || !bi->txt) {
    free(order);
    return blip_err_set(BLIP_ENOMEM, "out of memory");
  }
  for (int t = 0; t < nt; t++) cnt[e->len[t] + 1]++; /* captions by length, stable */
  for (int l = 1; l <= MAX_LEN + 1; l++) cnt[l] += cnt[l - 1];
  for (int t = 0; t < nt; t++) order[cnt[e->len[t]]++] = t;
  for (int64_t p = 0; p < np; p++) bi->off[e->plan.img[p] + 1]++;
  for (int i = 0; i < ni; i++) bi->off[i + 1] += bi->off[i];
  int64_t *pos = malloc(((size_t)ni + 1) * sizeof *pos);
  if (!pos) {
    free(order);
    return blip_err_set(BLIP_ENOMEM, "out of memory");
  }
  memcpy(pos, bi->off, (size_t)ni * sizeof *pos);
  for (int j = 0; j < nt; j++) {
    int t = order[j];
    for (int64_t p = e->plan.off[t]; p < e->plan.off[t + 1]; p++) {
      int64_t q = pos[e->plan.img[p]]++;
      bi->pair[q] = p, bi->txt[q] = t;
    }
  }
  free(pos);
  free(order);
  return BLIP_OK;
}

/* All the planned pairs of image i: project its K/V, then the captions in
 * runs of one length, ITM_BATCH at a time. */
static int itm_image(ev *e, const by_image *bi, int i, float *tokscr, float *kv, int32_t *ids, float *logits) {
  int64_t a = bi->off[i], z = bi->off[i + 1];
  if (a == z) return BLIP_OK;
  int rc = blip_model_itm_kv(e->m, tokens_of(e, i, tokscr), kv);
  for (int64_t p = a; p < z && !rc;) {
    int len = e->len[bi->txt[p]], nb = 0;
    while (p + nb < z && nb < ITM_BATCH && e->len[bi->txt[p + nb]] == len) {
      memcpy(ids + (size_t)nb * len, e->ids + (size_t)bi->txt[p + nb] * MAX_LEN, (size_t)len * sizeof *ids);
      nb++;
    }
    if ((rc = blip_model_itm_captions(e->m, ids, len, nb, kv, BLIP_ITM_ENC, logits))) break;
    for (int b = 0; b < nb; b++) e->match[bi->pair[p + b]] = logits[2 * b + 1];
    p += nb;
  }
  return rc;
}

static int phase_itm(ev *e) {
  const int ni = e->ann.n_images, nt = e->ann.n_texts;
  const size_t tok = (size_t)e->T * e->Dv;
  int rc = BLIP_OK;
  by_image bi = {0};
  float *tokscr = malloc(tok * sizeof *tokscr), *kv = malloc(blip_model_itm_kv_floats(e->m) * sizeof *kv);
  float logits[2 * ITM_BATCH], *chunk = NULL;
  int32_t *ids = malloc((size_t)ITM_BATCH * MAX_LEN * sizeof *ids);
  e->match = malloc(((size_t)e->plan.n_pairs + 1) * sizeof *e->match);
  if (!tokscr || !kv || !ids || !e->match) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  if ((rc = by_image_build(e, &bi))) goto done;
  double t0 = now();
  long fresh = 0;
  uint64_t h0 = hash_str("itm-by-image", e->img_all); /* pairs index this image list and these captions */
  for (int t = 0; t < nt; t++) h0 = hash_str(e->ann.text[t], h0);
  for (int s = 0; s < ni && !rc; s += e->o.itm_chunk) {
    int n = ni - s < e->o.itm_chunk ? ni - s : e->o.itm_chunk, idx = s / e->o.itm_chunk;
    int64_t a = bi.off[s], z = bi.off[s + n];
    uint64_t h = XXH64(bi.txt + a, (size_t)(z - a) * sizeof *bi.txt, h0);
    for (int i = s; i <= s + n; i++) {
      int64_t rel = bi.off[i] - a;
      h = XXH64(&rel, sizeof rel, h);
    }
    char key[17];
    hex16(h, key);
    int64_t shape[1] = {z - a};
    blip_st *st = cache_open(e, "itm", idx, key);
    const unsigned char *cm = tensor_of(st, "match", BLIP_DT_F32, 1, shape);
    if (cm) {
      for (int64_t j = a; j < z; j++) {
        float v;
        memcpy(&v, cm + (size_t)(j - a) * sizeof v, sizeof v);
        e->match[bi.pair[j]] = v;
      }
      e->cached_itm++;
    }
    blip_st_close(st);
    if (cm) continue;
    for (int i = s; i < s + n && !rc; i++) {
      rc = itm_image(e, &bi, i, tokscr, kv, ids, logits);
      fresh++;
      progress("itm", i + 1, ni, fresh, t0);
    }
    if (!rc && e->o.cache) {
      blip_st_writer *w = NULL;
      float *tmp = realloc(chunk, ((size_t)(z - a) + 1) * sizeof *chunk);
      if (!tmp) {
        rc = blip_err_set(BLIP_ENOMEM, "out of memory");
        break;
      }
      chunk = tmp;
      for (int64_t j = a; j < z; j++) chunk[j - a] = e->match[bi.pair[j]];
      if (!(rc = blip_st_writer_new(&w)) && !(rc = blip_st_writer_add(w, "match", BLIP_DT_F32, 1, shape, chunk)))
        rc = chunk_save(e, w, "itm", idx, key);
      else blip_st_writer_free(w);
    }
  }
  e->sec_itm = now() - t0;
done:
  free(tokscr);
  free(kv);
  free(ids);
  free(chunk);
  free(bi.off);
  free(bi.pair);
  free(bi.txt);
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
  blip_decode_free(e->dec);
  if (e->lock_fd > 0) close(e->lock_fd);
}

int blip_evalrun(const blip_evalrun_opts *o, blip_evalrun_result *out) {
  ev e = {.o = *o};
  memset(out, 0, sizeof *out);
  int rc;
  if ((rc = blip_img_init())) return rc;
  blip_decode_opts dopt;
  blip_decode_opts_default(&dopt);
  if ((rc = blip_decode_new(&dopt, &e.dec))) return rc;
  blip_model_opts mo = {.precision = o->precision};
  if ((rc = blip_model_load(o->model, &mo, &e.m))) goto done;
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
  /* "ref": images decoded in blip_img's reference mode (caches made before it are recomputed) */
  e.img_base = hash_str(o->images, XXH64("tok-ref", 8, e.model_key) + (o->f16 ? 16 : 32));
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
  if ((rc = phase_score(&e, &out->itc, &out->itm))) goto done;
  snprintf(out->model, sizeof out->model, "%s", blip_model_fingerprint(e.m));
  out->n_images = ni, out->n_texts = nt, out->Dv = e.Dv, out->k_i2t = e.ki, out->k_t2i = e.kt;
  out->itm_pairs = e.plan.n_pairs;
  out->sec_text = e.sec_text, out->sec_img = e.sec_img, out->sec_itm = e.sec_itm, out->sec_score = e.sec_score;
  out->cached_text = e.cached_text, out->cached_img = e.cached_img, out->cached_itm = e.cached_itm;
done:
  ev_free(&e);
  return rc;
}

/* Synthetic COCO-size features (caption t close to image t/5) through the
 * real top-k, plan, scoring and ranking code: times those phases. */
int blip_evalrun_time_scoring(int E, double *s_topk, double *s_score, int64_t *pairs) {
  const int ni = 5000, nt = 25000;
  ev e = {0};
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
