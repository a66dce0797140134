/* bench_image: what blip_img costs per photo, against the ~0.35 s fp32
 * vision forward it feeds (the target is under 10% of that).
 *  - one generated 12-megapixel JPEG: decode+preprocess on the exact path and
 *    with shrink-on-load, plus the PIL-exact resize alone; and a 640x480 one;
 *  - the level difference shrink-on-load makes, on the fixture photos
 *    enlarged to 12 MP (the fixtures themselves are too small to shrink);
 *  - images/s over a folder of generated photos with 1 and 2 threads
 *    (one image per thread, libvips concurrency 1);
 *  - the same through blip_decode's isolated worker processes (what every
 *    tool uses), against the in-process decode: the price of isolation.
 * Usage: bench_image [--json] [--n N] [--runs R] [--fixtures DIR] */
#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <vips/vips.h>

#include "blip_arg.h"
#include "blip_decode.h"
#include "blip_err.h"
#include "blip_img.h"

#define VISION_S 0.35 /* fp32 ViT-B/16 at 384 px on 2 cores (docs/deps.md) */

static char g_dir[256];
static int g_nfiles;
static char (*g_files)[300];
static blip_decode *g_dec; /* when set, decodes go through the isolated workers */

static int load(const char *path, const blip_img_opts *o, float *out, uint8_t *rgb) {
  return g_dec ? blip_decode_file(g_dec, path, o, out, rgb, NULL, NULL) : blip_img_load_file(path, o, out, rgb, NULL);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* A photo-like 4000x3000 JPEG: a smooth colour field plus sensor-like noise
 * (noise is what makes entropy decoding cost what it does on real photos). */
static int make_photo(const char *path, VipsImage *content, int w, int h, int seed) {
  VipsImage *big = NULL, *noise = NULL, *sum = NULL, *u8 = NULL;
  int rc = -1;
  if (vips_resize(content, &big, (double)w / content->Xsize, "vscale", (double)h / content->Ysize, NULL) ||
      vips_gaussnoise(&noise, w, h, "sigma", 6.0, "mean", 0.0, "seed", seed, NULL) ||
      vips_add(big, noise, &sum, NULL) || vips_cast_uchar(sum, &u8, NULL))
    goto done;
  rc = vips_jpegsave(u8, path, "Q", 90, NULL);
done:
  if (rc) {
    fprintf(stderr, "bench_image: generating %s: %s\n", path, vips_error_buffer());
    vips_error_clear();
  }
  if (big) g_object_unref(big);
  if (noise) g_object_unref(noise);
  if (sum) g_object_unref(sum);
  if (u8) g_object_unref(u8);
  return rc;
}

/* Median wall time; *cpu gets the median process CPU time, which other
 * load on a shared machine does not inflate. */
static double time_load(const char *path, const blip_img_opts *o, int runs, float *out, uint8_t *rgb, double *cpu) {
  double t[64], c[64];
  if (runs > 64) runs = 64;
  for (int r = 0; r < runs; r++) {
    double t0 = now_s(), c0 = cpu_s();
    if (load(path, o, out, rgb)) {
      fprintf(stderr, "bench_image: %s\n", blip_err_last());
      return -1;
    }
    t[r] = now_s() - t0;
    c[r] = cpu_s() - c0;
  }
  qsort(t, runs, sizeof *t, cmp_d);
  qsort(c, runs, sizeof *c, cmp_d);
  *cpu = c[runs / 2];
  return t[runs / 2];
}

typedef struct {
  const blip_img_opts *o;
  atomic_int next, errors;
} pool;

static void *worker(void *arg) {
  pool *p = arg;
  int s = p->o->size;
  float *out = malloc(sizeof(float) * 3 * s * s);
  for (int i; out && (i = atomic_fetch_add(&p->next, 1)) < g_nfiles;)
    if (load(g_files[i], p->o, out, NULL)) atomic_fetch_add(&p->errors, 1);
  free(out);
  vips_thread_shutdown();
  return NULL;
}

/* Wall-clock images/s; *cpu_ms gets CPU time per image, which other load on
 * a shared machine does not inflate. */
static double images_per_s(const blip_img_opts *o, int threads, double *cpu_ms) {
  pool p = {o, 0, 0};
  pthread_t th[16];
  double t0 = now_s(), c0 = cpu_s();
  for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, worker, &p);
  for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
  double dt = now_s() - t0;
  *cpu_ms = (cpu_s() - c0) * 1e3 / g_nfiles;
  if (p.errors) fprintf(stderr, "bench_image: %d errors\n", (int)p.errors);
  return g_nfiles / dt;
}

static void usage(void) {
  printf("usage: bench_image [--json] [--n N] [--runs R] [--fixtures DIR]\n"
         "  Times blip_img decode+preprocess on generated 12-megapixel JPEGs.\n"
         "  --n N          photos in the threaded folder run (default 48)\n"
         "  --runs R       repetitions for single-image timings, median reported (default 5)\n"
         "  --fixtures DIR photos to enlarge for the shrink-on-load difference\n"
         "                 (default tests/data/preprocess/images)\n"
         "  --json         one JSON object on stdout instead of text\n");
}

int main(int argc, char **argv) {
  int json = 0, n = 48, runs = 5;
  const char *fixtures = "tests/data/preprocess/images";
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--json")) json = 1;
    else if (!strcmp(argv[i], "--n") && i + 1 < argc) n = (int)blip_arg_must("bench_image", "--n", argv[++i], 1, 1000000);
    else if (!strcmp(argv[i], "--runs") && i + 1 < argc) runs = (int)blip_arg_must("bench_image", "--runs", argv[++i], 1, 1000000);
    else if (!strcmp(argv[i], "--fixtures") && i + 1 < argc) fixtures = argv[++i];
    else {
      usage();
      return strcmp(argv[i], "--help") && strcmp(argv[i], "-h") ? 2 : 0;
    }
  }
  if (n < 1 || n > 10000 || runs < 1) {
    usage();
    return 2;
  }
  if (blip_img_init()) {
    fprintf(stderr, "bench_image: %s\n", blip_err_last());
    return 1;
  }
  snprintf(g_dir, sizeof g_dir, "%s/bench_image_XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(g_dir)) {
    perror("mkdtemp");
    return 1;
  }
  /* content: the fixture photos, 3 bands */
  VipsImage *content[16];
  int ncontent = 0;
  DIR *d = opendir(fixtures);
  struct dirent *e;
  while (d && (e = readdir(d)) && ncontent < 16) {
    char path[600];
    VipsImage *im, *rgb = NULL;
    if (e->d_name[0] == '.') continue;
    snprintf(path, sizeof path, "%s/%s", fixtures, e->d_name);
    if (!(im = vips_image_new_from_file(path, NULL))) {
      vips_error_clear();
      continue;
    }
    VipsImage *b3 = NULL;
    int ok = !vips_colourspace(im, &rgb, VIPS_INTERPRETATION_sRGB, NULL) &&
             !vips_extract_band(rgb, &b3, 0, "n", 3, NULL);
    g_object_unref(im);
    if (rgb) g_object_unref(rgb);
    if (!ok) {
      vips_error_clear();
      continue;
    }
    content[ncontent++] = b3;
  }
  if (d) closedir(d);
  if (!ncontent) {
    fprintf(stderr, "bench_image: no fixture photos in %s (run from the repo root or pass --fixtures)\n", fixtures);
    return 1;
  }
  if (!json) fprintf(stderr, "generating %d photos of 4000x3000 in %s ...\n", n + ncontent, g_dir);
  g_files = calloc(n + ncontent, sizeof *g_files);
  for (int i = 0; i < n + ncontent; i++) {
    snprintf(g_files[i], sizeof g_files[0], "%s/photo%03d.jpg", g_dir, i);
    if (make_photo(g_files[i], content[i % ncontent], 4000, 3000, i)) return 1;
  }

  blip_img_opts ex, sh;
  blip_img_opts_default(&ex);
  ex.autorotate = 0;
  sh = ex;
  sh.shrink_on_load = 1;
  int S = ex.size;
  float *out = malloc(sizeof(float) * 3 * S * S);
  uint8_t *a = malloc(3 * S * S), *b = malloc(3 * S * S);

  /* 1. one 12 MP JPEG */
  const char *one = g_files[0];
  double c_exact, c_shrink;
  double t_exact = time_load(one, &ex, runs, out, a, &c_exact), t_shrink = time_load(one, &sh, runs, out, b, &c_shrink);
  if (t_exact < 0 || t_shrink < 0) return 1;
  /* a COCO-sized photo, as in the recall benchmarks */
  char small[300];
  snprintf(small, sizeof small, "%s/small.jpg", g_dir);
  if (make_photo(small, content[0], 640, 480, 7)) return 1;
  double c_small, t_small = time_load(small, &ex, runs, out, a, &c_small);
  /* the same two through warm isolated workers (2, for the folder run below) */
  blip_decode_opts dopt;
  blip_decode_opts_default(&dopt);
  dopt.workers = 2;
  if (blip_decode_new(&dopt, &g_dec) || blip_decode_start(g_dec)) {
    fprintf(stderr, "bench_image: %s\n", blip_err_last());
    return 1;
  }
  double c_iso, t_iso_exact = time_load(one, &ex, runs, out, a, &c_iso);
  double t_iso_small = time_load(small, &ex, runs, out, a, &c_iso);
  blip_decode *dec = g_dec;
  g_dec = NULL;
  unlink(small);
  /* the resize alone, on the full-resolution pixels */
  uint8_t *full = malloc((size_t)4000 * 3000 * 3);
  double rt[64], rc[64];
  VipsImage *im = vips_image_new_from_file(one, NULL);
  size_t len = 0;
  void *px = im ? vips_image_write_to_memory(im, &len) : NULL;
  if (!px || len != (size_t)4000 * 3000 * 3) {
    fprintf(stderr, "bench_image: decode for resize timing failed\n");
    return 1;
  }
  memcpy(full, px, len);
  g_free(px);
  g_object_unref(im);
  int rr = runs > 64 ? 64 : runs;
  for (int r = 0; r < rr; r++) {
    double t0 = now_s(), c0 = cpu_s();
    blip_img_resize_rgb(full, 4000, 3000, a, S, S);
    rt[r] = now_s() - t0;
    rc[r] = cpu_s() - c0;
  }
  qsort(rt, rr, sizeof *rt, cmp_d);
  qsort(rc, rr, sizeof *rc, cmp_d);
  double t_resize = rt[rr / 2], c_resize = rc[rr / 2];
  free(full);

  /* 2. shrink-on-load difference on enlarged fixtures (last ncontent files) */
  int dmax = 0;
  double dsum = 0, exact_frac = 0, tmax = 0, tsum = 0;
  long cnt = 0;
  for (int i = n; i < n + ncontent; i++) {
    float *fo = malloc(sizeof(float) * 3 * S * S);
    if (blip_img_load_file(g_files[i], &ex, out, a, NULL) || blip_img_load_file(g_files[i], &sh, fo, b, NULL)) {
      fprintf(stderr, "bench_image: %s\n", blip_err_last());
      return 1;
    }
    long ex_n = 0;
    for (int j = 0; j < 3 * S * S; j++) {
      int dd = abs(a[j] - b[j]);
      if (dd > dmax) dmax = dd;
      dsum += dd;
      ex_n += dd == 0;
      double df = out[j] > fo[j] ? out[j] - fo[j] : fo[j] - out[j];
      if (df > tmax) tmax = df;
      tsum += df;
    }
    exact_frac += (double)ex_n / (3 * S * S);
    cnt += 3 * S * S;
    free(fo);
  }
  exact_frac /= ncontent;

  /* 3. throughput over the folder (the first n files) */
  int all = g_nfiles = n;
  double cpu_ex1, cpu_ex2, cpu_sh1, cpu_sh2;
  double ips_ex1 = images_per_s(&ex, 1, &cpu_ex1), ips_ex2 = images_per_s(&ex, 2, &cpu_ex2);
  double ips_sh1 = images_per_s(&sh, 1, &cpu_sh1), ips_sh2 = images_per_s(&sh, 2, &cpu_sh2);
  double cpu_iso;
  g_dec = dec;
  double ips_iso2 = images_per_s(&ex, 2, &cpu_iso);
  g_dec = NULL;
  blip_decode_free(dec);
  (void)all;

  if (json) {
    printf("{\"jpeg_12mp_exact_ms\": %.2f, \"jpeg_12mp_shrink_ms\": %.2f, \"resize_12mp_ms\": %.2f, "
           "\"jpeg_640x480_exact_ms\": %.2f, \"jpeg_640x480_exact_cpu_ms\": %.2f, \"jpeg_12mp_exact_cpu_ms\": %.2f, \"jpeg_12mp_shrink_cpu_ms\": %.2f, \"resize_12mp_cpu_ms\": %.2f, "
           "\"shrink_vs_exact\": {\"photos\": %d, \"max_level\": %d, \"mean_level\": %.4f, \"bit_exact\": %.4f, "
           "\"tensor_max_abs\": %.5f, \"tensor_mean_abs\": %.6f}, "
           "\"folder\": {\"photos\": %d, \"exact_1t\": %.2f, \"exact_2t\": %.2f, \"shrink_1t\": %.2f, \"shrink_2t\": %.2f, "
           "\"exact_cpu_ms_per_image\": %.1f, \"shrink_cpu_ms_per_image\": %.1f}, "
           "\"isolated\": {\"jpeg_12mp_exact_ms\": %.2f, \"jpeg_640x480_exact_ms\": %.2f, \"folder_exact_2t\": %.2f}, "
           "\"vision_forward_s\": %.2f}\n",
           t_exact * 1e3, t_shrink * 1e3, t_resize * 1e3, t_small * 1e3, c_small * 1e3, c_exact * 1e3, c_shrink * 1e3, c_resize * 1e3, ncontent, dmax, dsum / cnt, exact_frac, tmax, tsum / cnt, n,
           ips_ex1, ips_ex2, ips_sh1, ips_sh2, cpu_ex2, cpu_sh2, t_iso_exact * 1e3, t_iso_small * 1e3, ips_iso2,
           VISION_S);
  } else {
    printf("12 MP JPEG (4000x3000, Q90) -> %dx%d tensor, median of %d (wall / CPU):\n", S, S, runs);
    printf("  exact path         %7.1f / %6.1f ms  (CPU = %4.1f%% of a %.2f s vision forward)\n", t_exact * 1e3,
           c_exact * 1e3, 100 * c_exact / VISION_S, VISION_S);
    printf("  shrink-on-load     %7.1f / %6.1f ms  (%4.1f%%)  %.2fx less CPU\n", t_shrink * 1e3, c_shrink * 1e3,
           100 * c_shrink / VISION_S, c_exact / c_shrink);
    printf("  PIL-exact resize   %7.1f / %6.1f ms  (%4.1f%%)  (its share of the exact path)\n", t_resize * 1e3, c_resize * 1e3,
           100 * c_resize / VISION_S);
    printf("640x480 JPEG, exact path %5.1f / %5.1f ms  (%4.1f%%)\n", t_small * 1e3, c_small * 1e3,
           100 * c_small / VISION_S);
    printf("shrink-on-load vs exact, %d fixture photos enlarged to 12 MP:\n", ncontent);
    printf("  resized u8: max %d levels, mean %.4f, %.2f%% bit-exact; tensor max|diff| %.4f mean %.5f\n", dmax,
           dsum / cnt, 100 * exact_frac, tmax, tsum / cnt);
    printf("folder of %d 12 MP JPEGs, images/s (1 thread / 2 threads):\n", n);
    printf("  exact path        %6.2f / %6.2f   CPU per image %5.1f ms (1t) %5.1f ms (2t)\n", ips_ex1, ips_ex2,
           cpu_ex1, cpu_ex2);
    printf("  shrink-on-load    %6.2f / %6.2f   CPU per image %5.1f ms (1t) %5.1f ms (2t)\n", ips_sh1, ips_sh2,
           cpu_sh1, cpu_sh2);
    printf("isolated decode (blip_decode worker processes, wall): 12 MP %.1f ms (%.2fx in-process), "
           "640x480 %.1f ms (%.2fx), folder %.2f images/s with 2 workers (%.2fx)\n",
           t_iso_exact * 1e3, t_iso_exact / t_exact, t_iso_small * 1e3, t_iso_small / t_small, ips_iso2,
           ips_iso2 / ips_ex2);
    printf("  the fp32 vision encoder: ~%.1f images/s, %.0f CPU-ms per image on the same 2 cores;\n"
           "  preprocessing share of CPU: exact %.1f%%, shrink-on-load %.1f%%\n",
           1 / VISION_S, 2e3 * VISION_S, 100 * cpu_ex2 / (2e3 * VISION_S), 100 * cpu_sh2 / (2e3 * VISION_S));
  }
  for (int i = 0; i < n + ncontent; i++) unlink(g_files[i]);
  rmdir(g_dir);
  for (int i = 0; i < ncontent; i++) g_object_unref(content[i]);
  free(g_files);
  free(out);
  free(a);
  free(b);
  return 0;
}
