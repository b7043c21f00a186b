#!/usr/bin/env bash
# The test command: fetches any missing assets, then runs every test
# (unit, integration, CLI end-to-end, doctests) and builds examples and benches.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x scripts/fetch-assets.sh ]; then
  # The Austen extractor builds in the profile of the tests below (one compile, not two).
  SAE_ABLATE_CARGO_PROFILE=dev scripts/fetch-assets.sh
fi
cargo test --no-fail-fast
# The optional `ndarray` feature: its integration tests and the doctests of src/ndarray.rs.
cargo test --no-fail-fast --features ndarray --test ndarray
cargo test --no-fail-fast --features ndarray --doc src/ndarray.rs
# The experimental CUDA kernels, without a GPU: NVRTC (PyPI wheel, cached) compiles every
# kernel for sm_80 and sm_90 and ptxas reports their resources. The GPU tests themselves
# (tests/cuda_gpu.rs) are ignored here; scripts/gpu-check.sh runs them on a GPU.
scripts/fetch-cuda-tools.sh
cargo test --features cuda --test cuda_nvrtc --test cuda_gpu
