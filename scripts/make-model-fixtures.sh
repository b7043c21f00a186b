#!/usr/bin/env bash
# Regenerate the model test fixtures with PyTorch + HF transformers:
#   models       tests/fixtures/models/<case>/{config.json,model.safetensors,reference.json}:
#                tiny random-weight checkpoints and their reference outputs; afterwards the
#                fixtures whose config.json is in the transformers 4.x form are reloaded with
#                transformers 4.x and checked against reference.json (verify-tf4)
#   gemma3-270m  tests/fixtures/gemma3-270m/reference.json: token ids and logits of Gemma 3
#                270M from the Q4_K_M GGUF dequantized to f32 (run scripts/fetch-assets.sh gemma3
#                first)
#
# Usage: scripts/make-model-fixtures.sh [models] [gemma3-270m] [verify-tf4]
#        (no argument: models gemma3-270m)
#        extra options go to scripts/make_model_fixtures.py, e.g. --only llama gemma2
#
# The Python packages (pinned below, all from PyPI) go into virtual environments under
# ${XDG_CACHE_HOME:-~/.cache}/sae-ablate/: fixtures-venv (transformers 5.x, torch; torch from
# PyPI brings its CUDA wheels, a few GB) and fixtures-venv-tf4 (transformers 4.x only, reusing
# fixtures-venv's torch through a .pth file). The Rust tests only read the committed outputs;
# they never run Python.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sae-ablate"
VENV="$CACHE/fixtures-venv"
VENV4="$CACHE/fixtures-venv-tf4"
PY="${PYTHON:-python3}"
PACKAGES=(
  torch==2.15.0
  transformers==5.25.0
  safetensors==0.8.0
  numpy==2.4.6
  gguf==0.19.0
  sentencepiece==0.2.3
  accelerate==1.16.0
  protobuf==7.36.2
)
PACKAGES4=(
  transformers==4.57.6
  huggingface_hub==0.36.2
  tokenizers==0.22.2
)

die() { echo "make-model-fixtures: $*" >&2; exit 1; }

# make_venv DIR PACKAGES...: create DIR (once per package list) and install the packages.
make_venv() {
  local dir="$1"; shift
  local stamp="$dir/.packages"
  if [ -x "$dir/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$*" ]; then
    return 0
  fi
  command -v "$PY" >/dev/null 2>&1 || die "$PY not found"
  echo "make-model-fixtures: creating $dir with $*" >&2
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  if [ -n "${LINK_SITE:-}" ]; then
    # Reuse torch & co. from the main environment; packages installed here take precedence.
    # (pip then reports that the main environment's `kernels` wants a newer huggingface_hub:
    # harmless, transformers 4.x does not use it here.)
    local sp
    sp="$("$dir/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
    printf '%s\n' "$LINK_SITE" >"$sp/zz-fixtures-venv.pth"
  fi
  "$dir/bin/python" -m pip install --disable-pip-version-check -q "$@" \
    || die "pip install into $dir failed (is PyPI reachable?)"
  printf '%s' "$*" >"$stamp"
}

[ $# -gt 0 ] || set -- models gemma3-270m
WHAT=() OPTS=()
for a in "$@"; do
  case "$a" in
    models | gemma3-270m | verify-tf4) WHAT+=("$a") ;;
    *) OPTS+=("$a") ;;
  esac
done
[ ${#WHAT[@]} -gt 0 ] || WHAT=(models gemma3-270m)

export PYTHONHASHSEED=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false
# Never reach for a model hub: everything is built locally or read from assets/.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

make_venv "$VENV" "${PACKAGES[@]}"
for w in "${WHAT[@]}"; do
  case "$w" in
    models | gemma3-270m)
      "$VENV/bin/python" scripts/make_model_fixtures.py "$w" "${OPTS[@]+"${OPTS[@]}"}"
      [ "$w" = models ] || continue
      ;;
  esac
  # After `models`, and for `verify-tf4`: reload the 4.x-form fixtures with transformers 4.x.
  LINK_SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')" \
    make_venv "$VENV4" "${PACKAGES4[@]}"
  "$VENV4/bin/python" scripts/make_model_fixtures.py verify-tf4
done
