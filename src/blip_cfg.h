/* blip_cfg: the model geometry, read from a Hugging Face BlipConfig
 * config.json. Every size comes from the file; nothing is hard-coded to the
 * base model. Parsing validates ranges and divisibility (hidden % heads,
 * image % patch) so that the engine can trust these numbers for allocation. */
#ifndef BLIP_CFG_H
#define BLIP_CFG_H

#include <stddef.h>

typedef struct {
  /* vision_config */
  int v_hidden, v_layers, v_heads, v_mlp, image_size, patch;
  float v_eps;
  int v_tokens; /* derived: (image_size/patch)^2 + 1 */
  /* text_config */
  int t_vocab, t_hidden, t_layers, t_heads, t_mlp, t_max_pos, t_enc_hidden;
  float t_eps;
  int pad_id, sep_id, bos_id; /* bos = [DEC] */
  /* top level */
  int embed_dim; /* image_text_hidden_size: size of vision_proj/text_proj */
  int captioner; /* architectures names BlipForConditionalGeneration */
  /* generate() defaults as transformers derives them (GenerationConfig.from_model_config:
   * a top-level value that differs from the default wins, else text_config's) */
  struct {
    int max_length, min_length, num_beams, do_sample, top_k, early_stopping, no_repeat_ngram_size;
    float repetition_penalty, length_penalty, top_p, temperature;
  } gen;
} blip_cfg;

int blip_cfg_load(const char *path, blip_cfg *out);
int blip_cfg_parse(const char *json, size_t len, blip_cfg *out);

#endif
