/* test_decode: the isolated decode path (blip_decode). Pixels and metadata
 * equal the in-process decode bit for bit; the fingerprint is XXH3-64 of
 * every byte and size/mtime are the descriptor's. Then a worker made to
 * crash, abort, hang or balloon (BLIP_TEST_DECODER_FAULT=1, a file named
 * *blip-fault-KIND*) costs that file one clear error and the next file decodes
 * in a fresh worker; a stop request ends a hung decode; a FIFO is refused
 * without blocking; a memory budget of one byte serializes the decodes. */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vips/vips.h>
#include <xxhash.h>

#include "blip_decode.h"
#include "blip_err.h"
#include "blip_img.h"
#include "check.h"

#define S 64
static char g_dir[256];

static const char *tmp_path(const char *name) {
  static char buf[4][512];
  static int k;
  char *b = buf[k++ & 3];
  snprintf(b, sizeof buf[0], "%s/%s", g_dir, name);
  return b;
}

static void make_photo(const char *name, int w, int h, double seed) {
  VipsImage *x = NULL, *y = NULL, *z = NULL;
  /* a gradient with some structure, so that resizing is not trivial */
  if (!vips_xyz(&x, w, h, NULL) && !vips_linear1(x, &y, 3.0 + seed, seed * 17, NULL) &&
      !vips_cast_uchar(y, &z, NULL)) {
    VipsImage *b[3] = {NULL, NULL, NULL}, *rgb = NULL;
    if (!vips_extract_band(z, &b[0], 0, NULL) && !vips_extract_band(z, &b[1], 1, NULL) &&
        !vips_invert(b[0], &b[2], NULL) && !vips_bandjoin(b, &rgb, 3, NULL))
      vips_image_write_to_file(rgb, tmp_path(name), NULL);
    for (int i = 0; i < 3; i++)
      if (b[i]) g_object_unref(b[i]);
    if (rgb) g_object_unref(rgb);
  }
  if (x) g_object_unref(x);
  if (y) g_object_unref(y);
  if (z) g_object_unref(z);
  vips_error_clear();
}

static uint64_t file_hash(const char *path, int64_t *size) {
  FILE *f = fopen(path, "rb");
  if (!f) return 0;
  static uint8_t buf[1 << 22];
  size_t n = fread(buf, 1, sizeof buf, f);
  fclose(f);
  *size = (int64_t)n;
  return XXH3_64bits(buf, n);
}

static void opts(blip_img_opts *o) {
  blip_img_opts_default(o);
  o->size = S;
}

static void test_same_as_in_process(void) {
  static const char *names[] = {"a.jpg", "b.png", "c.webp", "d.tif"};
  blip_decode_opts dopt;
  blip_decode_opts_default(&dopt);
  blip_decode *d = NULL;
  CHECK_OK(blip_decode_new(&dopt, &d));
  blip_img_opts o;
  opts(&o);
  for (int i = 0; i < 4; i++) {
    make_photo(names[i], 97 + i * 13, 61 + i * 7, i);
    static float a[3 * S * S], b[3 * S * S];
    static uint8_t ra[3 * S * S], rb[3 * S * S];
    blip_img_meta ma, mb;
    blip_decode_info info;
    int r1 = blip_img_load_file(tmp_path(names[i]), &o, a, ra, &ma);
    int r2 = blip_decode_file(d, tmp_path(names[i]), &o, b, rb, &mb, &info);
    CHECK(r1 == 0 && r2 == 0, "%s: %d %d %s", names[i], r1, r2, blip_err_last());
    CHECK(!memcmp(a, b, sizeof a) && !memcmp(ra, rb, sizeof ra), "%s: isolated decode differs", names[i]);
    CHECK(ma.width == mb.width && ma.height == mb.height && mb.width == 97 + i * 13, "%s: meta", names[i]);
    int64_t size = 0;
    uint64_t h = file_hash(tmp_path(names[i]), &size);
    struct stat st;
    stat(tmp_path(names[i]), &st);
    CHECK(info.read && info.fingerprint == h && info.size == size && info.size == st.st_size &&
              info.mtime_ns == (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec,
          "%s: info", names[i]);
    blip_decode_info fi;
    CHECK(blip_decode_fingerprint(tmp_path(names[i]), 1 << 30, &fi) == 0 && fi.fingerprint == h, "fingerprint");
  }
  /* errors from the worker carry the file name */
  FILE *f = fopen(tmp_path("notes.jpg"), "w");
  if (f) fputs("hello, not a photo\n", f), fclose(f);
  int rc = blip_decode_file(d, tmp_path("notes.jpg"), &o, NULL, NULL, NULL, NULL);
  CHECK(rc == BLIP_EUNSUPPORTED && strstr(blip_err_last(), "notes.jpg: unsupported"), "text: %s", blip_err_last());
  /* a FIFO is refused at open */
  mkfifo(tmp_path("x.jpg"), 0600);
  alarm(20);
  rc = blip_decode_file(d, tmp_path("x.jpg"), &o, NULL, NULL, NULL, NULL);
  alarm(0);
  CHECK(rc == BLIP_EIO && strstr(blip_err_last(), "not a regular file"), "fifo: %s", blip_err_last());
  blip_decode_free(d);
}

/* One pool per fault kind (workers read the variable when they start). */
static void fault_case(const char *kind, double budget_s, int want_rc, const char *want) {
  setenv("BLIP_TEST_DECODER_FAULT", "1", 1);
  blip_decode_opts dopt;
  blip_decode_opts_default(&dopt);
  dopt.memory_cap = (int64_t)512 << 20;
  blip_decode *d = NULL;
  CHECK_OK(blip_decode_new(&dopt, &d));
  blip_img_opts o;
  opts(&o);
  o.time_budget_s = budget_s;
  char name[64];
  snprintf(name, sizeof name, "blip-fault-%s.jpg", kind);
  make_photo(name, 50, 40, 3);
  for (int round = 0; round < 2; round++) { /* the second round runs in a fresh worker */
    blip_decode_info info;
    int rc = blip_decode_file(d, tmp_path(name), &o, NULL, NULL, NULL, &info);
    CHECK(rc == want_rc && strstr(blip_err_last(), want), "%s: rc %d %s", kind, rc, blip_err_last());
    CHECK(info.read && info.size > 0, "%s: info of the failed file", kind);
    printf("  %-8s %s\n", kind, blip_err_last());
    rc = blip_decode_file(d, tmp_path("a.jpg"), &o, NULL, NULL, NULL, NULL);
    CHECK(rc == 0, "%s: the next file: %s", kind, blip_err_last());
  }
  blip_decode_free(d);
  unsetenv("BLIP_TEST_DECODER_FAULT");
}

static volatile sig_atomic_t g_stop;
static void *stop_soon(void *arg) {
  usleep(300000);
  g_stop = 1;
  return NULL;
}

static void test_stop(void) {
  setenv("BLIP_TEST_DECODER_FAULT", "1", 1);
  blip_decode_opts dopt;
  blip_decode_opts_default(&dopt);
  dopt.stop = &g_stop;
  blip_decode *d = NULL;
  CHECK_OK(blip_decode_new(&dopt, &d));
  blip_img_opts o;
  opts(&o);
  o.time_budget_s = 600; /* only the stop can end it within the test's time */
  pthread_t th;
  pthread_create(&th, NULL, stop_soon, NULL);
  int rc = blip_decode_file(d, tmp_path("blip-fault-hang.jpg"), &o, NULL, NULL, NULL, NULL);
  pthread_join(th, NULL);
  CHECK(rc == BLIP_EINTR && strstr(blip_err_last(), "stopped"), "stop: %d %s", rc, blip_err_last());
  blip_decode_free(d);
  unsetenv("BLIP_TEST_DECODER_FAULT");
  g_stop = 0;
}

typedef struct {
  blip_decode *d;
  int k, rc;
} job;

static void *decode_some(void *arg) {
  job *j = arg;
  blip_img_opts o;
  opts(&o);
  static const char *names[] = {"a.jpg", "b.png", "c.webp", "d.tif"};
  for (int i = 0; i < 6 && !j->rc; i++) j->rc = blip_decode_file(j->d, tmp_path(names[(i + j->k) % 4]), &o, NULL, NULL, NULL, NULL);
  return NULL;
}

static void test_budget(void) {
  for (int tiny = 1; tiny >= 0; tiny--) {
    blip_decode_opts dopt;
    blip_decode_opts_default(&dopt);
    dopt.workers = 3;
    if (tiny) dopt.memory_budget = 1;
    blip_decode *d = NULL;
    CHECK_OK(blip_decode_new(&dopt, &d));
    job j[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
      j[i] = (job){d, i, 0};
      pthread_create(&th[i], NULL, decode_some, &j[i]);
    }
    for (int i = 0; i < 3; i++) {
      pthread_join(th[i], NULL);
      CHECK(j[i].rc == 0, "thread %d: %s", i, blip_err_last());
    }
    int peak = blip_decode_peak(d);
    if (tiny) CHECK(peak == 1, "a 1-byte budget let %d decodes run at once", peak);
    else CHECK(peak >= 1 && peak <= 3, "peak %d", peak);
    printf("  budget %s: at most %d decodes at once\n", tiny ? "1 byte" : "default", peak);
    blip_decode_free(d);
  }
}

int main(void) {
  if (blip_img_init()) return 1;
  snprintf(g_dir, sizeof g_dir, "/tmp/blip_decode.XXXXXX");
  if (!mkdtemp(g_dir)) return 1;
  test_same_as_in_process();
  fault_case("crash", 2, BLIP_EFORMAT, "decoder crashed (SIGSEGV)");
  fault_case("abort", 2, BLIP_EFORMAT, "decoder crashed (SIGABRT)");
  fault_case("hang", 2, BLIP_EINTR, "decoder exceeded 2 s");
  /* 30 s: under ASan the cap is watched on RSS, which grows at a few hundred MB/s */
  fault_case("balloon", 30, BLIP_ETOOBIG, "decoder exceeded its memory cap (512 MiB)");
  test_stop();
  test_budget();
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
  if (system(cmd)) fprintf(stderr, "cleanup failed\n");
  return check_summary();
}
