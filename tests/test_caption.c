/* test_caption: the captioner against the blip-caption-tiny fixture
 * (upstream HF BlipForConditionalGeneration, transformers 4.38.2): vision
 * tokens, teacher-forced decoder hidden states and logits (the KV cache fed
 * all at once and token by token), every generate() setting of
 * generated.json (ids, beam scores, decoded text) with the F32, F16 and BF16
 * weight files, the prompt prefix, and the detokeniser's cases. */
#include "blip_cap.h"
#include "blip_err.h"
#include "blip_model.h"
#include "blip_st.h"
#include "check.h"
#include "golden.h"

#include <jansson.h>
#include <stdint.h>

enum { NI = 3, NC = 515 };
static blip_st *g_gold;
static json_t *g_gen;

static blip_model *load(const char *weights, blip_prec prec) {
  char w[4096];
  snprintf(w, sizeof w, "%s", test_data(weights));
  blip_model_opts o = {.precision = prec, .weights = w};
  blip_model *m = NULL;
  if (blip_model_load(test_data("blip-caption-tiny"), &o, &m)) {
    fprintf(stderr, "load %s: %s\n", weights, blip_err_last());
    exit(2);
  }
  return m;
}

/* Teacher-forced decoder on case `cs`: all positions in one call (step 0)
 * or one token per call (step 1, the KV cache path generation uses). */
static void teacher_forced(blip_model *m, const float *emb, const char *pfx, const char *cs, int step, int full) {
  const blip_cfg *c = blip_model_cfg(m);
  const int V = c->t_vocab, D = c->t_hidden;
  char nm[128];
  snprintf(nm, sizeof nm, "tf.%s.input_ids", cs);
  const blip_st_tensor *ti = blip_st_find(g_gold, nm);
  const int L = (int)ti->shape[1];
  int32_t one[64], ids[NI * 64], cols[NC];
  golden_ids(g_gold, nm, one, L);
  golden_ids(g_gold, "logit_cols", cols, NC);
  for (int r = 0; r < NI; r++) memcpy(ids + r * L, one, L * sizeof *ids);
  float *hid = malloc(sizeof(float) * NI * L * D), *lg = malloc(sizeof(float) * NI * L * V);
  float *lc = malloc(sizeof(float) * NI * L * NC), lse[NI * 64], last[NI * 30524];
  blip_model_kv *kv = NULL;
  CHECK_OK(blip_model_kv_new(m, NI, NI, L, &kv));
  CHECK_OK(blip_model_kv_images(m, kv, emb));
  if (!step) {
    CHECK_OK(blip_model_decode(m, kv, ids, L, hid));
  } else {
    for (int t = 0; t < L; t++) {
      int32_t col[NI];
      float h[NI * 64];
      for (int r = 0; r < NI; r++) col[r] = one[t];
      CHECK_OK(blip_model_decode(m, kv, col, 1, h));
      for (int r = 0; r < NI; r++) memcpy(hid + ((size_t)r * L + t) * D, h + r * D, D * sizeof(float));
    }
  }
  CHECK(blip_model_kv_len(kv) == L, "cache holds %d positions", blip_model_kv_len(kv));
  CHECK_OK(blip_model_lm_head(m, hid, NI * L, lg));
  int top_ok = 1;
  for (int p = 0; p < NI * L; p++) {
    const float *row = lg + (size_t)p * V;
    double mx = -1e30, s = 0;
    for (int v = 0; v < V; v++) mx = row[v] > mx ? row[v] : mx;
    for (int v = 0; v < V; v++) s += exp(row[v] - mx);
    lse[p] = (float)(mx + log(s));
    for (int j = 0; j < NC; j++) lc[(size_t)p * NC + j] = row[cols[j]];
    int32_t want[5];
    snprintf(nm, sizeof nm, "%stf.%s.top5_ids", pfx, cs);
    const blip_st_tensor *tt = golden_get(g_gold, nm, BLIP_DT_I64, (int64_t)NI * L * 5);
    for (int k = 0; k < 5; k++) {
      int64_t w;
      memcpy(&w, (const char *)tt->data + 8 * ((size_t)p * 5 + k), 8);
      want[k] = (int32_t)w;
    }
    for (int k = 0; k < 5; k++) { /* the k-th largest logit is at want[k] */
      int rank = 0;
      for (int v = 0; v < V; v++) rank += row[v] > row[want[k]];
      top_ok &= rank == k;
    }
  }
  for (int r = 0; r < NI; r++) memcpy(last + (size_t)r * V, lg + ((size_t)r * L + L - 1) * V, V * sizeof(float));
  char lab[160];
  const char *how = step ? "token by token" : "prefill";
#define GN(s) (snprintf(nm, sizeof nm, "%stf.%s.%s", pfx, cs, s), nm)
#define LAB(s) (snprintf(lab, sizeof lab, "%s%s.%s (%s)", pfx, cs, s, how), lab)
  if (full) check_tensor(LAB("hidden"), hid, golden_f32(g_gold, GN("hidden"), NI * L * D), NI * L * D, 2e-5);
  check_tensor(LAB("logits_cols"), lc, golden_f32(g_gold, GN("logits_cols"), NI * L * NC), NI * L * NC, 5e-5);
  check_tensor(LAB("logsumexp"), lse, golden_f32(g_gold, GN("logsumexp"), NI * L), NI * L, 5e-5);
  if (full) check_tensor(LAB("logits_last"), last, golden_f32(g_gold, GN("logits_last"), NI * V), NI * V, 5e-5);
  CHECK(top_ok, "%s: top-5 ids differ", LAB("top5_ids"));
  blip_model_kv_free(kv);
  free(hid), free(lg), free(lc);
}

typedef struct {
  const char *name;
  int prompt, beams, max_len, min_len;
  float rep;
} setting;

static const setting k_settings[] = {
    {"greedy", 0, 1, 20, 0, 1.0f},        {"greedy_prompt", 1, 1, 20, 0, 1.0f},  {"beam3", 0, 3, 20, 5, 1.0f},
    {"beam3_prompt", 1, 3, 20, 5, 1.0f},  {"beam3_prompt_rep", 1, 3, 20, 5, 1.1f}, {"greedy_rep", 0, 1, 20, 0, 1.5f},
    {"beam3_prompt_blipdefault", 1, 3, 30, 10, 1.0f},
};

static void generation(blip_model *m, const float *emb, const char *wkey) {
  int n_set = 0;
  for (size_t s = 0; s < sizeof k_settings / sizeof k_settings[0]; s++) {
    const setting *st = &k_settings[s];
    blip_cap_opts o;
    blip_cap_defaults(m, &o); /* the plain generate() defaults, then the call's arguments */
    o.prompt = st->prompt ? "a picture of" : NULL;
    o.num_beams = st->beams, o.max_length = st->max_len, o.min_length = st->min_len, o.repetition_penalty = st->rep;
    blip_cap_result res[NI];
    CHECK_OK(blip_cap_generate(m, emb, NI, &o, res));
    json_t *want = json_object_get(json_object_get(json_object_get(g_gen, "settings"), st->name), wkey);
    CHECK(json_array_size(want) == NI, "generated.json lacks %s/%s", st->name, wkey);
    for (int i = 0; i < NI && i < (int)json_array_size(want); i++) {
      json_t *w = json_array_get(want, i), *wi = json_object_get(w, "ids");
      int same = (int)json_array_size(wi) == res[i].n;
      for (int k = 0; same && k < res[i].n; k++) same = json_integer_value(json_array_get(wi, k)) == res[i].ids[k];
      CHECK(same, "%s %s image %d: ids differ (got %d ids)", wkey, st->name, i, res[i].n);
      const char *text = json_string_value(json_object_get(w, "text"));
      CHECK(text && !strcmp(text, res[i].text), "%s %s image %d: text '%s', want '%s'", wkey, st->name, i, res[i].text, text);
      json_t *sc = json_object_get(w, "sequences_score");
      if (st->beams > 1)
        CHECK(sc && fabs(json_number_value(sc) - res[i].score) < 1e-4, "%s %s image %d: score %.6f want %.6f", wkey, st->name, i,
              res[i].score, json_number_value(sc));
    }
    blip_cap_result_free(res, NI);
    n_set++;
  }
  printf("  %s: %d generate() settings x %d images compared (ids, text, beam scores)\n", wkey, n_set, NI);
}

static void run_weights(const char *file, const char *pfx, const char *wkey, int full) {
  printf("weights %s\n", file);
  blip_model *m = load(file, BLIP_PREC_F32);
  const blip_cfg *c = blip_model_cfg(m);
  CHECK(c->captioner == 1, "captioner not detected");
  const int T = c->v_tokens, Dv = c->v_hidden;
  float *emb = malloc(sizeof(float) * NI * T * Dv);
  char nm[64];
  if (blip_model_vision(m, golden_f32(g_gold, "pixel_values", NI * 3 * 32 * 32), NI, emb, NULL)) {
    CHECK(0, "vision: %s", blip_err_last());
    return;
  }
  snprintf(nm, sizeof nm, "%simage_embeds", pfx);
  check_tensor(nm, emb, golden_f32(g_gold, nm, NI * T * Dv), NI * T * Dv, 2e-5);
  /* decode from the golden image tokens so that the decoder is tested on its own */
  const float *gemb = golden_f32(g_gold, nm, NI * T * Dv);
  static const char *const cases[] = {"dec", "prompt", "hf_forward"};
  for (int k = 0; k < 3; k++)
    for (int step = 0; step < 2; step++) teacher_forced(m, gemb, pfx, cases[k], step, full);
  generation(m, emb, wkey);
  free(emb);
  blip_model_free(m);
}

static void test_prefix_and_errors(void) {
  blip_model *m = load("blip-caption-tiny/model.safetensors", BLIP_PREC_F32);
  int32_t ids[32], want[4];
  int n = 0;
  golden_ids(g_gold, "prompt.decoder_prefix", want, 4);
  CHECK_OK(blip_cap_prefix(m, "a picture of", ids, 32, &n));
  CHECK(n == 4 && !memcmp(ids, want, sizeof want), "prompt prefix: %d ids", n);
  CHECK_OK(blip_cap_prefix(m, NULL, ids, 32, &n));
  CHECK(n == 1 && ids[0] == 30522, "no prompt: [DEC] alone");
  blip_cap_opts o;
  blip_cap_defaults(m, &o);
  CHECK(o.max_length == 20 && o.num_beams == 1 && o.min_length == 0 && o.repetition_penalty == 1.0f && !o.do_sample &&
            o.top_k == 50 && o.top_p == 1.0f && o.temperature == 1.0f && o.no_repeat_ngram_size == 0,
        "generate() defaults from text_config");
  const blip_cfg *c = blip_model_cfg(m);
  float *emb = calloc((size_t)c->v_tokens * c->v_hidden, sizeof(float));
  blip_cap_result r[1];
  o.prompt = "a picture of a photo of a picture of a photo of a picture of a photo of a";
  CHECK(blip_cap_generate(m, emb, 1, &o, r) == BLIP_EINVAL, "a prompt filling max_length is refused");
  blip_cap_defaults(m, &o);
  o.do_sample = 1, o.num_beams = 3;
  CHECK(blip_cap_generate(m, emb, 1, &o, r) == BLIP_EUNSUPPORTED, "beam sampling is refused");
  /* sampling: seeded, so the same seed gives the same caption; top_k = 1 is greedy */
  blip_cap_result a[1], b[1], g[1];
  blip_cap_defaults(m, &o);
  CHECK_OK(blip_cap_generate(m, emb, 1, &o, g));
  o.do_sample = 1, o.top_k = 1, o.seed = 7;
  CHECK_OK(blip_cap_generate(m, emb, 1, &o, a));
  CHECK(a[0].n == g[0].n && !memcmp(a[0].ids, g[0].ids, g[0].n * sizeof(int32_t)), "top_k=1 sampling equals greedy");
  blip_cap_result_free(a, 1);
  o.top_k = 0, o.top_p = 0.9f;
  CHECK_OK(blip_cap_generate(m, emb, 1, &o, a));
  CHECK_OK(blip_cap_generate(m, emb, 1, &o, b));
  CHECK(a[0].n == b[0].n && !memcmp(a[0].ids, b[0].ids, b[0].n * sizeof(int32_t)), "same seed, same sample");
  CHECK(a[0].ids[0] == 30522 && a[0].n >= 2 && a[0].n <= 20, "sample shape");
  blip_cap_result_free(a, 1), blip_cap_result_free(b, 1), blip_cap_result_free(g, 1);
  /* retrieval calls on a captioner are refused, not crashed */
  int32_t t[3] = {101, 1037, 102}, mk[3] = {1, 1, 1};
  float fe[256];
  CHECK(blip_model_text(m, t, mk, 1, 3, NULL, fe) == BLIP_EINVAL, "text encoder refused");
  free(emb);
  blip_model_free(m);
}

/* bf16 and int8 compute: vision tokens and next-token logits close to the
 * f32 golden (relative L2 error), and every generate() setting runs. */
static double rel_err(const float *a, const float *b, long n) {
  double e = 0, w = 0;
  for (long i = 0; i < n; i++) e += (a[i] - b[i]) * (double)(a[i] - b[i]), w += (double)b[i] * b[i];
  return sqrt(e / w);
}

static void test_precisions(void) {
  for (int p = 1; p <= 2; p++) {
    blip_model *m = load("blip-caption-tiny/model.safetensors", (blip_prec)p);
    const blip_cfg *c = blip_model_cfg(m);
    const int T = c->v_tokens, Dv = c->v_hidden, V = c->t_vocab;
    float *emb = malloc(sizeof(float) * NI * T * Dv), *lg = malloc(sizeof(float) * NI * V), h[NI * 8 * 16];
    int32_t one[8], ids[NI * 8];
    golden_ids(g_gold, "tf.dec.input_ids", one, 8);
    for (int r = 0; r < NI; r++) memcpy(ids + r * 8, one, sizeof one);
    blip_model_kv *kv = NULL;
    CHECK_OK(blip_model_vision(m, golden_f32(g_gold, "pixel_values", NI * 3 * 32 * 32), NI, emb, NULL));
    CHECK_OK(blip_model_kv_new(m, NI, NI, 8, &kv));
    CHECK_OK(blip_model_kv_images(m, kv, emb));
    CHECK_OK(blip_model_decode(m, kv, ids, 8, h));
    float last[NI * 16];
    for (int r = 0; r < NI; r++) memcpy(last + r * 16, h + (r * 8 + 7) * 16, 16 * sizeof(float));
    CHECK_OK(blip_model_lm_head(m, last, NI, lg));
    double ee = rel_err(emb, golden_f32(g_gold, "image_embeds", NI * T * Dv), (long)NI * T * Dv);
    double el = rel_err(lg, golden_f32(g_gold, "tf.dec.logits_last", NI * V), (long)NI * V);
    printf("  %s: image_embeds rel. error %.2e, next-token logits rel. error %.2e\n", blip_model_precision_name((blip_prec)p), ee, el);
    CHECK(ee < 0.02 && el < 0.05, "%s drifts from f32", blip_model_precision_name((blip_prec)p));
    blip_cap_opts o;
    blip_cap_defaults(m, &o);
    o.num_beams = 3, o.min_length = 5, o.prompt = "a picture of";
    blip_cap_result r[NI];
    CHECK_OK(blip_cap_generate(m, emb, NI, &o, r));
    for (int i = 0; i < NI; i++) CHECK(r[i].n >= 5 && r[i].n <= 20 && r[i].ids[0] == 30522, "beam caption shape");
    blip_cap_result_free(r, NI);
    blip_model_kv_free(kv);
    free(emb), free(lg);
    blip_model_free(m);
  }
}

/* no_repeat_ngram_size (no upstream golden here): no n-gram of the returned
 * ids, prefix included, occurs twice; greedy image 2 repeats a token and a
 * bigram without it. */
static int repeats(const int32_t *ids, int n, int g) {
  for (int a = 0; a + g <= n; a++)
    for (int b = a + 1; b + g <= n; b++)
      if (!memcmp(ids + a, ids + b, g * sizeof *ids)) return 1;
  return 0;
}

static void test_no_repeat_ngram(void) {
  blip_model *m = load("blip-caption-tiny/model.safetensors", BLIP_PREC_F32);
  const blip_cfg *c = blip_model_cfg(m);
  float *emb = malloc(sizeof(float) * NI * c->v_tokens * c->v_hidden);
  blip_cap_result r[NI];
  blip_cap_opts o;
  CHECK_OK(blip_model_vision(m, golden_f32(g_gold, "pixel_values", NI * 3 * 32 * 32), NI, emb, NULL));
  blip_cap_defaults(m, &o);
  CHECK_OK(blip_cap_generate(m, emb, NI, &o, r));
  CHECK(repeats(r[2].ids, r[2].n, 1), "greedy image 2 repeats a token without the processor");
  blip_cap_result_free(r, NI);
  for (int g = 1; g <= 2; g++)
    for (int beams = 1; beams <= 3; beams += 2) {
      o.no_repeat_ngram_size = g, o.num_beams = beams, o.prompt = "a picture of";
      CHECK_OK(blip_cap_generate(m, emb, NI, &o, r));
      for (int i = 0; i < NI; i++)
        CHECK(!repeats(r[i].ids, r[i].n, g), "no_repeat_ngram_size %d, %d beams, image %d repeats", g, beams, i);
      blip_cap_result_free(r, NI);
    }
  free(emb);
  blip_model_free(m);
}

static void test_decode_cases(void) {
  blip_tok *t = NULL;
  CHECK_OK(blip_tok_load(test_data("blip-caption-tiny/vocab.txt"), &t));
  json_t *cases = json_object_get(g_gen, "decode_cases");
  CHECK(json_array_size(cases) == 7, "7 decode cases");
  for (size_t i = 0; i < json_array_size(cases); i++) {
    json_t *cs = json_array_get(cases, i), *ji = json_object_get(cs, "ids");
    int32_t ids[64];
    int n = (int)json_array_size(ji);
    for (int k = 0; k < n; k++) ids[k] = (int32_t)json_integer_value(json_array_get(ji, k));
    for (int skip = 0; skip < 2; skip++) {
      char *s = NULL;
      CHECK_OK(blip_tok_decode(t, ids, n, skip, &s));
      const char *want = json_string_value(json_object_get(cs, skip ? "skip_special_tokens=True" : "skip_special_tokens=False"));
      CHECK(want && !strcmp(s, want), "decode case %zu skip=%d: '%s', want '%s'", i, skip, s, want);
      free(s);
    }
  }
  blip_tok_free(t);
}

int main(void) {
  json_error_t je;
  if (blip_st_open(test_data("blip-caption-tiny/golden.safetensors"), &g_gold) ||
      !(g_gen = json_load_file(test_data("blip-caption-tiny/generated.json"), 0, &je))) {
    fprintf(stderr, "fixture missing: %s\n", blip_err_last());
    return 2;
  }
  test_decode_cases();
  test_prefix_and_errors();
  test_precisions();
  test_no_repeat_ngram();
  run_weights("blip-caption-tiny/model.safetensors", "", "f32", 1);
  run_weights("blip-caption-tiny/model-f16.safetensors", "f16w.", "f16w", 0);
  run_weights("blip-caption-tiny/model-bf16.safetensors", "bf16w.", "bf16w", 0);
  json_decref(g_gen);
  blip_st_close(g_gold);
  return check_summary();
}
