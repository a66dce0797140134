#!/bin/bash
# test_repair: damaged indexes. Each case damages one part of a copy of a good
# index (bytes flipped in vectors.faiss's vector data, garbage in one token
# record's payload, tokens.bin truncated, deleted or with a bad header, a
# corrupt SQLite b-tree page) and checks that
#   - blip-index --check exits 1 and names the damaged part;
#   - queries still return the right photos with the right scores (damaged
#     tokens recomputed from the files, a damaged cache replaced by SQLite's
#     vectors) and say so once, with the way to repair;
#   - --repair, or the next ordinary run, fixes the derived files with model
#     work ("embedded" in the --json summary) for the damaged photos only.
# Also: 20 identical photos sharing one feature pass --check, and an index
# of the previous format (schema 1, no checksums) is upgraded in place.
set -u
BIN=$(cd "${BLIP_BIN:-build}" && pwd)
DATA=$(cd "${BLIP_TEST_DATA:-tests/data}" && pwd)
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_repair.XXXXXX)
trap 'rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
idx() { local db=$1; shift; "$BIN/blip-index" --db "$db" --model "$MODEL" --json "$@"; }
Q="a dog running on a beach"
qry() { local db=$1; shift; "$BIN/blip-query" --db "$db" --model "$MODEL" --json -n 30 "$@"; }

# The damage and the checks of results, in Python (standard library only).
cat >"$T/dmg.py" <<'PY'
import json, os, sqlite3, struct, sys

def db(d):
    return sqlite3.connect(os.path.join(d, "index.sqlite"))

def row_id(d, name):
    return db(d).execute("SELECT id FROM images WHERE path LIKE ?", ("%/" + name,)).fetchone()[0]

def stride(d):
    with open(os.path.join(d, "tokens.bin"), "rb") as f:
        return struct.unpack("<Q", f.read(32)[24:32])[0]

def patch(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)

cmd, d = sys.argv[1], sys.argv[2]
if cmd == "faiss":  # overwrite 4 floats of one image's vector inside vectors.faiss
    feat = db(d).execute("SELECT feat FROM images WHERE id=?", (row_id(d, sys.argv[3]),)).fetchone()[0]
    p = os.path.join(d, "vectors.faiss")
    off = open(p, "rb").read().find(feat)
    assert off > 0, "feature not found in vectors.faiss"
    patch(p, off + 8, struct.pack("<4f", 7e23, -3e22, 1e20, 5.5))
elif cmd == "record":  # garbage in a token record's payload (its {id, fingerprint} tag intact)
    off = 64 + row_id(d, sys.argv[3]) * stride(d) + 16
    patch(os.path.join(d, "tokens.bin"), off + 40, bytes((i * 37 + 11) & 255 for i in range(64)))
elif cmd == "truncate":  # keep the header and the first N ids' records
    os.truncate(os.path.join(d, "tokens.bin"), 64 + (int(sys.argv[3]) + 1) * stride(d))
elif cmd == "header":
    patch(os.path.join(d, "tokens.bin"), 0, b"XXXXXXXX")
elif cmd == "btree":  # break the page of the images_size index: its page type byte
    c = db(d)
    root = c.execute("SELECT rootpage FROM sqlite_master WHERE name='images_size'").fetchone()[0]
    psz = c.execute("PRAGMA page_size").fetchone()[0]
    c.close()
    assert not os.path.exists(os.path.join(d, "index.sqlite-wal")) or os.path.getsize(os.path.join(d, "index.sqlite-wal")) == 0
    patch(os.path.join(d, "index.sqlite"), (root - 1) * psz, b"\x07")
elif cmd == "id":
    print(row_id(d, sys.argv[3]))
elif cmd == "same":  # same RESULT BASE RAW TOL_REPAIRED [RECOMPUTED_ID...]: same photos, same scores
    res, base, raw = (json.load(open(p)) for p in sys.argv[2:5])
    tol = float(sys.argv[5])
    recomputed = {int(x) for x in sys.argv[6:]}
    b = {h["id"]: h for h in base}
    r = {h["path"]: h for h in raw}
    assert sorted(h["id"] for h in res) == sorted(b), ("photos", [h["path"] for h in res])
    worst = 0
    for h in res:
        # recomputed tokens are the model's f32 ones: the index without a rerank store scores them
        want = r[h["path"]]["score"] if h["id"] in recomputed else b[h["id"]]["score"]
        d = abs(h["score"] - want)
        worst = max(worst, d)
        assert d <= (1e-5 if h["id"] in recomputed else tol), (h, want)
        assert abs(h["cosine"] - b[h["id"]]["cosine"]) < 1e-6, ("cosine", h, b[h["id"]])
    print("  scores vs the intact index: max|diff| %.2e" % worst)
PY
dmg() { python3 "$T/dmg.py" "$@"; }
# same NAME RESULT TOL [RECOMPUTED_ID...]
same() { local name=$1 res=$2 tol=$3; shift 3; if dmg same "$res" "$T/base.json" "$T/raw.json" "$tol" "$@"; then ok; else bad "$name: results differ"; fi; }
# check_fails NAME DB PART: --check exits 1 and names PART
check_fails() {
  "$BIN/blip-index" --db "$2" --check >"$T/chk.out" 2>"$T/chk.err"
  local rc=$?
  [[ $rc == 1 ]] && grep -q -- "$3" "$T/chk.err" && ok || bad "$1: --check rc $rc, want 1 naming $3: $(cat "$T/chk.out" "$T/chk.err")"
}
check_ok() {
  "$BIN/blip-index" --db "$2" --check >"$T/chk.out" 2>&1 && ok || bad "$1: --check after repair: $(cat "$T/chk.out")"
}
# session NAME DB PART: two queries in one --stdin session; both answer, the note on PART comes once
session() {
  printf '%s\n%s\n' "$Q" "a red car" | "$BIN/blip-query" --db "$2" --model "$MODEL" --json -n 30 --stdin \
    >"$T/sess.out" 2>"$T/sess.err"
  local rc=$? n
  n=$(grep -c -- "$3" "$T/sess.err")
  [[ $rc == 0 && $(wc -l <"$T/sess.out") == 2 && $n == 1 ]] && grep -q -- "--repair" "$T/sess.err" && ok ||
    bad "$1: --stdin session rc $rc, $n notes on $3: $(cat "$T/sess.err")"
}

L=$T/lib
"$BIN/gen_photos" "$L" 8 --size 64x64 >/dev/null || bad "gen_photos"
out=$(idx "$T/db0" "$L") || bad "index"
expect index "$out" added=8 embedded=8
"$BIN/blip-index" --db "$T/raw" --model "$MODEL" --no-rerank-store "$L" 2>/dev/null || bad "index raw"
qry "$T/db0" "$Q" >"$T/base.json" || bad "base query"
qry "$T/raw" "$Q" >"$T/raw.json" || bad "raw query"
check_ok pristine "$T/db0"
fresh() { rm -rf "$T/$1"; cp -a "$T/db0" "$T/$1"; }

# ---- vectors.faiss: vector data damaged (queries scored 7e+23) ----
fresh fx
dmg faiss "$T/fx" img00003.jpg
check_fails faiss "$T/fx" vectors.faiss
qry "$T/fx" "$Q" >"$T/fx.json" 2>"$T/fx.err" || bad "faiss: query exit $?"
same faiss "$T/fx.json" 1e-5
session faiss "$T/fx" vectors.faiss
cp "$T/fx/vectors.faiss" "$T/fx-damaged.faiss"
out=$(idx "$T/fx" "$L") || bad "faiss: next run exit"
expect faiss-run "$out" unchanged=8 embedded=0
cmp -s "$T/fx/vectors.faiss" "$T/fx-damaged.faiss" && bad "faiss: next run kept the damaged cache" || ok
check_ok faiss "$T/fx"
fresh fx2
dmg faiss "$T/fx2" img00005.jpg
out=$(idx "$T/fx2" --repair) || bad "faiss: --repair exit"
expect faiss-repair "$out" embedded=0
check_ok faiss-repair "$T/fx2"
qry "$T/fx2" "$Q" >"$T/fx2.json" 2>"$T/fx2.err" || bad "faiss: query after repair"
same faiss-repaired "$T/fx2.json" 1e-5
[[ ! -s $T/fx2.err ]] && ok || bad "faiss: notes after repair: $(cat "$T/fx2.err")"

# ---- one token record with garbage in its payload (scores changed silently) ----
fresh rec
id=$(dmg id "$T/rec" img00002.jpg)
dmg record "$T/rec" img00002.jpg
check_fails record "$T/rec" tokens.bin
grep -q "img00002.jpg" "$T/chk.err" && ok || bad "record: --check does not name the photo: $(cat "$T/chk.err")"
qry "$T/rec" "$Q" >"$T/rec.json" 2>"$T/rec.err" || bad "record: query exit $?"
same record "$T/rec.json" 1e-5 "$id"
session record "$T/rec" tokens.bin
out=$(idx "$T/rec" --repair) || bad "record: --repair exit"
expect record-repair "$out" repaired=1 embedded=1
check_ok record "$T/rec"
qry "$T/rec" "$Q" >"$T/rec2.json" 2>"$T/rec2.err" || bad "record: query after repair"
same record-repaired "$T/rec2.json" 2e-3 # the rewritten record: int8 of a batch-1 forward pass
[[ ! -s $T/rec2.err ]] && ok || bad "record: notes after repair: $(cat "$T/rec2.err")"

# a damaged record whose photo cannot be read cannot be recomputed: the record is given up, said so
fresh rec3
dmg record "$T/rec3" img00006.jpg
mv "$L/img00006.jpg" "$T/away.jpg"
out=$(idx "$T/rec3" --repair 2>"$T/rec3.err") || bad "unreadable: --repair exit"
mv "$T/away.jpg" "$L/img00006.jpg"
expect unreadable "$out" repaired=0 embedded=0
grep -q "1 token records could not be recomputed" "$T/rec3.err" && ok || bad "unreadable: $(cat "$T/rec3.err")"
check_ok unreadable "$T/rec3"

# ---- tokens.bin truncated, deleted, or with a bad header ----
# (behind a damaged header the records that pass their tag and checksum are kept: 1 of 8 lost)
for kind in truncate delete header header-only; do
  fresh tb
  case $kind in
  truncate) dmg truncate "$T/tb" 3; first=4 lost=5 ;;
  delete) rm "$T/tb/tokens.bin"; first=1 lost=8 ;;
  header) dmg header "$T/tb"; dmg record "$T/tb" img00005.jpg; first=$(dmg id "$T/tb" img00005.jpg) lost=1 ;;
  header-only) dmg header "$T/tb"; first=0 lost=0 ;;
  esac
  recomputed=$(sqlite3 "$T/tb/index.sqlite" "SELECT id FROM images WHERE id >= $first AND id < $first + $lost")
  check_fails "tokens-$kind" "$T/tb" tokens.bin
  qry "$T/tb" "$Q" >"$T/tb.json" 2>"$T/tb.err" || bad "tokens-$kind: query exit $? $(cat "$T/tb.err")"
  same "tokens-$kind" "$T/tb.json" 1e-5 $recomputed
  session "tokens-$kind" "$T/tb" tokens.bin
  out=$(idx "$T/tb" "$L") || bad "tokens-$kind: next run exit"
  expect "tokens-$kind-run" "$out" unchanged=8 repaired=$lost embedded=$lost
  check_ok "tokens-$kind" "$T/tb"
  qry "$T/tb" "$Q" >"$T/tb2.json" 2>"$T/tb2.err" || bad "tokens-$kind: query after repair"
  same "tokens-$kind-repaired" "$T/tb2.json" 2e-3
done

# ---- index.sqlite: a corrupt b-tree page (an index's) that PRAGMA quick_check reports ----
fresh sq
dmg btree "$T/sq"
check_fails sqlite "$T/sq" index.sqlite
qry "$T/sq" "$Q" >"$T/sq.json" 2>"$T/sq.err" || bad "sqlite: query exit $? $(cat "$T/sq.err")"
same sqlite "$T/sq.json" 1e-5
"$BIN/gen_photos" "$T/extra" 1 --size 64x64 --seed 9 >/dev/null
idx "$T/sq" "$T/extra" >/dev/null 2>"$T/sq-run.err" # a new photo updates the damaged b-tree
rc=$?
[[ $rc == 1 ]] && grep -q -- "--repair" "$T/sq-run.err" && ok || bad "sqlite: a run on the damage: rc $rc $(cat "$T/sq-run.err")"
out=$(idx "$T/sq" --repair 2>"$T/sq-rep.err") || bad "sqlite: --repair exit $(cat "$T/sq-rep.err")"
expect sqlite-repair "$out" embedded=0
check_ok sqlite "$T/sq"
out=$(idx "$T/sq" "$L" "$T/extra") || bad "sqlite: run after repair"
expect sqlite-run "$out" unchanged=8 added=1 embedded=1

# ---- 20 identical photos share one feature: each is still found, --check passes ----
mkdir -p "$T/dup"
"$BIN/gen_photos" "$T/dup" 3 --size 64x64 --seed 5 >/dev/null
for i in $(seq -w 1 20); do cp "$L/img00000.jpg" "$T/dup/copy$i.jpg"; done
out=$(idx "$T/dbdup" --batch 1 "$T/dup") || bad "dup: index"
expect dup "$out" added=23
n=$(sqlite3 "$T/dbdup/index.sqlite" "SELECT count(DISTINCT feat) FROM images WHERE path LIKE '%/copy%'")
[[ $n == 1 ]] && ok || bad "dup: the copies have $n distinct features (the test needs 1)"
check_ok dup "$T/dbdup"
qry "$T/dbdup" --rerank 0 "$Q" >"$T/dup.json" || bad "dup: query"
n=$(grep -o '/copy[0-9]*\.jpg' "$T/dup.json" | sort -u | wc -l)
[[ $n == 20 ]] && ok || bad "dup: $n of 20 copies found"

# ---- upgrade: an index of the previous format (schema 3, no checksums, BLIPFX01 cache) ----
fresh up
python3 - "$T/up" <<'PY' || bad "downgrade"
import os, sqlite3, struct, sys
d = sys.argv[1]
c = sqlite3.connect(os.path.join(d, "index.sqlite"))
cols = [r[1] for r in c.execute("PRAGMA table_info(images)")]
assert "tok_sum" in cols, cols
c.execute("ALTER TABLE images DROP COLUMN tok_sum")
c.execute("DELETE FROM meta WHERE key='tok_sums'")  # the meta of a version-3 index
c.execute("PRAGMA user_version=3")
c.commit()
c.close()
p = os.path.join(d, "vectors.faiss")
b = open(p, "rb").read()
assert b[:8] == b"BLIPFX02", b[:8]
gen, n, trained, _sum = struct.unpack("<4q", b[8:40])
open(p, "wb").write(b"BLIPFX01" + struct.pack("<3q", gen, n, trained) + b[40:])
PY
qry "$T/up" "$Q" >/dev/null 2>"$T/up.err" # readers need the current schema: they say how to get it
rc=$?
[[ $rc == 2 ]] && grep -q "run blip-index once" "$T/up.err" && ok || bad "upgrade: query on the old format: rc $rc $(cat "$T/up.err")"
out=$(idx "$T/up" "$L") || bad "upgrade: run"
expect upgrade "$out" unchanged=8 embedded=0
[[ $(sqlite3 "$T/up/index.sqlite" "PRAGMA user_version") == 4 ]] && ok || bad "upgrade: schema version"
n=$(sqlite3 "$T/up/index.sqlite" "SELECT count(*) FROM images WHERE has_tokens=1 AND tok_sum IS NULL")
[[ $n == 0 ]] && ok || bad "upgrade: $n records without a checksum"
[[ $(head -c 8 "$T/up/vectors.faiss") == BLIPFX02 ]] && ok || bad "upgrade: cache format"
check_ok upgrade "$T/up"
qry "$T/up" "$Q" >"$T/up.json" || bad "upgrade: query"
same upgrade "$T/up.json" 1e-5
dmg record "$T/up" img00004.jpg
check_fails upgrade-record "$T/up" tokens.bin

tally
