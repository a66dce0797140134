/* blip_capindex: caption pass of the indexer (see blip_capindex.h).
 * Decoding runs in parallel over the batch (OpenMP, opts.threads); the
 * model runs once per batch for vision, then one caption per image. */
#include "blip_capindex.h"
#include "blip_err.h"
#include "blip_img.h"
#include "blip_tar.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void blip_capindex_identity(const blip_model *cap, char *buf, size_t n) {
  snprintf(buf, n, "%s/%s", blip_model_fingerprint(cap), blip_model_precision_name(blip_model_precision(cap)));
}

/* A photo's pixels, also from inside a webdataset tar ("TAR#MEMBER", blip_tar.h). */
static int load(const char *path, const blip_img_opts *io, float *out) {
  if (!blip_tar_split(path) || access(path, F_OK) == 0) return blip_img_load_file(path, io, out, NULL, NULL);
  uint8_t *b = NULL;
  size_t n = 0;
  int64_t mt;
  int rc = blip_tar_read(path, io->max_file_bytes, &b, &n, &mt);
  if (!rc) rc = blip_img_load_memory(b, n, path, io, out, NULL, NULL);
  free(b);
  return rc;
}

int blip_capindex_run(blip_model *cap, blip_store *st, const blip_cap_opts *gen, const blip_capindex_opts *o, int64_t *done,
                      int64_t *failed) {
  const blip_cfg *c = blip_model_cfg(cap);
  const int B = o->batch < 1 ? 1 : o->batch > 256 ? 256 : o->batch, S = c->image_size;
  const size_t PX = (size_t)3 * S * S, TD = (size_t)c->v_tokens * c->v_hidden;
  int64_t *ids = NULL, n = 0;
  char **paths = NULL;
  int rc = blip_img_init();
  if (!rc) rc = blip_store_uncaptioned(st, &ids, &paths, &n);
  if (rc) return rc;
  float *px = malloc(PX * B * sizeof(float)), *emb = malloc(TD * B * sizeof(float));
  int *ok = malloc(B * sizeof *ok);
  int64_t *bid = malloc(B * sizeof *bid);
  const char **text = malloc(B * sizeof *text);
  blip_cap_result *res = calloc((size_t)B, sizeof *res);
  if (!px || !emb || !ok || !bid || !text || !res) rc = blip_err_set(BLIP_ENOMEM, "captions: out of memory");
  blip_img_opts io; /* the indexer's preprocessing, at the captioner's size */
  blip_img_opts_default(&io);
  io.size = S;
  for (int64_t i = 0; i < n && !rc; i += B) {
    if (o->stop && *o->stop) {
      rc = BLIP_EINTR;
      break;
    }
    const int b = n - i < B ? (int)(n - i) : B;
#pragma omp parallel for num_threads(o->threads > 0 ? o->threads : 1) schedule(dynamic)
    for (int k = 0; k < b; k++) ok[k] = load(paths[i + k], &io, px + (size_t)k * PX) == BLIP_OK;
    int m = 0; /* pack the decoded images */
    for (int k = 0; k < b; k++)
      if (ok[k]) {
        if (m != k) memcpy(px + (size_t)m * PX, px + (size_t)k * PX, PX * sizeof(float));
        bid[m++] = ids[i + k];
      }
    *failed += b - m;
    if (!m) continue;
    if ((rc = blip_model_vision(cap, px, m, emb, NULL)) || (rc = blip_cap_generate(cap, emb, m, gen, res))) break;
    for (int k = 0; k < m; k++) text[k] = res[k].text ? res[k].text : "";
    rc = blip_store_set_captions(st, bid, text, m);
    blip_cap_result_free(res, m);
    if (!rc) *done += m;
    if (!rc && o->progress) o->progress(o->ctx, i + b, n);
  }
  free(px), free(emb), free(ok), free(bid), free(text), free(res);
  free(ids);
  blip_store_free_paths(paths, n);
  return rc;
}
