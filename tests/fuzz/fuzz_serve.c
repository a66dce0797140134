/* fuzz_serve: libFuzzer harness for blip-serve's request parsers (the
 * helpers every request goes through before the engine sees it): query
 * strings, ids in paths, base64, the clip-retrieval and rank-texts JSON
 * bodies, the bearer token check. Byte 0 picks the parser; the rest is the
 * input. Besides "no crash, no sanitizer report" it checks invariants: a
 * base64 round trip, validated ranges, normalized embeddings, texts within
 * their cap. Seeds: tests/fuzz/corpus_serve/. */
#include "blip_err.h"
#include "blip_serve.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void query(char *s) { /* "k=v&k=v..." split in place, as MHD hands them over */
  blip_serve_kv kv[40];
  int n = 0;
  for (char *tok = strtok(s, "&"); tok && n < 40; tok = strtok(NULL, "&")) {
    char *eq = strchr(tok, '=');
    if (eq) *eq = 0;
    kv[n].key = tok;
    kv[n].value = eq ? eq + 1 : NULL;
    n++;
  }
  blip_serve_query q;
  char err[256];
  for (int need = 0; need < 2; need++) {
    if (blip_serve_parse_query(kv, n, need, &q, err, sizeof err)) {
      if (!err[0]) abort(); /* every refusal says why */
      continue;
    }
    if (q.n < 1 || q.offset < 0 || q.offset + q.n > BLIP_SERVE_MAX_RESULTS || q.rerank < 0 || q.rerank > 256) abort();
    if (need && (!q.q || !*q.q || strlen(q.q) > BLIP_SERVE_MAX_TEXT)) abort();
    if (!(q.threshold == -1 || (q.threshold >= 0 && q.threshold <= 1))) abort();
    if (q.under[0] && q.under[0] != '/') abort();
    blip_search_opts o;
    blip_serve_query_opts(&q, &o);
    if (o.n != q.offset + q.n) abort();
  }
}

static void b64(const uint8_t *d, size_t n) {
  unsigned char *out = NULL;
  size_t on = 0;
  if (!blip_serve_b64decode((const char *)d, n, &out, &on) && on > n) abort();
  free(out);
  /* round trip: encode the input bytes, decode, compare */
  size_t en = (n + 2) / 3 * 4;
  char *enc = malloc(en + 1);
  if (!enc) return;
  size_t k = 0;
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)d[i] << 16 | (i + 1 < n ? (uint32_t)d[i + 1] << 8 : 0) | (i + 2 < n ? d[i + 2] : 0);
    enc[k++] = B64[v >> 18 & 63];
    enc[k++] = B64[v >> 12 & 63];
    enc[k++] = i + 1 < n ? B64[v >> 6 & 63] : '=';
    enc[k++] = i + 2 < n ? B64[v & 63] : '=';
  }
  if (blip_serve_b64decode(enc, k, &out, &on) || on != n || (n && memcmp(out, d, n))) abort();
  free(out);
  free(enc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  char *s = malloc(size);
  if (!s) return 0;
  memcpy(s, data + 1, size - 1);
  s[size - 1] = 0;
  char err[256];
  switch (data[0] % 6) {
  case 0: query(s); break;
  case 1: {
    int64_t id;
    if (!blip_serve_parse_id(s, "/api/photo/", &id) && (id < 1 || id > ((int64_t)1 << 53))) abort();
    break;
  }
  case 2: b64(data + 1, size - 1); break;
  case 3: {
    blip_serve_knn k;
    if (!blip_serve_parse_knn((const char *)data + 1, size - 1, &k, err, sizeof err)) {
      if (!!k.text + !!k.image + !!k.embedding != 1 || k.num_images < 1) abort();
      if (k.text && strlen(k.text) > BLIP_SERVE_MAX_TEXT) abort();
      if (k.embedding) {
        double ss = 0;
        for (int i = 0; i < k.embedding_dim; i++) ss += (double)k.embedding[i] * k.embedding[i];
        if (!(fabs(ss - 1) < 1e-3)) abort();
      }
      blip_serve_knn_free(&k);
    }
    break;
  }
  case 4: {
    blip_serve_rank r;
    if (!blip_serve_parse_rank((const char *)data + 1, size - 1, &r, err, sizeof err)) {
      if (!r.image || r.ntexts < 1 || r.ntexts > BLIP_SERVE_MAX_TEXTS || r.rerank < 0 || r.n < 1) abort();
      for (int i = 0; i < r.ntexts; i++)
        if (strlen(r.texts[i]) > BLIP_SERVE_MAX_TEXT) abort();
      blip_serve_rank_free(&r);
    }
    break;
  }
  case 5: {
    char *nl = strchr(s, '\n'); /* "header\ntoken" */
    if (nl) {
      *nl = 0;
      int ok = blip_serve_token_ok(s, nl + 1);
      if (ok && (strncmp(s, "Bearer ", 7) || strcmp(s + 7, nl + 1))) abort();
    }
    break;
  }
  }
  free(s);
  return 0;
}
