/* blip_cap: BLIP's captioner (HF BlipForConditionalGeneration.generate,
 * transformers 4.38 semantics): greedy search, beam search (length penalty,
 * min_length, early stopping, repetition penalty, no repeated n-grams) and
 * nucleus / top-k sampling, over the decoder's KV cache (blip_model_decode).
 * The beams of one image are one batch of rows; greedy search and sampling
 * decode up to 16 images as one batch; each image's cross-attention K/V are
 * projected once.
 *
 * Decoder prefix as HF builds it: [DEC] alone, or the prompt tokenized as
 * [CLS] .. [SEP] with [CLS] -> [DEC] and the final [SEP] dropped.
 * max_length and min_length count the prefix. The end token is [SEP].
 *
 * Sampling draws from xoshiro256** seeded through splitmix64(seed): one
 * uniform double per running image and step (images in order), inverted
 * over the kept tokens in descending probability. Deterministic for a seed
 * and a batch, but not torch.multinomial's stream: a seeded sample cannot
 * equal PyTorch's. */
#ifndef BLIP_CAP_H
#define BLIP_CAP_H

#include <stdint.h>

#include "blip_model.h"

typedef struct {
  int max_length, min_length, num_beams;
  int early_stopping; /* 0 = false, 1 = true, 2 = "never" */
  float repetition_penalty, length_penalty;
  int no_repeat_ngram_size; /* 0 = off */
  int do_sample, top_k;     /* top_k 0 = off */
  float top_p;              /* 1 = off */
  float temperature;        /* sampling only, as HF's warper; 1 = off */
  uint64_t seed;
  const char *prompt; /* NULL or "" = none */
} blip_cap_opts;

typedef struct {
  int32_t *ids; /* as generate() returns them: the prefix, the caption, [SEP] if it ended by itself */
  int n;
  double score; /* beam search: the winner's length-normalised log-prob; else 0 */
  char *text;   /* tokenizer.decode(ids, skip_special_tokens=True); NULL for a model without vocabulary */
} blip_cap_result;

/* The checkpoint's generate() defaults (config.json text_config). */
void blip_cap_defaults(const blip_model *m, blip_cap_opts *o);
/* The decoder prefix for a prompt (NULL/"" = [DEC] alone) into ids[cap]. */
int blip_cap_prefix(const blip_model *m, const char *prompt, int32_t *ids, int cap, int *n);
/* Caption n images from their vision tokens embeds [n, T, Dv] (blip_model_vision). out[n]. */
int blip_cap_generate(blip_model *m, const float *embeds, int n, const blip_cap_opts *o, blip_cap_result *out);
void blip_cap_result_free(blip_cap_result *r, int n);

#endif
