/* blip_model: BLIP retrieval inference, written as flat weight structs and
 * one readable loop per encoder (llama2.c style).
 *
 * Invariants:
 * - Every weight pointer is either into the safetensors mmap (F32 tensors
 *   at 4-byte aligned offsets: zero copy) or into a buffer listed in
 *   m->owned (converted F16/BF16, random weights).
 * - bind_all converts each layer's GEMMs to the precision's packed form
 *   (blip_k_linear.packed) as soon as the layer is bound, and releases
 *   their f32 weights (l->w = NULL): packed layers never read w again.
 * - All shapes are checked against the config at load; forward passes
 *   trust them.
 * - Scratch memory is one growing arena per context plus the packed
 *   layers' workspace (m->ws), so a context is not thread-safe but
 *   repeated calls do not allocate. */
#include "blip_model.h"
#include "blip_err.h"
#include "blip_kern.h"
#include "blip_pt.h"
#include "blip_st.h"

#include <cpuid.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

typedef struct {
  const float *g, *b;
} ln_w;

typedef struct {
  const void *p;
  size_t n;
} released;

typedef struct { /* ViT pre-norm block */
  ln_w ln1, ln2;
  blip_k_linear qkv, proj, fc1, fc2;
} vis_layer;

typedef struct { /* BERT post-norm layer with cross-attention */
  blip_k_linear q, k, v, o;     /* self-attention */
  blip_k_linear qkv;            /* q, k, v fused at pack time: one GEMM, rows [q | k | v] */
  ln_w ln_self;
  blip_k_linear cq, ck, cv, co; /* cross-attention to image tokens */
  ln_w ln_cross;
  blip_k_linear ffn1, ffn2;
  ln_w ln_ffn;
} txt_layer;

struct blip_model {
  blip_cfg cfg;
  blip_model_opts opts;
  blip_tok *tok;
  blip_st *st;
  uint64_t seed; /* random models: weights drawn from (seed, name) */
  /* vision */
  blip_k_linear patch; /* conv as [Dv, 3*p*p] */
  const float *cls, *vpos;
  vis_layer *vl;
  ln_w post_ln;
  /* text */
  const float *word, *tpos;
  ln_w emb_ln;
  txt_layer *tl;
  /* heads: retrieval (ITC projections, ITM) or the captioner's LM head */
  blip_k_linear vision_proj, text_proj, itm_head;
  blip_k_linear lm_dense, lm_dec; /* transform.dense (+GELU), decoder (+bias) */
  ln_w lm_ln;
  /* ownership */
  void **owned;
  int n_owned, cap_owned;
  float *arena;
  size_t arena_cap;
  blip_k_ws ws; /* scratch of the packed layers */
  blip_k_ws *tws; /* one per thread of a team, for its own oneDNN calls and scratch */
  int n_tws;
  int vteam; /* the vision encoder runs as a row-split team (vision_team) */
  double *vprof; /* blip_model_vision_profile's ms[] during its call, else NULL */
  released rel[1024]; /* mmap ranges of dead tensors, dropped at the end of the load */
  int n_rel;
  char fingerprint[17];
};

/* ---------- loading ---------- */

static int own(blip_model *m, void *p) {
  if (m->n_owned == m->cap_owned) {
    int nc = m->cap_owned ? 2 * m->cap_owned : 64;
    void **no = realloc(m->owned, (size_t)nc * sizeof *no);
    if (!no) return blip_err_set(BLIP_ENOMEM, "out of memory");
    m->owned = no;
    m->cap_owned = nc;
  }
  m->owned[m->n_owned++] = p;
  return BLIP_OK;
}

static uint64_t splitmix64(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Random weights with magnitudes that keep activations O(1) (like the
 * blip-tiny fixture): LayerNorm gains ~1, biases small, matrices ~1/sqrt(fan_in). */
static void fill_random(float *w, int64_t n, const char *name, int64_t fan_in, uint64_t seed) {
  uint64_t s = seed ^ XXH3_64bits(name, strlen(name));
  int is_ln = strstr(name, "norm") || strstr(name, "LayerNorm");
  int is_bias = strstr(name, ".bias") != NULL;
  float std = is_bias ? 0.02f : is_ln ? 0.05f : strstr(name, "embedding") ? 0.5f : 1.0f / sqrtf((float)fan_in);
  float base = (is_ln && !is_bias) ? 1.0f : 0.0f;
  for (int64_t i = 0; i < n; i++) {
    float u = (float)((splitmix64(&s) >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; /* [-1,1) */
    w[i] = base + u * std * 1.7320508f;
  }
}

/* Drop the mmap pages of dead tensors: converted ones and packed f32 ones
 * (re-read from the file if ever touched, which the forward pass does
 * not do). */
static void drop_released(blip_model *m) {
  const long pg = sysconf(_SC_PAGESIZE);
  for (int i = 0; i < m->n_rel; i++) {
    uintptr_t a = (uintptr_t)m->rel[i].p, e = a + m->rel[i].n;
    a = (a + pg - 1) & ~(uintptr_t)(pg - 1);
    e &= ~(uintptr_t)(pg - 1);
    if (e > a) madvise((void *)a, e - a, MADV_DONTNEED);
  }
  m->n_rel = 0;
}

static void queue_drop(blip_model *m, const void *p, size_t n) {
  if (m->n_rel == (int)(sizeof m->rel / sizeof m->rel[0])) drop_released(m); /* early: less effective, still correct */
  m->rel[m->n_rel++] = (released){p, n};
}

/* Bind weight `name` of the given shape to *out. */
static int bind(blip_model *m, const char *name, int ndim, const int64_t *shape, const float **out) {
  int64_t numel = 1;
  for (int i = 0; i < ndim; i++) numel *= shape[i];
  if (!m->st) {
    float *w = malloc((size_t)numel * sizeof(float));
    if (!w || own(m, w)) {
      free(w);
      return blip_err_set(BLIP_ENOMEM, "out of memory for '%s'", name);
    }
    fill_random(w, numel, name, ndim > 1 ? numel / shape[0] : shape[0], m->seed);
    *out = w;
    return BLIP_OK;
  }
  const blip_st_tensor *t = blip_st_find(m->st, name);
  if (t && t->dtype == BLIP_DT_F32 && ((uintptr_t)t->data & 3) == 0) {
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
    if (same) {
      *out = t->data;
      return BLIP_OK;
    }
  }
  float *w;
  int rc = blip_st_load_f32(m->st, name, ndim, shape, &w);
  if (rc) return rc;
  if ((rc = own(m, w))) {
    free(w);
    return rc;
  }
  queue_drop(m, t->data, t->nbytes); /* converted: the file's copy is dead */
  *out = w;
  return BLIP_OK;
}

static int bind_vec(blip_model *m, const char *name, int64_t n, const float **out) {
  return bind(m, name, 1, &n, out);
}

static int bind_lin(blip_model *m, blip_k_linear *l, const char *prefix, int out, int in) {
  char name[256];
  int64_t shape[2] = {out, in};
  l->in = in;
  l->out = out;
  snprintf(name, sizeof name, "%s.weight", prefix);
  int rc = bind(m, name, 2, shape, &l->w);
  if (rc) return rc;
  snprintf(name, sizeof name, "%s.bias", prefix);
  return bind_vec(m, name, out, &l->b);
}

static int bind_ln(blip_model *m, ln_w *l, const char *prefix, int n) {
  char name[256];
  snprintf(name, sizeof name, "%s.weight", prefix);
  int rc = bind_vec(m, name, n, &l->g);
  if (rc) return rc;
  snprintf(name, sizeof name, "%s.bias", prefix);
  return bind_vec(m, name, n, &l->b);
}

/* After packing, the f32 copy of a layer is dead: free it when we own it,
 * or queue its mmap range for drop_released(). Dropping waits until every
 * tensor is read: faulting in a neighbour maps the surrounding page-cache
 * folio again, dropped range included. */
static void release_f32(blip_model *m, blip_k_linear *l) {
  for (int i = 0; i < m->n_owned; i++)
    if (m->owned[i] == l->w) {
      free(m->owned[i]);
      m->owned[i] = NULL;
      l->w = NULL;
      return;
    }
  queue_drop(m, l->w, (size_t)l->in * l->out * sizeof(float));
  l->w = NULL;
}

/* Pack the GEMM-heavy layers for the chosen precision, one layer as soon
 * as it is bound, so that at most one layer's f32 staging copy is alive
 * besides the packed weights. Kept in f32 and why: the patch embedding
 * (raw pixels in, 0.6% of the vision FLOPs, f32 packed); the
 * cross-attention key/value (the reassociated ITM multiplies by their
 * per-head slices in f32); the three heads (one row per call). */
static int pack_list(blip_model *m, blip_k_linear **ls, int n, blip_k_prec prec, int parts) {
  for (int j = 0; j < n; j++) {
    int rc = blip_k_linear_pack_parts(ls[j], prec, &m->ws, parts);
    if (rc) return rc;
    release_f32(m, ls[j]);
  }
  return BLIP_OK;
}

static int pack_vis_layer(blip_model *m, vis_layer *L) {
  blip_k_linear *ls[4] = {&L->qkv, &L->proj, &L->fc1, &L->fc2};
  return pack_list(m, ls, 4, (blip_k_prec)m->opts.precision, 1);
}

/* Text layers: the self-attention q, k, v are packed as one [3D, D] layer
 * (a 12-token query is bound by reading weights and by per-call overhead:
 * one GEMM launch instead of three per layer), and every text layer in
 * column parts, one per thread, for the team that runs the encoder (see
 * text_encode). The captioner packs the
 * cross-attention key/value too: it projects each image once (no
 * reassociation reads their f32 weights). */
static int pack_txt_layer(blip_model *m, txt_layer *L) {
  const int D = L->q.in, N = L->q.out;
  const blip_k_linear *src[3] = {&L->q, &L->k, &L->v};
  float *w = malloc(sizeof(float) * 3 * N * D), *b = malloc(sizeof(float) * 3 * N);
  if (!w || !b || own(m, b)) {
    free(w);
    free(b);
    return blip_err_set(BLIP_ENOMEM, "out of memory packing a text layer");
  }
  for (int i = 0; i < 3; i++) {
    memcpy(w + (size_t)i * N * D, src[i]->w, sizeof(float) * N * D);
    memcpy(b + (size_t)i * N, src[i]->b, sizeof(float) * N);
  }
  L->qkv = (blip_k_linear){.in = D, .out = 3 * N, .w = w, .b = b};
  int rc = blip_k_linear_pack_parts(&L->qkv, (blip_k_prec)m->opts.precision, &m->ws, blip_k_threads());
  free(w);
  L->qkv.w = NULL;
  if (rc) return rc;
  release_f32(m, &L->q);
  release_f32(m, &L->k);
  release_f32(m, &L->v);
  blip_k_linear *ls[7] = {&L->o, &L->cq, &L->co, &L->ffn1, &L->ffn2, &L->ck, &L->cv};
  return pack_list(m, ls, m->cfg.captioner ? 7 : 5, (blip_k_prec)m->opts.precision, blip_k_threads());
}

/* LM head of the captioner. The bias is one Parameter under two names
 * (HF saves one of them); decoder.weight is its own tensor in
 * transformers 4.38 (not the word embeddings). */
static int bind_lm_head(blip_model *m) {
  const blip_cfg *c = &m->cfg;
  const char *bias = "text_decoder.cls.predictions.bias";
  if (m->st && !blip_st_find(m->st, bias) && blip_st_find(m->st, "text_decoder.cls.predictions.decoder.bias"))
    bias = "text_decoder.cls.predictions.decoder.bias";
  int64_t ds[2] = {c->t_vocab, c->t_hidden};
  int rc;
  m->lm_dec.in = c->t_hidden;
  m->lm_dec.out = c->t_vocab;
  blip_k_linear *ls[2] = {&m->lm_dense, &m->lm_dec};
  if ((rc = bind_lin(m, &m->lm_dense, "text_decoder.cls.predictions.transform.dense", c->t_hidden, c->t_hidden)) ||
      (rc = bind_ln(m, &m->lm_ln, "text_decoder.cls.predictions.transform.LayerNorm", c->t_hidden)) ||
      (rc = bind(m, "text_decoder.cls.predictions.decoder.weight", 2, ds, &m->lm_dec.w)) ||
      (rc = bind_vec(m, bias, c->t_vocab, &m->lm_dec.b)))
    return rc;
  return pack_list(m, ls, 2, (blip_k_prec)m->opts.precision, 1);
}

static int bind_all(blip_model *m) {
  const blip_cfg *c = &m->cfg;
  const int Dv = c->v_hidden, Dt = c->t_hidden, p = c->patch;
  const char *tx = c->captioner ? "text_decoder.bert" : "text_encoder";
  char pre[256], nm[256];
  int rc;
  {
    int64_t ps[4] = {Dv, 3, p, p}, cs[3] = {1, 1, Dv}, vs[3] = {1, c->v_tokens, Dv};
    if ((rc = bind(m, "vision_model.embeddings.patch_embedding.weight", 4, ps, &m->patch.w)) ||
        (rc = bind_vec(m, "vision_model.embeddings.patch_embedding.bias", Dv, &m->patch.b)) ||
        (rc = bind(m, "vision_model.embeddings.class_embedding", 3, cs, &m->cls)) ||
        (rc = bind(m, "vision_model.embeddings.position_embedding", 3, vs, &m->vpos)))
      return rc;
    m->patch.in = 3 * p * p;
    m->patch.out = Dv;
    blip_k_linear *pl = &m->patch;
    if ((rc = pack_list(m, &pl, 1, BLIP_K_F32, 1))) return rc;
  }
  for (int i = 0; i < c->v_layers; i++) {
    vis_layer *L = &m->vl[i];
#define VP(s) (snprintf(pre, sizeof pre, "vision_model.encoder.layers.%d.%s", i, s), pre)
    if ((rc = bind_ln(m, &L->ln1, VP("layer_norm1"), Dv)) || (rc = bind_lin(m, &L->qkv, VP("self_attn.qkv"), 3 * Dv, Dv)) ||
        (rc = bind_lin(m, &L->proj, VP("self_attn.projection"), Dv, Dv)) || (rc = bind_ln(m, &L->ln2, VP("layer_norm2"), Dv)) ||
        (rc = bind_lin(m, &L->fc1, VP("mlp.fc1"), c->v_mlp, Dv)) || (rc = bind_lin(m, &L->fc2, VP("mlp.fc2"), Dv, c->v_mlp)) ||
        (rc = pack_vis_layer(m, L)))
      return rc;
#undef VP
  }
  const char *e = getenv("BLIP_VISION_PER_OP"); /* 1: a region per op (comparisons, tests) */
  m->vteam = !(e && *e && strcmp(e, "0")) && blip_k_threads() > 1 &&
             blip_k_team_attention_fusable((blip_k_prec)m->opts.precision, c->v_tokens, Dv / c->v_heads, 3 * Dv);
  if ((rc = bind_ln(m, &m->post_ln, "vision_model.post_layernorm", Dv))) return rc;
  {
    int64_t ws[2] = {c->t_vocab, Dt}, ps[2] = {c->t_max_pos, Dt};
#define TX(s) (snprintf(nm, sizeof nm, "%s.embeddings.%s", tx, s), nm)
    if ((rc = bind(m, TX("word_embeddings.weight"), 2, ws, &m->word)) ||
        (rc = bind(m, TX("position_embeddings.weight"), 2, ps, &m->tpos)) || (rc = bind_ln(m, &m->emb_ln, TX("LayerNorm"), Dt)))
#undef TX
      return rc;
  }
  for (int i = 0; i < c->t_layers; i++) {
    txt_layer *L = &m->tl[i];
    const int Dx = c->t_enc_hidden;
#define TP(s) (snprintf(pre, sizeof pre, "%s.encoder.layer.%d.%s", tx, i, s), pre)
    if ((rc = bind_lin(m, &L->q, TP("attention.self.query"), Dt, Dt)) ||
        (rc = bind_lin(m, &L->k, TP("attention.self.key"), Dt, Dt)) ||
        (rc = bind_lin(m, &L->v, TP("attention.self.value"), Dt, Dt)) ||
        (rc = bind_lin(m, &L->o, TP("attention.output.dense"), Dt, Dt)) ||
        (rc = bind_ln(m, &L->ln_self, TP("attention.output.LayerNorm"), Dt)) ||
        (rc = bind_lin(m, &L->cq, TP("crossattention.self.query"), Dt, Dt)) ||
        (rc = bind_lin(m, &L->ck, TP("crossattention.self.key"), Dt, Dx)) ||
        (rc = bind_lin(m, &L->cv, TP("crossattention.self.value"), Dt, Dx)) ||
        (rc = bind_lin(m, &L->co, TP("crossattention.output.dense"), Dt, Dt)) ||
        (rc = bind_ln(m, &L->ln_cross, TP("crossattention.output.LayerNorm"), Dt)) ||
        (rc = bind_lin(m, &L->ffn1, TP("intermediate.dense"), c->t_mlp, Dt)) ||
        (rc = bind_lin(m, &L->ffn2, TP("output.dense"), Dt, c->t_mlp)) ||
        (rc = bind_ln(m, &L->ln_ffn, TP("output.LayerNorm"), Dt)) || (rc = pack_txt_layer(m, L)))
      return rc;
#undef TP
  }
  if (c->captioner) return bind_lm_head(m);
  if ((rc = bind_lin(m, &m->vision_proj, "vision_proj", c->embed_dim, Dv)) ||
      (rc = bind_lin(m, &m->text_proj, "text_proj", c->embed_dim, Dt)) ||
      (rc = bind_lin(m, &m->itm_head, "itm_head", 2, Dt)))
    return rc;
  return BLIP_OK;
}

/* Fingerprint: geometry + safetensors header + file size + sampled data,
 * so that two checkpoints differ without hashing a gigabyte at every load. */
static void make_fingerprint(blip_model *m) {
  XXH3_state_t *s = XXH3_createState();
  if (!s) return;
  XXH3_64bits_reset(s);
  XXH3_64bits_update(s, &m->cfg, sizeof m->cfg);
  if (m->st) {
    /* the LM bias's second name (one tied Parameter; pytorch_model.bin keeps both,
     * safetensors one) must not tell two files of the same weights apart */
    const int alias = blip_st_find(m->st, "text_decoder.cls.predictions.bias") != NULL;
    for (int i = 0; i < blip_st_count(m->st); i++) {
      const blip_st_tensor *t = blip_st_at(m->st, i);
      if (alias && !strcmp(t->name, "text_decoder.cls.predictions.decoder.bias")) continue;
      XXH3_64bits_update(s, t->name, strlen(t->name));
      XXH3_64bits_update(s, &t->dtype, sizeof t->dtype);
      XXH3_64bits_update(s, t->shape, sizeof t->shape);
      size_t step = t->nbytes > 4096 ? t->nbytes / 4 : t->nbytes;
      for (size_t off = 0; step && off < t->nbytes; off += step) {
        size_t n = t->nbytes - off < 256 ? t->nbytes - off : 256;
        XXH3_64bits_update(s, (const char *)t->data + off, n);
      }
    }
  } else {
    XXH3_64bits_update(s, &m->seed, sizeof m->seed);
  }
  snprintf(m->fingerprint, sizeof m->fingerprint, "%016llx", (unsigned long long)XXH3_64bits_digest(s));
  XXH3_freeState(s);
}

/* Every linear layer of the model, for packing and freeing. */
static int all_linears(blip_model *m, blip_k_linear **out) {
  int n = 0;
  out[n++] = &m->patch;
  for (int i = 0; i < m->cfg.v_layers; i++) {
    vis_layer *L = &m->vl[i];
    out[n++] = &L->qkv, out[n++] = &L->proj, out[n++] = &L->fc1, out[n++] = &L->fc2;
  }
  for (int i = 0; i < m->cfg.t_layers; i++) {
    txt_layer *L = &m->tl[i];
    out[n++] = &L->q, out[n++] = &L->k, out[n++] = &L->v, out[n++] = &L->qkv, out[n++] = &L->o, out[n++] = &L->cq, out[n++] = &L->ck;
    out[n++] = &L->cv, out[n++] = &L->co, out[n++] = &L->ffn1, out[n++] = &L->ffn2;
  }
  out[n++] = &m->vision_proj, out[n++] = &m->text_proj, out[n++] = &m->itm_head;
  out[n++] = &m->lm_dense, out[n++] = &m->lm_dec;
  return n;
}

static int n_linears(const blip_cfg *c) { return 6 + 4 * c->v_layers + 11 * c->t_layers; }

void blip_model_free(blip_model *m) {
  if (!m) return;
  if (m->vl && m->tl) {
    blip_k_linear **ls = malloc((size_t)n_linears(&m->cfg) * sizeof *ls);
    if (ls) { /* on failure the packed layers leak rather than crash */
      int n = all_linears(m, ls);
      for (int i = 0; i < n; i++) blip_k_linear_unpack(ls[i]);
      free(ls);
    }
  }
  blip_k_ws_free(&m->ws);
  for (int i = 0; i < m->n_tws; i++) blip_k_ws_free(&m->tws[i]);
  free(m->tws);
  for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
  free(m->owned);
  free(m->vl);
  free(m->tl);
  free(m->arena);
  blip_tok_free(m->tok);
  blip_st_close(m->st);
  free(m);
}

static int model_new(const blip_cfg *cfg, const blip_model_opts *opts, blip_model **out) {
  blip_prec prec = opts ? opts->precision : BLIP_PREC_F32;
  if (prec != BLIP_PREC_F32 && prec != BLIP_PREC_BF16 && prec != BLIP_PREC_INT8)
    return blip_err_set(BLIP_EINVAL, "unknown precision %d", (int)prec);
  blip_model *m = calloc(1, sizeof *m);
  if (!m) return blip_err_set(BLIP_ENOMEM, "out of memory");
  m->cfg = *cfg;
  if (opts) m->opts = *opts;
  m->opts.weights = NULL;
  m->vl = calloc((size_t)cfg->v_layers, sizeof *m->vl);
  m->tl = calloc((size_t)cfg->t_layers, sizeof *m->tl);
  if (!m->vl || !m->tl) {
    blip_model_free(m);
    return blip_err_set(BLIP_ENOMEM, "out of memory");
  }
  *out = m;
  return BLIP_OK;
}

int blip_model_load(const char *dir, const blip_model_opts *opts, blip_model **out) {
  *out = NULL;
  char path[4096];
  blip_cfg cfg;
  snprintf(path, sizeof path, "%s/config.json", dir);
  int rc = blip_cfg_load(path, &cfg);
  if (rc) return rc;
  blip_model *m;
  if ((rc = model_new(&cfg, opts, &m))) return rc;
  snprintf(path, sizeof path, "%s/vocab.txt", dir);
  if ((rc = blip_tok_load(path, &m->tok))) goto fail;
  if (blip_tok_size(m->tok) > cfg.t_vocab) {
    rc = blip_err_set(BLIP_EFORMAT, "%s: %d tokens but the model's vocab_size is %d", path, blip_tok_size(m->tok), cfg.t_vocab);
    goto fail;
  }
  if (opts && opts->weights) snprintf(path, sizeof path, "%s", opts->weights);
  else {
    char bin[4096]; /* PyTorch-only checkpoints: pytorch_model.bin when there is no model.safetensors */
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    snprintf(bin, sizeof bin, "%s/pytorch_model.bin", dir);
    if (access(path, F_OK) != 0 && access(bin, F_OK) == 0) snprintf(path, sizeof path, "%s", bin);
  }
  if ((rc = blip_pt_open_weights(path, &m->st))) goto fail;
  /* a captioner's weights under a config.json without "architectures" */
  if (blip_st_find(m->st, "text_decoder.bert.embeddings.word_embeddings.weight") &&
      !blip_st_find(m->st, "text_encoder.embeddings.word_embeddings.weight"))
    m->cfg.captioner = 1;
  if ((rc = bind_all(m))) {
    rc = blip_err_wrap(rc, "%s", path);
    goto fail;
  }
  make_fingerprint(m);
  drop_released(m);
  *out = m;
  return BLIP_OK;
fail:
  blip_model_free(m);
  return rc;
}

int blip_model_random(const blip_cfg *cfg, const blip_model_opts *opts, uint64_t seed, blip_model **out) {
  *out = NULL;
  blip_model *m;
  int rc = model_new(cfg, opts, &m);
  if (rc) return rc;
  m->seed = seed;
  if ((rc = bind_all(m))) {
    blip_model_free(m);
    return rc;
  }
  make_fingerprint(m);
  *out = m;
  return BLIP_OK;
}

const blip_cfg *blip_model_cfg(const blip_model *m) { return &m->cfg; }
const blip_tok *blip_model_tok(const blip_model *m) { return m->tok; }
/* XCR0 says which register state the OS saves (xgetbv, valid once OSXSAVE is set). */
static uint64_t xcr0(void) {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}

blip_prec blip_model_auto_precision(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return BLIP_PREC_F32; /* no OSXSAVE */
  const uint64_t x = xcr0();
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return BLIP_PREC_F32;
  const int amx_bf16 = (d >> 22) & 1, amx_os = (x & 0x60000) == 0x60000;  /* TILECFG + TILEDATA state */
  const int avx512_os = (x & 0xe6) == 0xe6;                                   /* SSE, AVX, opmask, ZMM state */
  const int avx512f = (b >> 16) & 1;
  unsigned a1 = 0, b1, c1, d1;
  if (!__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) a1 = 0;
  const int avx512_bf16 = (a1 >> 5) & 1;
  return ((avx512f && avx512_bf16 && avx512_os) || (amx_bf16 && amx_os)) ? BLIP_PREC_BF16 : BLIP_PREC_F32;
}

int blip_model_parse_precision(const char *name, blip_prec *out) {
  static const char *const names[] = {"f32", "bf16", "int8"};
  if (name && !strcmp(name, "auto")) {
    *out = blip_model_auto_precision();
    return BLIP_OK;
  }
  for (int i = 0; i < 3; i++)
    if (name && !strcmp(name, names[i])) {
      *out = (blip_prec)i;
      return BLIP_OK;
    }
  return blip_err_set(BLIP_EINVAL, "precision '%s': use auto, f32, bf16 or int8", name ? name : "");
}

const char *blip_model_precision_name(blip_prec p) {
  return p == BLIP_PREC_BF16 ? "bf16" : p == BLIP_PREC_INT8 ? "int8" : "f32";
}

blip_prec blip_model_precision(const blip_model *m) { return m->opts.precision; }
int blip_model_vision_team(const blip_model *m) { return m->vteam; }
const char *blip_model_fingerprint(const blip_model *m) { return m->fingerprint; }

/* ---------- scratch ---------- */

static float *arena(blip_model *m, size_t nfloats) {
  if (nfloats > m->arena_cap) {
    float *a = malloc(nfloats * sizeof(float));
    if (!a) return NULL;
    free(m->arena);
    m->arena = a;
    m->arena_cap = nfloats;
  }
  return m->arena;
}

#define TRY(x) do { if ((rc = (x)) != BLIP_OK) goto done; } while (0)

/* A workspace per thread of a team (m->tws), for its own oneDNN calls. */
static int thread_ws(blip_model *m) {
  const int nt = blip_k_threads();
  if (nt <= m->n_tws) return BLIP_OK;
  blip_k_ws *w = realloc(m->tws, (size_t)nt * sizeof *w);
  if (!w) return blip_err_set(BLIP_ENOMEM, "out of memory for %d threads' workspaces", nt);
  memset(w + m->n_tws, 0, (size_t)(nt - m->n_tws) * sizeof *w);
  m->tws = w;
  m->n_tws = nt;
  return BLIP_OK;
}

/* ---------- vision ---------- */

/* pixels [3,S,S] -> patches [G*G, 3*p*p] in (c, ky, kx) order = conv weight order. */
static void im2patch(float *dst, const float *px, int S, int p) {
  const int G = S / p;
  for (int gy = 0; gy < G; gy++)
    for (int gx = 0; gx < G; gx++) {
      float *d = dst + ((long)gy * G + gx) * 3 * p * p;
      for (int c = 0; c < 3; c++)
        for (int ky = 0; ky < p; ky++) {
          memcpy(d, px + ((long)c * S + gy * p + ky) * S + gx * p, (size_t)p * sizeof(float));
          d += p;
        }
    }
}

/* The encoder layers of blip_model_vision as one team, on CPUs with the
 * fused attention kernels: each thread takes the same share of the rows
 * through LayerNorm, its layers' matmuls (oneDNN on the thread, the int8
 * conversions and epilogues with them) and the residuals, and its share of
 * the attention's (head, row block) pairs. Threads meet twice a layer:
 * before attention (it reads every row) and after (its output rows come
 * from both). Against an OpenMP region per op (up to 14 a layer at int8,
 * each waking the sleeping thread) and oneDNN's own 2-thread split. */
static int vision_team(blip_model *m, float *x, int n, float *h, float *qkv, float *att, float *mlp) {
  const blip_cfg *c = &m->cfg;
  const int T = c->v_tokens, D = c->v_hidden, H = c->v_heads, dh = D / H, M = n * T;
  const blip_k_prec prec = (blip_k_prec)m->opts.precision;
  const int bf = prec == BLIP_K_BF16, lp = prec != BLIP_K_F32, in16 = bf ? BLIP_K_IN_BF16 : 0;
  const int fq = in16 | (lp ? BLIP_K_OUT_BF16 : 0), fo = BLIP_K_ACCUM | in16, f1 = BLIP_K_GELU | in16 | (bf ? BLIP_K_OUT_BF16 : 0);
  const size_t es = lp ? 2 : 4;
  const float scale = 1.0f / sqrtf((float)dh);
  void *hh = h, *qq = qkv, *aa = att; /* bf16 buffers live in the f32 ones */
  int rc = thread_ws(m);
  for (int l = 0; l < c->v_layers && !rc; l++) {
    const vis_layer *L = &m->vl[l];
    if (!(rc = blip_k_rows_prepare(&L->qkv, M, fq)) && !(rc = blip_k_rows_prepare(&L->proj, M, fo)) &&
        !(rc = blip_k_rows_prepare(&L->fc1, M, f1)))
      rc = blip_k_rows_prepare(&L->fc2, M, fo);
  }
  if (rc || (rc = blip_k_team_attention_reserve(&m->ws, prec, T, dh))) return rc;
  blip_k_team t;
  blip_k_team_init(&t);
#pragma omp parallel num_threads(blip_k_threads()) /* the row split the matmuls were prepared for */
  {
    blip_k_ws *tw = &m->tws[omp_get_thread_num()];
    int e = BLIP_OK;
    double *pf = omp_get_thread_num() ? NULL : m->vprof, tp = pf ? omp_get_wtime() : 0;
#define PHASE(k) \
  if (pf) { \
    const double t_ = omp_get_wtime(); \
    pf[k] += (t_ - tp) * 1e3, tp = t_; \
  }
    for (int l = 0; l < c->v_layers; l++) { /* e is the same on every thread after a sync: all break together */
      const vis_layer *L = &m->vl[l];
      if (!e && bf) blip_k_team_layernorm_bf16(hh, x, L->ln1.g, L->ln1.b, M, D, c->v_eps);
      else if (!e) blip_k_team_layernorm(h, x, L->ln1.g, L->ln1.b, M, D, c->v_eps);
      PHASE(BLIP_VP_LN);
      if (!e) e = blip_k_rows_linear(qq, hh, &L->qkv, M, fq, tw);
      PHASE(BLIP_VP_QKV);
      if ((e = blip_k_team_sync(&t, e))) break;
      PHASE(BLIP_VP_WAIT);
      for (int b = 0; b < n && !e; b++) {
        const char *q = (const char *)qq + (size_t)b * T * 3 * D * es;
        e = blip_k_team_attention_fused((char *)aa + (size_t)b * T * D * (bf ? 2 : 4), D, q, q + D * es, q + 2 * D * es, 3 * D, T, H, dh,
                                        scale, prec, &m->ws);
      }
      PHASE(BLIP_VP_ATTN);
      if ((e = blip_k_team_sync(&t, e))) break;
      PHASE(BLIP_VP_WAIT);
      e = blip_k_rows_linear(x, aa, &L->proj, M, fo, tw); /* from here on, this thread's rows only */
      PHASE(BLIP_VP_PROJ);
      if (bf) blip_k_team_layernorm_bf16(hh, x, L->ln2.g, L->ln2.b, M, D, c->v_eps);
      else blip_k_team_layernorm(h, x, L->ln2.g, L->ln2.b, M, D, c->v_eps);
      PHASE(BLIP_VP_LN);
      if (!e) e = blip_k_rows_linear(mlp, hh, &L->fc1, M, f1, tw);
      PHASE(BLIP_VP_FC1);
      if (!e) e = blip_k_rows_linear(x, mlp, &L->fc2, M, fo, tw);
      PHASE(BLIP_VP_FC2);
    }
    e = blip_k_team_sync(&t, e); /* the last layer's rows, and errors after the last meeting */
    PHASE(BLIP_VP_WAIT);
#undef PHASE
#pragma omp master
    rc = e;
  }
  return blip_k_team_error(&t, rc);
}

int blip_model_vision(blip_model *m, const float *pixels, int n, float *embeds, float *feat) {
  const blip_cfg *c = &m->cfg;
  const int T = c->v_tokens, D = c->v_hidden, S = c->image_size, p = c->patch, H = c->v_heads, dh = D / H;
  const int G = S / p, M = n * T;
  if (n <= 0) return blip_err_set(BLIP_EINVAL, "vision: batch size %d", n);
  if (feat && c->captioner) return blip_err_set(BLIP_EINVAL, "vision: a captioning model has no image projection");
  size_t need = (size_t)M * D * 3 + (size_t)M * 3 * D + (size_t)M * c->v_mlp + (size_t)G * G * 3 * p * p;
  float *a = arena(m, need);
  if (!a) return blip_err_set(BLIP_ENOMEM, "vision: out of memory for batch %d", n);
  float *x = a, *h = x + (size_t)M * D, *att = h + (size_t)M * D, *qkv = att + (size_t)M * D;
  float *mlp = qkv + (size_t)M * 3 * D, *patches = mlp + (size_t)M * c->v_mlp;
  int rc = BLIP_OK;
  double tp = omp_get_wtime();

  /* embeddings: [CLS] + patch projections, plus positions */
  for (int b = 0; b < n; b++) {
    float *xb = x + (size_t)b * T * D;
    im2patch(patches, pixels + (size_t)b * 3 * S * S, S, p);
    TRY(blip_k_linear_fwd(xb + D, patches, &m->patch, G * G));
    memcpy(xb, m->cls, (size_t)D * sizeof(float));
    blip_k_add(xb, m->vpos, (long)T * D);
  }
  const float scale = 1.0f / sqrtf((float)dh);
  /* bf16 model: LayerNorm -> qkv -> attention -> projection and LayerNorm ->
   * MLP hand over bf16 (no f32 round trips, no conversion passes); int8
   * model: qkv's epilogue writes the bf16 that attention quantizes for its
   * int8 products. The bf16 buffers live in the f32 ones (half their size). */
  const int bf = m->opts.precision == BLIP_PREC_BF16, lp = m->opts.precision != BLIP_PREC_F32;
  const int in16 = bf ? BLIP_K_IN_BF16 : 0;
  uint16_t *h16 = (uint16_t *)(void *)h, *qkv16 = (uint16_t *)(void *)qkv, *att16 = (uint16_t *)(void *)att;
  if (m->vprof) m->vprof[BLIP_VP_EMBED] += (omp_get_wtime() - tp) * 1e3;
  if (m->vteam) TRY(vision_team(m, x, n, h, qkv, att, mlp));
  tp = omp_get_wtime();
  for (int l = 0; l < c->v_layers && !m->vteam; l++) { /* a region per op */
    const vis_layer *L = &m->vl[l];
    if (bf) blip_k_layernorm_bf16(h16, x, L->ln1.g, L->ln1.b, M, D, c->v_eps);
    else blip_k_layernorm(h, x, L->ln1.g, L->ln1.b, M, D, c->v_eps);
    TRY(blip_k_linear_fwd_ex(lp ? (void *)qkv16 : qkv, bf ? (void *)h16 : h, &L->qkv, M, in16 | (lp ? BLIP_K_OUT_BF16 : 0)));
    for (int b = 0; b < n; b++) {
      const size_t o = (size_t)b * T * D;
      if (bf) {
        const uint16_t *q = qkv16 + 3 * o;
        TRY(blip_k_attention_bf16in(att16 + o, D, 1, q, 3 * D, q + D, 3 * D, q + 2 * D, 3 * D, T, T, H, dh, scale, NULL, &m->ws));
      } else if (lp) {
        const uint16_t *q = qkv16 + 3 * o;
        TRY(blip_k_attention_int8(att + o, D, q, 3 * D, q + D, 3 * D, q + 2 * D, 3 * D, T, T, H, dh, scale, &m->ws));
      } else {
        const float *q = qkv + 3 * o;
        TRY(blip_k_attention(att + o, D, q, 3 * D, q + D, 3 * D, q + 2 * D, 3 * D, T, T, H, dh, scale, NULL, &m->ws));
      }
    }
    TRY(blip_k_linear_fwd_ex(x, bf ? (void *)att16 : att, &L->proj, M, BLIP_K_ACCUM | in16));
    if (bf) blip_k_layernorm_bf16(h16, x, L->ln2.g, L->ln2.b, M, D, c->v_eps);
    else blip_k_layernorm(h, x, L->ln2.g, L->ln2.b, M, D, c->v_eps);
    TRY(blip_k_mlp(x, bf ? (void *)h16 : h, in16, &L->fc1, &L->fc2, M, mlp));
  }
  blip_k_layernorm(x, x, m->post_ln.g, m->post_ln.b, M, D, c->v_eps);
  if (embeds) memcpy(embeds, x, (size_t)M * D * sizeof(float));
  if (feat) {
    for (int b = 0; b < n; b++) TRY(blip_k_linear_fwd(feat + (size_t)b * c->embed_dim, x + (size_t)b * T * D, &m->vision_proj, 1));
    blip_k_l2norm(feat, n, c->embed_dim);
  }
  if (m->vprof) m->vprof[BLIP_VP_REST] += (omp_get_wtime() - tp) * 1e3;
done:
  return rc;
}

int blip_model_vision_profile(blip_model *m, const float *pixels, int n, float *feat, double ms[BLIP_VP_N]) {
  if (!m->vteam) return blip_err_set(BLIP_EINVAL, "vision profile: the encoder runs an op at a time here, not as a team");
  m->vprof = ms;
  const int rc = blip_model_vision(m, pixels, n, NULL, feat);
  m->vprof = NULL;
  return rc;
}

/* ---------- text ---------- */

static int check_retrieval(const blip_model *m) {
  return m->cfg.captioner ? blip_err_set(BLIP_EINVAL, "a captioning model has no text encoder or ITM head: use a retrieval model")
                          : BLIP_OK;
}

static int check_ids(const blip_model *m, const int32_t *ids, long n, int L) {
  if (L <= 0 || L > m->cfg.t_max_pos)
    return blip_err_set(BLIP_EINVAL, "text: length %d outside 1..%d positions", L, m->cfg.t_max_pos);
  for (long i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= m->cfg.t_vocab) return blip_err_set(BLIP_EINVAL, "text: token id %d out of range", ids[i]);
  return BLIP_OK;
}

/* x[r*L + t] = LN(word[ids] + pos[pos0 + t]) */
static void text_embed(const blip_model *m, float *x, const int32_t *ids, int rows, int L, int pos0) {
  const int D = m->cfg.t_hidden;
  for (int r = 0; r < rows; r++)
    for (int t = 0; t < L; t++) {
      float *xt = x + ((size_t)r * L + t) * D;
      const float *w = m->word + (size_t)ids[r * L + t] * D, *p = m->tpos + (size_t)(pos0 + t) * D;
      for (int j = 0; j < D; j++) xt[j] = w[j] + p[j];
    }
  blip_k_layernorm(x, x, m->emb_ln.g, m->emb_ln.b, rows * L, D, m->cfg.t_eps);
}

/* Floats of one thread's block of reassociation scratch for sequences of
 * up to L tokens: A, P, C in f32, then A16 and P16 in bf16. */
static size_t reassoc_block(const blip_cfg *c, int L) {
  const size_t R = (size_t)c->t_heads * L, Dx = c->t_enc_hidden, T = c->v_tokens;
  return (R * (2 * Dx + T) + (R * (Dx + T) + 1) / 2 + 15) & ~(size_t)15;
}

/* Reassociated cross-attention (see blip-reference.md), for `rows`
 * sequences of Lq queries, row r attending to image tokens X_r [T, Dx]:
 * scores_h = (q_h Wk_h) X^T (the key bias adds a per-row constant, which
 * softmax cancels), out_h = (P_h X) Wv_h^T + bv_h (rows of P sum to 1).
 * The image tokens are never projected. Run by a team: the products with
 * the weights per head over all rows (M = rows*Lq), heads shared among
 * the threads; the products with X per sequence for all heads at once
 * ([H*Lq, Dx] x X^T, then [H*Lq, T] x X), sequences shared (or, with
 * fewer sequences than threads, each sequence's rows). Between the two,
 * per-head rows are gathered/scattered: scr holds AC [H][M][Dx], then
 * each thread's A, P, C block (reassoc_block). Sequence r is rows
 * off[r]..off[r+1] of q. Every thread's oneDNN calls use its own m->tws. */
static int cross_attn_reassoc(blip_k_team *t, blip_model *m, float *out, const float *q, int rows, const int *off,
                              const float *const *images, const uint16_t *const *images16, const blip_k_linear *ck,
                              const blip_k_linear *cv, float *scr) {
  const blip_cfg *c = &m->cfg;
  const int H = c->t_heads, Dt = c->t_hidden, dh = Dt / H, Dx = ck->in, T = c->v_tokens, M = off[rows];
  const int nt = omp_get_num_threads(), id = omp_get_thread_num(), by_seq = rows >= nt;
  const float scale = 1.0f / sqrtf((float)dh);
  int Lmax = 0;
  for (int r = 0; r < rows; r++) Lmax = off[r + 1] - off[r] > Lmax ? off[r + 1] - off[r] : Lmax;
  float *AC = scr, *A = AC + (size_t)H * M * Dx + (size_t)id * reassoc_block(c, Lmax);
  float *P = A + (size_t)H * Lmax * Dx, *C = P + (size_t)H * Lmax * T;
  uint16_t *A16 = (uint16_t *)(void *)(C + (size_t)H * Lmax * Dx), *P16 = A16 + (size_t)H * Lmax * Dx;
  blip_k_ws *ws = &m->tws[id];
  int rc = BLIP_OK;
  for (int h = id; h < H && !rc; h += nt) /* AC[h] = scale q_h Wk_h */
    rc = blip_k_gemm(0, 0, M, Dx, dh, scale, q + h * dh, Dt, ck->w + (size_t)h * dh * Dx, Dx, 0.0f, AC + (size_t)h * M * Dx, Dx);
  if ((rc = blip_k_team_sync(t, rc))) return rc;
  for (int r = by_seq ? id : 0; r < rows && !rc; r += by_seq ? nt : 1) {
    const int Lq = off[r + 1] - off[r], R = H * Lq;
    const int i0 = by_seq ? 0 : (int)((long)R * id / nt), i1 = by_seq ? R : (int)((long)R * (id + 1) / nt), n = i1 - i0;
    if (!n) continue;
    for (int i = i0; i < i1; i++) /* row i is head i / Lq, token i % Lq */
      memcpy(A + (size_t)(i - i0) * Dx, AC + ((size_t)(i / Lq) * M + off[r] + i % Lq) * Dx, (size_t)Dx * sizeof(float));
    if (images16 && m->opts.precision == BLIP_PREC_INT8) {
      /* int8 model: both products with X in int8, as one attention head of
       * size Dx (X quantized per token for the scores, per channel for the
       * weighted sum; where the CPU lacks VNNI, the bf16 kernels) */
      blip_k_to_bf16(A16, A, (long)n * Dx);
      if ((rc = blip_k_attention_int8(C, Dx, A16, Dx, images16[r], Dx, images16[r], Dx, n, T, 1, Dx, 1.0f, ws))) break;
    } else if (images16) { /* bf16 model: both products with X in bf16 */
      blip_k_to_bf16(A16, A, (long)n * Dx);
      if ((rc = blip_k_gemm_bf16(1, n, T, Dx, A16, Dx, images16[r], Dx, P, T, ws))) break;
      blip_k_softmax(P, n, T);
      blip_k_to_bf16(P16, P, (long)n * T);
      if ((rc = blip_k_gemm_bf16(0, n, Dx, T, P16, T, images16[r], Dx, C, Dx, ws))) break;
    } else {
      if ((rc = blip_k_gemm(0, 1, n, T, Dx, 1.0f, A, Dx, images[r], Dx, 0.0f, P, T))) break;
      blip_k_softmax(P, n, T);
      if ((rc = blip_k_gemm(0, 0, n, Dx, T, 1.0f, P, T, images[r], Dx, 0.0f, C, Dx))) break;
    }
    for (int i = i0; i < i1; i++)
      memcpy(AC + ((size_t)(i / Lq) * M + off[r] + i % Lq) * Dx, C + (size_t)(i - i0) * Dx, (size_t)Dx * sizeof(float));
  }
  if ((rc = blip_k_team_sync(t, rc))) return rc;
  for (int h = id; h < H && !rc; h += nt) { /* out_h = C_h Wv_h^T + bv_h, all rows */
    rc = blip_k_gemm(0, 1, M, dh, Dx, 1.0f, AC + (size_t)h * M * Dx, Dx, cv->w + (size_t)h * dh * Dx, Dx, 0.0f, out + h * dh, Dt);
    for (int i = 0; i < M && !rc; i++)
      for (int j = h * dh; j < (h + 1) * dh; j++) out[(size_t)i * Dt + j] += cv->b[j];
  }
  return blip_k_team_sync(t, rc);
}

/* The activations and scratch of one text_encode call. */
typedef struct {
  float *x, *q, *att, *ff;
  int rows;
  const int *off;
  const float *mask_add;
  const float *const *images;      /* TXT_CROSS: the reassociated cross-attention's image tokens */
  const uint16_t *const *images16; /* and their bf16 copies (bf16 and int8 models) */
} txt_io;

/* Blocks of text layers l0..l1 run by one team (one OpenMP region, see
 * blip_kern.h): self-attention, cross-attention (reassociated) and/or
 * feed-forward, in layer order. Self-attention is f32 direct loops at every
 * precision (texts are short: converting operands costs more). */
enum { TXT_SELF = 1, TXT_CROSS = 2, TXT_FFN = 4 };
static int text_team(blip_model *m, int l0, int l1, int blocks, const txt_io *io) {
  const blip_cfg *c = &m->cfg;
  const int D = c->t_hidden, H = c->t_heads, rows = io->rows, M = io->off[rows];
  const int bf = m->opts.precision == BLIP_PREC_BF16;
  const int f1 = BLIP_K_GELU | (bf ? BLIP_K_OUT_BF16 : 0), f2 = BLIP_K_ACCUM | (bf ? BLIP_K_IN_BF16 : 0);
  const float scale = 1.0f / sqrtf((float)(D / H));
  float *x = io->x, *q = io->q, *att = io->att, *ff = io->ff;
  const txt_layer *L0 = &m->tl[l0]; /* every layer has the same shapes */
  int rc;
  if ((rc = blip_k_linear_reserve(&L0->qkv, M, 0)) || (rc = blip_k_linear_reserve(&L0->o, M, BLIP_K_ACCUM)) ||
      (rc = blip_k_linear_reserve(&L0->ffn1, M, f1)) || (rc = blip_k_linear_reserve(&L0->ffn2, M, f2)) ||
      ((blocks & TXT_CROSS) && ((rc = blip_k_linear_reserve(&L0->cq, M, 0)) || (rc = blip_k_linear_reserve(&L0->co, M, BLIP_K_ACCUM)))))
    return rc;
  for (int r = 0; r < rows; r++)
    if (io->off[r + 1] - io->off[r] > BLIP_K_TEAM_ATT_MAX)
      return blip_err_set(BLIP_EINVAL, "text: %d tokens exceed %d", io->off[r + 1] - io->off[r], BLIP_K_TEAM_ATT_MAX);
  if ((blocks & TXT_CROSS) && (rc = thread_ws(m))) return rc; /* the cross-attention's own oneDNN calls */
  blip_k_team t;
  blip_k_team_init(&t);
#pragma omp parallel
  {
    int e = BLIP_OK;
    for (int l = l0; l < l1 && !e; l++) {
      const txt_layer *Ly = &m->tl[l];
      if (blocks & TXT_SELF) {
        if ((e = blip_k_team_sync(&t, blip_k_team_linear(&t, q, x, &Ly->qkv, M, 0)))) break; /* [M, 3D]: q|k|v */
        blip_k_team_attention(att, D, q, q + D, q + 2 * D, 3 * D, rows, io->off, H, D / H, scale, io->mask_add);
        blip_k_team_sync(&t, BLIP_OK);
        if ((e = blip_k_team_sync(&t, blip_k_team_linear(&t, x, att, &Ly->o, M, BLIP_K_ACCUM)))) break;
        blip_k_team_layernorm(x, x, Ly->ln_self.g, Ly->ln_self.b, M, D, c->t_eps);
        blip_k_team_sync(&t, BLIP_OK);
      }
      if (blocks & TXT_CROSS) {
        if ((e = blip_k_team_sync(&t, blip_k_team_linear(&t, q, x, &Ly->cq, M, 0)))) break;
        if ((e = cross_attn_reassoc(&t, m, att, q, rows, io->off, io->images, io->images16, &Ly->ck, &Ly->cv, ff))) break;
        if ((e = blip_k_team_sync(&t, blip_k_team_linear(&t, x, att, &Ly->co, M, BLIP_K_ACCUM)))) break;
        blip_k_team_layernorm(x, x, Ly->ln_cross.g, Ly->ln_cross.b, M, D, c->t_eps);
        blip_k_team_sync(&t, BLIP_OK);
      }
      if (blocks & TXT_FFN) {
        if ((e = blip_k_team_sync(&t, blip_k_team_linear(&t, ff, x, &Ly->ffn1, M, f1)))) break;
        if ((e = blip_k_team_sync(&t, blip_k_team_linear(&t, x, ff, &Ly->ffn2, M, f2)))) break;
        blip_k_team_layernorm(x, x, Ly->ln_ffn.g, Ly->ln_ffn.b, M, D, c->t_eps);
        blip_k_team_sync(&t, BLIP_OK);
      }
    }
#pragma omp master
    rc = e;
  }
  return blip_k_team_error(&t, rc);
}

/* BERT encoder over `rows` sequences, x in/out [M, Dt]: of length L each
 * (off NULL; M = rows*L), or packed without padding, sequence r being rows
 * off[r]..off[r+1] (M = off[rows]). mask_add [M] or NULL. images NULL =
 * unimodal; else images[r] is the [T, Dx] token matrix that sequence r
 * cross-attends to: reassociated (fast) in the team, or per sequence with
 * projected keys and values (the naive reference), or kvpre: K/V of one
 * image, already projected, for every row. Unimodal and reassociated, the
 * whole encoder is one team. */
static int text_encode(blip_model *m, float *x, int rows, int L, const int *off, const float *mask_add, const float *const *images,
                       const uint16_t *const *images16, int fast, const float *kvpre, float *buf) {
  const blip_cfg *c = &m->cfg;
  const int D = c->t_hidden, H = c->t_heads, dh = D / H, T = c->v_tokens;
  int *uoff = NULL;
  if (!off) { /* uniform rows */
    if (!(uoff = malloc((size_t)(rows + 1) * sizeof *uoff))) return blip_err_set(BLIP_ENOMEM, "text: out of memory");
    for (int r = 0; r <= rows; r++) uoff[r] = r * L;
    off = uoff;
  }
  const int M = off[rows];
  float *q = buf, *att = q + (size_t)M * 3 * D; /* q: [M, 3D] self-attention q|k|v, then [M, D] cross queries */
  float *ff = att + (size_t)M * D; /* [M, t_mlp]; reused as image K/V or reassoc scratch */
  const txt_io io = {x, q, att, ff, rows, off, mask_add, images, images16};
  const float scale = 1.0f / sqrtf((float)dh);
  int rc = BLIP_OK;
  if (!kvpre && (!images || fast)) {
    rc = text_team(m, 0, c->t_layers, TXT_SELF | (images ? TXT_CROSS : 0) | TXT_FFN, &io);
    goto done;
  }
  for (int l = 0; l < c->t_layers; l++) {
    const txt_layer *Ly = &m->tl[l];
    TRY(text_team(m, l, l + 1, TXT_SELF, &io));
    TRY(blip_k_linear_fwd(q, x, &Ly->cq, M));
    if (kvpre) { /* every row attends to one image whose K/V are projected: all M queries at once */
      const float *ik = kvpre + (size_t)l * 2 * T * D, *iv = ik + (size_t)T * D;
      TRY(blip_k_attention(att, D, q, D, ik, D, iv, D, M, T, H, dh, scale, NULL, &m->ws));
    } else {
      for (int r = 0; r < rows; r++) {
        size_t o = (size_t)off[r] * D;
        float *ik = ff, *iv = ff + (size_t)T * D;
        TRY(blip_k_linear_fwd(ik, images[r], &Ly->ck, T));
        TRY(blip_k_linear_fwd(iv, images[r], &Ly->cv, T));
        TRY(blip_k_attention(att + o, D, q + o, D, ik, D, iv, D, off[r + 1] - off[r], T, H, dh, scale, NULL, &m->ws));
      }
    }
    TRY(blip_k_linear_fwd_ex(x, att, &Ly->co, M, BLIP_K_ACCUM));
    blip_k_layernorm(x, x, Ly->ln_cross.g, Ly->ln_cross.b, M, D, c->t_eps);
    TRY(text_team(m, l, l + 1, TXT_FFN, &io));
  }
done:
  free(uoff);
  return rc;
}

/* Floats text_encode needs besides x, for M = rows*L and cross-attention. */
static size_t text_scratch(const blip_cfg *c, int rows, int L, int images) {
  size_t M = (size_t)rows * L, D = c->t_hidden, T = c->v_tokens, Dx = c->t_enc_hidden;
  size_t ff = M * c->t_mlp;
  if (images) {
    /* AC, A, P, C in floats, then A16 and P16 (bf16, rounded up to floats) */
    size_t kv = 2 * T * D, re = (size_t)c->t_heads * M * Dx + (size_t)blip_k_threads() * reassoc_block(c, L);
    if (kv > ff) ff = kv;
    if (re > ff) ff = re;
  }
  return 4 * M * D + ff;
}

int blip_model_text(blip_model *m, const int32_t *ids, const int32_t *mask, int n, int L, float *embeds, float *feat) {
  const blip_cfg *c = &m->cfg;
  const int D = c->t_hidden;
  int rc = check_retrieval(m);
  if (!rc) rc = check_ids(m, ids, (long)n * L, L);
  if (rc) return rc;
  if (n <= 0) return blip_err_set(BLIP_EINVAL, "text: batch size %d", n);
  size_t M = (size_t)n * L;
  float *a = arena(m, M * D + M + text_scratch(c, n, L, 0));
  int *off = malloc((size_t)(n + 1) * sizeof *off);
  if (!a || !off) {
    free(off);
    return blip_err_set(BLIP_ENOMEM, "text: out of memory");
  }
  float *x = a, *madd = x + M * D, *buf = madd + M;
  /* Features only, and every row's mask real tokens then padding: the rows
   * run packed (the padding would only be computed to be masked out). */
  int packed = mask && !embeds;
  off[0] = 0;
  for (int b = 0; b < n && packed; b++) {
    int len = 0;
    while (len < L && mask[(size_t)b * L + len]) len++;
    for (int t = len; t < L && packed; t++) packed = !mask[(size_t)b * L + t];
    packed &= len > 0;
    off[b + 1] = off[b] + len;
  }
  if (packed) {
    for (int b = 0; b < n; b++) text_embed(m, x + (size_t)off[b] * D, ids + (size_t)b * L, 1, off[b + 1] - off[b], 0);
    TRY(text_encode(m, x, n, L, off, NULL, NULL, NULL, 0, NULL, buf));
  } else {
    for (size_t i = 0; i < M; i++) madd[i] = mask && !mask[i] ? -10000.0f : 0.0f;
    for (int b = 0; b <= n; b++) off[b] = b * L;
    text_embed(m, x, ids, n, L, 0);
    TRY(text_encode(m, x, n, L, off, madd, NULL, NULL, 0, NULL, buf));
  }
  if (embeds) memcpy(embeds, x, M * D * sizeof(float));
  if (feat) {
    for (int b = 0; b < n; b++) TRY(blip_k_linear_fwd(feat + (size_t)b * c->embed_dim, x + (size_t)off[b] * D, &m->text_proj, 1));
    blip_k_l2norm(feat, n, c->embed_dim);
  }
done:
  free(off);
  return rc;
}

int blip_model_itm_pairs(blip_model *m, const int32_t *ids, const int *lens, int L, const float *const *images, int n,
                         blip_itm_first first, int fast, float *logits, float *cls) {
  const blip_cfg *c = &m->cfg;
  const int D = c->t_hidden;
  int rc = check_retrieval(m);
  if (!rc && n <= 0) rc = blip_err_set(BLIP_EINVAL, "itm: %d pairs", n);
  if (!rc) rc = check_ids(m, ids, (long)n * L, L);
  for (int i = 0; i < n && !rc; i++)
    if (lens[i] < 1 || lens[i] > L) rc = blip_err_set(BLIP_EINVAL, "itm: caption %d of %d tokens, rows of %d", i, lens[i], L);
  if (rc) return rc;
  /* bf16/int8 models: the candidates' image tokens in bf16, converted once
   * for all layers of the reassociated cross-attention */
  const int lp = fast && m->opts.precision != BLIP_PREC_F32;
  const size_t TD = (size_t)c->v_tokens * c->t_enc_hidden, M = (size_t)n * L; /* M: at most, padded */
  const size_t img16 = lp ? ((size_t)n * TD + 1) / 2 : 0; /* floats holding the bf16 copies */
  float *a = arena(m, M * D + text_scratch(c, n, L, 1) + img16);
  int32_t *tid = malloc((size_t)L * sizeof *tid);
  int *off = malloc((size_t)(n + 1) * sizeof *off);
  const uint16_t **im16 = lp ? calloc((size_t)n, sizeof *im16) : NULL;
  if (!a || !tid || !off || (lp && !im16)) {
    free(tid);
    free(off);
    free(im16);
    return blip_err_set(BLIP_ENOMEM, "itm: out of memory");
  }
  float *x = a, *buf = x + M * D;
  if (lp) {
    uint16_t *dst = (uint16_t *)(void *)(buf + text_scratch(c, n, L, 1));
    for (int i = 0; i < n; i++) {
      blip_k_to_bf16(dst + i * TD, images[i], (long)TD);
      im16[i] = dst + i * TD;
    }
  }
  /* the captions packed without padding (a pair's cost follows its own
   * length): caption i is rows off[i]..off[i+1] */
  off[0] = 0;
  for (int i = 0; i < n; i++) {
    off[i + 1] = off[i] + lens[i];
    memcpy(tid, ids + (size_t)i * L, (size_t)lens[i] * sizeof *tid);
    tid[0] = first == BLIP_ITM_ENC ? c->bos_id + 1 : BLIP_TOK_CLS;
    text_embed(m, x + (size_t)off[i] * D, tid, 1, lens[i], 0);
  }
  TRY(text_encode(m, x, n, L, off, NULL, images, im16, fast, NULL, buf));
  for (int i = 0; i < n; i++) {
    const float *xi = x + (size_t)off[i] * D;
    TRY(blip_k_linear_fwd(logits + 2 * i, xi, &m->itm_head, 1));
    if (cls) memcpy(cls + (size_t)i * D, xi, (size_t)D * sizeof(float));
  }
done:
  free(tid);
  free(off);
  free(im16);
  return rc;
}

int blip_model_itm(blip_model *m, const int32_t *ids, int len, const float *const *images, int k, blip_itm_first first,
                   int fast, float *logits, float *cls) {
  if (k <= 0) return blip_err_set(BLIP_EINVAL, "itm: %d candidates", k);
  if (len <= 0) return blip_err_set(BLIP_EINVAL, "text: length %d outside 1..%d positions", len, m->cfg.t_max_pos);
  int32_t *rep = malloc((size_t)k * len * sizeof *rep); /* the caption once per candidate */
  int *lens = malloc((size_t)k * sizeof *lens);
  int rc = !rep || !lens ? blip_err_set(BLIP_ENOMEM, "itm: out of memory") : BLIP_OK;
  for (int i = 0; !rc && i < k; i++) {
    memcpy(rep + (size_t)i * len, ids, (size_t)len * sizeof *rep);
    lens[i] = len;
  }
  if (!rc) rc = blip_model_itm_pairs(m, rep, lens, len, images, k, first, fast, logits, cls);
  free(rep);
  free(lens);
  return rc;
}

size_t blip_model_itm_kv_floats(const blip_model *m) {
  return (size_t)m->cfg.t_layers * 2 * m->cfg.v_tokens * m->cfg.t_hidden;
}

int blip_model_itm_kv(blip_model *m, const float *image, float *kv) {
  const blip_cfg *c = &m->cfg;
  const size_t TD = (size_t)c->v_tokens * c->t_hidden;
  int rc = check_retrieval(m);
  for (int l = 0; l < c->t_layers && !rc; l++) {
    rc = blip_k_linear_fwd(kv + (size_t)l * 2 * TD, image, &m->tl[l].ck, c->v_tokens);
    if (!rc) rc = blip_k_linear_fwd(kv + (size_t)l * 2 * TD + TD, image, &m->tl[l].cv, c->v_tokens);
  }
  return rc;
}

int blip_model_itm_captions(blip_model *m, const int32_t *ids, int len, int n, const float *kv, blip_itm_first first,
                            float *logits) {
  const blip_cfg *c = &m->cfg;
  const int D = c->t_hidden;
  int rc = check_retrieval(m);
  if (!rc) rc = check_ids(m, ids, (long)n * len, len);
  if (rc) return rc;
  if (n <= 0) return blip_err_set(BLIP_EINVAL, "itm: %d captions", n);
  const size_t M = (size_t)n * len;
  float *a = arena(m, M * D + text_scratch(c, n, len, 0));
  int32_t *tid = malloc(M * sizeof *tid);
  if (!a || !tid) {
    free(tid);
    return blip_err_set(BLIP_ENOMEM, "itm: out of memory");
  }
  float *x = a, *buf = x + M * D;
  memcpy(tid, ids, M * sizeof *tid);
  for (int i = 0; i < n; i++) tid[(size_t)i * len] = first == BLIP_ITM_ENC ? c->bos_id + 1 : BLIP_TOK_CLS;
  text_embed(m, x, tid, n, len, 0);
  TRY(text_encode(m, x, n, len, NULL, NULL, NULL, NULL, 0, kv, buf));
  for (int i = 0; i < n; i++) TRY(blip_k_linear_fwd(logits + 2 * i, x + (size_t)i * len * D, &m->itm_head, 1));
done:
  free(tid);
  return rc;
}

int blip_model_tokenize(const blip_model *m, const char *text, int max_len, int32_t *ids, int32_t *mask, int *n_real,
                        int *truncated) {
  if (!m->tok) return blip_err_set(BLIP_EINVAL, "tokenize: this model has no vocabulary");
  int n = 0, full = 0;
  int rc = blip_tok_encode(m->tok, text, strlen(text), max_len, ids, max_len, &n, &full);
  if (rc) return rc;
  for (int i = 0; i < max_len; i++) {
    if (i >= n) ids[i] = m->cfg.pad_id;
    mask[i] = i < n;
  }
  if (n_real) *n_real = n;
  if (truncated) *truncated = full > n;
  return BLIP_OK;
}

/* ---------- captioner: decoder with KV cache, LM head ---------- */

/* Per layer: self-attention K/V of every row [rows][cap][Dt]; the
 * cross-attention K/V of every image [n_img][T][Dt], projected once. */
struct blip_model_kv {
  int rows, n_img, cap, len, layers;
  size_t D, T;
  float *k, *v, *ck, *cv, *tmp;
};

int blip_model_kv_new(const blip_model *m, int rows, int n_img, int cap, blip_model_kv **out) {
  const blip_cfg *c = &m->cfg;
  *out = NULL;
  if (!c->captioner) return blip_err_set(BLIP_EINVAL, "decoder: this is not a captioning model");
  if (rows <= 0 || n_img <= 0 || rows % n_img || cap <= 0 || cap > c->t_max_pos)
    return blip_err_set(BLIP_EINVAL, "decoder: %d rows for %d images, %d positions (model: %d)", rows, n_img, cap, c->t_max_pos);
  blip_model_kv *kv = calloc(1, sizeof *kv);
  if (!kv) return blip_err_set(BLIP_ENOMEM, "out of memory");
  *kv = (blip_model_kv){.rows = rows, .n_img = n_img, .cap = cap, .layers = c->t_layers, .D = (size_t)c->t_hidden, .T = (size_t)c->v_tokens};
  const size_t self = (size_t)c->t_layers * rows * cap * kv->D, cross = (size_t)c->t_layers * n_img * kv->T * kv->D;
  kv->k = malloc(self * sizeof(float));
  kv->v = malloc(self * sizeof(float));
  kv->ck = malloc(cross * sizeof(float));
  kv->cv = malloc(cross * sizeof(float));
  kv->tmp = malloc((size_t)rows * cap * kv->D * sizeof(float));
  if (!kv->k || !kv->v || !kv->ck || !kv->cv || !kv->tmp) {
    blip_model_kv_free(kv);
    return blip_err_set(BLIP_ENOMEM, "decoder: out of memory for the KV cache (%d rows x %d positions)", rows, cap);
  }
  *out = kv;
  return BLIP_OK;
}

void blip_model_kv_free(blip_model_kv *kv) {
  if (!kv) return;
  free(kv->k);
  free(kv->v);
  free(kv->ck);
  free(kv->cv);
  free(kv->tmp);
  free(kv);
}

int blip_model_kv_len(const blip_model_kv *kv) { return kv->len; }

int blip_model_kv_truncate(blip_model_kv *kv, int len) {
  if (len < 0 || len > kv->len) return blip_err_set(BLIP_EINVAL, "decoder: truncate to %d of %d positions", len, kv->len);
  kv->len = len;
  return BLIP_OK;
}

int blip_model_kv_images(blip_model *m, blip_model_kv *kv, const float *embeds) {
  const size_t TD = kv->T * kv->D, Dx = (size_t)m->cfg.t_enc_hidden;
  int rc = BLIP_OK;
  kv->len = 0;
  for (int l = 0; l < kv->layers && !rc; l++)
    for (int i = 0; i < kv->n_img && !rc; i++) {
      size_t o = ((size_t)l * kv->n_img + i) * TD;
      const float *img = embeds + (size_t)i * kv->T * Dx;
      if (!(rc = blip_k_linear_fwd(kv->ck + o, img, &m->tl[l].ck, (int)kv->T)))
        rc = blip_k_linear_fwd(kv->cv + o, img, &m->tl[l].cv, (int)kv->T);
    }
  return rc;
}

int blip_model_kv_reorder(blip_model_kv *kv, const int *src) {
  const int per = kv->rows / kv->n_img;
  for (int r = 0; r < kv->rows; r++)
    if (src[r] < 0 || src[r] >= kv->rows || src[r] / per != r / per)
      return blip_err_set(BLIP_EINVAL, "decoder: reorder row %d <- %d crosses images", r, src[r]);
  /* only the filled positions move, so copy [len] of every row's [cap] */
  const size_t full = (size_t)kv->cap * kv->D, used = (size_t)kv->len * kv->D;
  float *caches[2] = {kv->k, kv->v};
  for (int c = 0; c < 2; c++)
    for (int l = 0; l < kv->layers; l++) {
      float *cl = caches[c] + (size_t)l * kv->rows * full;
      for (int r = 0; r < kv->rows; r++) memcpy(kv->tmp + r * used, cl + (size_t)src[r] * full, used * sizeof(float));
      for (int r = 0; r < kv->rows; r++) memcpy(cl + (size_t)r * full, kv->tmp + r * used, used * sizeof(float));
    }
  return BLIP_OK;
}

int blip_model_decode(blip_model *m, blip_model_kv *kv, const int32_t *ids, int n, float *hidden) {
  const blip_cfg *c = &m->cfg;
  const int D = c->t_hidden, H = c->t_heads, dh = D / H, R = kv->rows, M = R * n, T = (int)kv->T, per = kv->rows / kv->n_img;
  if (n <= 0 || kv->len + n > kv->cap)
    return blip_err_set(BLIP_EINVAL, "decoder: %d + %d tokens exceed the cache's %d positions", kv->len, n, kv->cap);
  int rc = check_ids(m, ids, (long)M, kv->len + n);
  if (rc) return rc;
  float *a = arena(m, (size_t)M * (5 * D + c->t_mlp));
  if (!a) return blip_err_set(BLIP_ENOMEM, "decoder: out of memory");
  float *x = a, *q = x + (size_t)M * D, *att = q + (size_t)M * 3 * D, *ff = att + (size_t)M * D;
  const float scale = 1.0f / sqrtf((float)dh);
  const size_t full = (size_t)kv->cap * D, TD = kv->T * D;
  text_embed(m, x, ids, R, n, kv->len);
  for (int l = 0; l < c->t_layers; l++) {
    const txt_layer *Ly = &m->tl[l];
    float *Kl = kv->k + (size_t)l * R * full, *Vl = kv->v + (size_t)l * R * full;
    TRY(blip_k_linear_fwd(q, x, &Ly->qkv, M)); /* [M, 3D]: q|k|v of each new position (q, k, v spans) */
    for (int p = 0; p < M; p++) {
      const float *qkv = q + (size_t)p * 3 * D;
      size_t at = (size_t)(p / n) * full + (size_t)(kv->len + p % n) * D;
      memcpy(Kl + at, qkv + D, (size_t)D * sizeof(float));
      memcpy(Vl + at, qkv + 2 * D, (size_t)D * sizeof(float));
    }
    /* causal: new position i of a row sees the cached prefix and itself. In
     * f32 for every precision: one query row against the cache is a
     * bandwidth-bound product, and the shape changes at every step. */
    for (int r = 0; r < R; r++)
      for (int i = 0; i < n; i++) {
        size_t o = ((size_t)r * n + i) * D;
        TRY(blip_k_attention(att + o, D, q + 3 * o, 3 * D, Kl + r * full, D, Vl + r * full, D, 1, kv->len + i + 1, H, dh, scale, NULL, &m->ws));
      }
    TRY(blip_k_linear_fwd_ex(x, att, &Ly->o, M, BLIP_K_ACCUM));
    blip_k_layernorm(x, x, Ly->ln_self.g, Ly->ln_self.b, M, D, c->t_eps);
    TRY(blip_k_linear_fwd(q, x, &Ly->cq, M));
    for (int r = 0; r < R; r++) {
      size_t o = (size_t)r * n * D, io = ((size_t)l * kv->n_img + r / per) * TD;
      TRY(blip_k_attention(att + o, D, q + o, D, kv->ck + io, D, kv->cv + io, D, n, T, H, dh, scale, NULL, &m->ws));
    }
    TRY(blip_k_linear_fwd_ex(x, att, &Ly->co, M, BLIP_K_ACCUM));
    blip_k_layernorm(x, x, Ly->ln_cross.g, Ly->ln_cross.b, M, D, c->t_eps);
    TRY(blip_k_mlp(x, x, 0, &Ly->ffn1, &Ly->ffn2, M, ff));
    blip_k_layernorm(x, x, Ly->ln_ffn.g, Ly->ln_ffn.b, M, D, c->t_eps);
  }
  kv->len += n;
  if (hidden) memcpy(hidden, x, (size_t)M * D * sizeof(float));
done:
  return rc;
}

int blip_model_lm_head(blip_model *m, const float *hidden, int M, float *logits) {
  const blip_cfg *c = &m->cfg;
  if (!c->captioner) return blip_err_set(BLIP_EINVAL, "lm head: this is not a captioning model");
  float *t = arena(m, (size_t)M * c->t_hidden);
  if (!t) return blip_err_set(BLIP_ENOMEM, "lm head: out of memory");
  int rc = blip_k_linear_fwd_ex(t, hidden, &m->lm_dense, M, BLIP_K_GELU);
  if (rc) return rc;
  blip_k_layernorm(t, t, m->lm_ln.g, m->lm_ln.b, M, c->t_hidden, c->t_eps);
  return blip_k_linear_fwd(logits, t, &m->lm_dec, M);
}
