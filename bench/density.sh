#!/usr/bin/env bash
# Density benchmark: 40 and 100 mounts of the large Debian image, shared image server against a
# server per mount, and the read path against the extracted tree. Writes bench/RESULTS-density.md.
#   bash bench/density.sh [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/large-image.sh
cargo build --release --locked --example extract_baseline
exec python3 bench/density.py --layout "$layout" "$@"
