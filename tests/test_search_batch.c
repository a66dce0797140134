/* test_search_batch: blip_search_text_batch against blip_search_text on a
 * real index (generated photos indexed by blip-index with the tiny model).
 * One batch holds queries of different lengths with different filters,
 * rerank depths (0, 2, 4, all), a threshold, a date sort, the naive ITM
 * and enough candidates for several ITM calls of mixed queries; a query
 * without words in the middle gets its own error while the others
 * succeed. Each result must equal the query run alone: the same hits in
 * the same order, scores to float rounding, the same counts. A second
 * index without a rerank store and with a photo deleted from disk checks a
 * candidate whose tokens cannot be had (dropped, in the batch as alone). */
#include "blip_err.h"
#include "blip_kern.h"
#include "blip_model.h"
#include "blip_search.h"
#include "check.h"

#include <stdint.h>
#include <unistd.h>

static char g_dir[64];

static int sh(const char *fmt, const char *a, const char *b) {
  char cmd[4096];
  snprintf(cmd, sizeof cmd, fmt, a, b);
  return system(cmd);
}

static void same_result(const char *what, const blip_search_result *a, const blip_search_result *b) {
  int same = a->n == b->n && a->reranked == b->reranked && a->dropped == b->dropped && a->vanished == b->vanished &&
             a->filtered == b->filtered && a->n_allowed == b->n_allowed && a->truncated == b->truncated;
  CHECK(same, "%s: counts n %d/%d reranked %d/%d dropped %d/%d", what, a->n, b->n, a->reranked, b->reranked, a->dropped,
        b->dropped);
  double worst = 0;
  for (int i = 0; same && i < a->n; i++) {
    const blip_search_hit *x = &a->hits[i], *y = &b->hits[i];
    CHECK(x->id == y->id && !strcmp(x->path, y->path), "%s: hit %d is %lld, alone %lld", what, i, (long long)x->id,
          (long long)y->id);
    CHECK(isnan(x->itm_logit) == isnan(y->itm_logit), "%s: hit %d reranked in one only", what, i);
    double d = fabs(x->score - y->score) + fabs(x->cosine - y->cosine);
    if (!isnan(x->itm_logit)) d += fabs(x->itm_logit - y->itm_logit) + fabs(x->itm_prob - y->itm_prob);
    if (d > worst) worst = d;
  }
  printf("  %-44s %2d hits, %2d reranked, %d dropped, max|diff| %.2g\n", what, a->n, a->reranked, a->dropped, worst);
  CHECK(worst <= 1e-5, "%s: scores differ by %g", what, worst);
}

/* Run q[0..n) as one batch and each alone; compare. Returns the batch's rc. */
static int batch_vs_alone(blip_search *s, blip_search_query *q, int n) {
  int rc = blip_search_text_batch(s, q, n);
  for (int j = 0; j < n; j++) {
    blip_search_result one;
    int r = blip_search_text(s, q[j].query, q[j].o, &one);
    char what[96];
    snprintf(what, sizeof what, "#%d \"%.24s\"", j, q[j].query);
    CHECK(r == q[j].rc, "%s: rc %d in the batch, %d alone", what, q[j].rc, r);
    if (!r && !q[j].rc) same_result(what, &q[j].res, &one);
    if (r && q[j].rc) CHECK(!strcmp(q[j].err, blip_err_last()), "%s: message \"%s\" vs \"%s\"", what, q[j].err, blip_err_last());
    blip_search_result_free(&one);
  }
  return rc;
}

static void run(blip_model *m) {
  char db[128], raw[128], lib[128], path[256];
  snprintf(db, sizeof db, "%s/db", g_dir);
  snprintf(raw, sizeof raw, "%s/raw", g_dir);
  snprintf(lib, sizeof lib, "%s/lib", g_dir);
  const char *bin = getenv("BLIP_BIN") ? getenv("BLIP_BIN") : "build";
  char gen[512];
  snprintf(gen, sizeof gen, "%s/gen_photos", bin);
  CHECK(!sh("mkdir -p \"%s/a\" \"%s/b\"", lib, lib), "mkdir");
  CHECK(!sh("\"%s\" \"%s/a\" 8 --size 96x72 >/dev/null", gen, lib), "gen_photos a");
  CHECK(!sh("\"%s\" \"%s/b\" 6 --size 64x64 --seed 2 --ext png >/dev/null", gen, lib), "gen_photos b");
  CHECK(!sh("touch -d 2021-06-01T12:00:00 \"%s\"/a/* && touch -d 2023-03-15T12:00:00 \"%s\"/b/*", lib, lib), "touch");
  char idx[512];
  snprintf(idx, sizeof idx, "%s/blip-index", bin);
  char cmd[2048];
  snprintf(cmd, sizeof cmd, "\"%s\" --db \"%s\" --model \"%s\" --precision f32 \"%s\" 2>/dev/null && "
                            "\"%s\" --db \"%s\" --model \"%s\" --precision f32 --no-rerank-store \"%s\" 2>/dev/null",
           idx, db, test_data("blip-tiny"), lib, idx, raw, test_data("blip-tiny"), lib);
  CHECK(!system(cmd), "blip-index");

  blip_search *s = NULL;
  CHECK_OK(blip_search_open(db, &s));
  CHECK_OK(blip_search_attach(s, m));
  blip_search_opts o[9];
  for (int i = 0; i < 9; i++) blip_search_opts_default(&o[i]), o[i].n = 14, o[i].rerank = 14;
  snprintf(path, sizeof path, "%s/a", lib);
  o[1].filter.under = path, o[1].rerank = 4, o[1].n = 5;
  o[2].rerank = 0;
  o[4].filter.exts = "png", o[4].rerank = 2, o[4].sort_date = 1;
  o[5].n = 6; /* and a threshold, below */
  o[6].naive = 1;
  o[7].filter.after = "2022-01-01T00:00:00", o[7].rerank = 3;
  blip_search_query q[9] = {
      {.query = "a dog running on a beach", .o = &o[0]},
      {.query = "red car", .o = &o[1]},
      {.query = "a cat sleeping on a sofa near the window", .o = &o[2]},
      {.query = "?! ...", .o = &o[3]}, /* no words: refused alone */
      {.query = "two people", .o = &o[4]},
      {.query = "a very long caption about a small boat sailing on a calm blue lake under a bright sky", .o = &o[5]},
      {.query = "a bowl of fruit", .o = &o[6]},
      {.query = "a mountain", .o = &o[7]},
      {.query = "green trees in a park with a bench", .o = &o[8]},
  };
  { /* a threshold between the lowest and the highest ITM probability of query 5 */
    blip_search_result r;
    CHECK_OK(blip_search_text(s, q[5].query, &o[5], &r));
    float lo = 1, hi = 0;
    for (int i = 0; i < r.n; i++) lo = fminf(lo, r.hits[i].itm_prob), hi = fmaxf(hi, r.hits[i].itm_prob);
    o[5].threshold = (lo + hi) / 2;
    blip_search_result_free(&r);
  }
  /* 14 photos: 8 queries reranking up to 14 each = 5 + 2 ITM calls of 64 pairs (fast, naive) */
  int rc = batch_vs_alone(s, q, 9);
  CHECK(rc == BLIP_EINVAL && q[3].rc == BLIP_EINVAL && strstr(q[3].err, "no words"), "the refused query: rc %d, \"%s\"", q[3].rc,
        q[3].err);
  for (int j = 0; j < 9; j++) CHECK(j == 3 || (q[j].rc == 0 && q[j].res.n > 0), "query %d answered", j);
  CHECK(q[5].res.n > 0 && q[5].res.n < 6, "the threshold kept %d of 6", q[5].res.n);
  CHECK(q[0].res.reranked == 14 && q[1].res.reranked == 4 && q[1].res.filtered && q[2].res.reranked == 0, "depths");
  for (int j = 0; j < 9; j++) blip_search_result_free(&q[j].res);
  /* one query alone through the batch */
  CHECK(batch_vs_alone(s, q + 1, 1) == 0, "batch of one");
  blip_search_result_free(&q[1].res);
  blip_search_close(s);

  /* a photo gone from disk in an index without a rerank store: its tokens cannot be had */
  CHECK(!sh("rm -f \"%s\"/a/$(ls \"%s\"/a | head -1)", lib, lib), "rm");
  CHECK_OK(blip_search_open(raw, &s));
  CHECK_OK(blip_search_attach(s, m));
  blip_search_opts_default(&o[0]), o[0].n = 14, o[0].rerank = 14;
  o[1].filter.under = NULL;
  rc = batch_vs_alone(s, q, 3);
  CHECK(rc == 0 && q[0].res.dropped == 1 && q[0].res.reranked == 13 && q[0].res.n == 13, "dropped in the batch: %d, %d, n %d",
        q[0].res.dropped, q[0].res.reranked, q[0].res.n);
  CHECK(q[1].res.dropped <= 1 && q[1].res.reranked + q[1].res.dropped == 4, "the 4-deep query: dropped %d", q[1].res.dropped);
  for (int j = 0; j < 3; j++) blip_search_result_free(&q[j].res);
  blip_search_close(s);
}

int main(void) {
  blip_k_set_threads(2);
  snprintf(g_dir, sizeof g_dir, "/tmp/blip_test_sbatch.XXXXXX");
  if (!mkdtemp(g_dir)) return 2;
  blip_model_opts mo = {.precision = BLIP_PREC_F32};
  blip_model *m = NULL;
  if (blip_model_load(test_data("blip-tiny"), &mo, &m)) {
    fprintf(stderr, "%s\n", blip_err_last());
    return 2;
  }
  run(m);
  blip_model_free(m);
  sh("rm -rf \"%s\"%s", g_dir, "");
  return check_summary();
}
