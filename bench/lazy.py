#!/usr/bin/env python3
"""Lazy start benchmark: an image served by a local docker-registry behind the project's slow
link (bench/slow_link.rs, a simulated distant link), mounted three ways in the same run:

* lazy, --prefetch none   (only what is read is fetched)
* lazy, --prefetch trace  (what the publisher's recorded boot read is fetched first)
* lazy, default prefetch  (the trace, then the rest completes in the background)
* full pull, then mount   (today's path)
* with --chunked: the same image converted to zstd:chunked by skopeo, mounted lazily from its
  own tables of contents (no push-index), --prefetch none and default

The publisher pulls the image, records a read trace by running the same commands in a mount
with --record-trace, and publishes index and trace with push-index.

For each: seconds until the mount is ready, until each first command (run in a chroot of the
mount) has finished, bytes the proxy sent by then, and (default prefetch and full pull) seconds
until every layer is local. Medians of --runs runs; the page cache is dropped before each.
Writes bench/RESULTS-lazy.md and bench/results-lazy.json. Run through bench/lazy.sh.

With --fleet N instead: N lazy mounts (--prefetch none) of the image in one store, as root, the
first commands run in each in turn; reports the bux-fuse processes serving them, their summed
PSS, the page cache the commands' reads left (Cached, after the page cache was dropped) and the
bytes fetched, two ways in the same run: "shared" (the mounts fetch alike, so they stand on the
image's one server) and "apart" (each mount a read deadline of its own, so each gets a daemon
of its own: what every root lazy mount got before they stood on the image server). Prints the
table; writes nothing.
"""
import argparse, datetime, json, os, shutil, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as h  # the main harness: registry, bux wrapper, timers  # noqa: E402

SLOW_LINK = os.path.join(h.ROOT, "target/release/examples/slow_link")  # built by bench/lazy.sh


class Proxy:
    """The slow link in front of the registry: told what to do, and asked for the bytes it sent
    to clients, one line at a time on its stdin; it stops when its stdin closes."""

    def __init__(self, target, mbit, rtt):
        if not os.access(SLOW_LINK, os.X_OK):
            raise SystemExit(f"{SLOW_LINK} missing: cargo build --release --locked --example slow_link")
        self.proc = subprocess.Popen([SLOW_LINK, str(target), f"{mbit:g}", f"{rtt:g}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            raise SystemExit("slow link did not start")
        self.port = int(line)

    def bytes(self):
        self.proc.stdin.write("bytes\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill(); self.proc.wait()


def all_local(store, layers):
    blobs = os.path.join(store, "blobs/sha256")
    return all(os.path.exists(os.path.join(blobs, d.split(":")[1])) for d in layers)


def one_run(mode, refs, layers, cmds, work, proxy, compressed):
    ref = refs["chunked"] if mode.startswith("chunked") else refs["gzip"]
    layers = layers["chunked"] if mode.startswith("chunked") else layers["gzip"]
    store = tempfile.mkdtemp(prefix=f"store-{mode}-", dir=work)
    mnt = os.path.join(work, f"mnt-{mode}")
    os.makedirs(mnt, exist_ok=True)
    h.drop_caches()
    b0 = proxy.bytes()
    t = h.Timer()
    args = {"lazy-none": ["--lazy", "--prefetch", "none"], "lazy-trace": ["--lazy", "--prefetch", "trace"],
            "lazy-all": ["--lazy"], "full": [],
            "chunked-none": ["--lazy", "--prefetch", "none"], "chunked-all": ["--lazy"]}[mode]
    h.bux(store, "mount", "--quiet", *args, ref, mnt)
    os.listdir(mnt)
    out = {"ready": t.s(), "ready_bytes": proxy.bytes() - b0}
    for name, cmd in cmds:
        r = subprocess.run(["chroot", mnt, "/bin/sh", "-c", cmd], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{mode}: {cmd!r} failed: {r.stderr.strip()}")
        out[f"cmd:{name}"] = t.s()
        out[f"bytes:{name}"] = proxy.bytes() - b0
    if mode in ("lazy-all", "full", "chunked-all"):
        while not all_local(store, layers):
            time.sleep(0.05)
        out["local"] = t.s()
    out["bytes_total"] = proxy.bytes() - b0
    h.umount(store, mnt)
    shutil.rmtree(store, ignore_errors=True)
    return out


def fleet(n, ref, cmds, work, proxy, apart):
    """N lazy mounts of `ref` in one store (see the module's docs); returns the figures."""
    store = tempfile.mkdtemp(prefix="store-fleet-", dir=work)
    mnts = [os.path.join(work, f"mnt-fleet-{i}") for i in range(n)]
    h.drop_caches()
    b0 = proxy.bytes()
    ready = []
    for m in mnts:
        os.makedirs(m, exist_ok=True)
        t = h.Timer()
        own = ["--read-timeout", f"{5 + len(ready) / 1000:.3f}"] if apart else []
        h.bux(store, "mount", "--quiet", "--lazy", "--prefetch", "none", *own, ref, m)
        ready.append(t.s())
    h.drop_caches()
    time.sleep(0.5)
    cached0 = h.meminfo("Cached")
    for m in mnts:
        for _, cmd in cmds:
            subprocess.run(["chroot", m, "/bin/sh", "-c", cmd], check=True, capture_output=True)
    cached = h.meminfo("Cached") - cached0
    pids = h.bux_pids(store)
    out = {"mounts": n, "processes": len(pids), "pss_kib": h.proc_sum(pids, "smaps_rollup", "Pss"),
           "cached_kib": cached, "fetched": proxy.bytes() - b0,
           "ready_first": ready[0], "ready_rest": statistics.median(ready[1:] or ready)}
    for m in mnts:
        h.umount(store, m)
    shutil.rmtree(store, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", required=True, help="NAME=LAYOUT:TAG")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mbit", type=float, default=200)
    ap.add_argument("--rtt", type=float, default=10)
    ap.add_argument("--cmd", action="append", default=[], help="NAME=SHELL COMMAND run in the mount")
    ap.add_argument("--chunked", help="LAYOUT:TAG of the image converted to zstd:chunked (skopeo)")
    ap.add_argument("--modes", help="comma-separated subset of the modes to run")
    ap.add_argument("--fleet", type=int, help="N lazy mounts of the image instead (see above)")
    args = ap.parse_args()
    cmds = [tuple(c.split("=", 1)) for c in args.cmd] or [("python3", "python3 -c 'import json'")]
    name, rest = args.image.split("=", 1)
    layout, tag = rest.rsplit(":", 1)
    work = tempfile.mkdtemp(prefix="bux-lazy-bench-", dir=os.path.join(h.ROOT, "target"))
    reg = h.Registry(work)
    proxy = None
    try:
        direct = reg.push(layout, tag, "bench/lazy")
        layers = [l["digest"] for l in h.manifest_layers(layout, tag)]
        compressed = sum(l["size"] for l in h.manifest_layers(layout, tag))
        publisher = tempfile.mkdtemp(prefix="publisher-", dir=work)
        h.bux(publisher, "pull", "--quiet", direct)
        pmnt = os.path.join(work, "mnt-publisher")
        os.makedirs(pmnt)
        h.bux(publisher, "mount", "--quiet", "--record-trace", direct, pmnt)
        for _, cmd in cmds:
            subprocess.run(["chroot", pmnt, "/bin/sh", "-c", cmd], check=True, capture_output=True)
        h.umount(publisher, pmnt)
        time.sleep(0.5)  # the daemon saves the trace as it exits
        h.bux(publisher, "push-index", direct)
        proxy = Proxy(reg.port, args.mbit, args.rtt)
        through = lambda r: r.replace(f"127.0.0.1:{reg.port}", f"127.0.0.1:{proxy.port}")
        refs = {"gzip": through(direct)}
        all_layers = {"gzip": layers}
        modes = ["lazy-none", "lazy-trace", "lazy-all", "full"]
        if args.chunked:
            clayout, ctag = args.chunked.rsplit(":", 1)
            refs["chunked"] = through(reg.push(clayout, ctag, "bench/lazy-chunked"))
            all_layers["chunked"] = [l["digest"] for l in h.manifest_layers(clayout, ctag)]
            modes += ["chunked-none", "chunked-all"]
        if args.fleet:
            rs = {"shared": [], "apart": []}
            for _ in range(args.runs):
                for side in rs:  # interleaved
                    rs[side].append(fleet(args.fleet, refs["gzip"], cmds, work, proxy, side == "apart"))
            print(f"| {args.fleet} lazy mounts, median of {args.runs} | shared | apart |")
            print("|---|---|---|")
            for k in rs["shared"][0]:
                m = {side: statistics.median(r[k] for r in v) for side, v in rs.items()}
                print(f"| {k} | {m['shared']:.6g} | {m['apart']:.6g} |")
            return
        if args.modes:
            modes = [m for m in modes if m in args.modes.split(",")]
        results = {m: [] for m in modes}
        for i in range(args.runs):
            for mode in results:  # interleaved, so drift in machine load hits all alike
                print(f"bench: run {i + 1}/{args.runs} {mode}", file=sys.stderr)
                results[mode].append(one_run(mode, refs, all_layers, cmds, work, proxy, compressed))
        report(name, args, cmds, compressed, results)
    finally:
        if proxy:
            proxy.stop()
        reg.stop()
        for d in os.listdir(work):
            p = os.path.join(work, d)
            if d.startswith("mnt-") and os.path.ismount(p):
                subprocess.run([h.BUX, "umount", p])
        shutil.rmtree(work, ignore_errors=True)


def med(rs, key):
    xs = [r[key] for r in rs if key in r]
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def report(name, args, cmds, compressed, results):
    def s(v):
        return "-" if v is None else f"{v[0]:.2f} s ({v[1]:.2f}–{v[2]:.2f})"

    def b(v):
        return "-" if v is None else f"{v[0] / 2**20:.1f} MiB ({100 * v[0] / compressed:.1f}%)"

    rows = []
    for mode, rs in results.items():
        row = [mode, s(med(rs, "ready")), b(med(rs, "ready_bytes"))]
        for n, _ in cmds:
            row += [s(med(rs, f"cmd:{n}")), b(med(rs, f"bytes:{n}"))]
        row += [s(med(rs, "local"))]
        rows.append(row)
    head = ["mode", "ready", "fetched at ready"]
    for n, _ in cmds:
        head += [f"`{n}` done", f"fetched by then"]
    head += ["fully local"]
    full_local = med(results.get("full", []), "local")
    lazy_local = med(results.get("lazy-all", []), "local")
    ratio = (lazy_local[0] / full_local[0]) if full_local and lazy_local else None
    lines = [
        f"# Lazy start — {name}",
        "",
        f"{datetime.date.today()}, `bash bench/lazy.sh`, {args.runs} runs (median, min–max), page cache "
        f"dropped before each; registry behind the slow link (`bench/slow_link.rs`) at {args.mbit:g} Mbit/s, {args.rtt:g} ms RTT; "
        f"image {compressed / 2**20:.1f} MiB compressed. Times count from the start of `bux-fuse mount`; "
        "bytes are what the proxy sent (manifests, index and layer bytes).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ] + ["| " + " | ".join(r) + " |" for r in rows] + [
        "",
        f"Fully local, lazy with background completion vs full pull: "
        f"{'-' if ratio is None else f'{ratio:.2f}x'}.",
        "",
        "Commands: " + "; ".join(f"`{n}` = `{c}`" for n, c in cmds),
    ] + ([] if not args.chunked else [
        "",
        "`chunked-*`: the same image converted by `skopeo copy --dest-compress-format zstd:chunked` "
        "(its layers are larger; percentages are of the gzip image's size), mounted lazily from "
        "its own tables of contents, without push-index.",
    ])
    with open(os.path.join(HERE, "RESULTS-lazy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(HERE, "results-lazy.json"), "w") as f:
        json.dump({"image": name, "compressed": compressed, "args": vars(args), "runs": results}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
