#!/usr/bin/env bash
# Fleet benchmark (see bench/fleet.py): five fresh stores mount the Debian image lazily through
# a pull-through cache in front of the origin behind a simulated 200 Mbit/s, 10 ms link.
#   bash bench/fleet.sh [small|large] [--hosts N]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-large}; shift || true
bash scripts/setup.sh
cargo build --release --locked --bin bux-fuse --example slow_link
layout=target/debian/layout-$profile
[ -f "$layout/index.json" ] || bash scripts/debian-image.sh "$layout" bookworm "$profile"
exec python3 bench/fleet.py --image "debian-$profile=$PWD/$layout:bookworm" "$@"
