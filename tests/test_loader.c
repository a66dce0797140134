/* test_loader: broken model files give a clear error, never a crash.
 * Each case builds a model directory in a temp dir from the blip-tiny
 * fixture with one defect, loads it, and checks the error code and that
 * the message names the problem. */
#include "blip_cfg.h"
#include "blip_err.h"
#include "blip_model.h"
#include "blip_st.h"
#include "check.h"

#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

static char g_dir[256];

static void put_file(const char *name, const void *data, size_t n) {
  char p[512];
  snprintf(p, sizeof p, "%s/%s", g_dir, name);
  FILE *f = fopen(p, "wb");
  if (!f || fwrite(data, 1, n, f) != n) { perror(p); exit(2); }
  fclose(f);
}

static char *slurp(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f) { perror(path); exit(2); }
  fseek(f, 0, SEEK_END);
  *n = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc(*n + 1);
  if (fread(b, 1, *n, f) != *n) exit(2);
  b[*n] = 0;
  fclose(f);
  return b;
}

static void copy_fixture(const char *name) {
  size_t n;
  char *b = slurp(test_data(name), &n);
  const char *base = strrchr(name, '/') + 1;
  put_file(base, b, n);
  free(b);
}

/* Load g_dir; expect failure with code and a message containing needle. */
static void expect_fail(const char *what, int code, const char *needle) {
  blip_model *m = NULL;
  int rc = blip_model_load(g_dir, NULL, &m);
  CHECK(rc == code, "%s: rc %d (%s), want %d", what, rc, blip_err_last(), code);
  CHECK(m == NULL, "%s: model returned on failure", what);
  CHECK(strstr(blip_err_last(), needle) != NULL, "%s: message '%s' lacks '%s'", what, blip_err_last(), needle);
  printf("  %-34s -> %s\n", what, blip_err_last());
  blip_model_free(m);
}

/* Rewrite model.safetensors from the fixture through the writer, with
 * tensor `drop` omitted and/or tensor `reshape` given a different shape. */
static void write_variant(const char *drop, const char *reshape, blip_dtype redtype) {
  blip_st *st;
  if (blip_st_open(test_data("blip-tiny/model.safetensors"), &st)) exit(2);
  blip_st_writer *w;
  blip_st_writer_new(&w);
  for (int i = 0; i < blip_st_count(st); i++) {
    const blip_st_tensor *t = blip_st_at(st, i);
    if (drop && !strcmp(t->name, drop)) continue;
    if (reshape && !strcmp(t->name, reshape)) {
      int64_t shp[2] = {t->numel / 2, 2}; /* same bytes, different shape */
      blip_st_writer_add(w, t->name, t->dtype, 2, shp, t->data);
    } else if (redtype != BLIP_DT_F32 && !strcmp(t->name, "itm_head.bias")) {
      blip_st_writer_add(w, t->name, redtype, t->ndim, t->shape, t->data); /* I32 is also 4 bytes */
    } else {
      blip_st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data);
    }
  }
  /* An unknown buffer, as older hub files carry: must be ignored. */
  static const int64_t pos_ids[4] = {0, 1, 2, 3};
  int64_t s4[2] = {1, 4};
  blip_st_writer_add(w, "text_encoder.embeddings.position_ids", BLIP_DT_I64, 2, s4, pos_ids);
  char p[512];
  snprintf(p, sizeof p, "%s/model.safetensors", g_dir);
  if (blip_st_writer_save(w, p)) { fprintf(stderr, "%s\n", blip_err_last()); exit(2); }
  blip_st_writer_free(w);
  blip_st_close(st);
}

/* A raw safetensors file: header text + data bytes. */
static void write_raw(const char *hdr, size_t data_len, int64_t claimed_len) {
  size_t hl = strlen(hdr);
  uint64_t n = claimed_len >= 0 ? (uint64_t)claimed_len : hl;
  size_t tot = 8 + hl + data_len;
  uint8_t *b = calloc(1, tot);
  for (int i = 0; i < 8; i++) b[i] = (uint8_t)(n >> (8 * i));
  memcpy(b + 8, hdr, hl);
  put_file("model.safetensors", b, tot);
  free(b);
}

static void test_safetensors_parser(void) {
  blip_st *st = NULL;
  struct { const char *hdr; size_t data; int64_t claim; const char *needle; } cases[] = {
    {"{}", 0, 1000, "past the end"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, -1, "overlap"},
    {"{\"a\":{\"dtype\":\"F8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, -1, "unsupported dtype"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, -1, "needs 12"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, -1, "truncated"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, -1, "bad dimension"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8, -1, "impossibly large"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, -1, "bad data_offsets"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"a\":{}}", 8, -1, "duplicate"},
    {"[1,2]", 0, -1, "not a JSON object"},
    {"{\"a\":", 0, -1, "header JSON"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    write_raw(cases[i].hdr, cases[i].data, cases[i].claim);
    char p[512];
    snprintf(p, sizeof p, "%s/model.safetensors", g_dir);
    int rc = blip_st_open(p, &st);
    CHECK(rc == BLIP_EFORMAT && st == NULL, "case %zu: rc %d", i, rc);
    CHECK(strstr(blip_err_last(), cases[i].needle) != NULL, "case %zu: '%s' lacks '%s'", i, blip_err_last(), cases[i].needle);
  }
  /* Too short for the length prefix; empty file. */
  put_file("model.safetensors", "abc", 3);
  char p[512];
  snprintf(p, sizeof p, "%s/model.safetensors", g_dir);
  CHECK(blip_st_open(p, &st) == BLIP_EFORMAT, "3-byte file");
  put_file("model.safetensors", "", 0);
  CHECK(blip_st_open(p, &st) == BLIP_EFORMAT, "empty file");
  /* Writer round trip incl. metadata and a zero-size tensor. */
  float v[3] = {1, -2, 3.5f};
  int64_t s3 = 3, s0 = 0;
  blip_st_writer *w;
  blip_st_writer_new(&w);
  blip_st_writer_add(w, "v", BLIP_DT_F32, 1, &s3, v);
  blip_st_writer_add(w, "empty", BLIP_DT_F32, 1, &s0, v);
  blip_st_writer_meta(w, "format", "pt");
  CHECK(blip_st_writer_save(w, p) == 0, "writer: %s", blip_err_last());
  blip_st_writer_free(w);
  CHECK(blip_st_open(p, &st) == 0, "reopen: %s", blip_err_last());
  if (st) {
    const blip_st_tensor *t = blip_st_find(st, "v");
    CHECK(t && t->numel == 3 && !memcmp(t->data, v, 12), "round trip data");
    CHECK(blip_st_meta(st, "format") && !strcmp(blip_st_meta(st, "format"), "pt"), "round trip metadata");
    blip_st_close(st);
  }
  /* Half-precision conversions. */
  CHECK(blip_f16_to_f32(0x3c00) == 1.0f && blip_f16_to_f32(0xc000) == -2.0f && blip_f16_to_f32(0x0001) == 5.9604645e-8f,
        "f16 decode");
  int f16_bad = 0; /* every finite half survives f16 -> f32 -> f16 */
  for (uint32_t h = 0; h < 0x10000; h++)
    if ((h & 0x7c00) != 0x7c00 && blip_f32_to_f16(blip_f16_to_f32((uint16_t)h)) != h) f16_bad++;
  CHECK(f16_bad == 0, "f16 round trip: %d halves changed", f16_bad);
  CHECK(blip_f32_to_f16(1.0f + 1.0f / 2048) == 0x3c00 && blip_f32_to_f16(1.0f + 3.0f / 2048) == 0x3c02 &&
        blip_f32_to_f16(70000.0f) == 0x7c00 && blip_f32_to_f16(-5.9604645e-8f) == 0x8001,
        "f16 round to nearest even, overflow, subnormal");
  CHECK(blip_bf16_to_f32(0x3f80) == 1.0f && blip_f32_to_bf16(1.00390625f) == 0x3f80 && blip_f32_to_bf16(1.01171875f) == 0x3f82,
        "bf16 round to nearest even");
}

static void test_model_files(void) {
  copy_fixture("blip-tiny/config.json");
  copy_fixture("blip-tiny/vocab.txt");
  /* Truncated weights: cut the real file in half. */
  size_t n;
  char *b = slurp(test_data("blip-tiny/model.safetensors"), &n);
  put_file("model.safetensors", b, n / 2);
  expect_fail("truncated weights", BLIP_EFORMAT, "file truncated?");
  put_file("model.safetensors", b, 6);
  expect_fail("weights shorter than 8 bytes", BLIP_EFORMAT, "shorter than the 8-byte");
  free(b);
  write_variant("text_encoder.encoder.layer.1.crossattention.self.value.weight", NULL, BLIP_DT_F32);
  expect_fail("missing tensor", BLIP_EMISSING, "crossattention.self.value.weight");
  write_variant(NULL, "vision_model.encoder.layers.0.mlp.fc1.weight", BLIP_DT_F32);
  expect_fail("wrong shape", BLIP_ESHAPE, "mlp.fc1.weight' has shape [1024,2]");
  write_variant(NULL, NULL, BLIP_DT_I32);
  expect_fail("wrong dtype", BLIP_ESHAPE, "dtype I32");
  write_variant(NULL, NULL, BLIP_DT_F32); /* a good file again, with an extra unknown tensor */
  blip_model *m = NULL;
  CHECK(blip_model_load(g_dir, NULL, &m) == 0, "rewritten good model with an unknown tensor loads: %s", blip_err_last());
  blip_model_free(m);
  /* config.json defects */
  size_t cn;
  char *cfg = slurp(test_data("blip-tiny/config.json"), &cn);
  put_file("config.json", cfg, cn / 2);
  expect_fail("malformed config JSON", BLIP_EFORMAT, "config.json");
  /* Same-length edits of the first occurrence (the text section comes first). */
  static const struct { const char *from, *to, *what; int code; const char *needle; } edits[] = {
    {"\"num_attention_heads\": 4", "\"num_attention_heads\": 5", "heads do not divide hidden", BLIP_EFORMAT, "not divisible"},
    {"\"hidden_size\": 32", "\"hidden_size\": \"\"", "config size of the wrong type", BLIP_EFORMAT, "hidden_size is not an integer"},
    /* an absent key takes transformers' default (text hidden 768), which these weights contradict */
    {"\"hidden_size\": 32", "\"hidden_sizX\": 32", "config key absent -> HF default", BLIP_ESHAPE, "the config implies [30524,768]"},
    {"\"hidden_act\": \"gelu\"", "\"hidden_act\": \"relu\"", "unsupported activation", BLIP_EUNSUPPORTED, "hidden_act"},
  };
  for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
    char *bad = strdup(cfg), *p = strstr(bad, edits[i].from);
    memcpy(p, edits[i].to, strlen(edits[i].to));
    put_file("config.json", bad, cn);
    expect_fail(edits[i].what, edits[i].code, edits[i].needle);
    free(bad);
  }
  put_file("config.json", cfg, cn);
  free(cfg);
  /* vocab.txt without [SEP] (line 103 blanked out). */
  size_t vn;
  char *voc = slurp(test_data("blip-tiny/vocab.txt"), &vn), *sep = strstr(voc, "\n[SEP]\n");
  memcpy(sep + 1, "[SEQ]", 5);
  put_file("vocab.txt", voc, vn);
  expect_fail("vocab missing [SEP]", BLIP_EFORMAT, "[SEP]");
  free(voc);
  put_file("vocab.txt", "", 0);
  expect_fail("empty vocab", BLIP_EFORMAT, "vocab");
  copy_fixture("blip-tiny/vocab.txt");
  /* Missing files. */
  char path[512];
  snprintf(path, sizeof path, "%s/model.safetensors", g_dir);
  unlink(path);
  expect_fail("no weights file", BLIP_EMISSING, "model.safetensors");
  snprintf(path, sizeof path, "%s/config.json", g_dir);
  unlink(path);
  expect_fail("no config", BLIP_EMISSING, "config.json");
}

int main(void) {
  snprintf(g_dir, sizeof g_dir, "/tmp/blip-test-loader-XXXXXX");
  if (!mkdtemp(g_dir)) return 2;
  test_safetensors_parser();
  test_model_files();
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
  if (system(cmd)) return 2;
  return check_summary();
}
