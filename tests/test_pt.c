/* test_pt: PyTorch checkpoints (torch.save zip) through the restricted
 * unpickler. The fixtures' pytorch_model.bin give tensors and model outputs
 * bit-identical to their safetensors (retrieval and captioner); hand-written
 * pickles check views with offsets and strides, shared storages,
 * _rebuild_parameter and the OrderedDict state, and that anything a state
 * dict never uses (os.system, builtins.eval, unknown opcodes, views outside
 * their storage, sizes that disagree with the archive) is refused. */
#include "blip_cap.h"
#include "blip_err.h"
#include "blip_model.h"
#include "blip_pt.h"
#include "blip_st.h"
#include "check.h"
#include "golden.h"

#include <stdint.h>
#include <unistd.h>
#include <zip.h>

/* ---------- fixtures: bit-identical to safetensors ---------- */

static void same_tensors(const char *dir) {
  char a[512], b[512];
  snprintf(a, sizeof a, "%s/model.safetensors", test_data(dir));
  snprintf(b, sizeof b, "%s/pytorch_model.bin", test_data(dir));
  blip_st *st = NULL, *pt = NULL;
  CHECK_OK(blip_st_open(a, &st));
  CHECK_OK(blip_pt_open_weights(b, &pt));
  int same = 1;
  for (int i = 0; i < blip_st_count(st); i++) {
    const blip_st_tensor *x = blip_st_at(st, i), *y = blip_st_find(pt, x->name);
    int ok = y && y->dtype == x->dtype && y->ndim == x->ndim && y->nbytes == x->nbytes && !memcmp(x->shape, y->shape, sizeof x->shape) &&
             !memcmp(x->data, y->data, x->nbytes);
    if (!ok) fprintf(stderr, "  %s: %s differs\n", dir, x->name);
    same &= ok;
  }
  printf("  %s: %d tensors of model.safetensors, %d in pytorch_model.bin\n", dir, blip_st_count(st), blip_st_count(pt));
  CHECK(same, "%s: pytorch_model.bin tensors equal the safetensors bit for bit", dir);
  blip_st_close(st);
  blip_st_close(pt);
}

static blip_model *load(const char *dir, const char *file) {
  char w[512];
  snprintf(w, sizeof w, "%s/%s", test_data(dir), file);
  blip_model_opts o = {.precision = BLIP_PREC_F32, .weights = w};
  blip_model *m = NULL;
  if (blip_model_load(test_data(dir), &o, &m)) fprintf(stderr, "load %s: %s\n", w, blip_err_last());
  return m;
}

static void same_retrieval(void) {
  blip_st *g = NULL;
  CHECK_OK(blip_st_open(test_data("blip-tiny/golden.safetensors"), &g));
  blip_model *ms = load("blip-tiny", "model.safetensors"), *mp = load("blip-tiny", "pytorch_model.bin");
  CHECK(ms && mp, "both load");
  if (!ms || !mp) return;
  CHECK(!strcmp(blip_model_fingerprint(ms), blip_model_fingerprint(mp)), "retrieval fingerprints");
  const blip_cfg *c = blip_model_cfg(ms);
  const int T = c->v_tokens, D = c->v_hidden, E = c->embed_dim;
  float *e1 = malloc(sizeof(float) * 4 * T * D), *e2 = malloc(sizeof(float) * 4 * T * D), f1[4 * 256], f2[4 * 256], l1[8], l2[8];
  const float *px = golden_f32(g, "pixel_values", 4 * 3 * 32 * 32);
  CHECK_OK(blip_model_vision(ms, px, 4, e1, f1));
  CHECK_OK(blip_model_vision(mp, px, 4, e2, f2));
  CHECK(!memcmp(e1, e2, sizeof(float) * 4 * T * D) && !memcmp(f1, f2, sizeof(float) * 4 * E), "retrieval vision bit-identical");
  int32_t ids[6] = {101, 1037, 3899, 2006, 1037, 102};
  const float *imgs[4] = {e1, e1 + T * D, e1 + 2 * T * D, e1 + 3 * T * D};
  CHECK_OK(blip_model_itm(ms, ids, 6, imgs, 4, BLIP_ITM_ENC, 1, l1, NULL));
  CHECK_OK(blip_model_itm(mp, ids, 6, imgs, 4, BLIP_ITM_ENC, 1, l2, NULL));
  CHECK(!memcmp(l1, l2, sizeof l1), "retrieval ITM bit-identical");
  blip_model_free(ms), blip_model_free(mp);
  free(e1), free(e2);
  blip_st_close(g);
}

static void same_captioner(void) {
  blip_st *g = NULL;
  CHECK_OK(blip_st_open(test_data("blip-caption-tiny/golden.safetensors"), &g));
  blip_model *ms = load("blip-caption-tiny", "model.safetensors"), *mp = load("blip-caption-tiny", "pytorch_model.bin");
  CHECK(ms && mp, "both load");
  if (!ms || !mp) return;
  const blip_cfg *c = blip_model_cfg(ms);
  CHECK(blip_model_cfg(mp)->captioner, "captioner from pytorch_model.bin");
  /* same weights, same identity (an index's captions stay valid across the two formats) */
  CHECK(!strcmp(blip_model_fingerprint(ms), blip_model_fingerprint(mp)), "fingerprints %s %s", blip_model_fingerprint(ms),
        blip_model_fingerprint(mp));
  const int T = c->v_tokens, D = c->v_hidden;
  float *e1 = malloc(sizeof(float) * 3 * T * D), *e2 = malloc(sizeof(float) * 3 * T * D);
  const float *px = golden_f32(g, "pixel_values", 3 * 3 * 32 * 32);
  CHECK_OK(blip_model_vision(ms, px, 3, e1, NULL));
  CHECK_OK(blip_model_vision(mp, px, 3, e2, NULL));
  CHECK(!memcmp(e1, e2, sizeof(float) * 3 * T * D), "captioner vision bit-identical");
  blip_cap_opts o;
  blip_cap_defaults(ms, &o);
  o.num_beams = 3, o.min_length = 5, o.prompt = "a picture of";
  blip_cap_result r1[3], r2[3];
  CHECK_OK(blip_cap_generate(ms, e1, 3, &o, r1));
  CHECK_OK(blip_cap_generate(mp, e2, 3, &o, r2));
  for (int i = 0; i < 3; i++)
    CHECK(r1[i].n == r2[i].n && !memcmp(r1[i].ids, r2[i].ids, r1[i].n * sizeof(int32_t)) && r1[i].score == r2[i].score,
          "caption %d bit-identical", i);
  blip_cap_result_free(r1, 3), blip_cap_result_free(r2, 3);
  blip_model_free(ms), blip_model_free(mp);
  free(e1), free(e2);
  blip_st_close(g);
}

/* ---------- hand-written pickles ---------- */

typedef struct {
  uint8_t b[8192];
  size_t n;
} pk;

static void raw(pk *p, const void *s, size_t n) {
  memcpy(p->b + p->n, s, n);
  p->n += n;
}
static void op(pk *p, uint8_t o) { p->b[p->n++] = o; }
static void str(pk *p, const char *s) {
  uint32_t n = (uint32_t)strlen(s);
  op(p, 'X');
  raw(p, &n, 4);
  raw(p, s, n);
}
static void num(pk *p, int32_t v) {
  op(p, 'J');
  raw(p, &v, 4);
}
static void glob(pk *p, const char *mod, const char *name) {
  op(p, 'c');
  raw(p, mod, strlen(mod));
  op(p, '\n');
  raw(p, name, strlen(name));
  op(p, '\n');
}
static void odict(pk *p) {
  glob(p, "collections", "OrderedDict");
  op(p, ')');
  op(p, 'R');
}
/* name -> _rebuild_tensor_v2(storage key (numel floats), off, shape, stride, False, OrderedDict()) */
static void tensor(pk *p, const char *name, const char *key, int numel, int off, int nd, const int *shape, const int *stride,
                   int param) {
  str(p, name);
  if (param) glob(p, "torch._utils", "_rebuild_parameter");
  glob(p, "torch._utils", "_rebuild_tensor_v2");
  op(p, '(');
  op(p, '(');
  str(p, "storage");
  glob(p, "torch", "FloatStorage");
  str(p, key);
  str(p, "cpu");
  num(p, numel);
  op(p, 't');
  op(p, 'Q');
  num(p, off);
  op(p, '(');
  for (int d = 0; d < nd; d++) num(p, shape[d]);
  op(p, 't');
  op(p, '(');
  for (int d = 0; d < nd; d++) num(p, stride[d]);
  op(p, 't');
  op(p, 0x89);
  odict(p);
  op(p, 't');
  op(p, 'R');
  if (param) { /* _rebuild_parameter(tensor, True, OrderedDict()) */
    op(p, 0x88);
    odict(p);
    op(p, 0x87);
    op(p, 'R');
  }
}

static char g_zip[256];

/* archive/data.pkl = pickle, archive/data/0 = storage bytes */
static void write_zip(const pk *p, const void *sto, size_t sto_len) {
  int err = 0;
  zip_t *z = zip_open(g_zip, ZIP_CREATE | ZIP_TRUNCATE, &err);
  zip_source_t *s1 = zip_source_buffer(z, p->b, p->n, 0), *s2 = zip_source_buffer(z, sto, sto_len, 0);
  zip_int64_t i1 = zip_file_add(z, "archive/data.pkl", s1, ZIP_FL_OVERWRITE), i2 = zip_file_add(z, "archive/data/0", s2, ZIP_FL_OVERWRITE);
  zip_set_file_compression(z, (zip_uint64_t)i1, ZIP_CM_STORE, 0);
  zip_set_file_compression(z, (zip_uint64_t)i2, ZIP_CM_DEFLATE, 0); /* readers must not care */
  if (zip_close(z)) fprintf(stderr, "zip_close failed\n");
}

static const float k_sto[6] = {0, 1, 2, 3, 4, 5};

static int try_pickle(const pk *p, size_t sto_len, blip_st **out) {
  write_zip(p, k_sto, sto_len);
  return blip_pt_load(g_zip, out);
}

static void test_views(void) {
  pk p = {.n = 0};
  op(&p, 0x80), op(&p, 2);
  odict(&p);
  op(&p, '(');
  int s2[2] = {2, 2}, t2[2] = {1, 2}, s1[1] = {6}, c1[1] = {1}, s3[1] = {2}, c3[1] = {3};
  tensor(&p, "transposed", "0", 6, 1, 2, s2, t2, 0); /* [[1,3],[2,4]] */
  tensor(&p, "all", "0", 6, 0, 1, s1, c1, 0);        /* shares the storage */
  tensor(&p, "param", "0", 6, 2, 1, s3, c3, 1);      /* [2,5] through _rebuild_parameter */
  str(&p, "not_a_tensor"), num(&p, 7);               /* skipped */
  op(&p, 'u');
  op(&p, '}'), str(&p, "_metadata"), odict(&p), op(&p, 's'), op(&p, 'b'); /* OrderedDict state */
  op(&p, '.');
  blip_st *st = NULL;
  CHECK_OK(try_pickle(&p, sizeof k_sto, &st));
  const blip_st_tensor *a = blip_st_find(st, "transposed"), *b = blip_st_find(st, "all"), *c = blip_st_find(st, "param");
  CHECK(blip_st_count(st) == 3 && a && b && c, "three tensors");
  if (a && b && c) {
    float fa[4], fb[6], fc[2];
    blip_st_to_f32(a, fa, 4), blip_st_to_f32(b, fb, 6), blip_st_to_f32(c, fc, 2);
    CHECK(a->shape[0] == 2 && a->shape[1] == 2 && fa[0] == 1 && fa[1] == 3 && fa[2] == 2 && fa[3] == 4, "strided view");
    CHECK(!memcmp(fb, k_sto, sizeof fb), "shared storage, whole");
    CHECK(fc[0] == 2 && fc[1] == 5, "parameter view with offset and stride");
  }
  blip_st_close(st);
}

static void refused(const char *what, const pk *p, size_t sto_len, int want, const char *needle) {
  blip_st *st = NULL;
  int rc = try_pickle(p, sto_len, &st);
  CHECK(rc == want && strstr(blip_err_last(), needle), "%s: rc %d (want %d), '%s'", what, rc, want, blip_err_last());
  printf("  refused %-28s -> %s\n", what, blip_err_last());
  blip_st_close(st);
}

static void test_refusals(void) {
  pk p = {.n = 0};
  /* pickle.dumps of os.system("touch X") as an object's __reduce__ would write it */
  const char *marker = "/tmp/blip-test-pt-pwned";
  unlink(marker);
  op(&p, 0x80), op(&p, 2), glob(&p, "os", "system"), op(&p, 'q'), op(&p, 0);
  str(&p, "touch /tmp/blip-test-pt-pwned"), op(&p, 0x85), op(&p, 'R'), op(&p, '.');
  refused("os.system", &p, sizeof k_sto, BLIP_EUNSUPPORTED, "os.system");
  CHECK(access(marker, F_OK) != 0, "nothing was executed");
  /* protocol 4: STACK_GLOBAL builtins.eval */
  p.n = 0;
  op(&p, 0x80), op(&p, 4), op(&p, 0x8c), op(&p, 8), raw(&p, "builtins", 8), op(&p, 0x8c), op(&p, 4), raw(&p, "eval", 4), op(&p, 0x93);
  str(&p, "1"), op(&p, 0x85), op(&p, 'R'), op(&p, '.');
  refused("builtins.eval (STACK_GLOBAL)", &p, sizeof k_sto, BLIP_EUNSUPPORTED, "builtins.eval");
  /* INST (protocol 0 object creation) */
  p.n = 0;
  op(&p, '('), raw(&p, "ios\nsystem\n", 11), op(&p, '.');
  refused("INST opcode", &p, sizeof k_sto, BLIP_EUNSUPPORTED, "opcode 0x69");
  int s1[1] = {6}, c1[1] = {1}, s7[1] = {7}, s0[1] = {3}, z0[1] = {0};
  /* a view past the end of its storage */
  p.n = 0;
  op(&p, 0x80), op(&p, 2), odict(&p), op(&p, '('), tensor(&p, "x", "0", 6, 0, 1, s7, c1, 0), op(&p, 'u'), op(&p, '.');
  refused("view outside its storage", &p, sizeof k_sto, BLIP_EFORMAT, "reaches element");
  /* a stride-0 view repeating one element */
  p.n = 0;
  op(&p, 0x80), op(&p, 2), odict(&p), op(&p, '('), tensor(&p, "x", "0", 6, 0, 1, s0, z0, 0), op(&p, 'u'), op(&p, '.');
  refused("overlapping view", &p, sizeof k_sto, BLIP_EFORMAT, "overlaps");
  /* storage bytes that disagree with the pickle */
  p.n = 0;
  op(&p, 0x80), op(&p, 2), odict(&p), op(&p, '('), tensor(&p, "x", "0", 6, 0, 1, s1, c1, 0), op(&p, 'u'), op(&p, '.');
  refused("short storage entry", &p, sizeof k_sto - 4, BLIP_EFORMAT, "holds 20 bytes");
  /* truncated pickle, no STOP */
  p.n -= 1;
  refused("pickle without STOP", &p, sizeof k_sto, BLIP_EFORMAT, "no STOP");
  /* a list at the top, not a dict */
  p.n = 0;
  op(&p, 0x80), op(&p, 2), op(&p, ']'), op(&p, '.');
  refused("not a state dict", &p, sizeof k_sto, BLIP_EFORMAT, "not a state dict");
  /* not a zip at all; the legacy format */
  FILE *f = fopen(g_zip, "wb");
  fwrite("\x80\x02\x8a\x0alegacy", 1, 10, f);
  fclose(f);
  blip_st *st = NULL;
  CHECK(blip_pt_open_weights(g_zip, &st) == BLIP_EUNSUPPORTED && strstr(blip_err_last(), "legacy"), "legacy format: %s", blip_err_last());
  CHECK(blip_pt_load(g_zip, &st) == BLIP_EFORMAT, "not a zip: %s", blip_err_last());
}

int main(void) {
  snprintf(g_zip, sizeof g_zip, "/tmp/blip-test-pt-%d.zip", (int)getpid());
  same_tensors("blip-tiny");
  same_tensors("blip-caption-tiny");
  same_retrieval();
  same_captioner();
  test_views();
  test_refusals();
  unlink(g_zip);
  return check_summary();
}
