/* check.h: the tiny test harness shared by every tests/test_*.c.
 * CHECK records a failure and continues, so one run reports every mismatch;
 * check_tensor compares float arrays the llama2.c/llm.c way (max abs error
 * against a tolerance, printing the worst index). main() returns
 * check_summary(), which prints "N passed, M failed". */
#ifndef BLIP_CHECK_H
#define BLIP_CHECK_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_pass, g_fail;

#define CHECK(cond, ...)                                                    \
  do {                                                                      \
    if (cond) {                                                             \
      g_pass++;                                                             \
    } else {                                                                \
      g_fail++;                                                             \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);       \
      fprintf(stderr, __VA_ARGS__);                                         \
      fputc('\n', stderr);                                                  \
    }                                                                       \
  } while (0)

/* Fail and return from the test function when a call returns non-zero. */
#define CHECK_OK(expr)                                                      \
  do {                                                                      \
    int rc_ = (expr);                                                       \
    if (rc_ != 0) {                                                         \
      g_fail++;                                                             \
      fprintf(stderr, "FAIL %s:%d: %s -> %d: %s\n", __FILE__, __LINE__,     \
              #expr, rc_, blip_err_last());                                 \
      return;                                                               \
    }                                                                       \
    g_pass++;                                                               \
  } while (0)

/* Max abs diff between a and b over n values; prints it under label.
 * Returns the max diff so callers can report figures. */
static inline double check_tensor(const char *label, const float *a, const float *b, long n, double tol) {
  double worst = 0;
  long wi = 0;
  int bad = 0;
  for (long i = 0; i < n; i++) {
    double d = fabs((double)a[i] - (double)b[i]);
    if (d > worst || d != d) { worst = d; wi = i; }
    if (!(d <= tol)) bad = 1;
  }
  printf("  %-40s n=%-8ld max|diff|=%.3g (tol %.3g)%s\n", label, n, worst, tol, bad ? "  <-- FAIL" : "");
  if (bad) {
    g_fail++;
    fprintf(stderr, "FAIL %s: at %ld got %.8g want %.8g\n", label, wi, a[wi], b[wi]);
  } else {
    g_pass++;
  }
  return worst;
}

static inline const char *test_data(const char *rel) {
  static char buf[8][4096];
  static int k;
  const char *root = getenv("BLIP_TEST_DATA");
  char *b = buf[k++ & 7];
  snprintf(b, sizeof buf[0], "%s/%s", root ? root : "tests/data", rel);
  return b;
}

static inline int check_summary(void) {
  printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}

#endif
