/* blip_kern: the numeric kernels of the engine, op(out, in, weights, dims).
 *
 * Activations are row-major float32 throughout. Linear layers can be
 * packed once (blip_k_linear_pack) into a oneDNN matmul with weights in
 * the library's blocked layout, in f32, bf16 (f32 accumulate) or int8
 * (s8 weights with per-output-channel scales, u8 activations quantized
 * per row with their own scale and zero point, s32 accumulate). Bias,
 * exact-erf GELU and the residual add are fused: as oneDNN post-ops in
 * f32/bf16, in the dequantizing epilogue in int8. Primitives are cached
 * per row count; more than 768 rows run in row chunks (cache locality).
 * Layers packed in column parts (the text encoder's) run a part per
 * thread inside one OpenMP region (teams, below); their int8 parts use
 * the project's own VNNI kernel where the CPU has it.
 * f32 attention and unpacked layers go to dnnl_sgemm (inside an OpenMP
 * parallel region oneDNN runs single-threaded, which the attention kernel
 * relies on); bf16 attention and blip_k_gemm_bf16 to oneDNN matmul.
 * Everything else is OpenMP. One thread count for the whole engine:
 * blip_k_set_threads(). Kernels never allocate except to grow a workspace
 * (blip_k_ws) or a column part's result buffer, for primitive caches, and
 * for attention scores when given no workspace (all checked; BLIP_ENOMEM). */
#ifndef BLIP_KERN_H
#define BLIP_KERN_H

#include <stddef.h>
#include <stdint.h>

void blip_k_set_threads(int n); /* <= 0: all cores */
int blip_k_threads(void);

/* Compute precision of a packed linear layer (same values as blip_prec). */
typedef enum { BLIP_K_F32 = 0, BLIP_K_BF16 = 1, BLIP_K_INT8 = 2 } blip_k_prec;

/* Scratch shared by the packed layers of one model (converted or quantized
 * activations, row scales, int32 results). Not thread-safe, like the
 * model context that owns it. Zero-initialize; release with blip_k_ws_free. */
typedef struct {
  void *p;
  size_t cap;
  void *stream; /* the oneDNN stream the model's layers run on */
  void *att;    /* blip_k_attention_bf16in's primitive cache */
  void *gemm;   /* blip_k_gemm_bf16's primitive cache */
} blip_k_ws;
void blip_k_ws_free(blip_k_ws *ws);

typedef struct blip_k_packed blip_k_packed;

/* A linear layer y = x W^T + b; W is [out, in] as PyTorch stores it.
 * b may be NULL. Once packed, w is no longer read by the forward pass. */
typedef struct {
  int in, out;
  const float *w;
  const float *b;
  blip_k_packed *packed; /* NULL: plain f32 through dnnl_sgemm */
} blip_k_linear;

/* Build l->packed from l->w in precision `prec`; ws is the model's shared
 * scratch and must outlive the layer. */
int blip_k_linear_pack(blip_k_linear *l, blip_k_prec prec, blip_k_ws *ws);
void blip_k_linear_unpack(blip_k_linear *l);
/* Bytes held by the packed form (weights, scales, column sums). */
size_t blip_k_linear_packed_bytes(const blip_k_linear *l);
/* Quantization steps of the int8 path, exposed for tests:
 * w [out,in] -> q [out,in] s8 with scale[o] = max|w_o| / 127, and
 * x [n] -> u8 with x ~ (q - zp) * scale over a range that includes 0. */
void blip_k_quant_w(int8_t *q, float *scale, int32_t *colsum, const float *w, int out, int in);
void blip_k_quant_row(uint8_t *q, float *scale, int32_t *zp, const float *x, int n);

/* C[M,N] = alpha * op(A) op(B) + beta * C, row-major; ta/tb: 0 = as is, 1 = transposed. */
int blip_k_gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                float beta, float *C, int ldc);
/* out[M, l->out] = in[M, l->in] W^T + b */
int blip_k_linear_fwd(float *out, const float *in, const blip_k_linear *l, int M);
/* Fused forms: BLIP_K_GELU applies exact GELU to the result; BLIP_K_ACCUM
 * adds the result to what out holds (the residual). GELU comes first.
 * BLIP_K_IN_BF16: `in` holds bf16 (packed bf16 layers only), so the layer
 * skips its conversion; BLIP_K_OUT_BF16: `out` receives bf16, rounded to
 * nearest even (packed bf16 or int8 layers, not with ACCUM). Without these
 * flags in and out are f32. */
enum { BLIP_K_GELU = 1, BLIP_K_ACCUM = 2, BLIP_K_IN_BF16 = 4, BLIP_K_OUT_BF16 = 8 };
int blip_k_linear_fwd_ex(void *out, const void *in, const blip_k_linear *l, int M, int flags);
/* The same layer packed as `parts` column slices (about out/parts columns
 * each), one oneDNN matmul per slice, so that the threads of one OpenMP
 * region each run a slice single-threaded (see teams below). Outside a
 * team it runs like any packed layer (one region, a slice per thread). */
int blip_k_linear_pack_parts(blip_k_linear *l, blip_k_prec prec, blip_k_ws *ws, int parts);
/* oneDNN's name for the kernel the layer runs at M rows (a part's, for a
 * layer in parts), NULL on error; for tests: "ref..." is the ~100x slower
 * reference that oneDNN falls back to for layouts its fast kernels lack. */
const char *blip_k_linear_impl(const blip_k_linear *l, int M, int flags);
/* Transformer MLP with residual: x += fc2(GELU(fc1(h))); h may be x (f32).
 * h_flags: 0 (h is f32) or BLIP_K_IN_BF16 (bf16 h, packed bf16 layers).
 * mid is scratch [M, fc1->out] floats. When both layers are packed bf16,
 * fc1's output goes to fc2 in bf16, chunk by chunk (no f32 round trip). */
int blip_k_mlp(float *x, const void *h, int h_flags, const blip_k_linear *fc1, const blip_k_linear *fc2, int M, float *mid);

/* out = LayerNorm(in) over rows of N (out may equal in). */
void blip_k_layernorm(float *out, const float *in, const float *g, const float *b, int M, int N, float eps);
/* The same LayerNorm written as bf16 (round to nearest even), for a bf16 layer's input. */
void blip_k_layernorm_bf16(uint16_t *out, const float *in, const float *g, const float *b, int M, int N, float eps);
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
 * out_h = softmax(scale * q_h k_h^T + mask) v_h, scale > 0. mask_add [Lk]
 * is added to every score row (NULL = none). With 12+ query rows on an
 * AVX-512 CPU: fused, parallel over (head, block of 12 rows), scores never
 * leaving cache; else parallel over heads with GEMM calls. Scratch lives in
 * ws (the model's, so repeated calls do not fault in fresh pages); ws NULL
 * allocates it for this call. */
int blip_k_attention(float *out, int ldo, const float *q, int ldq, const float *k, int ldk, const float *v, int ldv,
                     int Lq, int Lk, int heads, int dh, float scale, const float *mask_add, blip_k_ws *ws);

/* The same attention on bf16 operands (e.g. a packed layer's
 * BLIP_K_OUT_BF16 output, strided like the vision qkv rows): scores,
 * softmax and accumulation in f32, probabilities rounded to bf16; out is
 * bf16 when out_bf16, else f32. Fused where the CPU has AVX512-BF16 and dh
 * is even, else all heads in two batched oneDNN matmuls. ws is required.
 * BLIP_ATTENTION_ONEDNN=1 in the environment turns the fused kernels off
 * (comparisons, tests). */
int blip_k_attention_bf16in(void *out, int ldo, int out_bf16, const uint16_t *q, int ldq, const uint16_t *k, int ldk,
                            const uint16_t *v, int ldv, int Lq, int Lk, int heads, int dh, float scale, const float *mask_add,
                            blip_k_ws *ws);

/* The int8 model's attention on bf16 operands, f32 out, no mask: int8
 * products (q per row and head, k per key and head, v per head column,
 * probabilities as u8 x 255) where the CPU has AVX512-VNNI and BF16,
 * dh % 16 == 0 and dh <= 1024; else blip_k_attention_bf16in. */
int blip_k_attention_int8(float *out, int ldo, const uint16_t *q, int ldq, const uint16_t *k, int ldk, const uint16_t *v, int ldv, int Lq,
                          int Lk, int heads, int dh, float scale, blip_k_ws *ws);

/* Which kernel the attention of that precision (bf16: blip_k_attention_bf16in,
 * int8: blip_k_attention_int8) runs for a shape without a mask, e.g.
 * "fused int8", "batched bf16", "direct f32" (benchmarks, tests). */
const char *blip_k_attention_kernel(blip_k_prec prec, int Lq, int Lk, int heads, int dh, int ldk);

/* C[M,N] = A op(B) with bf16 operands and f32 accumulation/output,
 * row-major; tb = 1: B is stored [N,K]. Primitives cached per shape in ws. */
int blip_k_gemm_bf16(int tb, int M, int N, int K, const uint16_t *A, int lda, const uint16_t *B, int ldb, float *C, int ldc,
                     blip_k_ws *ws);
/* f32 -> bf16, round to nearest even. */
void blip_k_to_bf16(uint16_t *dst, const float *src, long n);

/* ---------- teams ----------
 * A text query's ops are microseconds each; opening an OpenMP region per
 * op costs a thread wake-up per op (a third of a passive int8 text encode
 * was the kernel waking threads). In a team the caller opens one region
 * and every thread calls the same team ops in the same order, with
 * blip_k_team_sync between an op and the next reader of its output. */
typedef struct {
  int count, gen, sleepers; /* barrier */
  int err[2];               /* the first error code passed to the current barrier (by parity of gen) */
  int msg_set;
  char msg[256];            /* that error's message: it was recorded in its thread's last-error */
} blip_k_team;
void blip_k_team_init(blip_k_team *t);
/* Barrier of all threads of the region (spins about 0.1 ms, then sleeps).
 * Each thread passes its own result; every thread gets the same one back:
 * 0, or an error code one of them passed. */
int blip_k_team_sync(blip_k_team *t, int rc);
/* After the region: rc with the failing thread's message set for this thread. */
int blip_k_team_error(const blip_k_team *t, int rc);
/* Grow the workspace to what blip_k_team_linear needs for M rows; call
 * before the region (inside it the workspace must not move). */
int blip_k_linear_reserve(const blip_k_linear *l, int M, int flags);
/* The layer's forward (flags as blip_k_linear_fwd_ex) by the whole team:
 * rows are converted in shares, then each thread runs its column parts.
 * Contains one sync; call blip_k_team_sync before reading out. */
int blip_k_team_linear(blip_k_team *t, void *out, const void *in, const blip_k_linear *l, int M, int flags);
/* This thread's share of the rows of blip_k_layernorm (and of its bf16-out form). */
void blip_k_team_layernorm(float *out, const float *in, const float *g, const float *b, int M, int N, float eps);
void blip_k_team_layernorm_bf16(uint16_t *out, const float *in, const float *g, const float *b, int M, int N, float eps);

/* Row-split teams (the vision encoder): each thread runs a whole packed
 * layer (blip_k_linear_pack) on the same share of the rows as
 * blip_k_team_layernorm's, converting its input rows and finishing its
 * output rows itself, in its own workspace tws, with oneDNN on the calling
 * thread: no sync, and a thread's rows stay in its cache from op to op.
 * blip_k_rows_prepare, before the team, creates the layer's matmuls for
 * the row counts each thread will use (inside, the layer is shared). */
int blip_k_rows_prepare(const blip_k_linear *l, int M, int flags);
int blip_k_rows_linear(void *out, const void *in, const blip_k_linear *l, int M, int flags, blip_k_ws *tws);
/* Self-attention of one sequence of L tokens (q, k, v rows ld apart, no
 * mask) by the fused kernels, this thread taking its share of the (head,
 * block of rows) pairs: prec F32 is f32 in and out, BF16 bf16 in and out,
 * INT8 bf16 in, int8 products, f32 out. Only where
 * blip_k_team_attention_fusable says so, with scratch reserved in ws by
 * blip_k_team_attention_reserve before the team starts. No sync. */
int blip_k_team_attention_fusable(blip_k_prec prec, int L, int dh, int ld);
int blip_k_team_attention_reserve(blip_k_ws *ws, blip_k_prec prec, int L, int dh);
int blip_k_team_attention_fused(void *out, int ldo, const void *q, const void *k, const void *v, int ld, int L, int heads, int dh, float scale,
                                blip_k_prec prec, const blip_k_ws *ws);
/* f32 self-attention of n sequences packed without padding (sequence r is
 * rows off[r]..off[r+1] of q, k, v, out; at most BLIP_K_TEAM_ATT_MAX each),
 * this thread's share of the (sequence, head) pairs. mask_add [off[n]] or NULL. */
#define BLIP_K_TEAM_ATT_MAX 512
void blip_k_team_attention(float *out, int ldo, const float *q, const float *k, const float *v, int ld, int n, const int *off,
                           int heads, int dh, float scale, const float *mask_add);

/* Vectorizable scalar functions, exposed for tests. */
float blip_k_expf(float x);
float blip_k_erff(float x);

#endif
