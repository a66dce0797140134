#!/bin/bash
# test_index_guard: one file must never crash, hang or block blip-index, and
# the stored version of a file is the one that was decoded (issue 10 §1, §2).
# - decoders made to crash, hang and balloon (BLIP_TEST_DECODER_FAULT=1 on
#   files named *blip-fault-KIND*), an SVG renamed .png, a 57-byte PNG
#   declaring a 2 GiB iTXt, a FIFO named x.jpg: every other photo is indexed,
#   each bad file is one error row with a clear message, exit 0, and the next
#   run does not retry them;
# - SIGINT while a decoder hangs stops the run promptly (130), and the file
#   in flight is not recorded as failed;
# - a file during whose decode the indexer was killed twice (the decode in
#   flight for over half its time budget) is recorded as failed without a
#   third decode (the attempts journal), and retried once it changes; a kill
#   during a short decode does not count, and after one kill it is retried;
# - a file replaced (rename over it) after its bytes were read keeps the
#   fingerprint/size/mtime of the bytes decoded, so the next run re-embeds it;
# - an edit of the middle of a 3 MiB TIFF that keeps its size and its first and
#   last MiB is a change;
# - blip-query --image, blip-embed --image and blip-eval take the same guarded
#   path: a FIFO does not hang them, a crashing decoder is an error message.
set -u
BIN=${BLIP_BIN:-build}
DATA=${BLIP_TEST_DATA:-tests/data}
SRC=${BLIP_SRC:-.}
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_guard.XXXXXX)
trap 'rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
export PYTHONPATH=$SRC/tests
expect() { # expect NAME JSON key=value...
  local name=$1 json=$2; shift 2
  for kv in "$@"; do
    if [[ $json == *"\"${kv%%=*}\":${kv#*=},"* || $json == *"\"${kv%%=*}\":${kv#*=}}"* ]]; then ok; else bad "$name: want $kv in $json"; fi
  done
}
idx() { "$BIN/blip-index" --db "$T/db" --model "$MODEL" --json --threads 2 --decode-timeout 5 --decode-memory 256 "$@"; }
feature() { "$BIN/blip-index" --db "$1" --dump | awk -F'\t' -v p="$2" '$1 == p { print $3 "\t" $4 }'; }
row() { "$BIN/blip-index" --db "$1" --dump | awk -F'\t' -v p="$2" '$1 == p { print $2 }'; }
# a worker holding FILE (blip-fault-pause) says so with FILE.paused: wait for it (30 s at most)
wait_paused() { for i in $(seq 3000); do [[ -e $1.paused ]] && return 0; sleep 0.01; done; return 1; }
pause_lib() { mkdir -p "$1"; "$BIN/gen_photos" "$1" "$2" --size 64x48 >/dev/null; cp "$1/img00000.jpg" "$1/blip-fault-pause.jpg"; }
rows() { "$BIN/blip-index" --db "$1" --dump | grep -c "	$2"; } # rows DB ok|error

# ---- a library with hostile files
L=$T/lib
mkdir -p "$L"
"$BIN/gen_photos" "$L" 6 --size 64x48 >/dev/null || bad "gen_photos"
for k in crash hang balloon; do cp "$L/img00000.jpg" "$L/blip-fault-$k.jpg"; done
printf '<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"><rect width="32" height="32" fill="red"/></svg>\n' > "$L/drawing.png"
python3 - "$L/bomb.png" <<'EOF'
import struct, sys, zlib
ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
png += struct.pack(">I", 0x7FFFFFF0) + b"iTXt" + b"A" * 16
assert len(png) == 57
open(sys.argv[1], "wb").write(png)
EOF
mkfifo "$L/x.jpg"

out=$(BLIP_TEST_DECODER_FAULT=1 idx --errors "$L" 2>"$T/err1")
rc=$?
[[ $rc == 0 ]] && ok || bad "run with bad files: exit $rc: $(cat "$T/err1")"
expect hostile "$out" added=6 failed=5
for want in "blip-fault-crash.jpg: decoder crashed (SIGSEGV)" "blip-fault-hang.jpg: decoder exceeded 5 s" \
            "blip-fault-balloon.jpg: decoder exceeded its memory cap (256 MiB)" \
            "drawing.png: unsupported image format (SVG)" "bomb.png: corrupt image (PNG chunk iTXt declares 2147483632 bytes"; do
  grep -q "$want" <<<"$out" && ok || bad "--errors lacks \"$want\": $out"
done
"$BIN/blip-index" --db "$T/db" --check >/dev/null && ok || bad "check after the hostile run"

# the next run (faults off: a retry would now succeed) leaves them alone until they change
out=$(idx "$L" 2>/dev/null)
expect no-retry "$out" added=0 updated=0 unchanged=11
n=$(rows "$T/db" error)
[[ $n == 5 ]] && ok || bad "$n error rows after the re-run, want 5"

# ---- SIGINT while a decoder is stuck: exit 130 at once; the file is not marked failed
L2=$T/lib2
pause_lib "$L2" 3
BLIP_TEST_DECODER_FAULT=1 "$BIN/blip-index" --db "$T/db2" --model "$MODEL" --json --threads 1 --batch 1 \
  --decode-timeout 600 "$L2" >"$T/int.json" 2>/dev/null &
pid=$!
wait_paused "$L2/blip-fault-pause.jpg" && ok || bad "the paused decode never started"
kill -INT $pid
for i in $(seq 3000); do kill -0 $pid 2>/dev/null || break; sleep 0.01; done
if kill -0 $pid 2>/dev/null; then bad "SIGINT did not stop a run whose decoder hangs"; kill -KILL $pid; fi
wait $pid
rc=$?
[[ $rc == 130 ]] && ok || bad "SIGINT: exit $rc $(cat "$T/int.json")"
rm -f "$L2/blip-fault-pause.jpg.paused"
"$BIN/blip-index" --db "$T/db2" --dump | grep -q "blip-fault-pause.jpg	" && bad "the interrupted file got a row" || ok
out=$("$BIN/blip-index" --db "$T/db2" --model "$MODEL" --json "$L2" 2>/dev/null)
expect after-int "$out" failed=0
n=$(rows "$T/db2" "ok	")
[[ $n == 4 ]] && ok || bad "$n photos indexed after the interrupted run, want 4"

# ---- kill -9 while a file is stuck in a decoder: retried once, then skipped until it changes
L5=$T/lib5
pause_lib "$L5" 2
for hold in 0 3.5 3.5; do # a kill at once (not counted), then two on a decode held for 3.5 s
  BLIP_TEST_DECODER_FAULT=1 "$BIN/blip-index" --db "$T/db5" --model "$MODEL" --threads 1 --batch 1 --decode-timeout 6 \
    "$L5" >/dev/null 2>&1 &
  pid=$!
  wait_paused "$L5/blip-fault-pause.jpg" && ok || bad "kill after $hold s: the file was not decoded (retried) again"
  sleep $hold # 3.5: in flight for over half the budget (3 s), killed well before the budget (6 s) ends
  kill -KILL $pid
  wait $pid 2>/dev/null
  rm -f "$L5/blip-fault-pause.jpg.paused"      # lets the orphaned worker finish
done
out=$(BLIP_TEST_DECODER_FAULT=1 timeout 60 "$BIN/blip-index" --db "$T/db5" --model "$MODEL" --json --errors \
  --decode-timeout 6 "$L5" 2>&1)
rc=$?
[[ $rc == 0 ]] && ok || bad "third run after two kills: exit $rc: $out"
expect third "$out" failed=1
grep -q "blip-fault-pause.jpg: skipped: the indexer stopped 2 times while reading or decoding" <<<"$out" && ok || bad "no skip message: $out"
[[ ! -e $L5/blip-fault-pause.jpg.paused ]] && ok || bad "the twice-fatal file was decoded a third time"
[[ ! -e $T/db5/decoding ]] && ok || bad "a completed run left its attempts journal"
n=$(rows "$T/db5" "ok	")
[[ $n == 2 ]] && ok || bad "$n other photos indexed, want 2"
touch "$L5/blip-fault-pause.jpg"                  # a new version: decoded again (faults off)
out=$("$BIN/blip-index" --db "$T/db5" --model "$MODEL" --json "$L5" 2>/dev/null)
expect changed-after-skip "$out" updated=1 failed=0 unchanged=2

# ---- a file replaced while it is being indexed: the row describes the bytes decoded
L3=$T/lib3
mkdir -p "$L3" "$T/v"
"$BIN/gen_photos" "$T/v" 2 --size 64x48 --seed 5 >/dev/null
cp "$T/v/img00000.jpg" "$L3/blip-fault-pause.jpg"   # version A
BLIP_TEST_DECODER_FAULT=1 "$BIN/blip-index" --db "$T/db3" --model "$MODEL" --json --threads 1 "$L3" >"$T/swap.json" 2>&1 &
pid=$!
wait_paused "$L3/blip-fault-pause.jpg" || bad "the swap run never reached its decode"
touch -d "2001-02-03" "$T/v/img00001.jpg"
cp -p "$T/v/img00001.jpg" "$L3/.tmp-save"
mv "$L3/.tmp-save" "$L3/blip-fault-pause.jpg"      # version B saved over A (temp + rename)
rm -f "$L3/blip-fault-pause.jpg.paused"
wait $pid || bad "swap run: $(cat "$T/swap.json")"
# reference rows: A and B indexed on their own
mkdir -p "$T/refA" "$T/refB"
cp "$T/v/img00000.jpg" "$T/refA/x.jpg"
cp "$T/v/img00001.jpg" "$T/refB/x.jpg"
"$BIN/blip-index" --db "$T/dbA" --model "$MODEL" "$T/refA" 2>/dev/null
"$BIN/blip-index" --db "$T/dbB" --model "$MODEL" "$T/refB" 2>/dev/null
fa=$(feature "$T/dbA" "$T/refA/x.jpg") fb=$(feature "$T/dbB" "$T/refB/x.jpg")
[[ -n $fa && -n $fb && $fa != "$fb" ]] && ok || bad "reference features"
[[ $(row "$T/db3" "$L3/blip-fault-pause.jpg") == $(row "$T/dbA" "$T/refA/x.jpg") ]] && ok || bad "swapped file: the row's fingerprint is not that of the bytes decoded"
[[ $(feature "$T/db3" "$L3/blip-fault-pause.jpg") == "$fa" ]] && ok || bad "swapped file: not version A's vector"
size=$(sqlite3 "$T/db3/index.sqlite" "select size from images" 2>/dev/null)
[[ -z $size || $size == $(stat -c %s "$T/v/img00000.jpg") ]] && ok || bad "swapped file: stored size $size is not A's"
out=$("$BIN/blip-index" --db "$T/db3" --model "$MODEL" --json "$L3" 2>/dev/null)
expect swap-next "$out" updated=1 unchanged=0
[[ $(feature "$T/db3" "$L3/blip-fault-pause.jpg") == "$fb" ]] && ok || bad "after the swap: not version B's vector"

# ---- an edit in the middle of a large file (same size, same first and last MiB)
L4=$T/lib4
mkdir -p "$L4"
"$BIN/gen_photos" "$L4" 2 --size 64x48 >/dev/null
python3 - "$L4/scan.tif" <<'EOF'
import sys, testlib
w = h = 1024
rgb = bytes((x * 7 + y * 3) & 255 for y in range(h) for x in range(w * 3))
testlib.write_tiff(sys.argv[1], w, h, rgb)
EOF
out=$("$BIN/blip-index" --db "$T/db4" --model "$MODEL" --json "$L4" 2>/dev/null)
expect tiff "$out" added=3 failed=0
before=$(feature "$T/db4" "$L4/scan.tif")
python3 - "$L4/scan.tif" <<'EOF'
import os, sys
p = sys.argv[1]
n = os.path.getsize(p)
assert n > 3 * 2**20
with open(p, "r+b") as f:  # rows ~360..660: bytes strictly between the first and the last MiB
    f.seek(2**20 + 4096)
    f.write(b"\xff" * (n - 2 * 2**20 - 8192))
EOF
out=$("$BIN/blip-index" --db "$T/db4" --model "$MODEL" --json "$L4" 2>/dev/null)
expect middle-edit "$out" updated=1 unchanged=2
after=$(feature "$T/db4" "$L4/scan.tif")
[[ -n $after && $after != "$before" ]] && ok || bad "middle edit kept the old vector"

# ---- the other tools decode the same way
mkfifo "$T/q.jpg"
tool() { # tool NAME WANT CMD...: an error exit (1 or 2; not a signal, not a hang) and WANT in stderr
  local name=$1 want=$2; shift 2
  timeout 60 "$@" >/dev/null 2>"$T/tool.err"
  local rc=$?
  [[ $rc == 1 || $rc == 2 ]] && grep -q "$want" "$T/tool.err" && ok || bad "$name: exit $rc: $(cat "$T/tool.err")"
}
tool "embed fifo" "not a regular file" "$BIN/blip-embed" --model "$MODEL" --image "$T/q.jpg"
tool "embed crash" "decoder crashed (SIGSEGV)" env BLIP_TEST_DECODER_FAULT=1 "$BIN/blip-embed" --model "$MODEL" \
  --image "$L/blip-fault-crash.jpg"
tool "query fifo" "not a regular file" "$BIN/blip-query" --db "$T/db" --model "$MODEL" --image "$T/q.jpg"
tool "query crash" "decoder crashed (SIGSEGV)" env BLIP_TEST_DECODER_FAULT=1 "$BIN/blip-query" --db "$T/db" \
  --model "$MODEL" --image "$L/blip-fault-crash.jpg"
echo '[{"image": "blip-fault-crash.jpg", "caption": "a photo"}]' > "$T/ann.json"
tool "eval crash" "decoder crashed (SIGSEGV)" env BLIP_TEST_DECODER_FAULT=1 "$BIN/blip-eval" --model "$MODEL" \
  --ann "$T/ann.json" --images "$L" --threads 1

tally
