/* blip_search: see blip_search.h.
 *
 * Design note.
 * - One query = one store search of max(n, K) candidates by cosine, then
 *   ITM over the K best (fast = reassociated cross-attention), so the text
 *   layers run once over a [K, len] batch. A batch of text queries
 *   (blip_search_text_batch) shares the text encoder and the ITM calls: the
 *   (caption, candidate) pairs of all its queries go to blip_model_itm_pairs
 *   64 at a time (which bounds the vision-token buffer); both run the
 *   captions packed, so mixing lengths costs no padding. A single query is
 *   a batch of one: the stages (candidates, rerank, finish) are the same code.
 * - Vision tokens come from the rerank store; a candidate without a record
 *   (index built with --no-rerank-store, or a lost or damaged record) is decoded from
 *   its file with the indexer's preprocessing and run through the vision
 *   encoder. A candidate whose tokens cannot be had at all is dropped and
 *   counted (res->dropped), never given a made-up score.
 * - The filter is one parameterized SQL statement over images (the store's
 *   source of truth) returning the allowed ids; the store restricts its
 *   search to them and re-checks every result, so filters cannot leak.
 * - Readers beside a writer: the store's FAISS snapshot may return an id
 *   that a writer deleted (or replaced by a new row) before its tokens or
 *   metadata were read; such a candidate is skipped (res->vanished), never an
 *   error. A rebuild replaces index.sqlite: blip_search_refresh compares its
 *   device/inode with the file opened and reopens, so sessions follow it.
 * - Dates: EXIF taken_at is local time without a zone, so mtime is turned
 *   into local time as well and both compare as ISO strings. */
#include "blip_search.h"

#include <ctype.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <utf8proc.h>

#include "blip_decode.h"
#include "blip_err.h"
#include "blip_img.h"
#include "blip_out.h"
#include "blip_store.h"

#define MAX_EXTS 16
#define RERANK_CHUNK 64 /* (caption, candidate) pairs per ITM call: 113 MB of vision tokens at base size */

struct blip_search {
  char *dir;
  blip_store *st;
  sqlite3 *db; /* the store's (read-only) connection: filters and row metadata */
  blip_model *m;
  int E, T, Dv, S;
  struct stat file; /* index.sqlite as opened: another file there means a rebuild */
  blip_decode *dec; /* started when a candidate's tokens must come from its file */
};

void blip_search_opts_default(blip_search_opts *o) {
  memset(o, 0, sizeof *o);
  o->n = 10;
  o->rerank = BLIP_SEARCH_RERANK;
  o->threshold = -1;
}

/* ---- open / close ---- */

static int db_err(blip_search *s, const char *what) {
  return blip_err_set(BLIP_EDB, "%s: %s/index.sqlite: %s", what, s->dir, sqlite3_errmsg(s->db));
}

/* DIR/index.sqlite{suffix} of s, as it is on disk now */
static int db_stat(const blip_search *s, const char *suffix, struct stat *sb) {
  char p[4096];
  snprintf(p, sizeof p, "%s/index.sqlite%s", s->dir, suffix);
  return stat(p, sb);
}

int blip_search_open(const char *dir, blip_search **out) {
  *out = NULL;
  blip_search *s = calloc(1, sizeof *s);
  int rc = BLIP_OK;
  if (!s || !(s->dir = strdup(dir))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto fail;
  }
  db_stat(s, "", &s->file); /* before the open: a file replaced in between only costs a needless reopen */
  blip_store_opts so = {0};
  if ((rc = blip_store_open(dir, NULL, &so, &s->st))) goto fail;
  s->db = blip_store_sqlite(s->st);
  const char *e = blip_store_meta(s->st, "embed_dim"), *t = blip_store_meta(s->st, "v_tokens"),
             *v = blip_store_meta(s->st, "v_hidden");
  s->E = e ? atoi(e) : 0;
  s->T = t ? atoi(t) : 0;
  s->Dv = v ? atoi(v) : 0;
  *out = s;
  return BLIP_OK;
fail:
  blip_search_close(s);
  return rc;
}

void blip_search_close(blip_search *s) {
  if (!s) return;
  blip_store_close(s->st);
  blip_decode_free(s->dec);
  free(s->dir);
  free(s);
}

int blip_search_refresh(blip_search *s, int *reopened) {
  struct stat sb;
  if (reopened) *reopened = 0;
  if (db_stat(s, "", &sb) != 0) return BLIP_OK; /* a rebuild between removing the old file and creating the new */
  int same = sb.st_dev == s->file.st_dev && sb.st_ino == s->file.st_ino;
  if (same && blip_store_immutable(s->st)) { /* it sees no commits: reopen when the file changed or a writer came */
    struct stat w;
    same = sb.st_size == s->file.st_size && sb.st_mtim.tv_sec == s->file.st_mtim.tv_sec &&
           sb.st_mtim.tv_nsec == s->file.st_mtim.tv_nsec && db_stat(s, "-wal", &w) != 0;
  }
  if (same) return BLIP_OK;
  blip_search *n = NULL;
  int rc = blip_search_open(s->dir, &n);
  if (rc == BLIP_ENOTFOUND) return BLIP_OK; /* a rebuild that has not written its identity yet */
  if (!rc && s->m) rc = blip_search_attach(n, s->m);
  if (rc) {
    blip_search_close(n);
    return blip_err_wrap(rc, "reopening the rebuilt index %s", s->dir);
  }
  blip_search old = *s;
  *s = *n;
  *n = old;
  blip_search_close(n);
  if (reopened) *reopened = 1;
  return BLIP_OK;
}

const char *blip_search_meta(const blip_search *s, const char *key) { return blip_store_meta(s->st, key); }

int64_t blip_search_count(blip_search *s) { return blip_store_count(s->st); }

unsigned blip_search_damage(const blip_search *s) { return blip_store_damage(s->st); }

int blip_search_attach(blip_search *s, blip_model *m) {
  const blip_cfg *c = blip_model_cfg(m);
  const char *fp = blip_store_meta(s->st, "model");
  if (!fp || strcmp(fp, blip_model_fingerprint(m)) != 0)
    return blip_err_set(BLIP_EMISMATCH, "%s was indexed with model %s, this model is %s: use the same model or "
                                        "rebuild the index (blip-index --rebuild)", s->dir, fp ? fp : "(unknown)",
                        blip_model_fingerprint(m));
  if (c->embed_dim != s->E || c->v_tokens != s->T || c->v_hidden != s->Dv)
    return blip_err_set(BLIP_EMISMATCH, "%s: index geometry (E %d, T %d, Dv %d) differs from the model's", s->dir,
                        s->E, s->T, s->Dv);
  s->m = m;
  s->S = c->image_size;
  return BLIP_OK;
}

/* ---- scoring ---- */

int blip_search_prepare_text(const blip_model *m, const char *text, int32_t *ids, int *len, int *truncated) {
  char *clean = NULL;
  int32_t mask[BLIP_SEARCH_MAX_TOKENS];
  int rc = blip_tok_pre_caption(text, strlen(text), BLIP_SEARCH_MAX_WORDS, &clean, NULL);
  if (rc) return rc;
  rc = blip_model_tokenize(m, clean, BLIP_SEARCH_MAX_TOKENS, ids, mask, len, truncated);
  free(clean);
  return rc;
}

int blip_search_text_feat(blip_model *m, const int32_t *ids, int len, float *feat) {
  int32_t mask[BLIP_SEARCH_MAX_TOKENS];
  if (len < 2 || len > BLIP_SEARCH_MAX_TOKENS) return blip_err_set(BLIP_EINVAL, "text of %d tokens", len);
  for (int i = 0; i < len; i++) mask[i] = 1;
  return blip_model_text(m, ids, mask, 1, len, NULL, feat);
}

/* h's scores from its ITM logits l [no-match, match] and its cosine. */
static void hit_score(blip_search_hit *h, const float *l, float cosine) {
  h->cosine = cosine;
  h->itm_logit = l[1];
  h->itm_prob = 1.0f / (1.0f + expf(l[0] - l[1]));
  h->score = l[1] + cosine;
}

int blip_search_rerank(blip_model *m, const int32_t *ids, int len, const float *const *images, const float *cosine,
                       int k, int naive, blip_search_hit *hits) {
  if (k <= 0) return BLIP_OK;
  float *logits = malloc((size_t)k * 2 * sizeof *logits);
  if (!logits) return blip_err_set(BLIP_ENOMEM, "out of memory");
  int rc = blip_model_itm(m, ids, len, images, k, BLIP_ITM_ENC, !naive, logits, NULL);
  for (int i = 0; !rc && i < k; i++) hit_score(&hits[i], logits + 2 * i, cosine[i]);
  free(logits);
  return rc;
}

static int cmp_hit(const void *pa, const void *pb) {
  const blip_search_hit *a = pa, *b = pb;
  int ra = !isnan(a->itm_logit), rb = !isnan(b->itm_logit);
  if (ra != rb) return rb - ra;
  float sa = ra ? a->score : a->cosine, sb = rb ? b->score : b->cosine;
  if (sa != sb) return sa > sb ? -1 : 1;
  return (a->id > b->id) - (a->id < b->id);
}

void blip_search_sort(blip_search_hit *hits, int n) {
  if (n > 1) qsort(hits, (size_t)n, sizeof *hits, cmp_hit);
}

/* "YYYY-MM-DDTHH:MM:SS": taken_at, else mtime in local time. */
static void hit_date(const blip_search_hit *h, char out[20]) {
  if (h->taken_at[0]) {
    memcpy(out, h->taken_at, 20);
    return;
  }
  time_t t = (time_t)(h->mtime_ns / 1000000000);
  struct tm tm;
  localtime_r(&t, &tm);
  strftime(out, 20, "%Y-%m-%dT%H:%M:%S", &tm);
}

static int cmp_date(const void *pa, const void *pb) {
  char a[20], b[20];
  hit_date(pa, a);
  hit_date(pb, b);
  int c = strcmp(b, a); /* newest first */
  return c ? c : cmp_hit(pa, pb);
}

void blip_search_result_free(blip_search_result *res) {
  for (int i = 0; res->hits && i < res->n; i++) free(res->hits[i].path), free(res->hits[i].caption);
  free(res->hits);
  memset(res, 0, sizeof *res);
}

/* ---- filters and metadata ---- */

#define UNDER_FORMS 3

/* The spellings of the --under folder that stored paths can start with, each
 * ending in '/': the indexer canonicalizes its roots but keeps the path
 * through a symlinked folder inside a library, so DIR as given (absolute,
 * "." and ".." removed), its realpath and realpath(parent)/name are all
 * tried. *n = 0 when DIR is "/" (no filter). */
static int under_forms(const char *dir, char f[UNDER_FORMS][PATH_MAX + 1], int *n) {
  char abs[2 * PATH_MAX], real[PATH_MAX], *comp[PATH_MAX / 2];
  int nc = 0, k = 0;
  *n = 0;
  if (dir[0] != '/' && !getcwd(abs, PATH_MAX)) return blip_err_set(BLIP_EIO, "--under: cannot read the current folder");
  size_t at = dir[0] == '/' ? 0 : strlen(abs); /* the normal form is no longer than abs: it fits f[0] */
  if (at + 1 + strlen(dir) >= PATH_MAX) return blip_err_set(BLIP_EINVAL, "--under: path too long");
  snprintf(abs + at, PATH_MAX, "%s%s", at ? "/" : "", dir);
  for (char *save = NULL, *c = strtok_r(abs, "/", &save); c; c = strtok_r(NULL, "/", &save))
    if (!strcmp(c, "..")) nc -= nc > 0;
    else if (strcmp(c, ".")) comp[nc++] = c;
  if (!nc) return BLIP_OK; /* "/" */
  for (int i = 0; i < nc; i++) k += snprintf(f[0] + k, PATH_MAX + 1 - (size_t)k, "/%s", comp[i]);
  *n = 1;
  const char *base = strrchr(f[0], '/') + 1;
  if (realpath(f[0], real)) snprintf(f[(*n)++], PATH_MAX + 1, "%s", real);
  char parent[PATH_MAX + 1];
  snprintf(parent, sizeof parent, "%.*s", (int)(base - 1 - f[0]), f[0]);
  if (realpath(parent[0] ? parent : "/", real) &&
      snprintf(f[*n], PATH_MAX + 1, "%s/%s", strcmp(real, "/") ? real : "", base) < PATH_MAX)
    (*n)++;
  int m = 0; /* distinct forms, each with its trailing '/'; a "/" form matches all */
  for (int i = 0; i < *n; i++) {
    size_t l = strlen(f[i]);
    if (l == 1) return *n = 0, BLIP_OK;
    if (l >= PATH_MAX) continue; /* no room for the '/' (cannot name a real folder anyway) */
    memcpy(f[i] + l, "/", 2);
    int dup = 0;
    for (int j = 0; j < m; j++) dup |= !strcmp(f[j], f[i]);
    if (!dup && m != i) memcpy(f[m], f[i], l + 2);
    m += !dup;
  }
  *n = m;
  return BLIP_OK;
}

/* Allowed ids for f, in one statement. *active = 0 when f filters nothing. */
static int allowed_ids(blip_search *s, const blip_search_filter *f, int64_t **ids, int64_t *n, int *active) {
  static const char DATE[] = "COALESCE(NULLIF(taken_at,''),strftime('%Y-%m-%dT%H:%M:%S',mtime_ns/1000000000,"
                             "'unixepoch','localtime'))";
  char sql[2048], exts[MAX_EXTS][16], under[UNDER_FORMS][PATH_MAX + 1];
  int next = 0, nu = 0, rc = BLIP_OK;
  *ids = NULL;
  *n = 0;
  if (f->under && (rc = under_forms(f->under, under, &nu))) return rc;
  if (f->exts) {
    for (const char *p = f->exts; *p;) {
      size_t l = strcspn(p, ",");
      if (l) {
        if (next == MAX_EXTS || l >= sizeof exts[0])
          return blip_err_set(BLIP_EINVAL, "--ext: at most %d extensions of up to 15 chars", MAX_EXTS);
        for (size_t i = 0; i < l; i++)
          if (!isalnum((unsigned char)p[i]) && !(i == 0 && p[i] == '.'))
            return blip_err_set(BLIP_EINVAL, "--ext: bad extension '%.*s'", (int)l, p);
        size_t off = p[0] == '.';
        snprintf(exts[next++], sizeof exts[0], "%.*s", (int)(l - off), p + off);
        /* the two spellings of JPEG and TIFF are one format to a user */
        static const char *const syn[][2] = {{"jpg", "jpeg"}, {"jpeg", "jpg"}, {"tif", "tiff"}, {"tiff", "tif"}};
        for (size_t k = 0; k < sizeof syn / sizeof syn[0]; k++)
          if (!strcasecmp(exts[next - 1], syn[k][0])) {
            if (next == MAX_EXTS) return blip_err_set(BLIP_EINVAL, "--ext: at most %d extensions", MAX_EXTS);
            snprintf(exts[next++], sizeof exts[0], "%s", syn[k][1]);
            break;
          }
      }
      p += l + (p[l] == ',');
    }
  }
  char *words = NULL; /* each word an FTS5 string ("" doubles a quote): no query syntax from users */
  if (f->words) {
    size_t wl = strlen(f->words), o = 0, nw = 0;
    if (!(words = malloc(3 * wl + 3))) return blip_err_set(BLIP_ENOMEM, "out of memory");
    for (const char *p = f->words; *p;) {
      size_t l = strcspn(p, " \t\n\r");
      if (l) {
        if (nw++) words[o++] = ' ';
        words[o++] = '"';
        for (size_t i = 0; i < l; i++) {
          if (p[i] == '"') words[o++] = '"';
          words[o++] = p[i];
        }
        words[o++] = '"';
      }
      p += l;
      p += strspn(p, " \t\n\r");
    }
    words[o] = 0;
    if (!nw) {
      free(words);
      return blip_err_set(BLIP_EINVAL, "--words: no words");
    }
  }
  *active = nu || f->after || f->before || next || words;
  if (!*active) return BLIP_OK;
  int len = snprintf(sql, sizeof sql, "SELECT id FROM images WHERE feat IS NOT NULL AND offline=0");
  for (int i = 0; i < nu; i++) /* bytes, not characters: a path need not be UTF-8 */
    len += snprintf(sql + len, sizeof sql - len, "%s substr(CAST(path AS BLOB),1,length(?%d))=?%d%s",
                    i ? " OR" : " AND (", 21 + i, 21 + i, i == nu - 1 ? ")" : "");
  if (f->after) len += snprintf(sql + len, sizeof sql - len, " AND %s>=?3", DATE);
  if (f->before) len += snprintf(sql + len, sizeof sql - len, " AND %s<?4", DATE);
  for (int i = 0; i < next; i++) /* LIKE is ASCII case-insensitive; extensions are alnum, no wildcards */
    len += snprintf(sql + len, sizeof sql - len, "%s path LIKE ('%%.'||?%d)%s", i ? " OR" : " AND (", 5 + i,
                    i == next - 1 ? ")" : "");
  if (words) len += snprintf(sql + len, sizeof sql - len, " AND id IN (SELECT rowid FROM captions_fts WHERE captions_fts MATCH ?90)");
  sqlite3_stmt *st = NULL;
  int64_t cap = 0;
  if (sqlite3_prepare_v2(s->db, sql, -1, &st, NULL) != SQLITE_OK) {
    free(words);
    return db_err(s, "filter");
  }
  if (words) sqlite3_bind_text(st, 90, words, -1, SQLITE_STATIC);
  for (int i = 0; i < nu; i++) sqlite3_bind_blob(st, 21 + i, under[i], (int)strlen(under[i]), SQLITE_STATIC);
  if (f->after) sqlite3_bind_text(st, 3, f->after, -1, SQLITE_STATIC);
  if (f->before) sqlite3_bind_text(st, 4, f->before, -1, SQLITE_STATIC);
  for (int i = 0; i < next; i++) sqlite3_bind_text(st, 5 + i, exts[i], -1, SQLITE_STATIC);
  int r;
  while ((r = sqlite3_step(st)) == SQLITE_ROW) {
    if (*n == cap) {
      cap = cap ? cap * 2 : 1024;
      int64_t *p = realloc(*ids, (size_t)cap * sizeof *p);
      if (!p) {
        rc = blip_err_set(BLIP_ENOMEM, "out of memory");
        goto done;
      }
      *ids = p;
    }
    (*ids)[(*n)++] = sqlite3_column_int64(st, 0);
  }
  if (r != SQLITE_DONE) rc = db_err(s, "filter");
done:
  sqlite3_finalize(st);
  free(words);
  if (rc) {
    free(*ids);
    *ids = NULL;
    *n = 0;
  }
  return rc;
}

/* Path, taken_at, mtime and caption of hit h (q: "SELECT path, taken_at, mtime_ns, caption ...
 * WHERE id=?"). BLIP_ENOTFOUND when a writer deleted or replaced the image
 * since the search that found it: the caller skips it. */
static int hit_meta(blip_search *s, sqlite3_stmt *q, blip_search_hit *h) {
  sqlite3_reset(q);
  sqlite3_bind_int64(q, 1, h->id);
  int r = sqlite3_step(q);
  if (r == SQLITE_DONE) return BLIP_ENOTFOUND;
  if (r != SQLITE_ROW) return db_err(s, "metadata");
  const char *p = (const char *)sqlite3_column_text(q, 0), *t = (const char *)sqlite3_column_text(q, 1);
  if (!(h->path = strdup(p ? p : ""))) return blip_err_set(BLIP_ENOMEM, "out of memory");
  snprintf(h->taken_at, sizeof h->taken_at, "%s", t ? t : "");
  h->mtime_ns = sqlite3_column_int64(q, 2);
  const char *cap = (const char *)sqlite3_column_text(q, 3);
  if (cap && !(h->caption = strdup(cap))) return blip_err_set(BLIP_ENOMEM, "out of memory");
  return BLIP_OK;
}

static int meta_stmt(blip_search *s, sqlite3_stmt **q) {
  if (sqlite3_prepare_v2(s->db, "SELECT path, taken_at, mtime_ns, caption FROM images WHERE id=?", -1, q, NULL) == SQLITE_OK)
    return BLIP_OK;
  return db_err(s, "metadata");
}

/* Metadata of the first `want` hits that are still in the index; vanished
 * ones leave the list (counted in *vanished). *n becomes the number kept. */
static int fill_meta(blip_search *s, blip_search_hit *hits, int *n, int want, int *vanished) {
  sqlite3_stmt *q = NULL;
  int rc = meta_stmt(s, &q), m = 0;
  for (int i = 0; !rc && i < *n && m < want; i++) {
    int r = hit_meta(s, q, &hits[i]);
    if (r == BLIP_ENOTFOUND) (*vanished)++;
    else if (r) rc = r;
    else hits[m++] = hits[i];
  }
  sqlite3_finalize(q);
  if (!rc) *n = m;
  return rc;
}

/* Vision tokens of hit h into out [T,Dv]: rerank store, else (no record, or a
 * missing or damaged one) recomputed from the file. BLIP_ENOTFOUND only when
 * the image left the index meanwhile. */
static int hit_tokens(blip_search *s, blip_search_hit *h, float *pix, float *out) {
  int rc = blip_store_tokens(s->st, h->id, out);
  if (rc == BLIP_OK || rc == BLIP_ENOMEM || rc == BLIP_EDB) return rc;
  sqlite3_stmt *q = NULL;
  int m = meta_stmt(s, &q);
  if (!m) m = hit_meta(s, q, h); /* the row first: a deleted image's record may be a hole */
  sqlite3_finalize(q);
  if (m) return m;
  if ((rc == BLIP_ENOTFOUND || rc == BLIP_EFORMAT) && !(rc = blip_img_init())) {
    blip_img_opts io; /* the indexer's preprocessing */
    blip_img_opts_default(&io);
    io.size = s->S;
    io.autorotate = 1;
    io.shrink_on_load = 0;
    blip_decode_opts dopt;
    blip_decode_opts_default(&dopt);
    if ((s->dec || !(rc = blip_decode_new(&dopt, &s->dec))) &&
        !(rc = blip_decode_file(s->dec, h->path, &io, pix, NULL, NULL, NULL)))
      rc = blip_model_vision(s->m, pix, 1, out, NULL);
  }
  free(h->path); /* hits get their metadata once the final cut is known */
  free(h->caption);
  h->path = h->caption = NULL;
  return rc;
}

/* One query through the stages of a search by feature: candidates (filter,
 * store search), rerank (shared by the queries of a batch), finish. */
typedef struct {
  const float *feat;      /* [E] */
  const int32_t *ids;     /* the caption for ITM ([CLS] .. [SEP], len tokens); NULL = ITC only */
  int len;
  const blip_search_opts *o;
  blip_search_result *res;
  int rc;                 /* the query's outcome; err (errsz bytes) its message */
  char *err;
  size_t errsz;
  int kr, off, dropped;   /* candidates to rerank, their first slot in the batch's status array, those left out */
} squery;

static void squery_fail(squery *q, int rc) {
  q->rc = rc;
  snprintf(q->err, q->errsz, "%s", blip_err_last());
  blip_search_result_free(q->res);
}

/* Stage 1: the store's best max(n, K) by cosine as hits, the K best first (q->kr of them). */
static int feat_candidates(blip_search *s, squery *q) {
  const blip_search_opts *o = q->o;
  blip_search_result *res = q->res;
  int64_t *allow = NULL, n_allow = 0, *cid = NULL;
  float *ccos = NULL;
  int active = 0, rc, K = q->ids ? o->rerank : 0;
  q->kr = 0;
  if (o->n < 1 || K < 0) return blip_err_set(BLIP_EINVAL, "n must be >= 1 and rerank >= 0");
  if (!s->m) return blip_err_set(BLIP_EINVAL, "no model attached");
  if ((rc = allowed_ids(s, &o->filter, &allow, &n_allow, &active))) return rc;
  res->filtered = active;
  res->n_allowed = n_allow;
  if (active && n_allow == 0) goto done;
  int want = o->n > K ? o->n : K;
  cid = malloc((size_t)want * sizeof *cid);
  ccos = malloc((size_t)want * sizeof *ccos);
  if (!cid || !ccos) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  int got = blip_store_search(s->st, q->feat, want, active ? allow : NULL, n_allow, cid, ccos);
  if (got < 0) {
    rc = got;
    goto done;
  }
  if (!(res->hits = calloc(got ? (size_t)got : 1, sizeof *res->hits))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  res->n = got;
  for (int i = 0; i < got; i++)
    res->hits[i] = (blip_search_hit){cid[i], ccos[i], ccos[i], NAN, NAN, NULL, "", 0, NULL};
  q->kr = K < got ? K : got;
  if (q->kr) blip_search_sort(res->hits, got); /* the K best by cosine first */
done:
  free(allow);
  free(cid);
  free(ccos);
  return rc;
}

typedef struct {
  int q, i, naive;
} rr_pair;

static int cmp_pair(const void *pa, const void *pb) { /* one ITM path per call */
  const rr_pair *a = pa, *b = pb;
  if (a->naive != b->naive) return a->naive - b->naive;
  return a->q != b->q ? a->q - b->q : a->i - b->i;
}

/* Stage 2: ITM-score the candidates of every query q[j] (rc 0, kr > 0) as
 * (caption, image) pairs, RERANK_CHUNK pairs per blip_model_itm_pairs call
 * (which bounds the vision-token buffer). Each query's hits whose tokens
 * cannot be had are moved behind its others and counted in q->dropped,
 * those among them that left the index also in res->vanished. An error here
 * (memory, database, engine) is every reranking query's. */
static int rerank_batch(blip_search *s, squery *q, int n) {
  int np = 0, rc = BLIP_OK;
  for (int j = 0; j < n; j++)
    if (!q[j].rc) q[j].off = np, np += q[j].kr;
  if (!np) return BLIP_OK;
  const int chunk = np < RERANK_CHUNK ? np : RERANK_CHUNK, TK = BLIP_SEARCH_MAX_TOKENS;
  const size_t per = (size_t)s->T * s->Dv;
  rr_pair *pr = malloc((size_t)np * sizeof *pr);
  int *st = calloc((size_t)np, sizeof *st), *plen = malloc((size_t)chunk * sizeof *plen), *at = malloc((size_t)chunk * sizeof *at);
  int32_t *pid = malloc((size_t)chunk * TK * sizeof *pid);
  float *tok = malloc((size_t)chunk * per * sizeof *tok), *pix = malloc((size_t)3 * s->S * s->S * sizeof *pix);
  float *logits = malloc((size_t)chunk * 2 * sizeof *logits);
  const float **img = malloc((size_t)chunk * sizeof *img);
  blip_search_hit *tmp = NULL;
  if (!pr || !st || !plen || !at || !pid || !tok || !pix || !logits || !img) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory for %d rerank candidates", chunk);
    goto done;
  }
  np = 0;
  for (int j = 0; j < n; j++)
    for (int i = 0; !q[j].rc && i < q[j].kr; i++) pr[np++] = (rr_pair){j, i, q[j].o->naive != 0};
  qsort(pr, (size_t)np, sizeof *pr, cmp_pair);
  for (int c0 = 0, c1; c0 < np; c0 = c1) {
    int m = 0, L = 0; /* usable pairs of this chunk */
    for (c1 = c0; c1 < np && c1 - c0 < chunk && pr[c1].naive == pr[c0].naive; c1++) {
      squery *qq = &q[pr[c1].q];
      int r = hit_tokens(s, &qq->res->hits[pr[c1].i], pix, tok + (size_t)m * per);
      if (r == BLIP_ENOMEM || r == BLIP_EDB) {
        rc = r;
        goto done;
      }
      if (r) {
        st[qq->off + pr[c1].i] = r;
        continue;
      }
      img[m] = tok + (size_t)m * per;
      memcpy(pid + (size_t)m * TK, qq->ids, (size_t)qq->len * sizeof *pid);
      plen[m] = qq->len;
      if (qq->len > L) L = qq->len;
      at[m++] = c1;
    }
    if (!m) continue;
    for (int r = 0; r < m; r++) { /* rows of TK -> rows of the longest caption (the rest ignored) */
      memmove(pid + (size_t)r * L, pid + (size_t)r * TK, (size_t)plen[r] * sizeof *pid);
      memset(pid + (size_t)r * L + plen[r], 0, (size_t)(L - plen[r]) * sizeof *pid);
    }
    if ((rc = blip_model_itm_pairs(s->m, pid, plen, L, img, m, BLIP_ITM_ENC, !pr[c0].naive, logits, NULL))) goto done;
    for (int r = 0; r < m; r++) {
      blip_search_hit *h = &q[pr[at[r]].q].res->hits[pr[at[r]].i];
      hit_score(h, logits + 2 * r, h->cosine);
    }
  }
  for (int j = 0; j < n; j++) { /* usable hits first, in their order */
    squery *qq = &q[j];
    int ok = 0, bad = 0;
    if (qq->rc || !qq->kr) continue;
    blip_search_hit *hits = qq->res->hits, *t = realloc(tmp, (size_t)qq->kr * sizeof *t);
    if (!t) {
      rc = blip_err_set(BLIP_ENOMEM, "out of memory");
      goto done;
    }
    tmp = t;
    for (int i = 0; i < qq->kr; i++) {
      int r = st[qq->off + i];
      if (!r) {
        tmp[ok++] = hits[i];
        continue;
      }
      qq->res->vanished += r == BLIP_ENOTFOUND;
      tmp[qq->kr - 1 - bad++] = hits[i];
    }
    memcpy(hits, tmp, (size_t)qq->kr * sizeof *hits);
    qq->dropped = bad;
  }
done:
  free(pr);
  free(st);
  free(plen);
  free(at);
  free(pid);
  free(tok);
  free(pix);
  free(logits);
  free(img);
  free(tmp);
  return rc;
}

/* Stage 3: the dropped candidates leave, then order, threshold, metadata. */
static int feat_finish(blip_search *s, squery *q) {
  const blip_search_opts *o = q->o;
  blip_search_result *res = q->res;
  if (!res->hits) return BLIP_OK; /* the filter allows nothing */
  if (q->kr) { /* dropped candidates are at the end of the reranked block */
    memmove(res->hits + q->kr - q->dropped, res->hits + q->kr, (size_t)(res->n - q->kr) * sizeof *res->hits);
    res->n -= q->dropped;
    res->reranked = q->kr - q->dropped;
    res->dropped = q->dropped - res->vanished;
  }
  blip_search_sort(res->hits, res->n);
  if (o->threshold >= 0) {
    int m = 0;
    for (int i = 0; i < res->n; i++)
      if (res->hits[i].itm_prob >= o->threshold) res->hits[m++] = res->hits[i]; /* NAN never passes */
    res->n = m;
  }
  int rc = fill_meta(s, res->hits, &res->n, o->n, &res->vanished);
  if (!rc && o->sort_date && res->n > 1) qsort(res->hits, (size_t)res->n, sizeof *res->hits, cmp_date);
  return rc;
}

/* Queries q[0..n) whose rc is 0 through the three stages; each ends with its own rc. */
static void search_feats(blip_search *s, squery *q, int n) {
  for (int j = 0; j < n; j++) {
    int rc = q[j].rc ? BLIP_OK : feat_candidates(s, &q[j]);
    if (rc) squery_fail(&q[j], rc);
  }
  int rc = rerank_batch(s, q, n);
  for (int j = 0; rc && j < n; j++) /* first, while blip_err_last() is the rerank's message */
    if (!q[j].rc && q[j].kr) squery_fail(&q[j], rc);
  for (int j = 0; j < n; j++) {
    int r = q[j].rc ? BLIP_OK : feat_finish(s, &q[j]);
    if (r) squery_fail(&q[j], r);
  }
}

/* Search by feature; ids != NULL: rerank the top o->rerank with ITM. */
static int search_feat(blip_search *s, const float *feat, const int32_t *ids, int len, const blip_search_opts *o,
                       blip_search_result *res) {
  char err[512];
  squery q = {.feat = feat, .ids = ids, .len = len, .o = o, .res = res, .err = err, .errsz = sizeof err};
  search_feats(s, &q, 1);
  return q.rc ? blip_err_set(q.rc, "%s", err) : BLIP_OK;
}

/* Does text hold a word: a character other than punctuation, space, control
 * (or an invalid byte)? pre_caption keeps '?' and ',', which BERT then
 * tokenizes, so a query of punctuation alone would still embed and match. */
static int has_word(const char *text) {
  const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)text;
  utf8proc_ssize_t n = (utf8proc_ssize_t)strlen(text);
  for (utf8proc_ssize_t i = 0; i < n;) {
    utf8proc_int32_t c;
    utf8proc_ssize_t k = utf8proc_iterate(p + i, n - i, &c);
    if (k <= 0) { /* an invalid byte */
      i++;
      continue;
    }
    i += k;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_PC: case UTF8PROC_CATEGORY_PD: case UTF8PROC_CATEGORY_PS: case UTF8PROC_CATEGORY_PE:
    case UTF8PROC_CATEGORY_PI: case UTF8PROC_CATEGORY_PF: case UTF8PROC_CATEGORY_PO: case UTF8PROC_CATEGORY_ZS:
    case UTF8PROC_CATEGORY_ZL: case UTF8PROC_CATEGORY_ZP: case UTF8PROC_CATEGORY_CC: case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CN: break;
    default: return 1;
    }
  }
  return 0;
}

/* pre_caption + tokenize one query (ids [35]); BLIP_EINVAL without a word. */
static int prepare_query(blip_model *m, const char *query, int32_t *ids, int *len, int *truncated) {
  int rc = blip_search_prepare_text(m, query, ids, len, truncated);
  if (!rc && (*len <= 2 || !has_word(query)))
    rc = blip_err_set(BLIP_EINVAL, "the query has no words to search for (it is empty, or only punctuation)");
  return rc;
}

/* Features [n,E] of the prepared queries ids [n,35] in one encoder call
 * (rows of the longest, masked: blip_model_text packs them); rows with len
 * 0 are skipped. */
static int encode_feats(blip_model *m, const int32_t *ids, const int *len, int n, float *feat) {
  const int T = BLIP_SEARCH_MAX_TOKENS, E = blip_model_cfg(m)->embed_dim;
  int L = 0, k = 0, rc = BLIP_OK;
  for (int i = 0; i < n; i++) L = len[i] > L ? len[i] : L, k += len[i] > 0;
  if (!k) return BLIP_OK;
  int32_t *pid = malloc((size_t)k * L * sizeof *pid), *mask = malloc((size_t)k * L * sizeof *mask);
  float *f = malloc((size_t)k * E * sizeof *f);
  if (!pid || !mask || !f) rc = blip_err_set(BLIP_ENOMEM, "out of memory");
  for (int i = 0, r = 0; !rc && i < n; i++) {
    if (!len[i]) continue;
    for (int t = 0; t < L; t++) {
      pid[(size_t)r * L + t] = t < len[i] ? ids[(size_t)i * T + t] : 0;
      mask[(size_t)r * L + t] = t < len[i];
    }
    r++;
  }
  if (!rc) rc = blip_model_text(m, pid, mask, k, L, NULL, f);
  for (int i = 0, r = 0; !rc && i < n; i++)
    if (len[i]) memcpy(feat + (size_t)i * E, f + (size_t)r++ * E, (size_t)E * sizeof *f);
  free(pid);
  free(mask);
  free(f);
  return rc;
}

int blip_search_text_batch(blip_search *s, blip_search_query *q, int n) {
  const int T = BLIP_SEARCH_MAX_TOKENS;
  int rc = BLIP_OK;
  for (int j = 0; j < n; j++) memset(&q[j].res, 0, sizeof q[j].res), q[j].rc = BLIP_OK, q[j].err[0] = 0;
  if (n <= 0) return BLIP_OK;
  int32_t *ids = malloc((size_t)n * T * sizeof *ids);
  int *len = calloc((size_t)n, sizeof *len), *tr = calloc((size_t)n, sizeof *tr);
  float *feat = s->m ? malloc((size_t)n * s->E * sizeof *feat) : NULL;
  squery *sq = calloc((size_t)n, sizeof *sq);
  if (!s->m) rc = blip_err_set(BLIP_EINVAL, "no model attached");
  else if (!ids || !len || !tr || !feat || !sq) rc = blip_err_set(BLIP_ENOMEM, "out of memory");
  else rc = blip_search_refresh(s, NULL);
  for (int j = 0; !rc && j < n; j++) {
    sq[j] = (squery){.feat = feat + (size_t)j * s->E, .ids = ids + (size_t)j * T, .o = q[j].o, .res = &q[j].res,
                     .err = q[j].err, .errsz = sizeof q[j].err};
    int r = prepare_query(s->m, q[j].query, ids + (size_t)j * T, &len[j], &tr[j]);
    if (r) squery_fail(&sq[j], r), len[j] = 0; /* refused alone: the others go on */
    sq[j].len = len[j];
  }
  if (!rc) rc = encode_feats(s->m, ids, len, n, feat);
  if (!rc) search_feats(s, sq, n);
  for (int j = 0; j < n; j++) {
    if (rc) snprintf(q[j].err, sizeof q[j].err, "%s", blip_err_last());
    q[j].rc = rc ? rc : sq[j].rc;
    q[j].res.truncated = tr[j];
  }
  for (int j = 0; !rc && j < n; j++)
    if (q[j].rc) rc = blip_err_set(q[j].rc, "%s", q[j].err); /* the first failure */
  free(ids);
  free(len);
  free(tr);
  free(feat);
  free(sq);
  return rc;
}

int blip_search_text(blip_search *s, const char *query, const blip_search_opts *o, blip_search_result *res) {
  blip_search_query q = {.query = query, .o = o};
  int rc = blip_search_text_batch(s, &q, 1);
  *res = q.res;
  return rc;
}

int blip_search_image(blip_search *s, const float *pixels, const blip_search_opts *o, blip_search_result *res) {
  memset(res, 0, sizeof *res);
  if (!s->m) return blip_err_set(BLIP_EINVAL, "no model attached");
  int rc = blip_search_refresh(s, NULL);
  if (rc) return rc;
  float *feat = malloc((size_t)s->E * sizeof *feat);
  if (!feat) return blip_err_set(BLIP_ENOMEM, "out of memory");
  rc = blip_model_vision(s->m, pixels, 1, NULL, feat);
  if (!rc) rc = search_feat(s, feat, NULL, 0, o, res);
  free(feat);
  return rc;
}

void *blip_search_hit_json(const blip_search_hit *h, int rank, const char *text) {
  json_t *o = json_object();
  if (!o) return NULL;
  json_object_set_new(o, "rank", json_integer(rank));
  if (text) {
    json_object_set_new(o, "index", json_integer(h->id));
    blip_out_json_name(o, "text", text);
  } else {
    char mt[20];
    time_t t = (time_t)(h->mtime_ns / 1000000000);
    struct tm tm;
    localtime_r(&t, &tm);
    strftime(mt, sizeof mt, "%Y-%m-%dT%H:%M:%S", &tm);
    json_object_set_new(o, "id", json_integer(h->id));
    blip_out_json_name(o, "path", h->path);
    json_object_set_new(o, "taken_at", h->taken_at[0] ? blip_out_json_text(h->taken_at) : json_null());
    json_object_set_new(o, "mtime", json_string(mt));
    json_object_set_new(o, "caption", h->caption ? blip_out_json_text(h->caption) : json_null());
  }
  json_object_set_new(o, "score", blip_out_json_num(h->score));
  json_object_set_new(o, "itm_prob", blip_out_json_num(h->itm_prob));
  json_object_set_new(o, "itm_logit", blip_out_json_num(h->itm_logit));
  json_object_set_new(o, "cosine", blip_out_json_num(h->cosine));
  return o;
}

int blip_search_feat(blip_search *s, const float *feat, const blip_search_opts *o, blip_search_result *res) {
  memset(res, 0, sizeof *res);
  int rc = blip_search_refresh(s, NULL);
  return rc ? rc : search_feat(s, feat, NULL, 0, o, res);
}

int blip_search_rank_texts(blip_model *m, const float *embeds, const float *feat, const char *const *texts, int n,
                           int rerank, blip_search_result *res) {
  const int E = blip_model_cfg(m)->embed_dim;
  int32_t *ids = malloc((size_t)(n ? n : 1) * BLIP_SEARCH_MAX_TOKENS * sizeof *ids);
  int *lens = malloc((size_t)(n ? n : 1) * sizeof *lens), rc = BLIP_OK;
  float *tf = malloc((size_t)E * sizeof *tf);
  memset(res, 0, sizeof *res);
  res->hits = calloc(n ? (size_t)n : 1, sizeof *res->hits);
  if (!ids || !lens || !tf || !res->hits) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  for (int j = 0; j < n; j++) {
    int32_t *id = ids + (size_t)j * BLIP_SEARCH_MAX_TOKENS;
    int trunc = 0;
    if ((rc = blip_search_prepare_text(m, texts[j], id, &lens[j], &trunc)) ||
        (rc = blip_search_text_feat(m, id, lens[j], tf)))
      goto done;
    float c = 0;
    for (int e = 0; e < E; e++) c += tf[e] * feat[e];
    res->hits[j] = (blip_search_hit){j, c, c, NAN, NAN, NULL, "", 0, NULL};
    res->truncated |= trunc;
  }
  res->n = n;
  blip_search_sort(res->hits, n);
  int kr = rerank < n ? rerank : n;
  for (int i = 0; i < kr; i++) { /* one caption against one image per call */
    blip_search_hit *h = &res->hits[i];
    float c = h->cosine;
    if ((rc = blip_search_rerank(m, ids + h->id * BLIP_SEARCH_MAX_TOKENS, lens[h->id], &embeds, &c, 1, 0, h)))
      goto done;
  }
  res->reranked = kr;
  blip_search_sort(res->hits, n);
done:
  free(ids);
  free(lens);
  free(tf);
  if (rc) blip_search_result_free(res);
  return rc;
}
