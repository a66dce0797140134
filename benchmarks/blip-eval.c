/* blip-eval: image-text retrieval recall on COCO 5k / Flickr30k 1k with
 * BLIP's exact protocol (train_retrieval.py `evaluation` + `itm_eval`), and
 * `--bench`: time per phase at the real base geometry, extrapolated.
 * The pipeline and its resumable cache are src/blip_evalrun; this tool holds
 * the options, the report (beside the paper's numbers) and the benchmark. */
#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blip_arg.h"
#include "blip_err.h"
#include "blip_evalrun.h"
#include "blip_kern.h"
#include "blip_model.h"
#include "blip_out.h"

typedef struct {
  blip_evalrun_opts run;
  const char *dataset;
  int json, report, threads, bench;
} opts;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Count, rate and ETA, on a tty only. Rate counts the work done in this run. */
static void progress(void *ctx, const char *phase, long done, long total, long fresh, double el) {
  double rate = fresh > 0 && el > 0 ? fresh / el : 0;
  long eta = rate > 0 ? (long)((total - done) / rate) : -1;
  fprintf(stderr, "\r%-7s %ld/%ld  %.2f/s  ETA ", phase, done, total, rate);
  if (eta >= 0) fprintf(stderr, "%ldh%02ldm%02lds   ", eta / 3600, eta / 60 % 60, eta % 60);
  else fprintf(stderr, "?          ");
  if (done == total) fputc('\n', stderr);
}

/* ---- report ---------------------------------------------------------------- */

typedef struct {
  const char *name;
  int v_hidden;
  double coco[6], flickr[6]; /* TR@1,5,10, IR@1,5,10 (BLIP paper, Table 5) */
  double zs_tr1, zs_ir1;     /* zero-shot Flickr with the COCO model (Table 6); 0 = not reported */
} paper_row;

static const paper_row PAPER[] = {
    {"ViT-B 14M", 768, {80.6, 95.2, 97.6, 63.1, 85.3, 91.1}, {96.6, 99.8, 100.0, 87.2, 97.5, 98.8}, 94.8, 84.9},
    {"ViT-B 129M", 768, {81.9, 95.4, 97.8, 64.3, 85.7, 91.5}, {97.3, 99.9, 100.0, 87.3, 97.6, 98.9}, 0, 0},
    {"ViT-L 129M", 1024, {82.4, 95.4, 97.9, 65.1, 86.3, 91.8}, {97.4, 99.8, 99.9, 87.6, 97.7, 99.0}, 96.7, 86.7},
};

static void print_row(const char *label, const double v[6]) {
  printf("  %-22s %6.1f %6.1f %6.1f   %6.1f %6.1f %6.1f\n", label, v[0], v[1], v[2], v[3], v[4], v[5]);
}

static void recall6(const blip_eval_recall *x, double v[6]) {
  v[0] = x->tr_r1, v[1] = x->tr_r5, v[2] = x->tr_r10, v[3] = x->ir_r1, v[4] = x->ir_r5, v[5] = x->ir_r10;
}

static void print_text(const opts *o, const blip_evalrun_result *r) {
  const blip_eval_recall *itc = &r->itc, *itm = &r->itm;
  int flickr = !strcmp(o->dataset, "flickr");
  double v[6];
  printf("blip-eval: %s, %d images, %d captions, k_test %d, model %s (Dv %d)\n", o->dataset, r->n_images,
         r->n_texts, o->run.k_test, r->model, r->Dv);
  printf("  %-22s %6s %6s %6s   %6s %6s %6s\n", "", "TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10");
  recall6(itc, v);
  print_row("ITC only", v);
  if (!o->run.itc_only) {
    recall6(itm, v);
    print_row("ITM rerank", v);
    printf("  r_mean: ITC %.2f, ITM %.2f\n", itc->r_mean, itm->r_mean);
  } else {
    printf("  r_mean: ITC %.2f\n", itc->r_mean);
  }
  if (o->report) {
    int shown = 0;
    printf("paper (BLIP, Table 5, fine-tuned on %s):\n", flickr ? "Flickr30k" : "COCO");
    for (size_t p = 0; p < sizeof PAPER / sizeof *PAPER; p++) {
      if (PAPER[p].v_hidden != r->Dv) continue;
      print_row(PAPER[p].name, flickr ? PAPER[p].flickr : PAPER[p].coco);
      if (flickr && PAPER[p].zs_tr1 > 0)
        printf("  %-22s %6.1f%17s%6.1f                (zero-shot, COCO model; Table 6)\n", PAPER[p].name,
               PAPER[p].zs_tr1, "", PAPER[p].zs_ir1);
      shown++;
    }
    if (!shown) printf("  no paper row for vision width %d (ViT-B is 768, ViT-L 1024)\n", r->Dv);
    if (o->run.limit > 0) printf("  note: --limit %d; the paper's gallery is the full split\n", o->run.limit);
  }
  printf("time: text %.1f s, images %.1f s, itm %.1f s, scoring %.1f s (cached chunks: %d text, %d image, %d itm)\n",
         r->sec_text, r->sec_img, r->sec_itm, r->sec_score, r->cached_text, r->cached_img, r->cached_itm);
}

static json_t *recall_json(const blip_eval_recall *x) {
  json_t *(*num)(double) = blip_out_json_num; /* a NaN would make json_pack drop the whole object */
  return json_pack("{s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o}", "txt_r1", num(x->tr_r1), "txt_r5", num(x->tr_r5),
                   "txt_r10", num(x->tr_r10), "txt_r_mean", num(x->tr_mean), "img_r1", num(x->ir_r1), "img_r5",
                   num(x->ir_r5), "img_r10", num(x->ir_r10), "img_r_mean", num(x->ir_mean), "r_mean", num(x->r_mean));
}

static int print_json(const opts *o, const blip_evalrun_result *r) {
  const blip_eval_recall *itc = &r->itc, *itm = &r->itm;
  json_t *j = json_pack("{s:s, s:s, s:s, s:i, s:i, s:i, s:o, s:{s:f, s:f, s:f, s:f}, s:{s:i, s:i, s:i}}",
                        "dataset", o->dataset, "model", r->model, "precision",
                        blip_model_precision_name(o->run.precision), "n_images", r->n_images, "n_texts", r->n_texts, "k_test",
                        o->run.k_test, "itc", recall_json(itc), "seconds", "text", r->sec_text, "images", r->sec_img,
                        "itm", r->sec_itm, "scoring", r->sec_score, "cached_chunks", "text", r->cached_text, "images",
                        r->cached_img, "itm", r->cached_itm);
  if (!j) return blip_err_set(BLIP_ENOMEM, "out of memory");
  if (!o->run.itc_only) {
    json_object_set_new(j, "itm", recall_json(itm));
    json_object_set_new(j, "itm_pairs", json_integer(r->itm_pairs));
    json_object_set_new(j, "k_i2t", json_integer(r->k_i2t)); /* k_test clamped to the gallery size */
    json_object_set_new(j, "k_t2i", json_integer(r->k_t2i));
  }
  char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
  json_decref(j);
  if (!s) return blip_err_set(BLIP_ENOMEM, "out of memory");
  puts(s);
  free(s);
  return BLIP_OK;
}

static int run_eval(const opts *o) {
  blip_evalrun_result r;
  int rc = blip_evalrun(&o->run, &r);
  if (rc) return rc;
  if (o->json) return print_json(o, &r);
  print_text(o, &r);
  return BLIP_OK;
}

/* ---- --bench: real base geometry, random weights ---------------------------- */

static void base_cfg(blip_cfg *c) {
  memset(c, 0, sizeof *c);
  c->v_hidden = 768, c->v_layers = 12, c->v_heads = 12, c->v_mlp = 3072, c->image_size = 384, c->patch = 16;
  c->v_eps = 1e-5f, c->v_tokens = (384 / 16) * (384 / 16) + 1;
  c->t_vocab = 30524, c->t_hidden = 768, c->t_layers = 12, c->t_heads = 12, c->t_mlp = 3072, c->t_max_pos = 512;
  c->t_enc_hidden = 768, c->t_eps = 1e-12f, c->pad_id = 0, c->sep_id = 102, c->bos_id = 30522;
  c->embed_dim = 256;
}

/* Seconds per item, measured two ways: wall clock, and process CPU time
 * divided by the thread count (what an otherwise idle machine would take;
 * the two differ when other processes share the cores). */
typedef struct {
  double wall, idle;
} cost;

static double cpu_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static cost cost_since(double w0, double c0, int items) {
  cost k = {(now() - w0) / items, (cpu_now() - c0) / blip_k_threads() / items};
  if (k.idle > k.wall) k.idle = k.wall; /* CPU time also counts spin-waits */
  return k;
}
static int run_bench(const opts *o) {
  enum { NB_IMG = 2, NB_TXT = 32, NB_PAIR = 32, NB_NAIVE = 8, CAP_LEN = 14 }; /* a COCO caption: ~14 tokens */
  blip_cfg c;
  blip_model *m = NULL;
  base_cfg(&c);
  blip_model_opts mo = {.precision = o->run.precision};
  int rc = blip_model_random(&c, &mo, 1, &m);
  if (rc) return rc;
  const size_t px = (size_t)3 * c.image_size * c.image_size, tok = (size_t)c.v_tokens * c.v_hidden;
  float *pix = malloc(NB_IMG * px * sizeof *pix), *emb = malloc(NB_IMG * tok * sizeof *emb);
  float *feat = malloc((size_t)(NB_IMG + NB_TXT) * c.embed_dim * sizeof *feat);
  float *logits = malloc(2 * NB_PAIR * sizeof *logits);
  int32_t *ids = malloc((size_t)NB_TXT * CAP_LEN * sizeof *ids), *mask = malloc((size_t)NB_TXT * CAP_LEN * sizeof *mask);
  const float *imgs[NB_PAIR];
  double w0, c0, s_topk = 0, s_score = 0;
  int64_t pairs = 0;
  cost img, txt, pair, naive, kvp, caps;
  float *kv = NULL;
  if (!pix || !emb || !feat || !logits || !ids || !mask) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  uint64_t r = 42;
  for (size_t j = 0; j < NB_IMG * px; j++) {
    r = r * 6364136223846793005ULL + 1442695040888963407ULL;
    pix[j] = (float)((r >> 40) & 0xffff) / 32768.0f - 1.0f;
  }
  for (int i = 0; i < NB_TXT; i++)
    for (int j = 0; j < CAP_LEN; j++) {
      ids[i * CAP_LEN + j] = j == 0 ? 101 : j == CAP_LEN - 1 ? 102 : 1000 + (i * 37 + j * 101) % 28000;
      mask[i * CAP_LEN + j] = 1;
    }
  printf("bench: base geometry (ViT-B/16 at 384, BERT-base, embed 256), random weights, %s, %d threads\n",
         blip_model_precision_name(o->run.precision), blip_k_threads());
  /* Each measurement follows a warm-up call (arena growth, oneDNN kernel creation). */
  if ((rc = blip_model_vision(m, pix, 1, emb, feat))) goto done;
  w0 = now(), c0 = cpu_now();
  if ((rc = blip_model_vision(m, pix, NB_IMG, emb, feat))) goto done;
  img = cost_since(w0, c0, NB_IMG);
  if ((rc = blip_model_text(m, ids, mask, 4, CAP_LEN, NULL, feat))) goto done;
  w0 = now(), c0 = cpu_now();
  if ((rc = blip_model_text(m, ids, mask, NB_TXT, CAP_LEN, NULL, feat))) goto done;
  txt = cost_since(w0, c0, NB_TXT);
  for (int i = 0; i < NB_PAIR; i++) imgs[i] = emb + (size_t)(i % NB_IMG) * tok;
  if ((rc = blip_model_itm(m, ids, CAP_LEN, imgs, 4, BLIP_ITM_ENC, 1, logits, NULL))) goto done;
  w0 = now(), c0 = cpu_now();
  if ((rc = blip_model_itm(m, ids, CAP_LEN, imgs, NB_PAIR, BLIP_ITM_ENC, 1, logits, NULL))) goto done;
  pair = cost_since(w0, c0, NB_PAIR);
  w0 = now(), c0 = cpu_now();
  if ((rc = blip_model_itm(m, ids, CAP_LEN, imgs, NB_NAIVE, BLIP_ITM_ENC, 0, logits, NULL))) goto done;
  naive = cost_since(w0, c0, NB_NAIVE);
  /* blip-eval's path: an image's K/V projected once, its captions batched against them */
  if (!(kv = malloc(blip_model_itm_kv_floats(m) * sizeof *kv))) {
    rc = blip_err_set(BLIP_ENOMEM, "out of memory");
    goto done;
  }
  if ((rc = blip_model_itm_kv(m, emb, kv)) || (rc = blip_model_itm_captions(m, ids, CAP_LEN, 4, kv, BLIP_ITM_ENC, logits)))
    goto done;
  w0 = now(), c0 = cpu_now();
  if ((rc = blip_model_itm_kv(m, emb, kv))) goto done;
  kvp = cost_since(w0, c0, 1);
  w0 = now(), c0 = cpu_now();
  if ((rc = blip_model_itm_captions(m, ids, CAP_LEN, NB_PAIR, kv, BLIP_ITM_ENC, logits))) goto done;
  caps = cost_since(w0, c0, NB_PAIR);
  if ((rc = blip_evalrun_time_scoring(c.embed_dim, &s_topk, &s_score, &pairs))) goto done;

  printf("per item, wall (idle-machine estimate = CPU time / threads):\n");
  printf("  vision     %8.3f s/image   (%.3f)\n", img.wall, img.idle);
  printf("  text       %8.1f ms/caption (%.1f), %d tokens\n", txt.wall * 1e3, txt.idle * 1e3, CAP_LEN);
  printf("  ITM        %8.1f ms/pair   (%.1f), reassociated cross-attention, %d candidates per call\n",
         pair.wall * 1e3, pair.idle * 1e3, NB_PAIR);
  printf("  ITM naive  %8.1f ms/pair   (%.1f): reassociation saves %.1fx\n", naive.wall * 1e3, naive.idle * 1e3,
         naive.wall / pair.wall);
  printf("  ITM by image %6.1f ms/pair   (%.1f), %d captions per call against one image's K/V, projected once\n"
         "             in %.2f s (%.2f); at %.0f pairs per image (COCO, k 256) %.1f ms/pair (%.1f): %.1fx the reassociated\n",
         caps.wall * 1e3, caps.idle * 1e3, NB_PAIR, kvp.wall, kvp.idle, 256.0 * 25000 / 5000,
         (caps.wall + kvp.wall / 1280) * 1e3, (caps.idle + kvp.idle / 1280) * 1e3, pair.wall / (caps.wall + kvp.wall / 1280));
  printf("COCO 5k scoring, synthetic features, k 256: sims + top-k + ITM plan %.1f s, score rows + ranks %.1f s;\n"
         "  ITM pairs planned %lld (%.1f per caption; upstream runs %d, shared pairs twice)\n",
         s_topk, s_score, (long long)pairs, (double)pairs / 25000, (5000 + 25000) * 256);
  printf("extrapolated hours, idle-machine estimate [measured wall]; ITM (by image: each image's K/V once, then\n"
         "its captions) runs between k*captions pairs (every i2t pair also a t2i pair) and k*(images+captions):\n");
  printf("  %-9s %4s %7s %6s %15s %23s\n", "set", "k", "vision", "text", "ITM", "total");
  static const int ks[] = {16, 32, 64, 128, 256};
  static const struct {
    const char *name;
    int ni, nt;
  } sets[] = {{"COCO 5k", 5000, 25000}, {"Flickr 1k", 1000, 5000}};
  for (int d = 0; d < 2; d++)
    for (size_t j = 0; j < sizeof ks / sizeof *ks; j++) {
      int k = ks[j], ni = sets[d].ni, nt = sets[d].nt;
      double lo = (double)k * nt, hi = (double)k * (ni + nt);
      double base_i = ni * (img.idle + kvp.idle) + nt * txt.idle, base_w = ni * (img.wall + kvp.wall) + nt * txt.wall;
      printf("  %-9s %4d %7.2f %6.2f %6.1f - %6.1f %6.1f - %6.1f [%.1f - %.1f]%s\n", sets[d].name, k,
             ni * img.idle / 3600, nt * txt.idle / 3600, (lo * caps.idle + ni * kvp.idle) / 3600,
             (hi * caps.idle + ni * kvp.idle) / 3600, (base_i + lo * caps.idle) / 3600, (base_i + hi * caps.idle) / 3600,
             (base_w + lo * caps.wall) / 3600, (base_w + hi * caps.wall) / 3600,
             (k == 256 && d == 0) || (k == 128 && d == 1) ? "  <- paper's k_test" : "");
    }
done:
  free(pix);
  free(emb);
  free(feat);
  free(logits);
  free(ids);
  free(mask);
  free(kv);
  blip_model_free(m);
  return rc;
}
/* ---- command line ---------------------------------------------------------- */

static void usage(FILE *f) {
  fprintf(f,
          "usage: blip-eval --model DIR --ann FILE.json --images ROOT [options]\n"
          "       blip-eval --bench [--threads N]\n"
          "BLIP image-text retrieval recall (COCO 5k / Flickr30k 1k protocol of salesforce/BLIP).\n"
          "  --model DIR       checkpoint directory (config.json, model.safetensors, vocab.txt)\n"
          "  --ann FILE        BLIP annotation JSON (coco_karpathy_test.json, flickr30k_test.json)\n"
          "  --images ROOT     directory the annotation's image paths are relative to\n"
          "  --dataset NAME    coco or flickr (default: from the annotation file name)\n"
          "  --k-test N        ITM rerank depth (default 256 for coco, 128 for flickr)\n"
          "  --itc-only        skip the ITM rerank; report ITC recall only\n"
          "  --limit N         first N images and their captions only (quick runs)\n"
          "  --cache DIR       keep features, vision tokens and ITM logits here; a rerun resumes\n"
          "  --cache-f16       store vision tokens as f16 (half the disk, logits move slightly)\n"
          "  --chunk N         items per cache chunk (default 32 images, 1024 captions, 4 ITM images)\n"
          "  --dump FILE       write sims, score_i2t, score_t2i, txt2img as safetensors\n"
          "  --json            machine-readable output\n"
          "  --report          print the paper's numbers beside ours\n"
          "  --threads N       compute threads (1..4 per core; default: all cores)\n"
          "  --precision P     f32 (default), bf16 or int8 linear layers, where the engine has them\n"
          "  --bench           time each phase at the base geometry (random weights) and\n"
          "                    extrapolate COCO 5k and Flickr 1k wall times\n");
}

int main(int argc, char **argv) {
  opts o = {.run = {.k_test = -1, .img_chunk = 32, .txt_chunk = 1024, .itm_chunk = 4}};
  int chunk = 0;
  signal(SIGXFSZ, SIG_IGN); /* first: a file-size limit fails a cache write (EFBIG, reported) instead of killing us */
  if (isatty(2)) o.run.progress = progress;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    int takes = 1;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(a, "--itc-only")) o.run.itc_only = 1, takes = 0;
    else if (!strcmp(a, "--json")) o.json = 1, takes = 0;
    else if (!strcmp(a, "--report")) o.report = 1, takes = 0;
    else if (!strcmp(a, "--bench")) o.bench = 1, takes = 0;
    else if (!strcmp(a, "--cache-f16")) o.run.f16 = 1, takes = 0;
    else if (!v) {
      fprintf(stderr, "blip-eval: %s needs a value (or is unknown); see --help\n", a);
      return 2;
    } else if (!strcmp(a, "--model")) o.run.model = v;
    else if (!strcmp(a, "--ann")) o.run.ann = v;
    else if (!strcmp(a, "--images")) o.run.images = v;
    else if (!strcmp(a, "--dataset")) o.dataset = v;
    else if (!strcmp(a, "--cache")) o.run.cache = v;
    else if (!strcmp(a, "--dump")) o.run.dump = v;
    else if (!strcmp(a, "--chunk")) {
      chunk = (int)blip_arg_must("blip-eval", a, v, 1, 1 << 20);
      o.run.img_chunk = o.run.txt_chunk = o.run.itm_chunk = chunk;
    } else if (!strcmp(a, "--k-test")) o.run.k_test = (int)blip_arg_must("blip-eval", a, v, 1, INT32_MAX);
    else if (!strcmp(a, "--limit")) o.run.limit = (int)blip_arg_must("blip-eval", a, v, 0, INT32_MAX);
    else if (!strcmp(a, "--threads")) o.threads = (int)blip_arg_must("blip-eval", a, v, 1, blip_arg_max_threads());
    else if (!strcmp(a, "--precision") && !blip_model_parse_precision(v, &o.run.precision)) {
    } else {
      fprintf(stderr, "blip-eval: bad option %s %s; see --help\n", a, v);
      return 2;
    }
    i += takes;
  }
  blip_k_set_threads(o.threads);
  int rc;
  if (o.bench) {
    rc = run_bench(&o);
  } else {
    if (!o.run.model || !o.run.ann || !o.run.images) {
      usage(stderr);
      return 2;
    }
    if (!o.dataset) o.dataset = strstr(o.run.ann, "flickr") ? "flickr" : "coco";
    if (strcmp(o.dataset, "coco") && strcmp(o.dataset, "flickr")) {
      fprintf(stderr, "blip-eval: --dataset must be coco or flickr\n");
      return 2;
    }
    if (o.run.k_test < 0) o.run.k_test = !strcmp(o.dataset, "flickr") ? 128 : 256;
    rc = run_eval(&o);
  }
  if (rc) {
    blip_out_error("blip-eval", blip_err_last());
    return 1;
  }
  return 0;
}
