/* bench_merge: rows per second of blip-index merge, and how it changes with
 * the number of shards. Builds S shard indexes holding R rows in all
 * (synthetic paths and unit features, E = 256 as in BLIP base, no rerank
 * store: token files are linked, not copied, so their size does not enter),
 * then times blip_merge() into a fresh index, FAISS build included.
 * Usage: bench_merge [--rows R] [--shards 1,2,4,8,16] */
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blip_arg.h"
#include "blip_err.h"
#include "blip_merge.h"
#include "blip_store.h"

enum { E = 256, BATCH = 1000 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what) {
  fprintf(stderr, "bench_merge: %s: %s\n", what, blip_err_last());
  exit(1);
}

/* rows [a, b) of the collection into one shard index at dir */
static void make_shard(const char *dir, int64_t a, int64_t b) {
  static const blip_store_identity id = {"bench", "f32", "size=384,autorotate=1,exact", E, 577, 768};
  blip_store_opts o = {.write = 1, .rebuild = 1, .tokens = BLIP_TOKENS_NONE};
  blip_store *st = NULL;
  if (blip_store_open(dir, &id, &o, &st)) die(dir);
  static float feats[BATCH * E];
  static char paths[BATCH][64];
  blip_store_row rows[BATCH];
  uint64_t s = 12345;
  for (int64_t i = a; i < b; i += BATCH) {
    int n = (int)(b - i < BATCH ? b - i : BATCH);
    for (int r = 0; r < n; r++) {
      double q = 0;
      for (int j = 0; j < E; j++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        feats[r * E + j] = (float)((s >> 40) & 0xffff) / 65536.0f - 0.5f;
        q += (double)feats[r * E + j] * feats[r * E + j];
      }
      for (int j = 0; j < E; j++) feats[r * E + j] /= (float)sqrt(q);
      snprintf(paths[r], sizeof paths[r], "/photos/%04lld/img%08lld.jpg", (long long)((i + r) / 1000), (long long)(i + r));
      rows[r] = (blip_store_row){.path = paths[r], .size = 100000 + r, .mtime_ns = i + r, .fingerprint = (uint64_t)(i + r),
                                 .width = 640, .height = 480, .orientation = 1, .taken_at = ""};
    }
    if (blip_store_put(st, rows, NULL, n, feats, NULL, NULL)) die("put");
  }
  if (blip_store_flush(st)) die("flush");
  blip_store_close(st);
}

int main(int argc, char **argv) {
  int64_t total = 80000; /* below the IVF threshold: the merge's own cost, not IVF training */
  int counts[16] = {1, 2, 4, 8, 16}, nc = 5;
  static const struct option lo[] = {{"rows", 1, 0, 'r'}, {"shards", 1, 0, 's'}, {"help", 0, 0, 'h'}, {0}};
  for (int c; (c = getopt_long(argc, argv, "", lo, NULL)) != -1;) {
    if (c == 'r') total = blip_arg_must("bench_merge", "--rows", optarg, 1, 100000000);
    else if (c == 's') {
      nc = 0;
      for (char *t = strtok(optarg, ","); t && nc < 16; t = strtok(NULL, ","))
        counts[nc++] = (int)blip_arg_must("bench_merge", "--shards", t, 1, 256);
    } else {
      printf("usage: bench_merge [--rows R] [--shards 1,2,4,8,16]\n");
      return c == 'h' ? 0 : 2;
    }
  }
  char root[] = "/tmp/bench_merge.XXXXXX";
  if (!mkdtemp(root)) return 1;
  printf("bench_merge: %lld rows in all, E %d, no rerank store; merge time includes the FAISS build\n",
         (long long)total, E);
  printf("%7s %12s %12s %14s\n", "shards", "build s", "merge s", "merged rows/s");
  for (int k = 0; k < nc; k++) {
    int S = counts[k];
    char **dirs = calloc((size_t)S, sizeof *dirs), out[600];
    double t0 = now();
    for (int i = 0; i < S; i++) {
      if (asprintf(&dirs[i], "%s/s%d-%d", root, S, i) < 0) return 1;
      make_shard(dirs[i], total * i / S, total * (i + 1) / S);
    }
    double built = now() - t0;
    snprintf(out, sizeof out, "%s/merged-%d", root, S);
    blip_merge_stats ms;
    t0 = now();
    if (blip_merge(out, (const char *const *)dirs, S, &ms)) die("merge");
    double dt = now() - t0;
    if (ms.rows != total) {
      fprintf(stderr, "bench_merge: merged %lld rows, want %lld\n", (long long)ms.rows, (long long)total);
      return 1;
    }
    printf("%7d %12.2f %12.2f %14.0f\n", S, built, dt, total / dt);
    for (int i = 0; i < S; i++) free(dirs[i]);
    free(dirs);
  }
  char cmd[700];
  snprintf(cmd, sizeof cmd, "rm -rf %s", root);
  return system(cmd) == 0 ? 0 : 1;
}
