#!/usr/bin/env bash
# The main job: the ESR ablation experiment end to end on SmolLM2-135M-Instruct
# (examples/esr_ablation.rs): fetch the assets (GGUF, Austen corpus), answer the prompts,
# harvest + train + evaluate the SAE (Austen + the model's own chat answers), find the
# off-topic-detector latents, calibrate steering, run baseline / OTD-ablated / the
# positive control / random controls and the sweeps, judge every answer, and write
# results/esr/ (results.json, report.md, trials.jsonl, plots, sae/).
# Extra arguments go to the example, e.g. `scripts/main-job.sh --quick --out results/esr-quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo run --release --example esr_ablation -- "$@"
