#!/usr/bin/env bash
# Block root benchmark (see bench/disk.py): a QEMU guest on (a) a virtio-fs root served from a
# bux-fuse mount, (b) a virtio-blk root on `bux-fuse mount --disk`, (c) a virtio-blk root on
# mkfs.erofs of the unpacked image; plus the disk's host side (page cache, PSS, time to ready).
#   bash bench/disk.sh [--runs N] [--ways a,b,c]
# Images: a Debian image with python3 (the large image's first two layers and its cleanup layer)
# for all three workloads, and the large Debian image for `find /` and the python import (its
# full read, 1.1 GB at TCG's ~10 MB/s, would take minutes per boot).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/large-image.sh
bash scripts/vm-run.sh --prepare
exec python3 bench/disk.py --small-from "$layout:bookworm" \
  --image "debian-large=$layout:bookworm@find,python" --runs-for read=5 "$@"
