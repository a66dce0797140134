/* blip-query: search a blipsearch index with BLIP.
 *
 * Text -> images (ITC top-K by cosine, ITM rerank, score = match logit +
 * cosine), image -> images (ITC), image -> texts (ITC + ITM), one query or a
 * stream of them on stdin (the model is loaded once). Three output forms
 * print the same hits: a table, --json, --paths. Exit: 0 results, 1 no
 * match (nothing in the filters or above --threshold), 2 usage or error. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "blip_arg.h"
#include "blip_decode.h"
#include "blip_tar.h"
#include "blip_err.h"
#include "blip_img.h"
#include "blip_kern.h"
#include "blip_model.h"
#include "blip_out.h"
#include "blip_search.h"
#include "blip_store.h"

static const char USAGE[] =
    "usage: blip-query [options] \"query text\"\n"
    "       blip-query [options] --image FILE                 (photos like this one)\n"
    "       blip-query [options] --image FILE --text T...     (rank captions for a photo)\n"
    "       blip-query [options] --stdin                      (one text query a line)\n"
    "Search the photos indexed by blip-index with BLIP (ITC top-K, then ITM rerank).\n"
    "\n"
    "  --db DIR          index directory (default $BLIPSEARCH_DB, else\n"
    "                    $XDG_DATA_HOME/blipsearch, else ~/.local/share/blipsearch)\n"
    "  --model DIR       BLIP model directory (default $BLIPSEARCH_MODEL); must be the indexing model\n"
    "  -n N              results to print (1..1000000, default 10)\n"
    "  --rerank K        ITM-rerank the K best by cosine (0..4096, default 16: about 0.3 s at base size on\n"
    "                    2 cores); 0 = ITC cosine only. Score = ITM match logit + cosine\n"
    "  --threshold P     keep results with ITM probability >= P (0..1); none: exit 1\n"
    "  --sort score|date order of the printed results (date: newest first; default score)\n"
    "  --under DIR       only photos under DIR (as given, or its realpath: a symlinked folder works)\n"
    "  --after DATE      only photos taken (EXIF, else file mtime) on or after DATE\n"
    "  --before DATE     only photos taken before DATE (YYYY-MM-DD[THH:MM[:SS]], local time, a real day)\n"
    "  --ext LIST        only these extensions, e.g. jpg,png (case-insensitive; jpg also\n"
    "                    matches .jpeg, tif .tiff)\n"
    "  --words \"W...\"    only photos whose caption (blip-index --captions) has every word\n"
    "                    (full-text, case and accent blind)\n"
    "  --json            JSON array of {rank, id, path, path_b64, score, itm_prob, itm_logit, cosine,\n"
    "                    taken_at, mtime, caption}; with --stdin one {query, query_b64, truncated, error,\n"
    "                    results} object a line. Every key is always there: a name that is not\n"
    "                    UTF-8 is in path (invalid bytes as U+FFFD) and, exactly, in path_b64\n"
    "                    (base64; null when path is exact); a number that is not finite is null\n"
    "  --paths           one path a line (escaped on a terminal: \\xNN for control bytes); the\n"
    "                    table shows captions under the paths, --paths prints paths only\n"
    "  -0                with --paths: end each path with a NUL byte instead (for xargs -0)\n"
    "  --image FILE      query by image: similar photos (ITC image-image), or with texts,\n"
    "                    rank the texts for this image (ITC + ITM)\n"
    "  --text T          a candidate text for --image (repeatable)\n"
    "  --texts-file F    candidate texts for --image, one a line (also --texts F)\n"
    "  --rank-texts      rank the candidate texts (implied by --text/--texts-file)\n"
    "  --stdin           read one text query a line from stdin; the model loads once\n"
    "  --batch N         --stdin: the lines already waiting (up to N, default 16) are searched\n"
    "                    as one batch (text encoder and ITM rerank shared); 1 = one at a time\n"
    "  --precision P     auto, f32, bf16 or int8 (default and only choice with an index: the index's;\n"
    "                    without one auto: bf16 where the CPU has native bf16 dot products, else f32)\n"
    "  --threads N       compute threads (1..4 per core; default: all cores)\n"
    "  --naive-itm       use the naive cross-attention in the rerank (for checks)\n"
    "  --help            this text\n"
    "\n"
    "Names printed in the table and in messages escape backslash, control bytes and invalid\n"
    "UTF-8 (\\\\, \\t, \\n, \\r, \\xNN).\n"
    "Exit status: 0 results, 1 no match, 2 usage or error.\n";

enum { OUT_TABLE, OUT_JSON, OUT_PATHS };

typedef struct {
  int out;
  int nul; /* --paths -0 */
  const char *const *texts; /* rank-texts mode: hit ids index these */
} printer;

static json_t *hits_json(const printer *p, const blip_search_result *r) {
  json_t *a = json_array();
  for (int i = 0; a && i < r->n; i++)
    json_array_append_new(a, blip_search_hit_json(&r->hits[i], i + 1, p->texts ? p->texts[r->hits[i].id] : NULL));
  return a;
}

static void print_json(json_t *j) {
  char *s = j ? json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
  if (s) puts(s);
  free(s);
}

/* query: the --stdin line (NULL for one query); error: why it was refused, or NULL */
static void print_hits(const printer *p, const blip_search_result *r, const char *query, const char *error) {
  int tty = isatty(1);
  if (p->out == OUT_JSON) {
    json_t *a = hits_json(p, r);
    if (query) { /* --stdin: one object a line */
      json_t *o = json_object();
      blip_out_json_name(o, "query", query);
      json_object_set_new(o, "truncated", json_boolean(r->truncated));
      json_object_set_new(o, "error", error ? blip_out_json_text(error) : json_null());
      json_object_set_new(o, "results", a);
      a = o;
    }
    print_json(a);
    json_decref(a);
  } else if (p->out == OUT_PATHS) {
    for (int i = 0; i < r->n; i++) {
      const char *t = p->texts ? p->texts[r->hits[i].id] : r->hits[i].path;
      if (p->nul) fwrite(t, 1, strlen(t) + 1, stdout);
      else if (tty) blip_out_fesc(stdout, t), putchar('\n');
      else puts(t);
    }
    if (query) putchar(p->nul ? 0 : '\n');
  } else {
    if (query) fputs("# ", stdout), blip_out_fesc(stdout, query), putchar('\n');
    printf("%4s  %8s  %8s  %8s  %s\n", "rank", "score", "itm_prob", "cosine", p->texts ? "text" : "path");
    for (int i = 0; i < r->n; i++) {
      const blip_search_hit *h = &r->hits[i];
      char prob[16] = "-";
      if (!isnan(h->itm_prob)) snprintf(prob, sizeof prob, "%.4f", h->itm_prob);
      printf("%4d  %8.4f  %8s  %8.4f  ", i + 1, h->score, prob, h->cosine);
      blip_out_fesc(stdout, p->texts ? p->texts[h->id] : h->path);
      putchar('\n');
      if (!p->texts && h->caption) {
        printf("%36s\"", "");
        blip_out_fesc(stdout, h->caption);
        puts("\"");
      }
    }
    if (query) putchar('\n');
  }
  fflush(stdout);
}

/* Why a search printed nothing, on stderr. */
static void say_no_match(const blip_search_result *r, const blip_search_opts *o) {
  if (r->filtered && r->n_allowed == 0) fprintf(stderr, "blip-query: no indexed photo matches the filters\n");
  else if (o->threshold >= 0)
    fprintf(stderr, "blip-query: no match: no photo reaches ITM probability %.3g\n", o->threshold);
  else fprintf(stderr, "blip-query: no match\n");
}

static void say_notes(const blip_search_result *r) {
  if (r->truncated) fprintf(stderr, "blip-query: query truncated to %d tokens\n", BLIP_SEARCH_MAX_TOKENS);
  if (r->dropped)
    fprintf(stderr, "blip-query: %d candidate(s) skipped: no stored vision tokens and the file could not be read\n",
            r->dropped);
}

/* Damage of the index that queries worked around, once a run, with the way to repair it. */
static void say_damage(const blip_search *s) {
  static unsigned said;
  unsigned d = s ? blip_search_damage(s) & ~said : 0;
  if (d & BLIP_DAMAGE_CACHE)
    fprintf(stderr, "blip-query: vectors.faiss is damaged: searching the vectors in index.sqlite instead (slower); "
                    "run blip-index --repair\n");
  if (d & BLIP_DAMAGE_TOKENS)
    fprintf(stderr, "blip-query: tokens.bin: token records missing or damaged: recomputing them from the photos "
                    "(slower); run blip-index --repair\n");
  said |= d;
}

/* --stdin lines. The first line of a batch waits for input; the others
 * join only when they are complete and readable without blocking (poll
 * with no timeout), so a query never waits for one not yet sent. Reads
 * fd 0 directly: stdio's buffer would hide what has arrived. */
typedef struct {
  char *buf;
  size_t off, len, cap;
  int eof;
} line_reader;

/* Next non-empty line (\n and \r stripped, malloc'd) into *out: 1, or 0
 * when none is complete (wait = 0) or at the end of input, -1 on error. */
static int next_line(line_reader *l, int wait, char **out) {
  for (;;) {
    char *b = l->buf + l->off, *nl = l->len > l->off ? memchr(b, '\n', l->len - l->off) : NULL;
    if (nl || (l->eof && l->off < l->len)) { /* a line, or the last one without its newline */
      size_t n = nl ? (size_t)(nl - b) : l->len - l->off;
      l->off += n + (nl != NULL);
      while (n && (b[n - 1] == '\r' || b[n - 1] == '\n')) n--;
      if (!n) continue;
      if (!(*out = strndup(b, n))) return blip_err_set(BLIP_ENOMEM, "out of memory"), -1;
      return 1;
    }
    if (l->eof) return 0;
    struct pollfd pf = {0, POLLIN, 0};
    if (!wait && poll(&pf, 1, 0) <= 0) return 0;
    if (l->off) memmove(l->buf, l->buf + l->off, l->len - l->off);
    l->len -= l->off, l->off = 0;
    if (l->cap - l->len < 65536) {
      char *nb = realloc(l->buf, l->cap * 2 + 65536);
      if (!nb) return blip_err_set(BLIP_ENOMEM, "out of memory"), -1;
      l->buf = nb, l->cap = l->cap * 2 + 65536;
    }
    ssize_t r = read(0, l->buf + l->len, l->cap - l->len);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return blip_err_set(BLIP_EIO, "reading stdin: %s", strerror(errno)), -1;
    l->len += (size_t)r;
    l->eof = r == 0;
  }
}

/* Texts of a --texts-file, one a line (empty lines skipped); appended to *v. */
static int read_texts(const char *path, char ***v, int *n) {
  FILE *f = fopen(path, "r");
  if (!f) return blip_err_set(BLIP_EIO, "%s: %s", path, strerror(errno));
  char *line = NULL;
  size_t cap = 0;
  ssize_t len;
  int rc = BLIP_OK;
  while ((len = getline(&line, &cap, f)) >= 0) {
    while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
    if (!len) continue;
    char **nv = realloc(*v, (size_t)(*n + 1) * sizeof *nv);
    if (!nv || !(nv[*n] = strdup(line))) {
      if (nv) *v = nv;
      rc = blip_err_set(BLIP_ENOMEM, "out of memory");
      break;
    }
    *v = nv;
    (*n)++;
  }
  free(line);
  fclose(f);
  return rc;
}

enum { O_WORDS = 1024 };
enum { O_DB = 256, O_MODEL, O_RERANK, O_THRESH, O_SORT, O_UNDER, O_AFTER, O_BEFORE, O_EXT, O_JSON, O_PATHS, O_IMAGE,
       O_TEXT, O_TEXTS, O_RANKT, O_STDIN, O_PREC, O_THREADS, O_NAIVE, O_HELP, O_BATCH };

int main(int argc, char **argv) {
  static const struct option lo[] = {
      {"db", 1, 0, O_DB},         {"model", 1, 0, O_MODEL},       {"rerank", 1, 0, O_RERANK},
      {"threshold", 1, 0, O_THRESH}, {"sort", 1, 0, O_SORT},      {"under", 1, 0, O_UNDER},
      {"after", 1, 0, O_AFTER},   {"before", 1, 0, O_BEFORE},     {"ext", 1, 0, O_EXT}, {"words", 1, 0, O_WORDS},
      {"json", 0, 0, O_JSON},     {"paths", 0, 0, O_PATHS},       {"image", 1, 0, O_IMAGE},
      {"text", 1, 0, O_TEXT},     {"texts-file", 1, 0, O_TEXTS},  {"texts", 1, 0, O_TEXTS},  {"rank-texts", 0, 0, O_RANKT},
      {"stdin", 0, 0, O_STDIN},   {"precision", 1, 0, O_PREC},    {"threads", 1, 0, O_THREADS},
      {"naive-itm", 0, 0, O_NAIVE}, {"help", 0, 0, O_HELP},       {"batch", 1, 0, O_BATCH},   {0, 0, 0, 0}};
  char dbdir[PATH_MAX] = "", after[20], before[20];
  const char *model_dir = NULL, *image = NULL, *prec_name = NULL, *texts_file = NULL;
  char **texts = NULL;
  int ntexts = 0, n_arg_texts = argc, rank_texts = 0, use_stdin = 0, threads = 0, batch = 16, ret = 2, c;
  printer pr = {OUT_TABLE, 0, NULL};
  blip_search_opts o;
  blip_search_opts_default(&o);
  blip_search *s = NULL;
  blip_model *m = NULL;
  float *pix = NULL, *emb = NULL, *feat = NULL;
  blip_search_result r = {0};
  blip_search_query *bq = NULL; /* --stdin's batch */
  if (!(texts = calloc((size_t)argc, sizeof *texts))) return 2;

  while ((c = getopt_long(argc, argv, "n:h0", lo, NULL)) != -1) {
    double thr;
    switch (c) {
    case 'n': if (blip_arg_int("-n", optarg, 1, 1000000, &o.n)) goto fail; break;
    case O_DB: snprintf(dbdir, sizeof dbdir, "%s", optarg); break;
    case O_MODEL: model_dir = optarg; break;
    case O_RERANK: if (blip_arg_int("--rerank", optarg, 0, 4096, &o.rerank)) goto fail; break;
    case O_THRESH:
      if (blip_arg_real("--threshold", optarg, 0, 1, &thr)) goto fail;
      o.threshold = (float)thr;
      break;
    case O_SORT:
      if (!strcmp(optarg, "date")) o.sort_date = 1;
      else if (strcmp(optarg, "score")) goto usage;
      break;
    case O_UNDER: o.filter.under = optarg; break;
    case O_AFTER:
    case O_BEFORE:
      if (blip_arg_date(c == O_AFTER ? "--after" : "--before", optarg, c == O_AFTER ? after : before)) goto fail;
      *(c == O_AFTER ? &o.filter.after : &o.filter.before) = c == O_AFTER ? after : before;
      break;
    case O_EXT: o.filter.exts = optarg; break;
    case O_WORDS: o.filter.words = optarg; break;
    case O_JSON: pr.out = OUT_JSON; break;
    case O_PATHS: pr.out = OUT_PATHS; break;
    case '0': pr.nul = 1; break;
    case O_IMAGE: image = optarg; break;
    case O_TEXT: texts[ntexts++] = optarg; break;
    case O_TEXTS: texts_file = optarg; break;
    case O_RANKT: rank_texts = 1; break;
    case O_STDIN: use_stdin = 1; break;
    case O_PREC: prec_name = optarg; break;
    case O_THREADS: if (blip_arg_threads("--threads", optarg, &threads)) goto fail; break;
    case O_NAIVE: o.naive = 1; break;
    case O_BATCH: if (blip_arg_int("--batch", optarg, 1, 256, &batch)) goto fail; break;
    case 'h':
    case O_HELP: fputs(USAGE, stdout); ret = 0; goto out;
    default: goto usage;
    }
  }
  int nargs = argc - optind;
  if (texts_file || ntexts) rank_texts = 1;
  if (rank_texts && !image) {
    fprintf(stderr, "blip-query: --text/--texts-file/--rank-texts rank texts for an --image\n");
    goto out;
  }
  if ((use_stdin || image) ? nargs != 0 : nargs != 1) goto usage;
  if (use_stdin && image) goto usage;
  if (pr.nul && pr.out != OUT_PATHS) {
    fprintf(stderr, "blip-query: -0 goes with --paths\n");
    goto out;
  }
  if (image && !(blip_tar_split(image) && access(image, F_OK) != 0) && blip_arg_regular_file(image))
    goto fail; /* (a TAR#MEMBER path reads its tar, checked there) */ /* a FIFO would block the decoder */
  if (o.threshold >= 0 && (o.rerank == 0 || (image && !rank_texts))) {
    fprintf(stderr, "blip-query: --threshold needs the ITM rerank: a text query (or --image with texts) and --rerank >= 1\n");
    goto out;
  }
  blip_model_opts mo = {BLIP_PREC_F32, NULL};
  blip_k_set_threads(threads);
  if (blip_img_init()) goto fail;

  /* index: not needed to rank texts for an image */
  if (!rank_texts) {
    if (!dbdir[0] && blip_store_default_dir(dbdir, sizeof dbdir)) goto fail;
    if (blip_search_open(dbdir, &s)) goto fail;
    if (blip_search_count(s) == 0) {
      fprintf(stderr, "blip-query: the index at %s is empty: run blip-index on your photos first\n", dbdir);
      goto out;
    }
    /* the index's vectors were computed at its precision: a query at another
     * one would score against features it did not make */
    const char *ip = blip_search_meta(s, "precision");
    blip_prec want;
    if (prec_name && ip && !blip_model_parse_precision(ip, &want) &&
        !blip_model_parse_precision(prec_name, &mo.precision) && want != mo.precision) {
      fprintf(stderr, "blip-query: the index at %s was built with --precision %s, not %s: omit --precision (it "
                      "takes the index's) or rebuild the index (blip-index --rebuild --precision %s)\n",
              dbdir, ip, prec_name, prec_name);
      goto out;
    }
    if (!prec_name) prec_name = ip;
  }
  if (blip_model_parse_precision(prec_name ? prec_name : "auto", &mo.precision)) {
    blip_out_error("blip-query", blip_err_last());
    goto out;
  }
  if (!model_dir) model_dir = getenv("BLIPSEARCH_MODEL");
  if (!model_dir || !*model_dir) {
    fprintf(stderr, "blip-query: no model: pass --model DIR or set BLIPSEARCH_MODEL\n");
    goto out;
  }
  if (blip_model_load(model_dir, &mo, &m) || (s && blip_search_attach(s, m))) goto fail;
  const blip_cfg *cfg = blip_model_cfg(m);

  if (image) {
    blip_img_opts io; /* the indexer's preprocessing */
    blip_img_opts_default(&io);
    io.size = cfg->image_size;
    io.autorotate = 1;
    pix = malloc((size_t)3 * cfg->image_size * cfg->image_size * sizeof *pix);
    feat = malloc((size_t)cfg->embed_dim * sizeof *feat);
    emb = malloc((size_t)cfg->v_tokens * cfg->v_hidden * sizeof *emb);
    if (!pix || !feat || !emb) {
      blip_err_set(BLIP_ENOMEM, "out of memory");
      goto fail;
    }
    if (blip_decode_paths(&image, 1, &io, pix)) goto fail;
    if (rank_texts) {
      n_arg_texts = ntexts; /* texts past these are owned */
      if (texts_file && read_texts(texts_file, &texts, &ntexts)) goto fail;
      if (!ntexts) {
        fprintf(stderr, "blip-query: no candidate texts\n");
        goto out;
      }
      pr.texts = (const char *const *)texts;
      if (blip_model_vision(m, pix, 1, emb, feat) ||
          blip_search_rank_texts(m, emb, feat, (const char *const *)texts, ntexts, o.rerank, &r))
        goto fail;
      if (o.threshold >= 0) { /* same rule as for images: reranked and >= P */
        int k = 0;
        for (int i = 0; i < r.n; i++)
          if (r.hits[i].itm_prob >= o.threshold) r.hits[k++] = r.hits[i];
        r.n = k;
      }
      if (r.n > o.n) r.n = o.n;
    } else if (blip_search_image(s, pix, &o, &r)) {
      goto fail;
    }
    say_damage(s);
    if (r.truncated) fprintf(stderr, "blip-query: a text was truncated to %d tokens\n", BLIP_SEARCH_MAX_TOKENS);
    if (r.n) print_hits(&pr, &r, NULL, NULL);
    else say_no_match(&r, &o);
    ret = r.n ? 0 : 1;
  } else if (use_stdin) {
    line_reader in = {0};
    int any = 0, nb = 0, got = 1, hard = 0;
    char *ln;
    if (!(bq = calloc((size_t)batch, sizeof *bq))) goto fail;
    ret = 1;
    while (!hard && got >= 0) {
      while (nb < batch && (got = next_line(&in, nb == 0, &ln)) > 0) bq[nb++] = (blip_search_query){.query = ln, .o = &o};
      if (!nb) break;
      blip_search_text_batch(s, bq, nb); /* each line has its own outcome */
      for (int j = 0; j < nb && !hard; j++) {
        int e = bq[j].rc;
        blip_search_result *rj = &bq[j].res;
        if ((hard = e && e != BLIP_EINVAL)) {
          blip_err_set(e, "%s", bq[j].err);
          break;
        }
        say_damage(s);
        if (e) blip_out_error("blip-query", bq[j].err); /* a refused line: the session goes on */
        else say_notes(rj);
        if (!e && !rj->n) say_no_match(rj, &o);
        print_hits(&pr, rj, bq[j].query, e ? bq[j].err : NULL); /* an empty result is printed too: one answer a query */
        any |= rj->n > 0;
      }
      for (int j = 0; j < nb; j++) {
        free((char *)bq[j].query);
        blip_search_result_free(&bq[j].res);
      }
      nb = 0;
    }
    free(in.buf);
    if (hard || got < 0) goto fail;
    ret = any ? 0 : 1;
  } else {
    if (blip_search_text(s, argv[optind], &o, &r)) goto fail;
    say_damage(s);
    say_notes(&r);
    if (r.n) print_hits(&pr, &r, NULL, NULL);
    else say_no_match(&r, &o);
    ret = r.n ? 0 : 1;
  }
  goto out;

usage:
  fputs(USAGE, stderr);
  ret = 2;
  goto out;
fail:
  blip_out_error("blip-query", blip_err_last());
  ret = 2;
out:
  blip_search_result_free(&r);
  blip_search_close(s);
  blip_model_free(m);
  for (int i = n_arg_texts; i < ntexts; i++) free(texts[i]); /* the --texts-file ones */
  free(pix);
  free(emb);
  free(feat);
  free(bq);
  free(texts);
  return ret;
}
