/* blip_tokstore: see blip_tokstore.h.
 *
 * Design note. Ids come from SQLite's AUTOINCREMENT, so a committed id is
 * never reused and a committed record is never rewritten (a changed file gets
 * a new row and id). Ids of a rolled-back transaction are reused by the next
 * one, which overwrites the leftovers; at open the writer truncates past the
 * highest id ever committed. Deleted ids become holes (punched), which read
 * back as zeros and so never pass the {id, fingerprint} tag check. Readers map
 * the file lazily and remap when a record lies past the mapped length. */
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

#include "blip_err.h"
#include "blip_st.h"

#define TOK_MAGIC "BLIPTOK1"
#define TOK_HDR 64   /* header bytes before record 0 */
#define TAG_BYTES 16 /* {int64 id, uint64 fingerprint} at the start of a record */

#define I4_GROUP 32   /* int4: values per scale */

static const char *const TOK_NAMES[BLIP_TOKENS_NFMT] = {"none", "int8", "f16", "int4"};

const char *blip_tokstore_fmt_name(blip_tokens_fmt fmt) {
  return (unsigned)fmt < BLIP_TOKENS_NFMT ? TOK_NAMES[fmt] : "unknown";
}

int blip_tokstore_parse_fmt(const char *name) {
  for (int i = 0; i < BLIP_TOKENS_NFMT; i++)
    if (name && !strcmp(name, TOK_NAMES[i])) return i;
  return -1;
}

typedef struct {
  char path[4096];
  int fd;
  uint8_t *map;
  size_t len;
} tok_file;

typedef struct { /* ids [first, last] live in f under id - offset */
  int64_t first, last, offset;
  tok_file f;
} segment;

struct blip_tokstore {
  char dir[4096];
  blip_tokens_fmt fmt;
  int T, Dv;
  size_t stride;
  tok_file main; /* tokens.bin */
  uint8_t *rec;  /* one record of scratch for the writer */
  segment *seg;  /* sorted by first */
  int nseg;
};

size_t blip_tokstore_payload_size(blip_tokens_fmt fmt, int T, int Dv) {
  if (fmt == BLIP_TOKENS_I8) return (size_t)T * 4 + (size_t)T * Dv;
  if (fmt == BLIP_TOKENS_F16) return (size_t)T * Dv * 2;
  if (fmt == BLIP_TOKENS_I4) return (size_t)T * ((Dv + I4_GROUP - 1) / I4_GROUP) * 2 + (size_t)T * ((Dv + 1) / 2);
  return 0;
}

/* int4: per row of Dv values, f16 scales of each group of 32, then the values
 * as nibbles q + 8 with q = round(x / scale) in [-7, 7]. The scale is rounded
 * to f16 before quantizing, so that decoding uses exactly the step encoding used. */
static void i4_encode(int T, int Dv, const float *x, uint8_t *rec) {
  int ng = (Dv + I4_GROUP - 1) / I4_GROUP, rowb = (Dv + 1) / 2;
  uint8_t *q = rec + (size_t)T * ng * 2;
  memset(q, 0, (size_t)T * rowb);
  for (int t = 0; t < T; t++)
    for (int g = 0; g < ng; g++) {
      const float *r = x + (size_t)t * Dv;
      int a = g * I4_GROUP, z = a + I4_GROUP < Dv ? a + I4_GROUP : Dv;
      float m = 0;
      for (int j = a; j < z; j++) m = fmaxf(m, fabsf(r[j]));
      uint16_t h = blip_f32_to_f16(m / 7.0f);
      float scale = blip_f16_to_f32(h), inv = scale > 0 ? 1.0f / scale : 0;
      memcpy(rec + ((size_t)t * ng + g) * 2, &h, 2);
      for (int j = a; j < z; j++) {
        long v = lrintf(r[j] * inv);
        v = v > 7 ? 7 : v < -7 ? -7 : v;
        q[(size_t)t * rowb + j / 2] |= (uint8_t)((v + 8) << (j & 1 ? 4 : 0));
      }
    }
}

static void i4_decode(int T, int Dv, const uint8_t *rec, float *x) {
  int ng = (Dv + I4_GROUP - 1) / I4_GROUP, rowb = (Dv + 1) / 2;
  const uint8_t *q = rec + (size_t)T * ng * 2;
  for (int t = 0; t < T; t++)
    for (int g = 0; g < ng; g++) {
      uint16_t h;
      memcpy(&h, rec + ((size_t)t * ng + g) * 2, 2);
      float scale = blip_f16_to_f32(h);
      int a = g * I4_GROUP, z = a + I4_GROUP < Dv ? a + I4_GROUP : Dv;
      for (int j = a; j < z; j++) {
        int v = (q[(size_t)t * rowb + j / 2] >> (j & 1 ? 4 : 0)) & 15;
        x[(size_t)t * Dv + j] = scale * (float)(v - 8);
      }
    }
}

void blip_tokstore_encode(blip_tokens_fmt fmt, int T, int Dv, const float *x, uint8_t *rec) {
  if (fmt == BLIP_TOKENS_I4) {
    i4_encode(T, Dv, x, rec);
    return;
  }
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
  if (fmt == BLIP_TOKENS_I4) {
    i4_decode(T, Dv, rec, x);
    return;
  }
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

static segment *seg_of(const blip_tokstore *ts, int64_t id) {
  int lo = 0, hi = ts->nseg - 1;
  while (lo <= hi) {
    int mid = (lo + hi) / 2;
    if (id < ts->seg[mid].first) hi = mid - 1;
    else if (id > ts->seg[mid].last) lo = mid + 1;
    else return &ts->seg[mid];
  }
  return NULL;
}

/* Compare the header of fd with the store's geometry; a writer (re)writes a
 * missing or short one (new file, or a crash cut it: nothing was committed). */
static int check_header(const blip_tokstore *ts, int fd, const char *path, int write) {
  uint8_t h[TOK_HDR] = {0}, want[TOK_HDR] = {0};
  uint32_t v[3] = {(uint32_t)ts->fmt, (uint32_t)ts->T, (uint32_t)ts->Dv};
  uint64_t stride = ts->stride;
  memcpy(want, TOK_MAGIC, 8);
  memcpy(want + 8, v, sizeof v);
  memcpy(want + 24, &stride, 8);
  ssize_t n = pread(fd, h, TOK_HDR, 0);
  if (n >= 0 && n < TOK_HDR && write) {
    if (pwrite(fd, want, TOK_HDR, 0) != TOK_HDR || fdatasync(fd) != 0) return blip_err_errno("write", path);
    return BLIP_OK;
  }
  if (n != TOK_HDR || memcmp(h, want, TOK_HDR) != 0)
    return blip_err_set(BLIP_EFORMAT, "%s: header does not match the index (format %s, T %d, Dv %d)", path,
                        TOK_NAMES[ts->fmt], ts->T, ts->Dv);
  return BLIP_OK;
}

int blip_tokstore_open(const char *dir, blip_tokens_fmt fmt, int T, int Dv, int write, blip_tokstore **out) {
  *out = NULL;
  blip_tokstore *ts = calloc(1, sizeof *ts);
  if (!ts) return blip_err_set(BLIP_ENOMEM, "out of memory");
  ts->main.fd = -1;
  ts->fmt = fmt;
  ts->T = T;
  ts->Dv = Dv;
  ts->stride = (TAG_BYTES + blip_tokstore_payload_size(fmt, T, Dv) + 63) / 64 * 64;
  snprintf(ts->dir, sizeof ts->dir, "%s", dir);
  snprintf(ts->main.path, sizeof ts->main.path, "%s/tokens.bin", dir);
  int rc = BLIP_OK;
  if (fmt == BLIP_TOKENS_NONE) goto done;
  if (write && !(ts->rec = calloc(1, ts->stride))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  ts->main.fd = open(ts->main.path, (write ? O_RDWR | O_CREAT : O_RDONLY) | O_CLOEXEC, 0644);
  if (ts->main.fd < 0) {
    rc = errno == ENOENT ? BLIP_OK : blip_err_errno("open", ts->main.path); /* reader: no store yet */
    goto done;
  }
  struct stat sb;
  if (!write && fstat(ts->main.fd, &sb) == 0 && sb.st_size < TOK_HDR) { /* a writer's first run, before its */
    close(ts->main.fd);                                                  /* first commit: no records yet */
    ts->main.fd = -1;
  } else {
    rc = check_header(ts, ts->main.fd, ts->main.path, write);
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
  for (int i = 0; i < ts->nseg; i++) {
    if (ts->seg[i].f.map) munmap(ts->seg[i].f.map, ts->seg[i].f.len);
    if (ts->seg[i].f.fd >= 0) close(ts->seg[i].f.fd);
  }
  free(ts->seg);
  if (ts->main.map) munmap(ts->main.map, ts->main.len);
  if (ts->main.fd >= 0) close(ts->main.fd);
  free(ts->rec);
  free(ts);
}

int blip_tokstore_present(const blip_tokstore *ts) { return ts && ts->main.fd >= 0; }
size_t blip_tokstore_stride(const blip_tokstore *ts) { return ts && ts->fmt ? ts->stride : 0; }

int blip_tokstore_put(blip_tokstore *ts, int64_t id, uint64_t fp, const float *tokens) {
  memcpy(ts->rec, &id, 8);
  memcpy(ts->rec + 8, &fp, 8);
  blip_tokstore_encode(ts->fmt, ts->T, ts->Dv, tokens, ts->rec + TAG_BYTES);
  for (size_t done = 0; done < ts->stride;) { /* a short write is retried: the next one says why (ENOSPC, EFBIG) */
    ssize_t w = pwrite(ts->main.fd, ts->rec + done, ts->stride - done, rec_off(ts, id) + (off_t)done);
    if (w <= 0) {
      if (w == 0) errno = ENOSPC;
      return blip_err_errno("write", ts->main.path);
    }
    done += (size_t)w;
  }
  return BLIP_OK;
}

int blip_tokstore_sync(blip_tokstore *ts) {
  return fdatasync(ts->main.fd) == 0 ? BLIP_OK : blip_err_errno("sync", ts->main.path);
}

void blip_tokstore_punch(blip_tokstore *ts, int64_t id) {
  if (ts->main.fd >= 0 && !seg_of(ts, id)) /* a segment is another index's file: never written */
    fallocate(ts->main.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, rec_off(ts, id), (off_t)ts->stride);
}

int blip_tokstore_truncate(blip_tokstore *ts, int64_t max_id) {
  struct stat sb;
  if (ts->main.fd < 0 || fstat(ts->main.fd, &sb) != 0 || sb.st_size <= rec_off(ts, max_id + 1)) return BLIP_OK;
  return ftruncate(ts->main.fd, rec_off(ts, max_id + 1)) == 0 ? BLIP_OK : blip_err_errno("truncate", ts->main.path);
}

/* Map enough of file f to read record id. */
static int tok_map(const blip_tokstore *ts, tok_file *f, int64_t id) {
  size_t need = (size_t)rec_off(ts, id) + ts->stride;
  if (f->map && f->len >= need) return BLIP_OK;
  struct stat sb;
  if (fstat(f->fd, &sb) != 0) return blip_err_errno("stat", f->path);
  if ((size_t)sb.st_size < need) return blip_err_set(BLIP_ENOTFOUND, "image %lld has no token record", (long long)id);
  if (f->map) munmap(f->map, f->len);
  f->map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_SHARED, f->fd, 0);
  if (f->map == MAP_FAILED) {
    f->map = NULL;
    f->len = 0;
    return blip_err_errno("mmap", f->path);
  }
  f->len = (size_t)sb.st_size;
  return BLIP_OK;
}

int blip_tokstore_add_segment(blip_tokstore *ts, int64_t first, int64_t last, int64_t offset, const char *file) {
  if (first > last || offset < 0 || first - offset < 1 || strchr(file, '/') ||
      (ts->nseg && first <= ts->seg[ts->nseg - 1].last))
    return blip_err_set(BLIP_EFORMAT, "token segment %s [%lld, %lld] is malformed or out of order", file,
                        (long long)first, (long long)last);
  segment *v = realloc(ts->seg, (size_t)(ts->nseg + 1) * sizeof *v);
  if (!v) return blip_err_set(BLIP_ENOMEM, "out of memory");
  ts->seg = v;
  segment *g = &v[ts->nseg];
  memset(g, 0, sizeof *g);
  g->first = first, g->last = last, g->offset = offset;
  snprintf(g->f.path, sizeof g->f.path, "%s/%s", ts->dir, file);
  g->f.fd = ts->fmt == BLIP_TOKENS_NONE ? -1 : open(g->f.path, O_RDONLY | O_CLOEXEC);
  ts->nseg++;
  /* a missing or foreign segment only loses its records (queries recompute them), never the index */
  if (g->f.fd >= 0 && check_header(ts, g->f.fd, g->f.path, 0) != BLIP_OK) {
    close(g->f.fd);
    g->f.fd = -1;
  }
  return BLIP_OK;
}

int blip_tokstore_get(blip_tokstore *ts, int64_t id, uint64_t fp, float *out) {
  segment *g = seg_of(ts, id);
  tok_file *f = g ? &g->f : &ts->main;
  int64_t rid_want = g ? id - g->offset : id;
  if (f->fd < 0) return blip_err_set(BLIP_ENOTFOUND, "%s is missing", f->path);
  int rc = tok_map(ts, f, rid_want);
  if (rc) return rc;
  const uint8_t *rec = f->map + rec_off(ts, rid_want);
  int64_t rid;
  uint64_t rfp;
  memcpy(&rid, rec, 8);
  memcpy(&rfp, rec + 8, 8);
  if (rid != rid_want || rfp != fp)
    return blip_err_set(BLIP_EFORMAT, "%s: record %lld does not belong to its image", f->path, (long long)rid_want);
  blip_tokstore_decode(ts->fmt, ts->T, ts->Dv, rec + TAG_BYTES, out);
  return BLIP_OK;
}
