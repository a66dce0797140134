/* bench_faiss_pq: exact search against compressed IVF-PQ indexes at
 * collection scale (1M and 10M vectors by default), E = 256 as in BLIP base.
 *
 * Vectors: a mixture of 1 Gaussian cluster per ~500 photos with per-cluster
 * spread (photo features cluster by subject and shoot), normalized; generated
 * in chunks from a counter-based RNG so that any chunk can be regenerated and
 * nothing of size N*E is ever held. Ground truth: exact top-10 inner product
 * for NQ queries (perturbed held-out points), by streaming the chunks.
 * For each index: build time (train on a sample, add chunk by chunk, as
 * blipsearch fills it), bytes on disk, recall@10 and ms per single query at
 * several nprobe (the last, starred, is blipsearch's nlist/16), raw and after
 * an exact re-score of the top 40, 100 and 250 (blipsearch re-scores its
 * candidates from the SQLite features), and the query process's resident
 * memory after loading the file memory-mapped and answering the queries.
 * Usage: bench_faiss_pq [--sizes 1000000,10000000] [--nq 100] [--threads N] [--pq 32,64] [--no-opq] */
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/index_io_c.h>
#include <omp.h>

#include "blip_kern.h"

enum { E = 256, K = 10, CHUNK = 65536, NDEPTH = 3 };
static const int depths[NDEPTH] = {4, 10, 25}; /* exact re-score of depth*K candidates (blipsearch: 4) */
#define IO_FLAG_MMAP_REAL (8 | 0x646f0000) /* faiss::IO_FLAG_MMAP; the 1.7.3 C header's value is stale */

static uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static float u01(uint64_t *s) { return (float)((mix((*s)++) >> 40) * (1.0 / 16777216.0)); }
static float gauss(uint64_t *s) { return (u01(s) + u01(s) + u01(s) + u01(s) - 2.0f) * 1.7320508f; } /* var 1 */
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
static void unit(float *v) {
  double s = 0;
  for (int j = 0; j < E; j++) s += (double)v[j] * v[j];
  float r = (float)(1 / sqrt(s));
  for (int j = 0; j < E; j++) v[j] *= r;
}

typedef struct {
  int64_t n;
  int nc;
  float *cent, *spread;
} dataset;

/* point i: centre c(i) + spread(c) * noise, normalized; a pure function of i */
static void point(const dataset *d, int64_t i, float *v) {
  uint64_t s = mix((uint64_t)i * 2654435761u + 17);
  int c = (int)(mix(s) % (uint64_t)d->nc);
  s += 3;
  for (int j = 0; j < E; j++) v[j] = d->cent[(size_t)c * E + j] + d->spread[c] * gauss(&s);
  unit(v);
}
static void chunk(const dataset *d, int64_t a, int64_t n, float *x) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++) point(d, a + i, x + i * E);
}

static void rss(long *anon_kb, long *file_kb) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  *anon_kb = *file_kb = -1;
  while (f && fgets(line, sizeof line, f)) {
    sscanf(line, "RssAnon: %ld", anon_kb);
    sscanf(line, "RssFile: %ld", file_kb);
  }
  if (f) fclose(f);
}

static double recall(const int64_t *got, int kk, const int64_t *gt, int nq) {
  long hit = 0;
  for (int q = 0; q < nq; q++)
    for (int a = 0; a < K; a++)
      for (int b = 0; b < kk && b < K; b++) hit += got[(size_t)q * kk + b] == gt[(size_t)q * K + a];
  return (double)hit / ((double)nq * K);
}

/* exact top-K of queries q[nq] over the whole set, streamed; returns seconds */
static double ground_truth(const dataset *d, const float *q, int nq, int64_t *gt) {
  float *x = malloc(sizeof(float) * CHUNK * E), *sc = malloc(sizeof(float) * CHUNK * nq), *best = malloc(sizeof(float) * nq * K);
  for (int i = 0; i < nq * K; i++) best[i] = -1e30f, gt[i] = -1;
  double t0 = now();
  for (int64_t a = 0; a < d->n; a += CHUNK) {
    int64_t n = d->n - a < CHUNK ? d->n - a : CHUNK;
    chunk(d, a, n, x);
    blip_k_gemm(0, 1, nq, (int)n, E, 1.0f, q, E, x, E, 0.0f, sc, (int)n);
    for (int qi = 0; qi < nq; qi++)
      for (int64_t i = 0; i < n; i++) {
        float s = sc[(size_t)qi * n + i];
        float *b = best + qi * K;
        int64_t *g = gt + (size_t)qi * K;
        if (s <= b[K - 1]) continue;
        int p = K - 1;
        while (p > 0 && b[p - 1] < s) b[p] = b[p - 1], g[p] = g[p - 1], p--;
        b[p] = s, g[p] = a + i;
      }
  }
  double dt = now() - t0;
  free(x);
  free(sc);
  free(best);
  return dt;
}

/* exact re-score of the first depth of the kk candidates of each query
 * (blipsearch reads their features from SQLite) */
static void refine(const dataset *d, const float *q, int nq, const int64_t *cand, int kk, int depth, int64_t *out) {
  float v[E];
  for (int qi = 0; qi < nq; qi++) {
    float bs[K];
    for (int j = 0; j < K; j++) bs[j] = -1e30f, out[qi * K + j] = -1;
    for (int c = 0; c < depth; c++) {
      int64_t id = cand[(size_t)qi * kk + c];
      if (id < 0) continue;
      point(d, id, v);
      float s = 0;
      for (int j = 0; j < E; j++) s += v[j] * q[qi * E + j];
      if (s <= bs[K - 1]) continue;
      int p = K - 1;
      while (p > 0 && bs[p - 1] < s) bs[p] = bs[p - 1], out[qi * K + p] = out[qi * K + p - 1], p--;
      bs[p] = s, out[qi * K + p] = id;
    }
  }
}

static void run(const dataset *d, const char *desc, const float *q, int nq, const int64_t *gt, const char *dir) {
  FaissIndex *ix = NULL;
  if (faiss_index_factory(&ix, E, desc, METRIC_INNER_PRODUCT)) {
    printf("%s: %s\n", desc, faiss_get_last_error());
    return;
  }
  FaissIndexIVF *ivf = faiss_IndexIVF_cast(ix);
  int64_t nlist = ivf ? (int64_t)faiss_IndexIVF_nlist(ivf) : 0;
  int64_t ntrain = nlist ? (64 * nlist < d->n ? 64 * nlist : d->n) : 0;
  if (ntrain < 65536 && ntrain < d->n) ntrain = d->n < 65536 ? d->n : 65536; /* PQ codebooks need ~256 x 256 points */
  float *x = malloc(sizeof(float) * (ntrain > CHUNK ? ntrain : CHUNK) * E);
  int64_t *ids = malloc(sizeof(int64_t) * CHUNK);
  double t0 = now();
  if (ntrain) { /* an evenly spaced sample, as blipsearch takes it from SQLite */
    int64_t step = d->n / ntrain;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < ntrain; i++) point(d, i * step, x + i * E);
    faiss_Index_train(ix, ntrain, x);
  }
  double t_train = now() - t0;
  t0 = now();
  for (int64_t a = 0; a < d->n; a += CHUNK) {
    int64_t n = d->n - a < CHUNK ? d->n - a : CHUNK;
    chunk(d, a, n, x);
    for (int64_t i = 0; i < n; i++) ids[i] = a + i;
    faiss_Index_add_with_ids(ix, n, x, ids);
  }
  double t_add = now() - t0;
  char path[512];
  snprintf(path, sizeof path, "%s/bench.faiss", dir);
  faiss_write_index_fname(ix, path);
  faiss_Index_free(ix);
  free(x);
  free(ids);
  FILE *f = fopen(path, "rb");
  fseek(f, 0, SEEK_END);
  long bytes = ftell(f);
  rewind(f);
  long a0, f0, a1, f1;
  rss(&a0, &f0);
  FaissIndex *rd = NULL;
  faiss_read_index(f, ivf ? IO_FLAG_MMAP_REAL : 0, &rd);
  fclose(f);
  printf("%-22s train %6.1f s (%lld pts)  add %6.1f s  file %7.1f MB (%.1f B/vector)\n", desc, t_train,
         (long long)ntrain, t_add, bytes / 1e6, (double)bytes / d->n);
  int kk = K * depths[NDEPTH - 1];
  int64_t *lab = malloc(sizeof(int64_t) * nq * kk), *ref = malloc(sizeof(int64_t) * nq * K);
  float *dis = malloc(sizeof(float) * nq * kk);
  const int probes[] = {8, 32, 128, nlist / 16 > 8 ? (int)nlist / 16 : 8}; /* the last: blipsearch's nprobe */
  for (int p = 0; p < (ivf ? 4 : 1); p++) {
    FaissIndexIVF *r = faiss_IndexIVF_cast(rd);
    if (r) faiss_IndexIVF_set_nprobe(r, (size_t)probes[p]);
    t0 = now();
    for (int qi = 0; qi < nq; qi++) faiss_Index_search(rd, 1, q + (size_t)qi * E, kk, dis + qi * kk, lab + (size_t)qi * kk);
    double ms = (now() - t0) / nq * 1e3;
    printf("  nprobe %4d%s: %7.2f ms/query  recall@10 %.3f;  exact re-score of top", r ? probes[p] : 0,
           p == 3 ? "*" : " ", ms, recall(lab, kk, gt, nq));
    for (int di = 0; di < NDEPTH; di++) {
      t0 = now();
      refine(d, q, nq, lab, kk, K * depths[di], ref);
      printf(" %d: %.3f (+%.2f ms)", K * depths[di], recall(ref, K, gt, nq), (now() - t0) / nq * 1e3);
    }
    printf("\n");
  }
  rss(&a1, &f1);
  printf("  query process resident after load + %d queries: anon %+.1f MB, file-backed %+.1f MB "
         "(raw f32 vectors: %.1f MB)\n", nq * (ivf ? 3 : 1), (a1 - a0) / 1024.0, (f1 - f0) / 1024.0,
         (double)d->n * E * 4 / 1e6);
  faiss_Index_free(rd);
  unlink(path);
  free(lab);
  free(ref);
  free(dis);
}

int main(int argc, char **argv) {
  int64_t sizes[8] = {1000000, 10000000};
  int ns = 2, nq = 100, threads = 0, opq = 1, pqs[4] = {32, 64}, npq = 2;
  static const struct option lo[] = {{"sizes", 1, 0, 's'}, {"nq", 1, 0, 'q'}, {"threads", 1, 0, 't'}, {"no-opq", 0, 0, 'o'}, {"pq", 1, 0, 'p'}, {"help", 0, 0, 'h'}, {0}};
  for (int c; (c = getopt_long(argc, argv, "", lo, NULL)) != -1;) {
    if (c == 's') {
      ns = 0;
      for (char *t = strtok(optarg, ","); t && ns < 8; t = strtok(NULL, ",")) sizes[ns++] = atoll(t);
    } else if (c == 'q') nq = atoi(optarg);
    else if (c == 't') threads = atoi(optarg);
    else if (c == 'o') opq = 0;
    else if (c == 'p') {
      npq = 0;
      for (char *t = strtok(optarg, ","); t && npq < 4; t = strtok(NULL, ",")) pqs[npq++] = atoi(t);
    }
    else {
      printf("usage: bench_faiss_pq [--sizes 1000000,10000000] [--nq 100] [--threads N] [--pq 32,64] [--no-opq]\n");
      return c == 'h' ? 0 : 2;
    }
  }
  blip_k_set_threads(threads);
  char dir[] = "/tmp/bench_faiss_pq.XXXXXX";
  if (!mkdtemp(dir)) return 1;
  printf("bench_faiss_pq: E %d, %d queries, %d threads, single-query search\n", E, nq, omp_get_max_threads());
  for (int si = 0; si < ns; si++) {
    dataset d = {sizes[si], (int)(sizes[si] / 500 > 100 ? sizes[si] / 500 : 100), NULL, NULL};
    d.cent = malloc(sizeof(float) * d.nc * E);
    d.spread = malloc(sizeof(float) * d.nc);
    uint64_t s = 7;
    for (int c = 0; c < d.nc; c++) {
      for (int j = 0; j < E; j++) d.cent[(size_t)c * E + j] = gauss(&s);
      unit(d.cent + (size_t)c * E);
      d.spread[c] = (0.02f + 0.06f * u01(&s)); /* per-dimension sigma: cluster radius 0.3-1.3 of unit */
    }
    float *q = malloc(sizeof(float) * nq * E);
    int64_t *gt = malloc(sizeof(int64_t) * nq * K);
    for (int i = 0; i < nq; i++) { /* a held-out photo near an indexed one */
      float v[E];
      point(&d, (int64_t)(mix(99 + i) % (uint64_t)d.n), v);
      uint64_t t = 1000 + i;
      for (int j = 0; j < E; j++) q[i * E + j] = v[j] + 0.03f * gauss(&t);
      unit(q + i * E);
    }
    double tgt = ground_truth(&d, q, nq, gt);
    printf("\n%lld vectors (%d clusters): exact top-10 by streamed GEMM %.2f ms/query (batched; FAISS Flat is "
           "single-query and slower)\n", (long long)d.n, d.nc, tgt / nq * 1e3);
    int nlist = (int)(4 * sqrt((double)d.n));
    char desc[64];
    if (d.n <= 2000000) {
      snprintf(desc, sizeof desc, "IVF%d,Flat", nlist);
      run(&d, desc, q, nq, gt, dir);
    }
    for (int pi = 0; pi < npq; pi++) {
      snprintf(desc, sizeof desc, "IVF%d,PQ%d", nlist, pqs[pi]);
      run(&d, desc, q, nq, gt, dir);
      snprintf(desc, sizeof desc, "OPQ%d,IVF%d,PQ%d", pqs[pi], nlist, pqs[pi]);
      if (opq) run(&d, desc, q, nq, gt, dir);
    }
    free(q);
    free(gt);
    free(d.cent);
    free(d.spread);
  }
  rmdir(dir);
  return 0;
}
