/* blip_decode: the guarded decode path. Every photo a tool reads goes
 * through here: the file is opened once, read whole, hashed whole, and
 * decoded by blip_img in a separate worker process, so that a decoder that
 * crashes, aborts, hangs or eats memory costs one error for that file, never
 * the calling process.
 *
 *   parent                                   worker (this binary, re-executed)
 *   open(O_NONBLOCK) + fstat (regular only)
 *   read into a memfd, XXH3-64 of all bytes
 *   send {options, name} + the memfd  ---->  map it, read the header
 *   memory budget: wait for room      <----  ADMIT bytes (from width*height)
 *   GO                                ---->  decode + PIL resize
 *   normalize into out[3*S*S]         <----  {rc, meta, message, S*S RGB}
 *
 * The parent kills a worker that overruns the time budget (SIGKILL) and
 * starts a new one for the next file; each worker's address space is capped.
 * Calls are thread-safe: up to `workers` files decode at once. */
#ifndef BLIP_DECODE_H
#define BLIP_DECODE_H

#include <signal.h>
#include <stdint.h>

#include "blip_img.h"

typedef struct blip_decode blip_decode;

typedef struct {
  int workers;           /* decoder processes, started on first use (>= 1) */
  int64_t memory_cap;    /* bytes each worker may map beyond its start-up size (default 4 GiB) */
  int64_t memory_budget; /* bytes all decodes in flight may hold together, by their header's estimate;
                          * a decode larger than the budget runs alone (default: a quarter of RAM, >= 1 GiB) */
  volatile sig_atomic_t *stop; /* set (e.g. by SIGINT): calls in flight end with BLIP_EINTR; may be NULL */
} blip_decode_opts;

/* What the one descriptor said about the bytes that were decoded. */
typedef struct {
  int read;             /* 1 when the fields below are set (the file was opened and read whole) */
  int64_t size, mtime_ns; /* fstat of that descriptor, unchanged while it was read */
  uint64_t fingerprint; /* XXH3-64 of every byte */
} blip_decode_info;

void blip_decode_opts_default(blip_decode_opts *o);
int blip_decode_new(const blip_decode_opts *o, blip_decode **out);
/* Start every worker now (they otherwise start on first use): a run fails
 * here, as a whole, when processes cannot be started at all (no /proc, a
 * process limit), instead of failing each photo. */
int blip_decode_start(blip_decode *d);
/* Stops the workers (no decode may be in flight). NULL is fine. */
void blip_decode_free(blip_decode *d);

/* Decode path as blip_img_load_file would (same options, same results),
 * isolated. info (may be NULL) is filled whenever the bytes were read, also
 * when the decode then fails, so an error row records the version that
 * failed. Worker failures are errors of this file: "decoder crashed
 * (SIGSEGV)" (BLIP_EFORMAT), "decoder exceeded 60 s" (BLIP_EINTR),
 * "decoder exceeded its memory cap" (BLIP_ETOOBIG). A stop request gives
 * BLIP_EINTR with "stopped". */
int blip_decode_file(blip_decode *d, const char *path, const blip_img_opts *o, float *out, uint8_t *rgb,
                     blip_img_meta *meta, blip_decode_info *info);

/* Open, read and hash a whole file through one descriptor, as
 * blip_decode_file does, without decoding it (classifying changed files and
 * moves). */
int blip_decode_fingerprint(const char *path, int64_t max_bytes, blip_decode_info *info);

/* The most decodes that held memory at once so far (the budget at work). */
int blip_decode_peak(blip_decode *d);

/* Decode paths[0..n) into out[n][3*S*S] through a temporary one-worker pool
 * (query images, blip-embed); stops at the first failure. */
int blip_decode_paths(const char *const *paths, int n, const blip_img_opts *o, float *out);

#endif
