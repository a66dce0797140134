/* gen_photos: write N deterministic photo-like images (smooth colour fields,
 * a few discs, sensor noise) for benchmarks and the indexer's tests, since
 * the vips CLI is not installed everywhere.
 * Usage: gen_photos DIR N [--size WxH] [--seed S] [--ext jpg|png|webp] [--start I]
 * Files are DIR/img%05d.EXT, numbered from --start (default 0); image i with
 * seed S is always the same picture. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <vips/vips.h>

#include "blip_arg.h"

static uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static void render(uint8_t *px, int w, int h, uint64_t key) {
  double c[3][3], disc[4][6];
  uint64_t s = key;
  for (int k = 0; k < 3; k++)
    for (int j = 0; j < 3; j++) c[k][j] = (mix(s += 0x9e3779b97f4a7c15ull) >> 11) * (1.0 / 9007199254740992.0);
  for (int d = 0; d < 4; d++)
    for (int j = 0; j < 6; j++) disc[d][j] = (mix(s += 0x9e3779b97f4a7c15ull) >> 11) * (1.0 / 9007199254740992.0);
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++) {
      double u = (double)x / w, v = (double)y / h;
      for (int k = 0; k < 3; k++) {
        double val = 255 * (c[0][k] * (1 - u) + c[1][k] * u) * (0.6 + 0.4 * c[2][k] * sin(6 * v + 3 * c[2][k]));
        for (int d = 0; d < 4; d++) {
          double dx = u - disc[d][0], dy = v - disc[d][1], r = 0.05 + 0.2 * disc[d][2];
          if (dx * dx + dy * dy < r * r) val = 255 * disc[d][3 + k];
        }
        val += ((int)(mix(key ^ (((uint64_t)y * w + x) * 3 + k)) & 15) - 8); /* noise */
        px[((size_t)y * w + x) * 3 + k] = (uint8_t)(val < 0 ? 0 : val > 255 ? 255 : val);
      }
    }
}

int main(int argc, char **argv) {
  int help = argc > 1 && strcmp(argv[1], "--help") == 0;
  if (argc < 3 || help) {
    fprintf(help ? stdout : stderr, "usage: gen_photos DIR N [--size WxH] [--seed S] [--ext jpg|png|webp] [--start I]\n"
                                    "Writes N deterministic photo-like test images into DIR (libvips).\n");
    return help ? 0 : 2;
  }
  const char *dir = argv[1], *ext = "jpg";
  int n = (int)blip_arg_must("gen_photos", "N", argv[2], 0, 10000000), w = 640, h = 480, start = 0;
  uint64_t seed = 1;
  for (int i = 3; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--size") == 0 && sscanf(argv[i + 1], "%dx%d", &w, &h) == 2) continue;
    if (strcmp(argv[i], "--seed") == 0) seed = (uint64_t)blip_arg_must("gen_photos", "--seed", argv[i + 1], 0, INT64_MAX);
    else if (strcmp(argv[i], "--ext") == 0) ext = argv[i + 1];
    else if (strcmp(argv[i], "--start") == 0) start = (int)blip_arg_must("gen_photos", "--start", argv[i + 1], 0, 99999999);
    else {
      fprintf(stderr, "gen_photos: bad option %s\n", argv[i]);
      return 2;
    }
  }
  if (w <= 0 || h <= 0 || w > 20000 || h > 20000 || n < 0) {
    fprintf(stderr, "gen_photos: bad size or count\n");
    return 2;
  }
  if (VIPS_INIT(argv[0])) vips_error_exit(NULL);
  mkdir(dir, 0755);
  uint8_t *px = malloc((size_t)w * h * 3);
  if (!px) return 1;
  int rc = 0;
  for (int i = start; i < start + n && !rc; i++) {
    char path[4096];
    snprintf(path, sizeof path, "%s/img%05d.%s", dir, i, ext);
    render(px, w, h, mix(seed * 0x100000001b3ull + (uint64_t)i));
    VipsImage *im = vips_image_new_from_memory(px, (size_t)w * h * 3, w, h, 3, VIPS_FORMAT_UCHAR);
    if (!im || vips_image_write_to_file(im, path, NULL)) {
      fprintf(stderr, "gen_photos: %s: %s\n", path, vips_error_buffer());
      rc = 1;
    }
    if (im) g_object_unref(im);
  }
  free(px);
  vips_shutdown();
  return rc;
}
