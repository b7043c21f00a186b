#!/usr/bin/env bash
# Reference token ids for the Gemma 3 270M vocabulary (a SentencePiece vocabulary stored
# in GGUF metadata), computed by two implementations independent of this crate, which must
# agree:
#   * llama.cpp's own tokenizer through llama-cpp-python (built from source: ~10 min on 2 cores),
#   * HF transformers' GGUF tokenizer conversion (GemmaTokenizer.from_pretrained(gguf_file=...)).
# Writes tests/fixtures/gemma3-270m/tokens.json (see make-tokenizer-fixtures.py); the whole of
# Pride and Prejudice (assets/austen, from scripts/fetch-austen.sh) is checked by count and hash.
#
# The virtual environment lives outside the checkout and is reused:
#   ${XDG_CACHE_HOME:-~/.cache}/sae-ablate/tokenizer-venv
# Usage: scripts/make-tokenizer-fixtures.sh [path/to/gemma-3-270m-q4_k_m.gguf]
# Needs python3 (with venv), a C/C++ compiler, and the package index.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sae-ablate"
VENV="$CACHE/tokenizer-venv"
GGUF="${1:-assets/gemma-3-270m/gemma-3-270m-q4_k_m.gguf}"
NOVEL="assets/austen/prideprejudice.txt"

# Pinned so that the fixture can be regenerated bit for bit.
PKGS=(
  "numpy==2.2.6"
  "huggingface-hub==1.33.0"
  "tokenizers==0.23.1"
  "transformers==5.23.0"
  "llama-cpp-python==0.3.16"
)

for f in "$GGUF" "$NOVEL"; do
  if [ ! -f "$f" ]; then
    echo "make-tokenizer-fixtures: $f is missing: run scripts/fetch-assets.sh first" >&2
    exit 1
  fi
done

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.pinned"
if [ "$(cat "$STAMP" 2>/dev/null)" != "${PKGS[*]}" ]; then
  # llama-cpp-python compiles llama.cpp; a portable CPU build (no -march=native).
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
    "$VENV/bin/pip" install --disable-pip-version-check "${PKGS[@]}"
  echo "${PKGS[*]}" > "$STAMP"
fi

"$VENV/bin/python" scripts/make-tokenizer-fixtures.py "$GGUF" "$NOVEL" tests/fixtures/gemma3-270m/tokens.json
