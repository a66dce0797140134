#!/bin/bash
# test_repair_kill: a repair killed at any durable write loses nothing. tokens.bin
# is deleted (every record lost), then `blip-index --repair` is SIGKILLed at its
# 1st, 2nd, ... fdatasync (strace fault injection: every sync of tokens.bin and
# of SQLite's WAL). After each kill --check may report only lost token records
# (never a damaged index.sqlite or cache), and the next ordinary run recomputes
# exactly the records the killed one had not committed, then --check passes.
set -u
BIN=$(cd "${BLIP_BIN:-build}" && pwd)
DATA=$(cd "${BLIP_TEST_DATA:-tests/data}" && pwd)
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_repair_kill.XXXXXX)
trap 'rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
command -v strace >/dev/null || { bad "strace not installed (scripts/install-deps.sh)"; tally; exit; }
# LeakSanitizer cannot run under ptrace: the sanitizer build checks leaks in the untraced runs only
traced() { ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 strace -f -qq "$@"; }
N=4
"$BIN/gen_photos" "$T/lib" $N --size 48x48 >/dev/null || bad "gen_photos"
"$BIN/blip-index" --db "$T/db0" --model "$MODEL" "$T/lib" 2>/dev/null || bad "index"
rm "$T/db0/tokens.bin"
# how many syncs a whole repair makes
traced -o "$T/trace" -e trace=fdatasync,fsync "$BIN/blip-index" --db "$T/db0" --model "$MODEL" --batch 1 \
  --repair --json >"$T/full.json" 2>/dev/null
expect clean-repair "$(cat "$T/full.json")" repaired=$N embedded=$N
syncs=$(grep -c sync "$T/trace")
(( syncs >= 2 * N )) && ok || bad "only $syncs syncs in a repair of $N records"
for ((k = 1; k <= syncs; k++)); do
  rm -rf "$T/db" && cp -a "$T/db0" "$T/db" && rm -f "$T/db/tokens.bin"
  { traced -o /dev/null -e trace=fdatasync,fsync -e inject=fdatasync,fsync:signal=KILL:when=$k \
    "$BIN/blip-index" --db "$T/db" --model "$MODEL" --batch 1 --repair >/dev/null; } 2>/dev/null
  "$BIN/blip-index" --db "$T/db" --check >/dev/null 2>"$T/chk"
  if grep -v -e "tokens.bin: [0-9]* token records missing or damaged" -e "run blip-index --repair" "$T/chk" | grep -q .; then
    bad "kill at sync $k: --check: $(cat "$T/chk")"
  else ok; fi
  lost=$(grep -o "tokens.bin: [0-9]* token records" "$T/chk" | grep -o "[0-9]*")
  done_before=$((N - ${lost:-0}))
  out=$("$BIN/blip-index" --db "$T/db" --model "$MODEL" --json "$T/lib" 2>/dev/null) || bad "kill at sync $k: next run"
  expect "kill at sync $k" "$out" unchanged=$N repaired=$((N - done_before)) embedded=$((N - done_before))
  "$BIN/blip-index" --db "$T/db" --check >/dev/null 2>"$T/chk" && ok || bad "kill at sync $k: final --check: $(cat "$T/chk")"
done
echo "  $syncs kills, one at each sync of a repair"
tally
