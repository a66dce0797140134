#!/bin/bash
# test_shard: sharded indexing and evaluation without a scheduler (the contract
# any scheduler drives; tests/test_slurm.sh drives it with a real Slurm):
#  - the shards of --shard I/N partition the files (disjoint, complete), stably;
#    SLURM_ARRAY_TASK_ID/_COUNT/_MIN and JOB_COMPLETION_INDEX pick the same shard;
#  - re-running a finished shard does no model work;
#  - blip-index merge equals a single-process build: identical rows and
#    features (--dump), identical search results, --check passes, and the
#    rerank records come from the linked shard files (the photos are moved
#    away and the rerank still scores exactly as before);
#  - the merged index keeps growing with blip-index (new ids after the shards');
#  - merge refuses shards of another model setting, overlapping shards, and a
#    shard that a blip-index is writing;
#  - blip-eval --shard: features, then ITM, into one cache; the plain run then
#    does no model work and prints the single-process figures exactly.
set -u
BIN=${BLIP_BIN:-build}
DATA=${BLIP_TEST_DATA:-tests/data}
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_shard.XXXXXX)
trap 'rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
idx() { "$BIN/blip-index" --model "$MODEL" --json "$@"; }
jget() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"; }

L=$T/lib
mkdir -p "$L/a" "$L/b/c"
"$BIN/gen_photos" "$L/a" 9 --size 96x72 >/dev/null || bad "gen_photos"
"$BIN/gen_photos" "$L/b" 6 --size 64x64 --seed 2 --ext png >/dev/null
"$BIN/gen_photos" "$L/b/c" 5 --size 80x60 --seed 3 --ext webp >/dev/null
printf 'not a jpeg' >"$L/a/broken.jpg" # an error row travels through the merge too

idx --db "$T/single" "$L" >/dev/null 2>&1 || bad "single-process build"
for i in 0 1 2; do
  out=$(idx --db "$T/s$i" --shard "$i/3" "$L" 2>"$T/err$i") || bad "shard $i exit"
  grep -q "shard $i/3 (from --shard)" "$T/err$i" && ok || bad "shard $i not announced"
done

# partition: disjoint and complete
cat <("$BIN/blip-index" --db "$T/s0" --dump) <("$BIN/blip-index" --db "$T/s1" --dump) \
    <("$BIN/blip-index" --db "$T/s2" --dump) | sort >"$T/union"
"$BIN/blip-index" --db "$T/single" --dump | sort >"$T/whole"
cmp -s "$T/union" "$T/whole" && ok || bad "shards do not partition the library"
for i in 0 1 2; do
  n=$("$BIN/blip-index" --db "$T/s$i" --dump | wc -l)
  [ "$n" -gt 0 ] && ok || bad "shard $i is empty (21 files over 3 shards)"
done

# a finished shard re-run: no model work; scheduler variables pick the same shard
out=$(SLURM_ARRAY_TASK_ID=1 SLURM_ARRAY_TASK_COUNT=3 idx --db "$T/s1" "$L" 2>"$T/e") || bad "slurm rerun"
[ "$(jget added <<<"$out")$(jget updated <<<"$out")$(jget deleted <<<"$out")" = 000 ] && ok || bad "rerun of shard 1 did work: $out"
grep -q "shard 1/3 (from SLURM_ARRAY_TASK_ID)" "$T/e" && ok || bad "SLURM_ARRAY_TASK_ID not used"
out=$(SLURM_ARRAY_TASK_ID=3 SLURM_ARRAY_TASK_MIN=1 SLURM_ARRAY_TASK_COUNT=3 idx --db "$T/s2" "$L" 2>/dev/null)
[ "$(jget added <<<"$out")$(jget deleted <<<"$out")" = 00 ] && ok || bad "--array=1-3 numbering: $out"
out=$(JOB_COMPLETION_INDEX=0 idx --db "$T/s0" --shard-count 3 "$L" 2>/dev/null)
[ "$(jget added <<<"$out")$(jget deleted <<<"$out")" = 00 ] && ok || bad "JOB_COMPLETION_INDEX: $out"
JOB_COMPLETION_INDEX=0 idx --db "$T/x" "$L" >/dev/null 2>"$T/e"; st=$?
[ $st = 2 ] && grep -q -- "--shard-count" "$T/e" && ok || bad "JOB_COMPLETION_INDEX without a count: exit $st"
for spec in 3/3 1/0 -1/2 x 1/ /2 "1/2/3" 99999999999/3; do
  idx --db "$T/x" --shard "$spec" "$L" >/dev/null 2>&1
  [ $? = 2 ] && ok || bad "--shard '$spec' accepted"
done

# merge = single-process build
out=$("$BIN/blip-index" merge --db "$T/merged" --json "$T/s0" "$T/s1" "$T/s2") || bad "merge exit"
[ "$(jget rows <<<"$out")" = 21 ] && [ "$(jget token_files_linked <<<"$out")" = 3 ] && ok || bad "merge summary: $out"
"$BIN/blip-index" --db "$T/merged" --dump >"$T/mdump"
"$BIN/blip-index" --db "$T/single" --dump >"$T/sdump"
cmp -s "$T/mdump" "$T/sdump" && ok || bad "merged rows/features differ from the single build"
"$BIN/blip-index" --db "$T/merged" --check >/dev/null && ok || bad "merged --check"
q() { "$BIN/blip-query" --db "$1" --model "$MODEL" --json -n 8 "a photo of a landscape" \
      | python3 -c 'import json,sys; print(json.dumps([{k: v for k, v in r.items() if k != "id"} for r in json.load(sys.stdin)]))'; }
q "$T/single" >"$T/q1"
q "$T/merged" >"$T/q2"
[ -s "$T/q1" ] && cmp -s "$T/q1" "$T/q2" && ok || bad "merged search results differ"
mv "$L" "$T/away" # the rerank must now read the linked token records
q "$T/merged" >"$T/q3"
mv "$T/away" "$L"
cmp -s "$T/q1" "$T/q3" && ok || bad "rerank without the photos differs (token segments not used?)"

# the merged index grows like any index
"$BIN/gen_photos" "$L/new" 2 --size 64x64 --seed 9 >/dev/null
out=$(idx --db "$T/merged" "$L" 2>/dev/null) || bad "index into the merged index"
[ "$(jget added <<<"$out")" = 2 ] && [ "$(jget unchanged <<<"$out")" = 21 ] && ok || bad "merged index update: $out"
"$BIN/blip-index" --db "$T/merged" --check >/dev/null && ok || bad "check after growing the merged index"
maxold=$(sqlite3 "$T/merged/index.sqlite" "SELECT max(last_id) FROM token_segments")
minnew=$(sqlite3 "$T/merged/index.sqlite" "SELECT min(id) FROM images WHERE path LIKE '%/new/%'")
[ "$minnew" -gt "$maxold" ] && ok || bad "new ids ($minnew) inside the shards' range (..$maxold)"
rm -rf "$L/new"

# refusals
idx --db "$T/f16" --shard 1/3 --rerank-f16 "$L" >/dev/null 2>&1
"$BIN/blip-index" merge --db "$T/bad" "$T/s0" "$T/f16" 2>"$T/e"; st=$?
[ $st = 1 ] && grep -q "tokens=f16" "$T/e" && ok || bad "merge of mixed token formats: exit $st $(cat "$T/e")"
idx --db "$T/o" --shard 0/2 "$L" >/dev/null 2>&1
"$BIN/blip-index" merge --db "$T/bad" "$T/s0" "$T/o" 2>"$T/e"; st=$?
[ $st = 1 ] && grep -q "in two shards" "$T/e" && ok || bad "overlapping shards: exit $st $(cat "$T/e")"
flock "$T/s1/lock" sleep 5 &
sleep 0.5
"$BIN/blip-index" merge --db "$T/bad" "$T/s0" "$T/s1" 2>"$T/e"; st=$?
[ $st = 1 ] && grep -q "another blip-index" "$T/e" && ok || bad "merge of a shard being written: exit $st $(cat "$T/e")"
wait
"$BIN/blip-index" merge --db "$T/bad" >/dev/null 2>&1
[ $? = 2 ] && ok || bad "merge without shards"

# int4 rerank store: a valid index; scores move by at most test_store's int4 ITM tolerance
idx --db "$T/i4" --rerank-store int4 "$L" >/dev/null 2>&1 || bad "int4 index"
"$BIN/blip-index" --db "$T/i4" --check >/dev/null && ok || bad "int4 --check"
[ "$(sqlite3 "$T/i4/index.sqlite" "SELECT value FROM meta WHERE key='tokens'")" = int4 ] && ok || bad "int4 not recorded"
sz=$(stat -c %s "$T/i4/tokens.bin"); s8=$(stat -c %s "$T/single/tokens.bin")
[ "$sz" -lt "$s8" ] && ok || bad "int4 records ($sz bytes) not smaller than int8 ($s8)"
python3 - <("$BIN/blip-query" --db "$T/i4" --model "$MODEL" --json -n 20 "a photo of a landscape") \
  <("$BIN/blip-query" --db "$T/single" --model "$MODEL" --json -n 20 "a photo of a landscape") <<'PY' \
  && ok || bad "int4 scores drift beyond tolerance"
import json, sys
a, b = ({r["path"]: r["score"] for r in json.load(open(p))} for p in sys.argv[1:])
assert set(a) == set(b) and len(a) > 0
assert max(abs(a[p] - b[p]) for p in a) <= 0.25, max(abs(a[p] - b[p]) for p in a)
assert max(abs(a[p] - b[p]) for p in a) > 0  # the int4 records were used
PY
idx --db "$T/x" --rerank-store int3 "$L" >/dev/null 2>&1; [ $? = 2 ] && ok || bad "--rerank-store int3 accepted"

# sharded evaluation over one cache
python3 - "$L" "$T/ann.json" <<'PY'
import json, os, sys
root = sys.argv[1]
imgs = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if "broken" not in f)
words = ["red", "green", "dog", "cat", "sky", "sea", "tree", "car", "road", "hill"]
ann = [{"image": im, "caption": [f"a {words[i % 10]} photo number {i}", f"the {words[(i * 3) % 10]} one"]}
       for i, im in enumerate(imgs)]
json.dump(ann, open(sys.argv[2], "w"))
PY
EV=("$BIN/blip-eval" --model "$MODEL" --ann "$T/ann.json" --images "$L" --k-test 5 --chunk 3 --threads 1 --json)
"${EV[@]}" >"$T/ev_single.json" || bad "single eval"
for i in 0 1 2; do # features: each shard computes its chunks; the ITM part waits for the others
  "${EV[@]}" --cache "$T/ec" --shard "$i/3" >"$T/ev_f$i.json" 2>"$T/e" || bad "eval shard $i features"
done
grep -q "missing_features\": 0" "$T/ev_f2.json" && ok || bad "last feature shard should see every feature: $(cat "$T/ev_f2.json")"
for i in 0 1 2; do
  SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=3 "${EV[@]}" --cache "$T/ec" >"$T/ev_i$i.json" 2>/dev/null || bad "eval shard $i itm"
done
grep -q '"missing_itm": 0' "$T/ev_i2.json" && ok || bad "ITM chunks still missing after every shard: $(cat "$T/ev_i2.json")"
"${EV[@]}" --cache "$T/ec" >"$T/ev_final.json" || bad "final eval"
python3 - "$T/ev_single.json" "$T/ev_final.json" <<'PY' && ok || bad "sharded eval differs or did model work"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
figs = lambda j: {k: j[k] for k in ("itc", "itm", "itm_pairs", "n_images", "n_texts")}
c = b["cached_chunks"]
assert figs(a) == figs(b), (figs(a), figs(b))
assert c["text"] == 14 and c["images"] == 7 and c["itm"] == 7, c  # 40 captions / 3, 20 images / 3 (ITM by image)
PY
"${EV[@]}" --shard 0/3 >/dev/null 2>"$T/e"; st=$?
[ $st = 1 ] && grep -q -- "--cache" "$T/e" && ok || bad "shard run without a cache: exit $st"
tally
