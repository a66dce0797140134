#!/usr/bin/env bash
# test_caption_cli: blip-caption end to end on the blip-caption-tiny fixture.
# Every generate() setting of generated.json, run through the tool's flags on
# the golden pixels, prints the upstream ids and text; the fixture's photos
# decoded by the tool (PIL-exact path) give the same captions; seeded
# sampling repeats; a folder holding only pytorch_model.bin works; bad
# invocations fail with a message.
set -u
B=${BLIP_BIN:-build}; D=${BLIP_TEST_DATA:-tests/data}
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
want() { check "$*" "$@"; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
M=$D/blip-caption-tiny
PX=$M/golden.safetensors:pixel_values

compare() { # compare SETTING JSONL
  python3 - "$M/generated.json" "$1" "$2" <<'PY'
import json, sys
gen = json.load(open(sys.argv[1]))["settings"][sys.argv[2]]["f32"]
out = [json.loads(l) for l in open(sys.argv[3])]
assert len(out) == len(gen), (len(out), len(gen))
for i, (o, g) in enumerate(zip(out, gen)):
    assert o["ids"] == g["ids"], (sys.argv[2], i, o["ids"], g["ids"])
    assert o["text"] == g["text"], (sys.argv[2], i, o["text"], g["text"])
    if "sequences_score" in g:
        assert abs(o["score"] - g["sequences_score"]) < 1e-4, (o["score"], g["sequences_score"])
print(f"  {sys.argv[2]}: {len(out)} captions identical")
PY
}

P=(--prompt "a picture of")
while read -r name args; do
  eval "extra=($args)"
  "$B/blip-caption" --model "$M" --pixels "$PX" --json "${extra[@]}" >"$tmp/$name.jsonl" 2>"$tmp/err"
  want test $? -eq 0
  want compare "$name" "$tmp/$name.jsonl"
done <<'EOF2'
greedy
greedy_prompt --prompt "a picture of"
beam3 --beams 3 --max-length 20 --min-length 5
beam3_prompt --prompt "a picture of" --beams 3 --min-length 5
beam3_prompt_rep --prompt "a picture of" --beams 3 --min-length 5 --repetition-penalty 1.1
greedy_rep --repetition-penalty 1.5
beam3_prompt_blipdefault --prompt "a picture of" --beams 3 --max-length 30 --min-length 10
EOF2

# the photos themselves, decoded and resized by the tool as the reference's PIL path does
I=$D/preprocess/images
for mode in --reference "--no-autorotate --no-color-manage"; do
  "$B/blip-caption" --model "$M" $mode --json \
    --image "$I/astronaut.png" --image "$I/chelsea.png" --image "$I/rocket.jpg" >"$tmp/files.jsonl" 2>"$tmp/err"
  want test $? -eq 0
  want compare greedy "$tmp/files.jsonl"
done
"$B/blip-caption" --model "$M" --image "$I/rocket.jpg" >"$tmp/plain.txt"
want grep -q "rocket.jpg	" "$tmp/plain.txt"

# a PyTorch-only checkpoint folder (pytorch_model.bin, no safetensors) captions the same
mkdir "$tmp/pt"
for f in config.json vocab.txt pytorch_model.bin; do ln -s "$(cd "$M" && pwd)/$f" "$tmp/pt/$f"; done
"$B/blip-caption" --model "$tmp/pt" --pixels "$PX" --json --prompt "a picture of" --beams 3 --min-length 5 >"$tmp/pt.jsonl" 2>"$tmp/err"
want test $? -eq 0
want compare beam3_prompt "$tmp/pt.jsonl"

# seeded sampling: reproducible; another seed is allowed to differ
for s in 1 2; do "$B/blip-caption" --model "$M" --pixels "$PX" --sample --top-p 0.9 --seed 5 --json >"$tmp/s$s.jsonl"; done
want cmp -s "$tmp/s1.jsonl" "$tmp/s2.jsonl"

# --no-repeat-ngram 1: no id twice (greedy image 2 repeats one without it)
"$B/blip-caption" --model "$M" --pixels "$PX" --json --no-repeat-ngram 1 >"$tmp/ngram.jsonl"
want python3 -c 'import json,sys; [exit(1) for l in open(sys.argv[1]) if len(set(json.loads(l)["ids"])) != len(json.loads(l)["ids"])]' "$tmp/ngram.jsonl"

# errors
"$B/blip-caption" --model "$D/blip-tiny" --pixels "$D/blip-tiny/golden.safetensors:pixel_values" >/dev/null 2>"$tmp/err"
want test $? -eq 1
want grep -q "not a captioning model" "$tmp/err"
"$B/blip-caption" --model "$M" --pixels "$PX" --beams 0 >/dev/null 2>"$tmp/err"
want test $? -eq 2
"$B/blip-caption" --model "$M" --pixels "$PX" --sample --beams 3 >/dev/null 2>"$tmp/err"
want test $? -eq 1
want grep -q "beam sample" "$tmp/err"
"$B/blip-caption" --model "$M" --pixels "$M/golden.safetensors:nope" >/dev/null 2>"$tmp/err"
want test $? -eq 1
"$B/blip-caption" --model "$M" --image /nonexistent.jpg >/dev/null 2>"$tmp/err"
want test $? -eq 1
"$B/blip-caption" --help >/dev/null
want test $? -eq 0
tally
