/* blip_tar: webdataset .tar shards (img2dataset's format: KEY.jpg|png|webp,
 * optional KEY.txt caption and KEY.json metadata) read in place through
 * libarchive, never extracted to disk.
 *
 * A photo inside a shard is named "TAR#MEMBER": the absolute path of the tar,
 * '#', and the member's name with its extension (/data/00000.tar#000000123.jpg).
 * A path is a member path when it contains ".tar#" (the last one splits it);
 * readers try such a path as a plain file first, so a real file wins. */
#ifndef BLIP_TAR_H
#define BLIP_TAR_H

#include <stddef.h>
#include <stdint.h>

/* Whether name ends in ".tar" (any case). */
int blip_tar_is_tar(const char *name);
/* Length of the TAR part of a member path "TAR#MEMBER", or 0 when path is not one. */
size_t blip_tar_split(const char *path);

/* Called for each regular member, in archive order, with its whole bytes
 * (members over max_bytes are passed with bytes == NULL and n = their size). */
typedef int (*blip_tar_fn)(void *ctx, const char *name, const uint8_t *bytes, size_t n, int64_t mtime_ns);
/* Read the tar at path once, start to end. */
int blip_tar_each(const char *path, int64_t max_bytes, blip_tar_fn fn, void *ctx);

/* The bytes of member path "TAR#MEMBER" (malloc'd into *bytes), and the
 * tar's mtime. Each thread keeps its reader open at the last member read, so
 * members asked for in archive order stream the tar forward once (an earlier
 * member rewinds to the start). BLIP_ENOTFOUND when there is no such member,
 * BLIP_ETOOBIG over max_bytes. */
int blip_tar_read(const char *path, int64_t max_bytes, uint8_t **bytes, size_t *n, int64_t *tar_mtime_ns);
/* A memfd holding bytes[0..n), at offset 0 (to hand a member on as a file); -1 with errno on failure. */
int blip_tar_memfd(const uint8_t *bytes, size_t n);
/* Close this thread's reader (optional; a thread's next read reopens). */
void blip_tar_read_close(void);

#endif
