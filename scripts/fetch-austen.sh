#!/usr/bin/env bash
# Fetch the Jane Austen corpus: download Debian's r-cran-janeaustenr package
# (cached in ${XDG_CACHE_HOME:-$HOME/.cache}/sae-ablate/austen), unpack it, copy its
# lazy-load database to assets/austen/janeaustenr/data/, extract the six novels
# with the project's own R-data reader (examples/extract_austen.rs) into
# assets/austen/<book>.txt and verify their SHA-256 sums. Idempotent: a second run
# only re-verifies.
#
# The extractor is built in the cargo profile SAE_ABLATE_CARGO_PROFILE (default
# `release`, the profile of the main job, scripts/main-job.sh; scripts/test.sh sets
# `dev`, the profile of `cargo test`), with default features as both use, so a fresh
# machine compiles the crate once for the extractor and the command that follows.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE="${SAE_ABLATE_CARGO_PROFILE:-release}"
case "$PROFILE" in
  release | dev) ;;
  *) echo "fetch-austen: SAE_ABLATE_CARGO_PROFILE must be release or dev, not '$PROFILE'" >&2; exit 1 ;;
esac

PKG=r-cran-janeaustenr
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sae-ablate/austen"
OUT=assets/austen
DATA_IN_PKG=usr/lib/R/site-library/janeaustenr/data
mkdir -p "$CACHE" "$OUT/janeaustenr/data"

extractor() { cargo run --quiet --profile "$PROFILE" --example extract_austen -- "$@"; }

if extractor --verify "$OUT" >/dev/null 2>&1 \
  && [ -f "$OUT/janeaustenr/data/Rdata.rdx" ] && [ -f "$OUT/janeaustenr/data/Rdata.rdb" ]; then
  echo "fetch-austen: $OUT is up to date"
  exit 0
fi

deb() { ls "$CACHE"/${PKG}_*.deb 2>/dev/null | head -n 1 || true; }
if [ -z "$(deb)" ]; then
  as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  # On a fresh Debian machine apt knows no packages until `apt-get update` has run once.
  if ! (cd "$CACHE" && apt-get download "$PKG"); then
    echo "fetch-austen: apt-get download failed; running apt-get update once and retrying" >&2
    as_root apt-get update
    (cd "$CACHE" && apt-get download "$PKG")
  fi
fi
DEB="$(deb)"
[ -n "$DEB" ] || { echo "fetch-austen: no $PKG .deb in $CACHE" >&2; exit 1; }

UNPACKED="$CACHE/pkg"
if [ ! -f "$UNPACKED/$DATA_IN_PKG/Rdata.rdx" ]; then
  rm -rf "$UNPACKED.tmp"
  dpkg-deb -x "$DEB" "$UNPACKED.tmp"
  rm -rf "$UNPACKED"
  mv "$UNPACKED.tmp" "$UNPACKED"
fi

for f in Rdata.rdx Rdata.rdb; do
  cp "$UNPACKED/$DATA_IN_PKG/$f" "$OUT/janeaustenr/data/$f.tmp"
  mv "$OUT/janeaustenr/data/$f.tmp" "$OUT/janeaustenr/data/$f"
done

extractor "$UNPACKED" "$OUT"
extractor --verify "$OUT" >/dev/null
echo "fetch-austen: $OUT ready (sha256 verified)"
