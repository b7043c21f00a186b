#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU (driver installed; no toolkit needed):
#   1. fetch NVRTC + ptxas (scripts/fetch-cuda-tools.sh) and cuBLAS 12 from PyPI when the
#      machine has none (pip wheels, cached under ~/.cache/sae-ablate; a machine without
#      network access needs them cached beforehand or on the library path),
#   2. build with --features cuda (release),
#   3. run the GPU tests: every kernel against the CPU EditPlan across architectures,
#      dtypes, batch sizes 1/7/64/4096 and |S| = 0/1/26/4096 (tests/cuda_gpu.rs),
#   4. run the benchmark with the GPU's own ceilings:
#      sae-ablate bench --device cuda --random 8192x65536 --batch 1,16,256,4096
#                       --ops ablate26,forward,encode --compare --json  (f32 and bf16 weights).
# Prints one JSON object per line (test cases, then bench rows, then a summary) and
# writes everything under $OUT (or results/gpu-check/ when OUT is unset). Sized to fit
# in 8 minutes on an H100 with a warm cargo cache; the build is the long part on a cold one.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${OUT:-results/gpu-check}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu-check.log"
ROWS="$OUTDIR/gpu-check.jsonl"
: >"$LOG"
: >"$ROWS"
START=$(date +%s)

say() { echo "gpu-check: $*" | tee -a "$LOG" >&2; }
row() { echo "$1" | tee -a "$ROWS"; }
fail() {
  say "FAILED: $*"
  row "{\"check\": \"gpu-check\", \"ok\": false, \"stage\": \"$1\", \"seconds\": $(($(date +%s) - START))}"
  exit 1
}

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$LOG" 2>&1

# 1. Toolkit pieces: NVRTC (run-time compiler) and cuBLAS, both loaded with dlopen. The
#    system's copies are used when the loader finds them; otherwise the PyPI wheels.
has_lib() {
  ldconfig -p 2>/dev/null | grep -qF "$1" && return 0
  local d
  IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
  for d in "${dirs[@]+"${dirs[@]}"}"; do [ -e "$d/$1" ] && return 0; done
  return 1
}
LIBS=""
NVRTC_TEST=""
if scripts/fetch-cuda-tools.sh >>"$LOG" 2>&1; then
  LIBS="$PWD/assets/cuda/lib"
  NVRTC_TEST="--test cuda_nvrtc"
elif has_lib libnvrtc.so.12; then
  say "no PyPI access: using the system's NVRTC (the ptxas compile check is skipped)"
else
  fail fetch-nvrtc
fi
if ! has_lib libcublas.so.12; then
  CUBLAS_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/sae-ablate/cublas-cu12-12.8.4.1"
  if [ ! -f "$CUBLAS_DIR/nvidia/cublas/lib/libcublas.so.12" ]; then
    say "installing nvidia-cublas-cu12 into $CUBLAS_DIR"
    python3 -m pip install --quiet --no-deps --target "$CUBLAS_DIR" "nvidia-cublas-cu12==12.8.4.1" >>"$LOG" 2>&1 \
      || fail fetch-cublas
  fi
  LIBS="${LIBS:+$LIBS:}$CUBLAS_DIR/nvidia/cublas/lib"
fi
[ -n "$LIBS" ] && export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# 2. Build (release: the CPU reference runs at batch 4096 in the tests).
say "building with --features cuda"
cargo build --release --features cuda --bin sae-ablate >>"$LOG" 2>&1 || fail build
cargo test --release --features cuda --test cuda_gpu $NVRTC_TEST --no-run >>"$LOG" 2>&1 || fail build-tests

# 3. Compile check (NVRTC + ptxas) and the GPU tests against the CPU reference.
say "kernels against the CPU reference"
timeout 240 cargo test --release --features cuda $NVRTC_TEST --test cuda_gpu -- \
  --include-ignored --nocapture --test-threads 1 >"$OUTDIR/tests.out" 2>&1
TEST_RC=$?
grep '^{' "$OUTDIR/tests.out" | tee -a "$ROWS"
grep -E '^(test |sm_)' "$OUTDIR/tests.out" >>"$LOG"
[ $TEST_RC -eq 0 ] || say "GPU tests failed (rc $TEST_RC): see $OUTDIR/tests.out"

# 4. Benchmark with the GPU's ceilings, f32 and bf16 weights.
BENCH_RC=0
for dt in bf16 f32; do
  say "bench, $dt weights"
  timeout 150 target/release/sae-ablate bench --device cuda --random 8192x65536 --dtype "$dt" \
    --batch 1,16,256,4096 --ops ablate26,forward,encode --compare --json --budget 0.5 \
    >"$OUTDIR/bench-$dt.out" 2>>"$LOG" || BENCH_RC=$?
  grep '^{' "$OUTDIR/bench-$dt.out" | tee -a "$ROWS"
done

OK=false
[ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ] && OK=true
row "{\"check\": \"gpu-check\", \"ok\": $OK, \"tests_rc\": $TEST_RC, \"bench_rc\": $BENCH_RC, \"seconds\": $(($(date +%s) - START))}"
[ "$OK" = true ]
