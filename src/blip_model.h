/* blip_model: BLIP retrieval model (BlipForImageTextRetrieval) inference.
 *
 * An opaque context holding the geometry, the tokenizer and the weights.
 * At load the linear layers are converted once from the file (F32, F16 or
 * BF16) to the chosen precision in oneDNN's blocked layout: f32, bf16, or
 * int8 with per-output-channel scales (activations quantized per row).
 * LayerNorm, softmax, GELU and residuals stay f32 in every precision; the
 * patch embedding, cross-attention key/value and heads stay f32; the
 * bf16/int8 models run the vision self-attention with bf16 operands. The weights'
 * f32 copies are released after conversion. Forward passes are batched
 * and reentrant for different contexts; one context must not be used
 * from two threads at once (it owns scratch buffers and oneDNN
 * primitives). Threads: blip_k_set_threads().
 *
 * Shapes: T = cfg.v_tokens, Dv = cfg.v_hidden, Dt = cfg.t_hidden,
 * E = cfg.embed_dim, S = cfg.image_size. */
#ifndef BLIP_MODEL_H
#define BLIP_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "blip_cfg.h"
#include "blip_tok.h"

typedef struct blip_model blip_model;

typedef enum { BLIP_PREC_F32 = 0, BLIP_PREC_BF16 = 1, BLIP_PREC_INT8 = 2 } blip_prec;

typedef struct {
  blip_prec precision;   /* compute precision of the linear layers (see above) */
  const char *weights;   /* weights file; NULL = DIR/model.safetensors */
} blip_model_opts;

/* ITM's first token: the paper's [ENC] (default) or HF's [CLS]. */
typedef enum { BLIP_ITM_ENC = 0, BLIP_ITM_CLS = 1 } blip_itm_first;

/* DIR holds config.json, model.safetensors and vocab.txt. opts may be NULL. */
int blip_model_load(const char *dir, const blip_model_opts *opts, blip_model **out);
/* Random weights at a given geometry, no tokenizer (benchmarks, real-geometry tests). */
int blip_model_random(const blip_cfg *cfg, const blip_model_opts *opts, uint64_t seed, blip_model **out);
void blip_model_free(blip_model *m);

const blip_cfg *blip_model_cfg(const blip_model *m);
const blip_tok *blip_model_tok(const blip_model *m); /* NULL for random models */
blip_prec blip_model_precision(const blip_model *m);
/* 1 when the vision encoder runs as one row-split team (CPUs with the fused
 * attention kernels, 2+ threads at load, BLIP_VISION_PER_OP unset), 0 when
 * it opens a parallel region per op. */
int blip_model_vision_team(const blip_model *m);
/* "f32" | "bf16" | "int8" <-> blip_prec (every tool's --precision); "auto"
 * parses as blip_model_auto_precision(). */
int blip_model_parse_precision(const char *name, blip_prec *out);
/* bf16 where this CPU has native bf16 dot products that the OS enables
 * (AVX512_BF16 or AMX-BF16; cpuid + xgetbv), else f32. */
blip_prec blip_model_auto_precision(void);
const char *blip_model_precision_name(blip_prec p);
/* 16 hex digits identifying config + weights bytes; stable across runs. */
const char *blip_model_fingerprint(const blip_model *m);

/* pixels [n,3,S,S] -> embeds [n,T,Dv] (may be NULL), feat [n,E] L2-normalized (may be NULL). */
int blip_model_vision(blip_model *m, const float *pixels, int n, float *embeds, float *feat);
/* blip_model_vision with where its time goes, in ms added to ms[]: per
 * phase, as the first thread of the team sees it (each thread runs its
 * share of the rows through the same phases); WAIT is the two meetings a
 * layer, REST what lies outside the layers (final LayerNorm, projection).
 * BLIP_EINVAL when the encoder does not run as a team. */
enum { BLIP_VP_EMBED, BLIP_VP_LN, BLIP_VP_QKV, BLIP_VP_ATTN, BLIP_VP_PROJ, BLIP_VP_FC1, BLIP_VP_FC2, BLIP_VP_WAIT, BLIP_VP_REST, BLIP_VP_N };
int blip_model_vision_profile(blip_model *m, const float *pixels, int n, float *feat, double ms[BLIP_VP_N]);

/* Unimodal text encoder. ids/mask [n,L] (mask 1 = real token); embeds [n,L,Dt]
 * (may be NULL; padded rows computed as upstream does), feat [n,E] L2-normalized (may be NULL).
 * Without embeds, rows whose mask is real tokens then padding run packed (the
 * padding is not computed; the features are the same to float rounding). */
int blip_model_text(blip_model *m, const int32_t *ids, const int32_t *mask, int n, int L, float *embeds, float *feat);

/* Image-text matching of one caption against k images.
 * ids: the caption's len real tokens ([CLS] ... [SEP], no padding); ids[0] is
 * replaced per `first`. images[i]: embeds [T,Dv] of candidate i (vision output).
 * logits [k,2] = [no-match, match]; cls [k,Dt] (may be NULL) = position-0 output.
 * fast != 0 uses the reassociated cross-attention (no image K/V projection). */
int blip_model_itm(blip_model *m, const int32_t *ids, int len, const float *const *images, int k,
                   blip_itm_first first, int fast, float *logits, float *cls);

/* ITM of n (caption, image) pairs, each with its own caption: ids [n, L],
 * row i holding lens[i] real tokens then padding (any in-vocabulary ids,
 * checked like the tokens, not computed), ids[i*L]
 * replaced per `first`; images[i] as above. The captions run packed, without
 * padding: a pair costs what its own length costs. logits [n,2], cls [n,Dt]
 * (may be NULL). blip_model_itm is this with one caption repeated; the
 * logits of a pair do not depend on its batch (to float rounding). */
int blip_model_itm_pairs(blip_model *m, const int32_t *ids, const int *lens, int L, const float *const *images, int n,
                         blip_itm_first first, int fast, float *logits, float *cls);

/* ITM with an image's cross-attention K/V projected once for all the captions
 * scored against it (the naive path's math, without the per-pair projection).
 * kv: blip_model_itm_kv_floats(m) floats = [t_layers, 2, T, Dt]; blip_model_itm_kv
 * fills it from one image's embeds [T, Dv]. blip_model_itm_captions scores n
 * captions of len tokens each (ids [n, len], as blip_model_itm's) against it:
 * logits [n, 2]. */
size_t blip_model_itm_kv_floats(const blip_model *m);
int blip_model_itm_kv(blip_model *m, const float *image, float *kv);
int blip_model_itm_captions(blip_model *m, const int32_t *ids, int len, int n, const float *kv, blip_itm_first first,
                            float *logits);

/* ---- Captioner (BlipForConditionalGeneration; cfg.captioner = 1) ----
 * The BERT decoder (causal self-attention, cross-attention to the image
 * tokens) runs incrementally over a KV cache: each call appends n tokens
 * to every row and costs n positions. Rows are grouped by image: rows/n_img
 * consecutive rows (e.g. beams) attend to the same image, whose
 * cross-attention K/V are projected once by blip_model_kv_images. */
typedef struct blip_model_kv blip_model_kv;
/* A cache for `rows` sequences of up to cap tokens over n_img images (rows % n_img == 0). */
int blip_model_kv_new(const blip_model *m, int rows, int n_img, int cap, blip_model_kv **out);
void blip_model_kv_free(blip_model_kv *kv);
/* Start over with new images: embeds [n_img, T, Dv] (blip_model_vision's output); empties the cache. */
int blip_model_kv_images(blip_model *m, blip_model_kv *kv, const float *embeds);
int blip_model_kv_len(const blip_model_kv *kv);
/* Keep the first len positions (a shared prefix decoded once); the image K/V stay. */
int blip_model_kv_truncate(blip_model_kv *kv, int len);
/* Row r takes the cached sequence of row src[r] (beam reordering; src[r] within r's image). */
int blip_model_kv_reorder(blip_model_kv *kv, const int *src);
/* Append ids [rows, n] at positions len..len+n-1; hidden [rows, n, Dt] = last layer's output (may be NULL). */
int blip_model_decode(blip_model *m, blip_model_kv *kv, const int32_t *ids, int n, float *hidden);
/* LM head: hidden [M, Dt] -> logits [M, vocab] (transform dense + GELU, LayerNorm, decoder + bias). */
int blip_model_lm_head(blip_model *m, const float *hidden, int M, float *logits);

/* Tokenize for retrieval: [CLS] .. [SEP] truncated to max_len, padded with 0.
 * mask gets 1 for real tokens. *n_real = real count, *truncated = 1 if cut. */
int blip_model_tokenize(const blip_model *m, const char *text, int max_len, int32_t *ids, int32_t *mask,
                        int *n_real, int *truncated);

#endif
