/* blip_kern: the numeric kernels of the engine, op(out, in, weights, dims).
 *
 * Row-major float32 throughout. GEMMs go to oneDNN (dnnl_sgemm; inside an
 * OpenMP parallel region oneDNN runs single-threaded, which the attention
 * kernel relies on). Everything else is OpenMP. One thread count for the
 * whole engine: blip_k_set_threads(). Kernels never allocate except
 * blip_k_attention's per-thread score rows (checked; BLIP_ENOMEM). */
#ifndef BLIP_KERN_H
#define BLIP_KERN_H

#include <stdint.h>

void blip_k_set_threads(int n); /* <= 0: all cores */
int blip_k_threads(void);

/* A linear layer y = x W^T + b; W is [out, in] as PyTorch stores it.
 * b may be NULL. Precision-specific packed forms hang off `packed`. */
typedef struct {
  int in, out;
  const float *w;
  const float *b;
  void *packed; /* owned by the model; NULL for plain f32 */
} blip_k_linear;

/* C[M,N] = alpha * op(A) op(B) + beta * C, row-major; ta/tb: 0 = as is, 1 = transposed. */
int blip_k_gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                float beta, float *C, int ldc);
/* out[M, l->out] = in[M, l->in] W^T + b */
int blip_k_linear_fwd(float *out, const float *in, const blip_k_linear *l, int M);

/* out = LayerNorm(in) over rows of N (out may equal in). */
void blip_k_layernorm(float *out, const float *in, const float *g, const float *b, int M, int N, float eps);
/* x = LayerNorm(x + r): BERT's post-norm residual. */
void blip_k_add_layernorm(float *x, const float *r, const float *g, const float *b, int M, int N, float eps);
void blip_k_add(float *x, const float *r, long n);
/* Exact (erf) GELU in place. */
void blip_k_gelu(float *x, long n);
/* Row-wise softmax in place. */
void blip_k_softmax(float *x, int rows, int cols);
/* Rows scaled to unit L2 norm (torch.nn.functional.normalize, eps 1e-12). */
void blip_k_l2norm(float *x, int rows, int cols);

/* Multi-head attention for one sequence: for each head h (columns h*dh..),
 * out_h = softmax(scale * q_h k_h^T + mask) v_h. mask_add [Lk] is added to
 * every score row (NULL = none). Parallel over heads. */
int blip_k_attention(float *out, int ldo, const float *q, int ldq, const float *k, int ldk, const float *v, int ldv,
                     int Lq, int Lk, int heads, int dh, float scale, const float *mask_add);

/* Vectorizable scalar functions, exposed for tests. */
float blip_k_expf(float x);
float blip_k_erff(float x);

#endif
