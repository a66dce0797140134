/* blip_evalrun: the retrieval evaluation pipeline behind blip-eval: text and
 * image features, ITC top-k, ITM match logits for the planned pairs, score
 * matrices and recall, with BLIP's exact protocol (blip_eval) and a
 * resumable on-disk cache. */
#ifndef BLIP_EVALRUN_H
#define BLIP_EVALRUN_H

#include <stdint.h>

#include "blip_eval.h"
#include "blip_model.h"

typedef struct {
  const char *model, *ann, *images; /* checkpoint dir, annotation JSON, image root */
  const char *cache;                /* resumable chunk cache directory, or NULL (memory only) */
  const char *dump;                 /* write sims and score matrices here (safetensors), or NULL */
  int k_test;                       /* ITM rerank depth */
  int itc_only, limit, f16;         /* skip ITM; first N images only; f16 vision tokens in the cache */
  blip_prec precision;
  /* Cache chunk sizes: images (32 = 57 MB of f32 tokens at base), captions
   * per text chunk, images per ITM chunk. */
  int img_chunk, txt_chunk, itm_chunk;
  /* Called after each batch of a phase ("text", "images", "itm"); fresh counts the
   * items computed in this run (not read from the cache). May be NULL. */
  void (*progress)(void *ctx, const char *phase, long done, long total, long fresh, double elapsed_s);
  void *ctx;
} blip_evalrun_opts;

typedef struct {
  blip_eval_recall itc, itm;
  char model[256]; /* blip_model_fingerprint */
  int n_images, n_texts, Dv;
  int k_i2t, k_t2i; /* k_test clamped to the gallery size */
  int64_t itm_pairs;
  double sec_text, sec_img, sec_itm, sec_score;
  int cached_text, cached_img, cached_itm; /* chunks reused from the cache */
} blip_evalrun_result;

/* Run the whole evaluation. */
int blip_evalrun(const blip_evalrun_opts *o, blip_evalrun_result *out);

/* Time the top-k + plan and the scoring + ranking phases on synthetic
 * COCO-size features (5k images, 25k captions, k 256, dimension E). */
int blip_evalrun_time_scoring(int E, double *s_topk, double *s_score, int64_t *pairs);

#endif
