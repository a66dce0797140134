/* blip_tcache: a size-bounded cache directory of derived files (blip-serve's
 * thumbnails), least recently used out first.
 *
 * Layout: DIR/<sub>/<id>-<16 hex fingerprint>.jpg, one level of
 * subdirectories (blip-serve: one a thumbnail size). Files are written by
 * the owner (temp file + rename) and reported with blip_tcache_added.
 *
 * Invariants: after a sweep the files total at most cap bytes (down to 3/4
 * of cap, so sweeps stay rare) and every file's (id, fingerprint) passed the
 * owner's keep test: a photo gone from the index or changed since its
 * thumbnail was made loses it. Recency is the file's mtime, refreshed by a
 * hit when older than BLIP_TCACHE_TOUCH_S (relatime makes atime useless, and
 * a metadata write on every hit would cost more than it tells). A sweep runs
 * when the bytes added since the last one push the total past cap, in the
 * calling thread; other threads never wait for it (one sweep at a time; a
 * thread finding one running goes on). Unlinking a file being served is
 * harmless: its reader holds the descriptor. Thread-safe. */
#ifndef BLIP_TCACHE_H
#define BLIP_TCACHE_H

#include <stdint.h>
#include <time.h>

#define BLIP_TCACHE_TOUCH_S 600

typedef struct blip_tcache blip_tcache;

/* 1: keep the file of (id, fp); 0: drop it; < 0: unknown now (kept). */
typedef int (*blip_tcache_keep_fn)(void *ctx, int64_t id, uint64_t fp);

/* A cache over dir (created on first write by the owner) of at most cap
 * bytes; sweeps it once now (stale files out, the bound enforced). */
int blip_tcache_open(const char *dir, int64_t cap, blip_tcache_keep_fn keep, void *ctx, blip_tcache **out);
void blip_tcache_close(blip_tcache *tc);
/* A hit on the open file fd, last modified at mtime (the caller's fstat):
 * refresh its recency. */
void blip_tcache_hit(blip_tcache *tc, int fd, time_t mtime);
/* The owner wrote a file of bytes: sweeps when the total passes cap. */
void blip_tcache_added(blip_tcache *tc, int64_t bytes);

#endif
