/* test_tok: blip_tok against the Hugging Face slow BertTokenizer golden file
 * (tests/data/tokenizer/golden.jsonl, 422 lines, see its README). Every line
 * is checked on every field; the per-field match counts are printed so the
 * figure can be quoted. Also: vocab loading failures, lookups, truncation by
 * cap, invalid UTF-8. */
#include "blip_err.h"
#include "blip_tok.h"
#include "check.h"

#include <jansson.h>

#define CAP 1024

static blip_tok *g_tok;

/* ids (and, when mask is given, the 35-wide padded form) equal the JSON arrays. */
static int same_ids(const int32_t *ids, int n, int width, json_t *want_ids, json_t *want_mask) {
  if (!json_is_array(want_ids) || (int)json_array_size(want_ids) != (width ? width : n)) return 0;
  for (int i = 0; i < (width ? width : n); i++) {
    long long want = json_integer_value(json_array_get(want_ids, (size_t)i));
    if (want != (i < n ? ids[i] : BLIP_TOK_PAD)) return 0;
    if (want_mask && json_integer_value(json_array_get(want_mask, (size_t)i)) != (i < n)) return 0;
  }
  return 1;
}

enum { F_IDS, F_IDS35, F_PRE, F_IDS_PRE, F_IDS_PRE35, N_FIELDS };
static const char *const k_field[N_FIELDS] = {"ids", "ids_35+mask_35", "pre_caption", "ids_pre",
                                              "ids_pre_35+mask_pre_35"};

/* Encode text both ways (no limit; 35 = BLIP retrieval) and compare. */
static void check_encode(const char *src, const char *text, size_t len, json_t *j, const char *f_ids,
                         const char *f_35, const char *f_mask, int *ok_full, int *ok_35) {
  int32_t ids[CAP];
  int n, full;
  int rc = blip_tok_encode(g_tok, text, len, 0, ids, CAP, &n, &full);
  int ok = rc == 0 && n == full && same_ids(ids, n, 0, json_object_get(j, f_ids), NULL);
  CHECK(ok, "%s: %s differs (rc %d, %d ids)", src, f_ids, rc, n);
  *ok_full += ok;
  int n35, full35;
  rc = blip_tok_encode(g_tok, text, len, 35, ids, CAP, &n35, &full35);
  ok = rc == 0 && full35 == full && n35 == (full < 35 ? full : 35) &&
       same_ids(ids, n35, 35, json_object_get(j, f_35), json_object_get(j, f_mask));
  CHECK(ok, "%s: %s differs (rc %d, %d ids of %d)", src, f_35, rc, n35, full35);
  *ok_35 += ok;
}

static void test_golden(void) {
  const char *path = test_data("tokenizer/golden.jsonl");
  FILE *f = fopen(path, "r");
  CHECK(f != NULL, "cannot open %s", path);
  if (!f) return;
  int ok[N_FIELDS] = {0}, lines = 0;
  char *line = NULL;
  size_t linecap = 0;
  while (getline(&line, &linecap, f) > 0) {
    json_error_t err;
    json_t *j = json_loads(line, JSON_ALLOW_NUL, &err);
    CHECK(j != NULL, "golden line %d: %s", lines + 1, err.text);
    if (!j) continue;
    lines++;
    const char *src = json_string_value(json_object_get(j, "source"));
    json_t *jt = json_object_get(j, "text"), *jp = json_object_get(j, "pre_caption");
    const char *text = json_string_value(jt), *want_pre = json_string_value(jp);
    CHECK(src && text && want_pre, "golden line %d lacks source/text/pre_caption", lines);
    if (!src || !text || !want_pre) {
      json_decref(j);
      continue;
    }
    check_encode(src, text, json_string_length(jt), j, "ids", "ids_35", "mask_35", &ok[F_IDS], &ok[F_IDS35]);

    char *pre = NULL; /* may hold a NUL, as Python's does: compare lengths */
    size_t want_len = json_string_length(jp), pre_len = 0;
    int rc = blip_tok_pre_caption(text, json_string_length(jt), 30, &pre, &pre_len);
    int same = rc == 0 && pre_len == want_len && memcmp(pre, want_pre, want_len + 1) == 0;
    CHECK(same, "%s: pre_caption got \"%s\" want \"%s\"", src, rc ? blip_err_last() : pre, want_pre);
    ok[F_PRE] += same;
    if (same)
      check_encode(src, pre, pre_len, j, "ids_pre", "ids_pre_35", "mask_pre_35", &ok[F_IDS_PRE], &ok[F_IDS_PRE35]);
    free(pre);
    json_decref(j);
  }
  free(line);
  fclose(f);
  CHECK(lines == 422, "golden has %d lines, README says 422", lines);
  for (int k = 0; k < N_FIELDS; k++) {
    printf("  golden %-24s %d/%d lines identical\n", k_field[k], ok[k], lines);
    CHECK(ok[k] == lines, "%s: %d of %d lines match", k_field[k], ok[k], lines);
  }
}

static void test_vocab(void) {
  CHECK(blip_tok_size(g_tok) == 30524, "size %d", blip_tok_size(g_tok));
  CHECK(blip_tok_dec_id(g_tok) == 30522 && blip_tok_enc_id(g_tok) == 30523, "added ids %d %d",
        blip_tok_dec_id(g_tok), blip_tok_enc_id(g_tok));
  CHECK(blip_tok_id(g_tok, "[MASK]") == BLIP_TOK_MASK, "[MASK] %d", blip_tok_id(g_tok, "[MASK]"));
  CHECK(blip_tok_id(g_tok, "[ENC]") == 30523, "[ENC] %d", blip_tok_id(g_tok, "[ENC]"));
  CHECK(blip_tok_id(g_tok, "dog") == 3899, "dog %d", blip_tok_id(g_tok, "dog"));
  CHECK(blip_tok_id(g_tok, "##ing") == 2075, "##ing %d", blip_tok_id(g_tok, "##ing"));
  CHECK(blip_tok_id(g_tok, "no-such-token") == -1, "absent token found");
  CHECK(blip_tok_token(g_tok, 3899) && strcmp(blip_tok_token(g_tok, 3899), "dog") == 0, "token 3899");
  CHECK(blip_tok_token(g_tok, 30522) && strcmp(blip_tok_token(g_tok, 30522), "[DEC]") == 0, "token 30522");
  CHECK(blip_tok_token(g_tok, 30524) == NULL && blip_tok_token(g_tok, -1) == NULL, "out-of-range token");
}

/* Loading must fail with the given code, leaving *out NULL. */
static void expect_load_fail(const char *what, const char *buf, size_t len, int want) {
  blip_tok *t = (blip_tok *)1;
  int rc = blip_tok_load_mem(buf, len, &t);
  CHECK(rc == want && t == NULL, "%s: rc %d (%s), want %d", what, rc, blip_err_last(), want);
  if (rc == want) printf("  rejects %-26s %s\n", what, blip_err_last());
}

/* A minimal vocab: [PAD], 99 unused, [UNK], [CLS], [SEP], [MASK], a, ##b. */
static char *mini_vocab(const char *swap_from, const char *swap_to) {
  static char buf[4096];
  size_t o = 0;
  o += (size_t)snprintf(buf + o, sizeof buf - o, "[PAD]\n");
  for (int i = 1; i < 100; i++) o += (size_t)snprintf(buf + o, sizeof buf - o, "[unused%d]\n", i);
  o += (size_t)snprintf(buf + o, sizeof buf - o, "[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n##b");
  if (swap_from) { /* same-length replacement */
    char *p = strstr(buf, swap_from);
    if (p) memcpy(p, swap_to, strlen(swap_to));
  }
  return buf;
}

static void test_bad_vocab(void) {
  blip_tok *t = NULL;
  int rc = blip_tok_load(test_data("tokenizer/no-such-vocab.txt"), &t);
  CHECK(rc == BLIP_EIO && t == NULL, "nonexistent path: rc %d", rc);
  rc = blip_tok_load(test_data("tokenizer"), &t);
  CHECK(rc == BLIP_EIO && t == NULL, "directory as vocab: rc %d", rc);
  expect_load_fail("empty file", "", 0, BLIP_EFORMAT);
  expect_load_fail("one newline", "\n", 1, BLIP_EFORMAT);
  static const char garbage[] = "\x89PNG\r\n\x1a\n\0\0\0\rIHDR\xff\xfe garbage \x80\x81";
  expect_load_fail("binary garbage", garbage, sizeof garbage - 1, BLIP_EFORMAT);
  char *v = mini_vocab(NULL, NULL);
  CHECK(blip_tok_load_mem(v, strlen(v), &t) == 0, "mini vocab: %s", blip_err_last());
  if (t) {
    int32_t ids[8];
    int n, full;
    CHECK(blip_tok_size(t) == 108 && blip_tok_dec_id(t) == 106, "mini size %d", blip_tok_size(t));
    rc = blip_tok_encode(t, "AB ab a[DEC]", 12, 0, ids, 8, &n, &full);
    CHECK(rc == 0 && n == 8 && ids[1] == 104 && ids[2] == 105 && ids[3] == 104 && ids[4] == 105 && ids[5] == 104 &&
              ids[6] == 106 && ids[7] == BLIP_TOK_SEP,
          "mini encode rc %d n %d", rc, n);
    blip_tok_free(t);
    t = NULL;
  }
  v = mini_vocab("[SEP]", "[SEQ]");
  expect_load_fail("missing [SEP]", v, strlen(v), BLIP_EFORMAT);
  v = mini_vocab("[PAD]", "[pad]");
  expect_load_fail("missing [PAD]", v, strlen(v), BLIP_EFORMAT);
  v = mini_vocab("[CLS]\n[SEP]", "[SEP]\n[CLS]");
  expect_load_fail("[CLS]/[SEP] swapped", v, strlen(v), BLIP_EFORMAT);
  v = mini_vocab("[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n", "[MASK]\n[UNK]\n[CLS]\n[SEP]\na\n");
  expect_load_fail("[UNK] on line 102", v, strlen(v), BLIP_EFORMAT);
  v = mini_vocab("a\n##b", "[DEC]");
  expect_load_fail("vocab with [DEC]", v, strlen(v), BLIP_EFORMAT);
  v = mini_vocab("a\n##b", "\xc3\n##");
  expect_load_fail("invalid UTF-8 line", v, strlen(v), BLIP_EFORMAT);
  char *crlf = malloc(8192); /* CRLF line ends load like LF ones (Python universal newlines) */
  CHECK(crlf != NULL, "out of memory");
  if (!crlf) return;
  size_t o = 0;
  for (const char *p = mini_vocab(NULL, NULL); *p; p++) {
    if (*p == '\n') crlf[o++] = '\r';
    crlf[o++] = *p;
  }
  rc = blip_tok_load_mem(crlf, o, &t);
  CHECK(rc == 0 && t && blip_tok_id(t, "[SEP]") == BLIP_TOK_SEP && blip_tok_id(t, "a") == 104, "CRLF vocab rc %d", rc);
  blip_tok_free(t);
  free(crlf);
}

/* Truncation keeps [SEP] last whichever of max_len and cap binds. */
static void test_truncation(void) {
  const char *text = "a dog runs on the beach";
  int32_t full_ids[16], ids[16];
  int n, full;
  CHECK(blip_tok_encode(g_tok, text, strlen(text), 0, full_ids, 16, &n, &full) == 0 && n == 8 && full == 8,
        "full n %d", n);
  for (int lim = 2; lim <= 9; lim++) {
    int rc = blip_tok_encode(g_tok, text, strlen(text), 0, ids, lim, &n, &full); /* cap binds */
    int want = lim < 8 ? lim : 8;
    CHECK(rc == 0 && n == want && full == 8 && ids[n - 1] == BLIP_TOK_SEP && memcmp(ids, full_ids, (size_t)(n - 1) * 4) == 0,
          "cap %d: n %d", lim, n);
    rc = blip_tok_encode(g_tok, text, strlen(text), lim, ids, 16, &n, &full); /* max_len binds */
    CHECK(rc == 0 && n == want && ids[n - 1] == BLIP_TOK_SEP, "max_len %d: n %d", lim, n);
  }
  CHECK(blip_tok_encode(g_tok, text, strlen(text), 1, ids, 16, &n, &full) == BLIP_EINVAL, "max_len 1 accepted");
  CHECK(blip_tok_encode(g_tok, text, strlen(text), 0, ids, 1, &n, &full) == BLIP_EINVAL, "cap 1 accepted");
  char *pre = NULL;
  CHECK(blip_tok_pre_caption(text, strlen(text), 0, &pre, NULL) == BLIP_EINVAL && !pre, "max_words 0 accepted");
  CHECK(blip_tok_pre_caption(text, strlen(text), 2, &pre, NULL) == 0 && pre && strcmp(pre, "a dog") == 0, "2 words: %s", pre);
  free(pre);
}

/* Bytes that do not decode are dropped; the rest is tokenized as usual. */
static void test_bad_utf8(void) {
  static const struct { const char *bad, *clean; } k[] = {
    {"a\xff dog", "a dog"}, {"caf\xc3", "caf"}, {"do\xc3g", "dog"}, {"\xed\xa0\x80x", "x"},
    {"[CL\x80S]", "[CLS]"}, {"\xc0\xaf.", "."}, {"\xf4\x90\x80\x80z", "z"},
  };
  for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
    int32_t a[32], b[32];
    int na, nb, fa, fb;
    int ra = blip_tok_encode(g_tok, k[i].bad, strlen(k[i].bad), 0, a, 32, &na, &fa);
    int rb = blip_tok_encode(g_tok, k[i].clean, strlen(k[i].clean), 0, b, 32, &nb, &fb);
    CHECK(ra == 0 && rb == 0 && na == nb && memcmp(a, b, (size_t)na * 4) == 0, "invalid UTF-8 case %zu", i);
    char *pa = NULL, *pb = NULL;
    ra = blip_tok_pre_caption(k[i].bad, strlen(k[i].bad), 30, &pa, NULL);
    rb = blip_tok_pre_caption(k[i].clean, strlen(k[i].clean), 30, &pb, NULL);
    CHECK(ra == 0 && rb == 0 && strcmp(pa, pb) == 0, "pre_caption invalid UTF-8 case %zu", i);
    free(pa);
    free(pb);
  }
}

int main(void) {
  const char *vocab = test_data("blip-tiny/vocab.txt");
  int rc = blip_tok_load(vocab, &g_tok);
  CHECK(rc == 0, "load %s: %s", vocab, blip_err_last());
  if (rc == 0) {
    test_vocab();
    test_golden();
    test_truncation();
    test_bad_utf8();
  }
  test_bad_vocab();
  blip_tok_free(g_tok);
  return check_summary();
}
