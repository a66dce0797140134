#!/usr/bin/env bash
# install-deps.sh: set up a fresh Debian bookworm machine for blipsearch.
#
# Idempotent: a second run with everything present does nothing but check.
# Installs Debian packages, then builds the FAISS C API (libfaiss_c), which
# Debian's libfaiss-dev ships headers for but not compiled, from Debian's own
# `faiss` source package of the same version. apt's deb-src lists go to a
# private state dir so the system's binary package lists are never touched.
set -euo pipefail

PKGS=(build-essential cmake pkg-config git ca-certificates curl
      libfaiss-dev libopenblas-openmp-dev liblapack-dev
      libsqlite3-dev sqlite3 libvips-dev libdnnl-dev
      libutf8proc-dev libxxhash-dev libjansson-dev libzip-dev libarchive-dev
      clang libclang-rt-14-dev dpkg-dev python3
      python3-pil python3-numpy  # scripts/gen-pil-cases.py: PIL's reference values
      strace                     # fault injection in the tests (strace -e inject=)
      libmicrohttpd-dev chromium firefox-esr wrk   # blip-serve and its browser and load tests
      slurm-wlm munge)                 # tests/test_slurm.sh runs a real local Slurm cluster
# blip-serve's browser test drives chromium and firefox-esr with puppeteer-core
# (npm): Debian's node and npm unless some node is installed already
command -v npm >/dev/null || PKGS+=(nodejs npm)
PREFIX=${BLIP_DEPS_PREFIX:-/usr/local}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# OpenBLAS must be the OpenMP build: the pthread build fights FAISS's OpenMP threads.
for alt in libblas.so.3-x86_64-linux-gnu liblapack.so.3-x86_64-linux-gnu; do
  cand=$(update-alternatives --list "$alt" 2>/dev/null | grep openblas-openmp | head -n1 || true)
  [ -n "$cand" ] && $SUDO update-alternatives --set "$alt" "$cand" >/dev/null
done

# tests/browser: puppeteer-core at the version the lockfile pins
root=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -f "$root/tests/browser/node_modules/puppeteer-core/package.json" ] ||
   [ "$root/tests/browser/package-lock.json" -nt "$root/tests/browser/node_modules" ]; then
  (cd "$root/tests/browser" && npm ci --no-audit --no-fund --loglevel=error)
fi

if [ -f "$PREFIX/lib/libfaiss_c.a" ]; then
  exit 0
fi

echo "install-deps: building libfaiss_c from Debian's faiss source"
ver=$(dpkg-query -W -f='${source:Version}' libfaiss-dev)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/sources.list.d" "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && sed 's/^Types: .*/Types: deb-src/' "$f" >"$work/sources.list.d/$(basename "$f")"
done
if [ -f /etc/apt/sources.list ]; then
  grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"$work/sources.list" || true
fi
touch "$work/sources.list"
APTOPT=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts="$work/sources.list.d"
        -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache")
apt-get "${APTOPT[@]}" update -qq
(cd "$work/src" && apt-get "${APTOPT[@]}" source --download-only "faiss=$ver" >/dev/null)
tarball=$(ls "$work"/src/faiss_*.orig.tar.* | head -n1)
tar -xf "$tarball" -C "$work/src"
srcdir=$(find "$work/src" -maxdepth 1 -type d -name 'faiss-*' | head -n1)
objs=()
while IFS= read -r cpp; do
  o="$work/$(echo "${cpp#$srcdir/}" | tr '/' '_').o"
  g++ -std=c++17 -O2 -fPIC -fopenmp -DNDEBUG -I"$srcdir" -c "$cpp" -o "$o" &
  objs+=("$o")
  while [ "$(jobs -rp | wc -l)" -ge "$(nproc)" ]; do wait -n; done
done < <(find "$srcdir/c_api" -name '*.cpp' ! -path '*/gpu/*')
wait
$SUDO mkdir -p "$PREFIX/lib"
ar rcs "$work/libfaiss_c.a" "${objs[@]}"
$SUDO install -m 644 "$work/libfaiss_c.a" "$PREFIX/lib/libfaiss_c.a"
echo "install-deps: installed $PREFIX/lib/libfaiss_c.a"
