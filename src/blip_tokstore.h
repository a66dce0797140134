/* blip_tokstore: the rerank store, tokens.bin: the vision tokens [T,Dv] of
 * every image, at a fixed-size record per image id, read through mmap so
 * that a query touches only its top-k candidates.
 *
 * File: a 64-byte header (magic, format, T, Dv, stride), then record id at
 * HDR + id*stride. A record = {int64 id, uint64 fingerprint} tag + payload,
 * so a reader can tell a record that belongs to its row from a hole or from
 * an uncommitted leftover. The owner (blip_store) writes a batch's records,
 * syncs them, and only then commits the rows that point at them, each with
 * its record's checksum (XXH3-64 of tag + payload), which readers check. */
#ifndef BLIP_TOKSTORE_H
#define BLIP_TOKSTORE_H

#include <stddef.h>
#include <stdint.h>

typedef enum { BLIP_TOKENS_NONE = 0, BLIP_TOKENS_I8 = 1, BLIP_TOKENS_F16 = 2 } blip_tokens_fmt;

typedef struct blip_tokstore blip_tokstore;

/* Payload codec (int8 + per-token scale, or f16), exposed for tests and
 * benchmarks. rec must hold blip_tokstore_payload_size(fmt,T,Dv) bytes. */
size_t blip_tokstore_payload_size(blip_tokens_fmt fmt, int T, int Dv);
void blip_tokstore_encode(blip_tokens_fmt fmt, int T, int Dv, const float *x, uint8_t *rec);
void blip_tokstore_decode(blip_tokens_fmt fmt, int T, int Dv, const uint8_t *rec, float *x);

/* Open DIR/tokens.bin (write: created, header written and synced). A reader
 * finding no file gets a store that holds no records. A header that does not
 * match fmt/T/Dv is damage (damaged() = 1): records are still read at this
 * geometry, each checked by its tag and checksum; the writer writes the
 * header again, and its owner checks every record before trusting it. */
int blip_tokstore_open(const char *dir, blip_tokens_fmt fmt, int T, int Dv, int write, blip_tokstore **out);
void blip_tokstore_close(blip_tokstore *ts);
/* Whether the file is open (records can be read or written). */
int blip_tokstore_present(const blip_tokstore *ts);
size_t blip_tokstore_stride(const blip_tokstore *ts); /* bytes per image on disk */
int blip_tokstore_damaged(const blip_tokstore *ts);
const char *blip_tokstore_path(const blip_tokstore *ts);
/* Ids below this have a whole record slot in the file (0 when there is none). */
int64_t blip_tokstore_slots(const blip_tokstore *ts);

/* Writer: record of image id with content fingerprint fp (not yet durable);
 * *sum gets the record's checksum. */
int blip_tokstore_put(blip_tokstore *ts, int64_t id, uint64_t fp, const float *tokens, uint64_t *sum);
/* Writer: make every record written so far durable. */
int blip_tokstore_sync(blip_tokstore *ts);
/* Writer: free a deleted id's record (best effort: the row is gone already). */
void blip_tokstore_punch(blip_tokstore *ts, int64_t id);
/* Writer: drop records past max_id (leftovers of a crash). */
int blip_tokstore_truncate(blip_tokstore *ts, int64_t max_id);
/* Tokens [T,Dv] of image id, whose row has fingerprint fp and checksum *sum
 * (NULL: none recorded, the tag alone is checked; out NULL: check only).
 * BLIP_ENOTFOUND past the end of the file (or none), BLIP_EFORMAT for a
 * record of another row (or a hole) or one whose checksum differs. */
int blip_tokstore_get(blip_tokstore *ts, int64_t id, uint64_t fp, const uint64_t *sum, float *out);
/* Checksum of record id as it is on disk, after checking its tag (for rows
 * from before checksums were kept). Errors as get. */
int blip_tokstore_sum(blip_tokstore *ts, int64_t id, uint64_t fp, uint64_t *sum);

#endif
