/* blip_kern: see blip_kern.h. The transcendental functions are written as
 * branch-free polynomials so that `omp simd` loops vectorize them; their
 * accuracy is checked against libm in tests/test_kern.c. */
#include "blip_kern.h"
#include "blip_err.h"

#include <dnnl.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

void blip_k_set_threads(int n) {
  if (n <= 0) n = omp_get_num_procs();
  omp_set_num_threads(n);
}

int blip_k_threads(void) { return omp_get_max_threads(); }

int blip_k_gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                float beta, float *C, int ldc) {
  if (M == 0 || N == 0) return BLIP_OK;
  dnnl_status_t s = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  if (s != dnnl_success) return blip_err_set(BLIP_EINVAL, "dnnl_sgemm(%d,%d,%d) failed: status %d", M, N, K, (int)s);
  return BLIP_OK;
}

int blip_k_linear_fwd(float *out, const float *in, const blip_k_linear *l, int M) {
  int rc = blip_k_gemm(0, 1, M, l->out, l->in, 1.0f, in, l->in, l->w, l->in, 0.0f, out, l->out);
  if (rc || !l->b) return rc;
  const int N = l->out;
  const float *b = l->b;
#pragma omp parallel for if ((long)M * N > 32768)
  for (int i = 0; i < M; i++) {
    float *o = out + (long)i * N;
#pragma omp simd
    for (int j = 0; j < N; j++) o[j] += b[j];
  }
  return BLIP_OK;
}

static void ln_row(float *out, const float *in, const float *g, const float *b, int N, float eps) {
  float mean = 0, var = 0;
#pragma omp simd reduction(+ : mean)
  for (int j = 0; j < N; j++) mean += in[j];
  mean /= (float)N;
#pragma omp simd reduction(+ : var)
  for (int j = 0; j < N; j++) {
    float d = in[j] - mean;
    var += d * d;
  }
  var /= (float)N;
  float rs = 1.0f / sqrtf(var + eps);
#pragma omp simd
  for (int j = 0; j < N; j++) out[j] = (in[j] - mean) * rs * g[j] + b[j];
}

void blip_k_layernorm(float *out, const float *in, const float *g, const float *b, int M, int N, float eps) {
#pragma omp parallel for if ((long)M * N > 32768)
  for (int i = 0; i < M; i++) ln_row(out + (long)i * N, in + (long)i * N, g, b, N, eps);
}

void blip_k_add_layernorm(float *x, const float *r, const float *g, const float *b, int M, int N, float eps) {
#pragma omp parallel for if ((long)M * N > 32768)
  for (int i = 0; i < M; i++) {
    float *xi = x + (long)i * N;
    const float *ri = r + (long)i * N;
#pragma omp simd
    for (int j = 0; j < N; j++) xi[j] += ri[j];
    ln_row(xi, xi, g, b, N, eps);
  }
}

void blip_k_add(float *x, const float *r, long n) {
#pragma omp parallel for simd if (n > 65536)
  for (long i = 0; i < n; i++) x[i] += r[i];
}

/* exp: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial (Cephes expf
 * coefficients), 2^n built in the exponent bits. Inputs are clamped so the
 * result stays finite; below -87 it flushes to ~0 (softmax-safe). */
#pragma omp declare simd
float blip_k_expf(float x) {
  x = fminf(fmaxf(x, -87.0f), 88.0f);
  float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, x);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p * r, r, r) + 1.0f;
  int32_t e = ((int32_t)n + 127) << 23;
  float s;
  memcpy(&s, &e, 4);
  return p * s;
}

/* erf: rational minimax approximation on [-4, 4] (as in Eigen's float erf),
 * saturating outside; max abs error ~1e-7. */
#pragma omp declare simd
float blip_k_erff(float x) {
  x = fminf(fmaxf(x, -4.0f), 4.0f);
  float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = fmaf(p, x2, 2.77068142495902e-08f);
  p = fmaf(p, x2, -2.10102402082508e-06f);
  p = fmaf(p, x2, -5.69250639462346e-05f);
  p = fmaf(p, x2, -7.34990630326855e-04f);
  p = fmaf(p, x2, -2.95459980854025e-03f);
  p = fmaf(p, x2, -1.60960333262415e-02f);
  p *= x;
  float q = -1.45660718464996e-05f;
  q = fmaf(q, x2, -2.13374055278905e-04f);
  q = fmaf(q, x2, -1.68282697438203e-03f);
  q = fmaf(q, x2, -7.37332916720468e-03f);
  q = fmaf(q, x2, -1.42647390514189e-02f);
  return p / q;
}

void blip_k_gelu(float *x, long n) {
#pragma omp parallel for simd if (n > 65536)
  for (long i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + blip_k_erff(x[i] * 0.70710678118654752f));
}

static void softmax_row(float *x, int n) {
  float mx = -INFINITY, sum = 0;
#pragma omp simd reduction(max : mx)
  for (int j = 0; j < n; j++) mx = fmaxf(mx, x[j]);
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; j++) {
    x[j] = blip_k_expf(x[j] - mx);
    sum += x[j];
  }
  float inv = 1.0f / sum;
#pragma omp simd
  for (int j = 0; j < n; j++) x[j] *= inv;
}

void blip_k_softmax(float *x, int rows, int cols) {
#pragma omp parallel for if ((long)rows * cols > 32768)
  for (int i = 0; i < rows; i++) softmax_row(x + (long)i * cols, cols);
}

void blip_k_l2norm(float *x, int rows, int cols) {
  for (int i = 0; i < rows; i++) {
    float *r = x + (long)i * cols;
    double s = 0;
    for (int j = 0; j < cols; j++) s += (double)r[j] * r[j];
    float inv = 1.0f / fmaxf((float)sqrt(s), 1e-12f);
    for (int j = 0; j < cols; j++) r[j] *= inv;
  }
}

int blip_k_attention(float *out, int ldo, const float *q, int ldq, const float *k, int ldk, const float *v, int ldv,
                     int Lq, int Lk, int heads, int dh, float scale, const float *mask_add) {
  int nt = omp_get_max_threads();
  if (nt > heads) nt = heads;
  float *scratch = malloc((size_t)nt * Lq * Lk * sizeof(float));
  if (!scratch) return blip_err_set(BLIP_ENOMEM, "attention: out of memory for %dx%d scores", Lq, Lk);
  int rc = BLIP_OK;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int h = 0; h < heads; h++) {
    float *s = scratch + (size_t)omp_get_thread_num() * Lq * Lk;
    int e = blip_k_gemm(0, 1, Lq, Lk, dh, scale, q + h * dh, ldq, k + h * dh, ldk, 0.0f, s, Lk);
    if (mask_add)
      for (int i = 0; i < Lq; i++) {
        float *si = s + (long)i * Lk;
#pragma omp simd
        for (int j = 0; j < Lk; j++) si[j] += mask_add[j];
      }
    for (int i = 0; i < Lq; i++) softmax_row(s + (long)i * Lk, Lk);
    if (!e) e = blip_k_gemm(0, 0, Lq, dh, Lk, 1.0f, s, Lk, v + h * dh, ldv, 0.0f, out + h * dh, ldo);
    if (e) {
#pragma omp atomic write
      rc = e;
    }
  }
  free(scratch);
  return rc;
}
