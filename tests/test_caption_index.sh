#!/usr/bin/env bash
# test_caption_index: captions in the index. blip-index --captions captions
# the fixture photos exactly as upstream generate() does, only new or changed
# photos on later runs (an index built without captions gets them on the
# next --captions run); the captions are searchable with blip-query --words
# (FTS5, pushed into the search as a filter) and printed with the results;
# photos that are offline (missing root) wait instead of failing;
# another captioner is refused until --recaption.
set -u
B=${BLIP_BIN:-build}; D=${BLIP_TEST_DATA:-tests/data}
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
want() { check "$*" "$@"; }
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
CAP=$D/blip-caption-tiny
L=$T/lib; mkdir -p "$L"
cp "$D/preprocess/images/astronaut.png" "$D/preprocess/images/chelsea.png" "$D/preprocess/images/rocket.jpg" "$L/"
idx() { "$B/blip-index" --db "$T/db" --model "$D/blip-tiny" --json "$@" "$L"; }
q() { "$B/blip-query" --db "$T/db" --model "$D/blip-tiny" "$@"; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2]))' "$1" "$2"; }
captions() { python3 - "$T/db/index.sqlite" <<'PY'
import sqlite3, sys
for p, c in sqlite3.connect(sys.argv[1]).execute("SELECT path, caption FROM images ORDER BY path"):
    print(p.rsplit("/", 1)[1] + "\t" + str(c))
PY
}

# an index without captions first: the caption pass later picks all of them up
out=$(idx 2>"$T/err"); want test "$(field "$out" added)" = 3
want test "$(captions | grep -c None)" = 3
out=$(idx --captions --caption-model "$CAP" 2>"$T/err")
want test "$(field "$out" captioned)" = 3
# the upstream greedy captions of these photos (generated.json), through the indexer's decoding;
# rocket.jpg carries a colour profile, which the indexer (like blip-caption by default) applies
# and the PIL reference does not: its caption equals blip-caption's
"$B/blip-caption" --model "$CAP" --json --image "$L/rocket.jpg" >"$T/rocket.json"
python3 - "$CAP/generated.json" <(captions) "$T/rocket.json" <<'PY' && ok || bad "captions differ from generate()"
import json, sys
want = [g["text"] for g in json.load(open(sys.argv[1]))["settings"]["greedy"]["f32"]]
want[2] = json.load(open(sys.argv[3]))["text"]
names = ["astronaut.png", "chelsea.png", "rocket.jpg"]
got = dict(l.rstrip("\n").split("\t", 1) for l in open(sys.argv[2]))
for n, w in zip(names, want):
    assert got[n] == w, (n, got[n], w)
print("  indexed captions equal upstream generate():", [got[n] for n in names])
PY
out=$(idx --captions --caption-model "$CAP" 2>"$T/err")
want test "$(field "$out" captioned)" = 0

# --words: FTS5 over the captions, as a filter of the search, caption in every result
out=$(q --json --words "mold" "a cat" 2>"$T/err")
want test $? -eq 0
want python3 -c 'import json,sys; r=json.loads(sys.argv[1]); assert len(r)==1 and r[0]["path"].endswith("chelsea.png") and r[0]["caption"]=="password mold", r' "$out"
out=$(q --json --words "MOLD password" "a cat")   # every word, any order and case
want python3 -c 'import json,sys; r=json.loads(sys.argv[1]); assert len(r)==1, r' "$out"
out=$(q --json "a photo")
want python3 -c 'import json,sys; r=json.loads(sys.argv[1]); assert len(r)==3 and all(h["caption"] for h in r), r' "$out"
q --words "winners" "a photo" >"$T/table"
want grep -q '"winners"' "$T/table"
q --words 'nothing"like OR this*' "x" >/dev/null 2>"$T/err"   # FTS5 syntax in the words is text, not a query
want test $? -eq 1

# a changed photo gets a new caption; a deleted one leaves the FTS index too
cp "$D/preprocess/images/astronaut.png" "$L/rocket.jpg"
out=$(idx --captions --caption-model "$CAP" 2>"$T/err")
want test "$(field "$out" updated)" = 1
want test "$(field "$out" captioned)" = 1
want test "$(captions | grep rocket | cut -f2)" = winners
rm "$L/chelsea.png"
out=$(idx --captions --caption-model "$CAP" 2>"$T/err")
out=$(q --json --words "mold" "a cat" 2>"$T/err")
want test $? -eq 1

# a photo under a missing root (an unplugged drive) is offline: the caption pass waits for it
mkdir "$T/lib2" && cp "$D/preprocess/images/chelsea.png" "$T/lib2/"
"$B/blip-index" --db "$T/db" --model "$D/blip-tiny" "$L" "$T/lib2" >/dev/null 2>&1
mv "$T/lib2" "$T/lib2.away"
out=$("$B/blip-index" --db "$T/db" --model "$D/blip-tiny" --json --captions --caption-model "$CAP" "$L" "$T/lib2" 2>"$T/err")
want test "$(field "$out" offline)" = 1
want test "$(field "$out" caption_failed)" = 0
mv "$T/lib2.away" "$T/lib2"
out=$("$B/blip-index" --db "$T/db" --model "$D/blip-tiny" --json --captions --caption-model "$CAP" "$L" "$T/lib2" 2>"$T/err")
want test "$(field "$out" captioned)" = 1

# another captioner (the F16 weights) is refused until --recaption
mkdir "$T/cap16"
for f in config.json vocab.txt; do ln -s "$(cd "$CAP" && pwd)/$f" "$T/cap16/$f"; done
ln -s "$(cd "$CAP" && pwd)/model-f16.safetensors" "$T/cap16/model.safetensors"
idx --captions --caption-model "$T/cap16" >/dev/null 2>"$T/err"
want test $? -eq 1
want grep -q -- "--recaption" "$T/err"
out=$(idx --recaption --caption-model "$T/cap16" 2>"$T/err")   # two photos under $L, one under lib2
want test "$(field "$out" captioned)" = 3
# a retrieval model is no captioner
idx --captions --caption-model "$D/blip-tiny" >/dev/null 2>"$T/err"
want test $? -eq 1
want grep -q "not a captioning model" "$T/err"
"$B/blip-index" --db "$T/db" --check >/dev/null
want test $? -eq 0
tally
