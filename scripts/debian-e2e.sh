#!/usr/bin/env bash
# A real Debian image end to end: build it (scripts/debian-image.sh, cached in target/debian),
# serve it from a local docker-registry, pull + mount it with bux-fuse, run dpkg in a chroot, and
# compare the mount with umoci's unpack using the project's tree comparison (examples/treediff.rs).
#   debian-e2e.sh [small|large]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-small}
bash scripts/setup.sh >/dev/null
bux=${BUX:-$PWD/target/release/bux-fuse}
[ -x "$bux" ] || cargo build --release --locked
cargo build --release --locked --quiet --example treediff
treediff=$PWD/target/release/examples/treediff
cache=$PWD/target/debian
layout=$cache/layout-$profile
[ -f "$layout/index.json" ] || bash scripts/debian-image.sh "$layout" bookworm "$profile"
work=$(mktemp -d); export BUX_FUSE_HOME=$work/store
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog: {level: error}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' "$work/reg" "$port" > "$work/reg.yml"
docker-registry serve "$work/reg.yml" >/dev/null 2>&1 & reg=$!
trap '"$bux" umount "$work/root" 2>/dev/null; kill $reg; rm -rf "$work"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
skopeo copy --dest-tls-verify=false "oci:$layout:bookworm" "docker://127.0.0.1:$port/library/debian:bookworm" >/dev/null
ref=127.0.0.1:$port/library/debian:bookworm
echo "== bux-fuse pull $ref"; time "$bux" pull "$ref"
echo "== bux-fuse mount"; time "$bux" mount --quiet "$ref" "$work/root"
echo "== chroot: os-release, dpkg -l | wc -l, python3"
chroot "$work/root" /bin/sh -c 'grep PRETTY /etc/os-release; dpkg -l | wc -l; python3 -c "import sys; print(sys.version.split()[0])" 2>/dev/null || true'
echo "== umoci raw unpack + treediff"
umoci raw unpack --image "$layout:bookworm" "$work/ref" >/dev/null
"$treediff" --ignore-root "$work/root" "$work/ref" | tail -5
echo "== store: $(du -sh "$BUX_FUSE_HOME" | cut -f1), image blobs: $(du -sh "$layout/blobs" | cut -f1)"
