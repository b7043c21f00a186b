#!/usr/bin/env bash
# Reference token ids for the Gemma 3 270M vocabulary (a SentencePiece vocabulary stored
# in GGUF metadata), computed by two implementations independent of this crate:
#   * HF transformers' GGUF tokenizer conversion (AutoTokenizer.from_pretrained(gguf_file=...)),
#   * llama.cpp's own tokenizer through llama-cpp-python (built from source: ~10 min on 2 cores).
# Writes tests/fixtures/gemma3-270m/tokens.json (see make-tokenizer-fixtures.py).
#
# The virtual environment lives outside the checkout and is reused:
#   ${XDG_CACHE_HOME:-~/.cache}/sae-ablate/tokenizer-venv
# Usage: scripts/make-tokenizer-fixtures.sh [path/to/gemma-3-270m-q4_k_m.gguf]
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sae-ablate"
VENV="$CACHE/tokenizer-venv"
GGUF="${1:-assets/gemma-3-270m/gemma-3-270m-q4_k_m.gguf}"

# Pinned so that the fixture can be regenerated bit for bit.
PKGS=(
  "gguf==0.17.1"
  "numpy==2.2.6"
  "transformers==4.57.6"
  "tokenizers==0.22.1"
  "sentencepiece==0.2.1"
  "protobuf==6.33.0"
  "llama-cpp-python==0.3.16"
)

if [ ! -f "$GGUF" ]; then
  echo "make-tokenizer-fixtures: $GGUF is missing: run scripts/fetch-assets.sh first" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.pinned"
if [ "$(cat "$STAMP" 2>/dev/null)" != "${PKGS[*]}" ]; then
  "$VENV/bin/pip" install --disable-pip-version-check -q --upgrade pip
  # llama-cpp-python compiles llama.cpp; a portable CPU build (no -march=native).
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
    "$VENV/bin/pip" install --disable-pip-version-check "${PKGS[@]}"
  echo "${PKGS[*]}" > "$STAMP"
fi

"$VENV/bin/python" scripts/make-tokenizer-fixtures.py "$GGUF" tests/fixtures/gemma3-270m/tokens.json
