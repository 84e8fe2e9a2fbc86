#!/usr/bin/env bash
# The whole test suite: installs system packages, then unit + integration tests. Integration
# tests start their own registries on 127.0.0.1 and mount real FUSE filesystems (needs root or
# fusermount3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --locked --all-targets
cargo test --locked -- --test-threads=4
