#!/usr/bin/env bash
# Harvest, train and evaluate the default SmolLM2 SAE (TopK, d_sae = 4608, k = 32) on
# blocks.15.hook_resid_post of SmolLM2-135M-Instruct over the Austen novels, writing it to
# assets/saes/smollm2/ in SAELens format (cfg.json + sae_weights.safetensors).
#
#   scripts/train-smollm2-sae.sh            # defaults below
#   TOKENS=250000 scripts/train-smollm2-sae.sh
#
# Activations are cached in ${ACTS:-target/acts-smollm2} (a second run skips the model).
# The last 64 contexts (128 tokens each) of the corpus — the end of Sense and
# Sensibility — are held out from harvesting and used by the evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
HOOK=blocks.15.hook_resid_post
TOKENS=${TOKENS:-150000}          # harvested activation rows
EPOCHS=${EPOCHS:-3}               # passes over them in training
ACTS=${ACTS:-target/acts-smollm2}
OUT=${OUT:-assets/saes/smollm2}

[ -f "$MODEL" ] || { echo "missing $MODEL: run scripts/fetch-assets.sh" >&2; exit 2; }
[ -d assets/austen ] || { echo "missing assets/austen: run scripts/fetch-assets.sh" >&2; exit 2; }

cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/sae-ablate"

start=$(date +%s)
$BIN harvest --model "$MODEL" --out "$ACTS" --hooks "$HOOK" --max-tokens "$TOKENS"
mid=$(date +%s)
$BIN train --activations "$ACTS" --out "$OUT" --d-sae 4608 --k 32 \
  --total-tokens $((TOKENS * EPOCHS)) --batch-size 4096 --dead-tokens-threshold 50000
end=$(date +%s)
echo "harvest $((mid - start)) s, train $((end - mid)) s, total $((end - start)) s" >&2
$BIN eval --model "$MODEL" --sae "$OUT" --histogram "$OUT/latent_density.png" --json | tee "$OUT/eval.json"
