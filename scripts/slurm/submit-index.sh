#!/bin/bash
# submit-index.sh: index a collection on a Slurm cluster: an array of N shard
# tasks, then a merge job that runs once every task succeeded.
#   scripts/slurm/submit-index.sh -n N -o OUT [-- sbatch options] ROOT...
# Prints the two job ids ("ARRAY MERGE"). The merged index is OUT/merged;
# query it with blip-query --db OUT/merged. BLIPSEARCH_MODEL must name the
# model; BLIP_BIN the binaries (default: build/ beside this script).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
n=4 out= sb=()
while [ $# -gt 0 ]; do
  case $1 in
    -n) n=$2; shift 2 ;;
    -o) out=$2; shift 2 ;;
    --sbatch) sb+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ -n "$out" ] && [ $# -gt 0 ] && [ -n "${BLIPSEARCH_MODEL:-}" ] || { sed -n '2,8p' "$0" >&2; exit 2; }
export BLIP_BIN=${BLIP_BIN:-$(cd "$here/../../build" && pwd)}
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
roots=(); for r in "$@"; do roots+=("$(cd "$r" && pwd)"); done
array=$(sbatch --parsable "${sb[@]}" --array=0-$((n - 1)) -o "$out/logs/index-%a.out" \
        "$here/index.sbatch" "$out" "$n" "${roots[@]}")
merge=$(sbatch --parsable "${sb[@]}" --dependency=afterok:"${array%%;*}" -o "$out/logs/merge.out" \
        "$here/merge.sbatch" "$out" "$n")
echo "${array%%;*} ${merge%%;*}"
