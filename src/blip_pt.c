/* blip_pt: torch.save zip -> blip_st, through a restricted unpickler (see
 * blip_pt.h).
 *
 * Invariants: the pickle VM only ever builds plain data (no callable is
 * ever invoked: REDUCE is matched against three known constructors and
 * evaluated here); every value lives in one pool freed at the end; every
 * read of the pickle checks the remaining length; storages are read from
 * the archive only when a tensor uses them, and only when the entry's size
 * equals numel x element size; a tensor view must lie inside its storage. */
#include "blip_pt.h"
#include "blip_err.h"

#include <fcntl.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zip.h>

enum { MAX_VALUES = 1 << 22, MAX_MEMO = 1 << 22, MAX_STORAGES = 1 << 16, MAX_PICKLE = 1 << 28 };

typedef enum { V_MARK, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_TUPLE, V_LIST, V_DICT, V_GLOBAL, V_STORAGE, V_TENSOR } vkind;
typedef enum { G_ODICT, G_REBUILD_TENSOR, G_REBUILD_PARAM, G_STORAGE } gkind;

typedef struct val val;
struct val {
  vkind k;
  int64_t i;       /* INT, BOOL; GLOBAL: gkind; STORAGE: table index */
  blip_dtype dt;   /* GLOBAL storage type */
  const char *s;   /* STR: into the pickle (not NUL-terminated) */
  size_t n;        /* STR length; TUPLE/LIST/DICT item count (DICT: 2 per entry) */
  size_t cap;
  val **a;         /* TUPLE/LIST/DICT items */
  int nd;          /* TENSOR */
  int sto;
  int64_t off, shape[BLIP_ST_MAXDIM], stride[BLIP_ST_MAXDIM];
};

typedef struct {
  char key[64];
  blip_dtype dt;
  int64_t numel;
  int checked;   /* its archive entry exists with numel x element size bytes */
  uint8_t *data; /* read on first use */
} storage;

typedef struct {
  const uint8_t *p, *end, *base;
  val **pool;
  size_t n_pool, cap_pool;
  val **stack;
  size_t sp, cap_stack;
  val **memo;
  size_t cap_memo, n_memo; /* n_memo: slots set (MEMOIZE's next index) */
  storage *sto;
  int n_sto, cap_sto;
  uint64_t sto_bytes; /* of the checked storages */
  zip_t *zip;
  char prefix[256]; /* "ARCHIVE/" */
} vm;

static const struct {
  const char *name;
  blip_dtype dt;
} k_storages[] = {{"FloatStorage", BLIP_DT_F32}, {"HalfStorage", BLIP_DT_F16},  {"BFloat16Storage", BLIP_DT_BF16},
                  {"DoubleStorage", BLIP_DT_F64}, {"LongStorage", BLIP_DT_I64}, {"IntStorage", BLIP_DT_I32},
                  {"ShortStorage", BLIP_DT_I16}, {"CharStorage", BLIP_DT_I8},  {"ByteStorage", BLIP_DT_U8},
                  {"BoolStorage", BLIP_DT_BOOL}};

static int bad(const vm *v, const char *what) {
  return blip_err_set(BLIP_EFORMAT, "pytorch pickle: %s at byte %ld", what, (long)(v->p - v->base));
}

static val *new_val(vm *v, vkind k) {
  if (v->n_pool == MAX_VALUES) return NULL;
  if (v->n_pool == v->cap_pool) {
    size_t nc = v->cap_pool ? 2 * v->cap_pool : 1024;
    val **np = realloc(v->pool, nc * sizeof *np);
    if (!np) return NULL;
    v->pool = np, v->cap_pool = nc;
  }
  val *x = calloc(1, sizeof *x);
  if (!x) return NULL;
  x->k = k;
  v->pool[v->n_pool++] = x;
  return x;
}

static int push(vm *v, val *x) {
  if (!x) return blip_err_set(BLIP_ENOMEM, "pytorch pickle: out of memory or too many values");
  if (v->sp == v->cap_stack) {
    size_t nc = v->cap_stack ? 2 * v->cap_stack : 256;
    if (nc > MAX_VALUES) return bad(v, "stack too deep");
    val **ns = realloc(v->stack, nc * sizeof *ns);
    if (!ns) return blip_err_set(BLIP_ENOMEM, "pytorch pickle: out of memory");
    v->stack = ns, v->cap_stack = nc;
  }
  v->stack[v->sp++] = x;
  return BLIP_OK;
}

static int append(val *c, val *x) {
  if (c->n == c->cap) {
    size_t nc = c->cap ? 2 * c->cap : 8;
    val **na = realloc(c->a, nc * sizeof *na);
    if (!na) return blip_err_set(BLIP_ENOMEM, "pytorch pickle: out of memory");
    c->a = na, c->cap = nc;
  }
  c->a[c->n++] = x;
  return BLIP_OK;
}

static int pop(vm *v, val **out) {
  if (!v->sp || v->stack[v->sp - 1]->k == V_MARK) return bad(v, "stack underflow");
  *out = v->stack[--v->sp];
  return BLIP_OK;
}

/* index of the topmost MARK */
static int find_mark(vm *v, size_t *at) {
  for (size_t i = v->sp; i-- > 0;)
    if (v->stack[i]->k == V_MARK) {
      *at = i;
      return BLIP_OK;
    }
  return bad(v, "no MARK");
}

static int need(vm *v, size_t n) { return (size_t)(v->end - v->p) < n ? bad(v, "truncated") : BLIP_OK; }

static uint64_t le(const uint8_t *p, int n) {
  uint64_t x = 0;
  for (int i = 0; i < n; i++) x |= (uint64_t)p[i] << (8 * i);
  return x;
}

static int memo_put(vm *v, uint64_t idx) {
  if (!v->sp) return bad(v, "memo of an empty stack");
  if (idx >= MAX_MEMO) return bad(v, "memo index too large");
  if (idx >= v->cap_memo) {
    size_t nc = v->cap_memo ? v->cap_memo : 64;
    while (nc <= idx) nc *= 2;
    val **nm = realloc(v->memo, nc * sizeof *nm);
    if (!nm) return blip_err_set(BLIP_ENOMEM, "pytorch pickle: out of memory");
    memset(nm + v->cap_memo, 0, (nc - v->cap_memo) * sizeof *nm);
    v->memo = nm, v->cap_memo = nc;
  }
  v->n_memo += !v->memo[idx];
  v->memo[idx] = v->stack[v->sp - 1];
  return BLIP_OK;
}

static int memo_get(vm *v, uint64_t idx) {
  if (idx >= v->cap_memo || !v->memo[idx]) return bad(v, "memo index not set");
  return push(v, v->memo[idx]);
}

/* GLOBAL module name: only the state-dict vocabulary. */
static int global(vm *v, const char *mod, size_t ml, const char *name, size_t nl) {
  val *g = new_val(v, V_GLOBAL);
  if (!g) return push(v, NULL);
#define IS(a, b) (ml == strlen(a) && !memcmp(mod, a, ml) && nl == strlen(b) && !memcmp(name, b, nl))
  if (IS("collections", "OrderedDict")) g->i = G_ODICT;
  else if (IS("torch._utils", "_rebuild_tensor_v2")) g->i = G_REBUILD_TENSOR;
  else if (IS("torch._utils", "_rebuild_parameter")) g->i = G_REBUILD_PARAM;
  else {
    int found = 0;
    for (size_t i = 0; i < sizeof k_storages / sizeof k_storages[0] && !found; i++)
      if (IS("torch", k_storages[i].name)) g->i = G_STORAGE, g->dt = k_storages[i].dt, found = 1;
    if (!found)
      return blip_err_set(BLIP_EUNSUPPORTED,
                          "pytorch pickle: refers to %.*s.%.*s, which a state dict never does: refused (only tensors, "
                          "storages and dicts are allowed; nothing is imported or executed)",
                          (int)(ml > 80 ? 80 : ml), mod, (int)(nl > 80 ? 80 : nl), name);
  }
#undef IS
  return push(v, g);
}

static int get_int(const val *x, int64_t *out) {
  if (x->k != V_INT && x->k != V_BOOL) return -1;
  *out = x->i;
  return 0;
}

/* ('storage', torch.XStorage, key, location, numel) */
static int persistent(vm *v, val *pid) {
  if (pid->k != V_TUPLE || pid->n != 5 || pid->a[0]->k != V_STR || pid->a[0]->n != 7 || memcmp(pid->a[0]->s, "storage", 7) ||
      pid->a[1]->k != V_GLOBAL || pid->a[1]->i != G_STORAGE || pid->a[2]->k != V_STR || pid->a[2]->n == 0 ||
      pid->a[2]->n >= sizeof v->sto[0].key || pid->a[4]->k != V_INT || pid->a[4]->i < 0)
    return bad(v, "persistent id is not ('storage', type, key, location, numel)");
  const val *key = pid->a[2];
  for (size_t i = 0; i < key->n; i++)
    if (key->s[i] == '/' || key->s[i] == 0) return bad(v, "storage key with '/'");
  int idx = -1;
  for (int i = 0; i < v->n_sto && idx < 0; i++)
    if (strlen(v->sto[i].key) == key->n && !memcmp(v->sto[i].key, key->s, key->n)) idx = i;
  if (idx >= 0) { /* a shared storage: the same bytes under the same type */
    if (v->sto[idx].dt != pid->a[1]->dt || v->sto[idx].numel != pid->a[4]->i) return bad(v, "storage reused with another type");
  } else {
    if (v->n_sto == MAX_STORAGES) return bad(v, "too many storages");
    if (v->n_sto == v->cap_sto) {
      int nc = v->cap_sto ? 2 * v->cap_sto : 16;
      storage *ns = realloc(v->sto, (size_t)nc * sizeof *ns);
      if (!ns) return blip_err_set(BLIP_ENOMEM, "pytorch pickle: out of memory");
      v->sto = ns, v->cap_sto = nc;
    }
    idx = v->n_sto++;
    memset(&v->sto[idx], 0, sizeof v->sto[idx]);
    memcpy(v->sto[idx].key, key->s, key->n);
    v->sto[idx].dt = pid->a[1]->dt;
    v->sto[idx].numel = pid->a[4]->i;
  }
  val *s = new_val(v, V_STORAGE);
  if (s) s->i = idx;
  return push(v, s);
}

/* REDUCE of a known constructor; anything else was refused at GLOBAL. */
static int reduce(vm *v, val *fn, val *args) {
  if (fn->k != V_GLOBAL || args->k != V_TUPLE) return bad(v, "REDUCE of a non-callable");
  if (fn->i == G_ODICT) {
    if (args->n != 0) return bad(v, "OrderedDict with arguments");
    return push(v, new_val(v, V_DICT));
  }
  if (fn->i == G_REBUILD_PARAM) { /* (data, requires_grad, backward_hooks) */
    if (args->n < 1 || args->a[0]->k != V_TENSOR) return bad(v, "_rebuild_parameter without a tensor");
    return push(v, args->a[0]);
  }
  if (fn->i != G_REBUILD_TENSOR) return bad(v, "a storage type called");
  /* (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]) */
  if (args->n < 4 || args->a[0]->k != V_STORAGE || args->a[2]->k != V_TUPLE || args->a[3]->k != V_TUPLE ||
      args->a[2]->n != args->a[3]->n || args->a[2]->n > BLIP_ST_MAXDIM)
    return bad(v, "_rebuild_tensor_v2 arguments");
  val *t = new_val(v, V_TENSOR);
  if (!t) return push(v, NULL);
  t->sto = (int)args->a[0]->i;
  t->nd = (int)args->a[2]->n;
  if (get_int(args->a[1], &t->off) || t->off < 0) return bad(v, "tensor offset");
  for (int d = 0; d < t->nd; d++)
    if (get_int(args->a[2]->a[d], &t->shape[d]) || get_int(args->a[3]->a[d], &t->stride[d]) || t->shape[d] < 0 || t->stride[d] < 0)
      return bad(v, "tensor size or stride");
  return push(v, t);
}

static int run(vm *v, val **result) {
  int rc;
  val *a, *b, *c;
  size_t m;
  while (v->p < v->end) {
    const uint8_t op = *v->p++;
    switch (op) {
    case 0x80: /* PROTO */
      if ((rc = need(v, 1))) return rc;
      if (*v->p++ > 5) return bad(v, "pickle protocol above 5");
      break;
    case 0x95: /* FRAME */
      if ((rc = need(v, 8))) return rc;
      v->p += 8;
      break;
    case '(': rc = push(v, new_val(v, V_MARK)); break;
    case ')': rc = push(v, new_val(v, V_TUPLE)); break;
    case ']': rc = push(v, new_val(v, V_LIST)); break;
    case '}': rc = push(v, new_val(v, V_DICT)); break;
    case 'N': rc = push(v, new_val(v, V_NONE)); break;
    case 0x88:
    case 0x89:
      if ((a = new_val(v, V_BOOL))) a->i = op == 0x88;
      rc = push(v, a);
      break;
    case 'J': case 'K': case 'M': case 0x8a: { /* BININT, BININT1, BININT2, LONG1 */
      int n = op == 'J' ? 4 : op == 'K' ? 1 : op == 'M' ? 2 : -1;
      if (n < 0) {
        if ((rc = need(v, 1))) return rc;
        n = *v->p++;
        if (n > 8) return bad(v, "integer wider than 64 bits");
      }
      if ((rc = need(v, (size_t)n))) return rc;
      uint64_t x = le(v->p, n);
      if ((op == 'J' || op == 0x8a) && n && n < 8 && (v->p[n - 1] & 0x80)) x |= ~0ull << (8 * n); /* sign */
      v->p += n;
      if ((a = new_val(v, V_INT))) a->i = (int64_t)x;
      rc = push(v, a);
      break;
    }
    case 'G': { /* BINFLOAT, big-endian double */
      if ((rc = need(v, 8))) return rc;
      uint64_t x = 0;
      for (int i = 0; i < 8; i++) x = x << 8 | v->p[i];
      v->p += 8;
      if ((a = new_val(v, V_FLOAT))) memcpy(&a->i, &x, 8);
      rc = push(v, a);
      break;
    }
    case 'X': case 0x8c: case 'T': case 'U': case 'B': case 'C': { /* (SHORT_)BINUNICODE, (SHORT_)BINSTRING, (SHORT_)BINBYTES */
      const int w = (op == 'X' || op == 'T' || op == 'B') ? 4 : 1;
      if ((rc = need(v, (size_t)w))) return rc;
      uint64_t n = le(v->p, w);
      v->p += w;
      if ((rc = need(v, n))) return rc;
      if ((a = new_val(v, V_STR))) a->s = (const char *)v->p, a->n = n;
      v->p += n;
      rc = push(v, a);
      break;
    }
    case 'q': case 'r': { /* BINPUT, LONG_BINPUT */
      const int w = op == 'q' ? 1 : 4;
      if ((rc = need(v, (size_t)w))) return rc;
      uint64_t idx = le(v->p, w);
      v->p += w;
      rc = memo_put(v, idx);
      break;
    }
    case 0x94: /* MEMOIZE */
      rc = memo_put(v, v->n_memo);
      break;
    case 'h': case 'j': { /* BINGET, LONG_BINGET */
      const int w = op == 'h' ? 1 : 4;
      if ((rc = need(v, (size_t)w))) return rc;
      uint64_t idx = le(v->p, w);
      v->p += w;
      rc = memo_get(v, idx);
      break;
    }
    case 'c': { /* GLOBAL "module\nname\n" */
      const uint8_t *nl1 = memchr(v->p, '\n', (size_t)(v->end - v->p));
      const uint8_t *nl2 = nl1 ? memchr(nl1 + 1, '\n', (size_t)(v->end - nl1 - 1)) : NULL;
      if (!nl2) return bad(v, "GLOBAL without two lines");
      const uint8_t *mod = v->p;
      v->p = nl2 + 1;
      rc = global(v, (const char *)mod, (size_t)(nl1 - mod), (const char *)nl1 + 1, (size_t)(nl2 - nl1 - 1));
      break;
    }
    case 0x93: /* STACK_GLOBAL */
      if ((rc = pop(v, &b)) || (rc = pop(v, &a))) return rc;
      if (a->k != V_STR || b->k != V_STR) return bad(v, "STACK_GLOBAL of non-strings");
      rc = global(v, a->s, a->n, b->s, b->n);
      break;
    case 0x85: case 0x86: case 0x87: { /* TUPLE1..3 */
      const size_t n = op - 0x84u;
      if (v->sp < n) return bad(v, "stack underflow");
      if (!(a = new_val(v, V_TUPLE))) return push(v, NULL);
      for (size_t i = v->sp - n; i < v->sp; i++) {
        if (v->stack[i]->k == V_MARK) return bad(v, "MARK inside a tuple");
        if ((rc = append(a, v->stack[i]))) return rc;
      }
      v->sp -= n;
      rc = push(v, a);
      break;
    }
    case 't': case 'l': case 'd': /* TUPLE, LIST, DICT from the mark */
      if ((rc = find_mark(v, &m))) return rc;
      if (op == 'd' && (v->sp - m - 1) % 2) return bad(v, "DICT of an odd count");
      if (!(a = new_val(v, op == 't' ? V_TUPLE : op == 'l' ? V_LIST : V_DICT))) return push(v, NULL);
      for (size_t i = m + 1; i < v->sp; i++)
        if ((rc = append(a, v->stack[i]))) return rc;
      v->sp = m;
      rc = push(v, a);
      break;
    case 'a': /* APPEND */
      if ((rc = pop(v, &a))) return rc;
      if (!v->sp || v->stack[v->sp - 1]->k != V_LIST) return bad(v, "APPEND to a non-list");
      rc = append(v->stack[v->sp - 1], a);
      break;
    case 'e': case 'u': /* APPENDS, SETITEMS */
      if ((rc = find_mark(v, &m))) return rc;
      if (!m || v->stack[m - 1]->k != (op == 'e' ? V_LIST : V_DICT)) return bad(v, "APPENDS/SETITEMS target");
      if (op == 'u' && (v->sp - m - 1) % 2) return bad(v, "SETITEMS of an odd count");
      for (size_t i = m + 1; i < v->sp; i++)
        if ((rc = append(v->stack[m - 1], v->stack[i]))) return rc;
      v->sp = m;
      break;
    case 's': /* SETITEM */
      if ((rc = pop(v, &b)) || (rc = pop(v, &a))) return rc;
      if (!v->sp || v->stack[v->sp - 1]->k != V_DICT) return bad(v, "SETITEM to a non-dict");
      if ((rc = append(v->stack[v->sp - 1], a)) || (rc = append(v->stack[v->sp - 1], b))) return rc;
      break;
    case 'R': /* REDUCE */
      if ((rc = pop(v, &b)) || (rc = pop(v, &a))) return rc;
      rc = reduce(v, a, b);
      break;
    case 'b': /* BUILD: only OrderedDict's state (its _metadata), ignored */
      if ((rc = pop(v, &b))) return rc;
      if (!v->sp || v->stack[v->sp - 1]->k != V_DICT || (b->k != V_DICT && b->k != V_NONE && b->k != V_TUPLE))
        return bad(v, "BUILD of something other than a dict");
      break;
    case 'Q': /* BINPERSID */
      if ((rc = pop(v, &a))) return rc;
      rc = persistent(v, a);
      break;
    case '0': rc = pop(v, &a); break; /* POP */
    case '1':                         /* POP_MARK */
      if ((rc = find_mark(v, &m))) return rc;
      v->sp = m;
      break;
    case '2': /* DUP */
      if (!v->sp) return bad(v, "DUP of an empty stack");
      rc = push(v, v->stack[v->sp - 1]);
      break;
    case '.': /* STOP */
      if ((rc = pop(v, &c))) return rc;
      *result = c;
      return BLIP_OK;
    default:
      v->p--;
      return blip_err_set(BLIP_EUNSUPPORTED, "pytorch pickle: opcode 0x%02x at byte %ld is not used by state dicts: refused", op,
                          (long)(v->p - v->base));
    }
    if (rc) return rc;
  }
  return bad(v, "no STOP");
}

/* ---------- archive ---------- */

static int read_entry(vm *v, const char *name, uint64_t want, uint8_t **out) {
  zip_int64_t idx = zip_name_locate(v->zip, name, 0);
  if (idx < 0) return blip_err_set(BLIP_EFORMAT, "pytorch zip: no entry %s", name);
  zip_stat_t zs;
  if (zip_stat_index(v->zip, (zip_uint64_t)idx, 0, &zs) || !(zs.valid & ZIP_STAT_SIZE))
    return blip_err_set(BLIP_EFORMAT, "pytorch zip: cannot stat %s", name);
  if (want != UINT64_MAX && zs.size != want)
    return blip_err_set(BLIP_EFORMAT, "pytorch zip: %s holds %llu bytes, the pickle says %llu", name, (unsigned long long)zs.size,
                        (unsigned long long)want);
  if (zs.size > ((uint64_t)1 << 40)) return blip_err_set(BLIP_EFORMAT, "pytorch zip: %s is too large", name);
  uint8_t *buf = malloc(zs.size ? zs.size : 1);
  if (!buf) return blip_err_set(BLIP_ENOMEM, "pytorch zip: out of memory for %s", name);
  zip_file_t *f = zip_fopen_index(v->zip, (zip_uint64_t)idx, 0);
  zip_int64_t got = 0, r = 0;
  while (f && (uint64_t)got < zs.size && (r = zip_fread(f, buf + got, zs.size - (uint64_t)got)) > 0) got += r;
  if (f) zip_fclose(f);
  if (!f || (uint64_t)got != zs.size) {
    free(buf);
    return blip_err_set(BLIP_EFORMAT, "pytorch zip: cannot read %s (corrupt or truncated)", name);
  }
  *out = buf;
  return BLIP_OK;
}

/* The archive's one "<dir>/data.pkl". */
static int find_prefix(vm *v) {
  zip_int64_t n = zip_get_num_entries(v->zip, 0);
  int found = 0;
  for (zip_int64_t i = 0; i < n; i++) {
    const char *nm = zip_get_name(v->zip, (zip_uint64_t)i, 0);
    size_t l = nm ? strlen(nm) : 0;
    if (l >= 9 && !strcmp(nm + l - 9, "/data.pkl") && !memchr(nm, '/', l - 9) && l - 8 < sizeof v->prefix) {
      if (found++) return blip_err_set(BLIP_EFORMAT, "pytorch zip: more than one data.pkl");
      memcpy(v->prefix, nm, l - 8);
      v->prefix[l - 8] = 0;
    }
  }
  return found ? BLIP_OK : blip_err_set(BLIP_EFORMAT, "pytorch zip: no data.pkl (not a torch.save file)");
}

static uint64_t entry_size(vm *v, const char *name, zip_int64_t *idx) {
  zip_stat_t zs;
  *idx = zip_name_locate(v->zip, name, 0);
  if (*idx < 0 || zip_stat_index(v->zip, (zip_uint64_t)*idx, 0, &zs) || !(zs.valid & ZIP_STAT_SIZE)) return UINT64_MAX;
  return zs.size;
}

/* Before anything is allocated: the view lies inside its storage, touches
 * no element twice (so it is never larger than the storage), and the
 * storage's archive entry has exactly numel x element size bytes. */
static int check_view(vm *v, const val *t, int64_t numel) {
  storage *s = &v->sto[t->sto];
  const size_t es = blip_dtype_size(s->dt);
  if (!s->checked) {
    char name[sizeof v->prefix + 80];
    zip_int64_t idx;
    snprintf(name, sizeof name, "%sdata/%s", v->prefix, s->key);
    uint64_t size = entry_size(v, name, &idx);
    if (size == UINT64_MAX) return blip_err_set(BLIP_EFORMAT, "pytorch zip: no entry %s", name);
    if ((uint64_t)s->numel > ((uint64_t)1 << 40) / es || size != (uint64_t)s->numel * es)
      return blip_err_set(BLIP_EFORMAT, "pytorch zip: %s holds %llu bytes, the pickle says %lld elements of %zu", name,
                          (unsigned long long)size, (long long)s->numel, es);
    s->checked = 1;
    v->sto_bytes += size;
  }
  if (numel == 0) return BLIP_OK;
  int64_t last = t->off, span = 1; /* highest element index the view touches; the extent it covers */
  int order[BLIP_ST_MAXDIM], nd = 0;
  for (int d = 0; d < t->nd; d++) {
    if (t->stride[d] && t->shape[d] - 1 > (INT64_MAX - last) / t->stride[d]) return blip_err_set(BLIP_EFORMAT, "pytorch: tensor view overflows");
    last += (t->shape[d] - 1) * t->stride[d];
    if (t->shape[d] > 1) order[nd++] = d;
  }
  if (last >= s->numel)
    return blip_err_set(BLIP_EFORMAT, "pytorch: a tensor view reaches element %lld of storage %s (%lld elements)", (long long)last,
                        s->key, (long long)s->numel);
  for (int i = 1; i < nd; i++) /* dims by increasing stride; each must step past the extent of the smaller ones */
    for (int j = i; j > 0 && t->stride[order[j]] < t->stride[order[j - 1]]; j--) {
      int x = order[j];
      order[j] = order[j - 1], order[j - 1] = x;
    }
  for (int i = 0; i < nd; i++) {
    if (t->stride[order[i]] < span) return blip_err_set(BLIP_EFORMAT, "pytorch: a tensor view overlaps itself (stride %lld)", (long long)t->stride[order[i]]);
    span = t->stride[order[i]] * t->shape[order[i]];
  }
  return BLIP_OK;
}

/* Tensor t (checked) copied contiguous into dst. */
static int materialize(vm *v, const val *t, uint8_t *dst, int64_t numel) {
  storage *s = &v->sto[t->sto];
  const size_t es = blip_dtype_size(s->dt);
  int rc;
  if (numel == 0) return BLIP_OK;
  if (!s->data) {
    char name[sizeof v->prefix + 80];
    snprintf(name, sizeof name, "%sdata/%s", v->prefix, s->key);
    if ((rc = read_entry(v, name, (uint64_t)s->numel * es, &s->data))) return rc;
  }
  int64_t idx[BLIP_ST_MAXDIM] = {0}, expect = 1;
  int contiguous = 1;
  for (int d = t->nd - 1; d >= 0; d--) {
    contiguous &= t->shape[d] == 1 || t->stride[d] == expect;
    expect *= t->shape[d];
  }
  if (contiguous) {
    memcpy(dst, s->data + (size_t)t->off * es, (size_t)numel * es);
    return BLIP_OK;
  }
  for (int64_t i = 0; i < numel; i++) { /* odometer over the view */
    int64_t src = t->off;
    for (int d = 0; d < t->nd; d++) src += idx[d] * t->stride[d];
    memcpy(dst + (size_t)i * es, s->data + (size_t)src * es, es);
    for (int d = t->nd - 1; d >= 0 && ++idx[d] == t->shape[d]; d--) idx[d] = 0;
  }
  return BLIP_OK;
}

/* The state dict as a safetensors image: header padded so that the data
 * region and every tensor start 64-byte aligned. */
static int to_safetensors(vm *v, const val *dict, blip_st **out) {
  json_t *hdr = json_object();
  uint64_t off = 0;
  int rc = BLIP_OK;
  if (!hdr) return blip_err_set(BLIP_ENOMEM, "out of memory");
  int64_t *numel = calloc(dict->n / 2 + 1, sizeof *numel);
  if (!numel) {
    json_decref(hdr);
    return blip_err_set(BLIP_ENOMEM, "out of memory");
  }
  for (size_t i = 0; i + 1 < dict->n; i += 2) {
    const val *k = dict->a[i], *t = dict->a[i + 1];
    if (k->k != V_STR || t->k != V_TENSOR) continue; /* not a weight */
    int64_t n = 1;
    json_t *shape = json_array();
    for (int d = 0; d < t->nd; d++) {
      if (t->shape[d] && n > INT64_MAX / t->shape[d] / 8) {
        json_decref(shape);
        rc = blip_err_set(BLIP_EFORMAT, "pytorch: tensor %.*s is too large", (int)(k->n > 200 ? 200 : k->n), k->s);
        goto done;
      }
      n *= t->shape[d];
      json_array_append_new(shape, json_integer(t->shape[d]));
    }
    numel[i / 2] = n;
    if (memchr(k->s, 0, k->n)) rc = blip_err_set(BLIP_EFORMAT, "pytorch: a tensor name holds a NUL byte");
    if (rc || (rc = check_view(v, t, n))) {
      json_decref(shape);
      goto done;
    }
    const uint64_t bytes = (uint64_t)n * blip_dtype_size(v->sto[t->sto].dt);
    json_t *name = json_stringn(k->s, k->n);
    if (!name) {
      json_decref(shape);
      rc = blip_err_set(BLIP_EFORMAT, "pytorch: a tensor name is not UTF-8");
      goto done;
    }
    json_object_set_new(hdr, json_string_value(name),
                        json_pack("{s:s,s:o,s:[I,I]}", "dtype", blip_dtype_name(v->sto[t->sto].dt), "shape", shape, "data_offsets",
                                  (json_int_t)off, (json_int_t)(off + bytes)));
    json_decref(name);
    off = (off + bytes + 63) & ~(uint64_t)63;
    /* views repeat storages (tied weights) a few times, never without bound */
    if (off > 8 * v->sto_bytes + (1u << 20)) {
      rc = blip_err_set(BLIP_EFORMAT, "pytorch: the tensors reuse their storages %llu times over", (unsigned long long)(off / (v->sto_bytes + 1)));
      goto done;
    }
  }
  {
    char *text = json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!text) {
      rc = blip_err_set(BLIP_ENOMEM, "out of memory");
      goto done;
    }
    const size_t hl = (strlen(text) + 8 + 63) / 64 * 64 - 8;
    uint8_t *buf = malloc(8 + hl + off);
    if (!buf) {
      free(text);
      rc = blip_err_set(BLIP_ENOMEM, "pytorch: out of memory for %llu bytes of weights", (unsigned long long)off);
      goto done;
    }
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memset(buf + 8, ' ', hl);
    memcpy(buf + 8, text, strlen(text));
    free(text);
    uint8_t *data = buf + 8 + hl;
    uint64_t o = 0;
    for (size_t i = 0; i + 1 < dict->n && !rc; i += 2) {
      const val *k = dict->a[i], *t = dict->a[i + 1];
      if (k->k != V_STR || t->k != V_TENSOR) continue;
      /* (a repeated key is copied too: the header names the last one, as a Python dict keeps it) */
      rc = materialize(v, t, data + o, numel[i / 2]);
      o = (o + (uint64_t)numel[i / 2] * blip_dtype_size(v->sto[t->sto].dt) + 63) & ~(uint64_t)63;
    }
    if (rc) free(buf);
    else rc = blip_st_parse_owned(buf, 8 + hl + off, out);
  }
done:
  free(numel);
  json_decref(hdr);
  return rc;
}

int blip_pt_parse(const void *buf, size_t len, blip_st **out) {
  *out = NULL;
  vm v = {0};
  zip_error_t ze;
  zip_error_init(&ze);
  zip_source_t *src = zip_source_buffer_create(buf, len, 0, &ze);
  int rc = BLIP_OK;
  uint8_t *pkl = NULL;
  if (src && !(v.zip = zip_open_from_source(src, ZIP_RDONLY, &ze))) zip_source_free(src);
  if (!v.zip) {
    rc = blip_err_set(BLIP_EFORMAT, "pytorch zip: %s", zip_error_strerror(&ze));
    goto done;
  }
  if ((rc = find_prefix(&v))) goto done;
  {
    char name[sizeof v.prefix + 16];
    snprintf(name, sizeof name, "%sbyteorder", v.prefix);
    if (zip_name_locate(v.zip, name, 0) >= 0) {
      uint8_t *bo = NULL;
      if ((rc = read_entry(&v, name, 6, &bo)) == BLIP_OK && memcmp(bo, "little", 6))
        rc = blip_err_set(BLIP_EUNSUPPORTED, "pytorch zip: a big-endian checkpoint");
      free(bo);
      if (rc) goto done;
    }
    snprintf(name, sizeof name, "%sdata.pkl", v.prefix);
    zip_int64_t i;
    uint64_t size = entry_size(&v, name, &i);
    if (size > MAX_PICKLE) {
      rc = blip_err_set(BLIP_EFORMAT, "pytorch zip: data.pkl unreadable or too large");
      goto done;
    }
    if ((rc = read_entry(&v, name, size, &pkl))) goto done;
    v.base = v.p = pkl;
    v.end = pkl + size;
  }
  val *root = NULL;
  if ((rc = run(&v, &root))) goto done;
  if (root->k != V_DICT) {
    rc = blip_err_set(BLIP_EFORMAT, "pytorch pickle: the checkpoint is not a state dict");
    goto done;
  }
  rc = to_safetensors(&v, root, out);
done:
  for (size_t i = 0; i < v.n_pool; i++) {
    free(v.pool[i]->a);
    free(v.pool[i]);
  }
  for (int i = 0; i < v.n_sto; i++) free(v.sto[i].data);
  free(v.sto);
  free(v.pool);
  free(v.stack);
  free(v.memo);
  free(pkl);
  if (v.zip) zip_discard(v.zip);
  return rc;
}

static int map_file(const char *path, void **map, size_t *len) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return blip_err_set(BLIP_EMISSING, "%s: cannot open", path);
  struct stat sb;
  if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
    close(fd);
    return blip_err_set(BLIP_EIO, "%s: not a regular file", path);
  }
  *len = (size_t)sb.st_size;
  *map = *len ? mmap(NULL, *len, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
  close(fd);
  if (*len && *map == MAP_FAILED) return blip_err_set(BLIP_EIO, "%s: mmap failed", path);
  return BLIP_OK;
}

int blip_pt_load(const char *path, blip_st **out) {
  void *map = NULL;
  size_t len = 0;
  int rc = map_file(path, &map, &len);
  if (rc) return rc;
  rc = blip_pt_parse(map, len, out);
  if (map) munmap(map, len);
  return rc ? blip_err_wrap(rc, "%s", path) : BLIP_OK;
}

int blip_pt_open_weights(const char *path, blip_st **out) {
  unsigned char magic[4] = {0};
  FILE *f = fopen(path, "rb");
  size_t got = f ? fread(magic, 1, 4, f) : 0;
  if (f) fclose(f);
  if (got == 4 && !memcmp(magic, "PK\3\4", 4)) return blip_pt_load(path, out);
  if (got >= 2 && magic[0] == 0x80 && magic[1] <= 5)
    return blip_err_set(BLIP_EUNSUPPORTED, "%s: legacy torch.save format (before PyTorch 1.6): re-save it with a newer PyTorch", path);
  return blip_st_open(path, out);
}
