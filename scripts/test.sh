#!/usr/bin/env bash
# The test command: fetches any missing assets, then runs every test
# (unit, integration, CLI end-to-end, doctests) and builds examples and benches.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x scripts/fetch-assets.sh ]; then
  scripts/fetch-assets.sh
fi
cargo test --no-fail-fast
