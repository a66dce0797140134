/* test_kern: every kernel against a naive double-precision C reference on
 * odd shapes (not multiples of any vector width), plus the scalar
 * approximations (exp, erf) against libm over their whole useful range. */
#include "blip_err.h"
#include "blip_kern.h"
#include "check.h"

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

static uint64_t g_rng = 12345;
static float frand(void) { /* uniform [-1, 1) */
  g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((g_rng >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static float *rnd(long n, float s) {
  float *p = malloc((size_t)n * sizeof *p);
  for (long i = 0; i < n; i++) p[i] = frand() * s;
  return p;
}

static void test_scalar_fns(void) {
  double we = 0, wr = 0;
  for (float x = -80.0f; x < 80.0f; x += 0.00731f) {
    double e = fabs((double)blip_k_expf(x) / exp((double)x) - 1.0);
    if (e > we) we = e;
  }
  for (float x = -6.0f; x < 6.0f; x += 0.000913f) {
    double e = fabs((double)blip_k_erff(x) - erf((double)x));
    if (e > wr) wr = e;
  }
  printf("  expf max rel err %.3g, erff max abs err %.3g\n", we, wr);
  CHECK(we < 5e-7, "expf rel err %g", we);
  CHECK(wr < 5e-7, "erff abs err %g", wr);
  CHECK(blip_k_expf(-1000.0f) >= 0.0f && blip_k_expf(-1000.0f) < 1e-37f, "exp underflow");
}

static void test_gemm(int M, int N, int K, int ta, int tb) {
  float *A = rnd((long)M * K, 1), *B = rnd((long)K * N, 1), *C = rnd((long)M * N, 1), *R = malloc(sizeof(float) * M * N);
  const float alpha = 0.7f, beta = 0.3f;
  int lda = ta ? M : K, ldb = tb ? K : N;
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double s = 0;
      for (int k = 0; k < K; k++) s += (double)(ta ? A[k * lda + i] : A[i * lda + k]) * (tb ? B[j * ldb + k] : B[k * ldb + j]);
      R[i * N + j] = (float)(alpha * s + beta * C[i * N + j]);
    }
  char label[64];
  snprintf(label, sizeof label, "gemm %dx%dx%d t%d%d", M, N, K, ta, tb);
  if (blip_k_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, N) != 0) CHECK(0, "%s: %s", label, blip_err_last());
  check_tensor(label, C, R, (long)M * N, 1e-4 * sqrt(K));
  free(A), free(B), free(C), free(R);
}

static void test_linear(int M, int in, int out, int bias) {
  float *x = rnd((long)M * in, 1), *w = rnd((long)out * in, 0.2f), *b = bias ? rnd(out, 1) : NULL;
  float *y = malloc(sizeof(float) * M * out), *r = malloc(sizeof(float) * M * out);
  blip_k_linear l = {.in = in, .out = out, .w = w, .b = b};
  for (int i = 0; i < M; i++)
    for (int o = 0; o < out; o++) {
      double s = b ? b[o] : 0;
      for (int k = 0; k < in; k++) s += (double)x[i * in + k] * w[o * in + k];
      r[i * out + o] = (float)s;
    }
  CHECK(blip_k_linear_fwd(y, x, &l, M) == 0, "linear: %s", blip_err_last());
  char label[64];
  snprintf(label, sizeof label, "linear %dx%d->%d%s", M, in, out, bias ? "+b" : "");
  check_tensor(label, y, r, (long)M * out, 1e-5);
  free(x), free(w), free(b), free(y), free(r);
}

static double gelu_d(double v) { return 0.5 * v * (1.0 + erf(v / sqrt(2.0))); }
static float bf16_round(float f) { /* round to nearest even, independently of the kernel's bit trick */
  if (f == 0.0f) return f;
  int e;
  double m = frexp(f, &e); /* f = m 2^e, 0.5 <= |m| < 1: keep 8 significant bits */
  return (float)ldexp(nearbyint(ldexp(m, 8)), e - 8);
}

/* A bf16 result against an f32 reference: each error in units of the
 * bound |ref| 2^-8 (half a bf16 ulp, the rounding) + tol (the rest). */
static void check_bf16(const char *label, const uint16_t *got, const float *ref, long n, double tol) {
  float *e = malloc(sizeof(float) * n), *zero = calloc(n, sizeof(float));
  for (long i = 0; i < n; i++) {
    uint32_t u = (uint32_t)got[i] << 16;
    float g;
    memcpy(&g, &u, 4);
    e[i] = (float)((g - (double)ref[i]) / (fabs(ref[i]) * (1.0 / 256) + tol));
  }
  check_tensor(label, e, zero, n, 1.0);
  free(e), free(zero);
}

/* Packed linear layer in each precision, with the fused flags, against a
 * double reference computed on the same rounded/quantized operands:
 * f32 exact inputs; bf16 inputs and weights rounded to bf16; int8 the
 * weights and rows quantized by the (separately tested) quantizers. */
static void test_packed(blip_k_prec prec, int M, int in, int out, int flags, int bias, int parts) {
  float *x = rnd((long)M * in, 2), *w = rnd((long)out * in, 0.3f), *b = rnd(out, 1);
  if (!bias) memset(b, 0, sizeof(float) * out); /* the reference adds zeros; the layer gets NULL */
  float *y = rnd((long)M * out, 1), *r = malloc(sizeof(float) * M * out);
  double *xd = malloc(sizeof(double) * M * in), *wd = malloc(sizeof(double) * out * in);
  for (int i = 0; i < M; i++) x[(long)i * in + i % in] += 4.0f; /* a positive outlier per row */
  if (prec == BLIP_K_INT8) {
    int8_t *qw = malloc((size_t)out * in);
    uint8_t *qx = malloc((size_t)in);
    float *ws = malloc(sizeof(float) * out), xs;
    int32_t *cs = malloc(sizeof(int32_t) * out), zp;
    blip_k_quant_w(qw, ws, cs, w, out, in);
    for (long i = 0; i < (long)out * in; i++) wd[i] = (double)qw[i] * ws[i / in];
    for (int i = 0; i < M; i++) {
      blip_k_quant_row(qx, &xs, &zp, x + (long)i * in, in);
      for (int k = 0; k < in; k++) xd[(long)i * in + k] = ((double)qx[k] - zp) * xs;
    }
    free(qw), free(qx), free(ws), free(cs);
  } else {
    for (long i = 0; i < (long)M * in; i++) xd[i] = prec == BLIP_K_BF16 ? bf16_round(x[i]) : x[i];
    for (long i = 0; i < (long)out * in; i++) wd[i] = prec == BLIP_K_BF16 ? bf16_round(w[i]) : w[i];
  }
  for (int i = 0; i < M; i++)
    for (int o = 0; o < out; o++) {
      double s = b[o];
      for (int k = 0; k < in; k++) s += xd[(long)i * in + k] * wd[(long)o * in + k];
      if (flags & BLIP_K_GELU) s = gelu_d(s);
      r[(long)i * out + o] = (float)((flags & BLIP_K_ACCUM) ? y[(long)i * out + o] + s : s);
    }
  blip_k_ws ws = {0};
  blip_k_linear l = {.in = in, .out = out, .w = w, .b = bias ? b : NULL};
  CHECK(blip_k_linear_pack_parts(&l, prec, &ws, parts) == 0, "pack: %s", blip_err_last());
  for (int rep = 0; rep < 2; rep++) { /* the second call reuses the cached primitive */
    float *yy = malloc(sizeof(float) * M * out);
    memcpy(yy, y, sizeof(float) * M * out);
    CHECK(blip_k_linear_fwd_ex(yy, x, &l, M, flags) == 0, "packed fwd: %s", blip_err_last());
    char label[80];
    snprintf(label, sizeof label, "packed %s %dx%d->%d%s%s%s parts %d #%d", prec == BLIP_K_F32 ? "f32" : prec == BLIP_K_BF16 ? "bf16" : "int8",
             M, in, out, bias ? "+b" : "", flags & BLIP_K_GELU ? " gelu" : "", flags & BLIP_K_ACCUM ? " accum" : "", parts, rep);
    /* f32 accumulation of in terms; the quantized paths are exact on their operands up to f32 rounding */
    check_tensor(label, yy, r, (long)M * out, 1e-5 * sqrt(in));
    free(yy);
  }
  CHECK(blip_k_linear_packed_bytes(&l) >= (size_t)out * in * (prec == BLIP_K_F32 ? 4 : prec == BLIP_K_BF16 ? 2 : 1), "packed size");
  blip_k_linear_unpack(&l);
  CHECK(l.packed == NULL, "unpack");
  blip_k_ws_free(&ws);
  free(x), free(w), free(b), free(y), free(r), free(xd), free(wd);
}

/* The bf16 hand-over flags against the f32-in/f32-out path of the same
 * layer (tested above): BLIP_K_IN_BF16 gives the same result as f32 input
 * (the layer rounds its input to bf16 anyway), BLIP_K_OUT_BF16 its rounding
 * (bf16 and int8 layers). Unsupported combinations fail cleanly. */
static void test_packed_bf16io(blip_k_prec prec, int M, int in, int out, int flags) {
  float *x = rnd((long)M * in, 2), *w = rnd((long)out * in, 0.3f), *b = rnd(out, 1), *ref = malloc(sizeof(float) * M * out);
  float *y = malloc(sizeof(float) * M * out);
  uint16_t *x16 = malloc(2 * (size_t)M * in), *y16 = malloc(2 * (size_t)M * out);
  blip_k_ws ws = {0};
  blip_k_linear l = {.in = in, .out = out, .w = w, .b = b};
  CHECK(blip_k_linear_pack(&l, prec, &ws) == 0, "pack: %s", blip_err_last());
  CHECK(blip_k_linear_fwd_ex(ref, x, &l, M, flags) == 0, "f32 io: %s", blip_err_last());
  blip_k_to_bf16(x16, x, (long)M * in);
  char label[80];
  const char *pn = prec == BLIP_K_BF16 ? "bf16" : "int8";
  if (prec == BLIP_K_BF16) {
    CHECK(blip_k_linear_fwd_ex(y, x16, &l, M, flags | BLIP_K_IN_BF16) == 0, "bf16 in: %s", blip_err_last());
    snprintf(label, sizeof label, "packed %s %dx%d->%d bf16 in", pn, M, in, out);
    check_tensor(label, y, ref, (long)M * out, 1e-6);
    CHECK(blip_k_linear_fwd_ex(y16, x16, &l, M, flags | BLIP_K_IN_BF16 | BLIP_K_OUT_BF16) == 0, "bf16 in+out: %s", blip_err_last());
    snprintf(label, sizeof label, "packed %s %dx%d->%d bf16 in+out", pn, M, in, out);
    check_bf16(label, y16, ref, (long)M * out, 1e-6);
  } else {
    CHECK(blip_k_linear_fwd_ex(y, x16, &l, M, BLIP_K_IN_BF16) != 0, "int8 layer accepted bf16 input");
  }
  CHECK(blip_k_linear_fwd_ex(y16, x, &l, M, flags | BLIP_K_OUT_BF16) == 0, "bf16 out: %s", blip_err_last());
  snprintf(label, sizeof label, "packed %s %dx%d->%d%s bf16 out", pn, M, in, out, flags & BLIP_K_GELU ? " gelu" : "");
  check_bf16(label, y16, ref, (long)M * out, 1e-6);
  CHECK(blip_k_linear_fwd_ex(y16, x, &l, M, BLIP_K_OUT_BF16 | BLIP_K_ACCUM) != 0, "bf16 output with ACCUM accepted");
  blip_k_linear_unpack(&l);
  blip_k_ws_free(&ws);
  blip_k_linear f = {.in = in, .out = out, .w = w, .b = b}; /* plain f32: no bf16 either way */
  CHECK(blip_k_linear_fwd_ex(y, x16, &f, M, BLIP_K_IN_BF16) != 0 && blip_k_linear_fwd_ex(y16, x, &f, M, BLIP_K_OUT_BF16) != 0,
        "f32 layer accepted bf16");
  free(x), free(w), free(b), free(ref), free(y), free(x16), free(y16);
}

/* blip_k_gemm_bf16 against a double reference on the bf16-rounded
 * operands (padded leading dimensions, both B orders, cached rerun). */
static void test_gemm_bf16(int M, int N, int K, int tb) {
  int lda = K + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
  float *A = rnd((long)M * lda, 1), *B = rnd((long)(tb ? N : K) * ldb, 1), *C = malloc(sizeof(float) * M * ldc), *R = malloc(sizeof(float) * M * ldc);
  uint16_t *A16 = malloc(2 * (size_t)M * lda), *B16 = malloc(2 * (size_t)(tb ? N : K) * ldb);
  blip_k_to_bf16(A16, A, (long)M * lda);
  blip_k_to_bf16(B16, B, (long)(tb ? N : K) * ldb);
  for (long i = 0; i < (long)M * ldc; i++) C[i] = R[i] = 7.0f; /* padding must stay untouched */
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double acc = 0;
      for (int k = 0; k < K; k++) acc += (double)bf16_round(A[i * lda + k]) * bf16_round(tb ? B[j * ldb + k] : B[k * ldb + j]);
      R[i * ldc + j] = (float)acc;
    }
  blip_k_ws ws = {0};
  for (int rep = 0; rep < 2; rep++) CHECK(blip_k_gemm_bf16(tb, M, N, K, A16, lda, B16, ldb, C, ldc, &ws) == 0, "gemm_bf16: %s", blip_err_last());
  blip_k_ws_free(&ws);
  char label[64];
  snprintf(label, sizeof label, "gemm_bf16 %dx%dx%d tb%d", M, N, K, tb);
  check_tensor(label, C, R, (long)M * ldc, 1e-5 * sqrt(K));
  free(A), free(B), free(C), free(R), free(A16), free(B16);
}

/* blip_k_mlp against the two separate fused calls it replaces, also with
 * h == x (the text encoder's use) and more rows than one chunk. */
static void test_mlp(blip_k_prec prec, int M, int D, int F, int parts) {
  float *w1 = rnd((long)F * D, 0.3f), *b1 = rnd(F, 0.5f), *w2 = rnd((long)D * F, 0.1f), *b2 = rnd(D, 0.5f);
  float *x = rnd((long)M * D, 1), *x2 = malloc(sizeof(float) * M * D), *ref = malloc(sizeof(float) * M * D);
  float *mid = malloc(sizeof(float) * M * F);
  blip_k_ws ws = {0};
  blip_k_linear fc1 = {.in = D, .out = F, .w = w1, .b = b1}, fc2 = {.in = F, .out = D, .w = w2, .b = b2};
  CHECK(blip_k_linear_pack_parts(&fc1, prec, &ws, parts) == 0 && blip_k_linear_pack_parts(&fc2, prec, &ws, parts) == 0, "pack: %s",
        blip_err_last());
  memcpy(ref, x, sizeof(float) * M * D);
  memcpy(x2, x, sizeof(float) * M * D);
  CHECK(blip_k_linear_fwd_ex(mid, x, &fc1, M, BLIP_K_GELU) == 0 && blip_k_linear_fwd_ex(ref, mid, &fc2, M, BLIP_K_ACCUM) == 0,
        "two-step mlp: %s", blip_err_last());
  CHECK(blip_k_mlp(x2, x, 0, &fc1, &fc2, M, mid) == 0, "mlp: %s", blip_err_last());
  char label[64];
  snprintf(label, sizeof label, "mlp %s M=%d %d->%d parts %d", prec == BLIP_K_F32 ? "f32" : prec == BLIP_K_BF16 ? "bf16" : "int8", M, D, F,
           parts);
  check_tensor(label, x2, ref, (long)M * D, 1e-5);
  if (prec == BLIP_K_BF16) { /* h given as bf16: the same as f32 h, which fc1 rounds to bf16 itself */
    uint16_t *h16 = malloc(2 * (size_t)M * D);
    blip_k_to_bf16(h16, x, (long)M * D);
    memcpy(x2, x, sizeof(float) * M * D);
    CHECK(blip_k_mlp(x2, h16, BLIP_K_IN_BF16, &fc1, &fc2, M, mid) == 0, "mlp bf16 h: %s", blip_err_last());
    check_tensor("  ... with h in bf16", x2, ref, (long)M * D, 1e-5);
    free(h16);
  }
  CHECK(blip_k_mlp(x, x, 0, &fc1, &fc2, M, mid) == 0, "mlp in place: %s", blip_err_last());
  check_tensor("  ... with h == x", x, ref, (long)M * D, 1e-5);
  blip_k_linear_unpack(&fc1);
  blip_k_linear_unpack(&fc2);
  blip_k_ws_free(&ws);
  free(w1), free(b1), free(w2), free(b2), free(x), free(x2), free(ref), free(mid);
}

/* The quantizers: reconstruction error within half a step, zero exact,
 * scales from the row/channel range, column sums consistent. */
static void test_quant(void) {
  const int n = 203;
  float *x = rnd(n, 3);
  x[7] = 0.0f;
  uint8_t q[203];
  float s;
  int32_t zp;
  blip_k_quant_row(q, &s, &zp, x, n);
  float lo = 0, hi = 0;
  double worst = 0;
  for (int j = 0; j < n; j++) lo = fminf(lo, x[j]), hi = fmaxf(hi, x[j]);
  for (int j = 0; j < n; j++) worst = fmax(worst, fabs(((double)q[j] - zp) * s - x[j]));
  CHECK(fabsf(s - (hi - lo) / 255.0f) < 1e-7f && q[7] == zp, "row quant scale %g zp %d", s, zp);
  CHECK(worst <= 0.5 * s * 1.0001, "row quant error %g > half step %g", worst, 0.5 * s);
  float pos[5] = {1, 2, 3, 4, 5}, zero[5] = {0};
  blip_k_quant_row(q, &s, &zp, pos, 5);
  CHECK(zp == 0 && q[4] == 255, "all-positive row: zp %d, max code %d", zp, q[4]);
  blip_k_quant_row(q, &s, &zp, zero, 5);
  CHECK(s == 1.0f && q[0] == zp, "zero row");
  int8_t qw[3 * 203];
  float ws[3];
  int32_t cs[3];
  float *w = rnd(3 * n, 0.5f);
  memset(w + 2 * n, 0, n * sizeof(float)); /* a dead output channel */
  blip_k_quant_w(qw, ws, cs, w, 3, n);
  for (int o = 0; o < 3; o++) {
    int32_t sum = 0, amax = 0;
    double err = 0;
    for (int k = 0; k < n; k++) {
      sum += qw[o * n + k];
      amax = abs(qw[o * n + k]) > amax ? abs(qw[o * n + k]) : amax;
      err = fmax(err, fabs(qw[o * n + k] * ws[o] - w[o * n + k]));
    }
    CHECK(sum == cs[o] && (o == 2 ? amax == 0 : amax == 127) && err <= 0.5 * ws[o] * 1.0001, "weight quant channel %d", o);
  }
  free(x), free(w);
}

static void ref_layernorm(float *out, const float *in, const float *g, const float *b, int M, int N, float eps) {
  for (int i = 0; i < M; i++) {
    double mu = 0, var = 0;
    for (int j = 0; j < N; j++) mu += in[i * N + j];
    mu /= N;
    for (int j = 0; j < N; j++) var += (in[i * N + j] - mu) * (in[i * N + j] - mu);
    var /= N;
    for (int j = 0; j < N; j++) out[i * N + j] = (float)((in[i * N + j] - mu) / sqrt(var + eps) * g[j] + b[j]);
  }
}

static void test_layernorm(int M, int N) {
  float *x = rnd((long)M * N, 3), *g = rnd(N, 1), *b = rnd(N, 1), *r = malloc(sizeof(float) * M * N);
  float *y = malloc(sizeof(float) * M * N), *res = rnd((long)M * N, 1), *sum = malloc(sizeof(float) * M * N);
  for (long i = 0; i < (long)M * N; i++) x[i] += 5.0f; /* offset mean: exercises cancellation */
  ref_layernorm(r, x, g, b, M, N, 1e-5f);
  blip_k_layernorm(y, x, g, b, M, N, 1e-5f);
  check_tensor("layernorm", y, r, (long)M * N, 2e-5);
  uint16_t *y16 = malloc(2 * (size_t)M * N);
  blip_k_layernorm_bf16(y16, x, g, b, M, N, 1e-5f);
  check_bf16("layernorm, bf16 out", y16, r, (long)M * N, 2e-5);
  free(y16);
  for (long i = 0; i < (long)M * N; i++) sum[i] = x[i] + res[i];
  ref_layernorm(r, sum, g, b, M, N, 1e-12f);
  blip_k_add_layernorm(x, res, g, b, M, N, 1e-12f);
  check_tensor("add+layernorm (eps 1e-12)", x, r, (long)M * N, 2e-5);
  free(x), free(g), free(b), free(r), free(y), free(res), free(sum);
}

static void test_gelu_softmax(void) {
  long n = 100003;
  float *x = rnd(n, 6), *r = malloc(sizeof(float) * n);
  for (long i = 0; i < n; i++) r[i] = (float)(0.5 * x[i] * (1.0 + erf(x[i] / sqrt(2.0))));
  blip_k_gelu(x, n);
  check_tensor("gelu (erf) vs libm", x, r, n, 2e-6); /* inputs up to 6: ~4 ulp */
  int rows = 37, cols = 577;
  float *s = rnd((long)rows * cols, 20);
  s[5] = -1e4f; /* a masked position */
  for (int i = 0; i < rows; i++) {
    double mx = -1e30, sum = 0;
    for (int j = 0; j < cols; j++) mx = fmax(mx, s[i * cols + j]);
    for (int j = 0; j < cols; j++) sum += exp(s[i * cols + j] - mx);
    for (int j = 0; j < cols; j++) r[i * cols + j] = (float)(exp(s[i * cols + j] - mx) / sum);
  }
  blip_k_softmax(s, rows, cols);
  check_tensor("softmax", s, r, (long)rows * cols, 1e-6);
  float v[3] = {3, 4, 0};
  blip_k_l2norm(v, 1, 3);
  CHECK(fabsf(v[0] - 0.6f) < 1e-7f && fabsf(v[1] - 0.8f) < 1e-7f, "l2norm");
  free(x), free(r), free(s);
}

/* bf16 != 0 tests blip_k_attention_bf16 against the same reference run on
 * bf16-rounded q, k, v and probabilities; bf16 = 2 and 3 test
 * blip_k_attention_bf16in on bf16 operands (strided), f32 or bf16 out. */
static void test_attention(int Lq, int Lk, int H, int dh, int masked, int bf16) {
  int D = H * dh, ld = 3 * D + 5; /* packed, padded stride like the vision qkv */
  float *q = rnd((long)Lq * ld, 1), *kv = rnd((long)Lk * ld, 1), *mask = calloc(Lk, sizeof(float));
  float *out = malloc(sizeof(float) * Lq * D), *r = malloc(sizeof(float) * Lq * D), *sc = malloc(sizeof(double) * Lk * 2);
  double *p = (double *)sc;
  if (masked)
    for (int j = Lk / 2; j < Lk; j++) mask[j] = -10000.0f;
  float scale = 1.0f / sqrtf((float)dh);
  float *qr = malloc(sizeof(float) * Lq * ld), *kvr = malloc(sizeof(float) * Lk * ld);
  for (long i = 0; i < (long)Lq * ld; i++) qr[i] = bf16 ? bf16_round(q[i]) : q[i];
  for (long i = 0; i < (long)Lk * ld; i++) kvr[i] = bf16 ? bf16_round(kv[i]) : kv[i];
  for (int h = 0; h < H; h++)
    for (int i = 0; i < Lq; i++) {
      double mx = -1e300, sum = 0;
      for (int j = 0; j < Lk; j++) {
        double s = 0;
        for (int d = 0; d < dh; d++) s += (double)qr[i * ld + h * dh + d] * kvr[j * ld + D + h * dh + d];
        p[j] = s * scale + mask[j];
        mx = fmax(mx, p[j]);
      }
      for (int j = 0; j < Lk; j++) sum += (p[j] = exp(p[j] - mx));
      for (int j = 0; j < Lk; j++) p[j] = bf16 ? bf16_round((float)(p[j] / sum)) : p[j] / sum;
      for (int d = 0; d < dh; d++) {
        double o = 0;
        for (int j = 0; j < Lk; j++) o += p[j] * kvr[j * ld + 2 * D + h * dh + d];
        r[i * D + h * dh + d] = (float)o;
      }
    }
  blip_k_ws ws = {0};
  uint16_t *q16 = malloc(2 * (size_t)Lq * ld), *kv16 = malloc(2 * (size_t)Lk * ld), *o16 = malloc(2 * (size_t)Lq * D);
  blip_k_to_bf16(q16, q, (long)Lq * ld);
  blip_k_to_bf16(kv16, kv, (long)Lk * ld);
  for (int rep = 0; rep < 1 + (bf16 != 0); rep++) { /* bf16 twice: the second call reuses cached primitives */
    const float *mk = masked ? mask : NULL;
    int rc = bf16 ? blip_k_attention_bf16in(bf16 == 3 ? (void *)o16 : out, D, bf16 == 3, q16, ld, kv16 + D, ld, kv16 + 2 * D, ld, Lq,
                                            Lk, H, dh, scale, mk, &ws)
                  : blip_k_attention(out, D, q, ld, kv + D, ld, kv + 2 * D, ld, Lq, Lk, H, dh, scale, mk, NULL);
    CHECK(rc == 0, "attention: %s", blip_err_last());
  }
  blip_k_ws_free(&ws);
  char label[64];
  snprintf(label, sizeof label, "attention%s Lq%d Lk%d H%d dh%d%s", bf16 == 2 ? " bf16in" : bf16 == 3 ? " bf16in+out" : "",
           Lq, Lk, H, dh, masked ? " masked" : "");
  /* bf16: the reference rounds the same operands, but a probability next to a
   * rounding boundary can round the other way (one bf16 ulp, ~4e-3 relative) */
  if (bf16 == 3) check_bf16(label, o16, r, (long)Lq * D, 1e-3);
  else check_tensor(label, out, r, (long)Lq * D, bf16 ? 1e-3 : 2e-6);
  free(q16), free(kv16), free(o16);
  free(qr), free(kvr);
  free(q), free(kv), free(mask), free(out), free(r), free(sc);
}

/* blip_k_attention_int8 against a naive reference of the same
 * quantization (symmetric s8 for q per row and head, k per key and head, v
 * per head column; probabilities rint(255 exp(s - max)), divided by their
 * sum): only exp's approximation differs, so a probability may move by
 * one u8 step, an output by at most max|v| / sum <= 1/255 (fused 0: the
 * bf16 fallback, not compared with it). And
 * against the f32 attention: the quantization error. */
static void test_attention_int8(int Lq, int Lk, int H, int dh, int fused) {
  const int D = H * dh, ld = 3 * D + 16;
  float *x = rnd((long)(Lq > Lk ? Lq : Lk) * ld, 1), *ref = malloc(sizeof(float) * Lq * D), *f32 = malloc(sizeof(float) * Lq * D);
  float *got = malloc(sizeof(float) * Lq * D), *xr = malloc(sizeof(float) * (Lq > Lk ? Lq : Lk) * ld);
  const long nx = (long)(Lq > Lk ? Lq : Lk) * ld;
  uint16_t *x16 = malloc(2 * (size_t)nx);
  blip_k_to_bf16(x16, x, nx);
  for (long i = 0; i < nx; i++) xr[i] = bf16_round(x[i]);
  const float scale = 1.0f / sqrtf((float)dh);
  int *qq = malloc(sizeof(int) * dh), *kq = malloc(sizeof(int) * Lk * dh), *vq = malloc(sizeof(int) * Lk * dh);
  float *ks = malloc(sizeof(float) * Lk), *vs = malloc(sizeof(float) * dh);
  double *p = malloc(sizeof(double) * Lk);
#define QSCALE(m) ((m) > 0 ? (m) / 127.0f : 1.0f)
  for (int h = 0; h < H; h++) {
    for (int j = 0; j < Lk; j++) {
      float m = 0;
      for (int d = 0; d < dh; d++) m = fmaxf(m, fabsf(xr[(long)j * ld + D + h * dh + d]));
      ks[j] = QSCALE(m);
      for (int d = 0; d < dh; d++) kq[j * dh + d] = (int)rintf(xr[(long)j * ld + D + h * dh + d] * (1.0f / ks[j]));
    }
    for (int d = 0; d < dh; d++) {
      float m = 0;
      for (int j = 0; j < Lk; j++) m = fmaxf(m, fabsf(xr[(long)j * ld + 2 * D + h * dh + d]));
      vs[d] = QSCALE(m);
      for (int j = 0; j < Lk; j++) vq[j * dh + d] = (int)rintf(xr[(long)j * ld + 2 * D + h * dh + d] * (1.0f / vs[d]));
    }
    for (int i = 0; i < Lq; i++) {
      float m = 0;
      for (int d = 0; d < dh; d++) m = fmaxf(m, fabsf(xr[(long)i * ld + h * dh + d]));
      const float qs = QSCALE(m);
      for (int d = 0; d < dh; d++) qq[d] = (int)rintf(xr[(long)i * ld + h * dh + d] * (1.0f / qs));
      double mx = -1e300, sum = 0;
      for (int j = 0; j < Lk; j++) {
        long dot = 0;
        for (int d = 0; d < dh; d++) dot += (long)qq[d] * kq[j * dh + d];
        p[j] = (double)qs * ks[j] * dot * scale;
        mx = fmax(mx, p[j]);
      }
      for (int j = 0; j < Lk; j++) sum += (p[j] = rint(255 * exp(p[j] - mx)));
      for (int d = 0; d < dh; d++) {
        double o = 0;
        for (int j = 0; j < Lk; j++) o += p[j] * vq[j * dh + d];
        ref[(long)i * D + h * dh + d] = (float)(o * vs[d] / sum);
      }
    }
  }
#undef QSCALE
  blip_k_ws ws = {0};
  CHECK(blip_k_attention_int8(got, D, x16, ld, x16 + D, ld, x16 + 2 * D, ld, Lq, Lk, H, dh, scale, &ws) == 0, "int8 attention: %s",
        blip_err_last());
  CHECK(blip_k_attention(f32, D, xr, ld, xr + D, ld, xr + 2 * D, ld, Lq, Lk, H, dh, scale, NULL, NULL) == 0, "attention: %s", blip_err_last());
  blip_k_ws_free(&ws);
  char label[80];
  snprintf(label, sizeof label, "attention int8 Lq%d Lk%d H%d dh%d", Lq, Lk, H, dh);
  if (fused) check_tensor(label, got, ref, (long)Lq * D, 1.0 / 255);
  double num = 0, da = 0, db = 0;
  for (long i = 0; i < (long)Lq * D; i++) num += (double)got[i] * f32[i], da += (double)got[i] * got[i], db += (double)f32[i] * f32[i];
  snprintf(label, sizeof label, "  ... against f32 (cos %.6f)", num / sqrt(da * db));
  check_tensor(label, got, f32, (long)Lq * D, 0.01);
  free(x), free(ref), free(f32), free(got), free(xr), free(x16), free(qq), free(kq), free(vq), free(ks), free(vs), free(p);
}

/* Column parts (blip_k_linear_pack_parts) give the unparted layer's
 * result for every flag and I/O type, called alone (a region of their
 * own) and by teams of 1-3 threads (fewer or more threads than parts);
 * and each part runs one of oneDNN's fast kernels, not its reference
 * (which a strided output once selected: same result, ~100x slower). */
static void test_parts(blip_k_prec prec, int M, int in, int out, int parts) {
  float *x = rnd((long)M * in, 2), *w = rnd((long)out * in, 0.3f), *b = rnd(out, 1), *y0 = rnd((long)M * out, 1);
  float *ref = malloc(sizeof(float) * M * out), *got = malloc(sizeof(float) * M * out);
  uint16_t *x16 = malloc(2 * (size_t)M * in), *r16 = malloc(2 * (size_t)M * out), *g16 = malloc(2 * (size_t)M * out);
  blip_k_to_bf16(x16, x, (long)M * in);
  blip_k_ws ws = {0};
  blip_k_linear whole = {.in = in, .out = out, .w = w, .b = b}, part = whole;
  CHECK(blip_k_linear_pack(&whole, prec, &ws) == 0 && blip_k_linear_pack_parts(&part, prec, &ws, parts) == 0, "pack: %s", blip_err_last());
  const int fl[] = {0, BLIP_K_GELU, BLIP_K_ACCUM, BLIP_K_GELU | BLIP_K_ACCUM, BLIP_K_OUT_BF16, BLIP_K_GELU | BLIP_K_OUT_BF16,
                    BLIP_K_IN_BF16, BLIP_K_IN_BF16 | BLIP_K_OUT_BF16};
  for (int f = 0; f < 8; f++) {
    const int flags = fl[f], o16 = flags & BLIP_K_OUT_BF16, i16 = flags & BLIP_K_IN_BF16;
    if ((o16 && prec == BLIP_K_F32) || (i16 && prec != BLIP_K_BF16)) continue;
    const void *in_ = i16 ? (const void *)x16 : x;
    char label[96];
    snprintf(label, sizeof label, "parts %s M%d %dx%d/%d flags %d", prec == BLIP_K_F32 ? "f32" : prec == BLIP_K_BF16 ? "bf16" : "int8", M, in,
             out, parts, flags);
    memcpy(ref, y0, sizeof(float) * M * out);
    CHECK(blip_k_linear_fwd_ex(o16 ? (void *)r16 : ref, in_, &whole, M, flags) == 0, "%s: whole: %s", label, blip_err_last());
    const char *impl = blip_k_linear_impl(&part, M, flags);
    CHECK(impl && strncmp(impl, "ref", 3) != 0, "%s: oneDNN kernel %s", label, impl ? impl : "(none)");
    for (int nt = 0; nt <= 3; nt++) { /* 0: alone; else a team of nt */
      memcpy(got, y0, sizeof(float) * M * out);
      void *dst = o16 ? (void *)g16 : got;
      int rc = 0;
      if (!nt) {
        rc = blip_k_linear_fwd_ex(dst, in_, &part, M, flags);
      } else {
        blip_k_team t;
        blip_k_team_init(&t);
        rc = blip_k_linear_reserve(&part, M, flags);
#pragma omp parallel num_threads(nt)
        {
          int e = blip_k_team_sync(&t, blip_k_team_linear(&t, dst, in_, &part, M, flags));
#pragma omp master
          rc = rc ? rc : e;
        }
      }
      CHECK(rc == 0, "%s team %d: %s", label, nt, blip_err_last());
      /* parts and whole accumulate in different orders: f32 rounding apart */
      if (o16) {
        int bad = 0;
        for (long i = 0; i < (long)M * out; i++) {
          uint32_t a = (uint32_t)r16[i] << 16, c = (uint32_t)g16[i] << 16;
          float fa, fc;
          memcpy(&fa, &a, 4), memcpy(&fc, &c, 4);
          bad += fabsf(fa - fc) > 8e-3f * (1 + fabsf(fa));
        }
        CHECK(!bad, "%s team %d: %d bf16 outputs differ", label, nt, bad);
      } else {
        check_tensor(label, got, ref, (long)M * out, 2e-5 * sqrt(in));
      }
    }
  }
  CHECK(blip_k_linear_packed_bytes(&part) + (size_t)parts * 4096 >= blip_k_linear_packed_bytes(&whole), "parts' size: %zu vs %zu", blip_k_linear_packed_bytes(&part), blip_k_linear_packed_bytes(&whole));
  blip_k_linear_unpack(&whole);
  blip_k_linear_unpack(&part);
  CHECK(part.packed == NULL, "unpack parts");
  blip_k_ws_free(&ws);
  free(x), free(w), free(b), free(y0), free(ref), free(got), free(x16), free(r16), free(g16);
}

/* The team barrier hands every thread the same result, 0 or an error one
 * thread passed, at every barrier (the error slots alternate), with the
 * failing thread's message; a thread arriving after the spin (sleepers
 * on the futex) still releases the others. */
static void test_team_sync(void) {
  for (int nt = 1; nt <= 3; nt++) {
    blip_k_team t;
    blip_k_team_init(&t);
    int wrong = 0, rc = 0;
#pragma omp parallel num_threads(nt) reduction(+ : wrong)
    {
      const int id = omp_get_thread_num();
      for (int i = 0; i < 2000; i++) {
        const int fail = i % 7 == 3 ? i % nt : -1; /* thread that fails at barrier i */
        if (i % 500 == 1 && id == nt - 1) usleep(3000); /* past the spin: the others sleep */
        int mine = id == fail ? (blip_err_set(BLIP_EIO, "thread %d failed at %d", id, i), BLIP_EIO) : 0;
        int got = blip_k_team_sync(&t, mine);
        wrong += got != (fail >= 0 ? BLIP_EIO : 0);
      }
      int e = blip_k_team_sync(&t, id == nt - 1 ? blip_err_set(BLIP_ENOMEM, "last thread") : 0);
#pragma omp master
      rc = e;
    }
    CHECK(!wrong, "team of %d: %d barriers returned the wrong result", nt, wrong);
    CHECK(rc == BLIP_ENOMEM, "team of %d: final error %d", nt, rc);
    blip_err_set(BLIP_OK, "cleared");
    CHECK(blip_k_team_error(&t, rc) == BLIP_ENOMEM && strstr(blip_err_last(), "failed at 3"),
          "team of %d: message \"%s\" (the first failure's)", nt, blip_err_last());
  }
}

/* Team attention over sequences of different lengths (packed without
 * padding) and team LayerNorm equal the kernels they share out. */
static void test_team_ops(int heads, int dh, int masked) {
  const int lens[4] = {1, 12, 35, 7}, n = 4, D = heads * dh, ld = 3 * D;
  int off[5] = {0};
  for (int r = 0; r < n; r++) off[r + 1] = off[r] + lens[r];
  const int M = off[n];
  float *qkv = rnd((long)M * ld, 1), *mask = rnd(M, 3), *ref = malloc(sizeof(float) * M * D), *got = malloc(sizeof(float) * M * D);
  float *g = rnd(D, 1), *b = rnd(D, 1), *lr = malloc(sizeof(float) * M * D), *lg = malloc(sizeof(float) * M * D);
  const float scale = 1.0f / sqrtf((float)dh);
  for (int r = 0; r < n; r++)
    CHECK(blip_k_attention(ref + (size_t)off[r] * D, D, qkv + (size_t)off[r] * ld, ld, qkv + (size_t)off[r] * ld + D, ld,
                           qkv + (size_t)off[r] * ld + 2 * D, ld, lens[r], lens[r], heads, dh, scale, masked ? mask + off[r] : NULL,
                           NULL) == 0,
          "attention: %s", blip_err_last());
  blip_k_layernorm(lr, qkv, g, b, M, D, 1e-12f);
  for (int nt = 1; nt <= 3; nt++) {
    memset(got, 0, sizeof(float) * M * D);
#pragma omp parallel num_threads(nt)
    {
      blip_k_team_attention(got, D, qkv, qkv + D, qkv + 2 * D, ld, n, off, heads, dh, scale, masked ? mask : NULL);
      blip_k_team_layernorm(lg, qkv, g, b, M, D, 1e-12f);
    }
    char label[64];
    snprintf(label, sizeof label, "team attention H%d dh%d%s, %d threads", heads, dh, masked ? " masked" : "", nt);
    check_tensor(label, got, ref, (long)M * D, 1e-6);
    snprintf(label, sizeof label, "team layernorm, %d threads", nt);
    check_tensor(label, lg, lr, (long)M * D, 1e-6);
  }
  free(qkv), free(mask), free(ref), free(got), free(g), free(b), free(lr), free(lg);
}

int main(void) {
  blip_k_set_threads(2);
  test_scalar_fns();
  test_gemm(1, 1, 1, 0, 0);
  test_gemm(17, 33, 65, 0, 1);
  test_gemm(13, 7, 129, 1, 0);
  test_gemm(31, 45, 3, 1, 1);
  test_gemm(577, 96, 61, 0, 1);
  test_linear(1, 7, 3, 1);
  test_linear(35, 97, 131, 1);
  test_linear(19, 33, 2, 0);
  test_quant();
  test_gemm_bf16(1, 1, 1, 0);
  test_gemm_bf16(29, 37, 53, 1);
  test_gemm_bf16(144, 97, 130, 0);
  for (int p = BLIP_K_F32; p <= BLIP_K_INT8; p++) {
    for (int parts = 1; parts <= 3; parts += 2) { /* 3 parts where out allows, else fewer */
      test_packed(p, 1, 7, 3, 0, 1, parts);
      test_packed(p, 37, 97, 131, BLIP_K_GELU, 1, parts);
      test_packed(p, 19, 65, 33, BLIP_K_ACCUM, 0, parts);
      test_packed(p, 45, 129, 61, BLIP_K_GELU | BLIP_K_ACCUM, 1, parts);
      test_packed(p, 3, 50, 17, BLIP_K_GELU, 0, parts);
      test_packed(p, 1601, 40, 24, BLIP_K_GELU | BLIP_K_ACCUM, 1, parts); /* 3 row chunks */
    }
    test_parts(p, 12, 64, 96, 2);
    test_parts(p, 37, 97, 131, 3);
    test_parts(p, 300, 128, 200, 2);
    test_mlp(p, 7, 33, 65, 1);
    test_mlp(p, 12, 48, 96, 2);
    if (p != BLIP_K_F32) {
      test_packed_bf16io(p, 37, 97, 131, 0);
      test_packed_bf16io(p, 1601, 40, 24, BLIP_K_GELU); /* 3 row chunks */
    }
    test_mlp(p, 1601, 24, 40, 1);
  }
  /* int8 shapes the VNNI kernel takes (parts, K % 4 == 0, on CPUs with it):
   * every row count of its 12-row tile, column tails, 192-row chunks; its
   * bf16 output and its agreement with oneDNN are in test_parts */
  {
    blip_k_ws ws = {0};
    blip_k_linear l = {.in = 64, .out = 40, .w = rnd(64 * 40, 0.3f)};
    CHECK(blip_k_linear_pack_parts(&l, BLIP_K_INT8, &ws, 2) == 0, "pack: %s", blip_err_last());
    const char *impl = blip_k_linear_impl(&l, 12, 0);
    __builtin_cpu_init();
    const int vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") && !getenv("BLIP_INT8_ONEDNN");
    CHECK(impl && (strcmp(impl, "blip:vnni") == 0) == vnni, "int8 K=64 runs %s (CPU has VNNI: %d)", impl ? impl : "(none)", vnni);
    blip_k_linear_unpack(&l);
    blip_k_ws_free(&ws);
    free((void *)l.w);
  }
  for (int M = 1; M <= 13; M++) test_packed(BLIP_K_INT8, M, 64, 40, M % 2 ? BLIP_K_GELU : BLIP_K_ACCUM, M % 3 != 0, 2);
  test_packed(BLIP_K_INT8, 577, 128, 97, BLIP_K_GELU | BLIP_K_ACCUM, 1, 2);
  test_packed(BLIP_K_INT8, 401, 128, 97, 0, 0, 3);
  test_mlp(BLIP_K_INT8, 25, 64, 128, 2);
  test_layernorm(1, 7);
  test_layernorm(53, 771);
  test_gelu_softmax();
  test_team_sync();
  test_team_ops(3, 8, 0);
  test_team_ops(12, 64, 1);
  /* the fused kernel where the CPU has it, then the batched oneDNN path;
   * shapes cover odd head sizes, row blocks of 12 with tails, key panels
   * of 32 with tails (33: one key in the last), head sizes past a panel */
  for (int onednn = 0; onednn < 2; onednn++) {
    if (onednn) setenv("BLIP_ATTENTION_ONEDNN", "1", 1);
    printf("  -- attention, %s\n", onednn ? "batched oneDNN" : "fused where the CPU allows");
    for (int bf = 0; bf < 4; bf += 1 + (bf == 0)) { /* f32, bf16 in, bf16 in and out */
      test_attention(1, 1, 1, 1, 0, bf);
      test_attention(13, 13, 3, 7, 1, bf);
      test_attention(5, 131, 4, 16, 0, bf);
      test_attention(97, 97, 5, 9, 0, bf);
      test_attention(25, 33, 3, 64, 1, bf);
      test_attention(37, 70, 2, 40, 0, bf);
      test_attention(12, 577, 2, 64, 0, bf);
    }
    const int vnni = !onednn && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
    test_attention_int8(25, 33, 3, 64, vnni);
    test_attention_int8(37, 70, 2, 16, vnni);
    test_attention_int8(1, 5, 1, 16, vnni);
    test_attention_int8(12, 577, 2, 64, vnni);
    test_attention_int8(25, 70, 1, 768, vnni); /* ITM's products with the image tokens: one head of their width */
  }
  unsetenv("BLIP_ATTENTION_ONEDNN");
  return check_summary();
}
