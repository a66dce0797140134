/* pngbytes.h: the two byte-level helpers tests need to forge PNG chunks
 * (big-endian u32, the chunk CRC), shared by test_img_robust and
 * test_img_hostile. */
#ifndef BLIP_PNGBYTES_H
#define BLIP_PNGBYTES_H

#include <stddef.h>
#include <stdint.h>

static inline uint32_t crc32_png(const uint8_t *p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
  }
  return ~c;
}

static inline void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24, p[1] = v >> 16, p[2] = v >> 8, p[3] = v; }

#endif
