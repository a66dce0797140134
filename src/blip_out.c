/* blip_out: see blip_out.h. Everything works on "units": one valid UTF-8
 * sequence, or one byte that does not start one; a unit is printed raw,
 * escaped (at most 8 chars: a C1 control is two escaped bytes) or, in JSON,
 * replaced by U+FFFD. */
#include "blip_out.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int blip_out_utf8_seq(const unsigned char *s, size_t n) {
  if (!n) return 0;
  unsigned c = s[0];
  if (c < 0x80) return 1;
  int len;
  unsigned lo = 0x80, hi = 0xbf; /* range of the second byte */
  if (c >= 0xc2 && c <= 0xdf) len = 2;
  else if (c >= 0xe0 && c <= 0xef) {
    len = 3;
    if (c == 0xe0) lo = 0xa0;      /* overlong */
    else if (c == 0xed) hi = 0x9f; /* surrogates */
  } else if (c >= 0xf0 && c <= 0xf4) {
    len = 4;
    if (c == 0xf0) lo = 0x90;      /* overlong */
    else if (c == 0xf4) hi = 0x8f; /* > U+10FFFF */
  } else {
    return 0;
  }
  if (n < (size_t)len || s[1] < lo || s[1] > hi) return 0;
  for (int i = 2; i < len; i++)
    if (s[i] < 0x80 || s[i] > 0xbf) return 0;
  return len;
}

int blip_out_utf8_valid(const char *s) {
  const unsigned char *p = (const unsigned char *)s;
  size_t n = strlen(s);
  for (size_t i = 0; i < n;) {
    int l = blip_out_utf8_seq(p + i, n - i);
    if (!l) return 0;
    i += (size_t)l;
  }
  return 1;
}

/* Escaped form of the unit at s[0..n) into out[8]; returns its length, *used = bytes consumed. */
static int esc_unit(const unsigned char *s, size_t n, char out[8], int *used) {
  static const char hex[] = "0123456789abcdef";
  int l = blip_out_utf8_seq(s, n), esc = 0;
  *used = l ? l : 1;
  if (l == 1) {
    switch (s[0]) {
    case '\\': memcpy(out, "\\\\", 2); return 2;
    case '\t': memcpy(out, "\\t", 2); return 2;
    case '\n': memcpy(out, "\\n", 2); return 2;
    case '\r': memcpy(out, "\\r", 2); return 2;
    default: esc = s[0] < 0x20 || s[0] == 0x7f;
    }
  } else {
    esc = !l || (l == 2 && s[0] == 0xc2 && s[1] < 0xa0); /* invalid byte, or C1 control */
  }
  if (!esc) {
    memcpy(out, s, (size_t)l);
    return l;
  }
  for (int i = 0; i < *used; i++) {
    out[4 * i] = '\\';
    out[4 * i + 1] = 'x';
    out[4 * i + 2] = hex[s[i] >> 4];
    out[4 * i + 3] = hex[s[i] & 15];
  }
  return 4 * *used;
}

void blip_out_fesc(FILE *f, const char *s) {
  const unsigned char *p = (const unsigned char *)s;
  size_t n = strlen(s);
  char u[8];
  int used;
  for (size_t i = 0; i < n; i += (size_t)used) fwrite(u, 1, (size_t)esc_unit(p + i, n - i, u, &used), f);
}

static int hexval(char c) {
  return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

long blip_out_unesc(const char *e, char *out) {
  long n = 0;
  while (*e) {
    if (*e != '\\') {
      out[n++] = *e++;
      continue;
    }
    switch (e[1]) {
    case '\\': out[n++] = '\\'; break;
    case 't': out[n++] = '\t'; break;
    case 'n': out[n++] = '\n'; break;
    case 'r': out[n++] = '\r'; break;
    case 'x': {
      int hi = hexval(e[2]), lo = hi < 0 ? -1 : hexval(e[3]);
      if (lo < 0) return -1;
      out[n++] = (char)(hi << 4 | lo);
      e += 2;
      break;
    }
    default: return -1;
    }
    e += 2;
  }
  out[n] = 0;
  return n;
}

void blip_out_error(const char *tool, const char *msg) {
  fprintf(stderr, "%s: ", tool);
  blip_out_fesc(stderr, msg);
  fputc('\n', stderr);
}

json_t *blip_out_json_text(const char *s) {
  const unsigned char *p = (const unsigned char *)s;
  size_t n = strlen(s), pos = 0;
  char *t = malloc(3 * n + 1); /* each invalid byte becomes 3 */
  if (!t) return NULL;
  for (size_t i = 0; i < n;) {
    int l = blip_out_utf8_seq(p + i, n - i);
    if (l) {
      memcpy(t + pos, p + i, (size_t)l);
      pos += (size_t)l;
      i += (size_t)l;
    } else {
      memcpy(t + pos, "\xef\xbf\xbd", 3); /* U+FFFD */
      pos += 3;
      i++;
    }
  }
  json_t *j = json_stringn(t, pos);
  free(t);
  return j;
}

static json_t *base64(const char *s) {
  static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  const unsigned char *p = (const unsigned char *)s;
  size_t n = strlen(s), pos = 0;
  char *t = malloc((n + 2) / 3 * 4 + 1);
  if (!t) return NULL;
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
    t[pos++] = A[v >> 18];
    t[pos++] = A[(v >> 12) & 63];
    t[pos++] = i + 1 < n ? A[(v >> 6) & 63] : '=';
    t[pos++] = i + 2 < n ? A[v & 63] : '=';
  }
  json_t *j = json_stringn(t, pos);
  free(t);
  return j;
}

int blip_out_json_name(json_t *obj, const char *key, const char *s) {
  char k64[64];
  snprintf(k64, sizeof k64, "%s_b64", key);
  json_t *a = s ? blip_out_json_text(s) : json_null(), *b = !s || blip_out_utf8_valid(s) ? json_null() : base64(s);
  if (!a || !b) {
    json_decref(a);
    json_decref(b);
    return -1;
  }
  int ra = json_object_set_new(obj, key, a), rb = json_object_set_new(obj, k64, b); /* each steals its value */
  return ra || rb ? -1 : 0;
}

json_t *blip_out_json_num(double v) { return isfinite(v) ? json_real(v) : json_null(); }
