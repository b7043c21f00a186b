#!/usr/bin/env bash
# The model's batched forward side by side with HF transformers, one command after the
# other, two rounds (docs/benchmarks.md, "The model's batched forward"):
#   harvest of 8,192 rows at blocks.15.hook_resid_post (dense f32, dense bf16, quantized)
#   against transformers running the same 16 layers on 8 × 128 tokens (best and mean of 9
#   passes: a harvest runs 9), then a batched prefill of 8 × 128 tokens through all 30
#   layers (best of 3 on both sides).
# Needs a release build (`cargo build --release`) and a Python with torch, transformers
# and gguf: PY=/path/to/python scripts/compare_transformers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
M=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
BIN=target/release/sae-ablate
PY=${PY:-python3}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
harvest() {
  rm -rf "$OUT/hv"
  "$BIN" harvest --model $M --corpus assets/austen --hooks blocks.15.hook_resid_post \
    --max-tokens 8192 "$@" --out "$OUT/hv" --quiet 2>/dev/null
}
transformers() {
  "$PY" scripts/compare_transformers.py --gguf $M --batch 8 --tokens 128 --threads 2 "$@" 2>/dev/null | tail -1
}
echo "$(date -u +%FT%TZ) $(uptime)"
for round in 1 2; do
  echo "round $round crate harvest dense f32: $(harvest --model-dtype f32 --weights dense)"
  echo "round $round transformers: $(transformers --dtype float32 --layers 16 --repeat 9)"
  echo "round $round crate harvest dense bf16: $(harvest --model-dtype bf16 --weights dense)"
  echo "round $round transformers: $(transformers --dtype bfloat16 --layers 16 --repeat 9)"
  echo "round $round crate harvest quantized: $(harvest --weights quantized)"
done
prefill() {
  "$BIN" bench-model --model $M --prefill-tokens 16 --decode-tokens 1 --batch 0 \
    --random-sae-width 0 --prefill-batch 8x128 --repeat 3 "$@" 2>&1 | grep 'batched prefill'
}
echo "prefill crate f32: $(prefill --dtype f32)"
echo "prefill transformers: $(transformers --dtype float32 --layers 0 --repeat 3)"
echo "prefill crate bf16: $(prefill --dtype bf16)"
echo "prefill transformers: $(transformers --dtype bfloat16 --layers 0 --repeat 3)"
echo "prefill crate quantized: $(prefill --weights quantized)"
echo "$(date -u +%FT%TZ) $(uptime)"
