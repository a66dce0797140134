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


def write_tiff(path, w, h, rgb):
    """Uncompressed 8-bit RGB baseline TIFF, one strip: pixel bytes sit at a
    fixed offset, so an edit of some rows changes only those bytes."""
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, 8 + 2 + 12 * 10 + 4), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 0), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, w * h * 3), (284, 3, 1, 1)]
    ifd_len = 2 + 12 * len(entries) + 4
    bps_at, data_at = 8 + ifd_len, 8 + ifd_len + 6
    out = bytearray(b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, typ, count, val in entries:
        val = {258: bps_at, 273: data_at}.get(tag, val)
        out += struct.pack("<HHI", tag, typ, count)
        out += struct.pack("<HH", val, 0) if typ == 3 and count == 1 else struct.pack("<I", val)
    out += struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8)
    assert len(out) == data_at
    with open(path, "wb") as f:
        f.write(bytes(out) + bytes(rgb))
    return data_at
