#!/usr/bin/env bash
# Times the README's first command as a new user meets it: a fresh clone of REV (default HEAD)
# with no target/ and an empty CARGO_HOME (so crates are downloaded too), then
# `bash scripts/demo.sh` under /usr/bin/time. Figures for bench/RESULTS-build.md.
#   bash bench/fresh-demo.sh [REV] [DIR]    (DIR default: target/fresh-demo; removed first)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rev=${1:-HEAD}
dir=${2:-$root/target/fresh-demo}
rm -rf "$dir"; mkdir -p "$dir"
git clone -q "$root" "$dir/repo"
git -C "$dir/repo" checkout -q "$(git -C "$root" rev-parse "$rev")"
export CARGO_HOME=$dir/cargo-home          # rustup's cargo/rustc stay on PATH
unset CARGO_TARGET_DIR
cd "$dir/repo"
echo "commit $(git rev-parse --short HEAD), $(nproc) cores; load before: $(uptime | sed 's/.*load/load/')"
/usr/bin/time -v -o "$dir/time.txt" bash scripts/demo.sh > "$dir/demo.log" 2>&1
echo "load after: $(uptime | sed 's/.*load/load/')"
grep -h 'Finished `release`' "$dir/demo.log"
echo "crates compiled: $(grep -c '^ *Compiling ' "$dir/demo.log"), downloaded: $(grep -c '^ *Downloaded ' "$dir/demo.log")"
grep -E 'Elapsed|User time|System time' "$dir/time.txt"
echo "binary: $(stat -c %s target/release/bux-fuse) bytes; log: $dir/demo.log"
