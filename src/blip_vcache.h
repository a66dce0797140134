/* blip_vcache: the FAISS cache of an index, vectors.faiss: the image
 * features of SQLite as a FAISS index, tagged with the SQLite generation it
 * mirrors.
 *
 * The cache is derived data: a file whose generation differs from SQLite's is
 * stale and ignored, and the owner (blip_store) rebuilds it from the rows. The
 * file is only ever replaced by temp file + fsync + rename, so a reader sees a
 * whole file or none. Kinds (see blip_vcache.c): IDMap2(FlatIP) below ivf_min
 * vectors, "IVF{4 sqrt N},Flat" below pq_min, then the compressed
 * "IVF{4 sqrt N},PQ{E/4}" (64 bytes a vector at E 256), whose results are
 * approximate: the owner re-scores its candidates exactly. Readers map the
 * inverted lists of a file read-only (shared page cache) instead of copying them. */
#ifndef BLIP_VCACHE_H
#define BLIP_VCACHE_H

#include <stdint.h>

typedef struct blip_vcache blip_vcache;

/* FAISS index kind for n vectors: 0 = flat, else the IVF nlist. ivf_min 0: the default threshold. */
int blip_vcache_nlist(int64_t n, int64_t ivf_min);
/* Whether n vectors get the compressed kind. pq_min 0: the default threshold. */
int blip_vcache_compressed(int64_t n, int64_t pq_min);

/* A cache of E-dim vectors for DIR/vectors.faiss; nothing is read yet.
 * write: the owner modifies the index (no read-only mapping of the file). */
int blip_vcache_new(const char *dir, int E, int64_t ivf_min, int64_t pq_min, int write, blip_vcache **out);
void blip_vcache_free(blip_vcache *vc);

/* Generation the in-memory index mirrors, or -1 when there is none. */
int64_t blip_vcache_gen(const blip_vcache *vc);
int64_t blip_vcache_ntotal(const blip_vcache *vc);
/* Vectors the IVF was trained on (0: flat or none). */
int64_t blip_vcache_trained(const blip_vcache *vc);
/* Whether the writer should retrain: the kind for the current size differs,
 * or the collection grew or shrank 4x since training. */
int blip_vcache_stale_kind(const blip_vcache *vc);

/* Replace the in-memory index by an empty one of the kind n vectors call for
 * (ivf 0: flat whatever n), mirroring generation gen once filled with
 * blip_vcache_add. IVF kinds train on sample [nsample,E]: pass
 * blip_vcache_sample_size(n) evenly spaced vectors. */
int64_t blip_vcache_sample_size(const blip_vcache *vc, int64_t n, int ivf);
int blip_vcache_begin(blip_vcache *vc, int64_t n, int ivf, const float *sample, int64_t nsample, int64_t gen);
int blip_vcache_add(blip_vcache *vc, int64_t n, const float *x, const int64_t *ids);
/* Whether search results are approximate scores (compressed kind). */
int blip_vcache_approx(const blip_vcache *vc);
/* Load the file if it mirrors gen: BLIP_ENOTFOUND when absent or stale (or
 * of the older format), BLIP_EFORMAT when damaged (size, checksum, content). */
int blip_vcache_load(blip_vcache *vc, int64_t gen);
/* The same verdict as load, without loading: reads and checksums the file. */
int blip_vcache_check_file(const blip_vcache *vc, int64_t gen);
/* Compare the in-memory index against n (id, vector x [n,E]) pairs from
 * SQLite: each must be stored, bit for bit (Flat) or scoring its own dot
 * product at its own slot (IVF). Adds the disagreements to *nbad and sets
 * *first_bad at the first one. */
int blip_vcache_compare(blip_vcache *vc, int64_t n, const int64_t *ids, const float *x, int64_t *nbad,
                        int64_t *first_bad);
/* Write the in-memory index to the file if it is not there already. */
int blip_vcache_save(blip_vcache *vc);
/* Apply a committed change (generation gen_before -> gen_before+1) to the
 * in-memory index; when it cannot be applied the index is dropped (rebuilt later). */
void blip_vcache_apply(blip_vcache *vc, int64_t gen_before, const int64_t *del, int64_t ndel, const float *x,
                       const int64_t *ids, int64_t nadd);
void blip_vcache_drop(blip_vcache *vc);
/* k nearest by inner product for nq queries [nq,E]: dis/lab [nq,k], -1 labels past the end. */
int blip_vcache_search(blip_vcache *vc, int64_t nq, const float *q, int64_t k, float *dis, int64_t *lab);

#endif
