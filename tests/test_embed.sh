#!/usr/bin/env bash
# test_embed: blip-embed end to end on the blip-tiny fixture. Its --json
# ITC and ITM numbers must equal the upstream golden ones, for both ITM
# first-token conventions and both ITM paths; --reference decodes as PIL;
# bad invocations fail cleanly.
set -u
B=${BLIP_BIN:-build}; D=${BLIP_TEST_DATA:-tests/data}
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
# run CMD... as a check named after itself
want() { check "$*" "$@"; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

caps=()
while IFS= read -r line; do caps+=(--text "$line"); done < <(python3 -c 'import json,sys; [print(c) for c in json.load(open(sys.argv[1]))]' "$D/blip-tiny/captions.json")

for ft in enc cls; do
  for path in fast naive; do
    extra=(); [ $path = naive ] && extra=(--naive-itm)
    "$B/blip-embed" --model "$D/blip-tiny" --pixels "$D/blip-tiny/golden.safetensors:pixel_values" "${caps[@]}" \
      --itm --itm-first-token $ft "${extra[@]}" --json >"$tmp/out.json" 2>"$tmp/err"
    want test $? -eq 0
    gold=itm_logits; [ $ft = enc ] && gold=itm_logits_enc
    want python3 - "$tmp/out.json" "$D/blip-tiny/golden.safetensors" $gold <<'PY'
import json, sys
import testlib as st
out = json.load(open(sys.argv[1]))
g = st.read(sys.argv[2])
def tensor(name): return list(g[name][2])
def flat(x): return [v for r in x for v in (flat(r) if isinstance(r, list) else [r])]
worst = 0
for key, gold in (('itc', 'itc_sim'), ('itm_logits', sys.argv[3]), ('image_feat', 'image_feat'), ('text_feat', 'text_feat')):
    a, b = flat(out[key]), tensor(gold)
    assert len(a) == len(b), (key, len(a), len(b))
    d = max(abs(x - y) for x, y in zip(a, b)); worst = max(worst, d)
    print(f"  blip-embed {key:11s} vs {gold:15s} max|diff| {d:.2e}")
gid = g['input_ids'][2]
for j, row in enumerate(out['input_ids']):
    assert list(gid[j * 35: j * 35 + len(row)]) == row, ('input_ids', j)
sys.exit(0 if worst <= 2e-5 else 1)
PY
  done
done

# --image decodes with the image pipeline: fixture images 2 and 3 are astronaut.png and chelsea.png,
# preprocessed by HF at size 32, so the features must equal the golden rows.
"$B/blip-embed" --model "$D/blip-tiny" --image "$D/preprocess/images/astronaut.png" \
  --image "$D/preprocess/images/chelsea.png" --json >"$tmp/img.json"
want test $? -eq 0
want python3 - "$tmp/img.json" "$D/blip-tiny/golden.safetensors" <<'PY'
import json, sys
import testlib as st
out = json.load(open(sys.argv[1]))
g = st.read(sys.argv[2])['image_feat'][2][32:]
d = max(abs(x - y) for x, y in zip([v for r in out['image_feat'] for v in r], g))
print(f"  blip-embed --image vs golden image_feat[2:4] max|diff| {d:.2e}")
sys.exit(0 if d <= 2e-5 else 1)
PY
# --reference decodes as PIL does: a CMYK JPEG and a 16-bit grey PNG must give the features of
# PNGs holding PIL's convert("RGB") of them (tests/data/pil-cases), and the product mode must not.
want python3 - "$D/pil-cases/expected.safetensors" "$tmp" <<'PY'
import sys
import testlib as st
g = st.read(sys.argv[1])
for f in ("cmyk_adobe.jpg", "grey16.png"):
    _, shape, v = g["ref." + f]
    st.write_png(f"{sys.argv[2]}/{f}.png", shape[1], shape[0], bytes(v))
PY
for mode in --reference ""; do
  "$B/blip-embed" --model "$D/blip-tiny" $mode --image "$D/pil-cases/cmyk_adobe.jpg" --image "$tmp/cmyk_adobe.jpg.png" \
    --image "$D/pil-cases/grey16.png" --image "$tmp/grey16.png.png" --json >"$tmp/ref.json"
  want test $? -eq 0
  want python3 - "$tmp/ref.json" "${mode:-product}" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))["image_feat"]
same = [f[0] == f[1], f[2] == f[3]]
print(f"  blip-embed {sys.argv[2]}: features equal to PIL's pixels: {same}")
sys.exit(0 if same == ([True, True] if sys.argv[2] == "--reference" else [False, False]) else 1)
PY
done
"$B/blip-embed" --model "$D/blip-tiny" --image "$tmp/missing.jpg" 2>"$tmp/err"; want test $? -eq 1
want grep -q 'missing.jpg' "$tmp/err"

"$B/blip-embed" --help | grep -q 'usage: blip-embed'; want test $? -eq 0
"$B/blip-embed" --model "$tmp/nope" --text x 2>"$tmp/err"; want test $? -eq 1
want grep -q 'config.json' "$tmp/err"
"$B/blip-embed" --model "$D/blip-tiny" 2>/dev/null; want test $? -eq 2
"$B/blip-embed" --model "$D/blip-tiny" --pixels "$D/blip-tiny/golden.safetensors:input_ids" 2>"$tmp/err"; want test $? -eq 1
want grep -q 'must be F32' "$tmp/err"
tally
