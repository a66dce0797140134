/* blip_eval: BLIP's image-text retrieval evaluation protocol (COCO 5k,
 * Flickr30k 1k), exactly as salesforce/BLIP train_retrieval.py computes it.
 *
 * - Annotations: a JSON list of {"image": path, "caption": [..] or ".."},
 *   read as coco_karpathy_retrieval_eval / flickr30k_retrieval_eval do:
 *   image i gets the next consecutive text ids, every caption goes through
 *   pre_caption(max_words). (Upstream iterates a bare caption string char by
 *   char; we read it as one caption, which is what such a file means.)
 * - Ranks: position of the ground truth in np.argsort(score)[::-1]. numpy's
 *   default argsort is an introsort that is NOT stable, so the rank of a
 *   tied score depends on numpy's partition order. blip_eval_argsort is a
 *   faithful port of numpy's scalar aquicksort (median-of-3, insertion sort
 *   at <= 16 items, heapsort fallback, NaN sorts last), so ties get exactly
 *   numpy's ranks (checked against numpy 1.24.2). Convention this yields: a row
 *   of <= 16 items is sorted stably, so among tied scores the HIGHER index
 *   ranks first after the reversal; longer rows follow numpy's partitioning.
 *   (numpy >= 2 may dispatch float32 argsort to a SIMD sort on AVX-512 CPUs,
 *   whose tie order differs; BLIP's figures predate it.)
 * - Top-k: torch.topk leaves ties at the k boundary unspecified; we keep the
 *   lower index (a documented, deterministic choice).
 * - Recall: R@K = 100 * (#rows with rank < K) / #rows, in double, means and
 *   r_mean as itm_eval. An image without captions never counts as a hit. */
#ifndef BLIP_EVAL_H
#define BLIP_EVAL_H

#include <stddef.h>
#include <stdint.h>

#define BLIP_EVAL_NO_RANK INT64_MAX /* upstream's rank = 1e20: no ground truth */
#define BLIP_EVAL_MISS (-100.0f)    /* score of pairs outside the top k */

typedef struct {
  int n_images, n_texts;
  char **image;     /* [n_images] paths as written in the file */
  char **text;      /* [n_texts] captions after pre_caption */
  int *txt2img;     /* [n_texts] */
  int *img2txt_off; /* [n_images + 1]: image i's captions are img2txt[off[i] .. off[i+1]) */
  int *img2txt;     /* [n_texts] text ids (identity for files read here) */
} blip_eval_ann;

typedef struct {
  double tr_r1, tr_r5, tr_r10, tr_mean; /* text retrieval (image -> text) */
  double ir_r1, ir_r5, ir_r10, ir_mean; /* image retrieval (text -> image) */
  double r_mean;
} blip_eval_recall;

/* Read a BLIP annotation file. limit > 0 keeps the first `limit` images
 * (and their captions). max_words: pre_caption's limit (30 for retrieval). */
int blip_eval_ann_load(const char *path, int max_words, int limit, blip_eval_ann *out);
int blip_eval_ann_parse(const char *json, size_t len, int max_words, int limit, blip_eval_ann *out);
void blip_eval_ann_free(blip_eval_ann *a);

/* numpy np.argsort(v) (kind='quicksort') for float32: idx[n] ascending. */
void blip_eval_argsort(const float *v, int n, int *idx);

/* min over gt[0..n_gt) of the position in np.argsort(row)[::-1];
 * BLIP_EVAL_NO_RANK when n_gt == 0. Full sort only when a gt score is tied. */
int blip_eval_rank(const float *row, int n, const int *gt, int n_gt, int64_t *rank);

/* R@1/5/10 from ranks, as itm_eval. */
void blip_eval_recall_from_ranks(const int64_t *rank_i2t, int n_images, const int64_t *rank_t2i, int n_texts,
                                 blip_eval_recall *out);

/* itm_eval(scores_i2t [n_images, n_texts], scores_t2i [n_texts, n_images],
 * txt2img, img2txt). ranks_* (may be NULL) receive the per-row ranks. */
int blip_eval_itm_eval(const float *scores_i2t, const float *scores_t2i, int n_images, int n_texts,
                       const int *txt2img, const int *img2txt_off, const int *img2txt, blip_eval_recall *out,
                       int64_t *ranks_i2t, int64_t *ranks_t2i);

/* Indices of the k largest of row[n] (k <= n), by descending value, ties by
 * ascending index. NaN counts as largest (numpy's and torch's order). */
int blip_eval_topk(const float *row, int n, int k, int *idx);

/* One row of BLIP's score matrix: out[n] = -100, then for j < k
 * out[idx[j]] = itm[j] + sim[idx[j]] (float32 sum, as torch does). */
void blip_eval_score_row(const float *sim, int n, const int *idx, const float *itm, int k, float *out);

/* The ITM pairs a run needs, grouped by caption: caption t is matched against
 * the union of its t2i top-k images and the images whose i2t top-k holds t.
 * (Upstream computes the shared pairs twice; the match logit is the same.) */
typedef struct {
  int n_texts;
  int64_t n_pairs;
  int64_t *off; /* [n_texts + 1] */
  int *img;     /* [n_pairs], ascending within each caption */
} blip_eval_plan;

/* i2t_top [n_images, k_i2t] text ids; t2i_top [n_texts, k_t2i] image ids. */
int blip_eval_plan_build(const int *i2t_top, int n_images, int k_i2t, const int *t2i_top, int n_texts, int k_t2i,
                         blip_eval_plan *out);
/* Pair index of (text t, image i), or -1 if not planned. */
int64_t blip_eval_plan_find(const blip_eval_plan *p, int t, int i);
void blip_eval_plan_free(blip_eval_plan *p);

#endif
