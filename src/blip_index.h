/* blip_index: the embedding pipeline of the indexer: decode images, run the
 * vision model in batches, commit each batch to the store.
 *
 * A decoder thread (an OpenMP team of opts.threads, each decoding through
 * an isolated worker process of a blip_decode pool) fills one batch while
 * the model runs on the previous one (double buffering), so the model waits
 * only when decoding is slower than inference. Each batch is one
 * blip_store_put() transaction; images that fail to decode (a crashed, hung
 * or ballooning decoder included) become error rows: a failure that may pass
 * (unreadable, vanished, I/O error, time-out, file changed while read) is
 * marked for retry on the next run, any other is retried only when the
 * file's content changes. Every row records the fingerprint (XXH3-64 of all
 * bytes), size and mtime of the bytes that were decoded, taken through that
 * one descriptor, never those of the walk.
 * A file during whose (long) read or decode two runs died is recorded as
 * failed without being decoded again until it changes (opts.journal).
 * Stopping (*opts.stop set, e.g. by SIGINT) abandons the batch being decoded,
 * finishes and commits the batch in the model, then returns BLIP_EINTR. */
#ifndef BLIP_INDEX_H
#define BLIP_INDEX_H

#include <signal.h>
#include <stdint.h>

#include "blip_model.h"
#include "blip_store.h"

typedef struct {
  const char *path;
  int64_t size, mtime_ns;
  uint64_t fingerprint; /* from the classification, for a file that cannot even be read now */
  int has_fingerprint;
  int64_t replace; /* id of the row this file supersedes (changed file), or 0; repair: the row to repair */
} blip_index_item;

typedef struct {
  int batch;   /* images per model call and per commit (1..256) */
  int threads; /* decoding threads */
  int tokens;  /* store vision tokens in the rerank store */
  double flush_every_s; /* rewrite vectors.faiss this often during long runs (0: only at the end),
                           so that concurrent queries find a fresh cache instead of rebuilding it */
  volatile sig_atomic_t *stop; /* may be NULL */
  void (*progress)(void *ctx, int64_t done, int64_t total); /* after each commit; may be NULL */
  void *ctx;
  double time_budget_s; /* per image decode budget (0: blip_img's default, 60 s) */
  int64_t memory_cap;   /* per decoder process (0: blip_decode's default) */
  const char *journal;  /* attempts journal (the index's "decoding" file), or NULL: see blip_index.c */
  int repair; /* the items are rows whose token records are lost (blip_store_tokens_lost): recompute and
                 rewrite those records only, for files whose fingerprint is still the row's (has_fingerprint 0) */
} blip_index_opts;

typedef struct {
  int64_t added, updated, failed;
  int64_t embedded;              /* images run through the vision model */
  int64_t repaired, unrepaired;  /* repair: records rewritten; rows given up (file unreadable or changed) */
  double decode_wait_s; /* time the model spent waiting for decoded batches */
} blip_index_counts;

/* Embed and commit items[0..n). counts accumulate what was committed, also
 * on error or stop. */
int blip_index_embed(blip_model *m, blip_store *st, const blip_index_item *items, int64_t n,
                     const blip_index_opts *opts, blip_index_counts *counts);

/* Recompute the token records the store lost (blip_store_tokens_lost), from
 * the photos, with model work for those only; opts as for embed (repair is
 * implied). counts.repaired / unrepaired say what became of them. */
int blip_index_repair_tokens(blip_model *m, blip_store *st, const blip_index_opts *opts, blip_index_counts *counts);

#endif
