/* blip_serve: see blip_serve.h.
 *
 * Design note.
 * - A request: the access handler's first call routes it (method + path),
 *   checks the token and the announced body size, and answers errors at
 *   once; POST bodies are gathered (multipart through MHD's post
 *   processor, capped) and the last call runs the handler. Every answer is
 *   built by respond(), which adds the security headers, so no response can
 *   miss them. Errors are {"error": "..."} with a 4xx/5xx status.
 * - Engine jobs (text, image, feature, rank-texts) are queued to the
 *   engine thread. A job is shared by the waiter and the engine (refcount):
 *   a waiter that gives up after budget_s leaves it to the engine, which
 *   skips it if not started and frees it when done.
 * - Files: the row's path must be its own realpath (stored paths are
 *   canonical), is opened O_NOFOLLOW, must be a regular file and must still
 *   have the indexed size and fingerprint (checked on the open descriptor):
 *   a file swapped for a symlink or another file since indexing is refused.
 * - Thumbnails: vips thumbnail (shrink-on-load, EXIF orientation, sRGB) of
 *   the verified descriptor, JPEG, cached as DB/thumbs/<size>/<id>-<fp>.jpg
 *   (temp file + rename, so readers see whole files only); ETag = fp+size.
 *   The cache is bounded (blip_tcache: least recently used out, and the
 *   thumbnails of photos gone from the index or changed); a fresh thumbnail
 *   is served from the descriptor it was written through, so a sweep
 *   between its rename and its answer cannot lose it. */
#include "blip_serve.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <microhttpd.h>
#include <pthread.h>
#include <semaphore.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <vips/vips.h>
#include <xxhash.h>

#include "blip_arg.h"
#include "blip_decode.h"
#include "blip_err.h"
#include "blip_img.h"
#include "blip_kern.h"
#include "blip_model.h"
#include "blip_out.h"
#include "blip_store.h"
#include "blip_tar.h"
#include "blip_tcache.h"

#define MAX_ARGS 32
#define BATCH_MAX 16 /* text queries per batch (text encoder and ITM rerank) */
/* ITM pairs (sum of the rerank depths) per batch: a pair costs about the
 * same at 16 or 32 a call (bench_engine), so a bigger batch would only make
 * its first answers wait for its last */
#define BATCH_PAIRS 64
#define THUMB_SMALL 256
#define THUMB_LARGE 1024

static const char CSP[] = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                          "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/* ================= parsing helpers ================= */

static int perr(char *err, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int perr(char *err, size_t cap, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  if (err && cap) vsnprintf(err, cap, fmt, ap);
  va_end(ap);
  return BLIP_EINVAL;
}

static int parse_int(const char *v, int lo, int hi, int *out) { return blip_arg_int("", v, lo, hi, out) ? -1 : 0; }

int blip_serve_parse_query(const blip_serve_kv *kv, int n, int need_q, blip_serve_query *q, char *err, size_t cap) {
  memset(q, 0, sizeof *q);
  q->n = 20;
  q->rerank = BLIP_SEARCH_RERANK;
  q->threshold = -1;
  for (int i = 0; i < n; i++) {
    const char *k = kv[i].key, *v = kv[i].value ? kv[i].value : "";
    if (!k) continue;
    if (!strcmp(k, "q")) {
      if (strlen(v) > BLIP_SERVE_MAX_TEXT) return perr(err, cap, "q is longer than %d bytes", BLIP_SERVE_MAX_TEXT);
      q->q = v;
    } else if (!strcmp(k, "n")) {
      if (parse_int(v, 1, BLIP_SERVE_MAX_RESULTS, &q->n)) return perr(err, cap, "n must be 1..%d", BLIP_SERVE_MAX_RESULTS);
    } else if (!strcmp(k, "offset")) {
      if (parse_int(v, 0, BLIP_SERVE_MAX_RESULTS, &q->offset))
        return perr(err, cap, "offset must be 0..%d", BLIP_SERVE_MAX_RESULTS);
    } else if (!strcmp(k, "rerank")) {
      if (parse_int(v, 0, 256, &q->rerank)) return perr(err, cap, "rerank must be 0..256");
    } else if (!strcmp(k, "threshold")) {
      char *end;
      float t = *v ? strtof(v, &end) : -1;
      if (*v && (*end || !(t >= 0 && t <= 1))) return perr(err, cap, "threshold must be a probability in 0..1");
      q->threshold = *v ? t : -1;
    } else if (!strcmp(k, "sort")) {
      if (strcmp(v, "score") && strcmp(v, "date") && *v) return perr(err, cap, "sort must be score or date");
      q->sort_date = !strcmp(v, "date");
    } else if (!strcmp(k, "under")) {
      if (!*v) continue;
      if (v[0] != '/') return perr(err, cap, "under must be an absolute directory");
      if (strlen(v) >= sizeof q->under) return perr(err, cap, "under is too long");
      snprintf(q->under, sizeof q->under, "%s", v); /* blip_search matches it as given and by realpath */
    } else if (!strcmp(k, "after") || !strcmp(k, "before")) {
      if (!*v) continue;
      if (blip_arg_date(k, v, k[0] == 'a' ? q->after : q->before)) return perr(err, cap, "%s", blip_err_last());
    } else if (!strcmp(k, "ext")) {
      if (strlen(v) >= sizeof q->ext) return perr(err, cap, "ext is too long");
      for (const char *c = v; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == ','))
          return perr(err, cap, "ext takes a comma-separated list of extensions");
      snprintf(q->ext, sizeof q->ext, "%s", v);
    }
  }
  if (need_q && (!q->q || !*q->q)) return perr(err, cap, "missing query text q");
  if (q->threshold >= 0 && q->rerank == 0) return perr(err, cap, "threshold needs the ITM rerank (rerank >= 1)");
  if (q->offset + q->n > BLIP_SERVE_MAX_RESULTS)
    return perr(err, cap, "offset + n must be <= %d", BLIP_SERVE_MAX_RESULTS);
  return BLIP_OK;
}

void blip_serve_query_opts(const blip_serve_query *q, blip_search_opts *o) {
  blip_search_opts_default(o);
  o->n = q->offset + q->n;
  o->rerank = q->rerank;
  o->threshold = q->threshold;
  o->sort_date = q->sort_date;
  o->filter.under = q->under[0] ? q->under : NULL;
  o->filter.after = q->after[0] ? q->after : NULL;
  o->filter.before = q->before[0] ? q->before : NULL;
  o->filter.exts = q->ext[0] ? q->ext : NULL;
}

int blip_serve_parse_id(const char *path, const char *prefix, int64_t *id) {
  size_t pl = strlen(prefix);
  if (strncmp(path, prefix, pl)) return BLIP_EINVAL;
  const char *p = path + pl;
  int64_t v = 0;
  int nd = 0;
  if (*p == '0') return BLIP_EINVAL;
  for (; *p >= '0' && *p <= '9'; p++, nd++) {
    if (nd >= 16) return BLIP_EINVAL;
    v = v * 10 + (*p - '0');
  }
  if (*p || nd == 0 || v > ((int64_t)1 << 53)) return BLIP_EINVAL;
  *id = v;
  return BLIP_OK;
}

static int b64val(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+' || c == '-') return 62;
  if (c == '/' || c == '_') return 63;
  return -1;
}

int blip_serve_b64decode(const char *in, size_t n, unsigned char **out, size_t *outn) {
  *out = NULL;
  *outn = 0;
  if (n >= 5 && !memcmp(in, "data:", 5)) { /* data URL: skip to the payload */
    const char *c = memchr(in, ',', n);
    if (!c || c - in < 12 || memcmp(c - 7, ";base64", 7)) return blip_err_set(BLIP_EINVAL, "bad data URL");
    n -= (size_t)(c + 1 - in);
    in = c + 1;
  }
  unsigned char *o = malloc(n / 4 * 3 + 3);
  if (!o) return blip_err_set(BLIP_ENOMEM, "out of memory");
  uint32_t acc = 0;
  int bits = 0, pad = 0;
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)in[i];
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    if (c == '=') {
      pad++;
      continue;
    }
    int v = b64val(c);
    if (v < 0 || pad) { /* a stray byte, or data after padding */
      free(o);
      return blip_err_set(BLIP_EINVAL, "bad base64");
    }
    acc = (acc << 6) | (uint32_t)v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      o[k++] = (unsigned char)(acc >> bits);
    }
  }
  if (bits >= 6 || pad > 2) { /* a lone 6-bit group cannot end a byte string */
    free(o);
    return blip_err_set(BLIP_EINVAL, "bad base64 length");
  }
  *out = o;
  *outn = k;
  return BLIP_OK;
}

static int json_body(const char *body, size_t n, json_t **j, char *err, size_t cap) {
  json_error_t je;
  *j = json_loadb(body, n, JSON_REJECT_DUPLICATES, &je);
  if (!*j) return perr(err, cap, "bad JSON body: %s", je.text);
  if (!json_is_object(*j)) {
    json_decref(*j);
    *j = NULL;
    return perr(err, cap, "the JSON body must be an object");
  }
  return BLIP_OK;
}

/* A base64 image field (NULL/absent allowed). */
static int json_image(json_t *j, const char *key, unsigned char **img, size_t *len, char *err, size_t cap) {
  json_t *v = json_object_get(j, key);
  if (!v || json_is_null(v)) return BLIP_OK;
  if (!json_is_string(v)) return perr(err, cap, "%s must be a base64 string", key);
  if (blip_serve_b64decode(json_string_value(v), json_string_length(v), img, len) || *len == 0)
    return perr(err, cap, "%s is not valid base64", key);
  return BLIP_OK;
}

int blip_serve_parse_knn(const char *body, size_t n, blip_serve_knn *k, char *err, size_t cap) {
  json_t *j = NULL, *v;
  int rc = BLIP_OK;
  memset(k, 0, sizeof *k);
  k->num_images = 40; /* ClipClient's default */
  k->modality_image = 1;
  if ((rc = json_body(body, n, &j, err, cap))) return rc;
  if ((v = json_object_get(j, "text")) && !json_is_null(v)) {
    if (!json_is_string(v) || json_string_length(v) > BLIP_SERVE_MAX_TEXT || strlen(json_string_value(v)) != json_string_length(v)) {
      rc = perr(err, cap, "text must be a string of at most %d bytes", BLIP_SERVE_MAX_TEXT);
      goto done;
    }
    if (json_string_length(v) && !(k->text = strdup(json_string_value(v)))) {
      rc = perr(err, cap, "out of memory");
      goto done;
    }
  }
  if ((rc = json_image(j, "image", &k->image, &k->image_len, err, cap))) goto done;
  if ((v = json_object_get(j, "image_url")) && !json_is_null(v)) {
    rc = perr(err, cap, "image_url is not supported: this server fetches no URLs (send the image as base64)");
    goto done;
  }
  if ((v = json_object_get(j, "embedding_input")) && !json_is_null(v)) {
    size_t d = json_array_size(v);
    if (!json_is_array(v) || d == 0 || d > 65536 || !(k->embedding = malloc(d * sizeof *k->embedding))) {
      rc = perr(err, cap, "embedding_input must be a non-empty array of numbers");
      goto done;
    }
    double ss = 0;
    for (size_t i = 0; i < d; i++) {
      json_t *x = json_array_get(v, i);
      double f = json_number_value(x);
      if (!json_is_number(x) || !isfinite(f) || fabs(f) > 1e30) {
        rc = perr(err, cap, "embedding_input must be a non-empty array of numbers");
        goto done;
      }
      k->embedding[i] = (float)f;
      ss += f * f;
    }
    if (!(ss > 0)) {
      rc = perr(err, cap, "embedding_input is the zero vector");
      goto done;
    }
    for (size_t i = 0; i < d; i++) k->embedding[i] = (float)(k->embedding[i] / sqrt(ss));
    k->embedding_dim = (int)d;
  }
  if ((v = json_object_get(j, "modality")) && !json_is_null(v)) {
    if (!json_is_string(v) || (strcmp(json_string_value(v), "image") && strcmp(json_string_value(v), "text"))) {
      rc = perr(err, cap, "modality must be \"image\" or \"text\"");
      goto done;
    }
    k->modality_image = !strcmp(json_string_value(v), "image");
  }
  if ((v = json_object_get(j, "num_images")) && !json_is_null(v)) {
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > BLIP_SERVE_MAX_RESULTS) {
      rc = perr(err, cap, "num_images must be an integer 1..%d", BLIP_SERVE_MAX_RESULTS);
      goto done;
    }
    k->num_images = (int)json_integer_value(v);
  }
  if (!!k->text + !!k->image + !!k->embedding != 1)
    rc = perr(err, cap, "send exactly one of text, image and embedding_input");
done:
  json_decref(j);
  if (rc) blip_serve_knn_free(k);
  return rc;
}

void blip_serve_knn_free(blip_serve_knn *k) {
  free(k->text);
  free(k->image);
  free(k->embedding);
  memset(k, 0, sizeof *k);
}

int blip_serve_parse_rank(const char *body, size_t n, blip_serve_rank *r, char *err, size_t cap) {
  json_t *j = NULL, *v;
  int rc;
  memset(r, 0, sizeof *r);
  r->rerank = BLIP_SEARCH_RERANK;
  r->n = BLIP_SERVE_MAX_TEXTS;
  if ((rc = json_body(body, n, &j, err, cap))) return rc;
  if ((rc = json_image(j, "image", &r->image, &r->image_len, err, cap))) goto done;
  if (!r->image) {
    rc = perr(err, cap, "missing image (base64)");
    goto done;
  }
  v = json_object_get(j, "texts");
  size_t nt = json_array_size(v);
  if (!json_is_array(v) || nt == 0 || nt > BLIP_SERVE_MAX_TEXTS) {
    rc = perr(err, cap, "texts must be an array of 1..%d strings", BLIP_SERVE_MAX_TEXTS);
    goto done;
  }
  if (!(r->texts = calloc(nt, sizeof *r->texts))) {
    rc = perr(err, cap, "out of memory");
    goto done;
  }
  for (size_t i = 0; i < nt; i++) {
    json_t *t = json_array_get(v, i);
    if (!json_is_string(t) || json_string_length(t) > BLIP_SERVE_MAX_TEXT ||
        strlen(json_string_value(t)) != json_string_length(t)) {
      rc = perr(err, cap, "texts[%zu] must be a string of at most %d bytes", i, BLIP_SERVE_MAX_TEXT);
      goto done;
    }
    if (!(r->texts[i] = strdup(json_string_value(t)))) {
      rc = perr(err, cap, "out of memory");
      goto done;
    }
    r->ntexts++;
  }
  if ((v = json_object_get(j, "rerank"))) {
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > BLIP_SERVE_MAX_TEXTS) {
      rc = perr(err, cap, "rerank must be an integer 0..%d", BLIP_SERVE_MAX_TEXTS);
      goto done;
    }
    r->rerank = (int)json_integer_value(v);
  }
  if ((v = json_object_get(j, "n"))) {
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > BLIP_SERVE_MAX_TEXTS) {
      rc = perr(err, cap, "n must be an integer 1..%d", BLIP_SERVE_MAX_TEXTS);
      goto done;
    }
    r->n = (int)json_integer_value(v);
  }
done:
  json_decref(j);
  if (rc) blip_serve_rank_free(r);
  return rc;
}

void blip_serve_rank_free(blip_serve_rank *r) {
  for (int i = 0; i < r->ntexts; i++) free(r->texts[i]);
  free(r->texts);
  free(r->image);
  memset(r, 0, sizeof *r);
}

int blip_serve_token_ok(const char *header, const char *token) {
  static const char B[] = "Bearer ";
  if (!header || strncmp(header, B, sizeof B - 1)) return 0;
  const char *got = header + sizeof B - 1;
  size_t lg = strlen(got), lt = strlen(token);
  unsigned char d = lg != lt;
  for (size_t i = 0; i < lt; i++) d |= (unsigned char)(token[i] ^ got[i < lg ? i : 0]);
  return d == 0 && lt > 0;
}

/* ================= server state ================= */

typedef enum { JOB_TEXT, JOB_PIXELS, JOB_FEAT, JOB_RANK } job_kind;

typedef struct job {
  struct job *next;
  job_kind kind;
  int refs, started, done, abandoned;
  /* in (owned by the job: a waiter may leave before the engine is done) */
  char *text;
  float *pixels, *feat;
  int feat_dim;
  blip_search_opts opts;
  char **texts;
  int ntexts, rerank;
  blip_serve_query q; /* opts.filter points into it; q.q unused (text) */
  /* out */
  int rc;
  char err[512];
  blip_search_result res;
  int64_t count; /* index count seen by the engine */
} job;

struct blip_serve {
  blip_serve_opts o;
  char *db_dir, *model_dir, *token, *cors, *thumb_dir;
  char session[65]; /* with a token: the page's cookie value (random, hex), so the token never sits in a cookie */
  const char *model_name;
  struct MHD_Daemon *d;
  int port;
  blip_model *m;
  int S, E;
  blip_decode *dec; /* uploads are decoded in decoder processes, as the indexer's photos */
  /* engine thread and its queue */
  pthread_t eng;
  pthread_mutex_t qmu;
  pthread_cond_t qcv, donecv;
  job *qhead, *qtail;
  int stopping;
  int64_t batched, batches; /* text queries answered in batches of 2+, and those batches (under qmu) */
  blip_search *s; /* engine thread only */
  char s_err[512];
  /* metadata connection (any thread, under dbmu) */
  pthread_mutex_t dbmu;
  sqlite3 *db;
  ino_t db_ino;
  FILE *log;
  pthread_mutex_t logmu;
  sem_t thumbs; /* thumbnails being made at once: bounds decode memory under a burst of misses */
  blip_tcache *tcache;
};

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

static int index_exists(const blip_serve *sv) {
  char p[PATH_MAX];
  snprintf(p, sizeof p, "%s/index.sqlite", sv->db_dir);
  return access(p, F_OK) == 0;
}

/* index.sqlite's inode, 0 when absent. */
static ino_t index_ino(const blip_serve *sv) {
  char p[PATH_MAX];
  struct stat st;
  snprintf(p, sizeof p, "%s/index.sqlite", sv->db_dir);
  return stat(p, &st) == 0 ? st.st_ino : 0;
}

/* ---- engine thread ---- */

/* Open the search context once an index exists; later, blip_search_refresh
 * reopens it after a rebuild. */
static int engine_ready(blip_serve *sv) {
  int rc;
  if (sv->s) {
    if ((rc = blip_search_refresh(sv->s, NULL))) snprintf(sv->s_err, sizeof sv->s_err, "%s", blip_err_last());
    return rc;
  }
  if (!index_exists(sv)) return BLIP_ENOTFOUND;
  if (!(rc = blip_search_open(sv->db_dir, &sv->s)) && (rc = blip_search_attach(sv->s, sv->m))) {
    blip_search_close(sv->s);
    sv->s = NULL;
  }
  if (rc) snprintf(sv->s_err, sizeof sv->s_err, "%s", blip_err_last());
  return rc;
}

static void job_free(job *j) {
  if (!j) return;
  blip_search_result_free(&j->res);
  free(j->text);
  free(j->pixels);
  free(j->feat);
  for (int i = 0; i < j->ntexts; i++) free(j->texts[i]);
  free(j->texts);
  free(j);
}

static void job_unref(blip_serve *sv, job *j) { /* under qmu */
  if (!--j->refs) job_free(j);
}

static void run_job(blip_serve *sv, job *j) {
  int rc = BLIP_OK;
  if (j->kind == JOB_RANK) {
    const blip_cfg *c = blip_model_cfg(sv->m);
    float *emb = malloc((size_t)c->v_tokens * c->v_hidden * sizeof *emb), *feat = malloc((size_t)c->embed_dim * 4);
    if (!emb || !feat) rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    if (!rc) rc = blip_model_vision(sv->m, j->pixels, 1, emb, feat);
    if (!rc) rc = blip_search_rank_texts(sv->m, emb, feat, (const char *const *)j->texts, j->ntexts, j->rerank, &j->res);
    free(emb);
    free(feat);
  } else if ((rc = engine_ready(sv)) == BLIP_ENOTFOUND) {
    j->count = 0; /* no index yet: an empty library */
    rc = BLIP_OK;
  } else if (rc) {
    blip_err_set(rc, "%s", sv->s_err);
  } else if (!(j->count = blip_search_count(sv->s))) {
    /* empty: nothing to search */
  } else if (j->kind == JOB_TEXT) {
    rc = blip_search_text(sv->s, j->text, &j->opts, &j->res);
  } else if (j->kind == JOB_PIXELS) {
    rc = blip_search_image(sv->s, j->pixels, &j->opts, &j->res);
  } else if (j->feat_dim != sv->E) {
    rc = blip_err_set(BLIP_EINVAL, "the embedding has %d dimensions, the index %d", j->feat_dim, sv->E);
  } else {
    rc = blip_search_feat(sv->s, j->feat, &j->opts, &j->res);
  }
  j->rc = rc;
  if (rc) snprintf(j->err, sizeof j->err, "%s", blip_err_last());
}

/* Text jobs b[0..n) as one blip_search_text_batch (one text-encoder call,
 * the ITM rerank of all their candidates together); 0 when there is no
 * index or it is empty: run_job answers them alone. Jobs whose client left
 * before the batch began are left out; each job's waiter is woken as soon
 * as the batch is done. */
static int run_text_batch(blip_serve *sv, job **b, int n) {
  blip_search_query q[BATCH_MAX];
  job *in[BATCH_MAX];
  int64_t count;
  int m = 0;
  if (engine_ready(sv) || !(count = blip_search_count(sv->s))) return 0;
  pthread_mutex_lock(&sv->qmu);
  for (int i = 0; i < n; i++)
    if (!b[i]->abandoned) in[m] = b[i], q[m++] = (blip_search_query){.query = b[i]->text, .o = &b[i]->opts};
  pthread_mutex_unlock(&sv->qmu);
  blip_search_text_batch(sv->s, q, m); /* each query carries its own outcome */
  pthread_mutex_lock(&sv->qmu);
  for (int i = 0; i < m; i++) {
    job *j = in[i];
    j->count = count;
    j->rc = q[i].rc;
    j->res = q[i].res;
    if (j->rc) snprintf(j->err, sizeof j->err, "%s", q[i].err);
    j->done = 1;
  }
  pthread_cond_broadcast(&sv->donecv);
  pthread_mutex_unlock(&sv->qmu);
  return 1;
}

static void *engine_main(void *arg) {
  blip_serve *sv = arg;
  blip_k_set_threads(sv->o.threads);
  pthread_mutex_lock(&sv->qmu);
  for (;;) {
    while (!sv->qhead && !sv->stopping) pthread_cond_wait(&sv->qcv, &sv->qmu);
    if (!sv->qhead) break;
    job *b[BATCH_MAX];
    int n = 0;
    b[n++] = sv->qhead;
    sv->qhead = sv->qhead->next;
    if (!sv->qhead) sv->qtail = NULL;
    if (b[0]->kind == JOB_TEXT && !b[0]->abandoned && sv->o.batch) { /* the other waiting text queries join */
      job *prev = NULL;
      int pairs = b[0]->opts.rerank;
      for (job *k = sv->qhead, *next; k && n < BATCH_MAX; k = next) {
        next = k->next;
        if (k->kind != JOB_TEXT || k->abandoned || (k->opts.rerank && pairs + k->opts.rerank > BATCH_PAIRS)) {
          prev = k;
          continue;
        }
        if (prev) prev->next = next;
        else sv->qhead = next;
        if (sv->qtail == k) sv->qtail = prev;
        b[n++] = k;
        pairs += k->opts.rerank;
      }
    }
    if (!b[0]->abandoned) {
      for (int i = 0; i < n; i++) b[i]->started = 1;
      pthread_mutex_unlock(&sv->qmu);
      int batched = n > 1 && run_text_batch(sv, b, n);
      if (!batched)
        for (int i = 0; i < n; i++) run_job(sv, b[i]);
      pthread_mutex_lock(&sv->qmu);
      if (batched) {
        sv->batched += n;
        sv->batches++;
      }
    }
    for (int i = 0; i < n; i++) {
      b[i]->done = 1;
      job_unref(sv, b[i]);
    }
    pthread_cond_broadcast(&sv->donecv);
  }
  pthread_mutex_unlock(&sv->qmu);
  blip_search_close(sv->s);
  sv->s = NULL;
  return NULL;
}

/* Whether the client hung up (EOF on its socket; bytes of a pipelined
 * request mean it is still there). */
static int client_gone(int fd) {
  char ch;
  if (fd < 0) return 0;
  ssize_t r = recv(fd, &ch, 1, MSG_PEEK | MSG_DONTWAIT);
  return r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

/* Queue j and wait for it until end (now_s() time: the request's budget),
 * watching the client's socket fd; the wait covers j's time in the queue and
 * its run. Returns 0 (j done), BLIP_EINTR (budget spent) or BLIP_ENOTFOUND
 * (the client left): then j is the engine's, which skips it if not started
 * and drops its result if running (a model call cannot be interrupted). */
static int engine_call(blip_serve *sv, job *j, int fd, double end) {
  pthread_mutex_lock(&sv->qmu);
  j->refs = 2;
  j->next = NULL;
  if (sv->qtail) sv->qtail->next = j;
  else sv->qhead = j;
  sv->qtail = j;
  pthread_cond_signal(&sv->qcv);
  int ret = 0;
  while (!j->done) {
    double t = now_s(), slice = end - t < 0.2 ? end - t : 0.2; /* look at the socket 5 times a second */
    if (slice <= 0) {
      ret = BLIP_EINTR;
      break;
    }
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    long ns = dl.tv_nsec + (long)(slice * 1e9);
    dl.tv_sec += ns / 1000000000L;
    dl.tv_nsec = ns % 1000000000L;
    if (pthread_cond_timedwait(&sv->donecv, &sv->qmu, &dl) == ETIMEDOUT && !j->done && client_gone(fd)) {
      ret = BLIP_ENOTFOUND;
      break;
    }
  }
  if (ret) {
    j->abandoned = 1;
    job_unref(sv, j);
  }
  pthread_mutex_unlock(&sv->qmu);
  return ret;
}

static job *job_new(job_kind k) {
  job *j = calloc(1, sizeof *j);
  if (j) {
    j->kind = k;
    blip_search_opts_default(&j->opts);
  }
  return j;
}

/* Search options from a parsed request, owned by the job. */
static void job_set_query(job *j, const blip_serve_query *bq) {
  j->q = *bq;
  j->q.q = NULL;
  blip_serve_query_opts(&j->q, &j->opts);
}

static void job_release(blip_serve *sv, job *j) {
  pthread_mutex_lock(&sv->qmu);
  job_unref(sv, j);
  pthread_mutex_unlock(&sv->qmu);
}

/* ---- metadata connection ---- */

typedef struct {
  char path[PATH_MAX];
  int64_t size, mtime_ns;
  uint64_t fp;
  char taken_at[20];
  float *feat; /* when asked for */
} row_info;

/* Under dbmu: a connection to the current index.sqlite, or NULL. */
static sqlite3 *meta_db(blip_serve *sv) {
  ino_t ino = index_ino(sv);
  if (sv->db && ino == sv->db_ino) return sv->db;
  sqlite3_close(sv->db);
  sv->db = NULL;
  if (!ino) return NULL;
  char p[PATH_MAX];
  snprintf(p, sizeof p, "%s/index.sqlite", sv->db_dir);
  if (sqlite3_open_v2(p, &sv->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
    sqlite3_close(sv->db);
    sv->db = NULL;
    return NULL;
  }
  sqlite3_busy_timeout(sv->db, 5000);
  sv->db_ino = ino;
  return sv->db;
}

/* Row id: BLIP_ENOTFOUND when no such searchable image. want_feat: r->feat malloc'd [E]. */
static int meta_row(blip_serve *sv, int64_t id, row_info *r, int want_feat) {
  int rc = BLIP_ENOTFOUND;
  sqlite3_stmt *st = NULL;
  memset(r, 0, sizeof *r);
  pthread_mutex_lock(&sv->dbmu);
  sqlite3 *db = meta_db(sv);
  if (!db || sqlite3_prepare_v2(db,
                                "SELECT path, size, mtime_ns, fingerprint, taken_at, feat FROM images "
                                "WHERE id=? AND state='ok' AND feat IS NOT NULL",
                                -1, &st, NULL) != SQLITE_OK)
    goto done;
  sqlite3_bind_int64(st, 1, id);
  if (sqlite3_step(st) != SQLITE_ROW) goto done;
  const char *p = (const char *)sqlite3_column_text(st, 0), *t = (const char *)sqlite3_column_text(st, 4);
  if (!p || strlen(p) >= sizeof r->path) goto done;
  snprintf(r->path, sizeof r->path, "%s", p);
  r->size = sqlite3_column_int64(st, 1);
  r->mtime_ns = sqlite3_column_int64(st, 2);
  r->fp = (uint64_t)sqlite3_column_int64(st, 3);
  snprintf(r->taken_at, sizeof r->taken_at, "%s", t ? t : "");
  if (want_feat) {
    int nb = sqlite3_column_bytes(st, 5);
    if (nb != sv->E * 4 || !(r->feat = malloc((size_t)nb))) goto done;
    memcpy(r->feat, sqlite3_column_blob(st, 5), (size_t)nb);
  }
  rc = BLIP_OK;
done:
  sqlite3_finalize(st);
  pthread_mutex_unlock(&sv->dbmu);
  return rc;
}

static int64_t meta_int(blip_serve *sv, const char *sql) {
  int64_t v = -1;
  sqlite3_stmt *st = NULL;
  pthread_mutex_lock(&sv->dbmu);
  sqlite3 *db = meta_db(sv);
  if (db && sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int64(st, 0);
  else if (!db)
    v = 0;
  sqlite3_finalize(st);
  pthread_mutex_unlock(&sv->dbmu);
  return v;
}

/* Whether a writer holds DIR/lock (blip-index running): /proc/locks, so that
 * the check itself never takes the lock an indexer could be waiting for. */
static int indexer_running(const blip_serve *sv) {
  char p[PATH_MAX], line[256];
  struct stat st;
  snprintf(p, sizeof p, "%s/lock", sv->db_dir);
  if (stat(p, &st) != 0) return 0;
  FILE *f = fopen("/proc/locks", "r");
  if (!f) return 0;
  int found = 0;
  unsigned maj, min;
  unsigned long ino;
  while (!found && fgets(line, sizeof line, f)) {
    char *c = strstr(line, "FLOCK");
    if (!c) continue;
    /* "N: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE START END" */
    char *t = strrchr(line, ':');
    while (t > line && t[-1] != ' ') t--;
    if (sscanf(t, "%x:%x:%lu", &maj, &min, &ino) == 3 && ino == (unsigned long)st.st_ino &&
        makedev(maj, min) == st.st_dev)
      found = 1;
  }
  fclose(f);
  return found;
}

/* ================= HTTP ================= */

enum { R_NONE, R_ASSET, R_SEARCH, R_SEARCH_IMAGE, R_SIMILAR, R_RANK, R_PHOTO, R_THUMB, R_STATUS, R_KNN, R_INDICES,
       R_OPTIONS, R_SESSION };

typedef struct {
  unsigned char *p;
  size_t n, cap;
} buf;

typedef struct {
  int route;
  int64_t id;
  const blip_serve_asset *asset;
  double t0, deadline; /* deadline: the body is in + budget_s (uploads decoded, engine job done) */
  int status;
  int too_big, multipart, bad_part;
  size_t got, max; /* body bytes received; the cap */
  struct MHD_PostProcessor *pp;
  buf body, file;   /* raw body; the multipart file part */
  char **texts;     /* multipart "text" fields */
  int ntexts;
  char method[16], path[256];
} req;

static int buf_add(buf *b, const void *p, size_t n, size_t max) {
  if (n > max - b->n) return -1;
  if (b->n + n > b->cap) {
    size_t c = b->cap ? b->cap : 65536;
    while (c < b->n + n) c *= 2;
    if (c > max) c = max;
    unsigned char *q = realloc(b->p, c + 1);
    if (!q) return -1;
    b->p = q;
    b->cap = c;
  }
  memcpy(b->p + b->n, p, n);
  b->n += n;
  b->p[b->n] = 0;
  return 0;
}

static void add_common_headers(blip_serve *sv, struct MHD_Connection *c, struct MHD_Response *r) {
  MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
  MHD_add_response_header(r, "Content-Security-Policy", CSP);
  MHD_add_response_header(r, "Referrer-Policy", "no-referrer");
  MHD_add_response_header(r, "X-Frame-Options", "DENY");
  if (sv->cors) {
    const char *origin = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin");
    if (origin && !strcmp(origin, sv->cors)) {
      MHD_add_response_header(r, "Access-Control-Allow-Origin", sv->cors);
      MHD_add_response_header(r, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
      MHD_add_response_header(r, "Access-Control-Allow-Headers", "Authorization, Content-Type");
      MHD_add_response_header(r, "Access-Control-Max-Age", "600");
    }
    MHD_add_response_header(r, "Vary", "Origin");
  }
}

/* Queue r (consumed) with status; every answer goes through here. */
static enum MHD_Result respond(blip_serve *sv, struct MHD_Connection *c, req *q, int status, struct MHD_Response *r,
                               const char *type) {
  if (!r) return MHD_NO;
  add_common_headers(sv, c, r);
  if (type) MHD_add_response_header(r, "Content-Type", type);
  q->status = status;
  enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, r);
  MHD_destroy_response(r);
  return ret;
}

static enum MHD_Result respond_json(blip_serve *sv, struct MHD_Connection *c, req *q, int status, json_t *j) {
  char *s = j ? json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
  json_decref(j);
  if (!s) return MHD_NO;
  struct MHD_Response *r = MHD_create_response_from_buffer(strlen(s), s, MHD_RESPMEM_MUST_FREE);
  if (!r) {
    free(s);
    return MHD_NO;
  }
  MHD_add_response_header(r, "Cache-Control", "no-store");
  return respond(sv, c, q, status, r, "application/json; charset=utf-8");
}

static enum MHD_Result respond_err(blip_serve *sv, struct MHD_Connection *c, req *q, int status, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static enum MHD_Result respond_err(blip_serve *sv, struct MHD_Connection *c, req *q, int status, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  /* keep the message valid UTF-8 for JSON: a cut or foreign byte becomes '?' */
  json_t *s = json_string(msg);
  if (!s) {
    for (char *p = msg; *p; p++)
      if ((unsigned char)*p >= 0x80) *p = '?';
    s = json_string(msg);
  }
  json_t *j = json_object();
  json_object_set_new(j, "error", s);
  json_object_set_new(j, "status", json_integer(status));
  struct MHD_Response *r = NULL;
  if (status == 401 || status == 503) { /* the header must be on the response that carries the JSON */
    char *t = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!t || !(r = MHD_create_response_from_buffer(strlen(t), t, MHD_RESPMEM_MUST_FREE))) {
      free(t);
      return MHD_NO;
    }
    if (status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer realm=\"blipsearch\"");
    else MHD_add_response_header(r, "Retry-After", "5");
    MHD_add_response_header(r, "Cache-Control", "no-store");
    return respond(sv, c, q, status, r, "application/json; charset=utf-8");
  }
  return respond_json(sv, c, q, status, j);
}

/* The engine's error as an HTTP status. */
static int err_status(int rc) {
  switch (rc) {
  case BLIP_EINVAL:
  case BLIP_EFORMAT:
  case BLIP_EUNSUPPORTED: return 400;
  case BLIP_ETOOBIG: return 413;
  case BLIP_EINTR: return 503;
  case BLIP_EMISMATCH: return 503;
  default: return 500;
  }
}

static enum MHD_Result collect_arg(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
  blip_serve_kv *kv = cls;
  int *n = (int *)&kv[MAX_ARGS];
  if (*n >= MAX_ARGS) return MHD_NO;
  kv[*n].key = key;
  kv[*n].value = value;
  (*n)++;
  return MHD_YES;
}

/* Query-string arguments; -1 when there are too many. */
static int get_args(struct MHD_Connection *c, blip_serve_kv kv[MAX_ARGS + 1]) {
  memset(kv, 0, sizeof(blip_serve_kv) * (MAX_ARGS + 1));
  int total = MHD_get_connection_values(c, MHD_GET_ARGUMENT_KIND, collect_arg, kv);
  int n = *(int *)&kv[MAX_ARGS];
  return total > n ? -1 : n;
}

/* ---- search answers ---- */

static json_t *result_json(blip_serve *sv, const job *j) {
  json_t *a = json_array();
  const blip_search_result *r = &j->res;
  int off = j->q.offset;
  for (int i = off; i < r->n; i++) {
    json_t *h = blip_search_hit_json(&r->hits[i], i + 1, NULL);
    char u[64];
    snprintf(u, sizeof u, "/api/thumb/%" PRId64, r->hits[i].id);
    json_object_set_new(h, "thumb", json_string(u));
    snprintf(u, sizeof u, "/api/photo/%" PRId64, r->hits[i].id);
    json_object_set_new(h, "photo", json_string(u));
    json_array_append_new(a, h);
  }
  const char *reason = NULL;
  if (r->n <= off) {
    if (j->count == 0) reason = "empty_index";
    else if (r->filtered && r->n_allowed == 0) reason = "filters";
    else if (j->opts.threshold >= 0) reason = "threshold";
    else reason = "no_more";
  }
  return json_pack("{s:o, s:I, s:i, s:b, s:b, s:i, s:i, s:s?}", "results", a, "count", (json_int_t)j->count,
                   "offset", off, "more", r->n >= j->opts.n && j->opts.n < BLIP_SERVE_MAX_RESULTS, "truncated",
                   r->truncated, "reranked", r->reranked, "dropped", r->dropped, "reason", reason);
}

/* Run j (filled in) and answer with its result or its error. */
static enum MHD_Result answer_job(blip_serve *sv, struct MHD_Connection *c, req *q, job *j,
                                  json_t *(*fmt)(blip_serve *, const job *, const void *), const void *fctx) {
  const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
  int rc = engine_call(sv, j, ci ? ci->connect_fd : -1, q->deadline);
  if (rc == BLIP_ENOTFOUND) {
    q->status = 499; /* the client left: nobody to answer */
    return MHD_NO;
  }
  if (rc)
    return respond_err(sv, c, q, 503, "the server is busy: the request spent its %g s budget waiting for the engine",
                       sv->o.budget_s);
  enum MHD_Result ret;
  if (j->rc) ret = respond_err(sv, c, q, err_status(j->rc), "%s", j->err);
  else ret = respond_json(sv, c, q, 200, fmt ? fmt(sv, j, fctx) : result_json(sv, j));
  job_release(sv, j);
  return ret;
}

/* Decode an uploaded image as the indexer decodes a photo: its
 * preprocessing and guards, in a decoder process (the bytes go through a
 * memfd, which the decoder opens like a file). */
static int decode_upload(blip_serve *sv, const unsigned char *p, size_t n, double end, float **pix) {
  blip_img_opts io;
  blip_img_opts_default(&io);
  io.size = sv->S;
  io.autorotate = 1;
  double left = end - now_s(); /* the request's budget: a slow decode is cut short */
  if (left < io.time_budget_s) io.time_budget_s = left > 1e-6 ? left : 1e-6;
  if (!(*pix = malloc((size_t)3 * sv->S * sv->S * sizeof **pix))) return blip_err_set(BLIP_ENOMEM, "out of memory");
  int fd = memfd_create("blip-upload", MFD_CLOEXEC), rc = BLIP_OK;
  size_t off = 0;
  while (fd >= 0 && off < n) {
    ssize_t w = write(fd, p + off, n - off);
    if (w <= 0) break;
    off += (size_t)w;
  }
  if (fd < 0 || off != n) {
    rc = blip_err_set(BLIP_EIO, "cannot hold the upload: %s", strerror(errno));
  } else {
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    rc = blip_decode_file(sv->dec, path, &io, *pix, NULL, NULL, NULL);
  }
  if (fd >= 0) close(fd);
  if (rc) {
    free(*pix);
    *pix = NULL;
  }
  return rc;
}

static json_t *rank_json(blip_serve *sv, const job *j, const void *ctx) {
  const int *n = ctx;
  json_t *a = json_array();
  for (int i = 0; i < j->res.n && i < *n; i++)
    json_array_append_new(a, blip_search_hit_json(&j->res.hits[i], i + 1, j->texts[j->res.hits[i].id]));
  return json_pack("{s:o, s:b}", "results", a, "truncated", j->res.truncated);
}

/* clip-retrieval results: [{id, similarity, url, caption, path}] */
static json_t *knn_json(blip_serve *sv, const job *j, const void *ctx) {
  const char *base = ctx;
  json_t *a = json_array();
  for (int i = 0; i < j->res.n; i++) {
    const blip_search_hit *h = &j->res.hits[i];
    char u[512];
    snprintf(u, sizeof u, "%s/api/photo/%" PRId64, base, h->id);
    const char *slash = strrchr(h->path, '/');
    json_t *o = json_pack("{s:I, s:o, s:s}", "id", (json_int_t)h->id, "similarity", blip_out_json_num(h->score),
                          "url", u);
    blip_out_json_name(o, "caption", slash ? slash + 1 : h->path); /* names as every tool writes them */
    blip_out_json_name(o, "path", h->path);
    json_array_append_new(a, o);
  }
  return a;
}

/* ---- files ---- */

/* A photo inside a webdataset tar ("TAR#MEMBER", blip_tar.h): the tar is
 * checked as a file is, the member's bytes against the row, and they are
 * served from a memfd (thumbnails read it like a file). */
static int open_member(const row_info *r, size_t cut, int *fd, struct stat *st) {
  char *tar = strndup(r->path, cut), *rp = NULL;
  uint8_t *b = NULL;
  size_t n = 0;
  int64_t mt;
  struct stat ls;
  int e = 410, m = -1, rc;
  if (!tar || lstat(tar, &ls)) goto done;
  if (S_ISLNK(ls.st_mode) || !(rp = realpath(tar, NULL)) || strcmp(rp, tar)) {
    e = rp || S_ISLNK(ls.st_mode) ? 403 : 410;
    goto done;
  }
  if ((rc = blip_tar_read(r->path, r->size, &b, &n, &mt))) { /* a larger member is a changed one */
    e = rc == BLIP_ETOOBIG ? 409 : 410;
    goto done;
  }
  e = 409;
  if ((int64_t)n != r->size || XXH3_64bits(b, n) != r->fp) goto done;
  if ((m = blip_tar_memfd(b, n)) < 0 || fstat(m, st)) goto done;
  *fd = m;
  m = -1;
  e = 0;
done:
  if (m >= 0) close(m);
  free(b);
  free(rp);
  free(tar);
  return e;
}

/* Open row id's file after checking it is still the indexed one. */
static int open_indexed(blip_serve *sv, int64_t id, row_info *r, int *fd, struct stat *st) {
  *fd = -1;
  if (meta_row(sv, id, r, 0)) return 404;
  struct stat ls;
  size_t cut = blip_tar_split(r->path);
  if (cut && lstat(r->path, &ls) && errno == ENOENT) return open_member(r, cut, fd, st);
  if (lstat(r->path, &ls)) return 410;
  if (S_ISLNK(ls.st_mode)) return 403;
  char *rp = realpath(r->path, NULL);
  int same = rp && !strcmp(rp, r->path);
  free(rp);
  if (!same) return rp ? 403 : 410; /* a directory on the way became a symlink */
  int f = open(r->path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  if (f < 0) return errno == ELOOP ? 403 : 410;
  char pp[64];
  blip_decode_info di = {0};
  snprintf(pp, sizeof pp, "/proc/self/fd/%d", f);
  if (fstat(f, st) || !S_ISREG(st->st_mode) || st->st_size != r->size ||
      blip_decode_fingerprint(pp, r->size, &di) || di.fingerprint != r->fp) {
    close(f);
    return 409;
  }
  *fd = f;
  return 0;
}

static const char *sniff_type(int fd) {
  unsigned char h[16] = {0};
  if (pread(fd, h, sizeof h, 0) < 12) return NULL;
  if (h[0] == 0xFF && h[1] == 0xD8 && h[2] == 0xFF) return "image/jpeg";
  if (!memcmp(h, "\x89PNG\r\n\x1a\n", 8)) return "image/png";
  if (!memcmp(h, "GIF8", 4)) return "image/gif";
  if (!memcmp(h, "RIFF", 4) && !memcmp(h + 8, "WEBP", 4)) return "image/webp";
  if (!memcmp(h, "II*\0", 4) || !memcmp(h, "MM\0*", 4)) return "image/tiff";
  if (!memcmp(h + 4, "ftypavif", 8)) return "image/avif";
  if (!memcmp(h + 4, "ftyp", 4)) return "image/heic";
  return NULL;
}

static int etag_match(struct MHD_Connection *c, const char *etag) {
  const char *inm = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "If-None-Match");
  return inm && (strstr(inm, etag) || !strcmp(inm, "*"));
}

static enum MHD_Result not_modified(blip_serve *sv, struct MHD_Connection *c, req *q, const char *etag,
                                    const char *cache) {
  struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
  if (!r) return MHD_NO;
  MHD_add_response_header(r, "ETag", etag);
  MHD_add_response_header(r, "Cache-Control", cache);
  return respond(sv, c, q, 304, r, NULL);
}

static enum MHD_Result file_error(blip_serve *sv, struct MHD_Connection *c, req *q, int status, int64_t id) {
  switch (status) {
  case 404: return respond_err(sv, c, q, 404, "no indexed photo %" PRId64, id);
  case 403:
    return respond_err(sv, c, q, 403, "photo %" PRId64 ": its path leads through a symbolic link now: not served", id);
  case 409:
    return respond_err(sv, c, q, 409, "photo %" PRId64 " changed since it was indexed: run blip-index", id);
  default: return respond_err(sv, c, q, 410, "photo %" PRId64 " is gone from its indexed path", id);
  }
}

/* A cached file answer: fd (consumed) of size bytes, with its ETag. */
static enum MHD_Result respond_fd(blip_serve *sv, struct MHD_Connection *c, req *q, int fd, off_t size,
                                  const char *etag, const char *cache, const char *type) {
  struct MHD_Response *resp = MHD_create_response_from_fd((uint64_t)size, fd);
  if (!resp) {
    close(fd);
    return MHD_NO;
  }
  MHD_add_response_header(resp, "ETag", etag);
  MHD_add_response_header(resp, "Cache-Control", cache);
  if (!type) MHD_add_response_header(resp, "Content-Disposition", "attachment");
  return respond(sv, c, q, 200, resp, type ? type : "application/octet-stream");
}

static enum MHD_Result serve_photo(blip_serve *sv, struct MHD_Connection *c, req *q) {
  row_info r;
  struct stat st;
  int fd, e = open_indexed(sv, q->id, &r, &fd, &st);
  if (e) return file_error(sv, c, q, e, q->id);
  char etag[48];
  snprintf(etag, sizeof etag, "\"p%016" PRIx64 "\"", r.fp);
  static const char cache[] = "private, max-age=3600";
  if (etag_match(c, etag)) {
    close(fd);
    return not_modified(sv, c, q, etag, cache);
  }
  const char *type = sniff_type(fd);
  int flags = fcntl(fd, F_GETFL);
  if (flags >= 0) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return respond_fd(sv, c, q, fd, st.st_size, etag, cache, type);
}

/* blip_tcache's keep test: the thumbnail's photo is still indexed, with
 * that fingerprint (unknown when the index cannot be read now: kept). */
static int thumb_keep(void *ctx, int64_t id, uint64_t fp) {
  blip_serve *sv = ctx;
  sqlite3_stmt *st = NULL;
  int keep = -1;
  pthread_mutex_lock(&sv->dbmu);
  sqlite3 *db = meta_db(sv);
  if (db && sqlite3_prepare_v2(db, "SELECT fingerprint FROM images WHERE id=? AND state='ok' AND feat IS NOT NULL",
                               -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_int64(st, 1, id);
    int r = sqlite3_step(st);
    if (r == SQLITE_ROW) keep = (uint64_t)sqlite3_column_int64(st, 0) == fp;
    else if (r == SQLITE_DONE) keep = 0;
  }
  sqlite3_finalize(st);
  pthread_mutex_unlock(&sv->dbmu);
  return keep;
}

/* Make the thumbnail of the verified descriptor fd into cache file dst;
 * *out: a descriptor of the file written, at offset 0. */
static int make_thumb(blip_serve *sv, int fd, int size, const char *dst, int *out) {
  char src[64], tmp[PATH_MAX];
  snprintf(src, sizeof src, "/proc/self/fd/%d", fd);
  VipsImage *in = NULL, *t = NULL, *u = NULL;
  void *jpg = NULL;
  size_t len = 0;
  int rc = BLIP_EFORMAT;
  if (!(in = vips_image_new_from_file(src, "access", VIPS_ACCESS_SEQUENTIAL, "fail_on", VIPS_FAIL_ON_ERROR, NULL)))
    goto done;
  blip_img_opts io;
  blip_img_opts_default(&io); /* the indexer's decompression-bomb guard */
  if ((int64_t)vips_image_get_width(in) * vips_image_get_height(in) > io.max_pixels) {
    rc = BLIP_ETOOBIG;
    goto done;
  }
  g_object_unref(in);
  in = NULL;
  /* shrink-on-load, EXIF orientation applied, colour to sRGB */
  if (vips_thumbnail(src, &t, size, "height", size, "size", VIPS_SIZE_DOWN, "export_profile", "srgb", NULL)) goto done;
  if (vips_image_hasalpha(t)) {
    VipsArrayDouble *bg = vips_array_double_newv(1, 255.0);
    int f = vips_flatten(t, &u, "background", bg, NULL);
    vips_area_unref(VIPS_AREA(bg));
    if (f) goto done;
    g_object_unref(t);
    t = u;
    u = NULL;
  }
  if (vips_colourspace(t, &u, VIPS_INTERPRETATION_sRGB, NULL)) goto done;
  g_object_unref(t);
  t = u;
  u = NULL;
  if (vips_cast_uchar(t, &u, NULL)) goto done;
  if (vips_jpegsave_buffer(u, &jpg, &len, "Q", 82, "strip", TRUE, NULL)) goto done;
  snprintf(tmp, sizeof tmp, "%s.%d.%lx.tmp", dst, (int)getpid(), (unsigned long)pthread_self());
  int o = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (o < 0) {
    rc = BLIP_EIO;
    goto done;
  }
  ssize_t w = write(o, jpg, len);
  if (w != (ssize_t)len || rename(tmp, dst) || lseek(o, 0, SEEK_SET)) {
    close(o);
    unlink(tmp);
    rc = BLIP_EIO;
    goto done;
  }
  *out = o;
  rc = BLIP_OK;
done:
  if (rc == BLIP_EFORMAT) blip_err_set(rc, "cannot make a thumbnail: %s", vips_error_buffer());
  vips_error_clear();
  if (in) g_object_unref(in);
  if (t) g_object_unref(t);
  if (u) g_object_unref(u);
  g_free(jpg);
  vips_thread_shutdown();
  return rc;
}

static enum MHD_Result serve_thumb(blip_serve *sv, struct MHD_Connection *c, req *q) {
  const char *sz = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "size");
  int size = THUMB_SMALL;
  if (sz && !strcmp(sz, "1024")) size = THUMB_LARGE;
  else if (sz && strcmp(sz, "256"))
    return respond_err(sv, c, q, 400, "size must be %d or %d", THUMB_SMALL, THUMB_LARGE);
  row_info r;
  struct stat st;
  int fd, e = open_indexed(sv, q->id, &r, &fd, &st);
  if (e) return file_error(sv, c, q, e, q->id);
  char etag[48], path[PATH_MAX];
  snprintf(etag, sizeof etag, "\"t%016" PRIx64 "-%d\"", r.fp, size);
  static const char cache[] = "private, max-age=86400";
  if (etag_match(c, etag)) {
    close(fd);
    return not_modified(sv, c, q, etag, cache);
  }
  snprintf(path, sizeof path, "%s/%d/%" PRId64 "-%016" PRIx64 ".jpg", sv->thumb_dir, size, q->id, r.fp);
  int tf = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW), hit = tf >= 0;
  if (!hit) { /* miss: made by this connection's thread, nobody else waits */
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/%d", sv->thumb_dir, size);
    mkdir(sv->thumb_dir, 0700);
    mkdir(dir, 0700);
    while (sem_wait(&sv->thumbs) && errno == EINTR) {
    }
    int rc = make_thumb(sv, fd, size, path, &tf);
    sem_post(&sv->thumbs);
    if (rc) {
      close(fd);
      return respond_err(sv, c, q, rc == BLIP_EIO ? 500 : 422, "photo %" PRId64 ": %s", q->id,
                         rc == BLIP_EIO ? "cannot write the thumbnail cache" : blip_err_last());
    }
  }
  close(fd);
  struct stat ts;
  if (fstat(tf, &ts)) {
    close(tf);
    return respond_err(sv, c, q, 500, "cannot read the thumbnail cache");
  }
  if (hit) blip_tcache_hit(sv->tcache, tf, ts.st_mtime);
  else blip_tcache_added(sv->tcache, ts.st_size); /* may sweep, in this request's thread */
  return respond_fd(sv, c, q, tf, ts.st_size, etag, cache, "image/jpeg");
}

/* ---- status ---- */

static enum MHD_Result serve_status(blip_serve *sv, struct MHD_Connection *c, req *q) {
  int64_t count = meta_int(sv, "SELECT count(*) FROM images WHERE feat IS NOT NULL AND offline=0");
  int64_t failed = meta_int(sv, "SELECT count(*) FROM images WHERE state='error'");
  int64_t offline = meta_int(sv, "SELECT count(*) FROM images WHERE offline=1");
  if (count < 0) /* an index from before the offline column (no writer has migrated it yet) */
    count = meta_int(sv, "SELECT count(*) FROM images WHERE feat IS NOT NULL");
  int64_t gen = meta_int(sv, "SELECT CAST(value AS INTEGER) FROM meta WHERE key='generation'");
  int depth = 0;
  pthread_mutex_lock(&sv->qmu);
  for (job *j = sv->qhead; j; j = j->next) depth++;
  int64_t batched = sv->batched, batches = sv->batches;
  pthread_mutex_unlock(&sv->qmu);
  json_t *j = json_pack("{s:I, s:I, s:I, s:I, s:s, s:s, s:s, s:b, s:i, s:i, s:i, s:I, s:I}", "count",
                        (json_int_t)count, "failed", (json_int_t)(failed < 0 ? 0 : failed), "offline",
                        (json_int_t)(offline < 0 ? 0 : offline), "generation", (json_int_t)gen, "model",
                        sv->model_name, "model_fingerprint", blip_model_fingerprint(sv->m), "precision",
                        blip_model_precision_name(blip_model_precision(sv->m)), "indexer_running",
                        indexer_running(sv), "queue", depth, "image_size", sv->S, "rerank_default",
                        BLIP_SEARCH_RERANK, "batched_queries", (json_int_t)batched, "batches", (json_int_t)batches);
  return respond_json(sv, c, q, 200, j);
}

/* ---- routing ---- */

static int route(blip_serve *sv, const char *method, const char *url, req *q) {
  int get = !strcmp(method, "GET") || !strcmp(method, "HEAD"), post = !strcmp(method, "POST");
  if (!strcmp(method, "OPTIONS")) return R_OPTIONS;
  if (get) {
    for (int i = 0; i < sv->o.n_assets; i++)
      if (!strcmp(url, sv->o.assets[i].name)) {
        q->asset = &sv->o.assets[i];
        return R_ASSET;
      }
    if (!strcmp(url, "/api/search")) return R_SEARCH;
    if (!strcmp(url, "/api/status")) return R_STATUS;
    if (!strcmp(url, "/indices-list")) return R_INDICES;
    if (!blip_serve_parse_id(url, "/api/similar/", &q->id)) return R_SIMILAR;
    if (!blip_serve_parse_id(url, "/api/photo/", &q->id)) return R_PHOTO;
    if (!blip_serve_parse_id(url, "/api/thumb/", &q->id)) return R_THUMB;
  }
  if (post) {
    if (!strcmp(url, "/api/search/image")) return R_SEARCH_IMAGE;
    if (!strcmp(url, "/api/rank-texts")) return R_RANK;
    if (!strcmp(url, "/knn-service")) return R_KNN;
    if (!strcmp(url, "/api/session")) return R_SESSION;
  }
  return R_NONE;
}

static int known_path(const char *url) {
  static const char *const P[] = {"/api/search", "/api/status", "/indices-list", "/api/search/image",
                                  "/api/rank-texts", "/knn-service", "/api/session"};
  for (size_t i = 0; i < sizeof P / sizeof *P; i++)
    if (!strcmp(url, P[i])) return 1;
  return 0;
}

static enum MHD_Result post_iter(void *cls, enum MHD_ValueKind kind, const char *key, const char *filename,
                                 const char *content_type, const char *transfer_encoding, const char *data,
                                 uint64_t off, size_t size) {
  req *q = cls;
  if (q->too_big) return MHD_YES;
  size_t max = q->max;
  if (filename || (key && (!strcmp(key, "file") || !strcmp(key, "image")))) {
    if (buf_add(&q->file, data, size, max)) q->too_big = 1;
  } else if (key && !strcmp(key, "text")) {
    if (off == 0) {
      if (q->ntexts >= BLIP_SERVE_MAX_TEXTS) {
        q->bad_part = 1;
        return MHD_YES;
      }
      char **t = realloc(q->texts, (size_t)(q->ntexts + 1) * sizeof *t);
      if (!t) {
        q->too_big = 1;
        return MHD_YES;
      }
      q->texts = t;
      if (!(q->texts[q->ntexts] = calloc(1, 1))) {
        q->too_big = 1;
        return MHD_YES;
      }
      q->ntexts++;
    }
    char **cur = &q->texts[q->ntexts - 1];
    size_t l = strlen(*cur);
    if (l + size > BLIP_SERVE_MAX_TEXT || memchr(data, 0, size)) {
      q->bad_part = 1;
      return MHD_YES;
    }
    char *n = realloc(*cur, l + size + 1);
    if (!n) {
      q->too_big = 1;
      return MHD_YES;
    }
    memcpy(n + l, data, size);
    n[l + size] = 0;
    *cur = n;
  }
  return MHD_YES;
}

/* Base URL for photo links in knn answers: the Host the client used, when it looks like a host. */
static void base_url(blip_serve *sv, struct MHD_Connection *c, char *out, size_t cap) {
  const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Host");
  int ok = h && *h && strlen(h) < 200;
  for (const char *p = h; ok && *p; p++)
    ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || strchr(".-:[]", *p);
  if (ok) snprintf(out, cap, "http://%s", h);
  else snprintf(out, cap, "http://127.0.0.1:%d", sv->port);
}

/* POST bodies: image search, rank-texts, knn-service. */
static enum MHD_Result handle_post(blip_serve *sv, struct MHD_Connection *c, req *q, const blip_serve_kv *kv,
                                   int nargs) {
  char err[512], base[256];
  if (q->too_big) return respond_err(sv, c, q, 413, "the request body is over %zu bytes", sv->o.max_upload);
  if (q->bad_part)
    return respond_err(sv, c, q, 400, "bad multipart body or form field (texts: at most %d of %d bytes each)",
                       BLIP_SERVE_MAX_TEXTS, BLIP_SERVE_MAX_TEXT);
  const unsigned char *img = q->multipart ? q->file.p : q->body.p;
  size_t img_n = q->multipart ? q->file.n : q->body.n;
  blip_serve_knn kn = {0};
  blip_serve_rank rk = {0};
  blip_serve_query bq;
  json_t *(*fmt)(blip_serve *, const job *, const void *) = NULL;
  const void *fctx = NULL;
  job *j = NULL;
  enum MHD_Result ret;
  if (q->route == R_KNN) {
    if (blip_serve_parse_knn((const char *)q->body.p, q->body.n, &kn, err, sizeof err))
      return respond_err(sv, c, q, 400, "%s", err);
    if (!kn.modality_image) {
      ret = respond_err(sv, c, q, 400, "modality \"text\": blipsearch indexes images only (use \"image\")");
      goto out;
    }
    if (!(j = job_new(kn.text ? JOB_TEXT : kn.image ? JOB_PIXELS : JOB_FEAT))) goto oom;
    j->opts.n = kn.num_images;
    j->text = kn.text;
    j->feat = kn.embedding;
    j->feat_dim = kn.embedding_dim;
    kn.text = NULL;
    kn.embedding = NULL;
    img = kn.image;
    img_n = kn.image_len;
    base_url(sv, c, base, sizeof base);
    fmt = knn_json;
    fctx = base;
  } else if (q->route == R_RANK) {
    if (!q->multipart) {
      if (blip_serve_parse_rank((const char *)q->body.p, q->body.n, &rk, err, sizeof err))
        return respond_err(sv, c, q, 400, "%s", err);
      img = rk.image;
      img_n = rk.image_len;
    } else {
      const char *rr = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "rerank");
      rk.rerank = BLIP_SEARCH_RERANK;
      rk.n = BLIP_SERVE_MAX_TEXTS;
      if (rr && parse_int(rr, 0, BLIP_SERVE_MAX_TEXTS, &rk.rerank))
        return respond_err(sv, c, q, 400, "rerank must be 0..%d", BLIP_SERVE_MAX_TEXTS);
      if (!q->ntexts) return respond_err(sv, c, q, 400, "no candidate texts (form fields named text)");
      rk.texts = q->texts; /* moved into rk, then into the job */
      rk.ntexts = q->ntexts;
      q->texts = NULL;
      q->ntexts = 0;
    }
    if (!(j = job_new(JOB_RANK))) goto oom;
    j->texts = rk.texts;
    j->ntexts = rk.ntexts;
    j->rerank = rk.rerank;
    rk.texts = NULL;
    rk.ntexts = 0;
    fmt = rank_json;
    fctx = &rk.n;
  } else {
    if (blip_serve_parse_query(kv, nargs, 0, &bq, err, sizeof err)) return respond_err(sv, c, q, 400, "%s", err);
    if (!(j = job_new(JOB_PIXELS))) goto oom;
    job_set_query(j, &bq);
    j->opts.threshold = -1; /* ITC only: there is no probability to cut at */
  }
  if (j->kind == JOB_PIXELS || j->kind == JOB_RANK) {
    if (!img || !img_n) {
      job_free(j);
      ret = respond_err(sv, c, q, 400, "no image in the request");
      goto out;
    }
    int rc = decode_upload(sv, img, img_n, q->deadline, &j->pixels);
    if (rc == BLIP_EINTR) {
      job_free(j);
      ret = respond_err(sv, c, q, 503, "the server is busy: the request spent its %g s budget decoding the image",
                        sv->o.budget_s);
      goto out;
    }
    if (rc) {
      job_free(j);
      ret = respond_err(sv, c, q, rc == BLIP_ETOOBIG ? 413 : rc == BLIP_ENOMEM ? 500 : 400, "the image: %s",
                        blip_err_last());
      goto out;
    }
  }
  ret = answer_job(sv, c, q, j, fmt, fctx);
out:
  blip_serve_knn_free(&kn);
  blip_serve_rank_free(&rk);
  return ret;
oom:
  blip_serve_knn_free(&kn);
  blip_serve_rank_free(&rk);
  return respond_err(sv, c, q, 500, "out of memory");
}

static enum MHD_Result handle(blip_serve *sv, struct MHD_Connection *c, req *q) {
  char err[512];
  q->deadline = now_s() + sv->o.budget_s;
  blip_serve_kv kv[MAX_ARGS + 1];
  int nargs = get_args(c, kv);
  if (nargs < 0) return respond_err(sv, c, q, 400, "too many query arguments (at most %d)", MAX_ARGS);
  switch (q->route) {
  case R_ASSET: {
    const blip_serve_asset *a = q->asset;
    const char *type = strstr(a->name, ".js") ? "text/javascript; charset=utf-8"
                       : strstr(a->name, ".css") ? "text/css; charset=utf-8"
                       : strstr(a->name, ".png") ? "image/png"
                                                  : "text/html; charset=utf-8";
    struct MHD_Response *r = MHD_create_response_from_buffer(a->len, (void *)a->data, MHD_RESPMEM_PERSISTENT);
    if (r) MHD_add_response_header(r, "Cache-Control", "no-cache");
    return respond(sv, c, q, 200, r, type);
  }
  case R_STATUS: return serve_status(sv, c, q);
  case R_INDICES: return respond_json(sv, c, q, 200, json_pack("[s]", "blipsearch"));
  case R_PHOTO: return serve_photo(sv, c, q);
  case R_THUMB: return serve_thumb(sv, c, q);
  case R_SEARCH:
  case R_SIMILAR: {
    blip_serve_query bq;
    if (blip_serve_parse_query(kv, nargs, q->route == R_SEARCH, &bq, err, sizeof err))
      return respond_err(sv, c, q, 400, "%s", err);
    job *j = job_new(q->route == R_SEARCH ? JOB_TEXT : JOB_FEAT);
    if (!j || (bq.q && !(j->text = strdup(bq.q)))) {
      job_free(j);
      return respond_err(sv, c, q, 500, "out of memory");
    }
    job_set_query(j, &bq);
    if (q->route == R_SIMILAR) {
      row_info r;
      if (meta_row(sv, q->id, &r, 1)) {
        job_free(j);
        return respond_err(sv, c, q, 404, "no indexed photo %" PRId64, q->id);
      }
      j->feat = r.feat;
      j->feat_dim = sv->E;
    }
    return answer_job(sv, c, q, j, NULL, NULL);
  }
  case R_SEARCH_IMAGE:
  case R_RANK:
  case R_KNN: return handle_post(sv, c, q, kv, nargs);
  case R_SESSION: { /* the page traded the token (checked above) for its cookie */
    struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (r && sv->token) {
      /* HttpOnly: no script reads it; SameSite=Strict: no other site's page sends it. Not Secure: the
       * server speaks plain http, and a Secure cookie would never come back over it */
      char ck[128];
      snprintf(ck, sizeof ck, "blip_session=%s; Path=/; HttpOnly; SameSite=Strict", sv->session);
      MHD_add_response_header(r, "Set-Cookie", ck);
    }
    return respond(sv, c, q, 204, r, NULL);
  }
  default: return respond_err(sv, c, q, 404, "not found");
  }
}

static enum MHD_Result access_cb(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                 const char *version, const char *upload_data, size_t *upload_data_size,
                                 void **con_cls) {
  blip_serve *sv = cls;
  req *q = *con_cls;
  if (!q) { /* first call: route, authenticate, size checks */
    if (!(q = calloc(1, sizeof *q))) return MHD_NO;
    *con_cls = q;
    q->t0 = now_s();
    snprintf(q->method, sizeof q->method, "%s", method);
    snprintf(q->path, sizeof q->path, "%s", url);
    q->route = route(sv, method, url, q);
    q->max = sv->o.max_upload;
    if (q->route == R_OPTIONS) {
      struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
      return respond(sv, c, q, 204, r, NULL);
    }
    if (sv->token && q->route != R_ASSET &&
        !blip_serve_token_ok(MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization"), sv->token)) {
      const char *ck = MHD_lookup_connection_value(c, MHD_COOKIE_KIND, "blip_session");
      char hdr[1100];
      snprintf(hdr, sizeof hdr, "Bearer %s", ck ? ck : "");
      if (!ck || strlen(ck) > 1000 || !blip_serve_token_ok(hdr, sv->session))
        return respond_err(sv, c, q, 401, "missing or wrong bearer token");
    }
    if (q->route == R_NONE) {
      if (known_path(url) || !blip_serve_parse_id(url, "/api/photo/", &q->id) ||
          !blip_serve_parse_id(url, "/api/thumb/", &q->id) || !blip_serve_parse_id(url, "/api/similar/", &q->id))
        return respond_err(sv, c, q, 405, "method %s not allowed here", method);
      return respond_err(sv, c, q, 404, "not found");
    }
    if (q->route == R_SEARCH_IMAGE || q->route == R_RANK || q->route == R_KNN) {
      const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
      if (cl && strtoull(cl, NULL, 10) > sv->o.max_upload)
        return respond_err(sv, c, q, 413, "the request body is over %zu bytes", sv->o.max_upload);
      const char *ct = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type");
      if (ct && !strncasecmp(ct, "multipart/form-data", 19) && q->route != R_KNN) {
        q->multipart = 1;
        if (!(q->pp = MHD_create_post_processor(c, 65536, post_iter, q)))
          return respond_err(sv, c, q, 400, "bad multipart body (no boundary?)");
      }
    }
    return MHD_YES;
  }
  if (*upload_data_size) { /* body data: all of it counts against the cap, kept or not */
    q->got += *upload_data_size;
    if (q->got > q->max) q->too_big = 1;
    if (q->multipart) {
      if (!q->too_big && MHD_post_process(q->pp, upload_data, *upload_data_size) != MHD_YES) q->bad_part = 1;
    } else if (!q->too_big && buf_add(&q->body, upload_data, *upload_data_size, sv->o.max_upload)) {
      q->too_big = 1;
      free(q->body.p);
      q->body = (buf){0};
    }
    *upload_data_size = 0;
    return MHD_YES;
  }
  return handle(sv, c, q);
}

/* URL unescaping as MHD's, except that %00 stays as it is: a NUL would cut
 * "/api/photo/1%00junk" to an id the client did not ask for. */
static size_t unescape_cb(void *cls, struct MHD_Connection *c, char *s) {
  char *w = s;
  for (const char *r = s; *r; r++) {
    if (*r == '%' && isxdigit((unsigned char)r[1]) && isxdigit((unsigned char)r[2])) {
      char hex[3] = {r[1], r[2], 0};
      unsigned long v = strtoul(hex, NULL, 16);
      if (v) {
        *w++ = (char)v;
        r += 2;
        continue;
      }
    }
    *w++ = *r;
  }
  *w = 0;
  return (size_t)(w - s);
}

/* A path as a log field: printable ASCII, the rest %XX (no log injection). */
static void log_escape(const char *in, char *out, size_t cap) {
  size_t k = 0;
  for (; *in && k + 4 < cap; in++) {
    unsigned char ch = (unsigned char)*in;
    if (ch > 0x20 && ch < 0x7f && ch != '%') out[k++] = (char)ch;
    else k += (size_t)snprintf(out + k, cap - k, "%%%02X", ch);
  }
  out[k] = 0;
}

static void completed_cb(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
  blip_serve *sv = cls;
  req *q = *con_cls;
  if (!q) return;
  char p[800];
  log_escape(q->path, p, sizeof p);
  pthread_mutex_lock(&sv->logmu);
  fprintf(sv->log, "%s %s %d %.1f ms%s\n", q->method, p, q->status ? q->status : 499, (now_s() - q->t0) * 1e3,
          toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : " (aborted)");
  fflush(sv->log);
  pthread_mutex_unlock(&sv->logmu);
  if (q->pp) MHD_destroy_post_processor(q->pp);
  free(q->body.p);
  free(q->file.p);
  for (int i = 0; i < q->ntexts; i++) free(q->texts[i]);
  free(q->texts);
  free(q);
  *con_cls = NULL;
}

/* ================= start / stop ================= */

static int parse_listen(const char *s, struct sockaddr_storage *ss, int *v6, int *loopback) {
  char host[128];
  const char *colon = strrchr(s, ':');
  if (!colon || (size_t)(colon - s) >= sizeof host) return -1;
  memcpy(host, s, (size_t)(colon - s));
  host[colon - s] = 0;
  int port;
  if (parse_int(colon + 1, 0, 65535, &port)) return -1;
  memset(ss, 0, sizeof *ss);
  size_t hl = strlen(host);
  if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
    host[hl - 1] = 0;
    if (inet_pton(AF_INET6, host + 1, &a->sin6_addr) != 1) return -1;
    a->sin6_family = AF_INET6;
    a->sin6_port = htons((uint16_t)port);
    *v6 = 1;
    *loopback = IN6_IS_ADDR_LOOPBACK(&a->sin6_addr);
    return 0;
  }
  struct sockaddr_in *a = (struct sockaddr_in *)ss;
  if (!strcmp(host, "localhost")) snprintf(host, sizeof host, "127.0.0.1");
  if (inet_pton(AF_INET, host, &a->sin_addr) != 1) return -1;
  a->sin_family = AF_INET;
  a->sin_port = htons((uint16_t)port);
  *v6 = 0;
  *loopback = (ntohl(a->sin_addr.s_addr) >> 24) == 127;
  return 0;
}

static char *dup_or_null(const char *s, int *oom) {
  if (!s) return NULL;
  char *d = strdup(s);
  if (!d) *oom = 1;
  return d;
}

static void engine_stop(blip_serve *sv) {
  pthread_mutex_lock(&sv->qmu);
  sv->stopping = 1;
  pthread_cond_signal(&sv->qcv);
  pthread_mutex_unlock(&sv->qmu);
  pthread_join(sv->eng, NULL);
}

static void serve_free(blip_serve *sv) {
  blip_decode_free(sv->dec);
  sqlite3_close(sv->db);
  blip_model_free(sv->m);
  free(sv->db_dir);
  free(sv->model_dir);
  free(sv->token);
  free(sv->cors);
  free(sv->thumb_dir);
  blip_tcache_close(sv->tcache);
  pthread_mutex_destroy(&sv->qmu);
  pthread_mutex_destroy(&sv->dbmu);
  pthread_mutex_destroy(&sv->logmu);
  pthread_cond_destroy(&sv->qcv);
  pthread_cond_destroy(&sv->donecv);
  sem_destroy(&sv->thumbs);
  free(sv);
}

int blip_serve_start(const blip_serve_opts *o, blip_serve **out) {
  *out = NULL;
  struct sockaddr_storage ss;
  int v6 = 0, loopback = 0, rc = BLIP_OK, oom = 0;
  const char *listen = o->listen ? o->listen : "127.0.0.1:8077";
  if (parse_listen(listen, &ss, &v6, &loopback))
    return blip_err_set(BLIP_EINVAL, "bad listen address '%s' (want ADDR:PORT or [V6]:PORT)", listen);
  if (!loopback && !o->token && !o->insecure_no_auth)
    return blip_err_set(BLIP_EINVAL, "%s is not a loopback address: give --token-file (or --insecure-no-auth to "
                                     "serve your photos to anyone who can reach it)", listen);
  if (!o->db_dir || !o->model_dir) return blip_err_set(BLIP_EINVAL, "need an index directory and a model");
  blip_serve *sv = calloc(1, sizeof *sv);
  if (!sv) return blip_err_set(BLIP_ENOMEM, "out of memory");
  sv->o = *o;
  if (!sv->o.max_conns) sv->o.max_conns = 64;
  if (!sv->o.conn_timeout_s) sv->o.conn_timeout_s = 15;
  if (!(sv->o.budget_s > 0)) sv->o.budget_s = 30;
  if (!sv->o.max_upload) sv->o.max_upload = BLIP_SERVE_MAX_UPLOAD;
  sv->log = o->log ? o->log : stderr;
  pthread_mutex_init(&sv->qmu, NULL);
  pthread_mutex_init(&sv->dbmu, NULL);
  pthread_mutex_init(&sv->logmu, NULL);
  pthread_cond_init(&sv->qcv, NULL);
  pthread_cond_init(&sv->donecv, NULL);
  sem_init(&sv->thumbs, 0, 4);
  sv->db_dir = dup_or_null(o->db_dir, &oom);
  sv->model_dir = dup_or_null(o->model_dir, &oom);
  sv->token = dup_or_null(o->token, &oom);
  sv->cors = dup_or_null(o->cors_origin, &oom);
  size_t tl = strlen(o->db_dir) + 8;
  if (oom || !(sv->thumb_dir = malloc(tl))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto fail;
  }
  snprintf(sv->thumb_dir, tl, "%s/thumbs", o->db_dir);
  unsigned char rnd[32];
  if (sv->token && getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
    rc = blip_err_set(BLIP_EIO, "cannot draw a session key: %s", strerror(errno));
    goto fail;
  }
  for (size_t i = 0; sv->token && i < sizeof rnd; i++) snprintf(sv->session + 2 * i, 3, "%02x", rnd[i]);
  if ((rc = blip_tcache_open(sv->thumb_dir, o->thumb_cache > 0 ? o->thumb_cache : BLIP_SERVE_THUMB_CACHE, thumb_keep,
                             sv, &sv->tcache)))
    goto fail;
  const char *slash = strrchr(sv->model_dir, '/');
  sv->model_name = slash && slash[1] ? slash + 1 : sv->model_dir;

  /* model: the index's precision unless told */
  const char *prec = o->precision;
  blip_search *probe = NULL;
  if (!prec && blip_search_open(sv->db_dir, &probe) == BLIP_OK) prec = blip_search_meta(probe, "precision");
  blip_model_opts mo = {BLIP_PREC_F32, NULL};
  if ((rc = blip_model_parse_precision(prec ? prec : "f32", &mo.precision))) {
    blip_search_close(probe);
    goto fail;
  }
  blip_search_close(probe);
  blip_decode_opts dopt;
  blip_decode_opts_default(&dopt);
  dopt.workers = 2;
  if ((rc = blip_img_init()) || (rc = blip_decode_new(&dopt, &sv->dec)) || (rc = blip_decode_start(sv->dec)) ||
      (rc = blip_model_load(sv->model_dir, &mo, &sv->m)))
    goto fail;
  if (!blip_model_tok(sv->m)) {
    rc = blip_err_set(BLIP_EINVAL, "%s: the model has no tokenizer", sv->model_dir);
    goto fail;
  }
  sv->S = blip_model_cfg(sv->m)->image_size;
  sv->E = blip_model_cfg(sv->m)->embed_dim;
  /* an index built by other weights is an error now, not at the first query */
  blip_search *chk = NULL;
  if (blip_search_open(sv->db_dir, &chk) == BLIP_OK) {
    rc = blip_search_attach(chk, sv->m);
    blip_search_close(chk);
    if (rc) goto fail;
  }
  if (pthread_create(&sv->eng, NULL, engine_main, sv)) {
    rc = blip_err_set(BLIP_ENOMEM, "cannot start the engine thread");
    goto fail;
  }
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL |
                   MHD_USE_ERROR_LOG | (v6 ? MHD_USE_IPv6 : 0);
  sv->d = MHD_start_daemon(flags, 0, NULL, NULL, access_cb, sv, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                           MHD_OPTION_CONNECTION_LIMIT, (unsigned)sv->o.max_conns, MHD_OPTION_CONNECTION_TIMEOUT,
                           (unsigned)sv->o.conn_timeout_s, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)65536,
                           MHD_OPTION_NOTIFY_COMPLETED, completed_cb, sv, MHD_OPTION_LISTEN_BACKLOG_SIZE, 128,
                           MHD_OPTION_UNESCAPE_CALLBACK, unescape_cb, sv,
                           MHD_OPTION_END);
  if (!sv->d) {
    rc = blip_err_set(BLIP_EIO, "cannot listen on %s: %s", listen, strerror(errno));
    engine_stop(sv);
    goto fail;
  }
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(sv->d, MHD_DAEMON_INFO_BIND_PORT);
  sv->port = di ? di->port : 0;
  *out = sv;
  return BLIP_OK;
fail:
  serve_free(sv);
  return rc;
}

int blip_serve_port(const blip_serve *s) { return s->port; }

void blip_serve_stop(blip_serve *sv) {
  if (!sv) return;
  MHD_stop_daemon(sv->d); /* joins the connection threads: no job waiter is left */
  engine_stop(sv);
  serve_free(sv);
}
