#!/bin/bash
# test_serve_browser: blip-serve's page in two real browsers, Debian's chromium
# and firefox-esr, both driven by puppeteer-core through one scenario
# (tests/browser/serve.test.mjs, run once per browser): a text query and
# its thumbnails, details on focus, "load more", the lightbox with arrows and
# Esc, "more like this", the date filter, no-match and error messages, a
# photo upload, an empty index, a server with a token (the page trades it for
# an HttpOnly session cookie), and a file named <img src=x onerror=alert(1)>.jpg
# shown as text with no script run. Screenshots go to
# BLIP_BIN/serve-screenshots/{chromium,firefox}. When a browser, node or
# puppeteer-core is missing, or a browser cannot start, the test FAILS and says why.
set -u
BIN=$(cd "${BLIP_BIN:-build}" && pwd)
DATA=$(cd "${BLIP_TEST_DATA:-tests/data}" && pwd)
SRC=$(cd "${BLIP_SRC:-.}" && pwd)
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_browser.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"

declare -A EXE=([chromium]=${BLIP_CHROMIUM:-/usr/bin/chromium} [firefox]=${BLIP_FIREFOX:-/usr/bin/firefox-esr})
if ! command -v node >/dev/null; then bad "node is not installed (scripts/install-deps.sh installs it)"; tally; exit; fi
for b in chromium firefox; do
  [ -x "${EXE[$b]}" ] || bad "no $b at ${EXE[$b]} (scripts/install-deps.sh installs Debian's chromium and firefox-esr)"
done
if [ ! -d "$SRC/tests/browser/node_modules/puppeteer-core" ]; then
  bad "puppeteer-core is not installed: run (cd tests/browser && npm ci), as scripts/install-deps.sh does"; tally; exit
fi

L=$T/lib
mkdir -p "$L/a" "$L/ab" "$L/b"
"$BIN/gen_photos" "$L/a" 30 --size 120x90 >/dev/null || bad "gen_photos"
"$BIN/gen_photos" "$L/ab" 11 --size 80x80 --seed 5 >/dev/null
"$BIN/gen_photos" "$L/b" 4 --size 64x64 --seed 2 --ext png >/dev/null
"$BIN/gen_photos" "$T" 1 --size 90x60 --seed 7 --start 99 >/dev/null && mv "$T/img00099.jpg" "$L/ab/<img src=x onerror=alert(1)>.jpg"
touch -d 2021-06-01T12:00:00 "$L"/a/*
touch -d 2022-02-02T12:00:00 "$L"/ab/*
touch -d 2023-03-15T12:00:00 "$L"/b/*
"$BIN/blip-index" --db "$T/db" --model "$MODEL" "$L" 2>/dev/null && ok || bad "index"

start() { # start DB LOG [OPTION...]: the server's URL in $URL (not a subshell: PIDS must see the pid)
  "$BIN/blip-serve" --db "$1" --model "$MODEL" --listen 127.0.0.1:0 "${@:3}" >"$2.out" 2>"$2" &
  PIDS+=($!)
  for _ in $(seq 600); do grep -q "listening on" "$2.out" 2>/dev/null && break; sleep 0.1; done
  URL=$(sed -n 's|.*listening on \(http://[0-9.:]*\)/.*|\1|p' "$2.out")
}
start "$T/no-index" "$T/empty.log"
EMPTY=$URL
export BLIP_TEST_TOKEN=browser-test-token-0123456789
echo "$BLIP_TEST_TOKEN" >"$T/token"
start "$T/db" "$T/token.log" --token-file "$T/token"
TOKEN=$URL
start "$T/db" "$T/serve.log"
[[ $URL && $EMPTY && $TOKEN ]] && ok || bad "servers did not start: $(cat "$T/serve.log" "$T/empty.log" "$T/token.log")"

for b in chromium firefox; do
  SHOTS=$BIN/serve-screenshots/$b
  mkdir -p "$SHOTS"
  (cd "$SRC/tests/browser" && node serve.test.mjs "$b" "$URL" "$EMPTY" "$TOKEN" "$L" "$SHOTS") && ok || bad "$b: browser checks (see FAIL lines above)"
done
for p in "${PIDS[@]}"; do kill -TERM "$p"; wait "$p" && ok || bad "blip-serve $p: exit status $?"; done
PIDS=()
grep -q "GET /api/search 200 " "$T/serve.log" && ok || bad "no request log"
! grep -E "AddressSanitizer|LeakSanitizer|runtime error:" "$T/serve.log" "$T/empty.log" "$T/token.log" && ok || bad "sanitizer report"
tally
