#!/usr/bin/env bash
# Lazy-start benchmark (see bench/lazy.py): builds release and the Debian image, then compares
# lazy mounts with a full pull over a simulated 200 Mbit/s, 10 ms link.
#   bash bench/lazy.sh [small|large] [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-large}; shift || true
bash scripts/setup.sh
cargo build --release --locked --bin bux-fuse --example slow_link
layout=target/debian/layout-$profile
[ -f "$layout/index.json" ] || bash scripts/debian-image.sh "$layout" bookworm "$profile"
# The same image as zstd:chunked (skopeo's), for the chunked-* rows.
chunked=target/debian/layout-$profile-chunked
if [ ! -f "$chunked/index.json" ]; then
  command -v skopeo >/dev/null || apt-get install -y -q --no-install-recommends skopeo >/dev/null
  skopeo copy -q --dest-compress --dest-compress-format zstd:chunked "oci:$layout:bookworm" "oci:$chunked:bookworm"
fi
cmds=(--cmd "python3=python3 -c 'import json'" --chunked "$PWD/$chunked:bookworm")
[ "$profile" = large ] && cmds+=(--cmd "gcc=gcc --version")
exec python3 bench/lazy.py --image "debian-$profile=$PWD/$layout:bookworm" "${cmds[@]}" "$@"
