/* blip-index: build and keep up to date the BLIP index of a photo library.
 *
 * One run: walk the paths (hidden folders skipped, symlinked folders
 * followed once each by device/inode, so loops end), classify every image
 * against the index (unchanged by size+mtime, changed, new, moved = same
 * content fingerprint, XXH3-64 of every byte, at a new path whose old path
 * is gone; a changed file with the same fingerprint is only touched; a failed
 * image is retried when its failure may pass, else when its content changed),
 * apply moves and deletions (rows that could not be looked at go offline
 * instead: see "offline" below), then embed new and changed images with blip_index_embed()
 * (decoder thread + batched model + one commit per batch, rerank records
 * synced before the commit): a kill loses at most the batches in flight, and
 * the next run redoes only those. SIGINT/SIGTERM stop after the current batch.
 * --captions then captions every image without one (blip_capindex), also
 * one commit per batch.
 * Derived data repairs itself: token records the store lost (tokens.bin
 * deleted, truncated, damaged header) are recomputed, for those photos only,
 * and a damaged vectors.faiss is rewritten; --repair also reads every record,
 * compares every FAISS vector and rebuilds a damaged SQLite from its rows.
 * Exit: 0 done (failed images are reported, not fatal), 1 error, 2 usage,
 * 130 interrupted. */
#include <dirent.h>
#include <errno.h>
#include <fnmatch.h>
#include <getopt.h>
#include <limits.h>
#include <omp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <xxhash.h>

#include "blip_arg.h"
#include "blip_capindex.h"
#include "blip_decode.h"
#include "blip_err.h"
#include "blip_img.h"
#include "blip_index.h"
#include "blip_merge.h"
#include "blip_model.h"
#include "blip_out.h"
#include "blip_shard.h"
#include "blip_store.h"
#include "blip_tar.h"

static const char USAGE[] =
    "usage: blip-index [options] PATH...\n"
    "       blip-index merge --db OUT SHARD_DIR...\n"
    "Index every image under PATH... for blipsearch, or bring the index up to date.\n"
    "A PATH, or a file under one, may be a webdataset .tar shard (img2dataset): its images are\n"
    "indexed in place as TAR#MEMBER (e.g. /data/00000.tar#000000123.jpg), KEY.txt as their caption.\n"
    "\n"
    "  --db DIR           index directory (default $BLIPSEARCH_DB, else\n"
    "                     $XDG_DATA_HOME/blipsearch, else ~/.local/share/blipsearch)\n"
    "  --model DIR        BLIP model directory (default $BLIPSEARCH_MODEL)\n"
    "  --precision P      auto (default), f32, bf16 or int8; auto = the precision an existing\n"
    "                     index was built with, else bf16 where the CPU has native bf16 dot\n"
    "                     products (AVX512_BF16, AMX), else f32\n"
    "  --json             print a JSON summary on stdout\n"
    "  --dry-run          say what would change, change nothing\n"
    "  --errors           list the images that failed and the paths skipped, and why (path TAB\n"
    "                     reason; with --json, errors and skipped_paths arrays of {path, path_b64,\n"
    "                     error}: path_b64 is the exact name in base64 when it is not UTF-8, else null)\n"
    "  --rebuild          discard the index and build it again (e.g. for a new model)\n"
    "  --no-rerank-store  do not store vision tokens (saves disk; queries recompute them)\n"
    "  --rerank-f16       store vision tokens as f16 instead of int8 + scales\n"
    "  --rerank-store F   rerank record format of a new index: int8 (default, 445 KB/photo at\n"
    "                     base), f16 (886 KB, exact to 2e-4), int4 (249 KB), none (0: recompute)\n"
    "  --exclude GLOB     skip files and folders matching GLOB (path or name); repeatable\n"
    "  --threads N        decoding threads (1..4 per core; default: all cores)\n"
    "  --batch N          images per model batch and per commit (default 8)\n"
    "  --shard I/N        index only shard I of N (0-based) of the files: a stable partition by\n"
    "                     path below its root; default from SLURM_ARRAY_TASK_ID/_COUNT, or from\n"
    "                     JOB_COMPLETION_INDEX with --shard-count; each shard uses its own --db\n"
    "  --shard-count N    shard count for a Kubernetes Indexed Job (JOB_COMPLETION_INDEX)\n"
    "  --decode-timeout S seconds one image may take to decode before its decoder\n"
    "                     process is killed and the image recorded as failed (default 60)\n"
    "  --decode-memory MB memory one decoder process may add (default 4096)\n"
    "  --check            verify SQLite's integrity, every FAISS vector and every token record\n"
    "                     against SQLite, then exit (1 when something is damaged)\n"
    "  --repair           check as --check does and fix what is damaged: token records are\n"
    "                     recomputed for the damaged photos only, vectors.faiss is rebuilt,\n"
    "                     a damaged index.sqlite is rebuilt from its readable rows (PATH... optional)\n"
    "  --dump             print path, fingerprint, state and feature of every image, then exit\n"
    "  --captions         caption every image without a caption (searchable: blip-query --words)\n"
    "  --caption-model DIR  captioner, e.g. blip-image-captioning-base (default\n"
    "                     $BLIPSEARCH_CAPTION_MODEL); runs at --precision, generate() defaults\n"
    "  --recaption        redo all captions (needed after changing the captioner)\n"
    "  --prune-offline    delete the rows of photos that could not be looked at (unreadable\n"
    "                     folder, missing root, unmounted drive) instead of keeping them offline\n"
    "  --help             this text\n"
    "\n"
    "Paths in messages, --dry-run, --errors and --dump escape backslash, control bytes and\n"
    "invalid UTF-8 (\\\\, \\t, \\n, \\r, \\xNN), so a tab-separated row is always one row.\n"
    "\n"
    "merge: combine shard indexes into --db OUT (made anew): rows keep their paths under new ids,\n"
    "the FAISS index is built once, rerank records are linked from the shards, not copied.\n"
    "Exit status: 0 done, 1 error, 2 usage, 130 interrupted (committed work is kept).\n";

static volatile sig_atomic_t g_stop;
static void on_signal(int sig) { g_stop = sig; }

typedef struct {
  char *path;
  int root; /* index of the root it was found under */
  int64_t size, mtime_ns;
  int64_t replace; /* row superseded (changed file) */
  uint64_t fp;
  int has_fp;
  int tar;       /* a webdataset tar, expanded into its members before classifying */
  char *caption; /* a tar member's KEY.txt */
} item;

typedef struct {
  item *v;
  int64_t n, cap;
} items;

static int items_push(items *l, const char *path, int64_t size, int64_t mtime_ns) {
  if (l->n == l->cap) {
    int64_t cap = l->cap ? 2 * l->cap : 1024;
    item *v = realloc(l->v, (size_t)cap * sizeof *v);
    if (!v) return blip_err_set(BLIP_ENOMEM, "out of memory");
    l->v = v;
    l->cap = cap;
  }
  char *p = strdup(path);
  if (!p) return blip_err_set(BLIP_ENOMEM, "out of memory");
  l->v[l->n++] = (item){.path = p, .size = size, .mtime_ns = mtime_ns};
  return BLIP_OK;
}

static void items_free(items *l) {
  for (int64_t i = 0; i < l->n; i++) free(l->v[i].path), free(l->v[i].caption);
  free(l->v);
}

static int cmp_item(const void *a, const void *b) { return strcmp(((const item *)a)->path, ((const item *)b)->path); }

/* ---- walking ---- */

typedef struct {
  dev_t dev;
  ino_t ino;
} dirkey;

typedef struct {
  char **excl;
  int nexcl;
  dirkey *dirs; /* visited directories: a loop or a second link to one is skipped */
  int64_t ndirs, capdirs;
  items *out;
  items skipped, why; /* paths left out, and why (same order) */
  items pending; /* symlinked folders, walked after every real one */
  items unread;  /* folders (and entries) that could not be read: their rows go offline, not away */
  items mounts;  /* folders on another device than their parent (mount points); size = st_dev */
  int root;      /* the root being walked */
} walker;

static int is_image(const char *name) {
  static const char *const ext[] = {"jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "heic", "heif", "avif"};
  const char *dot = strrchr(name, '.');
  if (!dot) return 0;
  for (size_t i = 0; i < sizeof ext / sizeof ext[0]; i++)
    if (strcasecmp(dot + 1, ext[i]) == 0) return 1;
  return 0;
}

static int excluded(const walker *w, const char *path, const char *name) {
  for (int i = 0; i < w->nexcl; i++)
    if (fnmatch(w->excl[i], path, 0) == 0 || fnmatch(w->excl[i], name, 0) == 0) return 1;
  return 0;
}

/* Say and record that path is left out (--errors, --json list them). */
static int skip(walker *w, const char *path, const char *why) {
  fputs("blip-index: skipping ", stderr);
  blip_out_fesc(stderr, path);
  fputs(": ", stderr);
  blip_out_fesc(stderr, why); /* may quote the name too */
  fputc('\n', stderr);
  int rc = items_push(&w->skipped, path, 0, 0);
  return rc ? rc : items_push(&w->why, why, 0, 0);
}

static int visit_dir_once(walker *w, const struct stat *sb) {
  for (int64_t i = 0; i < w->ndirs; i++)
    if (w->dirs[i].dev == sb->st_dev && w->dirs[i].ino == sb->st_ino) return 0;
  if (w->ndirs == w->capdirs) {
    int64_t cap = w->capdirs ? 2 * w->capdirs : 256;
    dirkey *d = realloc(w->dirs, (size_t)cap * sizeof *d);
    if (!d) return -1;
    w->dirs = d;
    w->capdirs = cap;
  }
  w->dirs[w->ndirs++] = (dirkey){sb->st_dev, sb->st_ino};
  return 1;
}

static int walk(walker *w, const char *path, const struct stat *sb) {
  if (S_ISREG(sb->st_mode)) {
    int rc = items_push(w->out, path, sb->st_size, (int64_t)sb->st_mtim.tv_sec * 1000000000 + sb->st_mtim.tv_nsec);
    if (!rc) {
      w->out->v[w->out->n - 1].root = w->root;
      w->out->v[w->out->n - 1].tar = blip_tar_is_tar(path);
    }
    return rc;
  }
  if (!S_ISDIR(sb->st_mode)) return skip(w, path, "not a regular file or a folder"); /* FIFO, device, socket */
  int v = visit_dir_once(w, sb);
  if (v < 0) return blip_err_set(BLIP_ENOMEM, "out of memory");
  if (v == 0) return BLIP_OK;
  DIR *d = opendir(path);
  if (!d) {
    int rc0 = skip(w, path, strerror(errno));
    return rc0 ? rc0 : items_push(&w->unread, path, 0, 0);
  }
  int rc = BLIP_OK;
  struct dirent *e;
  char child[PATH_MAX];
  while (!rc && (errno = 0, e = readdir(d))) {
    if (e->d_name[0] == '.') continue; /* ".", "..", hidden files and folders */
    if (snprintf(child, sizeof child, "%s/%s", strcmp(path, "/") ? path : "", e->d_name) >= (int)sizeof child) {
      struct stat cs; /* too long for the system's calls by path: say so if it is a folder or an image */
      if (fstatat(dirfd(d), e->d_name, &cs, 0) == 0 && (S_ISDIR(cs.st_mode) || is_image(e->d_name))) {
        char *full = NULL;
        if (asprintf(&full, "%s/%s", path, e->d_name) < 0) rc = blip_err_set(BLIP_ENOMEM, "out of memory");
        else rc = skip(w, full, "path of 4096 bytes or more (PATH_MAX)");
        free(full);
      }
      continue;
    }
    if (excluded(w, child, e->d_name)) continue;
    struct stat cs, ls;
    if (stat(child, &cs) != 0 || lstat(child, &ls) != 0) { /* dangling link or vanished: gone; else unreadable */
      if (errno != ENOENT && errno != ENOTDIR) rc = items_push(&w->unread, child, 0, 0);
      continue;
    }
    if (!S_ISDIR(cs.st_mode) && !is_image(e->d_name) && !blip_tar_is_tar(e->d_name)) continue;
    if (S_ISDIR(cs.st_mode) && cs.st_dev != sb->st_dev && (rc = items_push(&w->mounts, child, (int64_t)cs.st_dev, 0)))
      break;
    /* a folder reached through a link is walked last, so that a file reachable
     * both ways is always recorded under the same (link-free) path */
    if (S_ISDIR(cs.st_mode) && S_ISLNK(ls.st_mode)) {
      if (!(rc = items_push(&w->pending, child, 0, 0))) w->pending.v[w->pending.n - 1].root = w->root;
    } else {
      rc = walk(w, child, &cs);
    }
  }
  if (!rc && !e && errno) { /* a read error part-way: what was not listed is not gone */
    fprintf(stderr, "blip-index: reading %s: %s\n", path, strerror(errno));
    rc = items_push(&w->unread, path, 0, 0);
  }
  closedir(d);
  return rc;
}

/* ---- webdataset tars ----
 * A .tar found by the walk stands for its image members, "TAR#MEMBER"
 * (blip_tar.h). A tar whose rows all record its current mtime is unchanged
 * and not opened. Else it is read once, start to end: each image member
 * becomes an item with its size, the tar's mtime and the XXH3-64 of its
 * bytes (so classifying compares content without reading it again), and
 * KEY.txt becomes the caption of the image KEY.EXT (webdataset's key: the
 * name up to the first '.' of its last component). A tar that cannot be read
 * to its end keeps the rows of what was not read offline, like an unreadable
 * folder. */

typedef struct {
  walker *w;
  items *out, caps; /* caps: path = KEY, caption = KEY.txt's text */
  const char *tar;
  int64_t mtime_ns;
} tar_ctx;

/* Length of member name's webdataset key. */
static size_t tar_key_len(const char *name) {
  const char *base = strrchr(name, '/'), *dot = strchr(base ? base + 1 : name, '.');
  return dot ? (size_t)(dot - name) : strlen(name);
}

static int tar_member(void *ctx, const char *name, const uint8_t *bytes, size_t n, int64_t mtime_ns) {
  (void)mtime_ns; /* rows record the tar's mtime: the version of the tar they were read from */
  tar_ctx *t = ctx;
  size_t k = tar_key_len(name);
  if (!strcasecmp(name + k, ".txt")) {
    char *key = strndup(name, k), *text = bytes ? strndup((const char *)bytes, n) : NULL;
    int rc = key && (text || !bytes) ? items_push(&t->caps, key, 0, 0) : blip_err_set(BLIP_ENOMEM, "out of memory");
    if (!rc) t->caps.v[t->caps.n - 1].caption = text, text = NULL;
    free(key);
    free(text);
    return rc;
  }
  if (!is_image(name)) return BLIP_OK; /* KEY.json and the rest */
  char *path = NULL;
  if (asprintf(&path, "%s#%s", t->tar, name) < 0) return blip_err_set(BLIP_ENOMEM, "out of memory");
  int rc = bytes ? items_push(t->out, path, (int64_t)n, t->mtime_ns) : skip(t->w, path, "too large");
  if (!rc && bytes) t->out->v[t->out->n - 1].fp = XXH3_64bits(bytes, n), t->out->v[t->out->n - 1].has_fp = 1;
  free(path);
  return rc;
}

/* Replace found->v[at], a tar, by its members (appended: sort after); *unchanged counts an unchanged tar's rows. */
static int expand_tar(walker *w, blip_store *st, items *found, int64_t at, items *absent, int64_t *unchanged) {
  const char *tar = found->v[at].path; /* stable: found->v may move, its strings do not */
  int64_t mtime_ns = found->v[at].mtime_ns, n = 0, first = found->n;
  int rc = st ? blip_store_scan_tar(st, tar, mtime_ns, &n) : BLIP_OK;
  if (rc || n) {
    *unchanged += n;
    return rc;
  }
  blip_img_opts dflt;
  blip_img_opts_default(&dflt);
  tar_ctx t = {w, found, {0}, tar, mtime_ns};
  if ((rc = blip_tar_each(tar, dflt.max_file_bytes, tar_member, &t)) && rc != BLIP_ENOMEM)
    if (!(rc = skip(w, tar, blip_err_last()))) rc = items_push(absent, tar, 0, 0);
  if (t.caps.n) qsort(t.caps.v, (size_t)t.caps.n, sizeof *t.caps.v, cmp_item);
  for (int64_t i = first; i < found->n && !rc && t.caps.n; i++) {
    const char *name = found->v[i].path + strlen(tar) + 1;
    item key = {0}, *c;
    if (!(key.path = strndup(name, tar_key_len(name)))) rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    else if ((c = bsearch(&key, t.caps.v, (size_t)t.caps.n, sizeof *c, cmp_item)) && c->caption)
      rc = (found->v[i].caption = strdup(c->caption)) ? BLIP_OK : blip_err_set(BLIP_ENOMEM, "out of memory");
    free(key.path);
  }
  items_free(&t.caps);
  return rc;
}

/* Store the captions of the members of the tars read in this run. */
static int store_tar_captions(blip_store *st, const items *found) {
  int64_t *ids = malloc((size_t)(found->n + 1) * sizeof *ids);
  const char **caps = malloc((size_t)(found->n + 1) * sizeof *caps);
  int rc = ids && caps ? BLIP_OK : blip_err_set(BLIP_ENOMEM, "out of memory"), n = 0;
  for (int64_t i = 0; i < found->n && !rc; i++) {
    const item *it = &found->v[i];
    blip_scan_kind kind;
    int64_t id = 0;
    if (it->caption && !(rc = blip_store_scan_file(st, it->path, it->size, it->mtime_ns, &kind, &id)) && id)
      ids[n] = id, caps[n++] = it->caption;
  }
  if (!rc && n) rc = blip_store_set_captions(st, ids, caps, n);
  free(ids);
  free(caps);
  return rc;
}

/* ---- offline: what a run cannot look at is kept, not deleted ----
 *
 * Rows under a folder that could not be read, under a root that is not
 * there, or under a drive that is not mounted go offline (kept, out of the
 * search set) instead of away. A drive is recognised by device: the store
 * records the st_dev of each root and of each mount point found under one
 * (a folder on another device than its parent); an unmounted drive's mount
 * point is then an empty folder on its parent's device, or a missing one. A
 * recorded folder whose device changed is taken for a remount under a new
 * device number when files already indexed are seen under it (its record is
 * updated), else for an absent drive. A root that is an empty folder is
 * taken for an empty mount point too. --prune-offline deletes instead. */

static int under(const char *path, const char *dir) {
  size_t n = strlen(dir);
  while (n > 1 && dir[n - 1] == '/') n--;
  if (n == 1 && dir[0] == '/') return 1;
  return strncmp(path, dir, n) == 0 && (path[n] == 0 || path[n] == '/' || path[n] == '#'); /* '#': tar members */
}

static int under_any(const items *dirs, const char *path) {
  for (int64_t i = 0; i < dirs->n; i++)
    if (under(path, dirs->v[i].path)) return 1;
  return 0;
}

/* A root that does not resolve, made absolute as given (malloc'd). */
static char *abs_path(const char *a) {
  char cwd[PATH_MAX], *p = malloc(PATH_MAX);
  if (p && a[0] != '/' && !getcwd(cwd, sizeof cwd)) cwd[0] = 0;
  if (p && snprintf(p, PATH_MAX, "%s%s%s", a[0] == '/' ? "" : cwd, a[0] == '/' ? "" : "/", a) >= PATH_MAX) {
    free(p);
    return NULL;
  }
  return p;
}

static int dir_empty(const char *path) {
  DIR *d = opendir(path);
  struct dirent *e;
  int empty = d != NULL;
  while (d && empty && (e = readdir(d))) empty = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..");
  if (d) closedir(d);
  return empty;
}

typedef struct {
  char **roots;
  int nroots;
  items *absent, *changed;
} mount_check;

static int check_mount(void *ctx, const char *path, int64_t dev) {
  mount_check *c = ctx;
  int in = 0;
  for (int i = 0; i < c->nroots && !in; i++) in = under(path, c->roots[i]);
  struct stat sb;
  if (!in) return 0;
  if (stat(path, &sb) != 0) return items_push(c->absent, path, 0, 0);
  return (int64_t)sb.st_dev == dev ? 0 : items_push(c->changed, path, dev, 0);
}

/* An indexed file was seen at path: a changed folder above it is the same drive (.replace counts them). */
static void note_indexed(items *changed, const char *path) {
  for (int64_t i = 0; i < changed->n; i++) changed->v[i].replace += under(path, changed->v[i].path);
}

/* Record the devices seen in this walk, except those of changed folders under which no indexed file was seen. */
static int record_mounts(blip_store *st, const items *mounts, const items *changed, int prune) {
  int rc = blip_store_begin(st);
  for (int64_t i = 0; i < mounts->n && !rc; i++) {
    int keep = 0;
    for (int64_t j = 0; j < changed->n && !prune; j++)
      keep |= !changed->v[j].replace && !strcmp(changed->v[j].path, mounts->v[i].path);
    if (!keep) rc = blip_store_mount_set(st, mounts->v[i].path, mounts->v[i].size);
  }
  if (rc) blip_store_rollback(st);
  return rc ? rc : blip_store_commit(st);
}

/* ---- output helpers ---- */

static void fmt_eta(double s, char *buf, size_t cap) {
  if (s < 0 || s > 1e7) snprintf(buf, cap, "--");
  else if (s < 3600) snprintf(buf, cap, "%dm%02ds", (int)s / 60, (int)s % 60);
  else snprintf(buf, cap, "%dh%02dm", (int)s / 3600, (int)s % 3600 / 60);
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

typedef struct {
  double t0;
  int shown;
} progress_ctx;

static void show_progress(void *ctx, int64_t done, int64_t total) {
  progress_ctx *p = ctx;
  double el = now_s() - p->t0, rate = el > 0 ? done / el : 0;
  char eta[32];
  fmt_eta(rate > 0 ? (total - done) / rate : -1, eta, sizeof eta);
  fprintf(stderr, "\r%lld/%lld images  %.1f images/s  ETA %s   ", (long long)done, (long long)total, rate, eta);
  p->shown = 1;
}

/* "VERB PATH[ -> PATH2]" on stdout (--dry-run), names escaped */
static void say_change(const char *verb, const char *a, const char *b) {
  printf("%s ", verb);
  blip_out_fesc(stdout, a);
  if (b) fputs(" -> ", stdout), blip_out_fesc(stdout, b);
  putchar('\n');
}

/* One --errors entry: {path, path_b64, error} into the JSON array a, else an escaped TSV row. */
static int error_entry(json_t *a, const char *path, const char *why) {
  if (!a) {
    blip_out_fesc(stdout, path);
    putchar('\t');
    blip_out_fesc(stdout, why);
    putchar('\n');
    return 0;
  }
  json_t *o = json_object();
  if (!o || blip_out_json_name(o, "path", path) || json_object_set_new(o, "error", blip_out_json_text(why)) ||
      json_array_append_new(a, o))
    return blip_err_set(BLIP_ENOMEM, "out of memory");
  return 0;
}

static int print_error_row(void *ctx, int64_t id, const blip_store_row *r, const float *feat) {
  return error_entry(ctx, r->path, r->error ? r->error : "");
}

typedef struct {
  int E;
} dump_ctx;

static int print_dump_row(void *ctx, int64_t id, const blip_store_row *r, const float *feat) {
  const dump_ctx *c = ctx;
  blip_out_fesc(stdout, r->path);
  printf("\t%016llx\t%s", (unsigned long long)r->fingerprint, feat ? "ok" : "error");
  for (int j = 0; feat && j < c->E; j++) printf("%c%.6f", j ? ',' : '\t', feat[j]);
  putchar('\n');
  return 0;
}

/* ---- check and repair ---- */

/* Print what --check found; the exit status: 0 sound, 1 damaged. */
static int print_check(blip_store *st, const blip_store_report *r, int json) {
  char msg[6][1200], path[PATH_MAX];
  int n = 0;
  if (r->sqlite[0])
    snprintf(msg[n++], sizeof msg[0], "index.sqlite is damaged: %s", r->sqlite);
  if (r->cache[0])
    snprintf(msg[n++], sizeof msg[0], "%s; queries search SQLite's vectors until it is rewritten", r->cache);
  if (r->cache_bad) {
    if (blip_store_get(st, r->cache_first, NULL, path, sizeof path)) snprintf(path, sizeof path, "image %lld", (long long)r->cache_first);
    snprintf(msg[n++], sizeof msg[0], "vectors.faiss: %lld vectors missing or differing from SQLite's (first: %s)",
             (long long)r->cache_bad, path);
  }
  if (r->tok_bad) {
    if (blip_store_get(st, r->tok_first, NULL, path, sizeof path)) snprintf(path, sizeof path, "image %lld", (long long)r->tok_first);
    snprintf(msg[n++], sizeof msg[0], "tokens.bin: %lld token records missing or damaged (first: %s: %s); queries "
             "recompute them from the files", (long long)r->tok_bad, path, r->tok_why);
  }
  if (r->rows_bad)
    snprintf(msg[n++], sizeof msg[0], "index.sqlite: %lld rows whose state and feature disagree", (long long)r->rows_bad);
  if (r->tok_header)
    snprintf(msg[n++], sizeof msg[0], "tokens.bin: damaged header (each record is still checked on its own)");
  if (json) {
    json_t *j = json_pack("{s:b,s:I,s:I,s:[]}", "ok", n == 0, "images", (json_int_t)r->images, "unchecksummed",
                          (json_int_t)r->tok_unsummed, "problems");
    for (int i = 0; j && i < n; i++) json_array_append_new(json_object_get(j, "problems"), blip_out_json_text(msg[i]));
    char *s = j ? json_dumps(j, 0) /* the separators --check always printed */ : NULL;
    if (s) printf("%s\n", s);
    free(s);
    json_decref(j);
  } else if (!n) {
    printf("ok: %lld searchable images, SQLite, FAISS and rerank store agree\n", (long long)r->images);
  }
  for (int i = 0; i < n; i++) blip_out_error("blip-index", msg[i]); /* they quote photo paths */
  if (n)
    fprintf(stderr, "blip-index: run blip-index --repair to fix it (model work only for photos whose token records "
                    "are lost)%s\n", r->sqlite[0] ? "; if index.sqlite cannot be repaired, restore it from a backup "
                    "or rebuild the index (--rebuild)" : "");
  if (r->tok_unsummed)
    fprintf(stderr, "blip-index: %lld token records have no checksum yet (made by an older version); the next "
                    "blip-index run adds them\n", (long long)r->tok_unsummed);
  return n ? 1 : 0;
}

/* At the start of a run: give records from before checksums theirs (once),
 * and with --repair first check everything and fix SQLite and the cache. The
 * lost records are marked; repair_tokens recomputes them. */
static int check_and_mark(blip_store *st, int repair) {
  blip_store_report r;
  int64_t marked = 0;
  int rc = BLIP_OK, full = 0, fixed = 0;
  if (repair) {
    if ((rc = blip_store_repair_db(st, &fixed))) return rc;
    if (fixed) fprintf(stderr, "blip-index: index.sqlite was damaged; rebuilt from its rows\n");
    if ((rc = blip_store_check(st, &r))) return rc;
    if ((r.cache[0] || r.cache_bad) && (rc = blip_store_rebuild_cache(st))) return rc;
    if (r.cache[0] || r.cache_bad) fprintf(stderr, "blip-index: vectors.faiss rebuilt from index.sqlite\n");
    full = r.tok_bad > 0;
  }
  return blip_store_tokens_scan(st, full, &marked);
}

/* mkdir -p for the parents of the index directory */
static void make_parents(const char *dir) {
  char p[PATH_MAX];
  snprintf(p, sizeof p, "%s", dir);
  for (char *s = p + 1; *s; s++)
    if (*s == '/') {
      *s = 0;
      mkdir(p, 0755);
      *s = '/';
    }
}

/* ---- main ---- */

typedef struct {
  int64_t added, updated, moved, deleted, unchanged, failed, offline, retried, embedded, repaired, unrepaired;
} counts;

/* blip-index merge --db OUT SHARD_DIR... */
static int merge_main(int argc, char **argv) {
  const char *out = NULL;
  int json = 0, first = 1;
  for (; first < argc && argv[first][0] == '-'; first++) {
    if (!strcmp(argv[first], "--db") && first + 1 < argc) out = argv[++first];
    else if (!strcmp(argv[first], "--json")) json = 1;
    else if (!strcmp(argv[first], "--help")) {
      fputs(USAGE, stdout);
      return 0;
    } else break;
  }
  if (!out || first >= argc) {
    fprintf(stderr, "usage: blip-index merge --db OUT SHARD_DIR...\n");
    return 2;
  }
  double t0 = now_s();
  blip_merge_stats ms;
  make_parents(out);
  if (blip_merge(out, (const char *const *)argv + first, argc - first, &ms)) {
    fprintf(stderr, "blip-index merge: %s\n", blip_err_last());
    return 1;
  }
  double dt = now_s() - t0;
  if (json)
    printf("{\"shards\": %d, \"rows\": %lld, \"searchable\": %lld, \"token_files_linked\": %d, "
           "\"token_files_copied\": %d, \"seconds\": %.3f}\n",
           argc - first, (long long)ms.rows, (long long)ms.searchable, ms.linked, ms.copied, dt);
  else
    fprintf(stderr, "merged %d shards: %lld rows (%lld searchable) in %.1f s; token files %d linked, %d copied\n",
            argc - first, (long long)ms.rows, (long long)ms.searchable, dt, ms.linked, ms.copied);
  return 0;
}

enum { OPT_DB = 256, OPT_MODEL, OPT_PREC, OPT_JSON, OPT_DRY, OPT_ERRORS, OPT_REBUILD, OPT_NORR, OPT_F16, OPT_EXCL,
       OPT_THREADS, OPT_BATCH, OPT_CHECK, OPT_DUMP, OPT_HELP, OPT_PRUNE, OPT_DTIME, OPT_DMEM, OPT_REPAIR,
       OPT_SHARD, OPT_SHARD_COUNT, OPT_RSTORE };
enum { OPT_CAPTIONS = 512, OPT_CAPMODEL, OPT_RECAPTION };

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "merge")) return merge_main(argc - 1, argv + 1);
  static const struct option lopts[] = {
      {"shard", 1, 0, OPT_SHARD},    {"shard-count", 1, 0, OPT_SHARD_COUNT}, {"rerank-store", 1, 0, OPT_RSTORE},
      {"db", 1, 0, OPT_DB},          {"model", 1, 0, OPT_MODEL},     {"precision", 1, 0, OPT_PREC},
      {"json", 0, 0, OPT_JSON},      {"dry-run", 0, 0, OPT_DRY},     {"errors", 0, 0, OPT_ERRORS},
      {"rebuild", 0, 0, OPT_REBUILD}, {"no-rerank-store", 0, 0, OPT_NORR}, {"rerank-f16", 0, 0, OPT_F16},
      {"exclude", 1, 0, OPT_EXCL},   {"threads", 1, 0, OPT_THREADS}, {"batch", 1, 0, OPT_BATCH},
      {"check", 0, 0, OPT_CHECK},    {"dump", 0, 0, OPT_DUMP},       {"help", 0, 0, OPT_HELP},
      {"prune-offline", 0, 0, OPT_PRUNE}, {"decode-timeout", 1, 0, OPT_DTIME}, {"decode-memory", 1, 0, OPT_DMEM},
      {"captions", 0, 0, OPT_CAPTIONS}, {"caption-model", 1, 0, OPT_CAPMODEL}, {"recaption", 0, 0, OPT_RECAPTION},
      {"repair", 0, 0, OPT_REPAIR}, {0, 0, 0, 0}};
  const char *cap_dir = getenv("BLIPSEARCH_CAPTION_MODEL");
  int captions = 0, recaption = 0;
  int64_t captioned = 0, cap_failed = 0;
  blip_model *capm = NULL;
  char dbdir[PATH_MAX] = "";
  const char *model_dir = getenv("BLIPSEARCH_MODEL"), *prec_name = "auto";
  int json = 0, dry = 0, errors = 0, rebuild = 0, norr = 0, f16 = 0, threads = omp_get_num_procs(), B = 8;
  int check = 0, dump = 0, prune = 0, repair = 0, c, shard_count = 0, rstore = -1;
  double decode_s = 60, decode_mb = 4096;
  signal(SIGXFSZ, SIG_IGN); /* first: a file-size limit fails the write (EFBIG, reported) instead of killing us */
  const char *shard_spec = NULL;
  blip_shard shard;
  char **excl = calloc((size_t)argc + 1, sizeof *excl);
  int nexcl = 0;
  if (!excl) return 1;
  while ((c = getopt_long(argc, argv, "", lopts, NULL)) != -1) {
    switch (c) {
    case OPT_DB: snprintf(dbdir, sizeof dbdir, "%s", optarg); break;
    case OPT_MODEL: model_dir = optarg; break;
    case OPT_PREC: prec_name = optarg; break;
    case OPT_JSON: json = 1; break;
    case OPT_DRY: dry = 1; break;
    case OPT_ERRORS: errors = 1; break;
    case OPT_REBUILD: rebuild = 1; break;
    case OPT_NORR: norr = 1; break;
    case OPT_F16: f16 = 1; break;
    case OPT_EXCL: excl[nexcl++] = optarg; break;
    case OPT_THREADS:
    case OPT_BATCH:
      if (c == OPT_THREADS ? blip_arg_threads("--threads", optarg, &threads)
                           : blip_arg_int("--batch", optarg, 1, 256, &B)) {
        blip_out_error("blip-index", blip_err_last());
        free(excl);
        return 2;
      }
      break;
    case OPT_CHECK: check = 1; break;
    case OPT_DUMP: dump = 1; break;
    case OPT_CAPTIONS: captions = 1; break;
    case OPT_CAPMODEL: cap_dir = optarg; break;
    case OPT_RECAPTION: recaption = captions = 1; break;
    case OPT_PRUNE: prune = 1; break;
    case OPT_SHARD: shard_spec = optarg; break;
    case OPT_RSTORE:
      if ((rstore = blip_tokstore_parse_fmt(optarg)) < 0) {
        fprintf(stderr, "blip-index: --rerank-store takes int8, f16, int4 or none\n");
        free(excl);
        return 2;
      }
      break;
    case OPT_DTIME:
    case OPT_DMEM:
      if (c == OPT_DTIME ? blip_arg_real("--decode-timeout", optarg, 0.001, 86400, &decode_s)
                         : blip_arg_real("--decode-memory", optarg, 64, 1 << 24, &decode_mb)) {
        blip_out_error("blip-index", blip_err_last());
        free(excl);
        return 2;
      }
      break;
    case OPT_SHARD_COUNT: shard_count = (int)blip_arg_must("blip-index", "--shard-count", optarg, 1, 1000000); break;
    case OPT_REPAIR: repair = 1; break;
    case OPT_HELP: fputs(USAGE, stdout); free(excl); return 0;
    default: fputs(USAGE, stderr); free(excl); return 2;
    }
  }
  if (rstore == BLIP_TOKENS_NONE) norr = 1;
  int ret = 1;
  blip_model *model = NULL;
  blip_store *st = NULL;
  items found = {0}, work = {0};
  char **roots = NULL;
  int *missing = NULL;
  int64_t *gone = NULL, ngone = 0, *off = NULL, noff = 0;
  items absent = {0}, mounts = {0}, changed = {0}; /* see "offline" above */
  counts cn = {0};
  walker w = {0};
  int flushing = 0;
  double t0 = now_s();

  if (!dbdir[0] && blip_store_default_dir(dbdir, sizeof dbdir) != 0) {
    blip_out_error("blip-index", blip_err_last());
    ret = 2;
    goto out;
  }
  if (blip_shard_resolve(shard_spec, shard_count, &shard)) {
    blip_out_error("blip-index", blip_err_last());
    ret = 2;
    goto out;
  }
  if (shard.count > 1) fprintf(stderr, "blip-index: shard %d/%d (from %s)\n", shard.index, shard.count, shard.source);

  if (check || dump) { /* maintenance: read-only, no model */
    blip_store_opts ro = {0};
    int rc = blip_store_open(dbdir, NULL, &ro, &st);
    if (!rc && check) {
      blip_store_report rep;
      if ((rc = blip_store_check(st, &rep)) == BLIP_OK) {
        ret = print_check(st, &rep, json);
        goto out;
      }
    }
    if (!rc && dump) {
      dump_ctx dc = {atoi(blip_store_meta(st, "embed_dim"))};
      rc = blip_store_each(st, 0, print_dump_row, &dc);
    }
    if (rc) {
      blip_out_error("blip-index", blip_err_last());
      goto out;
    }
    ret = 0;
    goto out;
  }

  if ((optind >= argc && !repair) || (repair && dry)) {
    fputs(USAGE, stderr);
    ret = 2;
    goto out;
  }
  if (!model_dir) {
    fprintf(stderr, "blip-index: no model: pass --model DIR or set BLIPSEARCH_MODEL\n");
    ret = 2;
    goto out;
  }
  blip_model_opts mo = {BLIP_PREC_F32, NULL};
  if (!strcmp(prec_name, "auto") && !rebuild) { /* an existing index keeps its precision */
    blip_store_opts ro = {0};
    blip_store *old = NULL;
    if (blip_store_open(dbdir, NULL, &ro, &old) == BLIP_OK) {
      const char *p = blip_store_meta(old, "precision");
      if (p && !blip_model_parse_precision(p, &mo.precision)) prec_name = blip_model_precision_name(mo.precision);
      blip_store_close(old);
    }
  }
  if (blip_model_parse_precision(prec_name, &mo.precision)) {
    blip_out_error("blip-index", blip_err_last());
    ret = 2;
    goto out;
  }
  prec_name = blip_model_precision_name(mo.precision); /* the index records what auto chose */

  /* roots, canonical so that stored paths are stable whatever the cwd; a
   * root that is not there (an unmounted drive) keeps its rows offline if the
   * index has any under it, else it is an error */
  int nroots = argc - optind;
  if (!(roots = calloc((size_t)nroots + 1, sizeof *roots)) || !(missing = calloc((size_t)nroots + 1, sizeof *missing)))
    goto oom; /* (+1: --repair may name no path) */
  for (int i = 0; i < nroots; i++) {
    const char *a = argv[optind + i];
    if ((roots[i] = realpath(a, NULL))) continue;
    missing[i] = errno;
    if ((errno != ENOENT && errno != ENOTDIR && errno != EACCES) || !(roots[i] = abs_path(a))) {
      blip_err_set(BLIP_EIO, "%s: %s", a, strerror(missing[i]));
      blip_out_error("blip-index", blip_err_last());
      goto out;
    }
  }

  if (blip_img_init() || blip_model_load(model_dir, &mo, &model)) {
    blip_out_error("blip-index", blip_err_last());
    goto out;
  }
  if (captions && !dry) { /* before any work, so that a wrong captioner costs nothing */
    if (!cap_dir) {
      fprintf(stderr, "blip-index: --captions needs --caption-model DIR or BLIPSEARCH_CAPTION_MODEL\n");
      ret = 2;
      goto out;
    }
    if (blip_model_load(cap_dir, &mo, &capm) ||
        (!blip_model_cfg(capm)->captioner && blip_err_set(BLIP_EINVAL, "%s is not a captioning model", cap_dir))) {
      fprintf(stderr, "blip-index: caption model: %s\n", blip_err_last());
      goto out;
    }
  }
  const blip_cfg *cfg = blip_model_cfg(model);
  char prep[96];
  snprintf(prep, sizeof prep, "size=%d,autorotate=1,exact", cfg->image_size);
  blip_store_identity id = {blip_model_fingerprint(model), prec_name, prep, cfg->embed_dim, cfg->v_tokens,
                            cfg->v_hidden};
  blip_store_opts so = {.write = !dry, .rebuild = rebuild && !dry,
                        .tokens = rstore >= 0 ? (blip_tokens_fmt)rstore
                                  : norr      ? BLIP_TOKENS_NONE
                                  : f16       ? BLIP_TOKENS_F16
                                              : BLIP_TOKENS_I8};
  if (!dry) make_parents(dbdir);
  int rc = blip_store_open(dbdir, &id, &so, &st);
  if (rc == BLIP_ENOTFOUND && dry) rc = BLIP_OK; /* no index yet: everything is new */
  if (rc == BLIP_OK && dry && rebuild && st) {  /* a rebuild would start from nothing */
    blip_store_close(st);
    st = NULL;
  }
  if (rc) {
    blip_out_error("blip-index", blip_err_last());
    goto out;
  }

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  if (st && !dry && (rc = check_and_mark(st, repair))) goto fail;

  for (int i = 0; i < nroots && !rc; i++) {
    if (!missing[i]) continue;
    int64_t *rows = NULL, nu = 0;
    if (st && (rc = blip_store_scan_unseen(st, (const char *const *)&roots[i], 1, &rows, &nu))) goto fail;
    free(rows);
    if (!nu) {
      fprintf(stderr, "blip-index: %s: %s\n", argv[optind + i], strerror(missing[i]));
      goto out;
    }
    fprintf(stderr, "blip-index: %s: %s (drive not mounted?): its %lld photos are %s\n", roots[i],
            strerror(missing[i]), (long long)nu, prune ? "deleted (--prune-offline)" : "kept offline");
    if ((rc = items_push(&absent, roots[i], 0, 0))) goto fail;
  }

  /* walk */
  w.excl = excl;
  w.nexcl = nexcl;
  w.out = &found;
  for (int i = 0; i < nroots && !rc; i++) {
    struct stat sb;
    if (missing[i]) continue;
    w.root = i;
    if (stat(roots[i], &sb) != 0) rc = skip(&w, roots[i], strerror(errno));
    else if (S_ISREG(sb.st_mode) && !is_image(roots[i]) && !blip_tar_is_tar(roots[i]))
      rc = skip(&w, roots[i], "not an image or a .tar (by its extension)");
    else if (S_ISDIR(sb.st_mode) && (rc = items_push(&w.mounts, roots[i], (int64_t)sb.st_dev, 0))) break;
    else if (S_ISDIR(sb.st_mode) && dir_empty(roots[i]) && (rc = items_push(&w.unread, roots[i], 0, 0))) break;
    else rc = walk(&w, roots[i], &sb);
  }
  for (int64_t i = 0; i < w.pending.n && !rc; i++) { /* grows while walked: breadth-first over links */
    struct stat sb;
    w.root = w.pending.v[i].root;
    if (stat(w.pending.v[i].path, &sb) == 0) rc = walk(&w, w.pending.v[i].path, &sb);
  }
  for (int64_t i = 0; i < w.unread.n && !rc; i++) rc = items_push(&absent, w.unread.v[i].path, 0, 0);
  items_free(&w.unread);
  mounts = w.mounts;
  memset(&w.mounts, 0, sizeof w.mounts);
  mount_check mc = {roots, nroots, &absent, &changed};
  if (!rc && st) rc = blip_store_mounts(st, check_mount, &mc);
  if (shard.count > 1) { /* keep this shard's files: keyed by the path below its root, so that
                          * every node agrees whatever the mount point */
    int64_t kept = 0;
    for (int64_t i = 0; i < found.n; i++) {
      const char *r = roots[found.v[i].root], *rel = found.v[i].path + strlen(r);
      while (*rel == '/') rel++;
      if (!*rel) rel = found.v[i].path; /* a file given as a root */
      if (blip_shard_owns(&shard, rel, strlen(rel))) found.v[kept++] = found.v[i];
      else free(found.v[i].path);
    }
    found.n = kept;
  }
  if (rc) {
    blip_out_error("blip-index", blip_err_last());
    goto out;
  }
  if (found.n) qsort(found.v, (size_t)found.n, sizeof *found.v, cmp_item); /* (NULL when nothing was found) */

  /* classify; moves and touches go in one transaction */
  if (st && (rc = blip_store_scan_begin(st))) goto fail;
  for (int64_t i = 0, n = found.n; i < n && !rc && !g_stop; i++)
    if (found.v[i].tar) rc = expand_tar(&w, st, &found, i, &absent, &cn.unchanged);
  if (rc) goto fail;
  if (found.n) qsort(found.v, (size_t)found.n, sizeof *found.v, cmp_item);
  if (st && !dry && (rc = blip_store_begin(st))) goto fail;
  for (int64_t i = 0; i < found.n && !g_stop; i++) {
    item *it = &found.v[i];
    blip_scan_kind kind = BLIP_SCAN_NEW;
    if (it->tar || (i && !strcmp(it->path, found.v[i - 1].path))) continue; /* a tar stands for its members; a
                                                                                * name twice in a tar is one photo */
    int64_t rid = 0, src = 0;
    if (st && (rc = blip_store_scan_file(st, it->path, it->size, it->mtime_ns, &kind, &rid))) break;
    if (kind != BLIP_SCAN_NEW) note_indexed(&changed, it->path);
    if (kind == BLIP_SCAN_UNCHANGED) {
      cn.unchanged++;
      continue;
    }
    /* a new file needs its fingerprint now only if it could be a move */
    if (!it->has_fp && kind != BLIP_SCAN_RETRY &&
        (kind == BLIP_SCAN_CHANGED || (st && blip_store_size_known(st, it->size)))) {
      blip_decode_info fi;
      blip_img_opts dflt;
      blip_img_opts_default(&dflt);
      if (blip_decode_fingerprint(it->path, dflt.max_file_bytes, &fi) != BLIP_OK) { /* vanished or unreadable */
        if ((rc = skip(&w, it->path, blip_err_last()))) break;
        continue;
      }
      it->fp = fi.fingerprint; /* of every byte: an edit anywhere is a change */
      it->size = fi.size;
      it->has_fp = 1;
    }
    if (kind == BLIP_SCAN_RETRY) { /* failed for a reason that may have passed: decode again */
      it->replace = rid;
      cn.retried++;
      if (dry) printf("retry %s\n", it->path);
    } else if (kind == BLIP_SCAN_CHANGED) {
      uint64_t old = 0;
      if ((rc = blip_store_row_fingerprint(st, rid, &old))) break;
      if (old == it->fp) { /* touched, same content */
        if (!dry && (rc = blip_store_touch(st, rid, it->size, it->mtime_ns))) break;
        cn.unchanged++;
        continue;
      }
      it->replace = rid;
      if (dry) say_change("update", it->path, NULL);
    } else if (it->has_fp && (rc = blip_store_find_moved(st, it->fp, it->size, &src)) == BLIP_OK && src) {
      if (dry) {
        char old[PATH_MAX];
        blip_store_get(st, src, NULL, old, sizeof old);
        say_change("move", old, it->path);
      } else if ((rc = blip_store_move(st, src, it->path, it->mtime_ns))) {
        break;
      }
      cn.moved++;
      continue;
    } else if (rc) {
      break;
    } else if (dry) {
      say_change("add", it->path, NULL);
    }
    if ((rc = items_push(&work, it->path, it->size, it->mtime_ns))) break;
    work.v[work.n - 1].replace = it->replace;
    work.v[work.n - 1].fp = it->fp;
    work.v[work.n - 1].has_fp = it->has_fp;
  }
  if (st && !dry) {
    if (rc || g_stop) blip_store_rollback(st);
    else if ((rc = blip_store_commit(st))) goto fail;
  }
  if (rc) goto fail;
  if (g_stop) goto interrupted;

  /* rows under the roots that no file claimed: deleted, or kept offline when
   * what held them could not be looked at */
  if (st && (rc = blip_store_scan_unseen(st, (const char *const *)roots, nroots, &gone, &ngone))) goto fail;
  for (int64_t i = 0; i < changed.n && !rc; i++)
    if (!changed.v[i].replace) {
      fprintf(stderr, "blip-index: %s is on another device than when indexed (drive not mounted?)\n",
              changed.v[i].path);
      rc = items_push(&absent, changed.v[i].path, 0, 0);
    }
  if (rc) goto fail;
  if (ngone && !(off = malloc((size_t)ngone * sizeof *off))) goto oom;
  int64_t kept = 0;
  for (int64_t i = 0; i < ngone; i++) {
    char p[PATH_MAX];
    if (!prune && absent.n && blip_store_get(st, gone[i], NULL, p, sizeof p) == BLIP_OK && under_any(&absent, p)) {
      if (dry) printf("offline %s\n", p);
      off[noff++] = gone[i];
    } else {
      gone[kept++] = gone[i];
    }
  }
  ngone = kept;
  cn.deleted = ngone;
  if (dry) {
    for (int64_t i = 0; i < ngone; i++) {
      char p[PATH_MAX];
      if (blip_store_get(st, gone[i], NULL, p, sizeof p) == BLIP_OK) say_change("delete", p, NULL);
    }
    for (int64_t i = 0; i < work.n; i++) *(work.v[i].replace ? &cn.updated : &cn.added) += 1;
    ret = 0;
    goto summary;
  }
  if ((rc = blip_store_scan_offline(st, off, noff)) || (rc = blip_store_delete(st, gone, ngone)) ||
      (rc = record_mounts(st, &mounts, &changed, prune)))
    goto fail;

  /* embed */
  blip_index_item *wi = calloc((size_t)work.n + 1, sizeof *wi);
  if (!wi) goto oom;
  for (int64_t i = 0; i < work.n; i++)
    wi[i] = (blip_index_item){work.v[i].path, work.v[i].size, work.v[i].mtime_ns, work.v[i].fp, work.v[i].has_fp,
                              work.v[i].replace};
  progress_ctx pc = {now_s(), 0};
  char journal[PATH_MAX + 16];
  snprintf(journal, sizeof journal, "%s/decoding", dbdir);
  blip_index_opts io = {B, threads, !norr, 300, &g_stop, isatty(2) ? show_progress : NULL, &pc, decode_s,
                        (int64_t)(decode_mb * (1 << 20)), journal, 0};
  blip_index_counts ic = {0};
  rc = blip_index_embed(model, st, wi, work.n, &io, &ic);
  free(wi);
  if (rc == BLIP_OK && !g_stop && !norr) rc = blip_index_repair_tokens(model, st, &io, &ic);
  if (pc.shown) fputc('\n', stderr);
  cn.added = ic.added;
  cn.updated = ic.updated;
  cn.embedded = ic.embedded;
  cn.repaired = ic.repaired;
  cn.unrepaired = ic.unrepaired;
  if (rc == BLIP_EINTR || (rc == BLIP_OK && g_stop)) goto interrupted;
  if (rc) goto fail;
  if ((rc = store_tar_captions(st, &found))) goto fail;
  flushing = 1; /* every batch is committed: only the derived cache is left to write */
  if ((rc = blip_store_flush(st))) goto fail;
  if (capm) {
    char cid[64];
    blip_cap_opts gen;
    blip_cap_defaults(capm, &gen);
    blip_capindex_identity(capm, cid, sizeof cid);
    progress_ctx cp = {now_s(), 0};
    blip_capindex_opts co = {B, threads, &g_stop, isatty(2) ? show_progress : NULL, &cp};
    if (!(rc = blip_store_caption_identity(st, cid, recaption))) rc = blip_capindex_run(capm, st, &gen, &co, &captioned, &cap_failed);
    if (cp.shown) fputc('\n', stderr);
    if (rc == BLIP_EINTR || (rc == BLIP_OK && g_stop)) goto interrupted;
    if (rc) goto fail;
  }
  ret = 0;
  goto summary;

interrupted:
  if (st && !dry) blip_store_flush(st);
  fprintf(stderr, "blip-index: interrupted; committed work is kept, run again to finish\n");
  ret = 130;
summary:;
  json_t *jerr = json && errors ? json_array() : NULL, *jskip = json && errors ? json_array() : NULL;
  if (errors && st) blip_store_each(st, 1, print_error_row, jerr);
  for (int64_t i = 0; errors && i < w.skipped.n; i++) error_entry(jskip, w.skipped.v[i].path, w.why.v[i].path);
  if (st) blip_store_tally(st, &cn.failed, &cn.offline); /* failed and offline: the whole index, not this run */
  if (st && !dry && (blip_store_damage(st) & BLIP_DAMAGE_CACHE))
    fprintf(stderr, "blip-index: vectors.faiss was damaged; rewritten from index.sqlite\n");
  if (cn.repaired) fprintf(stderr, "blip-index: tokens.bin: %lld lost or damaged records recomputed\n", (long long)cn.repaired);
  if (cn.unrepaired)
    fprintf(stderr, "blip-index: %lld token records could not be recomputed (file unreadable or changed); queries "
                    "read those photos' files\n", (long long)cn.unrepaired);
  if (json) {
    json_t *j = json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:f,s:b,s:b}", "added", (json_int_t)cn.added,
                          "updated", (json_int_t)cn.updated, "moved", (json_int_t)cn.moved, "deleted",
                          (json_int_t)cn.deleted, "unchanged", (json_int_t)cn.unchanged, "failed", (json_int_t)cn.failed,
                          "retried", (json_int_t)cn.retried, "offline", (json_int_t)cn.offline, "skipped",
                          (json_int_t)w.skipped.n, "embedded", (json_int_t)cn.embedded, "repaired", (json_int_t)cn.repaired,
                          "seconds", now_s() - t0, "dry_run", dry, "interrupted", ret == 130);
    if (j && jerr) json_object_set_new(j, "errors", jerr), jerr = NULL;
    if (j && jskip) json_object_set_new(j, "skipped_paths", jskip), jskip = NULL;
    json_decref(jerr);
    json_decref(jskip);
    if (j && captions)
      json_object_update_new(j, json_pack("{s:I,s:I}", "captioned", (json_int_t)captioned, "caption_failed", (json_int_t)cap_failed));
    char *s = j ? json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    if (s) printf("%s\n", s);
    free(s);
    json_decref(j);
  } else {
    fprintf(stderr,
            "%s%lld added, %lld updated, %lld moved, %lld deleted, %lld unchanged, %lld skipped in %.1f s; index: "
            "%lld failed, %lld offline\n",
            dry ? "dry run: " : "", (long long)cn.added, (long long)cn.updated, (long long)cn.moved,
            (long long)cn.deleted, (long long)cn.unchanged, (long long)w.skipped.n, now_s() - t0, (long long)cn.failed,
            (long long)cn.offline);
    if (cn.offline)
      fprintf(stderr, "blip-index: offline photos could not be looked at (unreadable folder, missing root, drive not "
                      "mounted): they are kept out of results until seen again; --prune-offline deletes them\n");
    if (captions && !dry)
      fprintf(stderr, "%lld captioned, %lld could not be read for captions\n", (long long)captioned, (long long)cap_failed);
  }
  goto out;
oom:
  blip_err_set(BLIP_ENOMEM, "out of memory");
fail:
  blip_out_error("blip-index", blip_err_last());
  if (flushing)
    fprintf(stderr, "blip-index: every batch is committed to index.sqlite; only its cache vectors.faiss could not be "
                    "written: the next run writes it again, and queries meanwhile rebuild it in memory from index.sqlite\n");
  else if (rc == BLIP_EFULL)
    fprintf(stderr, "blip-index: the index is consistent: committed work is kept and the change in progress was "
                    "rolled back; free some space (or raise the file size limit) and run again to continue\n");
  ret = 1;
out:
  free(w.dirs);
  items_free(&w.pending);
  items_free(&w.skipped);
  items_free(&w.why);
  blip_store_close(st);
  blip_model_free(model);
  blip_model_free(capm);
  free(gone);
  free(off);
  free(missing);
  items_free(&absent);
  items_free(&mounts);
  items_free(&changed);
  items_free(&found);
  items_free(&work);
  if (roots)
    for (int i = 0; i < argc - optind; i++) free(roots[i]);
  free(roots);
  free(excl);
  return ret;
}
