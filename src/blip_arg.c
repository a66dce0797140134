/* blip_arg: see blip_arg.h. strtoll/strtod do the conversion; the checks
 * around them reject what they would let through (leading spaces, empty
 * strings, trailing text, overflow, NaN). */
#include "blip_arg.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "blip_err.h"

int blip_arg_long(const char *opt, const char *s, long long min, long long max, long long *out) {
  char *end = NULL;
  errno = 0;
  long long v = isdigit((unsigned char)s[0]) || ((s[0] == '-' || s[0] == '+') && isdigit((unsigned char)s[1]))
                    ? strtoll(s, &end, 10)
                    : 0;
  if (!end || *end) return blip_err_set(BLIP_EINVAL, "%s: '%s' is not a whole number", opt, s);
  if (errno == ERANGE || v < min || v > max)
    return blip_err_set(BLIP_EINVAL, "%s: %s is out of range (%lld..%lld)", opt, s, min, max);
  *out = v;
  return BLIP_OK;
}

long long blip_arg_must(const char *tool, const char *opt, const char *s, long long min, long long max) {
  long long v;
  if (blip_arg_long(opt, s, min, max, &v)) {
    fprintf(stderr, "%s: %s\n", tool, blip_err_last());
    exit(2);
  }
  return v;
}

int blip_arg_int(const char *opt, const char *s, int min, int max, int *out) {
  long long v;
  int rc = blip_arg_long(opt, s, min, max, &v);
  if (!rc) *out = (int)v;
  return rc;
}

int blip_arg_real(const char *opt, const char *s, double min, double max, double *out) {
  char *end = NULL;
  double v = s[0] && !isspace((unsigned char)s[0]) ? strtod(s, &end) : 0;
  if (!end || *end || !isfinite(v)) return blip_err_set(BLIP_EINVAL, "%s: '%s' is not a number", opt, s);
  if (v < min || v > max) return blip_err_set(BLIP_EINVAL, "%s: %s is out of range (%g..%g)", opt, s, min, max);
  *out = v;
  return BLIP_OK;
}

int blip_arg_max_threads(void) { return BLIP_ARG_THREADS_PER_CORE * omp_get_num_procs(); }

int blip_arg_threads(const char *opt, const char *s, int *out) {
  return blip_arg_int(opt, s, 1, blip_arg_max_threads(), out);
}

/* n digits at s as a number, or -1 */
static int num(const char *s, int n) {
  int v = 0;
  for (int i = 0; i < n; i++) {
    if (!isdigit((unsigned char)s[i])) return -1;
    v = v * 10 + (s[i] - '0');
  }
  return v;
}

int blip_arg_date(const char *opt, const char *s, char out[20]) {
  static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  size_t n = strlen(s);
  int ok = (n == 10 || n == 16 || n == 19) && s[4] == '-' && s[7] == '-';
  int y = ok ? num(s, 4) : -1, mo = ok ? num(s + 5, 2) : -1, d = ok ? num(s + 8, 2) : -1, h = 0, mi = 0, se = 0;
  ok = ok && y >= 1 && mo >= 1 && mo <= 12 && d >= 1;
  if (ok) {
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    ok = d <= mdays[mo - 1] + (mo == 2 && leap);
  }
  if (ok && n > 10) {
    ok = (s[10] == 'T' || s[10] == ' ') && s[13] == ':' && (n == 16 || s[16] == ':');
    h = num(s + 11, 2), mi = num(s + 14, 2), se = n == 19 ? num(s + 17, 2) : 0;
    ok = ok && h >= 0 && h < 24 && mi >= 0 && mi < 60 && se >= 0 && se < 60;
  }
  if (!ok)
    return blip_err_set(BLIP_EINVAL, "%s: bad date '%s' (want a real day as YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS])", opt,
                        s);
  snprintf(out, 20, "%04d-%02d-%02dT%02d:%02d:%02d", y, mo, d, h, mi, se);
  return BLIP_OK;
}

int blip_arg_regular_file(const char *path) {
  struct stat sb;
  if (stat(path, &sb) != 0) return blip_err_set(BLIP_EIO, "%s: %s", path, strerror(errno));
  if (S_ISREG(sb.st_mode)) return BLIP_OK;
  const char *what = S_ISDIR(sb.st_mode) ? "a folder" : S_ISFIFO(sb.st_mode) ? "a FIFO" : S_ISSOCK(sb.st_mode) ? "a socket"
                     : S_ISCHR(sb.st_mode) || S_ISBLK(sb.st_mode) ? "a device" : "special";
  return blip_err_set(BLIP_EINVAL, "%s: not a regular file (%s)", path, what);
}
