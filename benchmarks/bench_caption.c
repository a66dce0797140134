/* bench_caption: speed of the captioner at the real base geometry
 * (ViT-B/16 at 384 + the BERT-base decoder, 30524-token LM head) with
 * random weights, per compute precision, in one process: caption time per
 * image split into vision and decoding (greedy and beam 3, 19 generated
 * tokens: min_length = max_length = 20 keeps random weights from ending
 * early; greedy also for 8 images decoded together, as the indexer's
 * batches are), ms per decoded token against the weight-bandwidth bound (the
 * bytes of the decoder's and LM head's weights one step reads, over this
 * machine's read bandwidth measured in the same run), and the KV cache's
 * gain over recomputing the whole prefix at every step. Nothing is
 * asserted; the figures go into reports. */
#include "blip_cap.h"
#include "blip_err.h"
#include "blip_kern.h"
#include "blip_model.h"

#include <getopt.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Read bandwidth: sum a 1 GiB buffer on every thread, best of 3. */
static double read_bw(int threads) {
  const size_t n = (size_t)1 << 28;
  float *a = malloc(n * sizeof *a);
  if (!a) return 0;
#pragma omp parallel for num_threads(threads)
  for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
  double best = 0, sink = 0;
  for (int r = 0; r < 3; r++) {
    double t0 = now(), s = 0;
#pragma omp parallel for simd num_threads(threads) reduction(+ : s)
    for (size_t i = 0; i < n; i++) s += a[i];
    double bw = n * sizeof *a / (now() - t0);
    sink += s;
    if (bw > best) best = bw;
  }
  free(a);
  return sink == -1 ? 0 : best;
}

/* Weight bytes one decoding step reads (per row batch): the decoder's GEMMs
 * and the LM head. Embedding rows, LayerNorms, biases and the KV cache are
 * small beside them. */
static double step_weight_bytes(const blip_cfg *c, blip_prec p) {
  const double D = c->t_hidden, per = p == BLIP_PREC_F32 ? 4 : p == BLIP_PREC_BF16 ? 2 : 1;
  const double layer = 6 * D * D + 2 * D * c->t_mlp; /* q k v o, cross q o, ffn1 ffn2 */
  return per * (c->t_layers * layer + D * D + (double)c->t_vocab * D);
}

typedef struct {
  double vision, cross_kv, greedy, greedy8, beam, nocache, noself, init;
  int tokens;
} result;

/* Greedy by hand without the cache: every step recomputes the prefix,
 * and with keep_cross = 0 the image's cross-attention K/V too (HF's
 * use_cache=False). */
static int decode_nocache(blip_model *m, const float *emb, int steps, int keep_cross, double *secs) {
  const blip_cfg *c = blip_model_cfg(m);
  int32_t ids[64] = {c->bos_id};
  float *hid = malloc(sizeof(float) * 64 * c->t_hidden), *lg = malloc(sizeof(float) * c->t_vocab);
  blip_model_kv *kv = NULL;
  int rc = blip_model_kv_new(m, 1, 1, steps + 1, &kv);
  double t0 = now();
  for (int t = 1; !rc && t <= steps; t++) {
    if ((rc = keep_cross && t > 1 ? blip_model_kv_truncate(kv, 0) : blip_model_kv_images(m, kv, emb)) ||
        (rc = blip_model_decode(m, kv, ids, t, hid)) ||
        (rc = blip_model_lm_head(m, hid + (size_t)(t - 1) * c->t_hidden, 1, lg)))
      break;
    int best = 0;
    for (int v = 1; v < c->t_vocab; v++) best = lg[v] > lg[best] ? v : best;
    ids[t] = best == c->sep_id ? best + 1 : best;
  }
  *secs = now() - t0;
  blip_model_kv_free(kv);
  free(hid), free(lg);
  return rc;
}

static int run(blip_model *m, const float *px, int reps, result *r) {
  const blip_cfg *c = blip_model_cfg(m);
  const size_t TD = (size_t)c->v_tokens * c->v_hidden;
  float *emb = malloc(sizeof(float) * 8 * TD);
  blip_cap_opts o;
  blip_cap_defaults(m, &o);
  o.max_length = o.min_length = 20;
  r->tokens = o.max_length - 1;
  r->vision = r->greedy = r->greedy8 = r->beam = r->cross_kv = r->nocache = 1e30;
  int rc = emb ? BLIP_OK : blip_err_set(BLIP_ENOMEM, "out of memory");
  for (int i = 0; i < reps && !rc; i++) {
    double t0 = now(), t;
    blip_cap_result res;
    if ((rc = blip_model_vision(m, px, 1, emb, NULL))) break;
    if ((t = now() - t0) < r->vision) r->vision = t;
    o.num_beams = 1;
    t0 = now();
    if ((rc = blip_cap_generate(m, emb, 1, &o, &res))) break;
    if ((t = now() - t0) < r->greedy) r->greedy = t;
    blip_cap_result_free(&res, 1);
    blip_cap_result res8[8];
    for (int k = 1; k < 8; k++) memcpy(emb + k * TD, emb, TD * sizeof(float));
    t0 = now();
    if ((rc = blip_cap_generate(m, emb, 8, &o, res8))) break;
    if ((t = (now() - t0) / 8) < r->greedy8) r->greedy8 = t;
    blip_cap_result_free(res8, 8);
    o.num_beams = 3;
    t0 = now();
    if ((rc = blip_cap_generate(m, emb, 1, &o, &res))) break;
    if ((t = now() - t0) < r->beam) r->beam = t;
    blip_cap_result_free(&res, 1);
    blip_model_kv *kv = NULL; /* the image's cross-attention K/V alone (part of both times above) */
    if ((rc = blip_model_kv_new(m, 1, 1, 2, &kv))) break;
    t0 = now();
    rc = blip_model_kv_images(m, kv, emb);
    if ((t = now() - t0) < r->cross_kv) r->cross_kv = t;
    blip_model_kv_free(kv);
    if (!rc && i == 0 && (rc = decode_nocache(m, emb, r->tokens, 0, &r->nocache)) == BLIP_OK)
      rc = decode_nocache(m, emb, r->tokens, 1, &r->noself);
  }
  free(emb);
  return rc;
}

static void usage(FILE *f) {
  fprintf(f, "usage: bench_caption [--threads N] [--reps N] [--precision f32|bf16|int8] [--json]\n"
             "Caption speed at the base geometry with random weights (see the file's header).\n");
}

int main(int argc, char **argv) {
  int threads = 2, reps = 2, json = 0, only = -1;
  static struct option lo[] = {{"threads", 1, 0, 't'}, {"reps", 1, 0, 'r'}, {"json", 0, 0, 'j'}, {"precision", 1, 0, 'p'},
                               {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "t:r:jp:h", lo, NULL)) != -1;) {
    blip_prec p;
    if (c == 't') threads = atoi(optarg);
    else if (c == 'r') reps = atoi(optarg);
    else if (c == 'j') json = 1;
    else if (c == 'p' && !blip_model_parse_precision(optarg, &p)) only = (int)p;
    else { usage(c == 'h' ? stdout : stderr); return c == 'h' ? 0 : 2; }
  }
  if (reps < 1) reps = 1;
  blip_k_set_threads(threads);
  blip_cfg c = {.v_hidden = 768, .v_layers = 12, .v_heads = 12, .v_mlp = 3072, .image_size = 384, .patch = 16, .v_eps = 1e-5f,
                .v_tokens = 577, .t_vocab = 30524, .t_hidden = 768, .t_layers = 12, .t_heads = 12, .t_mlp = 3072, .t_max_pos = 512,
                .t_enc_hidden = 768, .t_eps = 1e-12f, .pad_id = 0, .sep_id = 102, .bos_id = 30522, .embed_dim = 256, .captioner = 1,
                .gen = {.max_length = 20, .num_beams = 1, .top_k = 50, .repetition_penalty = 1, .length_penalty = 1, .top_p = 1,
                        .temperature = 1}};
  const double bw = read_bw(threads);
  float *px = malloc(sizeof(float) * 3 * 384 * 384);
  if (!px) return 1;
  for (long i = 0; i < 3L * 384 * 384; i++) px[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
  if (json) printf("{\"geometry\":\"base\",\"threads\":%d,\"read_gb_s\":%.2f,\"precisions\":{", threads, bw / 1e9);
  else
    printf("captioner ViT-B/16 384 + BERT-base decoder, random weights, %d threads; read bandwidth %.1f GB/s\n", threads, bw / 1e9);
  for (int p = 0, first = 1; p < 3; p++) {
    if (only >= 0 && p != only) continue;
    blip_model_opts o = {.precision = (blip_prec)p};
    blip_model *m = NULL;
    result r;
    double t0 = now();
    if (blip_model_random(&c, &o, 1, &m)) { fprintf(stderr, "bench_caption: %s\n", blip_err_last()); return 1; }
    r.init = now() - t0;
    if (run(m, px, reps, &r)) { fprintf(stderr, "bench_caption: %s\n", blip_err_last()); return 1; }
    blip_model_free(m);
    const double bound = step_weight_bytes(&c, (blip_prec)p) / bw, n = r.tokens;
    const double g_tok = (r.greedy - r.cross_kv) / n, b_tok = (r.beam - r.cross_kv) / n, nc_tok = r.nocache / n;
    const char *name = blip_model_precision_name((blip_prec)p);
    if (json) {
      printf("%s\"%s\":{\"vision_ms\":%.1f,\"cross_kv_ms\":%.1f,\"greedy_caption_ms\":%.1f,\"beam3_caption_ms\":%.1f,"
             "\"tokens\":%d,\"greedy_ms_per_token\":%.2f,\"beam3_ms_per_step\":%.2f,\"bandwidth_bound_ms_per_step\":%.2f,"
             "\"nocache_ms_per_token\":%.2f,\"kv_cache_gain\":%.2f,\"self_cache_gain\":%.2f,\"greedy_batch8_ms_per_image\":%.1f}",
             first ? "" : ",", name, r.vision * 1e3, r.cross_kv * 1e3, r.greedy * 1e3, r.beam * 1e3, r.tokens, g_tok * 1e3, b_tok * 1e3,
             bound * 1e3, nc_tok * 1e3, r.nocache / r.greedy, r.noself / (r.greedy - r.cross_kv), r.greedy8 * 1e3);
    } else {
      printf("[%s] init %.1f s; weights read per step %.0f MB -> bandwidth bound %.2f ms/step\n", name, r.init,
             step_weight_bytes(&c, (blip_prec)p) / 1e6, bound * 1e3);
      printf("  per image: vision %.0f ms + greedy decoding %.0f ms (cross-attn K/V %.0f ms) = %.0f ms; beam 3: %.0f ms decoding\n",
             r.vision * 1e3, r.greedy * 1e3, r.cross_kv * 1e3, (r.vision + r.greedy) * 1e3, r.beam * 1e3);
      printf("  greedy decoding of 8 images together: %.0f ms per image (%.1fx one at a time)\n", r.greedy8 * 1e3, r.greedy / r.greedy8);
      printf("  per token (%d tokens): greedy %.2f ms (%.0f%% of the bound's speed), beam 3 %.2f ms/step (3 rows, %.0f%%)\n", r.tokens,
             g_tok * 1e3, 100 * bound / g_tok, b_tok * 1e3, 100 * bound / b_tok);
      printf("  KV cache: %.2f ms/token vs %.2f recomputing everything (HF use_cache=False): %.1fx; vs %.2f recomputing the\n"
             "  self-attention prefix with the image K/V kept: %.1fx\n",
             g_tok * 1e3, nc_tok * 1e3, r.nocache / r.greedy, r.noself / n * 1e3, r.noself / (r.greedy - r.cross_kv));
    }
    first = 0;
  }
  if (json) printf("}}\n");
  free(px);
  return 0;
}
