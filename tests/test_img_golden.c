/* test_img_golden: blip_img against the PIL/HF reference.
 *  1. Every fixture photo (tests/data/preprocess/images.json) in reference
 *     mode (PIL's decoding: no EXIF orientation, no ICC): resized_u8 level
 *     differences are reported, hf tensors must be within max 0.02 / mean
 *     0.002. (tests/test_img_pil.c covers reference mode's conversions.)
 *  2. blip_img_resize_rgb against a naive double-precision implementation of
 *     the same filter (weights from the distance to every input pixel,
 *     rounding after each pass) on random images, up and down, odd sizes.
 *  3. blip_img_normalize against the float32 formula written out. */
#include <jansson.h>
#include <stdint.h>

#include "blip_err.h"
#include "blip_img.h"
#include "blip_st.h"
#include "check.h"

#define S 384

static void test_fixtures(void) {
  blip_st *st = NULL;
  json_error_t jerr;
  json_t *list = json_load_file(test_data("preprocess/images.json"), 0, &jerr);
  CHECK(list && json_is_array(list), "images.json: %s", jerr.text);
  if (!list) return;
  if (blip_st_open(test_data("preprocess/golden.safetensors"), &st)) {
    CHECK(0, "golden: %s", blip_err_last());
    json_decref(list);
    return;
  }
  blip_img_opts o;
  blip_img_opts_default(&o);
  o.reference = 1;
  float *out = malloc(sizeof(float) * 3 * S * S), *want = malloc(sizeof(float) * 3 * S * S);
  uint8_t *rgb = malloc(3 * S * S);
  long all_n = 0, all_exact = 0;
  double all_max = 0;
  printf("%-26s %8s %8s %9s | %9s %9s\n", "image", "u8 max", "u8 mean", "u8 exact", "hf max", "hf mean");
  for (size_t i = 0; i < json_array_size(list); i++) {
    const char *file = json_string_value(json_object_get(json_array_get(list, i), "file"));
    CHECK(file != NULL, "entry %zu has no file", i);
    if (!file) continue;
    char stem[256], key[300], rel[300];
    const char *b = strrchr(file, '/');
    snprintf(stem, sizeof stem, "%s", b ? b + 1 : file);
    char *dot = strrchr(stem, '.');
    if (dot) *dot = 0;
    snprintf(rel, sizeof rel, "preprocess/%s", file);
    blip_img_meta meta;
    int rc = blip_img_load_file(test_data(rel), &o, out, rgb, &meta);
    CHECK(rc == 0, "%s: %s", file, blip_err_last());
    if (rc) continue;
    json_t *wh = json_object_get(json_array_get(list, i), "size_wh");
    CHECK(meta.width == json_integer_value(json_array_get(wh, 0)) &&
              meta.height == json_integer_value(json_array_get(wh, 1)),
          "%s: meta %dx%d", file, meta.width, meta.height);
    snprintf(key, sizeof key, "resized_u8.%s", stem);
    const blip_st_tensor *tu = blip_st_find(st, key);
    CHECK(tu && tu->dtype == BLIP_DT_U8 && tu->numel == 3 * S * S, "%s missing or wrong shape", key);
    if (!tu || tu->numel != 3 * S * S) continue;
    const uint8_t *ref = tu->data;
    long exact = 0;
    int umax = 0;
    double usum = 0;
    for (long j = 0; j < 3 * S * S; j++) {
      int d = abs((int)rgb[j] - (int)ref[j]);
      exact += d == 0;
      usum += d;
      if (d > umax) umax = d;
    }
    all_n += 3 * S * S;
    all_exact += exact;
    snprintf(key, sizeof key, "hf.%s", stem);
    const blip_st_tensor *th = blip_st_find(st, key);
    CHECK(th && th->numel == 3 * S * S && blip_st_to_f32(th, want, 3 * S * S) == 0, "%s missing", key);
    if (!th) continue;
    double hmax = 0, hsum = 0;
    for (long j = 0; j < 3 * S * S; j++) {
      double d = fabs((double)out[j] - want[j]);
      hsum += d;
      if (d > hmax) hmax = d;
    }
    if (hmax > all_max) all_max = hmax;
    /* shrink-on-load only shrinks JPEGs whose short side is >= 4*S: no
     * fixture is that large, so the fast path must give the same tensor */
    blip_img_opts fast = o; /* product mode without EXIF and ICC: the same pixels here */
    fast.reference = fast.autorotate = fast.color_manage = 0;
    fast.shrink_on_load = 1;
    float *f2 = malloc(sizeof(float) * 3 * S * S);
    CHECK(f2 && blip_img_load_file(test_data(rel), &fast, f2, NULL, NULL) == 0 &&
              !memcmp(f2, out, sizeof(float) * 3 * S * S),
          "%s: shrink-on-load changed a fixture too small to shrink", stem);
    free(f2);
    printf("%-26s %8d %8.4f %8.4f%% | %9.5f %9.6f\n", stem, umax, usum / (3 * S * S), 100.0 * exact / (3 * S * S),
           hmax, hsum / (3 * S * S));
    CHECK(hmax <= 0.02, "%s: hf max abs diff %g > 0.02", stem, hmax);
    CHECK(hsum / (3 * S * S) <= 0.002, "%s: hf mean abs diff %g > 0.002", stem, hsum / (3 * S * S));
  }
  printf("all fixtures: %.4f%% of resized bytes bit-exact, worst hf max abs diff %.5f\n",
         100.0 * all_exact / (all_n ? all_n : 1), all_max);

  /* Informational: what colour management and autorotate change. */
  blip_img_opts_default(&o);
  for (size_t i = 0; i < json_array_size(list); i++) {
    const char *file = json_string_value(json_object_get(json_array_get(list, i), "file"));
    char rel[300], key[300], stem[256];
    const char *b = strrchr(file, '/');
    snprintf(stem, sizeof stem, "%s", b ? b + 1 : file);
    *strrchr(stem, '.') = 0;
    snprintf(rel, sizeof rel, "preprocess/%s", file);
    snprintf(key, sizeof key, "hf.%s", stem);
    const blip_st_tensor *th = blip_st_find(st, key);
    if (!th || blip_img_load_file(test_data(rel), &o, out, NULL, NULL)) continue;
    blip_st_to_f32(th, want, 3 * S * S);
    double m = 0;
    for (long j = 0; j < 3 * S * S; j++) m = fmax(m, fabs((double)out[j] - want[j]));
    if (m > 0.02) printf("  defaults (ICC + autorotate) change %s: max abs diff %.4f (expected: not the reference)\n", stem, m);
  }
  free(out);
  free(want);
  free(rgb);
  blip_st_close(st);
  json_decref(list);
}

/* ---- naive reference: weights from every input pixel, double sums ---- */

static double cubic(double x) {
  x = fabs(x);
  if (x < 1) return 1.5 * x * x * x - 2.5 * x * x + 1;
  if (x < 2) return -0.5 * x * x * x + 2.5 * x * x - 4 * x + 2;
  return 0;
}

static uint8_t round8(double v) {
  double r = floor(v + 0.5);
  return r < 0 ? 0 : r > 255 ? 255 : (uint8_t)r;
}

/* One axis: out[o] = sum_i w(i) in[i] / sum_i w(i), w = cubic((i+0.5-center)/fs). */
static void naive_axis(const uint8_t *in, int n, int stride, uint8_t *out, int on, int ostride) {
  double scale = (double)n / on, fs = scale > 1 ? scale : 1;
  for (int o = 0; o < on; o++) {
    double c = (o + 0.5) * scale, sw = 0, s = 0;
    for (int i = 0; i < n; i++) {
      double w = cubic((i + 0.5 - c) / fs);
      sw += w;
      s += w * in[(size_t)i * stride];
    }
    out[(size_t)o * ostride] = round8(s / sw);
  }
}

static void naive_resize(const uint8_t *src, int w, int h, uint8_t *dst, int ow, int oh) {
  uint8_t *mid = malloc((size_t)ow * h * 3);
  for (int y = 0; y < h; y++)
    for (int c = 0; c < 3; c++)
      if (ow == w)
        for (int x = 0; x < w; x++) mid[((size_t)y * ow + x) * 3 + c] = src[((size_t)y * w + x) * 3 + c];
      else
        naive_axis(src + (size_t)y * w * 3 + c, w, 3, mid + (size_t)y * ow * 3 + c, ow, 3);
  for (int x = 0; x < ow; x++)
    for (int c = 0; c < 3; c++)
      if (oh == h)
        for (int y = 0; y < h; y++) dst[((size_t)y * ow + x) * 3 + c] = mid[((size_t)y * ow + x) * 3 + c];
      else
        naive_axis(mid + (size_t)x * 3 + c, h, ow * 3, dst + (size_t)x * 3 + c, oh, ow * 3);
  free(mid);
}

static void test_resize_vs_naive(void) {
  static const int sz[][4] = {{97, 61, 29, 40},  {13, 7, 50, 31},  {200, 3, 17, 9},  {1, 1, 5, 5},
                              {64, 64, 64, 33},  {31, 90, 77, 90}, {451, 300, 384, 384}, {80, 150, 384, 384},
                              {5, 500, 300, 7},  {384, 384, 384, 384}};
  uint32_t seed = 12345;
  long total = 0, exact = 0;
  int worst = 0;
  for (size_t t = 0; t < sizeof sz / sizeof *sz; t++) {
    int w = sz[t][0], h = sz[t][1], ow = sz[t][2], oh = sz[t][3];
    uint8_t *src = malloc((size_t)w * h * 3), *a = malloc((size_t)ow * oh * 3), *b = malloc((size_t)ow * oh * 3);
    /* smooth ramps plus noise and hard edges: exercises both clip ends */
    for (int y = 0; y < h; y++)
      for (int x = 0; x < w * 3; x++) {
        seed = seed * 1664525u + 1013904223u;
        int v = (x * 7 + y * 3) % 256;
        src[(size_t)y * w * 3 + x] = ((seed >> 24) & 1) ? (uint8_t)(seed >> 8) : (uint8_t)(v > 128 ? 255 : v);
      }
    CHECK_OK(blip_img_resize_rgb(src, w, h, a, ow, oh));
    naive_resize(src, w, h, b, ow, oh);
    int m = 0;
    long ex = 0, n = (long)ow * oh * 3;
    for (long i = 0; i < n; i++) {
      int d = abs(a[i] - b[i]);
      if (d > m) m = d;
      ex += d == 0;
    }
    total += n;
    exact += ex;
    if (m > worst) worst = m;
    CHECK(m <= 1, "%dx%d -> %dx%d: max level diff %d vs naive double reference", w, h, ow, oh, m);
    CHECK(ex >= n * 0.99, "%dx%d -> %dx%d: only %ld/%ld exact", w, h, ow, oh, ex, n);
    if (w == ow && h == oh) CHECK(!memcmp(a, src, n), "identity resize must copy");
    free(src);
    free(a);
    free(b);
  }
  printf("resize vs naive double reference: %.4f%% identical, max diff %d level\n", 100.0 * exact / total, worst);
  CHECK(blip_img_resize_rgb(NULL, 1, 1, NULL, 1, 1) == BLIP_EINVAL, "NULL rejected");
}

static void test_normalize(void) {
  const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f}, std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
  uint8_t rgb[2 * 2 * 3] = {0, 255, 128, 1, 2, 3, 254, 100, 200, 50, 60, 70};
  float out[12];
  blip_img_normalize(rgb, 2, out);
  int bad = 0;
  for (int i = 0; i < 4; i++)
    for (int c = 0; c < 3; c++) {
      volatile float x = (float)(rgb[i * 3 + c] / 255.0);
      volatile float d = x - mean[c];
      float want = d / std[c];
      bad += out[c * 4 + i] != want;
    }
  CHECK(bad == 0, "%d normalized values differ from the float32 formula", bad);
  CHECK(fabsf(out[0] - (-1.7922626f)) < 1e-6, "(0-mean)/std = %g", out[0]);
}

int main(void) {
  if (blip_img_init()) {
    fprintf(stderr, "init: %s\n", blip_err_last());
    return 1;
  }
  test_normalize();
  test_resize_vs_naive();
  test_fixtures();
  return check_summary();
}
