/* blip_vcache: see blip_vcache.h.
 *
 * Design note.
 * - File: "BLIPFX01", {generation, ntotal, trained} as int64, then FAISS's
 *   own serialization. A damaged or foreign file fails to load and is treated
 *   as stale, never as data.
 * - Kinds: IDMap2(FlatIP) below IVF_MIN = 100k vectors, then
 *   "IVF{4 sqrt N},Flat" with IVF's own ids (IDMap2 over IVF corrupts ids on
 *   remove_ids in 1.7.3), nprobe = nlist/16. benchmarks/bench_faiss.c (E=256,
 *   clustered synthetic features, 2 shared cores): Flat 1.0 / 3.0 / 21.5 /
 *   81 ms per query at 10k / 30k / 100k / 200k; IVF 0.13 / 0.3 / 0.9 / 5.0 ms
 *   at recall@10 0.71 / 0.99 / 1.0 / 1.0. Below 100k Flat is exact and costs
 *   less than encoding the query text; above it Flat grows linearly while IVF
 *   keeps recall >= 0.99. The writer retrains when N leaves [trained/4,
 *   4*trained].
 * - The in-memory index follows each commit (apply) and is written once at
 *   flush/close, not per batch: a crash leaves a stale file, never a wrong one. */
#include "blip_vcache.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/impl/AuxIndexStructures_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/index_io_c.h>

#include "blip_err.h"

#define FX_MAGIC "BLIPFX01"
#define IVF_MIN 100000 /* default: Flat below, IVF at or above (see bench_faiss.c) */

struct blip_vcache {
  char dir[4096], path[4096];
  int E;
  int64_t ivf_min;
  FaissIndex *fx; /* in-memory index, mirrors generation gen */
  int64_t gen;    /* -1: none */
  int64_t trained;
  int saved; /* the file holds gen */
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

static int nprobe(int nlist) { return nlist / 16 > 8 ? nlist / 16 : 8; }

int blip_vcache_new(const char *dir, int E, int64_t ivf_min, blip_vcache **out) {
  blip_vcache *vc = calloc(1, sizeof *vc);
  if (!vc) return blip_err_set(BLIP_ENOMEM, "out of memory");
  snprintf(vc->dir, sizeof vc->dir, "%s", dir);
  snprintf(vc->path, sizeof vc->path, "%s/vectors.faiss", dir);
  vc->E = E;
  vc->ivf_min = ivf_min;
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
}

void blip_vcache_free(blip_vcache *vc) {
  if (!vc) return;
  blip_vcache_drop(vc);
  free(vc);
}

int64_t blip_vcache_gen(const blip_vcache *vc) { return vc->fx ? vc->gen : -1; }
int64_t blip_vcache_ntotal(const blip_vcache *vc) { return vc->fx ? faiss_Index_ntotal(vc->fx) : 0; }
int64_t blip_vcache_trained(const blip_vcache *vc) { return vc->trained; }

int blip_vcache_stale_kind(const blip_vcache *vc) {
  int64_t n = blip_vcache_ntotal(vc);
  int want = blip_vcache_nlist(n, vc->ivf_min) != 0, have = vc->trained > 0;
  return want != have || (have && (n > 4 * vc->trained || 4 * n < vc->trained));
}

int blip_vcache_build(blip_vcache *vc, int64_t n, const float *x, const int64_t *ids, int ivf, int64_t gen) {
  FaissIndex *ix = NULL;
  char desc[64];
  int nlist = ivf ? blip_vcache_nlist(n, vc->ivf_min) : 0;
  if (nlist) snprintf(desc, sizeof desc, "IVF%d,Flat", nlist);
  else snprintf(desc, sizeof desc, "IDMap2,Flat");
  if (faiss_index_factory(&ix, vc->E, desc, METRIC_INNER_PRODUCT) != 0) return fx_err("index_factory");
  if (nlist) {
    if (faiss_Index_train(ix, n, x) != 0) goto fail;
    faiss_IndexIVF_set_nprobe(faiss_IndexIVF_cast(ix), (size_t)nprobe(nlist));
  }
  if (n && faiss_Index_add_with_ids(ix, n, x, ids) != 0) goto fail;
  blip_vcache_drop(vc);
  vc->fx = ix;
  vc->gen = gen;
  vc->trained = nlist ? n : 0;
  return BLIP_OK;
fail:
  faiss_Index_free(ix);
  return fx_err("build");
}

int blip_vcache_load(blip_vcache *vc, int64_t gen) {
  FILE *f = fopen(vc->path, "rb");
  int rc = BLIP_ENOTFOUND;
  char magic[8];
  int64_t h[3];
  FaissIndex *ix = NULL;
  if (!f) return rc;
  if (fread(magic, 8, 1, f) != 1 || memcmp(magic, FX_MAGIC, 8) != 0 || fread(h, sizeof h, 1, f) != 1 || h[0] != gen)
    goto done;
  if (faiss_read_index(f, 0, &ix) != 0) goto done; /* damaged cache: rebuild */
  if (faiss_Index_d(ix) != vc->E) {
    faiss_Index_free(ix);
    goto done;
  }
  blip_vcache_drop(vc);
  vc->fx = ix;
  vc->gen = gen;
  vc->trained = h[2];
  vc->saved = 1;
  FaissIndexIVF *ivf = faiss_IndexIVF_cast(ix);
  if (ivf) faiss_IndexIVF_set_nprobe(ivf, (size_t)nprobe((int)faiss_IndexIVF_nlist(ivf)));
  rc = BLIP_OK;
done:
  fclose(f);
  return rc;
}

int64_t blip_vcache_file_gen(const blip_vcache *vc) {
  FILE *f = fopen(vc->path, "rb");
  char magic[8];
  int64_t g = -1;
  if (f && fread(magic, 8, 1, f) == 1 && memcmp(magic, FX_MAGIC, 8) == 0 && fread(&g, 8, 1, f) != 1) g = -1;
  if (f) fclose(f);
  return g;
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
  FILE *f = fopen(tmp, "wb");
  int64_t h[3] = {vc->gen, faiss_Index_ntotal(vc->fx), vc->trained};
  int rc = BLIP_OK;
  if (!f) return blip_err_errno("create", tmp);
  errno = 0;
  if (fwrite(FX_MAGIC, 8, 1, f) != 1 || fwrite(h, sizeof h, 1, f) != 1) {
    rc = blip_err_errno("write", tmp);
  } else if (faiss_write_index(vc->fx, f) != 0) {
    rc = errno ? blip_err_errno("write", tmp) : fx_err("write_index");
  } else if (fflush(f) != 0 || fsync(fileno(f)) != 0) {
    rc = blip_err_errno("write", tmp);
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
