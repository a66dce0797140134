#!/bin/bash
# test_index_cli: blip-index end to end on generated images and the tiny
# model: first index, no-op re-run, added / modified / touched / deleted /
# renamed files, corrupt files, hidden folders, symlink loops, excludes,
# dry run, model mismatch and --rebuild.
set -u
BIN=${BLIP_BIN:-build}
DATA=${BLIP_TEST_DATA:-tests/data}
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_index.XXXXXX)
trap 'rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
idx() { "$BIN/blip-index" --db "$T/db" --model "$MODEL" --json "$@"; }

L=$T/lib
mkdir -p "$L/a/b" "$L/.hidden" "$L/skipme"
"$BIN/gen_photos" "$L/a" 6 --size 96x72 >/dev/null || bad "gen_photos"
"$BIN/gen_photos" "$L/a/b" 4 --size 64x64 --seed 2 --ext png >/dev/null
"$BIN/gen_photos" "$L/.hidden" 2 --size 64x64 --seed 3 >/dev/null
"$BIN/gen_photos" "$L/skipme" 2 --size 64x64 --seed 4 >/dev/null
echo "not an image" > "$L/a/notes.txt"
ln -s .. "$L/a/b/loop"          # symlink loop back to lib/a
ln -s "$L/a/b" "$L/b-again"     # second link to a folder already walked

# first index: 10 images (hidden, excluded and non-image files skipped; the loop ends;
# files reached through links are recorded under their link-free path only)
out=$(idx --exclude skipme "$L" 2>"$T/err1") || bad "first run exit $?"
expect first "$out" added=10 failed=0 deleted=0
if grep -q "images/s" "$T/err1"; then bad "progress printed to a pipe"; else ok; fi
n=$("$BIN/blip-index" --db "$T/db" --dump | grep -c -e b-again -e loop)
[[ $n == 0 ]] && ok || bad "$n images recorded under a link path"
"$BIN/blip-index" --db "$T/db" --check >/dev/null && ok || bad "check after first run"

# re-run: no work at all
out=$(idx --exclude skipme "$L") || bad "rerun exit"
expect rerun "$out" added=0 updated=0 moved=0 deleted=0 unchanged=10 failed=0

# dry run reports but changes nothing
"$BIN/gen_photos" "$L/a" 1 --size 96x72 --seed 7 --start 50 >/dev/null
"$BIN/blip-index" --db "$T/db" --dump > "$T/dump0"
dr=$("$BIN/blip-index" --db "$T/db" --model "$MODEL" --exclude skipme --dry-run "$L" 2>/dev/null)
[[ $dr == "add $L/a/img00050.jpg" ]] && ok || bad "dry run output: $dr"
"$BIN/blip-index" --db "$T/db" --dump > "$T/dump1"
cmp -s "$T/dump0" "$T/dump1" && ok || bad "dry run changed the index"

# added file
out=$(idx --exclude skipme "$L")
expect added "$out" added=1 unchanged=10

# modified file (new content at the same path) and a touched file (same content, new mtime)
sleep 0.01
"$BIN/gen_photos" "$L/a" 1 --size 96x72 --seed 99 --start 2 >/dev/null
touch -d "2001-01-01" "$L/a/img00003.jpg"
out=$(idx --exclude skipme "$L")
expect modified "$out" updated=1 added=0 unchanged=10
old=$(grep "img00002.jpg" "$T/dump0" | cut -f4)
new=$("$BIN/blip-index" --db "$T/db" --dump | grep "img00002.jpg" | cut -f4)
[[ -n $new && $old != "$new" ]] && ok || bad "modified file kept its old feature"

# deleted file
rm "$L/a/img00001.jpg"
out=$(idx --exclude skipme "$L")
expect deleted "$out" deleted=1 added=0 unchanged=10

# renamed file keeps its vector without model work
feat=$("$BIN/blip-index" --db "$T/db" --dump | grep "/a/img00004.jpg" | cut -f2-)
mkdir -p "$L/renamed"
mv "$L/a/img00004.jpg" "$L/renamed/holiday.jpg"
out=$(idx --exclude skipme "$L")
expect renamed "$out" moved=1 added=0 deleted=0 updated=0
now=$("$BIN/blip-index" --db "$T/db" --dump | grep "/renamed/holiday.jpg" | cut -f2-)
[[ -n $feat && $feat == "$now" ]] && ok || bad "moved file lost its fingerprint/feature"

# corrupt files are reported, the others indexed
echo "garbage" > "$L/a/broken.jpg"
head -c 300 "$L/a/img00000.jpg" > "$L/a/truncated.jpg"
"$BIN/gen_photos" "$L/a" 1 --size 96x72 --seed 8 --start 60 >/dev/null
out=$(idx --exclude skipme --errors "$L")
expect corrupt "$out" added=1 failed=2
[[ $out == *"broken.jpg"* && $out == *"truncated.jpg"* ]] && ok || bad "--errors does not list both: $out"
out=$(idx --exclude skipme "$L")
expect corrupt-rerun "$out" added=0 failed=2 retried=0 unchanged=13 # failed: the whole index, on every run
"$BIN/blip-index" --db "$T/db" --check >/dev/null && ok || bad "check after edits"
n=$("$BIN/blip-index" --db "$T/db" --dump | grep -c "	ok	")
[[ $n == 11 ]] && ok || bad "searchable rows: $n, want 11"

# a different model is refused, the index untouched; --rebuild starts over
# (a different precision is refused the same way: tests/test_store.c, the engine only computes f32 so far)
M2=$T/other-model
mkdir -p "$M2"
cp "$MODEL/config.json" "$MODEL/vocab.txt" "$M2/"
cp "$MODEL/model-f16.safetensors" "$M2/model.safetensors"
"$BIN/blip-index" --db "$T/db" --model "$M2" "$L" 2>"$T/err2" >/dev/null
rc=$?
[[ $rc == 1 ]] && grep -q "rebuild" "$T/err2" && grep -q "model=" "$T/err2" && ok || bad "model mismatch: rc $rc $(cat "$T/err2")"
"$BIN/blip-index" --db "$T/db" --dump > "$T/dump2"
n=$(grep -c "	ok	" "$T/dump2")
[[ $n == 11 ]] && ok || bad "refused run changed the index"
out=$("$BIN/blip-index" --db "$T/db" --model "$M2" --json --rebuild --exclude skipme "$L")
expect rebuild "$out" added=11 failed=2 unchanged=0

# --no-rerank-store: features only; --help
"$BIN/gen_photos" "$T/small" 3 --size 64x64 >/dev/null
out=$("$BIN/blip-index" --db "$T/db3" --model "$MODEL" --json --no-rerank-store "$T/small")
expect norerank "$out" added=3
[[ ! -e $T/db3/tokens.bin ]] && ok || bad "tokens.bin written with --no-rerank-store"
"$BIN/blip-index" --help | grep -q -- "--no-rerank-store" && ok || bad "--help"
BLIPSEARCH_DB=$T/envdb "$BIN/blip-index" --model "$MODEL" "$T/small" 2>/dev/null && [[ -e $T/envdb/index.sqlite ]] && ok || bad "BLIPSEARCH_DB"

# SIGINT: the batch in the model is committed, then exit 130; the next run does the rest
mkdir -p "$T/many"
"$BIN/gen_photos" "$T/many" 300 --size 32x32 >/dev/null
# Deterministic: once a first batch is committed, stop the process, queue SIGINT, resume it.
# If a run finishes before it can be stopped (a very fast machine), start over.
for attempt in 1 2 3 4 5; do
  rm -rf "$T/dbi"
  "$BIN/blip-index" --db "$T/dbi" --model "$MODEL" --batch 1 --json "$T/many" > "$T/int.json" 2>/dev/null &
  pid=$!
  until [[ -s $T/dbi/index.sqlite ]] && (( $(sqlite3 "$T/dbi/index.sqlite" "select count(*) from images" 2>/dev/null || echo 0) > 0 )); do
    kill -0 $pid 2>/dev/null || break
    sleep 0.01
  done
  kill -STOP $pid 2>/dev/null && { kill -INT $pid; kill -CONT $pid; }
  wait $pid; rc=$?
  [[ $rc == 0 ]] || break # 0: it had already finished (even a zombie takes SIGSTOP)
done
int=$(cat "$T/int.json")
[[ $rc == 130 && $int == *'"interrupted":true'* ]] && ok || bad "SIGINT: rc $rc, $int"
"$BIN/blip-index" --db "$T/dbi" --check >/dev/null && ok || bad "check after SIGINT"
n=$("$BIN/blip-index" --db "$T/dbi" --dump | grep -c "	ok	")
expect sigint "$int" added=$n
out=$("$BIN/blip-index" --db "$T/dbi" --model "$MODEL" --json "$T/many")
expect after-sigint "$out" added=$((300 - n)) unchanged=$n

# a full disk (a file-size limit here) stops with a clear error; the index stays consistent
# and the next run carries on
(ulimit -f 256; exec "$BIN/blip-index" --db "$T/dbf" --model "$MODEL" --batch 8 "$T/many") >/dev/null 2>"$T/errf"
rc=$?
[[ $rc == 1 ]] && grep -q "file size limit reached (EFBIG" "$T/errf" && grep -q "index is consistent" "$T/errf" && ok || bad "full disk: rc $rc $(cat "$T/errf")"
"$BIN/blip-index" --db "$T/dbf" --check >/dev/null && ok || bad "check after full disk"
n=$("$BIN/blip-index" --db "$T/dbf" --dump | grep -c "	ok	")
(( n > 0 && n < 300 )) && ok || bad "full disk: $n images committed"
out=$("$BIN/blip-index" --db "$T/dbf" --model "$MODEL" --json "$T/many")
expect after-full "$out" added=$((300 - n)) unchanged=$n

# progress (done/total, rate, ETA) on a terminal only
script -qec "\"$BIN/blip-index\" --db \"$T/dbp\" --model \"$MODEL\" --batch 50 \"$T/many\"" /dev/null > "$T/tty.txt" 2>&1
grep -q "300/300 images.*images/s.*ETA" "$T/tty.txt" && ok || bad "no progress on a tty: $(head -c 300 "$T/tty.txt")"

# readers during indexing see a consistent snapshot (WAL + generation-tagged FAISS cache)
"$BIN/blip-index" --db "$T/dbc" --model "$MODEL" --batch 2 "$T/many" >/dev/null 2>&1 &
pid=$!
checks=0 seen=0
while kill -0 $pid 2>/dev/null; do
  if [[ -e $T/dbc/index.sqlite ]]; then
    out=$("$BIN/blip-index" --db "$T/dbc" --check --json 2>&1)
    if [[ $out == *'"ok": true'* ]]; then checks=$((checks + 1)); elif [[ $out != *"no index here"* ]]; then bad "concurrent check: $out"; fi
  fi
done
wait $pid || bad "indexer beside readers"
(( checks > 0 )) && ok || bad "no check ran while indexing"
echo "  $checks consistent checks while indexing"

# precision auto (the default): bf16 where the CPU has native bf16 dot products (cpuinfo flags as the
# independent oracle), else f32; an index built at another precision keeps it, --rebuild re-decides
want=f32
grep -qwE "avx512_bf16|amx_bf16" /proc/cpuinfo && grep -qw avx512f /proc/cpuinfo && want=bf16
prec() { sqlite3 "$1/index.sqlite" "select value from meta where key='precision'"; }
"$BIN/blip-index" --db "$T/dba" --model "$MODEL" "$L/a/b" >/dev/null 2>&1 || bad "auto: first run"
[[ $(prec "$T/dba") == "$want" ]] && ok || bad "auto chose $(prec "$T/dba"), want $want"
"$BIN/blip-index" --db "$T/dbk" --model "$MODEL" --precision int8 "$L/a/b" >/dev/null 2>&1 || bad "int8 index"
mkdir -p "$T/pb" && "$BIN/gen_photos" "$T/pb" 1 --size 64x64 --seed 9 >/dev/null
out=$("$BIN/blip-index" --db "$T/dbk" --model "$MODEL" --json "$L/a/b" "$T/pb" 2>&1) || bad "auto on an int8 index: $out"
expect auto-keeps "$out" added=1
[[ $(prec "$T/dbk") == int8 ]] && ok || bad "auto changed an int8 index to $(prec "$T/dbk")"
"$BIN/blip-index" --db "$T/dbk" --model "$MODEL" --rebuild "$L/a/b" >/dev/null 2>&1 || bad "auto --rebuild"
[[ $(prec "$T/dbk") == "$want" ]] && ok || bad "auto --rebuild chose $(prec "$T/dbk"), want $want"

tally
