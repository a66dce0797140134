# annotations.sh: sourced by get-coco-karpathy.sh and get-flickr30k.sh.
# fetch_annotations NAME URL FILE: download FILE atomically and check that it
# is BLIP's annotation format, a JSON list of {"image": ..., "caption": [...]}.
fetch_annotations() {
  local name=$1 url=$2 ann=$3
  command -v curl >/dev/null || { echo "$name: needs curl" >&2; exit 1; }
  mkdir -p "$(dirname "$ann")"
  if ! curl -fsSL --retry 2 --connect-timeout 15 -o "$ann.part" "$url"; then
    rm -f "$ann.part"
    echo "$name: cannot download $url" >&2
    echo "  (no network, or the URL moved: it is the one salesforce/BLIP's data/*_dataset.py uses)" >&2
    exit 1
  fi
  if ! python3 -c 'import json, sys
a = json.load(open(sys.argv[1]))
assert isinstance(a, list) and a and all("image" in e and "caption" in e for e in a)
print(f"{len(a)} images, {sum(len(e[\"caption\"]) for e in a)} captions")' "$ann.part"; then
    rm -f "$ann.part"
    echo "$name: $url did not return BLIP's annotation JSON" >&2
    exit 1
  fi
  mv "$ann.part" "$ann"
  echo "annotations: $ann"
}
