/* blip_index: see blip_index.h.
 *
 * Design note. Two batch slots alternate between the decoder thread and the
 * caller's thread (which runs the model and commits). A slot is owned by the
 * decoder while !ready and by the model side while ready; the mutex only
 * guards the flags. The model's OpenMP threads and the decoder's team run at
 * the same time: decoding is ~1-10% of inference per image at BLIP-base
 * geometry, so the overlap hides it instead of adding it. Stop requests are
 * checked between batches only, so a batch is either committed whole or not
 * at all (blip_store_put is one transaction). */
#include "blip_index.h"

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
#include "blip_img.h"

enum { MAXB = 256 };

typedef struct {
  int n;
  const blip_index_item *it[MAXB];
  float *pix; /* [n,3,S,S] */
  blip_img_meta meta[MAXB];
  uint64_t fp[MAXB];
  char err[MAXB][256]; /* "" = decoded */
  int retry[MAXB];     /* with err: a failure that may pass (retried on the next run) */
  int ready;
} slot;

typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  slot s[2];
  const blip_index_item *items;
  int64_t n, next;
  int B, S, threads;
  int done, quit;
  volatile sig_atomic_t *stop;
} pipeline;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int stopping(const pipeline *p) { return p->quit || (p->stop && *p->stop); }

/* Whether a failure may pass by the next run: the file could not be read
 * (permission, vanished, I/O error), the decoder ran out of time or memory,
 * or the file changed while it was read (e.g. a truncated copy being
 * restored). Decoders report a failed read as a corrupt file, so a file
 * called corrupt is read through once more. */
static int transient(int rc, const blip_index_item *it) {
  if (rc == BLIP_EIO || rc == BLIP_EINTR || rc == BLIP_ENOMEM) return 1;
  struct stat sb;
  int fd = open(it->path, O_RDONLY | O_CLOEXEC);
  if (fd < 0 || fstat(fd, &sb) != 0) {
    if (fd >= 0) close(fd);
    return 1;
  }
  int passes = sb.st_size != it->size || /* changed since the walk */
               (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec != it->mtime_ns;
  char buf[1 << 16];
  ssize_t n;
  while (!passes && (n = read(fd, buf, sizeof buf)) != 0)
    if (n < 0 && errno != EINTR) passes = 1; /* an I/O error */
  close(fd);
  return passes;
}

static void decode(pipeline *p, slot *b) {
  blip_img_opts o;
  blip_img_opts_default(&o);
  o.size = p->S;
  o.autorotate = 1;
  o.shrink_on_load = 0;
  size_t per = (size_t)3 * p->S * p->S;
#pragma omp parallel for num_threads(p->threads) schedule(dynamic, 1)
  for (int i = 0; i < b->n; i++) {
    memset(&b->meta[i], 0, sizeof b->meta[i]);
    const blip_index_item *it = b->it[i];
    int rc = blip_img_load_file(it->path, &o, b->pix + i * per, NULL, &b->meta[i]);
    b->fp[i] = it->fingerprint;
    if (!it->has_fingerprint && blip_store_fingerprint_file(it->path, it->size, &b->fp[i]) && !rc) rc = BLIP_EIO;
    if (rc) snprintf(b->err[i], sizeof b->err[i], "%s", blip_err_last()[0] ? blip_err_last() : blip_err_name(rc));
    else b->err[i][0] = 0;
    b->retry[i] = rc && transient(rc, it);
  }
}

static void *decoder(void *arg) {
  pipeline *p = arg;
  for (int k = 0;; k ^= 1) {
    slot *b = &p->s[k];
    pthread_mutex_lock(&p->mu);
    while (b->ready && !stopping(p)) pthread_cond_wait(&p->cv, &p->mu);
    if (stopping(p) || p->next >= p->n) {
      p->done = 1;
      pthread_cond_broadcast(&p->cv);
      pthread_mutex_unlock(&p->mu);
      return NULL;
    }
    int64_t start = p->next;
    b->n = (int)(p->n - start < p->B ? p->n - start : p->B);
    p->next += b->n;
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < b->n; i++) b->it[i] = &p->items[start + i];
    decode(p, b);
    pthread_mutex_lock(&p->mu);
    b->ready = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
  }
}

/* Model + commit for one decoded batch. */
static int run_batch(blip_model *m, blip_store *st, slot *b, int S, int tokens, float *feats, float *embeds,
                     blip_index_counts *c) {
  blip_store_row rows[MAXB];
  int64_t rep[MAXB];
  int nok = 0, r = 0, rc;
  size_t per = (size_t)3 * S * S;
  /* pack the decoded images to the front; failures become error rows after them */
  for (int i = 0; i < b->n; i++)
    if (!b->err[i][0]) {
      if (nok != i) memmove(b->pix + nok * per, b->pix + i * per, per * sizeof(float));
      nok++;
    }
  if (nok && (rc = blip_model_vision(m, b->pix, nok, tokens ? embeds : NULL, feats))) return rc;
  for (int pass = 0; pass < 2; pass++)
    for (int i = 0; i < b->n; i++) {
      if ((pass == 0) != (b->err[i][0] == 0)) continue;
      const blip_index_item *it = b->it[i];
      rows[r] = (blip_store_row){it->path, it->size, it->mtime_ns, b->fp[i], b->meta[i].width,
                                 b->meta[i].height, b->meta[i].orientation, b->meta[i].taken_at,
                                 pass ? b->err[i] : NULL, pass && b->retry[i], 0};
      rep[r++] = it->replace;
    }
  if ((rc = blip_store_put(st, rows, rep, b->n, feats, tokens ? embeds : NULL, NULL))) return rc;
  for (int i = 0; i < b->n; i++) {
    if (b->err[i][0]) c->failed++;
    else if (b->it[i]->replace) c->updated++;
    else c->added++;
  }
  return BLIP_OK;
}

int blip_index_embed(blip_model *m, blip_store *st, const blip_index_item *items, int64_t n,
                     const blip_index_opts *opts, blip_index_counts *counts) {
  if (n <= 0) return BLIP_OK;
  const blip_cfg *cfg = blip_model_cfg(m);
  int B = opts->batch, S = cfg->image_size, rc = BLIP_OK, started = 0;
  if (B < 1 || B > MAXB || opts->threads < 1) return blip_err_set(BLIP_EINVAL, "batch must be 1..%d, threads >= 1", MAXB);
  int tokens = opts->tokens && blip_store_tokens_fmt(st) != BLIP_TOKENS_NONE;
  pipeline p;
  memset(&p, 0, sizeof p);
  pthread_mutex_init(&p.mu, NULL);
  pthread_cond_init(&p.cv, NULL);
  p.items = items;
  p.n = n;
  p.B = B;
  p.S = S;
  p.threads = opts->threads;
  p.stop = opts->stop;
  float *feats = malloc((size_t)B * cfg->embed_dim * sizeof *feats);
  float *embeds = tokens ? malloc((size_t)B * cfg->v_tokens * cfg->v_hidden * sizeof *embeds) : NULL;
  pthread_t th;
  for (int k = 0; k < 2; k++) p.s[k].pix = malloc((size_t)B * 3 * S * S * sizeof(float));
  if (!feats || (tokens && !embeds) || !p.s[0].pix || !p.s[1].pix) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory for a batch of %d", B);
    goto done;
  }
  if (pthread_create(&th, NULL, decoder, &p) != 0) {
    rc = blip_err_set(BLIP_EIO, "cannot start the decoder thread");
    goto done;
  }
  started = 1;
  int64_t committed = 0;
  double last_flush = now_s();
  for (int k = 0;; k ^= 1) {
    slot *b = &p.s[k];
    double tw = now_s();
    pthread_mutex_lock(&p.mu);
    while (!b->ready && !p.done) pthread_cond_wait(&p.cv, &p.mu);
    int have = b->ready;
    pthread_mutex_unlock(&p.mu);
    counts->decode_wait_s += now_s() - tw;
    if (!have) break;
    if ((rc = run_batch(m, st, b, S, tokens, feats, embeds, counts))) break;
    committed += b->n;
    pthread_mutex_lock(&p.mu);
    b->ready = 0;
    pthread_cond_broadcast(&p.cv);
    pthread_mutex_unlock(&p.mu);
    if (opts->progress) opts->progress(opts->ctx, committed, n);
    if (opts->flush_every_s > 0 && now_s() - last_flush > opts->flush_every_s) {
      if ((rc = blip_store_flush(st))) break; /* a full disk here is as fatal as in a commit */
      last_flush = now_s();
    }
    if (opts->stop && *opts->stop) {
      rc = blip_err_set(BLIP_EINTR, "stopped after %lld of %lld images", (long long)committed, (long long)n);
      break;
    }
  }
done:
  if (started) {
    pthread_mutex_lock(&p.mu);
    p.quit = 1;
    pthread_cond_broadcast(&p.cv);
    pthread_mutex_unlock(&p.mu);
    pthread_join(th, NULL);
  }
  for (int k = 0; k < 2; k++) free(p.s[k].pix);
  free(feats);
  free(embeds);
  pthread_mutex_destroy(&p.mu);
  pthread_cond_destroy(&p.cv);
  return rc;
}
