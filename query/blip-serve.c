/* blip-serve: a local web page and JSON API over a blipsearch index (see
 * src/blip_serve.h). This tool only reads options, loads the token and
 * waits for SIGINT/SIGTERM (blocked in every thread, taken by sigwait). */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blip_arg.h"
#include "blip_err.h"
#include "blip_serve.h"
#include "blip_store.h"

extern const blip_serve_asset blip_serve_web[];
extern const int blip_serve_web_n;

static const char USAGE[] =
    "usage: blip-serve [options]\n"
    "Serve a web page (/) and a JSON API (/api/...) for searching the photos indexed by blip-index.\n"
    "\n"
    "  --db DIR            index directory (default $BLIPSEARCH_DB, else $XDG_DATA_HOME/blipsearch,\n"
    "                      else ~/.local/share/blipsearch)\n"
    "  --model DIR         BLIP model directory (default $BLIPSEARCH_MODEL); the indexing model\n"
    "  --listen ADDR:PORT  address to listen on (default 127.0.0.1:8077; [::1]:PORT for IPv6;\n"
    "                      port 0 = any free port, printed on stdout)\n"
    "  --token-file F      require \"Authorization: Bearer TOKEN\" (TOKEN = F's first line)\n"
    "  --insecure-no-auth  allow a non-loopback --listen without a token\n"
    "  --cors ORIGIN       allow cross-origin requests from ORIGIN (e.g. clip-retrieval's front)\n"
    "  --threads N         compute threads (default: all cores)\n"
    "  --precision P       f32, bf16 or int8 (default: the index's)\n"
    "  --max-conns N       connection cap (default 64)\n"
    "  --timeout S         close idle connections after S seconds (default 15)\n"
    "  --budget S          seconds a search may take once its request (body included) is in:\n"
    "                      decoding an upload, the queue and the engine's work; then 503 (default 30).\n"
    "                      A model call past it runs on, its result dropped (it cannot be cut short)\n"
    "  --max-upload MB     request body cap (default 50)\n"
    "  --thumb-cache-mb MB bound of the thumbnail cache DB/thumbs (default 512): least recently\n"
    "                      used thumbnails out first, and those of photos no longer indexed\n"
    "  --no-batch          answer text queries one at a time (default: the text queries waiting\n"
    "                      together share the text-encoder and ITM rerank calls; --batch)\n"
    "  --help              this text\n"
    "\n"
    "Logs one line a request on stderr: METHOD PATH STATUS MS. Stops on SIGINT/SIGTERM.\n";

enum { O_DB = 256, O_MODEL, O_LISTEN, O_TOKEN, O_INSECURE, O_CORS, O_THREADS, O_PREC, O_CONNS, O_TIMEOUT, O_BUDGET,
       O_UPLOAD, O_BATCH, O_NOBATCH, O_THUMBS, O_HELP };

static int read_token(const char *path, char *tok, size_t cap) {
  FILE *f = fopen(path, "r");
  if (!f) return blip_err_set(BLIP_EIO, "%s: %s", path, strerror(errno));
  int ok = fgets(tok, (int)cap, f) != NULL;
  fclose(f);
  tok[ok ? strcspn(tok, "\r\n") : 0] = 0;
  if (strlen(tok) < 16)
    return blip_err_set(BLIP_EINVAL, "%s: the token must be at least 16 characters on the first line", path);
  return BLIP_OK;
}

static int bad_arg(void) {
  fprintf(stderr, "blip-serve: %s\n", blip_err_last());
  return 2;
}

int main(int argc, char **argv) {
  static const struct option lo[] = {
      {"db", 1, 0, O_DB},           {"model", 1, 0, O_MODEL},     {"listen", 1, 0, O_LISTEN},
      {"token-file", 1, 0, O_TOKEN}, {"insecure-no-auth", 0, 0, O_INSECURE}, {"cors", 1, 0, O_CORS},
      {"threads", 1, 0, O_THREADS}, {"precision", 1, 0, O_PREC}, {"max-conns", 1, 0, O_CONNS},
      {"timeout", 1, 0, O_TIMEOUT}, {"budget", 1, 0, O_BUDGET},  {"max-upload", 1, 0, O_UPLOAD}, {"batch", 0, 0, O_BATCH},
      {"no-batch", 0, 0, O_NOBATCH}, {"thumb-cache-mb", 1, 0, O_THUMBS}, {"help", 0, 0, O_HELP}, {0, 0, 0, 0}};
  char dbdir[PATH_MAX] = "", token[1024];
  blip_serve_opts o = {.batch = 1};
  o.assets = blip_serve_web;
  o.n_assets = blip_serve_web_n;
  int c;
  while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
    switch (c) {
    case O_DB: snprintf(dbdir, sizeof dbdir, "%s", optarg); break;
    case O_MODEL: o.model_dir = optarg; break;
    case O_LISTEN: o.listen = optarg; break;
    case O_TOKEN:
      if (read_token(optarg, token, sizeof token)) {
        fprintf(stderr, "blip-serve: %s\n", blip_err_last());
        return 2;
      }
      o.token = token;
      break;
    case O_INSECURE: o.insecure_no_auth = 1; break;
    case O_CORS: o.cors_origin = optarg; break;
    case O_THREADS: if (blip_arg_threads("--threads", optarg, &o.threads)) return bad_arg(); break;
    case O_PREC: o.precision = optarg; break;
    case O_CONNS: if (blip_arg_int("--max-conns", optarg, 1, 100000, &o.max_conns)) return bad_arg(); break;
    case O_TIMEOUT: if (blip_arg_int("--timeout", optarg, 1, 86400, &o.conn_timeout_s)) return bad_arg(); break;
    case O_BUDGET: if (blip_arg_real("--budget", optarg, 1e-6, 86400, &o.budget_s)) return bad_arg(); break;
    case O_UPLOAD: {
      double mb;
      if (blip_arg_real("--max-upload", optarg, 0.001, 4096, &mb)) return bad_arg();
      o.max_upload = (size_t)(mb * 1048576);
      break;
    }
    case O_THUMBS: {
      double mb;
      if (blip_arg_real("--thumb-cache-mb", optarg, 0.001, 1 << 24, &mb)) return bad_arg();
      o.thumb_cache = (int64_t)(mb * 1048576);
      break;
    }
    case O_BATCH: o.batch = 1; break;
    case O_NOBATCH: o.batch = 0; break;
    case 'h':
    case O_HELP: fputs(USAGE, stdout); return 0;
    default: fputs(USAGE, stderr); return 2;
    }
  }
  if (optind != argc) {
    fputs(USAGE, stderr);
    return 2;
  }
  if (!dbdir[0] && blip_store_default_dir(dbdir, sizeof dbdir)) {
    fprintf(stderr, "blip-serve: %s\n", blip_err_last());
    return 2;
  }
  o.db_dir = dbdir;
  if (!o.model_dir) o.model_dir = getenv("BLIPSEARCH_MODEL");
  if (!o.model_dir || !*o.model_dir) {
    fprintf(stderr, "blip-serve: no model: pass --model DIR or set BLIPSEARCH_MODEL\n");
    return 2;
  }
  if (o.insecure_no_auth && !o.token)
    fprintf(stderr, "blip-serve: WARNING: --insecure-no-auth: anyone who can reach %s can see your photos\n",
            o.listen ? o.listen : "the server");

  /* SIGINT/SIGTERM blocked before any thread starts: every thread inherits the mask, main takes them */
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  signal(SIGPIPE, SIG_IGN);

  blip_serve *sv = NULL;
  if (blip_serve_start(&o, &sv)) {
    fprintf(stderr, "blip-serve: %s\n", blip_err_last());
    return 2;
  }
  const char *l = o.listen ? o.listen : "127.0.0.1:8077";
  char host[256];
  snprintf(host, sizeof host, "%.*s", (int)(strrchr(l, ':') - l), l);
  printf("blip-serve: listening on http://%s:%d/ (index %s)\n", host, blip_serve_port(sv), dbdir);
  fflush(stdout);
  int sig = 0;
  sigwait(&set, &sig);
  fprintf(stderr, "blip-serve: %s: stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
  blip_serve_stop(sv);
  return 0;
}
