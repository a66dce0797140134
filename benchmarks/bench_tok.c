/* bench_tok: how fast blip_tok encodes captions. Times the BLIP retrieval
 * path (pre_caption + 35-token encode) and plain encode over the Flickr8k and
 * COCO captions of the tokenizer golden file, single thread, and prints
 * microseconds per caption. */
#include "blip_arg.h"
#include "blip_err.h"
#include "blip_tok.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: bench_tok [--vocab vocab.txt] [--captions golden.jsonl] [--iters N] [--json]\n"
          "Times blip_tok_encode and blip_tok_pre_caption on the real captions (source flickr8k:/coco:)\n"
          "of the golden file. Defaults: $BLIP_TEST_DATA (else tests/data)/blip-tiny/vocab.txt and\n"
          "tokenizer/golden.jsonl, 200 iterations.\n");
}

int main(int argc, char **argv) {
  const char *root = getenv("BLIP_TEST_DATA") ? getenv("BLIP_TEST_DATA") : "tests/data";
  char vocab[4096], golden[4096];
  snprintf(vocab, sizeof vocab, "%s/blip-tiny/vocab.txt", root);
  snprintf(golden, sizeof golden, "%s/tokenizer/golden.jsonl", root);
  int iters = 200, as_json = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(argv[i], "--json")) {
      as_json = 1;
    } else if (i + 1 < argc && !strcmp(argv[i], "--vocab")) {
      snprintf(vocab, sizeof vocab, "%s", argv[++i]);
    } else if (i + 1 < argc && !strcmp(argv[i], "--captions")) {
      snprintf(golden, sizeof golden, "%s", argv[++i]);
    } else if (i + 1 < argc && !strcmp(argv[i], "--iters")) {
      iters = (int)blip_arg_must("bench_tok", "--iters", argv[++i], 1, 1000000000);
    } else {
      usage(stderr);
      return 2;
    }
  }
  if (iters < 1) iters = 1;

  int rc = 1;
  blip_tok *t = NULL;
  json_t *caps = json_array();
  FILE *f = NULL;
  char *line = NULL;
  size_t linecap = 0;
  if (blip_tok_load(vocab, &t)) {
    fprintf(stderr, "bench_tok: %s\n", blip_err_last());
    goto done;
  }
  if (!(f = fopen(golden, "r"))) {
    perror(golden);
    goto done;
  }
  while (getline(&line, &linecap, f) > 0) {
    json_t *j = json_loads(line, JSON_ALLOW_NUL, NULL);
    const char *src = json_string_value(json_object_get(j, "source"));
    if (src && (!strncmp(src, "flickr8k:", 9) || !strncmp(src, "coco:", 5)))
      json_array_append(caps, json_object_get(j, "text"));
    json_decref(j);
  }
  size_t n = json_array_size(caps), words = 0;
  if (n == 0) {
    fprintf(stderr, "bench_tok: no flickr8k/coco captions in %s\n", golden);
    goto done;
  }
  for (size_t i = 0; i < n; i++) { /* words per caption, for the report */
    const char *s = json_string_value(json_array_get(caps, i));
    for (int in = 0; *s; s++) {
      if (*s != ' ' && !in) words++;
      in = *s != ' ';
    }
  }

  int32_t ids[512];
  int n_out, n_full;
  long pieces = 0;
  double t0 = now_s();
  for (int it = 0; it < iters; it++)
    for (size_t i = 0; i < n; i++) {
      json_t *s = json_array_get(caps, i);
      if (blip_tok_encode(t, json_string_value(s), json_string_length(s), 0, ids, 512, &n_out, &n_full)) goto fail;
      pieces += n_out;
    }
  double enc_us = (now_s() - t0) * 1e6 / ((double)iters * (double)n);

  t0 = now_s();
  for (int it = 0; it < iters; it++)
    for (size_t i = 0; i < n; i++) {
      json_t *s = json_array_get(caps, i);
      char *pre;
      size_t pre_len;
      if (blip_tok_pre_caption(json_string_value(s), json_string_length(s), 30, &pre, &pre_len)) goto fail;
      int erc = blip_tok_encode(t, pre, pre_len, 35, ids, 512, &n_out, &n_full);
      free(pre);
      if (erc) goto fail;
    }
  double blip_us = (now_s() - t0) * 1e6 / ((double)iters * (double)n);

  double avg_words = (double)words / (double)n, avg_ids = (double)pieces / ((double)iters * (double)n);
  if (as_json)
    printf("{\"captions\": %zu, \"iters\": %d, \"words_per_caption\": %.1f, \"ids_per_caption\": %.1f, "
           "\"encode_us\": %.3f, \"pre_caption_encode35_us\": %.3f}\n",
           n, iters, avg_words, avg_ids, enc_us, blip_us);
  else
    printf("%zu captions x %d iters, %.1f words / %.1f ids per caption, 1 thread\n"
           "  encode                      %7.3f us/caption  (%.0f captions/s)\n"
           "  pre_caption + encode(35)    %7.3f us/caption  (%.0f captions/s, %.2fx encode alone)\n",
           n, iters, avg_words, avg_ids, enc_us, 1e6 / enc_us, blip_us, 1e6 / blip_us, blip_us / enc_us);
  rc = 0;
  goto done;
fail:
  fprintf(stderr, "bench_tok: %s\n", blip_err_last());
done:
  free(line);
  if (f) fclose(f);
  json_decref(caps);
  blip_tok_free(t);
  return rc;
}
