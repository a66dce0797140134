#!/usr/bin/env bash
# fuzz.sh: build the libFuzzer harnesses (clang, ASan+UBSan) and run each for
# a bounded time. Not part of every CI run.
#   scripts/fuzz.sh [SECONDS_PER_HARNESS=60] [HARNESS...]
# New inputs go to .fuzz/<harness>/ (seeds from tests/fuzz/corpus_<name>/);
# crashes are saved as .fuzz/<harness>/crash-* and make the script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}; shift || true
CC=clang CXX=clang++ cmake -S . -B build-fuzz -DBLIP_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
harnesses=("$@")
if [ ${#harnesses[@]} -eq 0 ]; then
  for f in tests/fuzz/fuzz_*.c; do harnesses+=("$(basename "${f%.c}")"); done
fi
cmake --build build-fuzz -j2 --target "${harnesses[@]}" >/dev/null
export BLIP_TEST_DATA=$PWD/tests/data
status=0
for h in "${harnesses[@]}"; do
  name=${h#fuzz_}
  work=.fuzz/$h; mkdir -p "$work/corpus"
  seeds=tests/fuzz/corpus_$name; [ -d "$seeds" ] || seeds=
  echo "== $h for ${secs}s"
  if ! ./build-fuzz/"$h" -max_total_time="$secs" -max_len=65536 -timeout=20 -rss_limit_mb=4096 \
       -artifact_prefix="$work/" "$work/corpus" $seeds 2>"$work/log"; then
    echo "$h: FAILED, see $work/log and $work/crash-*"; status=1
  fi
  grep -E '^Done|^#[0-9]+ *DONE' "$work/log" | tail -n 1 || tail -n 3 "$work/log"
done
exit $status
