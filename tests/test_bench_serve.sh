#!/usr/bin/env bash
# test_bench_serve: the line protocol of `bench_engine --serve`, which
# benchmarks/vs-onnxruntime/run.py drives beside ONNX Runtime, on the
# blip-tiny fixture: every command answers one JSON line with the outputs
# the driver compares (unit-norm features, batch-independent vision, the
# reassociated ITM equal to the naive one), bad commands and inputs fail cleanly;
# and the --gemm and --attention reports.
set -u
B=${BLIP_BIN:-build}; D=${BLIP_TEST_DATA:-tests/data}
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# inputs at the fixture's geometry: S = 32, T = (32/8)^2 + 1 = 17 tokens of width 32
python3 - "$tmp" <<'EOF'
import random, struct, sys
random.seed(7)
for name, n in (("pixels.f32", 8 * 3 * 32 * 32), ("itm_images.f32", 16 * 17 * 32)):
    with open(f"{sys.argv[1]}/{name}", "wb") as f:
        f.write(struct.pack(f"<{n}f", *(random.uniform(-1, 1) for _ in range(n))))
EOF
for p in f32 bf16 int8; do
  printf 'vision 1\nvision 8\ntext\nitm 16\nitm 16 naive\nrss\nbogus\nvision 9\nvision 2 prof\nquit\n' |
    "$B/bench_engine" --serve --model "$D/blip-tiny" --inputs "$tmp" --precision $p >"$tmp/$p.out" 2>"$tmp/$p.err"
  check "$p: serve exits 0 ($(head -c 200 "$tmp/$p.err"))" test $? -eq 0
  python3 - "$tmp/$p.out" "$p" <<'EOF' && ok || bad "$p: replies"
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])]
assert len(r) == 10, len(r)
hello, v1, v8, text, fast, naive, rss, bogus, v9, prof = r
assert hello["engine"] == "blipsearch" and hello["precision"] == sys.argv[2], hello
E = 16
norm = lambda v: sum(x * x for x in v) ** 0.5
assert len(v1["out"]) == E and len(v8["out"]) == 8 * E and len(text["out"]) == E, (len(v1["out"]), len(v8["out"]))
assert all(abs(norm(v[i * E:(i + 1) * E]) - 1) < 1e-4 for v in (v1["out"], v8["out"]) for i in range(len(v) // E))
assert max(abs(a - b) for a, b in zip(v1["out"], v8["out"][:E])) < 1e-4, "image 0 differs between batch 1 and 8"
assert abs(norm(text["out"]) - 1) < 1e-4
assert len(fast["out"]) == 32 and max(abs(a - b) for a, b in zip(fast["out"], naive["out"])) < 5e-2, "fast vs naive ITM"
assert all(x["ms"] > 0 and x["cpu_s"] >= 0 for x in (v1, v8, text, fast, naive))
assert rss["peak_rss_mib"] >= rss["rss_mib"] > 0
assert bogus == {"error": "unknown command"} and v9 == {"error": "unknown command"}, (bogus, v9)
# prof: where a team's time goes, phase by phase, with the same outputs; without a team, an error
if hello["vision_team"]:
    ph = prof["phases"]
    assert list(ph) == ["embed", "layernorm", "qkv", "attention", "proj", "fc1", "fc2", "wait", "rest"], list(ph)
    assert prof["out"] == v8["out"][:2 * E], "prof changes the features"
    assert 0 < sum(x["ms"] for x in ph.values()) <= prof["ms"] and all(ph[k]["ms"] > 0 for k in ("qkv", "attention", "fc1", "fc2"))
    # tiny geometry: 17 tokens of 32, MLP 64, 8x8 patches, 2 layers, batch 2
    T, D, F, L = 17, 32, 64, 2
    want = {"embed": 2 * 16 * 192 * D, "qkv": L * 2 * T * D * 3 * D, "attention": L * 4 * T * T * D, "proj": L * 2 * T * D * D,
            "fc1": L * 2 * T * D * F, "fc2": L * 2 * T * F * D}
    assert all(abs(ph[k]["gflop"] * 1e9 - 2 * want.get(k, 0)) <= 1e-5 * want.get(k, 0) for k in ph), ph
else:
    assert "not as a team" in prof["error"], prof
EOF
done
# the f32 reassociated ITM equals the naive one to float rounding
python3 - "$tmp/f32.out" <<'EOF' && ok || bad "f32: reassociated ITM = naive"
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])]
assert max(abs(a - b) for a, b in zip(r[4]["out"], r[5]["out"])) < 1e-4
EOF
rm "$tmp/itm_images.f32"
"$B/bench_engine" --serve --model "$D/blip-tiny" --inputs "$tmp" --precision f32 </dev/null >/dev/null 2>"$tmp/err"
check "missing input file: exit 1" test $? -eq 1
check "missing input file: named" grep -q "itm_images.f32: expected" "$tmp/err"
"$B/bench_engine" --serve --model "$D/blip-tiny" --precision f32 </dev/null >/dev/null 2>&1
check "--serve without --inputs: usage (exit 2)" test $? -eq 2
# --gemm: every precision, whole and in parts, each a kernel name and a time
"$B/bench_engine" --gemm 65,64,48 --reps 1 --json >"$tmp/gemm.json" 2>"$tmp/err"
check "--gemm: exit 0" test $? -eq 0
python3 - "$tmp/gemm.json" <<'EOF' && ok || bad "--gemm: 6 results with kernels and times"
import json, sys
r = json.load(open(sys.argv[1]))
assert (r["M"], r["K"], r["N"], r["layers"]) == (65, 64, 48, 1) and len(r["results"]) == 6
assert {(x["precision"], x["packing"]) for x in r["results"]} == {(p, k) for p in ("f32", "bf16", "int8") for k in ("whole", "parts")}
assert all(x["ms"] > 0 and x["gflops"] > 0 and x["kernel"] not in ("?", "") and not x["kernel"].startswith("ref") for x in r["results"])
EOF
# --attention: the fused kernels where the CPU has them (f32: AVX-512; bf16: AVX512-BF16; int8: and
# VNNI), agreeing with the batched path at the vision encoder's full shape
"$B/bench_engine" --attention --reps 1 --json >"$tmp/att.json" 2>"$tmp/err"
check "--attention: exit 0" test $? -eq 0
python3 - "$tmp/att.json" <<'EOF' && ok || bad "--attention: fused kernels, agreeing with the batched ones"
import json, sys
r = json.load(open(sys.argv[1]))
flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
f32 = "avx512f" in flags and "avx512bw" in flags and "avx512vl" in flags
bf = f32 and "avx512_bf16" in flags
i8 = bf and "avx512_vnni" in flags
res = {x["precision"]: x for x in r["results"]}
assert (r["tokens"], r["heads"], r["dh"]) == (577, 12, 64) and sorted(res) == ["bf16", "f32", "int8"]
assert res["f32"]["fused"] == ("fused f32" if f32 else "batched f32")
assert res["bf16"]["fused"] == ("fused bf16" if bf else "batched bf16")
assert res["int8"]["fused"] == ("fused int8" if i8 else res["bf16"]["fused"])
assert all(x["batched"].startswith("batched") and x["fused_ms"] > 0 and x["batched_ms"] > 0 for x in res.values())
# f32: float rounding; bf16: one bf16 step of the outputs; int8: its quantization
assert res["f32"]["max_diff"] < 1e-4 and res["bf16"]["max_diff"] < 0.05 and res["int8"]["max_diff"] < 0.1, res
EOF
"$B/bench_engine" --gemm 13,64 >/dev/null 2>"$tmp/err"
check "--gemm without N: exit 1" test $? -eq 1
check "--gemm without N: says so" grep -q "wants M,K,N" "$tmp/err"
"$B/bench_engine" --gemm 65,64,48x >/dev/null 2>"$tmp/err"
check "--gemm with trailing text: exit 1" test $? -eq 1
check "--gemm with trailing text: says so" grep -q "wants M,K,N" "$tmp/err"
tally
