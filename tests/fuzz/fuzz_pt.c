/* fuzz_pt: libFuzzer harness for the PyTorch checkpoint reader (zip +
 * restricted unpickler). Any input must either be rejected with an error
 * message or yield a tensor set whose tensors are read end to end (ASan
 * catches any out-of-bounds access or leak). Seeds: tests/fuzz/corpus_pt/
 * (small torch.save-format zips: views, shared storages, parameters). */
#include "blip_err.h"
#include "blip_pt.h"
#include "blip_st.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  uint8_t *buf = malloc(size ? size : 1); /* reads past `size` become heap overflows ASan sees */
  memcpy(buf, data, size);
  blip_st *st = NULL;
  if (blip_pt_parse(buf, size, &st) != BLIP_OK) {
    if (!blip_err_last()[0]) abort();
    free(buf);
    return 0;
  }
  float tmp[64];
  for (int i = 0; i < blip_st_count(st); i++) {
    const blip_st_tensor *t = blip_st_at(st, i);
    if ((size_t)t->numel * blip_dtype_size(t->dtype) != t->nbytes) abort();
    volatile uint8_t acc = 0;
    for (size_t b = 0; b < t->nbytes; b++) acc ^= ((const uint8_t *)t->data)[b];
    (void)acc;
    (void)blip_st_to_f32(t, tmp, t->numel < 64 ? t->numel : 64);
    if (!blip_st_find(st, t->name)) abort();
  }
  blip_st_close(st);
  free(buf);
  return 0;
}
