/* test_img_robust: every format and size extreme a photo library holds,
 * generated with libvips in a temp dir, with known expected pixels:
 * 1x1, 20000x10, 16-bit PNG/TIFF (colour and grey), CMYK JPEG, grey,
 * grey+alpha, RGBA, WebP, animated GIF, AVIF/HEIC when a saver exists, all
 * 8 EXIF orientations (two marked corners tell all 8 apart), EXIF date.
 * Then a truncated and a bit-flipped copy of each: a valid tensor or a clean
 * error, never a crash, and no file descriptor left open. Guards: max_pixels
 * on a forged PNG header (refused before decoding), file size, time budget,
 * missing/unreadable/unsupported files. */
#include <dirent.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>
#include <vips/vips.h>

#include "blip_err.h"
#include "blip_img.h"
#include "check.h"
#include "pngbytes.h"

#define S 384

/* LeakSanitizer hook: libx265 (the HEVC *encoder* libheif uses to write the
 * test's HEIC file) leaks one 1168-byte block per process. Decoding does not
 * use it, so only that library is suppressed. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) { return "leak:libx265.so\n"; }

static char g_dir[256];
static float g_out[3 * S * S];
static uint8_t g_rgb[3 * S * S];

static int fd_count(void) {
  int n = 0;
  DIR *d = opendir("/proc/self/fd");
  if (!d) return -1;
  while (readdir(d)) n++;
  closedir(d);
  return n;
}

static const char *tmp_path(const char *name) {
  static char buf[4][512];
  static int k;
  char *b = buf[k++ & 3];
  snprintf(b, sizeof buf[0], "%s/%s", g_dir, name);
  return b;
}

/* A w x h image of the given bands/format whose band b is val[b] everywhere. */
static VipsImage *solid(int w, int h, int bands, VipsBandFormat fmt, VipsInterpretation interp, const double *val) {
  VipsImage *black = NULL, *lin = NULL, *cast = NULL, *out = NULL;
  double zero[8] = {0}, one[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  if (vips_black(&black, w, h, "bands", bands, NULL) || vips_linear(black, &lin, one, (double *)val, bands, NULL) ||
      vips_cast(lin, &cast, fmt, NULL) || vips_copy(cast, &out, "interpretation", interp, NULL))
    out = NULL;
  (void)zero;
  if (black) g_object_unref(black);
  if (lin) g_object_unref(lin);
  if (cast) g_object_unref(cast);
  return out;
}

static int save(VipsImage *im, const char *name, const char *opts) {
  char spec[600];
  snprintf(spec, sizeof spec, "%s%s", tmp_path(name), opts ? opts : "");
  int rc = vips_image_write_to_file(im, spec, NULL);
  if (rc) {
    fprintf(stderr, "  (cannot write %s: %s)\n", name, vips_error_buffer());
    vips_error_clear();
  }
  return rc;
}

static void opts_plain(blip_img_opts *o) {
  blip_img_opts_default(o);
  o->autorotate = 0;
}

/* Every output pixel equals want[] within tol levels. */
static void expect_solid(const char *name, const blip_img_opts *o, const int want[3], int tol) {
  blip_img_meta meta;
  int rc = blip_img_load_file(tmp_path(name), o, g_out, g_rgb, &meta);
  CHECK(rc == 0, "%s: %s", name, blip_err_last());
  if (rc) return;
  int worst = 0;
  for (int i = 0; i < S * S; i++)
    for (int c = 0; c < 3; c++) {
      int d = abs(g_rgb[3 * i + c] - want[c]);
      if (d > worst) worst = d;
    }
  CHECK(worst <= tol, "%s: pixel off by %d levels (want %d,%d,%d got %d,%d,%d)", name, worst, want[0], want[1],
        want[2], g_rgb[0], g_rgb[1], g_rgb[2]);
  printf("  %-22s ok (%dx%d, max level diff %d)\n", name, meta.width, meta.height, worst);
}

/* --------------------------------------------------------- generation */

#define MAXFILES 64
static char g_files[MAXFILES][64];
static int g_nfiles;

static void add_file(const char *name) {
  if (g_nfiles < MAXFILES) snprintf(g_files[g_nfiles++], sizeof g_files[0], "%s", name);
}

static void test_formats(void) {
  blip_img_opts o;
  opts_plain(&o);
  struct {
    const char *name, *opts;
    int w, h, bands;
    VipsBandFormat fmt;
    VipsInterpretation interp;
    double val[4];
    int want[3], tol;
  } cases[] = {
      {"one.png", NULL, 1, 1, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, {12, 34, 56}, {12, 34, 56}, 0},
      {"one.jpg", "[Q=100]", 1, 1, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, {200, 100, 50}, {200, 100, 50}, 3},
      {"pano.jpg", "[Q=95]", 20000, 10, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, {10, 120, 240}, {10, 120, 240}, 3},
      {"tall.png", NULL, 10, 20000, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, {9, 8, 7}, {9, 8, 7}, 0},
      /* 16-bit colour: PIL keeps the high byte (0xAB, 0x12, 0x00) */
      {"rgb16.png", NULL, 50, 30, 3, VIPS_FORMAT_USHORT, VIPS_INTERPRETATION_RGB16, {0xABCD, 0x12FF, 0x00FF}, {0xAB, 0x12, 0}, 0},
      {"rgb16.tif", NULL, 50, 30, 3, VIPS_FORMAT_USHORT, VIPS_INTERPRETATION_RGB16, {0xABCD, 0x12FF, 0x00FF}, {0xAB, 0x12, 0}, 0},
      {"rgba16.png", NULL, 50, 30, 4, VIPS_FORMAT_USHORT, VIPS_INTERPRETATION_RGB16, {0x4000, 0x8000, 0xC0FF, 0}, {0x40, 0x80, 0xC0}, 0},
      /* 16-bit grey: v >> 8 (PIL would clip to 255: see blip_img.c) */
      {"grey16.png", NULL, 50, 30, 1, VIPS_FORMAT_USHORT, VIPS_INTERPRETATION_GREY16, {0x7F80}, {0x7F, 0x7F, 0x7F}, 0},
      {"grey.png", NULL, 40, 70, 1, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_B_W, {77}, {77, 77, 77}, 0},
      {"grey.jpg", "[Q=100]", 40, 70, 1, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_B_W, {77}, {77, 77, 77}, 1},
      /* alpha 0 everywhere: the colour underneath survives (no flatten) */
      {"greya.png", NULL, 40, 70, 2, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_B_W, {77, 0}, {77, 77, 77}, 0},
      {"rgba.png", NULL, 33, 17, 4, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, {10, 200, 30, 0}, {10, 200, 30}, 0},
      {"lossless.webp", "[lossless]", 33, 17, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, {1, 2, 250}, {1, 2, 250}, 0},
      {"rgba.webp", "[lossless]", 33, 17, 4, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, {90, 80, 70, 255}, {90, 80, 70}, 0},
      {"lossy.webp", "[Q=90]", 64, 64, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, {100, 150, 200}, {100, 150, 200}, 4},
      /* CMYK paper white is sRGB white */
      {"cmyk.jpg", "[Q=100]", 32, 32, 4, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_CMYK, {0, 0, 0, 0}, {255, 255, 255}, 3},
      {"cmyk.tif", NULL, 32, 32, 4, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_CMYK, {0, 0, 0, 0}, {255, 255, 255}, 3},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    VipsImage *im = solid(cases[i].w, cases[i].h, cases[i].bands, cases[i].fmt, cases[i].interp, cases[i].val);
    CHECK(im != NULL, "generate %s", cases[i].name);
    if (!im) continue;
    int rc = save(im, cases[i].name, cases[i].opts);
    g_object_unref(im);
    CHECK(rc == 0, "save %s", cases[i].name);
    if (rc) continue;
    add_file(cases[i].name);
    expect_solid(cases[i].name, &o, cases[i].want, cases[i].tol);
  }

  /* CMYK cyan: red is absorbed */
  double cyan[4] = {255, 0, 0, 0};
  VipsImage *im = solid(32, 32, 4, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_CMYK, cyan);
  if (im && save(im, "cyan.jpg", "[Q=100]") == 0) {
    add_file("cyan.jpg");
    CHECK(blip_img_load_file(tmp_path("cyan.jpg"), &o, g_out, g_rgb, NULL) == 0, "cyan: %s", blip_err_last());
    CHECK(g_rgb[0] < 100 && g_rgb[1] > 120 && g_rgb[2] > 180, "cyan -> %d,%d,%d", g_rgb[0], g_rgb[1], g_rgb[2]);
  }
  if (im) g_object_unref(im);

  /* animated GIF: page 0 red, page 1 blue -> red */
  double red[3] = {255, 0, 0}, blue[3] = {0, 0, 255};
  VipsImage *a = solid(20, 10, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, red);
  VipsImage *b = solid(20, 10, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, blue), *j = NULL, *anim = NULL;
  if (a && b && !vips_join(a, b, &j, VIPS_DIRECTION_VERTICAL, NULL) && !vips_copy(j, &anim, NULL)) {
    vips_image_set_int(anim, "page-height", 10);
    int delay[2] = {100, 100};
    vips_image_set_array_int(anim, "delay", delay, 2);
    if (save(anim, "anim.gif", NULL) == 0) {
      add_file("anim.gif");
      int want[3] = {255, 0, 0};
      expect_solid("anim.gif", &o, want, 0);
      blip_img_meta m;
      CHECK(blip_img_load_file(tmp_path("anim.gif"), &o, NULL, NULL, &m) == 0 && m.width == 20 && m.height == 10,
            "anim.gif meta %dx%d (first frame)", m.width, m.height);
    }
    if (save(anim, "anim.webp", "[lossless]") == 0) {
      add_file("anim.webp");
      int want[3] = {255, 0, 0};
      expect_solid("anim.webp", &o, want, 0);
    }
  }
  CHECK(anim != NULL, "generate animation");
  if (a) g_object_unref(a);
  if (b) g_object_unref(b);
  if (j) g_object_unref(j);
  if (anim) g_object_unref(anim);

  /* AVIF / HEIC when libheif has an encoder */
  double grey[3] = {128, 128, 128};
  im = solid(64, 64, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, grey);
  const char *heif[2][2] = {{"x.avif", "[compression=av1,Q=90]"}, {"x.heic", "[compression=hevc,Q=90]"}};
  for (int k = 0; k < 2; k++) {
    if (im && save(im, heif[k][0], heif[k][1]) == 0) {
      add_file(heif[k][0]);
      int want[3] = {128, 128, 128};
      expect_solid(heif[k][0], &o, want, 4);
    } else {
      printf("  NOTE: skipping %s: no encoder in this libvips/libheif\n", heif[k][0]);
    }
  }
  if (im) g_object_unref(im);
}

/* ----------------------------------------------------------- orientation */

enum { TL, TR, BL, BR };

static int corner_mean(int corner) {
  int x0 = corner == TR || corner == BR ? S - 40 : 0, y0 = corner == BL || corner == BR ? S - 40 : 0;
  long s = 0;
  for (int y = y0; y < y0 + 40; y++)
    for (int x = x0; x < x0 + 40; x++) s += g_rgb[(y * S + x) * 3];
  return (int)(s / 1600);
}

/* Stored top-left is white, stored top-right is grey. EXIF 274 semantics:
 * where each lands on display, for orientations 1..8. */
static void test_orientation(void) {
  static const int want[9][2] = {{0, 0}, {TL, TR}, {TR, TL}, {BR, BL}, {BL, BR},
                                 {TL, BL}, {TR, BR}, {BR, TR}, {BL, TL}};
  static const char *cn[] = {"TL", "TR", "BL", "BR"};
  double black[3] = {0, 0, 0}, white[3] = {255, 255, 255}, grey[3] = {128, 128, 128};
  VipsImage *bg = solid(96, 64, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, black);
  VipsImage *w = solid(16, 16, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, white);
  VipsImage *g = solid(16, 16, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, grey);
  VipsImage *t1 = NULL, *t2 = NULL;
  if (!bg || !w || !g || vips_insert(bg, w, &t1, 0, 0, NULL) || vips_insert(t1, g, &t2, 96 - 16, 0, NULL)) {
    CHECK(0, "generate orientation image: %s", vips_error_buffer());
    goto done;
  }
  for (int o = 1; o <= 8; o++) {
    VipsImage *c = NULL;
    char name[32];
    snprintf(name, sizeof name, "orient%d.jpg", o);
    if (vips_copy(t2, &c, NULL)) continue;
    vips_image_set_int(c, VIPS_META_ORIENTATION, o);
    if (o == 6) vips_image_set_string(c, "exif-ifd2-DateTimeOriginal", "2021:07:04 15:30:45");
    int rc = save(c, name, "[Q=95]");
    g_object_unref(c);
    CHECK(rc == 0, "save %s", name);
    if (rc) continue;
    add_file(name);
    blip_img_opts opt;
    blip_img_opts_default(&opt);
    blip_img_meta m;
    rc = blip_img_load_file(tmp_path(name), &opt, g_out, g_rgb, &m);
    CHECK(rc == 0, "%s: %s", name, blip_err_last());
    if (rc) continue;
    CHECK(m.orientation == o && m.width == 96 && m.height == 64, "%s: meta orientation %d %dx%d", name,
          m.orientation, m.width, m.height);
    int wc = -1, gc = -1, ok = 1;
    for (int k = 0; k < 4; k++) {
      int v = corner_mean(k);
      if (v > 200) wc = k;
      else if (v > 80 && v < 180) gc = k;
      else if (v > 30) ok = 0;
    }
    CHECK(ok && wc == want[o][0] && gc == want[o][1], "orientation %d: white %s grey %s, want %s %s", o,
          wc >= 0 ? cn[wc] : "?", gc >= 0 ? cn[gc] : "?", cn[want[o][0]], cn[want[o][1]]);
    if (o == 6) CHECK(!strcmp(m.taken_at, "2021-07-04T15:30:45"), "DateTimeOriginal -> '%s'", m.taken_at);
    else CHECK(m.taken_at[0] == 0, "no date -> '%s'", m.taken_at);
    /* autorotate off: as stored */
    opt.autorotate = 0;
    CHECK(blip_img_load_file(tmp_path(name), &opt, g_out, g_rgb, NULL) == 0 && corner_mean(TL) > 200 &&
              corner_mean(TR) > 80 && corner_mean(TR) < 180,
          "orientation %d with autorotate off must stay as stored", o);
  }
  printf("  8 EXIF orientations ok\n");
  /* HEIF/AVIF: libheif applies irot/imir itself; an EXIF tag is not applied
   * a second time, so pixels stay as decoded */
  VipsImage *c = NULL;
  if (!vips_copy(t2, &c, NULL)) {
    vips_image_set_int(c, VIPS_META_ORIENTATION, 6);
    if (save(c, "orient6.avif", "[compression=av1,Q=95]") == 0) {
      blip_img_opts opt;
      blip_img_opts_default(&opt);
      CHECK(blip_img_load_file(tmp_path("orient6.avif"), &opt, g_out, g_rgb, NULL) == 0, "avif: %s", blip_err_last());
      CHECK(corner_mean(TL) > 200 && corner_mean(TR) > 80 && corner_mean(TR) < 180,
            "AVIF with EXIF orientation 6 was rotated again (TL %d TR %d)", corner_mean(TL), corner_mean(TR));
    } else {
      printf("  NOTE: skipping AVIF orientation: no AV1 encoder\n");
    }
    g_object_unref(c);
  }
done:
  if (bg) g_object_unref(bg);
  if (w) g_object_unref(w);
  if (g) g_object_unref(g);
  if (t1) g_object_unref(t1);
  if (t2) g_object_unref(t2);
}

/* ---------------------------------------------------------------- guards */

static uint8_t *read_all(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long len = ftell(f);
  fseek(f, 0, SEEK_SET);
  uint8_t *b = malloc(len > 0 ? len : 1);
  *n = b ? fread(b, 1, len, f) : 0;
  fclose(f);
  return b;
}

static void write_all(const char *path, const uint8_t *b, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f) return;
  fwrite(b, 1, n, f);
  fclose(f);
}

static void test_guards(void) {
  blip_img_opts o;
  opts_plain(&o);
  int fds = fd_count();

  /* a forged PNG header: 60000 x 60000, refused before any pixel is read */
  size_t n = 0;
  uint8_t *png = read_all(tmp_path("one.png"), &n);
  CHECK(png && n > 33 && !memcmp(png + 12, "IHDR", 4), "one.png readable");
  if (png && n > 33) {
    put32(png + 16, 60000);
    put32(png + 20, 60000);
    put32(png + 29, crc32_png(png + 12, 17));
    write_all(tmp_path("bomb.png"), png, n);
    blip_img_meta m;
    int rc = blip_img_load_file(tmp_path("bomb.png"), &o, g_out, NULL, &m);
    CHECK(rc == BLIP_ETOOBIG && strstr(blip_err_last(), "too large"), "bomb: rc %d %s", rc, blip_err_last());
    printf("  bomb.png: %s\n", blip_err_last());
    rc = blip_img_load_buffer(png, n, &o, g_out, NULL, NULL);
    CHECK(rc == BLIP_ETOOBIG, "bomb buffer: rc %d %s", rc, blip_err_last());
  }
  free(png);

  o.max_pixels = 100000; /* the 20000x10 panorama has 200000 */
  CHECK(blip_img_load_file(tmp_path("pano.jpg"), &o, g_out, NULL, NULL) == BLIP_ETOOBIG, "max_pixels");
  opts_plain(&o);
  o.max_file_bytes = 100;
  CHECK(blip_img_load_file(tmp_path("pano.jpg"), &o, g_out, NULL, NULL) == BLIP_ETOOBIG &&
            strstr(blip_err_last(), "too large"),
        "max_file_bytes: %s", blip_err_last());
  opts_plain(&o);
  o.time_budget_s = 1e-6;
  int rc = blip_img_load_file(tmp_path("pano.jpg"), &o, g_out, NULL, NULL);
  CHECK(rc == BLIP_EINTR && strstr(blip_err_last(), "time budget"), "time budget: rc %d %s", rc, blip_err_last());
  opts_plain(&o);

  rc = blip_img_load_file(tmp_path("does-not-exist.jpg"), &o, g_out, NULL, NULL);
  CHECK(rc == BLIP_EIO && strstr(blip_err_last(), "unreadable"), "missing: %d %s", rc, blip_err_last());
  rc = blip_img_load_file(g_dir, &o, g_out, NULL, NULL);
  CHECK(rc == BLIP_EIO && strstr(blip_err_last(), "unreadable"), "directory: %d %s", rc, blip_err_last());
  write_all(tmp_path("notes.txt"), (const uint8_t *)"hello, this is not an image\n", 28);
  rc = blip_img_load_file(tmp_path("notes.txt"), &o, g_out, NULL, NULL);
  CHECK(rc == BLIP_EUNSUPPORTED && strstr(blip_err_last(), "unsupported"), "text: %d %s", rc, blip_err_last());
  write_all(tmp_path("empty.jpg"), (const uint8_t *)"", 0);
  rc = blip_img_load_file(tmp_path("empty.jpg"), &o, g_out, NULL, NULL);
  CHECK(rc == BLIP_EFORMAT && strstr(blip_err_last(), "truncated"), "empty: %d %s", rc, blip_err_last());
  CHECK(blip_img_load_buffer("", 0, &o, g_out, NULL, NULL) == BLIP_EFORMAT, "empty buffer");
  CHECK(fd_count() == fds, "fds leaked by guards: %d -> %d", fds, fd_count());
}

/* ------------------------------------------- truncated and bit-flipped */

static int tensor_sane(void) {
  for (int i = 0; i < 3 * S * S; i++)
    if (!(g_out[i] >= -1.8f && g_out[i] <= 2.2f)) return 0;
  return 1;
}

static void test_damaged(void) {
  blip_img_opts o;
  opts_plain(&o);
  o.time_budget_s = 10;
  int fds = fd_count(), ok = 0, err = 0, trunc_err = 0, trunc_total = 0;
  uint32_t seed = 99;
  for (int i = 0; i < g_nfiles; i++) {
    size_t n = 0;
    uint8_t *b = read_all(tmp_path(g_files[i]), &n);
    CHECK(b && n > 0, "read %s", g_files[i]);
    if (!b) continue;
    for (int variant = 0; variant < 6; variant++) {
      size_t len = n;
      uint8_t *c = malloc(n);
      memcpy(c, b, n);
      const char *what;
      if (variant == 0) len = n / 2, what = "truncated to 1/2";
      else if (variant == 1) len = n > 40 ? 40 : n - 1, what = "truncated to 40 bytes";
      else if (variant == 2) len = n - n / 10 - 1, what = "truncated by 10%";
      else {
        for (int k = 0; k < 8 * (variant - 2); k++) {
          seed = seed * 1664525u + 1013904223u;
          size_t at = 16 + (seed >> 8) % (n > 16 ? n - 16 : 1);
          if (at < n) c[at] ^= (uint8_t)(1u << (seed & 7));
        }
        what = "bit-flipped";
      }
      if (len == 0) len = 1;
      /* through both entry points: a file and a buffer */
      char name[96];
      snprintf(name, sizeof name, "bad-%d-%s", variant, g_files[i]);
      write_all(tmp_path(name), c, len);
      int rc1 = blip_img_load_file(tmp_path(name), &o, g_out, g_rgb, NULL);
      int sane1 = rc1 != 0 || tensor_sane();
      char msg[1024];
      snprintf(msg, sizeof msg, "%s", blip_err_last());
      int rc2 = blip_img_load_buffer(c, len, &o, g_out, g_rgb, NULL);
      int sane2 = rc2 != 0 || tensor_sane();
      CHECK(sane1 && sane2, "%s %s: tensor out of range", g_files[i], what);
      CHECK(rc1 == 0 || (rc1 < 0 && msg[0]), "%s %s: error without message", g_files[i], what);
      CHECK((rc1 == 0) == (rc2 == 0), "%s %s: file rc %d, buffer rc %d (%s)", g_files[i], what, rc1, rc2, msg);
      if (rc1) err++;
      else ok++;
      if (variant == 0 && (strstr(g_files[i], ".jpg") || strstr(g_files[i], ".png")) && n > 400) {
        trunc_total++;
        trunc_err += rc1 != 0;
        CHECK(rc1 != 0, "%s truncated to half must be an error, not grey pixels", g_files[i]);
      }
      if (getenv("V") || (variant == 0 && i % 4 == 0)) printf("  %-14s %-22s -> %s\n", g_files[i], what, rc1 ? msg : "decoded");
      free(c);
    }
    free(b);
  }
  printf("  damaged files: %d decoded to a valid tensor, %d clean errors; %d/%d half-truncated JPEG/PNG refused\n",
         ok, err, trunc_err, trunc_total);
  CHECK(fd_count() == fds, "fds leaked by damaged files: %d -> %d", fds, fd_count());
}

/* ------------------------------------------------ paths and equivalences */

/* Callers decode in parallel (libvips concurrency 1): two threads must each
 * reproduce the single-threaded tensor. */
typedef struct {
  const float *want;
  int mismatches;
} par_job;

static void *par_worker(void *arg) {
  par_job *j = arg;
  blip_img_opts o;
  opts_plain(&o);
  float *out = malloc(sizeof(float) * 3 * S * S);
  for (int r = 0; r < 3 && out; r++)
    if (blip_img_load_file(tmp_path("grad.jpg"), &o, out, NULL, NULL) || memcmp(out, j->want, sizeof(float) * 3 * S * S))
      j->mismatches++;
  free(out);
  vips_thread_shutdown();
  return NULL;
}

static void test_equivalence(void) {
  /* buffer == file, and shrink-on-load stays close to the exact path */
  double grad[3] = {0, 0, 0};
  VipsImage *x = NULL, *y = NULL, *xy = NULL, *f = NULL;
  VipsImage *base = solid(8, 8, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB, grad);
  if (vips_xyz(&xy, 2000, 1600, NULL) || vips_extract_band(xy, &x, 0, NULL) || vips_extract_band(xy, &y, 1, NULL)) {
    CHECK(0, "xyz");
    goto done;
  }
  VipsImage *bands[3] = {x, y, x}, *j = NULL, *m = NULL;
  double a[3] = {255.0 / 2000, 255.0 / 1600, 0.1}, c0[3] = {0, 0, 30};
  if (vips_bandjoin(bands, &j, 3, NULL) || vips_linear(j, &m, a, c0, 3, NULL) ||
      vips_cast(m, &f, VIPS_FORMAT_UCHAR, NULL)) {
    CHECK(0, "gradient");
  } else if (save(f, "grad.jpg", "[Q=90]") == 0) {
    blip_img_opts o;
    opts_plain(&o);
    float *exact = malloc(sizeof(float) * 3 * S * S);
    uint8_t *ex8 = malloc(3 * S * S);
    CHECK(blip_img_load_file(tmp_path("grad.jpg"), &o, exact, ex8, NULL) == 0, "grad: %s", blip_err_last());
    size_t n = 0;
    uint8_t *buf = read_all(tmp_path("grad.jpg"), &n);
    CHECK(buf && blip_img_load_buffer(buf, n, &o, g_out, g_rgb, NULL) == 0 &&
              !memcmp(g_out, exact, sizeof(float) * 3 * S * S),
          "buffer and file paths must agree");
    free(buf);
    par_job jobs[2] = {{exact, 0}, {exact, 0}};
    pthread_t th[2];
    for (int k = 0; k < 2; k++) pthread_create(&th[k], NULL, par_worker, &jobs[k]);
    for (int k = 0; k < 2; k++) pthread_join(th[k], NULL);
    CHECK(jobs[0].mismatches + jobs[1].mismatches == 0, "parallel decoding differs (%d, %d)", jobs[0].mismatches,
          jobs[1].mismatches);
    o.shrink_on_load = 1;
    CHECK(blip_img_load_file(tmp_path("grad.jpg"), &o, g_out, g_rgb, NULL) == 0, "shrink: %s", blip_err_last());
    int mx = 0;
    double sum = 0;
    for (int i = 0; i < 3 * S * S; i++) {
      int d = abs(g_rgb[i] - ex8[i]);
      sum += d;
      if (d > mx) mx = d;
    }
    printf("  shrink-on-load vs exact on a 2000x1600 gradient: max %d, mean %.3f levels\n", mx, sum / (3 * S * S));
    CHECK(sum / (3 * S * S) < 1.0 && mx <= 6, "shrink-on-load drifted: max %d mean %.3f", mx, sum / (3 * S * S));
    free(exact);
    free(ex8);
  }
  if (j) g_object_unref(j);
  if (m) g_object_unref(m);
done:
  if (base) g_object_unref(base);
  if (xy) g_object_unref(xy);
  if (x) g_object_unref(x);
  if (y) g_object_unref(y);
  if (f) g_object_unref(f);
}

static void rm_dir(void) {
  DIR *d = opendir(g_dir);
  struct dirent *e;
  while (d && (e = readdir(d)))
    if (e->d_name[0] != '.') unlink(tmp_path(e->d_name));
  if (d) closedir(d);
  rmdir(g_dir);
}

int main(void) {
  if (blip_img_init()) {
    fprintf(stderr, "init: %s\n", blip_err_last());
    return 1;
  }
  snprintf(g_dir, sizeof g_dir, "%s/blip_img_XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(g_dir)) {
    perror("mkdtemp");
    return 1;
  }
  test_formats();
  test_orientation();
  test_equivalence();
  test_guards();
  test_damaged();
  rm_dir();
  return check_summary();
}
