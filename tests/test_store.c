/* test_store: the index store on synthetic vectors (no model needed).
 * Expected results are computed independently here by brute force over the
 * vectors the test generated, never read back from the store. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "blip_err.h"
#include "blip_model.h"
#include "blip_st.h"
#include "blip_store.h"
#include "check.h"

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static float frand(void) { /* splitmix64 -> [-1, 1) */
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (float)((z >> 40) * (2.0 / 16777216.0) - 1.0);
}

static void rand_unit(float *v, int E) {
  double s = 0;
  for (int j = 0; j < E; j++) {
    v[j] = frand();
    s += (double)v[j] * v[j];
  }
  for (int j = 0; j < E; j++) v[j] /= (float)sqrt(s);
}

static char g_tmp[256];
static const char *tmpdir(const char *name) {
  static char buf[8][512];
  static int k;
  char *b = buf[k++ & 7];
  snprintf(b, sizeof buf[0], "%s/%s", g_tmp, name);
  return b;
}

enum { E = 16, T = 9, DV = 24 };
static const blip_store_identity ID_A = {"00112233aabbccdd", "f32", "size=32,autorotate=1,exact", E, T, DV};

static blip_store *open_w(const char *dir, const blip_store_identity *id, blip_tokens_fmt fmt) {
  blip_store_opts o = {.write = 1, .tokens = fmt};
  blip_store *st = NULL;
  int rc = blip_store_open(dir, id, &o, &st);
  if (rc) fprintf(stderr, "open %s: %s\n", dir, blip_err_last());
  return st;
}

static void mk_rows(blip_store_row *rows, char (*paths)[64], int n, int base, uint64_t fp0) {
  for (int i = 0; i < n; i++) {
    snprintf(paths[i], 64, "/photos/a/img%04d.jpg", base + i);
    rows[i] = (blip_store_row){paths[i], 1000 + base + i, 5000 + base + i, fp0 + (uint64_t)(base + i), 640, 480, 1,
                               "2020-01-02T03:04:05", NULL, 0, 0};
  }
}

/* Brute-force top-k over vecs[ids] restricted to allow (NULL = all). */
static int brute(const float *q, const float *vecs, const int64_t *ids, int n, const uint8_t *allow, int k,
                 int64_t *oid, float *osc) {
  int m = 0;
  for (int i = 0; i < n; i++) {
    if (ids[i] < 0 || (allow && !allow[ids[i]])) continue;
    float d = 0;
    for (int j = 0; j < E; j++) d += q[j] * vecs[(size_t)i * E + j];
    int p = m < k ? m++ : k;
    if (p == k && !(d > osc[k - 1])) continue;
    if (p == k) p = k - 1;
    while (p > 0 && osc[p - 1] < d) {
      osc[p] = osc[p - 1];
      oid[p] = oid[p - 1];
      p--;
    }
    osc[p] = d;
    oid[p] = ids[i];
  }
  return m;
}

static void test_schema_embedded(void) {
  char dir[1024];
  snprintf(dir, sizeof dir, "%s/../../schema", test_data(""));
  struct dirent **ents = NULL;
  int n = scandir(dir, &ents, NULL, alphasort), files = 0;
  CHECK(n > 0, "cannot list %s", dir);
  for (int i = 0; i < n; i++) {
    const char *nm = ents[i]->d_name;
    size_t L = strlen(nm);
    if (L > 4 && strcmp(nm + L - 4, ".sql") == 0) {
      files++;
      CHECK(atoi(nm) == files, "%s out of sequence (want %03d_*.sql)", nm, files);
      char p[2048];
      snprintf(p, sizeof p, "%s/%s", dir, nm);
      FILE *f = fopen(p, "rb");
      char buf[65536];
      size_t got = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
      if (f) fclose(f);
      buf[got] = 0;
      const char *emb = blip_store_schema_sql(files);
      CHECK(emb && strcmp(emb, buf) == 0, "embedded migration %d differs from %s", files, p);
    }
    free(ents[i]);
  }
  free(ents);
  CHECK(files == blip_store_schema_count(), "%d files, %d embedded", files, blip_store_schema_count());
}

static void test_migrate_and_identity(void) {
  const char *dir = tmpdir("ident");
  blip_store *st = open_w(dir, &ID_A, BLIP_TOKENS_I8);
  CHECK(st != NULL, "fresh open");
  if (!st) return;
  CHECK(strcmp(blip_store_meta(st, "model"), ID_A.model) == 0, "model meta");
  CHECK(strcmp(blip_store_meta(st, "tokens"), "int8") == 0, "tokens meta");
  blip_store_close(st);

  /* applied schema version and WAL mode, read by sqlite directly */
  char p[600];
  snprintf(p, sizeof p, "%s/index.sqlite", dir);
  sqlite3 *db = NULL;
  sqlite3_stmt *s = NULL;
  sqlite3_open(p, &db);
  sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &s, NULL);
  CHECK(sqlite3_step(s) == SQLITE_ROW && sqlite3_column_int(s, 0) == blip_store_schema_count(), "user_version");
  sqlite3_finalize(s);
  sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &s, NULL);
  CHECK(sqlite3_step(s) == SQLITE_ROW && strcmp((const char *)sqlite3_column_text(s, 0), "wal") == 0, "wal");
  sqlite3_finalize(s);
  sqlite3_close(db);

  /* reopen with the same identity: fine, nothing re-applied; a crashed flush's temp file is removed */
  char tmpf[600];
  snprintf(tmpf, sizeof tmpf, "%s/vectors.faiss.tmp.99999", dir);
  FILE *tf = fopen(tmpf, "w");
  if (tf) fclose(tf);
  st = open_w(dir, &ID_A, BLIP_TOKENS_I8);
  CHECK(st != NULL, "reopen");
  CHECK(access(tmpf, F_OK) != 0, "stale FAISS temp file left behind");
  blip_store_close(st);

  /* each identity field that differs is refused with a message naming it */
  blip_store_identity b = ID_A;
  b.model = "ffffffffffffffff";
  blip_store_opts o = {.write = 1, .tokens = BLIP_TOKENS_I8};
  int rc = blip_store_open(dir, &b, &o, &st);
  CHECK(rc == BLIP_EMISMATCH && strstr(blip_err_last(), "model=00112233aabbccdd") &&
            strstr(blip_err_last(), "--rebuild"),
        "model mismatch: %d %s", rc, blip_err_last());
  b = ID_A;
  b.precision = "bf16";
  CHECK(blip_store_open(dir, &b, &o, &st) == BLIP_EMISMATCH && strstr(blip_err_last(), "precision"), "precision");
  b = ID_A;
  b.preprocess = "size=32,autorotate=0,exact";
  CHECK(blip_store_open(dir, &b, &o, &st) == BLIP_EMISMATCH && strstr(blip_err_last(), "preprocess"), "prep");
  /* read-only with the stored identity accepted */
  blip_store_opts ro = {0};
  CHECK(blip_store_open(dir, NULL, &ro, &st) == BLIP_OK, "read-only: %s", blip_err_last());
  blip_store_close(st);
  /* rebuild discards and adopts the new identity */
  b = ID_A;
  b.model = "ffffffffffffffff";
  o.rebuild = 1;
  CHECK(blip_store_open(dir, &b, &o, &st) == BLIP_OK, "rebuild: %s", blip_err_last());
  if (st) CHECK(strcmp(blip_store_meta(st, "model"), b.model) == 0, "rebuilt identity");
  blip_store_close(st);

  /* a schema newer than this code is refused, not downgraded */
  sqlite3_open(p, &db);
  sqlite3_exec(db, "PRAGMA user_version=99", NULL, NULL, NULL);
  sqlite3_close(db);
  rc = blip_store_open(dir, NULL, &ro, &st);
  CHECK(rc == BLIP_EUNSUPPORTED, "newer schema: %d", rc);
  /* no index at all */
  rc = blip_store_open(tmpdir("nothing"), NULL, &ro, &st);
  CHECK(rc == BLIP_ENOTFOUND, "missing index: %d", rc);
}

static void test_add_delete_move(void) {
  const char *dir = tmpdir("adm");
  blip_store *st = open_w(dir, &ID_A, BLIP_TOKENS_I8);
  if (!st) {
    CHECK(0, "open");
    return;
  }
  enum { N = 12 };
  blip_store_row rows[N];
  char paths[N][64];
  float feats[N * E], *toks = malloc(sizeof(float) * N * T * DV), *back = malloc(sizeof(float) * T * DV);
  int64_t ids[N], oid[N];
  float osc[N];
  mk_rows(rows, paths, N, 0, 777);
  for (int i = 0; i < N; i++) rand_unit(feats + i * E, E);
  for (int i = 0; i < N * T * DV; i++) toks[i] = 3 * frand();
  CHECK_OK(blip_store_put(st, rows, NULL, N, feats, toks, ids));
  CHECK(blip_store_count(st) == N, "count %lld", (long long)blip_store_count(st));
  for (int i = 0; i < N; i++) {
    int n = blip_store_search(st, feats + i * E, 1, NULL, 0, oid, osc);
    CHECK(n == 1 && oid[0] == ids[i] && fabsf(osc[0] - 1) < 1e-5f, "self search %d: n=%d id=%lld", i, n,
          (long long)oid[0]);
    CHECK(blip_store_tokens(st, ids[i], back) == BLIP_OK, "tokens %d: %s", i, blip_err_last());
  }

  /* scan: unchanged / changed / new; moved; unseen under the root */
  blip_scan_kind kind;
  int64_t id;
  CHECK_OK(blip_store_scan_begin(st));
  CHECK_OK(blip_store_scan_file(st, paths[0], rows[0].size, rows[0].mtime_ns, &kind, &id));
  CHECK(kind == BLIP_SCAN_UNCHANGED && id == ids[0], "unchanged: kind %d", kind);
  CHECK_OK(blip_store_scan_file(st, paths[1], rows[1].size, rows[1].mtime_ns + 1, &kind, &id));
  CHECK(kind == BLIP_SCAN_CHANGED && id == ids[1], "changed: kind %d", kind);
  CHECK_OK(blip_store_scan_file(st, "/photos/a/new.jpg", 1, 1, &kind, &id));
  CHECK(kind == BLIP_SCAN_NEW && id == 0, "new: kind %d", kind);
  /* rows' paths do not exist on disk, so an unseen row with the same fingerprint is a move source */
  CHECK_OK(blip_store_find_moved(st, rows[2].fingerprint, rows[2].size, &id));
  CHECK(id == ids[2], "moved source %lld", (long long)id);
  CHECK_OK(blip_store_find_moved(st, rows[0].fingerprint, rows[0].size, &id));
  CHECK(id == 0, "a seen row is not a move source");
  CHECK_OK(blip_store_find_moved(st, rows[3].fingerprint, rows[3].size + 1, &id));
  CHECK(id == 0, "size must match too");
  CHECK_OK(blip_store_move(st, ids[2], "/photos/b/renamed.jpg", 42));
  /* the changed file is re-embedded: new row, new id, old one gone */
  float nf[E];
  rand_unit(nf, E);
  blip_store_row ch = rows[1];
  ch.mtime_ns++;
  ch.fingerprint = 9999;
  int64_t replace = ids[1], nid;
  CHECK_OK(blip_store_put(st, &ch, &replace, 1, nf, toks, &nid));
  CHECK(nid > ids[N - 1], "changed file gets a fresh id (%lld)", (long long)nid);
  CHECK(blip_store_tokens(st, ids[1], back) == BLIP_ENOTFOUND, "old record gone");
  int64_t *un = NULL, nun = 0;
  const char *roots[] = {"/photos/a"};
  CHECK_OK(blip_store_scan_unseen(st, roots, 1, &un, &nun));
  /* seen: 0, 1 (replaced by nid, not seen: but nid's path is seen? it is new, so unseen unless marked) */
  int has_moved = 0, has0 = 0;
  for (int64_t i = 0; i < nun; i++) {
    has_moved |= un[i] == ids[2];
    has0 |= un[i] == ids[0];
  }
  CHECK(!has_moved && !has0, "seen and moved rows are not deleted");
  CHECK(nun == N - 3 + 1, "unseen %lld (rows 3..11 and the new id of row 1)", (long long)nun);
  const char *roots2[] = {"/photos/b"};
  int64_t *un2 = NULL, nun2 = 0;
  CHECK_OK(blip_store_scan_unseen(st, roots2, 1, &un2, &nun2));
  CHECK(nun2 == 0, "moved row is seen under its new root");
  free(un2);
  /* delete rows 3..5 */
  CHECK_OK(blip_store_delete(st, ids + 3, 3));
  CHECK(blip_store_count(st) == N - 3, "after delete");
  for (int i = 3; i < 6; i++) {
    int n = blip_store_search(st, feats + i * E, N, NULL, 0, oid, osc);
    int leak = 0;
    for (int j = 0; j < n; j++) leak |= oid[j] == ids[i];
    CHECK(!leak, "deleted id %lld still searchable", (long long)ids[i]);
    CHECK(blip_store_tokens(st, ids[i], back) == BLIP_ENOTFOUND, "deleted tokens");
  }
  char path[256];
  CHECK_OK(blip_store_get(st, ids[2], NULL, path, sizeof path));
  CHECK(strcmp(path, "/photos/b/renamed.jpg") == 0, "moved path %s", path);
  CHECK_OK(blip_store_verify(st));
  blip_store_close(st);
  /* deleted records are holes: zero bytes on disk */
  char tp[600];
  snprintf(tp, sizeof tp, "%s/tokens.bin", dir);
  FILE *f = fopen(tp, "rb");
  blip_store_opts ro = {0};
  blip_store *rd = NULL;
  CHECK_OK(blip_store_open(dir, NULL, &ro, &rd));
  size_t stride = blip_store_record_bytes(rd);
  uint8_t *rec = malloc(stride);
  int zero = f && fseek(f, 64 + (long)(ids[4] * (int64_t)stride), SEEK_SET) == 0 && fread(rec, 1, stride, f) == stride;
  for (size_t i = 0; zero && i < stride; i++) zero = rec[i] == 0;
  CHECK(zero, "punched hole reads as zeros");
  if (f) fclose(f);
  CHECK_OK(blip_store_verify(rd));
  blip_store_close(rd);
  free(rec);
  free(un);
  free(toks);
  free(back);
}

/* Build, then compare the saved cache, a rebuild without it, a stale cache
 * and an IVF build against brute force. */
static void test_faiss_rebuild(void) {
  const char *dir = tmpdir("fx");
  enum { N = 3000, B = 500, K = 10 };
  float *feats = malloc(sizeof(float) * N * E);
  int64_t *ids = malloc(sizeof(int64_t) * N);
  blip_store_row rows[B];
  char paths[B][64];
  for (int i = 0; i < N * E / E; i++) rand_unit(feats + (size_t)i * E, E);
  blip_store *st = open_w(dir, &ID_A, BLIP_TOKENS_NONE);
  if (!st) {
    CHECK(0, "open");
    return;
  }
  for (int b = 0; b < N / B - 1; b++) {
    mk_rows(rows, paths, B, b * B, 1);
    CHECK_OK(blip_store_put(st, rows, NULL, B, feats + (size_t)b * B * E, NULL, ids + b * B));
  }
  blip_store_close(st); /* writes vectors.faiss at 2500 vectors */
  char fp[600], saved[600];
  snprintf(fp, sizeof fp, "%s/vectors.faiss", dir);
  snprintf(saved, sizeof saved, "%s/old.faiss", dir);
  struct stat sb;
  CHECK(stat(fp, &sb) == 0 && sb.st_size > 2500 * E * 4, "vectors.faiss written");
  /* keep the 2500-vector cache, add the last batch, then put the old cache back: stale */
  char cmd[1400];
  snprintf(cmd, sizeof cmd, "cp %s %s", fp, saved);
  CHECK(system(cmd) == 0, "cp");
  st = open_w(dir, &ID_A, BLIP_TOKENS_NONE);
  mk_rows(rows, paths, B, N - B, 1);
  if (st) CHECK_OK(blip_store_put(st, rows, NULL, B, feats + (size_t)(N - B) * E, NULL, ids + N - B));
  blip_store_close(st);
  float q[E], bs[K], gs[K];
  int64_t bi[K], gi[K];
  for (int mode = 0; mode < 3; mode++) {
    if (mode == 1) unlink(fp);           /* no cache: rebuilt from SQLite */
    if (mode == 2) rename(saved, fp);    /* stale cache: must not be used */
    blip_store_opts ro = {0};
    blip_store *rd = NULL;
    CHECK_OK(blip_store_open(dir, NULL, &ro, &rd));
    int same = 1;
    for (int t = 0; t < 50; t++) {
      rand_unit(q, E);
      int nb = brute(q, feats, ids, N, NULL, K, bi, bs);
      int ng = blip_store_search(rd, q, K, NULL, 0, gi, gs);
      same &= ng == nb;
      for (int j = 0; j < K && j < ng; j++) same &= gi[j] == bi[j] && fabsf(gs[j] - bs[j]) < 1e-5f;
    }
    CHECK(same, "mode %d: search differs from brute force", mode);
    CHECK_OK(blip_store_verify(rd));
    blip_store_close(rd);
  }

  /* IVF (own ids) with removals: ids stay right (IDMap2-over-IVF would corrupt them) */
  const char *dir2 = tmpdir("ivf");
  blip_store_opts o = {.write = 1, .ivf_min = 1000};
  CHECK_OK(blip_store_open(dir2, &ID_A, &o, &st));
  for (int b = 0; b < N / B; b++) {
    mk_rows(rows, paths, B, b * B, 1);
    CHECK_OK(blip_store_put(st, rows, NULL, B, feats + (size_t)b * B * E, NULL, ids + b * B));
  }
  CHECK_OK(blip_store_flush(st)); /* trains IVF on 3000 */
  int64_t del[300];
  for (int i = 0; i < 300; i++) del[i] = ids[i * 7];
  CHECK_OK(blip_store_delete(st, del, 300));
  for (int i = 0; i < 300; i++) ids[i * 7] = -1;
  int hit = 0, wrong = 0;
  for (int i = 0; i < N; i += 3) {
    int ng = blip_store_search(st, feats + (size_t)i * E, 1, NULL, 0, gi, gs);
    if (ids[i] < 0) wrong += ng > 0 && gi[0] == ids[i];
    else hit += ng == 1 && gi[0] == ids[i] && fabsf(gs[0] - 1) < 1e-5f;
  }
  CHECK(wrong == 0, "deleted ids returned by IVF: %d", wrong);
  int expect = 0;
  for (int i = 0; i < N; i += 3) expect += ids[i] >= 0;
  CHECK(hit == expect, "IVF finds each remaining vector under its own id: %d of %d", hit, expect);
  CHECK_OK(blip_store_verify(st));
  blip_store_close(st);
  free(feats);
  free(ids);
}

/* The compressed kind (IVF-PQ past pq_min): scores of the results are exact
 * (re-scored from SQLite), recall against brute force stays high, each vector
 * finds itself, and a reader (inverted lists memory-mapped) answers exactly as
 * the writer (lists in memory). */
static void test_faiss_pq(void) {
  const char *dir = tmpdir("pq");
  enum { N = 4000, B = 500, K = 10, NQ = 50 };
  float *feats = malloc(sizeof(float) * N * E), *cent = malloc(sizeof(float) * 40 * E);
  int64_t *ids = malloc(sizeof(int64_t) * N);
  blip_store_row rows[B];
  char paths[B][64];
  for (int c = 0; c < 40; c++) rand_unit(cent + c * E, E);
  for (int i = 0; i < N; i++) { /* clustered, as photo features are */
    for (int j = 0; j < E; j++) feats[(size_t)i * E + j] = cent[(i % 40) * E + j] + 0.25f * frand();
    double s2 = 0;
    for (int j = 0; j < E; j++) s2 += (double)feats[(size_t)i * E + j] * feats[(size_t)i * E + j];
    for (int j = 0; j < E; j++) feats[(size_t)i * E + j] /= (float)sqrt(s2);
  }
  blip_store *st = NULL;
  blip_store_opts o = {.write = 1, .ivf_min = 1000, .pq_min = 2000};
  CHECK_OK(blip_store_open(dir, &ID_A, &o, &st));
  for (int b = 0; b < N / B && st; b++) {
    mk_rows(rows, paths, B, b * B, 1);
    CHECK_OK(blip_store_put(st, rows, NULL, B, feats + (size_t)b * B * E, NULL, ids + b * B));
  }
  if (st) CHECK_OK(blip_store_flush(st)); /* trains IVF-PQ on a sample of the 4000 */
  blip_store *rd = NULL;
  blip_store_opts ro = {.pq_min = 2000};
  CHECK_OK(blip_store_open(dir, NULL, &ro, &rd));
  float q[E], bs[K], ws[K], rs[K];
  int64_t bi[K], wi[K], ri[K];
  long hits = 0, exact_scores = 1, same_reader = 1, self = 0;
  for (int t = 0; t < NQ && st && rd; t++) {
    memcpy(q, feats + (size_t)(t * 79 % N) * E, sizeof q);
    for (int j = 0; j < E; j++) q[j] += 0.1f * frand();
    int nb = brute(q, feats, ids, N, NULL, K, bi, bs);
    int nw = blip_store_search(st, q, K, NULL, 0, wi, ws), nr = blip_store_search(rd, q, K, NULL, 0, ri, rs);
    same_reader &= nw == nr && !memcmp(wi, ri, sizeof wi) && !memcmp(ws, rs, sizeof ws);
    for (int j = 0; j < nw; j++) {
      float d = 0;
      for (int e = 0; e < E; e++) d += q[e] * feats[(size_t)(wi[j] - ids[0]) * E + e];
      exact_scores &= fabsf(d - ws[j]) < 1e-5f;
      for (int a = 0; a < nb; a++) hits += wi[j] == bi[a];
    }
  }
  for (int i = 0; i < N && st; i += 40) self += blip_store_search(st, feats + (size_t)i * E, 1, NULL, 0, wi, ws) == 1 && wi[0] == ids[i];
  double recall = (double)hits / (NQ * K);
  printf("  IVF-PQ (4000 x %d, 4 sub-quantizers): recall@10 %.3f after exact re-score, self-hits %ld/100\n", E, recall, self);
  CHECK(exact_scores, "compressed index returned approximate scores");
  CHECK(same_reader, "memory-mapped reader differs from the writer");
  if (rd) CHECK_OK(blip_store_verify(rd)); /* --check on the compressed kind: no false damage */
  CHECK(recall >= 0.98, "IVF-PQ recall@10 %.3f < 0.98", recall); /* E/8 codes, 4 per result: 0.944 */
  CHECK(self >= 99, "only %ld of 100 vectors find themselves", self);
  blip_store_close(rd);
  blip_store_close(st);
  free(feats);
  free(cent);
  free(ids);
}

static void test_filtered_search(void) {
  const char *dir = tmpdir("filter");
  enum { N = 6000, B = 1000, K = 20 };
  float *feats = malloc(sizeof(float) * N * E);
  int64_t *ids = malloc(sizeof(int64_t) * N), *allow = malloc(sizeof(int64_t) * N);
  uint8_t *mask = calloc(N + 16, 1);
  blip_store_row rows[B];
  char paths[B][64];
  for (int i = 0; i < N; i++) rand_unit(feats + (size_t)i * E, E);
  blip_store *st = open_w(dir, &ID_A, BLIP_TOKENS_NONE);
  if (!st) {
    CHECK(0, "open");
    return;
  }
  for (int b = 0; b < N / B; b++) {
    mk_rows(rows, paths, B, b * B, 1);
    CHECK_OK(blip_store_put(st, rows, NULL, B, feats + (size_t)b * B * E, NULL, ids + b * B));
  }
  /* allow sets: tiny, exact-path sized, large (FAISS over-fetch path), with unknown ids */
  static const int sizes[] = {1, 3, 50, 4000, 5000, 5990};
  int leaks = 0, diff = 0;
  for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
    for (int t = 0; t < 5; t++) {
      memset(mask, 0, N + 16);
      int na = 0;
      /* query next to a vector OUTSIDE the allow set, so the unfiltered top-k is mostly forbidden */
      int far = (int)((frand() + 1) * 0.5 * (N - 1));
      while (na < sizes[si]) {
        int64_t id = ids[(int)((frand() + 1) * 0.5 * (N - 1))];
        if (id == ids[far] || mask[id]) continue;
        mask[id] = 1;
        allow[na++] = id;
      }
      allow[na++] = N + 100; /* not in the index */
      int64_t gi[K], bi[K];
      float gs[K], bs[K];
      int ng = blip_store_search(st, feats + (size_t)far * E, K, allow, na, gi, gs);
      int nb = brute(feats + (size_t)far * E, feats, ids, N, mask, K, bi, bs);
      for (int j = 0; j < ng; j++) leaks += gi[j] < 0 || gi[j] > N || !mask[gi[j]];
      diff += ng != nb;
      for (int j = 0; j < ng && j < nb; j++) diff += gi[j] != bi[j] || fabsf(gs[j] - bs[j]) > 1e-5f;
    }
  }
  CHECK(leaks == 0, "%d results outside the allow set", leaks);
  CHECK(diff == 0, "%d filtered results differ from brute force", diff);
  int64_t gi[K];
  float gs[K];
  CHECK(blip_store_search(st, feats, K, allow, 0, gi, gs) == 0, "empty allow set: no results");
  blip_store_close(st);
  free(feats);
  free(ids);
  free(allow);
  free(mask);
}

/* int8 with per-token scales and f16 on the tiny model's real vision tokens. */
static void test_tokens_roundtrip(void) {
  blip_st *g = NULL;
  float *emb = NULL;
  size_t n = 0;
  CHECK_OK(blip_st_open(test_data("blip-tiny/golden.safetensors"), &g));
  const blip_st_tensor *t = blip_st_find(g, "image_embeds");
  CHECK(t != NULL, "image_embeds in golden");
  if (!t) {
    blip_st_close(g);
    return;
  }
  int Tn = 17, Dv = 32, imgs = 4;
  n = (size_t)imgs * Tn * Dv;
  emb = malloc(n * sizeof *emb);
  float *back = malloc(n * sizeof *back);
  CHECK_OK(blip_st_to_f32(t, emb, (int64_t)n));
  uint8_t *rec = malloc(blip_tokstore_payload_size(BLIP_TOKENS_I8, Tn, Dv));
  double worst_rel = 0, worst_abs = 0, bound_viol = 0;
  for (int i = 0; i < imgs; i++) {
    blip_tokstore_encode(BLIP_TOKENS_I8, Tn, Dv, emb + (size_t)i * Tn * Dv, rec);
    blip_tokstore_decode(BLIP_TOKENS_I8, Tn, Dv, rec, back + (size_t)i * Tn * Dv);
  }
  for (int r = 0; r < imgs * Tn; r++) {
    float m = 0;
    for (int j = 0; j < Dv; j++) m = fmaxf(m, fabsf(emb[(size_t)r * Dv + j]));
    for (int j = 0; j < Dv; j++) {
      double d = fabs(emb[(size_t)r * Dv + j] - back[(size_t)r * Dv + j]);
      worst_abs = fmax(worst_abs, d);
      worst_rel = fmax(worst_rel, d / m);
      /* rounding to the nearest of 255 levels: at most half a step (+ float slack) */
      if (d > m / 127.0 * 0.5 * (1 + 1e-5)) bound_viol++;
    }
  }
  printf("  int8 tokens: bytes/image %zu (f32 %zu), max|err| %.3g, max err/rowmax %.3g\n",
         blip_tokstore_payload_size(BLIP_TOKENS_I8, Tn, Dv), (size_t)Tn * Dv * 4, worst_abs, worst_rel);
  CHECK(bound_viol == 0, "%g elements beyond half a quantization step", bound_viol);
  CHECK(worst_abs > 0, "quantization is lossy: a zero error means the codec was bypassed");
  free(rec);
  rec = malloc(blip_tokstore_payload_size(BLIP_TOKENS_F16, Tn, Dv));
  double f16_rel = 0;
  for (int i = 0; i < imgs; i++) {
    blip_tokstore_encode(BLIP_TOKENS_F16, Tn, Dv, emb + (size_t)i * Tn * Dv, rec);
    blip_tokstore_decode(BLIP_TOKENS_F16, Tn, Dv, rec, back + (size_t)i * Tn * Dv);
  }
  for (size_t i = 0; i < n; i++)
    if (fabsf(emb[i]) > 1e-4f) f16_rel = fmax(f16_rel, fabs(emb[i] - back[i]) / fabs(emb[i]));
  printf("  f16 tokens: bytes/image %zu, max relative err %.3g\n", blip_tokstore_payload_size(BLIP_TOKENS_F16, Tn, Dv),
         f16_rel);
  CHECK(f16_rel <= 1.0 / 2048 * (1 + 1e-6), "f16 relative error %g > 2^-11", f16_rel);
  free(rec);
  /* int4: per group of 32, within half a step of the (f16-rounded) group scale */
  rec = malloc(blip_tokstore_payload_size(BLIP_TOKENS_I4, Tn, Dv));
  double i4_viol = 0, i4_abs = 0;
  for (int i = 0; i < imgs; i++) {
    blip_tokstore_encode(BLIP_TOKENS_I4, Tn, Dv, emb + (size_t)i * Tn * Dv, rec);
    blip_tokstore_decode(BLIP_TOKENS_I4, Tn, Dv, rec, back + (size_t)i * Tn * Dv);
  }
  for (int r = 0; r < imgs * Tn; r++) {
    float m = 0;
    for (int j = 0; j < Dv; j++) m = fmaxf(m, fabsf(emb[(size_t)r * Dv + j])); /* Dv = 32: one group */
    for (int j = 0; j < Dv; j++) {
      double d = fabs(emb[(size_t)r * Dv + j] - back[(size_t)r * Dv + j]);
      i4_abs = fmax(i4_abs, d);
      if (d > m / 7.0 * 0.5 * (1 + 2e-3) + 1e-7) i4_viol++; /* f16 scale: 2^-11 relative slack */
    }
  }
  printf("  int4 tokens: bytes/image %zu, max|err| %.3g\n", blip_tokstore_payload_size(BLIP_TOKENS_I4, Tn, Dv), i4_abs);
  CHECK(i4_viol == 0, "%g int4 elements beyond half a quantization step", i4_viol);
  CHECK(i4_abs > 0, "int4 quantization is lossy");
  CHECK(blip_tokstore_payload_size(BLIP_TOKENS_I4, 577, 768) == 577 * 24 * 2 + 577 * 384, "int4 record size at base");
  free(rec);
  free(emb);
  free(back);
  blip_st_close(g);
}

/* What the compact forms cost the reranker: ITM logits of the 6 golden
 * captions against the 4 golden images, fp32 tokens vs decoded tokens. */
static void test_tokens_itm_error(void) {
  blip_model *m = NULL;
  blip_st *g = NULL;
  CHECK_OK(blip_model_load(test_data("blip-tiny"), NULL, &m));
  if (blip_st_open(test_data("blip-tiny/golden.safetensors"), &g) != BLIP_OK) {
    CHECK(0, "golden: %s", blip_err_last());
    blip_model_free(m);
    return;
  }
  enum { NI = 4, TT = 17, D = 32, NC = 6, L = 35 };
  static float emb[NI * TT * D], dec[NI * TT * D];
  int64_t ids64[NC * L], mask64[NC * L];
  const blip_st_tensor *te = blip_st_find(g, "image_embeds"), *ti = blip_st_find(g, "input_ids"),
                       *tm = blip_st_find(g, "attention_mask");
  CHECK(te && ti && tm && ti->nbytes == sizeof ids64 && tm->nbytes == sizeof mask64, "golden tensors");
  if (!te || !ti || !tm || ti->nbytes != sizeof ids64 || tm->nbytes != sizeof mask64 ||
      blip_st_to_f32(te, emb, NI * TT * D))
    goto done;
  memcpy(ids64, ti->data, sizeof ids64);
  memcpy(mask64, tm->data, sizeof mask64);
  static const blip_tokens_fmt fmts[] = {BLIP_TOKENS_I8, BLIP_TOKENS_F16, BLIP_TOKENS_I4};
  /* int8: under bf16 autocast's 4e-2 drift; f16: 10x tighter; int4: 15 levels per group */
  static const double tol[] = {0.05, 0.005, 0.25};
  for (int f = 0; f < 3; f++) {
    uint8_t *rec = malloc(blip_tokstore_payload_size(fmts[f], TT, D));
    for (int i = 0; i < NI; i++) {
      blip_tokstore_encode(fmts[f], TT, D, emb + i * TT * D, rec);
      blip_tokstore_decode(fmts[f], TT, D, rec, dec + i * TT * D);
    }
    free(rec);
    double worst = 0;
    for (int c = 0; c < NC; c++) {
      int32_t ids[L];
      int len = 0;
      for (int j = 0; j < L; j++)
        if (mask64[c * L + j]) ids[len++] = (int32_t)ids64[c * L + j];
      const float *a[NI], *b[NI];
      float la[NI * 2], lb[NI * 2];
      for (int i = 0; i < NI; i++) {
        a[i] = emb + i * TT * D;
        b[i] = dec + i * TT * D;
      }
      CHECK_OK(blip_model_itm(m, ids, len, a, NI, BLIP_ITM_ENC, 0, la, NULL));
      CHECK_OK(blip_model_itm(m, ids, len, b, NI, BLIP_ITM_ENC, 0, lb, NULL));
      for (int k = 0; k < NI * 2; k++) worst = fmax(worst, fabs(la[k] - lb[k]));
    }
    printf("  ITM logit max|err| with %s tokens: %.3g (tol %.3g)\n", blip_tokstore_fmt_name(fmts[f]), worst, tol[f]);
    CHECK(worst <= tol[f], "ITM logit error %g", worst);
    CHECK(worst > 0, "decoded tokens identical to fp32: codec bypassed");
  }
done:
  blip_st_close(g);
  blip_model_free(m);
}

static off_t fsize(const char *dir, const char *name) {
  char p[600];
  struct stat sb;
  snprintf(p, sizeof p, "%s/%s", dir, name);
  return stat(p, &sb) == 0 ? sb.st_size : 0;
}

/* A file-size limit stands in for a full disk: writes past it fail with EFBIG. */
static void test_full_disk(void) {
  const char *dir = tmpdir("full");
  blip_store_identity id = ID_A;
  id.v_tokens = 64;
  id.v_hidden = 256; /* 16 KiB records: tokens.bin hits the limit first */
  enum { B = 20 };
  blip_store_row rows[B];
  char paths[B][64];
  float feats[2 * B * E], *toks = malloc(sizeof(float) * B * 64 * 256);
  int64_t ids[2 * B];
  for (int i = 0; i < 2 * B; i++) rand_unit(feats + i * E, E);
  for (int i = 0; i < B * 64 * 256; i++) toks[i] = frand();
  blip_store *st = open_w(dir, &id, BLIP_TOKENS_I8);
  if (!st) {
    CHECK(0, "open");
    return;
  }
  mk_rows(rows, paths, B, 0, 1);
  CHECK_OK(blip_store_put(st, rows, NULL, B, feats, toks, ids));
  struct rlimit old, lim;
  getrlimit(RLIMIT_FSIZE, &old);
  signal(SIGXFSZ, SIG_IGN);
  off_t big = fsize(dir, "index.sqlite-wal") > fsize(dir, "index.sqlite") ? fsize(dir, "index.sqlite-wal")
                                                                          : fsize(dir, "index.sqlite");
  lim = old;
  lim.rlim_cur = (rlim_t)(fsize(dir, "tokens.bin") + 5 * 16 * 1024); /* room for 5 of the next 20 records */
  if (lim.rlim_cur < (rlim_t)big + 65536) lim.rlim_cur = (rlim_t)big + 65536;
  setrlimit(RLIMIT_FSIZE, &lim);
  mk_rows(rows, paths, B, B, 1);
  int rc = blip_store_put(st, rows, NULL, B, feats + B * E, toks, ids + B);
  setrlimit(RLIMIT_FSIZE, &old);
  CHECK(rc == BLIP_EFULL, "full disk gives BLIP_EFULL, got %d (%s)", rc, blip_err_last());
  CHECK(strstr(blip_err_last(), "file size limit reached (EFBIG") != NULL, "clear message: %s", blip_err_last());
  CHECK(blip_store_count(st) == B, "failed batch not committed: %lld", (long long)blip_store_count(st));
  CHECK_OK(blip_store_verify(st));
  /* and the same batch goes in once there is room */
  CHECK_OK(blip_store_put(st, rows, NULL, B, feats + B * E, toks, ids + B));
  CHECK(blip_store_count(st) == 2 * B, "retry committed");
  CHECK_OK(blip_store_verify(st));
  blip_store_close(st);

  /* SQLite itself hitting the limit: no rerank store, a tight limit on every file */
  const char *dir2 = tmpdir("full2");
  st = open_w(dir2, &ID_A, BLIP_TOKENS_NONE);
  if (!st) return;
  mk_rows(rows, paths, B, 0, 1);
  CHECK_OK(blip_store_put(st, rows, NULL, B, feats, NULL, ids));
  lim = old;
  lim.rlim_cur = (rlim_t)fsize(dir2, "index.sqlite-wal") + 1024;
  setrlimit(RLIMIT_FSIZE, &lim);
  static char longp[B][3000];
  blip_store_row big_rows[B];
  for (int i = 0; i < B; i++) { /* rows big enough to need new WAL frames */
    memset(longp[i], 'x', sizeof longp[i] - 1);
    snprintf(longp[i], 16, "/p/%04d", i);
    longp[i][7] = '_';
    longp[i][sizeof longp[i] - 1] = 0;
    big_rows[i] = rows[i];
    big_rows[i].path = longp[i];
  }
  rc = blip_store_put(st, big_rows, NULL, B, feats + B * E, NULL, ids + B);
  setrlimit(RLIMIT_FSIZE, &old);
  CHECK(rc == BLIP_EFULL && strstr(blip_err_last(), "file size limit reached (EFBIG"), "sqlite full: %d %s", rc,
        blip_err_last());
  blip_store_close(st);
  blip_store_opts ro = {0};
  CHECK_OK(blip_store_open(dir2, NULL, &ro, &st));
  CHECK(blip_store_count(st) == B, "sqlite consistent after full disk");
  CHECK_OK(blip_store_verify(st));
  blip_store_close(st);
  signal(SIGXFSZ, SIG_DFL);
  free(toks);
}

/* A reader open during writes sees whole batches only, and follows new ones. */
static void test_concurrent_reader(void) {
  const char *dir = tmpdir("conc");
  enum { B = 40 };
  blip_store_row rows[B];
  char paths[B][64];
  float feats[3 * B * E];
  int64_t ids[3 * B], gi[3 * B];
  float gs[3 * B];
  for (int i = 0; i < 3 * B; i++) rand_unit(feats + i * E, E);
  blip_store *w = open_w(dir, &ID_A, BLIP_TOKENS_NONE), *r = NULL;
  if (!w) {
    CHECK(0, "open");
    return;
  }
  mk_rows(rows, paths, B, 0, 1);
  CHECK_OK(blip_store_put(w, rows, NULL, B, feats, NULL, ids));
  blip_store_opts ro = {0};
  CHECK_OK(blip_store_open(dir, NULL, &ro, &r));
  blip_store_opts o = {.write = 1};
  blip_store *w2 = NULL;
  CHECK(blip_store_open(dir, &ID_A, &o, &w2) == BLIP_EDB && strstr(blip_err_last(), "another"), "second writer");
  for (int b = 1; b < 3; b++) {
    int n = blip_store_search(r, feats, 3 * B, NULL, 0, gi, gs);
    CHECK(n == b * B, "reader sees %d, want %d", n, b * B);
    mk_rows(rows, paths, B, b * B, 1);
    CHECK_OK(blip_store_put(w, rows, NULL, B, feats + b * B * E, NULL, ids + b * B));
  }
  CHECK(blip_store_search(r, feats, 3 * B, NULL, 0, gi, gs) == 3 * B, "reader follows the last commit");
  blip_store_close(r);
  blip_store_close(w);
}

/* Read a whole file (malloc'd) / write it back. */
static uint8_t *slurp(const char *p, size_t *n) {
  FILE *f = fopen(p, "rb");
  uint8_t *b = NULL;
  if (f && fseek(f, 0, SEEK_END) == 0 && (*n = (size_t)ftell(f)) > 0 && (b = malloc(*n)) && fseek(f, 0, SEEK_SET) == 0 &&
      fread(b, 1, *n, f) != *n) {
    free(b);
    b = NULL;
  }
  if (f) fclose(f);
  return b;
}

static void spill(const char *p, const uint8_t *b, size_t n) {
  FILE *f = fopen(p, "wb");
  CHECK(f && fwrite(b, 1, n, f) == n, "write %s", p);
  if (f) fclose(f);
}

/* vectors.faiss damaged, Flat and IVF: a check finds a vector that differs
 * from SQLite's even when the file's checksum was made to match (the compare
 * stands on its own), readers never search damaged bytes, a writer rewrites
 * the file; 20 identical vectors (ties past any top-k) pass the check. */
static void test_damaged_cache(void) {
  enum { N = 1200, DUP = 20, B = 300 };
  float *feats = malloc(sizeof(float) * N * E);
  int64_t *ids = malloc(sizeof(int64_t) * N);
  blip_store_row rows[B];
  char paths[B][64];
  for (int i = 0; i < N; i++) rand_unit(feats + (size_t)i * E, E);
  for (int i = 1; i <= DUP; i++) memcpy(feats + (size_t)(N - i) * E, feats, sizeof(float) * E);
  for (int ivf = 0; ivf < 2; ivf++) {
    const char *dir = tmpdir(ivf ? "dmg-ivf" : "dmg-flat");
    blip_store_opts o = {.write = 1, .ivf_min = ivf ? 500 : 0};
    blip_store *st = NULL, *rd = NULL;
    CHECK_OK(blip_store_open(dir, &ID_A, &o, &st));
    for (int b = 0; b < N / B; b++) {
      mk_rows(rows, paths, B, b * B, 1);
      CHECK_OK(blip_store_put(st, rows, NULL, B, feats + (size_t)b * B * E, NULL, ids + b * B));
    }
    blip_store_close(st);
    blip_store_opts ro = {0};
    blip_store_report r;
    CHECK_OK(blip_store_open(dir, NULL, &ro, &rd));
    CHECK_OK(blip_store_verify(rd)); /* ties: 21 identical vectors */
    blip_store_close(rd);

    char fp[600];
    snprintf(fp, sizeof fp, "%s/vectors.faiss", dir);
    size_t n = 0;
    uint8_t *file = slurp(fp, &n), *v = file ? memmem(file, n, feats + 7 * E, sizeof(float) * E) : NULL;
    CHECK(v != NULL, "%s: vector 7 stored as is", ivf ? "IVF" : "Flat");
    if (!v) {
      free(file);
      continue;
    }
    float bad = 0.25f;
    memcpy(v + 12, &bad, 4);
    /* 1. the header's checksum made to match: the compare alone finds it */
    int64_t sum = (int64_t)XXH3_64bits(file + 48, n - 48);
    memcpy(file + 40, &sum, 8);
    spill(fp, file, n);
    CHECK_OK(blip_store_open(dir, NULL, &ro, &rd));
    CHECK_OK(blip_store_check(rd, &r));
    CHECK(!r.cache[0] && r.cache_bad == 1 && r.cache_first == ids[7], "%s: compare: %lld bad, first %lld (want %lld)",
          ivf ? "IVF" : "Flat", (long long)r.cache_bad, (long long)r.cache_first, (long long)ids[7]);
    blip_store_close(rd);
    /* 2. a plain flipped byte: the checksum fails; searches use SQLite's vectors */
    file[n / 2] ^= 0x40;
    spill(fp, file, n);
    CHECK_OK(blip_store_open(dir, NULL, &ro, &rd));
    int64_t gi[3];
    float gs[3];
    int k = blip_store_search(rd, feats + (size_t)7 * E, 3, NULL, 0, gi, gs);
    CHECK(k == 3 && gi[0] == ids[7] && fabsf(gs[0] - 1) < 1e-5f && (blip_store_damage(rd) & BLIP_DAMAGE_CACHE),
          "%s: search over a damaged cache: %d results, top %lld score %g", ivf ? "IVF" : "Flat", k,
          (long long)gi[0], gs[0]);
    CHECK_OK(blip_store_check(rd, &r));
    CHECK(strstr(r.cache, "checksum") != NULL, "%s: check says '%s'", ivf ? "IVF" : "Flat", r.cache);
    blip_store_close(rd);
    /* 3. a writer that changes nothing rewrites it */
    CHECK_OK(blip_store_open(dir, &ID_A, &o, &st));
    blip_store_close(st);
    CHECK_OK(blip_store_open(dir, NULL, &ro, &rd));
    CHECK_OK(blip_store_verify(rd));
    CHECK(!blip_store_damage(rd), "rewritten cache still damaged");
    blip_store_close(rd);
    free(file);
  }
  free(feats);
  free(ids);
}

/* A token record with garbage in its payload: the reader reports damage (no
 * decoded garbage), a full scan marks its row, put_tokens rewrites it. */
static void test_damaged_tokens(void) {
  const char *dir = tmpdir("dmg-tok");
  enum { N = 6 };
  blip_store_row rows[N];
  char paths[N][64];
  float feats[N * E], *toks = malloc(sizeof(float) * N * T * DV), *back = malloc(sizeof(float) * T * DV);
  int64_t ids[N], *lost = NULL, nlost = 0, marked = 0;
  mk_rows(rows, paths, N, 0, 99);
  for (int i = 0; i < N; i++) rand_unit(feats + i * E, E);
  for (int i = 0; i < N * T * DV; i++) toks[i] = frand();
  blip_store *st = open_w(dir, &ID_A, BLIP_TOKENS_I8), *rd = NULL;
  if (!st) return;
  CHECK_OK(blip_store_put(st, rows, NULL, N, feats, toks, ids));
  size_t stride = blip_store_record_bytes(st);
  blip_store_close(st);
  char tp[600];
  snprintf(tp, sizeof tp, "%s/tokens.bin", dir);
  FILE *f = fopen(tp, "r+b");
  CHECK(f && fseek(f, 64 + (long)(ids[3] * (int64_t)stride) + 16 + 40, SEEK_SET) == 0 && fwrite("garbage!", 8, 1, f) == 1,
        "damage a record");
  if (f) fclose(f);
  blip_store_opts ro = {0};
  CHECK_OK(blip_store_open(dir, NULL, &ro, &rd));
  CHECK(blip_store_tokens(rd, ids[3], back) == BLIP_EFORMAT && (blip_store_damage(rd) & BLIP_DAMAGE_TOKENS),
        "damaged record read as data");
  CHECK_OK(blip_store_tokens(rd, ids[2], back));
  CHECK(blip_store_verify(rd) == BLIP_EFORMAT && strstr(blip_err_last(), "checksum"), "verify: %s", blip_err_last());
  blip_store_close(rd);
  st = open_w(dir, &ID_A, BLIP_TOKENS_I8);
  if (!st) return;
  CHECK_OK(blip_store_tokens_scan(st, 0, &marked));
  CHECK(marked == 0, "a cheap scan reads records with checksums");
  CHECK_OK(blip_store_tokens_scan(st, 1, &marked));
  CHECK_OK(blip_store_tokens_lost(st, &lost, &nlost));
  CHECK(marked == 1 && nlost == 1 && lost[0] == ids[3], "full scan: %lld marked, %lld lost", (long long)marked,
        (long long)nlost);
  uint64_t fp = rows[3].fingerprint;
  CHECK_OK(blip_store_put_tokens(st, 1, &ids[3], &fp, toks + 3 * T * DV));
  CHECK_OK(blip_store_tokens(st, ids[3], back));
  float worst = 0;
  for (int i = 0; i < T * DV; i++) worst = fmaxf(worst, fabsf(back[i] - toks[3 * T * DV + i]));
  CHECK(worst < 0.01f, "rewritten record: max|err| %g", worst);
  CHECK_OK(blip_store_verify(st));
  blip_store_close(st);
  free(lost);
  free(toks);
  free(back);
}

int main(void) {
  snprintf(g_tmp, sizeof g_tmp, "/tmp/blip_test_store.XXXXXX");
  if (!mkdtemp(g_tmp)) return 1;
  test_schema_embedded();
  test_migrate_and_identity();
  test_add_delete_move();
  test_faiss_rebuild();
  test_faiss_pq();
  test_filtered_search();
  test_tokens_roundtrip();
  test_tokens_itm_error();
  test_full_disk();
  test_concurrent_reader();
  test_damaged_cache();
  test_damaged_tokens();
  char cmd[400];
  snprintf(cmd, sizeof cmd, "rm -rf %s", g_tmp);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_tmp);
  return check_summary();
}
