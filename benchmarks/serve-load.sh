#!/bin/bash
# serve-load.sh: blip-serve under load with wrk, on loopback only, bounded in
# time (about 3 minutes). Reports, for text search with rerank 16 and rerank
# 0 at 1, 4 and 16 connections: requests/s, p50 and p99 latency and failed
# requests; RSS across 10,000+ requests; the same load while blip-index adds
# photos and is SIGKILLed; and the latency of normal requests while a
# slow-loris client holds connections open by trickling header bytes.
# Batching: queries/s of blip-serve batched (the default) and --no-batch at 1, 4 and 16
# connections for rerank 16, 4 and 0 (8 different queries, 3 to 13 tokens,
# cycled), the two servers' runs interleaved REPS times (best of each), and
# blip-query --stdin with NQ queries piped at once, --batch 16 against
# --batch 1 (model load subtracted: an empty stdin's time).
#   benchmarks/serve-load.sh [BUILD_DIR=build] [MODEL=tests/data/blip-tiny|random-base] [PHOTOS=1000] [SECS=8] [RSS_N=10000]
# MODEL random-base: BLIP base geometry (names and shapes of blip-itm-base-coco)
# with random F16 weights and the real vocab, written to the temp dir.
# Environment: PREC=int8|bf16|f32 the index's (and so the server's) precision;
# BATCH_ONLY=1 runs only the batching measurements; REPS (3), NQ (48).
set -euo pipefail
BIN=$(cd "${1:-build}" && pwd)
SRC=$(cd "$(dirname "$0")/.." && pwd)
NPH=${3:-1000}
SECS=${4:-8}
RSS_N=${5:-10000}
MORE=$(( NPH < 400 ? NPH / 2 : 400 ))   # photos added while serving
command -v wrk >/dev/null || { echo "serve-load: wrk is not installed (scripts/install-deps.sh)"; exit 2; }
T=$(mktemp -d /tmp/blip_serve_load.XXXXXX)
if [ "${2:-}" = random-base ]; then
  MODEL=$T/random-base
  mkdir -p "$MODEL"
  cp "$SRC/tests/data/checkpoint-manifest/blip-itm-base-coco.config.json" "$MODEL/config.json"
  cp "$SRC/tests/data/blip-tiny/vocab.txt" "$MODEL/vocab.txt"
  python3 - "$SRC/tests/data/checkpoint-manifest/blip-itm-base-coco.tsv" "$MODEL/model.safetensors" <<'EOF'
import json, random, struct, sys
random.seed(1)
ents = [(l.split("\t")[0], [int(x) for x in l.split("\t")[1].split(",")]) for l in open(sys.argv[1]) if l.strip()]
base = struct.pack("<%de" % (1 << 20), *[random.gauss(0, 0.03) for _ in range(1 << 20)])
hdr, off = {}, 0
for name, shape in ents:
    n = 1
    for d in shape:
        n *= d
    hdr[name] = {"dtype": "F16", "shape": shape, "data_offsets": [off, off + 2 * n]}
    off += 2 * n
h = json.dumps(hdr).encode()
h += b" " * (-len(h) % 8)
with open(sys.argv[2], "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for name, shape in ents:
        left = hdr[name]["data_offsets"][1] - hdr[name]["data_offsets"][0]
        while left:
            k = min(left, len(base))
            f.write(base[:k])
            left -= k
EOF
else
  MODEL=$(cd "${2:-tests/data/blip-tiny}" && pwd)
fi
SPID=
trap '[ -n "$SPID" ] && kill "$SPID" ${BPID:-} 2>/dev/null; rm -rf "$T"' EXIT
export OMP_WAIT_POLICY=passive

mkdir -p "$T/lib" "$T/more"
"$BIN/gen_photos" "$T/lib" "$NPH" --size 64x64 >/dev/null
"$BIN/gen_photos" "$T/more" "$MORE" --size 64x64 --seed 3 --start 100000 >/dev/null
"$BIN/blip-index" --db "$T/db" --model "$MODEL" --precision "${PREC:-f32}" "$T/lib" 2>/dev/null
start_server() { # start_server OUT ARGS...: sets NEWPID, NEWURL
  "$BIN/blip-serve" --db "$T/db" --model "$MODEL" --listen 127.0.0.1:0 "${@:2}" >"$1" 2>>"$T/log" &
  NEWPID=$!
  for _ in $(seq 900); do grep -qs "listening on" "$1" && break; sleep 0.1; done
  NEWURL=$(sed -n 's|.*listening on \(http://[0-9.:]*\)/.*|\1|p' "$1")
}
start_server "$T/out"
SPID=$NEWPID URL=$NEWURL
rss() { awk '/VmRSS/ {print $2}' "/proc/$SPID/status"; }
echo "blip-serve on $URL, $NPH photos, model $(basename "$MODEL"), $(nproc) cores, wrk ${SECS}s per run"

# wrk's summary as one line: req/s p50 p99 requests failures
cat >"$T/report.lua" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  local fails = e.connect + e.read + e.write + e.timeout + e.status
  io.write(string.format("RESULT %.1f %.2f %.2f %d %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.requests, fails))
end
EOF
run() { # run CONNS URL [SECS] -> "req/s p50 p99 n fails"
  wrk -t "$(( $1 < 2 ? 1 : 2 ))" -c "$1" -d "${3:-$SECS}s" --timeout 30s -s "$T/report.lua" "$2" | sed -n 's/^RESULT //p'
}
Q="q=a%20dog%20running%20on%20a%20beach&n=20"
total_fail=0
QUERIES=("a dog running on a beach" "red car" "two people hiking in the snow on a mountain trail" "a cat"
  "a bowl of fruit on a wooden table next to a window" "a boat on a lake" "children playing football in a park"
  "an old man reading a newspaper on a bench in the city")
batching() {
# wrk cycles through the queries (another length each request: the batches pad and mask)
{ printf 'local qs = {'; for t in "${QUERIES[@]}"; do printf '"%s",' "${t// /%20}"; done
  printf '}\nlocal i = 0\nrequest = function()\n  i = i %% #qs + 1\n'
  printf '  return wrk.format("GET", "/api/search?n=20&rerank=" .. os.getenv("RERANK") .. "&q=" .. qs[i])\nend\n'
  cat "$T/report.lua"; } >"$T/mixed.lua"
settle() { # settle PID...: wait until the servers are idle (the previous run's last queries done)
  local a b
  for p in "$@"; do
    for _ in $(seq 200); do
      a=$(awk '{print $14 + $15}' "/proc/$p/stat"); sleep 0.3; b=$(awk '{print $14 + $15}' "/proc/$p/stat")
      [ $((b - a)) -le 1 ] && break
    done
  done
}
mixed() { # mixed CONNS URL RERANK -> "req/s p50 p99 n fails"
  settle "$SPID" "$BPID"
  RERANK=$3 wrk -t "$(( $1 < 2 ? 1 : 2 ))" -c "$1" -d "${SECS}s" --timeout 30s -s "$T/mixed.lua" "$2" | sed -n 's/^RESULT //p'
}
start_server "$T/out-nb" --no-batch # the server under test batches (the default); this one does not
BURL=$URL BPID=$SPID URL=$NEWURL SPID=$NEWPID
REPS=${REPS:-3}
printf '\nbatching, best of %d interleaved runs, %d different queries cycled\n' "$REPS" "${#QUERIES[@]}"
printf '%-10s %6s %12s %12s %8s %12s %12s\n' rerank conns "req/s 1by1" "req/s batch" ratio "p50 1by1" "p50 batch"
for k in 16 4 0; do
  for c in 1 4 16; do
    a=() b=()
    for _ in $(seq "$REPS"); do
      a+=("$(mixed "$c" "$URL" "$k")")
      b+=("$(mixed "$c" "$BURL" "$k")")
    done
    read -r n_rps n50 _ _ _ < <(best "${a[@]}")
    read -r b_rps b50 _ _ _ < <(best "${b[@]}")
    for l in "${a[@]}" "${b[@]}"; do total_fail=$((total_fail + $(echo "$l" | awk '{print $5}'))); done
    printf '%-10s %6d %12s %12s %8s %12s %12s\n' "$k" "$c" "$n_rps" "$b_rps" \
      "x$(python3 -c 'import sys; print("%.2f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$b_rps" "$n_rps")" "$n50" "$b50"
  done
done
python3 -c 'import json,sys,urllib.request; s=json.load(urllib.request.urlopen(sys.argv[1]))
print("batches: %d queries in %d batches (mean %.1f)" % (s["batched_queries"], s["batches"], s["batched_queries"] / max(1, s["batches"])))' "$BURL/api/status"
kill -TERM "$SPID"; wait "$SPID" || true
URL=$BURL SPID=$BPID

# --stdin: NQ queries piped at once; seconds of a run less an empty stdin's (the model load)
NQ=${NQ:-48}
for i in $(seq 0 $((NQ - 1))); do echo "${QUERIES[$((i % ${#QUERIES[@]}))]}"; done >"$T/stdin.txt"
stdin_s() { # stdin_s BATCH RERANK FILE -> seconds
  local t0 t1
  t0=$(date +%s.%N)
  "$BIN/blip-query" --db "$T/db" --model "$MODEL" --stdin --json -n 20 --rerank "$2" --batch "$1" <"$3" >/dev/null 2>&1 || true
  t1=$(date +%s.%N)
  python3 -c 'import sys; print("%.3f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$t0" "$t1"
}
printf '\nblip-query --stdin, %d queries piped at once, best of %d interleaved runs (model load subtracted)\n' "$NQ" "$REPS"
printf '%-10s %14s %14s %8s\n' rerank "q/s --batch 1" "q/s --batch 16" ratio
: >"$T/empty"
for k in 16 4 0; do
  e=() one=() b16=()
  for _ in $(seq "$REPS"); do
    e+=("$(stdin_s 1 "$k" "$T/empty")")
    one+=("$(stdin_s 1 "$k" "$T/stdin.txt")")
    b16+=("$(stdin_s 16 "$k" "$T/stdin.txt")")
  done
  python3 -c '
import sys
n, reps = int(sys.argv[1]), int(sys.argv[2])
v = [float(x) for x in sys.argv[4:]]
e, one, b = min(v[:reps]), min(v[reps:2 * reps]), min(v[2 * reps:])
q1, q16 = n / max(one - e, 1e-3), n / max(b - e, 1e-3)
print("%-10s %14.2f %14.2f %8s" % (sys.argv[3], q1, q16, "x%.2f" % (q16 / q1)))' "$NQ" "$REPS" "$k" "${e[@]}" "${one[@]}" "${b16[@]}"
done
}
best() { # best "LINE" "LINE"...: the one with the most req/s
  printf '%s\n' "$@" | sort -k1,1 -g -r | head -n1
}
if [ -n "${BATCH_ONLY:-}" ]; then
  batching
  echo
  echo "failed requests in all runs: $total_fail"
  kill -TERM "$SPID"; wait "$SPID" || true; SPID=
  exit 0
fi
printf '\n%-26s %6s %10s %10s %10s %9s %6s\n' "text search" conns "req/s" "p50 ms" "p99 ms" requests fails
for k in 16 0; do
  for c in 1 4 16; do
    read -r rps p50 p99 n f < <(run "$c" "$URL/api/search?$Q&rerank=$k")
    printf '%-26s %6d %10s %10s %10s %9s %6s\n' "rerank $k" "$c" "$rps" "$p50" "$p99" "$n" "$f"
    total_fail=$((total_fail + f))
  done
done

batching

# RSS across at least RSS_N requests with rerank 0, then as many with rerank 4
r0=$(rss); n_all=0
while [ "$n_all" -lt "$RSS_N" ]; do
  read -r _ _ _ n f < <(run 4 "$URL/api/search?$Q&rerank=0" 4)
  n_all=$((n_all + n)); total_fail=$((total_fail + f))
done
r1=$(rss)
while [ "$n_all" -lt $((2 * RSS_N)) ]; do
  read -r _ _ _ n f < <(run 4 "$URL/api/search?$Q&rerank=4" 4)
  n_all=$((n_all + n)); total_fail=$((total_fail + f))
done
r2=$(rss)
printf '\nRSS: %d KiB at start, %d KiB after %d+ requests, %d KiB after %d\n' "$r0" "$r1" "$RSS_N" "$r2" "$n_all"

# while blip-index adds photos, then is SIGKILLed mid-run
cp -r "$T/more" "$T/lib/more"
"$BIN/blip-index" --db "$T/db" --model "$MODEL" --precision "${PREC:-f32}" "$T/lib" 2>/dev/null & IPID=$!
read -r rps p50 p99 n f < <(run 4 "$URL/api/search?$Q&rerank=16" 4)
kill -9 "$IPID" 2>/dev/null || true; wait "$IPID" 2>/dev/null || true
printf '\nwhile blip-index adds %d photos:' "$MORE"; printf ' %s req/s, p50 %s ms, p99 %s ms, %s requests, %s failed\n' "$rps" "$p50" "$p99" "$n" "$f"
total_fail=$((total_fail + f))
mkdir -p "$T/lib/more2" && "$BIN/gen_photos" "$T/lib/more2" "$MORE" --size 64x64 --seed 4 --start 200000 >/dev/null
"$BIN/blip-index" --db "$T/db" --model "$MODEL" --precision "${PREC:-f32}" "$T/lib" 2>/dev/null & IPID=$!
( sleep 1; kill -9 "$IPID" 2>/dev/null ) &
read -r rps p50 p99 n f < <(run 4 "$URL/api/search?$Q&rerank=16" 4)
wait "$IPID" 2>/dev/null || true
printf 'blip-index SIGKILLed after 1 s:   %s req/s, p50 %s ms, p99 %s ms, %s requests, %s failed\n' "$rps" "$p50" "$p99" "$n" "$f"
total_fail=$((total_fail + f))
count=$(python3 -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1]))["count"])' "$URL/api/status")
echo "index after the kill: $count photos searchable (consistent: every committed batch)"

# slow loris: 40 connections trickling one header byte a second
python3 - "$URL" 40 25 <<'EOF' &
import socket, sys, time
host, port = sys.argv[1].split("//")[1].split(":")
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
    socks.append(s)
end = time.time() + float(sys.argv[3])
while time.time() < end:
    for s in socks:
        try:
            s.sendall(b"X")
        except OSError:
            pass
    time.sleep(1)
EOF
LPID=$!
sleep 2
read -r rps p50 p99 n f < <(run 4 "$URL/api/search?$Q&rerank=16" 8)
printf '\nwith 40 slow-loris connections open: %s req/s, p50 %s ms, p99 %s ms, %s requests, %s failed\n' "$rps" "$p50" "$p99" "$n" "$f"
total_fail=$((total_fail + f))
kill "$LPID" 2>/dev/null || true; wait "$LPID" 2>/dev/null || true
echo
echo "failed requests in all runs: $total_fail"
kill -TERM "$SPID"; wait "$SPID" || true; SPID=
echo "log lines: $(grep -c ' ms' "$T/log") (one a request)"
