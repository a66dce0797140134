/* test_geometry: the loader accepts files with exactly the tensor names and
 * shapes of the released base and large checkpoints (built here as sparse
 * files from tests/data/checkpoint-manifest, so they cost no disk), runs a
 * forward pass at that geometry (577 tokens, 12 or 24 layers), and, with
 * random weights at the base geometry, checks that the reassociated ITM
 * equals the naive one on 577 real-size image tokens. The captioners
 * (blip-image-captioning-base/large) load under either LM-bias name, refuse
 * a file without the untied LM decoder weight, and caption at that size. */
#include "blip_cap.h"
#include "blip_cfg.h"
#include "blip_err.h"
#include "blip_kern.h"
#include "blip_model.h"
#include "check.h"

#include <fcntl.h>
#include <jansson.h>
#include <stdint.h>
#include <unistd.h>

static char g_dir[256];

/* Write DIR/model.safetensors (sparse, all-zero F32 data) from a manifest,
 * leaving out tensor `skip` (NULL = none). */
static int write_sparse(const char *tsv, const char *skip) {
  FILE *f = fopen(tsv, "r");
  if (!f) return -1;
  json_t *hdr = json_object();
  char line[1024];
  long long off = 0;
  while (fgets(line, sizeof line, f)) {
    char *name = strtok(line, "\t"), *shape = strtok(NULL, "\t");
    if (!name || !shape || (skip && !strcmp(name, skip))) continue;
    json_t *sh = json_array();
    long long numel = 1;
    for (char *d = strtok(shape, ","); d; d = strtok(NULL, ",")) {
      json_array_append_new(sh, json_integer(atoll(d)));
      numel *= atoll(d);
    }
    json_object_set_new(hdr, name, json_pack("{s:s,s:o,s:[I,I]}", "dtype", "F32", "shape", sh, "data_offsets", off, off + 4 * numel));
    off += 4 * numel;
  }
  fclose(f);
  char *text = json_dumps(hdr, JSON_COMPACT);
  json_decref(hdr);
  size_t hl = strlen(text);
  char path[512];
  snprintf(path, sizeof path, "%s/model.safetensors", g_dir);
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  uint8_t len8[8];
  for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)hl >> (8 * i));
  int ok = fd >= 0 && write(fd, len8, 8) == 8 && write(fd, text, hl) == (ssize_t)hl && ftruncate(fd, (off_t)(8 + hl + off)) == 0;
  if (fd >= 0) close(fd);
  free(text);
  printf("  sparse %s: %.0f MB of weights\n", tsv, off / 1e6);
  return ok ? 0 : -1;
}

static void link_file(const char *src, const char *name) {
  char dst[512];
  snprintf(dst, sizeof dst, "%s/%s", g_dir, name);
  char *abs = realpath(src, NULL);
  unlink(dst);
  if (!abs || symlink(abs, dst)) perror(dst);
  free(abs);
}

static int all_finite(const float *x, long n) {
  for (long i = 0; i < n; i++)
    if (!isfinite(x[i])) return 0;
  return 1;
}

static void test_manifest(const char *model, int layers, int width) {
  char tsv[512], cfg[512];
  snprintf(tsv, sizeof tsv, "%s", test_data("checkpoint-manifest/"));
  strcat(tsv, model);
  snprintf(cfg, sizeof cfg, "%s", tsv);
  strcat(tsv, ".tsv");
  strcat(cfg, ".config.json");
  link_file(cfg, "config.json");
  link_file(test_data("blip-tiny/vocab.txt"), "vocab.txt");

  CHECK(write_sparse(tsv, "text_encoder.encoder.layer.11.output.LayerNorm.bias") == 0, "write sparse");
  blip_model *m = NULL;
  int rc = blip_model_load(g_dir, NULL, &m);
  CHECK(rc == BLIP_EMISSING && strstr(blip_err_last(), "layer.11.output.LayerNorm.bias"), "%s minus one tensor: %d %s", model, rc,
        blip_err_last());

  CHECK(write_sparse(tsv, NULL) == 0, "write sparse");
  CHECK_OK(blip_model_load(g_dir, NULL, &m));
  const blip_cfg *c = blip_model_cfg(m);
  CHECK(c->v_tokens == 577 && c->v_layers == layers && c->v_hidden == width && c->t_layers == 12 && c->embed_dim == 256,
        "%s geometry: %d tokens, %d layers, width %d", model, c->v_tokens, c->v_layers, c->v_hidden);
  float *px = malloc(sizeof(float) * 3 * 384 * 384), *emb = malloc(sizeof(float) * 577 * width), feat[256];
  for (long i = 0; i < 3L * 384 * 384; i++) px[i] = (float)(i % 255) / 128.0f - 1.0f;
  CHECK_OK(blip_model_vision(m, px, 1, emb, feat));
  /* Zero weights: every LayerNorm outputs its (zero) bias, so the tokens
   * and the normalized projection are exactly zero. */
  int zero = 1;
  for (long i = 0; i < 577L * width; i++) zero &= emb[i] == 0.0f;
  for (int i = 0; i < 256; i++) zero &= feat[i] == 0.0f;
  CHECK(zero, "%s: zero-weight forward is not exactly zero", model);
  int32_t ids[12] = {101, 1037, 3899, 2770, 2006, 1037, 3509, 2007, 2019, 4399, 2067, 102};
  float logits[2];
  const float *img = emb;
  CHECK_OK(blip_model_itm(m, ids, 12, &img, 1, BLIP_ITM_ENC, 1, logits, NULL));
  CHECK(logits[0] == 0.0f && logits[1] == 0.0f, "zero-weight itm");
  printf("  %s: loaded %d+%d layers, forward at 577 tokens ok, fingerprint %s\n", model, c->v_layers, c->t_layers,
         blip_model_fingerprint(m));
  blip_model_free(m);
  free(px);
  free(emb);
}

static void test_caption_manifest(const char *model, int layers, int width) {
  char tsv[512], cfg[512];
  snprintf(tsv, sizeof tsv, "%s%s.tsv", test_data("checkpoint-manifest/"), model);
  snprintf(cfg, sizeof cfg, "%s%s.config.json", test_data("checkpoint-manifest/"), model);
  link_file(cfg, "config.json");
  link_file(test_data("blip-tiny/vocab.txt"), "vocab.txt");
  blip_model *m = NULL;
  if (layers == 12) { /* names: once (each load packs a gigabyte) */
    /* decoder.weight is its own tensor in transformers 4.38: never replaced by the word embeddings */
    CHECK(write_sparse(tsv, "text_decoder.cls.predictions.decoder.weight") == 0, "write sparse");
    int rc = blip_model_load(g_dir, NULL, &m);
    CHECK(rc == BLIP_EMISSING && strstr(blip_err_last(), "decoder.weight"), "%s without decoder.weight: %d %s", model, rc, blip_err_last());
    /* the LM bias under its other name only (save_pretrained keeps cls.predictions.bias; old files both) */
    CHECK(write_sparse(tsv, "text_decoder.cls.predictions.bias") == 0, "write sparse");
    CHECK_OK(blip_model_load(g_dir, NULL, &m));
    blip_model_free(m);
  }
  CHECK(write_sparse(tsv, NULL) == 0, "write sparse");
  CHECK_OK(blip_model_load(g_dir, NULL, &m));
  const blip_cfg *c = blip_model_cfg(m);
  CHECK(c->captioner && c->v_tokens == 577 && c->v_layers == layers && c->v_hidden == width && c->t_layers == 12 &&
            c->t_enc_hidden == width && c->gen.max_length == 20 && c->gen.num_beams == 1,
        "%s geometry", model);
  float *px = malloc(sizeof(float) * 3 * 384 * 384), *emb = malloc(sizeof(float) * 577 * width);
  for (long i = 0; i < 3L * 384 * 384; i++) px[i] = (float)(i % 255) / 128.0f - 1.0f;
  CHECK_OK(blip_model_vision(m, px, 1, emb, NULL));
  blip_cap_opts o;
  blip_cap_defaults(m, &o);
  o.max_length = 6, o.prompt = "a picture of";
  blip_cap_result r, rb;
  CHECK_OK(blip_cap_generate(m, emb, 1, &o, &r));
  /* zero weights: every logit is 0, so greedy picks id 0 ([PAD]) at each step */
  CHECK(r.n == 6 && r.ids[0] == 30522 && r.ids[3] == 1997 && r.ids[4] == 0 && r.ids[5] == 0, "%s zero-weight caption", model);
  o.num_beams = 3;
  CHECK_OK(blip_cap_generate(m, emb, 1, &o, &rb));
  CHECK(rb.n == 6 && rb.ids[3] == 1997, "%s zero-weight beam caption", model);
  printf("  %s: loaded %d+%d layers, captioned at 577 tokens (greedy, beam 3)\n", model, c->v_layers, c->t_layers);
  blip_cap_result_free(&r, 1);
  blip_cap_result_free(&rb, 1);
  blip_model_free(m);
  free(px);
  free(emb);
}

static void test_random_base(void) {
  blip_cfg c;
  CHECK_OK(blip_cfg_load(test_data("checkpoint-manifest/blip-itm-base-coco.config.json"), &c));
  blip_model *m;
  CHECK_OK(blip_model_random(&c, NULL, 7, &m));
  float *px = malloc(sizeof(float) * 2 * 3 * 384 * 384), *emb = malloc(sizeof(float) * 2 * 577 * 768), feat[512], one[256];
  for (long i = 0; i < 2 * 3L * 384 * 384; i++) px[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
  CHECK_OK(blip_model_vision(m, px, 2, emb, feat));
  CHECK(all_finite(emb, 2 * 577 * 768), "random base vision finite");
  /* batch of 2 == two batches of 1 */
  CHECK_OK(blip_model_vision(m, px + 3 * 384 * 384, 1, NULL, one));
  check_tensor("base vision batch 2 == batch 1", feat + 256, one, 256, 1e-5);
  int32_t ids[12] = {101, 1037, 3899, 2770, 2006, 1037, 3509, 2007, 2019, 4399, 2067, 102};
  float fast[4], naive[4];
  const float *imgs[2] = {emb, emb + 577 * 768};
  CHECK_OK(blip_model_itm(m, ids, 12, imgs, 2, BLIP_ITM_ENC, 1, fast, NULL));
  CHECK_OK(blip_model_itm(m, ids, 12, imgs, 2, BLIP_ITM_ENC, 0, naive, NULL));
  printf("  base ITM logits fast %.5f %.5f naive %.5f %.5f\n", fast[1], fast[3], naive[1], naive[3]);
  check_tensor("base reassociated ITM == naive (577 tokens)", fast, naive, 4, 1e-4);
  blip_model_free(m);
  free(px);
  free(emb);
}

int main(void) {
  blip_k_set_threads(2);
  snprintf(g_dir, sizeof g_dir, "/tmp/blip-test-geometry-XXXXXX");
  if (!mkdtemp(g_dir)) return 2;
  test_manifest("blip-itm-base-coco", 12, 768);
  test_manifest("blip-itm-large-coco", 24, 1024);
  test_random_base();
  test_caption_manifest("blip-image-captioning-base", 12, 768);
  test_caption_manifest("blip-image-captioning-large", 24, 1024);
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
  if (system(cmd)) return 2;
  return check_summary();
}
