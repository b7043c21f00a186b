#!/usr/bin/env bash
# Run every fuzz target (or those named) for a fixed budget, one after another, with
# the seed corpus and the format's dictionary, and print executions and crashes.
#
#   fuzz/run.sh [SECONDS] [TARGET...]      (default: 300 s, every target)
#
# Stable toolchain: `-s none` (no sanitizer; the allocation bound and Rust's own checks
# do the work) and `-a` (debug assertions and overflow checks on). Crash inputs land in
# fuzz/artifacts/<target>/; logs in fuzz/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-300}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(saelens sparsify llama_scope gemma_scope pytorch npy gguf hf_config tokenizer rdata)
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/fuzz/target}
cargo fuzz build -s none -a
# Run from a copy, so that rebuilding while the campaign runs does not swap binaries.
bin=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release
snap=$(mktemp -d)
for t in "${targets[@]}"; do cp "$bin/$t" "$snap/"; done
mkdir -p fuzz/logs
printf '%-12s %12s %8s\n' target execs crashes
for t in "${targets[@]}"; do
  dict=fuzz/dict/$t.dict
  case $t in saelens|sparsify|llama_scope) dict=fuzz/dict/safetensors.dict ;; esac
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  # What `cargo fuzz run -s none -a $t fuzz/corpus/$t -- <flags>` runs, on the copy.
  nice -n 15 "$snap/$t" -artifact_prefix="fuzz/artifacts/$t/" "fuzz/corpus/$t" \
    -dict="$dict" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 > "fuzz/logs/$t.log" 2>&1 || true
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/logs/$t.log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' \) | wc -l)
  printf '%-12s %12s %8s\n' "$t" "${execs:-?}" "$crashes"
done
rm -rf "$snap"
