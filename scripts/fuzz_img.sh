#!/usr/bin/env bash
# Bounded libFuzzer run of tests/fuzz/fuzz_img.c (blip_img decode+preprocess).
# Usage: scripts/fuzz_img.sh [seconds=60]. Builds build-fuzz with clang, fuzzes
# in a scratch corpus seeded from tests/fuzz/corpus_img (the committed seeds
# are never modified), and exits non-zero on any crash, leak, timeout or
# sanitizer report (the inputs are kept in build-fuzz/fuzz_img-findings/).
set -euo pipefail
secs=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
CC=clang CXX=clang++ cmake -S "$root" -B "$root/build-fuzz" -DBLIP_FUZZ=ON -DCMAKE_BUILD_TYPE=Release >/dev/null 2>&1 \
  && cmake --build "$root/build-fuzz" -j2 --target fuzz_img >/dev/null 2>&1 \
  || { echo "fuzz_img: build failed (needs clang with libFuzzer)"; exit 1; }
work=$(mktemp -d)
art="$root/build-fuzz/fuzz_img-findings/"
rm -rf "$art" && mkdir -p "$art"
trap 'rm -rf "$work"' EXIT
cd "$work"
"$root/build-fuzz/fuzz_img" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2560 -max_len=65536 -artifact_prefix="$art" \
  -print_final_stats=1 "$work" "$root/tests/fuzz/corpus_img" 2>&1 | grep -E '^#[0-9]+ +DONE|stat::|ERROR|SUMMARY|crash-|leak-|timeout-' || true
if [ -n "$(ls -A "$art")" ]; then ls "$art"; echo "fuzz_img: findings kept in $art"; exit 1; fi
echo "fuzz_img: no findings in ${secs}s"
