/* blip_capindex: the caption pass of the indexer (blip-index --captions):
 * every searchable image of the store without a caption is decoded, run
 * through the captioner (its own vision encoder and decoder) and captioned
 * with the checkpoint's generate() settings; each batch of captions is one
 * transaction, so a kill loses at most the batch in flight and the next run
 * resumes with the images still uncaptioned. Images that no longer decode
 * keep no caption and are counted as failed (tried again next run). */
#ifndef BLIP_CAPINDEX_H
#define BLIP_CAPINDEX_H

#include <signal.h>
#include <stdint.h>

#include "blip_cap.h"
#include "blip_model.h"
#include "blip_store.h"

typedef struct {
  int batch;   /* images per vision call and per commit (1..256) */
  int threads; /* decoding threads */
  volatile sig_atomic_t *stop; /* may be NULL: stop after the current batch */
  void (*progress)(void *ctx, int64_t done, int64_t total); /* after each commit; may be NULL */
  void *ctx;
} blip_capindex_opts;

/* Caption the store's uncaptioned images with cap (a captioning model) and
 * gen (blip_cap_defaults for the checkpoint's). *done / *failed count what
 * was committed / skipped, also on error or stop (BLIP_EINTR). */
int blip_capindex_run(blip_model *cap, blip_store *st, const blip_cap_opts *gen, const blip_capindex_opts *o, int64_t *done,
                      int64_t *failed);

/* The identity recorded for the captions: captioner fingerprint and precision. */
void blip_capindex_identity(const blip_model *cap, char *buf, size_t n);

#endif
