/* blip_eval: BLIP's retrieval evaluation protocol (see blip_eval.h).
 *
 * The ranking code follows numpy, not textbook sorting: `np_less` is
 * numpy's float ordering (NaN last) and `np_aquicksort` reproduces numpy's
 * aquicksort_ step for step, because the rank of a tied score is whatever
 * that sort leaves. Everything here is pure computation on caller arrays
 * except the annotation reader (jansson + pre_caption). */
#include "blip_eval.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "blip_err.h"
#include "blip_tok.h"

/* ---- annotations -------------------------------------------------------- */

void blip_eval_ann_free(blip_eval_ann *a) {
  if (!a) return;
  for (int i = 0; a->image && i < a->n_images; i++) free(a->image[i]);
  for (int i = 0; a->text && i < a->n_texts; i++) free(a->text[i]);
  free(a->image);
  free(a->text);
  free(a->txt2img);
  free(a->img2txt_off);
  free(a->img2txt);
  memset(a, 0, sizeof *a);
}

/* The captions of one entry: a list of strings, or one string. */
static int entry_captions(json_t *e, int idx, json_t **list, int *n) {
  json_t *c = json_object_get(e, "caption");
  if (json_is_string(c)) {
    *list = c;
    *n = 1;
  } else if (json_is_array(c)) {
    *list = c;
    *n = (int)json_array_size(c);
    for (int j = 0; j < *n; j++)
      if (!json_is_string(json_array_get(c, j)))
        return blip_err_set(BLIP_EFORMAT, "annotation %d: caption %d is not a string", idx, j);
  } else {
    return blip_err_set(BLIP_EFORMAT, "annotation %d: \"caption\" must be a string or a list of strings", idx);
  }
  return BLIP_OK;
}

static int ann_from_json(json_t *root, int max_words, int limit, blip_eval_ann *out) {
  blip_eval_ann a = {0};
  int rc = BLIP_OK;
  if (!json_is_array(root)) return blip_err_set(BLIP_EFORMAT, "annotation file: top level must be a JSON list");
  int ni = (int)json_array_size(root);
  if (limit > 0 && limit < ni) ni = limit;
  /* First pass: validate and count captions. */
  int nt = 0;
  for (int i = 0; i < ni; i++) {
    json_t *e = json_array_get(root, i), *list;
    int n;
    if (!json_is_object(e) || !json_is_string(json_object_get(e, "image")))
      return blip_err_set(BLIP_EFORMAT, "annotation %d: needs an \"image\" string", i);
    if ((rc = entry_captions(e, i, &list, &n))) return rc;
    if (n > INT32_MAX - nt) return blip_err_set(BLIP_ETOOBIG, "annotation file: too many captions");
    nt += n;
  }
  a.image = calloc((size_t)ni + 1, sizeof *a.image);
  a.text = calloc((size_t)nt + 1, sizeof *a.text);
  a.txt2img = malloc(((size_t)nt + 1) * sizeof *a.txt2img);
  a.img2txt = malloc(((size_t)nt + 1) * sizeof *a.img2txt);
  a.img2txt_off = malloc(((size_t)ni + 1) * sizeof *a.img2txt_off);
  if (!a.image || !a.text || !a.txt2img || !a.img2txt || !a.img2txt_off) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto fail;
  }
  int t = 0;
  for (int i = 0; i < ni; i++) {
    json_t *e = json_array_get(root, i), *list;
    int n;
    entry_captions(e, i, &list, &n);
    if (!(a.image[i] = strdup(json_string_value(json_object_get(e, "image"))))) {
      rc = blip_err_set(BLIP_ENOMEM, "out of memory");
      goto fail;
    }
    a.n_images = i + 1;
    a.img2txt_off[i] = t;
    for (int j = 0; j < n; j++, t++) {
      json_t *s = json_is_string(list) ? list : json_array_get(list, j);
      rc = blip_tok_pre_caption(json_string_value(s), json_string_length(s), max_words, &a.text[t], NULL);
      if (rc) goto fail;
      a.n_texts = t + 1;
      a.txt2img[t] = i;
      a.img2txt[t] = t;
    }
  }
  a.img2txt_off[ni] = t;
  a.n_images = ni;
  a.n_texts = nt;
  *out = a;
  return BLIP_OK;
fail:
  blip_eval_ann_free(&a);
  return rc;
}

int blip_eval_ann_parse(const char *json, size_t len, int max_words, int limit, blip_eval_ann *out) {
  json_error_t err;
  json_t *root = json_loadb(json, len, 0, &err);
  if (!root) return blip_err_set(BLIP_EFORMAT, "annotation JSON, line %d: %s", err.line, err.text);
  int rc = ann_from_json(root, max_words, limit, out);
  json_decref(root);
  return rc;
}

int blip_eval_ann_load(const char *path, int max_words, int limit, blip_eval_ann *out) {
  json_error_t err;
  json_t *root = json_load_file(path, 0, &err);
  if (!root && err.line < 1) return blip_err_set(BLIP_EIO, "%s: %s", path, err.text);
  if (!root) return blip_err_set(BLIP_EFORMAT, "%s:%d: %s", path, err.line, err.text);
  int rc = ann_from_json(root, max_words, limit, out);
  json_decref(root);
  return rc ? blip_err_wrap(rc, "%s", path) : BLIP_OK;
}

/* ---- numpy's argsort ---------------------------------------------------- */

/* numpy's float `less`: NaN compares greater than every number. */
static inline int np_less(float a, float b) { return a < b || (b != b && a == a); }

#define NP_SMALL_QUICKSORT 15 /* numpy: partitions of <= 16 items use insertion sort */
#define NP_QS_STACK 128       /* numpy: NPY_BITSOF_INTP * 2 */

/* Sift a[i] down a 1-based heap of n entries (numpy's inner loop). */
static void np_sift(const float *v, int *a, int i, int n) {
  int tmp = a[i];
  for (int j = i << 1; j <= n;) {
    if (j < n && np_less(v[a[j]], v[a[j + 1]])) j += 1;
    if (!np_less(v[tmp], v[a[j]])) break;
    a[i] = a[j];
    i = j;
    j += j;
  }
  a[i] = tmp;
}

static void np_aheapsort(const float *v, int *tosort, int n) {
  int *a = tosort - 1; /* 1-based heap indexing, as numpy */
  for (int l = n >> 1; l > 0; --l) np_sift(v, a, l, n);
  for (; n > 1;) {
    int tmp = a[n];
    a[n] = a[1];
    a[1] = tmp;
    n -= 1;
    np_sift(v, a, 1, n);
  }
}

static int np_msb(unsigned n) {
  int d = 0;
  while (n >>= 1) d++;
  return d;
}

#define ISWAP(a, b) do { int t_ = (a); (a) = (b); (b) = t_; } while (0)

void blip_eval_argsort(const float *v, int n, int *idx) {
  for (int i = 0; i < n; i++) idx[i] = i;
  if (n < 2) return;
  int *pl = idx, *pr = idx + n - 1;
  int *stack[NP_QS_STACK], **sptr = stack;
  int depth[NP_QS_STACK], *psdepth = depth;
  int cdepth = np_msb((unsigned)n) * 2;
  int *pm, *pi, *pj, *pk, vi;
  float vp;
  for (;;) {
    if (cdepth < 0) {
      np_aheapsort(v, pl, (int)(pr - pl + 1));
      goto stack_pop;
    }
    while ((pr - pl) > NP_SMALL_QUICKSORT) {
      pm = pl + ((pr - pl) >> 1);
      if (np_less(v[*pm], v[*pl])) ISWAP(*pm, *pl);
      if (np_less(v[*pr], v[*pm])) ISWAP(*pr, *pm);
      if (np_less(v[*pm], v[*pl])) ISWAP(*pm, *pl);
      vp = v[*pm];
      pi = pl;
      pj = pr - 1;
      ISWAP(*pm, *pj);
      for (;;) {
        do ++pi; while (np_less(v[*pi], vp));
        do --pj; while (np_less(vp, v[*pj]));
        if (pi >= pj) break;
        ISWAP(*pi, *pj);
      }
      pk = pr - 1;
      ISWAP(*pi, *pk);
      /* push the larger partition, keep sorting the smaller */
      if (pi - pl < pr - pi) {
        *sptr++ = pi + 1;
        *sptr++ = pr;
        pr = pi - 1;
      } else {
        *sptr++ = pl;
        *sptr++ = pi - 1;
        pl = pi + 1;
      }
      *psdepth++ = --cdepth;
    }
    for (pi = pl + 1; pi <= pr; ++pi) { /* insertion sort: stable */
      vi = *pi;
      vp = v[vi];
      pj = pi;
      pk = pi - 1;
      while (pj > pl && np_less(vp, v[*pk])) *pj-- = *pk--;
      *pj = vi;
    }
  stack_pop:
    if (sptr == stack) break;
    pr = *(--sptr);
    pl = *(--sptr);
    cdepth = *(--psdepth);
  }
}

/* ---- ranks and recall --------------------------------------------------- */

int blip_eval_rank(const float *row, int n, const int *gt, int n_gt, int64_t *rank) {
  int64_t best = BLIP_EVAL_NO_RANK;
  int tied = 0;
  for (int g = 0; g < n_gt; g++)
    if (gt[g] < 0 || gt[g] >= n) return blip_err_set(BLIP_EINVAL, "rank: ground truth %d outside [0,%d)", gt[g], n);
  /* Untied, a score's position is the count of larger scores; a tie needs numpy's order. */
  for (int g = 0; g < n_gt && !tied; g++) {
    float x = row[gt[g]];
    int64_t above = 0;
    for (int e = 0; e < n; e++) {
      if (np_less(x, row[e])) above++;
      else if (e != gt[g] && !np_less(row[e], x)) tied = 1;
    }
    if (above < best) best = above;
  }
  if (tied) { /* the position among equal scores is numpy's sort order */
    int *idx = malloc((size_t)n * sizeof *idx);
    if (!idx) return blip_err_set(BLIP_ENOMEM, "out of memory");
    blip_eval_argsort(row, n, idx);
    best = BLIP_EVAL_NO_RANK;
    for (int p = 0; p < n; p++)
      for (int g = 0; g < n_gt; g++)
        if (idx[p] == gt[g] && n - 1 - p < best) best = n - 1 - p;
    free(idx);
  }
  *rank = best;
  return BLIP_OK;
}

static void recall3(const int64_t *rank, int n, double *r1, double *r5, double *r10) {
  int64_t c1 = 0, c5 = 0, c10 = 0;
  for (int i = 0; i < n; i++) {
    c1 += rank[i] < 1;
    c5 += rank[i] < 5;
    c10 += rank[i] < 10;
  }
  *r1 = n ? 100.0 * (double)c1 / n : 0;
  *r5 = n ? 100.0 * (double)c5 / n : 0;
  *r10 = n ? 100.0 * (double)c10 / n : 0;
}

void blip_eval_recall_from_ranks(const int64_t *rank_i2t, int n_images, const int64_t *rank_t2i, int n_texts,
                                 blip_eval_recall *out) {
  recall3(rank_i2t, n_images, &out->tr_r1, &out->tr_r5, &out->tr_r10);
  recall3(rank_t2i, n_texts, &out->ir_r1, &out->ir_r5, &out->ir_r10);
  out->tr_mean = (out->tr_r1 + out->tr_r5 + out->tr_r10) / 3;
  out->ir_mean = (out->ir_r1 + out->ir_r5 + out->ir_r10) / 3;
  out->r_mean = (out->tr_mean + out->ir_mean) / 2;
}

int blip_eval_itm_eval(const float *scores_i2t, const float *scores_t2i, int n_images, int n_texts,
                       const int *txt2img, const int *img2txt_off, const int *img2txt, blip_eval_recall *out,
                       int64_t *ranks_i2t, int64_t *ranks_t2i) {
  int rc = BLIP_OK;
  int64_t *ri = ranks_i2t ? ranks_i2t : malloc(((size_t)n_images + 1) * sizeof *ri);
  int64_t *rt = ranks_t2i ? ranks_t2i : malloc(((size_t)n_texts + 1) * sizeof *rt);
  if (!ri || !rt) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  for (int i = 0; i < n_images && !rc; i++)
    rc = blip_eval_rank(scores_i2t + (size_t)i * n_texts, n_texts, img2txt + img2txt_off[i],
                        img2txt_off[i + 1] - img2txt_off[i], &ri[i]);
  for (int t = 0; t < n_texts && !rc; t++)
    rc = blip_eval_rank(scores_t2i + (size_t)t * n_images, n_images, &txt2img[t], 1, &rt[t]);
  if (!rc) blip_eval_recall_from_ranks(ri, n_images, rt, n_texts, out);
done:
  if (!ranks_i2t) free(ri);
  if (!ranks_t2i) free(rt);
  return rc;
}

/* ---- top-k and score rows ----------------------------------------------- */

/* a ranks before b: larger value, then smaller index. */
static inline int topk_before(const float *v, int a, int b) {
  if (np_less(v[b], v[a])) return 1;
  if (np_less(v[a], v[b])) return 0;
  return a < b;
}

/* Heap of the k best so far, worst at h[0]. */
static void heap_down(const float *v, int *h, int n, int i) {
  for (;;) {
    int w = i, l = 2 * i + 1, r = l + 1;
    if (l < n && topk_before(v, h[w], h[l])) w = l;
    if (r < n && topk_before(v, h[w], h[r])) w = r;
    if (w == i) return;
    ISWAP(h[i], h[w]);
    i = w;
  }
}

int blip_eval_topk(const float *row, int n, int k, int *idx) {
  if (k < 0 || k > n) return blip_err_set(BLIP_EINVAL, "topk: k=%d outside [0,%d]", k, n);
  if (k == 0) return BLIP_OK;
  for (int i = 0; i < k; i++) idx[i] = i;
  for (int i = k / 2 - 1; i >= 0; i--) heap_down(row, idx, k, i);
  for (int e = k; e < n; e++) {
    if (topk_before(row, e, idx[0])) {
      idx[0] = e;
      heap_down(row, idx, k, 0);
    }
  }
  for (int m = k - 1; m > 0; m--) { /* pop the worst to the back: idx ends best-first */
    ISWAP(idx[0], idx[m]);
    heap_down(row, idx, m, 0);
  }
  return BLIP_OK;
}

void blip_eval_score_row(const float *sim, int n, const int *idx, const float *itm, int k, float *out) {
  for (int j = 0; j < n; j++) out[j] = BLIP_EVAL_MISS;
  for (int j = 0; j < k; j++) out[idx[j]] = itm[j] + sim[idx[j]];
}

/* ---- ITM pair plan ------------------------------------------------------ */

static int cmp_int(const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}

void blip_eval_plan_free(blip_eval_plan *p) {
  if (!p) return;
  free(p->off);
  free(p->img);
  memset(p, 0, sizeof *p);
}

int blip_eval_plan_build(const int *i2t_top, int n_images, int k_i2t, const int *t2i_top, int n_texts, int k_t2i,
                         blip_eval_plan *out) {
  int rc = BLIP_OK;
  size_t cap = (size_t)n_images * k_i2t + (size_t)n_texts * k_t2i;
  blip_eval_plan p = {.n_texts = n_texts};
  int64_t *roff = calloc((size_t)n_texts + 2, sizeof *roff); /* reverse i2t lists */
  int *rimg = malloc(((size_t)n_images * k_i2t + 1) * sizeof *rimg);
  int *tmp = malloc(((size_t)k_t2i + 1) * sizeof *tmp);
  p.off = malloc(((size_t)n_texts + 1) * sizeof *p.off);
  p.img = malloc((cap + 1) * sizeof *p.img);
  if (!roff || !rimg || !tmp || !p.off || !p.img) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  for (size_t e = 0; e < (size_t)n_images * k_i2t; e++) {
    int t = i2t_top[e];
    if (t < 0 || t >= n_texts) {
      rc = blip_err_set(BLIP_EINVAL, "plan: text id %d outside [0,%d)", t, n_texts);
      goto done;
    }
    roff[t + 2]++;
  }
  for (int t = 0; t < n_texts; t++) roff[t + 2] += roff[t + 1];
  for (int i = 0; i < n_images; i++) /* images ascending, so each reverse list is sorted */
    for (int j = 0; j < k_i2t; j++) rimg[roff[i2t_top[(size_t)i * k_i2t + j] + 1]++] = i;
  int64_t np = 0;
  for (int t = 0; t < n_texts; t++) {
    memcpy(tmp, t2i_top + (size_t)t * k_t2i, (size_t)k_t2i * sizeof *tmp);
    qsort(tmp, (size_t)k_t2i, sizeof *tmp, cmp_int);
    p.off[t] = np;
    int64_t a = 0, b = roff[t], be = roff[t + 1];
    int last = -1;
    while (a < k_t2i || b < be) { /* merge two sorted lists, dropping duplicates */
      int x = (b >= be || (a < k_t2i && tmp[a] <= rimg[b])) ? tmp[a++] : rimg[b++];
      if (x < 0 || x >= n_images) {
        rc = blip_err_set(BLIP_EINVAL, "plan: image id %d outside [0,%d)", x, n_images);
        goto done;
      }
      if (x != last) p.img[np++] = last = x;
    }
  }
  p.off[n_texts] = np;
  p.n_pairs = np;
  *out = p;
  p.off = NULL;
  p.img = NULL;
done:
  free(roff);
  free(rimg);
  free(tmp);
  blip_eval_plan_free(&p);
  return rc;
}

int64_t blip_eval_plan_find(const blip_eval_plan *p, int t, int i) {
  if (t < 0 || t >= p->n_texts) return -1;
  int64_t lo = p->off[t], hi = p->off[t + 1];
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (p->img[mid] < i) lo = mid + 1;
    else hi = mid;
  }
  return lo < p->off[t + 1] && p->img[lo] == i ? lo : -1;
}
