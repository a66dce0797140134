/* bench_engine: speed of the engine at a real BLIP geometry with random
 * weights (no file needed), reported against this machine's fp32 peak,
 * which the same run measures with an FMA loop. Nothing here is asserted;
 * the figures go into reports. */
#include "blip_err.h"
#include "blip_kern.h"
#include "blip_model.h"

#include <getopt.h>
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Peak fp32 FLOP/s: 16 independent zmm FMA chains per thread (enough to
 * cover FMA latency x pipes), on every thread at once. */
#define FMA16(op)                                                                                  \
  op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11) op(12) op(13) op(14) op(15)
__attribute__((target("avx512f"))) static double measure_peak(int threads) {
  const long iters = 10000000;
  double best = 0;
  for (int rep = 0; rep < 3; rep++) {
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

static double vision_flops(const blip_cfg *c) {
  double T = c->v_tokens, D = c->v_hidden, P = 3.0 * c->patch * c->patch, F = c->v_mlp;
  double per_layer = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * F;
  return 2 * (T - 1) * P * D + c->v_layers * per_layer;
}

static double gemm_gflops(int threads) {
  /* oneDNN sgemm at the ViT-B fc1 shape, for context. */
  int M = 577, N = 3072, K = 768;
  float *A = calloc((size_t)M * K, 4), *B = calloc((size_t)N * K, 4), *C = calloc((size_t)M * N, 4);
  for (long i = 0; i < (long)M * K; i++) A[i] = (float)(i % 7) * 0.1f;
  for (long i = 0; i < (long)N * K; i++) B[i] = (float)(i % 5) * 0.1f;
  double best = 1e9;
  for (int r = 0; r < 8; r++) {
    double t0 = now();
    blip_k_gemm(0, 1, M, N, K, 1, A, K, B, K, 0, C, N);
    double dt = now() - t0;
    if (dt < best) best = dt;
  }
  free(A), free(B), free(C);
  return 2.0 * M * N * K / best;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: bench_engine [--large] [--threads N] [--reps N] [--json]\n"
          "Engine speed at the real BLIP base (or large) geometry with random weights:\n"
          "vision images/s at batch 1 and 8, text encoder ms (12 tokens), ITM ms per pair\n"
          "(reassociated and naive, k = 1, 16, 32), and the share of the measured fp32 peak.\n");
}

int main(int argc, char **argv) {
  int large = 0, threads = 2, reps = 3, json = 0;
  static struct option lo[] = {{"large", 0, 0, 'l'}, {"threads", 1, 0, 't'}, {"reps", 1, 0, 'r'},
                               {"json", 0, 0, 'j'},  {"help", 0, 0, 'h'},    {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "lt:r:jh", lo, NULL)) != -1;) {
    if (c == 'l') large = 1;
    else if (c == 't') threads = atoi(optarg);
    else if (c == 'r') reps = atoi(optarg);
    else if (c == 'j') json = 1;
    else { usage(c == 'h' ? stdout : stderr); return c == 'h' ? 0 : 2; }
  }
  blip_k_set_threads(threads);
  blip_cfg c = {.v_hidden = large ? 1024 : 768, .v_layers = large ? 24 : 12, .v_heads = large ? 16 : 12,
                .v_mlp = large ? 4096 : 3072, .image_size = 384, .patch = 16, .v_eps = 1e-5f, .v_tokens = 577,
                .t_vocab = 30524, .t_hidden = 768, .t_layers = 12, .t_heads = 12, .t_mlp = 3072, .t_max_pos = 512,
                .t_enc_hidden = large ? 1024 : 768, .t_eps = 1e-12f, .pad_id = 0, .sep_id = 102, .bos_id = 30522,
                .embed_dim = 256};
  double peak = measure_peak(threads), gemm = gemm_gflops(threads);
  double t0 = now();
  blip_model *m;
  if (blip_model_random(&c, NULL, 1, &m)) {
    fprintf(stderr, "bench_engine: %s\n", blip_err_last());
    return 1;
  }
  double t_init = now() - t0;
  const int S = c.image_size, T = c.v_tokens;
  float *px = malloc(sizeof(float) * 8 * 3 * S * S), *emb = malloc(sizeof(float) * 32 * T * c.v_hidden);
  float feat[8 * 256];
  for (long i = 0; i < 8L * 3 * S * S; i++) px[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
  double vis[2];
  int batches[2] = {1, 8};
  for (int bi = 0; bi < 2; bi++) {
    int b = batches[bi];
    double best = 1e9;
    blip_model_vision(m, px, b, emb, feat); /* warm-up */
    for (int r = 0; r < reps; r++) {
      double s = now();
      if (blip_model_vision(m, px, b, emb, feat)) { fprintf(stderr, "%s\n", blip_err_last()); return 1; }
      double dt = now() - s;
      if (dt < best) best = dt;
    }
    vis[bi] = best / b;
  }
  /* 32 candidate image token sets for ITM */
  for (int i = 1; i < 32; i++) memcpy(emb + (size_t)i * T * c.v_hidden, emb + (size_t)(i % 8) * T * c.v_hidden, sizeof(float) * T * c.v_hidden);
  int32_t ids[12] = {101, 1037, 3899, 2770, 2006, 1037, 3509, 2007, 2019, 4399, 2067, 102}, mask[12];
  for (int i = 0; i < 12; i++) mask[i] = 1;
  double text_ms = 1e9;
  for (int r = 0; r < reps + 2; r++) {
    double s = now();
    blip_model_text(m, ids, mask, 1, 12, NULL, feat);
    double dt = (now() - s) * 1e3;
    if (dt < text_ms) text_ms = dt;
  }
  const float *imgs[32];
  for (int i = 0; i < 32; i++) imgs[i] = emb + (size_t)i * T * c.v_hidden;
  int ks[3] = {1, 16, 32};
  double itm[2][3];
  float logits[64];
  for (int fast = 0; fast < 2; fast++)
    for (int ki = 0; ki < 3; ki++) {
      double best = 1e9;
      int rr = ks[ki] == 1 ? reps + 2 : (fast ? reps : 1);
      for (int r = 0; r < rr; r++) {
        double s = now();
        blip_model_itm(m, ids, 12, imgs, ks[ki], BLIP_ITM_ENC, fast, logits, NULL);
        double dt = (now() - s) * 1e3;
        if (dt < best) best = dt;
      }
      itm[fast][ki] = best;
    }
  double vf = vision_flops(&c);
  double share1 = vf / vis[0] / peak, share8 = vf / vis[1] / peak;
  if (json) {
    printf("{\"geometry\":\"%s\",\"threads\":%d,\"peak_gflops\":%.1f,\"sgemm_fc1_gflops\":%.1f,\"vision_gflop_per_image\":%.2f,"
           "\"vision_img_s_b1\":%.3f,\"vision_img_s_b8\":%.3f,\"vision_peak_share_b1\":%.3f,\"vision_peak_share_b8\":%.3f,"
           "\"text_ms_12tok\":%.2f,\"itm_fast_ms\":{\"k1\":%.2f,\"k16\":%.2f,\"k32\":%.2f},"
           "\"itm_naive_ms\":{\"k1\":%.2f,\"k16\":%.2f,\"k32\":%.2f},\"random_init_s\":%.2f}\n",
           large ? "large" : "base", threads, peak / 1e9, gemm / 1e9, vf / 1e9, 1 / vis[0], 1 / vis[1], share1, share8,
           text_ms, itm[1][0], itm[1][1], itm[1][2], itm[0][0], itm[0][1], itm[0][2], t_init);
  } else {
    printf("geometry %s, %d threads\n", large ? "ViT-L/16 384 + BERT-base" : "ViT-B/16 384 + BERT-base", threads);
    printf("measured fp32 peak (FMA loop)  %8.1f GFLOP/s\n", peak / 1e9);
    printf("oneDNN sgemm 577x3072x768     %8.1f GFLOP/s (%.0f%% of peak)\n", gemm / 1e9, 100 * gemm / peak);
    printf("vision encoder %.1f GFLOP/image\n", vf / 1e9);
    printf("  batch 1: %6.3f images/s  %6.1f GFLOP/s  %4.1f%% of peak\n", 1 / vis[0], vf / vis[0] / 1e9, 100 * share1);
    printf("  batch 8: %6.3f images/s  %6.1f GFLOP/s  %4.1f%% of peak\n", 1 / vis[1], vf / vis[1] / 1e9, 100 * share8);
    printf("text encoder, 12 tokens: %.2f ms\n", text_ms);
    printf("ITM per (text, image) pair, 12 tokens:\n");
    for (int ki = 0; ki < 3; ki++)
      printf("  k=%-2d  reassociated %8.2f ms (%.2f ms/pair)   naive %8.2f ms (%.2f ms/pair)   speed-up %.1fx\n", ks[ki],
             itm[1][ki], itm[1][ki] / ks[ki], itm[0][ki], itm[0][ki] / ks[ki], itm[0][ki] / itm[1][ki]);
    printf("random-weight model init %.2f s\n", t_init);
  }
  free(px);
  free(emb);
  blip_model_free(m);
  return 0;
}
