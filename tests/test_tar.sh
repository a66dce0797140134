#!/bin/bash
# test_tar: webdataset .tar shards as input (blip_tar): rows TAR#MEMBER with
# their KEY.txt captions, features equal to the same images indexed as loose
# files, no work on a re-run, only changed members redone in a changed tar,
# a deleted tar's rows deleted, a tar given as a root, queries by a member.
set -u
BIN=${BLIP_BIN:-build}
DATA=${BLIP_TEST_DATA:-tests/data}
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_tar.XXXXXX)
trap 'rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
idx() { local db=$1; shift; "$BIN/blip-index" --db "$db" --model "$MODEL" --json "$@"; }
feat() { "$BIN/blip-index" --db "$1" --dump | awk -F'\t' -v OFS='\t' '{ sub(/.*[\/#]/, "", $1); print $1, $3, $4 }' | sort; }

# loose images: 3 jpg, 2 png, 2 webp (distinct keys)
L=$T/loose
mkdir -p "$L" "$T/lib"
"$BIN/gen_photos" "$L" 3 --size 96x72 >/dev/null || bad gen_photos
"$BIN/gen_photos" "$L" 2 --size 64x80 --seed 2 --ext png --start 3 >/dev/null
"$BIN/gen_photos" "$L" 2 --size 80x64 --seed 3 --ext webp --start 5 >/dev/null
"$BIN/gen_photos" "$T/alt" 1 --size 96x72 --seed 9 --start 1 >/dev/null

# mk TAR [REPLACE_1] [CAPTION_0]: the shard img2dataset would write from the loose images, with
# captions, metadata, a corrupt image and a member that is not an image
mk() {
  python3 - "$L" "$1" "${2:-}" "${3:-a red barn}" <<'PY'
import io, json, os, sys, tarfile
src, out, repl, cap0 = sys.argv[1:5]
def add(t, name, data):
    i = tarfile.TarInfo(name); i.size = len(data); i.mtime = 1700000000
    t.addfile(i, io.BytesIO(data))
with tarfile.open(out + '.tmp', 'w', format=tarfile.GNU_FORMAT) as t:
    for f in sorted(os.listdir(src)):
        key = f.split('.')[0]
        path = repl if (repl and key == 'img00001') else os.path.join(src, f)
        add(t, f, open(path, 'rb').read())
        add(t, key + '.txt', (cap0 if key == 'img00000' else 'caption of ' + key).encode())
        add(t, key + '.json', json.dumps({'key': key}).encode())
    add(t, 'img00007.jpg', b'\xff\xd8\xff\xe0 not really a jpeg' * 10)
    add(t, 'img00007.txt', b'broken')
    add(t, 'README.md', b'not an image')
    add(t, 'img00002.jpg', open(os.path.join(src, 'img00002.jpg'), 'rb').read())  # a name twice (tar -r)
os.replace(out + '.tmp', out)
PY
}
mk "$T/lib/00000.tar"
mkdir -p "$T/two" && cp "$L/img00000.jpg" "$L/img00003.png" "$T/two/"
python3 -c "
import tarfile, sys
with tarfile.open(sys.argv[1], 'w') as t:
    for f in ('img00000.jpg', 'img00003.png'): t.add(sys.argv[2] + '/' + f, arcname='x' + f)
" "$T/lib/00001.tar" "$T/two"

# (LeakSanitizer does not run under ptrace)
opens() { grep -c "open.*$1\"" "$T/strace"; } # openat calls of a tar
out=$(ASAN_OPTIONS=detect_leaks=0 strace -f -qq -e trace=openat -o "$T/strace" "$BIN/blip-index" --db "$T/db" --model "$MODEL" --json \
      --threads 2 "$T/lib" 2>"$T/err") || bad "first run exit $?: $(cat "$T/err")"
expect first "$out" added=9 failed=1 deleted=0
P=$(realpath "$T/lib")/00000.tar
# streamed: the walk reads the tar once, each decoding thread once more, forward (not once per member)
n=$(opens 00000.tar); (( n >= 2 && n <= 3 )) && ok || bad "00000.tar opened $n times for 8 members on 2 threads"
"$BIN/blip-index" --db "$T/db" --dump | cut -f1,3 | sort > "$T/rows"
grep -qxF "$P#img00005.webp	ok" "$T/rows" && ok || bad "no row $P#img00005.webp: $(cat "$T/rows")"
grep -qxF "$P#img00007.jpg	error" "$T/rows" && ok || bad "corrupt member not an error row"
n=$(grep -c -e README -e json -e txt "$T/rows"); [[ $n == 0 ]] && ok || bad "$n non-image members indexed"
"$BIN/blip-index" --db "$T/db" --check >/dev/null && ok || bad "check"

# features equal those of the same images indexed as loose files
idx "$T/dbl" "$L" >/dev/null 2>&1 || bad "loose index"
feat "$T/dbl" > "$T/fl"
feat "$T/db" | grep -v -e '^ximg' -e '^img00007' > "$T/ft"
[[ -s $T/fl ]] && cmp -s "$T/fl" "$T/ft" && ok || bad "tar features differ from loose: $(diff "$T/fl" "$T/ft" | head -c 600)"

# captions are returned by queries, and searchable
q() { "$BIN/blip-query" --db "$T/db" --model "$MODEL" --json -n 20 "$@"; }
j=$(q "a photo" 2>"$T/qerr") || bad "query exit: $(cat "$T/qerr")"
python3 -c "
import json, sys
r = {h['path']: h['caption'] for h in json.loads(sys.argv[1])}
assert r[sys.argv[2] + '#img00000.jpg'] == 'a red barn', r
assert r[sys.argv[2] + '#img00006.webp'] == 'caption of img00006', r
" "$j" "$P" && ok || bad "captions in blip-query --json: $j"
j=$(q --words "barn" "a photo") && [[ $j == *"$P#img00000.jpg"* && $j != *img00001* ]] && ok || bad "--words barn: $j"

# a member as the query image: it finds itself first (read from inside the tar)
j=$(q -n 1 --image "$P#img00004.png") && [[ $j == *"\"path\":\"$P#img00004.png\""* || $j == *"\"path\": \"$P#img00004.png\""* ]] \
  && ok || bad "--image TAR#MEMBER: $j"
# the rerank recomputes a member's tokens from the tar when the index stores none
idx "$T/dbn" --no-rerank-store "$T/lib" >/dev/null 2>&1 || bad "no-rerank-store index"
j=$("$BIN/blip-query" --db "$T/dbn" --model "$MODEL" --json -n 3 --rerank 3 "a red barn" 2>"$T/qerr") \
  && [[ $j == *'#img0000'* && $j == *itm_logit* ]] && ok || bad "rerank from the tar: $j $(cat "$T/qerr")"

# --captions captions the members that came without a KEY.txt (00001.tar's), reading them from the tar
out=$(idx "$T/dbc" --captions --caption-model "$DATA/blip-caption-tiny" "$T/lib" 2>"$T/err") || bad "captions exit: $(cat "$T/err")"
expect captions "$out" captioned=2 caption_failed=0

# re-run: nothing read again, no work
out=$(ASAN_OPTIONS=detect_leaks=0 strace -f -qq -e trace=openat -o "$T/strace" "$BIN/blip-index" --db "$T/db" --model "$MODEL" --json "$T/lib") \
  || bad "rerun exit"
expect rerun "$out" added=0 updated=0 moved=0 deleted=0 unchanged=10 failed=1
n=$(opens '0000[01].tar'); [[ $n == 0 ]] && ok || bad "unchanged tars opened $n times"

# a changed tar: only the changed member is embedded again; a changed caption is updated
"$BIN/blip-index" --db "$T/db" --dump > "$T/d0"
mk "$T/lib/00000.tar" "$T/alt/img00001.jpg" "a blue boat"
touch -d "2020-01-01" "$T/lib/00000.tar"
out=$(idx "$T/db" "$T/lib") || bad "changed tar exit"
expect changed "$out" added=0 updated=1 deleted=0 unchanged=9 failed=1
"$BIN/blip-index" --db "$T/db" --dump > "$T/d1"
c=$(diff <(cut -f1,2,4 "$T/d0") <(cut -f1,2,4 "$T/d1") | grep -c '^>')
[[ $c == 1 ]] && grep -q "#img00001.jpg" <(diff "$T/d0" "$T/d1") && ok || bad "rows changed: $c"
j=$(q --words "boat" "a photo") && [[ $j == *"$P#img00000.jpg"* ]] && ok || bad "changed caption: $j"

# blip-serve serves a member from inside its tar, and its thumbnail
PYTHONPATH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd) python3 - "$BIN" "$MODEL" "$T" "$P" "$L" <<'PY' && ok || bad "blip-serve of a member"
import json, subprocess, sys
from serve_lib import Server
BIN, MODEL, T, P, L = sys.argv[1:6]
ids = {h["path"]: h["id"] for h in json.loads(subprocess.check_output(
    [BIN + "/blip-query", "--db", T + "/db", "--model", MODEL, "--json", "-n", "20", "a photo"]))}
s = Server(BIN + "/blip-serve", T + "/db", MODEL, log=T + "/serve.log")
try:
    st, h, d = s.get("/api/photo/%d" % ids[P + "#img00004.png"])
    assert st == 200 and d == open(L + "/img00004.png", "rb").read() and h.get("content-type") == "image/png", (st, h)
    st, h, d = s.get("/api/thumb/%d" % ids[P + "#img00005.webp"])
    assert st == 200 and d[:3] == b"\xff\xd8\xff", (st, h, d[:40])
finally:
    s.stop()
PY
# a deleted tar deletes its rows
rm "$T/lib/00001.tar"
out=$(idx "$T/db" "$T/lib") || bad "deleted tar exit"
expect deleted "$out" deleted=2 added=0 updated=0

# a tar given as a root
out=$(idx "$T/db2" "$P") || bad "tar root exit"
expect root "$out" added=7 failed=1
out=$(idx "$T/db2" "$P") && expect root-rerun "$out" unchanged=8 added=0 deleted=0

# a tar cut short (a copy in progress): what was read is kept, the members past the cut go offline, none deleted
sz=$(stat -c %s "$P"); truncate -s $((sz / 2)) "$P"; touch -d 2021-01-01 "$P"
out=$(idx "$T/db2" "$P" 2>"$T/err") || bad "cut tar exit"
expect cut "$out" deleted=0 skipped=1
off=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["offline"])' "$out")
(( off > 0 && off < 8 )) && ok || bad "cut tar: $off offline: $out"

tally
