#!/usr/bin/env bash
# quickstart.sh: install, build, index a photo folder and search it.
#   scripts/quickstart.sh [PHOTOS_DIR] ["query text"]
# Model: $BLIPSEARCH_MODEL, else models/blip-itm-base-coco (scripts/download-model.sh base).
# Index: $BLIPSEARCH_DB, else blip-index's default (~/.local/share/blipsearch).
set -euo pipefail
cd "$(dirname "$0")/.."
photos=${1:-$HOME/Pictures}
query=${2:-a dog playing on the beach}
bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
echo "quickstart: built blip-index, blip-query, blip-embed, blip-eval in build/"
model=${BLIPSEARCH_MODEL:-models/blip-itm-base-coco}
if [ ! -s "$model/model.safetensors" ] || [ ! -s "$model/config.json" ] || [ ! -s "$model/vocab.txt" ]; then
  cat >&2 <<MSG
quickstart: no BLIP weights at $model, so nothing can be indexed yet.
  Get them (about 900 MB, needs access to the Hugging Face hub):
    scripts/download-model.sh base            # Salesforce/blip-itm-base-coco -> models/blip-itm-base-coco
  or copy config.json, model.safetensors and vocab.txt of Salesforce/blip-itm-base-coco into $model/
  (or point BLIPSEARCH_MODEL at such a folder), then run this script again.
MSG
  exit 3
fi
if [ ! -d "$photos" ]; then echo "quickstart: no folder $photos (give one: scripts/quickstart.sh DIR)" >&2; exit 2; fi
build/blip-index --model "$model" "$photos"
build/blip-query --model "$model" -n 10 "$query"
