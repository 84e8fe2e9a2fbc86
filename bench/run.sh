#!/usr/bin/env bash
# Benchmark: builds release, builds the images (a real Debian image of >= 1 GiB over >= 6
# layers, and a synthetic 500k-file image), starts a local registry and writes bench/RESULTS.md.
#   bash bench/run.sh [--runs N] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
command -v zstd >/dev/null || apt-get install -y -q zstd >/dev/null
cargo build --release --locked --bin bux-fuse --example extract_baseline
layout=target/debian/layout-large
[ -f "$layout/index.json" ] || bash scripts/debian-image.sh "$layout" bookworm large
exec python3 bench/run.py --image "debian-large=$PWD/$layout:bookworm" "$@"
