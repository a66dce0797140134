/* blip_decode: see blip_decode.h.
 *
 * Design note.
 * - Why processes. libvips calls a dozen C libraries on bytes from an
 *   untrusted folder; even with only the photo loaders reachable, one heap
 *   overflow, abort() or endless loop in libjpeg/libpng/libtiff/libwebp/
 *   libheif would end or freeze the indexer. A process boundary is the only
 *   thing that contains a crash and the only way to stop a loop that never
 *   returns to our time checks (SIGKILL works where a cancel flag cannot).
 * - Why re-execute this binary. The parent runs OpenMP, oneDNN and libvips
 *   threads; fork() of a threaded process may copy a lock held by another
 *   thread, and a decoder that crashed must be replaced mid-run, when those
 *   threads exist. So workers are started with posix_spawn("/proc/self/exe")
 *   (clone+exec, safe from any thread), and a constructor in this file turns
 *   the fresh process into a worker before main() runs when it finds
 *   BLIP_DECODE_WORKER in its environment. Any tool linking blipsearch can
 *   therefore host its own workers; nothing has to be installed beside it.
 * - Data path. The parent reads the file once, through one descriptor, into
 *   a memfd (the bytes hashed are the bytes decoded, and size and mtime come
 *   from the same fstat, re-checked after the read), and passes the memfd
 *   over a Unix socket (SCM_RIGHTS): no copy. The worker returns the SxS RGB
 *   image (442 KB at 384) and the parent normalizes it.
 * - Limits. Time: the parent waits for each message with a deadline of
 *   time_budget_s (+1 s, so blip_img's own, gentler budget check reports
 *   first when it can), then SIGKILLs the worker and respawns it lazily.
 *   Memory: the worker caps its address space (RLIMIT_AS) at its start-up
 *   size + memory_cap, so an allocation beyond it fails in the worker; GLib
 *   aborts on a failed g_malloc, which the worker turns into exit status 86
 *   ("exceeded its memory cap"). ASan reserves terabytes of address space, so
 *   sanitizer builds instead have the parent watch the worker's RSS while it
 *   waits (every 100 ms, cap + 256 MiB for ASan's own use). Concurrency of
 *   large decodes: after reading the header the worker asks to be admitted
 *   with width*height*(bands*depth + 6) bytes; the parent admits it while the
 *   decodes in flight stay under memory_budget (one is always admitted, so a
 *   huge image runs alone instead of never). Waiting for admission does not
 *   count against the time budget.
 * - Orphans. A worker exits on EOF of its socket; a worker stuck in a loop
 *   whose parent was SIGKILLed dies by its own alarm (2 x budget + 10 s).
 *   Workers ignore SIGINT so that ^C reaches only the parent, which stops
 *   its calls (BLIP_EINTR) and kills the workers in flight.
 * - Test hook: a worker started with BLIP_TEST_DECODER_FAULT=1 misbehaves on
 *   files whose name contains "blip-fault-KIND": crash (SIGSEGV), abort,
 *   hang, balloon (allocates without end), pause (waits, after the parent
 *   read the bytes, until the test removes NAME.paused). Only the worker
 *   reads it; the parent is the code under test. */
#include "blip_decode.h"

#include <errno.h>
#include <fcntl.h>
#include <glib.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "blip_err.h"
#include "blip_tar.h"

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif

extern char **environ;

#define WORKER_ENV "BLIP_DECODE_WORKER"
#define CAP_ENV "BLIP_DECODE_CAP"
#define FAULT_ENV "BLIP_TEST_DECODER_FAULT"
#define FAULT_MARK "blip-fault-"
#define WORKER_FD 3
#define EXIT_MEMCAP 86
#define MAGIC 0x424c4431u /* "BLD1" */
#define GRACE_S 1.0

typedef struct {
  uint32_t magic, name_len;
  int32_t size, autorotate, shrink_on_load, color_manage, reference, pad;
  int64_t max_pixels, max_file_bytes, len;
  double time_budget_s;
} request;

enum { REP_ADMIT = 1, REP_DONE = 2 };
typedef struct {
  uint32_t kind, msg_len;
  int32_t rc, has_rgb;
  int64_t bytes;
  blip_img_meta meta;
} reply;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int write_all(int fd, const void *p, size_t n) {
  const uint8_t *b = p;
  while (n) {
    ssize_t r = send(fd, b, n, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    b += r;
    n -= (size_t)r;
  }
  return 0;
}

/* ================================================================ worker */

static int g_wfd = -1;

static int read_plain(int fd, void *p, size_t n) {
  uint8_t *b = p;
  while (n) {
    ssize_t r = read(fd, b, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    b += r;
    n -= (size_t)r;
  }
  return 0;
}

static int worker_admit(void *ctx, int64_t bytes) {
  reply r = {.kind = REP_ADMIT, .bytes = bytes};
  char go;
  if (write_all(g_wfd, &r, sizeof r) || read_plain(g_wfd, &go, 1)) _exit(0); /* parent gone */
  return BLIP_OK;
}

/* g_malloc() failing under the cap ends in g_error(): say so by exit status. */
static void on_fatal(const gchar *domain, GLogLevelFlags level, const gchar *msg, gpointer user) {
  if (msg && strstr(msg, "alloc")) _exit(EXIT_MEMCAP);
  fprintf(stderr, "blip-decode-worker: %s\n", msg ? msg : "fatal GLib error");
}

/* The test hook: BLIP_TEST_DECODER_FAULT set, a file named *blip-fault-KIND*. */
static void test_fault(const char *name) {
  const char *on = getenv(FAULT_ENV), *k = strstr(name, FAULT_MARK);
  if (!on || !*on || !k) return;
  k += sizeof FAULT_MARK - 1;
  if (!strncmp(k, "crash", 5)) {
    signal(SIGSEGV, SIG_DFL); /* not the sanitizer's handler: die as a real crash does */
    raise(SIGSEGV);
  } else if (!strncmp(k, "abort", 5)) {
    signal(SIGABRT, SIG_DFL);
    abort();
  } else if (!strncmp(k, "hang", 4)) {
    for (;;) pause();
  } else if (!strncmp(k, "balloon", 7)) {
    for (;;) { /* as a decoder trusting a forged size would */
      volatile char *p = g_malloc((size_t)64 << 20);
      for (size_t i = 0; i < ((size_t)64 << 20); i += 4096) p[i] = 1;
    }
  } else if (!strncmp(k, "pause", 5)) { /* the bytes are read: hold until the test removes NAME.paused */
    char flag[PATH_MAX + 16];
    snprintf(flag, sizeof flag, "%s.paused", name);
    int fd = open(flag, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) close(fd);
    while (!access(flag, F_OK)) usleep(10000);
  }
}

/* Address space now + cap: the worker's code and libraries stay out of the cap. */
static void cap_memory(int64_t cap) {
  if (SANITIZED || cap <= 0) return;
  FILE *f = fopen("/proc/self/statm", "r");
  unsigned long long pages = 0;
  if (!f) return;
  if (fscanf(f, "%llu", &pages) != 1) pages = 0;
  fclose(f);
  uint64_t lim = (uint64_t)pages * (uint64_t)sysconf(_SC_PAGESIZE) + (uint64_t)cap;
  struct rlimit rl = {lim, lim};
  setrlimit(RLIMIT_AS, &rl);
}

static int recv_request(int fd, request *q, int *mfd) {
  char ctl[CMSG_SPACE(sizeof(int))];
  struct iovec iov = {q, sizeof *q};
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
  *mfd = -1;
  ssize_t r;
  do r = recvmsg(fd, &m, MSG_CMSG_CLOEXEC | MSG_WAITALL);
  while (r < 0 && errno == EINTR);
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) memcpy(mfd, CMSG_DATA(c), sizeof(int));
  if (r != (ssize_t)sizeof *q || q->magic != MAGIC || *mfd < 0 || q->name_len > PATH_MAX || q->len <= 0 ||
      q->size < 1 || q->size > 8192)
    return -1;
  return 0;
}

static void worker_main(int fd, int64_t cap) {
  g_wfd = fd;
  signal(SIGINT, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  if (blip_img_init()) _exit(3);
  g_log_set_handler("GLib", G_LOG_LEVEL_ERROR | G_LOG_FLAG_FATAL | G_LOG_FLAG_RECURSION, on_fatal, NULL);
  cap_memory(cap);
  uint8_t *rgb = NULL;
  size_t rgb_cap = 0;
  char name[PATH_MAX + 1];
  for (;;) {
    request q;
    int mfd;
    if (recv_request(fd, &q, &mfd) || read_plain(fd, name, q.name_len)) _exit(0);
    name[q.name_len] = 0;
    alarm((unsigned)(q.time_budget_s * 2 + 10)); /* orphan guard: the parent kills us first */
    blip_img_opts o;
    blip_img_opts_default(&o);
    o.size = q.size;
    o.autorotate = q.autorotate;
    o.shrink_on_load = q.shrink_on_load;
    o.color_manage = q.color_manage;
    o.reference = q.reference;
    o.max_pixels = q.max_pixels;
    o.max_file_bytes = q.max_file_bytes;
    o.time_budget_s = q.time_budget_s;
    o.admit = worker_admit;
    size_t need = (size_t)3 * q.size * q.size;
    blip_img_meta meta;
    memset(&meta, 0, sizeof meta);
    int rc = BLIP_OK;
    if (need > rgb_cap) {
      free(rgb);
      rgb_cap = 0;
      if ((rgb = malloc(need))) rgb_cap = need;
      else rc = blip_err_set(BLIP_ENOMEM, "%s: out of memory", name);
    }
    void *map = rc ? MAP_FAILED : mmap(NULL, (size_t)q.len, PROT_READ, MAP_SHARED, mfd, 0);
    close(mfd);
    if (!rc && map == MAP_FAILED) rc = blip_err_set(BLIP_ENOMEM, "%s: cannot map the file: %s", name, strerror(errno));
    if (!rc) {
      test_fault(name);
      rc = blip_img_load_memory(map, (size_t)q.len, name, &o, NULL, rgb, &meta);
    }
    if (map != MAP_FAILED) munmap(map, (size_t)q.len);
    alarm(0);
    const char *msg = rc ? blip_err_last() : "";
    reply r = {.kind = REP_DONE, .msg_len = (uint32_t)strlen(msg), .rc = rc, .has_rgb = rc == BLIP_OK, .meta = meta};
    if (write_all(fd, &r, sizeof r) || write_all(fd, msg, r.msg_len) || (r.has_rgb && write_all(fd, rgb, need)))
      _exit(0);
  }
}

__attribute__((constructor)) static void blip_decode_worker_entry(void) {
  const char *e = getenv(WORKER_ENV);
  if (!e || atoi(e) != WORKER_FD) return;
  const char *c = getenv(CAP_ENV);
  worker_main(WORKER_FD, c ? strtoll(c, NULL, 10) : 0);
  _exit(0);
}

/* ================================================================ parent */

typedef struct {
  pid_t pid; /* 0: not running */
  int fd, busy;
} worker;

struct blip_decode {
  blip_decode_opts o;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  worker *w;
  int64_t mem_in_use;
  int mem_holders, peak_holders;
};

void blip_decode_opts_default(blip_decode_opts *o) {
  o->workers = 1;
  o->memory_cap = (int64_t)4 << 30;
  long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
  int64_t quarter = pages > 0 && psz > 0 ? (int64_t)pages * psz / 4 : 0;
  o->memory_budget = quarter > ((int64_t)1 << 30) ? quarter : (int64_t)1 << 30;
  o->stop = NULL;
}

int blip_decode_new(const blip_decode_opts *o, blip_decode **out) {
  *out = NULL;
  if (!o || o->workers < 1 || o->workers > 1024 || o->memory_cap < 0 || o->memory_budget < 1)
    return blip_err_set(BLIP_EINVAL, "blip_decode: bad options");
  blip_decode *d = calloc(1, sizeof *d);
  if (!d || !(d->w = calloc((size_t)o->workers, sizeof *d->w))) {
    free(d);
    return blip_err_set(BLIP_ENOMEM, "out of memory");
  }
  d->o = *o;
  for (int i = 0; i < o->workers; i++) d->w[i].fd = -1;
  pthread_mutex_init(&d->mu, NULL);
  pthread_cond_init(&d->cv, NULL);
  *out = d;
  return BLIP_OK;
}

static void worker_stop(worker *w) {
  if (w->fd >= 0) close(w->fd);
  w->fd = -1;
  if (w->pid > 0) {
    kill(w->pid, SIGKILL);
    while (waitpid(w->pid, NULL, 0) < 0 && errno == EINTR) {}
  }
  w->pid = 0;
}

void blip_decode_free(blip_decode *d) {
  if (!d) return;
  for (int i = 0; i < d->o.workers; i++) worker_stop(&d->w[i]);
  pthread_mutex_destroy(&d->mu);
  pthread_cond_destroy(&d->cv);
  free(d->w);
  free(d);
}

/* The worker's environment: ours, plus its socket and its cap. */
static char **worker_env(int64_t cap) {
  size_t n = 0;
  while (environ[n]) n++;
  char **env = calloc(n + 3, sizeof *env), *a = malloc(64), *b = malloc(64);
  if (!env || !a || !b) {
    free(env);
    free(a);
    free(b);
    return NULL;
  }
  size_t k = 0;
  for (size_t i = 0; i < n; i++)
    if (strncmp(environ[i], WORKER_ENV "=", sizeof WORKER_ENV) && strncmp(environ[i], CAP_ENV "=", sizeof CAP_ENV))
      env[k++] = environ[i];
  snprintf(a, 64, "%s=%d", WORKER_ENV, WORKER_FD);
  snprintf(b, 64, "%s=%lld", CAP_ENV, (long long)cap);
  env[k++] = a;
  env[k++] = b;
  env[k] = NULL;
  return env;
}

static void worker_env_free(char **env) {
  if (!env) return;
  size_t n = 0;
  while (env[n]) n++;
  free(env[n - 2]); /* the last two entries are ours */
  free(env[n - 1]);
  free(env);
}

static int worker_start(blip_decode *d, worker *w) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
    return blip_err_set(BLIP_EIO, "decoder: socketpair: %s", strerror(errno));
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, sv[1], WORKER_FD); /* clears close-on-exec, also when equal */
  posix_spawn_file_actions_addclosefrom_np(&fa, WORKER_FD + 1);
  char **env = worker_env(d->o.memory_cap);
  char *argv[] = {"blip-decode-worker", NULL};
  pid_t pid = 0;
  int err = env ? posix_spawn(&pid, "/proc/self/exe", &fa, NULL, argv, env) : ENOMEM;
  posix_spawn_file_actions_destroy(&fa);
  worker_env_free(env);
  close(sv[1]);
  if (err) {
    close(sv[0]);
    return blip_err_set(BLIP_EIO, "cannot start a decoder process: %s", strerror(err));
  }
  w->pid = pid;
  w->fd = sv[0];
  return BLIP_OK;
}

int blip_decode_start(blip_decode *d) {
  int rc = BLIP_OK;
  pthread_mutex_lock(&d->mu);
  for (int i = 0; i < d->o.workers && !rc; i++)
    if (!d->w[i].busy && !d->w[i].pid) rc = worker_start(d, &d->w[i]);
  pthread_mutex_unlock(&d->mu);
  return rc;
}

static int stopped(const blip_decode *d) { return d->o.stop && *d->o.stop; }

enum { RD_OK = 0, RD_EOF = -1, RD_TIME = -2, RD_STOP = -3, RD_MEM = -4 };

/* Sanitizer builds only: resident bytes of pid over the cap (ASan's shadow
 * and quarantine get 256 MiB of slack), since RLIMIT_AS cannot be used there. */
static int over_rss(const blip_decode *d, pid_t pid) {
  if (!SANITIZED || d->o.memory_cap <= 0) return 0;
  char path[64];
  unsigned long long size = 0, rss = 0;
  snprintf(path, sizeof path, "/proc/%d/statm", (int)pid);
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  int ok = fscanf(f, "%llu %llu", &size, &rss) == 2;
  fclose(f);
  return ok && (int64_t)(rss * (unsigned long long)sysconf(_SC_PAGESIZE)) > d->o.memory_cap + ((int64_t)256 << 20);
}

/* Read n bytes from worker w before the deadline, watching the stop flag
 * (and, in sanitizer builds, the worker's RSS) every 100 ms. */
static int recv_all(blip_decode *d, const worker *w, void *p, size_t n, double deadline) {
  uint8_t *b = p;
  int fd = w->fd;
  while (n) {
    if (stopped(d)) return RD_STOP;
    if (over_rss(d, w->pid)) return RD_MEM;
    double left = deadline - now_s();
    if (left <= 0) return RD_TIME;
    struct pollfd pf = {fd, POLLIN, 0};
    int ms = left > 0.1 ? 100 : (int)(left * 1000) + 1;
    int r = poll(&pf, 1, ms);
    if (r < 0 && errno != EINTR) return RD_EOF;
    if (r <= 0) continue;
    ssize_t k = read(fd, b, n);
    if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (k <= 0) return RD_EOF;
    b += k;
    n -= (size_t)k;
  }
  return RD_OK;
}

static int mem_acquire(blip_decode *d, int64_t bytes) {
  pthread_mutex_lock(&d->mu);
  while (d->mem_holders > 0 && d->mem_in_use + bytes > d->o.memory_budget && !stopped(d)) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 100000000;
    if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
    pthread_cond_timedwait(&d->cv, &d->mu, &ts);
  }
  int ok = !stopped(d);
  if (ok) {
    d->mem_in_use += bytes;
    if (++d->mem_holders > d->peak_holders) d->peak_holders = d->mem_holders;
  }
  pthread_mutex_unlock(&d->mu);
  return ok ? RD_OK : RD_STOP;
}

static void mem_release(blip_decode *d, int64_t bytes) {
  pthread_mutex_lock(&d->mu);
  d->mem_in_use -= bytes;
  d->mem_holders--;
  pthread_cond_broadcast(&d->cv);
  pthread_mutex_unlock(&d->mu);
}

static worker *worker_take(blip_decode *d) {
  worker *w = NULL;
  pthread_mutex_lock(&d->mu);
  while (!stopped(d)) {
    for (int i = 0; i < d->o.workers && !w; i++)
      if (!d->w[i].busy) w = &d->w[i];
    if (w) break;
    pthread_cond_wait(&d->cv, &d->mu);
  }
  if (w) w->busy = 1;
  pthread_mutex_unlock(&d->mu);
  return w;
}

static void worker_give(blip_decode *d, worker *w) {
  pthread_mutex_lock(&d->mu);
  w->busy = 0;
  pthread_cond_broadcast(&d->cv);
  pthread_mutex_unlock(&d->mu);
}

/* Why a worker went away: reap it and describe its end. */
static int worker_died(blip_decode *d, worker *w, const char *path) {
  int status = 0;
  pid_t pid = w->pid;
  close(w->fd);
  w->fd = -1;
  w->pid = 0;
  kill(pid, SIGKILL); /* closed its socket yet still alive: the same to us */
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
  if (WIFEXITED(status) && WEXITSTATUS(status) == EXIT_MEMCAP)
    return blip_err_set(BLIP_ETOOBIG, "%s: decoder exceeded its memory cap (%lld MiB)", path,
                        (long long)(d->o.memory_cap >> 20));
  if (WIFSIGNALED(status)) {
    const char *s = sigabbrev_np(WTERMSIG(status));
    return blip_err_set(BLIP_EFORMAT, "%s: decoder crashed (SIG%s)", path, s ? s : "?");
  }
  return blip_err_set(BLIP_EFORMAT, "%s: decoder crashed (exit status %d)", path,
                      WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

/* Open + read + hash through one descriptor. dst (len = info->size) receives
 * the bytes, or NULL to hash them in passing. The size and mtime must not
 * change while reading: else the bytes may mix two versions. */
static int read_hash(int fd, const char *path, const blip_img_stat *st, uint8_t *dst, blip_decode_info *info) {
  enum { CHUNK = 1 << 20 };
  uint8_t *tmp = dst ? NULL : malloc(CHUNK);
  XXH3_state_t *x = XXH3_createState();
  int rc = BLIP_OK;
  if ((!dst && !tmp) || !x) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  XXH3_64bits_reset(x);
  for (int64_t off = 0; off < st->size && !rc; off += CHUNK) {
    size_t n = (size_t)(st->size - off < CHUNK ? st->size - off : CHUNK);
    uint8_t *p = dst ? dst + off : tmp;
    if (!(rc = blip_img_read_fd(fd, path, p, n, off))) XXH3_64bits_update(x, p, n);
  }
  struct stat now;
  if (!rc && (fstat(fd, &now) || now.st_size != st->size ||
              (int64_t)now.st_mtim.tv_sec * 1000000000 + now.st_mtim.tv_nsec != st->mtime_ns))
    rc = blip_err_set(BLIP_EIO, "%s: changed while being read (will be retried)", path);
  if (!rc) {
    info->read = 1;
    info->size = st->size;
    info->mtime_ns = st->mtime_ns;
    info->fingerprint = XXH3_64bits_digest(x);
  }
done:
  XXH3_freeState(x);
  free(tmp);
  return rc;
}

int blip_decode_fingerprint(const char *path, int64_t max_bytes, blip_decode_info *info) {
  int fd;
  blip_img_stat st;
  memset(info, 0, sizeof *info);
  int rc = blip_img_open(path, max_bytes, &fd, &st);
  if (rc) return rc;
  rc = read_hash(fd, path, &st, NULL, info);
  close(fd);
  return rc;
}

/* A shard member's bytes (blip_tar.h) in a memfd, hashed; size is the
 * member's, mtime the tar's (the version of the tar they came from). */
static int member_to_memfd(const char *path, int64_t max_bytes, int *mfd, blip_decode_info *info) {
  uint8_t *b = NULL;
  size_t n = 0;
  int64_t mt = 0;
  int rc = blip_tar_read(path, max_bytes, &b, &n, &mt), m = -1;
  if (rc) return rc;
  if ((m = blip_tar_memfd(b, n)) < 0) {
    rc = blip_err_set(BLIP_ENOMEM, "%s: no memory for its %zu bytes: %s", path, n, strerror(errno));
  } else {
    *info = (blip_decode_info){1, (int64_t)n, mt, XXH3_64bits(b, n)};
    *mfd = m;
  }
  free(b);
  return rc;
}

/* The file's bytes in a memfd, hashed on the way. */
static int read_to_memfd(const char *path, int64_t max_bytes, int *mfd, blip_decode_info *info) {
  int fd = -1;
  blip_img_stat st;
  *mfd = -1;
  if (blip_tar_split(path) && access(path, F_OK) != 0 && errno == ENOENT) /* "TAR#MEMBER", no such plain file */
    return member_to_memfd(path, max_bytes, mfd, info);
  int rc = blip_img_open(path, max_bytes, &fd, &st);
  if (rc) return rc;
  void *map = MAP_FAILED;
  int m = memfd_create("blip-decode", MFD_CLOEXEC);
  if (m < 0 || ftruncate(m, st.size)) {
    rc = blip_err_set(BLIP_ENOMEM, "%s: no memory for its %lld bytes: %s", path, (long long)st.size,
                      strerror(errno));
    goto done;
  }
  map = mmap(NULL, (size_t)st.size, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
  if (map == MAP_FAILED) {
    rc = blip_err_set(BLIP_ENOMEM, "%s: cannot map %lld bytes: %s", path, (long long)st.size, strerror(errno));
    goto done;
  }
  rc = read_hash(fd, path, &st, map, info);
done:
  if (map != MAP_FAILED) munmap(map, (size_t)st.size);
  close(fd);
  if (rc && m >= 0) close(m);
  if (!rc) *mfd = m;
  return rc;
}

static int send_request(worker *w, const request *q, const char *name, int mfd) {
  char ctl[CMSG_SPACE(sizeof(int))];
  memset(ctl, 0, sizeof ctl);
  struct iovec iov = {(void *)q, sizeof *q};
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
  struct cmsghdr *c = CMSG_FIRSTHDR(&m);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(c), &mfd, sizeof(int));
  ssize_t r;
  do r = sendmsg(w->fd, &m, MSG_NOSIGNAL);
  while (r < 0 && errno == EINTR);
  if (r != (ssize_t)sizeof *q) return -1;
  return write_all(w->fd, name, q->name_len);
}

/* One file through worker w; the worker is replaced on any failure of its own. */
static int run_job(blip_decode *d, worker *w, const char *path, const blip_img_opts *o, int mfd, int64_t len,
                   uint8_t *rgb, blip_img_meta *meta) {
  size_t name_len = strnlen(path, PATH_MAX);
  request q = {MAGIC,          (uint32_t)name_len, o->size,    o->autorotate, o->shrink_on_load, o->color_manage,
               o->reference,   0,                  o->max_pixels, o->max_file_bytes, len,           o->time_budget_s};
  int rc;
  /* a worker that died idle (or was never started) is replaced once */
  for (int attempt = 0;; attempt++) {
    if (!w->pid && (rc = worker_start(d, w))) return rc;
    if (!send_request(w, &q, path, mfd)) break;
    worker_stop(w);
    if (attempt) return blip_err_set(BLIP_EIO, "%s: cannot reach a decoder process", path);
  }
  double deadline = now_s() + o->time_budget_s + GRACE_S;
  int64_t held = 0;
  reply r;
  int got;
  for (;;) {
    if ((got = recv_all(d, w, &r, sizeof r, deadline)) != RD_OK) break;
    if (r.kind != REP_ADMIT) break;
    if (held) { /* one admission per decode */
      got = RD_EOF;
      break;
    }
    double t = now_s();
    if ((got = mem_acquire(d, r.bytes > 0 ? r.bytes : 1)) != RD_OK) break;
    held = r.bytes > 0 ? r.bytes : 1;
    deadline += now_s() - t; /* waiting for memory is not decoding time */
    if (write_all(w->fd, "g", 1)) {
      got = RD_EOF;
      break;
    }
  }
  char msg[1024] = "";
  if (got == RD_OK && r.kind == REP_DONE) {
    size_t keep = r.msg_len < sizeof msg ? r.msg_len : sizeof msg - 1;
    got = recv_all(d, w, msg, keep, deadline);
    for (size_t skip = r.msg_len - keep; got == RD_OK && skip;) { /* an overlong message: drop the rest */
      char sink[256];
      size_t k = skip < sizeof sink ? skip : sizeof sink;
      got = recv_all(d, w, sink, k, deadline);
      skip -= k;
    }
    msg[keep] = 0;
    if (got == RD_OK && r.has_rgb) got = recv_all(d, w, rgb, (size_t)3 * o->size * o->size, deadline);
  }
  /* protocol violations (a damaged worker): treat as a dead worker */
  if (got == RD_OK && (r.kind != REP_DONE || (r.rc == BLIP_OK) != (r.has_rgb == 1) || r.rc > 0 || r.rc < -64))
    got = RD_EOF;
  if (held) mem_release(d, held);
  switch (got) {
  case RD_OK:
    /* the worker's memory may have been damaged by the decoder: trust nothing unchecked */
    r.meta.taken_at[sizeof r.meta.taken_at - 1] = 0;
    if (r.meta.orientation < 1 || r.meta.orientation > 8) r.meta.orientation = 1;
    if (r.meta.width < 0 || r.meta.height < 0) r.meta.width = r.meta.height = 0;
    if (meta) *meta = r.meta;
    return r.rc ? blip_err_set(r.rc, "%s", msg) : BLIP_OK;
  case RD_TIME:
    worker_stop(w);
    return blip_err_set(BLIP_EINTR, "%s: decoder exceeded %g s", path, o->time_budget_s);
  case RD_STOP:
    worker_stop(w);
    return blip_err_set(BLIP_EINTR, "%s: stopped", path);
  case RD_MEM:
    worker_stop(w);
    return blip_err_set(BLIP_ETOOBIG, "%s: decoder exceeded its memory cap (%lld MiB)", path,
                        (long long)(d->o.memory_cap >> 20));
  default:
    return worker_died(d, w, path);
  }
}

int blip_decode_file(blip_decode *d, const char *path, const blip_img_opts *o, float *out, uint8_t *rgb,
                     blip_img_meta *meta, blip_decode_info *info) {
  blip_decode_info tmp;
  if (!info) info = &tmp;
  memset(info, 0, sizeof *info);
  if (!d || !path || !o || o->size < 1 || o->size > 8192 || !(o->time_budget_s > 0))
    return blip_err_set(BLIP_EINVAL, "blip_decode_file: bad arguments");
  if (meta) memset(meta, 0, sizeof *meta);
  int mfd = -1, rc = read_to_memfd(path, o->max_file_bytes, &mfd, info);
  if (rc) return rc;
  uint8_t *own = NULL;
  if (!rgb && !(rgb = own = malloc((size_t)3 * o->size * o->size))) {
    close(mfd);
    return blip_err_set(BLIP_ENOMEM, "%s: out of memory", path);
  }
  worker *w = worker_take(d);
  if (!w) rc = blip_err_set(BLIP_EINTR, "%s: stopped", path);
  else {
    rc = run_job(d, w, path, o, mfd, info->size, rgb, meta);
    worker_give(d, w);
  }
  close(mfd);
  if (!rc && out) blip_img_normalize(rgb, o->size, out);
  free(own);
  return rc;
}

int blip_decode_peak(blip_decode *d) {
  pthread_mutex_lock(&d->mu);
  int n = d->peak_holders;
  pthread_mutex_unlock(&d->mu);
  return n;
}

int blip_decode_paths(const char *const *paths, int n, const blip_img_opts *o, float *out) {
  blip_decode_opts dopt;
  blip_decode_opts_default(&dopt);
  blip_decode *d = NULL;
  int rc = blip_decode_new(&dopt, &d);
  for (int i = 0; i < n && !rc; i++)
    rc = blip_decode_file(d, paths[i], o, out + (size_t)i * 3 * o->size * o->size, NULL, NULL, NULL);
  blip_decode_free(d);
  return rc;
}
