/* fuzz_sniff: libFuzzer harness for the format gate in front of libvips:
 * blip_img_sniff (magic bytes) and blip_img_png_check (PNG chunk walk).
 * Besides "no crash, no sanitizer report" it checks: a buffer the chunk
 * walk accepts is a PNG by its magic; no proper prefix of an accepted
 * buffer that ends inside its IEND chunk is accepted (every declared length
 * is checked against the bytes held); the answers do not depend on bytes
 * past the end (the input is copied to an exact-size heap block, so ASan
 * sees any over-read). Seeds: tests/fuzz/corpus_sniff/. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blip_err.h"
#include "blip_img.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Where the IEND chunk of an accepted PNG ends: an independent walk. */
static size_t iend_end(const uint8_t *p, size_t n) {
  size_t off = 8;
  while (off + 12 <= n) {
    size_t len = (size_t)p[off] << 24 | (size_t)p[off + 1] << 16 | (size_t)p[off + 2] << 8 | p[off + 3];
    if (!memcmp(p + off + 4, "IEND", 4)) return off + 12 + len;
    off += 12 + len;
  }
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  uint8_t *buf = malloc(size ? size : 1);
  if (!buf) return 0;
  memcpy(buf, data, size);
  const char *name = NULL;
  blip_img_format f = blip_img_sniff(buf, size, &name);
  if (f != BLIP_IMG_UNKNOWN && !name) abort();
  if (blip_img_png_check(buf, size, "fuzz") == BLIP_OK) {
    if (f != BLIP_IMG_PNG) abort();
    size_t end = iend_end(buf, size);
    if (end == 0 || end > size) abort();
    if (end > 12 && blip_img_png_check(buf, end - 1, "fuzz") == BLIP_OK) abort();
  }
  free(buf);
  return 0;
}
