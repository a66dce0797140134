/* blip_tar: webdataset shards through libarchive (see blip_tar.h). Only
 * regular members are read; names are taken as they are (a member "a/b.jpg"
 * is "TAR#a/b.jpg"). The per-thread reader of blip_tar_read is the streaming
 * half: the indexer's decoding threads ask for members in path order, which
 * is archive order for img2dataset's shards, so each thread reads the tar
 * forward once (data of members it does not want is skipped by seeking). */
#include "blip_tar.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blip_err.h"

int blip_tar_is_tar(const char *name) {
  size_t n = strlen(name);
  return n > 4 && strcasecmp(name + n - 4, ".tar") == 0;
}

size_t blip_tar_split(const char *path) {
  size_t cut = 0;
  for (const char *p = path; (p = strchr(p, '#')); p++)
    if (p - path > 4 && strncasecmp(p - 4, ".tar", 4) == 0 && p[1]) cut = (size_t)(p - path);
  return cut;
}

static int64_t entry_mtime_ns(struct archive_entry *e) {
  return archive_entry_mtime_is_set(e) ? (int64_t)archive_entry_mtime(e) * 1000000000 + archive_entry_mtime_nsec(e) : 0;
}

static int open_tar(const char *path, struct archive **out) {
  struct archive *a = archive_read_new();
  if (!a) return blip_err_set(BLIP_ENOMEM, "out of memory");
  archive_read_support_format_tar(a);
  archive_read_support_format_gnutar(a);
  if (archive_read_open_filename(a, path, 1 << 16) != ARCHIVE_OK) {
    int rc = blip_err_set(archive_errno(a) == ENOMEM ? BLIP_ENOMEM : BLIP_EIO, "%s: %s", path,
                          archive_error_string(a) ? archive_error_string(a) : "cannot open");
    archive_read_free(a);
    return rc;
  }
  *out = a;
  return BLIP_OK;
}

/* The current member's data, whole, into a malloc'd buffer of its size. */
static int read_data(struct archive *a, const char *path, const char *name, int64_t size, uint8_t **out) {
  uint8_t *buf = malloc(size > 0 ? (size_t)size : 1);
  if (!buf) return blip_err_set(BLIP_ENOMEM, "%s#%s: no memory for %lld bytes", path, name, (long long)size);
  int64_t got = 0;
  while (got < size) {
    la_ssize_t r = archive_read_data(a, buf + got, (size_t)(size - got));
    if (r <= 0) {
      free(buf);
      return blip_err_set(BLIP_EIO, "%s#%s: %s", path, name,
                          r < 0 && archive_error_string(a) ? archive_error_string(a) : "truncated member");
    }
    got += r;
  }
  *out = buf;
  return BLIP_OK;
}

static int header_err(struct archive *a, const char *path) {
  return blip_err_set(BLIP_EFORMAT, "%s: %s", path, archive_error_string(a) ? archive_error_string(a) : "bad tar header");
}

int blip_tar_each(const char *path, int64_t max_bytes, blip_tar_fn fn, void *ctx) {
  struct archive *a = NULL;
  struct archive_entry *e;
  int rc = open_tar(path, &a), r;
  while (!rc && (r = archive_read_next_header(a, &e)) != ARCHIVE_EOF) {
    if (r < ARCHIVE_WARN) {
      rc = header_err(a, path);
      break;
    }
    if (archive_entry_filetype(e) != AE_IFREG || !archive_entry_pathname(e)) continue;
    const char *name = archive_entry_pathname(e);
    int64_t size = archive_entry_size(e);
    uint8_t *buf = NULL;
    if (size <= max_bytes && (rc = read_data(a, path, name, size, &buf))) break;
    rc = fn(ctx, name, buf, (size_t)size, entry_mtime_ns(e));
    free(buf);
  }
  if (a) archive_read_free(a);
  return rc;
}

int blip_tar_memfd(const uint8_t *bytes, size_t n) {
  int m = memfd_create("blip-tar", MFD_CLOEXEC), e;
  size_t off = 0;
  ssize_t w = 0;
  while (m >= 0 && off < n && ((w = write(m, bytes + off, n - off)) > 0 || (w < 0 && errno == EINTR)))
    off += w > 0 ? (size_t)w : 0;
  if (m >= 0 && (off < n || lseek(m, 0, SEEK_SET))) {
    e = off < n && w == 0 ? ENOSPC : errno;
    close(m);
    errno = e;
    m = -1;
  }
  return m;
}

/* ---- blip_tar_read: one forward reader per thread ---- */

static __thread struct {
  struct archive *a;
  char *tar;
  int64_t mtime_ns;
} g_cur;

void blip_tar_read_close(void) {
  if (g_cur.a) archive_read_free(g_cur.a);
  free(g_cur.tar);
  memset(&g_cur, 0, sizeof g_cur);
}

/* A thread that ends (a decoding pool's) closes its reader. */
static pthread_key_t g_key;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static void on_thread_exit(void *unused) {
  (void)unused;
  blip_tar_read_close();
}
static void make_key(void) { pthread_key_create(&g_key, on_thread_exit); }

int blip_tar_read(const char *path, int64_t max_bytes, uint8_t **bytes, size_t *n, int64_t *tar_mtime_ns) {
  *bytes = NULL;
  *n = 0;
  size_t cut = blip_tar_split(path);
  if (!cut) return blip_err_set(BLIP_EINVAL, "%s: not a TAR#MEMBER path", path);
  char *tar = strndup(path, cut);
  const char *key = path + cut + 1;
  if (!tar) return blip_err_set(BLIP_ENOMEM, "out of memory");
  struct stat sb;
  int rc = BLIP_OK;
  if (stat(tar, &sb) != 0) {
    rc = blip_err_errno("cannot read", tar);
    goto done;
  }
  if (!S_ISREG(sb.st_mode)) { /* a FIFO would block */
    rc = blip_err_set(BLIP_EIO, "%s: not a regular file", tar);
    goto done;
  }
  int64_t mt = (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec;
  /* the open reader continues if it reads this version of this tar; else, and after passing the end once, reopen */
  int fresh = !(g_cur.a && !strcmp(g_cur.tar, tar) && g_cur.mtime_ns == mt);
  for (int pass = 0; pass < 2 && !rc; pass++) {
    if (fresh) {
      blip_tar_read_close();
      if ((rc = open_tar(tar, &g_cur.a))) break;
      pthread_once(&g_once, make_key);
      pthread_setspecific(g_key, &g_cur); /* any non-NULL value: the destructor runs */
      g_cur.tar = tar;
      tar = NULL;
      g_cur.mtime_ns = mt;
    }
    struct archive_entry *e;
    int r;
    while ((r = archive_read_next_header(g_cur.a, &e)) != ARCHIVE_EOF) {
      if (r < ARCHIVE_WARN) {
        rc = header_err(g_cur.a, g_cur.tar);
        break;
      }
      const char *name = archive_entry_pathname(e);
      if (archive_entry_filetype(e) != AE_IFREG || !name || strcmp(name, key)) continue;
      int64_t size = archive_entry_size(e);
      if (size > max_bytes)
        rc = blip_err_set(BLIP_ETOOBIG, "%s: %lld bytes, over the limit of %lld", path, (long long)size,
                          (long long)max_bytes);
      else if (!(rc = read_data(g_cur.a, g_cur.tar, name, size, bytes))) *n = (size_t)size;
      if (!rc) *tar_mtime_ns = mt;
      goto done;
    }
    if (fresh && !rc) break; /* read whole from the start: not there */
    fresh = 1;
  }
  if (!rc) rc = blip_err_set(BLIP_ENOTFOUND, "%s: no such member in the tar", path);
done:
  if (rc && g_cur.a) blip_tar_read_close(); /* a reader in an unknown state is not kept */
  free(tar);
  return rc;
}
