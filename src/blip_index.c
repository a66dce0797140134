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
#include <limits.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "blip_decode.h"
#include "blip_err.h"
#include "blip_img.h"

enum { MAXB = 256 };

typedef struct {
  int n;
  const blip_index_item *it[MAXB];
  float *pix; /* [n,3,S,S] */
  blip_img_meta meta[MAXB];
  uint64_t fp[MAXB];
  int64_t size[MAXB], mtime_ns[MAXB]; /* of the bytes decoded */
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
  blip_decode *dec;
  double time_budget_s;
  int jfd;       /* attempts journal, -1 when none */
  int jstop;     /* ends the journal's heartbeat thread */
  int *attempts; /* [n] times a run died while items[i] (this version) was being decoded */
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

/* ---- attempts journal ----
 * A file whose decode stops the whole indexer (the process killed or frozen
 * while reading or decoding it: a hung network mount, the OOM killer, a
 * user's kill -9 of a run stuck on it) must not be retried on every run.
 * Each decoding thread owns a slot of the journal file and writes the
 * file's path, size, mtime and start time there before reading it, and
 * clears it after; a heartbeat thread stamps the header every 250 ms
 * (pwrite, no fsync: what must survive is the death of this process, and the
 * kernel keeps the page). The next run reads the last heartbeat as the time
 * of death. A slot still set then, whose file had been in flight for at
 * least suspect_s (half the decode budget, at most 5 s; decodes normally
 * take milliseconds), counts one death against that version of the file;
 * the counts are carried in the journal (the suspects) while the file is
 * pending, and a file with JDEATHS becomes an error row without another
 * decode until it changes (size or mtime). A death during a short decode is
 * the user's or the machine's, not the file's: the crash tests kill runs at
 * random, and a resumed run decodes the same batch first. A run that
 * completes removes the journal. */
#define JMAGIC "BLIPDJ02"
enum { JHDR = 64, JSTRIDE = 4160, JPATH = 4096, JMAX_SUSPECTS = 4096, JDEATHS = 2 };
typedef struct {
  uint32_t state, count; /* in-flight slot: state 1; suspect: count */
  int64_t size, mtime_ns, start_ns;
  uint32_t len, pad;
  char path[JPATH];
} jrec;

static int64_t wall_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int jrec_is(const jrec *r, const char *path, int64_t size, int64_t mtime_ns) {
  return r->size == size && r->mtime_ns == mtime_ns && r->len == strlen(path) && !memcmp(r->path, path, r->len);
}

static void jrec_set(jrec *r, const char *path, int64_t size, int64_t mtime_ns, uint32_t state, uint32_t count) {
  size_t len = strlen(path);
  memset(r, 0, sizeof *r);
  r->state = state, r->count = count, r->size = size, r->mtime_ns = mtime_ns, r->start_ns = wall_ns();
  r->len = (uint32_t)(len < JPATH ? len : JPATH);
  memcpy(r->path, path, r->len);
}

static void *journal_heartbeat(void *arg) {
  pipeline *p = arg;
  pthread_mutex_lock(&p->mu);
  while (!p->jstop) {
    int64_t now = wall_ns();
    if (pwrite(p->jfd, &now, sizeof now, 16) < 0) {} /* best effort, as every journal write */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 250000000;
    if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
    pthread_cond_timedwait(&p->cv, &p->mu, &ts);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* Read the last run's journal, count its deaths into p->attempts, and start
 * a fresh one (temp + fsync + rename) holding the suspects that are still
 * pending and empty slots for this run's threads. */
static int journal_open(pipeline *p, const char *path) {
  int rc = BLIP_OK, in = open(path, O_RDONLY | O_CLOEXEC), out = -1;
  char tmp[4200];
  jrec *r = malloc(sizeof *r), *sus = NULL;
  int nsus = 0;
  if (!r || !(p->attempts = calloc((size_t)p->n, sizeof *p->attempts)) ||
      !(sus = calloc(JMAX_SUSPECTS, sizeof *sus))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  char hdr[JHDR];
  uint32_t nslots = 0, nold = 0;
  int64_t death_ns = 0, suspect_ns = (int64_t)(1e9 * (p->time_budget_s > 0 ? p->time_budget_s : 60) / 2);
  if (suspect_ns > (int64_t)5000000000) suspect_ns = 5000000000;
  if (in >= 0 && pread(in, hdr, JHDR, 0) == JHDR && !memcmp(hdr, JMAGIC, 8)) {
    memcpy(&nslots, hdr + 8, 4);
    memcpy(&nold, hdr + 12, 4);
    memcpy(&death_ns, hdr + 16, 8);
  }
  for (uint32_t k = 0; k < nslots + nold && k < 256 + JMAX_SUSPECTS; k++) {
    if (pread(in, r, sizeof *r, JHDR + (off_t)k * JSTRIDE) != (ssize_t)sizeof *r || r->len >= JPATH) continue;
    int add = k < nslots ? r->state == 1 && death_ns - r->start_ns >= suspect_ns : (int)r->count;
    if (add <= 0) continue;
    r->path[r->len] = 0;
    int64_t i = 0; /* still pending, same version? else forget it */
    while (i < p->n && !jrec_is(r, p->items[i].path, p->items[i].size, p->items[i].mtime_ns)) i++;
    if (i == p->n) continue;
    if (!p->attempts[i] && nsus < JMAX_SUSPECTS) sus[nsus++] = *r;
    p->attempts[i] += add;
  }
  for (int k = 0; k < nsus; k++) { /* counts merged per file */
    int64_t i = 0;
    while (!jrec_is(&sus[k], p->items[i].path, p->items[i].size, p->items[i].mtime_ns)) i++;
    jrec_set(&sus[k], p->items[i].path, p->items[i].size, p->items[i].mtime_ns, 0, (uint32_t)p->attempts[i]);
  }
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  out = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  memset(hdr, 0, JHDR);
  memcpy(hdr, JMAGIC, 8);
  nslots = (uint32_t)p->threads;
  memcpy(hdr + 8, &nslots, 4);
  memcpy(hdr + 12, &nsus, 4);
  int ok = out >= 0 && pwrite(out, hdr, JHDR, 0) == JHDR && ftruncate(out, JHDR + (off_t)nslots * JSTRIDE) == 0;
  for (int k = 0; ok && k < nsus; k++)
    ok = pwrite(out, &sus[k], sizeof sus[k], JHDR + (off_t)(nslots + k) * JSTRIDE) == (ssize_t)sizeof sus[k];
  if (!ok || fsync(out) || rename(tmp, path)) { /* errno is the failed call's */
    rc = blip_err_errno("write", tmp);
    unlink(tmp);
    goto done;
  }
  p->jfd = out;
  out = -1;
done:
  if (in >= 0) close(in);
  if (out >= 0) close(out);
  free(r);
  free(sus);
  return rc;
}

static void journal_mark(pipeline *p, int slot_no, const blip_index_item *it, int on) {
  if (p->jfd < 0 || slot_no >= p->threads) return;
  jrec r;
  if (on) jrec_set(&r, it->path, it->size, it->mtime_ns, 1, 0);
  else r.state = 0;
  /* best effort: a journal that cannot be written only loses this protection */
  if (pwrite(p->jfd, &r, on ? sizeof r : sizeof r.state, JHDR + (off_t)slot_no * JSTRIDE) < 0) {}
}

static void decode(pipeline *p, slot *b) {
  blip_img_opts o;
  blip_img_opts_default(&o);
  o.size = p->S;
  o.autorotate = 1;
  o.shrink_on_load = 0;
  if (p->time_budget_s > 0) o.time_budget_s = p->time_budget_s;
  size_t per = (size_t)3 * p->S * p->S;
#pragma omp parallel for num_threads(p->threads) schedule(dynamic, 1)
  for (int i = 0; i < b->n; i++) {
    const blip_index_item *it = b->it[i];
    int64_t k = it - p->items, t = omp_get_thread_num();
    blip_decode_info info = {0};
    int rc, journaled = 0;
    if (p->attempts && p->attempts[k] >= JDEATHS) {
      journaled = 1;
      memset(&b->meta[i], 0, sizeof b->meta[i]);
      rc = blip_err_set(BLIP_EINTR, "%s: skipped: the indexer stopped %d times while reading or decoding this "
                        "version of it (killed or hung); it is tried again when the file changes", it->path,
                        p->attempts[k]);
    } else {
      journal_mark(p, (int)t, it, 1);
      rc = blip_decode_file(p->dec, it->path, &o, b->pix + i * per, NULL, &b->meta[i], &info);
      journal_mark(p, (int)t, it, 0);
    }
    b->fp[i] = info.read ? info.fingerprint : it->has_fingerprint ? it->fingerprint : 0;
    b->size[i] = info.read ? info.size : it->size;
    b->mtime_ns[i] = info.read ? info.mtime_ns : it->mtime_ns;
    if (rc) snprintf(b->err[i], sizeof b->err[i], "%s", blip_err_last()[0] ? blip_err_last() : blip_err_name(rc));
    else b->err[i][0] = 0;
    /* a failure once every byte was read depends on the content (a hang or a blow-up included): it
     * waits for the file to change, as does a file the journal holds responsible for dead runs */
    b->retry[i] = rc && !journaled && !info.read && transient(rc, it);
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
    if (stopping(p)) { /* decodes cut short by the stop are not errors of their files: redo them next run */
      p->done = 1;
      pthread_cond_broadcast(&p->cv);
      pthread_mutex_unlock(&p->mu);
      return NULL;
    }
    b->ready = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
  }
}

/* Repair mode: rewrite the token records of the batch's rows from the
 * tokens just computed (embeds, packed decoded-first). A file that cannot be
 * decoded, or whose content is no longer the row's, gives up its record. */
static int repair_batch(blip_store *st, slot *b, size_t per, float *embeds, blip_index_counts *c) {
  int64_t ids[MAXB];
  uint64_t fps[MAXB];
  int n = 0, k = 0, rc = BLIP_OK;
  for (int i = 0; i < b->n && !rc; i++) {
    const blip_index_item *it = b->it[i];
    int ok = !b->err[i][0];
    if (ok && b->fp[i] == it->fingerprint) {
      if (n != k) memmove(embeds + n * per, embeds + k * per, per * sizeof *embeds);
      ids[n] = it->replace;
      fps[n++] = it->fingerprint;
    } else {
      rc = blip_store_drop_tokens(st, it->replace);
      c->unrepaired++;
    }
    k += ok;
  }
  if (!rc && n) rc = blip_store_put_tokens(st, n, ids, fps, embeds);
  if (!rc) c->repaired += n;
  return rc;
}

/* Model + commit for one decoded batch. */
static int run_batch(blip_model *m, blip_store *st, slot *b, int S, int tokens, int repair, float *feats,
                     float *embeds, blip_index_counts *c) {
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
  c->embedded += nok;
  if (repair) return repair_batch(st, b, (size_t)blip_model_cfg(m)->v_tokens * blip_model_cfg(m)->v_hidden, embeds, c);
  for (int pass = 0; pass < 2; pass++)
    for (int i = 0; i < b->n; i++) {
      if ((pass == 0) != (b->err[i][0] == 0)) continue;
      const blip_index_item *it = b->it[i];
      rows[r] = (blip_store_row){it->path, b->size[i], b->mtime_ns[i], b->fp[i], b->meta[i].width,
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

int blip_index_repair_tokens(blip_model *m, blip_store *st, const blip_index_opts *opts, blip_index_counts *counts) {
  int64_t *ids = NULL, n = 0;
  int rc = blip_store_tokens_lost(st, &ids, &n);
  blip_index_item *it = n ? calloc((size_t)n, sizeof *it) : NULL;
  char *paths = n ? malloc((size_t)n * PATH_MAX) : NULL;
  if (!rc && n && (!it || !paths)) rc = blip_err_set(BLIP_ENOMEM, "out of memory");
  for (int64_t i = 0; !rc && i < n; i++) {
    char *p = paths + (size_t)i * PATH_MAX;
    uint64_t fp = 0;
    struct stat sb;
    if ((rc = blip_store_get(st, ids[i], NULL, p, PATH_MAX)) || (rc = blip_store_row_fingerprint(st, ids[i], &fp))) break;
    /* the decoder fingerprints the file again: a record is rewritten only from the row's content */
    it[i] = (blip_index_item){p, stat(p, &sb) == 0 ? sb.st_size : 0, 0, fp, 0, ids[i]};
  }
  if (!rc && n) {
    blip_index_opts o = *opts;
    o.repair = 1;
    rc = blip_index_embed(m, st, it, n, &o, counts);
  }
  free(ids);
  free(it);
  free(paths);
  return rc;
}

int blip_index_embed(blip_model *m, blip_store *st, const blip_index_item *items, int64_t n,
                     const blip_index_opts *opts, blip_index_counts *counts) {
  if (n <= 0) return BLIP_OK;
  const blip_cfg *cfg = blip_model_cfg(m);
  int B = opts->batch, S = cfg->image_size, rc = BLIP_OK, started = 0, hb_started = 0;
  pthread_t hb;
  if (B < 1 || B > MAXB || opts->threads < 1) return blip_err_set(BLIP_EINVAL, "batch must be 1..%d, threads >= 1", MAXB);
  int tokens = opts->tokens && blip_store_tokens_fmt(st) != BLIP_TOKENS_NONE;
  if (opts->repair && !tokens) return blip_err_set(BLIP_EINVAL, "token repair needs a rerank store");
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
  p.time_budget_s = opts->time_budget_s;
  p.jfd = -1;
  blip_decode_opts dopt;
  blip_decode_opts_default(&dopt);
  dopt.workers = opts->threads;
  dopt.stop = opts->stop;
  if (opts->memory_cap > 0) dopt.memory_cap = opts->memory_cap;
  float *feats = malloc((size_t)B * cfg->embed_dim * sizeof *feats);
  float *embeds = tokens ? malloc((size_t)B * cfg->v_tokens * cfg->v_hidden * sizeof *embeds) : NULL;
  pthread_t th;
  for (int k = 0; k < 2; k++) p.s[k].pix = malloc((size_t)B * 3 * S * S * sizeof(float));
  if (!feats || (tokens && !embeds) || !p.s[0].pix || !p.s[1].pix) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory for a batch of %d", B);
    goto done;
  }
  if ((rc = blip_decode_new(&dopt, &p.dec)) || (rc = blip_decode_start(p.dec))) goto done;
  if (opts->journal && journal_open(&p, opts->journal)) p.jfd = -1; /* without it, only that protection is lost */
  hb_started = p.jfd >= 0 && pthread_create(&hb, NULL, journal_heartbeat, &p) == 0;
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
    if ((rc = run_batch(m, st, b, S, tokens, opts->repair, feats, embeds, counts))) break;
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
  if (started || hb_started) {
    pthread_mutex_lock(&p.mu);
    p.quit = 1;
    p.jstop = 1;
    pthread_cond_broadcast(&p.cv);
    pthread_mutex_unlock(&p.mu);
    if (started) pthread_join(th, NULL);
    if (hb_started) pthread_join(hb, NULL);
  }
  blip_decode_free(p.dec);
  if (p.jfd >= 0) close(p.jfd);
  if (p.jfd >= 0 && rc == BLIP_OK && !(opts->stop && *opts->stop)) unlink(opts->journal); /* nothing was left in flight */
  free(p.attempts);
  for (int k = 0; k < 2; k++) free(p.s[k].pix);
  free(feats);
  free(embeds);
  pthread_mutex_destroy(&p.mu);
  pthread_cond_destroy(&p.cv);
  return rc;
}
