/* fuzz_out: libFuzzer harness for the tools' output and option helpers.
 * Any byte string (cut at its first NUL, as a file name would be):
 * blip_out_fesc gives valid UTF-8 without control bytes that decodes back to
 * the exact bytes; blip_out_json_name keeps both keys, and KEY_b64 is null
 * exactly when the name is valid UTF-8; the strict parsers never crash, and
 * a date they accept is normalized to a form they accept again unchanged.
 * Seeds: tests/fuzz/corpus_out/. */
#include "blip_arg.h"
#include "blip_err.h"
#include "blip_out.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *s = malloc(size + 1), *e = NULL, *back = NULL;
  size_t elen = 0;
  memcpy(s, data, size);
  s[size] = 0;
  size_t n = strlen(s);
  FILE *f = open_memstream(&e, &elen);
  blip_out_fesc(f, s);
  fclose(f);
  for (size_t i = 0; i < elen; i++)
    if ((unsigned char)e[i] < 0x20 || e[i] == 0x7f) abort();
  if (!blip_out_utf8_valid(e) || strstr(e, "\xc2\x80") || strstr(e, "\xc2\x9b")) abort();
  back = malloc(elen + 1);
  if (blip_out_unesc(e, back) != (long)n || memcmp(back, s, n)) abort();

  json_t *o = json_object();
  if (blip_out_json_name(o, "path", s)) abort();
  json_t *b = json_object_get(o, "path_b64");
  if (!json_is_string(json_object_get(o, "path")) || !b || json_is_null(b) != blip_out_utf8_valid(s)) abort();
  json_decref(o);

  char d[20], d2[20];
  long long v;
  double r;
  if (blip_arg_date("--after", s, d) == BLIP_OK && (blip_arg_date("--after", d, d2) || strcmp(d, d2))) abort();
  if (blip_arg_long("-n", s, -1000, 1000, &v) == BLIP_OK && (v < -1000 || v > 1000)) abort();
  if (blip_arg_real("--threshold", s, 0, 1, &r) == BLIP_OK && !(r >= 0 && r <= 1)) abort();
  free(s);
  free(e);
  free(back);
  return 0;
}
