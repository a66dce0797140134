/* blip_store: the on-disk index of a photo library.
 *
 * An index directory holds three files:
 *   index.sqlite  source of truth (WAL): one row per image with its metadata
 *                 and normalized feature vector, plus the model identity.
 *   vectors.faiss derived cache of the features (Flat IP or IVF), tagged with
 *                 the SQLite generation it mirrors; rebuilt when stale.
 *   tokens.bin    rerank store: the vision tokens [T,Dv] of image id at a
 *                 fixed-size record (int8 + per-token scales, or f16), read
 *                 through mmap so that a query touches only its top-k.
 * The two caches are modules of their own (blip_vcache, blip_tokstore).
 * Invariants (details in blip_store.c): a committed row's token record was
 * synced before the commit and is never rewritten (but by a repair, while
 * the row is marked lost), and its checksum is in the row; ids are never reused
 * once committed; the FAISS file is replaced only by rename().
 *
 * One blip_store must not be used from two threads at once. Any number of
 * processes may read while one writer (held by a lock file) updates. */
#ifndef BLIP_STORE_H
#define BLIP_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "blip_tokstore.h"

typedef struct blip_store blip_store;


/* What the vectors were made with. Every field must match to reuse an index. */
typedef struct {
  const char *model;      /* blip_model_fingerprint() */
  const char *precision;  /* "f32", "bf16", "int8" */
  const char *preprocess; /* preprocessing settings, e.g. "size=384,autorotate=1,exact" */
  int embed_dim, v_tokens, v_hidden;
} blip_store_identity;

typedef struct {
  int write;              /* open for indexing (takes the writer lock); else read-only */
  int rebuild;            /* write only: discard an existing index first */
  blip_tokens_fmt tokens; /* format of a new rerank store (existing ones keep theirs) */
  int64_t ivf_min;        /* IVF from this many vectors on; 0 = measured default */
  int64_t pq_min;         /* compressed IVF-PQ from this many vectors on; 0 = measured default */
} blip_store_opts;

/* One image row. Strings are borrowed. error != NULL marks a failed image
 * (no feature, no tokens). */
typedef struct {
  const char *path;
  int64_t size, mtime_ns; /* fstat of the descriptor the decoded bytes came from */
  /* XXH3-64 of every byte of the file (blip_decode). Rows written before
   * that held a hash of the first and last MiB and the size: such a value
   * equals no whole-file hash (but by a 2^-64 chance), so an old row whose
   * file is touched or moved is simply re-embedded once; unchanged files keep
   * their rows, and their token records stay tagged with the value they had. */
  uint64_t fingerprint;
  int width, height, orientation;
  const char *taken_at; /* "" or NULL when unknown */
  const char *error;
  int retry;   /* with error: it may pass (unreadable, vanished, I/O error, time-out): retry on the next scan */
  int offline; /* blip_store_each only: the file could not be looked at by the last scan */
} blip_store_row;

/* What a scanned file is, relative to the index. */
typedef enum {
  BLIP_SCAN_NEW = 0,       /* path not in the index */
  BLIP_SCAN_UNCHANGED = 1, /* same size and mtime */
  BLIP_SCAN_CHANGED = 2,   /* path known, size or mtime differ, or a failed image (compare fingerprints:
                              a permanent failure is retried only when the content changed) */
  BLIP_SCAN_RETRY = 3,     /* a failed image whose error may pass: embed it again */
} blip_scan_kind;

/* Open DIR (created if write). id may be NULL only for read-only opens: the
 * stored identity is then accepted. A different identity gives
 * BLIP_EMISMATCH unless opts->rebuild. */
/* The default index directory: $BLIPSEARCH_DB, else $XDG_DATA_HOME/blipsearch,
 * else ~/.local/share/blipsearch. Shared by every tool. */
int blip_store_default_dir(char *buf, size_t cap);

int blip_store_open(const char *dir, const blip_store_identity *id, const blip_store_opts *opts, blip_store **out);
/* Writes the FAISS cache if the writer changed it, then frees everything. */
void blip_store_close(blip_store *st);

int64_t blip_store_count(blip_store *st); /* rows with a feature, online (searchable) */
/* Failed images (error rows) and offline rows in the whole index. */
int blip_store_tally(blip_store *st, int64_t *failed, int64_t *offline);
blip_tokens_fmt blip_store_tokens_fmt(const blip_store *st);
size_t blip_store_record_bytes(const blip_store *st); /* bytes per image in tokens.bin */
/* Stored identity value for key ("model", "precision", ...), NULL if absent. Valid until close. */
const char *blip_store_meta(const blip_store *st, const char *key);

/* ---- incremental indexing (writer) ---- */

/* Start a scan: forget which rows were seen. */
int blip_store_scan_begin(blip_store *st);
/* Look up path; marks its row seen. *id gets the row id (0 when NEW). */
int blip_store_scan_file(blip_store *st, const char *path, int64_t size, int64_t mtime_ns, blip_scan_kind *kind,
                         int64_t *id);
/* A row with this fingerprint and size whose file no longer exists and that
 * was not seen in this scan (a move source), or 0. The row found is marked
 * seen, so that it is claimed by one new path only. */
int blip_store_find_moved(blip_store *st, uint64_t fingerprint, int64_t size, int64_t *id);
/* Whether any row has this file size: when none does, a new file cannot be a
 * move and its fingerprint can wait until it is decoded. */
int blip_store_size_known(blip_store *st, int64_t size);
/* Give row id a new path (and mtime); keeps its vectors. Marks it seen. */
int blip_store_move(blip_store *st, int64_t id, const char *new_path, int64_t mtime_ns);
/* Update size/mtime of a row whose content did not change (same fingerprint). */
int blip_store_touch(blip_store *st, int64_t id, int64_t size, int64_t mtime_ns);
/* Ids of rows not seen in this scan whose path is under one of roots
 * (absolute directory or file paths). *ids is malloc'd; caller frees. */
int blip_store_scan_unseen(blip_store *st, const char *const *roots, int nroots, int64_t **ids, int64_t *n);
/* A webdataset tar (blip_tar.h) whose member rows ("TAR#MEMBER") all record
 * mtime_ns, the tar's, and none waits for a retry, is unchanged: its rows are
 * marked seen and *n is their count; else *n = 0 and the tar is read again. */
int blip_store_scan_tar(blip_store *st, const char *tar, int64_t mtime_ns, int64_t *n);
/* End a scan's offline bookkeeping in one transaction: rows ids[0..n) (not
 * seen: under a folder that could not be read or a drive that is not there)
 * go offline, and every offline row seen in this scan comes back online.
 * Offline rows keep their feature and tokens but leave the search set. */
int blip_store_scan_offline(blip_store *st, const int64_t *ids, int64_t n);
/* Devices recorded for folders (roots and mount points under them): fn is
 * called for each; a non-zero return stops and is returned. */
typedef int (*blip_store_mount_fn)(void *ctx, const char *path, int64_t dev);
int blip_store_mounts(blip_store *st, blip_store_mount_fn fn, void *ctx);
/* Record (or update) the device of folder path. */
int blip_store_mount_set(blip_store *st, const char *path, int64_t dev);
/* Fingerprint and size of row id (for classifying a CHANGED file). */
int blip_store_row_fingerprint(blip_store *st, int64_t id, uint64_t *fingerprint);

/* Group moves and touches into one transaction (each is otherwise its own). */
int blip_store_begin(blip_store *st);
int blip_store_commit(blip_store *st);
void blip_store_rollback(blip_store *st);

/* Add n images in one transaction. replace[i] (may be NULL) is the id of a
 * row the image supersedes (changed file) or 0. feats [n,E] (rows with an
 * error are skipped); tokens [n,T,Dv] or NULL (no rerank store for these).
 * New ids go to ids_out (may be NULL). On failure nothing is committed. */
int blip_store_put(blip_store *st, const blip_store_row *rows, const int64_t *replace, int n, const float *feats,
                   const float *tokens, int64_t *ids_out);
/* Delete rows (one transaction). */
int blip_store_delete(blip_store *st, const int64_t *ids, int64_t n);
/* Write vectors.faiss now if it is stale (atomic temp + rename). */
int blip_store_flush(blip_store *st);


/* ---- queries ---- */

/* Top-k by inner product. allow_ids (sorted or not, may be NULL) restricts
 * results to those ids. Returns the number of results (<= k) or an error. */
int blip_store_search(blip_store *st, const float *query, int k, const int64_t *allow_ids, int64_t n_allow,
                      int64_t *out_ids, float *out_scores);
/* Vision tokens [T,Dv] of image id, dequantized. BLIP_ENOTFOUND when the
 * image has no record (failed, --no-rerank-store, deleted meanwhile);
 * BLIP_EFORMAT when its record is missing or damaged (tokens.bin deleted,
 * truncated, garbage): recompute the tokens from the file. */
int blip_store_tokens(blip_store *st, int64_t id, float *out);
/* The store's SQLite connection (read-only for readers), for queries by
 * attribute (blip_search's filters). Do not write through it. */
struct sqlite3 *blip_store_sqlite(blip_store *st);
/* A reader that could not create the WAL index (read-only directory, another
 * user's index) reads the database file as immutable: it does not see later
 * commits, so a long-lived reader reopens when index.sqlite changes. */
int blip_store_immutable(const blip_store *st);
/* Feature [E] and path (copied into path, cap bytes) of image id. */
int blip_store_get(blip_store *st, int64_t id, float *feat, char *path, size_t cap);

/* ---- captions (blip-index --captions; images.caption + FTS5 captions_fts) ---- */

/* The captioner that writes this index's captions (e.g. its fingerprint and
 * precision). The first call records it; another one gives BLIP_EMISMATCH
 * unless recaption, which clears every caption so that all are redone. */
int blip_store_caption_identity(blip_store *st, const char *id, int recaption);
/* Searchable rows without a caption (offline ones wait until seen again), by id: *ids and *paths (each path
 * malloc'd) are malloc'd; free with blip_store_free_paths. */
int blip_store_uncaptioned(blip_store *st, int64_t **ids, char ***paths, int64_t *n);
void blip_store_free_paths(char **paths, int64_t n);
/* Set the captions of n rows in one transaction (rows deleted meanwhile are skipped). */
int blip_store_set_captions(blip_store *st, const int64_t *ids, const char *const *captions, int n);

/* ---- maintenance ---- */

/* Call fn for every row (errors_only: failed images only), ordered by path.
 * feat is NULL for failed images. A non-zero return from fn stops and is returned. */
typedef int (*blip_store_row_fn)(void *ctx, int64_t id, const blip_store_row *row, const float *feat);
int blip_store_each(blip_store *st, int errors_only, blip_store_row_fn fn, void *ctx);

/* Damage this handle met and worked around (bits), for the tools to report. */
enum {
  BLIP_DAMAGE_CACHE = 1,  /* vectors.faiss damaged: SQLite's vectors were searched (writer: rewritten) */
  BLIP_DAMAGE_TOKENS = 2, /* token records missing or damaged: tokens recomputed from the files */
};
unsigned blip_store_damage(const blip_store *st);

/* What blip_store_check found; all zero / empty when the index is sound. */
typedef struct {
  int64_t images;       /* searchable rows */
  char sqlite[512];     /* what PRAGMA integrity_check reported, "" when ok */
  char cache[256];      /* why vectors.faiss is damaged, "" when sound (a stale one is sound) */
  int64_t cache_bad;    /* FAISS vectors missing or differing from SQLite's features */
  int64_t cache_first;  /* id of the first of them */
  int64_t rows_bad;     /* rows whose state and feature disagree */
  int tok_header;       /* tokens.bin's header is damaged (each record is still checked on its own) */
  int64_t tok_bad;      /* token records missing or damaged */
  int64_t tok_first;    /* id of the first of them */
  char tok_why[256];    /* what is wrong with that one */
  int64_t tok_unsummed; /* records without a checksum yet (from before schema 3) */
} blip_store_report;

/* Check what queries rely on, on one SQLite snapshot: SQLite's integrity,
 * every FAISS vector against its row's feature (bit for bit for Flat, by
 * score at its own slot for IVF), every token record's tag and checksum.
 * Returns an error only when the check itself could not run. */
int blip_store_check(blip_store *st, blip_store_report *r);
/* blip_store_check, as BLIP_OK or BLIP_EFORMAT naming the first problem. */
int blip_store_verify(blip_store *st);

/* ---- repair (writer) ----
 * Damaged derived data is rebuilt from SQLite and the photos: the writer's
 * open marks the rows whose records tokens.bin lost (deleted, truncated,
 * foreign header: has_tokens = 2), flush rewrites a damaged vectors.faiss. */

/* Read token records and mark the damaged ones' rows. full: every record;
 * else only records without a checksum yet (theirs is recorded now, once
 * the tag matches). *marked counts the rows marked. */
int blip_store_tokens_scan(blip_store *st, int full, int64_t *marked);
/* Ids of rows whose token record must be recomputed (malloc'd). */
int blip_store_tokens_lost(blip_store *st, int64_t **ids, int64_t *n);
/* Rewrite the records of rows ids[0..n) from tokens [n,T,Dv] computed from
 * files with fingerprints fps; a row whose fingerprint differs is left alone. */
int blip_store_put_tokens(blip_store *st, int n, const int64_t *ids, const uint64_t *fps, const float *tokens);
/* Give up on row id's record (its file cannot be read): queries read the file. */
int blip_store_drop_tokens(blip_store *st, int64_t id);
/* Rebuild vectors.faiss from SQLite and save it. */
int blip_store_rebuild_cache(blip_store *st);
/* When PRAGMA integrity_check fails: copy every table's rows into a fresh
 * database (each index b-tree is built anew from its table) and, if the copy
 * is sound, write it back over index.sqlite through SQLite's backup API
 * (readers stay safe). *repaired = 1 when it did. BLIP_EFORMAT when the
 * damage cannot be repaired this way (a table's own pages are unreadable). */
int blip_store_repair_db(blip_store *st, int *repaired);
/* Embedded schema migrations (the text of schema/NNN_*.sql), 1-based. */
int blip_store_schema_count(void);
const char *blip_store_schema_sql(int version);

#endif
