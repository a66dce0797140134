/* fuzz_tensors.h: the checks fuzz_st and fuzz_pt run on every tensor a
 * parser accepted: bytes = numel x dtype size, every byte readable (ASan
 * sees a read out of bounds), conversion to f32, lookup by name. buf/size:
 * the input, which the tensors must lie inside (NULL: they may not, as a
 * checkpoint's storages are copied out of its zip). */
#ifndef FUZZ_TENSORS_H
#define FUZZ_TENSORS_H

#include <stdint.h>
#include <stdlib.h>

#include "blip_st.h"

static void fuzz_walk_tensors(const blip_st *st, const uint8_t *buf, size_t size) {
  float tmp[64];
  for (int i = 0; i < blip_st_count(st); i++) {
    const blip_st_tensor *t = blip_st_at(st, i);
    const uint8_t *p = t->data;
    if (buf && (p < buf || p + t->nbytes > buf + size)) abort();
    if ((size_t)t->numel * blip_dtype_size(t->dtype) != t->nbytes) abort();
    volatile uint8_t acc = 0;
    for (size_t b = 0; b < t->nbytes; b++) acc ^= p[b];
    (void)acc;
    (void)blip_st_to_f32(t, tmp, t->numel < 64 ? t->numel : 64);
    if (!blip_st_find(st, t->name)) abort();
  }
}

#endif
