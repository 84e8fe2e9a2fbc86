#!/usr/bin/env python3
"""Density benchmark: many mounts of the large image on one host, as sandboxes run them.

Side by side in one run: mounts over the image's shared server (the default for root) and
mounts with a server each (`--own-server`, how every mount worked before), against the image
extracted on the local disk. Writes bench/RESULTS-density.md and bench/results-density.json.
Run through bench/density.sh. Timings are medians of --runs runs; caches are dropped before
every cold measurement; ratios compare numbers of this run only.
"""
import argparse, contextlib, datetime, glob, json, os, random, shutil, statistics, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as base  # noqa: E402  (registry, timers, caches, random reads)

BUX = base.BUX


def bux(store, *args, check=True, env=None):
    return subprocess.run([BUX, "--store", store, *args], check=check, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})


def mount(store, ref, mnt, *flags, env=None, probe="etc"):
    t = base.Timer()
    bux(store, "mount", "-q", ref, mnt, *flags, env=env)
    os.stat(os.path.join(mnt, probe))
    return t.s()


def umount(store, mnt):
    bux(store, "umount", mnt, check=False)


STORE = None  # this run's store: processes of others are not counted


def bux_pids():
    return base.bux_pids(STORE)


def pss_kib(pids):
    return base.proc_sum(pids, "smaps_rollup", "Pss")


def wait_servers_gone(timeout=20):
    t = time.time()
    while bux_pids() and time.time() - t < timeout:
        time.sleep(0.1)


def many(store, ref, work, n, flags, tag):
    """Mounts n writable mounts; returns (mount times, summed PSS KiB, MemAvailable drop KiB)."""
    base.drop_caches()
    time.sleep(0.5)
    avail0 = base.meminfo("MemAvailable")
    times, mnts = [], []
    for i in range(n):
        m = os.path.join(work, f"{tag}-{i}")
        os.makedirs(m, exist_ok=True)
        times.append(mount(store, ref, m, "--writable", *flags))
        mnts.append(m)
    # Each VM starts: its init reads the same few files.
    for m in mnts:
        for f in ("etc/os-release", "etc/passwd", "bin/sh"):
            try:
                open(os.path.join(m, f), "rb").read()
            except OSError:
                pass
    time.sleep(0.5)
    pss = pss_kib(bux_pids())
    base.drop_caches()
    time.sleep(0.5)
    avail1 = base.meminfo("MemAvailable")
    for m in mnts:
        umount(store, m)
    wait_servers_gone()
    return times, pss, avail0 - avail1


def page_cache(store, ref, work, files, n, flags, tag):
    """Cached (KiB) added by reading `files` through n fresh mounts."""
    mnts = []
    for i in range(n):
        m = os.path.join(work, f"{tag}-pc-{i}")
        os.makedirs(m, exist_ok=True)
        mount(store, ref, m, "--writable", *flags)
        mnts.append(m)
    base.drop_caches()
    time.sleep(0.5)
    c0 = base.meminfo("Cached")
    for m in mnts:
        for f in files:
            open(os.path.join(m, f), "rb").read()
    c1 = base.meminfo("Cached")
    for m in mnts:
        umount(store, m)
    wait_servers_gone()
    return c1 - c0


def cold(cmd):
    """Seconds `cmd` (a command, or a function) takes with the kernel's caches dropped."""
    base.drop_caches()
    t = base.Timer()
    cmd() if callable(cmd) else base.sh(cmd)
    return t.s()


def restart_under_load(store, ref, work, kills):
    """Readers read the whole tree through 4 mounts while the worker is killed `kills` times."""
    mnts = []
    for i in range(4):
        m = os.path.join(work, f"restart-{i}")
        os.makedirs(m, exist_ok=True)
        mount(store, ref, m, *(["--writable"] if i % 2 else []))
        mnts.append(m)
    base.drop_caches()
    procs = [subprocess.Popen(f"tar -C {m} -cf - . | wc -c", shell=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for m in mnts]
    killed = 0
    for _ in range(kills):
        time.sleep(1.5)
        workers = [p for p in bux_pids() if b"--worker-fd" in open(f"/proc/{p}/cmdline", "rb").read()]
        for w in workers:
            os.kill(w, 9)
            killed += 1
    errors = 0
    sizes = []
    for p in procs:
        out, err = p.communicate()
        sizes.append(int(out.strip() or 0))
        errors += len([l for l in err.splitlines() if l.strip()])
    for m in mnts:
        umount(store, m)
    wait_servers_gone()
    return {"killed": killed, "errors": errors, "bytes_equal": len(set(sizes)) == 1, "bytes": sizes[0]}


@contextlib.contextmanager
def small_files_hidden(store):
    """The store as an earlier version left it: no small files' bytes, so a server writes a
    metadata image that redirects every file to FUSE (put back, and that image removed, after)."""
    moved = glob.glob(os.path.join(store, "layers/sha256/*.small")) + \
        glob.glob(os.path.join(store, "trees/sha256/*.erofs"))
    for f in moved:
        os.rename(f, f + ".hidden")
    try:
        yield
    finally:
        for f in glob.glob(os.path.join(store, "trees/sha256/*.erofs")):
            os.remove(f)
        for f in moved:
            os.rename(f + ".hidden", f)


def store_bytes(store, pattern):
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(store, pattern)))


def many_files(reg, work, n_files, runs):
    """Mount latency and a cold find on an image of n_files small files (1000 per directory)."""
    global STORE
    saved, store = STORE, os.path.join(work, "store-synthetic")
    STORE = store
    try:
        ref = reg.push(base.synthetic_layout(work, n_files), "v1", "bench/synthetic")
        bux(store, "pull", "-q", ref)
        keep, m = os.path.join(work, "syn-keep"), os.path.join(work, "syn-m")
        os.makedirs(keep); os.makedirs(m)
        first, first_write, ro, rw, build, finds, ffinds = [], [], [], [], [], [], []
        for _ in range(runs):
            # A first mount whose server writes the metadata image (pull writes it when run as
            # root; an older store's first server does), then one that finds it.
            for f in glob.glob(os.path.join(store, "trees/sha256/*.erofs")):
                os.remove(f)
            base.drop_caches()
            first_write.append(mount(store, ref, keep, env={"RUST_LOG": "info"}, probe="d0000"))
            logged = [l for l in open(glob.glob(os.path.join(store, "shared", "*", "log"))[0])
                      if "metadata image" in l]
            if logged:  # this server's line is the last
                build.append(float(logged[-1].split("written in ")[1].split()[0]) / 1000)
            umount(store, keep)
            wait_servers_gone()
            base.drop_caches()
            first.append(mount(store, ref, keep, probe="d0000"))
            for _ in range(10):
                ro.append(mount(store, ref, m, probe="d0000")); umount(store, m)
                rw.append(mount(store, ref, m, "--writable", probe="d0000")); umount(store, m)
            mount(store, ref, m, "--writable", probe="d0000")
            finds.append(cold(["find", m, "-printf", ""]))
            umount(store, m); umount(store, keep)
            wait_servers_gone()
            mount(store, ref, m, "--writable", env={"BUX_FUSE_METADATA": "fuse"}, probe="d0000")
            ffinds.append(cold(["find", m, "-printf", ""]))
            umount(store, m)
            wait_servers_gone()
        return {"files": n_files, "first": base.stats(first), "first_write": base.stats(first_write),
                "ro": base.stats(ro), "rw": base.stats(rw),
                "image_bytes": store_bytes(store, "trees/sha256/*.erofs"),
                "metadata_image_s": base.stats(build) if build else {"n": 0}, "find": base.stats(finds),
                "find_fuse_metadata": base.stats(ffinds)}
    finally:
        STORE = saved


def synthetic_lines(syn, ms, sec):
    if not syn:
        return []
    return [
        "", f"An image of {syn['files']:,} small files (1000 per directory, one gzip layer), shared server:", "",
        "| measurement | bux-fuse | goal |", "|---|---|---|",
        f"| mount p50, writable | {ms(syn['rw'])} | ≤ 50 ms |",
        f"| mount p50, read-only | {ms(syn['ro'])} | ≤ 50 ms |",
        f"| first mount (starts the server; the metadata image written at pull) | {ms(syn['first'])} | |",
        f"| first mount that writes the metadata image ({syn['image_bytes']/1e6:.0f} MB) | {ms(syn['first_write'])} | |",
        f"| of which writing the EROFS metadata image | {ms(syn['metadata_image_s']) if syn['metadata_image_s']['n'] else 'n/a'} | |",
        f"| find, cold, metadata in the kernel | {sec(syn['find'])} | |",
        f"| find, cold, metadata from FUSE | {sec(syn['find_fuse_metadata'])} | |",
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", required=True)
    ap.add_argument("--tag", default="bookworm")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--synthetic-files", type=int, default=500_000,
                    help="also measure an image of this many small files (0: skip)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bux-density-", dir=os.path.join(base.ROOT, "target"))
    reg = base.Registry(work)
    r = {}
    try:
        ref = reg.push(a.layout, a.tag, "bench/density")
        store = os.path.join(work, "store")
        global STORE
        STORE = store
        bux(store, "pull", "-q", ref)
        images = json.load(open(os.path.join(store, "images.json")))["images"]
        r["store"] = {"layers": sum(l["size"] for l in images[ref]["layers"]),
                      "small": store_bytes(store, "layers/sha256/*.small"),
                      "image": store_bytes(store, "trees/sha256/*.erofs")}
        dest = os.path.join(work, "extracted")
        base.sh([base.EXTRACT, ref, dest])
        probe = os.path.join(work, "probe")
        os.makedirs(probe)

        # Mount latency: the first mount starts the server; later ones stand on it.
        first, ro, rw, own = [], [], [], []
        keep = os.path.join(work, "keep")
        os.makedirs(keep)
        for _ in range(a.runs):
            first.append(mount(store, ref, keep))
            for i in range(20):
                m = os.path.join(work, f"lat-{i}")
                os.makedirs(m, exist_ok=True)
                ro.append(mount(store, ref, m))
                umount(store, m)
                rw.append(mount(store, ref, m, "--writable"))
                umount(store, m)
            umount(store, keep)
            wait_servers_gone()
            for i in range(5):
                m = os.path.join(work, f"lat-{i}")
                own.append(mount(store, ref, m, "--writable", "--own-server"))
                umount(store, m)
        r["mount"] = {"first": base.stats(first), "ro": base.stats(ro), "rw": base.stats(rw),
                      "own_rw": base.stats(own)}
        print("mount", r["mount"], flush=True)

        # Memory of 40 and 100 writable mounts.
        for n in (40, 100):
            times, pss, drop = many(store, ref, work, n, [], f"sh{n}")
            r[f"shared_{n}"] = {"pss_kib": pss, "avail_drop_kib": drop, "mount": base.stats(times)}
            print(n, r[f"shared_{n}"], flush=True)
        times, pss, drop = many(store, ref, work, 40, ["--own-server"], "own40")
        r["own_40"] = {"pss_kib": pss, "avail_drop_kib": drop, "mount": base.stats(times)}
        print("own 40", r["own_40"], flush=True)

        # The same 40 files through 1 and 8 mounts.
        files = [f for f, _ in base.large_files(dest, 64 << 10, limit=40)]
        pc = {}
        for flags, tag in (([], "shared"), (["--own-server"], "own")):
            one = page_cache(store, ref, work, files, 1, flags, tag)
            eight = page_cache(store, ref, work, files, 8, flags, tag)
            pc[tag] = {"one_kib": one, "eight_kib": eight}
        r["page_cache"] = pc
        print("page cache", pc, flush=True)

        # The read path, through a shared writable mount (what a VM gets) vs the extracted tree.
        mnt = os.path.join(work, "vm")
        other = os.path.join(work, "other")
        os.makedirs(mnt); os.makedirs(other)
        big = base.large_files(dest, 1 << 20)
        rnd = random.Random(42)
        picks = [(f, rnd.randrange(0, max(1, s - 131072))) for f, s in (rnd.choice(big) for _ in range(200))]
        finds, nfinds, busy, full, nfull, rr, nrr, ffinds, fulln = [], [], [], [], [], [], [], [], []
        for _ in range(a.runs):
            # The same find with the metadata served by FUSE (the layout before the EROFS image).
            mount(store, ref, mnt, "--writable", env={"BUX_FUSE_METADATA": "fuse"})
            ffinds.append(cold(["find", mnt, "-printf", ""]))
            umount(store, mnt)
            wait_servers_gone()
            mount(store, ref, mnt, "--writable")
            finds.append(cold(["find", mnt, "-printf", ""]))
            nfinds.append(cold(["find", dest, "-printf", ""]))
            full.append(cold(lambda: base.tar_read(mnt)))
            nfull.append(cold(lambda: base.tar_read(dest)))
            base.drop_caches()
            rr.append(statistics.median(base.random_reads(mnt, picks, 131072)))
            base.drop_caches()
            nrr.append(statistics.median(base.random_reads(dest, picks, 131072)))
            # find while another VM reads its whole root.
            mount(store, ref, other, "--writable")
            base.drop_caches()
            reader = subprocess.Popen(f"tar -C {other} -cf - . | wc -c", shell=True, stdout=subprocess.DEVNULL)
            time.sleep(1)
            t = base.Timer(); base.sh(["find", mnt, "-printf", ""]); busy.append(t.s())
            reader.wait()
            umount(store, other)
            umount(store, mnt)
            wait_servers_gone()
            # The full read with small files' data left to FUSE (the layout before .small files).
            with small_files_hidden(store):
                mount(store, ref, mnt, "--writable")
                fulln.append(cold(lambda: base.tar_read(mnt)))
                umount(store, mnt)
                wait_servers_gone()
        r["read"] = {"find": base.stats(finds), "find_native": base.stats(nfinds), "find_busy": base.stats(busy),
                     "find_fuse_metadata": base.stats(ffinds),
                     "full": base.stats(full), "full_native": base.stats(nfull),
                     "full_small_via_fuse": base.stats(fulln),
                     "rand128_p50_ms": statistics.median(rr) , "rand128_native_p50_ms": statistics.median(nrr)}
        print("read", r["read"], flush=True)

        if a.synthetic_files:
            r["synthetic"] = many_files(reg, work, a.synthetic_files, a.runs)
            print("synthetic", r["synthetic"], flush=True)

        r["restart"] = restart_under_load(store, ref, work, 3)
        print("restart", r["restart"], flush=True)
    finally:
        reg.stop()
        for m in os.listdir(work):
            subprocess.run([BUX, "umount", os.path.join(work, m)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    commit = base.sh("git rev-parse --short HEAD", cwd=base.ROOT).stdout.strip()
    json.dump(r, open(os.path.join(base.ROOT, "bench/results-density.json"), "w"), indent=1)
    ms = lambda s: f"{s['median']*1000:.1f} ms ({s['min']*1000:.1f}–{s['max']*1000:.1f})"
    sec = lambda s: f"{s['median']:.3f} s ({s['min']:.3f}–{s['max']:.3f})"
    mib = lambda k: f"{k/1024:.1f} MiB"
    m, rd, pc = r["mount"], r["read"], r["page_cache"]
    lines = [
        "# bux-fuse density results", "",
        f"- date: {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC", f"- commit: {commit}",
        f"- runs: {a.runs}; median (min–max); caches dropped before every cold measurement",
        "- command: `bash bench/density.sh` (large Debian image: 16k inodes, 1.08 GB)", "",
        "Shared = the default for root: one image server per image; its metadata is an EROFS image in the",
        "kernel and its data the one FUSE mount (a data-only overlay layer); a read-only mount binds the",
        "image's read-only overlay, a writable mount is an overlay over both with its own upper layer.",
        "Own = `--own-server`, a daemon per mount (how every mount worked before).", "",
        "| measurement | shared | own server | ratio | goal |", "|---|---|---|---|---|",
        f"| mount p50, writable | {ms(m['rw'])} | {ms(m['own_rw'])} | {m['rw']['median']/m['own_rw']['median']:.2f}× | ≤ 30 ms |",
        f"| mount p50, read-only | {ms(m['ro'])} | | | ≤ 30 ms |",
        f"| first mount (starts the server) | {ms(m['first'])} | | | |",
        f"| PSS of bux-fuse processes, 40 writable mounts | {mib(r['shared_40']['pss_kib'])} | {mib(r['own_40']['pss_kib'])} | {r['shared_40']['pss_kib']/max(1,r['own_40']['pss_kib']):.3f}× | ≤ 150 MB |",
        f"| PSS of bux-fuse processes, 100 writable mounts | {mib(r['shared_100']['pss_kib'])} | | | ≤ 150 MB |",
        f"| MemAvailable drop per mount, 40 mounts | {r['shared_40']['avail_drop_kib']/40/1024:.2f} MiB | {r['own_40']['avail_drop_kib']/40/1024:.2f} MiB | | ≤ 2 MB |",
        f"| MemAvailable drop per mount, 100 mounts | {r['shared_100']['avail_drop_kib']/100/1024:.2f} MiB | | | ≤ 2 MB |",
        f"| page cache: 40 files through 8 mounts vs 1 | {pc['shared']['eight_kib']/max(1,pc['shared']['one_kib']):.2f}× ({mib(pc['shared']['eight_kib'])}) | {pc['own']['eight_kib']/max(1,pc['own']['one_kib']):.2f}× ({mib(pc['own']['eight_kib'])}) | | ≤ 1.5× |",
        "", "Read path through a shared writable mount, against the same tree extracted on the local disk:", "",
        "| measurement | bux-fuse | extracted | ratio | goal |", "|---|---|---|---|---|",
        f"| random 128 KiB read p50, cold | {rd['rand128_p50_ms']:.2f} ms | {rd['rand128_native_p50_ms']:.2f} ms | {rd['rand128_p50_ms']/rd['rand128_native_p50_ms']:.1f}× | ≤ 1.5 ms |",
        f"| find, cold | {sec(rd['find'])} | {sec(rd['find_native'])} | {rd['find']['median']/rd['find_native']['median']:.2f}× | ≤ 1.2× |",
        f"| find, cold, metadata from FUSE (`BUX_FUSE_METADATA=fuse`) | {sec(rd['find_fuse_metadata'])} | {sec(rd['find_native'])} | {rd['find_fuse_metadata']['median']/rd['find_native']['median']:.2f}× | |",
        f"| find, cold, while another mount is read in full | {sec(rd['find_busy'])} | {sec(rd['find_native'])} | {rd['find_busy']['median']/rd['find_native']['median']:.2f}× | |",
        f"| full read (tar), cold | {sec(rd['full'])} | {sec(rd['full_native'])} | {rd['full']['median']/rd['full_native']['median']:.2f}× | ≤ 1.0× |",
        f"| full read (tar), cold, small files through FUSE (no `.small` files, as before) | {sec(rd['full_small_via_fuse'])} | {sec(rd['full_native'])} | {rd['full_small_via_fuse']['median']/rd['full_native']['median']:.2f}× | |",
        "", f"Store: the layers as pulled {r['store']['layers']/1e6:.0f} MB; their small files' bytes "
        f"(`.small`) {r['store']['small']/1e6:.0f} MB; the metadata image (`.erofs`) "
        f"{r['store']['image']/1e6:.0f} MB: {(r['store']['small'] + r['store']['image'])/r['store']['layers']*100:.0f}% more.",
        *synthetic_lines(r.get("synthetic"), ms, sec),
        "", f"Server restart under load: 4 mounts read in full while the worker was killed with -9 "
        f"{r['restart']['killed']} times: **{r['restart']['errors']} errors** seen by the readers; "
        f"all read the same {r['restart']['bytes']} bytes: {r['restart']['bytes_equal']}.", "",
    ]
    open(os.path.join(base.ROOT, "bench/RESULTS-density.md"), "w").write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
