/* blip_serve: blip-serve's HTTP server (libmicrohttpd) over a blipsearch
 * index: the web page, the JSON API and clip-retrieval's back-end protocol.
 *
 * Threads: MHD runs one thread per connection (bounded by max_conns). All
 * model and blip_search work goes to ONE engine thread through a job queue
 * (the model and the search context are single-threaded, and one OpenMP
 * master keeps one thread team and oneDNN's primitive cache). A search must
 * be done budget_s after its request (body included) came in: an upload's
 * decode gets what is left of it, then the connection waits for its job
 * (queue + run) until the deadline and answers 503; a job running then
 * runs on (a model call cannot be cut short) and its result is dropped. Photos,
 * thumbnails and status never enter the queue: they read row metadata
 * through a mutex-guarded read-only SQLite connection of their own, so a
 * thumbnail cache miss or a long rerank stalls nobody else. With batch on,
 * text queries waiting together are taken as one blip_search_text_batch:
 * one text-encoder call for all, and the ITM rerank of all their candidates
 * in shared calls (same results as one by one; README for when it pays).
 *
 * Live index: the store re-reads its generation on every search; a new
 * index.sqlite (blip-index --rebuild replaced the files) is noticed by its
 * inode and reopened. Files are served by id only, after checking that the
 * path is canonical, the final component is no symlink and the file still
 * has its indexed size and fingerprint.
 *
 * The parsing helpers below are pure (no server needed): the fuzz harness
 * and the server share them. */
#ifndef BLIP_SERVE_H
#define BLIP_SERVE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "blip_search.h"

#define BLIP_SERVE_MAX_TEXT 4096         /* bytes of a query or candidate text */
#define BLIP_SERVE_MAX_UPLOAD (50 << 20) /* default upload cap */
#define BLIP_SERVE_MAX_RESULTS 1000      /* offset + n */
#define BLIP_SERVE_MAX_TEXTS 256         /* candidate texts of /api/rank-texts */
#define BLIP_SERVE_THUMB_CACHE ((int64_t)512 << 20) /* default bound of DB/thumbs */

typedef struct {
  const char *name; /* "/" for the page, "/app.js", ... */
  const unsigned char *data;
  size_t len;
} blip_serve_asset;

typedef struct {
  const char *db_dir;      /* index directory */
  const char *model_dir;   /* BLIP model directory */
  const char *listen;      /* "ADDR:PORT" or "[V6]:PORT"; NULL = 127.0.0.1:8077; port 0 = any free port */
  const char *token;       /* bearer token (NULL: none) */
  int insecure_no_auth;    /* allow a non-loopback address without a token */
  const char *cors_origin; /* NULL: no CORS headers */
  const char *precision;   /* NULL: the index's */
  int threads;             /* engine compute threads (0: all cores) */
  int max_conns;           /* connection cap (0: 64) */
  int conn_timeout_s;      /* idle connection timeout (0: 15) */
  double budget_s;         /* a search's time from its request in to its result (0: 30) */
  size_t max_upload;       /* body cap in bytes (0: BLIP_SERVE_MAX_UPLOAD) */
  int batch;               /* text queries waiting together share the encoder and ITM calls */
  int64_t thumb_cache;     /* bytes DB/thumbs may hold (0: BLIP_SERVE_THUMB_CACHE) */
  const blip_serve_asset *assets;
  int n_assets;
  FILE *log; /* one line a request; NULL = stderr */
} blip_serve_opts;

typedef struct blip_serve blip_serve;

/* Load the model, open the index (an absent index is served as empty) and
 * start listening. Refuses a non-loopback address without token or
 * insecure_no_auth (BLIP_EINVAL). */
int blip_serve_start(const blip_serve_opts *o, blip_serve **out);
int blip_serve_port(const blip_serve *s);
/* Stop listening, finish the running requests, free everything. */
void blip_serve_stop(blip_serve *s);

/* ---- request parsing (pure) ---- */

typedef struct {
  const char *key, *value;
} blip_serve_kv;

/* A search request: q (text search only), n, offset, rerank, threshold,
 * under, after, before, ext, sort. */
typedef struct {
  const char *q;
  int n, offset, rerank, sort_date;
  float threshold;
  char under[4096], after[20], before[20], ext[256];
} blip_serve_query;

/* Parse and validate; BLIP_EINVAL with the reason in err on anything bad.
 * need_q: q is required (text search). Unknown keys are ignored. */
int blip_serve_parse_query(const blip_serve_kv *kv, int n, int need_q, blip_serve_query *q, char *err, size_t cap);
/* blip_search options for q (n = offset + n; filters point into q). */
void blip_serve_query_opts(const blip_serve_query *q, blip_search_opts *o);

/* Decimal id after prefix in path ("/api/thumb/" + "42"): 1 .. 2^53, no
 * sign, no leading zero, nothing after. BLIP_EINVAL otherwise. */
int blip_serve_parse_id(const char *path, const char *prefix, int64_t *id);

/* Base64 (standard or URL alphabet, padding optional, whitespace skipped, an
 * optional "data:...;base64," prefix). *out malloc'd. BLIP_EINVAL on bad input. */
int blip_serve_b64decode(const char *in, size_t n, unsigned char **out, size_t *outn);

/* clip-retrieval's /knn-service body (the fields ClipClient sends). */
typedef struct {
  char *text;           /* NULL or the text */
  unsigned char *image; /* decoded base64 image or NULL */
  size_t image_len;
  float *embedding; /* embedding_input, L2-normalized, or NULL */
  int embedding_dim;
  int num_images;
  int modality_image; /* modality "image" (the only index blipsearch has) */
} blip_serve_knn;

int blip_serve_parse_knn(const char *body, size_t n, blip_serve_knn *k, char *err, size_t cap);
void blip_serve_knn_free(blip_serve_knn *k);

/* /api/rank-texts JSON body: {"image": base64, "texts": [..], "rerank": K, "n": N}. */
typedef struct {
  unsigned char *image;
  size_t image_len;
  char **texts;
  int ntexts, rerank, n;
} blip_serve_rank;

int blip_serve_parse_rank(const char *body, size_t n, blip_serve_rank *r, char *err, size_t cap);
void blip_serve_rank_free(blip_serve_rank *r);

/* Bearer token check in time independent of where the strings differ. */
int blip_serve_token_ok(const char *header, const char *token);

#endif
