#!/usr/bin/env bash
# download-model.sh: fetch a BLIP checkpoint from the Hugging Face hub.
#   scripts/download-model.sh base|large|base-flickr|large-flickr|caption-base|caption-large [DIR]
# Gets config.json, model.safetensors and vocab.txt of Salesforce/blip-itm-*
# (retrieval) or Salesforce/blip-image-captioning-* (captions), resumes
# interrupted downloads, and checks what it got: the JSON parses, the vocab is
# bert-base-uncased's, and (when the tools are built) the engine loads every
# tensor with the right shape. Some repos carry model.safetensors only on the
# hub's conversion-bot branch (refs/pr/N); that is tried too, then
# pytorch_model.bin (read by the engine's safe unpickler).
# Env: HF_ENDPOINT (mirror), HF_TOKEN (auth), BLIP_HF_REVISION (pin a revision).
set -euo pipefail
case "${1:-}" in
  base) repo=Salesforce/blip-itm-base-coco ;;
  large) repo=Salesforce/blip-itm-large-coco ;;
  base-flickr) repo=Salesforce/blip-itm-base-flickr ;;
  large-flickr) repo=Salesforce/blip-itm-large-flickr ;;
  caption-base) repo=Salesforce/blip-image-captioning-base ;;
  caption-large) repo=Salesforce/blip-image-captioning-large ;;
  -h|--help|"") sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; [ -n "${1:-}" ]; exit $? ;;
  *) echo "download-model: unknown model '$1' (base, large, base-flickr, large-flickr, caption-base, caption-large)" >&2; exit 2 ;;
esac
dir=${2:-models/${repo#Salesforce/}}
hub=${HF_ENDPOINT:-https://huggingface.co}
auth=(); [ -n "${HF_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $HF_TOKEN")
mkdir -p "$dir"

fetch() { # fetch REVISION FILE -> $dir/FILE (resumable); fails on HTTP errors
  local url="$hub/$repo/resolve/$1/$2"
  curl -fL --retry 3 --connect-timeout 20 -C - "${auth[@]}" -o "$dir/$2.part" "$url" && mv "$dir/$2.part" "$dir/$2"
}
exists() { curl -fsIL --connect-timeout 20 "${auth[@]}" "$hub/$repo/resolve/$1/$2" >/dev/null 2>&1; }

if ! curl -fsI --connect-timeout 20 "$hub" >/dev/null 2>&1; then
  echo "download-model: cannot reach $hub (offline?). Fetch $repo's config.json, model.safetensors and" >&2
  echo "vocab.txt on a connected machine (this script, or 'huggingface-cli download $repo') and copy them to $dir/." >&2
  exit 3
fi
rev=${BLIP_HF_REVISION:-main}
for f in config.json vocab.txt; do [ -s "$dir/$f" ] || fetch "$rev" "$f"; done
if [ ! -s "$dir/model.safetensors" ] && [ ! -s "$dir/pytorch_model.bin" ]; then
  weights=model.safetensors
  if ! exists "$rev" model.safetensors; then
    for n in 1 2 3 4 5 6 7 8 9 10; do
      if exists "refs%2Fpr%2F$n" model.safetensors; then rev="refs%2Fpr%2F$n"; break; fi
    done
    exists "$rev" model.safetensors || { rev=${BLIP_HF_REVISION:-main}; weights=pytorch_model.bin; }
  fi
  echo "download-model: $weights from revision ${rev//%2F//}"
  fetch "$rev" "$weights"
fi

python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); assert c.get("model_type","blip")=="blip"' "$dir/config.json" \
  || { echo "download-model: $dir/config.json is not a BLIP config" >&2; exit 1; }
sum=$(sha256sum "$dir/vocab.txt" | cut -d' ' -f1)
[ "$sum" = 07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3 ] \
  || echo "download-model: warning: vocab.txt is not bert-base-uncased's (sha256 $sum)" >&2
embed=$(dirname "$0")/../build/blip-embed
caption=$(dirname "$0")/../build/blip-caption
if [ "${1#caption-}" != "$1" ]; then
  photo=$(dirname "$0")/../tests/data/preprocess/images/rocket.jpg
  if [ -x "$caption" ] && [ -f "$photo" ]; then
    "$caption" --model "$dir" --image "$photo" || { echo "download-model: the engine cannot caption with $dir" >&2; exit 1; }
    echo "download-model: $repo in $dir: loaded and checked (the caption above is of a rocket launch)"
  else
    echo "download-model: $repo in $dir (build blip-caption to check that the engine loads it)"
  fi
elif [ -x "$embed" ]; then
  "$embed" --model "$dir" --text "a photo" >/dev/null || { echo "download-model: the engine cannot load $dir" >&2; exit 1; }
  echo "download-model: $repo in $dir: loaded and checked"
else
  echo "download-model: $repo in $dir (build blip-embed to check that the engine loads it)"
fi
