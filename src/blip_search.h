/* blip_search: BLIP retrieval over a blipsearch index.
 *
 * Text -> image follows BLIP's evaluation: pre_caption (30 words), tokenize
 * to 35, unimodal text feature, ITC cosine top-K from the store, then the
 * ITM head scores those K against their vision tokens ([ENC] first token)
 * in one batched call; final score = ITM match logit + cosine. Candidates
 * beyond K (when -n > K) keep their cosine and rank after the reranked ones,
 * as BLIP ranks its unscored pairs. Image -> image is ITC cosine; image ->
 * text ranks candidate captions with ITC + ITM.
 *
 * Filters become an allowed id set built by one SQL query and are passed to
 * blip_store_search (exact over small sets), so a result outside the filter
 * can never be returned.
 *
 * A blip_search holds the store (whose read-only SQLite connection it uses
 * for filters and row metadata: the store's API has no query by attribute);
 * like the model, one context is not for two threads. */
#ifndef BLIP_SEARCH_H
#define BLIP_SEARCH_H

#include <stddef.h>
#include <stdint.h>

#include "blip_model.h"

#define BLIP_SEARCH_MAX_TOKENS 35 /* BLIP retrieval's max_length */
#define BLIP_SEARCH_MAX_WORDS 30  /* pre_caption's max_words at retrieval */
#define BLIP_SEARCH_RERANK 16     /* default K: ~0.3 s of fast ITM at base size on 2 cores */

typedef struct blip_search blip_search;

typedef struct {
  int64_t id;      /* image id (image queries), or the text's index (rank_texts) */
  float score;     /* itm_logit + cosine when reranked, else cosine */
  float cosine;    /* ITC similarity */
  float itm_logit; /* ITM match logit; NAN when not reranked */
  float itm_prob;  /* softmax(logits)[1]; NAN when not reranked */
  char *path;      /* image path (malloc'd), or NULL */
  char taken_at[20];  /* EXIF "YYYY-MM-DDTHH:MM:SS" or "" */
  int64_t mtime_ns;
  char *caption; /* the image's caption from blip-index --captions (malloc'd), or NULL */
} blip_search_hit;

typedef struct {
  blip_search_hit *hits;
  int n;
  int truncated; /* the query had more than 35 tokens */
  int reranked;  /* candidates scored by ITM */
  int dropped;   /* rerank candidates left out: no stored tokens and the file could not be read */
  int vanished;  /* candidates skipped because a writer deleted or replaced them during the query */
  int filtered;  /* a filter was active; n_allowed = its size */
  int64_t n_allowed;
} blip_search_result;

/* Filters; NULL fields are off. Dates are compared as "YYYY-MM-DDTHH:MM:SS"
 * strings against taken_at, else the file's mtime in local time. */
typedef struct {
  const char *under;  /* directory (relative to the cwd or absolute): path is under it as given,
                         under its realpath or under realpath(parent)/name (a symlinked folder) */
  const char *after;  /* normalized date (blip_arg_date): date >= after */
  const char *before; /* date < before */
  const char *exts;   /* "jpg,png": extension, case-insensitive; jpg = jpeg, tif = tiff */
  const char *words;  /* caption has every one of these words (FTS5, case and accent blind) */
} blip_search_filter;

typedef struct {
  int n;           /* results wanted (>= 1) */
  int rerank;      /* K ITM candidates; 0 = ITC only */
  float threshold; /* keep hits with itm_prob >= threshold; < 0 = off */
  int sort_date;   /* order the final hits newest first instead of by score */
  int naive;       /* use the naive cross-attention (checks, benchmarks) */
  blip_search_filter filter;
} blip_search_opts;

void blip_search_opts_default(blip_search_opts *o);

/* Default index directory: $BLIPSEARCH_DB, else $XDG_DATA_HOME/blipsearch,
 * else ~/.local/share/blipsearch. */

/* Open the index at dir read-only. BLIP_ENOTFOUND when there is none. */
int blip_search_open(const char *dir, blip_search **out);
void blip_search_close(blip_search *s);
/* Reopen the index when its directory now holds another one (blip-index
 * --rebuild replaced index.sqlite), re-attaching the model: a long-lived
 * session (blip-query --stdin, a server) then answers from the new index.
 * Cheap (one stat); blip_search_text/image call it first. Keeps the open
 * index while a rebuild has not written its identity yet; BLIP_EMISMATCH when
 * the new index was built with another model. *reopened (may be NULL) says
 * whether it reopened. */
int blip_search_refresh(blip_search *s, int *reopened);
/* Index meta value ("model", "precision", ...) or NULL. */
const char *blip_search_meta(const blip_search *s, const char *key);
int64_t blip_search_count(blip_search *s);
/* BLIP_DAMAGE_* bits (blip_store.h): damaged derived data the queries so far worked around. */
unsigned blip_search_damage(const blip_search *s);
/* Use model m (borrowed) for queries; BLIP_EMISMATCH when the index was built
 * by other weights or another geometry. */
int blip_search_attach(blip_search *s, blip_model *m);

/* Text -> images. BLIP_EINVAL for a query without a word (empty or only
 * punctuation after pre_caption): its embedding would match at random. */
int blip_search_text(blip_search *s, const char *query, const blip_search_opts *o, blip_search_result *res);
/* Several text queries at once (a server's or --stdin's waiting queries):
 * one text-encoder call over all of them, each query's filter and store
 * search, then the rerank
 * candidates of all the queries scored together by blip_model_itm_pairs
 * (RERANK_CHUNK pairs per call), and each query finished as alone. Each
 * query gets the result blip_search_text gives it (to float rounding) or
 * its own error: a query refused (no words) fails alone. Returns BLIP_OK
 * when every query succeeded, else the first failure's code (with its
 * message). q[i].res is to be freed by blip_search_result_free. */
typedef struct {
  const char *query;         /* in */
  const blip_search_opts *o; /* in */
  blip_search_result res;    /* out (zeroed on error) */
  int rc;                    /* out: BLIP_OK or this query's error code */
  char err[512];             /* out: its message when rc != BLIP_OK */
} blip_search_query;
int blip_search_text_batch(blip_search *s, blip_search_query *q, int n);
/* Image -> images by ITC (pixels [3,S,S] preprocessed). */
int blip_search_image(blip_search *s, const float *pixels, const blip_search_opts *o, blip_search_result *res);
/* Images by ITC against a feature [E] (L2-normalized by the caller): "more
 * like this" from a stored feature, clip-retrieval's embedding input. */
int blip_search_feat(blip_search *s, const float *feat, const blip_search_opts *o, blip_search_result *res);
void blip_search_result_free(blip_search_result *res);

/* ---- entry points without an index (tests, image -> text) ---- */

/* pre_caption + tokenize to 35: ids[35], *len real tokens. */
int blip_search_prepare_text(const blip_model *m, const char *text, int32_t *ids, int *len, int *truncated);
/* Unimodal text feature [E] of len real tokens. */
int blip_search_text_feat(blip_model *m, const int32_t *ids, int len, float *feat);
/* ITM-score k candidates in one batched call: images[i] [T,Dv] with ITC
 * cosine cosine[i]; fills hits[i].itm_logit, itm_prob, cosine, score. */
int blip_search_rerank(blip_model *m, const int32_t *ids, int len, const float *const *images, const float *cosine,
                       int k, int naive, blip_search_hit *hits);
/* Image -> texts: rank n captions for one image (embeds [T,Dv], feat [E]).
 * The top `rerank` by cosine get ITM (0 = ITC only); hits[].id = text index. */
int blip_search_rank_texts(blip_model *m, const float *embeds, const float *feat, const char *const *texts, int n,
                           int rerank, blip_search_result *res);
/* A hit as blip-query --json prints it: {rank, id, path, taken_at, mtime,
 * score, itm_prob, itm_logit, cosine} (mtime in local time; NANs as null),
 * or for a ranked text (text != NULL) {rank, index, text, score, ...}.
 * Returns a new jansson object (json_t *) or NULL. */
void *blip_search_hit_json(const blip_search_hit *h, int rank, const char *text);
/* Order hits: reranked ones by score, then the rest by cosine (stable). */
void blip_search_sort(blip_search_hit *hits, int n);

#endif
