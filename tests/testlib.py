"""testlib.py: helpers for the shell tests' Python checks, standard library
only and independent of the C code under test: read safetensors, write PNGs.
The scripts put tests/ on PYTHONPATH."""
import json
import struct
import zlib

_FMT = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b", "U8": "B", "BOOL": "?"}


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def read(path):
    """{name: (dtype, shape, flat tuple of values)}"""
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    out = {}
    for k, v in json.loads(b[8:8 + n]).items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        fmt = _FMT[v["dtype"]]
        raw = b[8 + n + s:8 + n + e]
        out[k] = (v["dtype"], v["shape"], struct.unpack(f"<{len(raw) // struct.calcsize(fmt)}{fmt}", raw))
    return out


def rows(shape, flat):
    """A 2-D tensor as a list of row lists; other ranks stay flat."""
    if len(shape) != 2:
        return list(flat)
    return [list(flat[r * shape[1]:(r + 1) * shape[1]]) for r in range(shape[0])]


def write_png(path, w, h, rgb):
    """8-bit RGB PNG from packed rows (w*h*3 bytes)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    raw = b"".join(b"\0" + rgb[y * w * 3:(y + 1) * w * 3] for y in range(h))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
