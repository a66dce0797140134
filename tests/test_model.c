/* test_model: golden parity of the engine on the blip-tiny fixture
 * (upstream HF BlipForImageTextRetrieval outputs), for F32, F16 and BF16
 * weight files, both ITM paths (naive and reassociated) and both first
 * tokens ([CLS] = HF convention, [ENC] = the paper's). */
#include "blip_err.h"
#include "blip_kern.h"
#include "blip_model.h"
#include "blip_st.h"
#include "check.h"
#include "golden.h"

#include <stdint.h>

static blip_st *g_gold;

enum { NI = 4, NT = 6, L = 35 };

/* Run everything with the weights in `file`; compare the tensors named
 * prefix+name against tolerance tol. */
static void run_parity(const char *file, const char *prefix, double tol, int full) {
  printf("weights %s (golden %s*)\n", file, prefix[0] ? prefix : "");
  char wpath[4096];
  snprintf(wpath, sizeof wpath, "%s", test_data(file));
  blip_model_opts o = {.precision = BLIP_PREC_F32, .weights = wpath};
  blip_model *m = NULL;
  CHECK_OK(blip_model_load(test_data("blip-tiny"), &o, &m));
  const blip_cfg *c = blip_model_cfg(m);
  const int T = c->v_tokens, Dv = c->v_hidden, Dt = c->t_hidden, E = c->embed_dim;
  float *emb = malloc(sizeof(float) * NI * T * Dv), *ifeat = malloc(sizeof(float) * NI * E);
  float *temb = malloc(sizeof(float) * NT * L * Dt), *tfeat = malloc(sizeof(float) * NT * E);
  float itc[NI * NT], logit[2][2][NI * NT * 2], cls[2][NI * NT * 32];
  int32_t ids[NT * L], mask[NT * L];
  golden_ids(g_gold, "input_ids", ids, NT * L);
  golden_ids(g_gold, "attention_mask", mask, NT * L);
  char name[128];
#define G(n) (snprintf(name, sizeof name, "%s%s", prefix, n), name)

  CHECK_OK(blip_model_vision(m, golden_f32(g_gold, "pixel_values", NI * 3 * 32 * 32), NI, emb, ifeat));
  CHECK_OK(blip_model_text(m, ids, mask, NT, L, temb, tfeat));
  for (int i = 0; i < NI; i++)
    for (int j = 0; j < NT; j++) {
      float s = 0;
      for (int e = 0; e < E; e++) s += ifeat[i * E + e] * tfeat[j * E + e];
      itc[i * NT + j] = s;
    }
  /* ITM: per caption, all 4 images as candidates; golden layout [i][j]. */
  const float *imgs[NI];
  for (int i = 0; i < NI; i++) imgs[i] = emb + (size_t)i * T * Dv;
  for (int fast = 0; fast < 2; fast++)
    for (int first = 0; first < 2; first++)
      for (int j = 0; j < NT; j++) {
        int len = 0;
        while (len < L && mask[j * L + len]) len++;
        float lg[NI * 2], cl[NI * 32];
        CHECK_OK(blip_model_itm(m, ids + j * L, len, imgs, NI, first == 0 ? BLIP_ITM_ENC : BLIP_ITM_CLS, fast, lg, cl));
        for (int i = 0; i < NI; i++) {
          memcpy(&logit[fast][first][(i * NT + j) * 2], lg + 2 * i, 2 * sizeof(float));
          if (fast) memcpy(&cls[first][(i * NT + j) * Dt], cl + i * Dt, Dt * sizeof(float));
        }
      }
  if (full) {
    check_tensor("image_embeds", emb, golden_f32(g_gold, "image_embeds", NI * T * Dv), NI * T * Dv, tol);
    check_tensor("text_embeds", temb, golden_f32(g_gold, "text_embeds", NT * L * Dt), NT * L * Dt, tol);
    check_tensor("itm_cls_enc", cls[0], golden_f32(g_gold, "itm_cls_enc", NI * NT * Dt), NI * NT * Dt, tol);
    check_tensor("itm_cls", cls[1], golden_f32(g_gold, "itm_cls", NI * NT * Dt), NI * NT * Dt, tol);
  }
  check_tensor(G("image_feat"), ifeat, golden_f32(g_gold, G("image_feat"), NI * E), NI * E, tol);
  check_tensor(G("text_feat"), tfeat, golden_f32(g_gold, G("text_feat"), NT * E), NT * E, tol);
  { /* features alone: the 6 captions (11..35 tokens) run packed, without their padding */
    float *tf2 = malloc(sizeof(float) * NT * E);
    CHECK_OK(blip_model_text(m, ids, mask, NT, L, NULL, tf2));
    check_tensor("text_feat packed (no embeds)", tf2, golden_f32(g_gold, G("text_feat"), NT * E), NT * E, tol);
    check_tensor("text_feat packed == padded", tf2, tfeat, NT * E, 1e-6);
    free(tf2);
  }
  check_tensor(G("itc_sim"), itc, golden_f32(g_gold, G("itc_sim"), NI * NT), NI * NT, tol);
  for (int fast = 0; fast < 2; fast++) {
    check_tensor(fast ? "itm_logits_enc (reassociated)" : "itm_logits_enc (naive)", logit[fast][0],
                 golden_f32(g_gold, G("itm_logits_enc"), NI * NT * 2), NI * NT * 2, tol);
    check_tensor(fast ? "itm_logits (reassociated)" : "itm_logits (naive)", logit[fast][1], golden_f32(g_gold, G("itm_logits"), NI * NT * 2),
                 NI * NT * 2, tol);
    check_tensor("reassociated vs naive ITM", logit[1][0], logit[0][0], NI * NT * 2, 1e-5);
  }
  { /* blip-eval's path: each image's K/V projected once, its captions batched by length */
    float *kv = malloc(blip_model_itm_kv_floats(m) * sizeof *kv), byimg[2][NI * NT * 2];
    int lens[NT], batched = 0;
    for (int j = 0; j < NT; j++) {
      lens[j] = 0;
      while (lens[j] < L && mask[j * L + lens[j]]) lens[j]++;
    }
    for (int i = 0; i < NI; i++) {
      CHECK_OK(blip_model_itm_kv(m, imgs[i], kv));
      for (int first = 0; first < 2; first++)
        for (int j = 0; j < NT; j++) {
          int sel[NT], n = 0, len = lens[j];
          int32_t bids[NT * L];
          float lg[NT * 2];
          for (int u = 0; u < j; u++)
            if (lens[u] == len) goto seen;
          for (int u = j; u < NT; u++)
            if (lens[u] == len) memcpy(bids + n * len, ids + u * L, len * sizeof *bids), sel[n++] = u;
          if (n > 1) batched = 1;
          CHECK_OK(blip_model_itm_captions(m, bids, len, n, kv, first == 0 ? BLIP_ITM_ENC : BLIP_ITM_CLS, lg));
          for (int b = 0; b < n; b++) memcpy(&byimg[first][(i * NT + sel[b]) * 2], lg + 2 * b, 2 * sizeof(float));
        seen:;
        }
    }
    printf("  (captions batched by length: %s)\n", batched ? "yes" : "no, all lengths differ");
    check_tensor("by-image ITM vs naive", byimg[0], logit[0][0], NI * NT * 2, 1e-5);
    check_tensor("by-image ITM vs naive, [CLS]", byimg[1], logit[0][1], NI * NT * 2, 1e-5);
    check_tensor("by-image ITM vs reassociated", byimg[0], logit[1][0], NI * NT * 2, 1e-5);
    check_tensor("by-image itm_logits_enc", byimg[0], golden_f32(g_gold, G("itm_logits_enc"), NI * NT * 2), NI * NT * 2, tol);
    /* one caption repeated in a batch gives the same logits as alone */
    int32_t rep[3 * L];
    float lg3[6];
    for (int b = 0; b < 3; b++) memcpy(rep + b * lens[0], ids, lens[0] * sizeof *rep);
    CHECK_OK(blip_model_itm_kv(m, imgs[NI - 1], kv));
    CHECK_OK(blip_model_itm_captions(m, rep, lens[0], 3, kv, BLIP_ITM_ENC, lg3));
    for (int b = 0; b < 3; b++) check_tensor("by-image ITM, batch of 3", lg3 + 2 * b, &logit[0][0][((NI - 1) * NT) * 2], 2, 1e-5);
    /* different captions in one batch (each cut to the shortest length) vs each alone, naive */
    int lc = lens[0];
    for (int j = 1; j < NT; j++) lc = lens[j] < lc ? lens[j] : lc;
    int32_t cut[NT * L];
    float lgb[NT * 2], lgn[NT * 2];
    for (int j = 0; j < NT; j++) memcpy(cut + j * lc, ids + j * L, lc * sizeof *cut);
    CHECK_OK(blip_model_itm_captions(m, cut, lc, NT, kv, BLIP_ITM_ENC, lgb));
    for (int j = 0; j < NT; j++) CHECK_OK(blip_model_itm(m, cut + j * lc, lc, imgs + NI - 1, 1, BLIP_ITM_ENC, 0, lgn + 2 * j, NULL));
    check_tensor("by-image ITM, 6 captions in one batch vs naive", lgb, lgn, NT * 2, 1e-5);
    free(kv);
  }
  if (full) { /* the BLIP retrieval score = ITM match logit ([ENC]) + ITC cosine */
    float score[NI * NT];
    for (int i = 0; i < NI * NT; i++) score[i] = logit[1][0][2 * i + 1] + itc[i];
    check_tensor("retrieval_score", score, golden_f32(g_gold, "retrieval_score", NI * NT), NI * NT, tol);
  }
  /* A text encoded without padding gives the same real rows as padded. */
  if (full) {
    int len = 0;
    while (mask[len]) len++;
    float e2[L * 32], f2[16];
    CHECK_OK(blip_model_text(m, ids, NULL, 1, len, e2, f2));
    check_tensor("text unpadded == padded", f2, tfeat, E, 1e-6);
  }
  free(emb);
  free(ifeat);
  free(temb);
  free(tfeat);
  blip_model_free(m);
}

int main(void) {
  blip_k_set_threads(2);
  if (blip_st_open(test_data("blip-tiny/golden.safetensors"), &g_gold)) {
    fprintf(stderr, "%s\n", blip_err_last());
    return 2;
  }
  /* fp32 tolerance: the fixture README's bound for a correct float32
   * implementation with another summation order (the issue allows 1e-4). */
  run_parity("blip-tiny/model.safetensors", "", 2e-5, 1);
  /* Half-precision files against the upstream forward run on the same rounded weights. */
  run_parity("blip-tiny/model-f16.safetensors", "f16w.", 2e-5, 0);
  run_parity("blip-tiny/model-bf16.safetensors", "bf16w.", 2e-5, 0);
  blip_st_close(g_gold);
  return check_summary();
}
