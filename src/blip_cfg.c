/* blip_cfg: parse HF BlipConfig JSON (jansson). An absent key takes the
 * default of transformers' BlipVisionConfig / BlipTextConfig / BlipConfig,
 * exactly as transformers does when it loads the same file (hub configs
 * saved with use_diff omit defaults). A key of the wrong type or out of
 * range -> BLIP_EFORMAT naming the key. */
#include "blip_cfg.h"
#include "blip_err.h"

#include <jansson.h>
#include <string.h>

/* Integer key: absent or null -> def, range [lo,hi]. */
static int get_int(json_t *obj, const char *sec, const char *key, int def, int lo, int hi, int *out) {
  json_t *v = json_object_get(obj, key);
  if (!v || json_is_null(v)) {
    *out = def;
    return BLIP_OK;
  }
  if (!json_is_integer(v)) return blip_err_set(BLIP_EFORMAT, "config.json: %s.%s is not an integer", sec, key);
  json_int_t x = json_integer_value(v);
  if (x < lo || x > hi)
    return blip_err_set(BLIP_EFORMAT, "config.json: %s.%s = %lld is outside [%d, %d]", sec, key, (long long)x, lo, hi);
  *out = (int)x;
  return BLIP_OK;
}

static int get_eps(json_t *obj, const char *sec, float def, float *out) {
  json_t *v = json_object_get(obj, "layer_norm_eps");
  if (!v) { *out = def; return BLIP_OK; }
  if (!json_is_number(v)) return blip_err_set(BLIP_EFORMAT, "config.json: %s.layer_norm_eps is not a number", sec);
  double e = json_number_value(v);
  if (!(e > 0 && e < 1)) return blip_err_set(BLIP_EFORMAT, "config.json: %s.layer_norm_eps = %g is out of range", sec, e);
  *out = (float)e;
  return BLIP_OK;
}

static int check_act(json_t *obj, const char *sec) {
  json_t *v = json_object_get(obj, "hidden_act");
  if (v && (!json_is_string(v) || strcmp(json_string_value(v), "gelu")))
    return blip_err_set(BLIP_EUNSUPPORTED, "config.json: %s.hidden_act must be \"gelu\" (exact erf GELU)", sec);
  return BLIP_OK;
}

/* Float key: absent or null -> def, range [lo,hi]. */
static int get_float(json_t *obj, const char *key, float def, float lo, float hi, float *out) {
  json_t *v = json_object_get(obj, key);
  if (!v || json_is_null(v)) {
    *out = def;
    return BLIP_OK;
  }
  if (!json_is_number(v)) return blip_err_set(BLIP_EFORMAT, "config.json: text_config.%s is not a number", key);
  double x = json_number_value(v);
  if (!(x >= lo && x <= hi)) return blip_err_set(BLIP_EFORMAT, "config.json: text_config.%s = %g is outside [%g, %g]", key, x, lo, hi);
  *out = (float)x;
  return BLIP_OK;
}

/* Boolean key (early_stopping may also be the string "never" -> 2). */
static int get_flag(json_t *obj, const char *key, int *out) {
  json_t *v = json_object_get(obj, key);
  *out = 0;
  if (!v || json_is_null(v) || json_is_false(v)) return BLIP_OK;
  if (json_is_true(v)) *out = 1;
  else if (json_is_string(v) && !strcmp(json_string_value(v), "never")) *out = 2;
  else return blip_err_set(BLIP_EFORMAT, "config.json: text_config.%s is not a boolean", key);
  return BLIP_OK;
}

/* generate() defaults. BlipForConditionalGeneration.generate calls
 * text_decoder.generate, whose GenerationConfig comes from text_config:
 * the top-level keys do not reach it. */
static int parse_gen(json_t *t, blip_cfg *c) {
  int rc;
  if ((rc = get_int(t, "text_config", "max_length", 20, 1, 1 << 16, &c->gen.max_length)) ||
      (rc = get_int(t, "text_config", "min_length", 0, 0, 1 << 16, &c->gen.min_length)) ||
      (rc = get_int(t, "text_config", "num_beams", 1, 1, 1024, &c->gen.num_beams)) ||
      (rc = get_int(t, "text_config", "top_k", 50, 0, 1 << 22, &c->gen.top_k)) ||
      (rc = get_int(t, "text_config", "no_repeat_ngram_size", 0, 0, 1 << 16, &c->gen.no_repeat_ngram_size)) ||
      (rc = get_float(t, "temperature", 1.0f, 1e-6f, 1e6f, &c->gen.temperature)) ||
      (rc = get_flag(t, "do_sample", &c->gen.do_sample)) || (rc = get_flag(t, "early_stopping", &c->gen.early_stopping)) ||
      (rc = get_float(t, "repetition_penalty", 1.0f, 1e-6f, 1e6f, &c->gen.repetition_penalty)) ||
      (rc = get_float(t, "length_penalty", 1.0f, -1e6f, 1e6f, &c->gen.length_penalty)) ||
      (rc = get_float(t, "top_p", 1.0f, 0.0f, 1.0f, &c->gen.top_p)))
    return rc;
  if (c->gen.do_sample == 2) return blip_err_set(BLIP_EFORMAT, "config.json: text_config.do_sample is not a boolean");
  return BLIP_OK;
}

static int is_captioner(json_t *root) {
  json_t *a = json_object_get(root, "architectures");
  for (size_t i = 0; json_is_array(a) && i < json_array_size(a); i++) {
    json_t *s = json_array_get(a, i);
    if (json_is_string(s) && !strcmp(json_string_value(s), "BlipForConditionalGeneration")) return 1;
  }
  return 0;
}

static int parse_root(json_t *root, blip_cfg *c) {
  if (!json_is_object(root)) return blip_err_set(BLIP_EFORMAT, "config.json: not a JSON object");
  json_t *v = json_object_get(root, "vision_config"), *t = json_object_get(root, "text_config");
  /* A missing section is all defaults in transformers; jansson's getters return NULL on a NULL object. */
  if (v && !json_is_object(v)) return blip_err_set(BLIP_EFORMAT, "config.json: vision_config is not an object");
  if (t && !json_is_object(t)) return blip_err_set(BLIP_EFORMAT, "config.json: text_config is not an object");
  json_t *mt = json_object_get(root, "model_type");
  if (mt && (!json_is_string(mt) || strcmp(json_string_value(mt), "blip")))
    return blip_err_set(BLIP_EUNSUPPORTED, "config.json: model_type is not \"blip\"");
  int rc;
  const int BIG = 1 << 16;
  if ((rc = get_int(v, "vision_config", "hidden_size", 768, 1, BIG, &c->v_hidden)) ||
      (rc = get_int(v, "vision_config", "num_hidden_layers", 12, 1, 256, &c->v_layers)) ||
      (rc = get_int(v, "vision_config", "num_attention_heads", 12, 1, 1024, &c->v_heads)) ||
      (rc = get_int(v, "vision_config", "intermediate_size", 3072, 1, 1 << 18, &c->v_mlp)) ||
      (rc = get_int(v, "vision_config", "image_size", 384, 1, 4096, &c->image_size)) ||
      (rc = get_int(v, "vision_config", "patch_size", 16, 1, 4096, &c->patch)) ||
      (rc = get_eps(v, "vision_config", 1e-5f, &c->v_eps)) || (rc = check_act(v, "vision_config")) ||
      (rc = get_int(t, "text_config", "vocab_size", 30524, 104, 1 << 22, &c->t_vocab)) ||
      (rc = get_int(t, "text_config", "hidden_size", 768, 1, BIG, &c->t_hidden)) ||
      (rc = get_int(t, "text_config", "num_hidden_layers", 12, 1, 256, &c->t_layers)) ||
      (rc = get_int(t, "text_config", "num_attention_heads", 8, 1, 1024, &c->t_heads)) ||
      (rc = get_int(t, "text_config", "intermediate_size", 3072, 1, 1 << 18, &c->t_mlp)) ||
      (rc = get_int(t, "text_config", "max_position_embeddings", 512, 2, 1 << 16, &c->t_max_pos)) ||
      (rc = get_int(t, "text_config", "encoder_hidden_size", 768, 1, BIG, &c->t_enc_hidden)) ||
      (rc = get_eps(t, "text_config", 1e-12f, &c->t_eps)) || (rc = check_act(t, "text_config")) ||
      (rc = get_int(t, "text_config", "pad_token_id", 0, 0, 1 << 22, &c->pad_id)) ||
      (rc = get_int(t, "text_config", "sep_token_id", 102, 0, 1 << 22, &c->sep_id)) ||
      (rc = get_int(t, "text_config", "bos_token_id", 30522, 0, 1 << 22, &c->bos_id)) ||
      (rc = get_int(root, "config", "image_text_hidden_size", 256, 1, BIG, &c->embed_dim)) || (rc = parse_gen(t, c)))
    return rc;
  c->captioner = is_captioner(root);
  if (c->v_hidden % c->v_heads)
    return blip_err_set(BLIP_EFORMAT, "config.json: vision hidden_size %d is not divisible by %d heads", c->v_hidden, c->v_heads);
  if (c->t_hidden % c->t_heads)
    return blip_err_set(BLIP_EFORMAT, "config.json: text hidden_size %d is not divisible by %d heads", c->t_hidden, c->t_heads);
  if (c->image_size % c->patch)
    return blip_err_set(BLIP_EFORMAT, "config.json: image_size %d is not a multiple of patch_size %d", c->image_size, c->patch);
  if (c->t_enc_hidden != c->v_hidden)
    return blip_err_set(BLIP_EFORMAT, "config.json: text encoder_hidden_size %d differs from the vision width %d",
                        c->t_enc_hidden, c->v_hidden);
  int g = c->image_size / c->patch;
  c->v_tokens = g * g + 1;
  if (c->bos_id + 1 >= c->t_vocab)
    return blip_err_set(BLIP_EFORMAT, "config.json: vocab_size %d has no room for [ENC] after [DEC]=%d", c->t_vocab, c->bos_id);
  return BLIP_OK;
}

int blip_cfg_parse(const char *json, size_t len, blip_cfg *out) {
  memset(out, 0, sizeof *out);
  json_error_t err;
  json_t *root = json_loadb(json, len, 0, &err);
  if (!root) return blip_err_set(BLIP_EFORMAT, "config.json: %s (line %d, column %d)", err.text, err.line, err.column);
  int rc = parse_root(root, out);
  json_decref(root);
  return rc;
}

int blip_cfg_load(const char *path, blip_cfg *out) {
  memset(out, 0, sizeof *out);
  json_error_t err;
  json_t *root = json_load_file(path, 0, &err);
  if (!root) {
    if (err.line < 0 || strstr(err.text, "unable to open"))
      return blip_err_set(BLIP_EMISSING, "%s: cannot read: %s", path, err.text);
    return blip_err_set(BLIP_EFORMAT, "%s: %s (line %d, column %d)", path, err.text, err.line, err.column);
  }
  int rc = parse_root(root, out);
  json_decref(root);
  return rc ? blip_err_wrap(rc, "%s", path) : BLIP_OK;
}
