/* blip_store: see blip_store.h.
 *
 * Design note.
 * - SQLite is the source of truth, and this file owns it: rows, identity,
 *   scans, the one transaction per change. The two derived stores are their
 *   own modules: blip_vcache (vectors.faiss) and blip_tokstore (tokens.bin).
 * - Every change of the set of (id, feature) pairs bumps meta.generation
 *   inside the same transaction. A cache whose generation differs is stale and
 *   is rebuilt from SQLite (readers build an exact Flat index in memory, the
 *   writer builds the kind the size calls for and saves it at flush).
 * - Write order of a batch: token records are written and synced before the
 *   transaction inserting their rows (has_tokens=1) commits; the in-memory
 *   FAISS index follows after the commit. Deleted ids' records are punched
 *   after the commit. So a crash leaves stale derived data, never wrong data.
 * - Offline rows (files a scan could not look at: unreadable folder, missing
 *   root, unmounted drive) keep their row, feature and record but are not in
 *   the search set: the FAISS cache, count and exact search skip them, and
 *   taking them offline or back online is a change of generation.
 * - A reader opens index.sqlite read-only; where the WAL index cannot be
 *   created (read-only directory, another user's index) it falls back to an
 *   immutable open, so reading never needs write access.
 * - FAISS 1.7.3 has no per-search parameters, so filtered search is exact
 *   over SQLite features for small allow sets and over-fetch + filter (exact
 *   fallback) for large ones; every result is checked against the allow set,
 *   so nothing outside it can leak.
 * - Damage. Readers never trust damaged derived data: a vectors.faiss that
 *   fails its checksum is replaced by SQLite's vectors in memory, a token
 *   record that is missing or fails its tag or checksum (tok_sum) is reported
 *   as such, and the caller recomputes it from the file. The writer repairs:
 *   at open it marks rows whose records tokens.bin no longer holds
 *   (has_tokens = 2, a cheap size test; after a damaged header, every record
 *   is checked), flush rewrites a damaged
 *   cache, and the indexer recomputes the marked records (put_tokens) with
 *   model work for those photos only. A full scan of every record is
 *   tokens_scan(full), run by --check and --repair.
 * - Schema migrations are embedded below (text identical to schema/NNN_*.sql,
 *   checked by tests/test_store.c) and applied at open in one transaction,
 *   versioned by PRAGMA user_version. */
#include "blip_store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "blip_err.h"
#include "blip_tokstore.h"
#include "blip_vcache.h"

/* ---- embedded schema (must equal schema/NNN_*.sql byte for byte) ---- */

static const char *const SCHEMA[] = {
    /* schema/001_init.sql */
    "-- 001_init: images and index metadata. Source of truth of a blipsearch index.\n"
    "-- feat is the L2-normalized image feature (embed_dim little-endian float32).\n"
    "-- has_tokens = 1 once the row's record in tokens.bin was written and synced.\n"
    "CREATE TABLE images (\n"
    "  id          INTEGER PRIMARY KEY AUTOINCREMENT,\n"
    "  path        TEXT NOT NULL UNIQUE,\n"
    "  size        INTEGER NOT NULL,\n"
    "  mtime_ns    INTEGER NOT NULL,\n"
    "  fingerprint INTEGER NOT NULL,\n"
    "  width       INTEGER,\n"
    "  height      INTEGER,\n"
    "  orientation INTEGER,\n"
    "  taken_at    TEXT,\n"
    "  state       TEXT NOT NULL CHECK (state IN ('ok', 'error')),\n"
    "  error       TEXT,\n"
    "  feat        BLOB,\n"
    "  has_tokens  INTEGER NOT NULL DEFAULT 0,\n"
    "  indexed_at  INTEGER NOT NULL\n"
    ");\n"
    "CREATE INDEX images_fingerprint ON images(fingerprint);\n"
    "CREATE INDEX images_size ON images(size);\n"
    "CREATE TABLE meta (\n"
    "  key   TEXT PRIMARY KEY,\n"
    "  value TEXT NOT NULL\n"
    ");\n",
    /* schema/002_offline.sql */
    "-- 002_offline: change detection that keeps what it cannot see.\n"
    "-- retry = 1: the image failed for a reason that may pass (unreadable, vanished,\n"
    "--   I/O error, time-out): the next scan tries it again whatever its size and mtime.\n"
    "-- offline = 1: the file could not be looked at (unreadable folder, missing root,\n"
    "--   unmounted drive): the row keeps its feature but leaves the search set until\n"
    "--   a scan sees the file again.\n"
    "-- mounts: the device of each indexed root and of each mount point found under\n"
    "--   one, so that an unmounted drive's empty mount point is not taken for deletions.\n"
    "ALTER TABLE images ADD COLUMN retry INTEGER NOT NULL DEFAULT 0;\n"
    "ALTER TABLE images ADD COLUMN offline INTEGER NOT NULL DEFAULT 0;\n"
    "-- the few failed and offline rows, found without reading every row (and its feature)\n"
    "CREATE INDEX images_failed ON images(id) WHERE state = 'error';\n"
    "CREATE INDEX images_offline ON images(id) WHERE offline = 1;\n"
    "CREATE TABLE mounts (\n"
    "  path TEXT PRIMARY KEY,\n"
    "  dev  INTEGER NOT NULL\n"
    ");\n",
    /* schema/003_captions.sql */
    "-- 003_captions: one generated caption per image (blip-index --captions), searchable with FTS5.\n"
    "-- caption is NULL until the image is captioned; a changed file gets a new row, so it is captioned again.\n"
    "-- captions_fts indexes images.caption (external content), kept in step by the triggers.\n"
    "ALTER TABLE images ADD COLUMN caption TEXT;\n"
    "CREATE VIRTUAL TABLE captions_fts USING fts5(caption, content='images', content_rowid='id',\n"
    "                                             tokenize='unicode61 remove_diacritics 2');\n"
    "CREATE TRIGGER images_caption_ad AFTER DELETE ON images WHEN old.caption IS NOT NULL BEGIN\n"
    "  INSERT INTO captions_fts(captions_fts, rowid, caption) VALUES ('delete', old.id, old.caption);\n"
    "END;\n"
    "CREATE TRIGGER images_caption_au AFTER UPDATE OF caption ON images BEGIN\n"
    "  INSERT INTO captions_fts(captions_fts, rowid, caption) SELECT 'delete', old.id, old.caption WHERE old.caption IS NOT NULL;\n"
    "  INSERT INTO captions_fts(rowid, caption) SELECT new.id, new.caption WHERE new.caption IS NOT NULL;\n"
    "END;\n",
    /* schema/004_token_checksums.sql */
    "-- 004_token_checksums: a checksum for each token record, so that garbage in\n"
    "-- tokens.bin is told from data.\n"
    "-- tok_sum is the XXH3-64 of the row's record (tag + payload) as written; NULL\n"
    "-- for records written before this version, until the writer has read them once.\n"
    "-- has_tokens = 2: the record was found missing or damaged; queries recompute\n"
    "-- the tokens from the file, and the next blip-index run rewrites the record.\n"
    "ALTER TABLE images ADD COLUMN tok_sum INTEGER;\n",
    /* schema/005_token_segments.sql */
    "-- 005_token_segments: rerank records kept in other files. A merged index\n"
    "-- (blip-index merge) links each shard's tokens.bin here instead of copying\n"
    "-- it: image id in [first_id, last_id] has its record in file (relative to\n"
    "-- the index directory) under the shard's own id, id - id_offset.\n"
    "CREATE TABLE token_segments (\n"
    "  first_id  INTEGER PRIMARY KEY,\n"
    "  last_id   INTEGER NOT NULL,\n"
    "  id_offset INTEGER NOT NULL,\n"
    "  file      TEXT NOT NULL\n"
    ");\n",
};
#define NSCHEMA ((int)(sizeof SCHEMA / sizeof SCHEMA[0]))

int blip_store_schema_count(void) { return NSCHEMA; }
const char *blip_store_schema_sql(int v) { return v >= 1 && v <= NSCHEMA ? SCHEMA[v - 1] : NULL; }

/* ---- constants ---- */

#define ALLOW_EXACT 4096 /* filtered search: exact dot products up to this many ids */
#define REFINE 10        /* compressed index: candidates re-scored exactly per result wanted (blip_vcache.c) */

enum { M_MODEL, M_PRECISION, M_PREPROCESS, M_EMBED_DIM, M_V_TOKENS, M_V_HIDDEN, M_TOKENS, NMETA };
static const char *const META_KEYS[NMETA] = {"model", "precision", "preprocess", "embed_dim",
                                             "v_tokens", "v_hidden", "tokens"};

struct blip_store {
  char *dir;
  sqlite3 *db;
  int write, lock_fd;
  char *meta[NMETA];
  int E, T, Dv;
  blip_tokens_fmt tfmt;
  blip_tokstore *tok; /* tokens.bin */
  blip_vcache *vc;    /* vectors.faiss and its in-memory index */
  int ready;          /* open completed (close may flush) */
  int immutable;      /* reader without a WAL index: reads the file as immutable */
  int64_t ivf_min;    /* vectors from which the writer builds IVF */
  sqlite3_stmt *q_path, *q_size; /* per-file scan lookups, prepared once */
  unsigned damage;    /* BLIP_DAMAGE_* met so far */
  uint8_t *seen;      /* scan: seen[id] */
  int64_t seen_cap;
};

/* ---- small helpers ---- */

/* SQLite says SQLITE_FULL for ENOSPC on its files, but a plain SQLITE_IOERR_*
 * for the same ENOSPC on the -shm file, for a size limit (EFBIG) and for a
 * real EIO alike. sqlite3_system_errno tells them apart, except for errors
 * at COMMIT, which it does not record: there errno itself, cleared before the
 * statement (exec), still holds the failed write's cause. So a full disk is
 * called full and a failing disk is not. */
static int db_err(blip_store *st, const char *what) {
  int e = errno, ec = sqlite3_extended_errcode(st->db), se = 0;
  if ((ec & 0xff) == SQLITE_IOERR && !(se = sqlite3_system_errno(st->db)) && (e == ENOSPC || e == EDQUOT || e == EFBIG))
    se = e;
  const char *doing = st->ready ? "writing" : "opening";
  if ((ec & 0xff) == SQLITE_FULL || se == ENOSPC || se == EDQUOT)
    return blip_err_set(BLIP_EFULL, "%s (%s) while %s the index at %s (%s)", se == EDQUOT ? "disk quota exceeded" :
                        "disk full", se == EDQUOT ? "EDQUOT" : "ENOSPC", doing, st->dir, what);
  if (se == EFBIG)
    return blip_err_set(BLIP_EFULL, "file size limit reached (EFBIG: see ulimit -f) while %s the index at %s (%s)",
                        doing, st->dir, what);
  if ((ec & 0xff) == SQLITE_IOERR)
    return blip_err_set(BLIP_EIO, "I/O error while %s the index at %s (%s): %s%s%s", doing, st->dir, what,
                        sqlite3_errmsg(st->db), se ? ": " : "", se ? strerror(se) : "");
  if ((ec & 0xff) == SQLITE_CORRUPT)
    return blip_err_set(BLIP_EDB, "%s: %s/index.sqlite: %s (blip-index --check tells what; blip-index --repair "
                                  "rebuilds it from its readable rows)", what, st->dir, sqlite3_errmsg(st->db));
  return blip_err_set(BLIP_EDB, "%s: %s/index.sqlite: %s", what, st->dir, sqlite3_errmsg(st->db));
}

static int exec(blip_store *st, const char *sql) {
  errno = 0; /* see db_err */
  return sqlite3_exec(st->db, sql, NULL, NULL, NULL) == SQLITE_OK ? BLIP_OK : db_err(st, sql);
}

static int prep(blip_store *st, const char *sql, sqlite3_stmt **s) {
  return sqlite3_prepare_v2(st->db, sql, -1, s, NULL) == SQLITE_OK ? BLIP_OK : db_err(st, "prepare");
}

static char *path_in(const blip_store *st, const char *name) {
  size_t n = strlen(st->dir) + strlen(name) + 2;
  char *p = malloc(n);
  if (p) snprintf(p, n, "%s/%s", st->dir, name);
  return p;
}

static int64_t now_s(void) { return (int64_t)time(NULL); }

static int64_t db_int(blip_store *st, const char *sql, int64_t dflt) {
  sqlite3_stmt *s = NULL;
  int64_t v = dflt;
  if (sqlite3_prepare_v2(st->db, sql, -1, &s, NULL) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW &&
      sqlite3_column_type(s, 0) != SQLITE_NULL)
    v = sqlite3_column_int64(s, 0);
  sqlite3_finalize(s);
  return v;
}

/* A read snapshot, unless the caller already holds a transaction (then its
 * snapshot is used): *began says whether read_end must close it. */
static int read_begin(blip_store *st, int *began) {
  *began = 0;
  if (!sqlite3_get_autocommit(st->db)) return BLIP_OK;
  int rc = exec(st, "BEGIN");
  *began = rc == BLIP_OK;
  return rc;
}

static void read_end(blip_store *st, int began) {
  if (began) sqlite3_exec(st->db, "COMMIT", NULL, NULL, NULL);
}

static int64_t db_generation(blip_store *st) {
  return db_int(st, "SELECT CAST(value AS INTEGER) FROM meta WHERE key='generation'", 0);
}

/* ---- FAISS cache ---- */

/* Append (id, feature) to the growing arrays ids/x of *n pairs. */
static int feat_push(int E, float **x, int64_t **ids, int64_t *n, int64_t *cap, int64_t id, const void *feat) {
  if (*n == *cap) {
    int64_t c = *cap ? *cap * 2 : 1024;
    float *nx = realloc(*x, (size_t)c * E * sizeof **x);
    int64_t *ni = nx ? realloc(*ids, (size_t)c * sizeof **ids) : NULL;
    if (nx) *x = nx;
    if (!ni) return blip_err_set(BLIP_ENOMEM, "out of memory reading features");
    *ids = ni;
    *cap = c;
  }
  (*ids)[*n] = id;
  memcpy(*x + *n * E, feat, (size_t)E * 4);
  (*n)++;
  return BLIP_OK;
}

/* Rebuild the in-memory index from SQLite in one read snapshot, streaming:
 * an IVF kind first trains on an evenly spaced sample of the rows, then every
 * kind is filled chunk by chunk, so no more than a chunk of features is held
 * besides the index itself. */
static int fx_rebuild(blip_store *st, int ivf) {
  enum { CHUNK = 65536 };
  sqlite3_stmt *s = NULL;
  int64_t *ids = malloc(CHUNK * sizeof *ids), gen, n, ns, got = 0, m = 0;
  float *x = NULL, *sample = NULL;
  int began = 0, r, rc = ids ? read_begin(st, &began) : blip_err_set(BLIP_ENOMEM, "out of memory");
  if (rc) {
    free(ids);
    return rc;
  }
  gen = db_generation(st);
  n = blip_store_count(st);
  ns = blip_vcache_sample_size(st->vc, n, ivf);
  if (!(x = malloc((size_t)CHUNK * st->E * sizeof *x)) || (ns && !(sample = malloc((size_t)ns * st->E * sizeof *sample)))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory reading features");
    goto done;
  }
  if ((rc = prep(st, "SELECT id, feat FROM images WHERE feat IS NOT NULL AND offline=0 ORDER BY id", &s)))
    goto done;
  for (int pass = ns ? 0 : 1; pass < 2 && !rc; pass++) { /* pass 0: the training sample; pass 1: fill */
    int64_t i = 0;
    if (pass == 1 && (rc = blip_vcache_begin(st->vc, n, ivf, sample, got, gen))) break;
    while ((r = sqlite3_step(s)) == SQLITE_ROW) {
      if (sqlite3_column_bytes(s, 1) != st->E * 4) {
        rc = blip_err_set(BLIP_EFORMAT, "image %lld: feature has %d bytes, want %d", sqlite3_column_int64(s, 0),
                          sqlite3_column_bytes(s, 1), st->E * 4);
        break;
      }
      const void *f = sqlite3_column_blob(s, 1);
      if (pass == 0) {
        if (got < ns && i++ * ns / n == got) memcpy(sample + got++ * st->E, f, (size_t)st->E * 4);
        continue;
      }
      ids[m] = sqlite3_column_int64(s, 0);
      memcpy(x + m * st->E, f, (size_t)st->E * 4);
      if (++m == CHUNK) {
        if ((rc = blip_vcache_add(st->vc, m, x, ids))) break;
        m = 0;
      }
    }
    if (!rc && r != SQLITE_DONE) rc = db_err(st, "read features");
    sqlite3_reset(s);
  }
  if (!rc && m) rc = blip_vcache_add(st->vc, m, x, ids);
  if (rc) blip_vcache_drop(st->vc);
done:
  sqlite3_finalize(s);
  read_end(st, began);
  free(x);
  free(sample);
  free(ids);
  return rc;
}

/* Make the in-memory index mirror the current generation. */
static int fx_current(blip_store *st) {
  int64_t gen = db_generation(st);
  if (blip_vcache_gen(st->vc) == gen) return BLIP_OK;
  int rc = blip_vcache_load(st->vc, gen);
  if (rc == BLIP_OK) return BLIP_OK;
  if (rc == BLIP_EFORMAT) st->damage |= BLIP_DAMAGE_CACHE;
  return fx_rebuild(st, st->write); /* readers never train: exact flat */
}

int blip_store_flush(blip_store *st) {
  if (!st->write) return BLIP_OK;
  int rc;
  if (blip_vcache_gen(st->vc) < 0) { /* untouched: keep the file if it is fresh and sound */
    if ((rc = blip_vcache_check_file(st->vc, db_generation(st))) == BLIP_OK) return BLIP_OK;
    if (rc == BLIP_EFORMAT) st->damage |= BLIP_DAMAGE_CACHE; /* else stale, absent or unreadable: rewritten too */
  }
  rc = fx_current(st);
  if (!rc && blip_vcache_stale_kind(st->vc)) rc = fx_rebuild(st, 1);
  return rc ? rc : blip_vcache_save(st->vc);
}

/* ---- open / close ---- */

static int migrate(blip_store *st) {
  int64_t v = db_int(st, "PRAGMA user_version", 0);
  if (v > NSCHEMA)
    return blip_err_set(BLIP_EUNSUPPORTED, "%s: schema version %lld is newer than this blipsearch (%d)", st->dir,
                        (long long)v, NSCHEMA);
  if (v == NSCHEMA) return BLIP_OK;
  if (!st->write && v > 0)
    return blip_err_set(BLIP_EUNSUPPORTED, "%s: index schema version %lld is older than this blipsearch (%d): run "
                        "blip-index once to upgrade it", st->dir, (long long)v, NSCHEMA);
  if (!st->write) return blip_err_set(BLIP_ENOTFOUND, "%s: no index here (run blip-index first)", st->dir);
  int rc = exec(st, "BEGIN IMMEDIATE");
  if (rc) return rc;
  v = db_int(st, "PRAGMA user_version", 0); /* another writer may have migrated meanwhile */
  for (; v < NSCHEMA && !rc; v++) {
    rc = exec(st, SCHEMA[v]);
    if (!rc) {
      char sql[64];
      snprintf(sql, sizeof sql, "PRAGMA user_version=%lld", (long long)v + 1);
      rc = exec(st, sql);
    }
  }
  if (rc) {
    sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
    return blip_err_wrap(rc, "migrating %s", st->dir);
  }
  return exec(st, "COMMIT");
}

static int set_meta(blip_store *st, const char *k, const char *v) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", &s);
  if (rc) return rc;
  sqlite3_bind_text(s, 1, k, -1, SQLITE_STATIC);
  sqlite3_bind_text(s, 2, v, -1, SQLITE_STATIC);
  if (sqlite3_step(s) != SQLITE_DONE) rc = db_err(st, "write meta");
  sqlite3_finalize(s);
  return rc;
}

static int load_meta(blip_store *st) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, "SELECT key, value FROM meta", &s);
  if (rc) return rc;
  while (sqlite3_step(s) == SQLITE_ROW) {
    const char *k = (const char *)sqlite3_column_text(s, 0), *v = (const char *)sqlite3_column_text(s, 1);
    for (int i = 0; i < NMETA; i++)
      if (k && v && strcmp(k, META_KEYS[i]) == 0) {
        free(st->meta[i]);
        if (!(st->meta[i] = strdup(v))) rc = blip_err_set(BLIP_ENOMEM, "out of memory");
      }
  }
  sqlite3_finalize(s);
  return rc;
}

static void identity_strings(const blip_store_identity *id, char num[3][24], const char *v[NMETA - 1]) {
  snprintf(num[0], 24, "%d", id->embed_dim);
  snprintf(num[1], 24, "%d", id->v_tokens);
  snprintf(num[2], 24, "%d", id->v_hidden);
  v[M_MODEL] = id->model;
  v[M_PRECISION] = id->precision;
  v[M_PREPROCESS] = id->preprocess;
  v[M_EMBED_DIM] = num[0];
  v[M_V_TOKENS] = num[1];
  v[M_V_HIDDEN] = num[2];
}

/* New index: write identity. Existing: compare it. */
static int check_identity(blip_store *st, const blip_store_identity *id, blip_tokens_fmt want_tok) {
  int rc = load_meta(st);
  if (rc) return rc;
  if (!st->meta[M_MODEL]) {
    if (!st->write || !id) /* the first run (or a --rebuild) is at work, or was stopped before its first commit */
      return blip_err_set(BLIP_ENOTFOUND, "%s: the index is empty (blip-index is creating it, or was stopped before "
                                          "its first commit): run blip-index on your photos", st->dir);
    char num[3][24], ts[24];
    const char *v[NMETA - 1];
    identity_strings(id, num, v);
    snprintf(ts, sizeof ts, "%lld", (long long)now_s());
    /* a fresh database starts with a fresh token store and no cache; removed
     * before the identity commits, so a crash in between just repeats this */
    char *tp = path_in(st, "tokens.bin"), *fp = path_in(st, "vectors.faiss");
    if (!tp || !fp || (unlink(tp) != 0 && errno != ENOENT) || (unlink(fp) != 0 && errno != ENOENT))
      rc = tp && fp ? blip_err_errno("remove stale files in", st->dir) : blip_err_set(BLIP_ENOMEM, "out of memory");
    free(tp);
    free(fp);
    if (rc || (rc = exec(st, "BEGIN IMMEDIATE"))) return rc;
    for (int i = 0; i < NMETA - 1 && !rc; i++) rc = set_meta(st, META_KEYS[i], v[i] ? v[i] : "");
    if (!rc) rc = set_meta(st, "tokens", blip_tokstore_fmt_name(want_tok));
    if (!rc) rc = set_meta(st, "generation", "0");
    if (!rc) rc = set_meta(st, "tok_sums", "all"); /* every record gets its checksum as it is written */
    if (!rc) rc = set_meta(st, "created_at", ts);
    if (rc) {
      sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
      return rc;
    }
    if ((rc = exec(st, "COMMIT"))) return rc;
    return load_meta(st);
  }
  if (id) {
    char num[3][24];
    const char *v[NMETA - 1];
    identity_strings(id, num, v);
    for (int i = 0; i < NMETA - 1; i++) {
      const char *have = st->meta[i] ? st->meta[i] : "";
      if (strcmp(have, v[i] ? v[i] : "") != 0)
        return blip_err_set(BLIP_EMISMATCH,
                            "%s was built with %s=%s but this run has %s=%s; vectors of different models must not "
                            "be mixed: use the same model and settings, or rebuild the index (--rebuild)",
                            st->dir, META_KEYS[i], have, META_KEYS[i], v[i] ? v[i] : "");
    }
  }
  /* an index made without a rerank store may start one */
  if (st->write && want_tok != BLIP_TOKENS_NONE && st->meta[M_TOKENS] && strcmp(st->meta[M_TOKENS], "none") == 0) {
    if ((rc = set_meta(st, "tokens", blip_tokstore_fmt_name(want_tok)))) return rc;
    return load_meta(st);
  }
  return BLIP_OK;
}

/* Temp files of a flush or a database repair that a crash interrupted (only the lock holder writes them). */
static void remove_stale_tmp(const char *dir) {
  DIR *d = opendir(dir);
  struct dirent *e;
  char p[4096];
  if (!d) return;
  while ((e = readdir(d)))
    if (strncmp(e->d_name, "vectors.faiss.tmp.", 18) == 0 || strncmp(e->d_name, "index.sqlite.repair", 19) == 0) {
      snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
      unlink(p);
    }
  closedir(d);
}

static int remove_index_files(const char *dir) {
  static const char *const names[] = {"index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "vectors.faiss",
                                      "tokens.bin"};
  char p[4096];
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    snprintf(p, sizeof p, "%s/%s", dir, names[i]);
    if (unlink(p) != 0 && errno != ENOENT) return blip_err_errno("remove", p);
  }
  DIR *d = opendir(dir); /* token segments of a merge */
  struct dirent *e;
  int rc = BLIP_OK;
  while (d && !rc && (e = readdir(d)))
    if (strncmp(e->d_name, "tokens-", 7) == 0 && strstr(e->d_name, ".bin")) {
      snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
      if (unlink(p) != 0 && errno != ENOENT) rc = blip_err_errno("remove", p);
    }
  if (d) closedir(d);
  return rc;
}

/* Token segments of a merged index (schema 002). */
static int load_segments(blip_store *st) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, "SELECT first_id, last_id, id_offset, file FROM token_segments ORDER BY first_id", &s), r;
  if (rc) return rc;
  while (!rc && (r = sqlite3_step(s)) == SQLITE_ROW)
    rc = blip_tokstore_add_segment(st->tok, sqlite3_column_int64(s, 0), sqlite3_column_int64(s, 1),
                                   sqlite3_column_int64(s, 2), (const char *)sqlite3_column_text(s, 3));
  if (!rc && r != SQLITE_DONE) rc = db_err(st, "read token segments");
  sqlite3_finalize(s);
  return rc;
}

int blip_store_default_dir(char *buf, size_t cap) {
  const char *e = getenv("BLIPSEARCH_DB");
  int n;
  if (e && *e) n = snprintf(buf, cap, "%s", e);
  else if ((e = getenv("XDG_DATA_HOME")) && *e) n = snprintf(buf, cap, "%s/blipsearch", e);
  else if ((e = getenv("HOME")) && *e) n = snprintf(buf, cap, "%s/.local/share/blipsearch", e);
  else return blip_err_set(BLIP_ENOTFOUND, "no index location: pass --db DIR or set BLIPSEARCH_DB");
  return n >= 0 && (size_t)n < cap ? BLIP_OK : blip_err_set(BLIP_EINVAL, "index path too long");
}

/* Writer: rows whose records lie past the end of tokens.bin (deleted,
 * truncated, or started afresh for a damaged header) are marked lost. */
static int mark_lost_records(blip_store *st) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, /* a merged index's shard records live in their own files (token_segments) */
                "UPDATE images SET has_tokens=2 WHERE has_tokens=1 AND id>=? AND NOT EXISTS (SELECT 1 FROM "
                "token_segments g WHERE images.id BETWEEN g.first_id AND g.last_id)",
                &s);
  if (rc) return rc;
  sqlite3_bind_int64(s, 1, blip_tokstore_slots(st->tok));
  if (sqlite3_step(s) != SQLITE_DONE) rc = db_err(st, "mark lost token records");
  else if (sqlite3_changes(st->db)) st->damage |= BLIP_DAMAGE_TOKENS;
  sqlite3_finalize(s);
  return rc;
}

/* Reader: reading a WAL database needs its WAL index (index.sqlite-shm).
 * Where it neither exists nor can be created (a read-only directory, another
 * user's index), the file is opened immutable: no locks and no WAL, which is
 * consistent while nobody writes; blip_search reopens when the file changes. */
static int open_reader(blip_store *st, const char *p) {
  if (sqlite3_open_v2(p, &st->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK)
    return st->db ? db_err(st, "open") : blip_err_set(BLIP_ENOMEM, "out of memory");
  sqlite3_busy_timeout(st->db, 10000); /* the probe may meet a writer's checkpoint */
  int r = sqlite3_exec(st->db, "SELECT count(*) FROM sqlite_master", NULL, NULL, NULL) & 0xff;
  if (r == SQLITE_OK) return BLIP_OK;
  if (r != SQLITE_READONLY && r != SQLITE_CANTOPEN) return db_err(st, "open");
  sqlite3_close(st->db);
  st->db = NULL;
  size_t n = strlen(p);
  char *uri = malloc(3 * n + 32), *u = uri;
  if (!uri) return blip_err_set(BLIP_ENOMEM, "out of memory");
  u += sprintf(u, "file:");
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)p[i];
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || strchr("/-._~", c)) *u++ = (char)c;
    else u += sprintf(u, "%%%02X", c);
  }
  strcpy(u, "?immutable=1");
  r = sqlite3_open_v2(uri, &st->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI | SQLITE_OPEN_NOMUTEX, NULL);
  free(uri);
  if (r != SQLITE_OK) return st->db ? db_err(st, "open") : blip_err_set(BLIP_ENOMEM, "out of memory");
  st->immutable = 1;
  return BLIP_OK;
}

int blip_store_open(const char *dir, const blip_store_identity *id, const blip_store_opts *opts, blip_store **out) {
  blip_store_opts o = {0};
  if (opts) o = *opts;
  *out = NULL;
  if (!dir || (o.write && !id)) return blip_err_set(BLIP_EINVAL, "blip_store_open: dir and (for writing) identity required");
  blip_store *st = calloc(1, sizeof *st);
  if (!st) return blip_err_set(BLIP_ENOMEM, "out of memory");
  st->lock_fd = -1;
  st->write = o.write;
  st->ivf_min = o.ivf_min;
  int rc = BLIP_OK;
  char *p = NULL;
  if (!(st->dir = strdup(dir))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto fail;
  }
  if (o.write) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
      rc = blip_err_errno("create index directory", dir);
      goto fail;
    }
    if (!(p = path_in(st, "lock"))) goto oom;
    st->lock_fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (st->lock_fd < 0) {
      rc = blip_err_errno("open", p);
      goto fail;
    }
    if (flock(st->lock_fd, LOCK_EX | LOCK_NB) != 0) {
      rc = blip_err_set(BLIP_EDB, "%s: another blip-index is updating this index", dir);
      goto fail;
    }
    free(p);
    p = NULL;
    remove_stale_tmp(dir);
    if (o.rebuild && (rc = remove_index_files(dir))) goto fail;
  }
  if (!(p = path_in(st, "index.sqlite"))) goto oom;
  if (!o.write && access(p, F_OK) != 0) {
    rc = blip_err_set(BLIP_ENOTFOUND, "%s: no index here (run blip-index first)", dir);
    goto fail;
  }
  if (!o.write) rc = open_reader(st, p);
  else if (sqlite3_open_v2(p, &st->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK)
    rc = st->db ? db_err(st, "open") : blip_err_set(BLIP_ENOMEM, "out of memory");
  if (rc) goto fail;
  sqlite3_busy_timeout(st->db, 10000);
  if (o.write && ((rc = exec(st, "PRAGMA journal_mode=WAL")) || (rc = exec(st, "PRAGMA synchronous=FULL")))) goto fail;
  if ((rc = migrate(st)) || (rc = check_identity(st, id, o.tokens))) goto fail;
  st->E = atoi(st->meta[M_EMBED_DIM] ? st->meta[M_EMBED_DIM] : "0");
  st->T = atoi(st->meta[M_V_TOKENS] ? st->meta[M_V_TOKENS] : "0");
  st->Dv = atoi(st->meta[M_V_HIDDEN] ? st->meta[M_V_HIDDEN] : "0");
  int tf = blip_tokstore_parse_fmt(st->meta[M_TOKENS]);
  if (tf > 0) st->tfmt = (blip_tokens_fmt)tf;
  if (st->E <= 0 || st->T <= 0 || st->Dv <= 0) {
    rc = blip_err_set(BLIP_EFORMAT, "%s: bad geometry in index meta", dir);
    goto fail;
  }
  if ((rc = blip_vcache_new(dir, st->E, st->ivf_min, o.pq_min, o.write, &st->vc)) ||
      (rc = blip_tokstore_open(dir, st->tfmt, st->T, st->Dv, o.write, &st->tok)) || (rc = load_segments(st)))
    goto fail;
  /* drop records past the highest id ever committed (leftovers of a crash) */
  if (o.write && (rc = blip_tokstore_truncate(st->tok, db_int(st, "SELECT seq FROM sqlite_sequence WHERE name='images'", 0))))
    goto fail;
  if (o.write && blip_tokstore_present(st->tok) && (rc = mark_lost_records(st))) goto fail;
  if (blip_tokstore_damaged(st->tok)) st->damage |= BLIP_DAMAGE_TOKENS;
  int64_t marked; /* a damaged header: keep the records that still pass their tag and checksum */
  if (o.write && blip_tokstore_damaged(st->tok) && (rc = blip_store_tokens_scan(st, 1, &marked))) goto fail;
  free(p);
  st->ready = 1;
  *out = st;
  return BLIP_OK;
oom:
  rc = blip_err_set(BLIP_ENOMEM, "out of memory");
fail:
  free(p);
  blip_store_close(st);
  return rc;
}

void blip_store_close(blip_store *st) {
  if (!st) return;
  if (st->write && st->ready) blip_store_flush(st); /* best effort: the cache is derived */
  blip_vcache_free(st->vc);
  blip_tokstore_close(st->tok);
  sqlite3_finalize(st->q_path);
  sqlite3_finalize(st->q_size);
  if (st->db) sqlite3_close(st->db);
  if (st->lock_fd >= 0) close(st->lock_fd);
  for (int i = 0; i < NMETA; i++) free(st->meta[i]);
  free(st->seen);
  free(st->dir);
  free(st);
}

int64_t blip_store_count(blip_store *st) {
  return db_int(st, "SELECT count(*) FROM images WHERE feat IS NOT NULL AND offline=0", 0);
}

int blip_store_tally(blip_store *st, int64_t *failed, int64_t *offline) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, "SELECT (SELECT count(*) FROM images WHERE state='error'), "
                   "(SELECT count(*) FROM images WHERE offline=1)", &s);
  if (rc) return rc;
  if (sqlite3_step(s) == SQLITE_ROW) {
    *failed = sqlite3_column_int64(s, 0);
    *offline = sqlite3_column_int64(s, 1);
  } else {
    rc = db_err(st, "count images");
  }
  sqlite3_finalize(s);
  return rc;
}

struct sqlite3 *blip_store_sqlite(blip_store *st) { return st->db; }
int blip_store_immutable(const blip_store *st) { return st->immutable; }
blip_tokens_fmt blip_store_tokens_fmt(const blip_store *st) { return st->tfmt; }
size_t blip_store_record_bytes(const blip_store *st) { return blip_tokstore_stride(st->tok); }
const char *blip_store_meta(const blip_store *st, const char *key) {
  for (int i = 0; i < NMETA; i++)
    if (strcmp(key, META_KEYS[i]) == 0) return st->meta[i];
  return NULL;
}

/* ---- scan ---- */

static int seen_mark(blip_store *st, int64_t id) {
  if (id >= st->seen_cap) {
    int64_t cap = st->seen_cap ? st->seen_cap : 1024;
    while (cap <= id) cap *= 2;
    uint8_t *s = realloc(st->seen, (size_t)cap);
    if (!s) return blip_err_set(BLIP_ENOMEM, "out of memory");
    memset(s + st->seen_cap, 0, (size_t)(cap - st->seen_cap));
    st->seen = s;
    st->seen_cap = cap;
  }
  st->seen[id] = 1;
  return BLIP_OK;
}

static int seen_has(const blip_store *st, int64_t id) { return id < st->seen_cap && st->seen[id]; }

int blip_store_scan_begin(blip_store *st) {
  if (st->seen) memset(st->seen, 0, (size_t)st->seen_cap);
  return BLIP_OK;
}

int blip_store_scan_file(blip_store *st, const char *path, int64_t size, int64_t mtime_ns, blip_scan_kind *kind,
                         int64_t *id) {
  int rc = st->q_path ? BLIP_OK
                      /* retry is stored after the feature: read only for failed rows */
                      : prep(st, "SELECT id, size, mtime_ns, CASE WHEN state='error' THEN 1 + retry ELSE 0 END "
                                 "FROM images WHERE path=?", &st->q_path);
  if (rc) return rc;
  sqlite3_stmt *s = st->q_path;
  sqlite3_bind_text(s, 1, path, -1, SQLITE_STATIC);
  *kind = BLIP_SCAN_NEW;
  *id = 0;
  int r = sqlite3_step(s);
  if (r == SQLITE_ROW) {
    *id = sqlite3_column_int64(s, 0);
    int same = sqlite3_column_int64(s, 1) == size && sqlite3_column_int64(s, 2) == mtime_ns;
    int failed = sqlite3_column_int(s, 3); /* 0 ok, 1 failed, 2 failed and may pass */
    *kind = failed == 2 ? BLIP_SCAN_RETRY : same && !failed ? BLIP_SCAN_UNCHANGED : BLIP_SCAN_CHANGED;
    rc = seen_mark(st, *id);
  } else if (r != SQLITE_DONE) {
    rc = db_err(st, "look up path");
  }
  sqlite3_reset(s);
  return rc;
}

int blip_store_size_known(blip_store *st, int64_t size) {
  int known = 1; /* on error, err on the side of fingerprinting */
  if (st->q_size || prep(st, "SELECT 1 FROM images WHERE size=? LIMIT 1", &st->q_size) == BLIP_OK) {
    sqlite3_bind_int64(st->q_size, 1, size);
    known = sqlite3_step(st->q_size) != SQLITE_DONE;
    sqlite3_reset(st->q_size);
  }
  return known;
}

int blip_store_find_moved(blip_store *st, uint64_t fingerprint, int64_t size, int64_t *id) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, "SELECT id, path FROM images WHERE fingerprint=? AND size=? ORDER BY id", &s);
  if (rc) return rc;
  sqlite3_bind_int64(s, 1, (int64_t)fingerprint);
  sqlite3_bind_int64(s, 2, size);
  *id = 0;
  int r;
  while ((r = sqlite3_step(s)) == SQLITE_ROW) {
    int64_t cand = sqlite3_column_int64(s, 0);
    const char *p = (const char *)sqlite3_column_text(s, 1);
    struct stat sb;
    if (!seen_has(st, cand) && p && stat(p, &sb) != 0 && errno == ENOENT) {
      *id = cand;
      rc = seen_mark(st, cand);
      break;
    }
  }
  if (r != SQLITE_ROW && r != SQLITE_DONE) rc = db_err(st, "look up fingerprint");
  sqlite3_finalize(s);
  return rc;
}

static int update_row(blip_store *st, const char *sql, int64_t id, const char *path, int64_t a, int64_t b) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, sql, &s);
  if (rc) return rc;
  int k = 1;
  if (path) sqlite3_bind_text(s, k++, path, -1, SQLITE_STATIC);
  sqlite3_bind_int64(s, k++, a);
  if (b >= 0) sqlite3_bind_int64(s, k++, b);
  sqlite3_bind_int64(s, k, id);
  if (sqlite3_step(s) != SQLITE_DONE) rc = db_err(st, "update image");
  else if (sqlite3_changes(st->db) != 1) rc = blip_err_set(BLIP_ENOTFOUND, "no image %lld", (long long)id);
  sqlite3_finalize(s);
  return rc;
}

int blip_store_move(blip_store *st, int64_t id, const char *new_path, int64_t mtime_ns) {
  int rc = update_row(st, "UPDATE images SET path=?, mtime_ns=? WHERE id=?", id, new_path, mtime_ns, -1);
  return rc ? rc : seen_mark(st, id);
}

int blip_store_touch(blip_store *st, int64_t id, int64_t size, int64_t mtime_ns) {
  return update_row(st, "UPDATE images SET size=?, mtime_ns=? WHERE id=?", id, NULL, size, mtime_ns);
}

static int under_root(const char *path, const char *root) {
  size_t n = strlen(root);
  while (n > 1 && root[n - 1] == '/') n--;
  if (strncmp(path, root, n) != 0) return 0;
  return path[n] == 0 || path[n] == '/' || path[n] == '#' || (n == 1 && root[0] == '/'); /* '#': a tar's members */
}

int blip_store_scan_tar(blip_store *st, const char *tar, int64_t mtime_ns, int64_t *n) {
  sqlite3_stmt *s = NULL;
  *n = 0;
  /* "TAR#..." sorts between "TAR#" and "TAR$" ('$' follows '#') */
  int rc = prep(st, "SELECT id, mtime_ns = ?2 AND NOT (state='error' AND retry) FROM images "
                    "WHERE path > ?1 || '#' AND path < ?1 || '$'", &s), r, all = 1;
  if (rc) return rc;
  sqlite3_bind_text(s, 1, tar, -1, SQLITE_STATIC);
  sqlite3_bind_int64(s, 2, mtime_ns);
  int64_t cnt = 0;
  while ((r = sqlite3_step(s)) == SQLITE_ROW) all &= sqlite3_column_int(s, 1), cnt++;
  if (r != SQLITE_DONE) rc = db_err(st, "list a tar's members");
  sqlite3_reset(s);
  if (!rc && all && cnt) {
    while (!rc && (r = sqlite3_step(s)) == SQLITE_ROW) rc = seen_mark(st, sqlite3_column_int64(s, 0));
    if (!rc && r != SQLITE_DONE) rc = db_err(st, "list a tar's members");
    if (!rc) *n = cnt;
  }
  sqlite3_finalize(s);
  return rc;
}

int blip_store_scan_unseen(blip_store *st, const char *const *roots, int nroots, int64_t **ids, int64_t *n) {
  sqlite3_stmt *s = NULL;
  int64_t cap = 0, *v = NULL;
  *ids = NULL;
  *n = 0;
  int rc = prep(st, "SELECT id, path FROM images ORDER BY id", &s), r;
  if (rc) return rc;
  while ((r = sqlite3_step(s)) == SQLITE_ROW) {
    int64_t id = sqlite3_column_int64(s, 0);
    const char *p = (const char *)sqlite3_column_text(s, 1);
    if (seen_has(st, id) || !p) continue;
    int in = 0;
    for (int i = 0; i < nroots && !in; i++) in = under_root(p, roots[i]);
    if (!in) continue;
    if (*n == cap) {
      cap = cap ? 2 * cap : 256;
      int64_t *nv = realloc(v, (size_t)cap * sizeof *v);
      if (!nv) {
        rc = blip_err_set(BLIP_ENOMEM, "out of memory");
        break;
      }
      v = nv;
    }
    v[(*n)++] = id;
  }
  if (!rc && r != SQLITE_DONE) rc = db_err(st, "list images");
  sqlite3_finalize(s);
  if (rc) {
    free(v);
    *n = 0;
    return rc;
  }
  *ids = v;
  return BLIP_OK;
}

int blip_store_row_fingerprint(blip_store *st, int64_t id, uint64_t *fingerprint) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, "SELECT fingerprint FROM images WHERE id=?", &s);
  if (rc) return rc;
  sqlite3_bind_int64(s, 1, id);
  if (sqlite3_step(s) == SQLITE_ROW) *fingerprint = (uint64_t)sqlite3_column_int64(s, 0);
  else rc = blip_err_set(BLIP_ENOTFOUND, "no image %lld", (long long)id);
  sqlite3_finalize(s);
  return rc;
}

int blip_store_mounts(blip_store *st, blip_store_mount_fn fn, void *ctx) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, "SELECT path, dev FROM mounts ORDER BY path", &s), r;
  if (rc) return rc;
  while ((r = sqlite3_step(s)) == SQLITE_ROW && !(rc = fn(ctx, (const char *)sqlite3_column_text(s, 0),
                                                           sqlite3_column_int64(s, 1))))
    ;
  if (!rc && r != SQLITE_DONE) rc = db_err(st, "list mounts");
  sqlite3_finalize(s);
  return rc;
}

int blip_store_mount_set(blip_store *st, const char *path, int64_t dev) {
  if (!st->write) return blip_err_set(BLIP_EINVAL, "store opened read-only");
  sqlite3_stmt *s = NULL;
  int rc = prep(st, /* an unchanged record is not rewritten: a no-op run writes nothing */
                "INSERT INTO mounts(path, dev) VALUES (?, ?) ON CONFLICT(path) DO UPDATE SET dev=excluded.dev "
                "WHERE dev != excluded.dev", &s);
  if (rc) return rc;
  sqlite3_bind_text(s, 1, path, -1, SQLITE_STATIC);
  sqlite3_bind_int64(s, 2, dev);
  if (sqlite3_step(s) != SQLITE_DONE) rc = db_err(st, "record mount");
  sqlite3_finalize(s);
  return rc;
}

/* ---- writes ---- */

int blip_store_begin(blip_store *st) { return exec(st, "BEGIN IMMEDIATE"); }
int blip_store_commit(blip_store *st) { return exec(st, "COMMIT"); }
void blip_store_rollback(blip_store *st) { sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL); }

static int bump_generation(blip_store *st) {
  return exec(st, "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'");
}

/* Row id's record checksum, and its state: 1 record written, 2 lost, 0 none. */
static int set_tokens(blip_store *st, sqlite3_stmt **s, int64_t id, int has, const uint64_t *sum) {
  int rc = *s ? BLIP_OK : prep(st, "UPDATE images SET has_tokens=?, tok_sum=? WHERE id=?", s);
  if (rc) return rc;
  sqlite3_reset(*s);
  sqlite3_bind_int(*s, 1, has);
  if (sum) sqlite3_bind_int64(*s, 2, (int64_t)*sum);
  else sqlite3_bind_null(*s, 2);
  sqlite3_bind_int64(*s, 3, id);
  return sqlite3_step(*s) == SQLITE_DONE ? BLIP_OK : db_err(st, "update token record");
}

static int set_sum(blip_store *st, sqlite3_stmt **s, int64_t id, uint64_t sum) { return set_tokens(st, s, id, 1, &sum); }

int blip_store_put(blip_store *st, const blip_store_row *rows, const int64_t *replace, int n, const float *feats,
                   const float *tokens, int64_t *ids_out) {
  if (!st->write) return blip_err_set(BLIP_EINVAL, "store opened read-only");
  sqlite3_stmt *ins = NULL, *del = NULL, *sumst = NULL;
  int64_t *ids = calloc((size_t)n + 1, sizeof *ids), *dels = calloc((size_t)n + 1, sizeof *dels), ndel = 0,
          nadd = 0, gen = 0;
  float *addx = malloc(((size_t)n + 1) * st->E * sizeof *addx);
  int64_t *addid = malloc(((size_t)n + 1) * sizeof *addid);
  size_t tsz = (size_t)st->T * st->Dv;
  int store_tok = tokens && blip_tokstore_present(st->tok), rc, intx = 0;
  if (!ids || !dels || !addx || !addid) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  if (blip_vcache_gen(st->vc) < 0) fx_current(st); /* mirror the index now, then keep it in step (else rebuilt at flush) */
  if ((rc = exec(st, "BEGIN IMMEDIATE"))) goto done;
  intx = 1;
  gen = db_generation(st);
  if ((rc = prep(st, "DELETE FROM images WHERE id=?", &del)) ||
      (rc = prep(st,
                 "INSERT INTO images(path, size, mtime_ns, fingerprint, width, height, orientation, taken_at, "
                 "state, error, feat, has_tokens, indexed_at, retry) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                 &ins)))
    goto done;
  for (int i = 0; i < n; i++) {
    if (!replace || !replace[i]) continue;
    sqlite3_bind_int64(del, 1, replace[i]);
    if (sqlite3_step(del) != SQLITE_DONE) {
      rc = db_err(st, "delete replaced image");
      goto done;
    }
    if (sqlite3_changes(st->db)) dels[ndel++] = replace[i];
    sqlite3_reset(del);
  }
  for (int i = 0; i < n; i++) {
    const blip_store_row *r = &rows[i];
    int ok = r->error == NULL;
    sqlite3_reset(ins);
    sqlite3_clear_bindings(ins);
    sqlite3_bind_text(ins, 1, r->path, -1, SQLITE_STATIC);
    sqlite3_bind_int64(ins, 2, r->size);
    sqlite3_bind_int64(ins, 3, r->mtime_ns);
    sqlite3_bind_int64(ins, 4, (int64_t)r->fingerprint);
    if (ok || r->width) {
      sqlite3_bind_int(ins, 5, r->width);
      sqlite3_bind_int(ins, 6, r->height);
      sqlite3_bind_int(ins, 7, r->orientation);
    }
    if (r->taken_at && r->taken_at[0]) sqlite3_bind_text(ins, 8, r->taken_at, -1, SQLITE_STATIC);
    sqlite3_bind_text(ins, 9, ok ? "ok" : "error", -1, SQLITE_STATIC);
    if (!ok) sqlite3_bind_text(ins, 10, r->error, -1, SQLITE_STATIC);
    if (ok) sqlite3_bind_blob(ins, 11, feats + (size_t)i * st->E, st->E * 4, SQLITE_STATIC);
    sqlite3_bind_int(ins, 12, ok && store_tok);
    sqlite3_bind_int64(ins, 13, now_s());
    sqlite3_bind_int(ins, 14, !ok && r->retry);
    if (sqlite3_step(ins) != SQLITE_DONE) {
      rc = db_err(st, "insert image");
      goto done;
    }
    ids[i] = sqlite3_last_insert_rowid(st->db);
    if (!ok) continue;
    memcpy(addx + (size_t)nadd * st->E, feats + (size_t)i * st->E, (size_t)st->E * 4);
    addid[nadd++] = ids[i];
    uint64_t sum;
    if (store_tok && ((rc = blip_tokstore_put(st->tok, ids[i], r->fingerprint, tokens + (size_t)i * tsz, &sum)) ||
                      (rc = set_sum(st, &sumst, ids[i], sum))))
      goto done;
  }
  /* the records must be durable before the rows that point at them */
  if (store_tok && nadd && (rc = blip_tokstore_sync(st->tok))) goto done;
  if ((ndel || nadd) && (rc = bump_generation(st))) goto done;
  if ((rc = exec(st, "COMMIT"))) goto done;
  intx = 0;
  for (int64_t i = 0; i < ndel; i++) blip_tokstore_punch(st->tok, dels[i]);
  if (ndel || nadd) blip_vcache_apply(st->vc, gen, dels, ndel, addx, addid, nadd);
  if (ids_out) memcpy(ids_out, ids, (size_t)n * sizeof *ids);
done:
  if (intx) sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
  sqlite3_finalize(ins);
  sqlite3_finalize(del);
  sqlite3_finalize(sumst);
  free(ids);
  free(dels);
  free(addx);
  free(addid);
  return rc;
}

int blip_store_scan_offline(blip_store *st, const int64_t *ids, int64_t n) {
  if (!st->write) return blip_err_set(BLIP_EINVAL, "store opened read-only");
  sqlite3_stmt *q = NULL, *on = NULL, *off = NULL;
  int64_t *del = malloc(((size_t)n + 1) * sizeof *del), *add = NULL, ndel = 0, nadd = 0, cap = 0, gen = 0;
  float *x = NULL;
  int rc, intx = 0, r;
  if (!del) return blip_err_set(BLIP_ENOMEM, "out of memory");
  if (blip_vcache_gen(st->vc) < 0) fx_current(st);
  if ((rc = exec(st, "BEGIN IMMEDIATE"))) goto done;
  intx = 1;
  gen = db_generation(st);
  if ((rc = prep(st, "SELECT id, feat FROM images WHERE offline=1", &q)) ||
      (rc = prep(st, "UPDATE images SET offline=0 WHERE id=?", &on)) ||
      (rc = prep(st, "UPDATE images SET offline=1 WHERE id=? AND offline=0 RETURNING feat IS NOT NULL", &off)))
    goto done;
  while ((r = sqlite3_step(q)) == SQLITE_ROW) { /* seen again: back online, back in the search set */
    int64_t id = sqlite3_column_int64(q, 0);
    if (!seen_has(st, id)) continue;
    sqlite3_bind_int64(on, 1, id);
    if (sqlite3_step(on) != SQLITE_DONE) {
      rc = db_err(st, "bring image online");
      goto done;
    }
    sqlite3_reset(on);
    if (sqlite3_column_bytes(q, 1) == st->E * 4 &&
        (rc = feat_push(st->E, &x, &add, &nadd, &cap, id, sqlite3_column_blob(q, 1))))
      goto done;
  }
  if (r != SQLITE_DONE) {
    rc = db_err(st, "list offline images");
    goto done;
  }
  for (int64_t i = 0; i < n; i++) {
    sqlite3_bind_int64(off, 1, ids[i]);
    r = sqlite3_step(off);
    if (r == SQLITE_ROW && sqlite3_column_int(off, 0)) del[ndel++] = ids[i];
    else if (r != SQLITE_ROW && r != SQLITE_DONE) {
      rc = db_err(st, "take image offline");
      goto done;
    }
    sqlite3_reset(off);
  }
  if ((ndel || nadd) && (rc = bump_generation(st))) goto done;
  if ((rc = exec(st, "COMMIT"))) goto done;
  intx = 0;
  if (ndel || nadd) blip_vcache_apply(st->vc, gen, del, ndel, x, add, nadd);
done:
  if (intx) sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
  sqlite3_finalize(q);
  sqlite3_finalize(on);
  sqlite3_finalize(off);
  free(del);
  free(add);
  free(x);
  return rc;
}

int blip_store_delete(blip_store *st, const int64_t *ids, int64_t n) {
  if (!st->write) return blip_err_set(BLIP_EINVAL, "store opened read-only");
  if (n == 0) return BLIP_OK;
  sqlite3_stmt *del = NULL;
  int64_t *gone = malloc((size_t)n * sizeof *gone), ngone = 0, gen;
  int rc, intx = 0;
  if (!gone) return blip_err_set(BLIP_ENOMEM, "out of memory");
  if (blip_vcache_gen(st->vc) < 0) fx_current(st);
  if ((rc = exec(st, "BEGIN IMMEDIATE"))) goto done;
  intx = 1;
  gen = db_generation(st);
  if ((rc = prep(st, "DELETE FROM images WHERE id=?", &del))) goto done;
  for (int64_t i = 0; i < n; i++) {
    sqlite3_bind_int64(del, 1, ids[i]);
    if (sqlite3_step(del) != SQLITE_DONE) {
      rc = db_err(st, "delete image");
      goto done;
    }
    if (sqlite3_changes(st->db)) gone[ngone++] = ids[i];
    sqlite3_reset(del);
  }
  if (ngone && (rc = bump_generation(st))) goto done;
  if ((rc = exec(st, "COMMIT"))) goto done;
  intx = 0;
  for (int64_t i = 0; i < ngone; i++) blip_tokstore_punch(st->tok, gone[i]);
  if (ngone) blip_vcache_apply(st->vc, gen, gone, ngone, NULL, NULL, 0);
done:
  if (intx) sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
  sqlite3_finalize(del);
  free(gone);
  return rc;
}

/* ---- queries ---- */

/* Keep the k best (score desc, id asc) in ids/scores; *n is the fill. */
static void topk_push(int k, int64_t *ids, float *scores, int *n, int64_t id, float s) {
  int i = *n < k ? (*n)++ : k;
  if (i == k && !(s > scores[k - 1] || (s == scores[k - 1] && id < ids[k - 1]))) return;
  if (i == k) i = k - 1;
  while (i > 0 && (scores[i - 1] < s || (scores[i - 1] == s && ids[i - 1] > id))) {
    scores[i] = scores[i - 1];
    ids[i] = ids[i - 1];
    i--;
  }
  scores[i] = s;
  ids[i] = id;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

/* Exact scores over the SQLite features of the allowed ids. */
static int search_exact(blip_store *st, const float *q, int k, const int64_t *allow, int64_t n_allow, int64_t *out_ids,
                        float *out_scores) {
  sqlite3_stmt *s = NULL;
  int n = 0, began, rc = read_begin(st, &began);
  if (rc) return rc;
  if ((rc = prep(st, "SELECT feat FROM images WHERE id=? AND feat IS NOT NULL AND offline=0", &s))) goto done;
  for (int64_t i = 0; i < n_allow; i++) {
    if (i && allow[i] == allow[i - 1]) continue;
    sqlite3_bind_int64(s, 1, allow[i]);
    if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_bytes(s, 0) == st->E * 4) {
      const float *f = sqlite3_column_blob(s, 0);
      float d = 0;
      for (int j = 0; j < st->E; j++) d += f[j] * q[j];
      topk_push(k, out_ids, out_scores, &n, allow[i], d);
    }
    sqlite3_reset(s);
  }
done:
  sqlite3_finalize(s);
  read_end(st, began);
  return rc ? rc : n;
}

int blip_store_search(blip_store *st, const float *query, int k, const int64_t *allow_ids, int64_t n_allow,
                      int64_t *out_ids, float *out_scores) {
  if (k <= 0) return 0;
  int64_t *allow = NULL, *lab = NULL;
  float *dis = NULL;
  int rc = BLIP_OK, n = 0;
  if (allow_ids) {
    if (n_allow == 0) return 0;
    if (!(allow = malloc((size_t)n_allow * sizeof *allow))) return blip_err_set(BLIP_ENOMEM, "out of memory");
    memcpy(allow, allow_ids, (size_t)n_allow * sizeof *allow);
    qsort(allow, (size_t)n_allow, sizeof *allow, cmp_i64);
    if (n_allow <= ALLOW_EXACT) {
      rc = search_exact(st, query, k, allow, n_allow, out_ids, out_scores);
      free(allow);
      return rc;
    }
  }
  if ((rc = fx_current(st))) goto done;
  int64_t total = blip_vcache_ntotal(st->vc);
  int approx = blip_vcache_approx(st->vc), want = approx ? k * REFINE : k;
  int64_t kk = allow ? (int64_t)want * 8 : want;
  for (;;) {
    if (kk > total) kk = total;
    if (kk <= 0) break;
    free(lab);
    free(dis);
    lab = malloc((size_t)kk * sizeof *lab);
    dis = malloc((size_t)kk * sizeof *dis);
    if (!lab || !dis) {
      rc = blip_err_set(BLIP_ENOMEM, "out of memory");
      goto done;
    }
    if ((rc = blip_vcache_search(st->vc, 1, query, kk, dis, lab))) goto done;
    n = 0;
    for (int64_t i = 0; i < kk && n < want; i++) {
      if (lab[i] < 0) continue;
      if (allow && !bsearch(&lab[i], allow, (size_t)n_allow, sizeof *allow, cmp_i64)) continue;
      lab[n] = lab[i]; /* compact the accepted candidates in place */
      dis[n] = dis[i];
      n++;
    }
    if (n == want || kk == total) break;
    kk *= 4;
  }
  if (approx && n > 0) { /* compressed scores: the top candidates re-scored exactly from SQLite */
    qsort(lab, (size_t)n, sizeof *lab, cmp_i64);
    rc = search_exact(st, query, k, lab, n, out_ids, out_scores);
    if (rc < 0) goto done;
    n = rc;
    rc = BLIP_OK;
  } else if (n) {
    if (n > k) n = k;
    memcpy(out_ids, lab, (size_t)n * sizeof *lab);
    memcpy(out_scores, dis, (size_t)n * sizeof *dis);
  }
  /* IVF probes only part of the lists: an allow set it under-serves is searched exactly */
  if (allow && n < k && blip_vcache_trained(st->vc) > 0) {
    free(lab);
    free(dis);
    lab = NULL;
    dis = NULL;
    rc = search_exact(st, query, k, allow, n_allow, out_ids, out_scores);
    free(allow);
    return rc;
  }
done:
  free(allow);
  free(lab);
  free(dis);
  return rc ? rc : n;
}

/* Row id's record state: has (0 none, 1 written, 2 lost), fingerprint and
 * checksum (*has_sum = 0 when none is recorded). BLIP_ENOTFOUND: no row. */
static int tok_row(blip_store *st, int64_t id, int *has, uint64_t *fp, uint64_t *sum, int *has_sum) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, "SELECT has_tokens, fingerprint, tok_sum FROM images WHERE id=?", &s);
  if (rc) return rc;
  sqlite3_bind_int64(s, 1, id);
  int r = sqlite3_step(s);
  if (r == SQLITE_ROW) {
    *has = sqlite3_column_int(s, 0);
    *fp = (uint64_t)sqlite3_column_int64(s, 1);
    *has_sum = sqlite3_column_type(s, 2) != SQLITE_NULL;
    *sum = (uint64_t)sqlite3_column_int64(s, 2);
  } else {
    rc = r == SQLITE_DONE ? blip_err_set(BLIP_ENOTFOUND, "no image %lld", (long long)id) : db_err(st, "read image");
  }
  sqlite3_finalize(s);
  return rc;
}

int blip_store_tokens(blip_store *st, int64_t id, float *out) {
  if (st->tfmt == BLIP_TOKENS_NONE) return blip_err_set(BLIP_ENOTFOUND, "%s has no rerank store", st->dir);
  int has, has_sum, rc;
  uint64_t fp, sum;
  if ((rc = tok_row(st, id, &has, &fp, &sum, &has_sum))) return rc;
  if (has == 0) return blip_err_set(BLIP_ENOTFOUND, "image %lld has no token record", (long long)id);
  if (has == 1 && (rc = blip_tokstore_get(st->tok, id, fp, has_sum ? &sum : NULL, out)) == BLIP_OK) return BLIP_OK;
  if (has == 1) { /* a record deleted with its row since the caller found the row is no damage */
    char why[300];
    snprintf(why, sizeof why, "%s", blip_err_last());
    int has2, hs2;
    uint64_t fp2, sum2;
    if (tok_row(st, id, &has2, &fp2, &sum2, &hs2) != BLIP_OK || has2 != 1 || fp2 != fp)
      return blip_err_set(BLIP_ENOTFOUND, "image %lld left the index", (long long)id);
    blip_err_set(BLIP_EFORMAT, "%s", why);
  } else {
    blip_err_set(BLIP_EFORMAT, "%s: the record of image %lld was lost (awaiting repair)",
                 blip_tokstore_path(st->tok), (long long)id);
  }
  st->damage |= BLIP_DAMAGE_TOKENS;
  return BLIP_EFORMAT;
}

int blip_store_get(blip_store *st, int64_t id, float *feat, char *path, size_t cap) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st, "SELECT path, feat FROM images WHERE id=?", &s);
  if (rc) return rc;
  sqlite3_bind_int64(s, 1, id);
  if (sqlite3_step(s) != SQLITE_ROW) {
    rc = blip_err_set(BLIP_ENOTFOUND, "no image %lld", (long long)id);
  } else {
    if (path && cap) snprintf(path, cap, "%s", (const char *)sqlite3_column_text(s, 0));
    if (feat) {
      if (sqlite3_column_bytes(s, 1) == st->E * 4) memcpy(feat, sqlite3_column_blob(s, 1), (size_t)st->E * 4);
      else rc = blip_err_set(BLIP_ENOTFOUND, "image %lld has no feature", (long long)id);
    }
  }
  sqlite3_finalize(s);
  return rc;
}

/* ---- listing ---- */

int blip_store_each(blip_store *st, int errors_only, blip_store_row_fn fn, void *ctx) {
  sqlite3_stmt *s = NULL;
  int rc = prep(st,
                errors_only ? "SELECT id, path, size, mtime_ns, fingerprint, width, height, orientation, taken_at, "
                              "error, feat, retry, offline FROM images WHERE state='error' ORDER BY path"
                            : "SELECT id, path, size, mtime_ns, fingerprint, width, height, orientation, taken_at, "
                              "error, feat, retry, offline FROM images ORDER BY path",
                &s),
      r;
  if (rc) return rc;
  while ((r = sqlite3_step(s)) == SQLITE_ROW) {
    blip_store_row row = {
        (const char *)sqlite3_column_text(s, 1), sqlite3_column_int64(s, 2), sqlite3_column_int64(s, 3),
        (uint64_t)sqlite3_column_int64(s, 4), sqlite3_column_int(s, 5), sqlite3_column_int(s, 6),
        sqlite3_column_int(s, 7), (const char *)sqlite3_column_text(s, 8), (const char *)sqlite3_column_text(s, 9),
        sqlite3_column_int(s, 11), sqlite3_column_int(s, 12)};
    const float *feat = sqlite3_column_bytes(s, 10) == st->E * 4 ? sqlite3_column_blob(s, 10) : NULL;
    if (row.error == NULL && !feat) row.error = "no feature";
    if ((rc = fn(ctx, sqlite3_column_int64(s, 0), &row, feat))) break;
  }
  if (!rc && r != SQLITE_DONE) rc = db_err(st, "list images");
  sqlite3_finalize(s);
  return rc;
}

/* ---- check ---- */

unsigned blip_store_damage(const blip_store *st) { return st->damage; }

/* PRAGMA integrity_check of db into msg (its first lines; "" when ok). */
static int integrity(sqlite3 *db, char *msg, size_t cap) {
  sqlite3_stmt *s = NULL;
  size_t len = 0;
  int r, lines = 0;
  msg[0] = 0;
  if (sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &s, NULL) != SQLITE_OK) {
    snprintf(msg, cap, "%s", sqlite3_errmsg(db));
    return BLIP_OK;
  }
  while ((r = sqlite3_step(s)) == SQLITE_ROW) {
    const char *t = (const char *)sqlite3_column_text(s, 0);
    if (!t || strcmp(t, "ok") == 0) continue;
    if (lines++ < 3 && len < cap) len += (size_t)snprintf(msg + len, cap - len, "%s%s", len ? "; " : "", t);
  }
  if (r != SQLITE_DONE && !msg[0]) snprintf(msg, cap, "%s", sqlite3_errmsg(db));
  sqlite3_finalize(s);
  return BLIP_OK;
}

static void note_bad(int64_t *count, int64_t *first, int64_t id, char *why, size_t cap, const char *what) {
  if (!(*count)++) {
    *first = id;
    if (why) snprintf(why, cap, "%s", what);
  }
}

/* The FAISS side of the check: which index to compare, or why none. *cmp = 1
 * when the in-memory index now mirrors gen and should be compared. */
static int check_cache(blip_store *st, blip_store_report *r, int *cmp) {
  int64_t gen = db_generation(st);
  int rc = blip_vcache_gen(st->vc) == gen ? blip_vcache_check_file(st->vc, gen) : blip_vcache_load(st->vc, gen);
  if (rc == BLIP_ENOMEM) return rc;
  if (rc != BLIP_OK && rc != BLIP_ENOTFOUND) snprintf(r->cache, sizeof r->cache, "%s", blip_err_last());
  /* compare what is in memory: loaded from the file, or the writer's (kept in step with its commits);
   * a stale or absent file is rebuilt when needed, a damaged one has nothing stored to compare */
  *cmp = blip_vcache_gen(st->vc) == gen && !r->cache[0];
  return BLIP_OK;
}

int blip_store_check(blip_store *st, blip_store_report *r) {
  enum { CHUNK = 16384 }; /* rows compared per call: IVF groups them by list, the more per list the better */
  memset(r, 0, sizeof *r);
  sqlite3_stmt *s = NULL;
  float *x = malloc((size_t)CHUNK * st->E * sizeof *x);
  int64_t *ids = malloc(CHUNK * sizeof *ids), nx = 0;
  int began = 0, row = SQLITE_DONE, cmp = 0;
  /* one snapshot for the whole check: a writer may commit meanwhile */
  int rc = x && ids ? read_begin(st, &began) : blip_err_set(BLIP_ENOMEM, "out of memory");
  if (rc || (rc = integrity(st->db, r->sqlite, sizeof r->sqlite)) || (rc = check_cache(st, r, &cmp))) goto done;
  r->images = blip_store_count(st);
  r->tok_header = blip_tokstore_damaged(st->tok) && !st->write; /* the writer wrote it again at open */
  if (cmp && blip_vcache_ntotal(st->vc) != r->images) { /* vectors in FAISS that SQLite lacks, or the reverse */
    int64_t d = blip_vcache_ntotal(st->vc) - r->images;
    r->cache_bad += d < 0 ? -d : d;
  }
  if ((rc = prep(st, "SELECT id, feat, has_tokens, state, fingerprint, tok_sum, offline FROM images", &s))) goto done;
  while ((row = sqlite3_step(s)) == SQLITE_ROW) {
    int64_t id = sqlite3_column_int64(s, 0);
    int has_feat = sqlite3_column_bytes(s, 1) == st->E * 4, has = sqlite3_column_int(s, 2);
    const char *state = (const char *)sqlite3_column_text(s, 3);
    uint64_t fp = (uint64_t)sqlite3_column_int64(s, 4), sum = (uint64_t)sqlite3_column_int64(s, 5);
    int has_sum = sqlite3_column_type(s, 5) != SQLITE_NULL;
    if (has_feat != (state && strcmp(state, "ok") == 0)) r->rows_bad++;
    if (has == 2) note_bad(&r->tok_bad, &r->tok_first, id, r->tok_why, sizeof r->tok_why, "marked lost, awaiting repair");
    if (has == 1 && blip_tokstore_get(st->tok, id, fp, has_sum ? &sum : NULL, NULL) != BLIP_OK)
      note_bad(&r->tok_bad, &r->tok_first, id, r->tok_why, sizeof r->tok_why, blip_err_last());
    else if (has == 1 && !has_sum)
      r->tok_unsummed++;
    if (!has_feat || !cmp || sqlite3_column_int(s, 6)) continue; /* offline: not in the search set */
    memcpy(x + nx * st->E, sqlite3_column_blob(s, 1), (size_t)st->E * 4);
    ids[nx++] = id;
    if (nx == CHUNK) {
      if ((rc = blip_vcache_compare(st->vc, nx, ids, x, &r->cache_bad, &r->cache_first))) goto done;
      nx = 0;
    }
  }
  if (row != SQLITE_DONE) { /* a table SQLite cannot read: integrity_check has said why */
    if (!r->sqlite[0]) rc = db_err(st, "check");
    goto done;
  }
  if (nx) rc = blip_vcache_compare(st->vc, nx, ids, x, &r->cache_bad, &r->cache_first);
done:
  sqlite3_finalize(s);
  read_end(st, began);
  free(x);
  free(ids);
  return rc;
}

int blip_store_verify(blip_store *st) {
  blip_store_report r;
  int rc = blip_store_check(st, &r);
  if (rc) return rc;
  if (r.sqlite[0]) return blip_err_set(BLIP_EFORMAT, "index.sqlite is damaged: %s", r.sqlite);
  if (r.cache[0]) return blip_err_set(BLIP_EFORMAT, "%s", r.cache);
  if (r.cache_bad)
    return blip_err_set(BLIP_EFORMAT, "vectors.faiss: %lld vectors differ from SQLite's (first: image %lld)",
                        (long long)r.cache_bad, (long long)r.cache_first);
  if (r.rows_bad) return blip_err_set(BLIP_EFORMAT, "%lld rows have a state and feature that disagree", (long long)r.rows_bad);
  if (r.tok_header) return blip_err_set(BLIP_EFORMAT, "tokens.bin: damaged header");
  if (r.tok_bad)
    return blip_err_set(BLIP_EFORMAT, "tokens.bin: %lld records missing or damaged (first: image %lld: %s)",
                        (long long)r.tok_bad, (long long)r.tok_first, r.tok_why);
  return BLIP_OK;
}

/* ---- repair ---- */

int blip_store_tokens_scan(blip_store *st, int full, int64_t *marked) {
  *marked = 0;
  if (!st->write) return blip_err_set(BLIP_EINVAL, "store opened read-only");
  /* records from before schema 3 get their checksum once; then only a full scan reads records */
  if (!blip_tokstore_present(st->tok) || (!full && db_int(st, "SELECT 1 FROM meta WHERE key='tok_sums'", 0)))
    return BLIP_OK;
  sqlite3_stmt *s = NULL, *up = NULL;
  int64_t n = 0, cap = 0, *v = NULL; /* {id, has (1 sound, 2 lost), sum} triples */
  int rc = prep(st, full ? "SELECT id, fingerprint, tok_sum FROM images WHERE has_tokens=1"
                         : "SELECT id, fingerprint, tok_sum FROM images WHERE has_tokens=1 AND tok_sum IS NULL", &s), r;
  if (rc) return rc;
  while ((r = sqlite3_step(s)) == SQLITE_ROW) {
    int64_t id = sqlite3_column_int64(s, 0);
    uint64_t fp = (uint64_t)sqlite3_column_int64(s, 1), sum = (uint64_t)sqlite3_column_int64(s, 2), got = 0;
    int has_sum = sqlite3_column_type(s, 2) != SQLITE_NULL;
    int bad = has_sum ? blip_tokstore_get(st->tok, id, fp, &sum, NULL) != BLIP_OK
                      : blip_tokstore_sum(st->tok, id, fp, &got) != BLIP_OK;
    if (has_sum && !bad) continue;
    if (n == cap) {
      cap = cap ? 2 * cap : 256;
      int64_t *nv = realloc(v, (size_t)cap * 3 * sizeof *v);
      if (!nv) {
        rc = blip_err_set(BLIP_ENOMEM, "out of memory");
        goto done;
      }
      v = nv;
    }
    v[3 * n] = id;
    v[3 * n + 1] = bad ? 2 : 1;
    v[3 * n + 2] = (int64_t)got;
    n++;
  }
  if (r != SQLITE_DONE) {
    rc = db_err(st, "scan token records");
    goto done;
  }
  if ((rc = exec(st, "BEGIN IMMEDIATE"))) goto done;
  for (int64_t i = 0; i < n && !rc; i++) {
    uint64_t sum = (uint64_t)v[3 * i + 2];
    rc = set_tokens(st, &up, v[3 * i], (int)v[3 * i + 1], v[3 * i + 1] == 1 ? &sum : NULL);
    *marked += v[3 * i + 1] == 2;
  }
  if (!rc) rc = set_meta(st, "tok_sums", "all");
  rc = rc ? rc : exec(st, "COMMIT");
  if (rc) sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
  if (*marked) st->damage |= BLIP_DAMAGE_TOKENS;
done:
  sqlite3_finalize(s);
  sqlite3_finalize(up);
  free(v);
  return rc;
}

int blip_store_tokens_lost(blip_store *st, int64_t **ids, int64_t *n) {
  sqlite3_stmt *s = NULL;
  int64_t cap = 0;
  *ids = NULL;
  *n = 0;
  int rc = prep(st, "SELECT id FROM images WHERE has_tokens=2 ORDER BY id", &s), r;
  if (rc) return rc;
  while ((r = sqlite3_step(s)) == SQLITE_ROW) {
    if (*n == cap) {
      cap = cap ? 2 * cap : 256;
      int64_t *nv = realloc(*ids, (size_t)cap * sizeof *nv);
      if (!nv) {
        rc = blip_err_set(BLIP_ENOMEM, "out of memory");
        break;
      }
      *ids = nv;
    }
    (*ids)[(*n)++] = sqlite3_column_int64(s, 0);
  }
  if (!rc && r != SQLITE_DONE) rc = db_err(st, "list lost token records");
  sqlite3_finalize(s);
  if (rc) {
    free(*ids);
    *ids = NULL;
    *n = 0;
  }
  return rc;
}

int blip_store_put_tokens(blip_store *st, int n, const int64_t *ids, const uint64_t *fps, const float *tokens) {
  if (!st->write || !blip_tokstore_present(st->tok)) return blip_err_set(BLIP_EINVAL, "no writable rerank store");
  sqlite3_stmt *up = NULL;
  uint64_t *sums = malloc(((size_t)n + 1) * sizeof *sums);
  size_t tsz = (size_t)st->T * st->Dv;
  int rc = sums ? BLIP_OK : blip_err_set(BLIP_ENOMEM, "out of memory"), intx = 0;
  /* the rows stay marked lost (queries do not read these records) until the records are durable */
  for (int i = 0; i < n && !rc; i++) rc = blip_tokstore_put(st->tok, ids[i], fps[i], tokens + (size_t)i * tsz, &sums[i]);
  if (rc || (rc = blip_tokstore_sync(st->tok)) || (rc = exec(st, "BEGIN IMMEDIATE"))) goto done;
  intx = 1;
  if ((rc = prep(st, "UPDATE images SET has_tokens=1, tok_sum=? WHERE id=? AND fingerprint=? AND has_tokens=2", &up)))
    goto done;
  for (int i = 0; i < n; i++) {
    sqlite3_reset(up);
    sqlite3_bind_int64(up, 1, (int64_t)sums[i]);
    sqlite3_bind_int64(up, 2, ids[i]);
    sqlite3_bind_int64(up, 3, (int64_t)fps[i]);
    if (sqlite3_step(up) != SQLITE_DONE) {
      rc = db_err(st, "update token record");
      goto done;
    }
  }
  if ((rc = exec(st, "COMMIT"))) goto done;
  intx = 0;
done:
  if (intx) sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
  sqlite3_finalize(up);
  free(sums);
  return rc;
}

int blip_store_drop_tokens(blip_store *st, int64_t id) {
  sqlite3_stmt *up = NULL;
  int rc = set_tokens(st, &up, id, 0, NULL);
  sqlite3_finalize(up);
  return rc;
}

int blip_store_rebuild_cache(blip_store *st) {
  if (!st->write) return blip_err_set(BLIP_EINVAL, "store opened read-only");
  int rc = fx_rebuild(st, 1);
  return rc ? rc : blip_vcache_save(st->vc);
}

/* Copy the readable rows of every table into a fresh database at path:
 * full table scans (NOT INDEXED, and WHERE 1 defeats SQLite's transfer
 * optimization, which would copy the damaged index b-trees as they are), so
 * every index of the copy is built anew from its table. */
static int copy_rows(blip_store *st, const char *path) {
  static const char *const COPY[] = {
      "INSERT INTO repair.images SELECT * FROM main.images NOT INDEXED WHERE 1",
      "INSERT INTO repair.meta SELECT * FROM main.meta NOT INDEXED WHERE 1",
      "INSERT INTO repair.mounts SELECT * FROM main.mounts NOT INDEXED WHERE 1",
      "DELETE FROM repair.sqlite_sequence",
      "INSERT INTO repair.sqlite_sequence SELECT * FROM main.sqlite_sequence WHERE 1",
  };
  sqlite3 *db = NULL;
  char sql[64], *attach = sqlite3_mprintf("ATTACH %Q AS repair", path);
  int rc = attach ? BLIP_OK : blip_err_set(BLIP_ENOMEM, "out of memory");
  if (!rc && sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK)
    rc = blip_err_set(BLIP_EIO, "%s: %s", path, db ? sqlite3_errmsg(db) : "out of memory");
  for (int v = 0; !rc && v < NSCHEMA; v++)
    if (sqlite3_exec(db, SCHEMA[v], NULL, NULL, NULL) != SQLITE_OK)
      rc = blip_err_set(BLIP_EIO, "%s: %s", path, sqlite3_errmsg(db));
  snprintf(sql, sizeof sql, "PRAGMA user_version=%d", NSCHEMA);
  if (!rc && sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK)
    rc = blip_err_set(BLIP_EIO, "%s: %s", path, sqlite3_errmsg(db));
  sqlite3_close(db);
  if (rc || (rc = exec(st, attach))) goto done;
  if (!(rc = exec(st, "BEGIN IMMEDIATE"))) {
    for (size_t i = 0; !rc && i < sizeof COPY / sizeof COPY[0]; i++) rc = exec(st, COPY[i]);
    rc = rc ? rc : exec(st, "COMMIT");
    if (rc) sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
  }
  sqlite3_exec(st->db, "DETACH repair", NULL, NULL, NULL);
done:
  sqlite3_free(attach);
  return rc;
}

int blip_store_repair_db(blip_store *st, int *repaired) {
  *repaired = 0;
  if (!st->write) return blip_err_set(BLIP_EINVAL, "store opened read-only");
  char msg[512], *tmp = path_in(st, "index.sqlite.repair");
  sqlite3 *copy = NULL;
  sqlite3_backup *bk = NULL;
  int rc = tmp ? integrity(st->db, msg, sizeof msg) : blip_err_set(BLIP_ENOMEM, "out of memory");
  if (rc || !msg[0]) goto done;
  unlink(tmp);
  if (copy_rows(st, tmp)) {
    rc = blip_err_set(BLIP_EFORMAT, "%s/index.sqlite cannot be repaired (%s): its rows cannot be read (%s); restore "
                                    "it from a backup or rebuild the index (blip-index --rebuild)",
                      st->dir, msg, blip_err_last());
    goto done;
  }
  if (sqlite3_open_v2(tmp, &copy, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK || integrity(copy, msg, sizeof msg) || msg[0]) {
    rc = blip_err_set(BLIP_EFORMAT, "%s/index.sqlite cannot be repaired: a copy of its rows is not sound either (%s)",
                      st->dir, msg);
    goto done;
  }
  /* through SQLite's locking: readers see the old database or the repaired one */
  if (!(bk = sqlite3_backup_init(st->db, "main", copy, "main")) || sqlite3_backup_step(bk, -1) != SQLITE_DONE) {
    rc = db_err(st, "write the repaired database");
    goto done;
  }
  sqlite3_backup_finish(bk);
  bk = NULL;
  if ((rc = integrity(st->db, msg, sizeof msg)) == BLIP_OK && msg[0])
    rc = blip_err_set(BLIP_EFORMAT, "%s/index.sqlite: still damaged after repair: %s", st->dir, msg);
  *repaired = rc == BLIP_OK;
done:
  if (bk) sqlite3_backup_finish(bk);
  if (copy) sqlite3_close(copy);
  if (tmp) unlink(tmp);
  free(tmp);
  return rc;
}

/* ---- captions ---- */

int blip_store_caption_identity(blip_store *st, const char *id, int recaption) {
  if (!st->write) return blip_err_set(BLIP_EINVAL, "store opened read-only");
  sqlite3_stmt *s = NULL;
  int rc = prep(st, "SELECT value FROM meta WHERE key='caption_model'", &s);
  if (rc) return rc;
  const char *v = sqlite3_step(s) == SQLITE_ROW ? (const char *)sqlite3_column_text(s, 0) : NULL;
  const int same = v && !strcmp(v, id), had = v != NULL;
  sqlite3_finalize(s);
  if (same) return BLIP_OK;
  if (had && !recaption)
    return blip_err_set(BLIP_EMISMATCH, "%s: the captions were written by another captioner or precision: --recaption redoes them all",
                        st->dir);
  if ((rc = exec(st, "BEGIN IMMEDIATE"))) return rc;
  if ((!had || !(rc = exec(st, "UPDATE images SET caption=NULL WHERE caption IS NOT NULL"))) && !(rc = set_meta(st, "caption_model", id)))
    return exec(st, "COMMIT");
  sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
  return rc;
}

void blip_store_free_paths(char **paths, int64_t n) {
  for (int64_t i = 0; paths && i < n; i++) free(paths[i]);
  free(paths);
}

int blip_store_uncaptioned(blip_store *st, int64_t **ids, char ***paths, int64_t *n) {
  sqlite3_stmt *s = NULL;
  int64_t cap = 0;
  *ids = NULL, *paths = NULL, *n = 0;
  int rc = prep(st, "SELECT id, path FROM images WHERE feat IS NOT NULL AND offline = 0 AND caption IS NULL ORDER BY id", &s), r;
  while (!rc && (r = sqlite3_step(s)) == SQLITE_ROW) {
    if (*n == cap) {
      cap = cap ? 2 * cap : 256;
      int64_t *ni = realloc(*ids, (size_t)cap * sizeof *ni);
      if (ni) *ids = ni;
      char **np = ni ? realloc(*paths, (size_t)cap * sizeof *np) : NULL;
      if (np) *paths = np;
      if (!ni || !np) rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    }
    const char *p = (const char *)sqlite3_column_text(s, 1);
    if (!rc && !((*paths)[*n] = strdup(p ? p : ""))) rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    if (!rc) (*ids)[(*n)++] = sqlite3_column_int64(s, 0);
  }
  if (!rc && r != SQLITE_DONE) rc = db_err(st, "uncaptioned rows");
  sqlite3_finalize(s);
  if (rc) {
    blip_store_free_paths(*paths, *n);
    free(*ids);
    *ids = NULL, *paths = NULL, *n = 0;
  }
  return rc;
}

int blip_store_set_captions(blip_store *st, const int64_t *ids, const char *const *captions, int n) {
  if (!st->write) return blip_err_set(BLIP_EINVAL, "store opened read-only");
  sqlite3_stmt *s = NULL;
  int rc = exec(st, "BEGIN IMMEDIATE");
  if (rc) return rc;
  if (!(rc = prep(st, "UPDATE images SET caption=?2 WHERE id=?1", &s)))
    for (int i = 0; i < n && !rc; i++) {
      sqlite3_bind_int64(s, 1, ids[i]);
      sqlite3_bind_text(s, 2, captions[i], -1, SQLITE_STATIC);
      if (sqlite3_step(s) != SQLITE_DONE) rc = db_err(st, "write caption");
      sqlite3_reset(s);
    }
  sqlite3_finalize(s);
  if (!rc) return exec(st, "COMMIT");
  sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
  return rc;
}
