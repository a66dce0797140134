/* blip_shard: which part of a job this process does, when a scheduler runs
 * N copies of it (a Slurm array, a Kubernetes Indexed Job, a shell loop).
 *
 * A shard is "I/N" (0 <= I < N). An item belongs to shard
 * xxh64(key) mod N, so the partition is stable across runs, machines and walk
 * orders, and every item lands in exactly one shard. N = 1 is no sharding. */
#ifndef BLIP_SHARD_H
#define BLIP_SHARD_H

#include <stddef.h>

typedef struct {
  int index, count;
  char source[64]; /* where it came from: "--shard", "SLURM_ARRAY_TASK_ID", ... */
} blip_shard;

/* "I/N" -> shard; BLIP_EINVAL with a message for anything else. */
int blip_shard_parse(const char *spec, blip_shard *out);
/* The shard a scheduler asked for: spec when given, else Slurm's
 * SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN) of SLURM_ARRAY_TASK_COUNT,
 * else Kubernetes' JOB_COMPLETION_INDEX of count (count > 0 required there),
 * else 0/1. */
int blip_shard_resolve(const char *spec, int count, blip_shard *out);
/* Whether the item named key (len bytes) belongs to shard s. */
int blip_shard_owns(const blip_shard *s, const void *key, size_t len);

#endif
