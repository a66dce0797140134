#!/bin/bash
# test_serve: blip-serve's JSON API end to end on generated photos and the
# tiny model, against a server started here on an ephemeral loopback port:
# every endpoint, parity with blip-query --json (scores and order, every
# filter, paging), thumbnails and 304s, clip-retrieval requests shaped as
# ClipClient sends them, the live index (blip-index adds and --rebuild while
# the server runs), the security rules (traversal, NUL, symlinks, swapped
# files, token, CORS, headers, limits, non-loopback refusal) and shutdown.
# The checks are in tests/serve_api.py; this script builds the library.
set -u
BIN=$(cd "${BLIP_BIN:-build}" && pwd)
DATA=$(cd "${BLIP_TEST_DATA:-tests/data}" && pwd)
SRC=$(cd "${BLIP_SRC:-.}" && pwd)
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_serve.XXXXXX)
trap 'rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"

L=$T/lib
mkdir -p "$L/a" "$L/ab" "$L/b" "$T/new"
"$BIN/gen_photos" "$L/a" 6 --size 96x72 >/dev/null || bad "gen_photos"
"$BIN/gen_photos" "$L/ab" 3 --size 80x80 --seed 5 >/dev/null
"$BIN/gen_photos" "$L/b" 4 --size 64x64 --seed 2 --ext png >/dev/null
"$BIN/gen_photos" "$T/new" 3 --size 72x72 --seed 8 --start 50 >/dev/null
"$BIN/gen_photos" "$T" 1 --size 70x50 --seed 9 --start 60 >/dev/null && mv "$T/img00060.jpg" "$T/new/"$'caf\xe9-\xff'.jpg""
touch -d 2021-06-01T12:00:00 "$L"/a/*
touch -d 2022-02-02T12:00:00 "$L"/ab/*
touch -d 2023-03-15T12:00:00 "$L"/b/*
"$BIN/blip-index" --db "$T/db" --model "$MODEL" "$L" 2>/dev/null && ok || bad "index"

PYTHONPATH=$SRC/tests python3 "$SRC/tests/serve_api.py" "$BIN" "$MODEL" "$T" && ok || bad "API checks (see FAIL lines above)"
tally
