/* blip_tokstore: see blip_tokstore.h.
 *
 * Design note. Ids come from SQLite's AUTOINCREMENT, so a committed id is
 * never reused and a committed record is never rewritten (a changed file gets
 * a new row and id), except by a repair, while its row is marked lost so that
 * no reader reads it. Ids of a rolled-back transaction are reused by the next
 * one, which overwrites the leftovers; at open the writer truncates past the
 * highest id ever committed. Deleted ids become holes (punched), which read
 * back as zeros and so never pass the {id, fingerprint} tag check. Readers map
 * the file lazily and remap when a record lies past the mapped length.
 *
 * Damage. Each record's XXH3-64 (tag + payload) is kept in its SQLite row
 * (tok_sum, schema 3), so a reader can tell garbage in a payload from data.
 * Behind a foreign or damaged header the records are read at the index's own
 * geometry and trusted only as far as their tag and checksum go: a reader
 * uses the sound ones, the writer writes the header again and its owner
 * checks every record, so that only damaged ones are recomputed. */
#include "blip_tokstore.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "blip_err.h"
#include "blip_st.h"

#define TOK_MAGIC "BLIPTOK1"
#define TOK_HDR 64   /* header bytes before record 0 */
#define TAG_BYTES 16 /* {int64 id, uint64 fingerprint} at the start of a record */


struct blip_tokstore {
  char path[4096];
  blip_tokens_fmt fmt;
  int T, Dv, fd;
  size_t stride;
  uint8_t *map, *rec; /* rec: one record of scratch for the writer */
  size_t len;
  int damaged; /* the header was foreign or damaged (the writer wrote it again): check every record */
};

size_t blip_tokstore_payload_size(blip_tokens_fmt fmt, int T, int Dv) {
  if (fmt == BLIP_TOKENS_I8) return (size_t)T * 4 + (size_t)T * Dv;
  if (fmt == BLIP_TOKENS_F16) return (size_t)T * Dv * 2;
  return 0;
}

void blip_tokstore_encode(blip_tokens_fmt fmt, int T, int Dv, const float *x, uint8_t *rec) {
  if (fmt == BLIP_TOKENS_F16) {
    for (size_t i = 0; i < (size_t)T * Dv; i++) {
      uint16_t h = blip_f32_to_f16(x[i]);
      memcpy(rec + 2 * i, &h, 2);
    }
    return;
  }
  int8_t *q = (int8_t *)(rec + (size_t)T * 4);
  for (int t = 0; t < T; t++) {
    const float *r = x + (size_t)t * Dv;
    float m = 0;
    for (int j = 0; j < Dv; j++) m = fmaxf(m, fabsf(r[j]));
    float scale = m / 127.0f, inv = m > 0 ? 127.0f / m : 0;
    memcpy(rec + (size_t)t * 4, &scale, 4);
    for (int j = 0; j < Dv; j++) {
      long v = lrintf(r[j] * inv);
      q[(size_t)t * Dv + j] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
    }
  }
}

void blip_tokstore_decode(blip_tokens_fmt fmt, int T, int Dv, const uint8_t *rec, float *x) {
  if (fmt == BLIP_TOKENS_F16) {
    for (size_t i = 0; i < (size_t)T * Dv; i++) {
      uint16_t h;
      memcpy(&h, rec + 2 * i, 2);
      x[i] = blip_f16_to_f32(h);
    }
    return;
  }
  const int8_t *q = (const int8_t *)(rec + (size_t)T * 4);
  for (int t = 0; t < T; t++) {
    float scale;
    memcpy(&scale, rec + (size_t)t * 4, 4);
    for (int j = 0; j < Dv; j++) x[(size_t)t * Dv + j] = scale * q[(size_t)t * Dv + j];
  }
}

static off_t rec_off(const blip_tokstore *ts, int64_t id) { return (off_t)TOK_HDR + (off_t)id * (off_t)ts->stride; }

int blip_tokstore_open(const char *dir, blip_tokens_fmt fmt, int T, int Dv, int write, blip_tokstore **out) {
  *out = NULL;
  blip_tokstore *ts = calloc(1, sizeof *ts);
  if (!ts) return blip_err_set(BLIP_ENOMEM, "out of memory");
  ts->fd = -1;
  ts->fmt = fmt;
  ts->T = T;
  ts->Dv = Dv;
  ts->stride = (TAG_BYTES + blip_tokstore_payload_size(fmt, T, Dv) + 63) / 64 * 64;
  snprintf(ts->path, sizeof ts->path, "%s/tokens.bin", dir);
  int rc = BLIP_OK;
  if (fmt == BLIP_TOKENS_NONE) goto done;
  if (write && !(ts->rec = calloc(1, ts->stride))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  ts->fd = open(ts->path, (write ? O_RDWR | O_CREAT : O_RDONLY) | O_CLOEXEC, 0644);
  if (ts->fd < 0) {
    rc = errno == ENOENT ? BLIP_OK : blip_err_errno("open", ts->path); /* reader: no store yet */
    goto done;
  }
  uint8_t h[TOK_HDR] = {0}, want[TOK_HDR] = {0};
  uint32_t v[3] = {(uint32_t)fmt, (uint32_t)T, (uint32_t)Dv};
  uint64_t stride = ts->stride;
  memcpy(want, TOK_MAGIC, 8);
  memcpy(want + 8, v, sizeof v);
  memcpy(want + 24, &stride, 8);
  ssize_t n = pread(ts->fd, h, TOK_HDR, 0);
  if (n < 0) {
    rc = blip_err_errno("read", ts->path);
  } else if (n == TOK_HDR && memcmp(h, want, TOK_HDR) == 0) {
    /* a store of this index */
  } else if (!write && n < TOK_HDR) { /* a crash cut the header short before any record was committed */
    close(ts->fd);
    ts->fd = -1;
  } else if (!write) { /* damaged header: each record still answers for itself (tag, checksum) */
    ts->damaged = 1;
  } else { /* new, cut short by a crash (no record was committed), or a damaged header: the records
            * stay where they are, and the owner checks each against its row's tag and checksum */
    ts->damaged = n == TOK_HDR;
    if ((!ts->damaged && ftruncate(ts->fd, 0) != 0) || pwrite(ts->fd, want, TOK_HDR, 0) != TOK_HDR ||
        fdatasync(ts->fd) != 0)
      rc = blip_err_errno("write", ts->path);
  }
done:
  if (rc) {
    blip_tokstore_close(ts);
    return rc;
  }
  *out = ts;
  return BLIP_OK;
}

void blip_tokstore_close(blip_tokstore *ts) {
  if (!ts) return;
  if (ts->map) munmap(ts->map, ts->len);
  if (ts->fd >= 0) close(ts->fd);
  free(ts->rec);
  free(ts);
}

int blip_tokstore_present(const blip_tokstore *ts) { return ts && ts->fd >= 0; }
int blip_tokstore_damaged(const blip_tokstore *ts) { return ts && ts->damaged; }
const char *blip_tokstore_path(const blip_tokstore *ts) { return ts->path; }

int64_t blip_tokstore_slots(const blip_tokstore *ts) {
  struct stat sb;
  if (!ts || ts->fd < 0 || fstat(ts->fd, &sb) != 0 || sb.st_size < TOK_HDR) return 0;
  return (int64_t)((sb.st_size - TOK_HDR) / (off_t)ts->stride);
}

static uint64_t rec_sum(const blip_tokstore *ts, const uint8_t *rec) {
  return XXH3_64bits(rec, TAG_BYTES + blip_tokstore_payload_size(ts->fmt, ts->T, ts->Dv));
}
size_t blip_tokstore_stride(const blip_tokstore *ts) { return ts && ts->fmt ? ts->stride : 0; }

int blip_tokstore_put(blip_tokstore *ts, int64_t id, uint64_t fp, const float *tokens, uint64_t *sum) {
  memcpy(ts->rec, &id, 8);
  memcpy(ts->rec + 8, &fp, 8);
  blip_tokstore_encode(ts->fmt, ts->T, ts->Dv, tokens, ts->rec + TAG_BYTES);
  *sum = rec_sum(ts, ts->rec);
  for (size_t done = 0; done < ts->stride;) { /* a short write is retried: the next one says why (ENOSPC, EFBIG) */
    ssize_t w = pwrite(ts->fd, ts->rec + done, ts->stride - done, rec_off(ts, id) + (off_t)done);
    if (w <= 0) {
      if (w == 0) errno = ENOSPC;
      return blip_err_errno("write", ts->path);
    }
    done += (size_t)w;
  }
  return BLIP_OK;
}

int blip_tokstore_sync(blip_tokstore *ts) {
  return fdatasync(ts->fd) == 0 ? BLIP_OK : blip_err_errno("sync", ts->path);
}

void blip_tokstore_punch(blip_tokstore *ts, int64_t id) {
  if (ts->fd >= 0)
    fallocate(ts->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, rec_off(ts, id), (off_t)ts->stride);
}

int blip_tokstore_truncate(blip_tokstore *ts, int64_t max_id) {
  struct stat sb;
  if (ts->fd < 0 || fstat(ts->fd, &sb) != 0 || sb.st_size <= rec_off(ts, max_id + 1)) return BLIP_OK;
  return ftruncate(ts->fd, rec_off(ts, max_id + 1)) == 0 ? BLIP_OK : blip_err_errno("truncate", ts->path);
}

/* Map enough of the file to read record id. */
static int tok_map(blip_tokstore *ts, int64_t id) {
  size_t need = (size_t)rec_off(ts, id) + ts->stride;
  if (ts->map && ts->len >= need) return BLIP_OK;
  struct stat sb;
  if (fstat(ts->fd, &sb) != 0) return blip_err_errno("stat", ts->path);
  if ((size_t)sb.st_size < need) return blip_err_set(BLIP_ENOTFOUND, "image %lld has no token record", (long long)id);
  if (ts->map) munmap(ts->map, ts->len);
  ts->map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_SHARED, ts->fd, 0);
  if (ts->map == MAP_FAILED) {
    ts->map = NULL;
    ts->len = 0;
    return blip_err_errno("mmap", ts->path);
  }
  ts->len = (size_t)sb.st_size;
  return BLIP_OK;
}

/* Record id, checked against its row's tag: NULL past the end of the file or
 * for a record of another row (or a hole); *rc says which. */
static const uint8_t *rec_at(blip_tokstore *ts, int64_t id, uint64_t fp, int *rc) {
  if (ts->fd < 0) {
    *rc = blip_err_set(BLIP_ENOTFOUND, "%s is missing", ts->path);
    return NULL;
  }
  if ((*rc = tok_map(ts, id))) return NULL;
  const uint8_t *rec = ts->map + rec_off(ts, id);
  int64_t rid;
  uint64_t rfp;
  memcpy(&rid, rec, 8);
  memcpy(&rfp, rec + 8, 8);
  if (rid == id && rfp == fp) return rec;
  *rc = blip_err_set(BLIP_EFORMAT, "%s: record %lld does not belong to its image", ts->path, (long long)id);
  return NULL;
}

int blip_tokstore_get(blip_tokstore *ts, int64_t id, uint64_t fp, const uint64_t *sum, float *out) {
  int rc;
  const uint8_t *rec = rec_at(ts, id, fp, &rc);
  if (!rec) return rc;
  if (sum && rec_sum(ts, rec) != *sum)
    return blip_err_set(BLIP_EFORMAT, "%s: record %lld is damaged (checksum mismatch)", ts->path, (long long)id);
  if (out) blip_tokstore_decode(ts->fmt, ts->T, ts->Dv, rec + TAG_BYTES, out);
  return BLIP_OK;
}

int blip_tokstore_sum(blip_tokstore *ts, int64_t id, uint64_t fp, uint64_t *sum) {
  int rc;
  const uint8_t *rec = rec_at(ts, id, fp, &rc);
  if (rec) *sum = rec_sum(ts, rec);
  return rec ? BLIP_OK : rc;
}
