#!/usr/bin/env bash
# Installs what bux-fuse needs on a fresh Debian/Ubuntu machine: FUSE tools, the reference
# registry, image tools used as independent oracles in tests (umoci, skopeo, fsck.erofs; containerd
# and stargz-snapshotter's ctr-remote as the eStargz producer), and busybox for sample images.
# `setup.sh demo`: only what scripts/demo.sh needs, no test tools (qemu, containerd, ...) and no
# virtiofsd build: a new user's first command waits on every package and build here.
set -euo pipefail
mode=${1:-all}

pkgs=(fuse3 docker-registry skopeo umoci busybox-static python3 ca-certificates)
[ "$mode" = demo ] || pkgs+=(apache2-utils qemu-system-x86 cpio lz4 zstd libcap-ng-dev
  libseccomp-dev util-linux coreutils attr erofs-utils containerd stargz-snapshotter)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
# The packaged registry may start a system instance on :5000; tests and the demo run their own.
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found: install Rust from https://rustup.rs" >&2
  exit 1
fi
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing (modprobe fuse)" >&2; exit 1; }
# Users mount through fusermount3 and, inside user namespaces, open /dev/fuse themselves: udev's
# default rules make it 0666; hosts without udev keep the kernel's 0600.
if [ "$(stat -c %a /dev/fuse)" != 666 ] && [ "$(id -u)" = 0 ]; then
  chmod 0666 /dev/fuse
fi
# The Rust virtiofsd (one worker thread, like libkrun's server) for the lazy VM test.
root=$(cd "$(dirname "$0")/.." && pwd)
if [ "$mode" != demo ] && [ ! -x "$root/target/virtiofsd/bin/virtiofsd" ]; then
  echo "setup: building the Rust virtiofsd (crates.io) into target/virtiofsd"
  cargo install --quiet --locked --root "$root/target/virtiofsd" virtiofsd
fi
echo "setup: ok"
