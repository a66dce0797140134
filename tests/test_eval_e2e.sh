# test_eval_e2e: blip-eval end to end on a generated 6-image dataset in
# BLIP's annotation format with the tiny fixture model (image_size 32):
#  1. an uninterrupted cached run;
#  2. a run SIGKILLed in the image phase, resumed and SIGKILLed again in the
#     ITM phase, with a corrupted chunk and a stale temp file planted, then
#     resumed to the end: identical figures, and the reused chunk counts
#     prove it resumed rather than recomputed;
#  3. an uncached run: identical figures;
#  4. direct checks on the dumped matrices (python, independent code):
#     sims = cached image feats . cached text feats; each score row holds
#     exactly its top-k sims plus one shared ITM logit, -100 elsewhere; and
#     with k = all (no -100 ties) recall recomputed from the matrices
#     equals the reported figures;
#  5. golden: the fixture's 4 images (32x32, so the resize is the identity)
#     with the captions pre_caption leaves unchanged must score exactly
#     upstream's retrieval_score = ITM [ENC] match logit + ITC sim.
set -euo pipefail
BIN=${BLIP_BIN:-build}
DATA=${BLIP_TEST_DATA:-tests/data}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"

python3 - "$W" <<'PY'
import json, os, sys
from testlib import write_png
root = sys.argv[1]
os.makedirs(f"{root}/img/sub", exist_ok=True)
def png(path, w, h, k):
    write_png(path, w, h, bytes(v for y in range(h) for x in range(w) for v in
                                ((x * (k + 1) * 7) % 256, (y * (k + 2) * 5) % 256, ((x + y) * k * 3 + 40 * k) % 256)))
sizes = [(48, 40), (64, 64), (30, 50), (80, 24), (33, 33), (40, 72)]
caps = [
    ["A red square on a table.", "two dogs running", "a CAT sleeping (quietly)", "the sun over hills", "blue car"],
    ["green field with cows", "a man riding a bike!", "kitchen with a stove", "people at a market", "a boat"],
    ["snow on the mountain", "a child with a kite", "three apples; two pears"],
    ["city street at night", "a bowl of soup"],
    "An old train at the station.",
    ["birds on a wire", "a plate of pasta", "surfer on a wave", "a dog catching a frisbee"],
]
ann = []
for k, (w, h) in enumerate(sizes):
    rel = f"sub/im{k}.png" if k % 2 else f"im{k}.png"
    png(f"{root}/img/{rel}", w, h, k)
    ann.append({"image": rel, "caption": caps[k]})
json.dump(ann, open(f"{root}/ann.json", "w"))
PY

# One thread: the figures do not depend on it, and the test stays fast on busy shared cores.
EVAL=("$BIN/blip-eval" --model "$DATA/blip-tiny" --ann "$W/ann.json" --images "$W/img" --k-test 4 --chunk 2 --json --threads 1)
# q FILE EXPR: evaluate a python expression on the JSON report j (exit 1 when falsy)
q() { python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); r = eval(sys.argv[2])
print(json.dumps(r, sort_keys=True)) if not isinstance(r, bool) else sys.exit(0 if r else 1)' "$1" "$2"; }
FIGS='{k: j.get(k) for k in ("itc", "itm", "itm_pairs", "n_images", "n_texts", "k_test")}'
# 20 captions, 6 images, chunks of 2: 10 text + 3 image + 3 ITM chunk files (ITM chunks are by image).

"${EVAL[@]}" --cache "$W/cA" --dump "$W/k4.st" >"$W/a.json"
q "$W/a.json" 'j["n_images"] == 6 and j["n_texts"] == 20 and j["cached_chunks"] == dict(text=0, images=0, itm=0)' \
  || fail "first run: $(cat "$W/a.json")"

set +e
BLIP_EVAL_KILL_AFTER=11 "${EVAL[@]}" --cache "$W/cB" >/dev/null 2>&1; st1=$?
BLIP_EVAL_KILL_AFTER=4 "${EVAL[@]}" --cache "$W/cB" >/dev/null 2>&1; st2=$?
set -e
[ "$st1" -eq 137 ] && [ "$st2" -eq 137 ] || fail "runs were not killed (status $st1, $st2)"
[ "$(ls "$W/cB" | grep -c '^img-')" -eq 3 ] && [ "$(ls "$W/cB" | grep -c '^itm-')" -eq 2 ] \
  || fail "unexpected chunks after the kills: $(ls "$W/cB" | tr '\n' ' ')"
head -c 10 "$W/cA/txt-000003.safetensors" >"$W/cB/txt-000003.safetensors" # torn chunk: recomputed
echo junk >"$W/cB/itm-000005.safetensors.tmp.99999"                         # killed writer's temp file
"${EVAL[@]}" --cache "$W/cB" >"$W/b.json"
q "$W/b.json" 'j["cached_chunks"] == dict(text=9, images=3, itm=2)' \
  || fail "resume did not reuse the cache: $(q "$W/b.json" 'j["cached_chunks"]')"
[ ! -e "$W/cB/itm-000005.safetensors.tmp.99999" ] || fail "stale temp file left behind"
[ "$(q "$W/a.json" "$FIGS")" = "$(q "$W/b.json" "$FIGS")" ] || fail "resumed figures differ"

"${EVAL[@]}" >"$W/c.json"
[ "$(q "$W/a.json" "$FIGS")" = "$(q "$W/c.json" "$FIGS")" ] || fail "uncached figures differ"
"${EVAL[@]}" --cache "$W/cA" >"$W/a2.json" # fully cached rerun
q "$W/a2.json" 'j["cached_chunks"] == dict(text=10, images=3, itm=3)' || fail "full cache not reused"
[ "$(q "$W/a.json" "$FIGS")" = "$(q "$W/a2.json" "$FIGS")" ] || fail "cached rerun differs"

# Chunks are keyed by their own inputs: a --limit run over the first 4 images
# (15 captions) reuses image chunks 0-1 and text chunks 0-6, nothing else.
cp -r "$W/cA" "$W/cL"
"${EVAL[@]}" --cache "$W/cL" --limit 4 >"$W/lim.json"
q "$W/lim.json" 'j["cached_chunks"] == dict(text=7, images=2, itm=0) and j["n_texts"] == 15' \
  || fail "--limit run reused the wrong chunks: $(q "$W/lim.json" 'j["cached_chunks"]')"
if flock "$W/cL/.lock" "${EVAL[@]}" --cache "$W/cL" >/dev/null 2>"$W/lock.err"; then fail "ran on a locked cache"; fi
grep -q "cache in use" "$W/lock.err" || fail "locked cache: $(cat "$W/lock.err")"

"${EVAL[@]}" --cache "$W/cF" --cache-f16 --dump "$W/f16.st" >"$W/f16.json"
[ "$(q "$W/f16.json" 'j["itc"]')" = "$(q "$W/a.json" 'j["itc"]')" ] || fail "f16 token cache changed ITC figures"
"${EVAL[@]}" --cache "$W/cF" --cache-f16 >"$W/f16b.json"
q "$W/f16b.json" 'j["cached_chunks"] == dict(text=10, images=3, itm=3)' || fail "f16 cache not reused"
cp -r "$W/cF" "$W/cG"
"${EVAL[@]}" --cache "$W/cG" >"$W/f32c.json" # an f32 run must not take the f16 chunks
q "$W/f32c.json" 'j["cached_chunks"]["images"] == 0' || fail "f16 chunks reused for an f32 run"
"${EVAL[@]}" --k-test 1000 --dump "$W/kall.st" >"$W/kall.json"
"${EVAL[@]}" --itc-only >"$W/itc.json"
q "$W/itc.json" '"itm" not in j' || fail "--itc-only reported ITM figures"
[ "$(q "$W/itc.json" 'j["itc"]')" = "$(q "$W/a.json" 'j["itc"]')" ] || fail "--itc-only ITC figures differ"

python3 - "$W" <<'PY'
import json, sys, glob
import testlib as st
W = sys.argv[1]
def load(path):
    return {k: st.rows(shape, flat) for k, (dt, shape, flat) in st.read(path).items()}
def fail(msg):
    sys.exit("FAIL: " + msg)
ann = json.load(open(f"{W}/ann.json"))
caps = [c if isinstance(c, list) else [c] for c in (a["caption"] for a in ann)]
img2txt, t = [], 0
for c in caps:
    img2txt.append(list(range(t, t + len(c)))); t += len(c)
ni, nt = len(ann), t

# sims from the cached features (chunks of 2)
feat = lambda kind: [r for f in sorted(glob.glob(f"{W}/cA/{kind}-*.safetensors")) for r in load(f)["feat"]]
imf, txf = feat("img"), feat("txt")
m4 = load(f"{W}/k4.st")
for i in range(ni):
    for t in range(nt):
        d = sum(a * b for a, b in zip(imf[i], txf[t]))
        if abs(d - m4["sims"][i][t]) > 1e-5: fail(f"sims[{i}][{t}] {m4['sims'][i][t]} vs features {d}")
if m4["txt2img"] != [i for i, c in enumerate(img2txt) for _ in c]: fail("txt2img")

# k = 4: top-4 sims per row get score = logit + sim, one logit per (image, caption) pair
S, A, B = m4["sims"], m4["score_i2t"], m4["score_t2i"]
for i in range(ni):
    top = sorted(range(nt), key=lambda t: (-S[i][t], t))[:4]
    if sorted(t for t in range(nt) if A[i][t] != -100.0) != sorted(top): fail(f"i2t row {i} is not its top 4")
for t in range(nt):
    top = sorted(range(ni), key=lambda i: (-S[i][t], i))[:4]
    if sorted(i for i in range(ni) if B[t][i] != -100.0) != sorted(top): fail(f"t2i row {t} is not its top 4")
    for i in range(ni):
        if A[i][t] != -100.0 and B[t][i] != -100.0 and A[i][t] != B[t][i]:
            fail(f"pair ({i},{t}) scored differently both ways")

def recall(score_i2t, score_t2i):
    # itm_eval with a stable descending sort: equal to numpy when no scores tie
    def rank(row, gts):
        if any(row.count(row[g]) > 1 for g in gts): fail("unexpected tie")
        order = sorted(range(len(row)), key=lambda j: -row[j])
        return min(order.index(g) for g in gts)
    ri = [rank(score_i2t[i], img2txt[i]) for i in range(ni)]
    rt = [rank(score_t2i[t], [m4["txt2img"][t]]) for t in range(nt)]
    r = lambda ranks, k: 100.0 * sum(x < k for x in ranks) / len(ranks)
    out = {"txt_r1": r(ri, 1), "txt_r5": r(ri, 5), "txt_r10": r(ri, 10),
           "img_r1": r(rt, 1), "img_r5": r(rt, 5), "img_r10": r(rt, 10)}
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
def same(got, want, what):
    for k, v in want.items():
        if abs(got[k] - v) > 1e-9: fail(f"{what} {k}: reported {got[k]}, recomputed {v}")

ka = load(f"{W}/kall.st")
rep = json.load(open(f"{W}/kall.json"))
same(rep["itm"], recall(ka["score_i2t"], ka["score_t2i"]), "k=all ITM")
same(rep["itc"], recall(ka["sims"], [list(c) for c in zip(*ka["sims"])]), "ITC")
if any(v == -100.0 for row in ka["score_i2t"] for v in row): fail("k=all left -100 entries")
# f16 vision tokens: same top-k sets, scores within f16 rounding of the f32 run
if st.header(glob.glob(f"{W}/cF/img-000000.safetensors")[0])["embeds"]["dtype"] != "F16":
    fail("--cache-f16 did not store F16 tokens")
m16 = load(f"{W}/f16.st")
d16 = max(abs(a - b) for ra, rb in zip(m16["score_i2t"], A) for a, b in zip(ra, rb))
if not 0 < d16 < 1e-2: fail(f"f16 tokens moved scores by {d16}")
print("direct checks: sims, top-k rows, shared logits, recall recomputed, f16 cache -- ok")
PY
python3 - "$W" "$DATA/blip-tiny" <<'PY'
import json, os, sys
import testlib as st
W, tiny = sys.argv[1], sys.argv[2]
dtype, shape, u8 = st.read(f"{tiny}/golden.safetensors")["images_u8"]
assert dtype == "U8" and shape == [4, 32, 32, 3]
u8 = bytes(u8)
os.makedirs(f"{W}/gold", exist_ok=True)
for k in range(4):
    st.write_png(f"{W}/gold/g{k}.png", 32, 32, u8[k * 3072:(k + 1) * 3072])
caps = json.load(open(f"{tiny}/captions.json"))
# caption 1 has characters pre_caption removes; the others tokenize as in the golden run
ann = [{"image": "g0.png", "caption": [caps[0], caps[2]]}, {"image": "g1.png", "caption": [caps[3]]},
       {"image": "g2.png", "caption": caps[4]}, {"image": "g3.png", "caption": [caps[5]]}]
json.dump(ann, open(f"{W}/gold.json", "w"))
PY
"$BIN/blip-eval" --model "$DATA/blip-tiny" --ann "$W/gold.json" --images "$W/gold" --k-test 1000 --json --threads 1 \
  --dump "$W/gold.st" >/dev/null
python3 - "$W" "$DATA/blip-tiny" <<'PY'
import sys
import testlib as st
W, tiny = sys.argv[1], sys.argv[2]
gold, got = st.read(f"{tiny}/golden.safetensors")["retrieval_score"][2], st.read(f"{W}/gold.st")["score_i2t"][2]
cols = [0, 2, 3, 4, 5]
worst = max(abs(got[i * 5 + t] - gold[i * 6 + c]) for i in range(4) for t, c in enumerate(cols))
print(f"golden retrieval_score: max |diff| {worst:.2e} over 20 pairs")
if not worst < 1e-4: sys.exit("FAIL: scores differ from upstream's retrieval_score")
PY
echo "test_eval_e2e: ok ($(q "$W/a.json" 'j["itm"]'))"
