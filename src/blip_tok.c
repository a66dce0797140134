/* blip_tok: BERT WordPiece tokenizer and BLIP pre_caption; see blip_tok.h.
 *
 * Design. The vocabulary is one blob of NUL-terminated tokens plus an
 * open-addressing hash table (XXH3, linear probing) of ids; ids [0, n_vocab)
 * are vocab.txt lines, n_vocab and n_vocab+1 are [DEC] and [ENC]. It is
 * immutable after load, so one blip_tok may be shared by threads.
 *
 * Encoding is one pass over the decoded code points, reproducing the slow HF
 * pipeline stage by stage without building intermediate strings:
 *   raw special-token match -> per-char lower (Python str.lower) -> clean
 *   (drop U+0000, U+FFFD, C* but \t\n\r) -> whitespace split (Zs, Zl, Zp,
 *   \t\n\r) -> CJK ideographs as words -> NFD, drop Mn -> punctuation split
 *   -> greedy longest-match WordPiece.
 * HF also applies NFC before splitting; NFD(lower(NFC(x))) equals
 * NFD(lower(x)) for canonical equivalents, so that step is omitted. HF's
 * never_split check in BasicTokenizer cannot fire after its per-char lower
 * pass (every special token has capitals), so it is omitted too.
 * Character tables are utf8proc's (Unicode 15.0); characters first assigned
 * in a Unicode newer than the Python that made the golden file may differ.
 * Per-call memory is a stack buffer for short texts (one malloc otherwise);
 * nothing is allocated per character or per word. */
#include "blip_tok.h"
#include "blip_err.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>
#include <xxhash.h>

#define MAX_WORD_CHARS 100          /* HF WordpieceTokenizer.max_input_chars_per_word */
#define MAX_VOCAB_BYTES (64u << 20) /* bert-base-uncased is 226 KB */
#define MAX_TEXT_BYTES (1u << 28)   /* keeps every count inside int */
#define STACK_CPS 512               /* code points decoded without malloc */

struct blip_tok {
  char *blob;      /* tokens, NUL-terminated, back to back */
  uint32_t *off;   /* n_tok offsets into blob */
  uint32_t *len;   /* n_tok byte lengths */
  int32_t *slot;   /* hash table of ids, -1 = empty; mask+1 entries */
  uint32_t mask;
  int n_vocab;     /* vocab.txt lines */
  int n_tok;       /* n_vocab + [DEC] + [ENC] */
  int max_bytes;   /* longest vocab token: bounds the WordPiece search */
  int32_t special_id[7];
};

/* Tokens HF matches in the raw text (all_special_tokens), case-sensitive. */
static const char *const k_special[7] = {"[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]", "[DEC]", "[ENC]"};

/* ---- vocabulary ---- */

static uint32_t hash_of(const char *s, size_t n) { return (uint32_t)XXH3_64bits(s, n); }

static int lookup(const blip_tok *t, const char *s, size_t n) {
  for (uint32_t h = hash_of(s, n) & t->mask;; h = (h + 1) & t->mask) {
    int32_t id = t->slot[h];
    if (id < 0) return -1;
    if (t->len[id] == n && memcmp(t->blob + t->off[id], s, n) == 0) return id;
  }
}

/* A later duplicate replaces the earlier id, as Python's dict does in HF load_vocab. */
static void insert(blip_tok *t, int32_t id) {
  const char *s = t->blob + t->off[id];
  size_t n = t->len[id];
  uint32_t h = hash_of(s, n) & t->mask;
  for (; t->slot[h] >= 0; h = (h + 1) & t->mask) {
    int32_t o = t->slot[h];
    if (t->len[o] == n && memcmp(t->blob + t->off[o], s, n) == 0) break;
  }
  t->slot[h] = id;
}

void blip_tok_free(blip_tok *t) {
  if (!t) return;
  free(t->blob);
  free(t->off);
  free(t->len);
  free(t->slot);
  free(t);
}

/* Line ends as Python's universal newlines read them: \n, \r\n or \r. */
static size_t line_end(const char *b, size_t len, size_t i, size_t *next) {
  size_t e = i;
  while (e < len && b[e] != '\n' && b[e] != '\r') e++;
  *next = e < len ? e + 1 + (b[e] == '\r' && e + 1 < len && b[e + 1] == '\n') : e;
  return e;
}

static int add_token(blip_tok *t, size_t *used, const char *s, size_t n) {
  int id = t->n_tok++;
  t->off[id] = (uint32_t)*used;
  t->len[id] = (uint32_t)n;
  memcpy(t->blob + *used, s, n);
  t->blob[*used + n] = 0;
  *used += n + 1;
  return id;
}

static int check_line(const char *s, size_t n, int line) {
  for (size_t i = 0; i < n;) {
    utf8proc_int32_t c;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &c);
    if (k <= 0) return blip_err_set(BLIP_EFORMAT, "vocab line %d is not valid UTF-8", line);
    if (c == 0) return blip_err_set(BLIP_EFORMAT, "vocab line %d contains a NUL byte", line);
    i += (size_t)k;
  }
  return BLIP_OK;
}

int blip_tok_load_mem(const char *buf, size_t len, blip_tok **out) {
  *out = NULL;
  if (!buf && len) return blip_err_set(BLIP_EINVAL, "vocab: NULL buffer");
  if (len > MAX_VOCAB_BYTES) return blip_err_set(BLIP_ETOOBIG, "vocab: %zu bytes is over the %u limit", len, MAX_VOCAB_BYTES);
  int rc = BLIP_OK;
  size_t lines = 0, used = 0, next;
  for (size_t i = 0; i < len; i = next) {
    line_end(buf, len, i, &next);
    lines++;
  }
  if (lines <= BLIP_TOK_SEP) return blip_err_set(BLIP_EFORMAT, "vocab: %zu lines, too few for BERT's special tokens", lines);
  blip_tok *t = calloc(1, sizeof *t);
  if (!t) return blip_err_set(BLIP_ENOMEM, "vocab: out of memory");
  uint32_t cap = 1;
  while (cap < 2 * (lines + 2)) cap <<= 1;
  t->mask = cap - 1;
  t->blob = malloc(len + lines + 16);
  t->off = malloc((lines + 2) * sizeof *t->off);
  t->len = malloc((lines + 2) * sizeof *t->len);
  t->slot = malloc(cap * sizeof *t->slot);
  if (!t->blob || !t->off || !t->len || !t->slot) {
    rc = blip_err_set(BLIP_ENOMEM, "vocab: out of memory for %zu tokens", lines);
    goto fail;
  }
  memset(t->slot, 0xff, cap * sizeof *t->slot);
  for (size_t i = 0; i < len; i = next) {
    size_t e = line_end(buf, len, i, &next);
    if ((rc = check_line(buf + i, e - i, t->n_tok + 1))) goto fail;
    insert(t, add_token(t, &used, buf + i, e - i));
    if ((int)(e - i) > t->max_bytes) t->max_bytes = (int)(e - i);
  }
  t->n_vocab = t->n_tok;
  static const struct { const char *name; int id; } want[] = {
    {"[PAD]", BLIP_TOK_PAD}, {"[UNK]", BLIP_TOK_UNK}, {"[CLS]", BLIP_TOK_CLS}, {"[SEP]", BLIP_TOK_SEP}};
  for (int k = 0; k < 4; k++) {
    int id = lookup(t, want[k].name, strlen(want[k].name));
    if (id != want[k].id) {
      rc = id < 0 ? blip_err_set(BLIP_EFORMAT, "vocab: missing %s (want it on line %d)", want[k].name, want[k].id + 1)
                  : blip_err_set(BLIP_EFORMAT, "vocab: %s is on line %d, BERT wants line %d", want[k].name, id + 1,
                                 want[k].id + 1);
      goto fail;
    }
  }
  for (int k = 5; k < 7; k++) {
    if (lookup(t, k_special[k], 5) >= 0) {
      rc = blip_err_set(BLIP_EFORMAT, "vocab: already has %s, which BLIP adds after the vocab", k_special[k]);
      goto fail;
    }
    insert(t, add_token(t, &used, k_special[k], 5));
  }
  for (int k = 0; k < 7; k++) t->special_id[k] = lookup(t, k_special[k], strlen(k_special[k]));
  *out = t;
  return BLIP_OK;
fail:
  blip_tok_free(t);
  return rc;
}

int blip_tok_load(const char *path, blip_tok **out) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) return blip_err_set(BLIP_EIO, "%s: %s", path, strerror(errno));
  int rc = BLIP_OK;
  char *buf = NULL;
  struct stat st;
  if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
    rc = blip_err_set(BLIP_EIO, "%s: not a regular file", path);
    goto done;
  }
  if ((unsigned long long)st.st_size > MAX_VOCAB_BYTES) {
    rc = blip_err_set(BLIP_ETOOBIG, "%s: %lld bytes is over the %u vocab limit", path, (long long)st.st_size,
                      MAX_VOCAB_BYTES);
    goto done;
  }
  size_t n = (size_t)st.st_size;
  if (!(buf = malloc(n + 1))) {
    rc = blip_err_set(BLIP_ENOMEM, "%s: out of memory", path);
    goto done;
  }
  if (fread(buf, 1, n, f) != n) {
    rc = blip_err_set(BLIP_EIO, "%s: short read", path);
    goto done;
  }
  if ((rc = blip_tok_load_mem(buf, n, out))) blip_err_wrap(rc, "%s", path);
done:
  free(buf);
  fclose(f);
  return rc;
}

int blip_tok_size(const blip_tok *t) { return t->n_tok; }
int blip_tok_dec_id(const blip_tok *t) { return t->n_vocab; }
int blip_tok_enc_id(const blip_tok *t) { return t->n_vocab + 1; }
int blip_tok_id(const blip_tok *t, const char *token) { return lookup(t, token, strlen(token)); }
const char *blip_tok_token(const blip_tok *t, int id) {
  return id >= 0 && id < t->n_tok ? t->blob + t->off[id] : NULL;
}

/* ---- Unicode predicates (Python / HF definitions) ---- */

/* Python str.isspace(), which is what str.split() and re's \s use. */
static int py_isspace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

static int is_punct(uint32_t c) {
  if (c < 0x80) return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126);
  utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
  return k >= UTF8PROC_CATEGORY_PC && k <= UTF8PROC_CATEGORY_PO;
}

/* BERT's _is_chinese_char: CJK ideograph blocks only (not kana, not Hangul). */
static int is_cjk(uint32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

/* Unicode Cased: Lu/Ll/Lt plus the Other_Lowercase/Other_Uppercase code
 * points that are not also Case_Ignorable (Lm, Mn), which never matter below. */
static int is_cased(uint32_t c) {
  utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
  if (k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT) return 1;
  return c == 0xAA || c == 0xBA || (c >= 0x2160 && c <= 0x217F) || (c >= 0x24B6 && c <= 0x24E9) ||
         (c >= 0x1F130 && c <= 0x1F149) || (c >= 0x1F150 && c <= 0x1F169) || (c >= 0x1F170 && c <= 0x1F189);
}

/* Unicode Case_Ignorable: Mn Me Cf Lm Sk, and Word_Break MidLetter, MidNumLet, Single_Quote. */
static int is_case_ignorable(uint32_t c) {
  switch (c) {
  case 0x27: case 0x2E: case 0x3A: case 0xB7: case 0x387: case 0x55F: case 0x5F4: case 0x2018: case 0x2019:
  case 0x2024: case 0x2027: case 0xFE13: case 0xFE52: case 0xFE55: case 0xFF07: case 0xFF0E: case 0xFF1A:
    return 1;
  }
  utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
  return k == UTF8PROC_CATEGORY_MN || k == UTF8PROC_CATEGORY_ME || k == UTF8PROC_CATEGORY_CF ||
         k == UTF8PROC_CATEGORY_LM || k == UTF8PROC_CATEGORY_SK;
}

/* Python str.lower() of s[i]: the simple mapping, except İ (U+0130), whose
 * full mapping is "i\u0307", and, when sigma_ctx, Σ, which is ς in the
 * Final_Sigma context. HF lowers one char at a time (a regex match each), so
 * the tokenizer passes sigma_ctx = 0. Returns the code points written (1, 2). */
static int py_lower(const uint32_t *s, size_t n, size_t i, int sigma_ctx, uint32_t out[2]) {
  uint32_t c = s[i];
  if (c < 0x80) {
    out[0] = c >= 'A' && c <= 'Z' ? c + 32 : c;
    return 1;
  }
  if (c == 0x130) {
    out[0] = 'i';
    out[1] = 0x307;
    return 2;
  }
  if (c == 0x3A3 && sigma_ctx) { /* \p{cased}\p{case-ignorable}* Σ !(\p{case-ignorable}* \p{cased}) */
    size_t j = i;
    while (j > 0 && is_case_ignorable(s[j - 1])) j--;
    int final = j > 0 && is_cased(s[j - 1]);
    for (j = i + 1; final && j < n && is_case_ignorable(s[j]); j++) {}
    if (final && j < n && is_cased(s[j])) final = 0;
    out[0] = final ? 0x3C2 : 0x3C3;
    return 1;
  }
  out[0] = (uint32_t)utf8proc_tolower((utf8proc_int32_t)c);
  return 1;
}

/* Decode UTF-8, dropping bytes that do not decode. Returns the count. */
static size_t decode(const char *text, size_t len, uint32_t *cp) {
  const utf8proc_uint8_t *s = (const utf8proc_uint8_t *)text;
  size_t n = 0;
  for (size_t i = 0; i < len;) {
    if (s[i] < 0x80) {
      cp[n++] = s[i++];
      continue;
    }
    utf8proc_int32_t c;
    utf8proc_ssize_t k = utf8proc_iterate(s + i, (utf8proc_ssize_t)(len - i), &c);
    if (k <= 0) {
      i++;
      continue;
    }
    cp[n++] = (uint32_t)c;
    i += (size_t)k;
  }
  return n;
}

/* ---- encoding ---- */

typedef struct {
  const blip_tok *t;
  int32_t *ids; /* where WordPieces go (after [CLS]) */
  int room;     /* how many fit */
  int n;        /* WordPieces produced, stored or not */
  uint32_t w[MAX_WORD_CHARS + 1]; /* current word; chars past 101 are only counted */
  int wn;
} enc;

static void emit(enc *e, int32_t id) {
  if (e->n < e->room) e->ids[e->n] = id;
  e->n++;
}

/* Greedy longest-match-first WordPiece over the word in e->w. */
static void wordpiece(enc *e) {
  const blip_tok *t = e->t;
  int n = e->wn;
  char buf[2 + MAX_WORD_CHARS * 4];
  char *u = buf + 2; /* two spare bytes: "##" is written over consumed chars */
  int off[MAX_WORD_CHARS + 1];
  int32_t piece[MAX_WORD_CHARS];
  int np = 0;
  off[0] = 0;
  for (int i = 0; i < n; i++)
    off[i + 1] = off[i] + (int)utf8proc_encode_char((utf8proc_int32_t)e->w[i], (utf8proc_uint8_t *)u + off[i]);
  for (int start = 0; start < n;) {
    int pre = start ? 2 : 0, end = n, id = -1;
    if (pre) memcpy(u + off[start] - 2, "##", 2);
    while (end > start && off[end] - off[start] + pre > t->max_bytes) end--;
    for (; end > start; end--) {
      id = lookup(t, u + off[start] - pre, (size_t)(off[end] - off[start] + pre));
      if (id >= 0 && id < t->n_vocab) break;
    }
    if (end == start) {
      emit(e, BLIP_TOK_UNK);
      return;
    }
    piece[np++] = id;
    start = end;
  }
  for (int i = 0; i < np; i++) emit(e, piece[i]);
}

static void flush(enc *e) {
  if (e->wn > MAX_WORD_CHARS) emit(e, BLIP_TOK_UNK);
  else if (e->wn > 0) wordpiece(e);
  e->wn = 0;
}

/* A word past 100 chars is [UNK] whatever it holds, so stop at 101. */
static void push(enc *e, uint32_t c) {
  if (e->wn <= MAX_WORD_CHARS) e->w[e->wn++] = c;
}

/* One lower-cased code point: NFD, drop Mn, punctuation as its own word. */
static void feed(enc *e, uint32_t c) {
  utf8proc_int32_t d[16];
  utf8proc_ssize_t nd = 1;
  d[0] = (utf8proc_int32_t)c;
  if (c >= 0x80) {
    nd = utf8proc_decompose_char((utf8proc_int32_t)c, d, 16, UTF8PROC_DECOMPOSE, NULL);
    if (nd < 0 || nd > 16) return;
  }
  for (utf8proc_ssize_t k = 0; k < nd; k++) {
    uint32_t x = (uint32_t)d[k];
    if (x >= 0x80 && utf8proc_category(d[k]) == UTF8PROC_CATEGORY_MN) continue;
    if (is_punct(x)) {
      flush(e);
      push(e, x);
      flush(e);
    } else {
      push(e, x);
    }
  }
}

/* BasicTokenizer + WordPiece over text between special tokens. */
static void encode_span(enc *e, const uint32_t *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint32_t c = s[i], l[2];
    if (c < 0x80) { /* ASCII fast path: same rules, no table lookups */
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r') flush(e);
      else if (c < 0x20 || c == 0x7f) continue;
      else if (is_punct(c)) feed(e, c);
      else push(e, c >= 'A' && c <= 'Z' ? c + 32 : c);
      continue;
    }
    if (c == 0xFFFD) continue;
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    if (k == UTF8PROC_CATEGORY_CN || k >= UTF8PROC_CATEGORY_CC) continue; /* Cn Cc Cf Cs Co */
    if (k == UTF8PROC_CATEGORY_ZS || k == UTF8PROC_CATEGORY_ZL || k == UTF8PROC_CATEGORY_ZP) {
      flush(e);
      continue;
    }
    int cjk = is_cjk(c);
    if (cjk) flush(e);
    int nl = py_lower(s, n, i, 0, l);
    for (int j = 0; j < nl; j++) feed(e, l[j]);
    if (cjk) flush(e);
  }
  flush(e);
}

/* Length of the special token starting at s (0 if none); its id in *id. */
static int match_special(const blip_tok *t, const uint32_t *s, size_t n, int32_t *id) {
  for (int k = 0; k < 7; k++) {
    const char *name = k_special[k];
    size_t m = strlen(name), j = 0;
    if (t->special_id[k] < 0 || m > n) continue;
    while (j < m && s[j] == (unsigned char)name[j]) j++;
    if (j == m) {
      *id = t->special_id[k];
      return (int)m;
    }
  }
  return 0;
}

int blip_tok_encode(const blip_tok *t, const char *text, size_t len, int max_len, int32_t *ids, int cap,
                    int *n_out, int *n_full) {
  *n_out = *n_full = 0;
  int limit = max_len > 0 && max_len < cap ? max_len : cap;
  if (!t || (!text && len) || !ids || limit < 2 || max_len < 0)
    return blip_err_set(BLIP_EINVAL, "blip_tok_encode: bad arguments (max_len %d, cap %d)", max_len, cap);
  if (len > MAX_TEXT_BYTES) return blip_err_set(BLIP_ETOOBIG, "blip_tok_encode: %zu bytes of text", len);
  uint32_t local[STACK_CPS], *cp = local;
  if (len > STACK_CPS && !(cp = malloc(len * sizeof *cp)))
    return blip_err_set(BLIP_ENOMEM, "blip_tok_encode: out of memory for %zu bytes", len);
  size_t n = decode(text, len, cp);
  enc *e = &(enc){.t = t, .ids = ids + 1, .room = limit - 2};
  size_t span = 0;
  for (size_t i = 0; i < n;) {
    int32_t id;
    int m = cp[i] == '[' ? match_special(t, cp + i, n - i, &id) : 0;
    if (!m) {
      i++;
      continue;
    }
    encode_span(e, cp + span, i - span);
    emit(e, id);
    i += (size_t)m;
    span = i;
  }
  encode_span(e, cp + span, n - span);
  if (cp != local) free(cp);
  int kept = e->n < e->room ? e->n : e->room;
  ids[0] = BLIP_TOK_CLS;
  ids[kept + 1] = BLIP_TOK_SEP;
  *n_out = kept + 2;
  *n_full = e->n + 2;
  return BLIP_OK;
}

/* ---- pre_caption ---- */

int blip_tok_pre_caption(const char *text, size_t len, int max_words, char **out, size_t *out_len) {
  *out = NULL;
  if (out_len) *out_len = 0;
  if ((!text && len) || max_words < 1)
    return blip_err_set(BLIP_EINVAL, "blip_tok_pre_caption: bad arguments (max_words %d)", max_words);
  if (len > MAX_TEXT_BYTES) return blip_err_set(BLIP_ETOOBIG, "blip_tok_pre_caption: %zu bytes of text", len);
  int rc = BLIP_OK;
  uint32_t *cp = malloc((3 * len + 1) * sizeof *cp); /* decoded, then up to 2x lowered */
  char *s = NULL;
  if (!cp) {
    rc = blip_err_set(BLIP_ENOMEM, "blip_tok_pre_caption: out of memory");
    goto done;
  }
  size_t n = decode(text, len, cp), m = 0;
  uint32_t *lo = cp + len;
  for (size_t i = 0; i < n; i++) { /* caption.lower(), then [.!"()*#:;~] -> ' ' */
    uint32_t l[2];
    int k = py_lower(cp, n, i, 1, l);
    for (int j = 0; j < k; j++) lo[m++] = l[j] && l[j] < 0x80 && strchr(".!\"()*#:;~", (int)l[j]) ? ' ' : l[j];
  }
  size_t w = 0; /* \s{2,} -> ' ', in place */
  for (size_t i = 0; i < m;) {
    size_t j = i;
    while (j < m && py_isspace(lo[j])) j++;
    if (j - i >= 2) {
      lo[w++] = ' ';
      i = j;
    } else {
      lo[w++] = lo[i++];
    }
  }
  m = w;
  while (m > 0 && lo[m - 1] == '\n') m--; /* rstrip('\n') */
  while (m > 0 && lo[m - 1] == ' ') m--;  /* strip(' ') */
  size_t a = 0;
  while (a < m && lo[a] == ' ') a++;
  int words = 1; /* first max_words of split(' ') */
  for (size_t i = a; i < m; i++)
    if (lo[i] == ' ' && ++words > max_words) m = i;
  if (!(s = malloc(4 * (m - a) + 1))) {
    rc = blip_err_set(BLIP_ENOMEM, "blip_tok_pre_caption: out of memory");
    goto done;
  }
  size_t o = 0;
  for (size_t i = a; i < m; i++) o += (size_t)utf8proc_encode_char((utf8proc_int32_t)lo[i], (utf8proc_uint8_t *)s + o);
  s[o] = 0;
  *out = s;
  if (out_len) *out_len = o;
done:
  free(cp);
  return rc;
}

/* ---- detokenizer ---- */

/* s = s.replace(from, to) in place (to is never longer than from). */
static void replace_all(char *s, const char *from, const char *to) {
  size_t fl = strlen(from), tl = strlen(to);
  char *r = s, *w = s;
  while (*r) {
    if (!strncmp(r, from, fl)) {
      memmove(w, to, tl);
      w += tl;
      r += fl;
    } else {
      *w++ = *r++;
    }
  }
  *w = 0;
}

static int is_special(const blip_tok *t, int id) {
  return id == BLIP_TOK_PAD || id == BLIP_TOK_UNK || id == BLIP_TOK_CLS || id == BLIP_TOK_SEP || id == BLIP_TOK_MASK ||
         id == blip_tok_dec_id(t) || id == blip_tok_enc_id(t);
}

/* HF BertTokenizer.decode (v4.38, slow): special ids dropped if asked;
 * runs of tokens become " ".join(run).replace(" ##", "").strip(); [ENC]
 * (an added special token beyond the vocab) stands alone; the parts are
 * joined by spaces; then clean_up_tokenization. An id outside the
 * vocabulary decodes as [UNK] (kept even when skipping specials, as HF). */
int blip_tok_decode(const blip_tok *t, const int32_t *ids, int n, int skip_special, char **out) {
  *out = NULL;
  size_t cap = 1;
  for (int i = 0; i < n; i++) {
    const char *tok = blip_tok_token(t, ids[i]);
    cap += (tok ? strlen(tok) : 5) + 2;
  }
  char *s = malloc(cap), *run = malloc(cap);
  if (!s || !run) {
    free(s);
    free(run);
    return blip_err_set(BLIP_ENOMEM, "decode: out of memory");
  }
  size_t sl = 0, rl = 0;
  s[0] = 0;
  for (int i = 0; i <= n; i++) {
    const int end = i == n, enc = !end && ids[i] == blip_tok_enc_id(t);
    if (!end && skip_special && is_special(t, ids[i])) continue;
    if (end || enc) { /* flush the run: join, drop " ##", strip */
      run[rl] = 0;
      replace_all(run, " ##", "");
      char *b = run, *e = run + strlen(run);
      while (*b && isspace((unsigned char)*b)) b++;
      while (e > b && isspace((unsigned char)e[-1])) e--;
      if (e > b || (end && rl)) {
        if (sl) s[sl++] = ' ';
        memcpy(s + sl, b, (size_t)(e - b));
        sl += (size_t)(e - b);
      }
      rl = 0;
      if (enc) {
        if (sl) s[sl++] = ' ';
        memcpy(s + sl, "[ENC]", 5);
        sl += 5;
      }
      continue;
    }
    const char *tok = blip_tok_token(t, ids[i]);
    if (!tok) tok = "[UNK]";
    if (rl) run[rl++] = ' ';
    memcpy(run + rl, tok, strlen(tok));
    rl += strlen(tok);
  }
  s[sl] = 0;
  free(run);
  static const char *const clean[][2] = {{" .", "."},    {" ?", "?"},     {" !", "!"},     {" ,", ","},    {" ' ", "'"},
                                         {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
  for (size_t k = 0; k < sizeof clean / sizeof clean[0]; k++) replace_all(s, clean[k][0], clean[k][1]);
  *out = s;
  return BLIP_OK;
}
