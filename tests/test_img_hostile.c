/* test_img_hostile: files that a photo folder can hold and that must never
 * reach libvips' untrusted loaders or its loader detection (issue 10 §1):
 * a JPEG-2000 file and a bare J2K codestream renamed .jpg (made with
 * libvips' own jp2k saver, so they are valid and would decode through
 * openjpeg), an SVG and a gzip'd SVG renamed .png (librsvg), a BMP (only
 * ImageMagick reads it), a 57-byte PNG declaring a 2 GiB iTXt chunk, a
 * PNG whose IDAT runs past the end, one holding a 17 MiB tEXt chunk, and a FIFO named x.jpg (opening it must
 * not wait for a writer). Each gives a clear error naming the problem. */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vips/vips.h>

#include "blip_err.h"
#include "blip_img.h"
#include "check.h"
#include "pngbytes.h"

static char g_dir[256];
static float g_out[3 * 64 * 64];

static const char *tmp_path(const char *name) {
  static char buf[2][512];
  static int k;
  char *b = buf[k++ & 1];
  snprintf(b, sizeof buf[0], "%s/%s", g_dir, name);
  return b;
}

static void write_file(const char *name, const void *p, size_t n) {
  FILE *f = fopen(tmp_path(name), "wb");
  if (f) {
    fwrite(p, 1, n, f);
    fclose(f);
  }
}

static void opts(blip_img_opts *o) {
  blip_img_opts_default(o);
  o->size = 64;
  o->time_budget_s = 10;
}

/* load name from disk and from memory; both must fail with code and every needle in the message */
static void expect_refused(const char *name, const void *p, size_t n, int code, const char *needle) {
  blip_img_opts o;
  opts(&o);
  write_file(name, p, n);
  int rc = blip_img_load_file(tmp_path(name), &o, g_out, NULL, NULL);
  CHECK(rc == code && strstr(blip_err_last(), needle), "%s: rc %d (%s), want %d with \"%s\"", name, rc,
        blip_err_last(), code, needle);
  printf("  %-14s %s\n", name, blip_err_last());
  rc = blip_img_load_buffer(p, n, &o, g_out, NULL, NULL);
  CHECK(rc == code && strstr(blip_err_last(), needle), "%s (buffer): rc %d (%s)", name, rc, blip_err_last());
}

static void test_untrusted_formats(void) {
  VipsImage *im = NULL;
  void *buf = NULL;
  size_t n = 0;
  CHECK(vips_black(&im, 16, 16, "bands", 3, NULL) == 0, "vips_black");
  if (!im) return;
  /* JPEG 2000: a .jp2 file, and the bare codestream inside its jp2c box */
  if (vips_image_write_to_buffer(im, ".jp2", &buf, &n, NULL) == 0) {
    expect_refused("jp2.jpg", buf, n, BLIP_EUNSUPPORTED, "JPEG 2000");
    const uint8_t *b = buf;
    for (size_t i = 0; i + 8 <= n; i++)
      if (!memcmp(b + i, "jp2c", 4)) {
        expect_refused("j2k.jpg", b + i + 4, n - i - 4, BLIP_EUNSUPPORTED, "JPEG 2000");
        break;
      }
    g_free(buf);
  } else {
    vips_error_clear();
    /* no saver: a handcrafted SOC + SIZ start is what the sniffer sees */
    static const uint8_t j2k[] = {0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0, 0, 0, 0, 0, 16, 0, 0, 0, 16};
    expect_refused("j2k.jpg", j2k, sizeof j2k, BLIP_EUNSUPPORTED, "JPEG 2000");
  }
  g_object_unref(im);

  static const char svg[] = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"32\" height=\"32\">"
                            "<rect width=\"32\" height=\"32\" fill=\"red\"/></svg>\n";
  expect_refused("svg.png", svg, sizeof svg - 1, BLIP_EUNSUPPORTED, "SVG");
  /* a truncated gzip stream (the start of an .svgz) */
  static const uint8_t svgz[] = {0x1F, 0x8B, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xB3, 0x29, 0x2E};
  expect_refused("svgz.png", svgz, sizeof svgz, BLIP_EUNSUPPORTED, "unsupported");
  static const uint8_t bmp[58] = {'B', 'M', 58, 0, 0, 0, 0, 0, 0, 0, 54, 0, 0, 0, 40, 0, 0, 0, 1, 0, 0, 0, 1,
                                  0,   0,   0,  1, 0, 24, 0};
  expect_refused("photo.bmp", bmp, sizeof bmp, BLIP_EUNSUPPORTED, "BMP");
}

/* sig + IHDR 1x1 RGB + a chunk of type `type` declaring `len` bytes, then `have` bytes of it */
static size_t png_with_chunk(uint8_t *p, const char *type, uint32_t len, size_t have) {
  memcpy(p, "\x89PNG\r\n\x1a\n", 8);
  put32(p + 8, 13);
  memcpy(p + 12, "IHDR", 4);
  put32(p + 16, 1);
  put32(p + 20, 1);
  memcpy(p + 24, "\x08\x02\x00\x00\x00", 5);
  put32(p + 29, crc32_png(p + 12, 17));
  put32(p + 33, len);
  memcpy(p + 37, type, 4);
  memset(p + 41, 'A', have);
  return 41 + have;
}

static void test_png_chunks(void) {
  uint8_t p[128];
  size_t n = png_with_chunk(p, "iTXt", 0x7FFFFFF0u, 16);
  CHECK(n == 57, "bomb is %zu bytes", n);
  expect_refused("itxt-bomb.png", p, n, BLIP_EFORMAT, "iTXt declares");
  n = png_with_chunk(p, "zTXt", 0x40000000u, 16);
  expect_refused("ztxt-bomb.png", p, n, BLIP_EFORMAT, "zTXt declares");
  n = png_with_chunk(p, "tEXt", 0xFFFFFFF0u, 16);
  expect_refused("text-bomb.png", p, n, BLIP_EFORMAT, "corrupt");
  n = png_with_chunk(p, "IDAT", 200, 40);
  expect_refused("cut-idat.png", p, n, BLIP_EFORMAT, "truncated");
  /* a 17 MiB tEXt that the file does hold: absurd for a photo, refused */
  size_t big = (size_t)17 << 20;
  uint8_t *q = malloc(41 + big + 16);
  if (q) {
    n = png_with_chunk(q, "tEXt", (uint32_t)big, big + 4);
    memcpy(q + n, "\0\0\0\0IEND\xae\x42\x60\x82", 12);
    expect_refused("big-text.png", q, n + 12, BLIP_EUNSUPPORTED, "a tEXt chunk of 17825792 bytes");
    free(q);
  }
  /* the checker alone: a complete minimal PNG passes, every prefix of it fails */
  VipsImage *im = NULL;
  void *buf = NULL;
  size_t len = 0;
  if (vips_black(&im, 4, 4, NULL) == 0 && vips_image_write_to_buffer(im, ".png", &buf, &len, NULL) == 0) {
    CHECK(blip_img_png_check(buf, len, "ok.png") == BLIP_OK, "valid PNG refused: %s", blip_err_last());
    int bad = 0;
    for (size_t k = 0; k < len; k++) bad += blip_img_png_check(buf, k, "cut.png") == BLIP_OK;
    CHECK(bad == 0, "%d prefixes of a PNG passed the chunk check", bad);
    g_free(buf);
  }
  if (im) g_object_unref(im);
}

static void test_fifo(void) {
  const char *path = tmp_path("x.jpg");
  CHECK(mkfifo(path, 0600) == 0, "mkfifo");
  blip_img_opts o;
  opts(&o);
  alarm(20); /* a blocking open() would hang here: SIGALRM fails the test instead */
  int rc = blip_img_load_file(path, &o, g_out, NULL, NULL);
  alarm(0);
  CHECK(rc == BLIP_EIO && strstr(blip_err_last(), "not a regular file"), "fifo: rc %d %s", rc, blip_err_last());
  printf("  %-14s %s\n", "x.jpg (FIFO)", blip_err_last());
}

int main(void) {
  if (blip_img_init()) {
    fprintf(stderr, "%s\n", blip_err_last());
    return 1;
  }
  snprintf(g_dir, sizeof g_dir, "/tmp/blip_hostile.XXXXXX");
  if (!mkdtemp(g_dir)) return 1;
  test_untrusted_formats();
  test_png_chunks();
  test_fifo();
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
  if (system(cmd)) fprintf(stderr, "cleanup failed\n");
  return check_summary();
}
