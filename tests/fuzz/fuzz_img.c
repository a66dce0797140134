/* fuzz_img: libFuzzer harness for the whole decode+preprocess path
 * (sniffing, every libvips loader reachable from a buffer, colour conversion,
 * orientation, PIL resize, normalization). Output is 32x32 to keep runs fast;
 * the pixel guard keeps decompression bombs from exhausting the fuzzer's RSS.
 * A finding is any crash, sanitizer report, leak or a success whose tensor
 * leaves the normalized range. Seed corpus: tests/fuzz/corpus_img/. */
#include <stdint.h>
#include <stdlib.h>

#include "blip_img.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int ready;
  if (!ready) {
    if (blip_img_init()) abort();
    ready = 1;
  }
  blip_img_opts o;
  blip_img_opts_default(&o);
  o.size = 32;
  o.max_pixels = 4000000;
  o.time_budget_s = 5;
  /* the low bits of the length pick the shrink-on-load path, autorotation
   * and reference mode, so every variant sees the whole corpus */
  o.reference = (size >> 2) & 1;
  o.shrink_on_load = (size & 1) && !o.reference; /* reference mode refuses it */
  o.autorotate = (size >> 1) & 1;
  float out[3 * 32 * 32];
  uint8_t rgb[3 * 32 * 32];
  blip_img_meta meta;
  if (blip_img_load_buffer(data, size, &o, out, rgb, &meta) == 0) {
    for (int i = 0; i < 3 * 32 * 32; i++)
      if (!(out[i] >= -1.8f && out[i] <= 2.2f)) abort();
    if (meta.orientation < 1 || meta.orientation > 8) abort();
  }
  return 0;
}
