#!/usr/bin/python3
"""make_model.py: the BLIP model that both engines of the side-by-side
benchmark load, written once from one set of random weights.

OUT/model/   config.json, model.safetensors (F32, Hugging Face tensor names),
             vocab.txt: what blipsearch loads (blip_model_load).
OUT/blip_f32.onnx, OUT/blip_int8.onnx: the same weights as one ONNX graph
             (opset 17) for ONNX Runtime, with three independent parts that
             share nothing: vision (pixel_values -> image_embeds, image_feat),
             text (input_ids, attention_mask -> text_feat) and ITM
             (itm_input_ids, itm_image_embeds -> itm_logits). A run fetches
             one part's outputs; ORT executes only the nodes those need.
OUT/inputs/  pixels.f32 [8,3,S,S], itm_images.f32 [16,T,D]: inputs both
             engines read.

The graph is written node by node the way torch.onnx.export writes
BlipForImageTextRetrieval at opset 17 (MatMul with pre-transposed weights
+ Add, LayerNormalization, the Erf form of exact GELU, attention as
MatMul/Mul/Add/Softmax/MatMul with Reshape/Transpose). The int8 graph is
what onnxruntime.quantization.quantize_dynamic emits with its defaults
(onnxruntime's Python package is not in Debian): every MatMul with a
constant weight becomes DynamicQuantizeLinear (u8 activations, one
dynamic scale and zero point per tensor) -> MatMulInteger (s8 weights, one
scale per tensor, zero point 0) -> Cast -> Mul by the two scales; MatMuls
of two activations (attention) stay f32 (MatMulConstBOnly), the patch
Conv stays f32 (blipsearch keeps it f32 too).

Geometry: BLIP base (ViT-B/16 at 384 px, BERT-base with cross-attention).
Random weights with the magnitudes blipsearch's random models use (LayerNorm
gains ~1, biases small, matrices ~1/sqrt(fan_in)). Needs python3-numpy and
python3-onnx (Debian)."""
import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

D, LAYERS, HEADS, MLP, S, P, EMB = 768, 12, 12, 3072, 384, 16, 256
VOCAB, MAXPOS = 30524, 512
T = (S // P) ** 2 + 1


def weights(seed):
    """{HF name: f32 array}, deterministic in seed."""
    rng = np.random.default_rng(seed)
    w = {}

    def uni(shape, std, base=0.0):
        return (base + (rng.random(shape, dtype=np.float32) * 2 - 1) * (std * np.sqrt(3))).astype(np.float32)

    def lin(name, out, inp):
        w[name + ".weight"] = uni((out, inp), 1 / np.sqrt(inp))
        w[name + ".bias"] = uni((out,), 0.02)

    def ln(name):
        w[name + ".weight"] = uni((D,), 0.05, 1.0)
        w[name + ".bias"] = uni((D,), 0.02)

    v = "vision_model."
    w[v + "embeddings.class_embedding"] = uni((1, 1, D), 0.5)
    w[v + "embeddings.position_embedding"] = uni((1, T, D), 0.5)
    w[v + "embeddings.patch_embedding.weight"] = uni((D, 3, P, P), 1 / np.sqrt(3 * P * P))
    w[v + "embeddings.patch_embedding.bias"] = uni((D,), 0.02)
    for i in range(LAYERS):
        p = f"{v}encoder.layers.{i}."
        ln(p + "layer_norm1")
        lin(p + "self_attn.qkv", 3 * D, D)
        lin(p + "self_attn.projection", D, D)
        ln(p + "layer_norm2")
        lin(p + "mlp.fc1", MLP, D)
        lin(p + "mlp.fc2", D, MLP)
    ln(v + "post_layernorm")
    t = "text_encoder."
    w[t + "embeddings.word_embeddings.weight"] = uni((VOCAB, D), 0.5)
    w[t + "embeddings.position_embeddings.weight"] = uni((MAXPOS, D), 0.5)
    ln(t + "embeddings.LayerNorm")
    for i in range(LAYERS):
        p = f"{t}encoder.layer.{i}."
        for a in ("attention", "crossattention"):
            for n in ("query", "key", "value"):
                lin(f"{p}{a}.self.{n}", D, D)
            lin(f"{p}{a}.output.dense", D, D)
            ln(f"{p}{a}.output.LayerNorm")
        lin(p + "intermediate.dense", MLP, D)
        lin(p + "output.dense", D, MLP)
        ln(p + "output.LayerNorm")
    lin("vision_proj", EMB, D)
    lin("text_proj", EMB, D)
    lin("itm_head", 2, D)
    return w


def write_safetensors(path, w):
    hdr, off = {}, 0
    for k, a in w.items():
        hdr[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for a in w.values():
            f.write(np.ascontiguousarray(a).tobytes())


def read_safetensors(path):
    """{name: f32 array} viewing the file's bytes (header parsed by tests/testlib.py)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests"))
    import testlib
    b = open(path, "rb").read()
    base = 8 + struct.unpack("<Q", b[:8])[0]
    out = {}
    for k, v in testlib.header(path).items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        assert v["dtype"] == "F32", k
        out[k] = np.frombuffer(b, np.float32, (e - s) // 4, base + s).reshape(v["shape"])
    return out


def config():
    return {
        "model_type": "blip", "architectures": ["BlipForImageTextRetrieval"], "image_text_hidden_size": EMB,
        "vision_config": {"hidden_size": D, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                          "intermediate_size": MLP, "image_size": S, "patch_size": P, "layer_norm_eps": 1e-5,
                          "hidden_act": "gelu"},
        "text_config": {"vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": LAYERS,
                        "num_attention_heads": HEADS, "intermediate_size": MLP, "max_position_embeddings": MAXPOS,
                        "encoder_hidden_size": D, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
                        "pad_token_id": 0, "sep_token_id": 102, "bos_token_id": 30522},
    }


class Graph:
    """A tiny ONNX graph builder: one method per op pattern of the export."""

    def __init__(self, w, int8):
        from onnx import helper, numpy_helper, TensorProto
        self.h, self.nh, self.TP = helper, numpy_helper, TensorProto
        self.w, self.int8, self.nodes, self.inits, self.n = w, int8, [], [], 0
        self.const_cache = {}

    def name(self, s):
        self.n += 1
        return f"{s}_{self.n}"

    def op(self, kind, ins, n_out=1, **attrs):
        outs = [self.name(kind) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(kind, ins, outs, name=self.name("n_" + kind), **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name, arr):
        self.inits.append(self.nh.from_array(np.array(arr, order="C"), name))  # keeps 0-d scalars 0-d
        return name

    def const(self, arr, dtype=np.int64):
        arr = np.asarray(arr, dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.const_cache:
            self.const_cache[key] = self.init(self.name("const"), arr)
        return self.const_cache[key]

    def linear(self, x, name):
        wt = self.w[name + ".weight"].T  # [in, out], as the export stores it
        b = self.init(name + ".bias", self.w[name + ".bias"])
        if not self.int8:
            return self.op("Add", [self.op("MatMul", [x, self.init(name + ".weight_t", wt)]), b])
        s = float(np.abs(wt).max()) / 127.0 or 1.0  # symmetric per-tensor s8 weights
        q = np.clip(np.rint(wt / s), -127, 127).astype(np.int8)
        xq, xs, xz = self.op("DynamicQuantizeLinear", [x], n_out=3)
        acc = self.op("MatMulInteger", [xq, self.init(name + ".weight_q", q), xz, self.const(0, np.int8)])
        sc = self.op("Mul", [xs, self.const(s, np.float32)])
        y = self.op("Mul", [self.op("Cast", [acc], to=self.TP.FLOAT), sc])
        return self.op("Add", [y, b])

    def layernorm(self, x, name, eps):
        return self.op("LayerNormalization", [x, self.init(name + ".weight", self.w[name + ".weight"]),
                                              self.init(name + ".bias", self.w[name + ".bias"])], axis=-1, epsilon=eps)

    def gelu(self, x):  # 0.5 x (1 + erf(x / sqrt 2)), as exported
        e = self.op("Erf", [self.op("Div", [x, self.const(1.4142135381698608, np.float32)])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [e, self.const(1.0, np.float32)])]),
                               self.const(0.5, np.float32)])

    def reshape_tail(self, x, keep, dims):
        """Reshape x to its first `keep` dims + dims, sizes taken from Shape(x)
        as the export does (no -1: empty batches stay valid)."""
        lead = self.op("Slice", [self.op("Shape", [x]), self.const([0]), self.const([keep])])
        return self.op("Reshape", [x, self.op("Concat", [lead, self.const(dims)], axis=0)])

    def heads(self, x):  # [B, L, D] -> [B, H, L, dh]
        return self.op("Transpose", [self.reshape_tail(x, 2, [HEADS, D // HEADS])], perm=[0, 2, 1, 3])

    def attention(self, q, k, v, mask_add=None):
        s = self.op("MatMul", [q, self.op("Transpose", [k], perm=[0, 1, 3, 2])])
        s = self.op("Mul", [s, self.const(1 / np.sqrt(D // HEADS), np.float32)])
        if mask_add is not None:
            s = self.op("Add", [s, mask_add])
        ctx = self.op("MatMul", [self.op("Softmax", [s], axis=-1), v])
        return self.reshape_tail(self.op("Transpose", [ctx], perm=[0, 2, 1, 3]), 2, [D])

    def first_token(self, x):  # x[:, 0, :] -> [B, D]
        return self.op("Squeeze", [self.op("Slice", [x, self.const([0]), self.const([1]), self.const([1])]),
                                   self.const([1])])

    def l2norm(self, x):
        return self.op("LpNormalization", [x], axis=-1, p=2)

    def vision(self, px):
        v = "vision_model."
        pe = self.op("Conv", [px, self.init(v + "pe.w", self.w[v + "embeddings.patch_embedding.weight"]),
                              self.init(v + "pe.b", self.w[v + "embeddings.patch_embedding.bias"])],
                     kernel_shape=[P, P], strides=[P, P])
        pe = self.op("Transpose", [self.op("Reshape", [pe, self.const([0, D, T - 1])])], perm=[0, 2, 1])
        b = self.op("Slice", [self.op("Shape", [px]), self.const([0]), self.const([1])])
        cls = self.op("Expand", [self.init(v + "cls", self.w[v + "embeddings.class_embedding"]),
                                 self.op("Concat", [b, self.const([1, D])], axis=0)])
        x = self.op("Add", [self.op("Concat", [cls, pe], axis=1),
                            self.init(v + "pos", self.w[v + "embeddings.position_embedding"])])
        for i in range(LAYERS):
            p = f"{v}encoder.layers.{i}."
            h = self.layernorm(x, p + "layer_norm1", 1e-5)
            qkv = self.op("Transpose", [self.reshape_tail(self.linear(h, p + "self_attn.qkv"), 2, [3, HEADS, D // HEADS])],
                          perm=[2, 0, 3, 1, 4])
            q, k, vv = (self.op("Gather", [qkv, self.const(j)], axis=0) for j in range(3))
            x = self.op("Add", [x, self.linear(self.attention(q, k, vv), p + "self_attn.projection")])
            h = self.layernorm(x, p + "layer_norm2", 1e-5)
            x = self.op("Add", [x, self.linear(self.gelu(self.linear(h, p + "mlp.fc1")), p + "mlp.fc2")])
        x = self.layernorm(x, v + "post_layernorm", 1e-5)
        feat = self.l2norm(self.linear(self.first_token(x), "vision_proj"))
        return x, feat

    def text(self, ids, mask, images):
        """BERT encoder; images None = unimodal (mask given), else cross-attention (no masks)."""
        t = "text_encoder."
        L = self.op("Slice", [self.op("Shape", [ids]), self.const([1]), self.const([2])])
        pos = self.op("Slice", [self.init(t + "pos", self.w[t + "embeddings.position_embeddings.weight"]),
                                self.const([0]), L, self.const([0])])
        x = self.op("Add", [self.op("Gather", [self.init(t + "word", self.w[t + "embeddings.word_embeddings.weight"]),
                                               ids], axis=0), pos])
        x = self.layernorm(x, t + "embeddings.LayerNorm", 1e-12)
        madd = None
        if mask is not None:  # (1 - mask) * -10000, shaped [B, 1, 1, L]
            m = self.op("Cast", [self.op("Unsqueeze", [mask, self.const([1, 2])])], to=self.TP.FLOAT)
            madd = self.op("Mul", [self.op("Sub", [self.const(1.0, np.float32), m]), self.const(-10000.0, np.float32)])
        for i in range(LAYERS):
            p = f"{t}encoder.layer.{i}."
            a = self.attention(self.heads(self.linear(x, p + "attention.self.query")),
                               self.heads(self.linear(x, p + "attention.self.key")),
                               self.heads(self.linear(x, p + "attention.self.value")), madd)
            x = self.layernorm(self.op("Add", [self.linear(a, p + "attention.output.dense"), x]),
                               p + "attention.output.LayerNorm", 1e-12)
            if images is not None:
                a = self.attention(self.heads(self.linear(x, p + "crossattention.self.query")),
                                   self.heads(self.linear(images, p + "crossattention.self.key")),
                                   self.heads(self.linear(images, p + "crossattention.self.value")))
                x = self.layernorm(self.op("Add", [self.linear(a, p + "crossattention.output.dense"), x]),
                                   p + "crossattention.output.LayerNorm", 1e-12)
            h = self.gelu(self.linear(x, p + "intermediate.dense"))
            x = self.layernorm(self.op("Add", [self.linear(h, p + "output.dense"), x]), p + "output.LayerNorm", 1e-12)
        return self.first_token(x)

    def model(self):
        h, TP = self.h, self.TP
        ins = [h.make_tensor_value_info("pixel_values", TP.FLOAT, ["b", 3, S, S]),
               h.make_tensor_value_info("input_ids", TP.INT64, ["n", "l"]),
               h.make_tensor_value_info("attention_mask", TP.INT64, ["n", "l"]),
               h.make_tensor_value_info("itm_input_ids", TP.INT64, ["k", "m"]),
               h.make_tensor_value_info("itm_image_embeds", TP.FLOAT, ["k", T, D])]
        emb, ifeat = self.vision("pixel_values")
        cls = self.text("input_ids", "attention_mask", None)
        tfeat = self.l2norm(self.linear(cls, "text_proj"))
        icls = self.text("itm_input_ids", None, "itm_image_embeds")
        logits = self.linear(icls, "itm_head")
        outs = {"image_embeds": emb, "image_feat": ifeat, "text_feat": tfeat, "itm_logits": logits}
        for k, v in outs.items():
            self.nodes.append(h.make_node("Identity", [v], [k], name="out_" + k))
        # The text and ITM parts use the same weights: one initializer per name.
        seen, inits = set(), []
        for i in self.inits:
            if i.name not in seen:
                seen.add(i.name)
                inits.append(i)
        g = h.make_graph(self.nodes, "blip_itm_base", ins,
                         [h.make_tensor_value_info(k, TP.FLOAT, shp) for k, shp in
                          zip(outs, (["b", T, D], ["b", EMB], ["n", EMB], ["k", 2]))], inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], producer_name="blipsearch make_model.py")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (e.g. build/vs-onnxruntime)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--vocab", default=os.path.join(os.path.dirname(__file__), "../../tests/data/blip-tiny/vocab.txt"))
    a = ap.parse_args()
    import onnx
    md = os.path.join(a.out, "model")
    os.makedirs(md, exist_ok=True)
    os.makedirs(os.path.join(a.out, "inputs"), exist_ok=True)
    st = os.path.join(md, "model.safetensors")
    write_safetensors(st, weights(a.seed))
    with open(os.path.join(md, "config.json"), "w") as f:
        json.dump(config(), f, indent=1)
    shutil.copyfile(a.vocab, os.path.join(md, "vocab.txt"))
    w = read_safetensors(st)  # the graphs are built from the file blipsearch loads
    for int8 in (0, 1):
        m = Graph(w, int8).model()
        onnx.checker.check_model(m)
        onnx.save(m, os.path.join(a.out, f"blip_{'int8' if int8 else 'f32'}.onnx"))
    rng = np.random.default_rng(a.seed + 1)
    rng.uniform(-1, 1, (8, 3, S, S)).astype(np.float32).tofile(os.path.join(a.out, "inputs", "pixels.f32"))
    rng.standard_normal((16, T, D)).astype(np.float32).tofile(os.path.join(a.out, "inputs", "itm_images.f32"))
    print(f"make_model: wrote {md} and blip_f32.onnx, blip_int8.onnx, inputs/ under {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
