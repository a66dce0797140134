/* bench_engine: speed of the engine at a real BLIP geometry with random
 * weights (no file needed), per compute precision (f32, bf16, int8), all
 * in one process so that the ratios between precisions are measured under
 * the same machine load. Each precision is reported against its own peak,
 * measured by the same run with a dependency-free loop of the instruction
 * its GEMMs use (FMA, vdpbf16ps, vpdpbusd). --memory runs one indexing or
 * query workload and reports peak RSS (one process per precision).
 * Nothing here is asserted; the figures go into reports. */
#include "blip_arg.h"
#include "blip_err.h"
#include "blip_kern.h"
#include "blip_model.h"

#include <getopt.h>
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <string.h>
#include <math.h>
#include <time.h>

static float bf16_f32(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Peak fp32 FLOP/s: 16 independent zmm FMA chains per thread (enough to
 * cover FMA latency x pipes), on every thread at once. */
#define FMA16(op)                                                                                  \
  op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11) op(12) op(13) op(14) op(15)
__attribute__((target("avx512f"))) static double peak_f32(int threads, int reps) {
  const long iters = 10000000;
  double best = 0;
  for (int rep = 0; rep < reps; rep++) {
    double t0 = now();
    float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
#define DECL(i) __m512 a##i = _mm512_set1_ps((float)i);
      FMA16(DECL)
      for (long it = 0; it < iters; it++) {
#define STEP(i) a##i = _mm512_fmadd_ps(a##i, b, c);
        FMA16(STEP)
      }
#define SUM(i) sink += _mm512_reduce_add_ps(a##i);
      FMA16(SUM)
    }
    double dt = now() - t0, f = (double)threads * iters * 16 * 16 * 2 / dt;
    if (f > best) best = f;
    if (sink == 12345.0f) printf(" ");
  }
  return best;
}

/* Peak bf16 FLOP/s: vdpbf16ps does 16 lanes x 2 products = 64 FLOP. */
__attribute__((target("avx512f,avx512bf16"))) static double peak_bf16(int threads, int reps) {
  const long iters = 10000000;
  double best = 0;
  for (int rep = 0; rep < reps; rep++) {
    double t0 = now();
    float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3f80), c = (__m512bh)_mm512_set1_epi16(0x3380);
#define DECLB(i) __m512 a##i = _mm512_set1_ps((float)i);
      FMA16(DECLB)
      for (long it = 0; it < iters; it++) {
#define STEPB(i) a##i = _mm512_dpbf16_ps(a##i, b, c);
        FMA16(STEPB)
      }
      FMA16(SUM)
    }
    double dt = now() - t0, f = (double)threads * iters * 16 * 64 / dt;
    if (f > best) best = f;
    if (sink == 12345.0f) printf(" ");
  }
  return best;
}

/* Peak int8 OP/s: vpdpbusd does 16 lanes x 4 u8*s8 products = 128 OP. */
__attribute__((target("avx512f,avx512vnni"))) static double peak_int8(int threads, int reps) {
  const long iters = 10000000;
  double best = 0;
  for (int rep = 0; rep < reps; rep++) {
    double t0 = now();
    unsigned sink = 0; /* wraps: only there so the loop is not optimized away */
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      const __m512i b = _mm512_set1_epi8(1), c = _mm512_set1_epi8(-1);
#define DECLI(i) __m512i a##i = _mm512_set1_epi32(i);
      FMA16(DECLI)
      for (long it = 0; it < iters; it++) {
#define STEPI(i) a##i = _mm512_dpbusd_epi32(a##i, b, c);
        FMA16(STEPI)
      }
#define SUMI(i) sink += (unsigned)_mm512_reduce_add_epi32(a##i);
      FMA16(SUMI)
    }
    double dt = now() - t0, f = (double)threads * iters * 16 * 128 / dt;
    if (f > best) best = f;
    if (sink == 12345) printf(" ");
  }
  return best;
}

static double vision_flops(const blip_cfg *c) {
  double T = c->v_tokens, D = c->v_hidden, P = 3.0 * c->patch * c->patch, F = c->v_mlp;
  double per_layer = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * F;
  return 2 * (T - 1) * P * D + c->v_layers * per_layer;
}


typedef struct {
  double init_s, vis[2], text_ms, itm[2][3]; /* vis: s/image at batch 1, 8; itm[fast][k] ms */
} result;

#define MIN_INTO(dst, expr)                                                                        \
  do {                                                                                           \
    double s_ = now();                                                                           \
    if (expr) return -1;                                                                         \
    double d_ = now() - s_;                                                                      \
    if (d_ < (dst)) (dst) = d_;                                                                  \
  } while (0)

/* All precisions are loaded at once and every measurement round runs them
 * back to back (f32, bf16, int8, f32, ...), keeping each one's best time:
 * load from other users of the machine then hits all precisions alike,
 * which keeps the ratios meaningful on a shared machine. */
static int run_all(const blip_cfg *c, blip_model **m, int np, const int *precs, int reps, int naive, result *r, const float *px,
                   float *emb) {
  const int T = c->v_tokens;
  float feat[8 * 256], logits[64];
  int batches[2] = {1, 8}, ks[3] = {1, 16, 32};
  int32_t ids[12] = {101, 1037, 3899, 2770, 2006, 1037, 3509, 2007, 2019, 4399, 2067, 102}, mask[12];
  for (int i = 0; i < 12; i++) mask[i] = 1;
  for (int p = 0; p < np; p++) {
    result *q = &r[precs[p]];
    q->vis[0] = q->vis[1] = q->text_ms = 1e9;
    for (int f = 0; f < 2; f++)
      for (int k = 0; k < 3; k++) q->itm[f][k] = (f || naive) ? 1e9 : 0;
  }
  for (int bi = 0; bi < 2; bi++)
    for (int rep = 0; rep <= reps; rep++) /* round 0 builds the primitives; not counted */
      for (int p = 0; p < np; p++) {
        double t = 1e9;
        MIN_INTO(t, blip_model_vision(m[p], px, batches[bi], emb, feat));
        if (rep && t / batches[bi] < r[precs[p]].vis[bi]) r[precs[p]].vis[bi] = t / batches[bi];
      }
  for (int i = 1; i < 32; i++) memcpy(emb + (size_t)i * T * c->v_hidden, emb + (size_t)(i % 8) * T * c->v_hidden, sizeof(float) * T * c->v_hidden);
  for (int rep = 0; rep <= reps + 2; rep++)
    for (int p = 0; p < np; p++) {
      double t = 1e9;
      MIN_INTO(t, blip_model_text(m[p], ids, mask, 1, 12, NULL, feat));
      if (rep && t * 1e3 < r[precs[p]].text_ms) r[precs[p]].text_ms = t * 1e3;
    }
  const float *imgs[32];
  for (int i = 0; i < 32; i++) imgs[i] = emb + (size_t)i * T * c->v_hidden;
  for (int fast = 1; fast >= (naive ? 0 : 1); fast--)
    for (int ki = 0; ki < 3; ki++)
      for (int rep = 0; rep <= (fast ? reps : 1); rep++)
        for (int p = 0; p < np; p++) {
          double t = 1e9;
          MIN_INTO(t, blip_model_itm(m[p], ids, 12, imgs, ks[ki], BLIP_ITM_ENC, fast, logits, NULL));
          if (rep && t * 1e3 < r[precs[p]].itm[fast][ki]) r[precs[p]].itm[fast][ki] = t * 1e3;
        }
  return 0;
}

/* VmRSS and VmHWM of this process in KiB (Linux /proc; -1 if unknown), from
 * one read: the kernel computes both in one snapshot with HWM >= RSS, which
 * two reads do not keep when memory is freed between them. */
static void proc_mem(long *rss, long *hwm) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  *rss = *hwm = -1;
  while (f && fgets(line, sizeof line, f)) {
    if (!strncmp(line, "VmRSS:", 6)) *rss = atol(line + 6);
    if (!strncmp(line, "VmHWM:", 6)) *hwm = atol(line + 6);
  }
  if (f) fclose(f);
}

/* Reset the peak-RSS mark (Linux: "5" to clear_refs), so that the peak of
 * the workload is measured apart from the load, whose f32 staging of the
 * weights before conversion is a one-off. Returns 0 on success. */
static int reset_hwm(void) {
  FILE *f = fopen("/proc/self/clear_refs", "w");
  if (!f) return -1;
  int ok = fputs("5", f) >= 0;
  return (fclose(f) == 0 && ok) ? 0 : -1;
}

/* One indexing (vision, batch 8) or query (text + ITM k=32) workload at
 * one precision; reports the peak RSS of the load, the RSS once loaded,
 * and the peak RSS of the workload. */
static int run_memory(const blip_cfg *c, blip_prec prec, const char *what, int json) {
  blip_model_opts o = {.precision = prec};
  blip_model *m;
  if (blip_model_random(c, &o, 1, &m)) return -1;
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  long load_peak = ru.ru_maxrss, loaded, hwm;
  proc_mem(&loaded, &hwm);
  int reset = reset_hwm() == 0;
  const int S = c->image_size, T = c->v_tokens;
  int rc = -1, query = !strcmp(what, "query");
  float *px = NULL, *emb = malloc(sizeof(float) * (query ? 32 : 8) * T * c->v_hidden), feat[8 * 256];
  if (!emb) goto done;
  if (!query) {
    px = malloc(sizeof(float) * 8 * 3 * S * S);
    if (!px) goto done;
    for (long i = 0; i < 8L * 3 * S * S; i++) px[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
    if (blip_model_vision(m, px, 8, NULL, feat)) goto done;
  } else {
    for (long i = 0; i < 32L * T * c->v_hidden; i++) emb[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
    int32_t ids[12] = {101, 1037, 3899, 2770, 2006, 1037, 3509, 2007, 2019, 4399, 2067, 102}, mask[12];
    for (int i = 0; i < 12; i++) mask[i] = 1;
    const float *imgs[32];
    for (int i = 0; i < 32; i++) imgs[i] = emb + (size_t)i * T * c->v_hidden;
    float logits[64];
    if (blip_model_text(m, ids, mask, 1, 12, NULL, feat) || blip_model_itm(m, ids, 12, imgs, 32, BLIP_ITM_ENC, 1, logits, NULL))
      goto done;
  }
  getrusage(RUSAGE_SELF, &ru);
  long rss, work_peak = ru.ru_maxrss;
  if (reset) proc_mem(&rss, &work_peak);
  if (json)
    printf("{\"precision\":\"%s\",\"workload\":\"%s\",\"load_peak_rss_mib\":%.1f,\"loaded_rss_mib\":%.1f,\"workload_peak_rss_mib\":%.1f}\n",
           blip_model_precision_name(prec), what, load_peak / 1024.0, loaded / 1024.0, work_peak / 1024.0);
  else
    printf("%-4s %-5s workload peak RSS %7.1f MiB, loaded %7.1f MiB, load peak %7.1f MiB%s\n", blip_model_precision_name(prec), what, work_peak / 1024.0,
           loaded / 1024.0, load_peak / 1024.0, reset ? "" : " (peak mark not resettable: workload peak includes the load)");
  rc = 0;
done:
  free(px);
  free(emb);
  blip_model_free(m);
  return rc;
}

/* Memory read bandwidth in bytes/s: every thread sums its share of a
 * buffer far larger than the last-level cache with 512-bit loads, best of
 * `reps`. The 12-token text encoder reads each weight once per query, so
 * weight bytes / this bandwidth bounds its time from below. */
#define BW_BYTES (512L << 20)
__attribute__((target("avx512f"))) static double bandwidth(int threads, int reps) {
  static float *buf;
  if (!buf) {
    if (!(buf = aligned_alloc(64, BW_BYTES))) return 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < BW_BYTES / 4; i++) buf[i] = (float)(i & 7);
  }
  double best = 0;
  for (int rep = 0; rep < reps; rep++) {
    double t0 = now();
    float sink = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : sink)
    for (long i = 0; i < BW_BYTES / 4; i += 64) {
      __m512 a = _mm512_load_ps(buf + i), b = _mm512_load_ps(buf + i + 16), c = _mm512_load_ps(buf + i + 32),
             d = _mm512_load_ps(buf + i + 48);
      sink += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
    }
    double bw = BW_BYTES / (now() - t0);
    if (bw > best) best = bw;
    if (sink == 12345.0f) printf(" ");
  }
  return best;
}

/* Bytes of weights the text encoder reads per query at a precision (its
 * packed GEMM weights; embeddings and LayerNorms are negligible). */
static double text_weight_bytes(const blip_cfg *c, blip_prec p) {
  double params = (double)c->t_layers * (4.0 * c->t_hidden * c->t_hidden + 2.0 * c->t_hidden * c->t_mlp);
  return params * (p == BLIP_PREC_F32 ? 4 : p == BLIP_PREC_BF16 ? 2 : 1);
}

static int read_f32(const char *dir, const char *name, float *dst, size_t n) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "rb");
  size_t got = f ? fread(dst, sizeof(float), n, f) : 0;
  if (f) fclose(f);
  if (got != n) return blip_err_set(BLIP_EIO, "%s: expected %zu floats", path, n);
  return BLIP_OK;
}

static double cpu_s(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

static void print_floats(const char *key, const float *v, int n) {
  printf(",\"%s\":[", key);
  for (int i = 0; i < n; i++) printf("%s%.7g", i ? "," : "", v[i]);
  printf("]");
}

/* "vision B prof": ms per phase of the encoder and the GFLOP each does. */
static void print_phases(const blip_cfg *c, int n, const double *ms) {
  static const char *name[BLIP_VP_N] = {"embed", "layernorm", "qkv", "attention", "proj", "fc1", "fc2", "wait", "rest"};
  const double T = c->v_tokens, D = c->v_hidden, F = c->v_mlp, l = c->v_layers * n * 1e-9;
  const double gf[BLIP_VP_N] = {2 * (T - 1) * 3.0 * c->patch * c->patch * D * n * 1e-9, 0, l * 2 * T * D * 3 * D, l * 4 * T * T * D,
                                l * 2 * T * D * D, l * 2 * T * D * F, l * 2 * T * F * D, 0, 0};
  printf(",\"phases\":{");
  for (int i = 0; i < BLIP_VP_N; i++) printf("%s\"%s\":{\"ms\":%.3f,\"gflop\":%.6g}", i ? "," : "", name[i], ms[i], gf[i]);
  printf("}");
}

/* --serve: one model from files, commands on stdin, one JSON line each on
 * stdout, so that a driver can interleave this engine with another one
 * call by call (benchmarks/vs-onnxruntime/run.py). Commands:
 *   vision B [prof] | text | itm K [naive] : one timed call (ms, CPU s,
 *     outputs; prof: where the encoder's time goes, per phase)
 *   peaks | bandwidth | rss | quit
 * Inputs: DIR/pixels.f32 [8,3,S,S] and DIR/itm_images.f32 [16,T,Dv]. The
 * peak-RSS mark is reset after the load, so "peak" is the workloads'. */
static int serve(const char *model_dir, const char *inputs, blip_prec prec, int threads) {
  blip_model_opts o = {.precision = prec};
  blip_model *m = NULL;
  double t0 = now();
  if (blip_model_load(model_dir, &o, &m)) return -1;
  double load_s = now() - t0;
  const blip_cfg *c = blip_model_cfg(m);
  enum { KMAX = 16 };
  const int S = c->image_size, T = c->v_tokens, D = c->v_hidden, E = c->embed_dim;
  float *px = malloc(sizeof(float) * 8 * 3 * S * S), *imgs = malloc(sizeof(float) * KMAX * T * D);
  float *feat = malloc(sizeof(float) * 8 * E), logits[2 * KMAX];
  int rc = -1;
  if (!px || !imgs || !feat) {
    blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  if (read_f32(inputs, "pixels.f32", px, (size_t)8 * 3 * S * S) || read_f32(inputs, "itm_images.f32", imgs, (size_t)KMAX * T * D))
    goto done;
  long load_rss, load_hwm;
  proc_mem(&load_rss, &load_hwm);
  int reset = reset_hwm() == 0;
  printf("{\"engine\":\"blipsearch\",\"precision\":\"%s\",\"load_s\":%.3f,\"load_peak_rss_mib\":%.1f,\"vision_team\":%s}\n",
         blip_model_precision_name(prec), load_s, load_hwm / 1024.0, blip_model_vision_team(m) ? "true" : "false");
  fflush(stdout);
  const int32_t ids[12] = {101, 1037, 3899, 2770, 2006, 1037, 3509, 2007, 2019, 4399, 2067, 102};
  const int32_t mask[12] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  const float *im[KMAX];
  for (int i = 0; i < KMAX; i++) im[i] = imgs + (size_t)i * T * D;
  char line[256];
  while (fgets(line, sizeof line, stdin)) {
    char cmd[32] = "", opt[32] = "";
    int arg = 0;
    sscanf(line, "%31s %d %31s", cmd, &arg, opt);
    if (!strcmp(cmd, "quit")) break;
    double w0 = now(), c0 = cpu_s();
    int e = 0, nout = 0;
    const float *out = NULL;
    double ph[BLIP_VP_N] = {0};
    const int prof = !strcmp(cmd, "vision") && !strcmp(opt, "prof");
    if (!strcmp(cmd, "vision") && arg >= 1 && arg <= 8) {
      e = prof ? blip_model_vision_profile(m, px, arg, feat, ph) : blip_model_vision(m, px, arg, NULL, feat);
      out = feat, nout = arg * E;
    } else if (!strcmp(cmd, "text")) {
      e = blip_model_text(m, ids, mask, 1, 12, NULL, feat);
      out = feat, nout = E;
    } else if (!strcmp(cmd, "itm") && arg >= 1 && arg <= KMAX) {
      e = blip_model_itm(m, ids, 12, im, arg, BLIP_ITM_ENC, strcmp(opt, "naive") != 0, logits, NULL);
      out = logits, nout = 2 * arg;
    } else if (!strcmp(cmd, "peaks")) {
      printf("{\"f32_gflops\":%.1f,\"bf16_gflops\":%.1f,\"int8_gops\":%.1f}\n", peak_f32(threads, 1) / 1e9, peak_bf16(threads, 1) / 1e9,
             peak_int8(threads, 1) / 1e9);
    } else if (!strcmp(cmd, "bandwidth")) {
      printf("{\"read_gb_s\":%.2f,\"text_weight_mb\":%.1f,\"vision_gflop\":%.3f}\n", bandwidth(threads, 3) / 1e9,
             text_weight_bytes(c, prec) / 1e6, vision_flops(c) / 1e9);
    } else if (!strcmp(cmd, "rss")) {
      long rss, hwm;
      proc_mem(&rss, &hwm);
      printf("{\"rss_mib\":%.1f,\"peak_rss_mib\":%.1f,\"peak_since_load\":%s}\n", rss / 1024.0, hwm / 1024.0,
             reset ? "true" : "false");
    } else {
      printf("{\"error\":\"unknown command\"}\n");
    }
    if (e) printf("{\"error\":\"%s\"}\n", blip_err_last());
    else if (out) {
      printf("{\"ms\":%.3f,\"cpu_s\":%.4f", (now() - w0) * 1e3, cpu_s() - c0);
      if (prof) print_phases(c, arg, ph);
      print_floats("out", out, nout);
      printf("}\n");
    }
    fflush(stdout);
  }
  rc = 0;
done:
  free(px);
  free(imgs);
  free(feat);
  blip_model_free(m);
  return rc;
}

/* --gemm: one linear layer [N, K] on M rows, per precision, packed whole
 * (oneDNN) and in column parts run by a team (int8 parts: the VNNI kernel
 * where the CPU has it), best of reps, against the measured peak. Few rows
 * cycle through enough copies of the layer (>= 64 MB) that the weights come
 * from memory, as in a text query. */
static int run_gemm(const char *spec, int threads, int reps, const double *peaks, int json) {
  int M, K, N, end = 0;
  if (sscanf(spec, "%d,%d,%d%n", &M, &K, &N, &end) != 3 || spec[end] || M < 1 || K < 1 || N < 16 || (double)M * K > 1e8 || (double)K * N > 1e8)
    return blip_err_set(BLIP_EINVAL, "--gemm wants M,K,N (rows, inputs, outputs), got '%s'", spec);
  const double wbytes = 4.0 * K * N;
  const int nl = M <= 64 ? (int)(64e6 / wbytes) + 1 : 1;
  float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N), *w = malloc(sizeof(float) * K * N);
  blip_k_linear *l = calloc((size_t)nl * 2, sizeof *l);
  blip_k_ws ws = {0};
  int rc = !x || !y || !w || !l ? blip_err_set(BLIP_ENOMEM, "--gemm: out of memory") : BLIP_OK;
  for (long i = 0; !rc && i < (long)M * K; i++) x[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
  for (long i = 0; !rc && i < (long)K * N; i++) w[i] = (float)((i * 40503u) % 1000) / 5000.0f - 0.1f;
  const char *name[3] = {"f32", "bf16", "int8"};
  if (json) printf("{\"M\":%d,\"K\":%d,\"N\":%d,\"layers\":%d,\"results\":[", M, K, N, nl);
  else printf("gemm %dx%d -> %d, %d threads, %d layer cop%s, best of %d\n", M, K, N, threads, nl, nl > 1 ? "ies" : "y", reps);
  for (int p = 0; p < 3 && !rc; p++)
    for (int parts = 0; parts < 2 && !rc; parts++) {
      for (int i = 0; i < nl && !rc; i++) {
        l[i] = (blip_k_linear){.in = K, .out = N, .w = w};
        rc = parts ? blip_k_linear_pack_parts(&l[i], (blip_k_prec)p, &ws, threads) : blip_k_linear_pack(&l[i], (blip_k_prec)p, &ws);
      }
      double best = 1e30;
      for (int r = 0; r <= reps && !rc; r++) { /* round 0 builds the primitives */
        double t0 = now();
        for (int i = 0; i < nl && !rc; i++) rc = blip_k_linear_fwd(y, x, &l[i], M);
        double dt = (now() - t0) / nl;
        if (r && dt < best) best = dt;
      }
      const char *impl = rc ? NULL : blip_k_linear_impl(&l[0], M, 0);
      for (int i = 0; i < nl; i++) blip_k_linear_unpack(&l[i]);
      if (rc) break;
      const double f = 2.0 * M * K * N / best;
      if (json)
        printf("%s{\"precision\":\"%s\",\"packing\":\"%s\",\"kernel\":\"%s\",\"ms\":%.4f,\"gflops\":%.1f,\"share_of_peak\":%.3f}",
               p || parts ? "," : "", name[p], parts ? "parts" : "whole", impl ? impl : "?", best * 1e3, f / 1e9, f / peaks[p]);
      else
        printf("  %-4s %-5s %-24s %8.3f ms %7.1f GFLOP/s %4.0f%% of the %s peak\n", name[p], parts ? "parts" : "whole", impl ? impl : "?",
               best * 1e3, f / 1e9, 100 * f / peaks[p], name[p]);
    }
  if (json && !rc) printf("]}\n");
  blip_k_ws_free(&ws);
  free(x), free(y), free(w), free(l);
  return rc;
}

/* --attention: the vision encoder's self-attention (577 tokens, every
 * head) per precision, fused and batched (BLIP_ATTENTION_ONEDNN=1), the
 * two alternated call by call, best of reps, against the measured peak
 * (int8: the vpdpbusd peak), and how far apart their outputs are. */
static int run_attention(int large, int reps, const double *peaks, int json) {
  const int T = 577, H = large ? 16 : 12, dh = 64, D = H * dh, ld = 3 * D;
  float *x = malloc(sizeof(float) * T * ld), *o[2] = {malloc(sizeof(float) * T * D), malloc(sizeof(float) * T * D)};
  uint16_t *x16 = malloc(2 * (size_t)T * ld), *o16[2] = {malloc(2 * (size_t)T * D), malloc(2 * (size_t)T * D)};
  blip_k_ws ws = {0};
  int rc = !x || !o[0] || !o[1] || !x16 || !o16[0] || !o16[1] ? blip_err_set(BLIP_ENOMEM, "--attention: out of memory") : BLIP_OK;
  for (long i = 0; !rc && i < (long)T * ld; i++) x[i] = (float)((i * 2654435761u) % 1000) / 250.0f - 2.0f;
  if (!rc) blip_k_to_bf16(x16, x, (long)T * ld);
  const char *name[3] = {"f32", "bf16", "int8"}, *kern[3][2];
  double best[3][2], diff[3] = {0};
  for (int p = 0; p < 3; p++) best[p][0] = best[p][1] = 1e30;
  for (int r = 0; r <= reps && !rc; r++) /* round 0 warms up */
    for (int p = 0; p < 3 && !rc; p++)
      for (int b = 0; b < 2 && !rc; b++) {
        if (b) setenv("BLIP_ATTENTION_ONEDNN", "1", 1);
        else unsetenv("BLIP_ATTENTION_ONEDNN");
        kern[p][b] = blip_k_attention_kernel((blip_k_prec)p, T, T, H, dh, ld);
        const double t0 = now();
        rc = p == 0   ? blip_k_attention(o[b], D, x, ld, x + D, ld, x + 2 * D, ld, T, T, H, dh, 0.125f, NULL, &ws)
             : p == 1 ? blip_k_attention_bf16in(o16[b], D, 1, x16, ld, x16 + D, ld, x16 + 2 * D, ld, T, T, H, dh, 0.125f, NULL, &ws)
                      : blip_k_attention_int8(o[b], D, x16, ld, x16 + D, ld, x16 + 2 * D, ld, T, T, H, dh, 0.125f, &ws);
        const double dt = now() - t0;
        if (r && dt < best[p][b]) best[p][b] = dt;
        if (r == 1 && b == 1)
          for (long i = 0; i < (long)T * D; i++) {
            const double d = p == 1 ? fabs((double)bf16_f32(o16[0][i]) - bf16_f32(o16[1][i])) : fabs((double)o[0][i] - o[1][i]);
            if (!(d <= diff[p])) diff[p] = d;
          }
      }
  unsetenv("BLIP_ATTENTION_ONEDNN");
  const double fl = 4.0 * T * T * dh * H;
  if (!rc) {
    if (json) printf("{\"tokens\":%d,\"heads\":%d,\"dh\":%d,\"results\":[", T, H, dh);
    else printf("attention, %d tokens x %d heads x %d, best of %d\n", T, H, dh, reps);
    for (int p = 0; p < 3; p++) {
      const double sf = fl / best[p][0] / peaks[p], sb = fl / best[p][1] / peaks[p];
      if (json)
        printf("%s{\"precision\":\"%s\",\"fused\":\"%s\",\"fused_ms\":%.4f,\"fused_share\":%.3f,\"batched\":\"%s\",\"batched_ms\":%.4f,"
               "\"batched_share\":%.3f,\"speedup\":%.3f,\"max_diff\":%.3g}",
               p ? "," : "", name[p], kern[p][0], best[p][0] * 1e3, sf, kern[p][1], best[p][1] * 1e3, sb, best[p][1] / best[p][0], diff[p]);
      else
        printf("  %-4s %-10s %7.3f ms %3.0f%% of the %s peak | %-12s %7.3f ms %3.0f%% | %.2fx, outputs %.2g apart\n", name[p], kern[p][0],
               best[p][0] * 1e3, 100 * sf, name[p], kern[p][1], best[p][1] * 1e3, 100 * sb, best[p][1] / best[p][0], diff[p]);
    }
    if (json) printf("]}\n");
  }
  blip_k_ws_free(&ws);
  free(x), free(o[0]), free(o[1]), free(x16), free(o16[0]), free(o16[1]);
  return rc;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: bench_engine [--precision all|f32|bf16|int8] [--large] [--threads N] [--reps N] [--naive] [--json]\n"
          "       bench_engine --memory index|query --precision f32|bf16|int8 [--large] [--json]\n"
          "       bench_engine --serve --model DIR --inputs DIR --precision f32|bf16|int8 [--threads N]\n"
          "       bench_engine --gemm M,K,N [--threads N] [--reps N] [--json]\n"
          "       bench_engine --attention [--large] [--threads N] [--reps N] [--json]\n"
          "Engine speed at the real BLIP base (or large) geometry with random weights, per precision,\n"
          "in one process, precisions interleaved round by round, best of N: vision images/s at batch 1 and 8, text encoder ms (12 tokens), ITM rerank ms\n"
          "(reassociated; --naive adds the unreassociated one) for k = 1, 16, 32, the share of the\n"
          "precision's peak (measured in the same run) and the speed-up over f32.\n"
          "--memory: peak RSS of one indexing (vision, batch 8) or query (text + ITM k=32) workload.\n"
          "--serve: load DIR's model, answer commands on stdin with JSON lines (vision B [prof], text, itm K [naive],\n"
          "peaks, bandwidth, rss, quit) for a driver that interleaves engines (benchmarks/vs-onnxruntime).\n"
          "--gemm: one [N,K] layer on M rows per precision, packed whole (oneDNN) and in column parts\n"
          "(int8: the VNNI kernel), ms, GFLOP/s and share of the measured peak.\n"
          "--attention: the vision encoder's self-attention per precision, fused and batched (oneDNN),\n"
          "ms, share of the measured peak, speed-up, and how far apart their outputs are.\n"
          "On a machine shared with other jobs, run with OMP_WAIT_POLICY=passive: spinning OpenMP\n"
          "threads otherwise steal the cores they wait for (measured 4x slower tests under load).\n");
}

static int parse_prec(const char *s) {
  blip_prec p;
  if (!strcmp(s, "all")) return 3;
  return blip_model_parse_precision(s, &p) ? -1 : (int)p;
}

int main(int argc, char **argv) {
  int large = 0, threads = 2, reps = 3, json = 0, naive = 0, prec = 3;
  const char *memory = NULL, *model_dir = NULL, *inputs = NULL, *gemm = NULL;
  int serve_mode = 0, attention = 0;
  static struct option lo[] = {{"large", 0, 0, 'l'}, {"threads", 1, 0, 't'}, {"reps", 1, 0, 'r'}, {"json", 0, 0, 'j'},
                               {"help", 0, 0, 'h'},  {"precision", 1, 0, 'p'}, {"naive", 0, 0, 'n'}, {"memory", 1, 0, 'm'},
                               {"serve", 0, 0, 's'}, {"model", 1, 0, 'M'}, {"inputs", 1, 0, 'I'}, {"gemm", 1, 0, 'g'},
                               {"attention", 0, 0, 'a'}, {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "lt:r:jhp:nm:sM:I:g:a", lo, NULL)) != -1;) {
    if (c == 'l') large = 1;
    else if (c == 't') threads = (int)blip_arg_must("bench_engine", "--threads", optarg, 1, blip_arg_max_threads());
    else if (c == 'r') reps = (int)blip_arg_must("bench_engine", "--reps", optarg, 1, 1000000);
    else if (c == 'j') json = 1;
    else if (c == 'n') naive = 1;
    else if (c == 'm') memory = optarg;
    else if (c == 's') serve_mode = 1;
    else if (c == 'M') model_dir = optarg;
    else if (c == 'I') inputs = optarg;
    else if (c == 'g') gemm = optarg;
    else if (c == 'a') attention = 1;
    else if (c == 'p') {
      if ((prec = parse_prec(optarg)) < 0) { fprintf(stderr, "bench_engine: unknown precision '%s'\n", optarg); return 2; }
    } else { usage(c == 'h' ? stdout : stderr); return c == 'h' ? 0 : 2; }
  }
  if (memory && (prec == 3 || (strcmp(memory, "index") && strcmp(memory, "query")))) { usage(stderr); return 2; }
  blip_k_set_threads(threads);
  if (serve_mode) {
    if (!model_dir || !inputs || prec == 3) { usage(stderr); return 2; }
    if (serve(model_dir, inputs, (blip_prec)prec, threads)) { fprintf(stderr, "bench_engine: %s\n", blip_err_last()); return 1; }
    return 0;
  }
  blip_cfg c = {.v_hidden = large ? 1024 : 768, .v_layers = large ? 24 : 12, .v_heads = large ? 16 : 12,
                .v_mlp = large ? 4096 : 3072, .image_size = 384, .patch = 16, .v_eps = 1e-5f, .v_tokens = 577,
                .t_vocab = 30524, .t_hidden = 768, .t_layers = 12, .t_heads = 12, .t_mlp = 3072, .t_max_pos = 512,
                .t_enc_hidden = large ? 1024 : 768, .t_eps = 1e-12f, .pad_id = 0, .sep_id = 102, .bos_id = 30522,
                .embed_dim = 256};
  if (memory) {
    if (run_memory(&c, (blip_prec)prec, memory, json)) { fprintf(stderr, "bench_engine: %s\n", blip_err_last()); return 1; }
    return 0;
  }
  double peaks[3] = {peak_f32(threads, 3), peak_bf16(threads, 3), peak_int8(threads, 3)};
  if (gemm) {
    if (run_gemm(gemm, threads, reps, peaks, json)) { fprintf(stderr, "bench_engine: %s\n", blip_err_last()); return 1; }
    return 0;
  }
  if (attention) {
    if (run_attention(large, reps, peaks, json)) { fprintf(stderr, "bench_engine: %s\n", blip_err_last()); return 1; }
    return 0;
  }
  const int S = c.image_size, T = c.v_tokens;
  float *px = malloc(sizeof(float) * 8 * 3 * S * S), *emb = malloc(sizeof(float) * 32 * T * c.v_hidden);
  if (!px || !emb) { fprintf(stderr, "bench_engine: out of memory\n"); return 1; }
  for (long i = 0; i < 8L * 3 * S * S; i++) px[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
  result res[3];
  int lo_p = prec == 3 ? 0 : prec, hi_p = prec == 3 ? 2 : prec, precs[3], np = 0;
  blip_model *models[3] = {0};
  for (int p = lo_p; p <= hi_p; p++) {
    blip_model_opts o = {.precision = (blip_prec)p};
    double t0 = now();
    if (blip_model_random(&c, &o, 1, &models[np])) { fprintf(stderr, "bench_engine: %s\n", blip_err_last()); return 1; }
    res[p].init_s = now() - t0;
    precs[np++] = p;
  }
  int brc = run_all(&c, models, np, precs, reps, naive, res, px, emb);
  for (int i = 0; i < np; i++) blip_model_free(models[i]);
  if (brc) { fprintf(stderr, "bench_engine: %s\n", blip_err_last()); return 1; }
  double vf = vision_flops(&c);
  const int ks[3] = {1, 16, 32};
  if (json) printf("{\"geometry\":\"%s\",\"threads\":%d,\"vision_gflop_per_image\":%.2f,\"precisions\":{", large ? "large" : "base", threads, vf / 1e9);
  else {
    printf("geometry %s, %d threads, vision %.1f GFLOP/image\n", large ? "ViT-L/16 384 + BERT-base" : "ViT-B/16 384 + BERT-base", threads, vf / 1e9);
    printf("measured peaks (GFLOP/s): f32 FMA %.1f, bf16 vdpbf16ps %.1f, int8 vpdpbusd %.1f\n", peaks[0] / 1e9, peaks[1] / 1e9, peaks[2] / 1e9);
    if (prec != 3) printf("(one precision: the \"x f32\" ratios need --precision all and read 0)\n");
  }
  for (int p = lo_p; p <= hi_p; p++) {
    const result *r = &res[p];
    double sp1 = prec == 3 ? res[0].vis[0] / r->vis[0] : 0, sp8 = prec == 3 ? res[0].vis[1] / r->vis[1] : 0;
    if (json) {
      printf("%s\"%s\":{\"init_s\":%.3f,\"peak_gflops\":%.1f,\"vision_img_s_b1\":%.3f,\"vision_img_s_b8\":%.3f,"
             "\"vision_peak_share_b1\":%.3f,\"vision_peak_share_b8\":%.3f,\"speedup_vs_f32_b1\":%.2f,\"speedup_vs_f32_b8\":%.2f,"
             "\"text_ms_12tok\":%.2f,\"itm_fast_ms\":{\"k1\":%.2f,\"k16\":%.2f,\"k32\":%.2f}",
             p == lo_p ? "" : ",", blip_model_precision_name(p), r->init_s, peaks[p] / 1e9, 1 / r->vis[0], 1 / r->vis[1], vf / r->vis[0] / peaks[p],
             vf / r->vis[1] / peaks[p], sp1, sp8, r->text_ms, r->itm[1][0], r->itm[1][1], r->itm[1][2]);
      if (naive) printf(",\"itm_naive_ms\":{\"k1\":%.2f,\"k16\":%.2f,\"k32\":%.2f}", r->itm[0][0], r->itm[0][1], r->itm[0][2]);
      printf("}");
    } else {
      printf("[%s] model init %.2f s (random fill + conversion)\n", blip_model_precision_name(p), r->init_s);
      for (int b = 0; b < 2; b++)
        printf("  vision batch %d: %6.3f images/s  %6.1f GFLOP/s  %4.1f%% of %s peak  %.2fx f32\n", b ? 8 : 1, 1 / r->vis[b],
               vf / r->vis[b] / 1e9, 100 * vf / r->vis[b] / peaks[p], blip_model_precision_name(p), b ? sp8 : sp1);
      printf("  text encoder, 12 tokens: %.2f ms (%.2fx f32)\n", r->text_ms, prec == 3 ? res[0].text_ms / r->text_ms : 0);
      for (int ki = 0; ki < 3; ki++) {
        printf("  ITM k=%-2d reassociated %8.2f ms (%.2f ms/pair, %.2fx f32)", ks[ki], r->itm[1][ki], r->itm[1][ki] / ks[ki],
               prec == 3 ? res[0].itm[1][ki] / r->itm[1][ki] : 0);
        if (naive) printf("   naive %8.2f ms", r->itm[0][ki]);
        printf("\n");
      }
    }
  }
  if (json) printf("}}\n");
  free(px);
  free(emb);
  return 0;
}
