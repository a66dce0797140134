/* bench_query: cost of one text query at the real BLIP base geometry with
 * random weights: text encode, FAISS flat search over 100k and 1M random
 * normalized vectors, int8 rerank-record decode, ITM rerank of 16 and 32
 * candidates with the fast (batched, reassociated) and the naive cross-
 * attention in the same run, the total, and the load time of a real-size
 * model file (random base weights written to a temp dir with the
 * safetensors writer). The rerank runs for a 6- and a 12-token query: the
 * reassociation saves a factor of about head_dim/L on the cross-attention,
 * so its gain depends on the query length. Nothing is asserted; the figures
 * go into reports.
 * --batch [--precision P]: only the engine side of batching concurrent
 * queries: Q queries (6 to 15 tokens) with k ITM candidates each, one by
 * one (blip_model_text + blip_model_itm per query) against batched (one
 * blip_model_text over the Q, blip_model_itm_pairs over their Q*k pairs,
 * 64 a call), interleaved, ms per query and the ratio.
 * Usage: bench_query [--threads N] [--data DIR] [--sizes N,N] [--no-load] [--cpu-time] [--json]
 *        bench_query --batch [--precision P] [--threads N] [--data DIR] */
#include "blip_arg.h"
#include "blip_err.h"
#include "blip_kern.h"
#include "blip_model.h"
#include "blip_search.h"
#include "blip_st.h"
#include "blip_store.h"

#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* --cpu-time: process CPU time instead of wall time. With --threads 1 on a
 * shared machine this leaves out the time other processes held the core. */
static clockid_t g_clock = CLOCK_MONOTONIC;
static double now(void) {
  struct timespec t;
  clock_gettime(g_clock, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t g_rng = 0x243f6a8885a308d3ull;
static uint64_t rnd(void) { /* splitmix64 */
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static float urand(void) { return (float)((rnd() >> 40) * (1.0 / 16777216.0)) * 2 - 1; } /* [-1,1) */

static double best_of(const double *v, int n) {
  double b = v[0];
  for (int i = 1; i < n; i++) b = v[i] < b ? v[i] : b;
  return b;
}

static void die(const char *what) {
  fprintf(stderr, "bench_query: %s: %s\n", what, blip_err_last());
  exit(1);
}

/* ms per call of stmt: the best of reps (the machine is shared; the minimum
 * is the least disturbed run) */
#define TIME_MS(reps, stmt)                                  \
  ({                                                         \
    double ts_[64];                                          \
    for (int r_ = 0; r_ < (reps); r_++) {                    \
      double t0_ = now();                                    \
      stmt;                                                  \
      ts_[r_] = (now() - t0_) * 1e3;                         \
    }                                                        \
    best_of(ts_, (reps));                                    \
  })

/* Flat IP index over n random unit vectors; ms per single-query search for k = 16, 32. */
static void faiss_ms(int64_t n, int E, double ms[2], double *build_s) {
  FaissIndex *ix = NULL;
  if (faiss_index_factory(&ix, E, "Flat", METRIC_INNER_PRODUCT) != 0) {
    fprintf(stderr, "bench_query: faiss index_factory failed\n");
    exit(1);
  }
  const int64_t chunk = 65536;
  float *x = malloc((size_t)chunk * E * sizeof *x), q[1024], dis[64];
  idx_t lab[64];
  if (!x) exit(1);
  double t0 = now();
  for (int64_t done = 0; done < n; done += chunk) {
    int64_t m = n - done < chunk ? n - done : chunk;
    for (int64_t i = 0; i < m * E; i++) x[i] = urand();
    blip_k_l2norm(x, (int)m, E);
    faiss_Index_add(ix, m, x);
  }
  *build_s = now() - t0;
  for (int j = 0; j < E; j++) q[j] = urand();
  blip_k_l2norm(q, 1, E);
  faiss_Index_search(ix, 1, q, 16, dis, lab); /* warm */
  ms[0] = TIME_MS(9, faiss_Index_search(ix, 1, q, 16, dis, lab));
  ms[1] = TIME_MS(9, faiss_Index_search(ix, 1, q, 32, dis, lab));
  faiss_Index_free(ix);
  free(x);
}

/* Write random base-size weights (names and shapes from the manifest) plus
 * config.json and vocab.txt into dir. Every tensor shares one buffer. */
static void write_model(const char *dir, const char *data) {
  char p[4096], line[512];
  snprintf(p, sizeof p, "%s/checkpoint-manifest/blip-itm-base-coco.tsv", data);
  FILE *f = fopen(p, "r");
  if (!f) {
    fprintf(stderr, "bench_query: %s: cannot open\n", p);
    exit(1);
  }
  typedef struct {
    char name[160];
    int ndim;
    int64_t shape[4];
  } ent;
  ent *e = calloc(1024, sizeof *e);
  int n = 0;
  int64_t maxn = 0;
  while (e && n < 1024 && fgets(line, sizeof line, f)) {
    char *name = strtok(line, "\t"), *shape = strtok(NULL, "\t");
    if (!name || !shape) continue;
    snprintf(e[n].name, sizeof e[n].name, "%s", name);
    int64_t numel = 1;
    for (char *s = strtok(shape, ","); s && e[n].ndim < 4; s = strtok(NULL, ",")) numel *= e[n].shape[e[n].ndim++] = atoll(s);
    if (numel > maxn) maxn = numel;
    n++;
  }
  fclose(f);
  float *buf = malloc((size_t)maxn * sizeof *buf);
  blip_st_writer *w = NULL;
  if (!e || !buf || blip_st_writer_new(&w)) die("write model");
  for (int64_t i = 0; i < maxn; i++) buf[i] = 0.03f * urand();
  for (int i = 0; i < n; i++)
    if (blip_st_writer_add(w, e[i].name, BLIP_DT_F32, e[i].ndim, e[i].shape, buf)) die("writer add");
  blip_st_writer_meta(w, "format", "pt");
  snprintf(p, sizeof p, "%s/model.safetensors", dir);
  if (blip_st_writer_save(w, p)) die("writer save");
  blip_st_writer_free(w);
  free(buf);
  free(e);
  static const char *const copies[2][2] = {{"checkpoint-manifest/blip-itm-base-coco.config.json", "config.json"},
                                           {"blip-tiny/vocab.txt", "vocab.txt"}};
  for (int i = 0; i < 2; i++) {
    char src[4096], dst[4096], cbuf[65536];
    snprintf(src, sizeof src, "%s/%s", data, copies[i][0]);
    snprintf(dst, sizeof dst, "%s/%s", dir, copies[i][1]);
    FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
    size_t k;
    while (in && out && (k = fread(cbuf, 1, sizeof cbuf, in)) > 0) fwrite(cbuf, 1, k, out);
    if (!in || !out) {
      fprintf(stderr, "bench_query: cannot copy %s\n", src);
      exit(1);
    }
    fclose(in);
    fclose(out);
  }
}

/* --batch: see the top. */
static void bench_batch(blip_model *m) {
  enum { QMAX = 16, L = 15, CH = 64 };
  const blip_cfg *c = blip_model_cfg(m);
  const size_t per = (size_t)c->v_tokens * c->v_hidden;
  float *tok = malloc(32 * per * sizeof *tok);
  const float *imgs[32];
  if (!tok) die("alloc");
  for (size_t i = 0; i < 32 * per; i++) tok[i] = 1.7f * urand();
  for (int i = 0; i < 32; i++) imgs[i] = tok + i * per;
  int32_t ids[QMAX * L], mask[QMAX * L];
  int lens[QMAX], plen[QMAX * 16];
  static int32_t pid[QMAX * 16 * L];
  const float *pimg[QMAX * 16];
  float feat[QMAX * 1024], logits[QMAX * 16 * 2];
  for (int q = 0; q < QMAX; q++) {
    lens[q] = 6 + 3 * (q % 4); /* [CLS] + 4..13 words + [SEP] */
    for (int t = 0; t < L; t++) {
      ids[q * L + t] = t == 0 ? 101 : t == lens[q] - 1 ? 102 : t < lens[q] ? 2000 + (int)(rnd() % 20000) : 0;
      mask[q * L + t] = t < lens[q];
    }
  }
  printf("%-8s %4s %16s %16s %8s\n", "queries", "k", "1by1 ms/query", "batched ms/query", "ratio");
  const int QS[2] = {4, 16}, KS[3] = {1, 4, 16};
  for (int qi = 0; qi < 2; qi++)
    for (int ki = 0; ki < 3; ki++) {
      const int Q = QS[qi], k = KS[ki], np = Q * k;
      for (int p = 0; p < np; p++) {
        memcpy(pid + (size_t)p * L, ids + (p / k) * L, L * sizeof *pid);
        plen[p] = lens[p / k];
        pimg[p] = imgs[p % 32];
      }
      double one = 1e9, bat = 1e9;
      for (int rep = 0; rep < 3; rep++) { /* rep 0 warms (primitives, arena); then interleaved */
        double t0 = now();
        for (int q = 0; q < Q; q++)
          if (blip_model_text(m, ids + q * L, NULL, 1, lens[q], NULL, feat) ||
              blip_model_itm(m, ids + q * L, lens[q], pimg + q * k, k, BLIP_ITM_ENC, 1, logits, NULL))
            die("one by one");
        double t1 = now();
        if (blip_model_text(m, ids, mask, Q, L, NULL, feat)) die("batched text");
        for (int c = 0; c < np; c += CH)
          if (blip_model_itm_pairs(m, pid + (size_t)c * L, plen + c, L, pimg + c, np - c < CH ? np - c : CH, BLIP_ITM_ENC, 1,
                                   logits, NULL))
            die("batched itm");
        double t2 = now();
        if (rep) one = fmin(one, t1 - t0), bat = fmin(bat, t2 - t1);
      }
      printf("%-8d %4d %16.1f %16.1f %7.2fx\n", Q, k, one * 1e3 / Q, bat * 1e3 / Q, one / bat);
      fflush(stdout);
    }
  free(tok);
}

int main(int argc, char **argv) {
  const char *data = getenv("BLIP_TEST_DATA") ? getenv("BLIP_TEST_DATA") : "tests/data";
  int threads = 0, json = 0, load = 1, batch = 0;
  blip_model_opts mo = {.precision = BLIP_PREC_F32};
  int64_t sizes[4] = {100000, 1000000};
  int nsizes = 2;
  static const struct option lo[] = {{"threads", 1, 0, 't'}, {"data", 1, 0, 'd'}, {"sizes", 1, 0, 's'},
                                     {"no-load", 0, 0, 'L'}, {"json", 0, 0, 'j'}, {"cpu-time", 0, 0, 'c'},
                                     {"help", 0, 0, 'h'}, {"batch", 0, 0, 'b'}, {"precision", 1, 0, 'p'},
                                     {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "", lo, NULL)) != -1;) {
    switch (c) {
    case 't': threads = (int)blip_arg_must("bench_query", "--threads", optarg, 1, blip_arg_max_threads()); break;
    case 'd': data = optarg; break;
    case 's':
      nsizes = 0;
      for (char *s = strtok(optarg, ","); s && nsizes < 4; s = strtok(NULL, ",")) sizes[nsizes++] = blip_arg_must("bench_query", "--sizes", s, 1, 100000000);
      break;
    case 'L': load = 0; break;
    case 'j': json = 1; break;
    case 'c': g_clock = CLOCK_PROCESS_CPUTIME_ID; break;
    case 'b': batch = 1; break;
    case 'p':
      if (blip_model_parse_precision(optarg, &mo.precision)) die("--precision");
      break;
    case 'h':
      puts("usage: bench_query [--threads N] [--data DIR] [--sizes 100000,1000000] [--no-load] [--cpu-time] [--json]\n"
           "       bench_query --batch [--precision f32|bf16|int8] [--threads N] [--data DIR]");
      return 0;
    default: return 2;
    }
  }
  blip_k_set_threads(threads);
  char cpath[4096];
  snprintf(cpath, sizeof cpath, "%s/checkpoint-manifest/blip-itm-base-coco.config.json", data);
  blip_cfg cfg;
  if (blip_cfg_load(cpath, &cfg)) die(cpath);
  const int T = cfg.v_tokens, Dv = cfg.v_hidden, E = cfg.embed_dim;
  blip_model *m = NULL;
  if (blip_model_random(&cfg, batch ? &mo : NULL, 1, &m)) die("random model");
  if (!json)
    printf("BLIP base geometry (T %d, Dv %d, E %d), random weights, %d threads, %s time, best of N\n", T, Dv, E,
           blip_k_threads(), g_clock == CLOCK_MONOTONIC ? "wall" : "process CPU");
  if (batch) {
    printf("batching concurrent queries, %s, fast ITM, best of 2 interleaved runs\n", blip_model_precision_name(mo.precision));
    bench_batch(m);
    blip_model_free(m);
    return 0;
  }

  /* text encode: a 12-token query ([CLS] 10 words [SEP]) */
  int32_t ids[12] = {101};
  for (int i = 1; i < 11; i++) ids[i] = 2000 + (int)(rnd() % 20000);
  ids[11] = 102;
  float feat[1024];
  if (blip_search_text_feat(m, ids, 12, feat)) die("text");
  double text_ms = TIME_MS(9, blip_search_text_feat(m, ids, 12, feat));

  /* FAISS flat */
  double faiss_t[4][2], build_s[4];
  for (int i = 0; i < nsizes; i++) {
    faiss_ms(sizes[i], E, faiss_t[i], &build_s[i]);
    if (!json)
      printf("faiss flat %8lld vectors: search k=16 %.2f ms, k=32 %.2f ms (index built in %.1f s)\n",
             (long long)sizes[i], faiss_t[i][0], faiss_t[i][1], build_s[i]);
  }

  /* rerank candidates: vision-token-like values, one int8 record per candidate */
  const int KS[2] = {16, 32}, LS[2] = {6, 12}; /* query lengths: [ENC] 4 words [SEP], and 10 words */
  size_t per = (size_t)T * Dv, rec_bytes = blip_tokstore_payload_size(BLIP_TOKENS_I8, T, Dv);
  float *tok = malloc(32 * per * sizeof *tok), cos[32];
  uint8_t *rec = malloc(32 * rec_bytes);
  const float *img[32];
  blip_search_hit hf[32], hn[32];
  if (!tok || !rec) die("alloc");
  for (size_t i = 0; i < 32 * per; i++) tok[i] = 1.7f * urand();
  for (int i = 0; i < 32; i++) {
    img[i] = tok + i * per;
    cos[i] = 0.3f * urand();
    blip_tokstore_encode(BLIP_TOKENS_I8, T, Dv, img[i], rec + i * rec_bytes);
  }
  double dec_ms = TIME_MS(5, for (int i = 0; i < 16; i++)
                                 blip_tokstore_decode(BLIP_TOKENS_I8, T, Dv, rec + i * rec_bytes, tok + i * per));
  double fast_ms[2][2], naive_ms[2][2], diff[2][2];
  for (int li = 0; li < 2; li++) {
    int32_t q[12];
    memcpy(q, ids, sizeof q);
    q[LS[li] - 1] = 102;
    for (int j = 0; j < 2; j++) {
      int k = KS[j];
      if (blip_search_rerank(m, q, LS[li], img, cos, k, 0, hf)) die("rerank fast"); /* warm */
      fast_ms[li][j] = TIME_MS(3, blip_search_rerank(m, q, LS[li], img, cos, k, 0, hf));
      naive_ms[li][j] = TIME_MS(2, blip_search_rerank(m, q, LS[li], img, cos, k, 1, hn));
      diff[li][j] = 0;
      for (int i = 0; i < k; i++) diff[li][j] = fmax(diff[li][j], fabs(hf[i].score - hn[i].score));
      if (!json)
        printf("rerank %2d candidates, %2d-token query: fast %.1f ms, naive %.1f ms, %.1fx (max|score diff| %.1e)\n",
               k, LS[li], fast_ms[li][j], naive_ms[li][j], naive_ms[li][j] / fast_ms[li][j], diff[li][j]);
    }
  }
  /* what each rerank-store format costs in ITM score, against fp32 tokens (16 candidates, 12-token query) */
  if (!json) {
    float *dec = malloc(16 * per * sizeof *dec);
    const float *dimg[16];
    blip_search_hit href[16], hq[16];
    for (size_t i = 0; i < 16 * per; i++) tok[i] = 1.7f * urand(); /* fp32 again: the decode timing overwrote them */
    if (!dec || blip_search_rerank(m, ids, 12, img, cos, 16, 0, href)) die("rerank ref");
    for (int f = BLIP_TOKENS_I8; f < BLIP_TOKENS_NFMT; f++) {
      size_t rb = blip_tokstore_payload_size((blip_tokens_fmt)f, T, Dv);
      uint8_t *r1 = malloc(rb);
      for (int i = 0; i < 16; i++) {
        blip_tokstore_encode((blip_tokens_fmt)f, T, Dv, img[i], r1);
        blip_tokstore_decode((blip_tokens_fmt)f, T, Dv, r1, dec + i * per);
        dimg[i] = dec + i * per;
      }
      free(r1);
      if (blip_search_rerank(m, ids, 12, dimg, cos, 16, 0, hq)) die("rerank decoded");
      double worst = 0;
      for (int i = 0; i < 16; i++) worst = fmax(worst, fabs(hq[i].score - href[i].score)); /* hit i = candidate i */
      printf("rerank store %-4s: %zu bytes per image, max|ITM score diff| vs fp32 tokens %.2e\n",
             blip_tokstore_fmt_name((blip_tokens_fmt)f), rb, worst);
    }
    free(dec);
  }
  double total = text_ms + faiss_t[nsizes - 1][0] + dec_ms + fast_ms[1][0];

  /* model load of a real-size file */
  double load_s = -1, first_ms = -1, first_rr_ms = -1;
  if (load) {
    char dir[] = "/tmp/blip_bench_model.XXXXXX";
    if (!mkdtemp(dir)) {
      perror("mkdtemp");
      return 1;
    }
    write_model(dir, data);
    blip_model *lm = NULL;
    double t0 = now();
    if (blip_model_load(dir, NULL, &lm)) die("load");
    load_s = now() - t0;
    t0 = now();
    if (blip_search_text_feat(lm, ids, 12, feat)) die("first forward");
    first_ms = (now() - t0) * 1e3;
    t0 = now();
    if (blip_search_rerank(lm, ids, 12, img, cos, 16, 0, hf)) die("first rerank");
    first_rr_ms = (now() - t0) * 1e3;
    blip_model_free(lm);
    const char *names[3] = {"model.safetensors", "config.json", "vocab.txt"};
    for (int i = 0; i < 3; i++) {
      char p[4096];
      snprintf(p, sizeof p, "%s/%s", dir, names[i]);
      unlink(p);
    }
    rmdir(dir);
  }

  if (json) {
    printf("{\"threads\":%d,\"clock\":\"%s\",\"text_encode_ms\":%.3f,\"faiss\":[", blip_k_threads(),
           g_clock == CLOCK_MONOTONIC ? "wall" : "cpu", text_ms);
    for (int i = 0; i < nsizes; i++)
      printf("%s{\"n\":%lld,\"search_k16_ms\":%.3f,\"search_k32_ms\":%.3f}", i ? "," : "", (long long)sizes[i],
             faiss_t[i][0], faiss_t[i][1]);
    printf("],\"decode_int8_16_ms\":%.3f,\"rerank\":[", dec_ms);
    for (int li = 0; li < 2; li++)
      for (int j = 0; j < 2; j++)
        printf("%s{\"k\":%d,\"query_tokens\":%d,\"fast_ms\":%.3f,\"naive_ms\":%.3f,\"speedup\":%.2f,\"max_diff\":%.3g}",
               li || j ? "," : "", KS[j], LS[li], fast_ms[li][j], naive_ms[li][j], naive_ms[li][j] / fast_ms[li][j],
               diff[li][j]);
    printf("],\"total_ms\":%.3f,\"model_load_s\":%.3f,\"first_text_ms\":%.3f,\"first_rerank16_ms\":%.3f}\n", total,
           load_s, first_ms, first_rr_ms);
  } else {
    printf("int8 rerank records: decode 16 in %.2f ms\n", dec_ms);
    printf("total, 12-token query (text %.1f + faiss %lld %.1f + decode %.1f + rerank 16 fast %.1f): %.1f ms\n",
           text_ms, (long long)sizes[nsizes - 1], faiss_t[nsizes - 1][0], dec_ms, fast_ms[1][0], total);
    if (load)
      printf("model load (895 MB f32 safetensors, mmap, file in page cache): %.2f s, then first text encode %.1f ms, "
             "first rerank of 16 %.1f ms\n", load_s, first_ms, first_rr_ms);
  }
  blip_model_free(m);
  free(tok);
  free(rec);
  return 0;
}
