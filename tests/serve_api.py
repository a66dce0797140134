"""serve_api.py BIN MODEL T: blip-serve's API checks for tests/test_serve.sh.
T holds lib/ (indexed into T/db) and new/ (photos added while serving).
Prints one FAIL line per failed check and exits 1 if any failed."""
import base64
import fcntl
import socket
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

from serve_lib import Server, multipart, sanitizer_reports
from testlib import write_png

BIN, MODEL, T = sys.argv[1:4]
DB, L = T + "/db", T + "/lib"
SERVE = BIN + "/blip-serve"
QUERY = "a dog running on a beach"
passed = failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL: %s %s" % (name, str(detail)[:600]), flush=True)


def bq(*args, db=DB):
    """blip-query --json ... -> parsed list (or None on no match)."""
    r = subprocess.run([BIN + "/blip-query", "--db", db, "--model", MODEL, "--json"] + list(args),
                       capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def same_hits(name, api, ref, tol=1e-6):
    keys = ["rank", "id", "path", "taken_at", "mtime"]
    ok = ref is not None and len(api) == len(ref)
    for a, b in zip(api, ref or []):
        ok = ok and all(a[k] == b[k] for k in keys)
        for k in ["score", "cosine", "itm_prob", "itm_logit"]:
            ok = ok and ((a[k] is None and b[k] is None) or
                         (a[k] is not None and b[k] is not None and abs(a[k] - b[k]) <= tol))
    check(name, ok, (api[:2], (ref or [])[:2]))


def q(params):
    return "/api/search?" + urllib.parse.urlencode(params)


def security_headers(name, h):
    check(name + ": nosniff", h.get("x-content-type-options") == "nosniff", h)
    csp = h.get("content-security-policy", "")
    check(name + ": CSP without inline script", "script-src 'self'" in csp and "unsafe-inline" not in csp, csp)


s = Server(SERVE, DB, MODEL)

# ---- status and page ----
st, h, j = s.json("GET", "/api/status")
prec = sqlite3.connect(DB + "/index.sqlite").execute("SELECT value FROM meta WHERE key='precision'").fetchone()[0]
check("status", st == 200 and j["count"] == 13 and j["model"] == "blip-tiny" and j["precision"] == prec
      and j["indexer_running"] is False, (j, prec))
security_headers("status", h)
check("status is JSON", h.get("content-type", "").startswith("application/json"), h)
st, h, d = s.get("/")
check("page", st == 200 and b"<script src=\"/app.js\"" in d and h["content-type"].startswith("text/html"), h)
security_headers("page", h)
check("no inline script in the page", b"<script>" not in d and b"onclick" not in d and b"javascript:" not in d)
st, h, d = s.get("/app.js")
check("app.js", st == 200 and h["content-type"].startswith("text/javascript") and b"innerHTML" not in d, h)
st, h, d = s.get("/style.css")
check("style.css", st == 200 and h["content-type"].startswith("text/css"), h)

# ---- parity with blip-query --json ----
cases = [
    ({"q": QUERY, "n": 13}, ["-n", "13", QUERY]),
    ({"q": QUERY, "n": 13, "rerank": 0}, ["-n", "13", "--rerank", "0", QUERY]),
    ({"q": QUERY, "n": 13, "rerank": 4}, ["-n", "13", "--rerank", "4", QUERY]),
    ({"q": "red car on a street", "n": 5}, ["-n", "5", "red car on a street"]),
    ({"q": QUERY, "n": 20, "under": L + "/a"}, ["-n", "20", "--under", L + "/a", QUERY]),
    ({"q": QUERY, "n": 20, "under": L + "/a/", "rerank": 0}, ["-n", "20", "--under", L + "/a/", "--rerank", "0", QUERY]),
    ({"q": QUERY, "n": 20, "ext": "png"}, ["-n", "20", "--ext", "png", QUERY]),
    ({"q": QUERY, "n": 20, "ext": "JPG,webp"}, ["-n", "20", "--ext", "JPG,webp", QUERY]),
    ({"q": QUERY, "n": 20, "after": "2022-01-01"}, ["-n", "20", "--after", "2022-01-01", QUERY]),
    ({"q": QUERY, "n": 20, "after": "2022-01-01", "before": "2023-01-01T00:00"},
     ["-n", "20", "--after", "2022-01-01", "--before", "2023-01-01T00:00", QUERY]),
    ({"q": QUERY, "n": 2, "before": "2022-01-01"}, ["-n", "2", "--before", "2022-01-01", QUERY]),
    ({"q": QUERY, "n": 13, "sort": "date"}, ["-n", "13", "--sort", "date", QUERY]),
]
full = bq("-n", "13", QUERY)
P = full[3]["itm_prob"]
cases.append(({"q": QUERY, "n": 13, "threshold": repr(P)}, ["-n", "13", "--threshold", repr(P), QUERY]))
for params, args in cases:
    st, h, j = s.json("GET", q(params))
    check("search %s: 200" % params, st == 200, j)
    if st == 200:
        same_hits("search %s = blip-query %s" % (params, args), j["results"], bq(*args))
        check("search %s: links" % params, all(r["thumb"] == "/api/thumb/%d" % r["id"] and
                                               r["photo"] == "/api/photo/%d" % r["id"] for r in j["results"]))
# paging: offset/n is a slice of the n+offset answer, "more" says whether to ask again
st, h, j = s.json("GET", q({"q": QUERY, "n": 5, "offset": 3}))
same_hits("offset 3, n 5 = blip-query -n 8 [3:8]", j["results"], bq("-n", "8", QUERY)[3:8])
check("paging: more", j["more"] is True and j["offset"] == 3, j)
st, h, j = s.json("GET", q({"q": QUERY, "n": 10, "offset": 10}))
check("paging: the last page", len(j["results"]) == 3 and j["more"] is False and j["results"][0]["rank"] == 11, j)
# reasons for an empty answer
st, h, j = s.json("GET", q({"q": QUERY, "under": L + "/b", "ext": "jpg"}))
check("no match: filters", st == 200 and j["results"] == [] and j["reason"] == "filters", j)
st, h, j = s.json("GET", q({"q": QUERY, "threshold": "1"}))
check("no match: threshold", st == 200 and j["results"] == [] and j["reason"] == "threshold", j)
st, h, j = s.json("GET", q({"q": " ".join(["giraffe"] * 40), "n": 1}))
check("truncated query flagged", st == 200 and j["truncated"] is True, j)

# ---- concurrent text queries share one batch (text encoder and ITM rerank), with the same answers ----
conc = [({"q": t, "n": 6, "rerank": k}, ["-n", "6", "--rerank", str(k), t])
        for t, k in [(QUERY, 16), ("red car on a street", 4), ("a cat", 0), ("two people hiking in the snow", 16),
                     ("a bowl of fruit on a table", 2), ("x", 16), (" ".join(["giraffe"] * 40), 3),
                     ("a boat", 16)]]
conc.append(({"q": QUERY, "n": 20, "under": L + "/a"}, ["-n", "20", "--under", L + "/a", QUERY]))
conc.append(({"q": "a cat", "n": 3, "offset": 2}, None))
refs = [bq(*a) if a else bq("-n", "5", "a cat")[2:5] for _, a in conc]
refused = s.json("GET", q({"q": "?! ...", "n": 4}))  # no words: its own error, the batch goes on
check("a query without words: 400 alone", refused[0] == 400 and "no words" in refused[2].get("error", ""), refused)
conc.insert(4, ({"q": "?! ...", "n": 4}, None))
refs.insert(4, None)
def concurrent(srv):
    """Send every conc query at once to srv; check each answer against blip-query; return batched_queries."""
    answers = [None] * len(conc)

    def ask(i):
        answers[i] = srv.json("GET", q(conc[i][0]))

    th = [threading.Thread(target=ask, args=(i,)) for i in range(len(conc))]
    for t in th:
        t.start()
    for t in th:
        t.join()
    for (params, _), ref, (st, h, j) in zip(conc, refs, answers):
        if ref is None:
            check("concurrent %s: its own error, as alone" % params["q"], (st, j) == (refused[0], refused[2]), (st, j))
            continue
        check("concurrent %s: 200" % params["q"][:20], st == 200, j)
        if st == 200:
            same_hits("concurrent %s = blip-query" % params["q"][:20], j["results"], ref, 1e-5)
    return srv.json("GET", "/api/status")[2]["batched_queries"]


s9 = Server(SERVE, DB, MODEL, "--batch", log=T + "/s9.log")
batched = 0
for attempt in range(8):
    batched = concurrent(s9)
    if batched:
        break
check("--batch: concurrent text queries were batched", batched >= 2, batched)
check("--batch: stops clean", s9.stop() == 0)
s10 = Server(SERVE, DB, MODEL, "--no-batch", log=T + "/s10.log")
check("--no-batch: one query at a time", concurrent(s10) == 0)
check("--no-batch: stops clean", s10.stop() == 0)

# ---- image queries ----
IMG = L + "/b/img00002.png"
ref_img = bq("-n", "5", "--image", IMG)
raw = open(IMG, "rb").read()
st, h, j = s.json("POST", "/api/search/image?n=5", raw, {"Content-Type": "image/png"})
same_hits("image search (raw body) = blip-query --image", j["results"] if st == 200 else [], ref_img, 1e-5)
body, ct = multipart([], [("file", "x.png", raw)])
st, h, j = s.json("POST", "/api/search/image?n=5", body, {"Content-Type": ct})
same_hits("image search (multipart) = blip-query --image", j["results"] if st == 200 else [], ref_img, 1e-5)
st, h, j = s.json("POST", "/api/search/image?n=20&under=" + urllib.parse.quote(L + "/a"), raw)
check("image search with a filter", st == 200 and len(j["results"]) == 6 and
      all(r["path"].startswith(L + "/a/") for r in j["results"]), j)
img_id = ref_img[0]["id"]
st, h, j = s.json("GET", "/api/similar/%d?n=5" % img_id)
same_hits("similar/{id} = blip-query --image of its file", j["results"] if st == 200 else [], ref_img, 1e-5)
check("similar: itself first", st == 200 and j["results"][0]["id"] == img_id, j)
st, h, j = s.json("GET", "/api/similar/%d?n=3&offset=2" % img_id)
check("similar paging", st == 200 and [r["id"] for r in j["results"]] == [r["id"] for r in ref_img[2:5]], j)
texts = ["a dog on a beach", "red car", "a cat sleeping on a sofa"]
ref_rt = bq("--image", IMG, *sum([["--text", t] for t in texts], []))
st, h, j = s.json("POST", "/api/rank-texts", json.dumps({"image": base64.b64encode(raw).decode(), "texts": texts}))
ok = st == 200 and len(j["results"]) == 3
for a, b in zip(j["results"] if ok else [], ref_rt):
    ok = ok and a["index"] == b["index"] and a["text"] == b["text"] and abs(a["score"] - b["score"]) < 1e-5
check("rank-texts (JSON) = blip-query --image --text", ok, (j, ref_rt))
body, ct = multipart([("text", t) for t in texts], [("file", "p.png", raw)])
st, h, j2 = s.json("POST", "/api/rank-texts", body, {"Content-Type": ct})
check("rank-texts (multipart) = JSON", st == 200 and j2 == j, (j2, j))

# ---- photos and thumbnails ----
pid = full[0]["id"]
ppath = full[0]["path"]
st, h, d = s.get("/api/photo/%d" % pid)
check("photo: the file's bytes", st == 200 and d == open(ppath, "rb").read() and h["content-type"] == "image/jpeg", h)
security_headers("photo", h)
st, h2, _ = s.get("/api/photo/%d" % pid, {"If-None-Match": h.get("etag", "x")})
check("photo: 304 on its ETag", st == 304, st)
st, h, d = s.get("/api/photo/%d" % [r for r in full if r["path"].endswith(".png")][0]["id"])
check("photo: png type", st == 200 and h["content-type"] == "image/png", h)
st, h, d = s.get("/api/thumb/%d" % pid)
check("thumb: a JPEG", st == 200 and h["content-type"] == "image/jpeg" and d[:3] == b"\xff\xd8\xff", h)
w = hgt = 0
i = 2
while i < len(d) - 9:  # SOF0/SOF2 marker: the JPEG's size
    if d[i] == 0xFF and d[i + 1] in (0xC0, 0xC2):
        hgt, w = struct.unpack(">HH", d[i + 5:i + 9])
        break
    i += 2 + struct.unpack(">H", d[i + 2:i + 4])[0] if d[i] == 0xFF else 1
want = {"/a/": (96, 72), "/ab/": (80, 80), "/b/": (64, 64)}[ppath[len(L):ppath.rindex("/") + 1]]
check("thumb: a small photo keeps its size (never enlarged)", (w, hgt) == want, ((w, hgt), want))
etag = h.get("etag")
check("thumb: ETag and Cache-Control", etag and "max-age" in h.get("cache-control", ""), h)
cached = os.listdir(DB + "/thumbs/256")
check("thumb: cached on disk by id and fingerprint", any(f.startswith("%d-" % pid) for f in cached), cached)
st, h, d2 = s.get("/api/thumb/%d" % pid, {"If-None-Match": etag})
check("thumb: 304 on its ETag", st == 304 and d2 == b"", st)
st, h, d3 = s.get("/api/thumb/%d" % pid)
check("thumb: cache hit = same bytes", st == 200 and d3 == d)
st, h, j = s.json("GET", "/api/thumb/%d?size=7" % pid)
check("thumb: bad size 400", st == 400 and "error" in j, j)
st, h, d = s.get("/api/thumb/%d?size=1024" % pid)
check("thumb: size 1024", st == 200 and d[:2] == b"\xff\xd8", st)

# ---- clip-retrieval protocol, as ClipClient posts it (json.dumps body, no Content-Type) ----
st, h, j = s.json("GET", "/indices-list")
check("indices-list", st == 200 and j == ["blipsearch"], j)


def clip_body(**kw):
    b = {"text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
         "use_safety_model": True, "use_violence_detector": True, "indice_name": "blipsearch", "use_mclip": False,
         "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 5, "num_result_ids": 5,
         "verbose": False}
    b.update(kw)
    return json.dumps(b)


st, h, j = s.json("POST", "/knn-service", clip_body(text=QUERY))
ref5 = bq("-n", "5", QUERY)
check("knn text: ids and similarity = blip-query scores", st == 200 and [r["id"] for r in j] == [r["id"] for r in ref5]
      and all(abs(a["similarity"] - b["score"]) < 1e-6 for a, b in zip(j, ref5)), (j, ref5))
check("knn text: url and caption", st == 200 and all(
    r["url"] == "http://127.0.0.1:%d/api/photo/%d" % (s.port, r["id"]) and r["caption"] == os.path.basename(r["path"])
    for r in j), j)
if st == 200:
    st2, _, d = s.get(urllib.parse.urlparse(j[0]["url"]).path)
    check("knn: the url serves the photo", st2 == 200 and d == open(j[0]["path"], "rb").read())
st, h, j = s.json("POST", "/knn-service", clip_body(image=base64.b64encode(raw).decode()))
check("knn image (base64)", st == 200 and [r["id"] for r in j] == [r["id"] for r in ref_img] and
      abs(j[0]["similarity"] - ref_img[0]["cosine"]) < 1e-5, j)
feat = sqlite3.connect(DB + "/index.sqlite").execute("SELECT feat FROM images WHERE id=?", (img_id,)).fetchone()[0]
emb = list(struct.unpack("<%df" % (len(feat) // 4), feat))
st, h, j = s.json("POST", "/knn-service", clip_body(embedding_input=[x * 3 for x in emb], num_images=3))
check("knn embedding_input (renormalized)", st == 200 and len(j) == 3 and j[0]["id"] == img_id and
      abs(j[0]["similarity"] - 1) < 1e-5, j)
st, h, j = s.json("POST", "/knn-service", clip_body(text=QUERY, modality="text"))
check("knn modality text: 400 JSON", st == 400 and "images only" in j["error"], j)
st, h, j = s.json("POST", "/knn-service", clip_body(image_url="http://169.254.169.254/latest/meta-data"))
check("knn image_url refused (no fetching)", st == 400 and "image_url" in j["error"], j)
st, h, j = s.json("POST", "/knn-service", clip_body(embedding_input=[1.0, 2.0]))
check("knn embedding of the wrong size: 400", st == 400 and "dimensions" in j["error"], j)
st, h, j = s.json("POST", "/knn-service", clip_body(text=QUERY, image=base64.b64encode(raw).decode()))
check("knn text + image: 400", st == 400, j)

# ---- bad requests: 4xx with a JSON error ----
bad = [
    ("GET", "/api/search", None, 400), ("GET", "/api/search?q=", None, 400),
    ("GET", "/api/search?q=x&n=0", None, 400), ("GET", "/api/search?q=x&n=abc", None, 400),
    ("GET", "/api/search?q=x&n=1001", None, 400), ("GET", "/api/search?q=x&offset=999&n=10", None, 400),
    ("GET", "/api/search?q=x&rerank=-1", None, 400), ("GET", "/api/search?q=x&threshold=2", None, 400),
    ("GET", "/api/search?q=x&threshold=0.5&rerank=0", None, 400), ("GET", "/api/search?q=x&sort=size", None, 400),
    ("GET", "/api/search?q=x&after=2021-02-30x", None, 400), ("GET", "/api/search?q=x&under=relative", None, 400),
    ("GET", "/api/search?q=x&ext=jp%27g", None, 400), ("GET", "/api/search?" + "&".join("a%d=1" % i for i in range(40)) + "&q=x", None, 400),
    ("GET", "/api/search?q=" + "x" * 4097, None, 400),
    ("POST", "/api/search", b"", 405), ("GET", "/api/search/image", None, 405), ("GET", "/nope", None, 404),
    ("GET", "/api/photo/99999", None, 404), ("GET", "/api/thumb/99999", None, 404),
    ("GET", "/api/similar/99999", None, 404),
    ("POST", "/api/search/image", b"not an image at all", 400), ("POST", "/api/search/image", b"", 400),
    ("POST", "/api/rank-texts", b"{", 400), ("POST", "/api/rank-texts", b"[]", 400),
    ("POST", "/api/rank-texts", json.dumps({"image": "!!!", "texts": ["a"]}).encode(), 400),
    ("POST", "/api/rank-texts", json.dumps({"image": base64.b64encode(raw).decode(), "texts": []}).encode(), 400),
    ("POST", "/api/rank-texts", json.dumps({"image": base64.b64encode(raw).decode(), "texts": ["x" * 4097]}).encode(), 400),
    ("POST", "/knn-service", b"\xff\xfe", 400), ("POST", "/knn-service", b"{}", 400),
]
for m, path, body, want in bad:
    st, h, d = s.request(m, path, body)
    try:
        err = json.loads(d)["error"]
    except Exception:
        err = None
    check("%s %s -> %d with a JSON error" % (m, path[:60], want), st == want and isinstance(err, str) and err, (st, d[:200]))
    security_headers("error %d" % want, h)

# an image over the pixel guard (PNG header claiming 30000x30000): refused before decoding, as when indexing
bomb = b"\x89PNG\r\n\x1a\n"
ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
bomb += struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
idat = zlib.compress(b"\0" * 1000)
bomb += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
bomb += struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
st, h, j = s.json("POST", "/api/search/image", bomb)
check("decompression bomb upload: 413", st == 413 and "error" in j, (st, j))

# ---- traversal: files only by id ----
trav = ["/api/photo/..%2f..%2f..%2fetc%2fpasswd", "/api/photo/%2e%2e/%2e%2e/etc/passwd", "/api/photo/../../etc/passwd",
        "/api/photo//etc/passwd", "/api/photo/" + urllib.parse.quote(ppath, safe=""), "/api/photo/1%00",
        "/api/photo/%00", "/api/thumb/1%2f..%2f2", "/api/photo/01", "/api/photo/-1", "/api/photo/1.0",
        "/api/photo/0x1", "/api/photo/1/", "/api/photo/1%2500", "/api/thumb/..", "/../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd", "/app.js/../../../etc/passwd", "/api/photo/99999999999999999999"]
for p in trav:
    st, h, d = s.request("GET", p)
    check("traversal %s: no file" % p, st in (400, 404) and b"root:" not in d and (st == 400 or b"error" in d),
          (st, d[:100]))
ppath1 = sqlite3.connect(DB + "/index.sqlite").execute("SELECT path FROM images WHERE id=1").fetchone()[0]
for raw_line in (b"GET /api/photo/1\x00/../../etc/passwd HTTP/1.1", b"GET /api/photo/ 1 HTTP/1.1",
                 b"GET ../../etc/passwd HTTP/1.1", b"GET /api/photo/1\t HTTP/1.1"):
    r = s.raw(raw_line + b"\r\nHost: x\r\n\r\n")
    # MHD reads the request line as a C string: a raw NUL ends the URL, so
    # "/api/photo/1\0/../.." asks for photo 1, which is all it may give
    photo1 = r.startswith(b"HTTP/1.1 200") and r.endswith(open(ppath1, "rb").read())
    check("raw request line %r: refused" % raw_line, b"root:" not in r and
          (r == b"" or r.split(b" ")[1][:1] == b"4" or (b"\x00" in raw_line and photo1)), r[:80])

# symlinks and swapped files: the server re-checks the indexed file before serving it
victim = [r for r in full if r["path"].startswith(L + "/ab/")]
v1, v2, v3 = victim[0], victim[1], victim[2]
secret = T + "/secret.txt"
open(secret, "w").write("root:x:0:0:secret\n" * 100)
os.rename(v1["path"], v1["path"] + ".bak")
os.symlink(secret, v1["path"])
for ep in ("photo", "thumb"):
    st, h, d = s.get("/api/%s/%d" % (ep, v1["id"]))
    check("%s: an indexed file replaced by a symlink is refused" % ep, st == 403 and b"root:" not in d, (st, d[:100]))
os.unlink(v1["path"])
shutil.copy(secret, v1["path"])
st, h, d = s.get("/api/photo/%d" % v1["id"])
check("photo: an indexed file replaced by another file is refused (409)", st == 409 and b"root:" not in d, (st, d[:100]))
data2 = bytearray(open(v2["path"], "rb").read())
open(v2["path"] + ".bak", "wb").write(data2)
data2[len(data2) // 2] ^= 0xFF
open(v2["path"], "wb").write(bytes(data2))
st, h, d = s.get("/api/thumb/%d" % v2["id"])
check("thumb: same size, other content: refused (fingerprint)", st == 409, st)
os.rename(v2["path"] + ".bak", v2["path"])
os.rename(v1["path"] + ".bak", v1["path"])
st, h, d = s.get("/api/photo/%d" % v1["id"])
check("photo: the restored file is served again", st == 200, st)
os.rename(L + "/ab", T + "/ab-moved")
os.symlink(T + "/ab-moved", L + "/ab")
st, h, d = s.get("/api/photo/%d" % v3["id"])
check("photo: a directory on the path became a symlink: refused", st in (403, 410), st)
os.unlink(L + "/ab")
os.rename(T + "/ab-moved", L + "/ab")
os.rename(v3["path"], v3["path"] + ".gone")
st, h, j = s.json("GET", "/api/photo/%d" % v3["id"])
check("photo: a vanished file: 410", st == 410 and "gone" in j["error"], (st, j))
os.rename(v3["path"] + ".gone", v3["path"])

# ---- request size limits ----
r = s.raw(b"GET /api/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100000 + b"\r\n\r\n")
check("a 100 KB header is refused", r[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 413") or r == b"", r[:40])
r = s.raw(b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Length: 60000000\r\n\r\n")
check("an announced 60 MB body: 413 before it is read", r.startswith(b"HTTP/1.1 413") and b"error" in r, r[:200])
s2 = Server(SERVE, DB, MODEL, "--max-upload", "0.5", log=T + "/s2.log")
big = os.urandom(600000)
r = s2.raw(b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
check("a body over --max-upload: 413", r.startswith(b"HTTP/1.1 413") and b"error" in r, r[:60])
body, ct = multipart([], [("file", "big.jpg", big)])
r = s2.raw(b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
           % (ct.encode(), len(body)) + body)
check("a multipart file over --max-upload: 413", r.startswith(b"HTTP/1.1 413") and b"error" in r, r[:60])
chunked = b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: %s\r\n\r\n" % ct.encode()
pieces = [body[i:i + 100000] for i in range(0, len(body), 100000)]
chunked += b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
r = s2.raw(chunked)
check("a chunked multipart body over --max-upload: 413", r.startswith(b"HTTP/1.1 413"), r[:60])
body, ct = multipart([("junk", "j" * 600000)], [])  # a field the server does not keep counts too
chunked = b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: %s\r\n\r\n" % ct.encode()
chunked += b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in [body[i:i + 65536] for i in range(0, len(body), 65536)])
r = s2.raw(chunked + b"0\r\n\r\n")
check("a chunked multipart field over --max-upload: 413", r.startswith(b"HTTP/1.1 413"), r[:60])
chunked = b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
chunked += b"".join(b"%x\r\n" % 100000 + b"a" * 100000 + b"\r\n" for _ in range(7)) + b"0\r\n\r\n"
r = s2.raw(chunked)
check("a chunked body over --max-upload: 413", r.startswith(b"HTTP/1.1 413"), r[:60])
s2.stop()

# ---- the engine wait budget: a request that cannot get the engine in time gets 503 (its job is
# left to the engine, which frees it: the sanitizer build checks that nothing leaks)
s7 = Server(SERVE, DB, MODEL, "--budget", "0.000001", log=T + "/s7.log")
st, h, j = s7.json("GET", q({"q": QUERY}))
check("budget: 503 with a JSON error and Retry-After", st == 503 and "busy" in j["error"] and h.get("retry-after"), (st, j))
st, h, j = s7.json("GET", "/api/status")
check("budget: the server still answers", st == 200, st)
check("budget: stops clean with an abandoned job", s7.stop() == 0)
# the budget runs from the request's arrival (its body in): an upload's decode spends it too, and a decode
# past it is cut short with 503 instead of answering late (5000x5000 PNG: far more than 20 ms to inflate)
w = 5000
write_png(T + "/big.png", w, w, bytes((x * 7) & 255 for x in range(w * 3)) * w)
s7 = Server(SERVE, DB, MODEL, "--budget", "0.02", log=T + "/s7b.log")
st, h, j = s7.json("POST", "/api/search/image", open(T + "/big.png", "rb").read())
check("budget: a decode past it gets 503", st == 503 and "decoding" in j["error"] and h.get("retry-after"), (st, j))
st, h, j = s7.json("GET", "/api/status")
check("budget: answers after a cut decode", st == 200, st)
check("budget: stops clean after a cut decode", s7.stop() == 0)
os.unlink(T + "/big.png")

# ---- CORS off by default; --cors ORIGIN allows exactly ORIGIN ----
st, h, _ = s.get("/api/status", {"Origin": "http://evil.example"})
check("no CORS header by default", "access-control-allow-origin" not in h, h)
s3 = Server(SERVE, DB, MODEL, "--cors", "http://front.example:1234", log=T + "/s3.log")
st, h, _ = s3.get("/api/status", {"Origin": "http://front.example:1234"})
check("--cors: the allowed origin", h.get("access-control-allow-origin") == "http://front.example:1234", h)
st, h, _ = s3.get("/api/status", {"Origin": "http://evil.example"})
check("--cors: another origin gets nothing", "access-control-allow-origin" not in h, h)
st, h, _ = s3.request("OPTIONS", "/knn-service", headers={"Origin": "http://front.example:1234",
                                                          "Access-Control-Request-Method": "POST"})
check("--cors: preflight", st == 204 and "POST" in h.get("access-control-allow-methods", ""), (st, h))
s3.stop()

# ---- token ----
open(T + "/token", "w").write("s3cret-token-0123456789abcdef\n")
s4 = Server(SERVE, DB, MODEL, "--token-file", T + "/token", log=T + "/s4.log")
st, h, j = s4.json("GET", "/api/status")
check("token: none -> 401 JSON", st == 401 and "token" in j["error"] and "Bearer" in h.get("www-authenticate", ""), (st, j))
st, h, j = s4.json("GET", "/api/status", headers={"Authorization": "Bearer s3cret-token-0123456789abcdeX"})
check("token: wrong -> 401", st == 401, st)
st, h, j = s4.json("GET", "/api/status", headers={"Authorization": "Bearer s3cret-token-0123456789abcde"})
check("token: a prefix -> 401", st == 401, st)
st, h, j = s4.json("GET", "/api/status", headers={"Authorization": "Bearer s3cret-token-0123456789abcdef"})
check("token: right -> 200", st == 200, st)
# the page trades the token for a session cookie no script can read and no other site's page sends
# (not Secure: plain http would never send it back)
st, h, _ = s4.request("POST", "/api/session", headers={"Authorization": "Bearer s3cret-token-0123456789abcdef"})
ck = h.get("set-cookie", "")
attrs = [a.strip() for a in ck.split(";")]
check("token: /api/session sets an HttpOnly SameSite=Strict cookie", st == 204 and "HttpOnly" in attrs and
      "SameSite=Strict" in attrs and "Path=/" in attrs and "Secure" not in attrs, (st, ck))
check("token: the cookie is a session key, not the token", "s3cret" not in ck and len(attrs[0]) > 30, ck)
st, h, d = s4.get("/api/photo/%d" % pid, {"Cookie": attrs[0]})
check("token: the session cookie -> 200", st == 200, st)
st, h, d = s4.get("/api/photo/%d" % pid, {"Cookie": "blip_session=s3cret-token-0123456789abcdef"})
check("token: the token as cookie -> 401", st == 401, st)
st, h, _ = s4.request("POST", "/api/session", headers={"Authorization": "Bearer s3cret-token-0123456789abcdeX"})
check("token: /api/session with a wrong token -> 401, no cookie", st == 401 and "set-cookie" not in h, (st, h))
st, h, d = s4.get("/api/photo/%d" % pid)
check("token: photo without it -> 401", st == 401 and d[:1] == b"{", st)
st, h, d = s4.get("/")
check("token: the page itself loads (it asks for the token)", st == 200, st)
s4.stop()

# ---- listening elsewhere than loopback needs a token or --insecure-no-auth ----
r = subprocess.run([SERVE, "--db", DB, "--model", MODEL, "--listen", "0.0.0.0:0"], capture_output=True, text=True,
                   timeout=60)
check("0.0.0.0 without a token: refused", r.returncode == 2 and "loopback" in r.stderr, r.stderr)
s5 = Server(SERVE, DB, MODEL, "--listen", "0.0.0.0:0", "--insecure-no-auth", log=T + "/s5.log")
st, _, _ = s5.get("/api/status")
rc = s5.stop()
check("0.0.0.0 with --insecure-no-auth: warns and serves", st == 200 and rc == 0 and "WARNING" in s5.log(), s5.log()[-300:])
# IPv6: [::1] is loopback (no token), [::] is every address (a token, as 0.0.0.0)
s5 = Server(SERVE, DB, MODEL, "--listen", "[::1]:0", log=T + "/s5v6.log")
st, _, j = s5.json("GET", q({"q": QUERY, "n": 3}))
check("[::1]: serves without a token", s5.host == "::1" and st == 200 and len(j["results"]) == 3, (s5.host, st))
check("[::1]: stops clean", s5.stop() == 0)
r = subprocess.run([SERVE, "--db", DB, "--model", MODEL, "--listen", "[::]:0"], capture_output=True, text=True,
                   timeout=60)
check("[::] without a token: refused", r.returncode == 2 and "loopback" in r.stderr, r.stderr)
s5 = Server(SERVE, DB, MODEL, "--listen", "[::]:0", "--token-file", T + "/token", log=T + "/s5v6t.log")
st, _, _ = s5.json("GET", "/api/status")
st2, _, _ = s5.json("GET", "/api/status", headers={"Authorization": "Bearer s3cret-token-0123456789abcdef"})
check("[::] with a token: 401 without it, 200 with it", (st, st2) == (401, 200), (st, st2))
s5.stop()
r = subprocess.run([SERVE, "--db", DB, "--model", MODEL, "--listen", "nonsense"], capture_output=True, text=True)
check("bad --listen: exit 2", r.returncode == 2 and "listen" in r.stderr, r.stderr)
os.makedirs(T + "/other", exist_ok=True)
for f in ("config.json", "vocab.txt"):
    shutil.copy(MODEL + "/" + f, T + "/other/" + f)
shutil.copy(MODEL + "/model-f16.safetensors", T + "/other/model.safetensors")
r = subprocess.run([SERVE, "--db", DB, "--model", T + "/other", "--listen", "127.0.0.1:0"], capture_output=True,
                   text=True, timeout=60)
check("another model than the index's: refused at start", r.returncode == 2 and "indexed with model" in r.stderr, r.stderr)

# ---- live index: blip-index adds photos while the server runs ----
shutil.copytree(T + "/new", L + "/new")
r = subprocess.run([BIN + "/blip-index", "--db", DB, "--model", MODEL, L], capture_output=True, text=True)
check("index new photos while serving", r.returncode == 0, r.stderr[-300:])
st, h, j = s.json("GET", "/api/status")
check("live: status sees the new photos", j["count"] == 17 and j["generation"] >= 2, j)
st, h, j = s.json("GET", q({"q": QUERY, "n": 17, "rerank": 0}))
check("live: search finds the new photos", st == 200 and sum(r["path"].startswith(L + "/new/") for r in j["results"]) == 4, j)
same_hits("live: parity after the update", j["results"], bq("-n", "17", "--rerank", "0", QUERY))
# a file name that is not UTF-8: the path as text with U+FFFD, its bytes in path_b64, and served by id
odd = [r for r in j["results"] if r.get("path_b64")]
want = os.fsencode(L + "/new/") + b"caf\xe9-\xff.jpg"
check("non-UTF-8 name: path_b64 holds its bytes", len(odd) == 1 and base64.b64decode(odd[0]["path_b64"]) == want, odd)
if odd:
    st, h, d = s.get("/api/photo/%d" % odd[0]["id"])
    check("non-UTF-8 name: the photo is served", st == 200 and d == open(want, "rb").read(), st)
    st, h, d = s.get("/api/thumb/%d" % odd[0]["id"])
    check("non-UTF-8 name: its thumbnail", st == 200 and d[:2] == b"\xff\xd8", st)
    st, h, j2 = s.json("POST", "/knn-service", clip_body(text=QUERY, num_images=17))
    k = [r for r in j2 if r["id"] == odd[0]["id"]]
    check("non-UTF-8 name: knn caption_b64", len(k) == 1 and base64.b64decode(k[0]["caption_b64"]) == b"caf\xe9-\xff.jpg", k)
shutil.rmtree(L + "/new")
r = subprocess.run([BIN + "/blip-index", "--db", DB, "--model", MODEL, "--rebuild", L], capture_output=True, text=True)
st, h, j = s.json("GET", q({"q": QUERY, "n": 20}))
check("live: --rebuild (new files) is picked up", st == 200 and len(j["results"]) == 13 and j["count"] == 13, j)
same_hits("live: parity after --rebuild", j["results"], bq("-n", "20", QUERY))
st, h, j = s.json("GET", "/api/status")
check("live: status after --rebuild", j["count"] == 13, j)

# ---- indexer running: seen through the writer's lock, without taking it ----
with open(DB + "/lock", "a") as lk:
    fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)
    st, h, j = s.json("GET", "/api/status")
    check("status: indexer running while the writer lock is held", j["indexer_running"] is True, j)
    r = subprocess.run([BIN + "/blip-index", "--db", DB, "--model", MODEL, L], capture_output=True, text=True)
    check("status: (the lock is the writer's: blip-index waits or refuses)", r.returncode != 0, r.returncode)
st, h, j = s.json("GET", "/api/status")
check("status: indexer not running once the lock is free", j["indexer_running"] is False, j)

# ---- thumbnail cache: bounded, least recently used out first, stale thumbnails dropped ----
TD = DB + "/thumbs"


def cached():
    return {sub + "/" + f: os.path.getsize(TD + "/" + sub + "/" + f)
            for sub in os.listdir(TD) for f in os.listdir(TD + "/" + sub) if f.endswith(".jpg")}


rows = sqlite3.connect("file:%s/index.sqlite?mode=ro" % DB, uri=True).execute(
    "SELECT id, fingerprint FROM images WHERE state='ok' AND feat IS NOT NULL").fetchall()
ref = {(i, z): s.get("/api/thumb/%d?size=%d" % (i, z))[2] for i, _ in rows for z in (256, 1024)}  # unbounded server
stale = ["256/999999-0123456789abcdef.jpg", "1024/%d-%016x.jpg" % (rows[0][0], (rows[0][1] & (2**64 - 1)) ^ 1)]
for n in stale:
    open(TD + "/" + n, "wb").write(b"\xff\xd8stale")
open(TD + "/256/notes.txt", "w").write("not a thumbnail: left alone")
CAP = 20000
s9 = Server(SERVE, DB, MODEL, "--thumb-cache-mb", str(CAP / 1048576), log=T + "/s9.log")
c = cached()
check("thumb cache: at start, thumbnails of a gone id or another fingerprint dropped", not set(stale) & set(c), c)
check("thumb cache: at start, within the bound; other files left alone",
      sum(c.values()) <= CAP and os.path.exists(TD + "/256/notes.txt"), sum(c.values()))
check("thumb cache: (the thumbnails exceed the bound)", sum(map(len, ref.values())) > 2 * CAP, sum(map(len, ref.values())))
wrong, worst = [], 0
for k in ref:
    st, h, d = s9.get("/api/thumb/%d?size=%d" % k)
    if st != 200 or d != ref[k]:
        wrong.append((k, st))
    worst = max(worst, sum(cached().values()))
check("thumb cache: every thumbnail served right while evicting", not wrong, wrong)
check("thumb cache: the bound holds after every request", worst <= CAP, (worst, CAP))
# recency: the oldest file, once hit, outlives the others
c = sorted(cached())
now = time.time()
for n, k in enumerate(c):
    os.utime(TD + "/" + k, (now - 9000,) * 2 if n == 0 else (now - 7200 + n,) * 2)


def key(f):
    z, name = f.split("/")
    return int(name.split("-")[0]), int(z)


st, h, d = s9.get("/api/thumb/%d?size=%d" % key(c[0]))
check("thumb cache: a hit refreshes the file's recency", st == 200 and d == ref[key(c[0])] and
      os.path.getmtime(TD + "/" + c[0]) > now - 60, (st, os.path.getmtime(TD + "/" + c[0]) - now))
for k in ref:
    if c[1] not in cached():
        break
    if k not in map(key, cached()):
        s9.get("/api/thumb/%d?size=%d" % k)
after = cached()
check("thumb cache: least recently used out first, the hit one kept", c[1] not in after and c[0] in after,
      (c[:2], sorted(after)))
check("thumb cache: stops clean", s9.stop() == 0)

# ---- connection cap and idle timeout: slow clients cannot hold the server ----
s8 = Server(SERVE, DB, MODEL, "--max-conns", "3", "--timeout", "1", log=T + "/s8.log")
loris = []
for _ in range(3):
    k = socket.create_connection(("127.0.0.1", s8.port))
    k.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")  # never finished
    loris.append(k)
time.sleep(0.3)
r = s8.raw(b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
check("connection cap: a 4th connection is not served while 3 are open", not r.startswith(b"HTTP/1.1 200"), r[:40])
served = False
for _ in range(60):  # the idle ones are dropped after --timeout 1
    r = s8.raw(b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
    if r.startswith(b"HTTP/1.1 200"):
        served = True
        break
    time.sleep(0.5)
check("idle timeout: stalled connections are dropped, then others are served", served)
for k in loris:
    k.close()
s8.stop()

# ---- empty and absent index ----
s6 = Server(SERVE, T + "/no-index-yet", MODEL, log=T + "/s6.log")
st, h, j = s6.json("GET", "/api/status")
check("absent index: status count 0", st == 200 and j["count"] == 0, j)
st, h, j = s6.json("GET", q({"q": QUERY}))
check("absent index: search says empty", st == 200 and j["results"] == [] and j["reason"] == "empty_index", j)
r = subprocess.run([BIN + "/blip-index", "--db", T + "/no-index-yet", "--model", MODEL, L + "/b"], capture_output=True)
st, h, j = s6.json("GET", q({"q": QUERY}))
check("absent index: found once blip-index made it", st == 200 and len(j["results"]) == 4, j)
s6.stop(signal.SIGINT)
check("SIGINT: clean stop", "SIGINT: stopping" in s6.log(), s6.log()[-200:])

# ---- log: one line a request, escaped ----
s.get("/api/search%0aFAKE%20200?q=x")
rc = s.stop()
log = s.log()
check("SIGTERM: exit 0", rc == 0, rc)
lines = [l for l in log.splitlines() if l.startswith(("GET ", "POST ", "OPTIONS "))]
check("log: METHOD PATH STATUS MS", any(l.startswith("GET /api/status 200 ") and l.endswith(" ms") for l in lines), lines[:3])
check("log: one line per request", len(lines) >= 100, len(lines))
check("log: control characters escaped", "GET /api/search%0AFAKE%20200 404" in log and "\nFAKE" not in log,
      [l for l in lines if "FAKE" in l])

check("servers ran clean (no sanitizer report)", not sanitizer_reports(), sanitizer_reports()[:5])
print("serve_api: %d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
