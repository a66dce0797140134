#!/usr/bin/python3
"""gen-pil-cases.py: the inputs and PIL's outputs behind tests/test_img_pil.c.

Writes small images that exercise every place where decoding into RGB can
differ from PIL (CMYK, 16-bit grey, PNM maxval, GIF transparency, TIFF
orientation, plus bit depths and palettes that must stay equal), and for each
the bytes BLIP's reference pipeline produces from it:
    Image.open(path).convert("RGB").resize((S, S), Image.BICUBIC)
S is the image's own side where it is square (then the resize is a copy and
the conversion itself is compared byte for byte).

Run with Debian bookworm's python3-pil (Pillow 9.4.0, the version that made
the preprocessing golden data) and python3-numpy:
    /usr/bin/python3 scripts/gen-pil-cases.py tests/data/pil-cases
Output: the images, cases.json ([{file, size, what, pil_mode, product}]) and
expected.safetensors (U8 [S,S,3] "ref.<file>"; "product.<file>" where the
product path's value is computable independently of the code under test).
"product" says what the product (default) mode must give: "value" (that
tensor), "ref" (PIL's bytes too) or "differs" (anything but PIL's bytes).
The output is deterministic: rerunning it must leave git clean."""
import json
import os
import struct
import sys
import warnings
import zlib

import numpy as np
import PIL
from PIL import Image, TiffImagePlugin

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/data/pil-cases"
warnings.filterwarnings("ignore", "Palette images with Transparency")  # Pillow's advice to callers
rng = np.random.default_rng(20261202)
cases, tensors = [], {}


def pattern(h, w, c, hi=255):
    """Ramps (every level near both ends), then noise: distinct pixels, so a
    wrong orientation or channel order cannot pass."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.empty((h, w, c), np.int64)
    for k in range(c):
        a[..., k] = (xx * (k + 3) + yy * (2 * k + 1) * w) % (hi + 1)
    noise = rng.integers(0, hi + 1, size=(h, w, c))
    a[h // 2:] = noise[h // 2:]
    return a


def add(name, what, size=None, product=None, differs=False):
    """product: the product path's full-size RGB where computable here
    ("value"); else differs: the product path must not give PIL's bytes
    ("differs"); else it must give them ("ref")."""
    path = os.path.join(OUT, name)
    im = Image.open(path)
    rgb = im.convert("RGB")
    s = size or rgb.size[0]
    ref = np.asarray(rgb.resize((s, s), Image.BICUBIC), np.uint8)
    tensors["ref." + name] = ref
    if product is not None:
        tensors["product." + name] = np.asarray(Image.fromarray(product, "RGB").resize((s, s), Image.BICUBIC))
    kind = "value" if product is not None else "differs" if differs else "ref"
    cases.append({"file": name, "size": s, "what": what, "pil_mode": im.mode, "product": kind})


def icc_profile():
    """A minimal ICC v2 RGB matrix/TRC profile (Adobe RGB-like primaries,
    gamma 2.2, not named sRGB): product mode converts through it, PIL and
    reference mode ignore it."""
    def xyz(x, y, z):
        return b"XYZ \0\0\0\0" + struct.pack(">iii", *(round(v * 65536) for v in (x, y, z)))
    desc = b"blipsearch test wide RGB"
    tags = [(b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(desc) + 1) + desc + b"\0" + b"\0" * 8 + b"\0" * 70),
            (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.6097, 0.3111, 0.0195)),
            (b"gXYZ", xyz(0.2053, 0.6257, 0.0609)), (b"bXYZ", xyz(0.1492, 0.0632, 0.7446))]
    tags += [(c + b"TRC", b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0233) + b"\0\0") for c in (b"r", b"g", b"b")]
    off = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", off + len(data), len(body))
        data += body
    size = off + len(data)
    head = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + b"\0" * 12 +
            b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + struct.pack(">iii", 63190, 65536, 54061) + b"\0" * 48)
    assert len(head) == 128
    return head + table + data


def write_tiff(name, w, h, spp, bps, photometric, data, be=False, extra=None, orientation=None):
    """Uncompressed one-strip TIFF (for layouts Pillow cannot write)."""
    e = ">" if be else "<"
    strip = data.astype(e + ("u2" if bps == 16 else "u1")).tobytes()
    tags = [(256, 4, [w]), (257, 4, [h]), (258, 3, [bps] * spp), (259, 3, [1]), (262, 3, [photometric]),
            (273, 4, [0]), (277, 3, [spp]), (278, 4, [h]), (279, 4, [len(strip)]), (284, 3, [1])]
    if orientation:
        tags.append((274, 3, [orientation]))
    if extra is not None:
        tags.append((338, 3, [extra]))
    tags.sort()
    ifd_off = 8
    n = len(tags)
    blob_off = ifd_off + 2 + 12 * n + 4
    blobs, entries = b"", b""
    for tag, typ, vals in tags:
        size = {3: 2, 4: 4}[typ]
        raw = b"".join(struct.pack(e + ("H" if typ == 3 else "I"), v) for v in vals)
        if len(raw) <= 4:
            entries += struct.pack(e + "HHI", tag, typ, len(vals)) + raw.ljust(4, b"\0")
        else:
            entries += struct.pack(e + "HHII", tag, typ, len(vals), blob_off + len(blobs))
            blobs += raw
    strip_off = blob_off + len(blobs)
    entries = entries.replace(struct.pack(e + "HHI", 273, 4, 1) + b"\0" * 4,
                              struct.pack(e + "HHII", 273, 4, 1, strip_off))
    head = (b"MM\0*" if be else b"II*\0") + struct.pack(e + "I", ifd_off)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(head + struct.pack(e + "H", n) + entries + b"\0\0\0\0" + blobs + strip)


def write_png(path, side, depth, ctype, rows, extra=()):
    """Square PNG from rows already in file byte order (for what Pillow cannot write)."""
    raw = b"".join(b"\0" + rows[y].tobytes() for y in range(side))
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", side, side, depth, ctype, 0, 0, 0)), *extra,
              (b"IDAT", zlib.compress(raw, 9)), (b"IEND", b"")]
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        for tag, data in chunks:
            f.write(struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data)))


def gif_blocks(b):
    """(header+LSD, global table, blocks before the image, image descriptor, local table, rest)."""
    flags = b[10]
    gsz = 3 << ((flags & 7) + 1) if flags & 0x80 else 0
    i = 13 + gsz
    pre = b""
    while b[i] == 0x21:
        j = i + 2
        while b[j]:
            j += b[j] + 1
        pre += b[i:j + 1]
        i = j + 1
    assert b[i] == 0x2C
    d = b[i:i + 10]
    lsz = 3 << ((d[9] & 7) + 1) if d[9] & 0x80 else 0
    return b[:13], b[13:13 + gsz], pre, d, b[i + 10:i + 10 + lsz], b[i + 10 + lsz:]


def scaled(v, m):
    """The product path's PNM samples: maxval to 255, rounded."""
    return np.floor(v * 255.0 / m + 0.5).astype(np.uint8)


def main():
    os.makedirs(OUT, exist_ok=True)
    S = 24
    # --- CMYK: Pillow's cmyk2rgb (9.4: R = (255-C)(255-K)/255 rounded), no ICC
    cmyk = pattern(S, S, 4).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(os.path.join(OUT, "cmyk_adobe.jpg"), quality=95)
    add("cmyk_adobe.jpg", "CMYK JPEG with Adobe APP14 (stored inverted), naive CMYK->RGB", differs=True)
    b = open(os.path.join(OUT, "cmyk_adobe.jpg"), "rb").read()
    out, i = bytearray(b[:2]), 2
    while b[i + 1] != 0xDA:  # drop APP14: Pillow inverts CMYK JPEGs with or without it
        n = struct.unpack(">H", b[i + 2:i + 4])[0]
        if b[i + 1] != 0xEE:
            out += b[i:i + 2 + n]
        i += 2 + n
    open(os.path.join(OUT, "cmyk_noadobe.jpg"), "wb").write(bytes(out + b[i:]))
    add("cmyk_noadobe.jpg", "CMYK JPEG without Adobe APP14", differs=True)
    Image.fromarray(cmyk, "CMYK").save(os.path.join(OUT, "cmyk.tif"))
    add("cmyk.tif", "CMYK TIFF, uncompressed", differs=True)
    Image.fromarray(cmyk, "CMYK").save(os.path.join(OUT, "cmyk_lzw.tif"), compression="tiff_lzw")
    add("cmyk_lzw.tif", "CMYK TIFF, LZW", differs=True)
    write_tiff("cmyk16.tif", S, S, 4, 16, 5, pattern(S, S, 4, 65535))
    add("cmyk16.tif", "16-bit CMYK TIFF (high byte, then naive CMYK->RGB)", differs=True)

    # --- 16-bit grey: PIL mode I / I;16, convert("RGB") clips at 255
    g = pattern(S, S, 1, 65535)[..., 0]
    g[0, :12] = [0, 1, 100, 254, 255, 256, 257, 300, 511, 4095, 65534, 65535]
    g[1] = np.arange(S) * 11  # 0..253: kept as is by PIL, shifted to 0 by v >> 8
    hb = np.repeat((g >> 8).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(g.astype(np.uint16), "I;16").save(os.path.join(OUT, "grey16.png"))
    add("grey16.png", "16-bit grey PNG (PIL mode I)", product=hb)
    write_png(os.path.join(OUT, "grey16_trns.png"), S, 16, 0, g.astype(">u2"), [(b"tRNS", struct.pack(">H", 300))])
    add("grey16_trns.png", "16-bit grey PNG with tRNS (PIL mode I, transparency ignored)", product=hb)
    Image.fromarray(g.astype(np.uint16), "I;16").save(os.path.join(OUT, "grey16.tif"))
    add("grey16.tif", "16-bit grey TIFF, little-endian (PIL mode I;16)", product=hb)
    write_tiff("grey16be.tif", S, S, 1, 16, 1, g, be=True)
    add("grey16be.tif", "16-bit grey TIFF, big-endian (PIL mode I;16B)", product=hb)
    Image.fromarray(g.astype(np.uint16), "I;16").save(os.path.join(OUT, "grey16_lzw.tif"), compression="tiff_lzw")
    add("grey16_lzw.tif", "16-bit grey TIFF, LZW", product=hb)
    Image.fromarray(g.astype(np.int32), "I").save(os.path.join(OUT, "grey16.pgm"))
    add("grey16.pgm", "16-bit PGM, maxval 65535 (PIL mode I)", product=np.repeat(scaled(g, 65535)[..., None], 3, 2))
    write_png(os.path.join(OUT, "greyalpha16.png"), S, 16, 4, np.stack([g, 65535 - g], axis=2).astype(">u2"))
    add("greyalpha16.png", "16-bit grey+alpha PNG (PIL LA;16B: high byte, as the product path)", product=hb)
    rgb16 = pattern(S, S, 3, 65535)
    write_png(os.path.join(OUT, "rgb16.png"), S, 16, 2, rgb16.astype(">u2"))
    add("rgb16.png", "16-bit RGB PNG (PIL RGB;16B: high byte)", product=(rgb16 >> 8).astype(np.uint8))

    # --- PNM: Pillow scales by maxval (round half even), then I -> RGB clips
    def pnm(name, magic, maxval, vals, what, product):
        wide = maxval > 255
        data = vals.astype(">u2" if wide else "u1").tobytes()
        c = 3 if magic == b"P6" else 1
        open(os.path.join(OUT, name), "wb").write(b"%s\n%d %d\n%d\n" % (magic, S, S, maxval) + data)
        assert vals.shape[-1] == c
        add(name, what, product=product)

    v = pattern(S, S, 1, 1023)
    pnm("grey10.pgm", b"P5", 1023, v, "PGM, maxval 1023 (PIL: scaled to 16 bits, then clipped at 255)",
        np.repeat(scaled(v, 1023), 3, axis=2))
    v = pattern(S, S, 1, 100)
    pnm("grey100.pgm", b"P5", 100, v, "PGM, maxval 100 (PIL: scaled to 8 bits)", np.repeat(scaled(v, 100), 3, axis=2))
    v = pattern(S, S, 3, 65535)
    v[0, :6, 0] = [0, 127, 128, 255, 32895, 65535]
    pnm("rgb16.ppm", b"P6", 65535, v, "16-bit PPM, maxval 65535 (PIL: round(v/257))", scaled(v, 65535))
    v = pattern(S, S, 3, 200)
    pnm("rgb200.ppm", b"P6", 200, v, "PPM, maxval 200 (scaled to 8 bits)", scaled(v, 200))

    # --- GIF: PIL keeps the palette colour of transparent pixels
    idx = (pattern(S, S, 1, 255)[..., 0] % 7).astype(np.uint8)
    pal = [200, 30, 90, 10, 20, 30, 250, 250, 0, 0, 128, 255, 77, 66, 55, 1, 2, 3, 255, 255, 255]
    rgb_of = np.array(pal, np.uint8).reshape(-1, 3)
    p = Image.fromarray(idx, "P")
    p.putpalette(pal)
    blk = rgb_of[idx].copy()
    for t in (0, 3):
        name = f"trns{t}.gif"
        p.save(os.path.join(OUT, name), transparency=t)
        prod = blk.copy()
        prod[idx == t] = 0
        add(name, f"GIF, transparent index {t}", product=prod)
    # a frame smaller than the logical screen: PIL fills the rest with the
    # transparent index (or index 0 without transparency)
    for t in (3, None):
        name = f"partial_{'trns' if t is not None else 'opaque'}.gif"
        small = Image.fromarray(idx[:16, :20], "P")
        small.putpalette(pal)
        tmp = os.path.join(OUT, name)
        small.save(tmp, transparency=t) if t is not None else small.save(tmp)
        b = bytearray(open(tmp, "rb").read())
        b[6:10] = struct.pack("<HH", S, S)
        open(tmp, "wb").write(bytes(b))
        add(name, "GIF, frame smaller than the screen" + (", transparent index 3" if t is not None else ""),
            differs=True)
    # local colour table (the global one holds other colours)
    b = open(os.path.join(OUT, "trns3.gif"), "rb").read()
    hdr, gct, pre, d, lct, rest = gif_blocks(b)
    hdr = bytearray(hdr)
    d = bytearray(d)
    d[9] = (d[9] & 0x78) | 0x80 | (hdr[10] & 7)
    other = bytes(255 - x for x in gct)
    open(os.path.join(OUT, "local_trns.gif"), "wb").write(bytes(hdr) + other + pre + bytes(d) + gct + rest)
    add("local_trns.gif", "GIF with a local colour table, transparent index 3", differs=True)
    # palette PNG with tRNS, grey PNG with tRNS: the colour under alpha, both paths
    p.save(os.path.join(OUT, "palette_trns.png"), transparency=bytes([0, 128, 255, 0, 10, 255, 7]))
    add("palette_trns.png", "palette PNG with tRNS")
    Image.fromarray((pattern(S, S, 1)[..., 0]).astype(np.uint8), "L").save(
        os.path.join(OUT, "grey_trns.png"), transparency=37)
    add("grey_trns.png", "8-bit grey PNG with tRNS")
    for bits in (1, 2, 4):
        v = pattern(S, S, 1, (1 << bits) - 1)[..., 0]
        per = 8 // bits
        packed = np.zeros((S, S // per), np.uint8)
        for k in range(per):
            packed |= (v[:, k::per] << (8 - bits * (k + 1))).astype(np.uint8)
        name = f"grey{bits}.png"
        write_png(os.path.join(OUT, name), S, bits, 0, packed)
        add(name, f"{bits}-bit grey PNG")
    p.save(os.path.join(OUT, "palette.tif"))
    add("palette.tif", "palette TIFF")
    Image.fromarray(pattern(S, S, 1)[..., 0] > 127).save(os.path.join(OUT, "bilevel.tif"), compression="group4")
    add("bilevel.tif", "1-bit TIFF, CCITT G4")

    # --- orientation: PIL applies TIFF's Orientation tag on load (every TIFF,
    # Pillow >= 6.2), never EXIF orientation of JPEG, PNG or WebP
    sq = pattern(16, 16, 3).astype(np.uint8)
    for o in range(1, 9):
        ti = TiffImagePlugin.ImageFileDirectory_v2()
        ti[274] = o
        Image.fromarray(sq, "RGB").save(os.path.join(OUT, f"orient{o}.tif"), tiffinfo=ti)
        add(f"orient{o}.tif", f"RGB TIFF, Orientation {o}, uncompressed")
    for o in (5, 6):
        ti = TiffImagePlugin.ImageFileDirectory_v2()
        ti[274] = o
        Image.fromarray(sq, "RGB").save(os.path.join(OUT, f"orient{o}_lzw.tif"), tiffinfo=ti, compression="tiff_lzw")
        add(f"orient{o}_lzw.tif", f"RGB TIFF, Orientation {o}, LZW")
    ti = TiffImagePlugin.ImageFileDirectory_v2()
    ti[274] = 6
    Image.fromarray(pattern(16, 24, 3).astype(np.uint8), "RGB").save(os.path.join(OUT, "orient6_wide.tif"),
                                                                      tiffinfo=ti)
    add("orient6_wide.tif", "24x16 TIFF, Orientation 6 (turned to 16x24, then squashed)", size=20)
    write_tiff("orient8_grey16.tif", 16, 16, 1, 16, 1, pattern(16, 16, 1, 65535)[..., 0], orientation=8)
    add("orient8_grey16.tif", "16-bit grey TIFF, Orientation 8", differs=True)
    ex = Image.Exif()
    ex[274] = 6
    Image.fromarray(sq, "RGB").save(os.path.join(OUT, "exif6.png"), exif=ex)
    add("exif6.png", "PNG with eXIf Orientation 6 (PIL ignores it)", differs=True)

    # --- ICC profiles: PIL's convert("RGB") ignores them
    Image.fromarray(pattern(S, S, 3).astype(np.uint8), "RGB").save(os.path.join(OUT, "icc_wide.png"),
                                                                   icc_profile=icc_profile())
    add("icc_wide.png", "RGB PNG with a wide-gamut ICC profile", differs=True)

    # --- write cases.json and expected.safetensors (sorted keys: deterministic)
    meta, blob = {}, b""
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k], np.uint8)
        meta[k] = {"dtype": "U8", "shape": list(a.shape), "data_offsets": [len(blob), len(blob) + a.nbytes]}
        blob += a.tobytes()
    meta["__metadata__"] = {"pillow": PIL.__version__, "numpy": np.__version__}
    h = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(OUT, "expected.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + blob)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"pillow": PIL.__version__, "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"{len(cases)} cases, Pillow {PIL.__version__}, in {OUT}")


if __name__ == "__main__":
    main()
