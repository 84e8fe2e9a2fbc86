#!/usr/bin/env bash
# The whole test suite: installs system packages, then unit + integration tests. Integration
# tests start their own registries on 127.0.0.1 and mount real FUSE filesystems (needs root or
# fusermount3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Formatting and lints first (seconds, and minutes less than a failed suite), where the
# toolchain has them (rustup's default profile does).
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --check; fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --locked --all-targets -- -D warnings
fi
# The API docs build, their links resolved (a moved item breaks a link silently otherwise).
RUSTDOCFLAGS="-D rustdoc::broken_intra_doc_links" cargo doc --locked --no-deps --quiet
cargo build --locked --all-targets
cargo test --locked -- --test-threads=4
