/* golden.h: typed access to the upstream golden tensors (safetensors) for
 * the parity tests. A missing tensor or a wrong dtype/size is a broken
 * fixture, not a test failure: exit 2. */
#ifndef BLIP_GOLDEN_H
#define BLIP_GOLDEN_H

#include "blip_st.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline const blip_st_tensor *golden_get(const blip_st *g, const char *name, blip_dtype dt, int64_t numel) {
  const blip_st_tensor *t = blip_st_find(g, name);
  if (!t || t->dtype != dt || t->numel != numel) {
    fprintf(stderr, "golden tensor %s missing or wrong\n", name);
    exit(2);
  }
  return t;
}

static inline const float *golden_f32(const blip_st *g, const char *name, int64_t numel) {
  return golden_get(g, name, BLIP_DT_F32, numel)->data;
}

/* I64 token ids -> int32 */
static inline void golden_ids(const blip_st *g, const char *name, int32_t *out, int64_t numel) {
  const uint8_t *p = golden_get(g, name, BLIP_DT_I64, numel)->data;
  for (int64_t i = 0; i < numel; i++) {
    int64_t v;
    memcpy(&v, p + 8 * i, 8);
    out[i] = (int32_t)v;
  }
}

#endif
