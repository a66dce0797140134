/* blip_merge: combine shard indexes (blip-index --shard I/N) into one index.
 *
 * The merged index holds every shard's rows with their paths, features and
 * metadata, under new ids (shard k's id + the ids of the shards before it),
 * one FAISS cache built once over the whole collection, and the shards'
 * rerank records in place: each shard's tokens.bin is hard-linked into the
 * merged directory as tokens-K.bin (copied when it is on another file
 * system) and read under the shard's own ids. Nothing is recomputed. */
#ifndef BLIP_MERGE_H
#define BLIP_MERGE_H

#include <stdint.h>

typedef struct {
  int64_t rows;       /* rows merged (searchable and failed) */
  int64_t searchable; /* rows with a feature */
  int linked, copied; /* token files hard-linked / copied */
} blip_merge_stats;

/* Build out_dir from scratch out of shard_dirs[0..n). Every shard must have
 * the same identity (model, precision, preprocessing, geometry, token
 * format), else BLIP_EMISMATCH naming the shard and key. Each shard's writer
 * lock is held meanwhile, so a shard being indexed is refused. */
int blip_merge(const char *out_dir, const char *const *shard_dirs, int n, blip_merge_stats *stats);

#endif
