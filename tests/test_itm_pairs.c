/* test_itm_pairs: blip_model_itm_pairs on the blip-tiny fixture. Every
 * (caption, image) pair of the 6 golden captions (11..35 tokens) and 4
 * images, shuffled, in rows of 35 with junk after each caption and, in a
 * second call, the shorter captions' pairs in rows of the longest of them,
 * must give the logits and [ENC]/[CLS] outputs of per-caption
 * blip_model_itm calls to float rounding, at f32, bf16 and int8,
 * reassociated and naive; at f32 also the golden ITM logits. One caption
 * against reordered images must equal blip_model_itm too, and bad lengths
 * are refused. */
#include "blip_err.h"
#include "blip_kern.h"
#include "blip_model.h"
#include "blip_st.h"
#include "check.h"
#include "golden.h"

#include <stdint.h>

enum { NI = 4, NT = 6, L = 35, NP = NI * NT };

static blip_st *g_gold;

static void run(blip_prec p) {
  printf("precision %s\n", blip_model_precision_name(p));
  blip_model_opts o = {.precision = p};
  blip_model *m = NULL;
  CHECK_OK(blip_model_load(test_data("blip-tiny"), &o, &m));
  const blip_cfg *c = blip_model_cfg(m);
  const int T = c->v_tokens, Dv = c->v_hidden, Dt = c->t_hidden;
  float *emb = malloc(sizeof(float) * NI * T * Dv);
  int32_t ids[NT * L], mask[NT * L], lens[NT], Lshort = 0; /* Lshort: the longest but the last (35 tokens) */
  golden_ids(g_gold, "input_ids", ids, NT * L);
  golden_ids(g_gold, "attention_mask", mask, NT * L);
  for (int j = 0; j < NT; j++) {
    lens[j] = 0;
    for (int t = 0; t < L; t++) lens[j] += mask[j * L + t];
    if (j < NT - 1 && lens[j] > Lshort) Lshort = lens[j];
  }
  CHECK(lens[0] != lens[1] && lens[NT - 1] == L && Lshort < L, "the fixture's captions: lengths 17 19 12 11 15 35");
  CHECK_OK(blip_model_vision(m, golden_f32(g_gold, "pixel_values", NI * 3 * 32 * 32), NI, emb, NULL));
  const float *imgs[NI];
  for (int i = 0; i < NI; i++) imgs[i] = emb + (size_t)i * T * Dv;
  /* a fixed shuffle of the pairs (5 is prime to NP) */
  int pc[NP], pi[NP];
  for (int q = 0; q < NP; q++) pc[q] = (q * 5 % NP) % NT, pi[q] = (q * 5 % NP) / NT;
  /* 2e-5: another summation order in f32 (the fixture README's bound); bf16/int8 round their
   * GEMM operands per row, so a pair's batch changes only the f32 accumulation */
  const double tol = p == BLIP_PREC_F32 ? 2e-5 : 1e-4;
  for (int fast = 0; fast < 2; fast++)
    for (int first = 0; first < 2; first++) {
      const blip_itm_first f = first ? BLIP_ITM_CLS : BLIP_ITM_ENC;
      float want[NT][NI * 2], wcls[NT][NI * 32], golden_l[NP * 2];
      for (int j = 0; j < NT; j++) CHECK_OK(blip_model_itm(m, ids + j * L, lens[j], imgs, NI, f, fast, want[j], wcls[j]));
      for (int row = 0; row < 2; row++) { /* all pairs in rows of 35, then the shorter captions' in rows of Lshort */
        const int RL = row ? Lshort : L;
        int32_t pid[NP * L];
        int plen[NP];
        const float *pimg[NP];
        float got[NP * 2], cls[NP * 32], exp_l[NP * 2], exp_c[NP * 32];
        int n = 0, qc[NP], qi[NP];
        for (int q0 = 0; q0 < NP; q0++) {
          if (lens[pc[q0]] > RL) continue;
          const int q = n++;
          qc[q] = pc[q0], qi[q] = pi[q0];
          for (int t = 0; t < RL; t++) pid[q * RL + t] = t < lens[qc[q]] ? ids[qc[q] * L + t] : (q + t) % 7; /* junk padding */
          plen[q] = lens[qc[q]];
          pimg[q] = imgs[qi[q]];
          memcpy(exp_l + 2 * q, want[qc[q]] + 2 * qi[q], 2 * sizeof(float));
          memcpy(exp_c + q * Dt, wcls[qc[q]] + qi[q] * Dt, (size_t)Dt * sizeof(float));
        }
        CHECK_OK(blip_model_itm_pairs(m, pid, plen, RL, pimg, n, f, fast, got, cls));
        char lab[96];
        snprintf(lab, sizeof lab, "%s %s rows %d: logits", fast ? "fast" : "naive", first ? "[CLS]" : "[ENC]", RL);
        check_tensor(lab, got, exp_l, n * 2, tol);
        snprintf(lab, sizeof lab, "%s %s rows %d: cls", fast ? "fast" : "naive", first ? "[CLS]" : "[ENC]", RL);
        check_tensor(lab, cls, exp_c, (long)n * Dt, tol * 5);
        if (p == BLIP_PREC_F32) { /* golden layout [image][caption] */
          const float *g = golden_f32(g_gold, first ? "itm_logits" : "itm_logits_enc", NP * 2);
          for (int q = 0; q < n; q++) memcpy(golden_l + 2 * q, g + 2 * (qi[q] * NT + qc[q]), 2 * sizeof(float));
          snprintf(lab, sizeof lab, "%s %s rows %d: golden logits", fast ? "fast" : "naive", first ? "[CLS]" : "[ENC]", RL);
          check_tensor(lab, got, golden_l, n * 2, 2e-5);
        }
      }
    }
  /* one caption, one length, the images in another order */
  {
    const float *rimg[NI] = {imgs[3], imgs[1], imgs[0], imgs[2]};
    int32_t rep[NI * L];
    int rl[NI];
    float got[NI * 2], want[NI * 2], exp_l[NI * 2];
    for (int i = 0; i < NI; i++) memcpy(rep + i * lens[2], ids + 2 * L, (size_t)lens[2] * sizeof(int32_t)), rl[i] = lens[2];
    CHECK_OK(blip_model_itm(m, ids + 2 * L, lens[2], imgs, NI, BLIP_ITM_ENC, 1, want, NULL));
    CHECK_OK(blip_model_itm_pairs(m, rep, rl, lens[2], rimg, NI, BLIP_ITM_ENC, 1, got, NULL));
    const int perm[NI] = {3, 1, 0, 2};
    for (int i = 0; i < NI; i++) exp_l[2 * i] = want[2 * perm[i]], exp_l[2 * i + 1] = want[2 * perm[i] + 1];
    check_tensor("same caption, reordered images", got, exp_l, NI * 2, tol);
    int bad[1] = {lens[2] + 1};
    float lg[2];
    CHECK(blip_model_itm_pairs(m, rep, bad, lens[2], rimg, 1, BLIP_ITM_ENC, 1, lg, NULL) == BLIP_EINVAL, "length > row refused");
    bad[0] = 0;
    CHECK(blip_model_itm_pairs(m, rep, bad, lens[2], rimg, 1, BLIP_ITM_ENC, 1, lg, NULL) == BLIP_EINVAL, "length 0 refused");
    CHECK(blip_model_itm_pairs(m, rep, rl, lens[2], rimg, 0, BLIP_ITM_ENC, 1, lg, NULL) == BLIP_EINVAL, "no pairs refused");
  }
  free(emb);
  blip_model_free(m);
}

int main(void) {
  blip_k_set_threads(2);
  if (blip_st_open(test_data("blip-tiny/golden.safetensors"), &g_gold)) {
    fprintf(stderr, "%s\n", blip_err_last());
    return 2;
  }
  run(BLIP_PREC_F32);
  run(BLIP_PREC_BF16);
  run(BLIP_PREC_INT8);
  blip_st_close(g_gold);
  return check_summary();
}
