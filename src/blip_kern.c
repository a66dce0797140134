/* blip_kern: see blip_kern.h. The transcendental functions are written as
 * branch-free polynomials so that `omp simd` loops vectorize them; their
 * accuracy is checked against libm in tests/test_kern.c. */
#include "blip_kern.h"
#include "blip_err.h"

#include <dnnl.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Runtime dispatch: oneDNN picks its kernels at run time; the row kernels
 * here (LayerNorm, softmax, bf16 rounding, int8 quantization and
 * epilogues) are compiled for -march=native by default. A portable build
 * (cmake -DBLIP_NATIVE=OFF) compiles them as AVX-512 / AVX2 / baseline
 * clones instead, chosen once at load by the CPU (GCC ifunc), so that it
 * keeps the native build's speed on every x86-64. */
#if defined(BLIP_DISPATCH) && defined(__x86_64__)
#define INLINE inline __attribute__((always_inline)) /* the helpers below compile into each clone */
#define DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define INLINE inline
#define DISPATCH
#endif

/* Bytes per activation element on each side of a layer. */
#define IN_SIZE(flags) ((flags) & BLIP_K_IN_BF16 ? 2 : 4)
#define OUT_SIZE(flags) ((flags) & BLIP_K_OUT_BF16 ? 2 : 4)

DISPATCH static void add_row(float *o, const float *a, int n) {
#pragma omp simd
  for (int j = 0; j < n; j++) o[j] += a[j];
}

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

/* The scalar kernels are static inline so that loops vectorize them
 * without relying on simd clones. Clamps are comparisons, not fminf/fmaxf:
 * those keep NaN semantics that make gcc call libm without -ffast-math.
 *
 * exp: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial (Cephes expf
 * coefficients), 2^n built in the exponent bits. Inputs are clamped so the
 * result stays finite; below -87 it flushes to ~0 (softmax-safe). */
static INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
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
static INLINE float erf_approx(float x) {
  x = x < -4.0f ? -4.0f : x > 4.0f ? 4.0f : x;
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

static INLINE float gelu(float v) { return 0.5f * v * (1.0f + erf_approx(v * 0.70710678118654752f)); }

/* ---------- packed linear layers (oneDNN matmul) ---------- */

/* Primitives are built per (M, flags): oneDNN's fast brgemm kernels need a
 * fixed M (with a runtime M it falls back to a slower generic gemm), and
 * building one costs about a millisecond, so each layer keeps the few
 * shapes a model uses (vision batch, text length, ITM k x length). */
#define PRIM_SLOTS 12

typedef struct {
  int M, flags;
  dnnl_primitive_t prim;
} prim_slot;

struct blip_k_packed {
  blip_k_prec prec;
  int in, out, has_bias;
  int ldd;                /* row stride of the output: out, or the whole layer's for a column part */
  int n_part;             /* > 0: the layer is these column parts (blip_k_linear_pack_parts), nothing else here is set */
  blip_k_linear *part;
  int *c0;                /* first output column of each part */
  void *stream;           /* a part's own stream (parts run concurrently) */
  int vnni;               /* int8 weights in the VNNI panel layout for vnni_mm (not oneDNN's) */
  int32_t *acc;           /* a part's dense result before it goes to its columns of the output (own_acc) */
  size_t acc_cap;
  dnnl_memory_desc_t wmd; /* the blocked layout oneDNN chose for the weights */
  void *w;                /* packed weights */
  size_t wbytes;
  float *scale;           /* int8: per-output-channel weight scale */
  int32_t *colsum;        /* int8: sum_k q[o,k], for the activations' zero point */
  float *zeros;           /* int8 without bias: the epilogue adds these */
  blip_k_ws *ws;
  prim_slot slot[PRIM_SLOTS];
  int n_slot, next_slot;
};

static dnnl_engine_t g_engine;
static pthread_once_t g_engine_once = PTHREAD_ONCE_INIT;
static void engine_init(void) {
  if (dnnl_engine_create(&g_engine, dnnl_cpu, 0) != dnnl_success) g_engine = NULL;
}

static int dnnl_fail(dnnl_status_t s, const char *what, const blip_k_packed *p, int M) {
  return blip_err_set(s == dnnl_out_of_memory ? BLIP_ENOMEM : BLIP_EINVAL, "oneDNN %s (%s %dx%d, M=%d): status %d", what,
                      p->prec == BLIP_K_F32 ? "f32" : p->prec == BLIP_K_BF16 ? "bf16" : "int8", p->out, p->in, M, (int)s);
}

static dnnl_data_type_t src_type(blip_k_prec p) { return p == BLIP_K_F32 ? dnnl_f32 : p == BLIP_K_BF16 ? dnnl_bf16 : dnnl_u8; }
static dnnl_data_type_t dst_type(blip_k_prec p, int flags) {
  return p == BLIP_K_INT8 ? dnnl_s32 : (flags & BLIP_K_OUT_BF16) ? dnnl_bf16 : dnnl_f32;
}
/* Results go to a dense scratch of their own, then to out, for a column
 * part (oneDNN's fast matmuls need a dense output; 2.7 otherwise falls back
 * to its reference kernel, ~100x slower) and for int8 with ACCUM (out holds
 * the residual) or OUT_BF16 (out is too narrow for s32). */
static int own_acc(const blip_k_packed *p, int flags) {
  return p->ldd != p->out || (p->prec == BLIP_K_INT8 && (flags & (BLIP_K_ACCUM | BLIP_K_OUT_BF16)));
}
static int dst_ld(const blip_k_packed *p, int flags) { return own_acc(p, flags) ? p->out : p->ldd; }

/* Internal flag: a matmul with a user scratchpad (row-split teams run one
 * matmul from several threads at once, each with its own scratchpad; the
 * library's is per creating thread). */
#define K_USER_SCRATCH 256

/* The matmul for this layer at M rows; wmd NULL lets oneDNN choose the
 * weight layout (used once, at pack time). */
static dnnl_status_t make_pd(const blip_k_packed *p, int M, int flags, const dnnl_memory_desc_t *wmd,
                             dnnl_primitive_desc_t *pd) {
  const int q8 = p->prec == BLIP_K_INT8;
  dnnl_memory_desc_t s, w, b, d;
  dnnl_dims_t sd = {M, p->in}, wd = {p->in, p->out}, bd = {1, p->out}, dd = {M, p->out}, ds = {dst_ld(p, flags), 1};
  dnnl_status_t st;
  if ((st = dnnl_memory_desc_init_by_tag(&s, 2, sd, src_type(p->prec), dnnl_ab)) ||
      (st = dnnl_memory_desc_init_by_tag(&b, 2, bd, dnnl_f32, dnnl_ab)) ||
      (st = dnnl_memory_desc_init_by_strides(&d, 2, dd, dst_type(p->prec, flags), ds)))
    return st;
  if (wmd) w = *wmd;
  else if ((st = dnnl_memory_desc_init_by_tag(&w, 2, wd, q8 ? dnnl_s8 : src_type(p->prec), dnnl_format_tag_any)))
    return st;
  dnnl_matmul_desc_t md;
  if ((st = dnnl_matmul_desc_init(&md, &s, &w, (q8 || !p->has_bias) ? NULL : &b, &d))) return st;
  dnnl_primitive_attr_t attr = NULL;
  dnnl_post_ops_t po = NULL;
  if ((st = dnnl_primitive_attr_create(&attr)) || (st = dnnl_post_ops_create(&po))) goto done;
  /* int8 applies scales, zero points, bias and flags in its own epilogue */
  if (!q8 && (flags & BLIP_K_GELU) && (st = dnnl_post_ops_append_eltwise(po, 1.0f, dnnl_eltwise_gelu_erf, 0, 0))) goto done;
  if (!q8 && (flags & BLIP_K_ACCUM) && !own_acc(p, flags) && (st = dnnl_post_ops_append_sum(po, 1.0f))) goto done;
  if ((st = dnnl_primitive_attr_set_post_ops(attr, po))) goto done;
  if ((flags & K_USER_SCRATCH) && (st = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user))) goto done;
  st = dnnl_primitive_desc_create(pd, &md, attr, g_engine, NULL);
done:
  if (po) dnnl_post_ops_destroy(po);
  if (attr) dnnl_primitive_attr_destroy(attr);
  return st;
}

/* The layer's cached matmul for M rows and flags, or NULL. */
static dnnl_primitive_t cached_prim(const blip_k_packed *p, int M, int flags) {
  for (int i = 0; i < p->n_slot; i++)
    if (p->slot[i].M == M && p->slot[i].flags == flags) return p->slot[i].prim;
  return NULL;
}

static int get_prim(blip_k_packed *p, int M, int flags, dnnl_primitive_t *out) {
  if ((*out = cached_prim(p, M, flags))) return BLIP_OK;
  dnnl_primitive_desc_t pd;
  dnnl_primitive_t prim;
  dnnl_status_t st = make_pd(p, M, flags, &p->wmd, &pd);
  if (st) return dnnl_fail(st, "matmul descriptor", p, M);
  st = dnnl_primitive_create(&prim, pd);
  dnnl_primitive_desc_destroy(pd);
  if (st) return dnnl_fail(st, "matmul primitive", p, M);
  int i;
  if (p->n_slot < PRIM_SLOTS) {
    i = p->n_slot++;
  } else { /* full: replace round-robin */
    i = p->next_slot;
    p->next_slot = (i + 1) % PRIM_SLOTS;
    dnnl_primitive_destroy(p->slot[i].prim);
  }
  p->slot[i] = (prim_slot){M, flags, prim};
  *out = prim;
  return BLIP_OK;
}

/* A matmul get_prim made before, without making one (several threads at once). */
static int find_prim(const blip_k_packed *p, int M, int flags, dnnl_primitive_t *out) {
  if ((*out = cached_prim(p, M, flags))) return BLIP_OK;
  return blip_err_set(BLIP_EINVAL, "linear %dx%d: no matmul prepared for %d rows", p->out, p->in, M);
}

/* A K_USER_SCRATCH matmul's scratchpad (NULL if oneDNN cannot say). */
static const dnnl_memory_desc_t *scratch_md(dnnl_primitive_t prim) {
  const_dnnl_primitive_desc_t pd;
  return dnnl_primitive_get_primitive_desc(prim, &pd) ? NULL : dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
}

static void *ws_get(blip_k_ws *ws, size_t bytes) {
  if (bytes > ws->cap) {
    void *n = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!n) return NULL;
    free(ws->p);
    ws->p = n;
    ws->cap = bytes;
  }
  return ws->p;
}

static void att_cache_free(void *c);
static void gemm_cache_free(void *c);

void blip_k_ws_free(blip_k_ws *ws) {
  free(ws->p);
  att_cache_free(ws->att);
  gemm_cache_free(ws->gemm);
  if (ws->stream) dnnl_stream_destroy(ws->stream);
  memset(ws, 0, sizeof *ws);
}

/* Round to nearest even, as torch's .to(bfloat16) does (no NaN inputs here). */
static INLINE uint16_t bf16_rne(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

DISPATCH static void to_bf16_run(uint16_t *d, const float *s, long n) {
#pragma omp simd
  for (long i = 0; i < n; i++) d[i] = bf16_rne(s[i]);
}

static void to_bf16(uint16_t *d, const float *s, long n) {
  if (n <= 65536) {
    to_bf16_run(d, s, n);
    return;
  }
  const long blk = 16384;
#pragma omp parallel for
  for (long i = 0; i < n; i += blk) to_bf16_run(d + i, s + i, n - i < blk ? n - i : blk);
}

void blip_k_quant_w(int8_t *q, float *scale, int32_t *colsum, const float *w, int out, int in) {
#pragma omp parallel for if ((long)out * in > 65536)
  for (int o = 0; o < out; o++) {
    const float *wo = w + (long)o * in;
    float mx = 0;
#pragma omp simd reduction(max : mx)
    for (int k = 0; k < in; k++) {
      float a = wo[k] < 0 ? -wo[k] : wo[k];
      mx = a > mx ? a : mx;
    }
    float s = mx / 127.0f;
    if (!(s > 0)) s = 1.0f;
    int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int k = 0; k < in; k++) {
      int v = (int)rintf(wo[k] / s);
      v = v > 127 ? 127 : v < -127 ? -127 : v;
      q[(long)o * in + k] = (int8_t)v;
      sum += v;
    }
    scale[o] = s;
    colsum[o] = sum;
  }
}

DISPATCH void blip_k_quant_row(uint8_t *q, float *scale, int32_t *zp, const float *x, int n) {
  float lo = 0, hi = 0; /* the range includes 0, so zero rows and padding are exact */
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int j = 0; j < n; j++) {
    lo = x[j] < lo ? x[j] : lo;
    hi = x[j] > hi ? x[j] : hi;
  }
  float s = (hi - lo) / 255.0f;
  if (!(s > 0)) s = 1.0f;
  float inv = 1.0f / s, z = rintf(-lo * inv);
  z = z < 0.0f ? 0.0f : z > 255.0f ? 255.0f : z;
#pragma omp simd
  for (int j = 0; j < n; j++) {
    float v = rintf(x[j] * inv) + z;
    v = v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v;
    q[j] = (uint8_t)(int32_t)v;
  }
  *scale = s;
  *zp = (int32_t)z;
}

static dnnl_status_t reorder(const dnnl_memory_desc_t *from_md, void *from, const dnnl_memory_desc_t *to_md, void *to,
                             dnnl_stream_t stream) {
  dnnl_primitive_desc_t rpd = NULL;
  dnnl_primitive_t r = NULL;
  dnnl_memory_t a = NULL, b = NULL;
  dnnl_status_t st;
  if ((st = dnnl_reorder_primitive_desc_create(&rpd, from_md, g_engine, to_md, g_engine, NULL)) ||
      (st = dnnl_primitive_create(&r, rpd)) || (st = dnnl_memory_create(&a, from_md, g_engine, from)) ||
      (st = dnnl_memory_create(&b, to_md, g_engine, to)))
    goto done;
  dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, a}, {DNNL_ARG_TO, b}};
  if (!(st = dnnl_primitive_execute(r, stream, 2, args))) st = dnnl_stream_wait(stream);
done:
  if (a) dnnl_memory_destroy(a);
  if (b) dnnl_memory_destroy(b);
  if (r) dnnl_primitive_destroy(r);
  if (rpd) dnnl_primitive_desc_destroy(rpd);
  return st;
}

void blip_k_linear_unpack(blip_k_linear *l) {
  blip_k_packed *p = l->packed;
  if (!p) return;
  for (int i = 0; i < p->n_part; i++) blip_k_linear_unpack(&p->part[i]);
  free(p->part);
  free(p->c0);
  if (p->stream) dnnl_stream_destroy(p->stream);
  free(p->acc);
  for (int i = 0; i < p->n_slot; i++) dnnl_primitive_destroy(p->slot[i].prim);
  free(p->w);
  free(p->scale);
  free(p->colsum);
  free(p->zeros);
  free(p);
  l->packed = NULL;
}

size_t blip_k_linear_packed_bytes(const blip_k_linear *l) {
  const blip_k_packed *p = l->packed;
  if (!p) return 0;
  if (p->n_part) {
    size_t n = 0;
    for (int i = 0; i < p->n_part; i++) n += blip_k_linear_packed_bytes(&p->part[i]);
    return n;
  }
  return p->wbytes + (p->scale ? (size_t)p->out * (sizeof(float) + sizeof(int32_t)) : 0);
}

/* ---------- int8 GEMM with VNNI ----------
 * At a text query's 12 rows oneDNN 2.7's int8 matmul reaches 30 % of the
 * vpdpbusd peak, this kernel 64 % (`bench_engine --gemm 12,768,3072`, 2
 * threads, weights from memory); at the vision encoder's 577 rows oneDNN
 * is ahead, 82 % against 68 %. So int8 text layers (packed in parts) run
 * this kernel where the CPU has AVX512-VNNI and K % 4 == 0.
 * Weights are panels of 32 output columns, K/4 steps of 128 bytes (16
 * columns x 4 consecutive k, twice): one vpdpbusd per 16 columns, 4 k and
 * a row. A 12-row x 32-column tile accumulates in 24 registers; its
 * epilogue (zero point, scales, bias, GELU, residual, bf16) runs on the
 * tile while it is in L1, so no s32 matrix goes to memory. Rows go in
 * chunks whose activations stay in L2; threads share the panels.
 * BLIP_INT8_ONEDNN=1 in the environment keeps oneDNN (for comparisons). */
#define VN_COLS 32
#define VN_ROWS 12
#define VN_CHUNK 192

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

static int vnni_usable(void) {
  static int ok = -1;
  if (ok < 0) {
    __builtin_cpu_init();
    const char *e = getenv("BLIP_INT8_ONEDNN");
    ok = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") && !(e && *e && strcmp(e, "0"));
  }
  return ok;
}

/* acc[r][0..31] = sum_k a[r][k] b[k][col] for mr rows, one panel. */
static inline __attribute__((always_inline)) VNNI_TARGET void vn_tile(int32_t *acc, const uint8_t *a, int lda, const int8_t *b,
                                                                       int kq, const int mr) {
  __m512i c[VN_ROWS][2];
#pragma GCC unroll 12
  for (int r = 0; r < mr; r++) c[r][0] = c[r][1] = _mm512_setzero_si512();
  for (int k = 0; k < kq; k++, b += 128) {
    const __m512i w0 = _mm512_load_si512((const void *)b), w1 = _mm512_load_si512((const void *)(b + 64));
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) {
      int32_t v;
      memcpy(&v, a + (size_t)r * lda + 4 * k, 4);
      const __m512i x = _mm512_set1_epi32(v);
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], x, w0);
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], x, w1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < mr; r++) {
    _mm512_store_si512((void *)(acc + r * VN_COLS), c[r][0]);
    _mm512_store_si512((void *)(acc + r * VN_COLS + 16), c[r][1]);
  }
}

static VNNI_TARGET void vn_tile_any(int32_t *acc, const uint8_t *a, int lda, const int8_t *b, int kq, int mr) {
  switch (mr) { /* each row count its own unrolled body (accumulators stay in registers) */
#define VN_CASE(n) \
  case n: vn_tile(acc, a, lda, b, kq, n); break;
    VN_CASE(1) VN_CASE(2) VN_CASE(3) VN_CASE(4) VN_CASE(5) VN_CASE(6) VN_CASE(7) VN_CASE(8) VN_CASE(9) VN_CASE(10) VN_CASE(11)
    default: vn_tile(acc, a, lda, b, kq, VN_ROWS);
#undef VN_CASE
  }
}
#else
static int vnni_usable(void) { return 0; }
static void vn_tile_any(int32_t *acc, const uint8_t *a, int lda, const int8_t *b, int kq, int mr) {
  (void)acc, (void)a, (void)lda, (void)b, (void)kq, (void)mr;
}
#endif

/* q [out, in] s8 -> panels (zero columns past out). */
static void vn_pack(int8_t *dst, const int8_t *q, int out, int in) {
  const int kq = in / 4, panels = (out + VN_COLS - 1) / VN_COLS;
  for (int p = 0; p < panels; p++)
    for (int k = 0; k < kq; k++)
      for (int j = 0; j < VN_COLS; j++) {
        const int o = p * VN_COLS + j;
        int8_t *d = dst + ((size_t)p * kq + k) * 128 + (size_t)j * 4;
        for (int t = 0; t < 4; t++) d[t] = o < out ? q[(size_t)o * in + 4 * k + t] : 0;
      }
}

/* vnni: int8 with the VNNI kernel where the CPU allows (column parts:
 * text layers; see above). */
static int pack(blip_k_linear *l, blip_k_prec prec, blip_k_ws *ws, int vnni) {
  pthread_once(&g_engine_once, engine_init);
  if (!g_engine) return blip_err_set(BLIP_EINVAL, "oneDNN: no CPU engine");
  if (!ws->stream && dnnl_stream_create((dnnl_stream_t *)&ws->stream, g_engine, dnnl_stream_default_flags))
    return blip_err_set(BLIP_ENOMEM, "oneDNN: cannot create a stream");
  blip_k_packed *p = calloc(1, sizeof *p);
  if (!p) return blip_err_set(BLIP_ENOMEM, "out of memory packing a %dx%d layer", l->out, l->in);
  p->prec = prec;
  p->has_bias = l->b != NULL;
  p->in = l->in;
  p->out = p->ldd = l->out;
  p->ws = ws;
  l->packed = p;
  const long n = (long)l->out * l->in;
  void *plain = NULL; /* the weights as [out,in] in the compute type */
  int rc = BLIP_OK;
  dnnl_primitive_desc_t pd = NULL;
  dnnl_status_t st;
  if (prec == BLIP_K_F32) {
    plain = (void *)l->w;
  } else if (prec == BLIP_K_BF16) {
    if (!(plain = malloc((size_t)n * 2))) goto oom;
    to_bf16(plain, l->w, n);
  } else {
    p->scale = malloc((size_t)l->out * sizeof *p->scale);
    p->colsum = malloc((size_t)l->out * sizeof *p->colsum);
    if (!l->b && !(p->zeros = calloc((size_t)l->out, sizeof *p->zeros))) goto oom;
    if (!(plain = malloc((size_t)n)) || !p->scale || !p->colsum) goto oom;
    blip_k_quant_w(plain, p->scale, p->colsum, l->w, l->out, l->in);
  }
  p->vnni = vnni && prec == BLIP_K_INT8 && l->in % 4 == 0 && vnni_usable();
  if (p->vnni) {
    p->wbytes = (size_t)((l->out + VN_COLS - 1) / VN_COLS) * (l->in / 4) * 128;
    if (!(p->w = aligned_alloc(64, p->wbytes))) goto oom;
    vn_pack(p->w, plain, l->out, l->in);
    goto done;
  }
  if ((st = make_pd(p, 256, 0, NULL, &pd))) {
    rc = dnnl_fail(st, "matmul descriptor", p, 256);
    goto done;
  }
  p->wmd = *dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
  p->wbytes = dnnl_memory_desc_get_size(&p->wmd);
  p->w = aligned_alloc(64, (p->wbytes + 63) & ~(size_t)63);
  if (!p->w) goto oom;
  dnnl_data_type_t wt = prec == BLIP_K_INT8 ? dnnl_s8 : src_type(prec);
  dnnl_memory_desc_t pmd; /* W [out,in] row-major is the [in,out] matrix in "ba" order */
  dnnl_dims_t wd = {l->in, l->out};
  if ((st = dnnl_memory_desc_init_by_tag(&pmd, 2, wd, wt, dnnl_ba)) || (st = reorder(&pmd, plain, &p->wmd, p->w, ws->stream))) {
    rc = dnnl_fail(st, "weight reorder", p, 0);
    goto done;
  }
  goto done;
oom:
  rc = blip_err_set(BLIP_ENOMEM, "out of memory packing a %dx%d layer", l->out, l->in);
done:
  if (plain != l->w) free(plain);
  if (pd) dnnl_primitive_desc_destroy(pd);
  if (rc) blip_k_linear_unpack(l);
  return rc;
}

const char *blip_k_linear_impl(const blip_k_linear *l, int M, int flags) {
  blip_k_packed *p = l->packed;
  if (!p) return "sgemm";
  if (p->n_part) p = p->part[0].packed;
  if (p->vnni) return "blip:vnni";
  dnnl_primitive_t prim;
  const_dnnl_primitive_desc_t pd;
  const char *name = NULL;
  if (get_prim(p, M, flags, &prim) || dnnl_primitive_get_primitive_desc(prim, &pd) ||
      dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name))
    return NULL;
  return name;
}

int blip_k_linear_pack(blip_k_linear *l, blip_k_prec prec, blip_k_ws *ws) { return pack(l, prec, ws, 0); }

int blip_k_linear_pack_parts(blip_k_linear *l, blip_k_prec prec, blip_k_ws *ws, int parts) {
  if (parts > l->out / 16) parts = l->out / 16;
  if (parts <= 1) return blip_k_linear_pack(l, prec, ws);
  blip_k_packed *p = calloc(1, sizeof *p);
  if (!p) return blip_err_set(BLIP_ENOMEM, "out of memory packing a %dx%d layer", l->out, l->in);
  *p = (blip_k_packed){.prec = prec, .in = l->in, .out = l->out, .ldd = l->out, .has_bias = l->b != NULL, .ws = ws};
  l->packed = p;
  p->part = calloc((size_t)parts, sizeof *p->part);
  p->c0 = calloc((size_t)parts + 1, sizeof *p->c0);
  if (!p->part || !p->c0) {
    blip_k_linear_unpack(l);
    return blip_err_set(BLIP_ENOMEM, "out of memory packing a %dx%d layer", l->out, l->in);
  }
  p->n_part = parts;
  for (int i = 0; i <= parts; i++) p->c0[i] = (int)((long)l->out * i / parts / 16 * 16);
  p->c0[parts] = l->out;
  int rc = BLIP_OK;
  for (int i = 0; i < parts && !rc; i++) {
    const int c0 = p->c0[i];
    p->part[i] = (blip_k_linear){.in = l->in, .out = p->c0[i + 1] - c0, .w = l->w + (size_t)c0 * l->in, .b = l->b ? l->b + c0 : NULL};
    if (!(rc = pack(&p->part[i], prec, ws, 1))) {
      p->part[i].packed->ldd = l->out;
      p->part[i].w = NULL;
      if (dnnl_stream_create((dnnl_stream_t *)&p->part[i].packed->stream, g_engine, dnnl_stream_default_flags))
        rc = blip_err_set(BLIP_ENOMEM, "oneDNN: cannot create a stream");
    }
  }
  if (rc) blip_k_linear_unpack(l);
  return rc;
}

static INLINE float dq1(const int32_t *acc, int32_t comp, float scale, float bias) {
  int32_t a;
  memcpy(&a, acc, 4);
  return (float)(a - comp) * scale + bias;
}

/* int8 epilogue for one row: y = (acc - zp colsum) rs cs + b, then flags.
 * acc may be out itself: each element is read (memcpy: no aliasing UB)
 * before it is written. One loop per flag set, so each vectorizes. */
static INLINE void dequant_row(float *out, const int32_t *acc, int N, float rs, int32_t zp, const float *cs, const int32_t *colsum,
                        const float *b, int flags) {
#define DQ(j) dq1(acc + (j), zp * colsum[j], rs * cs[j], b[j])
  switch (flags & (BLIP_K_GELU | BLIP_K_ACCUM)) {
  case 0:
#pragma omp simd
    for (int j = 0; j < N; j++) out[j] = DQ(j);
    break;
  case BLIP_K_GELU:
#pragma omp simd
    for (int j = 0; j < N; j++) out[j] = gelu(DQ(j));
    break;
  case BLIP_K_ACCUM:
#pragma omp simd
    for (int j = 0; j < N; j++) out[j] += DQ(j);
    break;
  default:
#pragma omp simd
    for (int j = 0; j < N; j++) out[j] += gelu(DQ(j));
  }
}

/* The same epilogue writing bf16 (no residual: flags is 0 or BLIP_K_GELU). */
static INLINE void dequant_row_bf16(uint16_t *out, const int32_t *acc, int N, float rs, int32_t zp, const float *cs, const int32_t *colsum,
                             const float *b, int flags) {
  if (flags & BLIP_K_GELU) {
#pragma omp simd
    for (int j = 0; j < N; j++) out[j] = bf16_rne(gelu(DQ(j)));
  } else {
#pragma omp simd
    for (int j = 0; j < N; j++) out[j] = bf16_rne(DQ(j));
  }
#undef DQ
}

/* The epilogue on `rows` rows of acc (lda apart) into out (ldo apart, bf16
 * with BLIP_K_OUT_BF16): one call per VNNI tile or per row of a oneDNN
 * result, so that the per-call cost is paid once for the tile's rows. */
DISPATCH static void dequant_rows(void *out, size_t ldo, const int32_t *acc, size_t lda, int rows, int N, const float *rs, const int32_t *zp,
                                  const float *cs, const int32_t *colsum, const float *b, int flags) {
  for (int i = 0; i < rows; i++) {
    if (flags & BLIP_K_OUT_BF16)
      dequant_row_bf16((uint16_t *)out + i * ldo, acc + i * lda, N, rs[i], zp[i], cs, colsum, b, flags);
    else
      dequant_row((float *)out + i * ldo, acc + i * lda, N, rs[i], zp[i], cs, colsum, b, flags);
  }
}

/* A packed layer's input as its matmul reads it: f32 as given, bf16, or
 * u8 with a scale and zero point per row. Converted rows live in the
 * model's workspace: prep_bytes of it, from its start. */
typedef struct {
  const void *src;
  float *rs;
  int32_t *zp;
  void *scratch; /* K_USER_SCRATCH: the matmul's scratchpad */
} mm_in;

/* Bytes of the converted rows (bf16 or u8), rounded up to a cache line. */
static size_t conv_bytes(blip_k_prec prec, int M, int K) {
  return ((size_t)M * K * (prec == BLIP_K_BF16 ? 2 : 1) + 63) & ~(size_t)63;
}

static size_t prep_bytes(blip_k_prec prec, int M, int K, int flags) {
  if (prec == BLIP_K_F32 || (flags & BLIP_K_IN_BF16)) return 0;
  return conv_bytes(prec, M, K) + (prec == BLIP_K_INT8 ? (size_t)M * 8 : 0);
}

/* Where the input of M rows is read from: in itself, or converted in w. */
static mm_in prep_at(blip_k_prec prec, char *w, const void *in, int M, int K, int flags) {
  if (!prep_bytes(prec, M, K, flags)) return (mm_in){in, NULL, NULL, NULL};
  const size_t q = conv_bytes(prec, M, K);
  if (prec == BLIP_K_BF16) return (mm_in){w, NULL, NULL, NULL};
  float *rs = (float *)(void *)(w + q);
  return (mm_in){w, rs, (int32_t *)(void *)(rs + M), NULL};
}

/* Convert rows r0..r1 of the input into mi (a no-op when mi reads in). */
static void prep_rows(const mm_in *mi, const void *in, int K, int r0, int r1) {
  if (mi->src == in) return;
  if (!mi->rs) {
    to_bf16_run((uint16_t *)mi->src + (size_t)r0 * K, (const float *)in + (size_t)r0 * K, (long)(r1 - r0) * K);
    return;
  }
  for (int i = r0; i < r1; i++)
    blip_k_quant_row((uint8_t *)mi->src + (size_t)i * K, &mi->rs[i], &mi->zp[i], (const float *)in + (size_t)i * K, K);
}

/* Panels p0..p1 for rows r0..r1 of the layer's output. */
static void vnni_panels(const blip_k_packed *p, const float *b, void *out, const mm_in *mi, int r0, int r1, int p0, int p1, int flags) {
  int32_t acc[VN_ROWS * VN_COLS] __attribute__((aligned(64)));
  const int K = p->in, kq = K / 4, es = OUT_SIZE(flags);
  const uint8_t *a = mi->src;
  for (int pn = p0; pn < p1; pn++) {
    const int c0 = pn * VN_COLS, nc = p->out - c0 < VN_COLS ? p->out - c0 : VN_COLS;
    const int8_t *w = (const int8_t *)p->w + (size_t)pn * kq * 128;
    for (int r = r0; r < r1; r += VN_ROWS) {
      const int mr = r1 - r < VN_ROWS ? r1 - r : VN_ROWS;
      vn_tile_any(acc, a + (size_t)r * K, K, w, kq, mr);
      dequant_rows((char *)out + ((size_t)r * p->ldd + c0) * es, p->ldd, acc, VN_COLS, mr, nc, mi->rs + r, mi->zp + r, p->scale + c0,
                   p->colsum + c0, b + c0, flags);
    }
  }
}

static int vnni_mm(const blip_k_packed *p, const float *bias, void *out, const mm_in *mi, int M, int flags, int threaded) {
  const float *b = bias ? bias : p->zeros;
  const int panels = (p->out + VN_COLS - 1) / VN_COLS;
  for (int r0 = 0; r0 < M; r0 += VN_CHUNK) {
    const int r1 = M - r0 < VN_CHUNK ? M : r0 + VN_CHUNK;
    if (!threaded) {
      vnni_panels(p, b, out, mi, r0, r1, 0, panels, flags);
      continue;
    }
#pragma omp parallel if ((long)(r1 - r0) * p->out * p->in > 65536)
    {
      const int nt = omp_get_num_threads(), id = omp_get_thread_num();
      vnni_panels(p, b, out, mi, r0, r1, (int)((long)panels * id / nt), (int)((long)panels * (id + 1) / nt), flags);
    }
  }
  return BLIP_OK;
}

/* The matmul of one packed layer (or column part) on prepared input, with
 * the int8 epilogue; out's rows are p->ldd apart. acc: int8 scratch
 * [M, p->out] when own_acc. threaded 0: inside a parallel region (oneDNN
 * then runs on the calling thread, and so does the epilogue); -1: the
 * same, with other threads running this layer on other rows, so its
 * matmul for M rows must exist already (blip_k_rows_prepare). */
static int run_mm(blip_k_packed *p, const float *bias, void *out, const mm_in *mi, int32_t *acc, int M, int flags, void *stream,
                  int threaded) {
  if (p->vnni) return vnni_mm(p, bias, out, mi, M, flags, threaded > 0);
  const int K = p->in, N = p->out, ldd = p->ldd;
  dnnl_primitive_t prim = NULL;
  int rc = threaded >= 0 ? get_prim(p, M, flags, &prim) : find_prim(p, M, flags, &prim);
  if (rc) return rc;
  if (!own_acc(p, flags)) acc = out;
  dnnl_memory_desc_t smd, dmd, bmd;
  dnnl_dims_t sd = {M, K}, dd = {M, N}, bd = {1, N}, ds = {dst_ld(p, flags), 1};
  dnnl_memory_t ms = NULL, mw = NULL, mb = NULL, md = NULL, msc = NULL;
  dnnl_status_t st;
  if ((flags & K_USER_SCRATCH) && (st = dnnl_memory_create(&msc, scratch_md(prim), g_engine, mi->scratch))) goto done;
  if ((st = dnnl_memory_desc_init_by_tag(&smd, 2, sd, src_type(p->prec), dnnl_ab)) ||
      (st = dnnl_memory_desc_init_by_strides(&dmd, 2, dd, dst_type(p->prec, flags), ds)) ||
      (st = dnnl_memory_desc_init_by_tag(&bmd, 2, bd, dnnl_f32, dnnl_ab)) ||
      (st = dnnl_memory_create(&ms, &smd, g_engine, (void *)mi->src)) || (st = dnnl_memory_create(&mw, &p->wmd, g_engine, p->w)) ||
      (st = dnnl_memory_create(&mb, &bmd, g_engine, (void *)bias)) || (st = dnnl_memory_create(&md, &dmd, g_engine, acc)))
    goto done;
  {
    dnnl_exec_arg_t args[5] = {{DNNL_ARG_SRC, ms}, {DNNL_ARG_WEIGHTS, mw}, {DNNL_ARG_DST, md}, {DNNL_ARG_BIAS, mb}};
    int nargs = (p->prec == BLIP_K_INT8 || !bias) ? 3 : 4;
    if (msc) args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, msc};
    if (!(st = dnnl_primitive_execute(prim, stream, nargs, args))) st = dnnl_stream_wait(stream);
  }
done:
  if (ms) dnnl_memory_destroy(ms);
  if (mw) dnnl_memory_destroy(mw);
  if (mb) dnnl_memory_destroy(mb);
  if (md) dnnl_memory_destroy(md);
  if (msc) dnnl_memory_destroy(msc);
  if (st) return dnnl_fail(st, "matmul", p, M);
  if (p->prec == BLIP_K_INT8) {
    const float *b = bias ? bias : p->zeros;
    const int lda = dst_ld(p, flags);
#pragma omp parallel for if (threaded > 0 && (long)M * N > 32768)
    for (int i = 0; i < M; i++) {
      dequant_rows((char *)out + (size_t)i * ldd * OUT_SIZE(flags), ldd, acc + (size_t)i * lda, lda, 1, N, mi->rs + i, mi->zp + i, p->scale,
                   p->colsum, b, flags);
    }
  } else if (own_acc(p, flags)) { /* a column part: its dense result into out's columns */
    const size_t es = OUT_SIZE(flags);
    for (int i = 0; i < M; i++) {
      void *o = (char *)out + (size_t)i * ldd * es;
      const void *a = (const char *)acc + (size_t)i * N * es;
      if (flags & BLIP_K_ACCUM)
        add_row(o, a, N);
      else
        memcpy(o, a, (size_t)N * es);
    }
  }
  return BLIP_OK;
}

static int packed_rows(void *out, const void *in, const blip_k_linear *l, int M, int flags) {
  blip_k_packed *p = l->packed;
  const int K = p->in;
  const size_t pb = prep_bytes(p->prec, M, K, flags), need = pb + (own_acc(p, flags) ? (size_t)M * p->out * 4 : 0);
  char *w = need ? ws_get(p->ws, need) : NULL;
  if (need && !w) return blip_err_set(BLIP_ENOMEM, "out of memory for a %dx%d activation", M, K);
  const mm_in mi = prep_at(p->prec, w, in, M, K, flags);
  if (pb && !mi.rs)
    to_bf16((uint16_t *)(void *)w, in, (long)M * K);
  else if (pb) {
#pragma omp parallel for if ((long)M * K > 32768)
    for (int i = 0; i < M; i++) prep_rows(&mi, in, K, i, i + 1);
  }
  return run_mm(p, l->b, out, &mi, (int32_t *)(void *)(w + pb), M, flags, p->ws->stream, 1);
}

/* Large M (a vision batch: 8 x 577 rows) runs as near-equal row chunks of
 * at most PACKED_CHUNK: each chunk's activations stay in cache while the
 * weights stream, measured ~1.5-2x faster than one M = 4616 matmul, and
 * the workspace stays at one chunk's size. */
#define PACKED_CHUNK 768

static int chunk_rows(int M) {
  const int chunks = (M + PACKED_CHUNK - 1) / PACKED_CHUNK;
  return (M + chunks - 1) / chunks;
}

/* A layer in column parts, called outside a team: one region, a part per thread. */
static int parted_fwd(void *out, const void *in, const blip_k_linear *l, int M, int flags) {
  int rc = blip_k_linear_reserve(l, M, flags);
  if (rc) return rc;
  blip_k_team t;
  blip_k_team_init(&t);
#pragma omp parallel
  {
    int e = blip_k_team_sync(&t, blip_k_team_linear(&t, out, in, l, M, flags));
#pragma omp master
    rc = e;
  }
  return blip_k_team_error(&t, rc);
}

static int packed_fwd(void *out, const void *in, const blip_k_linear *l, int M, int flags) {
  if (l->packed->n_part) return parted_fwd(out, in, l, M, flags);
  const int rows = chunk_rows(M);
  for (int r0 = 0; r0 < M; r0 += rows) {
    int n = M - r0 < rows ? M - r0 : rows;
    int rc = packed_rows((char *)out + (size_t)r0 * l->out * OUT_SIZE(flags), (const char *)in + (size_t)r0 * l->in * IN_SIZE(flags),
                         l, n, flags);
    if (rc) return rc;
  }
  return BLIP_OK;
}

int blip_k_mlp(float *x, const void *h, int h_flags, const blip_k_linear *fc1, const blip_k_linear *fc2, int M, float *mid) {
  const int bf = fc1->packed && fc2->packed && fc1->packed->prec == BLIP_K_BF16 && fc2->packed->prec == BLIP_K_BF16;
  h_flags &= BLIP_K_IN_BF16;
  if (fc1->packed && fc2->packed && (fc1->packed->n_part || fc2->packed->n_part)) { /* both layers in one region */
    const int f1 = BLIP_K_GELU | h_flags | (bf ? BLIP_K_OUT_BF16 : 0), f2 = BLIP_K_ACCUM | (bf ? BLIP_K_IN_BF16 : 0);
    int rc = blip_k_linear_reserve(fc1, M, f1);
    if (!rc) rc = blip_k_linear_reserve(fc2, M, f2);
    if (rc) return rc;
    blip_k_team t;
    blip_k_team_init(&t);
#pragma omp parallel
    {
      int e = blip_k_team_sync(&t, blip_k_team_linear(&t, mid, h, fc1, M, f1));
      if (!e) e = blip_k_team_sync(&t, blip_k_team_linear(&t, x, mid, fc2, M, f2));
#pragma omp master
      rc = e;
    }
    return blip_k_team_error(&t, rc);
  }
  if (!bf) {
    int rc = blip_k_linear_fwd_ex(mid, h, fc1, M, BLIP_K_GELU | h_flags);
    return rc ? rc : blip_k_linear_fwd_ex(x, mid, fc2, M, BLIP_K_ACCUM);
  }
  /* per row chunk: fc1 writes bf16 into mid, which fc2 reads while it is in cache */
  const int rows = chunk_rows(M);
  for (int r0 = 0; r0 < M; r0 += rows) {
    int n = M - r0 < rows ? M - r0 : rows;
    int rc = packed_rows(mid, (const char *)h + (size_t)r0 * fc1->in * IN_SIZE(h_flags), fc1, n, BLIP_K_GELU | BLIP_K_OUT_BF16 | h_flags);
    if (!rc) rc = packed_rows(x + (size_t)r0 * fc2->out, mid, fc2, n, BLIP_K_ACCUM | BLIP_K_IN_BF16);
    if (rc) return rc;
  }
  return BLIP_OK;
}

int blip_k_linear_fwd_ex(void *out, const void *in, const blip_k_linear *l, int M, int flags) {
  if (M == 0) return BLIP_OK;
  const blip_k_prec prec = l->packed ? l->packed->prec : BLIP_K_F32;
  if (((flags & BLIP_K_IN_BF16) && prec != BLIP_K_BF16) ||
      ((flags & BLIP_K_OUT_BF16) && (prec == BLIP_K_F32 || (flags & BLIP_K_ACCUM))))
    return blip_err_set(BLIP_EINVAL, "linear %dx%d: bf16 %s not supported by this layer", l->out, l->in,
                        (flags & BLIP_K_IN_BF16) ? "input" : "output");
  if (l->packed) return packed_fwd(out, in, l, M, flags);
  if ((flags & BLIP_K_GELU) && (flags & BLIP_K_ACCUM))
    return blip_err_set(BLIP_EINVAL, "linear: GELU with accumulation needs a packed layer");
  int rc = blip_k_gemm(0, 1, M, l->out, l->in, 1.0f, in, l->in, l->w, l->in, (flags & BLIP_K_ACCUM) ? 1.0f : 0.0f, out, l->out);
  if (rc) return rc;
  const int N = l->out;
  const float *b = l->b;
#pragma omp parallel for if ((long)M * N > 32768)
  for (int i = 0; i < M; i++) {
    float *o = (float *)out + (long)i * N;
    if (b) {
#pragma omp simd
      for (int j = 0; j < N; j++) o[j] += b[j];
    }
    if (flags & BLIP_K_GELU) {
#pragma omp simd
      for (int j = 0; j < N; j++) o[j] = 0.5f * o[j] * (1.0f + erf_approx(o[j] * 0.70710678118654752f));
    }
  }
  return BLIP_OK;
}

int blip_k_linear_fwd(float *out, const float *in, const blip_k_linear *l, int M) {
  return blip_k_linear_fwd_ex(out, in, l, M, 0);
}

/* LayerNorm of one row: returns the mean, *rs = 1 / sqrt(var + eps). */
static INLINE float ln_stats(const float *in, int N, float eps, float *rs) {
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
  *rs = 1.0f / sqrtf(var + eps);
  return mean;
}

DISPATCH static void ln_row(float *out, const float *in, const float *g, const float *b, int N, float eps) {
  float rs, mean = ln_stats(in, N, eps, &rs);
#pragma omp simd
  for (int j = 0; j < N; j++) out[j] = (in[j] - mean) * rs * g[j] + b[j];
}

DISPATCH static void ln_row_bf16(uint16_t *out, const float *in, const float *g, const float *b, int N, float eps) {
  float rs, mean = ln_stats(in, N, eps, &rs);
#pragma omp simd
  for (int j = 0; j < N; j++) out[j] = bf16_rne((in[j] - mean) * rs * g[j] + b[j]);
}

void blip_k_layernorm_bf16(uint16_t *out, const float *in, const float *g, const float *b, int M, int N, float eps) {
#pragma omp parallel for if ((long)M * N > 32768)
  for (int i = 0; i < M; i++) ln_row_bf16(out + (long)i * N, in + (long)i * N, g, b, N, eps);
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

#pragma omp declare simd
float blip_k_expf(float x) { return exp_approx(x); }

#pragma omp declare simd
float blip_k_erff(float x) { return erf_approx(x); }

void blip_k_gelu(float *x, long n) {
#pragma omp parallel for simd if (n > 65536)
  for (long i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erf_approx(x[i] * 0.70710678118654752f));
}

/* x = exp(x - max x) in place; returns the sum (softmax without the division). */
static INLINE float exp_shifted(float *x, int n) {
  float mx = -INFINITY, sum = 0;
#pragma omp simd reduction(max : mx)
  for (int j = 0; j < n; j++) mx = x[j] > mx ? x[j] : mx;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; j++) {
    x[j] = exp_approx(x[j] - mx);
    sum += x[j];
  }
  return sum;
}

DISPATCH static void softmax_row(float *x, int n) {
  float inv = 1.0f / exp_shifted(x, n);
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

/* ---------- fused attention (AVX-512) ----------
 * One head and one block of FA_ROWS query rows at a time: the block's
 * scores stay in L1/L2 ([FA_ROWS, Lk] f32), where the batched path writes
 * an [H, Lq, Lk] score matrix (16 MB for a vision layer) to memory and
 * reads it back twice. Each thread packs K and V of the heads it works on
 * into panels of FA_COLS output columns (K by key, V by head dimension),
 * then runs one register tile of FA_ROWS x FA_COLS accumulators (24 zmm)
 * per panel, for q k^T and for p v. bf16 operands multiply pairs of the
 * inner dimension with vdpbf16ps (CPUs with AVX512-BF16; probabilities
 * rounded to bf16 as in the batched path); f32 operands use FMA, and each
 * output row is scaled by 1/sum at the end. */
#define FA_ROWS 12
#define FA_COLS 32
#define FA_ROUND(n) (((size_t)(n) + 63) & ~(size_t)63)

#if defined(__x86_64__) && defined(__GNUC__)
/* Per-thread scratch: packed K, packed V, scores, bf16 probabilities. */
typedef struct {
  int bf, Lk, dh, kpan, vpan, kin, vin, ls, lp;
  size_t kb, vb, sb, pb;
} fa_dims;

static fa_dims fa_dims_of(int bf, int Lk, int dh) {
  fa_dims d = {bf, Lk, dh, (Lk + FA_COLS - 1) / FA_COLS, (dh + FA_COLS - 1) / FA_COLS, 0, 0, 0, 0, 0, 0, 0, 0};
  d.kin = bf ? dh / 2 : dh;             /* inner steps of q k^T (pairs for bf16) */
  d.vin = bf ? (Lk + 1) / 2 : Lk;       /* inner steps of p v */
  d.ls = d.kpan * FA_COLS;              /* score row stride */
  d.lp = bf ? 2 * d.vin : d.ls;         /* probability row stride (f32: in the scores) */
  const size_t step = (size_t)FA_COLS * 4; /* bytes of one inner step of a panel: 32 f32 or 32 bf16 pairs */
  d.kb = FA_ROUND((size_t)d.kpan * d.kin * step);
  d.vb = FA_ROUND((size_t)d.vpan * d.vin * step);
  d.sb = FA_ROUND((size_t)FA_ROWS * d.ls * 4);
  d.pb = bf ? FA_ROUND((size_t)FA_ROWS * d.lp * 2) : 0;
  return d;
}

#define FA_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* A head's rows of K and V are a page or more apart, and the hardware
 * prefetchers stop at page boundaries, so the packs fetch rows FA_AHEAD
 * keys ahead themselves (and read K row by row, not by gathers across 16
 * pages). One thread, one vision layer: packing went from 8% to 4% of the
 * f32 attention and from 14% to 10% of the int8 one. */
#define FA_AHEAD 16

/* Rows j0..j1 (of n) of `bytes` each, ld bytes apart from base. */
static inline __attribute__((always_inline)) void fa_prefetch(const char *base, size_t ld, size_t bytes, int j0, int j1, int n) {
  for (int j = j0; j < j1 && j < n; j++)
    for (size_t b = 0; b < bytes; b += 64) _mm_prefetch(base + j * ld + b, _MM_HINT_T0);
}

/* r[0..16) -> its transpose, as 16 x 16 32-bit words. */
static inline __attribute__((always_inline)) FA_TARGET void fa_tr16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) { /* u[i + m]: word 4L + m of rows i..i+3 in 128-bit lane L */
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int m = 0; m < 4; m++) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x88), v1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xdd);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x88), v3 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xdd);
    r[m] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + m] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[8 + m] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    r[12 + m] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
}

/* Rows of `words` 32-bit words (row j at rows + j * ld bytes, n of them)
 * -> panels [words][FA_COLS], row j in column j % FA_COLS of panel
 * j / FA_COLS (panels pstride words apart); rows n..pad are zero. In
 * 16 x 16 blocks. */
static FA_TARGET void fa_tr_rows(int32_t *dst, size_t pstride, const char *rows, size_t ld, int n, int pad, int words) {
  fa_prefetch(rows, ld, (size_t)words * 4, 0, FA_AHEAD, n);
  for (int j0 = 0; j0 < pad; j0 += 16) {
    fa_prefetch(rows, ld, (size_t)words * 4, j0 + FA_AHEAD, j0 + 16 + FA_AHEAD, n);
    int32_t *o = dst + (size_t)(j0 / FA_COLS) * pstride + j0 % FA_COLS;
    for (int t0 = 0; t0 < words; t0 += 16) {
      const int nw = words - t0 < 16 ? words - t0 : 16;
      const __mmask16 m = (__mmask16)((1u << nw) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; i++)
        r[i] = j0 + i < n ? _mm512_maskz_loadu_epi32(m, rows + (size_t)(j0 + i) * ld + (size_t)t0 * 4) : _mm512_setzero_si512();
      fa_tr16(r);
      for (int i = 0; i < nw; i++) _mm512_storeu_si512((void *)(o + (size_t)(t0 + i) * FA_COLS), r[i]);
    }
  }
}

/* K [Lk, dh] (rows ldk elements apart) -> panels [kpan][kin][FA_COLS keys]
 * of 32-bit words (an f32, or a pair of bf16); keys past Lk are zero. */
static FA_TARGET void fa_pack_k(void *dst, const void *k, int ldk, const fa_dims *d) {
  fa_tr_rows(dst, (size_t)d->kin * FA_COLS, k, (size_t)ldk * (d->bf ? 2 : 4), d->Lk, d->kpan * FA_COLS, d->kin);
}

/* V [Lk, dh] -> panels [vpan][vin][FA_COLS dims]: f32 rows, or bf16 pairs
 * of consecutive keys (two rows interleaved); past Lk and dh zero. */
static FA_TARGET void fa_pack_v(void *dst, const void *v, int ldv, const fa_dims *d) {
  const __m512i lo = _mm512_setr_epi32(0x200000, 0x210001, 0x220002, 0x230003, 0x240004, 0x250005, 0x260006, 0x270007, 0x280008,
                                       0x290009, 0x2a000a, 0x2b000b, 0x2c000c, 0x2d000d, 0x2e000e, 0x2f000f);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const int rows = d->bf ? 2 : 1; /* keys per step */
  const size_t row = (size_t)ldv * (d->bf ? 2 : 4), bytes = (size_t)d->dh * (d->bf ? 2 : 4);
  fa_prefetch(v, row, bytes, 0, FA_AHEAD, d->Lk);
  for (int t = 0; t < d->vin; t++) {
    fa_prefetch(v, row, bytes, t * rows + FA_AHEAD, (t + 1) * rows + FA_AHEAD, d->Lk);
    for (int p = 0; p < d->vpan; p++) {
      const int c0 = p * FA_COLS, nc = d->dh - c0 < FA_COLS ? d->dh - c0 : FA_COLS;
      const __mmask32 m = nc == 32 ? 0xffffffffu : (__mmask32)((1u << nc) - 1);
      if (d->bf) {
        const uint16_t *r0 = (const uint16_t *)v + (size_t)2 * t * ldv + c0;
        const __m512i a = _mm512_maskz_loadu_epi16(m, r0), b = 2 * t + 1 < d->Lk ? _mm512_maskz_loadu_epi16(m, r0 + ldv) : _mm512_setzero_si512();
        uint16_t *o = (uint16_t *)dst + ((size_t)p * d->vin + t) * 2 * FA_COLS;
        _mm512_storeu_si512((void *)o, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512((void *)(o + FA_COLS), _mm512_permutex2var_epi16(a, hi, b));
      } else {
        const float *r0 = (const float *)v + (size_t)t * ldv + c0;
        float *o = (float *)dst + ((size_t)p * d->vin + t) * FA_COLS;
        _mm512_storeu_ps(o, _mm512_maskz_loadu_ps((__mmask16)m, r0));
        _mm512_storeu_ps(o + 16, _mm512_maskz_loadu_ps((__mmask16)(m >> 16), r0 + 16));
      }
    }
  }
}

/* exp(x) for x <= 0 (a softmax's shifted scores): exp_approx with
 * vscalefps applying 2^n (it flushes very negative x to 0, so no clamp).
 * A shorter polynomial (Taylor to r^4, 4e-5 relative) was measured: it
 * flips the bf16 rounding of some probabilities, and with them a tiny
 * model's greedy caption (test_caption_index). */
static inline __attribute__((always_inline)) FA_TARGET __m512 fa_exp(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

/* One score row s[0..n) -> exp(sc s + mask - max) in place (f32), or the
 * normalized probabilities rounded to bf16 into pr (bf16: pr[n] = 0 when
 * the row stride has room for it); returns 1/sum (bf16: 1, applied). */
static FA_TARGET float fa_softmax(float *s, int n, float sc, const float *mask, uint16_t *pr, int pad) {
  __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
    __m512 x = _mm512_maskz_loadu_ps(m, s + j);
    if (mask) _mm512_mask_storeu_ps(s + j, m, x = _mm512_fmadd_ps(x, _mm512_set1_ps(sc), _mm512_maskz_loadu_ps(m, mask + j)));
    mx = _mm512_mask_max_ps(mx, m, mx, x);
  }
  if (mask) sc = 1;
  const __m512 scv = _mm512_set1_ps(sc), off = _mm512_set1_ps(-_mm512_reduce_max_ps(mx) * sc);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
    const __m512 e = fa_exp(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, s + j), scv, off));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(sum);
  if (!pr) return inv;
  const __m512 iv = _mm512_set1_ps(inv);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
    _mm256_mask_storeu_epi16(pr + j, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), iv)));
  }
  if (pad) pr[n] = 0;
  return 1;
}

/* c[r][0..31] (rows ldc apart) = a[r] . panel b, mr rows of a (lda apart),
 * n inner steps: f32 (bf 0) or bf16 pairs (bf 1). */
static inline __attribute__((always_inline)) FA_TARGET void fa_tile(float *c_out, int ldc, const void *a, int lda, const void *b, int n,
                                                                    const int mr, const int bf) {
  __m512 c[FA_ROWS][2];
#pragma GCC unroll 12
  for (int r = 0; r < mr; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
  const char *bp = b;
  for (int t = 0; t < n; t++, bp += FA_COLS * 4) {
    const __m512 w0 = _mm512_loadu_ps((const void *)bp), w1 = _mm512_loadu_ps((const void *)(bp + 64));
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) {
      if (bf) {
        int32_t x;
        memcpy(&x, (const uint16_t *)a + (size_t)r * lda + 2 * t, 4);
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(x);
        c[r][0] = _mm512_dpbf16_ps(c[r][0], xb, (__m512bh)w0);
        c[r][1] = _mm512_dpbf16_ps(c[r][1], xb, (__m512bh)w1);
      } else {
        const __m512 x = _mm512_set1_ps(((const float *)a)[(size_t)r * lda + t]);
        c[r][0] = _mm512_fmadd_ps(x, w0, c[r][0]);
        c[r][1] = _mm512_fmadd_ps(x, w1, c[r][1]);
      }
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < mr; r++) {
    _mm512_storeu_ps(c_out + (size_t)r * ldc, c[r][0]);
    _mm512_storeu_ps(c_out + (size_t)r * ldc + 16, c[r][1]);
  }
}

static FA_TARGET void fa_tile_any(float *c, int ldc, const void *a, int lda, const void *b, int n, int mr, int bf) {
  switch (mr + FA_ROWS * bf) { /* each row count its own unrolled body */
#define FA_CASE(m) \
  case m: fa_tile(c, ldc, a, lda, b, n, m, 0); break; \
  case m + FA_ROWS: fa_tile(c, ldc, a, lda, b, n, m, 1); break;
    FA_CASE(1) FA_CASE(2) FA_CASE(3) FA_CASE(4) FA_CASE(5) FA_CASE(6) FA_CASE(7) FA_CASE(8) FA_CASE(9) FA_CASE(10) FA_CASE(11)
#undef FA_CASE
    default:
      if (bf) fa_tile(c, ldc, a, lda, b, n, FA_ROWS, 1);
      else fa_tile(c, ldc, a, lda, b, n, FA_ROWS, 0);
  }
}

/* One head's rows r0..r0+mr: out = softmax(scale q k^T + mask) v. */
static FA_TARGET void fa_block(void *out, int ldo, int obf16, const void *q, int ldq, const void *kp, const void *vp,
                               const fa_dims *d, int mr, float scale, const float *mask, float *S, uint16_t *P) {
  const size_t step = (size_t)FA_COLS * 4;
  for (int p = 0; p < d->kpan; p++)
    fa_tile_any(S + p * FA_COLS, d->ls, q, ldq, (const char *)kp + (size_t)p * d->kin * step, d->kin, mr, d->bf);
  float inv[FA_ROWS];
  for (int r = 0; r < mr; r++)
    inv[r] = fa_softmax(S + (size_t)r * d->ls, d->Lk, scale, mask, d->bf ? P + (size_t)r * d->lp : NULL, d->lp > d->Lk);
  float acc[FA_ROWS * FA_COLS];
  const void *pa = d->bf ? (const void *)P : (const void *)S;
  for (int p = 0; p < d->vpan; p++) {
    const int c0 = p * FA_COLS, nc = d->dh - c0 < FA_COLS ? d->dh - c0 : FA_COLS;
    fa_tile_any(acc, FA_COLS, pa, d->lp, (const char *)vp + (size_t)p * d->vin * step, d->vin, mr, d->bf);
    for (int r = 0; r < mr; r++) {
      const float *ar = acc + r * FA_COLS, f = inv[r];
      if (obf16) {
        uint16_t *o = (uint16_t *)out + (size_t)r * ldo + c0;
#pragma omp simd
        for (int c = 0; c < nc; c++) o[c] = bf16_rne(ar[c] * f);
      } else {
        float *o = (float *)out + (size_t)r * ldo + c0;
#pragma omp simd
        for (int c = 0; c < nc; c++) o[c] = ar[c] * f;
      }
    }
  }
}

/* ---------- int8 fused attention (AVX512-VNNI) ----------
 * The int8 model's attention, on its bf16 q, k, v: the same blocks as
 * above with vpdpbusd tiles (vn_tile), at twice the bf16 rate. Scales are
 * symmetric per (row, head) for q, per (key, head) for k and per (head,
 * column) for v; q is stored as u8 with +128 (its offset is removed with
 * each key's sum); the probabilities exp(s - max) in [0, 1] are stored as
 * u8 x 255 and the output divided by their u8 sum, so the weights that
 * multiply v sum to exactly one. */
#define FA8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

typedef struct {
  int Lk, dh, kpan, vpan, kq, vq, ls, lp;
  size_t kb, vb, sb, pb;
} fa8_dims;

static fa8_dims fa8_dims_of(int Lk, int dh) {
  fa8_dims d = {Lk, dh, (Lk + FA_COLS - 1) / FA_COLS, (dh + FA_COLS - 1) / FA_COLS, dh / 4, (Lk + 3) / 4, 0, 0, 0, 0, 0, 0};
  d.ls = d.kpan * FA_COLS;
  d.lp = 4 * d.vq;
  d.kb = FA_ROUND((size_t)d.kpan * d.kq * 128 + (size_t)d.ls * 8); /* panels, then per key: scale, offset term */
  d.vb = FA_ROUND((size_t)d.vpan * d.vq * 128 + (size_t)d.vpan * FA_COLS * 4); /* panels, then per column: scale */
  d.sb = FA_ROUND((size_t)FA_ROWS * d.ls * 4);
  d.pb = FA_ROUND((size_t)FA_ROWS * d.lp + (size_t)FA_ROWS * d.dh);
  return d;
}

static inline __attribute__((always_inline)) FA8_TARGET __m512 fa8_load16(const uint16_t *p) { /* 16 bf16 -> f32 */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16));
}

/* Row x[0..dh) (bf16, dh % 16 == 0) -> s8 in o (16 bytes per chunk, chunk
 * c at o + c * ostep); returns the scale, *sum = the s8 sum. */
static inline __attribute__((always_inline)) FA8_TARGET float fa8_quant_row(int8_t *o, size_t ostep, const uint16_t *x, int dh, int *sum) {
  __m512 mx = _mm512_setzero_ps();
  for (int c = 0; c < dh; c += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(fa8_load16(x + c)));
  const float m = _mm512_reduce_max_ps(mx), sc = m > 0 ? m / 127 : 1;
  const __m512 inv = _mm512_set1_ps(1 / sc);
  __m512i s = _mm512_setzero_si512();
  for (int c = 0; c < dh; c += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(fa8_load16(x + c), inv)); /* |q| <= 127 */
    s = _mm512_add_epi32(s, q);
    _mm_storeu_si128((void *)(o + (size_t)(c / 16) * ostep), _mm512_cvtsepi32_epi8(q));
  }
  *sum = _mm512_reduce_add_epi32(s);
  return sc;
}

/* K -> VNNI panels [kpan][kq][32 keys][4] (keys past Lk zero), and per key
 * its scale and -128 x scale x sum (the u8 offset of q). */
static FA8_TARGET void fa8_pack_k(void *dst, const uint16_t *k, int ldk, const fa8_dims *d) {
  int8_t *w = dst;
  float *ks = (float *)(void *)(w + (size_t)d->kpan * d->kq * 128), *ko = ks + d->ls;
  memset(ks + d->Lk, 0, sizeof(float) * (size_t)(d->ls - d->Lk));
  memset(ko + d->Lk, 0, sizeof(float) * (size_t)(d->ls - d->Lk));
  int8_t rows[16 * 1024] __attribute__((aligned(64))); /* 16 keys, dh <= 1024 */
  const size_t row = (size_t)ldk * 2;
  fa_prefetch((const char *)k, row, (size_t)d->dh * 2, 0, FA_AHEAD, d->Lk);
  for (int j0 = 0; j0 < d->kpan * FA_COLS; j0 += 16) { /* 16 keys quantized, then transposed into their panel */
    fa_prefetch((const char *)k, row, (size_t)d->dh * 2, j0 + FA_AHEAD, j0 + 16 + FA_AHEAD, d->Lk);
    const int n = d->Lk - j0 < 16 ? (d->Lk > j0 ? d->Lk - j0 : 0) : 16;
    for (int i = 0; i < n; i++) {
      int sum;
      ks[j0 + i] = fa8_quant_row(rows + (size_t)i * d->dh, 16, k + (size_t)(j0 + i) * ldk, d->dh, &sum);
      ko[j0 + i] = -128.0f * (float)sum * ks[j0 + i];
    }
    fa_tr_rows((int32_t *)(void *)(w + (size_t)(j0 / FA_COLS) * d->kq * 128) + j0 % FA_COLS, 0, (const char *)rows, (size_t)d->dh, n, 16, d->kq);
  }
}

/* V -> VNNI panels [vpan][vq][32 columns][4 keys] (keys past Lk zero) and
 * a scale per column (the head's max over all keys). */
static FA8_TARGET void fa8_pack_v(void *dst, const uint16_t *v, int ldv, const fa8_dims *d) {
  int8_t *w = dst;
  float *vs = (float *)(void *)(w + (size_t)d->vpan * d->vq * 128);
  if (d->dh % FA_COLS) memset(w, 0, (size_t)d->vpan * d->vq * 128); /* the last panel's columns past dh */
  memset(vs, 0, sizeof(float) * (size_t)d->dh);
  fa_prefetch((const char *)v, (size_t)ldv * 2, (size_t)d->dh * 2, 0, FA_AHEAD, d->Lk);
  for (int j = 0; j < d->Lk; j++) { /* key by key (see FA_AHEAD), the max of each column */
    fa_prefetch((const char *)v, (size_t)ldv * 2, (size_t)d->dh * 2, j + FA_AHEAD, j + FA_AHEAD + 1, d->Lk);
    for (int c = 0; c < d->dh; c += 16)
      _mm512_storeu_ps(vs + c, _mm512_max_ps(_mm512_loadu_ps(vs + c), _mm512_abs_ps(fa8_load16(v + (size_t)j * ldv + c))));
  }
  for (int c = 0; c < d->dh; c += 16) {
    const __m512 mx = _mm512_loadu_ps(vs + c);
    const __mmask16 z = _mm512_cmp_ps_mask(mx, _mm512_setzero_ps(), _CMP_EQ_OQ);
    _mm512_storeu_ps(vs + c, _mm512_mask_blend_ps(z, _mm512_div_ps(mx, _mm512_set1_ps(127)), _mm512_set1_ps(1)));
  }
  for (int c = 0; c < d->dh; c += 16) {
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1), _mm512_loadu_ps(vs + c));
    int8_t *o = w + ((size_t)(c / FA_COLS) * d->vq) * 128 + (size_t)(c % FA_COLS) * 4;
    for (int j0 = 0; j0 < d->Lk; j0 += 4, o += 128) {
      __m128i r[4];
      for (int t = 0; t < 4; t++)
        r[t] = j0 + t < d->Lk ? _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(fa8_load16(v + (size_t)(j0 + t) * ldv + c), inv)))
                              : _mm_setzero_si128();
      const __m128i a = _mm_unpacklo_epi8(r[0], r[1]), b = _mm_unpackhi_epi8(r[0], r[1]), e = _mm_unpacklo_epi8(r[2], r[3]),
                    f = _mm_unpackhi_epi8(r[2], r[3]);
      _mm_storeu_si128((void *)o, _mm_unpacklo_epi16(a, e)); /* columns c..c+3, 4 keys each */
      _mm_storeu_si128((void *)(o + 16), _mm_unpackhi_epi16(a, e));
      _mm_storeu_si128((void *)(o + 32), _mm_unpacklo_epi16(b, f));
      _mm_storeu_si128((void *)(o + 48), _mm_unpackhi_epi16(b, f));
    }
  }
}

/* 255 exp(x) given t = x log2(e) <= 0: 2^f for f = t - rint(t) in
 * [-1/2, 1/2] by Taylor to f^4 (4e-5 relative, a tenth of a u8 step at the
 * top), 2^rint(t) by vscalefps. */
static inline __attribute__((always_inline)) FA8_TARGET __m512 fa8_exp255(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(255 * 9.6181291e-3f), f, _mm512_set1_ps(255 * 5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(255 * 2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(255 * 6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(255));
  return _mm512_scalef_ps(p, n);
}

/* Score row s[0..n) (scaled by sc) -> u8 probabilities x 255 in pr (zero
 * to lp); returns 1 / their sum. */
static FA8_TARGET float fa8_softmax(const float *s, int n, float sc, uint8_t *pr, int lp) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, s + j));
  }
  sc *= 1.44269504088896341f;
  const __m512 scv = _mm512_set1_ps(sc), off = _mm512_set1_ps(-_mm512_reduce_max_ps(mx) * sc);
  __m512i sum = _mm512_setzero_si512();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
    const __m512i p = _mm512_maskz_cvtps_epi32(m, fa8_exp255(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, s + j), scv, off)));
    sum = _mm512_add_epi32(sum, p);
    _mm_mask_storeu_epi8(pr + j, m, _mm512_cvtepi32_epi8(p));
  }
  memset(pr + n, 0, (size_t)(lp - n));
  return 1.0f / (float)_mm512_reduce_add_epi32(sum); /* >= 255: the max itself */
}

static FA8_TARGET void fa8_block(float *out, int ldo, const uint16_t *q, int ldq, const void *kp, const void *vp, const fa8_dims *d, int mr,
                                 float scale, float *S, uint8_t *P) {
  uint8_t *qu = P + (size_t)FA_ROWS * d->lp;
  float qs[FA_ROWS], inv[FA_ROWS];
  for (int r = 0; r < mr; r++) { /* q as u8 = s8 + 128 */
    int sum;
    qs[r] = fa8_quant_row((int8_t *)qu + (size_t)r * d->dh, 16, q + (size_t)r * ldq, d->dh, &sum);
    for (int c = 0; c < d->dh; c += 16) {
      __m128i *x = (__m128i *)(void *)(qu + (size_t)r * d->dh + c);
      _mm_storeu_si128(x, _mm_xor_si128(_mm_loadu_si128(x), _mm_set1_epi8((char)0x80)));
    }
  }
  const int8_t *kw = kp;
  const float *ks = (const float *)(const void *)(kw + (size_t)d->kpan * d->kq * 128), *ko = ks + d->ls;
  int32_t acc[VN_ROWS * VN_COLS] __attribute__((aligned(64)));
  for (int p = 0; p < d->kpan; p++) {
    vn_tile_any(acc, qu, d->dh, kw + (size_t)p * d->kq * 128, d->kq, mr);
    for (int r = 0; r < mr; r++)
      for (int h = 0; h < FA_COLS; h += 16) {
        const int j = p * FA_COLS + h;
        _mm512_storeu_ps(S + (size_t)r * d->ls + j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)(acc + r * VN_COLS + h))),
                                                                    _mm512_loadu_ps(ks + j), _mm512_loadu_ps(ko + j)));
      }
  }
  for (int r = 0; r < mr; r++) inv[r] = fa8_softmax(S + (size_t)r * d->ls, d->Lk, qs[r] * scale, P + (size_t)r * d->lp, d->lp);
  const int8_t *vw = vp;
  const float *vs = (const float *)(const void *)(vw + (size_t)d->vpan * d->vq * 128);
  for (int p = 0; p < d->vpan; p++) {
    const int c0 = p * FA_COLS, nc = d->dh - c0 < FA_COLS ? d->dh - c0 : FA_COLS;
    vn_tile_any(acc, P, d->lp, vw + (size_t)p * d->vq * 128, d->vq, mr);
    for (int r = 0; r < mr; r++) {
      float *o = out + (size_t)r * ldo + c0;
      const float f = inv[r];
#pragma omp simd
      for (int c = 0; c < nc; c++) o[c] = (float)acc[r * VN_COLS + c] * vs[c0 + c] * f;
    }
  }
}

/* Which fused kernel a call can use: f32 needs AVX-512 (F, BW, VL); bf16 operands
 * AVX512-BF16 and an even head size (pairs); int8 also AVX512-VNNI, a
 * head size that is a multiple of 16 and at most 1024, and no mask. K
 * within 2 GB: the bound of the gathers that packed K before the
 * transposes, kept as it was. */
enum { FA_F32, FA_BF16, FA_INT8 };

static int fa_usable(int mode, int dh, int Lk, int ldk, const float *mask) {
  static int f32 = -1, b16 = -1, i8 = -1;
  if (f32 < 0) {
    __builtin_cpu_init();
    f32 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    b16 = f32 && __builtin_cpu_supports("avx512bf16");
    i8 = b16 && __builtin_cpu_supports("avx512vnni");
  }
  const char *e = getenv("BLIP_ATTENTION_ONEDNN"); /* 1: the batched oneDNN path (comparisons, tests) */
  if (e && *e && strcmp(e, "0")) return 0;
  if ((long)Lk * ldk * (mode == FA_F32 ? 4 : 2) > INT_MAX) return 0;
  if (mode == FA_INT8) return i8 && dh % 16 == 0 && dh <= 1024 && !mask;
  return mode == FA_BF16 ? b16 && dh % 2 == 0 : f32;
}

/* Scratch bytes of one thread. */
static size_t fa_bytes(int mode, int Lk, int dh) {
  if (mode == FA_INT8) {
    const fa8_dims d = fa8_dims_of(Lk, dh);
    return d.kb + d.vb + d.sb + d.pb;
  }
  const fa_dims d = fa_dims_of(mode == FA_BF16, Lk, dh);
  return d.kb + d.vb + d.sb + d.pb;
}

/* Thread id of n's share of all heads' (head, row block) pairs, split in
 * order: it packs a head's K and V once for all its blocks of that head.
 * scr holds the n threads' scratch. */
static void fa_items(int id, int n, char *scr, void *out, int ldo, int obf16, const void *q, int ldq, const void *k, int ldk, const void *v,
                     int ldv, int Lq, int Lk, int H, int dh, float scale, const float *mask, int mode) {
  const fa_dims d = fa_dims_of(mode == FA_BF16, Lk, dh);
  const fa8_dims d8 = fa8_dims_of(Lk, dh);
  const int i8 = mode == FA_INT8, blocks = (Lq + FA_ROWS - 1) / FA_ROWS, items = H * blocks;
  const size_t kb = i8 ? d8.kb : d.kb, vb = i8 ? d8.vb : d.vb, sb = i8 ? d8.sb : d.sb, es = mode == FA_F32 ? 4 : 2, oes = obf16 ? 2 : 4;
  char *my = scr + fa_bytes(mode, Lk, dh) * id, *kp = my, *vp = my + kb, *P = my + kb + vb + sb;
  float *S = (float *)(void *)(my + kb + vb);
  int packed = -1;
  for (int it = (int)((long)items * id / n); it < (int)((long)items * (id + 1) / n); it++) {
    const int h = it / blocks, r0 = it % blocks * FA_ROWS, mr = Lq - r0 < FA_ROWS ? Lq - r0 : FA_ROWS;
    const char *kh = (const char *)k + (size_t)h * dh * es, *vh = (const char *)v + (size_t)h * dh * es;
    const char *qb = (const char *)q + ((size_t)r0 * ldq + (size_t)h * dh) * es;
    char *ob = (char *)out + ((size_t)r0 * ldo + (size_t)h * dh) * oes;
    if (h != packed) {
      if (i8) {
        fa8_pack_k(kp, (const uint16_t *)(const void *)kh, ldk, &d8);
        fa8_pack_v(vp, (const uint16_t *)(const void *)vh, ldv, &d8);
      } else {
        fa_pack_k(kp, kh, ldk, &d);
        fa_pack_v(vp, vh, ldv, &d);
      }
      packed = h;
    }
    if (i8) fa8_block((float *)(void *)ob, ldo, (const uint16_t *)(const void *)qb, ldq, kp, vp, &d8, mr, scale, S, (uint8_t *)P);
    else fa_block(ob, ldo, obf16, qb, ldq, kp, vp, &d, mr, scale, mask, S, (uint16_t *)(void *)P);
  }
}

static int fa_run(void *out, int ldo, int obf16, const void *q, int ldq, const void *k, int ldk, const void *v, int ldv, int Lq, int Lk,
                  int H, int dh, float scale, const float *mask, blip_k_ws *ws, int mode) {
  const int items = H * ((Lq + FA_ROWS - 1) / FA_ROWS);
  int nt = omp_get_max_threads();
  if (nt > items) nt = items;
  const size_t bytes = fa_bytes(mode, Lk, dh) * nt;
  char *scr = ws ? ws_get(ws, bytes) : aligned_alloc(64, bytes);
  if (!scr) return blip_err_set(BLIP_ENOMEM, "attention: out of memory for %d threads' %dx%d blocks", nt, FA_ROWS, Lk);
#pragma omp parallel num_threads(nt)
  fa_items(omp_get_thread_num(), omp_get_num_threads(), scr, out, ldo, obf16, q, ldq, k, ldk, v, ldv, Lq, Lk, H, dh, scale, mask, mode);
  if (!ws) free(scr);
  return BLIP_OK;
}
#else
enum { FA_F32, FA_BF16, FA_INT8 };
static size_t fa_bytes(int mode, int Lk, int dh) { return (void)mode, (void)Lk, (void)dh, 0; }
static void fa_items(int id, int n, char *scr, void *out, int ldo, int obf16, const void *q, int ldq, const void *k, int ldk, const void *v,
                     int ldv, int Lq, int Lk, int H, int dh, float scale, const float *mask, int mode) {
  (void)id, (void)n, (void)scr, (void)out, (void)ldo, (void)obf16, (void)q, (void)ldq, (void)k, (void)ldk, (void)v, (void)ldv, (void)Lq;
  (void)Lk, (void)H, (void)dh, (void)scale, (void)mask, (void)mode;
}
static int fa_usable(int mode, int dh, int Lk, int ldk, const float *mask) { return (void)mode, (void)dh, (void)Lk, (void)ldk, (void)mask, 0; }
static int fa_run(void *out, int ldo, int obf16, const void *q, int ldq, const void *k, int ldk, const void *v, int ldv, int Lq, int Lk,
                  int H, int dh, float scale, const float *mask, blip_k_ws *ws, int mode) {
  return blip_err_set(BLIP_EINVAL, "fused attention: not built for this CPU");
}
#endif

/* Attention small enough (the text encoder's 12 tokens: 0.1 M multiply-adds)
 * that GEMM calls and a parallel region cost more than the arithmetic:
 * direct loops on one thread, s = one score row. */
#define ATT_DIRECT_MAX 262144L

static void attention_direct(float *out, int ldo, const float *q, int ldq, const float *k, int ldk, const float *v, int ldv, int Lq,
                             int Lk, int heads, int dh, float scale, const float *mask_add, float *s) {
  for (int h = 0; h < heads; h++)
    for (int i = 0; i < Lq; i++) {
      const float *qi = q + (size_t)i * ldq + h * dh;
      for (int j = 0; j < Lk; j++) {
        const float *kj = k + (size_t)j * ldk + h * dh;
        float d = 0;
#pragma omp simd reduction(+ : d)
        for (int t = 0; t < dh; t++) d += qi[t] * kj[t];
        s[j] = d * scale + (mask_add ? mask_add[j] : 0.0f);
      }
      softmax_row(s, Lk);
      float *o = out + (size_t)i * ldo + h * dh;
      memset(o, 0, sizeof(float) * dh);
      for (int j = 0; j < Lk; j++) {
        const float *vj = v + (size_t)j * ldv + h * dh, p = s[j];
#pragma omp simd
        for (int t = 0; t < dh; t++) o[t] += p * vj[t];
      }
    }
}

int blip_k_attention(float *out, int ldo, const float *q, int ldq, const float *k, int ldk, const float *v, int ldv,
                     int Lq, int Lk, int heads, int dh, float scale, const float *mask_add, blip_k_ws *ws) {
  if ((long)Lq * Lk * heads * dh <= ATT_DIRECT_MAX) {
    float *s = ws ? ws_get(ws, (size_t)Lk * sizeof(float)) : malloc((size_t)Lk * sizeof(float));
    if (!s) return blip_err_set(BLIP_ENOMEM, "attention: out of memory for %d scores", Lk);
    attention_direct(out, ldo, q, ldq, k, ldk, v, ldv, Lq, Lk, heads, dh, scale, mask_add, s);
    if (!ws) free(s);
    return BLIP_OK;
  }
  if (Lq >= FA_ROWS && fa_usable(FA_F32, dh, Lk, ldk, mask_add)) /* fewer rows (a decoding step) do not repay packing K and V */
    return fa_run(out, ldo, 0, q, ldq, k, ldk, v, ldv, Lq, Lk, heads, dh, scale, mask_add, ws, FA_F32);
  int nt = omp_get_max_threads();
  if (nt > heads) nt = heads;
  const size_t bytes = (size_t)nt * Lq * Lk * sizeof(float);
  float *scratch = ws ? ws_get(ws, bytes) : malloc(bytes);
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
  if (!ws) free(scratch);
  return rc;
}

/* ---------- bf16 attention (batched oneDNN matmul) ---------- */

#define ATT_SLOTS 8

/* One attention shape: sizes, operand strides, output type. */
typedef struct {
  int Lq, Lk, H, dh, ldq, ldk, ldv, ldo, obf16;
} att_shape;

typedef struct {
  att_shape sh;
  dnnl_primitive_t qk, pv;
} att_slot;

typedef struct {
  att_slot slot[ATT_SLOTS];
  int n, next;
} att_cache;

static void att_cache_free(void *c) {
  att_cache *a = c;
  if (!a) return;
  for (int i = 0; i < a->n; i++) {
    dnnl_primitive_destroy(a->slot[i].qk);
    dnnl_primitive_destroy(a->slot[i].pv);
  }
  free(a);
}

/* Memory descriptors of one attention shape. Operands are bf16 rows
 * [L, ld] (head h in columns h*dh..), seen as [H, L, dh] by strides;
 * K is read transposed as [H, dh, Lk]. S/P are dense [H, Lq, Lk]. */
typedef struct {
  dnnl_memory_desc_t q, k, s, p, v, o;
} att_mds;

static dnnl_status_t att_descs(att_mds *d, const att_shape *a) {
  const int H = a->H, dh = a->dh, Lq = a->Lq, Lk = a->Lk;
  dnnl_dims_t qd = {H, Lq, dh}, qs = {dh, a->ldq, 1}, kd = {H, dh, Lk}, ks = {dh, 1, a->ldk}, sd = {H, Lq, Lk},
              ss = {(dnnl_dim_t)Lq * Lk, Lk, 1}, vd = {H, Lk, dh}, vs = {dh, a->ldv, 1}, od = {H, Lq, dh}, os = {dh, a->ldo, 1};
  dnnl_status_t st;
  if ((st = dnnl_memory_desc_init_by_strides(&d->q, 3, qd, dnnl_bf16, qs)) ||
      (st = dnnl_memory_desc_init_by_strides(&d->k, 3, kd, dnnl_bf16, ks)) ||
      (st = dnnl_memory_desc_init_by_strides(&d->s, 3, sd, dnnl_f32, ss)) ||
      (st = dnnl_memory_desc_init_by_strides(&d->p, 3, sd, dnnl_bf16, ss)) ||
      (st = dnnl_memory_desc_init_by_strides(&d->v, 3, vd, dnnl_bf16, vs)))
    return st;
  return dnnl_memory_desc_init_by_strides(&d->o, 3, od, a->obf16 ? dnnl_bf16 : dnnl_f32, os);
}

static dnnl_status_t att_prims(blip_k_ws *ws, const att_shape *sh, const att_mds *d, att_slot **out) {
  att_cache *a = ws->att;
  if (!a && !(a = ws->att = calloc(1, sizeof *a))) return dnnl_out_of_memory;
  for (int i = 0; i < a->n; i++)
    if (!memcmp(&a->slot[i].sh, sh, sizeof *sh)) {
      *out = &a->slot[i];
      return dnnl_success;
    }
  dnnl_matmul_desc_t m1, m2;
  dnnl_primitive_desc_t pd1 = NULL, pd2 = NULL;
  dnnl_primitive_t qk = NULL, pv = NULL;
  dnnl_status_t st;
  if ((st = dnnl_matmul_desc_init(&m1, &d->q, &d->k, NULL, &d->s)) || (st = dnnl_matmul_desc_init(&m2, &d->p, &d->v, NULL, &d->o)) ||
      (st = dnnl_primitive_desc_create(&pd1, &m1, NULL, g_engine, NULL)) ||
      (st = dnnl_primitive_desc_create(&pd2, &m2, NULL, g_engine, NULL)) || (st = dnnl_primitive_create(&qk, pd1)) ||
      (st = dnnl_primitive_create(&pv, pd2)))
    goto done;
  int i;
  if (a->n < ATT_SLOTS) {
    i = a->n++;
  } else {
    i = a->next;
    a->next = (i + 1) % ATT_SLOTS;
    dnnl_primitive_destroy(a->slot[i].qk);
    dnnl_primitive_destroy(a->slot[i].pv);
  }
  a->slot[i] = (att_slot){*sh, qk, pv};
  *out = &a->slot[i];
  qk = pv = NULL;
done:
  if (qk) dnnl_primitive_destroy(qk);
  if (pv) dnnl_primitive_destroy(pv);
  if (pd1) dnnl_primitive_desc_destroy(pd1);
  if (pd2) dnnl_primitive_desc_destroy(pd2);
  return st;
}

/* p = bf16(softmax(scale * s + mask)) for one row */
DISPATCH static void softmax_row_bf16(uint16_t *p, float *s, int n, float scale, const float *mask) {
  if (mask) {
#pragma omp simd
    for (int j = 0; j < n; j++) s[j] = s[j] * scale + mask[j];
  } else {
#pragma omp simd
    for (int j = 0; j < n; j++) s[j] *= scale;
  }
  float inv = 1.0f / exp_shifted(s, n);
#pragma omp simd
  for (int j = 0; j < n; j++) p[j] = bf16_rne(s[j] * inv);
}

static int stream_ready(blip_k_ws *ws) {
  pthread_once(&g_engine_once, engine_init);
  if (!g_engine) return blip_err_set(BLIP_EINVAL, "oneDNN: no CPU engine");
  if (!ws->stream && dnnl_stream_create((dnnl_stream_t *)&ws->stream, g_engine, dnnl_stream_default_flags))
    return blip_err_set(BLIP_ENOMEM, "oneDNN: cannot create a stream");
  return BLIP_OK;
}

/* Attention on bf16 operands; scr holds the f32 scores then the bf16
 * probabilities, [H, Lq, Lk] each. */
static int att_bf16_run(void *out, const uint16_t *q, const uint16_t *k, const uint16_t *v, const att_shape *sh, float scale,
                        const float *mask_add, float *S, uint16_t *P, blip_k_ws *ws) {
  att_mds d;
  att_slot *slot = NULL;
  dnnl_status_t st = att_descs(&d, sh);
  if (!st) st = att_prims(ws, sh, &d, &slot);
  dnnl_memory_t mq = NULL, mk = NULL, ms = NULL, mp = NULL, mv = NULL, mo = NULL;
  if (st || (st = dnnl_memory_create(&mq, &d.q, g_engine, (void *)q)) || (st = dnnl_memory_create(&mk, &d.k, g_engine, (void *)k)) ||
      (st = dnnl_memory_create(&ms, &d.s, g_engine, S)) || (st = dnnl_memory_create(&mp, &d.p, g_engine, P)) ||
      (st = dnnl_memory_create(&mv, &d.v, g_engine, (void *)v)) || (st = dnnl_memory_create(&mo, &d.o, g_engine, out)))
    goto done;
  dnnl_exec_arg_t a1[3] = {{DNNL_ARG_SRC, mq}, {DNNL_ARG_WEIGHTS, mk}, {DNNL_ARG_DST, ms}};
  dnnl_exec_arg_t a2[3] = {{DNNL_ARG_SRC, mp}, {DNNL_ARG_WEIGHTS, mv}, {DNNL_ARG_DST, mo}};
  if ((st = dnnl_primitive_execute(slot->qk, ws->stream, 3, a1)) || (st = dnnl_stream_wait(ws->stream))) goto done;
  const long rows = (long)sh->H * sh->Lq, Lk = sh->Lk;
#pragma omp parallel for if (rows * Lk > 32768)
  for (long r = 0; r < rows; r++) softmax_row_bf16(P + (size_t)r * Lk, S + (size_t)r * Lk, (int)Lk, scale, mask_add);
  if (!(st = dnnl_primitive_execute(slot->pv, ws->stream, 3, a2))) st = dnnl_stream_wait(ws->stream);
done:
  if (mq) dnnl_memory_destroy(mq);
  if (mk) dnnl_memory_destroy(mk);
  if (ms) dnnl_memory_destroy(ms);
  if (mp) dnnl_memory_destroy(mp);
  if (mv) dnnl_memory_destroy(mv);
  if (mo) dnnl_memory_destroy(mo);
  if (st)
    return blip_err_set(st == dnnl_out_of_memory ? BLIP_ENOMEM : BLIP_EINVAL, "oneDNN attention %dx%d: status %d", sh->Lq, sh->Lk, (int)st);
  return BLIP_OK;
}

int blip_k_attention_bf16in(void *out, int ldo, int out_bf16, const uint16_t *q, int ldq, const uint16_t *k, int ldk,
                            const uint16_t *v, int ldv, int Lq, int Lk, int heads, int dh, float scale, const float *mask_add,
                            blip_k_ws *ws) {
  if (fa_usable(FA_BF16, dh, Lk, ldk, mask_add))
    return fa_run(out, ldo, out_bf16, q, ldq, k, ldk, v, ldv, Lq, Lk, heads, dh, scale, mask_add, ws, FA_BF16);
  int rc = stream_ready(ws);
  if (rc) return rc;
  const size_t ns = (size_t)heads * Lq * Lk;
  float *S = ws_get(ws, ns * 4 + ns * 2);
  if (!S) return blip_err_set(BLIP_ENOMEM, "attention: out of memory for %dx%d scores", Lq, Lk);
  att_shape sh = {Lq, Lk, heads, dh, ldq, ldk, ldv, ldo, out_bf16 != 0};
  return att_bf16_run(out, q, k, v, &sh, scale, mask_add, S, (uint16_t *)(void *)(S + ns), ws);
}

const char *blip_k_attention_kernel(blip_k_prec prec, int Lq, int Lk, int heads, int dh, int ldk) {
  if (prec == BLIP_K_INT8 && fa_usable(FA_INT8, dh, Lk, ldk, NULL)) return "fused int8";
  if (prec != BLIP_K_F32) return fa_usable(FA_BF16, dh, Lk, ldk, NULL) ? "fused bf16" : "batched bf16";
  if ((long)Lq * Lk * heads * dh <= ATT_DIRECT_MAX) return "direct f32";
  return Lq >= FA_ROWS && fa_usable(FA_F32, dh, Lk, ldk, NULL) ? "fused f32" : "batched f32";
}

int blip_k_attention_int8(float *out, int ldo, const uint16_t *q, int ldq, const uint16_t *k, int ldk, const uint16_t *v, int ldv, int Lq,
                          int Lk, int heads, int dh, float scale, blip_k_ws *ws) {
  if (fa_usable(FA_INT8, dh, Lk, ldk, NULL))
    return fa_run(out, ldo, 0, q, ldq, k, ldk, v, ldv, Lq, Lk, heads, dh, scale, NULL, ws, FA_INT8);
  return blip_k_attention_bf16in(out, ldo, 0, q, ldq, k, ldk, v, ldv, Lq, Lk, heads, dh, scale, NULL, ws);
}

/* ---------- bf16 GEMM with cached primitives ---------- */

#define GEMM_SLOTS 8

typedef struct {
  int tb, M, N, K, lda, ldb, ldc;
  dnnl_primitive_t prim;
} gemm_slot;

typedef struct {
  gemm_slot slot[GEMM_SLOTS];
  int n, next;
} gemm_cache;

static void gemm_cache_free(void *c) {
  gemm_cache *g = c;
  if (!g) return;
  for (int i = 0; i < g->n; i++) dnnl_primitive_destroy(g->slot[i].prim);
  free(g);
}

void blip_k_to_bf16(uint16_t *dst, const float *src, long n) { to_bf16(dst, src, n); }

static dnnl_status_t gemm_mds(int tb, int M, int N, int K, int lda, int ldb, int ldc, dnnl_memory_desc_t *a, dnnl_memory_desc_t *b,
                              dnnl_memory_desc_t *c) {
  dnnl_dims_t ad = {M, K}, as = {lda, 1}, bd = {K, N}, bs = {tb ? 1 : ldb, tb ? ldb : 1}, cd = {M, N}, cs = {ldc, 1};
  dnnl_status_t st;
  if ((st = dnnl_memory_desc_init_by_strides(a, 2, ad, dnnl_bf16, as)) || (st = dnnl_memory_desc_init_by_strides(b, 2, bd, dnnl_bf16, bs)))
    return st;
  return dnnl_memory_desc_init_by_strides(c, 2, cd, dnnl_f32, cs);
}

int blip_k_gemm_bf16(int tb, int M, int N, int K, const uint16_t *A, int lda, const uint16_t *B, int ldb, float *C, int ldc,
                     blip_k_ws *ws) {
  if (M == 0 || N == 0) return BLIP_OK;
  int rc = stream_ready(ws);
  if (rc) return rc;
  gemm_cache *g = ws->gemm;
  if (!g && !(g = ws->gemm = calloc(1, sizeof *g))) return blip_err_set(BLIP_ENOMEM, "out of memory");
  dnnl_memory_desc_t a, b, c;
  dnnl_status_t st = gemm_mds(tb, M, N, K, lda, ldb, ldc, &a, &b, &c);
  gemm_slot *slot = NULL;
  for (int i = 0; !st && i < g->n; i++) {
    gemm_slot *s = &g->slot[i];
    if (s->tb == tb && s->M == M && s->N == N && s->K == K && s->lda == lda && s->ldb == ldb && s->ldc == ldc) slot = s;
  }
  if (!st && !slot) {
    dnnl_matmul_desc_t md;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t prim = NULL;
    if (!(st = dnnl_matmul_desc_init(&md, &a, &b, NULL, &c)) && !(st = dnnl_primitive_desc_create(&pd, &md, NULL, g_engine, NULL)))
      st = dnnl_primitive_create(&prim, pd);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (!st) {
      int i;
      if (g->n < GEMM_SLOTS) {
        i = g->n++;
      } else {
        i = g->next;
        g->next = (i + 1) % GEMM_SLOTS;
        dnnl_primitive_destroy(g->slot[i].prim);
      }
      g->slot[i] = (gemm_slot){tb, M, N, K, lda, ldb, ldc, prim};
      slot = &g->slot[i];
    }
  }
  dnnl_memory_t ma = NULL, mb = NULL, mc = NULL;
  if (!st && !(st = dnnl_memory_create(&ma, &a, g_engine, (void *)A)) && !(st = dnnl_memory_create(&mb, &b, g_engine, (void *)B)) &&
      !(st = dnnl_memory_create(&mc, &c, g_engine, C))) {
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}};
    if (!(st = dnnl_primitive_execute(slot->prim, ws->stream, 3, args))) st = dnnl_stream_wait(ws->stream);
  }
  if (ma) dnnl_memory_destroy(ma);
  if (mb) dnnl_memory_destroy(mb);
  if (mc) dnnl_memory_destroy(mc);
  if (st) return blip_err_set(st == dnnl_out_of_memory ? BLIP_ENOMEM : BLIP_EINVAL, "oneDNN bf16 gemm %dx%dx%d: status %d", M, N, K, (int)st);
  return BLIP_OK;
}

/* ---------- teams ---------- */

/* Spin this many pauses (about 0.1 ms) before sleeping: the ops between
 * barriers are balanced to a few microseconds, but a thread the
 * scheduler took away should not be waited for by burning a core. */
#define TEAM_SPIN 4096

static long futex(int *addr, int op, int val) { return syscall(SYS_futex, addr, op, val, NULL, NULL, 0); }

void blip_k_team_init(blip_k_team *t) { memset(t, 0, sizeof *t); }

int blip_k_team_sync(blip_k_team *t, int rc) {
  const int n = omp_get_num_threads();
  const int g = __atomic_load_n(&t->gen, __ATOMIC_ACQUIRE), slot = g & 1;
  if (rc) {
    int z0 = 0, z1 = 0;
    if (__atomic_compare_exchange_n(&t->msg_set, &z0, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
      snprintf(t->msg, sizeof t->msg, "%s", blip_err_last());
    __atomic_compare_exchange_n(&t->err[slot], &z1, rc, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
  }
  if (n == 1 || __atomic_add_fetch(&t->count, 1, __ATOMIC_ACQ_REL) == n) {
    /* last one in: reset for the next barrier (which uses the other error
     * slot; this one is cleared by the barrier after it), then release */
    __atomic_store_n(&t->count, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->err[slot ^ 1], 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->gen, g + 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&t->sleepers, __ATOMIC_SEQ_CST)) futex(&t->gen, FUTEX_WAKE_PRIVATE, INT_MAX);
  } else {
    for (int i = 0; __atomic_load_n(&t->gen, __ATOMIC_ACQUIRE) == g; i++) {
      if (i < TEAM_SPIN) {
        __builtin_ia32_pause();
        continue;
      }
      __atomic_add_fetch(&t->sleepers, 1, __ATOMIC_SEQ_CST);
      futex(&t->gen, FUTEX_WAIT_PRIVATE, g); /* returns at once if gen moved on */
      __atomic_sub_fetch(&t->sleepers, 1, __ATOMIC_SEQ_CST);
    }
  }
  return __atomic_load_n(&t->err[slot], __ATOMIC_ACQUIRE);
}

int blip_k_team_error(const blip_k_team *t, int rc) { return rc && t->msg_set ? blip_err_set(rc, "%s", t->msg) : rc; }

/* This thread's share [*r0, *r1) of n items. */
static void share(int n, int *r0, int *r1) {
  const int nt = omp_get_num_threads(), id = omp_get_thread_num();
  *r0 = (int)((long)n * id / nt);
  *r1 = (int)((long)n * (id + 1) / nt);
}

/* A layer's parts: its own, or the layer as one part. */
static blip_k_packed *part_of(const blip_k_linear *l, int i, const float **bias, int *c0) {
  blip_k_packed *p = l->packed;
  if (!p->n_part) {
    *bias = l->b;
    *c0 = 0;
    return p;
  }
  *bias = p->part[i].b;
  *c0 = p->c0[i];
  return p->part[i].packed;
}

int blip_k_linear_reserve(const blip_k_linear *l, int M, int flags) {
  const blip_k_packed *p = l->packed;
  if (!p) return blip_err_set(BLIP_EINVAL, "linear %dx%d: a team needs a packed layer", l->out, l->in);
  const size_t need = prep_bytes(p->prec, M, p->in, flags) + (!p->n_part && own_acc(p, flags) ? (size_t)M * p->out * 4 : 0);
  return need && !ws_get(p->ws, need) ? blip_err_set(BLIP_ENOMEM, "out of memory for a %dx%d activation", M, p->in) : BLIP_OK;
}

int blip_k_team_linear(blip_k_team *t, void *out, const void *in, const blip_k_linear *l, int M, int flags) {
  const blip_k_packed *p = l->packed;
  const int K = p->in, parts = p->n_part ? p->n_part : 1;
  const size_t pb = prep_bytes(p->prec, M, K, flags);
  int rc = BLIP_OK, r0, r1;
  if (pb + (!p->n_part && own_acc(p, flags) ? (size_t)M * p->out * 4 : 0) > p->ws->cap)
    rc = blip_err_set(BLIP_EINVAL, "linear %dx%d: workspace not reserved for %d rows", l->out, K, M);
  const mm_in mi = prep_at(p->prec, p->ws->p, in, M, K, flags);
  share(M, &r0, &r1);
  if (!rc) prep_rows(&mi, in, K, r0, r1);
  if ((rc = blip_k_team_sync(t, rc))) return rc;
  const int nt = omp_get_num_threads();
  for (int i = omp_get_thread_num(); i < parts && !rc; i += nt) {
    const float *bias;
    int c0;
    blip_k_packed *q = part_of(l, i, &bias, &c0);
    int32_t *acc = q->n_part ? NULL : (int32_t *)(void *)((char *)p->ws->p + pb);
    if (p->n_part && !q->vnni && (size_t)M * q->out * 4 > q->acc_cap) { /* the VNNI kernel needs none */
      free(q->acc);
      q->acc_cap = 0;
      if (!(q->acc = malloc((size_t)M * q->out * 4))) {
        rc = blip_err_set(BLIP_ENOMEM, "out of memory for %dx%d accumulators", M, q->out);
        break;
      }
      q->acc_cap = (size_t)M * q->out * 4;
    }
    if (p->n_part) acc = q->acc;
    rc = run_mm(q, bias, (char *)out + (size_t)c0 * OUT_SIZE(flags), &mi, acc, M, flags, q->stream ? q->stream : p->ws->stream, 0);
  }
  return rc;
}

/* Row counts of thread id's chunks in a row-split team of nt: its share
 * of M in chunks as packed_fwd's. */
static int rows_chunks(int M, int id, int nt, int *first, int *r0) {
  *r0 = (int)((long)M * id / nt);
  const int n = (int)((long)M * (id + 1) / nt) - *r0;
  *first = chunk_rows(n);
  return n;
}

/* The row-split matmuls of a team of nt: make 0 counts the missing ones,
 * make 1 creates them (returns an error code). */
static int rows_prims(blip_k_packed *p, int M, int flags, int nt, int make) {
  int r = 0;
  for (int id = 0; id < nt && !(make && r); id++) {
    int rows, r0;
    const int n = rows_chunks(M, id, nt, &rows, &r0);
    for (int c = 0; c < n && !(make && r); c += rows) {
      const int m = n - c < rows ? n - c : rows;
      dnnl_primitive_t prim;
      r = make ? get_prim(p, m, flags | K_USER_SCRATCH, &prim) : r + !cached_prim(p, m, flags | K_USER_SCRATCH);
    }
  }
  return r;
}

/* The matmuls are created inside a parallel region, as a team's own (one
 * created outside splits its work for every thread, and run by one thread
 * inside a region it would do only that thread's part), with a user
 * scratchpad (K_USER_SCRATCH); once made, no region is opened (it would
 * wake the sleeping threads for nothing, at every call). */
int blip_k_rows_prepare(const blip_k_linear *l, int M, int flags) {
  blip_k_packed *p = l->packed;
  if (!p || p->n_part || p->vnni) return blip_err_set(BLIP_EINVAL, "linear %dx%d: row-split teams need a whole oneDNN layer", l->out, l->in);
  const int nt = blip_k_threads();
  if (!rows_prims(p, M, flags, nt, 0)) return BLIP_OK;
  int rc = BLIP_OK;
#pragma omp parallel
#pragma omp single
  rc = rows_prims(p, M, flags, nt, 1);
  return rc;
}

int blip_k_rows_linear(void *out, const void *in, const blip_k_linear *l, int M, int flags, blip_k_ws *tws) {
  blip_k_packed *p = l->packed;
  int rc = stream_ready(tws), rows, r0;
  const int n = rows_chunks(M, omp_get_thread_num(), omp_get_num_threads(), &rows, &r0), K = p->in;
  for (int c = 0; c < n && !rc; c += rows) {
    const int m = n - c < rows ? n - c : rows, r = r0 + c;
    const void *ir = (const char *)in + (size_t)r * K * IN_SIZE(flags);
    dnnl_primitive_t prim;
    if ((rc = find_prim(p, m, flags | K_USER_SCRATCH, &prim))) break;
    const size_t pb = prep_bytes(p->prec, m, K, flags), ab = own_acc(p, flags) ? (size_t)m * p->out * 4 : 0;
    const dnnl_memory_desc_t *smd = scratch_md(prim);
    const size_t sb = ((smd ? dnnl_memory_desc_get_size(smd) : 0) + 63) & ~(size_t)63;
    char *w = ws_get(tws, pb + ab + sb + 64);
    if (!w) {
      rc = blip_err_set(BLIP_ENOMEM, "out of memory for a %dx%d activation", m, K);
      break;
    }
    mm_in mi = prep_at(p->prec, w, ir, m, K, flags);
    mi.scratch = (void *)(((uintptr_t)(w + pb + ab) + 63) & ~(uintptr_t)63);
    prep_rows(&mi, ir, K, 0, m);
    rc = run_mm(p, l->b, (char *)out + (size_t)r * p->ldd * OUT_SIZE(flags), &mi, (int32_t *)(void *)(w + pb), m, flags | K_USER_SCRATCH,
                tws->stream, -1);
  }
  return rc;
}

void blip_k_team_layernorm(float *out, const float *in, const float *g, const float *b, int M, int N, float eps) {
  int r0, r1;
  share(M, &r0, &r1);
  for (int i = r0; i < r1; i++) ln_row(out + (size_t)i * N, in + (size_t)i * N, g, b, N, eps);
}

void blip_k_team_layernorm_bf16(uint16_t *out, const float *in, const float *g, const float *b, int M, int N, float eps) {
  int r0, r1;
  share(M, &r0, &r1);
  for (int i = r0; i < r1; i++) ln_row_bf16(out + (size_t)i * N, in + (size_t)i * N, g, b, N, eps);
}

static int fa_mode(blip_k_prec prec) { return prec == BLIP_K_INT8 ? FA_INT8 : prec == BLIP_K_BF16 ? FA_BF16 : FA_F32; }

int blip_k_team_attention_fusable(blip_k_prec prec, int L, int dh, int ld) { return fa_usable(fa_mode(prec), dh, L, ld, NULL); }

int blip_k_team_attention_reserve(blip_k_ws *ws, blip_k_prec prec, int L, int dh) {
  return ws_get(ws, fa_bytes(fa_mode(prec), L, dh) * blip_k_threads()) ? BLIP_OK
                                                                           : blip_err_set(BLIP_ENOMEM, "attention: out of memory for %d keys", L);
}

int blip_k_team_attention_fused(void *out, int ldo, const void *q, const void *k, const void *v, int ld, int L, int heads, int dh, float scale,
                                blip_k_prec prec, const blip_k_ws *ws) {
  const int mode = fa_mode(prec), n = omp_get_num_threads();
  if (!fa_usable(mode, dh, L, ld, NULL) || fa_bytes(mode, L, dh) * n > ws->cap)
    return blip_err_set(BLIP_EINVAL, "team attention: no fused kernel for this CPU or shape, or scratch not reserved");
  fa_items(omp_get_thread_num(), n, ws->p, out, ldo, mode == FA_BF16, q, ld, k, ld, v, ld, L, L, heads, dh, scale, NULL, mode);
  return BLIP_OK;
}

void blip_k_team_attention(float *out, int ldo, const float *q, const float *k, const float *v, int ld, int n, const int *off,
                           int heads, int dh, float scale, const float *mask_add) {
  float s[BLIP_K_TEAM_ATT_MAX];
  int i0, i1;
  share(n * heads, &i0, &i1);
  for (int i = i0; i < i1; i++) {
    const int r = i / heads, h = i % heads, L = off[r + 1] - off[r];
    const size_t o = (size_t)off[r] * ld + (size_t)h * dh;
    attention_direct(out + (size_t)off[r] * ldo + (size_t)h * dh, ldo, q + o, ld, k + o, ld, v + o, ld, L, L, 1, dh, scale,
                     mask_add ? mask_add + off[r] : NULL, s);
  }
}
