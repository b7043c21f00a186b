#!/usr/bin/env bash
# Fetch the CUDA toolkit pieces that the `cuda` feature's compile check needs, from PyPI:
#   nvidia-cuda-nvrtc-cu12==12.8.93  libnvrtc.so.12 + libnvrtc-builtins (run-time compiler)
#   nvidia-cuda-nvcc-cu12==12.8.93   ptxas (PTX -> SASS, resource usage per kernel)
# into assets/cuda/{lib,bin}. No GPU and no driver is needed for either.
#
# Idempotent, like scripts/fetch-assets.sh: each wheel is verified by sha256 and cached in
# ${XDG_CACHE_HOME:-~/.cache}/sae-ablate/wheels; the unpacked files live in
# ${XDG_CACHE_HOME:-~/.cache}/sae-ablate/cuda-12.8.93 and assets/cuda links to them.
# Nothing is downloaded when the verified wheels are cached; a half-done unpack is
# never left under the final name (unpacked to a temporary folder, then renamed).
set -euo pipefail
cd "$(dirname "$0")/.."

VER=12.8.93
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sae-ablate"
WHEELS="$CACHE/wheels"
DEST="$CACHE/cuda-$VER"
PLAT="manylinux2010_x86_64.manylinux_2_12_x86_64"
NVRTC_WHL="nvidia_cuda_nvrtc_cu12-$VER-py3-none-$PLAT.whl"
NVRTC_SUM="a7756528852ef889772a84c6cd89d41dfa74667e24cca16bb31f8f061e3e9994"
NVCC_WHL="nvidia_cuda_nvcc_cu12-$VER-py3-none-$PLAT.whl"
NVCC_SUM="2d6dc36fb7cb5ac9c0b8825bc13d193c35487a315664007287d0126531238011"

die() { echo "fetch-cuda-tools: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
verified() { [ -f "$1" ] && [ "$(sha "$1")" = "$2" ]; }

[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
  || die "the PyPI CUDA wheels used here are for Linux x86_64, not $(uname -s)-$(uname -m)"

ready() {
  [ -f "$DEST/lib/libnvrtc.so.12" ] && [ -f "$DEST/lib/libnvrtc-builtins.so.12.8" ] \
    && [ -x "$DEST/bin/ptxas" ] && [ -f "$DEST/.complete" ]
}

link_assets() {
  mkdir -p assets
  if [ "$(readlink assets/cuda 2>/dev/null || true)" != "$DEST" ]; then
    rm -rf assets/cuda.tmp
    ln -s "$DEST" assets/cuda.tmp
    mv -Tf assets/cuda.tmp assets/cuda
  fi
  echo "fetch-cuda-tools: assets/cuda -> $DEST ready" >&2
}

if ready; then
  link_assets
  exit 0
fi

pip_cmd() {
  local c
  for c in pip3 pip; do
    if command -v "$c" >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    echo "python3 -m pip"; return 0
  fi
  die "pip is not installed; install it (e.g. apt-get install python3-pip) and rerun"
}

# wheel PKG FILE SUM: the verified cached wheel FILE, downloaded from PyPI when missing.
wheel() {
  local pkg="$1" file="$2" sum="$3" pip got
  mkdir -p "$WHEELS"
  if ! verified "$WHEELS/$file" "$sum"; then
    pip="$(pip_cmd)"
    echo "fetch-cuda-tools: downloading $pkg==$VER into $WHEELS" >&2
    rm -f "$WHEELS/$file"
    $pip download --no-deps --disable-pip-version-check -q --only-binary=:all: \
      --platform manylinux2014_x86_64 "$pkg==$VER" -d "$WHEELS" \
      || die "pip download $pkg==$VER failed (is PyPI reachable?)"
    [ -f "$WHEELS/$file" ] || die "pip download $pkg==$VER did not produce $file"
    got="$(sha "$WHEELS/$file")"
    [ "$got" = "$sum" ] || die "sha256 mismatch for $file: got $got, expected $sum"
  fi
  printf '%s\n' "$WHEELS/$file"
}

nvrtc="$(wheel nvidia-cuda-nvrtc-cu12 "$NVRTC_WHL" "$NVRTC_SUM")"
nvcc="$(wheel nvidia-cuda-nvcc-cu12 "$NVCC_WHL" "$NVCC_SUM")"

mkdir -p "$CACHE"
tmp="$(mktemp -d "$CACHE/.cuda-$VER.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 - "$nvrtc" "$nvcc" "$tmp" <<'PY'
import os, sys, zipfile
nvrtc, nvcc, out = sys.argv[1:4]
want = {
    nvrtc: {"nvidia/cuda_nvrtc/lib/libnvrtc.so.12": "lib/libnvrtc.so.12",
            "nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.8": "lib/libnvrtc-builtins.so.12.8"},
    nvcc: {"nvidia/cuda_nvcc/bin/ptxas": "bin/ptxas"},
}
for wheel, members in want.items():
    with zipfile.ZipFile(wheel) as z:
        for member, dest in members.items():
            path = os.path.join(out, dest)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                data = z.read(member)
            except KeyError:
                sys.exit(f"{member} is not in {wheel}")
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o755)
PY
echo "$VER" >"$tmp/.complete"
rm -rf "$DEST"
mv -T "$tmp" "$DEST"
trap - EXIT
ready || die "unpacked $DEST is incomplete"
link_assets
