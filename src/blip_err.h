/* blip_err: integer error codes and a thread-local last-error message.
 *
 * Every fallible function in blipsearch returns an int: BLIP_OK (0) on
 * success, a negative BLIP_E* code on failure, having first recorded a
 * human-readable message with blip_err_set(). The message is per thread
 * (like faiss_get_last_error) and is NOT cleared on success: read it only
 * right after a call has failed. */
#ifndef BLIP_ERR_H
#define BLIP_ERR_H

enum {
  BLIP_OK = 0,
  BLIP_EINVAL = -1,       /* bad argument from the caller */
  BLIP_ENOMEM = -2,       /* allocation failed */
  BLIP_EIO = -3,          /* open/read/write/mmap failed (errno text in message) */
  BLIP_EFORMAT = -4,      /* malformed file contents (JSON, safetensors, image) */
  BLIP_ESHAPE = -5,       /* tensor has the wrong shape or dtype */
  BLIP_EMISSING = -6,     /* a required tensor, key or file is absent */
  BLIP_EUNSUPPORTED = -7, /* valid input we do not handle */
  BLIP_ETOOBIG = -8,      /* input exceeds a configured guard */
  BLIP_EMISMATCH = -9,    /* index built with another model or settings */
  BLIP_EDB = -10,         /* SQLite or FAISS failure */
  BLIP_EFULL = -11,       /* disk full */
  BLIP_EINTR = -12,       /* stopped by a signal or a time budget */
  BLIP_ENOTFOUND = -13,   /* lookup found nothing (no such db, empty index) */
};

/* Record message (printf-style) for this thread and return code. */
int blip_err_set(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prefix the current message with "ctx: " (for adding the file name etc.); returns code. */
int blip_err_wrap(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Record "what path: strerror(errno)" as BLIP_EFULL for ENOSPC/EFBIG/EDQUOT,
 * else BLIP_EIO; returns the code. */
int blip_err_errno(const char *what, const char *path);
const char *blip_err_last(void);
const char *blip_err_name(int code);

#endif
