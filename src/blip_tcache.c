/* blip_tcache: see blip_tcache.h. */
#include "blip_tcache.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "blip_err.h"

#define TEMP_AGE_S 3600 /* a temp file this old is a crashed write's leftover */

struct blip_tcache {
  char *dir;
  int64_t cap, total;
  blip_tcache_keep_fn keep;
  void *ctx;
  pthread_mutex_t mu;
  int sweeping;
};

typedef struct {
  struct timespec mtime;
  int64_t size;
  char name[80]; /* "sub/file" */
} entry;

/* "<id>-<16 hex>.jpg": 1 with id and fp set; 0 for any other name. */
static int parse_name(const char *s, int64_t *id, uint64_t *fp) {
  char *e;
  if (s[0] < '1' || s[0] > '9') return 0;
  errno = 0;
  long long v = strtoll(s, &e, 10);
  if (errno || *e != '-') return 0;
  const char *h = e + 1;
  for (int i = 0; i < 16; i++)
    if (!strchr("0123456789abcdef", h[i]) || !h[i]) return 0;
  if (strcmp(h + 16, ".jpg")) return 0;
  *id = v;
  *fp = strtoull(h, NULL, 16);
  return 1;
}

static int older(const void *a, const void *b) {
  const struct timespec *x = &((const entry *)a)->mtime, *y = &((const entry *)b)->mtime;
  if (x->tv_sec != y->tv_sec) return x->tv_sec < y->tv_sec ? -1 : 1;
  return x->tv_nsec < y->tv_nsec ? -1 : x->tv_nsec > y->tv_nsec;
}

/* Scan one subdirectory: stale files and old temp files out, the rest into *e. */
static int scan_sub(blip_tcache *tc, const char *sub, entry **e, size_t *n, size_t *cap, int64_t *total) {
  char p[4096];
  snprintf(p, sizeof p, "%s/%s", tc->dir, sub);
  DIR *d = opendir(p);
  if (!d) return 0;
  struct dirent *f;
  time_t now = time(NULL);
  while ((f = readdir(d))) {
    struct stat st;
    int64_t id;
    uint64_t fp;
    if (f->d_name[0] == '.' || fstatat(dirfd(d), f->d_name, &st, AT_SYMLINK_NOFOLLOW) || !S_ISREG(st.st_mode))
      continue;
    if (strstr(f->d_name, ".tmp")) {
      if (now - st.st_mtime > TEMP_AGE_S) unlinkat(dirfd(d), f->d_name, 0);
      continue;
    }
    if (!parse_name(f->d_name, &id, &fp) || strlen(sub) + strlen(f->d_name) + 2 > sizeof (*e)->name) continue;
    if (tc->keep && tc->keep(tc->ctx, id, fp) == 0) {
      unlinkat(dirfd(d), f->d_name, 0);
      continue;
    }
    if (*n == *cap) {
      size_t c = *cap ? *cap * 2 : 256;
      entry *g = realloc(*e, c * sizeof *g);
      if (!g) {
        closedir(d);
        return blip_err_set(BLIP_ENOMEM, "out of memory");
      }
      *e = g;
      *cap = c;
    }
    entry *x = &(*e)[(*n)++];
    x->mtime = st.st_mtim;
    x->size = st.st_size;
    snprintf(x->name, sizeof x->name, "%s/%s", sub, f->d_name);
    *total += st.st_size;
  }
  closedir(d);
  return 0;
}

/* Drop what keep rejects, then the least recent files until the total is
 * at most target bytes; the total becomes what is left. */
static void sweep(blip_tcache *tc, int64_t target) {
  entry *e = NULL;
  size_t n = 0, cap = 0;
  int64_t total = 0;
  int rc = 0;
  DIR *d = opendir(tc->dir);
  struct dirent *s;
  while (d && !rc && (s = readdir(d)))
    if (s->d_name[0] != '.' && strlen(s->d_name) < 16) rc = scan_sub(tc, s->d_name, &e, &n, &cap, &total);
  if (d) closedir(d);
  if (!rc && total > target) { /* least recent first */
    qsort(e, n, sizeof *e, older);
    char p[4096];
    for (size_t i = 0; i < n && total > target; i++) {
      snprintf(p, sizeof p, "%s/%s", tc->dir, e[i].name);
      if (!unlink(p) || errno == ENOENT) total -= e[i].size;
    }
  }
  free(e);
  pthread_mutex_lock(&tc->mu);
  if (!rc) tc->total = total;
  pthread_mutex_unlock(&tc->mu);
}

int blip_tcache_open(const char *dir, int64_t cap, blip_tcache_keep_fn keep, void *ctx, blip_tcache **out) {
  *out = NULL;
  if (!dir || cap < 1) return blip_err_set(BLIP_EINVAL, "blip_tcache_open: bad arguments");
  blip_tcache *tc = calloc(1, sizeof *tc);
  if (!tc || !(tc->dir = strdup(dir))) {
    free(tc);
    return blip_err_set(BLIP_ENOMEM, "out of memory");
  }
  tc->cap = cap;
  tc->keep = keep;
  tc->ctx = ctx;
  pthread_mutex_init(&tc->mu, NULL);
  sweep(tc, cap);
  *out = tc;
  return BLIP_OK;
}

void blip_tcache_close(blip_tcache *tc) {
  if (!tc) return;
  pthread_mutex_destroy(&tc->mu);
  free(tc->dir);
  free(tc);
}

void blip_tcache_hit(blip_tcache *tc, int fd, time_t mtime) {
  (void)tc;
  if (time(NULL) - mtime > BLIP_TCACHE_TOUCH_S) futimens(fd, NULL);
}

void blip_tcache_added(blip_tcache *tc, int64_t bytes) {
  pthread_mutex_lock(&tc->mu);
  tc->total += bytes;
  int go = tc->total > tc->cap && !tc->sweeping;
  if (go) tc->sweeping = 1;
  pthread_mutex_unlock(&tc->mu);
  if (!go) return;
  sweep(tc, tc->cap / 4 * 3);
  pthread_mutex_lock(&tc->mu);
  tc->sweeping = 0;
  pthread_mutex_unlock(&tc->mu);
}
