/* fuzz_tok: libFuzzer harness for blip_tok_encode and blip_tok_pre_caption
 * over the real bert-base-uncased vocab. Besides "no crash, no sanitizer
 * report" it checks the output invariants: [CLS] first, [SEP] last, every id
 * in range, the max_len form a prefix of the full form, and pre_caption's
 * length right. Vocab: $BLIP_TEST_DATA/blip-tiny/vocab.txt, else the copy
 * next to this file (tests/data). Seeds: tests/fuzz/corpus_tok/. */
#include "blip_err.h"
#include "blip_tok.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CAP 4096

static blip_tok *g_tok;

static void load_vocab(void) {
  char path[4096];
  const char *root = getenv("BLIP_TEST_DATA");
  if (root) {
    snprintf(path, sizeof path, "%s/blip-tiny/vocab.txt", root);
  } else {
    const char *slash = strrchr(__FILE__, '/');
    int dir = slash ? (int)(slash - __FILE__) : 0;
    snprintf(path, sizeof path, "%.*s%s../data/blip-tiny/vocab.txt", dir, __FILE__, slash ? "/" : "");
  }
  if (blip_tok_load(path, &g_tok)) {
    fprintf(stderr, "fuzz_tok: %s\n", blip_err_last());
    abort();
  }
}

static void check_ids(const int32_t *ids, int n, int n_full, int max_len) {
  int size = blip_tok_size(g_tok);
  if (n < 2 || n > CAP || n_full < n || (max_len && n > max_len)) abort();
  if (ids[0] != BLIP_TOK_CLS || ids[n - 1] != BLIP_TOK_SEP) abort();
  for (int i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= size) abort();
}

static void encode_checked(const char *text, size_t len) {
  static int32_t full[CAP], cut[CAP];
  int n, n_full, m, m_full;
  if (blip_tok_encode(g_tok, text, len, 0, full, CAP, &n, &n_full)) abort();
  check_ids(full, n, n_full, 0);
  if (blip_tok_encode(g_tok, text, len, 35, cut, CAP, &m, &m_full)) abort();
  check_ids(cut, m, m_full, 35);
  if (m_full != n_full || memcmp(cut, full, (size_t)(m - 1) * sizeof *cut)) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!g_tok) load_vocab();
  if (size > 1 << 16) return 0;
  const char *text = (const char *)data;
  encode_checked(text, size);
  char *pre = NULL;
  size_t pre_len = 0;
  if (blip_tok_pre_caption(text, size, 30, &pre, &pre_len)) abort();
  if (pre[pre_len] != 0 || pre_len > 4 * size) abort();
  encode_checked(pre, pre_len);
  free(pre);
  return 0;
}
