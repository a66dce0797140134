#!/bin/bash
# test_query: blip-query end to end on generated photos indexed by blip-index
# with the tiny fixture model. Checks: results ordered by the BLIP score; the
# rerank reorders the ITC candidates exactly as itm_logit + cosine says; the
# score of a hit equals blip-embed's independent ITC + ITM for that file;
# fast and naive rerank agree; filters never leak; table, --json and --paths
# agree; threshold, date sort, --stdin (batched = one at a time), image queries, text ranking; clear
# errors for an empty index, an unknown --db and another model.
set -u
BIN=$(cd "${BLIP_BIN:-build}" && pwd)
DATA=$(cd "${BLIP_TEST_DATA:-tests/data}" && pwd)
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_query.XXXXXX)
trap 'rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
# py NAME SCRIPT ARGS...: run a python check; it prints a reason and exits 1 on failure
py() { local name=$1 code=$2; shift 2; if python3 -c "$code" "$@"; then ok; else bad "$name"; fi; }

L=$T/lib
mkdir -p "$L/a" "$L/ab" "$L/b"
"$BIN/gen_photos" "$L/a" 6 --size 96x72 >/dev/null || bad "gen_photos"
"$BIN/gen_photos" "$L/ab" 3 --size 80x80 --seed 5 >/dev/null   # a sibling whose name starts like a/
"$BIN/gen_photos" "$L/b" 4 --size 64x64 --seed 2 --ext png >/dev/null
touch -d 2021-06-01T12:00:00 "$L"/a/*
touch -d 2022-02-02T12:00:00 "$L"/ab/*
touch -d 2023-03-15T12:00:00 "$L"/b/*
N=13
# scores are compared with blip-embed's (f32) to 1e-5: these indexes are f32, not the default auto
# (bf16 on CPUs with bf16 dot products); queries follow their index's precision
"$BIN/blip-index" --db "$T/db" --model "$MODEL" --precision f32 "$L" 2>/dev/null || bad "index"
"$BIN/blip-index" --db "$T/db-raw" --model "$MODEL" --precision f32 --no-rerank-store "$L" 2>/dev/null || bad "index raw"
"$BIN/blip-index" --db "$T/db-f16" --model "$MODEL" --precision f32 --rerank-f16 "$L" 2>/dev/null || bad "index f16"
q() { "$BIN/blip-query" --db "$T/db" --model "$MODEL" "$@"; }
QUERY="a dog running on a beach"

# ---- order and scores ----
q --json -n $N "$QUERY" >"$T/full.json" || bad "query exit"
q --json -n $N --rerank 0 "$QUERY" >"$T/itc.json" || bad "itc query exit"
q --json -n $N --rerank 4 "$QUERY" >"$T/k4.json" || bad "k4 query exit"
q --json -n $N --naive-itm "$QUERY" >"$T/naive.json" || bad "naive query exit"
py "order by score, score = itm_logit + cosine" '
import json, sys
r = json.load(open(sys.argv[1]))
assert len(r) == 13, len(r)
assert [h["rank"] for h in r] == list(range(1, 14))
for h in r:
    assert abs(h["score"] - (h["itm_logit"] + h["cosine"])) < 1e-5, h
    assert 0 < h["itm_prob"] < 1, h
assert all(r[i]["score"] >= r[i + 1]["score"] for i in range(12)), "not sorted"
' "$T/full.json"
py "rerank 0 = ITC order, no ITM fields" '
import json, sys
r = json.load(open(sys.argv[1]))
assert len(r) == 13 and all(h["itm_prob"] is None and h["itm_logit"] is None for h in r)
assert all(h["score"] == h["cosine"] for h in r)
assert all(r[i]["cosine"] >= r[i + 1]["cosine"] for i in range(12))
' "$T/itc.json"
py "rerank reorders the ITC candidates exactly by logit + cosine" '
import json, sys
full, itc, k4 = (json.load(open(p)) for p in sys.argv[1:4])
cos = {h["id"]: h["cosine"] for h in itc}
assert {h["id"] for h in full} == set(cos), "same candidates"
assert all(abs(cos[h["id"]] - h["cosine"]) < 1e-6 for h in full), "cosine unchanged by the rerank"
want = sorted(full, key=lambda h: -(h["itm_logit"] + cos[h["id"]]))
assert [h["id"] for h in full] == [h["id"] for h in want]
assert [h["id"] for h in full] != [h["id"] for h in itc], "the rerank changed nothing (weak fixture)"
# K=4: the 4 best by cosine, reranked, then the others in cosine order
top4 = [h["id"] for h in itc[:4]]
assert sorted(h["id"] for h in k4[:4]) == sorted(top4), (k4[:4], top4)
assert all(k4[i]["score"] >= k4[i + 1]["score"] for i in range(3))
assert [h["id"] for h in k4[4:]] == [h["id"] for h in itc[4:]]
assert all(h["itm_prob"] is None for h in k4[4:]) and all(h["itm_prob"] is not None for h in k4[:4])
' "$T/full.json" "$T/itc.json" "$T/k4.json"
py "fast rerank = naive rerank (1e-4)" '
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
sb = {h["id"]: h["score"] for h in b}
d = max(abs(h["score"] - sb[h["id"]]) for h in a)
print("  fast vs naive end to end: max|diff| %.2e" % d)
assert d <= 1e-4
' "$T/full.json" "$T/naive.json"

# the score of a hit is BLIP's, computed independently by blip-embed from the file
"$BIN/blip-query" --db "$T/db-raw" --model "$MODEL" --json -n 3 "$QUERY" >"$T/raw.json" 2>"$T/raw.err" || bad "raw query"
"$BIN/blip-query" --db "$T/db-f16" --model "$MODEL" --json -n 3 "$QUERY" >"$T/f16.json" || bad "f16 query"
for i in 0 1 2; do
  p=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[int(sys.argv[2])]["path"])' "$T/raw.json" $i)
  "$BIN/blip-embed" --model "$MODEL" --image "$p" --text "$QUERY" --pre-caption --itm --json >"$T/embed$i.json" ||
    bad "blip-embed $p"
done
py "score = blip-embed itm_logit + itc (recomputed tokens 1e-5, f16 store 5e-3, int8 store 5e-2)" '
import json, sys
raw, f16, i8 = (json.load(open(p)) for p in sys.argv[1:4])
for i, h in enumerate(raw):
    e = json.load(open(sys.argv[4 + i]))
    want = e["itm_logits"][0][0][1] + e["itc"][0][0]
    assert abs(h["score"] - want) < 1e-5, (h, want)
    assert abs(h["cosine"] - e["itc"][0][0]) < 1e-5
s16 = {h["id"]: h["score"] for h in f16}; s8 = {h["id"]: h["score"] for h in i8}
d16 = max(abs(h["score"] - s16[h["id"]]) for h in raw if h["id"] in s16)
d8 = max(abs(h["score"] - s8[h["id"]]) for h in raw if h["id"] in s8)
print("  stored tokens vs recomputed: f16 %.2e, int8 %.2e" % (d16, d8))
assert d16 < 5e-3 and d8 < 5e-2
' "$T/raw.json" "$T/f16.json" "$T/full.json" "$T/embed0.json" "$T/embed1.json" "$T/embed2.json"

# ---- K > 64: the rerank goes in chunks; a candidate's score does not depend on them ----
mkdir -p "$T/many"
"$BIN/gen_photos" "$T/many" 70 --size 40x40 --seed 11 >/dev/null
"$BIN/blip-index" --db "$T/db-many" --model "$MODEL" "$T/many" 2>/dev/null || bad "index many"
"$BIN/blip-query" --db "$T/db-many" --model "$MODEL" --json -n 70 --rerank 70 "$QUERY" >"$T/m70.json" || bad "k70"
"$BIN/blip-query" --db "$T/db-many" --model "$MODEL" --json -n 70 --rerank 10 "$QUERY" >"$T/m10.json" || bad "k10"
py "rerank of 70 (two ITM calls) = per-candidate scores" '
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
assert len(a) == 70 and len({h["id"] for h in a}) == 70 and all(h["itm_prob"] is not None for h in a)
assert all(a[i]["score"] >= a[i + 1]["score"] for i in range(69))
sa = {h["id"]: h["score"] for h in a}
top = [h for h in b if h["itm_prob"] is not None]
assert len(top) == 10 and max(abs(h["score"] - sa[h["id"]]) for h in top) < 1e-5
' "$T/m70.json" "$T/m10.json"

# ---- the three outputs agree ----
q -n 8 "$QUERY" >"$T/table" || bad "table exit"
q -n 8 --paths "$QUERY" >"$T/paths" || bad "paths exit"
q -n 8 --json "$QUERY" >"$T/j8.json" || bad "json exit"
py "table, --paths and --json agree" '
import json, sys
j = json.load(open(sys.argv[1]))
paths = open(sys.argv[2]).read().splitlines()
rows = open(sys.argv[3]).read().splitlines()
assert rows[0].split() == ["rank", "score", "itm_prob", "cosine", "path"], rows[0]
rows = [r.split(None, 4) for r in rows[1:]]
assert len(j) == len(paths) == len(rows) == 8
for h, p, r in zip(j, paths, rows):
    assert h["path"] == p == r[4], (h, p, r)
    assert int(r[0]) == h["rank"]
    assert r[1] == "%.4f" % h["score"] and r[2] == "%.4f" % h["itm_prob"] and r[3] == "%.4f" % h["cosine"], (r, h)
' "$T/j8.json" "$T/paths" "$T/table"

# ---- filters never leak ----
py_only() { # py_only NAME FILE PYEXPR(path) COUNT
  py "$1" '
import json, sys
r = json.load(open(sys.argv[1])); n = int(sys.argv[3])
bad = [h["path"] for h in r if not eval(sys.argv[2], {"p": h["path"]})]
assert not bad, ("leaked", bad)
assert len(r) == n, ("count", len(r), n)
' "$2" "$3" "$4"
}
q --json -n 20 --under "$L/a" "$QUERY" >"$T/f1.json" || bad "under exit"
py_only "--under lib/a (not lib/ab)" "$T/f1.json" "p.startswith('$L/a/')" 6
q --json -n 20 --under "$L/a/" --rerank 0 "$QUERY" >"$T/f1b.json" || bad "under/ exit"
py_only "--under lib/a/, ITC only" "$T/f1b.json" "p.startswith('$L/a/')" 6
(cd "$L" && "$BIN/blip-query" --db "$T/db" --model "$MODEL" --json -n 20 --under ab "$QUERY") >"$T/f1c.json" ||
  bad "relative under exit"
py_only "--under relative dir" "$T/f1c.json" "p.startswith('$L/ab/')" 3
q --json -n 20 --ext png "$QUERY" >"$T/f2.json" || bad "ext exit"
py_only "--ext png" "$T/f2.json" "p.endswith('.png')" 4
q --json -n 20 --ext JPG,webp "$QUERY" >"$T/f3.json" || bad "ext jpg exit"
py_only "--ext JPG,webp" "$T/f3.json" "p.endswith('.jpg')" 9
"$BIN/gen_photos" "$L/ab" 1 --size 64x64 --seed 9 --start 7 >/dev/null && mv "$L/ab/img00007.jpg" "$L/ab/img00007.JPEG"
touch -d 2022-02-02T12:00:00 "$L/ab/img00007.JPEG"
"$BIN/blip-index" --db "$T/db" --model "$MODEL" "$L" 2>/dev/null || bad "index jpeg"
q --json -n 20 --ext jpg "$QUERY" >"$T/f3b.json" || bad "ext jpg/jpeg exit"
py_only "--ext jpg also takes .JPEG" "$T/f3b.json" "p.endswith('.jpg') or p.endswith('.JPEG')" 10
rm "$L/ab/img00007.JPEG" && "$BIN/blip-index" --db "$T/db" --model "$MODEL" "$L" 2>/dev/null || bad "unindex jpeg"
q --json -n 20 --after 2022-01-01 "$QUERY" >"$T/f4.json" || bad "after exit"
py_only "--after 2022-01-01" "$T/f4.json" "'/lib/ab/' in p or '/lib/b/' in p" 7
q --json -n 20 --after 2022-01-01 --before 2023-01-01T00:00 "$QUERY" >"$T/f5.json" || bad "range exit"
py_only "--after/--before range" "$T/f5.json" "'/lib/ab/' in p" 3
q --json -n 2 --rerank 16 --before 2022-01-01 "$QUERY" >"$T/f6.json" || bad "before exit"
py_only "--before, n < K" "$T/f6.json" "'/lib/a/' in p" 2
q --json -n 20 --under "$L/b" --ext jpg "$QUERY" >"$T/f7.json" 2>"$T/f7.err"
rc=$?
[[ $rc == 1 && ! -s $T/f7.json ]] && grep -q "no indexed photo matches the filters" "$T/f7.err" && ok ||
  bad "empty filter: rc $rc, $(cat "$T/f7.err")"
q --after 2021-02-30x "$QUERY" >/dev/null 2>"$T/err"; rc=$?
[[ $rc == 2 ]] && grep -q "bad date" "$T/err" && ok || bad "bad date: rc $rc"

# ---- threshold: an honest "no match" ----
P=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[3]["itm_prob"])' "$T/full.json")
q --json -n $N --threshold "$P" "$QUERY" >"$T/th.json" || bad "threshold exit"
py "--threshold keeps exactly the hits with itm_prob >= P" '
import json, sys
full, th, p = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), float(sys.argv[3])
want = [h["id"] for h in full if h["itm_prob"] >= p]
assert [h["id"] for h in th] == want and len(want) >= 1, ([h["id"] for h in th], want)
' "$T/full.json" "$T/th.json" "$P"
q --threshold 1 "$QUERY" >"$T/none" 2>"$T/none.err"; rc=$?
[[ $rc == 1 && ! -s $T/none ]] && grep -q "no match" "$T/none.err" && ok || bad "threshold 1: rc $rc"
q --threshold 0.5 --rerank 0 "$QUERY" >/dev/null 2>&1; [[ $? == 2 ]] && ok || bad "threshold without rerank accepted"

# ---- date sort ----
q --json -n $N --sort date "$QUERY" >"$T/date.json" || bad "date exit"
py "--sort date: same hits, newest first" '
import json, sys
full, d = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
assert sorted(h["id"] for h in d) == sorted(h["id"] for h in full)
m = [h["mtime"] for h in d]
assert m == sorted(m, reverse=True), m
assert "/lib/b/" in d[0]["path"] and "/lib/a/" in d[-1]["path"]
' "$T/full.json" "$T/date.json"

# ---- --stdin: one answer a query, same as single queries ----
LONG=$(printf 'giraffe %.0s' $(seq 40))
printf '%s\n\nred car on a street\n%s\n' "$QUERY" "$LONG" |
  "$BIN/blip-query" --db "$T/db" --model "$MODEL" --stdin --json -n $N >"$T/stdin.jsonl" 2>"$T/stdin.err" || bad "stdin exit"
q --json -n $N "red car on a street" >"$T/car.json"
py "--stdin answers each line like a single query" '
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
assert [l["query"] for l in lines][:2] == ["a dog running on a beach", "red car on a street"] and len(lines) == 3
for l, p in zip(lines, sys.argv[2:4]):
    single = json.load(open(p))
    assert [h["id"] for h in l["results"]] == [h["id"] for h in single]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(l["results"], single)) < 1e-6
assert lines[2]["truncated"] is True and lines[0]["truncated"] is False
' "$T/stdin.jsonl" "$T/full.json" "$T/car.json"
grep -q "truncated to 35 tokens" "$T/stdin.err" && ok || bad "truncation not reported"

# ---- --stdin --batch: the lines waiting together as one batch = one at a time ----
printf '%s\n' "$QUERY" "red car on a street" "?! ..." "" "a cat" "$LONG" "two people hiking in the snow" \
  "a bowl of fruit on a table" "x" "a boat on a lake" >"$T/lines"
for opts in "-n $N" "-n 5 --rerank 3 --under $L/a" "-n 4 --rerank 1 --threshold 0.01"; do
  for b in 1 16 3; do
    # shellcheck disable=SC2086
    "$BIN/blip-query" --db "$T/db" --model "$MODEL" --stdin --json --batch $b $opts <"$T/lines" >"$T/b$b.jsonl" 2>"$T/b$b.err"
    echo $? >"$T/b$b.rc"
  done
  py "--stdin --batch 16 and 3 = --batch 1 ($opts)" '
import json, sys
def load(b):
    return [json.loads(l) for l in open(sys.argv[1] + "/b%s.jsonl" % b)], open(sys.argv[1] + "/b%s.err" % b).read(), open(sys.argv[1] + "/b%s.rc" % b).read()
one, err1, rc1 = load(1)
assert len(one) == 9 and one[2]["error"] and "no words" in one[2]["error"] and one[2]["results"] == [], one[2]
assert sum(len(l["results"]) for l in one) > 4
for b in (16, 3):
    got, err, rc = load(b)
    assert (err, rc) == (err1, rc1), (b, err, err1, rc, rc1)
    assert [(l["query"], l["error"], l["truncated"]) for l in got] == [(l["query"], l["error"], l["truncated"]) for l in one]
    for g, o in zip(got, one):
        assert [h["id"] for h in g["results"]] == [h["id"] for h in o["results"]], (b, g["query"])
        for x, y in zip(g["results"], o["results"]):
            for k in ("score", "cosine", "itm_logit", "itm_prob"):
                assert (x[k] is None) == (y[k] is None) and (x[k] is None or abs(x[k] - y[k]) < 1e-5), (b, k, x, y)
' "$T"
done
"$BIN/blip-query" --db "$T/db" --model "$MODEL" --stdin --batch 0 </dev/null 2>/dev/null; [ $? = 2 ] && ok || bad "--batch 0 refused"

# ---- image queries ----
IMG=$L/b/img00002.png
q --json -n 5 --image "$IMG" >"$T/img.json" || bad "image exit"
py "--image: the photo itself first, cosine order, ITC only" '
import json, sys
r = json.load(open(sys.argv[1]))
assert r[0]["path"] == sys.argv[2] and abs(r[0]["cosine"] - 1) < 1e-4, r[0]
assert all(r[i]["cosine"] >= r[i + 1]["cosine"] for i in range(len(r) - 1)) and len(r) == 5
assert all(h["itm_prob"] is None for h in r)
' "$T/img.json" "$IMG"
printf 'a dog on a beach\nred car\n\na cat sleeping on a sofa\n' >"$T/texts"
"$BIN/blip-query" --model "$MODEL" --precision f32 --image "$IMG" --texts-file "$T/texts" --json >"$T/rt1.json" || bad "rank texts file"
"$BIN/blip-query" --model "$MODEL" --precision f32 --image "$IMG" --text "a dog on a beach" --text "red car" \
  --text "a cat sleeping on a sofa" --json >"$T/rt2.json" || bad "rank texts args"
"$BIN/blip-embed" --model "$MODEL" --image "$IMG" --text "a dog on a beach" --text "red car" \
  --text "a cat sleeping on a sofa" --pre-caption --itm --json >"$T/rt.embed" || bad "embed texts"
py "image -> texts: ITC + ITM, as blip-embed computes them" '
import json, sys
a, b, e = (json.load(open(p)) for p in sys.argv[1:4])
assert a == b, "texts file and --text differ"
assert len(a) == 3 and all(a[i]["score"] >= a[i + 1]["score"] for i in range(2))
for h in a:
    want = e["itm_logits"][0][h["index"]][1] + e["itc"][0][h["index"]]
    assert abs(h["score"] - want) < 1e-5, (h, want)
' "$T/rt1.json" "$T/rt2.json" "$T/rt.embed"

# ---- no rerank store and a file gone: the candidate is skipped, not scored by guess ----
GONE=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["path"])' "$T/raw.json")
rm "$GONE"
"$BIN/blip-query" --db "$T/db-raw" --model "$MODEL" --paths -n $N "$QUERY" >"$T/gone" 2>"$T/gone.err" || bad "gone exit"
[[ $(wc -l <"$T/gone") == 12 ]] && ! grep -qx "$GONE" "$T/gone" && grep -q "1 candidate(s) skipped" "$T/gone.err" && ok ||
  bad "missing file without stored tokens: $(cat "$T/gone.err")"

# ---- errors ----
"$BIN/blip-query" --db "$T/nowhere" --model "$MODEL" "$QUERY" >/dev/null 2>"$T/err"; rc=$?
[[ $rc == 2 ]] && grep -q "no index here (run blip-index first)" "$T/err" && ok || bad "unknown db: rc $rc $(cat "$T/err")"
mkdir -p "$T/empty"
"$BIN/blip-index" --db "$T/db-empty" --model "$MODEL" "$T/empty" 2>/dev/null
"$BIN/blip-query" --db "$T/db-empty" --model "$MODEL" "$QUERY" >/dev/null 2>"$T/err"; rc=$?
[[ $rc == 2 ]] && grep -q "is empty" "$T/err" && ok || bad "empty index: rc $rc $(cat "$T/err")"
mkdir -p "$T/other"   # same geometry, other weights (the f16 rounding of blip-tiny)
cp "$MODEL/config.json" "$MODEL/vocab.txt" "$T/other/" && cp "$MODEL/model-f16.safetensors" "$T/other/model.safetensors"
"$BIN/blip-query" --db "$T/db" --model "$T/other" "$QUERY" >/dev/null 2>"$T/err"; rc=$?
[[ $rc == 2 ]] && grep -q "was indexed with model" "$T/err" && ok || bad "other model: rc $rc $(cat "$T/err")"
BLIPSEARCH_DB=$T/db BLIPSEARCH_MODEL=$MODEL "$BIN/blip-query" --paths -n 8 "$QUERY" >"$T/envpaths" && cmp -s "$T/envpaths" "$T/paths" &&
  ok || bad "BLIPSEARCH_DB / BLIPSEARCH_MODEL defaults"
"$BIN/blip-query" --help | grep -q -- "--rerank K" && ok || bad "--help"
q >/dev/null 2>&1; [[ $? == 2 ]] && ok || bad "no query accepted"
q --text "x" "$QUERY" >/dev/null 2>&1; [[ $? == 2 ]] && ok || bad "--text without --image accepted"

tally
