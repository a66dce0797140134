/* fuzz_st: libFuzzer harness for the safetensors header parser. Any input
 * must either be rejected with an error message or yield tensors whose
 * byte ranges lie inside the buffer, do not overlap, and match
 * shape x dtype; every tensor is then read end to end (ASan catches any
 * out-of-bounds access). Seeds: tests/fuzz/corpus_st/. */
#include "blip_err.h"
#include "blip_st.h"
#include "fuzz_tensors.h"

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
  fuzz_walk_tensors(st, buf, size);
  (void)blip_st_meta(st, "format");
  blip_st_close(st);
  free(buf);
  return 0;
}
