/* test_search_golden: blip_search's scoring against the upstream reference
 * on the blip-tiny fixture, without an index: for the 4 fixture images
 * (pixel_values) and the 6 captions (input_ids), the final score of
 * blip_search_rerank must equal retrieval_score = itm_logits_enc[...,1] +
 * itc_sim, the ITM probability itm_prob_enc, and the order must be the
 * reference's. The batched fast rerank must equal the naive one (<= 1e-4).
 * Image -> text ranking (blip_search_rank_texts) is checked on the captions
 * whose pre_caption'd tokens equal the reference's. */
#include "blip_err.h"
#include "blip_model.h"
#include "blip_search.h"
#include "blip_st.h"
#include "check.h"
#include "golden.h"

#include <stdint.h>

enum { NI = 4, NT = 6, L = 35 };

static blip_st *g_gold;

static void test_rerank(blip_model *m) {
  const blip_cfg *c = blip_model_cfg(m);
  const int T = c->v_tokens, Dv = c->v_hidden, E = c->embed_dim;
  int32_t ids[NT * L], mask[NT * L];
  golden_ids(g_gold, "input_ids", ids, NT * L);
  golden_ids(g_gold, "attention_mask", mask, NT * L);
  const float *score = golden_f32(g_gold, "retrieval_score", NI * NT), *logits = golden_f32(g_gold, "itm_logits_enc", NI * NT * 2);
  const float *prob = golden_f32(g_gold, "itm_prob_enc", NI * NT), *gtf = golden_f32(g_gold, "text_feat", NT * E);
  float emb[NI * 17 * 32], ifeat[NI * 16];
  CHECK(T == 17 && Dv == 32 && E == 16, "fixture geometry");
  CHECK_OK(blip_model_vision(m, golden_f32(g_gold, "pixel_values", NI * 3 * 32 * 32), NI, emb, ifeat));
  const float *img[NI];
  for (int i = 0; i < NI; i++) img[i] = emb + (size_t)i * T * Dv;

  float got_s[NI * NT], want_s[NI * NT], got_l[NI * NT], want_l[NI * NT], got_p[NI * NT], want_p[NI * NT];
  float naive_s[NI * NT], naive_l[NI * NT], tf[NT * 16];
  int order_ok = 1;
  for (int j = 0; j < NT; j++) {
    int len = 0;
    for (int t = 0; t < L; t++) len += mask[j * L + t];
    CHECK_OK(blip_search_text_feat(m, ids + j * L, len, tf + j * E));
    float cos[NI];
    for (int i = 0; i < NI; i++) {
      cos[i] = 0;
      for (int e = 0; e < E; e++) cos[i] += ifeat[i * E + e] * tf[j * E + e];
    }
    blip_search_hit fast[NI], naive[NI];
    for (int i = 0; i < NI; i++) fast[i] = naive[i] = (blip_search_hit){.id = i};
    CHECK_OK(blip_search_rerank(m, ids + j * L, len, img, cos, NI, 0, fast));
    CHECK_OK(blip_search_rerank(m, ids + j * L, len, img, cos, NI, 1, naive));
    for (int i = 0; i < NI; i++) {
      int g = i * NT + j, o = j * NI + i;
      got_s[o] = fast[i].score, want_s[o] = score[g];
      got_l[o] = fast[i].itm_logit, want_l[o] = logits[2 * g + 1];
      got_p[o] = fast[i].itm_prob, want_p[o] = prob[g];
      naive_s[o] = naive[i].score, naive_l[o] = naive[i].itm_logit;
    }
    /* the search order is the reference's order of retrieval_score */
    blip_search_sort(fast, NI);
    for (int r = 0; r + 1 < NI; r++)
      if (score[fast[r].id * NT + j] < score[fast[r + 1].id * NT + j]) order_ok = 0;
  }
  check_tensor("text_feat (real tokens only)", tf, gtf, NT * E, 2e-5);
  check_tensor("final score = itm_logit_enc + itc", got_s, want_s, NI * NT, 2e-5);
  check_tensor("itm match logit ([ENC])", got_l, want_l, NI * NT, 2e-5);
  check_tensor("itm probability", got_p, want_p, NI * NT, 2e-5);
  check_tensor("fast vs naive rerank: score", got_s, naive_s, NI * NT, 1e-4);
  check_tensor("fast vs naive rerank: logit", got_l, naive_l, NI * NT, 1e-4);
  CHECK(order_ok, "hits sorted by score follow the reference's retrieval_score order");
}

/* Image -> text over captions 0 and 2: pre_caption leaves their tokens as the
 * reference tokenized them (lower case, no punctuation), so the golden scores apply. */
static void test_rank_texts(blip_model *m) {
  const blip_cfg *c = blip_model_cfg(m);
  const int T = c->v_tokens, Dv = c->v_hidden, E = c->embed_dim;
  const char *texts[2] = {"a man with a red helmet on a small moped on a dirt road",
                          "TWO YOUNG GUYS WITH SHAGGY HAIR LOOK AT THEIR HANDS"};
  const int col[2] = {0, 2};
  int32_t gids[NT * L], ids[L];
  golden_ids(g_gold, "input_ids", gids, NT * L);
  for (int k = 0; k < 2; k++) {
    int len = 0, trunc = 1;
    CHECK_OK(blip_search_prepare_text(m, texts[k], ids, &len, &trunc));
    CHECK(trunc == 0 && memcmp(ids, gids + col[k] * L, (size_t)len * sizeof *ids) == 0 && gids[col[k] * L + len] == 0,
          "prepare_text of caption %d gives the reference ids", col[k]);
  }
  const float *score = golden_f32(g_gold, "retrieval_score", NI * NT), *itc = golden_f32(g_gold, "itc_sim", NI * NT);
  float emb[NI * 17 * 32], ifeat[NI * 16];
  CHECK_OK(blip_model_vision(m, golden_f32(g_gold, "pixel_values", NI * 3 * 32 * 32), NI, emb, ifeat));
  float got[NI * 2], want[NI * 2], got1[NI * 2], want1[NI * 2];
  int order_ok = 1, itc_only_ok = 1;
  for (int i = 0; i < NI; i++) {
    blip_search_result r, r0;
    CHECK_OK(blip_search_rank_texts(m, emb + (size_t)i * T * Dv, ifeat + i * E, texts, 2, 2, &r));
    CHECK_OK(blip_search_rank_texts(m, emb + (size_t)i * T * Dv, ifeat + i * E, texts, 2, 0, &r0));
    CHECK(r.n == 2 && r.reranked == 2 && r0.reranked == 0, "rank_texts counts");
    for (int k = 0; k < 2; k++) {
      int t = (int)r.hits[k].id;
      got[i * 2 + t] = r.hits[k].score;
      want[i * 2 + t] = score[i * NT + col[t]];
      int t0 = (int)r0.hits[k].id;
      got1[i * 2 + t0] = r0.hits[k].score;
      want1[i * 2 + t0] = itc[i * NT + col[t0]];
      if (!isnan(r0.hits[k].itm_prob)) itc_only_ok = 0;
    }
    if (score[i * NT + col[r.hits[0].id]] < score[i * NT + col[r.hits[1].id]]) order_ok = 0;
    blip_search_result_free(&r);
    blip_search_result_free(&r0);
  }
  check_tensor("image->text: ITC+ITM score", got, want, NI * 2, 2e-5);
  check_tensor("image->text, rerank 0: ITC score", got1, want1, NI * 2, 2e-5);
  CHECK(order_ok, "image->text order follows retrieval_score");
  CHECK(itc_only_ok, "rerank 0 leaves the ITM fields unset");
}

static void test_truncation(blip_model *m) {
  char q[2048] = "";
  for (int i = 0; i < 29; i++) strcat(q, "elephants-and-giraffes ");
  int32_t ids[L];
  int len = 0, trunc = 0;
  CHECK_OK(blip_search_prepare_text(m, q, ids, &len, &trunc));
  CHECK(len == L && trunc == 1 && ids[L - 1] == 102, "long query: 35 tokens, [SEP] last, truncated (len %d)", len);
  CHECK_OK(blip_search_prepare_text(m, "Dog. On! A (beach)", ids, &len, &trunc));
  /* pre_caption: "dog on a beach" -> [CLS] dog on a beach [SEP] */
  CHECK(len == 6 && trunc == 0, "short query: %d tokens", len);
}

int main(void) {
  blip_model *m = NULL;
  if (blip_st_open(test_data("blip-tiny/golden.safetensors"), &g_gold) ||
      blip_model_load(test_data("blip-tiny"), NULL, &m)) {
    fprintf(stderr, "fixture: %s\n", blip_err_last());
    return 2;
  }
  test_rerank(m);
  test_rank_texts(m);
  test_truncation(m);
  blip_model_free(m);
  blip_st_close(g_gold);
  return check_summary();
}
