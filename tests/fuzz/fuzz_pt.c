/* fuzz_pt: libFuzzer harness for the PyTorch checkpoint reader (zip +
 * restricted unpickler). Any input must either be rejected with an error
 * message or yield a tensor set whose tensors are read end to end (ASan
 * catches any out-of-bounds access or leak). Seeds: tests/fuzz/corpus_pt/
 * (small torch.save-format zips: views, shared storages, parameters). */
#include "blip_err.h"
#include "blip_pt.h"
#include "blip_st.h"
#include "fuzz_tensors.h"

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
  fuzz_walk_tensors(st, NULL, 0);
  blip_st_close(st);
  free(buf);
  return 0;
}
