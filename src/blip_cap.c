/* blip_cap: generation over the captioner's decoder (see blip_cap.h).
 *
 * Each step follows transformers 4.38 literally:
 * - greedy/sample: logits of the last position -> repetition penalty on
 *   the raw logits of every id in the sequence (prefix included) -> no
 *   repeated n-gram (the tokens completing an n-gram already in the
 *   sequence = -inf) -> min_length ([SEP] = -inf while length <
 *   min_length) -> argmax (lowest id on ties), or temperature -> top-k ->
 *   top-p -> softmax -> draw;
 * - beam: log_softmax -> the same processors -> + beam score -> top 2B of
 *   B x V (ties: lower flat index) -> a [SEP] ranked < B becomes a
 *   hypothesis scored sum / generated_len^lp (generated tokens incl. the
 *   [SEP]); others fill the B beams -> done when B hypotheses exist and
 *   worst >= best / (cur_len - prefix)^lp (HF's >=), or at max_length
 *   (open beams become hypotheses, sum / (len - prefix)^lp). The best
 *   hypothesis gets [SEP] appended when shorter than max_length.
 * Hypothesis scores are doubles as in Python; token scores f32 as torch. */
#include "blip_cap.h"
#include "blip_err.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void blip_cap_defaults(const blip_model *m, blip_cap_opts *o) {
  const blip_cfg *c = blip_model_cfg(m);
  *o = (blip_cap_opts){.max_length = c->gen.max_length, .min_length = c->gen.min_length, .num_beams = c->gen.num_beams,
                       .early_stopping = c->gen.early_stopping, .repetition_penalty = c->gen.repetition_penalty,
                       .length_penalty = c->gen.length_penalty, .do_sample = c->gen.do_sample, .top_k = c->gen.top_k,
                       .top_p = c->gen.top_p, .temperature = c->gen.temperature,
                       .no_repeat_ngram_size = c->gen.no_repeat_ngram_size};
}

int blip_cap_prefix(const blip_model *m, const char *prompt, int32_t *ids, int cap, int *n) {
  const blip_cfg *c = blip_model_cfg(m);
  *n = 0;
  if (cap < 1) return blip_err_set(BLIP_EINVAL, "prompt: no room");
  if (!prompt || !*prompt) {
    ids[0] = c->bos_id;
    *n = 1;
    return BLIP_OK;
  }
  const blip_tok *t = blip_model_tok(m);
  if (!t) return blip_err_set(BLIP_EINVAL, "prompt: this model has no vocabulary");
  int got = 0, full = 0;
  int32_t *tmp = malloc((size_t)(cap + 1) * sizeof *tmp);
  if (!tmp) return blip_err_set(BLIP_ENOMEM, "prompt: out of memory");
  int rc = blip_tok_encode(t, prompt, strlen(prompt), 0, tmp, cap + 1, &got, &full);
  if (!rc && full > cap + 1) rc = blip_err_set(BLIP_EINVAL, "prompt: %d tokens, more than the %d positions allowed", full - 1, cap);
  if (!rc) {
    memcpy(ids, tmp, (size_t)(got - 1) * sizeof *ids); /* drop the final [SEP] */
    ids[0] = c->bos_id;                                 /* [CLS] -> [DEC] */
    *n = got - 1;
  }
  free(tmp);
  return rc;
}

void blip_cap_result_free(blip_cap_result *r, int n) {
  for (int i = 0; r && i < n; i++) {
    free(r[i].ids);
    free(r[i].text);
    r[i] = (blip_cap_result){0};
  }
}

/* ---------- logits processors ---------- */

/* RepetitionPenaltyLogitsProcessor: once per distinct id of seq. */
static void rep_penalty(float *s, const int32_t *seq, int len, float p, unsigned char *seen) {
  if (p == 1.0f) return;
  for (int i = 0; i < len; i++) {
    int id = seq[i];
    if (seen[id]) continue;
    seen[id] = 1;
    s[id] = s[id] < 0 ? s[id] * p : s[id] / p;
  }
  for (int i = 0; i < len; i++) seen[seq[i]] = 0;
}

/* NoRepeatNGramLogitsProcessor: ban every token that would repeat an
 * n-gram of seq (n = 1: every token already in seq). */
static void no_repeat_ngram(float *s, const int32_t *seq, int len, int n) {
  if (n <= 0 || len + 1 < n) return;
  for (int st = 0; st + n <= len; st++)
    if (!memcmp(seq + st, seq + len - n + 1, (size_t)(n - 1) * sizeof *seq)) s[seq[st + n - 1]] = -INFINITY;
}

static void process(float *s, const int32_t *seq, int len, const blip_cap_opts *o, int sep, unsigned char *seen) {
  rep_penalty(s, seq, len, o->repetition_penalty, seen);
  no_repeat_ngram(s, seq, len, o->no_repeat_ngram_size);
  if (len < o->min_length) s[sep] = -INFINITY;
}

static void log_softmax(float *x, int n) {
  float mx = -INFINITY;
  for (int i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
  double sum = 0;
  for (int i = 0; i < n; i++) sum += exp((double)x[i] - mx);
  const float lse = mx + (float)log(sum);
  for (int i = 0; i < n; i++) x[i] -= lse;
}

/* ---------- sampling ---------- */

typedef struct {
  uint64_t s[4];
} rng;

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static void rng_seed(rng *r, uint64_t seed) {
  for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static double rng_uniform(rng *r) { /* xoshiro256** -> [0, 1) */
  uint64_t *s = r->s, x = s[1] * 5, res = ((x << 7) | (x >> 57)) * 9, t = s[1] << 17;
  s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t, s[3] = (s[3] << 45) | (s[3] >> 19);
  return (double)(res >> 11) * 0x1.0p-53;
}

typedef struct {
  float v;
  int id;
} cand;

static int cand_desc(const void *a, const void *b) { /* score descending, id ascending */
  const cand *x = a, *y = b;
  if (x->v != y->v) return x->v < y->v ? 1 : -1;
  return (x->id > y->id) - (x->id < y->id);
}

/* TopKLogitsWarper (k > 0), TopPLogitsWarper (p < 1), softmax, one draw.
 * c is scratch [V]. HF's top-p keeps the tokens whose ascending cumulative
 * probability exceeds 1 - p, and at least one. */
static int sample(const float *s, int V, int top_k, float top_p, rng *r, cand *c) {
  int n = 0;
  for (int i = 0; i < V; i++)
    if (s[i] > -INFINITY) c[n++] = (cand){s[i], i};
  if (!n) return 0;
  qsort(c, (size_t)n, sizeof *c, cand_desc);
  if (top_k > 0 && top_k < n) { /* ties with the k-th score stay, as HF's `<` filter keeps them */
    int k = top_k;
    while (k < n && c[k].v == c[top_k - 1].v) k++;
    n = k;
  }
  double *p = malloc((size_t)n * sizeof *p), tot = 0;
  if (!p) return -1;
  for (int i = 0; i < n; i++) tot += p[i] = exp((double)c[i].v - c[0].v);
  if (top_p < 1.0f) { /* drop from the least likely while the ascending cumsum <= 1 - p */
    double cum = 0;
    int keep = n;
    for (int i = n - 1; i > 0; i--) {
      cum += p[i] / tot;
      if (cum <= 1.0 - top_p) keep = i;
      else break;
    }
    n = keep;
    tot = 0;
    for (int i = 0; i < n; i++) tot += p[i];
  }
  double u = rng_uniform(r) * tot, cum = 0;
  int pick = c[n - 1].id;
  for (int i = 0; i < n; i++) {
    cum += p[i];
    if (u < cum) {
      pick = c[i].id;
      break;
    }
  }
  free(p);
  return pick;
}

/* ---------- search ---------- */

enum { GREEDY_ROWS = 16 }; /* images decoded together by greedy search and sampling */

typedef struct {
  blip_model *m;
  const blip_cap_opts *o;
  int V, D, sep, pad, P;
  int32_t prefix[512];
  float *hid, *logits;
  unsigned char *seen;
  cand *cands;
  blip_model_kv *kv;
} ctx;

static int finish(ctx *x, const int32_t *ids, int n, double score, blip_cap_result *out) {
  int add_sep = n < x->o->max_length && (n == 0 || ids[n - 1] != x->sep);
  out->ids = malloc((size_t)(n + 1) * sizeof *out->ids);
  if (!out->ids) return blip_err_set(BLIP_ENOMEM, "caption: out of memory");
  memcpy(out->ids, ids, (size_t)n * sizeof *ids);
  if (add_sep) out->ids[n++] = x->sep;
  out->n = n;
  out->score = score;
  const blip_tok *t = blip_model_tok(x->m); /* random models (benchmarks) have none: text stays NULL */
  return t ? blip_tok_decode(t, out->ids, n, 1, &out->text) : BLIP_OK;
}

/* the last position's logits of every row after appending ids [rows, n] */
static int step(ctx *x, const int32_t *ids, int n, int rows) {
  int rc = blip_model_decode(x->m, x->kv, ids, n, x->hid);
  if (rc) return rc;
  for (int r = 0; r < rows; r++) memmove(x->hid + (size_t)r * x->D, x->hid + ((size_t)r * n + n - 1) * x->D, (size_t)x->D * sizeof(float));
  return blip_model_lm_head(x->m, x->hid, rows, x->logits);
}

/* Greedy search or sampling for `rows` images at once (row r = image r of
 * the cache), so that each step reads the weights once for all of them.
 * A row that ended keeps decoding [PAD] until all have, as HF pads a
 * finished sequence; its result stops at its [SEP]. Sampling draws one
 * uniform per running row and step, in row order. */
static int greedy(ctx *x, blip_cap_result *out, int rows, rng *r) {
  const blip_cap_opts *o = x->o;
  const int L = o->max_length;
  int32_t *seq = malloc((size_t)rows * L * sizeof *seq), *tok = malloc((size_t)rows * sizeof *tok);
  int *end = calloc((size_t)rows, sizeof *end); /* 0 = running, else the row's length */
  int len = x->P, rc = seq && tok && end ? BLIP_OK : blip_err_set(BLIP_ENOMEM, "caption: out of memory");
  for (int i = 0; i < rows && !rc; i++) memcpy(seq + (size_t)i * L, x->prefix, (size_t)x->P * sizeof *seq);
  if (!rc) { /* the prefix of every row, contiguous */
    int32_t *pre = malloc((size_t)rows * x->P * sizeof *pre);
    if (!pre) rc = blip_err_set(BLIP_ENOMEM, "caption: out of memory");
    for (int i = 0; pre && i < rows; i++) memcpy(pre + (size_t)i * x->P, x->prefix, (size_t)x->P * sizeof *pre);
    if (!rc) rc = step(x, pre, x->P, rows);
    free(pre);
  }
  while (!rc) {
    int running = 0;
    for (int i = 0; i < rows && !rc; i++) {
      int32_t *si = seq + (size_t)i * L;
      float *lg = x->logits + (size_t)i * x->V;
      tok[i] = x->pad;
      if (end[i]) continue;
      process(lg, si, len, o, x->sep, x->seen);
      if (o->do_sample) {
        if (o->temperature != 1.0f)
          for (int v = 0; v < x->V; v++) lg[v] /= o->temperature;
        if ((tok[i] = sample(lg, x->V, o->top_k, o->top_p, r, x->cands)) < 0) rc = blip_err_set(BLIP_ENOMEM, "caption: out of memory");
      } else {
        int t = 0;
        for (int v = 1; v < x->V; v++)
          if (lg[v] > lg[t]) t = v;
        tok[i] = t;
      }
      si[len] = tok[i];
      if (tok[i] == x->sep) end[i] = len + 1;
      else running++;
    }
    len++;
    if (rc || !running || len >= L) break;
    rc = step(x, tok, 1, rows);
  }
  for (int i = 0; i < rows && !rc; i++) rc = finish(x, seq + (size_t)i * L, end[i] ? end[i] : len, 0, &out[i]);
  free(seq), free(tok), free(end);
  return rc;
}

typedef struct {
  double score;
  int32_t *ids;
  int n;
} hyp;

typedef struct {
  hyp *h;
  int n, B;
  double worst;
} hyps;

/* BeamHypotheses.add */
static int hyps_add(hyps *hs, const int32_t *ids, int n, double sum, int gen_len, double lp) {
  double score = sum / pow((double)gen_len, lp);
  if (hs->n < hs->B || score > hs->worst) {
    int32_t *c = malloc((size_t)n * sizeof *c);
    if (!c) return blip_err_set(BLIP_ENOMEM, "caption: out of memory");
    memcpy(c, ids, (size_t)n * sizeof *c);
    hs->h[hs->n++] = (hyp){score, c, n};
    if (hs->n > hs->B) { /* drop the lowest (first index on ties); worst = the next lowest */
      int lo = 0;
      for (int i = 1; i < hs->n; i++)
        if (hs->h[i].score < hs->h[lo].score) lo = i;
      free(hs->h[lo].ids);
      memmove(&hs->h[lo], &hs->h[lo + 1], (size_t)(hs->n - lo - 1) * sizeof *hs->h);
      hs->n--;
      hs->worst = hs->h[0].score;
      for (int i = 1; i < hs->n; i++)
        if (hs->h[i].score < hs->worst) hs->worst = hs->h[i].score;
    } else {
      hs->worst = score < hs->worst ? score : hs->worst;
    }
  }
  return BLIP_OK;
}

/* BeamHypotheses.is_done */
static int hyps_done(const hyps *hs, double best_sum, int cur_len, const ctx *x) {
  const blip_cap_opts *o = x->o;
  if (hs->n < hs->B) return 0;
  if (o->early_stopping == 1) return 1;
  int len = o->early_stopping == 2 && o->length_penalty > 0 ? o->max_length : cur_len;
  return hs->worst >= best_sum / pow((double)(len - x->P), o->length_penalty);
}

static int beam(ctx *x, blip_cap_result *out) {
  const blip_cap_opts *o = x->o;
  const int B = o->num_beams, V = x->V, K = 2 * B, L = o->max_length;
  int32_t *seq = malloc((size_t)B * L * sizeof *seq), *nseq = malloc((size_t)B * L * sizeof *seq), *ids = malloc((size_t)B * L * sizeof *ids);
  float *bs = malloc((size_t)B * sizeof *bs), *nbs = malloc((size_t)B * sizeof *nbs);
  int *src = malloc((size_t)B * sizeof *src), *ntok = malloc((size_t)B * sizeof *ntok);
  cand *top = malloc((size_t)(K + 1) * sizeof *top);
  hyps hs = {calloc((size_t)B + 1, sizeof(hyp)), 0, B, 1e9};
  int rc = BLIP_OK;
  if (!seq || !nseq || !ids || !bs || !nbs || !src || !ntok || !top || !hs.h) {
    rc = blip_err_set(BLIP_ENOMEM, "caption: out of memory");
    goto done;
  }
  for (int b = 0; b < B; b++) {
    memcpy(seq + (size_t)b * L, x->prefix, (size_t)x->P * sizeof *seq);
    memcpy(ids + (size_t)b * x->P, x->prefix, (size_t)x->P * sizeof *ids);
    bs[b] = b ? -1e9f : 0.0f;
  }
  int len = x->P, is_done = 0;
  if ((rc = step(x, ids, x->P, B))) goto done;
  for (;;) {
    int nt = 0; /* running top K over B x V, sorted by (score desc, flat index asc) */
    for (int b = 0; b < B; b++) {
      float *s = x->logits + (size_t)b * V;
      log_softmax(s, V);
      process(s, seq + (size_t)b * L, len, o, x->sep, x->seen);
      for (int v = 0; v < V; v++) {
        float sc = s[v] + bs[b];
        if (nt == K && !(sc > top[K - 1].v)) continue; /* later flat index loses ties */
        int j = nt < K ? nt++ : K - 1;
        while (j > 0 && sc > top[j - 1].v) {
          top[j] = top[j - 1];
          j--;
        }
        top[j] = (cand){sc, b * V + v};
      }
    }
    const int cur_len = len + 1;
    int nb = 0;
    for (int j = 0; j < nt && nb < B; j++) {
      int b = top[j].id / V, tok = top[j].id % V;
      if (tok == x->sep) {
        if (j >= B) continue;
        if ((rc = hyps_add(&hs, seq + (size_t)b * L, len, top[j].v, cur_len - x->P, o->length_penalty))) goto done;
      } else {
        nbs[nb] = top[j].v, ntok[nb] = tok, src[nb] = b;
        nb++;
      }
    }
    if (nb < B) { /* every candidate was -inf: nothing can continue */
      rc = blip_err_set(BLIP_EINVAL, "caption: beam search ran out of candidates");
      goto done;
    }
    is_done = hyps_done(&hs, top[0].v, cur_len, x);
    for (int b = 0; b < B; b++) {
      memcpy(nseq + (size_t)b * L, seq + (size_t)src[b] * L, (size_t)len * sizeof *seq);
      nseq[(size_t)b * L + len] = ntok[b];
    }
    memcpy(seq, nseq, (size_t)B * L * sizeof *seq);
    memcpy(bs, nbs, (size_t)B * sizeof *bs);
    len++;
    if (is_done || len >= L) break;
    if ((rc = blip_model_kv_reorder(x->kv, src)) || (rc = step(x, ntok, 1, B))) goto done;
  }
  if (!is_done)
    for (int b = 0; b < B; b++)
      if ((rc = hyps_add(&hs, seq + (size_t)b * L, len, bs[b], len - x->P, o->length_penalty))) goto done;
  int best = 0; /* Python's sorted(...).pop(): the highest score, the last added among equals */
  for (int i = 1; i < hs.n; i++)
    if (hs.h[i].score >= hs.h[best].score) best = i;
  rc = finish(x, hs.h[best].ids, hs.h[best].n, hs.h[best].score, out);
done:
  for (int i = 0; hs.h && i < hs.n; i++) free(hs.h[i].ids);
  free(hs.h);
  free(seq), free(nseq), free(ids), free(bs), free(nbs), free(src), free(ntok), free(top);
  return rc;
}

static int check_opts(const blip_model *m, const blip_cap_opts *o) {
  const blip_cfg *c = blip_model_cfg(m);
  if (!c->captioner) return blip_err_set(BLIP_EINVAL, "caption: this is not a captioning model (BlipForConditionalGeneration)");
  if (o->max_length < 2 || o->max_length > c->t_max_pos)
    return blip_err_set(BLIP_EINVAL, "caption: max_length %d outside 2..%d", o->max_length, c->t_max_pos);
  if (o->num_beams < 1 || o->num_beams > 64) return blip_err_set(BLIP_EINVAL, "caption: num_beams %d outside 1..64", o->num_beams);
  if (o->do_sample && o->num_beams > 1) return blip_err_set(BLIP_EUNSUPPORTED, "caption: sampling with beams (beam sample) is not supported");
  if (!(o->repetition_penalty > 0)) return blip_err_set(BLIP_EINVAL, "caption: repetition_penalty must be > 0");
  if (!(o->top_p > 0 && o->top_p <= 1)) return blip_err_set(BLIP_EINVAL, "caption: top_p must be in (0, 1]");
  if (o->min_length < 0 || o->top_k < 0 || o->no_repeat_ngram_size < 0)
    return blip_err_set(BLIP_EINVAL, "caption: negative min_length, top_k or no_repeat_ngram_size");
  if (!(o->temperature > 0)) return blip_err_set(BLIP_EINVAL, "caption: temperature must be > 0");
  if (c->sep_id >= c->t_vocab) return blip_err_set(BLIP_EINVAL, "caption: sep_token_id outside the vocabulary");
  return BLIP_OK;
}

int blip_cap_generate(blip_model *m, const float *embeds, int n, const blip_cap_opts *o, blip_cap_result *out) {
  int rc = check_opts(m, o);
  if (rc) return rc;
  const blip_cfg *c = blip_model_cfg(m);
  for (int i = 0; i < n; i++) out[i] = (blip_cap_result){0};
  ctx x = {.m = m, .o = o, .V = c->t_vocab, .D = c->t_hidden, .sep = c->sep_id, .pad = c->pad_id};
  const int cap = (int)(sizeof x.prefix / sizeof x.prefix[0]);
  if ((rc = blip_cap_prefix(m, o->prompt, x.prefix, cap < o->max_length ? cap : o->max_length, &x.P))) return rc;
  if (x.P >= o->max_length) return blip_err_set(BLIP_EINVAL, "caption: the prompt fills max_length %d", o->max_length);
  const int B = o->num_beams, G = B > 1 ? 1 : n < GREEDY_ROWS ? n : GREEDY_ROWS; /* images per cache */
  const int R = B > 1 ? B : G;                                                        /* rows per cache */
  const size_t T = (size_t)c->v_tokens * c->v_hidden;
  x.hid = malloc((size_t)R * o->max_length * x.D * sizeof(float));
  x.logits = malloc((size_t)R * x.V * sizeof(float));
  x.seen = calloc((size_t)x.V, 1);
  x.cands = o->do_sample ? malloc((size_t)x.V * sizeof *x.cands) : NULL;
  if (!x.hid || !x.logits || !x.seen || (o->do_sample && !x.cands)) rc = blip_err_set(BLIP_ENOMEM, "caption: out of memory");
  rng r;
  rng_seed(&r, o->seed);
  for (int i = 0; i < n && !rc; i += G) {
    const int g = n - i < G ? n - i : G;
    if (!x.kv || (B == 1 && g != G)) { /* a cache for this many rows (the last greedy group may be smaller) */
      blip_model_kv_free(x.kv);
      x.kv = NULL;
      if ((rc = blip_model_kv_new(m, B > 1 ? B : g, g, o->max_length, &x.kv))) break;
    }
    if (!(rc = blip_model_kv_images(m, x.kv, embeds + (size_t)i * T)))
      rc = B > 1 ? beam(&x, &out[i]) : greedy(&x, &out[i], g, &r);
  }
  if (rc) blip_cap_result_free(out, n);
  blip_model_kv_free(x.kv);
  free(x.hid), free(x.logits), free(x.seen), free(x.cands);
  return rc;
}
