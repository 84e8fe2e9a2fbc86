#!/usr/bin/env python3
"""bux-fuse benchmark harness: measures bux-fuse against full extraction (what runtimes do
today) and the physical floor (download + one gunzip pass), on the same machine in the same run,
and writes bench/RESULTS.md. Run through bench/run.sh, which builds release and the images.

Every timing is the median of --runs runs (min and max shown); kernel caches are dropped before
every "cold" measurement. Ratios compare numbers taken in this run only.
"""
import argparse, datetime, json, os, random, shutil, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUX = os.environ.get("BUX_FUSE_BENCH_BIN") or os.path.join(ROOT, "target/release/bux-fuse")
EXTRACT = os.path.join(ROOT, "target/release/examples/extract_baseline")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True, text=True, **kw)


def tar_read(root):
    """Reads every byte of the tree at `root` (tar into a pipe); returns the bytes tar wrote.
    Fails on any read error: tar pads a file that reads short with zeros and goes on, so the
    byte count alone would not show one."""
    r = subprocess.run(["bash", "-c", 'set -o pipefail; tar -C "$1" -cf - . | wc -c', "tar_read", root],
                       capture_output=True, text=True)
    if r.returncode != 0 or r.stderr.strip():
        raise RuntimeError(f"reading {root}: {r.stderr.strip() or f'exit {r.returncode}'}")
    return int(r.stdout)


def drop_caches():
    subprocess.run("sync", shell=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class Registry:
    def __init__(self, work):
        self.port = free_port()
        cfg = os.path.join(work, "registry.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {work}/registry}}}}\n"
                    f"http: {{addr: 127.0.0.1:{self.port}}}\n")
        self.proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.1).close(); return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("registry did not start")

    def push(self, layout, tag, repo):
        sh(["skopeo", "copy", "--dest-tls-verify=false", "--preserve-digests", f"oci:{layout}:{tag}",
            f"docker://127.0.0.1:{self.port}/{repo}:{tag}"])
        return f"127.0.0.1:{self.port}/{repo}:{tag}"

    def stop(self):
        self.proc.kill(); self.proc.wait()


class Timer:
    def __init__(self): self.t = time.perf_counter()
    def s(self): return time.perf_counter() - self.t


def bux(store, *args):
    return sh([BUX, "--store", store, *args])



def daemon_pid(said, store):
    """The process serving a mount: its own daemon (named in the mount's message), or the worker
    of the image's shared server (found by its command line)."""
    if "daemon pid " in said:
        return int(said.split("daemon pid ")[1].split(";")[0])
    for p in os.listdir("/proc"):
        try:
            args = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"--worker-fd" in args and os.fsencode(store) in args:
            return int(p)
    raise RuntimeError("no process serves the mount")

def mount(store, ref, mnt):
    """Mounts; returns (seconds until the first stat of / succeeds, daemon pid)."""
    t = Timer()
    out = bux(store, "mount", ref, mnt)
    os.stat(mnt)
    os.listdir(mnt)
    el = t.s()
    pid = daemon_pid(out.stderr, store)
    return el, pid


def umount(store, mnt):
    subprocess.run([BUX, "--store", store, "umount", mnt], capture_output=True)
    for _ in range(100):
        if not os.path.ismount(mnt): break
        time.sleep(0.02)


def vm_hwm_kib(pid, key="VmHWM"):
    """A /proc/PID/status figure in KiB: the peak RSS by default."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def proc_sum(pids, path, key):
    """The sum over processes `pids` of `key:` in /proc/PID/`path` (e.g. smaps_rollup's Pss, in
    KiB, or io's rchar); a process gone counts 0."""
    total = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/{path}"):
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def bux_pids(store, keep=lambda args: True):
    """The bux-fuse processes of the store at `store` (found by their command lines), those
    whose arguments `keep` takes."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            args = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(args[0]) == b"bux-fuse" and os.fsencode(store) in args and keep(args):
            out.append(int(p))
    return out


def meminfo(key):
    """A /proc/meminfo value, in KiB."""
    for line in open("/proc/meminfo"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def du_bytes(path):
    return int(sh(["du", "-s", "--block-size=1", path]).stdout.split()[0])


def manifest_layers(layout, tag):
    idx = json.load(open(os.path.join(layout, "index.json")))
    d = [m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag][0]
    man = json.load(open(os.path.join(layout, "blobs/sha256", d["digest"].split(":")[1])))
    return man["layers"]


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def large_files(root, min_size, limit=64):
    out = []
    for dp, dn, fn in os.walk(root):
        for f in fn:
            p = os.path.join(dp, f)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if os.path.isfile(p) and not os.path.islink(p) and st.st_size >= min_size:
                out.append((os.path.relpath(p, root), st.st_size))
    out.sort()
    return out[:limit] if len(out) <= limit else random.Random(1).sample(out, limit)


def random_reads(root, picks, size):
    lat = []
    for rel, off in picks:
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        t = time.perf_counter()
        os.pread(fd, size, off)
        lat.append((time.perf_counter() - t) * 1000)
        os.close(fd)
    return lat


def bench_image(name, layout, tag, reg, work, runs, full):
    ref = reg.push(layout, tag, f"bench/{name}")
    layers = manifest_layers(layout, tag)
    compressed = sum(l["size"] for l in layers)
    r = {"name": name, "layers": len(layers), "compressed": compressed}
    store = os.path.join(work, f"store-{name}")
    mnt = os.path.join(work, f"mnt-{name}")
    dest = os.path.join(work, f"extract-{name}")
    os.makedirs(mnt, exist_ok=True)

    # 1. time to ready, cold store; and the same pull keeping no small files' bytes
    # (`--small-files 0`), alternating with it so that both see the same machine.
    lean = os.path.join(work, f"store-{name}-lean")
    ready, pull_only, lean_pull, rss, anon, mapped = [], [], [], [], [], []
    for _ in range(runs):
        shutil.rmtree(store, ignore_errors=True)
        drop_caches()
        t = Timer()
        bux(store, "pull", "-q", ref)
        pull_only.append(t.s())
        el, pid = mount(store, ref, mnt)
        ready.append(t.s())
        umount(store, mnt)
        shutil.rmtree(lean, ignore_errors=True)
        drop_caches()
        t = Timer()
        bux(lean, "pull", "-q", "--small-files", "0", ref)
        lean_pull.append(t.s())
    r["ready"] = stats(ready)
    r["pull"] = stats(pull_only)
    r["store_lean"] = du_bytes(lean)
    r["pull_lean"] = stats(lean_pull)
    shutil.rmtree(lean, ignore_errors=True)
    # 2. remount of the pulled image.
    remount = []
    for _ in range(runs):
        el, pid = mount(store, ref, mnt)
        remount.append(el)
        umount(store, mnt)
    r["remount"] = stats(remount)
    r["store"] = du_bytes(store)

    # Baselines: full extraction, and the floor (download + one gzip -dc pass, in parallel).
    ext = []
    for _ in range(runs):
        shutil.rmtree(dest, ignore_errors=True)
        drop_caches()
        t = Timer()
        sh([EXTRACT, ref, dest])
        ext.append(t.s())
    r["extract"] = stats(ext)
    r["extracted"] = du_bytes(dest)
    floor = []
    base = f"http://127.0.0.1:{reg.port}/v2/bench/{name}/blobs/"
    for _ in range(runs):
        drop_caches()
        t = Timer()
        procs = []
        for l in layers:
            dec = {"gzip": "gzip -dc", "zstd": "zstd -dc"}.get(l["mediaType"].rsplit("+", 1)[-1], "cat")
            procs.append(subprocess.Popen(f"curl -s {base}{l['digest']} | {dec} > /dev/null", shell=True))
        for p in procs:
            p.wait()
        floor.append(t.s())
    r["floor"] = stats(floor)
    # What a runtime without bux-fuse does: download each layer and extract it with GNU tar,
    # one after another (a layer must land on the one below), then sync.
    gnu = []
    gnu_dest = os.path.join(work, f"gnutar-{name}")
    for _ in range(runs):
        shutil.rmtree(gnu_dest, ignore_errors=True)
        os.makedirs(gnu_dest)
        drop_caches()
        t = Timer()
        for l in layers:
            dec = {"gzip": "z", "zstd": " --zstd "}.get(l["mediaType"].rsplit("+", 1)[-1], "")
            sh(f"set -o pipefail; curl -sf {base}{l['digest']} | tar -x{dec}f - -C {gnu_dest}", executable="/bin/bash")
        sh("sync")
        gnu.append(t.s())
    shutil.rmtree(gnu_dest, ignore_errors=True)
    r["gnu_tar"] = stats(gnu)
    if not full:
        return r

    # The fastest honest baseline for reads: the same image unpacked fresh by `umoci raw
    # unpack` onto the same disk (the extraction baseline's tree reads slower: see README).
    unpacked = os.path.join(work, f"umoci-{name}")
    shutil.rmtree(unpacked, ignore_errors=True)
    sh(["umoci", "raw", "unpack", "--image", f"{layout}:{tag}", unpacked])
    # 3. find over the whole tree, caches dropped; 4. read every byte, cold then warm.
    finds, nfinds, cold, warm, ncold, nwarm, ucold = [], [], [], [], [], [], []
    total_bytes = 0
    for _ in range(runs):
        el, pid = mount(store, ref, mnt)
        drop_caches()
        t = Timer(); sh(["find", mnt, "-printf", ""]); finds.append(t.s())
        drop_caches()
        t = Timer(); total_bytes = tar_read(mnt); cold.append(t.s())
        t = Timer(); tar_read(mnt); warm.append(t.s())
        rss.append(vm_hwm_kib(pid))
        # The peak splits into the daemon's own memory and the store files it maps (indexes,
        # windows, small-file tables: the page cache, shared with every reader of them).
        anon.append(vm_hwm_kib(pid, "RssAnon"))
        mapped.append(vm_hwm_kib(pid, "RssFile"))
        umount(store, mnt)
        drop_caches()
        t = Timer(); sh(["find", dest, "-printf", ""]); nfinds.append(t.s())
        drop_caches()
        t = Timer(); tar_read(dest); ncold.append(t.s())
        t = Timer(); tar_read(dest); nwarm.append(t.s())
        drop_caches()
        t = Timer(); tar_read(unpacked); ucold.append(t.s())
    r.update(find=stats(finds), find_native=stats(nfinds), read_cold=stats(cold), read_warm=stats(warm),
             read_native_cold=stats(ncold), read_native_warm=stats(nwarm), read_umoci_cold=stats(ucold),
             tar_bytes=total_bytes,
             rss_kib=max(rss), rss_anon_kib=max(anon), rss_file_kib=max(mapped))
    # gunzip speed of this image (for "cold full read >= 0.8x gunzip").
    gz = [l for l in layers if l["mediaType"].endswith("gzip")]
    t = Timer()
    unz = 0
    for l in gz:
        out = sh(f"gzip -dc {layout}/blobs/sha256/{l['digest'].split(':')[1]} | wc -c")
        unz += int(out.stdout)
    r["gunzip_mbps"] = unz / t.s() / 1e6 if gz else None

    # 5. random reads at random offsets of large files, cold (fresh mount, caches dropped) and warm.
    el, pid = mount(store, ref, mnt)
    files = large_files(mnt, 1 << 20)
    rnd = random.Random(42)
    rr = {}
    for size in (4096, 131072):
        picks = [(f, rnd.randrange(0, max(1, s - size))) for f, s in (rnd.choice(files) for _ in range(200))]
        umount(store, mnt)
        drop_caches()
        el, pid = mount(store, ref, mnt)
        c = random_reads(mnt, picks, size)
        w = random_reads(mnt, picks, size)
        rr[size] = {"cold_p50": pct(c, 50), "cold_p99": pct(c, 99), "warm_p50": pct(w, 50), "warm_p99": pct(w, 99)}
        drop_caches()
        nc = random_reads(dest, picks, size)
        rr[size]["native_cold_p50"] = pct(nc, 50)
        drop_caches()
        rr[size]["umoci_cold_p50"] = pct(random_reads(unpacked, picks, size), 50)
    umount(store, mnt)
    r["random"] = rr
    shutil.rmtree(unpacked, ignore_errors=True)
    return r


def synthetic_layout(work, n_files):
    """An image with n_files small files (in 1000-file directories), one gzip layer."""
    import tarfile, gzip, hashlib, io
    layout = os.path.join(work, "synthetic")
    tar_path = os.path.join(work, "synthetic.tar")
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as t:
        for d in range(n_files // 1000):
            ti = tarfile.TarInfo(f"d{d:04}"); ti.type = tarfile.DIRTYPE; ti.mode = 0o755; ti.mtime = 1700000000
            t.addfile(ti)
            for i in range(1000):
                data = f"file {d} {i}\n".encode()
                ti = tarfile.TarInfo(f"d{d:04}/f{i:04}"); ti.size = len(data); ti.mode = 0o644; ti.mtime = 1700000000
                t.addfile(ti, io.BytesIO(data))
    raw = open(tar_path, "rb").read()
    gz = gzip.compress(raw, 6)
    os.makedirs(os.path.join(layout, "blobs/sha256"), exist_ok=True)
    def put(b):
        h = hashlib.sha256(b).hexdigest()
        open(os.path.join(layout, "blobs/sha256", h), "wb").write(b)
        return f"sha256:{h}", len(b)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]}}).encode()
    cd, cs = put(cfg); ld, ls = put(gz)
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": ls}]}).encode()
    md, ms = put(man)
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
               "size": ms, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}, open(os.path.join(layout, "index.json"), "w"))
    open(os.path.join(layout, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
    os.remove(tar_path)
    return layout


def synthetic_rss(reg, work, layout, runs):
    ref = reg.push(layout, "v1", "bench/synthetic")
    store = os.path.join(work, "store-synth"); mnt = os.path.join(work, "mnt-synth"); os.makedirs(mnt, exist_ok=True)
    ready, rss, finds = [], [], []
    for _ in range(runs):
        shutil.rmtree(store, ignore_errors=True)
        drop_caches()
        t = Timer(); bux(store, "pull", "-q", ref); el, pid = mount(store, ref, mnt); ready.append(t.s())
        drop_caches()
        t = Timer(); sh(["find", mnt, "-printf", ""]); finds.append(t.s())
        rss.append(vm_hwm_kib(pid))
        umount(store, mnt)
    remount = []
    for _ in range(runs):
        el, pid = mount(store, ref, mnt); remount.append(el); umount(store, mnt)
    return {"ready": stats(ready), "find": stats(finds), "rss_kib": max(rss), "remount": stats(remount)}


def fmt(s, unit="s", scale=1.0):
    return f"{s['median']*scale:.3f} {unit} ({s['min']*scale:.3f}–{s['max']*scale:.3f})"


def report(results, synth, args):
    commit = sh(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
    lines = [
        "# bux-fuse benchmark results", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- commit: {commit}", f"- machine: {os.cpu_count()} × {cpu}, {int(mem)//1024} MiB RAM, kernel {os.uname().release}",
        f"- runs: {args.runs} per measurement; median (min–max); caches dropped before every cold measurement",
        f"- command: `bash bench/run.sh` (see README)",
        # (The machine may be shared: its load says how far the figures can be trusted.)
        f"- load average (1 min) at the start and at the end: {args.load_start:.2f}, {os.getloadavg()[0]:.2f}", "",
    ]
    for r in results:
        rr = r.get("random", {})
        lines += [f"## {r['name']}: {r['layers']} layers, {r['compressed']/1e6:.1f} MB compressed, "
                  f"{r['extracted']/1e6:.1f} MB extracted", "",
                  "| measurement | bux-fuse | baseline | ratio | goal |", "|---|---|---|---|---|",
                  f"| time-to-ready (pull+mount+stat, cold) vs download + GNU tar extraction, layer after layer, synced | {fmt(r['ready'])} | {fmt(r['gnu_tar'])} | "
                  f"{r['ready']['median']/r['gnu_tar']['median']:.2f}× | ≤ 0.25× |",
                  f"| time-to-ready vs parallel extraction (`extract_baseline`: layers fetched and inflated at once, unsynced) | {fmt(r['ready'])} | {fmt(r['extract'])} | "
                  f"{r['ready']['median']/r['extract']['median']:.2f}× | |",
                  f"| time-to-ready vs floor (download + gzip -dc) | {fmt(r['ready'])} | {fmt(r['floor'])} | "
                  f"{r['ready']['median']/r['floor']['median']:.2f}× | ≤ 1.2× |",
                  f"| pull alone (download + index + merge + metadata image), default vs `--small-files 0` (alternated) | {fmt(r['pull'])} | {fmt(r['pull_lean'])} | "
                  f"{r['pull']['median']/r['pull_lean']['median']:.2f}× | ≤ 1.1× |",
                  f"| remount of a pulled image | {fmt(r['remount'], 'ms', 1000)} | | | ≤ 50 ms |",
                  f"| store size vs compressed image (small files kept for the metadata image, the default) | {r['store']/1e6:.1f} MB | {r['compressed']/1e6:.1f} MB | "
                  f"{r['store']/r['compressed']:.3f}× | ≤ 1.5× |",
                  f"| store size vs compressed image, small files not kept (`--small-files 0`) | {r['store_lean']/1e6:.1f} MB | {r['compressed']/1e6:.1f} MB | "
                  f"{r['store_lean']/r['compressed']:.3f}× | ≤ 1.05× |",
                  f"| store size vs extracted | {r['store']/1e6:.1f} MB | {r['extracted']/1e6:.1f} MB | "
                  f"{r['store']/r['extracted']:.2f}× | |"]
        if "find" in r:
            mb = r["tar_bytes"] / 1e6
            lines += [
                f"| find -printf '' (cold) vs native | {fmt(r['find'])} | {fmt(r['find_native'])} | "
                f"{r['find']['median']/r['find_native']['median']:.2f}× | ≤ 1.5× |",
                f"| read all bytes, warm vs native | {fmt(r['read_warm'])} | {fmt(r['read_native_warm'])} | "
                f"{r['read_warm']['median']/r['read_native_warm']['median']:.2f}× | ≤ 1.1× |",
                f"| read all bytes, cold vs native | {fmt(r['read_cold'])} | {fmt(r['read_native_cold'])} | "
                f"{r['read_cold']['median']/r['read_native_cold']['median']:.2f}× | |",
                f"| read all bytes, cold vs the tree `umoci raw unpack` made (fresh, same disk) | {fmt(r['read_cold'])} | "
                f"{fmt(r['read_umoci_cold'])} | {r['read_cold']['median']/r['read_umoci_cold']['median']:.2f}× | ≤ 1.0× |",
                f"| cold full read speed vs gunzip speed | {mb/r['read_cold']['median']:.0f} MB/s | "
                f"{(r['gunzip_mbps'] or 0):.0f} MB/s | {mb/r['read_cold']['median']/(r['gunzip_mbps'] or 1):.2f}× | ≥ 0.8× |",
                f"| daemon peak RSS (VmHWM) | {r['rss_kib']/1024:.1f} MiB | | | |",
                f"| daemon RSS after the reads: its own (RssAnon) / mapped store files (RssFile, page cache) | "
                f"{r.get('rss_anon_kib', 0)/1024:.1f} / {r.get('rss_file_kib', 0)/1024:.1f} MiB | | | ≤ 64 MB own |",
            ]
            for size, v in rr.items():
                lines.append(f"| random {size//1024} KiB read p50 / p99, cold | {v['cold_p50']:.2f} / {v['cold_p99']:.2f} ms | "
                             f"native cold p50 {v['native_cold_p50']:.2f} ms; umoci's tree {v['umoci_cold_p50']:.2f} ms | | "
                             f"{'≤ 1.0 ms p50' if size == 131072 else ''} |")
                lines.append(f"| random {size//1024} KiB read p50 / p99, warm | {v['warm_p50']:.3f} / {v['warm_p99']:.3f} ms | | | |")
        lines.append("")
    if synth:
        lines += [f"## synthetic: {args.synthetic_files} small files, one gzip layer", "",
                  "| measurement | bux-fuse | goal |", "|---|---|---|",
                  f"| time-to-ready (cold) | {fmt(synth['ready'])} | |",
                  f"| remount | {fmt(synth['remount'], 'ms', 1000)} | ≤ 50 ms |",
                  f"| find -printf '' (cold) | {fmt(synth['find'])} | |",
                  f"| daemon peak RSS after find | {synth['rss_kib']/1024:.1f} MiB | ≤ 256 MB |", ""]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(ROOT, "bench/RESULTS.md"), "w") as f:
        f.write(text)
    with open(os.path.join(ROOT, "bench/results.json"), "w") as f:
        json.dump({"images": results, "synthetic": synth}, f, indent=1, default=str)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--image", action="append", default=[], help="NAME=LAYOUT:TAG (repeatable)")
    ap.add_argument("--synthetic-files", type=int, default=500_000)
    ap.add_argument("--quick", action="store_true", help="time-to-ready and baselines only")
    args = ap.parse_args()
    args.load_start = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="bux-bench-", dir=os.path.join(ROOT, "target"))
    reg = Registry(work)
    try:
        results = []
        for spec in args.image:
            name, rest = spec.split("=", 1)
            layout, tag = rest.rsplit(":", 1)
            print(f"bench: {name}", file=sys.stderr)
            results.append(bench_image(name, layout, tag, reg, work, args.runs, not args.quick))
        synth = None
        if args.synthetic_files:
            print(f"bench: synthetic {args.synthetic_files} files", file=sys.stderr)
            synth = synthetic_rss(reg, work, synthetic_layout(work, args.synthetic_files), args.runs)
        report(results, synth, args)
    finally:
        reg.stop()
        for d in os.listdir(work):
            p = os.path.join(work, d)
            if d.startswith("mnt-") and os.path.ismount(p):
                subprocess.run([BUX, "umount", p])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
