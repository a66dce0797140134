#!/usr/bin/python3
"""run.py: blipsearch against ONNX Runtime, side by side, on the same BLIP
weights (base geometry), interleaved call by call.

Five workers stay loaded for the whole run, each holding one model:
blipsearch f32, bf16 and int8 (build/bench_engine --serve) and ONNX Runtime
f32 and int8 (node ort_bench.js). Every repetition first measures the
machine (FMA / vdpbf16ps / vpdpbusd peaks and memory read bandwidth), then
runs each measurement on every engine back to back, in an order that
rotates from one repetition to the next, so that load from other users of
the machine falls on both engines alike. Speed ratios are paired: each
repetition's ORT time over the same repetition's blipsearch time; the table
gives their median and range. Both engines' outputs are compared (the f32
engines must agree to float rounding; exit status 1 otherwise).

No network: the model and inputs come from make_model.py (run on demand)."""
import argparse
import json
import os
import statistics as st
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "../.."))
# (label, command, batch or k): what each repetition measures on every engine
MEASURES = [("vision_b1", "vision 1", 1), ("vision_b8", "vision 8", 8), ("text", "text", 1), ("itm16", "itm 16", 16)]
# (speed ratio row, blipsearch worker, ORT worker)
PAIRS = [("blipsearch f32 / ORT f32", "bs_f32", "ort_f32"), ("blipsearch bf16 / ORT f32", "bs_bf16", "ort_f32"),
         ("blipsearch int8 / ORT int8", "bs_int8", "ort_int8")]
# issue 11's targets per (pair, measure)
TARGETS = {("bs_f32", "vision_b1"): 1.25, ("bs_f32", "vision_b8"): 1.25, ("bs_bf16", "vision_b1"): 2.5,
           ("bs_bf16", "vision_b8"): 2.5, ("bs_int8", "vision_b1"): 1.4, ("bs_int8", "vision_b8"): 1.4,
           ("bs_f32", "text"): 1.3, ("bs_bf16", "text"): 1.3, ("bs_int8", "text"): 1.3,
           ("bs_f32", "itm16"): 3, ("bs_bf16", "itm16"): 3, ("bs_int8", "itm16"): 3}


class Worker:
    def __init__(self, name, argv, env):
        self.name = name
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.hello = self.read()

    def read(self):
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"run.py: worker {self.name} exited (status {self.p.wait()})")
        r = json.loads(line)
        if "error" in r:
            raise SystemExit(f"run.py: worker {self.name}: {r['error']}")
        return r

    def call(self, cmd):
        self.p.stdin.write(cmd + "\n")
        return self.read()

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
        except BrokenPipeError:
            pass
        self.p.wait()


def cos_maxdiff(a, b):
    num = sum(x * y for x, y in zip(a, b))
    den = (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5
    return (num / den if den else 0.0), max(abs(x - y) for x, y in zip(a, b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "build/vs-onnxruntime"), help="make_model.py's output folder")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build"), help="folder with bench_engine")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--load", type=int, default=0, help="also run N busy-looping processes (a run under load)")
    ap.add_argument("--naive", action="store_true", help="also time blipsearch f32's unreassociated ITM")
    ap.add_argument("--spin", action="store_true",
                    help="both engines' threads spin briefly before sleeping (blipsearch: GOMP_SPINCOUNT=3000 instead of "
                         "OMP_WAIT_POLICY=passive; ORT: allow_spinning 1, its default) instead of sleeping at once")
    ap.add_argument("--json", help="write all measurements here")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.work, "blip_int8.onnx")):
        subprocess.run([sys.executable, os.path.join(HERE, "make_model.py"), a.work], check=True)
    if not os.path.isdir(os.path.join(HERE, "node_modules/onnxruntime-node")):
        raise SystemExit("run.py: onnxruntime-node is not installed: run benchmarks/vs-onnxruntime/setup.sh")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    if a.spin:
        env.pop("OMP_WAIT_POLICY", None)
        env.update(GOMP_SPINCOUNT="3000", ORT_BENCH_SPIN="1")
    else:
        env.update(OMP_WAIT_POLICY="passive", ORT_BENCH_SPIN="0")
    inputs = os.path.join(a.work, "inputs")
    load_procs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(a.load)]
    workers = {}
    try:
        for prec in ("f32", "bf16", "int8"):
            workers["bs_" + prec] = Worker("bs_" + prec, [os.path.join(a.bin, "bench_engine"), "--serve", "--model",
                                                          os.path.join(a.work, "model"), "--inputs", inputs, "--precision",
                                                          prec, "--threads", str(a.threads)], env)
        for prec in ("f32", "int8"):
            workers["ort_" + prec] = Worker("ort_" + prec, ["node", os.path.join(HERE, "ort_bench.js"),
                                                            os.path.join(a.work, f"blip_{prec}.onnx"), inputs,
                                                            str(a.threads)], env)
        res = run(a, workers)
    finally:
        for w in workers.values():
            w.close()
        for p in load_procs:
            p.kill()
            p.wait()
    ok = report(a, res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    sys.exit(0 if ok else 1)


def run(a, workers):
    names = list(workers)
    res = {"load_avg_start": os.getloadavg(), "threads": a.threads, "reps": a.reps, "machine": [], "ms": {},
           "cpu_s": {}, "out": {}, "phases": {}, "hello": {n: w.hello for n, w in workers.items()}}
    measures = MEASURES + ([("itm16_naive", "itm 16 naive", 16)] if a.naive else [])
    t0 = time.time()
    for rep in range(a.reps + 1):  # round 0 warms up (primitives, page faults); not counted
        if rep:
            m = workers["bs_f32"].call("peaks")
            m.update(workers["bs_f32"].call("bandwidth"))
            res["machine"].append(m)
        for label, cmd, _ in measures:
            order = names[rep % len(names):] + names[:rep % len(names)]
            for n in order:
                if label == "itm16_naive" and n != "bs_f32":
                    continue
                prof = label == "vision_b1" and workers[n].hello.get("vision_team")
                r = workers[n].call(cmd + " prof" if prof else cmd)
                if rep:
                    if prof:
                        res["phases"].setdefault(n, []).append(r["phases"])
                    res["ms"].setdefault(n, {}).setdefault(label, []).append(r["ms"])
                    res["cpu_s"].setdefault(n, {}).setdefault(label, []).append(r["cpu_s"])
                res["out"].setdefault(n, {})[label] = r["out"]
        print(f"run.py: repetition {rep}/{a.reps} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    res["rss"] = {n: w.call("rss") for n, w in workers.items()}
    res["load_avg_end"] = os.getloadavg()
    return res


def report(a, res):
    ms, mach = res["ms"], res["machine"]
    med = lambda v: st.median(v)
    peak = {k: med([m[k] for m in mach]) for k in ("f32_gflops", "bf16_gflops", "int8_gops", "read_gb_s")}
    vis_gflop = mach[0]["vision_gflop"]
    print(f"blipsearch vs ONNX Runtime {res['hello']['ort_f32'].get('version', '?')}: BLIP base (ViT-B/16 384 px, BERT-base), "
          f"same random weights, {a.threads} threads each, {a.reps} interleaved repetitions, "
          f"{'threads spin briefly before sleeping' if a.spin else 'threads sleep when idle (no spinning)'}"
          + (f", {a.load} busy-looping processes as load" if a.load else ""))
    print(f"load average at start {res['load_avg_start'][0]:.2f}, at end {res['load_avg_end'][0]:.2f}")
    print(f"machine, median of the repetitions: f32 FMA {peak['f32_gflops']:.0f} GFLOP/s, bf16 vdpbf16ps "
          f"{peak['bf16_gflops']:.0f} GFLOP/s, int8 vpdpbusd {peak['int8_gops']:.0f} GOP/s, memory read {peak['read_gb_s']:.1f} GB/s")
    print("\nSpeed ratios, ORT time / blipsearch time paired per repetition: median (min-max); above 1 = blipsearch faster;"
          " [target]")
    cols = [m[0] for m in MEASURES]
    print("| | vision batch 1 | vision batch 8 | text, 12 tokens | ITM rerank k=16 |")
    print("|---|---|---|---|---|")
    ratios = {}
    for row, bs, ort in PAIRS:
        cells = []
        for c in cols:
            r = [o / b for o, b in zip(ms[ort][c], ms[bs][c])]
            ratios[(bs, c)] = r
            t = TARGETS.get((bs, c))
            mark = "" if t is None else (f" [>={t}: {'met' if med(r) >= t else 'not met'}]")
            cells.append(f"{med(r):.2f} ({min(r):.2f}-{max(r):.2f}){mark}")
        print(f"| {row} | " + " | ".join(cells) + " |")
    if "itm16_naive" in ms.get("bs_f32", {}):
        r = [o / b for o, b in zip(ms["ort_f32"]["itm16"], ms["bs_f32"]["itm16_naive"])]
        print(f"blipsearch f32 ITM without reassociation / ORT f32: {med(r):.2f} ({min(r):.2f}-{max(r):.2f})")

    print("\nAbsolute, medians (CPU s per call / wall s = cores kept busy):")
    print("| engine | vision b1 img/s | vision b8 img/s | text ms | ITM k=16 ms | vision b1 share of peak | text share of bandwidth bound |")
    print("|---|---|---|---|---|---|---|")
    wbytes = {"f32": 4, "bf16": 2, "int8": 1}
    text_mb_f32 = [m for m in mach][0]["text_weight_mb"]  # bs_f32 reports its own precision's bytes
    for n in ("bs_f32", "bs_bf16", "bs_int8", "ort_f32", "ort_int8"):
        prec = n.split("_")[1]
        v1, v8, tx, it = (med(ms[n][c]) for c in cols)
        busy = lambda c: med(res["cpu_s"][n][c]) / (med(ms[n][c]) / 1e3)
        pk = peak["f32_gflops"] if prec == "f32" else peak["bf16_gflops"] if prec == "bf16" else peak["int8_gops"]
        share = vis_gflop / (v1 / 1e3) / pk
        bound_ms = text_mb_f32 * wbytes[prec] / 4 / 1e3 / peak["read_gb_s"] * 1e3
        name = ("blipsearch " if n.startswith("bs") else "ORT ") + prec
        print(f"| {name} | {1e3 / v1:.2f} ({busy('vision_b1'):.2f} cores) | {8e3 / v8:.2f} ({busy('vision_b8'):.2f}) | "
              f"{tx:.1f} ({busy('text'):.2f}) | {it:.0f} ({busy('itm16'):.2f}) | {100 * share:.0f}% of the {prec} peak | "
              f"{100 * bound_ms / tx:.0f}% ({bound_ms:.1f} ms to read {text_mb_f32 * wbytes[prec] / 4:.0f} MB) |")

    phases(res, peak, vis_gflop)

    print("\nMemory, MiB (peak since the load = the workloads above; load peak includes weight conversion):")
    print("| engine | resident after the run | peak since the load | load peak |")
    print("|---|---|---|---|")
    for n, r in res["rss"].items():
        h = res["hello"][n]
        print(f"| {n.replace('bs_', 'blipsearch ').replace('ort_', 'ORT ')} | {r['rss_mib']:.0f} | "
              f"{r['peak_rss_mib']:.0f}{'' if r['peak_since_load'] else ' (incl. load)'} | {h.get('load_peak_rss_mib', 0):.0f} |")

    print("\nAgreement of the outputs (image features of batch 8, text features, ITM logits k=16):")
    out = res["out"]
    ok = True
    for a_, b_, tol in (("bs_f32", "ort_f32", 1), ("bs_bf16", "ort_f32", 0), ("bs_int8", "ort_f32", 0),
                        ("ort_int8", "ort_f32", 0), ("bs_int8", "ort_int8", 0)):
        cells = []
        for c in ("vision_b8", "text", "itm16"):
            cs, md = cos_maxdiff(out[a_][c], out[b_][c])
            cells.append(f"{c} cos {cs:.6f} max|d| {md:.2e}")
            if tol and (cs < 0.99999 or (c == "itm16" and md > 1e-3)):
                ok = False
        print(f"  {a_} vs {b_}: " + "; ".join(cells))
    print("f32 engines agree" if ok else "ERROR: the f32 engines disagree beyond float rounding")
    return ok


LINEARS = ("qkv", "proj", "fc1", "fc2")


def phases(res, peak, vis_gflop):
    """Where blipsearch's vision batch-1 time goes, and the fastest it could
    be with its matmuls as they run: those matmuls' time plus attention at
    100% of the peak, nothing else. A target above that bound is beyond these
    matmul kernels on this machine."""
    if not res["phases"]:
        return
    med = st.median
    print("\nWhere blipsearch's vision batch-1 time goes (the first thread's clock, medians; share of the precision's peak):")
    print("| precision | call ms | linear layers ms | attention ms | LayerNorm, embedding, waits ms | bound: linears + attention at "
          "100% of peak | bound's share of peak | ORT time / bound [target] |")
    print("|---|---|---|---|---|---|---|---|")
    for n, ort, key in (("bs_f32", "ort_f32", "f32_gflops"), ("bs_bf16", "ort_f32", "bf16_gflops"),
                        ("bs_int8", "ort_int8", "int8_gops")):
        ph = res["phases"].get(n)
        if not ph:
            continue
        pk = peak[key]
        lin = med([sum(p[k]["ms"] for k in LINEARS) for p in ph])
        lin_gf = sum(ph[0][k]["gflop"] for k in LINEARS)
        att, att_gf = med([p["attention"]["ms"] for p in ph]), ph[0]["attention"]["gflop"]
        other = med([sum(v["ms"] for k, v in p.items() if k not in LINEARS + ("attention",)) for p in ph])
        bound = lin + att_gf / pk * 1e3
        ort_ms = med(res["ms"][ort]["vision_b1"])
        t = TARGETS.get((n, "vision_b1"))
        print(f"| {n.replace('bs_', '')} | {med(res['ms'][n]['vision_b1']):.0f} | {lin:.0f} ({100 * lin_gf / lin / pk * 1e3:.0f}%) | "
              f"{att:.1f} ({100 * att_gf / att / pk * 1e3:.0f}%) | {other:.1f} | {bound:.0f} | {100 * vis_gflop / bound / pk * 1e3:.0f}% | "
              f"{ort_ms / bound:.2f} [>={t}] |")


if __name__ == "__main__":
    main()
