/* test_eval_metric: BLIP's itm_eval, rank ties, top-k, score rows, ITM plan
 * and the annotation reader, on hand-built inputs whose answers are worked
 * out in the comments. The numpy argsort orders below were traced by hand
 * (17 zeros) or recorded from numpy 1.24.2 np.argsort (float32, default kind). */
#include <stdint.h>

#include "blip_err.h"
#include "blip_eval.h"
#include "check.h"

static void test_argsort_numpy(void) {
  /* 17 equal values: one quicksort partition (pivot at 8, swapped to 15), then
   * insertion sort of [0..7] and [9..16]. Traced by hand; numpy agrees. */
  float z[17] = {0};
  int got[40];
  static const int want17[17] = {0, 14, 13, 12, 11, 10, 9, 15, 8, 6, 5, 4, 3, 2, 1, 7, 16};
  blip_eval_argsort(z, 17, got);
  int ok = 1;
  for (int i = 0; i < 17; i++) ok &= got[i] == want17[i];
  CHECK(ok, "17 ties: numpy's introsort order");

  /* v[i] = (7i) mod 5, n = 40: numpy 1.24.2 np.argsort. */
  float v[40];
  for (int i = 0; i < 40; i++) v[i] = (float)((i * 7) % 5);
  static const int want40[40] = {0, 20, 15, 30, 10, 25, 35, 5,  23, 8,  33, 28, 13, 3,  38, 18, 6,  21, 1,  36,
                                 16, 26, 11, 31, 34, 29, 19, 14, 9, 4, 24, 39, 27, 22, 17, 12, 32, 7,  2,  37};
  blip_eval_argsort(v, 40, got);
  ok = 1;
  for (int i = 0; i < 40; i++) ok &= got[i] == want40[i];
  CHECK(ok, "(7i mod 5), n=40: numpy order");

  /* v[i] = i^2 mod 3, n = 23: numpy 1.24.2. */
  for (int i = 0; i < 23; i++) v[i] = (float)((i * i) % 3);
  static const int want23[23] = {0, 3, 18, 6, 15, 9, 21, 12, 20, 19, 17, 16, 14, 11, 10, 8, 7, 5, 4, 2, 1, 13, 22};
  blip_eval_argsort(v, 23, got);
  ok = 1;
  for (int i = 0; i < 23; i++) ok &= got[i] == want23[i];
  CHECK(ok, "(i^2 mod 3), n=23: numpy order");

  /* A McIlroy "antiqsort" input built against numpy's partitioning, halved so
   * that values pair up: the introsort runs out of depth (2*floor(log2 64) =
   * 12) and finishes a partition with heapsort, ties included. numpy 1.24.2. */
  static const float adv[64] = {0,  28, 1,  28, 2,  27, 3,  27, 4,  26, 5,  26, 6,  25, 7,  25,
                                8,  24, 9,  24, 10, 23, 11, 23, 12, 13, 31, 30, 31, 30, 29, 0,
                                1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 22, 22, 21, 21,
                                20, 20, 19, 19, 18, 18, 17, 17, 16, 16, 15, 15, 14, 14, 29, 13};
  static const int want_adv[64] = {0,  31, 2,  32, 4,  33, 6,  34, 8,  35, 10, 36, 12, 37, 14, 38,
                                   16, 39, 18, 40, 20, 41, 22, 42, 24, 43, 25, 63, 60, 61, 59, 58,
                                   56, 57, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 23, 21,
                                   17, 19, 15, 13, 11, 9,  7,  5,  1,  3,  62, 30, 29, 27, 28, 26};
  int got64[64];
  blip_eval_argsort(adv, 64, got64);
  ok = 1;
  for (int i = 0; i < 64; i++) ok &= got64[i] == want_adv[i];
  CHECK(ok, "adversarial input (heapsort fallback with ties): numpy order");

  /* NaN sorts last, as numpy. */
  float w[4] = {2, NAN, -1, 0};
  blip_eval_argsort(w, 4, got);
  CHECK(got[0] == 2 && got[1] == 3 && got[2] == 0 && got[3] == 1, "NaN last: %d %d %d %d", got[0], got[1], got[2],
        got[3]);
}

static void test_rank_ties(void) {
  /* n <= 16 sorts stably: ascending [3,5,0,2,4,1], reversed [1,4,2,0,5,3].
   * The three tied 0.5s rank 1 (idx 4), 2 (idx 2), 3 (idx 0): the higher
   * index wins a tie. */
  float row[6] = {0.5f, 0.9f, 0.5f, 0.1f, 0.5f, 0.2f};
  int64_t r;
  int g;
  g = 0; CHECK_OK(blip_eval_rank(row, 6, &g, 1, &r)); CHECK(r == 3, "tie idx0 rank %lld", (long long)r);
  g = 2; CHECK_OK(blip_eval_rank(row, 6, &g, 1, &r)); CHECK(r == 2, "tie idx2 rank %lld", (long long)r);
  g = 4; CHECK_OK(blip_eval_rank(row, 6, &g, 1, &r)); CHECK(r == 1, "tie idx4 rank %lld", (long long)r);
  g = 3; CHECK_OK(blip_eval_rank(row, 6, &g, 1, &r)); CHECK(r == 5, "untied idx3 rank %lld", (long long)r);
  int gs[2] = {0, 5}; /* min(3, 4) */
  CHECK_OK(blip_eval_rank(row, 6, gs, 2, &r)); CHECK(r == 3, "two gts rank %lld", (long long)r);
  CHECK_OK(blip_eval_rank(row, 6, gs, 0, &r)); CHECK(r == BLIP_EVAL_NO_RANK, "no gt");
  /* 17 zeros, reversed numpy order [16,7,1,2,3,4,5,6,8,15,9,...,14,0]. */
  float z[17] = {0};
  g = 0;  CHECK_OK(blip_eval_rank(z, 17, &g, 1, &r)); CHECK(r == 16, "17 ties idx0 rank %lld", (long long)r);
  g = 7;  CHECK_OK(blip_eval_rank(z, 17, &g, 1, &r)); CHECK(r == 1, "17 ties idx7 rank %lld", (long long)r);
  g = 15; CHECK_OK(blip_eval_rank(z, 17, &g, 1, &r)); CHECK(r == 9, "17 ties idx15 rank %lld", (long long)r);
  int g2[2] = {0, 9}; /* min(16, 10) */
  CHECK_OK(blip_eval_rank(z, 17, g2, 2, &r)); CHECK(r == 10, "17 ties two gts rank %lld", (long long)r);
  g = 17;
  CHECK(blip_eval_rank(z, 17, &g, 1, &r) == BLIP_EINVAL, "gt out of range rejected");
}

/* itm_eval on 2 images x 4 texts where every decision is a tie.
 * img0 owns t0,t1; img1 owns t2,t3. */
static void test_itm_eval_ties(void) {
  /* i2t img0 [.5 .2 .5 .1]: desc [2,0,1,3] -> best GT (t0) rank 1: a tie for
   * first place that numpy resolves against us. img1 [.7 .3 .7 0]: desc
   * [2,0,1,3] -> t2 rank 0. TR@1 = 50, TR@5 = TR@10 = 100. */
  float i2t[2 * 4] = {0.5f, 0.2f, 0.5f, 0.1f, 0.7f, 0.3f, 0.7f, 0.0f};
  /* t2i (rows: texts; cols: 2 images). [.4 .4] desc [1,0]: GT 0 -> rank 1.
   * t0: 1, t1: 1, t2 [.3 .3] GT 1 -> 0, t3 [.9 .1] GT 1 -> 1.
   * IR@1 = 25, IR@5 = IR@10 = 100. */
  float t2i[4 * 2] = {0.4f, 0.4f, 0.4f, 0.4f, 0.3f, 0.3f, 0.9f, 0.1f};
  int txt2img[4] = {0, 0, 1, 1}, off[3] = {0, 2, 4}, img2txt[4] = {0, 1, 2, 3};
  blip_eval_recall R;
  int64_t ri[2], rt[4];
  CHECK_OK(blip_eval_itm_eval(i2t, t2i, 2, 4, txt2img, off, img2txt, &R, ri, rt));
  CHECK(ri[0] == 1 && ri[1] == 0, "i2t ranks %lld %lld", (long long)ri[0], (long long)ri[1]);
  CHECK(rt[0] == 1 && rt[1] == 1 && rt[2] == 0 && rt[3] == 1, "t2i ranks");
  CHECK(R.tr_r1 == 50.0 && R.tr_r5 == 100.0 && R.tr_r10 == 100.0, "tr %g %g %g", R.tr_r1, R.tr_r5, R.tr_r10);
  CHECK(R.ir_r1 == 25.0 && R.ir_r5 == 100.0 && R.ir_r10 == 100.0, "ir %g %g %g", R.ir_r1, R.ir_r5, R.ir_r10);
  /* tr_mean = 250/3, ir_mean = 75, r_mean = (250/3 + 75)/2 = 475/6 */
  CHECK(fabs(R.tr_mean - 250.0 / 3) < 1e-12 && R.ir_mean == 75.0, "means %g %g", R.tr_mean, R.ir_mean);
  CHECK(fabs(R.r_mean - 475.0 / 6) < 1e-12, "r_mean %g", R.r_mean);
}

#define NI 6
#define NT 30 /* 5 captions per image: image i owns texts 5i .. 5i+4 */
#define KI 12 /* i2t top-k */
#define KT 3  /* t2i top-k */

/* itm_eval at the k boundaries, with -100 outside the top k. */
static void test_itm_eval_boundaries(void) {
  /* i2t: top-12 positions of each image hold scores 12 - p; the GT captions
   * sit at the positions below (-1 = outside the top 12, score -100); the
   * other slots take non-GT texts in ascending id order.
   *   img0 {0,3,7,-,-}  best rank 0     img3 {9,10,11,-,-} best rank 9
   *   img1 {4,6,11,-,-} best rank 4     img4 {10,-,-,-,-}  best rank 10
   *   img2 {5,8,-,-,-}  best rank 5     img5 {-,-,-,-,-}   rank >= 12
   * TR@1 = 1/6, TR@5 = 2/6 (ranks 0,4), TR@10 = 4/6 (0,4,5,9). */
  static const int gtpos[NI][5] = {{0, 3, 7, -1, -1},   {4, 6, 11, -1, -1}, {5, 8, -1, -1, -1},
                                   {9, 10, 11, -1, -1}, {10, -1, -1, -1, -1}, {-1, -1, -1, -1, -1}};
  static float i2t[NI * NT], t2i[NT * NI];
  for (int i = 0; i < NI; i++) {
    int slot[KI];
    for (int p = 0; p < KI; p++) slot[p] = -1;
    for (int c = 0; c < 5; c++)
      if (gtpos[i][c] >= 0) slot[gtpos[i][c]] = 5 * i + c;
    int fill = 0;
    for (int p = 0; p < KI; p++) {
      if (slot[p] >= 0) continue;
      while (fill / 5 == i) fill++;
      slot[p] = fill++;
    }
    float sim[NT], itm[KI];
    for (int t = 0; t < NT; t++) sim[t] = 0.25f;
    for (int p = 0; p < KI; p++) itm[p] = (float)(KI - p) - 0.25f; /* + sim = 12 - p */
    blip_eval_score_row(sim, NT, slot, itm, KI, i2t + i * NT);
  }
  /* t2i: text t with GT g = t/5 keeps 3 images (scores 2.5, 1.5, 0.5), the
   * rest -100. Rows have 6 entries, so numpy sorts them stably and among the
   * -100s the higher image index comes first: GT rank = 3 + #(-100 images
   * with a higher index than g).
   *   t%5 = 0: top [g,x,y] -> 0;  1: [x,g,y] -> 1;  2: [x,y,g] -> 2
   *   t%5 = 3: top = 3 lowest ids != g. -100 set: g=0..3 {g,4,5} -> 5;
   *            g=4 {3,4,5} -> 4; g=5 {3,4,5} -> 3
   *   t%5 = 4: top = 3 highest ids != g. -100 set: g=0 {0,1,2} -> 5;
   *            g=1 {0,1,2} -> 4; g=2 {0,1,2} -> 3; g=3,4,5 {0,1,g} -> 3
   * IR@1 = 6/30 = 20; IR@5 = (18 + 2 + 5)/30 = 250/3; IR@10 = 100. */
  static const int want_t2i[5][NI] = {
      {0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1}, {2, 2, 2, 2, 2, 2}, {5, 5, 5, 5, 4, 3}, {5, 4, 3, 3, 3, 3}};
  for (int t = 0; t < NT; t++) {
    int g = t / 5, c = t % 5, top[KT], others[NI - 1], no = 0;
    for (int i = 0; i < NI; i++)
      if (i != g) others[no++] = i;
    if (c <= 2) {
      int o = 0;
      for (int p = 0; p < KT; p++) top[p] = p == c ? g : others[o++];
    } else if (c == 3) {
      for (int p = 0; p < KT; p++) top[p] = others[p];
    } else {
      for (int p = 0; p < KT; p++) top[p] = others[NI - 2 - p];
    }
    float sim[NI] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f}, itm[KT] = {2, 1, 0};
    blip_eval_score_row(sim, NI, top, itm, KT, t2i + t * NI);
  }
  int txt2img[NT], off[NI + 1], img2txt[NT];
  for (int t = 0; t < NT; t++) txt2img[t] = t / 5, img2txt[t] = t;
  for (int i = 0; i <= NI; i++) off[i] = 5 * i;
  blip_eval_recall R;
  int64_t ri[NI], rt[NT];
  CHECK_OK(blip_eval_itm_eval(i2t, t2i, NI, NT, txt2img, off, img2txt, &R, ri, rt));
  static const int want_i2t[NI - 1] = {0, 4, 5, 9, 10};
  for (int i = 0; i < NI - 1; i++) CHECK(ri[i] == want_i2t[i], "img%d rank %lld want %d", i, (long long)ri[i], want_i2t[i]);
  CHECK(ri[5] >= KI && ri[5] < NT, "img5 (all GT at -100) rank %lld", (long long)ri[5]);
  for (int t = 0; t < NT; t++)
    CHECK(rt[t] == want_t2i[t % 5][t / 5], "text %d rank %lld want %d", t, (long long)rt[t], want_t2i[t % 5][t / 5]);
  const double eps = 1e-9;
  CHECK(fabs(R.tr_r1 - 100.0 / 6) < eps && fabs(R.tr_r5 - 200.0 / 6) < eps && fabs(R.tr_r10 - 400.0 / 6) < eps,
        "tr %g %g %g", R.tr_r1, R.tr_r5, R.tr_r10);
  CHECK(fabs(R.ir_r1 - 20.0) < eps && fabs(R.ir_r5 - 250.0 / 3) < eps && R.ir_r10 == 100.0, "ir %g %g %g", R.ir_r1,
        R.ir_r5, R.ir_r10);
  /* tr_mean = 700/18 = 350/9, ir_mean = 610/9, r_mean = 960/18 */
  CHECK(fabs(R.tr_mean - 350.0 / 9) < eps && fabs(R.ir_mean - 610.0 / 9) < eps, "means %g %g", R.tr_mean, R.ir_mean);
  CHECK(fabs(R.r_mean - 960.0 / 18) < eps, "r_mean %g", R.r_mean);
  /* Images without captions never count (upstream's rank 1e20). */
  int off0[NI + 1] = {0, 0, 5, 10, 15, 20, 30};
  CHECK_OK(blip_eval_itm_eval(i2t, t2i, NI, NT, txt2img, off0, img2txt, &R, ri, rt));
  CHECK(ri[0] == BLIP_EVAL_NO_RANK, "captionless image is a miss");
}

static void test_score_row(void) {
  float sim[5] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f}, itm[2] = {1.5f, -2.0f}, out[5];
  int idx[2] = {3, 0};
  blip_eval_score_row(sim, 5, idx, itm, 2, out);
  CHECK(out[3] == 1.5f + 0.4f && out[0] == -2.0f + 0.1f, "scored pairs %g %g", out[3], out[0]);
  CHECK(out[1] == -100.0f && out[2] == -100.0f && out[4] == -100.0f, "others -100");
}

static void test_topk(void) {
  /* by value desc, ties by lower index: 0.9(1) 0.9(4) 0.5(3) 0.3(0) 0.3(2) 0.1(5) */
  float row[6] = {0.3f, 0.9f, 0.3f, 0.5f, 0.9f, 0.1f};
  int idx[6];
  CHECK_OK(blip_eval_topk(row, 6, 3, idx));
  CHECK(idx[0] == 1 && idx[1] == 4 && idx[2] == 3, "top3 %d %d %d", idx[0], idx[1], idx[2]);
  CHECK_OK(blip_eval_topk(row, 6, 4, idx));
  CHECK(idx[3] == 0, "4th is the lower-index 0.3: %d", idx[3]);
  CHECK_OK(blip_eval_topk(row, 6, 6, idx));
  CHECK(idx[4] == 2 && idx[5] == 5, "full order tail %d %d", idx[4], idx[5]);
  float nan_row[3] = {1, NAN, 2};
  CHECK_OK(blip_eval_topk(nan_row, 3, 1, idx));
  CHECK(idx[0] == 1, "NaN counts as largest");
  CHECK(blip_eval_topk(row, 6, 7, idx) == BLIP_EINVAL, "k > n rejected");
}

static void test_plan(void) {
  /* i2t top-2: img0 {1,0}, img1 {1,3}, img2 {2,1}; t2i top-1: t0 0, t1 2, t2 2, t3 0.
   * Union per caption: t0 {0}; t1 {2} + {0,1,2}; t2 {2} + {2}; t3 {0} + {1}. */
  int i2t[6] = {1, 0, 1, 3, 2, 1}, t2i[4] = {0, 2, 2, 0};
  blip_eval_plan p;
  CHECK_OK(blip_eval_plan_build(i2t, 3, 2, t2i, 4, 1, &p));
  static const int64_t want_off[5] = {0, 1, 4, 5, 7};
  static const int want_img[7] = {0, 0, 1, 2, 2, 0, 1};
  CHECK(p.n_pairs == 7, "n_pairs %lld", (long long)p.n_pairs);
  int ok = p.n_pairs == 7;
  for (int t = 0; ok && t <= 4; t++) ok &= p.off[t] == want_off[t];
  for (int e = 0; ok && e < 7; e++) ok &= p.img[e] == want_img[e];
  CHECK(ok, "plan layout");
  CHECK(blip_eval_plan_find(&p, 1, 1) == 2 && blip_eval_plan_find(&p, 3, 1) == 6, "find");
  CHECK(blip_eval_plan_find(&p, 2, 0) == -1 && blip_eval_plan_find(&p, 4, 0) == -1, "find absent");
  blip_eval_plan_free(&p);
}

static void test_ann(void) {
  const char *js = "[{\"image\": \"a/1.jpg\", \"caption\": [\"A Dog, running!\", \"two  (big)  cats.\"]},"
                   " {\"image\": \"b/2.jpg\", \"caption\": \"One two three four\"},"
                   " {\"image\": \"c/3.jpg\", \"caption\": []},"
                   " {\"image\": \"d/4.jpg\", \"caption\": [\"x\"]}]";
  blip_eval_ann a;
  CHECK_OK(blip_eval_ann_parse(js, strlen(js), 3, 0, &a));
  CHECK(a.n_images == 4 && a.n_texts == 4, "counts %d %d", a.n_images, a.n_texts);
  CHECK(!strcmp(a.image[1], "b/2.jpg"), "image path");
  /* pre_caption: lowercase, .!"()*#:;~ -> space, collapse, strip, 3 words */
  CHECK(!strcmp(a.text[0], "a dog, running"), "clean 0 '%s'", a.text[0]);
  CHECK(!strcmp(a.text[1], "two big cats"), "clean 1 '%s'", a.text[1]);
  CHECK(!strcmp(a.text[2], "one two three"), "string caption, 3 words '%s'", a.text[2]);
  CHECK(a.txt2img[0] == 0 && a.txt2img[1] == 0 && a.txt2img[2] == 1 && a.txt2img[3] == 3, "txt2img");
  CHECK(a.img2txt_off[0] == 0 && a.img2txt_off[1] == 2 && a.img2txt_off[2] == 3 && a.img2txt_off[3] == 3 &&
            a.img2txt_off[4] == 4,
        "img2txt offsets");
  blip_eval_ann_free(&a);
  CHECK_OK(blip_eval_ann_parse(js, strlen(js), 30, 1, &a));
  CHECK(a.n_images == 1 && a.n_texts == 2, "limit 1: %d %d", a.n_images, a.n_texts);
  blip_eval_ann_free(&a);
  const char *bad[] = {"{}", "[{\"caption\": [\"x\"]}]", "[{\"image\": \"a\", \"caption\": [1]}]",
                       "[{\"image\": \"a\"}]", "[1]", "[{"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
    CHECK(blip_eval_ann_parse(bad[i], strlen(bad[i]), 30, 0, &a) == BLIP_EFORMAT, "bad annotation %zu rejected", i);
}

int main(void) {
  test_argsort_numpy();
  test_rank_ties();
  test_itm_eval_ties();
  test_itm_eval_boundaries();
  test_score_row();
  test_topk();
  test_plan();
  test_ann();
  return check_summary();
}
