/* test_out: the shared output and option helpers (blip_out, blip_arg).
 * Escaping: every C0/DEL/C1 control and invalid byte is escaped, valid
 * UTF-8 is kept, and the escaped form decodes back to the exact bytes for
 * every byte string tried. JSON: a non-UTF-8 name keeps its key (lossy text)
 * and its exact bytes (base64); NaN is null. Options: the values the tools
 * used to misread are refused; dates are real calendar days. */
#include "blip_arg.h"
#include "blip_err.h"
#include "blip_out.h"
#include "check.h"

#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

/* blip_out_fesc's output for s (static buffer) */
static const char *esc(const char *s) {
  static char buf[4096];
  FILE *f = fmemopen(buf, sizeof buf, "w");
  blip_out_fesc(f, s);
  long n = ftell(f); /* fmemopen writes no NUL for an empty output */
  fclose(f);
  buf[n] = 0;
  return buf;
}

static void test_escape(void) {
  CHECK(!strcmp(esc("plain/café 日本.jpg"), "plain/café 日本.jpg"), "valid UTF-8 kept: %s", esc("plain/café 日本.jpg"));
  CHECK(!strcmp(esc("a\x1b]0;pwn\x07z"), "a\\x1b]0;pwn\\x07z"), "ESC/BEL: %s", esc("a\x1b]0;pwn\x07z"));
  CHECK(!strcmp(esc("t\tn\nr\r\\"), "t\\tn\\nr\\r\\\\"), "tab, newline, CR, backslash: %s", esc("t\tn\nr\r\\"));
  CHECK(!strcmp(esc("del\x7f"), "del\\x7f"), "DEL: %s", esc("del\x7f"));
  CHECK(!strcmp(esc("c1\xc2\x9b" "2J"), "c1\\xc2\\x9b2J"), "C1 CSI as UTF-8: %s", esc("c1\xc2\x9b" "2J"));
  CHECK(!strcmp(esc("raw\x9b"), "raw\\x9b"), "raw C1 byte: %s", esc("raw\x9b"));
  CHECK(!strcmp(esc("\xc2\xa0ok"), "\xc2\xa0ok"), "U+00A0 is not C1");
  CHECK(!strcmp(esc("\xff\xfe"), "\\xff\\xfe"), "invalid bytes: %s", esc("\xff\xfe"));
  CHECK(!strcmp(esc("\xc0\xaf"), "\\xc0\\xaf"), "overlong '/': %s", esc("\xc0\xaf"));
  CHECK(!strcmp(esc("\xed\xa0\x80"), "\\xed\\xa0\\x80"), "surrogate: %s", esc("\xed\xa0\x80"));
  CHECK(!strcmp(esc("\xf4\x90\x80\x80"), "\\xf4\\x90\\x80\\x80"), "> U+10FFFF");
  CHECK(!strcmp(esc("\xe6\x97"), "\\xe6\\x97"), "cut sequence: %s", esc("\xe6\x97"));
  /* round trip over random byte strings: escaped text is valid UTF-8, control-free, and decodes exactly */
  uint64_t r = 7;
  int bad = 0;
  for (int t = 0; t < 20000 && !bad; t++) {
    char s[24], e[24 * 4 + 1], back[sizeof e];
    int n = 1 + t % 23;
    for (int i = 0; i < n; i++) {
      r = r * 6364136223846793005ull + 1442695040888963407ull;
      s[i] = t % 3 ? (char)((r >> 33) % 255 + 1) : "a\\\x1b\xc2\x9b\xe6\x97\xa5\t\n"[(r >> 33) % 10];
    }
    s[n] = 0;
    snprintf(e, sizeof e, "%s", esc(s));
    long m = blip_out_unesc(e, back);
    int ctrl = 0;
    for (const unsigned char *p = (const unsigned char *)e; *p; p++) ctrl |= *p < 0x20 || *p == 0x7f;
    if (m != (long)strlen(s) || memcmp(back, s, (size_t)m) || !blip_out_utf8_valid(e) || ctrl || strstr(e, "\xc2\x80") ||
        strstr(e, "\xc2\x9b")) {
      bad = 1;
      CHECK(0, "round trip of case %d: %s", t, e);
    }
  }
  CHECK(!bad, "20000 random names round trip");
  char out[16];
  CHECK(blip_out_unesc("a\\", out) == -1 && blip_out_unesc("\\q", out) == -1 && blip_out_unesc("\\x4", out) == -1 &&
            blip_out_unesc("\\xg0", out) == -1,
        "malformed escapes refused");
  CHECK(blip_out_unesc("\\x1B\\\\", out) == 2 && !strcmp(out, "\x1b\\"), "upper-case hex, backslash");
}

static void test_json(void) {
  json_t *o = json_object();
  CHECK(blip_out_json_name(o, "path", "/p/ok.jpg") == 0, "set");
  CHECK(blip_out_json_name(o, "query", "bad\xff\xfe name") == 0, "set invalid");
  json_object_set_new(o, "score", blip_out_json_num(NAN));
  json_object_set_new(o, "inf", blip_out_json_num(INFINITY));
  json_object_set_new(o, "cos", blip_out_json_num(0.5));
  char *s = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
  CHECK(s && !strcmp(s, "{\"cos\":0.5,\"inf\":null,\"path\":\"/p/ok.jpg\",\"path_b64\":null,\"query\":\"bad\xef\xbf\xbd"
                        "\xef\xbf\xbd name\",\"query_b64\":\"YmFk//4gbmFtZQ==\",\"score\":null}"),
        "every key present: %s", s);
  free(s);
  json_decref(o);
  /* base64 lengths 0..3 mod 3, checked against the alphabet by hand */
  static const char *const in[] = {"\xff", "\xff\xfe", "\xff\xfe\xfd", "\x80" "abcd"};
  static const char *const want[] = {"/w==", "//4=", "//79", "gGFiY2Q="};
  for (int i = 0; i < 4; i++) {
    json_t *x = json_object();
    blip_out_json_name(x, "k", in[i]);
    const char *b = json_string_value(json_object_get(x, "k_b64"));
    CHECK(b && !strcmp(b, want[i]), "base64 %d: %s", i, b ? b : "(null)");
    json_decref(x);
  }
}

static void test_numbers(void) {
  int v = -1;
  long long l;
  double d;
  CHECK(blip_arg_int("-n", "4294967297", 1, 1000000, &v) == BLIP_EINVAL && v == -1, "no wrap: %d", v);
  CHECK(strstr(blip_err_last(), "out of range"), "%s", blip_err_last());
  CHECK(blip_arg_int("--rerank", "", 0, 4096, &v) == BLIP_EINVAL, "empty");
  CHECK(strstr(blip_err_last(), "--rerank") && strstr(blip_err_last(), "not a whole number"), "%s", blip_err_last());
  CHECK(blip_arg_int("x", " 5", 0, 9, &v) == BLIP_EINVAL, "leading space");
  CHECK(blip_arg_int("x", "5 ", 0, 9, &v) == BLIP_EINVAL, "trailing space");
  CHECK(blip_arg_int("x", "0x5", 0, 9, &v) == BLIP_EINVAL, "hex");
  CHECK(blip_arg_int("x", "5.0", 0, 9, &v) == BLIP_EINVAL, "decimal point");
  CHECK(blip_arg_int("x", "-", -9, 9, &v) == BLIP_EINVAL, "sign only");
  CHECK(blip_arg_long("x", "99999999999999999999", 0, INT64_MAX, &l) == BLIP_EINVAL, "overflow");
  CHECK(blip_arg_int("x", "-5", -9, 9, &v) == BLIP_OK && v == -5, "negative");
  CHECK(blip_arg_int("x", "+7", 0, 9, &v) == BLIP_OK && v == 7, "plus");
  CHECK(blip_arg_threads("--threads", "abc", &v) == BLIP_EINVAL, "threads abc");
  CHECK(blip_arg_threads("--threads", "-5", &v) == BLIP_EINVAL, "threads -5");
  CHECK(blip_arg_threads("--threads", "0", &v) == BLIP_EINVAL, "threads 0");
  CHECK(blip_arg_threads("--threads", "100000", &v) == BLIP_EINVAL, "threads 100000");
  char mx[16];
  snprintf(mx, sizeof mx, "%d", blip_arg_max_threads());
  CHECK(blip_arg_threads("--threads", mx, &v) == BLIP_OK && v == blip_arg_max_threads(), "threads at the cap");
  CHECK(blip_arg_max_threads() >= 4 && blip_arg_max_threads() <= 4 * 4096, "cap %d", blip_arg_max_threads());
  CHECK(blip_arg_real("--threshold", "", 0, 1, &d) == BLIP_EINVAL, "empty real");
  CHECK(blip_arg_real("--threshold", "nan", 0, 1, &d) == BLIP_EINVAL, "nan");
  CHECK(blip_arg_real("--threshold", "1.5", 0, 1, &d) == BLIP_EINVAL, "range");
  CHECK(blip_arg_real("--threshold", "0.25", 0, 1, &d) == BLIP_OK && d == 0.25, "0.25");
}

static void test_dates(void) {
  char out[20];
  static const char *const bad[] = {"2024-02-30", "2023-02-29", "1900-02-29", "2024-04-31", "2024-13-01", "2024-00-10",
                                    "2024-01-00", "2024-1-01", "2024-01-01T24:00", "2024-01-01T12:60",
                                    "2024-01-01T12:00:60", "2024-01-01x", "0000-01-01", "", "2024-01-01T1:00"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
    CHECK(blip_arg_date("--after", bad[i], out) == BLIP_EINVAL, "accepted '%s'", bad[i]);
  CHECK(strstr(blip_err_last(), "--after") && strstr(blip_err_last(), "bad date"), "%s", blip_err_last());
  static const char *const good[][2] = {{"2024-02-29", "2024-02-29T00:00:00"}, {"2000-02-29", "2000-02-29T00:00:00"},
                                        {"2024-12-31T23:59", "2024-12-31T23:59:00"},
                                        {"2024-06-01 08:30:15", "2024-06-01T08:30:15"}};
  for (size_t i = 0; i < sizeof good / sizeof *good; i++)
    CHECK(blip_arg_date("--after", good[i][0], out) == BLIP_OK && !strcmp(out, good[i][1]), "'%s' -> '%s'",
          good[i][0], out);
}

static void test_regular_file(void) {
  char dir[] = "/tmp/blip_test_out.XXXXXX", fifo[64], file[64];
  CHECK(mkdtemp(dir) != NULL, "mkdtemp");
  snprintf(fifo, sizeof fifo, "%s/x.jpg", dir);
  snprintf(file, sizeof file, "%s/y.jpg", dir);
  CHECK(mkfifo(fifo, 0644) == 0, "mkfifo");
  FILE *f = fopen(file, "w");
  if (f) fclose(f);
  CHECK(blip_arg_regular_file(fifo) == BLIP_EINVAL && strstr(blip_err_last(), "FIFO"), "FIFO: %s", blip_err_last());
  CHECK(blip_arg_regular_file(dir) == BLIP_EINVAL && strstr(blip_err_last(), "folder"), "dir: %s", blip_err_last());
  CHECK(blip_arg_regular_file(file) == BLIP_OK, "file");
  CHECK(blip_arg_regular_file("/nonexistent/z.jpg") == BLIP_EIO, "missing");
  unlink(fifo);
  unlink(file);
  rmdir(dir);
}

int main(void) {
  test_escape();
  test_json();
  test_numbers();
  test_dates();
  test_regular_file();
  return check_summary();
}
