#!/usr/bin/env bash
# Store budget benchmark (not in CI): time of `gc` on a store of 50 images (nothing to do, dry
# run, evicting half), and a cold full read of a mounted image alone and while pulls with a
# budget evict beside it. Writes bench/RESULTS-gc.md (root: it drops the page cache).
#   bash bench/gc.sh [--images 50] [--unique-mib 8] [--read-mib 256] [--runs 5]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin bux-fuse
exec python3 bench/gc.py "$@"
