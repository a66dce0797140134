#!/usr/bin/env bash
# setup.sh: install what the side-by-side benchmark needs (once, with network):
# Debian's python3-onnx and python3-numpy (make_model.py writes the ONNX graphs),
# Node.js, and onnxruntime-node from npm at the version package-lock.json pins.
# ONNXRUNTIME_NODE_INSTALL=skip: the package carries its CPU build; its install
# script would otherwise try to download CUDA binaries. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
missing=()
pkgs=(python3-onnx python3-numpy)
command -v npm >/dev/null || pkgs+=(nodejs npm) # a node installed otherwise will do
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -d node_modules/onnxruntime-node ] || ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
echo "setup: done; next: build blipsearch (cmake), then benchmarks/vs-onnxruntime/run.py"
