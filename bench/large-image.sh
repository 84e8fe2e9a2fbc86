# Sourced by the benchmarks that use the large Debian image: sets the machine up, builds the
# release binary and makes sure the image's OCI layout exists; sets $layout.
bash scripts/setup.sh
cargo build --release --locked --bin bux-fuse
layout=target/debian/layout-large
[ -f "$layout/index.json" ] || bash scripts/debian-image.sh "$layout" bookworm large
