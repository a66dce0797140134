/* bench_faiss: where IVF starts to pay off over exact Flat search.
 * Synthetic clustered unit vectors (photo features cluster: a mixture of
 * Gaussians around random centres), E = 256 as in BLIP base. For each library
 * size it times single-query search on Flat (IDMap2,Flat as blip_store builds
 * it) and on IVF{4 sqrt N},Flat at blip_store's nprobe, and reports IVF
 * recall@10 against Flat and the IVF training time.
 * Usage: bench_faiss [N...]   (default 20000 50000 100000 200000) */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "blip_arg.h"

#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/index_factory_c.h>

enum { E = 256, NQ = 200, K = 10 };

static uint64_t g_s = 42;
static double urand(void) {
  uint64_t z = (g_s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return ((z ^ (z >> 31)) >> 11) * (1.0 / 9007199254740992.0);
}
static double nrand(void) { return sqrt(-2 * log(urand() + 1e-300)) * cos(6.283185307179586 * urand()); }
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
static void unit(float *v) {
  double s = 0;
  for (int j = 0; j < E; j++) s += (double)v[j] * v[j];
  for (int j = 0; j < E; j++) v[j] /= (float)sqrt(s);
}

/* n points around nc centres, noise sigma per dimension, normalized */
static void gen(float *x, int64_t n, const float *cent, int nc, double sigma) {
  for (int64_t i = 0; i < n; i++) {
    const float *c = cent + (size_t)(urand() * nc) * E;
    for (int j = 0; j < E; j++) x[i * E + j] = c[j] + (float)(sigma * nrand());
    unit(x + i * E);
  }
}

static double time_search(FaissIndex *ix, const float *q, int64_t *lab, float *dis) {
  double t0 = now();
  for (int i = 0; i < NQ; i++) faiss_Index_search(ix, 1, q + (size_t)i * E, K, dis + i * K, lab + i * K);
  return (now() - t0) / NQ * 1e3;
}

int main(int argc, char **argv) {
  static const int64_t dflt[] = {20000, 50000, 100000, 200000};
  int nn = argc > 1 ? argc - 1 : 4;
  int nc = 2000;
  float *cent = malloc(sizeof(float) * nc * E), *q = malloc(sizeof(float) * NQ * E);
  for (int i = 0; i < nc; i++) {
    for (int j = 0; j < E; j++) cent[i * E + j] = (float)nrand();
    unit(cent + i * E);
  }
  gen(q, NQ, cent, nc, 0.06);
  printf("%-8s %-7s %12s %12s %8s %10s %8s\n", "N", "nlist", "flat ms/q", "ivf ms/q", "speedup", "recall@10",
         "train s");
  for (int a = 0; a < nn; a++) {
    int64_t n = argc > 1 ? blip_arg_must("bench_faiss", "N", argv[a + 1], 1, 100000000) : dflt[a];
    float *x = malloc(sizeof(float) * n * E);
    int64_t *ids = malloc(sizeof(int64_t) * n), *lf = malloc(sizeof(int64_t) * NQ * K),
            *li = malloc(sizeof(int64_t) * NQ * K);
    float *dis = malloc(sizeof(float) * NQ * K);
    gen(x, n, cent, nc, 0.06);
    for (int64_t i = 0; i < n; i++) ids[i] = i + 1;
    FaissIndex *flat = NULL, *ivf = NULL;
    faiss_index_factory(&flat, E, "IDMap2,Flat", METRIC_INNER_PRODUCT);
    faiss_Index_add_with_ids(flat, n, x, ids);
    int nlist = (int)(4 * sqrt((double)n));
    char desc[64];
    snprintf(desc, sizeof desc, "IVF%d,Flat", nlist);
    faiss_index_factory(&ivf, E, desc, METRIC_INNER_PRODUCT);
    double t0 = now();
    faiss_Index_train(ivf, n, x);
    double train = now() - t0;
    faiss_Index_add_with_ids(ivf, n, x, ids);
    faiss_IndexIVF_set_nprobe(faiss_IndexIVF_cast(ivf), nlist / 16 > 8 ? nlist / 16 : 8);
    double tf = time_search(flat, q, lf, dis), ti = time_search(ivf, q, li, dis);
    int hit = 0;
    for (int i = 0; i < NQ; i++)
      for (int j = 0; j < K; j++)
        for (int l = 0; l < K; l++) hit += li[i * K + j] == lf[i * K + l];
    printf("%-8lld %-7d %12.3f %12.3f %8.2f %10.3f %8.1f\n", (long long)n, nlist, tf, ti, tf / ti,
           (double)hit / (NQ * K), train);
    fflush(stdout);
    faiss_Index_free(flat);
    faiss_Index_free(ivf);
    free(x);
    free(ids);
    free(lf);
    free(li);
    free(dis);
  }
  free(cent);
  free(q);
  return 0;
}
