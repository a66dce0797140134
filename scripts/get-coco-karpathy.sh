#!/usr/bin/env bash
# get-coco-karpathy.sh: fetch BLIP's COCO Karpathy test annotations (5000
# images, ~25k captions) for blip-eval, and optionally the val2014 images.
#
# usage: scripts/get-coco-karpathy.sh [DIR] [--images]
#   DIR       where to put coco_karpathy_test.json (default data/coco)
#   --images  also download and unpack COCO val2014 (6.2 GB zip, 13 GB
#             unpacked); the test split's images all come from val2014.
# Then: blip-eval --model M --ann DIR/coco_karpathy_test.json --images DIR --dataset coco
set -euo pipefail

URL=https://storage.googleapis.com/sfr-vision-language-research/datasets/coco_karpathy_test.json
IMG_URL=http://images.cocodataset.org/zips/val2014.zip
DIR=data/coco
IMAGES=0
for a in "$@"; do
  case "$a" in
    --images) IMAGES=1 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "get-coco-karpathy: unknown option $a" >&2; exit 2 ;;
    *) DIR=$a ;;
  esac
done
. "$(dirname "$0")/annotations.sh"
fetch_annotations get-coco-karpathy "$URL" "$DIR/coco_karpathy_test.json"

if [ "$IMAGES" = 1 ]; then
  command -v unzip >/dev/null || { echo "get-coco-karpathy: --images needs unzip" >&2; exit 1; }
  curl -fL --retry 2 -C - -o "$DIR/val2014.zip" "$IMG_URL" ||
    { echo "get-coco-karpathy: cannot download $IMG_URL" >&2; exit 1; }
  unzip -q -n "$DIR/val2014.zip" -d "$DIR" && rm -f "$DIR/val2014.zip"
  echo "images: $DIR/val2014"
else
  echo "images: the test split's paths are val2014/COCO_val2014_*.jpg, from COCO 2014 (cocodataset.org):"
  echo "  $IMG_URL  (6.2 GB; or rerun with --images). Unpack it so that DIR/val2014/ exists,"
  echo "  then pass --images DIR to blip-eval."
fi
