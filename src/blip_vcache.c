/* blip_vcache: see blip_vcache.h.
 *
 * Design note.
 * - File: "BLIPFX02", {generation, ntotal, trained, payload bytes, XXH3-64 of
 *   the payload} as int64, then FAISS's own serialization (the payload). A
 *   load maps the file, checks size and checksum, then lets FAISS read the
 *   mapped payload, so damaged bytes are never searched: such a file is
 *   reported as damaged and rebuilt from SQLite like a stale one. "BLIPFX01"
 *   files (no checksum, before schema 3) count as stale: rewritten by the writer.
 * - compare() checks the vectors themselves against SQLite's: IDMap2(Flat)
 *   reconstructs each by id. The 1.7.3 C API cannot reconstruct IVF entries
 *   by sparse id, so for IVF each vector is located (list, offset) from the
 *   inverted lists' ids and scored against its SQLite feature in its own list
 *   by search_preassigned with store_pairs: the score at that exact slot must
 *   equal the feature's own dot product. Ties between identical photos cannot
 *   hide a vector, as the slot, not a rank, is compared.
 * - Kinds: IDMap2(FlatIP) below IVF_MIN = 100k vectors, then
 *   "IVF{4 sqrt N},Flat" with IVF's own ids (IDMap2 over IVF corrupts ids on
 *   remove_ids in 1.7.3), nprobe = nlist/16. benchmarks/bench_faiss.c (E=256,
 *   clustered synthetic features, 2 shared cores): Flat 1.0 / 3.0 / 21.5 /
 *   81 ms per query at 10k / 30k / 100k / 200k; IVF 0.13 / 0.3 / 0.9 / 5.0 ms
 *   at recall@10 0.71 / 0.99 / 1.0 / 1.0. Below 100k Flat is exact and costs
 *   less than encoding the query text; above it Flat grows linearly while IVF
 *   keeps recall >= 0.99. The writer retrains when N leaves [trained/4,
 *   4*trained].
 * - Past PQ_MIN vectors the raw vectors stop fitting a query server's RAM
 *   comfortably (4 GB at 4M), and "IVF{4 sqrt N},PQ{E/4}" keeps E/4 bytes of
 *   code per vector (1/16 of f32); the owner re-scores 10 candidates per result
 *   exactly. benchmarks/bench_faiss_pq.c, clustered vectors: recall@10 0.994
 *   at 1M and 0.966 at 10M after that re-score; PQ32 (E/8) reached 0.865 at
 *   1M (0.978 only at 25 per result). Training takes an evenly spaced sample of 64 points per list (at
 *   least 65536, for the PQ codebooks), so a rebuild streams the rows in
 *   chunks and never holds N*E floats.
 * - Readers load IVF files with faiss's IO_FLAG_MMAP: the inverted lists stay
 *   in the page cache, shared by every reader, instead of being copied.
 * - The in-memory index follows each commit (apply) and is written once at
 *   flush/close, not per batch: a crash leaves a stale file, never a wrong one. */
#include "blip_vcache.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <faiss/c_api/IndexIVFFlat_c.h>
#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/impl/AuxIndexStructures_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/index_io_c.h>

#include "blip_err.h"

#define FX_MAGIC "BLIPFX02"
#define FX_HDR 48 /* magic + int64 {gen, ntotal, trained, bytes, xxh3} */
#define IVF_MIN 100000   /* default: Flat below, IVF at or above (see bench_faiss.c) */
#define PQ_MIN 2000000   /* default: IVF,Flat below, IVF,PQ at or above (see bench_faiss_pq.c) */
#define IO_FLAG_MMAP_REAL (8 | 0x646f0000) /* faiss::IO_FLAG_MMAP; 1.7.3's C header says 1, which is stale */

struct blip_vcache {
  char dir[4096], path[4096];
  int E, write;
  int64_t ivf_min, pq_min;
  FaissIndex *fx; /* in-memory index, mirrors generation gen */
  int64_t gen;    /* -1: none */
  int64_t trained;
  int saved;      /* the file holds gen */
  int flat_lists; /* IVF lists hold raw vectors (IVF,Flat): exact scores */
  int64_t *loc, nloc; /* IVF compare: sorted {id, list << 32 | offset} pairs, built on demand */
};

static int fx_err(const char *what) {
  const char *m = faiss_get_last_error();
  return blip_err_set(BLIP_EDB, "faiss %s: %s", what, m ? m : "failed");
}

int blip_vcache_nlist(int64_t n, int64_t ivf_min) {
  if (n < (ivf_min > 0 ? ivf_min : IVF_MIN)) return 0;
  int nl = (int)(4 * sqrt((double)n));
  return nl > 65536 ? 65536 : nl;
}

int blip_vcache_compressed(int64_t n, int64_t pq_min) { return n >= (pq_min > 0 ? pq_min : PQ_MIN); }

static int nprobe(int nlist) { return nlist / 16 > 8 ? nlist / 16 : 8; }

int blip_vcache_new(const char *dir, int E, int64_t ivf_min, int64_t pq_min, int write, blip_vcache **out) {
  blip_vcache *vc = calloc(1, sizeof *vc);
  if (!vc) return blip_err_set(BLIP_ENOMEM, "out of memory");
  snprintf(vc->dir, sizeof vc->dir, "%s", dir);
  snprintf(vc->path, sizeof vc->path, "%s/vectors.faiss", dir);
  vc->E = E;
  vc->ivf_min = ivf_min;
  vc->pq_min = pq_min;
  vc->write = write;
  vc->gen = -1;
  *out = vc;
  return BLIP_OK;
}

void blip_vcache_drop(blip_vcache *vc) {
  if (vc->fx) faiss_Index_free(vc->fx);
  vc->fx = NULL;
  vc->gen = -1;
  vc->trained = 0;
  vc->saved = 0;
  free(vc->loc);
  vc->loc = NULL;
  vc->nloc = 0;
}

void blip_vcache_free(blip_vcache *vc) {
  if (!vc) return;
  blip_vcache_drop(vc);
  free(vc);
}

int64_t blip_vcache_gen(const blip_vcache *vc) { return vc->fx ? vc->gen : -1; }
int64_t blip_vcache_ntotal(const blip_vcache *vc) { return vc->fx ? faiss_Index_ntotal(vc->fx) : 0; }
int64_t blip_vcache_trained(const blip_vcache *vc) { return vc->trained; }

int blip_vcache_approx(const blip_vcache *vc) { return vc->fx && faiss_IndexIVF_cast(vc->fx) && !vc->flat_lists; }

int blip_vcache_stale_kind(const blip_vcache *vc) {
  int64_t n = blip_vcache_ntotal(vc);
  int want = blip_vcache_nlist(n, vc->ivf_min) != 0, have = vc->trained > 0;
  if (have && blip_vcache_compressed(n, vc->pq_min) != blip_vcache_approx(vc)) return 1;
  return want != have || (have && (n > 4 * vc->trained || 4 * n < vc->trained));
}

int64_t blip_vcache_sample_size(const blip_vcache *vc, int64_t n, int ivf) {
  int nlist = ivf ? blip_vcache_nlist(n, vc->ivf_min) : 0;
  if (!nlist) return 0;
  int64_t want = 64 * (int64_t)nlist;
  if (blip_vcache_compressed(n, vc->pq_min) && want < 65536) want = 65536;
  return want < n ? want : n;
}

int blip_vcache_begin(blip_vcache *vc, int64_t n, int ivf, const float *sample, int64_t nsample, int64_t gen) {
  FaissIndex *ix = NULL;
  char desc[64];
  int nlist = ivf ? blip_vcache_nlist(n, vc->ivf_min) : 0, pq = nlist && blip_vcache_compressed(n, vc->pq_min);
  if (pq) snprintf(desc, sizeof desc, "IVF%d,PQ%d", nlist, vc->E % 4 ? vc->E : vc->E / 4);
  else if (nlist) snprintf(desc, sizeof desc, "IVF%d,Flat", nlist);
  else snprintf(desc, sizeof desc, "IDMap2,Flat");
  if (faiss_index_factory(&ix, vc->E, desc, METRIC_INNER_PRODUCT) != 0) return fx_err("index_factory");
  if (nlist) {
    if (nsample < 1 || faiss_Index_train(ix, nsample, sample) != 0) {
      faiss_Index_free(ix);
      return nsample < 1 ? blip_err_set(BLIP_EINVAL, "IVF needs training vectors") : fx_err("train");
    }
    faiss_IndexIVF_set_nprobe(faiss_IndexIVF_cast(ix), (size_t)nprobe(nlist));
  }
  blip_vcache_drop(vc);
  vc->fx = ix;
  vc->gen = gen;
  vc->trained = nlist ? n : 0;
  vc->flat_lists = !pq;
  return BLIP_OK;
}

int blip_vcache_add(blip_vcache *vc, int64_t n, const float *x, const int64_t *ids) {
  if (!vc->fx) return blip_err_set(BLIP_EINVAL, "no FAISS index to add to");
  if (n && faiss_Index_add_with_ids(vc->fx, n, x, ids) != 0) {
    int rc = fx_err("add");
    blip_vcache_drop(vc);
    return rc;
  }
  vc->saved = 0;
  return BLIP_OK;
}

/* Map the file and check it against generation gen. BLIP_OK: *map, *len hold
 * it (munmap when done); BLIP_ENOTFOUND: absent, stale or of the older format;
 * BLIP_EFORMAT: damaged (header, size or checksum). */
static int file_map(const blip_vcache *vc, int64_t gen, uint8_t **map, size_t *len, int64_t h[5]) {
  int fd = open(vc->path, O_RDONLY | O_CLOEXEC), rc = BLIP_OK;
  char magic[8];
  struct stat sb = {0};
  *map = NULL;
  if (fd < 0) return errno == ENOENT ? blip_err_set(BLIP_ENOTFOUND, "%s: none", vc->path) : blip_err_errno("open", vc->path);
  if (fstat(fd, &sb) != 0) {
    rc = blip_err_errno("stat", vc->path);
  } else if (sb.st_size < FX_HDR || pread(fd, magic, 8, 0) != 8 || pread(fd, h, 40, 8) != 40 ||
             memcmp(magic, "BLIPFX", 6) != 0) {
    rc = blip_err_set(BLIP_EFORMAT, "%s: damaged (not a blipsearch cache)", vc->path);
  } else if (memcmp(magic, FX_MAGIC, 8) != 0 || h[0] != gen) {
    rc = blip_err_set(BLIP_ENOTFOUND, "%s: stale", vc->path);
  } else if (h[3] != (int64_t)sb.st_size - FX_HDR) {
    rc = blip_err_set(BLIP_EFORMAT, "%s: damaged (%lld bytes, its header says %lld)", vc->path,
                      (long long)sb.st_size, (long long)(h[3] + FX_HDR));
  } else if ((*map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_SHARED, fd, 0)) == MAP_FAILED) {
    *map = NULL;
    rc = blip_err_errno("mmap", vc->path);
  } else if (XXH3_64bits(*map + FX_HDR, (size_t)h[3]) != (uint64_t)h[4]) {
    munmap(*map, (size_t)sb.st_size);
    *map = NULL;
    rc = blip_err_set(BLIP_EFORMAT, "%s: damaged (checksum mismatch)", vc->path);
  }
  *len = (size_t)sb.st_size;
  close(fd);
  return rc;
}

int blip_vcache_check_file(const blip_vcache *vc, int64_t gen) {
  uint8_t *map;
  size_t len;
  int64_t h[5];
  int rc = file_map(vc, gen, &map, &len, h);
  if (map) munmap(map, len);
  return rc;
}

int blip_vcache_load(blip_vcache *vc, int64_t gen) {
  uint8_t *map;
  size_t len;
  int64_t h[5];
  FaissIndex *ix = NULL;
  int rc = file_map(vc, gen, &map, &len, h);
  if (rc) return rc;
  munmap(map, len); /* the checksum held: now FAISS reads it */
  /* a reader maps the inverted lists of an IVF from the file (shared page cache) instead of
   * copying them (FAISS's mmap reads from a real file at its offset); the writer needs them in
   * memory to change them */
  FILE *f = fopen(vc->path, "rb");
  if (!f || fseek(f, FX_HDR, SEEK_SET) != 0) rc = blip_err_errno("open", vc->path);
  else if (faiss_read_index(f, vc->write ? 0 : IO_FLAG_MMAP_REAL, &ix) != 0 || faiss_Index_d(ix) != vc->E ||
           faiss_Index_ntotal(ix) != h[1])
    rc = blip_err_set(BLIP_EFORMAT, "%s: damaged (FAISS cannot read it)", vc->path);
  if (f) fclose(f);
  if (rc) {
    if (ix) faiss_Index_free(ix);
    return rc;
  }
  blip_vcache_drop(vc);
  vc->fx = ix;
  vc->gen = gen;
  vc->trained = h[2];
  vc->saved = 1;
  FaissIndexIVF *ivf = faiss_IndexIVF_cast(ix);
  vc->flat_lists = !ivf || faiss_IndexIVFFlat_cast(ix) != NULL; /* raw vectors, or PQ codes */
  if (ivf) faiss_IndexIVF_set_nprobe(ivf, (size_t)nprobe((int)faiss_IndexIVF_nlist(ivf)));
  return BLIP_OK;
}

static int fsync_dir(const char *dir) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -1;
  int r = fsync(fd);
  close(fd);
  return r;
}

int blip_vcache_save(blip_vcache *vc) {
  if (!vc->fx) return blip_err_set(BLIP_EINVAL, "no FAISS index to save");
  if (vc->saved) return BLIP_OK;
  char tmp[4200];
  snprintf(tmp, sizeof tmp, "%s.tmp.%d", vc->path, (int)getpid());
  FILE *f = fopen(tmp, "w+b");
  int64_t h[5] = {vc->gen, faiss_Index_ntotal(vc->fx), vc->trained, 0, 0};
  int rc = BLIP_OK;
  if (!f) return blip_err_errno("create", tmp);
  errno = 0;
  if (fwrite(FX_MAGIC, 8, 1, f) != 1 || fwrite(h, sizeof h, 1, f) != 1) {
    rc = blip_err_errno("write", tmp);
  } else if (faiss_write_index(vc->fx, f) != 0) {
    rc = errno ? blip_err_errno("write", tmp) : fx_err("write_index");
  } else if (fflush(f) != 0) {
    rc = blip_err_errno("write", tmp);
  } else { /* checksum what was written (still in the page cache), then fill in the header */
    off_t end = ftello(f);
    uint8_t *map = end > FX_HDR ? mmap(NULL, (size_t)end, PROT_READ, MAP_SHARED, fileno(f), 0) : MAP_FAILED;
    if (map == MAP_FAILED) {
      rc = blip_err_errno("mmap", tmp);
    } else {
      h[3] = end - FX_HDR;
      h[4] = (int64_t)XXH3_64bits(map + FX_HDR, (size_t)h[3]);
      munmap(map, (size_t)end);
      if (pwrite(fileno(f), h, sizeof h, 8) != (ssize_t)sizeof h || fsync(fileno(f)) != 0)
        rc = blip_err_errno("write", tmp);
    }
  }
  if (fclose(f) != 0 && !rc) rc = blip_err_errno("close", tmp);
  if (!rc && rename(tmp, vc->path) != 0) rc = blip_err_errno("rename", tmp);
  if (rc) {
    unlink(tmp);
    return rc;
  }
  fsync_dir(vc->dir);
  vc->saved = 1;
  return BLIP_OK;
}

void blip_vcache_apply(blip_vcache *vc, int64_t gen_before, const int64_t *del, int64_t ndel, const float *x,
                       const int64_t *ids, int64_t nadd) {
  if (!vc->fx) return;
  if (vc->gen != gen_before) {
    blip_vcache_drop(vc);
    return;
  }
  int ok = 1;
  if (ndel) {
    FaissIDSelectorBatch *sel = NULL;
    size_t removed = 0;
    ok = faiss_IDSelectorBatch_new(&sel, (size_t)ndel, del) == 0 &&
         faiss_Index_remove_ids(vc->fx, (FaissIDSelector *)sel, &removed) == 0;
    faiss_IDSelector_free((FaissIDSelector *)sel);
  }
  if (ok && nadd) ok = faiss_Index_add_with_ids(vc->fx, nadd, x, ids) == 0;
  if (!ok) {
    blip_vcache_drop(vc);
    return;
  }
  vc->gen = gen_before + 1;
  vc->saved = 0;
}

int blip_vcache_search(blip_vcache *vc, int64_t nq, const float *q, int64_t k, float *dis, int64_t *lab) {
  if (!vc->fx) return blip_err_set(BLIP_EINVAL, "no FAISS index loaded");
  return faiss_Index_search(vc->fx, nq, q, k, dis, lab) == 0 ? BLIP_OK : fx_err("search");
}

static int cmp_pair(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

/* IVF: {id, list << 32 | offset} of every entry, sorted by id. */
static int ivf_locate(blip_vcache *vc, FaissIndexIVF *ivf) {
  if (vc->loc) return BLIP_OK;
  size_t nlist = faiss_IndexIVF_nlist(ivf), n = 0, cap = 0;
  int64_t *ids = NULL;
  for (size_t l = 0; l < nlist; l++) cap += faiss_IndexIVF_get_list_size(ivf, l);
  vc->loc = malloc((cap + 1) * 2 * sizeof *vc->loc);
  ids = malloc((cap + 1) * sizeof *ids);
  if (!vc->loc || !ids) {
    free(ids);
    return blip_err_set(BLIP_ENOMEM, "out of memory");
  }
  for (size_t l = 0; l < nlist; l++) {
    size_t ls = faiss_IndexIVF_get_list_size(ivf, l);
    faiss_IndexIVF_invlists_get_ids(ivf, l, ids);
    for (size_t o = 0; o < ls; o++, n++) {
      vc->loc[2 * n] = ids[o];
      vc->loc[2 * n + 1] = (int64_t)l << 32 | (int64_t)o;
    }
  }
  free(ids);
  qsort(vc->loc, n, 2 * sizeof *vc->loc, cmp_pair);
  vc->nloc = (int64_t)n;
  return BLIP_OK;
}

/* IVF: the score of each query at its own slot must be its own dot product.
 * Queries are grouped by list: one search_preassigned call per list, k = the
 * list's size, so every slot of the list is scored. */
static int ivf_compare(blip_vcache *vc, FaissIndexIVF *ivf, int64_t n, const int64_t *ids, const float *x,
                       int64_t *nbad, int64_t *first_bad) {
  int rc = ivf_locate(vc, ivf);
  if (rc) return rc;
  int np = (int)faiss_IndexIVF_nprobe(ivf);
  int64_t *slot = malloc(((size_t)n + 1) * 2 * sizeof *slot); /* {slot or -1, query index}, sorted by slot */
  float *q = malloc(((size_t)n + 1) * vc->E * sizeof *q), *dis = NULL, *cd = NULL;
  int64_t *lab = NULL, *asg = NULL;
  if (!slot || !q) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  for (int64_t i = 0; i < n; i++) {
    const int64_t *hit = bsearch(&ids[i], vc->loc, (size_t)vc->nloc, 2 * sizeof *vc->loc, cmp_pair);
    slot[2 * i] = hit ? hit[1] : -1;
    slot[2 * i + 1] = i;
  }
  qsort(slot, (size_t)n, 2 * sizeof *slot, cmp_pair);
  for (int64_t a = 0, b; a < n; a = b) {
    int64_t list = slot[2 * a] < 0 ? -1 : slot[2 * a] >> 32;
    for (b = a + 1; b < n && (slot[2 * b] < 0 ? -1 : slot[2 * b] >> 32) == list; b++) {}
    int64_t nq = b - a, k = list < 0 ? 0 : (int64_t)faiss_IndexIVF_get_list_size(ivf, (size_t)list);
    if (list < 0 || k == 0) { /* not in the index at all */
      for (int64_t j = a; j < b; j++)
        if (!(*nbad)++) *first_bad = ids[slot[2 * j + 1]];
      continue;
    }
    free(dis);
    free(lab);
    free(asg);
    free(cd);
    dis = malloc((size_t)(nq * k) * sizeof *dis);
    lab = malloc((size_t)(nq * k) * sizeof *lab);
    asg = malloc((size_t)(nq * np) * sizeof *asg);
    cd = calloc((size_t)(nq * np), sizeof *cd);
    if (!dis || !lab || !asg || !cd) {
      rc = blip_err_set(BLIP_ENOMEM, "out of memory comparing %lld vectors in a list of %lld", (long long)nq,
                        (long long)k);
      goto done;
    }
    for (int64_t j = 0; j < nq; j++) {
      memcpy(q + j * vc->E, x + slot[2 * (a + j) + 1] * vc->E, (size_t)vc->E * sizeof *q);
      for (int p = 0; p < np; p++) asg[j * np + p] = p ? -1 : list;
    }
    if (faiss_IndexIVF_search_preassigned(ivf, nq, q, k, asg, cd, dis, lab, 1) != 0) {
      rc = fx_err("search_preassigned");
      goto done;
    }
    for (int64_t j = 0; j < nq; j++) {
      const float *v = q + j * vc->E;
      float self = 0;
      for (int e = 0; e < vc->E; e++) self += v[e] * v[e];
      /* raw vectors score exactly; a PQ code only approximately (its bytes are the file checksum's) */
      float tol = vc->flat_lists ? 1e-5f * fmaxf(1, fabsf(self)) : 0.5f * fmaxf(1, fabsf(self));
      int ok = 0;
      for (int64_t r = 0; r < k && !ok; r++) ok = lab[j * k + r] == slot[2 * (a + j)] && fabsf(dis[j * k + r] - self) <= tol;
      if (!ok && !(*nbad)++) *first_bad = ids[slot[2 * (a + j) + 1]];
    }
  }
done:
  free(slot);
  free(q);
  free(dis);
  free(lab);
  free(asg);
  free(cd);
  return rc;
}

int blip_vcache_compare(blip_vcache *vc, int64_t n, const int64_t *ids, const float *x, int64_t *nbad,
                        int64_t *first_bad) {
  if (!vc->fx) return blip_err_set(BLIP_EINVAL, "no FAISS index loaded");
  FaissIndexIVF *ivf = faiss_IndexIVF_cast(vc->fx);
  if (ivf) return ivf_compare(vc, ivf, n, ids, x, nbad, first_bad);
  float *v = malloc((size_t)vc->E * sizeof *v);
  if (!v) return blip_err_set(BLIP_ENOMEM, "out of memory");
  for (int64_t i = 0; i < n; i++) /* IDMap2: by id; a missing id fails the reconstruct */
    if (faiss_Index_reconstruct(vc->fx, ids[i], v) != 0 || memcmp(v, x + i * vc->E, (size_t)vc->E * sizeof *v) != 0)
      if (!(*nbad)++) *first_bad = ids[i];
  free(v);
  return BLIP_OK;
}
