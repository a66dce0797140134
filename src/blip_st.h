/* blip_st: safetensors reader (mmap, zero-copy) and writer.
 *
 * Format: u64 little-endian header length N, N bytes of JSON
 * {name: {dtype, shape, data_offsets:[begin,end]}, "__metadata__": {...}},
 * then the data region. Offsets are relative to the data region.
 * Invariants enforced by the parser (any violation = BLIP_EFORMAT, never a
 * crash): N fits the file; the JSON is an object; every tensor has a known
 * dtype, a shape of at most BLIP_ST_MAXDIM non-negative dims whose product
 * times the dtype size equals end-begin without overflow; begin<=end<=data
 * size; no two tensors overlap. */
#ifndef BLIP_ST_H
#define BLIP_ST_H

#include <stddef.h>
#include <stdint.h>

#define BLIP_ST_MAXDIM 8

typedef enum {
  BLIP_DT_F32, BLIP_DT_F16, BLIP_DT_BF16, BLIP_DT_F64,
  BLIP_DT_I64, BLIP_DT_I32, BLIP_DT_I16, BLIP_DT_I8, BLIP_DT_U8, BLIP_DT_BOOL,
} blip_dtype;

typedef struct {
  const char *name;
  blip_dtype dtype;
  int ndim;
  int64_t shape[BLIP_ST_MAXDIM];
  int64_t numel;
  size_t nbytes;
  const void *data; /* points into the mapping; not necessarily aligned */
} blip_st_tensor;

typedef struct blip_st blip_st;

/* Map and parse a file. */
int blip_st_open(const char *path, blip_st **out);
/* Parse a caller-owned buffer (kept by reference; used by fuzzers and tests). */
int blip_st_parse(const void *buf, size_t len, blip_st **out);
/* The same, taking ownership of a malloc'd buffer (freed at close, or now on failure). */
int blip_st_parse_owned(void *buf, size_t len, blip_st **out);
void blip_st_close(blip_st *st);

int blip_st_count(const blip_st *st);
const blip_st_tensor *blip_st_at(const blip_st *st, int i);
const blip_st_tensor *blip_st_find(const blip_st *st, const char *name);
/* "__metadata__" value for key, or NULL. */
const char *blip_st_meta(const blip_st *st, const char *key);

size_t blip_dtype_size(blip_dtype dt);
const char *blip_dtype_name(blip_dtype dt);

/* Convert n elements of a float tensor (F32/F16/BF16/F64) to f32. */
int blip_st_to_f32(const blip_st_tensor *t, float *out, int64_t n);
/* Find name, check dtype is float and the shape equals shape[0..ndim),
 * return a newly malloc'd f32 copy. Errors name the tensor. */
int blip_st_load_f32(const blip_st *st, const char *name, int ndim, const int64_t *shape, float **out);

/* Writer: collects tensors (by reference) and writes them atomically
 * (temp file + fsync + rename). */
typedef struct blip_st_writer blip_st_writer;
int blip_st_writer_new(blip_st_writer **out);
int blip_st_writer_add(blip_st_writer *w, const char *name, blip_dtype dt, int ndim,
                       const int64_t *shape, const void *data);
int blip_st_writer_meta(blip_st_writer *w, const char *key, const char *value);
int blip_st_writer_save(blip_st_writer *w, const char *path);
void blip_st_writer_free(blip_st_writer *w);

/* Half-precision helpers shared with the kernels. */
float blip_f16_to_f32(uint16_t h);
float blip_bf16_to_f32(uint16_t h);
uint16_t blip_f32_to_bf16(float f); /* round to nearest even */
uint16_t blip_f32_to_f16(float f);  /* round to nearest even, overflow -> inf */

#endif
