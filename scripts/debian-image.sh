#!/usr/bin/env bash
# Builds a real multi-layer Debian image as an OCI layout, one layer per step, with umoci:
#   debian-image.sh LAYOUT TAG [small|large]
# small: debootstrap minbase, + python3, + a cleanup layer (whiteouts of docs).
# large: small's steps plus toolchains (>= 1 GiB uncompressed over >= 6 layers), for bench/.
# Needs root and the Debian mirror (a package registry these machines reach).
set -euo pipefail
layout=$1; tag=$2; profile=${3:-small}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d "${TMPDIR:-/tmp}/debian-image.XXXXXX")
trap 'umount -R "$work/bundle/rootfs/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null

[ -d "$layout" ] || umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
root=$work/bundle/rootfs

layer() { # layer "description" : repack what changed since the last layer
  echo "debian-image: layer: $1" >&2
  umoci repack --refresh-bundle --image "$layout:$tag" --history.created_by "$1" "$work/bundle"
}
in_root() {
  mount -t proc proc "$root/proc"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
  umount "$root/proc"
}
install() { in_root apt-get install -y -q --no-install-recommends "$@" >/dev/null; in_root apt-get clean; }

debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null
layer "debootstrap --variant=minbase $suite"
in_root apt-get update -q >/dev/null
install python3
layer "apt-get install python3"
if [ "$profile" = large ]; then
  install gcc g++ make
  layer "apt-get install gcc g++ make"
  install gfortran perl-doc
  layer "apt-get install gfortran perl-doc"
  install llvm-14 clang-14
  layer "apt-get install llvm-14 clang-14"
  install openjdk-17-jre-headless
  layer "apt-get install openjdk-17-jre-headless"
fi
rm -rf "$root"/usr/share/doc/* "$root"/var/lib/apt/lists/*
layer "remove docs and apt lists"
umoci config --image "$layout:$tag" --config.cmd /bin/bash \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo "debian-image: $layout:$tag ready" >&2
