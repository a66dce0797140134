#!/bin/bash
# test_slurm: the Slurm scripts on a real single-node Slurm cluster
# (munged + slurmctld + slurmd from Debian, started in a temp dir by
# scripts/slurm/local-cluster.sh and stopped at the end):
#  1. an array of 4 index shards and a dependent merge job equal a
#     single-process build (rows, features, search results);
#  2. one array task SIGKILLed mid-run (scancel --signal=KILL) and resubmitted
#     resumes, and the merge again equals the single-process build;
#  3. a sharded evaluation (features array -> ITM array -> recall job) prints
#     exactly the single-process figures with no model work in the last job.
# When Slurm cannot start, the test fails and says why; it never skips.
set -u
BIN=$(cd "${BLIP_BIN:-build}" && pwd)
SRC=$(cd "${BLIP_SRC:-.}" && pwd)
DATA=$(cd "${BLIP_TEST_DATA:-tests/data}" && pwd)
export BLIPSEARCH_MODEL=$DATA/blip-tiny BLIP_BIN=$BIN
T=$(mktemp -d /tmp/blip_test_slurm.XXXXXX)
CL=$T/cluster
cleanup() { bash "$SRC/scripts/slurm/local-cluster.sh" stop "$CL" >/dev/null 2>&1; rm -rf "$T"; }
trap cleanup EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"

if ! start=$(bash "$SRC/scripts/slurm/local-cluster.sh" start "$CL" 2>&1); then
  echo "FAIL: cannot start a local Slurm cluster: $start" >&2
  exit 1
fi
export SLURM_CONF=$CL/slurm.conf

# wait_jobs ID...: until none is queued or running; then every one must have completed
wait_jobs() {
  for _ in $(seq 600); do
    [ -z "$(squeue -h -j "$(IFS=,; echo "$*")" 2>/dev/null)" ] && break
    sleep 0.2
  done
  local id st
  for id in "$@"; do
    st=$(scontrol show job "$id" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | sort -u | tr '\n' ' ')
    [ "$st" = "JobState=COMPLETED " ] || { echo "job $id: ${st:-unknown state}" >&2; return 1; }
  done
}
q() { "$BIN/blip-query" --db "$1" --json -n 10 "a photo of the sea" \
      | python3 -c 'import json,sys; print(json.dumps([{k: v for k, v in r.items() if k != "id"} for r in json.load(sys.stdin)]))'; }

L=$T/lib
mkdir -p "$L/x" "$L/y"
"$BIN/gen_photos" "$L/x" 120 --size 48x40 >/dev/null || bad "gen_photos"
"$BIN/gen_photos" "$L/y" 80 --size 40x48 --seed 5 --ext png >/dev/null
OMP_NUM_THREADS=1 "$BIN/blip-index" --db "$T/single" --json "$L" >/dev/null 2>&1 || bad "single-process build"
"$BIN/blip-index" --db "$T/single" --dump >"$T/single.dump"
q "$T/single" >"$T/single.q"

# 1. array + merge
read -r arr mrg < <(bash "$SRC/scripts/slurm/submit-index.sh" -n 4 -o "$T/run1" "$L") || bad "submit-index"
wait_jobs "$arr" "$mrg" && ok || bad "index array / merge did not complete: $(cat "$T/run1/logs/"*.out 2>/dev/null | tail -5)"
"$BIN/blip-index" --db "$T/run1/merged" --dump | cmp -s - "$T/single.dump" && ok || bad "slurm merge differs (rows/features)"
q "$T/run1/merged" | cmp -s - "$T/single.q" && ok || bad "slurm merge search results differ"
"$BIN/blip-index" --db "$T/run1/merged" --check >/dev/null && ok || bad "slurm merge --check"

# 2. kill one array task mid-run, resubmit it, merge again
export BLIP_INDEX_ARGS="--batch 1" # one commit per photo: the kill lands between commits
mkdir -p "$T/run2/logs"
arr=$(sbatch --parsable --array=0-3 -o "$T/run2/logs/index-%a.out" "$SRC/scripts/slurm/index.sbatch" "$T/run2" 4 "$L")
caught=0
for _ in $(seq 1500); do
  n=$(sqlite3 "$T/run2/shard-2/index.sqlite" "SELECT count(*) FROM images" 2>/dev/null || echo 0)
  if [ "${n:-0}" -ge 3 ]; then scancel --signal=KILL --full "${arr}_2" && caught=$n; break; fi
  sleep 0.02
done
[ "$caught" -gt 0 ] && ok || bad "could not catch array task 2 running to kill it"
wait_jobs "${arr}_0" "${arr}_1" "${arr}_3" && ok || bad "untouched tasks did not complete"
for _ in $(seq 100); do [ -z "$(squeue -h -j "${arr}_2" 2>/dev/null)" ] && break; sleep 0.1; done
scontrol show job "${arr}_2" | grep -q 'JobState=CANCELLED' && ok || bad "task 2 was not killed"
before=$(sqlite3 "$T/run2/shard-2/index.sqlite" "SELECT count(*) FROM images")
re=$(sbatch --parsable --array=2 -o "$T/run2/logs/index-%a.rerun" "$SRC/scripts/slurm/index.sbatch" "$T/run2" 4 "$L")
mg=$(sbatch --parsable --dependency=afterok:"$re" -o "$T/run2/logs/merge.out" "$SRC/scripts/slurm/merge.sbatch" "$T/run2" 4)
wait_jobs "$re" "$mg" && ok || bad "resubmitted task / merge did not complete"
added=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["added"])' \
        "$T/run2/logs/index-2.rerun" 2>/dev/null)
total=$(sqlite3 "$T/run2/shard-2/index.sqlite" "SELECT count(*) FROM images")
[ -n "$added" ] && [ "$added" -eq $((total - before)) ] && [ "$before" -gt 0 ] && ok \
  || bad "resubmitted task redid committed work: $before before, $total after, added $added"
"$BIN/blip-index" --db "$T/run2/merged" --dump | cmp -s - "$T/single.dump" && ok || bad "merge after the kill differs"
q "$T/run2/merged" | cmp -s - "$T/single.q" && ok || bad "search after the kill differs"
unset BLIP_INDEX_ARGS

# 3. sharded evaluation
python3 - "$L" "$T/ann.json" <<'PY'
import json, os, sys
root = sys.argv[1]
imgs = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)[:40]
words = ["red", "green", "dog", "cat", "sky", "sea", "tree", "car", "road", "hill"]
json.dump([{"image": im, "caption": [f"a {words[i % 10]} photo {i}", f"the {words[(i * 7) % 10]} scene"]}
           for i, im in enumerate(imgs)], open(sys.argv[2], "w"))
PY
EVOPT=(--k-test 8 --chunk 4 --threads 1)
"$BIN/blip-eval" --model "$BLIPSEARCH_MODEL" --ann "$T/ann.json" --images "$L" --json "${EVOPT[@]}" >"$T/ev_single.json" \
  || bad "single eval"
read -r f i r < <(bash "$SRC/scripts/slurm/submit-eval.sh" -n 4 -c "$T/ecache" -a "$T/ann.json" -i "$L" -- "${EVOPT[@]}") \
  || bad "submit-eval"
wait_jobs "$f" "$i" "$r" && ok || bad "eval jobs did not complete: $(tail -3 "$T/ecache/logs/"*.out 2>/dev/null)"
python3 - "$T/ev_single.json" "$T/ecache/logs/recall.out" <<'PY' && ok || bad "slurm eval differs or did model work"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
figs = lambda j: {k: j[k] for k in ("itc", "itm", "itm_pairs", "n_images", "n_texts")}
assert figs(a) == figs(b), (figs(a), figs(b))
assert b["cached_chunks"] == dict(text=20, images=10, itm=10), b["cached_chunks"]  # ITM chunks are by image
PY
tally
