/* blip_shard: see blip_shard.h. The hash seed is fixed forever: changing it
 * would move every item to another shard of existing shard indexes. */
#include "blip_shard.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "blip_err.h"

static int parse_nat(const char *s, const char *end, long *out) {
  char *e;
  if (s == end || *s < '0' || *s > '9') return -1;
  errno = 0;
  long v = strtol(s, &e, 10);
  if (errno || e != end || v < 0 || v > 1000000) return -1;
  *out = v;
  return 0;
}

static int set(blip_shard *out, long i, long n, const char *source) {
  if (n < 1 || i < 0 || i >= n)
    return blip_err_set(BLIP_EINVAL, "shard %ld/%ld (from %s): need 0 <= I < N", i, n, source);
  out->index = (int)i;
  out->count = (int)n;
  snprintf(out->source, sizeof out->source, "%s", source);
  return BLIP_OK;
}

int blip_shard_parse(const char *spec, blip_shard *out) {
  const char *slash = spec ? strchr(spec, '/') : NULL;
  long i, n;
  if (!slash || parse_nat(spec, slash, &i) || parse_nat(slash + 1, slash + 1 + strlen(slash + 1), &n))
    return blip_err_set(BLIP_EINVAL, "--shard wants I/N (e.g. 0/4), not '%s'", spec ? spec : "");
  return set(out, i, n, "--shard");
}

static int env_nat(const char *name, long *out) {
  const char *v = getenv(name);
  if (!v || !*v) return 0;
  if (parse_nat(v, v + strlen(v), out)) return blip_err_set(BLIP_EINVAL, "%s=%s is not a number", name, v);
  return 1;
}

int blip_shard_resolve(const char *spec, int count, blip_shard *out) {
  if (spec) return blip_shard_parse(spec, out);
  long id, n, min = 0;
  int r = env_nat("SLURM_ARRAY_TASK_ID", &id);
  if (r < 0) return r;
  if (r) {
    if ((r = env_nat("SLURM_ARRAY_TASK_COUNT", &n)) <= 0)
      return r < 0 ? r : blip_err_set(BLIP_EINVAL, "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not");
    if (env_nat("SLURM_ARRAY_TASK_MIN", &min) < 0) return BLIP_EINVAL;
    /* arrays may start at 1 (--array=1-4); a stepped or sparse array has no dense numbering */
    return set(out, id - min, n, "SLURM_ARRAY_TASK_ID");
  }
  if ((r = env_nat("JOB_COMPLETION_INDEX", &id)) < 0) return r;
  if (r) {
    if (count < 1) return blip_err_set(BLIP_EINVAL, "JOB_COMPLETION_INDEX is set: pass --shard-count N (the Job's completions)");
    return set(out, id, count, "JOB_COMPLETION_INDEX");
  }
  return set(out, 0, 1, "default");
}

int blip_shard_owns(const blip_shard *s, const void *key, size_t len) {
  return s->count <= 1 || XXH64(key, len, 0x626c6970u /* "blip" */) % (unsigned)s->count == (unsigned)s->index;
}
