#!/usr/bin/env bash
# get-flickr30k.sh: fetch BLIP's Flickr30k 1k test annotations (1000 images,
# 5000 captions) for blip-eval, and explain where the images come from.
#
# usage: scripts/get-flickr30k.sh [DIR]   (default data/flickr30k)
# Then: blip-eval --model M --ann DIR/flickr30k_test.json --images DIR --dataset flickr
set -euo pipefail

URL=https://storage.googleapis.com/sfr-vision-language-research/datasets/flickr30k_test.json
DIR=data/flickr30k
for a in "$@"; do
  case "$a" in
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "get-flickr30k: unknown option $a" >&2; exit 2 ;;
    *) DIR=$a ;;
  esac
done
. "$(dirname "$0")/annotations.sh"
fetch_annotations get-flickr30k "$URL" "$DIR/flickr30k_test.json"
echo "images: Flickr30k is distributed by its authors on request, not by URL:"
echo "  fill in the form at https://shannon.cs.illinois.edu/DenotationGraph/ (Young et al., TACL 2014),"
echo "  unpack flickr30k-images.tar.gz into $DIR so that $DIR/flickr30k-images/ holds the .jpg files"
echo "  (the annotation's paths are flickr30k-images/NNN.jpg), then pass --images $DIR to blip-eval."
