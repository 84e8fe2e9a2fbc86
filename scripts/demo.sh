#!/usr/bin/env bash
# The main job on a bundled sample image: builds a two-layer busybox image with umoci, serves it
# from Debian's docker-registry on 127.0.0.1, then pulls, mounts, lists and runs a command in it
# through bux-fuse, and unmounts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
cargo build --release --locked --bin bux-fuse
bux=${CARGO_TARGET_DIR:-$PWD/target}/release/bux-fuse
work=$PWD/target/demo
rm -rf "$work"; mkdir -p "$work"
export BUX_FUSE_HOME=$work/store

echo "== building the sample image (umoci)"
layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:demo"
umoci unpack --image "$layout:demo" "$work/bundle" >/dev/null
rootfs=$work/bundle/rootfs
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp"
cp "$(command -v busybox)" "$rootfs/bin/busybox"
for t in sh ls cat wc echo uname sha256sum; do ln -sf busybox "$rootfs/bin/$t"; done
printf 'PRETTY_NAME="bux-fuse demo"\n' > "$rootfs/etc/os-release"
echo "delete me" > "$rootfs/etc/obsolete"
umoci repack --refresh-bundle --image "$layout:demo" "$work/bundle"
rm "$rootfs/etc/obsolete"                 # becomes a whiteout in the second layer
echo "hello from layer 2" > "$rootfs/etc/motd"
umoci repack --refresh-bundle --image "$layout:demo" "$work/bundle"
umoci config --image "$layout:demo" --config.cmd /bin/sh --config.env PATH=/bin

echo "== starting docker-registry on 127.0.0.1"
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
cleanup() { "$bux" umount "$work/root" 2>/dev/null || true; kill $registry_pid 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
skopeo copy --dest-tls-verify=false "oci:$layout:demo" "docker://127.0.0.1:$port/demo/busybox:latest" >/dev/null

ref=127.0.0.1:$port/demo/busybox:latest
echo "== bux-fuse pull $ref"
time "$bux" pull "$ref"
echo "== bux-fuse mount $ref $work/root"
time "$bux" mount "$ref" "$work/root"
echo "== ls -la $work/root/ $work/root/etc"
ls -la "$work/root/" "$work/root/etc"
echo "== chroot $work/root /bin/sh -c 'cat /etc/os-release /etc/motd; ls /bin | wc -l'"
chroot "$work/root" /bin/sh -c 'cat /etc/os-release /etc/motd; ls /bin | wc -l'
echo "== bux-fuse images / inspect"
"$bux" images
"$bux" inspect "$ref"
echo "== bux-fuse umount $work/root"
"$bux" umount "$work/root"
