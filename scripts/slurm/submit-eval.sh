#!/bin/bash
# submit-eval.sh: BLIP's retrieval evaluation on a Slurm cluster, in three
# dependent jobs over one shared cache: an array of N feature shards, an array
# of N ITM shards, then one job that prints the recall (OUT/logs/recall.out).
#   scripts/slurm/submit-eval.sh -n N -c CACHE -a ANN.json -i IMAGES [-- blip-eval options]
# Prints the three job ids. BLIPSEARCH_MODEL names the model; BLIP_BIN the binaries.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
n=4 cache= ann= images= sb=()
while [ $# -gt 0 ]; do
  case $1 in
    -n) n=$2; shift 2 ;;
    -c) cache=$2; shift 2 ;;
    -a) ann=$2; shift 2 ;;
    -i) images=$2; shift 2 ;;
    --sbatch) sb+=("$2"); shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ -n "$cache" ] && [ -n "$ann" ] && [ -n "$images" ] && [ -n "${BLIPSEARCH_MODEL:-}" ] || { sed -n '2,7p' "$0" >&2; exit 2; }
export BLIP_BIN=${BLIP_BIN:-$(cd "$here/../../build" && pwd)}
mkdir -p "$cache/logs"
cache=$(cd "$cache" && pwd) ann=$(cd "$(dirname "$ann")" && pwd)/$(basename "$ann") images=$(cd "$images" && pwd)
feat=$(sbatch --parsable "${sb[@]}" --array=0-$((n - 1)) -o "$cache/logs/features-%a.out" \
       "$here/eval.sbatch" "$cache" "$ann" "$images" "$n" "$@")
itm=$(sbatch --parsable "${sb[@]}" --array=0-$((n - 1)) --dependency=afterok:"${feat%%;*}" \
      -o "$cache/logs/itm-%a.out" "$here/eval.sbatch" "$cache" "$ann" "$images" "$n" "$@")
final=$(sbatch --parsable "${sb[@]}" --dependency=afterok:"${itm%%;*}" -o "$cache/logs/recall.out" \
        "$here/eval.sbatch" "$cache" "$ann" "$images" 1 "$@")
echo "${feat%%;*} ${itm%%;*} ${final%%;*}"
