/* blip-caption: BLIP captions for images (Salesforce/blip-image-captioning-*
 * or any BlipForConditionalGeneration checkpoint), with Hugging Face
 * generate()'s semantics and defaults (transformers 4.38). Images come from
 * files (libvips, EXIF applied unless --no-autorotate) or preprocessed
 * pixel tensors; vision runs in batches of 8, then each image's caption. */
#include "blip_cap.h"
#include "blip_err.h"
#include "blip_img.h"
#include "blip_kern.h"
#include "blip_model.h"

#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void usage(FILE *f) {
  fprintf(f,
          "usage: blip-caption --model DIR [--image FILE]... [--pixels FILE.safetensors:TENSOR]... [--prompt TEXT]\n"
          "                    [--beams N] [--max-length N] [--min-length N] [--repetition-penalty R]\n"
          "                    [--length-penalty L] [--no-repeat-ngram N]\n"
          "                    [--sample [--top-p P] [--top-k K] [--temperature T] [--seed S]]\n"
          "                    [--precision f32|bf16|int8] [--threads N]\n"
          "                    [--reference | --no-autorotate --no-color-manage] [--json]\n"
          "\n"
          "Captions each image with BLIP's image-grounded text decoder, as Hugging Face's\n"
          "BlipForConditionalGeneration.generate() does. Defaults are the checkpoint's (config.json\n"
          "text_config; the hub's: greedy, --max-length 20, --min-length 0). BLIP's paper/demo setting\n"
          "is --beams 3 --min-length 5 (and --prompt \"a picture of\"); its nucleus sampling is\n"
          "--sample --top-p 0.9. max/min length count the decoder prefix ([DEC] and the prompt).\n"
          "The text keeps the prompt, as HF's decode does.\n"
          "--sample draws from a seeded generator (xoshiro256**, --seed, default 0): reproducible,\n"
          "but not torch's random stream, so it cannot match a PyTorch sample.\n"
          "--reference decodes images as the HF processor does (PIL's Image.open().convert(\"RGB\")), else\n"
          "EXIF orientation and colour profiles are applied as blip-index does.\n"
          "--pixels: F32 [N,3,S,S] already preprocessed (repeatable). Output: one line per image,\n"
          "\"NAME<TAB>caption\"; --json: one object per line {image, ids, text[, score]} where ids are\n"
          "generate()'s ids without padding and score the beam's length-normalised log-probability.\n");
}

static int fail(const char *what) {
  fprintf(stderr, "blip-caption: %s: %s\n", what, blip_err_last());
  return 1;
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int parse_num(const char *name, const char *s, double lo, double hi, double *out) {
  char *end;
  double v = strtod(s, &end);
  if (end == s || *end || !(v >= lo && v <= hi)) {
    fprintf(stderr, "blip-caption: --%s %s: want a number in [%g, %g]\n", name, s, lo, hi);
    return -1;
  }
  *out = v;
  return 0;
}

int main(int argc, char **argv) {
  const char *model_dir = NULL, *prompt = NULL;
  const char **images = calloc((size_t)argc, sizeof *images), **pixels = calloc((size_t)argc, sizeof *pixels);
  int n_files = 0, n_specs = 0, json = 0, threads = 0, autorot = 1, colour = 1, sample = 0, reference = 0;
  double beams = -1, max_len = -1, min_len = -1, rep = -1, lp = -2e9, top_p = -1, top_k = -1, seed = 0, ngram = -1, temp = -1;
  blip_model_opts mo = {.precision = BLIP_PREC_F32};
  if (!images || !pixels) return 1;
  static struct option lo[] = {
    {"model", 1, 0, 'm'}, {"image", 1, 0, 'i'}, {"pixels", 1, 0, 'p'}, {"prompt", 1, 0, 'P'}, {"beams", 1, 0, 'b'},
    {"max-length", 1, 0, 'L'}, {"min-length", 1, 0, 'l'}, {"repetition-penalty", 1, 0, 'r'}, {"length-penalty", 1, 0, 'y'},
    {"sample", 0, 0, 's'}, {"top-p", 1, 0, 't'}, {"top-k", 1, 0, 'k'}, {"seed", 1, 0, 'S'}, {"precision", 1, 0, 'X'},
    {"threads", 1, 0, 'T'}, {"no-autorotate", 0, 0, 'R'}, {"no-color-manage", 0, 0, 'C'}, {"reference", 0, 0, 'F'}, {"json", 0, 0, 'j'},
    {"no-repeat-ngram", 1, 0, 'n'}, {"temperature", 1, 0, 'e'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "m:i:p:h", lo, NULL)) != -1;) {
    int e = 0;
    switch (c) {
    case 'm': model_dir = optarg; break;
    case 'i': images[n_files++] = optarg; break;
    case 'p': pixels[n_specs++] = optarg; break;
    case 'P': prompt = optarg; break;
    case 'b': e = parse_num("beams", optarg, 1, 64, &beams); break;
    case 'L': e = parse_num("max-length", optarg, 2, 1 << 16, &max_len); break;
    case 'l': e = parse_num("min-length", optarg, 0, 1 << 16, &min_len); break;
    case 'r': e = parse_num("repetition-penalty", optarg, 1e-6, 1e6, &rep); break;
    case 'y': e = parse_num("length-penalty", optarg, -1e6, 1e6, &lp); break;
    case 's': sample = 1; break;
    case 't': e = parse_num("top-p", optarg, 1e-6, 1, &top_p); break;
    case 'k': e = parse_num("top-k", optarg, 0, 1 << 22, &top_k); break;
    case 'n': e = parse_num("no-repeat-ngram", optarg, 0, 1 << 16, &ngram); break;
    case 'e': e = parse_num("temperature", optarg, 1e-6, 1e6, &temp); break;
    case 'S': e = parse_num("seed", optarg, 0, 9007199254740992.0, &seed); break;
    case 'T': threads = atoi(optarg); break;
    case 'R': autorot = 0; break;
    case 'C': colour = 0; break;
    case 'F': reference = 1; break;
    case 'j': json = 1; break;
    case 'X':
      if (blip_model_parse_precision(optarg, &mo.precision)) {
        fprintf(stderr, "blip-caption: %s\n", blip_err_last());
        e = -1;
      }
      break;
    case 'h': usage(stdout); free(images), free(pixels); return 0;
    default: e = -1;
    }
    if (e) goto usage_err;
  }
  if (!model_dir || optind < argc || (!n_files && !n_specs)) {
  usage_err:
    usage(stderr);
    free(images), free(pixels);
    return 2;
  }
  blip_k_set_threads(threads);
  blip_model *m = NULL;
  if (blip_model_load(model_dir, &mo, &m)) {
    free(images), free(pixels);
    return fail(model_dir);
  }
  const blip_cfg *c = blip_model_cfg(m);
  blip_cap_opts o;
  blip_cap_defaults(m, &o);
  o.prompt = prompt;
  if (beams > 0) o.num_beams = (int)beams;
  if (max_len > 0) o.max_length = (int)max_len;
  if (min_len >= 0) o.min_length = (int)min_len;
  if (rep > 0) o.repetition_penalty = (float)rep;
  if (lp > -1e9) o.length_penalty = (float)lp;
  if (sample) o.do_sample = 1;
  if (top_p > 0) o.top_p = (float)top_p;
  if (top_k >= 0) o.top_k = (int)top_k;
  if (ngram >= 0) o.no_repeat_ngram_size = (int)ngram;
  if (temp > 0) o.temperature = (float)temp;
  o.seed = (uint64_t)seed;
  const int S = c->image_size, T = c->v_tokens, D = c->v_hidden, BATCH = 8;
  const size_t PX = (size_t)3 * S * S;
  int rc = 1, n_img = n_files;
  float *px = NULL, *emb = malloc(sizeof(float) * BATCH * T * D);
  char **names = NULL;
  blip_cap_result res[8] = {{0}};
  if (!c->captioner) {
    blip_err_set(BLIP_EINVAL, "not a captioning model (architectures: BlipForConditionalGeneration)");
    fail(model_dir);
    goto out;
  }
  /* the pixel tensors' rows follow the files */
  if (!(px = malloc(PX * sizeof(float) * (n_files ? n_files : 1))) || !emb) goto oom;
  for (int s = 0; s < n_specs; s++) {
    float *p = NULL;
    int n = 0;
    if (blip_img_load_pixels(pixels[s], S, &p, &n)) { fail(pixels[s]); goto out; }
    float *grown = realloc(px, PX * sizeof(float) * (size_t)(n_img + n));
    if (!grown) { free(p); goto oom; }
    px = grown;
    memcpy(px + (size_t)n_img * PX, p, PX * sizeof(float) * (size_t)n);
    free(p);
    char **nn = realloc(names, sizeof *names * (size_t)(n_img + n));
    if (!nn) goto oom;
    names = nn;
    for (int i = 0; i < n; i++) {
      size_t len = strlen(pixels[s]) + 16;
      if (!(names[n_img + i] = malloc(len))) goto oom;
      snprintf(names[n_img + i], len, "%s[%d]", pixels[s], i);
    }
    n_img += n;
  }
  if (n_files) {
    if (blip_img_init()) { fail("libvips"); goto out; }
    blip_img_opts io;
    blip_img_opts_default(&io);
    io.size = S, io.autorotate = autorot, io.color_manage = colour, io.reference = reference;
    for (int i = 0; i < n_files; i++)
      if (blip_img_load_file(images[i], &io, px + (size_t)i * PX, NULL, NULL)) { fail(images[i]); goto out; }
  }
  const int tty = isatty(2) && !json;
  const double t0 = now_s();
  for (int i = 0; i < n_img; i += BATCH) {
    const int b = n_img - i < BATCH ? n_img - i : BATCH;
    if (blip_model_vision(m, px + (size_t)i * PX, b, emb, NULL)) { fail("vision"); goto out; }
    if (blip_cap_generate(m, emb, b, &o, res)) { fail("caption"); goto out; }
    for (int k = 0; k < b; k++) {
      const char *name = i + k < n_files ? images[i + k] : names[i + k];
      if (json) {
        json_t *j = json_object(), *ids = json_array();
        for (int t = 0; t < res[k].n; t++) json_array_append_new(ids, json_integer(res[k].ids[t]));
        json_object_set_new(j, "image", json_string(name));
        json_object_set_new(j, "ids", ids);
        json_object_set_new(j, "text", json_string(res[k].text));
        if (o.num_beams > 1) json_object_set_new(j, "score", json_real(res[k].score));
        json_dumpf(j, stdout, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
        fputc('\n', stdout);
        json_decref(j);
      } else {
        printf("%s\t%s\n", name, res[k].text);
      }
    }
    fflush(stdout);
    blip_cap_result_free(res, b);
    if (tty && n_img > BATCH) {
      double el = now_s() - t0, rate = (i + b) / el;
      fprintf(stderr, "\r%d/%d images, %.2f/s, ETA %.0f s ", i + b, n_img, rate, (n_img - i - b) / rate);
    }
  }
  if (tty && n_img > BATCH) fputc('\n', stderr);
  rc = 0;
  goto out;
oom:
  blip_err_set(BLIP_ENOMEM, "out of memory");
  fail("images");
out:
  for (int i = n_files; names && i < n_img; i++) free(names[i]);
  free(names);
  free(px);
  free(emb);
  free(images);
  free(pixels);
  blip_model_free(m);
  return rc;
}
