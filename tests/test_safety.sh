#!/bin/bash
# test_safety: output and input safety of the tools (issue 10, section 5), end
# to end on generated photos and the tiny model.
# - --json never drops a key: a non-UTF-8 file name (path + exact path_b64), a
#   NaN score (null), an invalid UTF-8 --stdin line (query + query_b64);
# - names with ESC, tab and newline are escaped in the table, messages,
#   --dry-run, --errors and --dump (one TSV row per image); --paths -0;
# - bad option values exit 2 with a message naming the option, empty and
#   punctuation-only queries are refused; a FIFO as an image does not hang;
# - SIGXFSZ under ulimit -f, long paths and a FIFO root are reported;
# - --precision must be the index's; --under works through a symlinked folder;
# - messages: ENOSPC at start-up, a real EIO, a failed final cache write
#   (strace fault injection), unusual TIFFs, a half-created index.
set -u
BIN=$(cd "${BLIP_BIN:-build}" && pwd)
DATA=$(cd "${BLIP_TEST_DATA:-tests/data}" && pwd)
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_safety.XXXXXX)
trap 'rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
py() { local name=$1 code=$2; shift 2; if python3 -c "$code" "$@"; then ok; else bad "$name"; fi; }
# rc2 NAME PATTERN CMD...: CMD exits 2 within 60 s and says PATTERN on stderr
rc2() {
  local name=$1 pat=$2; shift 2
  timeout 60 "$@" >/dev/null 2>"$T/rc2.err"; local rc=$?
  [[ $rc == 2 ]] && grep -q -- "$pat" "$T/rc2.err" && ok || bad "$name: rc $rc: $(head -c 300 "$T/rc2.err")"
}

L=$T/lib
mkdir -p "$L/real" "$T/ext"
"$BIN/gen_photos" "$L/real" 3 --size 64x64 >/dev/null || bad "gen_photos"
"$BIN/gen_photos" "$T/ext" 2 --size 48x48 --seed 3 >/dev/null
ESCNAME=$(printf 'bad\xff\x1b]0;pwn\x07\x1b[2J.jpg')
TABNAME=$(printf 'tab\there\nnewline.jpg')
cp "$L/real/img00000.jpg" "$L/real/$ESCNAME"
cp "$L/real/img00001.jpg" "$L/real/$TABNAME"
ln -s "$T/ext" "$L/linked"      # a symlinked folder inside the library
N=7
"$BIN/blip-index" --db "$T/db" --model "$MODEL" --precision f32 "$L" 2>"$T/idx.err" || bad "index: $(cat "$T/idx.err")"
Q=("$BIN/blip-query" --db "$T/db" --model "$MODEL")
q() { "${Q[@]}" "$@"; }
QUERY="a dog running on a beach"

# ---- --json: every key, and the exact bytes of every name ----
q --json -n $N "$QUERY" >"$T/all.json" || bad "json query"
q --paths -0 -n $N "$QUERY" >"$T/all.nul" || bad "paths -0"
py "--json keeps path for a non-UTF-8 name; path_b64 is exact; -0 gives the same bytes" '
import base64, json, sys
r = json.load(open(sys.argv[1]))
keys = {"rank", "id", "path", "path_b64", "taken_at", "mtime", "caption", "score", "itm_prob", "itm_logit", "cosine"}
assert len(r) == 7 and all(set(h) == keys for h in r), [sorted(h) for h in r]
exact = [base64.b64decode(h["path_b64"]) if h["path_b64"] is not None else h["path"].encode() for h in r]
bad = [h for h in r if h["path_b64"] is not None]
assert len(bad) == 1 and "\ufffd" in bad[0]["path"], bad
assert exact[r.index(bad[0])].endswith(b"bad\xff\x1b]0;pwn\x07\x1b[2J.jpg")
assert any(e.endswith(b"tab\there\nnewline.jpg") for e in exact)
nul = open(sys.argv[2], "rb").read()
assert nul.endswith(b"\0") and nul[:-1].split(b"\0") == exact, (nul, exact)
' "$T/all.json" "$T/all.nul"
# xargs -0 hands every name over whole (the README example)
n=$(q --paths -0 -n $N "$QUERY" | xargs -0 -n1 stat -c %s 2>/dev/null | wc -l)
[[ $n == $N ]] && ok || bad "xargs -0 got $n of $N files"
rc2 "-0 with --json" "-0 goes with --paths" "${Q[@]}" --json -0 "$QUERY"

# a NaN score (weights with a NaN in the ITM head) keeps its keys, as null
mkdir -p "$T/nan"
cp "$MODEL/config.json" "$MODEL/vocab.txt" "$MODEL/model.safetensors" "$T/nan/"
python3 - "$T/nan/model.safetensors" <<'PY' || bad "poison"
import json, struct, sys
import testlib
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
h = testlib.header(p)
s, e = h["itm_head.bias"]["data_offsets"]
assert h["itm_head.bias"]["dtype"] == "F32"
n = struct.unpack("<Q", b[:8])[0]
b[8 + n + s:8 + n + e] = struct.pack("<f", float("nan")) * ((e - s) // 4)
open(p, "wb").write(b)
PY
"$BIN/blip-index" --db "$T/db-nan" --model "$T/nan" "$L/real" 2>/dev/null || bad "index nan model"
"$BIN/blip-query" --db "$T/db-nan" --model "$T/nan" --json -n 3 "$QUERY" >"$T/nan.json" || bad "nan query"
py "--json: a NaN score is null, its keys stay" '
import json, sys
r = json.load(open(sys.argv[1]))
assert len(r) == 3 and all("score" in h and h["score"] is None and h["itm_prob"] is None for h in r), r
assert all(isinstance(h["cosine"], float) for h in r), r
' "$T/nan.json"

"$BIN/blip-embed" --model "$T/nan" --image "$L/real/img00000.jpg" --text "a dog" --itm --json >"$T/nan-embed.json" ||
  bad "nan embed"
py "blip-embed --json: NaN logits are null, none dropped" '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["itm_logits"] == [[[None, None]]] and len(j["itc"][0]) == 1, j["itm_logits"]
' "$T/nan-embed.json"

# --stdin: an invalid UTF-8 line keeps its query key; a line without words is refused, the session goes on
printf 'red\xff\xfe car\n...\n%s\n' "$QUERY" | q --stdin --json -n 2 >"$T/stdin.jsonl" 2>"$T/stdin.err"
py "--stdin --json: query, query_b64, error on every line" '
import base64, json, sys
l = [json.loads(x) for x in open(sys.argv[1])]
assert len(l) == 3 and all(set(x) == {"query", "query_b64", "truncated", "error", "results"} for x in l), l
assert base64.b64decode(l[0]["query_b64"]) == b"red\xff\xfe car" and l[0]["error"] is None and len(l[0]["results"]) == 2
assert l[1]["query"] == "..." and l[1]["query_b64"] is None and "no words" in l[1]["error"] and l[1]["results"] == []
assert l[2]["query"] == "a dog running on a beach" and len(l[2]["results"]) == 2
' "$T/stdin.jsonl"

# ---- terminals and TSV: escaped names ----
# --paths on a terminal (a pty from script(1)) escapes; into a pipe it gives names as they are
script -qec "$(printf '%q ' "${Q[@]}" --paths -n $N "$QUERY")" /dev/null </dev/null >"$T/paths-tty" 2>&1
grep -aq 'bad\\xff\\x1b\]0;pwn\\x07' "$T/paths-tty" && ! grep -aq $'\x1b' "$T/paths-tty" && ok ||
  bad "--paths on a terminal not escaped: $(cat -v "$T/paths-tty")"
q -n $N "$QUERY" >"$T/table" || bad "table"
printf 'a dog\n' | q --stdin -n 1 >"$T/table-stdin" || bad "table stdin"
py "table: names escaped, one line per hit" '
import sys
t = open(sys.argv[1], "rb").read()
assert b"\x1b" not in t and b"\x07" not in t and b"\xff" not in t, t
lines = t.decode().splitlines()
assert len(lines) == 8, lines
assert any(l.endswith("bad\\xff\\x1b]0;pwn\\x07\\x1b[2J.jpg") for l in lines), lines
assert any(l.endswith("tab\\there\\nnewline.jpg") for l in lines), lines
' "$T/table"
"$BIN/blip-index" --db "$T/db" --dump >"$T/dump" || bad "dump"
py "--dump: one 4-field TSV row per image, names escaped" '
import sys
rows = open(sys.argv[1], "rb").read().decode().split("\n")
assert rows[-1] == "" and len(rows) == 8, rows
assert all(len(r.split("\t")) == 4 for r in rows[:-1]), [r.split("\t")[0] for r in rows[:-1]]
assert "\x1b" not in "".join(rows)
' "$T/dump"
cp "$L/real/img00002.jpg" "$L/real/$(printf 'new\x1b[31m.jpg')"
chmod 000 "$L/real/img00002.jpg"   # (root reads it anyway: only the escaping matters here)
"$BIN/blip-index" --db "$T/db" --model "$MODEL" --dry-run "$L" >"$T/dry" 2>&1 || bad "dry run"
chmod 644 "$L/real/img00002.jpg"
grep -q 'new\\x1b\[31m.jpg' "$T/dry" && ! grep -q $'\x1b' "$T/dry" && ok || bad "dry run not escaped: $(cat -v "$T/dry")"
# a corrupt image with an ESC name: the --errors row and its JSON twin
printf 'not a jpeg' >"$L/real/$(printf 'broken\x1b]2;x\x07.jpg')"
"$BIN/blip-index" --db "$T/db" --model "$MODEL" --errors "$L" >"$T/errors" 2>"$T/errors.err" || bad "errors run"
grep -q 'broken\\x1b]2;x\\x07.jpg	' "$T/errors" && ! grep -q $'\x1b' "$T/errors" "$T/errors.err" && ok ||
  bad "--errors not escaped: $(cat -v "$T/errors" "$T/errors.err")"
"$BIN/blip-index" --db "$T/db" --model "$MODEL" --errors --json "$L" >"$T/errors.json" 2>/dev/null
py "--errors --json: errors and skipped_paths arrays, exact names" '
import base64, json, sys
j = json.load(open(sys.argv[1]))
e = j["errors"]
assert j["skipped"] == 0 and j["skipped_paths"] == [] and len(e) == 1, j
assert set(e[0]) == {"path", "path_b64", "error"} and e[0]["path"].endswith("broken\x1b]2;x\x07.jpg"), e
' "$T/errors.json"

# ---- bad values: exit 2, a message naming the option ----
rc2 "-n 4294967297" "-n: 4294967297 is out of range" "${Q[@]}" -n 4294967297 "$QUERY"
rc2 "--rerank ''" "--rerank: '' is not a whole number" "${Q[@]}" --rerank '' "$QUERY"
rc2 "--threshold ''" "--threshold: '' is not a number" "${Q[@]}" --threshold '' "$QUERY"
rc2 "--threads abc" "--threads: 'abc' is not a whole number" "${Q[@]}" --threads abc "$QUERY"
rc2 "--threads -5" "--threads: -5 is out of range" "${Q[@]}" --threads -5 "$QUERY"
rc2 "--threads 100000" "--threads: 100000 is out of range" "${Q[@]}" --threads 100000 "$QUERY"
rc2 "--after 2024-02-30" "--after: bad date '2024-02-30'" "${Q[@]}" --after 2024-02-30 "$QUERY"
rc2 "--before 2023-02-29" "--before: bad date" "${Q[@]}" --before 2023-02-29 "$QUERY"
q --before 2024-02-29 --json "$QUERY" >/dev/null 2>&1; [[ $? == 1 ]] && ok || bad "leap day refused" # 1: no photo
rc2 "empty query" "no words to search for" "${Q[@]}" ""
rc2 "punctuation-only query" "no words to search for" "${Q[@]}" '?!... ,;'
rc2 "blip-index --threads abc" "--threads: 'abc'" "$BIN/blip-index" --db "$T/db" --model "$MODEL" --threads abc "$L"
rc2 "blip-index --threads 100000" "--threads: 100000" "$BIN/blip-index" --db "$T/db" --model "$MODEL" --threads 100000 "$L"
rc2 "blip-index --batch 1x" "--batch: '1x'" "$BIN/blip-index" --db "$T/db" --model "$MODEL" --batch 1x "$L"
rc2 "blip-embed --threads 100000" "--threads: 100000" "$BIN/blip-embed" --model "$MODEL" --text a --threads 100000
rc2 "blip-embed --max-len ''" "--max-len: ''" "$BIN/blip-embed" --model "$MODEL" --text a --max-len ''
rc2 "blip-eval --threads abc" "--threads: 'abc'" "$BIN/blip-eval" --model "$MODEL" --ann x.json --images . --threads abc
rc2 "gen_photos N" "N: '3x'" "$BIN/gen_photos" "$T/g" 3x

# ---- a FIFO named like an image: refused, not waited on ----
mkfifo "$T/x.jpg"
rc2 "blip-query --image FIFO" "not a regular file (a FIFO)" "${Q[@]}" --image "$T/x.jpg"
rc2 "blip-embed --image FIFO" "not a regular file (a FIFO)" "$BIN/blip-embed" --model "$MODEL" --image "$T/x.jpg"

# ---- precision: a query runs at the index's precision ----
rc2 "--precision int8 on an f32 index" "built with --precision f32, not int8" "${Q[@]}" --precision int8 "$QUERY"
q --precision f32 --json -n 1 "$QUERY" >/dev/null && ok || bad "--precision f32 on an f32 index"

# ---- --under a symlinked folder inside the library ----
q --paths --under "$L/linked" -n $N "$QUERY" >"$T/under" 2>"$T/under.err"
[[ $(grep -c "^$L/linked/" "$T/under") == 2 && $(wc -l <"$T/under") == 2 ]] && ok ||
  bad "--under symlinked folder: $(cat "$T/under" "$T/under.err")"
(cd "$L" && "$BIN/blip-query" --db "$T/db" --model "$MODEL" --paths --under ./linked/../linked -n $N "$QUERY") >"$T/under2"
cmp -s "$T/under" "$T/under2" && ok || bad "--under relative with ..: $(cat "$T/under2")"

# ---- skipped paths are reported: a FIFO root, a path of 4096+ bytes, SIGXFSZ ----
D=$T/deep
mkdir -p "$D"
(cd "$D" && for i in $(seq 20); do d=$(printf 'd%.0s' $(seq 220)); mkdir "$d" && cd "$d"; done &&
  cp "$L/real/img00000.jpg" ./deep.jpg)
"$BIN/blip-index" --db "$T/db-skip" --model "$MODEL" --json --errors "$D" "$T/x.jpg" >"$T/skip.json" 2>"$T/skip.err" ||
  bad "skip run"
py "FIFO root and a 4096-byte path: counted, listed, said" '
import json, sys
j = json.load(open(sys.argv[1])); err = open(sys.argv[2]).read()
assert j["skipped"] == 2 and j["added"] == 0, j
why = sorted(s["error"] for s in j["skipped_paths"])
assert why == ["not a regular file or a folder", "path of 4096 bytes or more (PATH_MAX)"], why
assert err.count("skipping") == 2 and "x.jpg: not a regular file" in err, err
' "$T/skip.json" "$T/skip.err"
(ulimit -f 1; exec "$BIN/blip-index" --db "$T/db-fsz" --model "$MODEL" "$L/real") >/dev/null 2>"$T/fsz.err"; rc=$?
[[ $rc == 1 ]] && grep -q "file size limit reached (EFBIG" "$T/fsz.err" && ok || bad "ulimit -f: rc $rc $(cat "$T/fsz.err")"

# ---- messages that say what happened (strace fault injection) ----
S=(strace -f -qq -o /dev/null)
# (SQLite's -shm file: SQLite itself calls this one a plain "disk I/O error")
"${S[@]}" -P "$T/db-nospc/index.sqlite-shm" -e trace=pwrite64 -e inject=pwrite64:error=ENOSPC "$BIN/blip-index" \
  --db "$T/db-nospc" --model "$MODEL" "$L/real" >/dev/null 2>"$T/nospc.err"; rc=$?
[[ $rc == 1 ]] && grep -q "disk full (ENOSPC) while opening the index at $T/db-nospc" "$T/nospc.err" && ok ||
  bad "ENOSPC at start-up: rc $rc $(cat "$T/nospc.err")"
"${S[@]}" -e trace=pwrite64 -e inject=pwrite64:error=EIO "$BIN/blip-index" --db "$T/db-eio" --model "$MODEL" \
  "$L/real" >/dev/null 2>"$T/eio.err"; rc=$?
[[ $rc == 1 ]] && grep -q "I/O error while opening the index" "$T/eio.err" && ! grep -qi "full" "$T/eio.err" && ok ||
  bad "EIO called a full disk: rc $rc $(cat "$T/eio.err")"
# EIO at a commit after start-up (the WAL's sync), where SQLite keeps no errno
"${S[@]}" -P "$T/db-eio2/index.sqlite-wal" -e trace=fdatasync -e inject=fdatasync:error=EIO:when=3+ "$BIN/blip-index" \
  --db "$T/db-eio2" --model "$MODEL" "$L/real" >/dev/null 2>"$T/eio2.err"; rc=$?
[[ $rc == 1 ]] && grep -q "I/O error while .* the index at .*(COMMIT)" "$T/eio2.err" && ! grep -qi "full" "$T/eio2.err" && ok ||
  bad "EIO at commit called a full disk: rc $rc $(cat "$T/eio2.err")"
# the final vectors.faiss write fails: every batch is committed, and the message says so
"${S[@]}" -e trace=rename,renameat,renameat2 -e inject=rename,renameat,renameat2:error=ENOSPC \
  "$BIN/blip-index" --db "$T/db-cache" --model "$MODEL" "$L/real" >/dev/null 2>"$T/cache.err"; rc=$?
n=$("$BIN/blip-index" --db "$T/db-cache" --dump | grep -c "	ok	")
[[ $rc == 1 && $n == 6 ]] && grep -q "every batch is committed" "$T/cache.err" && ! grep -q "not committed" "$T/cache.err" &&
  ok || bad "cache write: rc $rc, $n rows, $(cat "$T/cache.err")"

# ---- unusual but valid TIFFs are "unsupported", not "corrupt" ----
mkdir -p "$T/tif"
python3 - "$T/tif" "$L/real/img00000.jpg" <<'PY' || bad "tiff writer"
import struct, sys
def tiff(path, tags, blocks):
    out, offs = bytearray(b"II*\0\0\0\0\0"), []
    for b in blocks:
        offs.append(len(out)); out += b + b"\0" * (len(b) % 2)
    tags = sorted((t, ty, offs if v == "OFFS" else v) for t, ty, v in tags)
    ifd, fmt = len(out), {3: "H", 4: "I"}
    extra_at, body, extra = ifd + 2 + 12 * len(tags) + 4, bytearray(struct.pack("<H", len(tags))), bytearray()
    for t, ty, vals in tags:
        raw = struct.pack("<%d%s" % (len(vals), fmt[ty]), *vals)
        if len(raw) <= 4: body += struct.pack("<HHI", t, ty, len(vals)) + raw.ljust(4, b"\0")
        else: body += struct.pack("<HHII", t, ty, len(vals), extra_at + len(extra)); extra += raw
    out += body + b"\0\0\0\0" + extra
    struct.pack_into("<I", out, 4, ifd)
    open(path, "wb").write(out)
d, jpg = sys.argv[1], open(sys.argv[2], "rb").read()
ycc = bytes(v for i in range(64) for v in (100 + i % 8, 110, 120, 130, 90, 160))
tiff(d + "/ycbcr420.tif", [(256, 4, [16]), (257, 4, [16]), (258, 3, [8, 8, 8]), (259, 3, [1]), (262, 3, [6]),
     (273, 4, "OFFS"), (277, 3, [3]), (278, 4, [16]), (279, 4, [len(ycc)]), (284, 3, [1]), (530, 3, [2, 2])], [ycc])
tiles = [bytes((p * 80 + t * 20 + i) % 256 for i in range(256)) for p in range(3) for t in range(4)]
tiff(d + "/tiled-planar.tif", [(256, 4, [32]), (257, 4, [32]), (258, 3, [8, 8, 8]), (259, 3, [1]), (262, 3, [2]),
     (277, 3, [3]), (284, 3, [2]), (322, 4, [16]), (323, 4, [16]), (324, 4, "OFFS"), (325, 4, [256] * 12)], tiles)
tiff(d + "/ojpeg.tif", [(256, 4, [64]), (257, 4, [64]), (258, 3, [8, 8, 8]), (259, 3, [6]), (262, 3, [6]),
     (273, 4, "OFFS"), (277, 3, [3]), (278, 4, [64]), (279, 4, [len(jpg)]), (284, 3, [1]), (513, 4, "OFFS"),
     (514, 4, [len(jpg)])], [jpg])
PY
# (one decoding thread: libvips's error text is global, so parallel decodes may swap their words)
"$BIN/blip-index" --db "$T/db-tif" --model "$MODEL" --threads 1 --errors "$T/tif" >"$T/tif.err" 2>/dev/null || bad "tiff run"
[[ $(grep -c "unsupported image variant" "$T/tif.err") == 3 ]] && ! grep -q corrupt "$T/tif.err" && ok ||
  bad "unusual TIFFs: $(cat "$T/tif.err")"

# ---- a half-created index reads as empty, not as damaged ----
mkdir -p "$T/one" && cp "$L/real/img00000.jpg" "$T/one/"
# killed right after the first commit, before tokens.bin has its header
("${S[@]}" -P "$T/db-half/tokens.bin" -e trace=pwrite64 -e inject=pwrite64:signal=KILL \
  "$BIN/blip-index" --db "$T/db-half" --model "$MODEL" "$T/one"; true) >/dev/null 2>&1
[[ -f $T/db-half/tokens.bin && ! -s $T/db-half/tokens.bin ]] && ok || bad "setup: tokens.bin without a header"
rc2 "tokens.bin without its header" "is empty: run blip-index" "$BIN/blip-query" --db "$T/db-half" --model "$MODEL" "$QUERY"
"$BIN/blip-index" --db "$T/db-half" --model "$MODEL" --json "$T/one" 2>/dev/null | grep -q '"added":1' && ok ||
  bad "next run after the kill"
# a schema without its identity yet (the first transaction not committed)
"$BIN/blip-index" --db "$T/db-noid" --model "$MODEL" "$T/one" 2>/dev/null
python3 -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute("DELETE FROM meta"); c.commit()' \
  "$T/db-noid/index.sqlite"
rc2 "index without identity" "the index is empty (blip-index is creating it" "$BIN/blip-query" --db "$T/db-noid" \
  --model "$MODEL" "$QUERY"

tally
