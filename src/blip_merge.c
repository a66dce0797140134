/* blip_merge: see blip_merge.h.
 *
 * Design note. Rows are copied column by column as SQLite values (every
 * column of images, whatever migrations added), ids shifted by the shard's
 * base, so no feature is decoded or re-encoded. The whole merge is one
 * transaction on the merged database: a kill leaves no half-merged index.
 * Token files are linked (or copied) and synced before the transaction that
 * records them in token_segments commits, the same write order as a batch of
 * blip-index. Shard k's base is the sum of the earlier shards' highest ids
 * ever assigned (sqlite_sequence), so bases never overlap and the merged
 * index's own new ids continue after the last shard. */
#include "blip_merge.h"

#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blip_err.h"
#include "blip_store.h"

static const char *const KEYS[] = {"model", "precision", "preprocess", "embed_dim", "v_tokens", "v_hidden", "tokens"};
enum { NKEYS = sizeof KEYS / sizeof KEYS[0] };

static int sql_err(sqlite3 *db, const char *what) {
  int ec = sqlite3_extended_errcode(db);
  if (ec == SQLITE_CONSTRAINT_UNIQUE)
    return blip_err_set(BLIP_EMISMATCH, "%s: a photo path is in two shards (%s); were the shards made from "
                                        "overlapping roots with different --shard counts?", what, sqlite3_errmsg(db));
  return blip_err_set((ec & 0xff) == SQLITE_FULL ? BLIP_EFULL : BLIP_EDB, "%s: %s", what, sqlite3_errmsg(db));
}

static int64_t q_int(sqlite3 *db, const char *sql, int64_t dflt) {
  sqlite3_stmt *s = NULL;
  int64_t v = dflt;
  if (sqlite3_prepare_v2(db, sql, -1, &s, NULL) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW &&
      sqlite3_column_type(s, 0) != SQLITE_NULL)
    v = sqlite3_column_int64(s, 0);
  sqlite3_finalize(s);
  return v;
}

/* Open a shard as its writer (its lock keeps blip-index out while we read it). */
static int open_shard(const char *dir, blip_store **out) {
  blip_store *ro = NULL;
  blip_store_opts o = {0};
  int rc = blip_store_open(dir, NULL, &o, &ro);
  if (rc) return blip_err_wrap(rc, "shard %s", dir);
  const char *v[NKEYS];
  for (int i = 0; i < NKEYS; i++) v[i] = blip_store_meta(ro, KEYS[i]);
  blip_store_identity id = {v[0], v[1], v[2], atoi(v[3] ? v[3] : "0"), atoi(v[4] ? v[4] : "0"), atoi(v[5] ? v[5] : "0")};
  blip_store_opts w = {.write = 1, .tokens = blip_store_tokens_fmt(ro)};
  rc = blip_store_open(dir, &id, &w, out);
  blip_store_close(ro);
  return rc ? blip_err_wrap(rc, "shard %s", dir) : BLIP_OK;
}

static int copy_file(const char *from, const char *to) {
  int in = open(from, O_RDONLY | O_CLOEXEC), out = -1, rc = BLIP_OK;
  char buf[1 << 16];
  if (in < 0) return blip_err_errno("open", from);
  if ((out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) < 0) {
    rc = blip_err_errno("create", to);
    goto done;
  }
  for (;;) {
    ssize_t n = read(in, buf, sizeof buf);
    if (n < 0) {
      rc = blip_err_errno("read", from);
      break;
    }
    if (n == 0) break;
    for (ssize_t off = 0; off < n;) {
      ssize_t w = write(out, buf + off, (size_t)(n - off));
      if (w < 0) {
        rc = blip_err_errno("write", to);
        goto done;
      }
      off += w;
    }
  }
  if (!rc && fsync(out) != 0) rc = blip_err_errno("sync", to);
done:
  if (out >= 0) close(out);
  close(in);
  return rc;
}

/* Bring shard k's tokens.bin into out_dir as tokens-K.bin. */
static int link_tokens(const char *shard, const char *out_dir, int k, char *name, size_t cap, blip_merge_stats *stats) {
  char from[4096], to[4200];
  snprintf(from, sizeof from, "%s/tokens.bin", shard);
  snprintf(name, cap, "tokens-%04d.bin", k);
  snprintf(to, sizeof to, "%s/%s", out_dir, name);
  if (unlink(to) != 0 && errno != ENOENT) return blip_err_errno("remove", to);
  if (link(from, to) == 0) {
    stats->linked++;
    return BLIP_OK;
  }
  if (errno != EXDEV && errno != EPERM && errno != EMLINK) return blip_err_errno("link", from);
  stats->copied++;
  return copy_file(from, to);
}

/* "c1,c2,..." and "?,?,..." for every column of images; *id_col gets the position of id. */
static int image_columns(sqlite3 *db, char *cols, size_t cap, char *marks, size_t mcap, int *ncol, int *id_col) {
  sqlite3_stmt *s = NULL;
  size_t n = 0, m = 0;
  int rc = BLIP_OK;
  if (sqlite3_prepare_v2(db, "SELECT name FROM pragma_table_info('images') ORDER BY cid", -1, &s, NULL) != SQLITE_OK)
    return sql_err(db, "read the images schema");
  *ncol = 0, *id_col = -1;
  while (sqlite3_step(s) == SQLITE_ROW) {
    const char *c = (const char *)sqlite3_column_text(s, 0);
    if (!strcmp(c, "id")) *id_col = *ncol;
    n += (size_t)snprintf(cols + n, n < cap ? cap - n : 0, "%s\"%s\"", n ? "," : "", c);
    m += (size_t)snprintf(marks + m, m < mcap ? mcap - m : 0, "%s?", m ? "," : "");
    (*ncol)++;
    if (n >= cap || m >= mcap) rc = blip_err_set(BLIP_EINVAL, "images has too many columns");
  }
  sqlite3_finalize(s);
  if (!rc && *id_col < 0) rc = blip_err_set(BLIP_EFORMAT, "images has no id column");
  return rc;
}

/* Copy shard's rows into db (inside its transaction) with ids + base. */
static int copy_rows(sqlite3 *db, const char *shard, const char *cols, const char *marks, int ncol, int id_col,
                     int64_t base, int64_t *rows, int64_t *seq, int64_t *with_tokens) {
  char path[4200], sql[4500];
  sqlite3 *src = NULL;
  sqlite3_stmt *rd = NULL, *ins = NULL;
  int rc = BLIP_OK, r;
  snprintf(path, sizeof path, "%s/index.sqlite", shard);
  if (sqlite3_open_v2(path, &src, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
    rc = src ? sql_err(src, shard) : blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  *seq = q_int(src, "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name='images'), 0), "
                    "coalesce((SELECT max(id) FROM images), 0))", 0);
  *with_tokens = q_int(src, "SELECT count(*) FROM images WHERE has_tokens=1", 0);
  snprintf(sql, sizeof sql, "SELECT %s FROM images ORDER BY id", cols);
  if (sqlite3_prepare_v2(src, sql, -1, &rd, NULL) != SQLITE_OK) {
    rc = sql_err(src, shard);
    goto done;
  }
  snprintf(sql, sizeof sql, "INSERT INTO images(%s) VALUES (%s)", cols, marks);
  if (sqlite3_prepare_v2(db, sql, -1, &ins, NULL) != SQLITE_OK) {
    rc = sql_err(db, "prepare merge");
    goto done;
  }
  while ((r = sqlite3_step(rd)) == SQLITE_ROW) {
    for (int c = 0; c < ncol; c++) {
      if (c == id_col) sqlite3_bind_int64(ins, c + 1, base + sqlite3_column_int64(rd, c));
      else sqlite3_bind_value(ins, c + 1, sqlite3_column_value(rd, c));
    }
    if (sqlite3_step(ins) != SQLITE_DONE) {
      rc = sql_err(db, shard);
      goto done;
    }
    sqlite3_reset(ins);
    (*rows)++;
  }
  if (r != SQLITE_DONE) rc = sql_err(src, shard);
done:
  sqlite3_finalize(rd);
  sqlite3_finalize(ins);
  if (src) sqlite3_close(src);
  return rc;
}

int blip_merge(const char *out_dir, const char *const *shard_dirs, int n, blip_merge_stats *stats) {
  memset(stats, 0, sizeof *stats);
  if (n < 1) return blip_err_set(BLIP_EINVAL, "merge: no shard directories");
  blip_store **sh = calloc((size_t)n, sizeof *sh), *out = NULL;
  sqlite3 *db = NULL;
  sqlite3_stmt *seg = NULL;
  int rc = BLIP_OK, intx = 0, ncol, id_col;
  char path[4200], cols[2048], marks[512], sql[512];
  if (!sh) return blip_err_set(BLIP_ENOMEM, "out of memory");
  for (int k = 0; k < n && !rc; k++) {
    if ((rc = open_shard(shard_dirs[k], &sh[k]))) break;
    for (int i = 0; i < NKEYS && k > 0; i++) {
      const char *a = blip_store_meta(sh[0], KEYS[i]), *b = blip_store_meta(sh[k], KEYS[i]);
      if (strcmp(a ? a : "", b ? b : ""))
        rc = blip_err_set(BLIP_EMISMATCH, "shard %s has %s=%s but shard %s has %s=%s: shards of one index must be made "
                                          "with the same model and settings", shard_dirs[k], KEYS[i], b ? b : "",
                          shard_dirs[0], KEYS[i], a ? a : "");
    }
  }
  if (rc) goto done;
  const char *v[NKEYS];
  for (int i = 0; i < NKEYS; i++) v[i] = blip_store_meta(sh[0], KEYS[i]);
  blip_store_identity id = {v[0], v[1], v[2], atoi(v[3]), atoi(v[4]), atoi(v[5])};
  blip_tokens_fmt fmt = blip_store_tokens_fmt(sh[0]);
  blip_store_opts wo = {.write = 1, .rebuild = 1, .tokens = fmt};
  if ((rc = blip_store_open(out_dir, &id, &wo, &out))) goto done;
  snprintf(path, sizeof path, "%s/index.sqlite", out_dir);
  if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK) {
    rc = db ? sql_err(db, "open the merged index") : blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  sqlite3_busy_timeout(db, 10000);
  if ((rc = image_columns(db, cols, sizeof cols, marks, sizeof marks, &ncol, &id_col))) goto done;
  if (sqlite3_exec(db, "PRAGMA synchronous=FULL; BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
    rc = sql_err(db, "begin");
    goto done;
  }
  intx = 1;
  int64_t base = 0;
  for (int k = 0; k < n; k++) {
    int64_t seq = 0, with_tokens = 0;
    if ((rc = copy_rows(db, shard_dirs[k], cols, marks, ncol, id_col, base, &stats->rows, &seq, &with_tokens)))
      goto done;
    if (fmt != BLIP_TOKENS_NONE && with_tokens > 0) {
      char name[64];
      if ((rc = link_tokens(shard_dirs[k], out_dir, k, name, sizeof name, stats))) goto done;
      if (sqlite3_prepare_v2(db, "INSERT INTO token_segments(first_id, last_id, id_offset, file) VALUES (?,?,?,?)", -1,
                             &seg, NULL) != SQLITE_OK) {
        rc = sql_err(db, "prepare segment");
        goto done;
      }
      sqlite3_bind_int64(seg, 1, base + 1);
      sqlite3_bind_int64(seg, 2, base + seq);
      sqlite3_bind_int64(seg, 3, base);
      sqlite3_bind_text(seg, 4, name, -1, SQLITE_TRANSIENT);
      if (sqlite3_step(seg) != SQLITE_DONE) {
        rc = sql_err(db, "record token segment");
        goto done;
      }
      sqlite3_finalize(seg);
      seg = NULL;
    }
    base += seq;
  }
  /* rows inserted with their captions: the caption search index is rebuilt from them (its
   * triggers follow deletes and caption updates, not inserts) */
  if (q_int(db, "SELECT count(*) FROM sqlite_master WHERE name='captions_fts'", 0) &&
      sqlite3_exec(db, "INSERT INTO captions_fts(captions_fts) VALUES ('rebuild')", NULL, NULL, NULL) != SQLITE_OK) {
    rc = sql_err(db, "rebuild the caption index");
    goto done;
  }
  /* new ids of later runs on the merged index continue after every shard's range */
  snprintf(sql, sizeof sql,
           "DELETE FROM sqlite_sequence WHERE name='images'; INSERT INTO sqlite_sequence(name, seq) VALUES "
           "('images', %lld); UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'",
           (long long)base);
  if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK) {
    rc = sql_err(db, "finish merge");
    goto done;
  }
  int dfd = open(out_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC); /* the token files' names are durable */
  if (dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
    rc = sql_err(db, "commit merge");
    goto done;
  }
  intx = 0;
  stats->searchable = blip_store_count(out);
  rc = blip_store_flush(out); /* the FAISS index, built once over the whole collection */
done:;
  char msg[1024]; /* closing the stores may set messages of its own */
  snprintf(msg, sizeof msg, "%s", rc ? blip_err_last() : "");
  if (intx) sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
  sqlite3_finalize(seg);
  if (db) sqlite3_close(db);
  blip_store_close(out);
  for (int k = 0; k < n; k++) blip_store_close(sh[k]);
  free(sh);
  return rc ? blip_err_set(rc, "%s", msg) : BLIP_OK;
}
