/* blip_st: safetensors reader/writer; see blip_st.h for the invariants.
 * The JSON header is parsed with jansson; everything numeric from it is
 * range-checked before use, since files come from the network. */
#include "blip_st.h"
#include "blip_err.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_HEADER (100u << 20) /* upstream's limit is 100 MB too */

struct blip_st {
  void *map;        /* mmap base, or NULL when parsing a caller buffer */
  size_t map_len;
  blip_st_tensor *t;
  int n;
  char **meta_kv;   /* key0, val0, key1, val1, ... */
  int n_meta;
  void *owned;      /* a buffer freed at close (blip_st_parse_owned) */
};

static const struct { const char *name; blip_dtype dt; size_t size; } k_dtypes[] = {
  {"F32", BLIP_DT_F32, 4}, {"F16", BLIP_DT_F16, 2}, {"BF16", BLIP_DT_BF16, 2},
  {"F64", BLIP_DT_F64, 8}, {"I64", BLIP_DT_I64, 8}, {"I32", BLIP_DT_I32, 4},
  {"I16", BLIP_DT_I16, 2}, {"I8", BLIP_DT_I8, 1},   {"U8", BLIP_DT_U8, 1},
  {"BOOL", BLIP_DT_BOOL, 1},
};
#define N_DTYPES (sizeof k_dtypes / sizeof k_dtypes[0])

size_t blip_dtype_size(blip_dtype dt) {
  for (size_t i = 0; i < N_DTYPES; i++)
    if (k_dtypes[i].dt == dt) return k_dtypes[i].size;
  return 0;
}

const char *blip_dtype_name(blip_dtype dt) {
  for (size_t i = 0; i < N_DTYPES; i++)
    if (k_dtypes[i].dt == dt) return k_dtypes[i].name;
  return "?";
}

float blip_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: normalize */
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      man &= 0x3ff;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

float blip_bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* f32 -> IEEE half, round to nearest even (inf/NaN kept, overflow -> inf). */
uint16_t blip_f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
  if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));
  if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* >= 65520 rounds to inf */
  if (ax < 0x38800000) {                                   /* below 2^-14: subnormal, exact scale by 2^24 */
    float a;
    memcpy(&a, &ax, 4);
    return (uint16_t)(sign | (uint32_t)lrintf(a * 16777216.0f));
  }
  uint32_t r = ax - 0x38000000; /* rebias 127 -> 15 */
  r += 0xfff + ((r >> 13) & 1);
  return (uint16_t)(sign | (r >> 13));
}

uint16_t blip_f32_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
  bits += 0x7fffu + ((bits >> 16) & 1);
  return (uint16_t)(bits >> 16);
}

void blip_st_close(blip_st *st) {
  if (!st) return;
  for (int i = 0; i < st->n; i++) free((char *)st->t[i].name);
  for (int i = 0; i < 2 * st->n_meta; i++) free(st->meta_kv[i]);
  free(st->meta_kv);
  free(st->t);
  if (st->map) munmap(st->map, st->map_len);
  free(st->owned);
  free(st);
}

static int cmp_by_data(const void *a, const void *b) {
  const blip_st_tensor *x = a, *y = b;
  uintptr_t p = (uintptr_t)x->data, q = (uintptr_t)y->data;
  return p < q ? -1 : p > q;
}

static int parse_tensor(blip_st_tensor *t, const char *name, json_t *v, const uint8_t *data, size_t data_len) {
  if (!json_is_object(v)) return blip_err_set(BLIP_EFORMAT, "safetensors: entry '%s' is not an object", name);
  json_t *jdt = json_object_get(v, "dtype"), *jsh = json_object_get(v, "shape"), *jof = json_object_get(v, "data_offsets");
  if (!json_is_string(jdt) || !json_is_array(jsh) || !json_is_array(jof) || json_array_size(jof) != 2)
    return blip_err_set(BLIP_EFORMAT, "safetensors: entry '%s' lacks dtype/shape/data_offsets", name);
  size_t i;
  for (i = 0; i < N_DTYPES; i++)
    if (!strcmp(json_string_value(jdt), k_dtypes[i].name)) break;
  if (i == N_DTYPES)
    return blip_err_set(BLIP_EFORMAT, "safetensors: tensor '%s' has unsupported dtype '%s'", name, json_string_value(jdt));
  t->dtype = k_dtypes[i].dt;
  size_t ndim = json_array_size(jsh);
  if (ndim > BLIP_ST_MAXDIM) return blip_err_set(BLIP_EFORMAT, "safetensors: tensor '%s' has %zu dims", name, ndim);
  t->ndim = (int)ndim;
  uint64_t numel = 1;
  for (size_t d = 0; d < ndim; d++) {
    json_t *e = json_array_get(jsh, d);
    if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) > (INT64_C(1) << 40))
      return blip_err_set(BLIP_EFORMAT, "safetensors: tensor '%s' has a bad dimension", name);
    t->shape[d] = json_integer_value(e);
    if (t->shape[d] && numel > (UINT64_C(1) << 48) / (uint64_t)t->shape[d])
      return blip_err_set(BLIP_EFORMAT, "safetensors: tensor '%s' is impossibly large", name);
    numel *= (uint64_t)t->shape[d];
  }
  json_t *jb = json_array_get(jof, 0), *je = json_array_get(jof, 1);
  if (!json_is_integer(jb) || !json_is_integer(je) || json_integer_value(jb) < 0 || json_integer_value(je) < json_integer_value(jb))
    return blip_err_set(BLIP_EFORMAT, "safetensors: tensor '%s' has bad data_offsets", name);
  uint64_t b = (uint64_t)json_integer_value(jb), e = (uint64_t)json_integer_value(je);
  if (e > data_len)
    return blip_err_set(BLIP_EFORMAT, "safetensors: tensor '%s' ends at byte %llu past the data region (%zu bytes): file truncated?",
                        name, (unsigned long long)e, data_len);
  if (e - b != numel * k_dtypes[i].size)
    return blip_err_set(BLIP_EFORMAT, "safetensors: tensor '%s' holds %llu bytes but %s shape needs %llu", name,
                        (unsigned long long)(e - b), k_dtypes[i].name, (unsigned long long)(numel * k_dtypes[i].size));
  t->numel = (int64_t)numel;
  t->nbytes = (size_t)(e - b);
  t->data = data + b;
  return BLIP_OK;
}

static int parse(const uint8_t *buf, size_t len, blip_st *st) {
  if (len < 8) return blip_err_set(BLIP_EFORMAT, "safetensors: file is %zu bytes, shorter than the 8-byte header length", len);
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | buf[i];
  if (n > MAX_HEADER) return blip_err_set(BLIP_EFORMAT, "safetensors: header length %llu is implausible", (unsigned long long)n);
  if (n > len - 8)
    return blip_err_set(BLIP_EFORMAT, "safetensors: header length %llu runs past the end of the file (%zu bytes)",
                        (unsigned long long)n, len);
  json_error_t jerr;
  json_t *root = json_loadb((const char *)buf + 8, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
  if (!root) return blip_err_set(BLIP_EFORMAT, "safetensors: header JSON: %s (line %d)", jerr.text, jerr.line);
  int rc = BLIP_OK;
  if (!json_is_object(root)) {
    rc = blip_err_set(BLIP_EFORMAT, "safetensors: header is not a JSON object");
    goto done;
  }
  size_t cap = json_object_size(root);
  st->t = calloc(cap ? cap : 1, sizeof *st->t);
  if (!st->t) { rc = blip_err_set(BLIP_ENOMEM, "safetensors: out of memory"); goto done; }
  const uint8_t *data = buf + 8 + n;
  size_t data_len = len - 8 - (size_t)n;
  const char *key;
  json_t *v;
  json_object_foreach(root, key, v) {
    if (!strcmp(key, "__metadata__")) {
      if (!json_is_object(v)) { rc = blip_err_set(BLIP_EFORMAT, "safetensors: __metadata__ is not an object"); goto done; }
      size_t m = json_object_size(v);
      st->meta_kv = calloc(2 * m + 1, sizeof(char *));
      if (!st->meta_kv) { rc = blip_err_set(BLIP_ENOMEM, "safetensors: out of memory"); goto done; }
      const char *mk;
      json_t *mv;
      json_object_foreach(v, mk, mv) {
        if (!json_is_string(mv)) continue; /* the format says str->str; tolerate others by skipping */
        char *ks = strdup(mk), *vs = strdup(json_string_value(mv));
        st->meta_kv[2 * st->n_meta] = ks;
        st->meta_kv[2 * st->n_meta + 1] = vs;
        st->n_meta++;
        if (!ks || !vs) { rc = blip_err_set(BLIP_ENOMEM, "safetensors: out of memory"); goto done; }
      }
      continue;
    }
    blip_st_tensor *t = &st->t[st->n];
    if ((rc = parse_tensor(t, key, v, data, data_len)) != BLIP_OK) goto done;
    if (!(t->name = strdup(key))) { rc = blip_err_set(BLIP_ENOMEM, "safetensors: out of memory"); goto done; }
    st->n++;
  }
  /* Overlap check: sort a copy by start address. */
  if (st->n > 1) {
    blip_st_tensor *s = malloc((size_t)st->n * sizeof *s);
    if (!s) { rc = blip_err_set(BLIP_ENOMEM, "safetensors: out of memory"); goto done; }
    memcpy(s, st->t, (size_t)st->n * sizeof *s);
    qsort(s, (size_t)st->n, sizeof *s, cmp_by_data);
    for (int i = 1; i < st->n; i++) {
      const uint8_t *prev_end = (const uint8_t *)s[i - 1].data + s[i - 1].nbytes;
      if ((const uint8_t *)s[i].data < prev_end && s[i].nbytes && s[i - 1].nbytes) {
        rc = blip_err_set(BLIP_EFORMAT, "safetensors: tensors '%s' and '%s' overlap", s[i - 1].name, s[i].name);
        break;
      }
    }
    free(s);
  }
done:
  json_decref(root);
  return rc;
}

int blip_st_parse(const void *buf, size_t len, blip_st **out) {
  *out = NULL;
  blip_st *st = calloc(1, sizeof *st);
  if (!st) return blip_err_set(BLIP_ENOMEM, "safetensors: out of memory");
  int rc = parse(buf, len, st);
  if (rc) { blip_st_close(st); return rc; }
  *out = st;
  return BLIP_OK;
}

int blip_st_parse_owned(void *buf, size_t len, blip_st **out) {
  int rc = blip_st_parse(buf, len, out);
  if (rc) free(buf);
  else (*out)->owned = buf;
  return rc;
}

int blip_st_open(const char *path, blip_st **out) {
  *out = NULL;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return blip_err_set(errno == ENOENT ? BLIP_EMISSING : BLIP_EIO, "%s: %s", path, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    close(fd);
    return blip_err_set(BLIP_EIO, "%s: not a regular file", path);
  }
  size_t len = (size_t)sb.st_size;
  void *map = len ? mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
  close(fd);
  if (len && map == MAP_FAILED) return blip_err_set(BLIP_EIO, "%s: mmap: %s", path, strerror(errno));
  blip_st *st = calloc(1, sizeof *st);
  if (!st) {
    if (map) munmap(map, len);
    return blip_err_set(BLIP_ENOMEM, "safetensors: out of memory");
  }
  st->map = map;
  st->map_len = len;
  int rc = parse(map, len, st);
  if (rc) {
    blip_st_close(st);
    return blip_err_wrap(rc, "%s", path);
  }
  *out = st;
  return BLIP_OK;
}

int blip_st_count(const blip_st *st) { return st->n; }
const blip_st_tensor *blip_st_at(const blip_st *st, int i) { return i >= 0 && i < st->n ? &st->t[i] : NULL; }

const blip_st_tensor *blip_st_find(const blip_st *st, const char *name) {
  for (int i = 0; i < st->n; i++)
    if (!strcmp(st->t[i].name, name)) return &st->t[i];
  return NULL;
}

const char *blip_st_meta(const blip_st *st, const char *key) {
  for (int i = 0; i < st->n_meta; i++)
    if (!strcmp(st->meta_kv[2 * i], key)) return st->meta_kv[2 * i + 1];
  return NULL;
}

int blip_st_to_f32(const blip_st_tensor *t, float *out, int64_t n) {
  if (n > t->numel) return blip_err_set(BLIP_EINVAL, "safetensors: asked %lld values of '%s' (%lld)", (long long)n, t->name, (long long)t->numel);
  const uint8_t *p = t->data;
  switch (t->dtype) {
  case BLIP_DT_F32: memcpy(out, p, (size_t)n * 4); break;
  case BLIP_DT_F16:
    for (int64_t i = 0; i < n; i++) { uint16_t h; memcpy(&h, p + 2 * i, 2); out[i] = blip_f16_to_f32(h); }
    break;
  case BLIP_DT_BF16:
    for (int64_t i = 0; i < n; i++) { uint16_t h; memcpy(&h, p + 2 * i, 2); out[i] = blip_bf16_to_f32(h); }
    break;
  case BLIP_DT_F64:
    for (int64_t i = 0; i < n; i++) { double d; memcpy(&d, p + 8 * i, 8); out[i] = (float)d; }
    break;
  default:
    return blip_err_set(BLIP_ESHAPE, "tensor '%s' has dtype %s, expected a float type", t->name, blip_dtype_name(t->dtype));
  }
  return BLIP_OK;
}

static void fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
  size_t o = (size_t)snprintf(buf, cap, "[");
  for (int i = 0; i < ndim && o < cap; i++) o += (size_t)snprintf(buf + o, cap - o, "%s%lld", i ? "," : "", (long long)shape[i]);
  if (o < cap) snprintf(buf + o, cap - o, "]");
}

int blip_st_load_f32(const blip_st *st, const char *name, int ndim, const int64_t *shape, float **out) {
  *out = NULL;
  const blip_st_tensor *t = blip_st_find(st, name);
  if (!t) return blip_err_set(BLIP_EMISSING, "missing tensor '%s'", name);
  int same = t->ndim == ndim;
  for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
  if (!same) {
    char want[128], got[128];
    fmt_shape(want, sizeof want, ndim, shape);
    fmt_shape(got, sizeof got, t->ndim, t->shape);
    return blip_err_set(BLIP_ESHAPE, "tensor '%s' has shape %s, the config implies %s", name, got, want);
  }
  float *buf = malloc(t->numel ? (size_t)t->numel * sizeof(float) : 1);
  if (!buf) return blip_err_set(BLIP_ENOMEM, "out of memory loading '%s'", name);
  int rc = blip_st_to_f32(t, buf, t->numel);
  if (rc) { free(buf); return rc; }
  *out = buf;
  return BLIP_OK;
}

/* ---- writer ---- */

typedef struct {
  char *name;
  blip_dtype dt;
  int ndim;
  int64_t shape[BLIP_ST_MAXDIM];
  size_t nbytes;
  const void *data;
} wentry;

struct blip_st_writer {
  wentry *e;
  int n, cap;
  json_t *meta;
};

int blip_st_writer_new(blip_st_writer **out) {
  blip_st_writer *w = calloc(1, sizeof *w);
  if (!w || !(w->meta = json_object())) {
    free(w);
    return blip_err_set(BLIP_ENOMEM, "out of memory");
  }
  *out = w;
  return BLIP_OK;
}

void blip_st_writer_free(blip_st_writer *w) {
  if (!w) return;
  for (int i = 0; i < w->n; i++) free(w->e[i].name);
  free(w->e);
  json_decref(w->meta);
  free(w);
}

int blip_st_writer_add(blip_st_writer *w, const char *name, blip_dtype dt, int ndim, const int64_t *shape, const void *data) {
  if (ndim < 0 || ndim > BLIP_ST_MAXDIM) return blip_err_set(BLIP_EINVAL, "safetensors writer: bad ndim %d", ndim);
  if (w->n == w->cap) {
    int nc = w->cap ? 2 * w->cap : 16;
    wentry *ne = realloc(w->e, (size_t)nc * sizeof *ne);
    if (!ne) return blip_err_set(BLIP_ENOMEM, "out of memory");
    w->e = ne;
    w->cap = nc;
  }
  wentry *e = &w->e[w->n];
  if (!(e->name = strdup(name))) return blip_err_set(BLIP_ENOMEM, "out of memory");
  e->dt = dt;
  e->ndim = ndim;
  size_t numel = 1;
  for (int i = 0; i < ndim; i++) { e->shape[i] = shape[i]; numel *= (size_t)shape[i]; }
  e->nbytes = numel * blip_dtype_size(dt);
  e->data = data;
  w->n++;
  return BLIP_OK;
}

int blip_st_writer_meta(blip_st_writer *w, const char *key, const char *value) {
  if (json_object_set_new(w->meta, key, json_string(value)))
    return blip_err_set(BLIP_EINVAL, "safetensors writer: bad metadata '%s'", key);
  return BLIP_OK;
}

static int write_all(int fd, const void *p, size_t n, const char *path) {
  const uint8_t *b = p;
  while (n) {
    ssize_t k = write(fd, b, n > (1u << 30) ? (1u << 30) : n);
    if (k < 0) {
      if (errno == EINTR) continue;
      return blip_err_set(errno == ENOSPC || errno == EDQUOT ? BLIP_EFULL : BLIP_EIO, "%s: write: %s", path, strerror(errno));
    }
    b += k;
    n -= (size_t)k;
  }
  return BLIP_OK;
}

int blip_st_writer_save(blip_st_writer *w, const char *path) {
  json_t *root = json_object();
  if (!root) return blip_err_set(BLIP_ENOMEM, "out of memory");
  size_t off = 0;
  int rc = BLIP_OK;
  if (json_object_size(w->meta)) json_object_set(root, "__metadata__", w->meta);
  for (int i = 0; i < w->n; i++) {
    json_t *shape = json_array();
    for (int d = 0; d < w->e[i].ndim; d++) json_array_append_new(shape, json_integer(w->e[i].shape[d]));
    json_t *ent = json_pack("{s:s, s:o, s:[I,I]}", "dtype", blip_dtype_name(w->e[i].dt), "shape", shape,
                            "data_offsets", (json_int_t)off, (json_int_t)(off + w->e[i].nbytes));
    if (!ent || json_object_set_new(root, w->e[i].name, ent)) {
      json_decref(root);
      return blip_err_set(BLIP_ENOMEM, "out of memory");
    }
    off += w->e[i].nbytes;
  }
  char *hdr = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
  json_decref(root);
  if (!hdr) return blip_err_set(BLIP_ENOMEM, "out of memory");
  size_t hl = strlen(hdr), padded = (hl + 7) & ~(size_t)7;
  char tmp[4096];
  char host[64] = "";
  gethostname(host, sizeof host - 1); /* writers on several machines may share the folder */
  snprintf(tmp, sizeof tmp, "%s.tmp.%s.%d", path, host, (int)getpid());
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    free(hdr);
    return blip_err_set(BLIP_EIO, "%s: %s", tmp, strerror(errno));
  }
  uint8_t len8[8];
  for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
  static const char spaces[8] = "        ";
  if (!(rc = write_all(fd, len8, 8, tmp)) && !(rc = write_all(fd, hdr, hl, tmp)) &&
      !(rc = write_all(fd, spaces, padded - hl, tmp))) {
    for (int i = 0; i < w->n && !rc; i++) rc = write_all(fd, w->e[i].data, w->e[i].nbytes, tmp);
  }
  free(hdr);
  if (!rc && fsync(fd) != 0) rc = blip_err_set(errno == ENOSPC ? BLIP_EFULL : BLIP_EIO, "%s: fsync: %s", tmp, strerror(errno));
  if (close(fd) != 0 && !rc) rc = blip_err_set(BLIP_EIO, "%s: close: %s", tmp, strerror(errno));
  if (!rc && rename(tmp, path) != 0) rc = blip_err_set(BLIP_EIO, "%s: rename: %s", path, strerror(errno));
  if (rc) unlink(tmp);
  return rc;
}
