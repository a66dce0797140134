/* blip-embed: BLIP features and scores for scripts and diagnostics.
 * Images come from files (decoded by blip_img, exact path, EXIF applied
 * unless --no-autorotate; PIL's decoding with --reference) or from preprocessed pixel tensors in a
 * safetensors file; texts are tokenized to --max-len ids (35, BLIP's
 * retrieval setting). Prints ITC similarities and, with --itm, ITM logits
 * for every image-text pair. */
#include "blip_arg.h"
#include "blip_decode.h"
#include "blip_err.h"
#include "blip_img.h"
#include "blip_kern.h"
#include "blip_model.h"
#include "blip_out.h"
#include "blip_st.h"

#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
  fprintf(f,
          "usage: blip-embed --model DIR [--image FILE]... [--pixels FILE.safetensors:TENSOR] [--text STR]...\n"
          "                  [--itm] [--itm-first-token enc|cls] [--naive-itm] [--pre-caption] [--max-len N]\n"
          "                  [--reference | --no-autorotate --no-color-manage] [--threads N] [--precision f32|bf16|int8]\n"
          "                  [--json]\n"
          "\n"
          "Computes BLIP image features (--image, --pixels: F32 [N,3,S,S] already preprocessed), text features\n"
          "(--text), their ITC cosine similarities, and with --itm the ITM logits [no-match, match] of every\n"
          "image-text pair. ITM puts [ENC] first (the paper's protocol) unless --itm-first-token cls (HF's).\n"
          "Images are decoded on the exact path with EXIF orientation and ICC profiles applied (product mode,\n"
          "as blip-index). --reference decodes as BLIP's evaluation does, PIL's Image.open().convert(\"RGB\"),\n"
          "byte for byte (as blip-eval): no EXIF orientation, no ICC, naive CMYK, 16-bit grey clipped; README\n"
          "\"Reference mode\" lists every difference. --no-autorotate, --no-color-manage switch off one each.\n"
          "--pre-caption cleans texts with BLIP's pre_caption first (as retrieval evaluation does).\n"
          "--json prints {image_feat, text_feat, input_ids, itc, itm_logits}; input_ids hold the real\n"
          "tokens ([CLS] ... [SEP], no padding); a value that is not finite (NaN, inf) is null.\n"
          "--threads: 1..4 per core (default: all cores).\n"
          "--precision picks the compute precision of the linear layers (default f32; bf16 and int8 are\n"
          "faster and approximate: see the engine's accuracy figures).\n");
}

static int fail(const char *what) {
  blip_err_wrap(BLIP_EINVAL, "%s", what);
  blip_out_error("blip-embed", blip_err_last());
  return 1;
}

static json_t *matrix(const float *x, int rows, int cols) {
  json_t *a = json_array();
  for (int i = 0; i < rows; i++) {
    json_t *r = json_array();
    for (int j = 0; j < cols; j++) json_array_append_new(r, blip_out_json_num(x[(size_t)i * cols + j])); /* NaN: null */
    json_array_append_new(a, r);
  }
  return a;
}

int main(int argc, char **argv) {
  const char *model_dir = NULL, *pixels = NULL;
  const char **images = calloc((size_t)argc, sizeof *images), **texts = calloc((size_t)argc, sizeof *texts);
  int n_img_files = 0, n_txt = 0, itm = 0, json = 0, threads = 0, max_len = 35, pre = 0, naive = 0, autorot = 1, colour = 1,
      reference = 0;
  int bad = BLIP_EINVAL; /* a bad option value, or why an --image is refused */
  blip_itm_first first = BLIP_ITM_ENC;
  blip_model_opts opts = {.precision = BLIP_PREC_F32};
  static struct option lo[] = {
    {"model", 1, 0, 'm'}, {"image", 1, 0, 'i'}, {"pixels", 1, 0, 'p'}, {"text", 1, 0, 't'},
    {"itm", 0, 0, 'I'}, {"itm-first-token", 1, 0, 'F'}, {"naive-itm", 0, 0, 'N'}, {"pre-caption", 0, 0, 'P'},
    {"max-len", 1, 0, 'L'}, {"no-autorotate", 0, 0, 'R'}, {"no-color-manage", 0, 0, 'C'}, {"reference", 0, 0, 'r'},
    {"threads", 1, 0, 'T'},
    {"json", 0, 0, 'j'}, {"precision", 1, 0, 'X'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "m:i:p:t:h", lo, NULL)) != -1;) {
    switch (c) {
    case 'm': model_dir = optarg; break;
    case 'i': images[n_img_files++] = optarg; break;
    case 'p': pixels = optarg; break;
    case 't': texts[n_txt++] = optarg; break;
    case 'I': itm = 1; break;
    case 'F':
      if (!strcmp(optarg, "enc")) first = BLIP_ITM_ENC;
      else if (!strcmp(optarg, "cls")) first = BLIP_ITM_CLS;
      else { fprintf(stderr, "blip-embed: --itm-first-token takes enc or cls\n"); goto usage_err; }
      break;
    case 'N': naive = 1; break;
    case 'P': pre = 1; break;
    case 'L': if (blip_arg_int("--max-len", optarg, 2, 512, &max_len)) goto bad_value; break;
    case 'R': autorot = 0; break;
    case 'C': colour = 0; break;
    case 'r': reference = 1; break;
    case 'T': if (blip_arg_threads("--threads", optarg, &threads)) goto bad_value; break;
    case 'j': json = 1; break;
    case 'X':
      if (blip_model_parse_precision(optarg, &opts.precision)) {
        fprintf(stderr, "blip-embed: %s\n", blip_err_last());
        goto usage_err;
      }
      break;
    case 'h': usage(stdout); free(images), free(texts); return 0;
    default: goto usage_err;
    }
  }
  bad = BLIP_OK;
  for (int i = 0; i < n_img_files && !bad; i++) bad = blip_arg_regular_file(images[i]); /* a FIFO would block */
  if (bad) {
  bad_value:
    blip_out_error("blip-embed", blip_err_last());
    free(images), free(texts);
    return bad == BLIP_EIO ? 1 : 2; /* a missing file is an error like a corrupt one; a FIFO is a bad argument */
  }
  if (!model_dir || optind < argc || (!n_img_files && !pixels && !n_txt) || max_len < 2) {
  usage_err:
    usage(stderr);
    free(images), free(texts);
    return 2;
  }
  blip_k_set_threads(threads);
  blip_model *m = NULL;
  if (blip_model_load(model_dir, &opts, &m)) {
    free(images), free(texts);
    return fail(model_dir);
  }
  const blip_cfg *c = blip_model_cfg(m);
  const int S = c->image_size, E = c->embed_dim, T = c->v_tokens, D = c->v_hidden;
  if (max_len > c->t_max_pos) max_len = c->t_max_pos;

  /* images: files first, then the pixel tensor's rows */
  int n_pix = 0, n_img = 0, rc = 1;
  float *px = NULL, *emb = NULL, *ifeat = NULL, *tfeat = NULL, *itc = NULL, *logits = NULL;
  int32_t *ids = calloc((size_t)(n_txt ? n_txt : 1) * max_len, sizeof *ids), *mask = calloc((size_t)(n_txt ? n_txt : 1) * max_len, sizeof *mask);
  int *lens = calloc((size_t)(n_txt ? n_txt : 1), sizeof *lens);
  if (pixels && blip_img_load_pixels(pixels, S, &px, &n_pix)) { fail(pixels); goto out; }
  n_img = n_img_files + n_pix;
  if (n_img) {
    float *all = malloc(sizeof(float) * n_img * 3 * S * S);
    if (!all) { blip_err_set(BLIP_ENOMEM, "out of memory"); fail("images"); goto out; }
    if (n_pix) memcpy(all + (size_t)n_img_files * 3 * S * S, px, sizeof(float) * n_pix * 3 * S * S);
    free(px);
    px = all;
    if (n_img_files && blip_img_init()) { fail("libvips"); goto out; }
    blip_img_opts io;
    blip_img_opts_default(&io);
    io.size = S;
    io.autorotate = autorot;
    io.color_manage = colour;
    io.reference = reference;
    if (n_img_files && blip_decode_paths((const char *const *)images, n_img_files, &io, px)) { fail("image"); goto out; }
    emb = malloc(sizeof(float) * n_img * T * D);
    ifeat = malloc(sizeof(float) * n_img * E);
    if (!emb || !ifeat) { blip_err_set(BLIP_ENOMEM, "out of memory"); fail("images"); goto out; }
    for (int i = 0; i < n_img; i += 8) {
      int b = n_img - i < 8 ? n_img - i : 8;
      if (blip_model_vision(m, px + (size_t)i * 3 * S * S, b, emb + (size_t)i * T * D, ifeat + (size_t)i * E)) { fail("vision"); goto out; }
    }
  }
  if (n_txt) {
    tfeat = malloc(sizeof(float) * n_txt * E);
    if (!tfeat) goto out;
    for (int j = 0; j < n_txt; j++) {
      char *clean = NULL;
      size_t clen;
      const char *t = texts[j];
      if (pre) {
        if (blip_tok_pre_caption(t, strlen(t), 30, &clean, &clen)) { fail("pre_caption"); goto out; }
        t = clean;
      }
      int trunc = 0;
      int e = blip_model_tokenize(m, t, max_len, ids + (size_t)j * max_len, mask + (size_t)j * max_len, &lens[j], &trunc);
      free(clean);
      if (e) { fail("tokenize"); goto out; }
      if (trunc && !json) fprintf(stderr, "blip-embed: text %d truncated to %d tokens\n", j + 1, max_len);
      /* unpadded: padding is masked, so features equal the padded ones */
      if (blip_model_text(m, ids + (size_t)j * max_len, mask + (size_t)j * max_len, 1, lens[j], NULL, tfeat + (size_t)j * E)) { fail("text"); goto out; }
    }
  }
  if (n_img && n_txt) {
    itc = malloc(sizeof(float) * n_img * n_txt);
    if (!itc) goto out;
    blip_k_gemm(0, 1, n_img, n_txt, E, 1.0f, ifeat, E, tfeat, E, 0.0f, itc, n_txt);
    if (itm) {
      logits = malloc(sizeof(float) * n_img * n_txt * 2);
      const float **cand = malloc(sizeof(float *) * n_img);
      float *lg = malloc(sizeof(float) * n_img * 2);
      if (!logits || !cand || !lg) { free(cand); free(lg); goto out; }
      for (int i = 0; i < n_img; i++) cand[i] = emb + (size_t)i * T * D;
      for (int j = 0; j < n_txt; j++) {
        if (blip_model_itm(m, ids + (size_t)j * max_len, lens[j], cand, n_img, first, !naive, lg, NULL)) {
          free(cand), free(lg);
          fail("itm");
          goto out;
        }
        for (int i = 0; i < n_img; i++) memcpy(logits + ((size_t)i * n_txt + j) * 2, lg + 2 * i, 2 * sizeof(float));
      }
      free(cand);
      free(lg);
    }
  } else if (itm) {
    fprintf(stderr, "blip-embed: --itm needs at least one image and one text\n");
    goto out;
  }
  if (json) {
    json_t *o = json_object();
    if (n_img) json_object_set_new(o, "image_feat", matrix(ifeat, n_img, E));
    if (n_txt) {
      json_object_set_new(o, "text_feat", matrix(tfeat, n_txt, E));
      json_t *a = json_array();
      for (int j = 0; j < n_txt; j++) {
        json_t *r = json_array();
        for (int k = 0; k < lens[j]; k++) json_array_append_new(r, json_integer(ids[(size_t)j * max_len + k]));
        json_array_append_new(a, r);
      }
      json_object_set_new(o, "input_ids", a);
    }
    if (itc) json_object_set_new(o, "itc", matrix(itc, n_img, n_txt));
    if (logits) {
      json_t *a = json_array();
      for (int i = 0; i < n_img; i++) json_array_append_new(a, matrix(logits + (size_t)i * n_txt * 2, n_txt, 2));
      json_object_set_new(o, "itm_logits", a);
    }
    json_dumpf(o, stdout, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
    fputc('\n', stdout);
    json_decref(o);
  } else {
    for (int j = 0; j < n_txt; j++) printf("text %d: %d tokens: ", j + 1, lens[j]), blip_out_fesc(stdout, texts[j]), putchar('\n');
    for (int i = 0; i < n_img; i++) printf("image %d: ", i + 1), blip_out_fesc(stdout, i < n_img_files ? images[i] : "(pixels)"), putchar('\n');
    if (itc) {
      printf("%-8s %-8s %10s%s\n", "image", "text", "itc", logits ? "   itm_nomatch  itm_match  p(match)" : "");
      for (int i = 0; i < n_img; i++)
        for (int j = 0; j < n_txt; j++) {
          printf("%-8d %-8d %10.6f", i + 1, j + 1, itc[(size_t)i * n_txt + j]);
          if (logits) {
            const float *l = logits + ((size_t)i * n_txt + j) * 2;
            printf("   %11.6f %10.6f %9.4f", l[0], l[1], 1.0 / (1.0 + exp((double)l[0] - l[1])));
          }
          putchar('\n');
        }
    } else {
      printf("features: %d x %d (use --json to print them)\n", n_img ? n_img : n_txt, E);
    }
  }
  rc = 0;
out:
  free(px), free(emb), free(ifeat), free(tfeat), free(itc), free(logits), free(ids), free(mask), free(lens);
  free(images), free(texts);
  blip_model_free(m);
  return rc;
}
