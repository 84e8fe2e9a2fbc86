#!/usr/bin/env bash
# Soak: 64 parallel readers over a read-only mount of the large Debian image for 10 minutes;
# no error, no mismatch, daemon RSS bounded. Writes bench/RESULTS-soak.md.
#   bash bench/soak.sh [--minutes M] [--readers N]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/large-image.sh
exec python3 bench/soak.py --image "oci:$PWD/$layout:bookworm" "$@"
