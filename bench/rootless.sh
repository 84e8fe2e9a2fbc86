#!/usr/bin/env bash
# Rootless benchmark: root vs an ordinary user, read-only and writable mounts of the large Debian
# image, and copy-up vs cp. Writes bench/RESULTS-rootless.md.
#   bash bench/rootless.sh [--runs N] [--rounds N]   (issue 20's table: medians over N rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/large-image.sh
id buxfuse-bench >/dev/null 2>&1 || useradd --no-create-home --shell /bin/sh buxfuse-bench
# The user reads the layout and runs the binary from here.
chmod -R o+rX "$layout" target/release/bux-fuse
d=$PWD; while [ "$d" != / ]; do chmod o+x "$d"; d=$(dirname "$d"); done
exec python3 bench/rootless.py --image "oci:$PWD/$layout:bookworm" "$@"
