#!/usr/bin/env bash
# The main job: fetch the assets (SmolLM2-135M-Instruct GGUF, the Austen corpus), then
# harvest activations, train and evaluate the default SmolLM2 SAE
# (assets/saes/smollm2/, SAELens format), printing its FVU / L0 / dead fraction /
# CE loss recovered. The ESR ablation experiment (issue 6) will build on this SAE.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
scripts/train-smollm2-sae.sh
