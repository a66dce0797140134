/* test_img_pil: reference mode against PIL, bit for bit.
 * tests/data/pil-cases (made by scripts/gen-pil-cases.py with Pillow 9.4.0,
 * the version behind the preprocessing golden data) holds small images for
 * every place where decoding to RGB can differ from PIL: CMYK, 16-bit grey,
 * PNM maxval, GIF transparency, TIFF orientation, and the bit depths and
 * palettes that must stay equal. For each, ref.<file> is PIL's
 * Image.open(f).convert("RGB").resize((S,S), BICUBIC); S is the image's side
 * where it is square, so the conversion itself is compared unsmoothed.
 *  1. reference mode must give exactly ref.<file>, for every case;
 *  2. product mode (the defaults), as cases.json says: exactly
 *     product.<file> where the generator could compute it independently
 *     (16-bit high byte, PNM scaled to full range, GIF transparency black),
 *     PIL's bytes where both modes agree, and not PIL's bytes where README's
 *     table says they differ (ICC, CMYK profile, EXIF orientation, GIF);
 *  3. reference mode overrides autorotate and color_manage, and refuses
 *     shrink-on-load (PIL decodes every pixel). */
#include <jansson.h>
#include <stdint.h>

#include "blip_err.h"
#include "blip_img.h"
#include "blip_st.h"
#include "check.h"

static const blip_st_tensor *want(blip_st *st, const char *kind, const char *file, int s) {
  char key[300];
  snprintf(key, sizeof key, "%s.%s", kind, file);
  const blip_st_tensor *t = blip_st_find(st, key);
  CHECK(!t || (t->dtype == BLIP_DT_U8 && t->numel == 3L * s * s), "%s: wrong dtype or shape", key);
  return t && t->numel == 3L * s * s ? t : NULL;
}

/* Decode file at side s; returns the number of differing bytes (-1 on error). */
static long compare(const char *file, const blip_img_opts *o, const uint8_t *ref, int *maxd) {
  char rel[300];
  snprintf(rel, sizeof rel, "pil-cases/%s", file);
  size_t n = (size_t)3 * o->size * o->size;
  uint8_t *rgb = malloc(n);
  long bad = -1;
  *maxd = 0;
  if (rgb && blip_img_load_file(test_data(rel), o, NULL, rgb, NULL) == 0) {
    bad = 0;
    for (size_t i = 0; i < n; i++) {
      int d = abs((int)rgb[i] - (int)ref[i]);
      bad += d != 0;
      if (d > *maxd) *maxd = d;
    }
  } else {
    fprintf(stderr, "%s: %s\n", file, blip_err_last());
  }
  free(rgb);
  return bad;
}

int main(void) {
  json_error_t jerr;
  json_t *doc = json_load_file(test_data("pil-cases/cases.json"), 0, &jerr);
  json_t *cases = json_object_get(doc, "cases");
  blip_st *st = NULL;
  CHECK(json_is_array(cases) && json_array_size(cases) > 0, "cases.json: %s", jerr.text);
  if (!json_is_array(cases) || blip_st_open(test_data("pil-cases/expected.safetensors"), &st)) {
    CHECK(0, "expected.safetensors: %s", blip_err_last());
    json_decref(doc);
    return check_summary();
  }
  printf("PIL cases from Pillow %s\n%-22s %-6s %10s %10s\n", json_string_value(json_object_get(doc, "pillow")),
         "file", "mode", "reference", "product");
  for (size_t i = 0; i < json_array_size(cases); i++) {
    json_t *c = json_array_get(cases, i);
    const char *file = json_string_value(json_object_get(c, "file"));
    int s = (int)json_integer_value(json_object_get(c, "size"));
    if (!file || s < 1) {
      CHECK(0, "case %zu malformed", i);
      continue;
    }
    const blip_st_tensor *ref = want(st, "ref", file, s);
    CHECK(ref != NULL, "ref.%s missing", file);
    if (!ref) continue;
    blip_img_opts o;
    blip_img_opts_default(&o);
    o.size = s;
    o.reference = 1;
    /* 3: these must not matter in reference mode */
    o.autorotate = (int)(i & 1);
    o.color_manage = (int)(i >> 1 & 1);
    int md = 0, pmd = 0;
    long bad = compare(file, &o, ref->data, &md);
    CHECK(bad == 0, "%s (%s): reference mode: %ld bytes differ from PIL, max %d levels", file,
          json_string_value(json_object_get(c, "what")), bad, md);
    /* 2: product mode */
    const char *kind = json_string_value(json_object_get(c, "product"));
    const blip_st_tensor *pt = kind && !strcmp(kind, "value") ? want(st, "product", file, s) : NULL;
    CHECK(pt || (kind && (!strcmp(kind, "ref") || !strcmp(kind, "differs"))), "%s: bad product entry", file);
    blip_img_opts_default(&o);
    o.size = s;
    long pbad = compare(file, &o, pt ? pt->data : ref->data, &pmd);
    char prod[64];
    if (pt) {
      CHECK(pbad == 0, "%s: product mode: %ld bytes differ from the product value, max %d", file, pbad, pmd);
      int pil = memcmp(pt->data, ref->data, (size_t)3 * s * s) != 0;
      snprintf(prod, sizeof prod, "%s%s", pbad == 0 ? "exact" : "DIFF", pil ? " (!=PIL)" : "");
    } else if (kind && !strcmp(kind, "differs")) {
      CHECK(pbad > 0, "%s: product mode gives PIL's bytes; README's table says it differs", file);
      snprintf(prod, sizeof prod, "%s", pbad > 0 ? "!=PIL" : "SAME");
    } else {
      CHECK(pbad == 0, "%s: product mode: %ld bytes differ from PIL, max %d; both modes should agree", file, pbad,
            pmd);
      snprintf(prod, sizeof prod, "%s", pbad == 0 ? "=PIL" : "DIFF");
    }
    printf("%-22s %-6s %10s %10s\n", file, json_string_value(json_object_get(c, "pil_mode")),
           bad == 0 ? "exact" : "DIFF", prod);
  }
  blip_img_opts o;
  blip_img_opts_default(&o);
  o.reference = o.shrink_on_load = 1;
  CHECK(blip_img_load_file(test_data("pil-cases/cmyk_adobe.jpg"), &o, NULL, NULL, NULL) == BLIP_EINVAL,
        "reference mode with shrink_on_load must be refused");
  blip_st_close(st);
  json_decref(doc);
  return check_summary();
}
