#!/usr/bin/env bash
# Memory of a pull in the caller's process (see bench/pull_memory.rs): builds the large Debian
# image, serves it from a local registry, pulls it through the library into a fresh store N
# times for the default options and for `small_files: Some(0)`, and writes the medians to
# bench/RESULTS-memory.md (all runs in bench/results-memory.json, under LABEL).
#   bash bench/memory.sh [--runs N] [--label LABEL] [--rev REV]
# --rev REV measures the library as it was at git revision REV (with this bench program), to
# compare with: its worktree and build go under target/memory-rev/.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3 label=current rev=
while (($#)); do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --label) label=$2; shift 2 ;;
    --rev) rev=$2; shift 2 ;;
    *) echo "usage: bench/memory.sh [--runs N] [--label LABEL] [--rev REV]" >&2; exit 2 ;;
  esac
done
source bench/large-image.sh # setup, release binary, $layout
cargo build --release --locked --example pull_memory
prog=$PWD/target/release/examples/pull_memory
if [ -n "$rev" ]; then
  wt=$PWD/target/memory-rev/src-$rev
  [ -d "$wt" ] || git worktree add --detach "$wt" "$rev" >/dev/null
  cp bench/pull_memory.rs "$wt/bench/"
  grep -q pull_memory "$wt/Cargo.toml" ||
    printf '\n[[example]]\nname = "pull_memory"\npath = "bench/pull_memory.rs"\n' >>"$wt/Cargo.toml"
  # The same target dir (its dependencies built once): the two checkouts' crates share their
  # artifacts' names, so cargo takes one for the other unless the crate is cleaned in between.
  cargo clean --release --locked -p bux-fuse
  (cd "$wt" && CARGO_TARGET_DIR=$OLDPWD/target cargo build --release --locked --example pull_memory)
  cp target/release/examples/pull_memory "target/memory-rev/pull_memory-$rev"
  prog=$PWD/target/memory-rev/pull_memory-$rev
  [ "$label" = current ] && label=$rev
  cargo clean --release --locked -p bux-fuse
  cargo build --release --locked --bin bux-fuse --example pull_memory # this tree's again
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/bux-memory.XXXXXX")
reg_pid=
cleanup() { [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<EOF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
EOF
docker-registry serve "$work/registry.yml" >/dev/null 2>&1 &
reg_pid=$!
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),0.1)" 2>/dev/null && break
  sleep 0.1
done
ref=127.0.0.1:$port/debian-large:bookworm
skopeo copy -q --dest-tls-verify=false --preserve-digests "oci:$layout:bookworm" "docker://$ref"

out=$work/runs.jsonl
for i in $(seq "$runs"); do
  for small in default 0; do
    args=()
    [ "$small" = default ] || args=(--small-files "$small")
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    line=$("$prog" --store "$work/store-$i-$small" "${args[@]}" "$ref")
    rm -rf "$work/store-$i-$small"
    echo "memory: run $i, small_files $small: $line" >&2
    echo "$line" >>"$out"
  done
done
python3 - "$out" "$label" <<'EOF'
import json, statistics, sys, datetime, os
runs = [json.loads(l) for l in open(sys.argv[1])]
label = sys.argv[2]
path = "bench/results-memory.json"
data = json.load(open(path)) if os.path.exists(path) else {}
data[label] = {"date": datetime.date.today().isoformat(), "runs": runs}
json.dump(data, open(path, "w"), indent=1)
keys = [("peak_mb", "peak RSS (MB)"), ("retained_mb", "retained after return (MB)"),
        ("trimmed_mb", "after malloc_trim (MB)"), ("settled_mb", "10 s later (MB)"),
        ("max_stall_ms", "longest executor stall (ms)"),
        ("max_busy_ms", "most executor CPU between ticks (ms)"), ("secs", "pull (s)")]
rows = []
for lab, d in data.items():
    for small in (None, 0):
        rs = [r for r in d["runs"] if r["small_files"] == small]
        if not rs:
            continue
        med = {k: statistics.median(r[k] for r in rs) if all(k in r for r in rs) else None
               for k, _ in keys}
        phases = {p: statistics.median(r["phases"].get(p, 0) for r in rs) for p in rs[0]["phases"]}
        rows.append((lab, "default" if small is None else "0", len(rs), med, phases))
with open("bench/RESULTS-memory.md", "w") as f:
    f.write("# Memory of a pull in the caller's process\n\n")
    f.write("`bash bench/memory.sh` (program: `bench/pull_memory.rs`): the large Debian image (7 layers, "
            "~345 MiB gzip, ~1 GiB uncompressed) pulled through `Store::pull` from a local registry "
            "into a fresh store, on a current-thread tokio runtime, in the measuring process. "
            "Medians of the runs shown. Peak is VmHWM reset just before the pull; retained is VmRSS "
            "once the pull returned and all but the `PulledImage` was dropped (runtime still up); "
            "the stall is the longest gap between runs of a task that asks to run every 1 ms. "
            "10 s later is VmRSS once tokio's idle blocking threads have left. The executor's CPU "
            "between ticks is the CPU time its thread spent between two runs of that task: on a "
            "shared machine a stall is also the thread waiting for a CPU, which that does not count. "
            "Root, so small files are kept for the EROFS metadata image by default.\n\n")
    f.write("| library | small_files | runs | " + " | ".join(h for _, h in keys) + " | peak per phase (MB) |\n")
    f.write("|---|---|---|" + "---|" * len(keys) + "---|\n")
    for lab, small, n, med, phases in rows:
        ph = ", ".join(f"{p} {v:g}" for p, v in phases.items())
        f.write(f"| {lab} | {small} | {n} | " + " | ".join("—" if med[k] is None else f"{med[k]:g}" for k, _ in keys) + f" | {ph} |\n")
    notes = "bench/memory-notes.md"
    if os.path.exists(notes):
        f.write("\n" + open(notes).read())
print(open("bench/RESULTS-memory.md").read())
EOF
