/* blip_err: see blip_err.h. Messages are truncated to a fixed buffer so that
 * error reporting itself can never fail or allocate. */
#include "blip_err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char g_msg[1024];

int blip_err_set(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_msg, sizeof g_msg, fmt, ap);
  va_end(ap);
  return code;
}

int blip_err_wrap(int code, const char *fmt, ...) {
  char prev[sizeof g_msg], pre[512];
  memcpy(prev, g_msg, sizeof prev);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(pre, sizeof pre, fmt, ap);
  va_end(ap);
  snprintf(g_msg, sizeof g_msg, "%s: %s", pre, prev);
  return code;
}

int blip_err_errno(const char *what, const char *path) {
  int e = errno;
  if (e == ENOSPC || e == EFBIG || e == EDQUOT)
    return blip_err_set(BLIP_EFULL, "%s %s: %s", what, path,
                        e == ENOSPC ? "disk full (ENOSPC)" : e == EDQUOT ? "disk quota exceeded (EDQUOT)"
                                                           : "file size limit reached (EFBIG: see ulimit -f)");
  return blip_err_set(BLIP_EIO, "%s %s: %s", what, path, strerror(e));
}

const char *blip_err_last(void) { return g_msg; }

const char *blip_err_name(int code) {
  switch (code) {
  case BLIP_OK: return "ok";
  case BLIP_EINVAL: return "invalid argument";
  case BLIP_ENOMEM: return "out of memory";
  case BLIP_EIO: return "i/o error";
  case BLIP_EFORMAT: return "malformed input";
  case BLIP_ESHAPE: return "wrong shape";
  case BLIP_EMISSING: return "missing";
  case BLIP_EUNSUPPORTED: return "unsupported";
  case BLIP_ETOOBIG: return "too large";
  case BLIP_EMISMATCH: return "mismatch";
  case BLIP_EDB: return "database error";
  case BLIP_EFULL: return "disk full";
  case BLIP_EINTR: return "interrupted";
  case BLIP_ENOTFOUND: return "not found";
  default: return "unknown error";
  }
}
