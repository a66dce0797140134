#!/usr/bin/env node
// ort_bench.js: the ONNX Runtime side of the side-by-side benchmark. It
// speaks the same line protocol as `bench_engine --serve` so that run.py
// can interleave the two engines call by call:
//   vision B | text | itm K : one timed call -> {"ms", "cpu_s", "out"}
//   rss | quit
// Usage: node ort_bench.js MODEL.onnx INPUTS_DIR [THREADS]
// Session: CPU (MLAS), graphOptimizationLevel "all", intra-op THREADS,
// inter-op 1, sequential, no spinning (the machine is shared; blipsearch
// runs with OMP_WAIT_POLICY=passive to match), or ORT's default spinning
// with ORT_BENCH_SPIN=1 (run.py --spin; blipsearch then spins briefly too).
'use strict';
const fs = require('fs');
const path = require('path');
const readline = require('readline');
const ort = require('onnxruntime-node');

const S = 384, T = 577, D = 768, KMAX = 16;
const IDS = [101, 1037, 3899, 2770, 2006, 1037, 3509, 2007, 2019, 4399, 2067, 102];
const ENC = 30523; // [ENC] = bos_token_id + 1, ITM's first token

function readF32(file, n) {
  const b = fs.readFileSync(file);
  if (b.length !== n * 4) throw new Error(`${file}: expected ${n} floats`);
  return new Float32Array(b.buffer, b.byteOffset, n);
}

function procKib(key) {
  const m = fs.readFileSync('/proc/self/status', 'utf8').match(new RegExp(`^${key}:\\s*(\\d+)`, 'm'));
  return m ? Number(m[1]) : -1;
}

function cpuS() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

async function main() {
  const [model, inputs, threads = '2'] = process.argv.slice(2);
  if (!model || !inputs) {
    process.stderr.write('usage: node ort_bench.js MODEL.onnx INPUTS_DIR [THREADS]\n');
    process.exit(2);
  }
  const t0 = process.hrtime.bigint();
  const spin = process.env.ORT_BENCH_SPIN === '1' ? '1' : '0';
  const sess = await ort.InferenceSession.create(model, {
    executionProviders: ['cpu'],
    graphOptimizationLevel: 'all',
    intraOpNumThreads: Number(threads),
    interOpNumThreads: 1,
    executionMode: 'sequential',
    extra: { session: { intra_op: { allow_spinning: spin }, inter_op: { allow_spinning: spin } } },
  });
  const px = readF32(path.join(inputs, 'pixels.f32'), 8 * 3 * S * S);
  const imgs = readF32(path.join(inputs, 'itm_images.f32'), KMAX * T * D);
  // Every graph input must be fed, and ORT runs the whole graph whatever is
  // fetched: the parts not asked for get empty batches (no work).
  const i64 = (a, dims) => new ort.Tensor('int64', BigInt64Array.from(a.map(BigInt)), dims);
  const small = {
    pixel_values: new ort.Tensor('float32', new Float32Array(0), [0, 3, S, S]),
    input_ids: i64([], [0, 12]),
    attention_mask: i64([], [0, 12]),
    itm_input_ids: i64([], [0, 12]),
    itm_image_embeds: new ort.Tensor('float32', new Float32Array(0), [0, T, D]),
  };
  const text = { input_ids: i64(IDS, [1, 12]), attention_mask: i64(IDS.map(() => 1), [1, 12]) };
  const loadPeak = procKib('VmHWM');
  const hwmReset = (() => {
    try { fs.writeFileSync('/proc/self/clear_refs', '5'); return true; } catch (e) { return false; }
  })();
  const loadS = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log(JSON.stringify({ engine: 'onnxruntime', version: ort.env.versions?.node ?? require('onnxruntime-node/package.json').version,
    model: path.basename(model), load_s: loadS, load_peak_rss_mib: loadPeak / 1024 }));
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const [cmd, argS, opt] = line.trim().split(/\s+/);
    const arg = Number(argS);
    if (cmd === 'quit') break;
    let feeds = null, fetch = null;
    if (cmd === 'vision' && arg >= 1 && arg <= 8) {
      feeds = { ...small, pixel_values: new ort.Tensor('float32', px.subarray(0, arg * 3 * S * S), [arg, 3, S, S]) };
      fetch = 'image_feat';
    } else if (cmd === 'text') {
      feeds = { ...small, ...text };
      fetch = 'text_feat';
    } else if (cmd === 'itm' && arg >= 1 && arg <= KMAX) {
      const ids = [];
      for (let i = 0; i < arg; i++) ids.push(ENC, ...IDS.slice(1));
      feeds = { ...small, itm_input_ids: i64(ids, [arg, 12]),
        itm_image_embeds: new ort.Tensor('float32', imgs.subarray(0, arg * T * D), [arg, T, D]) };
      fetch = 'itm_logits';
    } else if (cmd === 'rss') {
      console.log(JSON.stringify({ rss_mib: procKib('VmRSS') / 1024, peak_rss_mib: procKib('VmHWM') / 1024, peak_since_load: hwmReset }));
      continue;
    } else {
      console.log(JSON.stringify({ error: 'unknown command' }));
      continue;
    }
    const w0 = process.hrtime.bigint(), c0 = cpuS();
    const r = await sess.run(feeds, [fetch]);
    const ms = Number(process.hrtime.bigint() - w0) / 1e6;
    console.log(JSON.stringify({ ms, cpu_s: cpuS() - c0, out: Array.from(r[fetch].data) }));
  }
  process.exit(0);
}

main().catch((e) => { process.stderr.write(`ort_bench: ${e.stack || e}\n`); process.exit(1); });
