#!/bin/bash
# crash-test: SIGKILL blip-index at random moments while it indexes a
# generated library (which also changes between runs: renames, deletions,
# new and corrupt files). After every kill:
#   - the index opens and `blip-index --check` passes (SQLite, FAISS cache and
#     rerank store agree; every committed image is found by its own feature);
#   - committed work is never lost: the number of searchable images whose
#     files still exist never goes down.
# At the end a clean run completes and the index equals one built without kills
# (same paths, fingerprints and states; features within 1e-5).
# Usage: scripts/crash-test.sh [IMAGES=300] [KILLS=60] [SEED]
#   env: BLIP_BIN (build dir, default ./build), BLIP_TEST_DATA (default tests/data)
set -u
N=${1:-300}
KILLS=${2:-60}
RANDOM=${3:-$$}
BIN=${BLIP_BIN:-build}
DATA=${BLIP_TEST_DATA:-tests/data}
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_crash.XXXXXX)
trap 'rm -rf "$T"' EXIT
L=$T/lib
fails=0
fail() { fails=$((fails + 1)); echo "FAIL: $*" >&2; }
# searchable images whose file still exists (a deletion in the library may
# legitimately remove rows; nothing else may)
count() {
  "$BIN/blip-index" --db "$T/db" --dump 2>/dev/null | awk -F'\t' '$3 == "ok" { print $1 }' |
    while read -r p; do [[ -e $p ]] && echo; done | wc -l
}
index() { "$BIN/blip-index" --db "$1" --model "$MODEL" --batch 4 --threads 2 "${@:2}" "$L"; }

mkdir -p "$L/a" "$L/b"
"$BIN/gen_photos" "$L/a" $((N / 2)) --size 64x48 --seed 1 >/dev/null || exit 1
"$BIN/gen_photos" "$L/b" $((N - N / 2)) --size 48x64 --seed 2 --ext png >/dev/null || exit 1
echo "broken" > "$L/a/zz-broken.jpg"

# time one clean run to spread the kills over it
start=$(date +%s%N)
index "$T/probe" >/dev/null 2>&1
span_ms=$(( ($(date +%s%N) - start) / 1000000 ))
(( span_ms < 50 )) && span_ms=50
rm -rf "$T/probe"
echo "crash-test: $N images, $KILLS kills over ~${span_ms} ms runs, dir $T"

prev=0 kills=0 completed=0 done_before=0
for ((i = 1; kills < KILLS && i <= 4 * KILLS; i++)); do
  if (( i % 10 == 0 )); then # change the library between runs
    f=$(ls "$L/a" | grep img | head -1)
    [[ -n $f ]] && mv "$L/a/$f" "$L/b/renamed-$i.jpg"
    g=$(ls "$L/b" | grep img | head -1)
    [[ -n $g ]] && rm "$L/b/$g"
    "$BIN/gen_photos" "$L/a" 2 --size 64x48 --seed $((100 + i)) --start $((1000 + 2 * i)) >/dev/null
    [[ -e $T/db/index.sqlite ]] && prev=$(count) # the moved file's old path is gone now
  fi
  (exec "$BIN/blip-index" --db "$T/db" --model "$MODEL" --batch 4 --threads 2 "$L" >/dev/null 2>&1) &
  pid=$! # the subshell exec()s blip-index, so this is the indexer itself
  ms=$((RANDOM * 32768 + RANDOM))
  ms=$((ms % (span_ms * 4 / 5))) # within the first 80% of a full run
  sleep "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"
  if kill -9 "$pid" 2>/dev/null; then kills=$((kills + 1)); else completed=$((completed + 1)); fi
  wait "$pid" 2>/dev/null
  if (( completed > done_before )); then # the run beat the kill: start over so that kills hit real work
    done_before=$completed
    "$BIN/blip-index" --db "$T/db" --check >/dev/null 2>&1 || fail "after a complete run: check"
    rm -rf "$T/db"
    prev=0
    continue
  fi
  [[ -e $T/db/index.sqlite ]] || continue # killed before the index was created
  if ! out=$("$BIN/blip-index" --db "$T/db" --check 2>&1); then
    # a kill before the first commit of the schema leaves an empty database: that is allowed
    [[ $out == *"no index here"* ]] || fail "after kill $i: $out"
    continue
  fi
  now=$(count)
  (( now >= prev )) || fail "after kill $i: $now searchable images, $prev before (committed work lost)"
  prev=$now
done

# finish, then compare with a kill-free build of the same library
fin=$(index "$T/db" --json 2>&1) || fail "final run: $fin"
"$BIN/blip-index" --db "$T/db" --check >/dev/null || fail "final check"
left=$(ls "$T/db" | grep -v -x -e index.sqlite -e index.sqlite-wal -e index.sqlite-shm -e vectors.faiss -e tokens.bin -e lock)
[[ -z $left ]] || fail "files left behind in the index directory: $left"
again=$(index "$T/db" --json 2>/dev/null)
[[ $again == *'"added":0,"updated":0,"moved":0,"deleted":0,'* ]] || fail "no-op run did work: $again"
index "$T/ref" >/dev/null 2>&1 || fail "reference build"
"$BIN/blip-index" --db "$T/db" --dump > "$T/dump.db"
"$BIN/blip-index" --db "$T/ref" --dump > "$T/dump.ref"
cut -f1-3 "$T/dump.db" > "$T/meta.db"
cut -f1-3 "$T/dump.ref" > "$T/meta.ref"
if ! cmp -s "$T/meta.db" "$T/meta.ref"; then
  fail "paths/fingerprints/states differ from the kill-free build"
  diff "$T/meta.db" "$T/meta.ref" | head -5 >&2
fi
worst=$(paste "$T/dump.db" "$T/dump.ref" | awk -F'\t' '{
  n = split($4, a, ","); split($8, b, ",");
  for (i = 1; i <= n; i++) { d = a[i] - b[i]; if (d < 0) d = -d; if (d > w) w = d } }
  END { printf "%g", w + 0 }')
awk -v w="$worst" 'BEGIN { exit !(w <= 1e-5) }' || fail "features differ from the kill-free build by $worst"
rows=$(wc -l < "$T/dump.ref")
echo "crash-test: $kills kills ($completed runs finished first), $rows rows, max feature diff $worst, $fails failures"
[[ $fails == 0 ]]
