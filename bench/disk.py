#!/usr/bin/env python3
"""Block root benchmark: a QEMU guest (scripts/vm-run.sh, Debian's cloud kernel, software
emulation where no real KVM exists) runs workloads on the same image's tree three ways:

  (a) virtio-fs  root = a read-only bux-fuse mount served by virtiofsd (krun_set_root)
  (b) bux disk   root = DIR/root.erofs of `bux-fuse mount --disk` as a read-only virtio-blk
                 disk, mounted as erofs by the guest (krun_add_disk + krun_set_root_disk_remount)
  (c) floor      root = `mkfs.erofs` of `umoci raw unpack` of the image, a plain file, the same way

Workloads, timed inside the guest, one boot per measurement, host caches dropped and bux-fuse
remounted before each boot (the guest's caches start cold with it): `find / -xdev`, a full read
(`tar -c --one-file-system / | wc -c`: everything but /proc, /sys, /dev) and
`python3 -c "import json, email"`. Medians of --runs.

Host side, on (b): 40 readers of one disk mount's file keep one copy in the page cache (fincore
after 40 parallel whole-file reads against after one), what the server read meanwhile (its
rchar), the server's PSS; the same for 40 disk mounts of the image (a mount per VM); and the
time from `mount --disk` to the disk's first block readable against today's `mount` to a file
readable.

Writes bench/RESULTS-disk.md and bench/results-disk.json. Run through bench/disk.sh.
"""
import argparse, datetime, json, os, shutil, statistics, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as h  # the main harness: bux wrapper, timers, drop_caches  # noqa: E402

VM_RUN = os.path.join(h.ROOT, "scripts/vm-run.sh")
WORKLOADS = {
    "find": "find / -xdev | wc -l",
    "read": "tar -c --one-file-system / 2>/dev/null | wc -c",
    "python": 'python3 -c "import json, email" && echo imported',
}
READY_RUNS = 9  # mounts take tenths of a second: more runs than the guest workloads
WAYS = {"a": "virtio-fs, bux-fuse mount", "b": "virtio-blk, bux-fuse disk", "c": "virtio-blk, mkfs.erofs floor"}


def guest_cmd(work):
    # The guest times its own workload (its clock follows the host's under TCG too).
    return ('s=$(date +%s%N); out=$(' + WORKLOADS[work] + '); rc=$?; e=$(date +%s%N); '
            'echo "BUX-T $(( (e - s) / 1000 )) $rc $out"')


def boot(way, root, work, timeout):
    args = ["bash", VM_RUN]
    if way == "a":
        args += [root]
    else:
        args += ["--disk", root, "--read-only"]
    t = h.Timer()
    r = subprocess.run(args + [guest_cmd(work)], capture_output=True, text=True,
                       env={**os.environ, "BUX_VM_TIMEOUT": str(timeout)})
    wall = t.s()
    for line in r.stdout.splitlines():
        if line.startswith("BUX-T "):
            _, us, rc, *out = line.split()
            if rc != "0":
                raise SystemExit(f"({way}) {work}: exit {rc}: {r.stdout[-2000:]}")
            return int(us) / 1e6, " ".join(out), wall
    raise SystemExit(f"({way}) {work}: no timing from the guest: {r.stdout[-2000:]}{r.stderr[-2000:]}")


def derive_small(large, tag, out):
    """The large image's debootstrap and python3 layers plus its cleanup layer (whiteouts of docs
    and apt lists): a Debian image with python3, as an OCI layout sharing the large one's blobs."""
    blobs = lambda lay, d: os.path.join(lay, "blobs/sha256", d.split(":")[1])
    idx = json.load(open(os.path.join(large, "index.json")))
    d = [m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag][0]
    man = json.load(open(blobs(large, d["digest"])))
    cfg = json.load(open(blobs(large, man["config"]["digest"])))
    keep = [0, 1, len(man["layers"]) - 1]
    os.makedirs(os.path.join(out, "blobs/sha256"), exist_ok=True)
    for i in keep:
        dst = blobs(out, man["layers"][i]["digest"])
        if not os.path.exists(dst):
            os.link(blobs(large, man["layers"][i]["digest"]), dst)
    cfg["rootfs"]["diff_ids"] = [cfg["rootfs"]["diff_ids"][i] for i in keep]
    hist = [x for x in cfg.get("history", []) if not x.get("empty_layer")]
    cfg["history"] = [hist[i] for i in keep] if len(hist) == len(man["layers"]) else []

    def put(obj):
        import hashlib
        b = json.dumps(obj, separators=(",", ":")).encode()
        dig = "sha256:" + hashlib.sha256(b).hexdigest()
        with open(blobs(out, dig), "wb") as f:
            f.write(b)
        return dig, len(b)
    cdig, clen = put(cfg)
    man = {**man, "config": {**man["config"], "digest": cdig, "size": clen},
           "layers": [man["layers"][i] for i in keep]}
    mdig, mlen = put(man)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": mdig, "size": mlen, "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)


def floor_disk(layout, tag, work):
    """(c): mkfs.erofs (defaults: 4 KiB blocks, tails inline) of umoci's unpack; kept in `work`
    across runs of the benchmark, keyed by the layout's index."""
    key = h.sh(["sha256sum", os.path.join(layout, "index.json")]).stdout.split()[0][:12]
    disk = os.path.join(work, f"floor-{key}.erofs")
    if not os.path.exists(disk):
        tree = os.path.join(work, f"tree-{key}")
        shutil.rmtree(tree, ignore_errors=True)
        h.sh(["umoci", "raw", "unpack", "--image", f"{layout}:{tag}", tree])
        h.sh(["mkfs.erofs", disk + ".tmp", tree])
        os.rename(disk + ".tmp", disk)
        shutil.rmtree(tree)
    return disk


def bux_pids(store, serving=None):
    """bux-fuse processes of this store; with `serving`, those serving disks at one of these
    directories: a daemon of their own, or the image's shared disk server (supervisor and
    worker, `serve-shared --disk`), under which root's disk mounts stand."""
    return h.bux_pids(store, lambda args: serving is None or b"--disk" in args and (
        b"serve-shared" in args or any(os.fsencode(d) in args for d in serving)))


def read_all(path):
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return n
            n += len(b)


class Mounts:
    """The image's two bux-fuse roots, (a) a mount and (b) a disk mount, remounted on demand."""

    def __init__(self, store, ref, work):
        self.store, self.ref = store, ref
        self.dirs = {"a": os.path.join(work, "mnt-a"), "b": os.path.join(work, "mnt-b")}
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)

    def mount(self, way):
        self.umount(way)
        extra = ["--disk"] if way == "b" else []
        h.bux(self.store, "mount", "--quiet", *extra, self.ref, self.dirs[way])
        return self.dirs[way] if way == "a" else os.path.join(self.dirs[way], "root.erofs")

    def umount(self, way):
        if os.path.ismount(self.dirs[way]):
            h.umount(self.store, self.dirs[way])


def bench_image(name, layout, tag, work, runs, runs_for, workloads, ways, host, timeout):
    """One image: every workload on every way, then (if `host`) the host-side measures."""
    store = os.path.join(work, f"store-{name}")
    ref = f"oci:{layout}:{tag}"
    h.bux(store, "pull", "--quiet", ref)
    m = Mounts(store, ref, work)
    roots = {"c": floor_disk(layout, tag, work)}
    res = {"image": name, "ref": ref, "floor_bytes": os.path.getsize(roots["c"]), "workloads": {}}
    try:
        for w in workloads:
            # Runs interleave the roots (a, b, c, a, b, c, ...): a shared machine's load drifts.
            n = runs_for.get(w, runs)
            xs, walls, outs = ({way: [] for way in ways} for _ in range(3))
            for i in range(n):
                for way in ways:
                    root = roots["c"] if way == "c" else m.mount(way)
                    h.drop_caches()
                    s, out, wall = boot(way, root, w, timeout)
                    xs[way].append(s); walls[way].append(wall); outs[way].append(out)
                    print(f"  {name} {w} ({way}) run {i + 1}: {s:.2f} s in the guest ({out}), {wall:.1f} s launch to exit",
                          file=sys.stderr)
                    if way != "c":
                        m.umount(way)
            res["workloads"][w] = {way: {**h.stats(xs[way]), "boot_to_exit": h.stats(walls[way]),
                                         "output": sorted(set(outs[way]))} for way in ways}
            seen = {tuple(v["output"]) for v in res["workloads"][w].values()}
            res["workloads"][w]["same_output"] = len(seen) == 1
        if host and "b" in ways:
            res["host"] = host_checks(m, store, runs)
    finally:
        m.umount("a"); m.umount("b")
    return res


def host_checks(m, store, runs):
    out = {}
    runs = max(runs, READY_RUNS)
    # Time to ready: mount --disk to the first block of the disk read, against mount to a file
    # read (each from a fresh mount, caches dropped; the image is in the store).
    ready = {"disk": [], "mount": []}
    for _ in range(runs):
        for kind in ("mount", "disk"):
            way = "b" if kind == "disk" else "a"
            m.umount(way)
            h.drop_caches()
            t = h.Timer()
            root = m.mount(way)
            if kind == "disk":
                with open(root, "rb") as f:
                    assert len(f.read(4096)) == 4096
            else:
                open(os.path.join(root, "etc/os-release"), "rb").read()
            ready[kind].append(t.s())
    out["ready"] = {k: h.stats(v) for k, v in ready.items()}
    # Page cache, one disk mount: one reader of the whole disk, then 40 at once (each its own
    # open, as 40 VMs attaching the same file). What the page cache holds of the disk is read
    # with fincore right after (Cached in /proc/meminfo is machine-wide: other processes' and
    # their drop_caches move it by more than the disk).
    disk = m.mount("b")
    size = os.path.getsize(disk)
    res = {}
    for n in (1, 40):
        m.mount("b")
        h.drop_caches()
        time.sleep(0.5)
        pids = bux_pids(store, [m.dirs["b"]])
        r0 = h.proc_sum(pids, "io", "rchar")
        t = h.Timer()
        with ThreadPoolExecutor(n) as ex:
            got = list(ex.map(lambda _: read_all(disk), range(n)))
        el = t.s()
        resident = fincore([disk])
        assert all(g == size for g in got), f"short reads of the disk: {got}"
        res[n] = {"resident": resident, "server_rchar": h.proc_sum(pids, "io", "rchar") - r0,
                  "seconds": el, "pss_kib": h.proc_sum(pids, "smaps_rollup", "Pss")}
    m.umount("b")
    out["page_cache"] = {"disk_bytes": size, "one": res[1], "forty": res[40]}
    # 40 VMs that each mount the image's disk themselves: 40 mounts, each read (its first
    # PREFIX bytes) once.
    prefix = min(size, 64 << 20)
    dirs = [os.path.join(m.dirs["b"] + f"-{i}") for i in range(40)]
    h.drop_caches()
    time.sleep(0.5)
    try:
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            h.bux(store, "mount", "--quiet", "--disk", m.ref, d)
        pids = bux_pids(store, dirs)
        r0 = h.proc_sum(pids, "io", "rchar")
        files = [os.path.join(d, "root.erofs") for d in dirs]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                left = prefix
                while left:
                    left -= len(fh.read(min(left, 1 << 20)))
        out["forty_mounts"] = {"prefix": prefix, "resident_one": fincore(files[:1]), "resident_all": fincore(files),
                               "server_rchar": h.proc_sum(pids, "io", "rchar") - r0,
                               "pss_kib": h.proc_sum(pids, "smaps_rollup", "Pss"), "processes": len(pids),
                               "inodes": len({(os.stat(f).st_dev, os.stat(f).st_ino) for f in files})}
    finally:
        for d in dirs:
            if os.path.ismount(d):
                h.umount(store, d)
    return out


def fincore(files):
    """Bytes of these files in the page cache, each file counted once (paths through bind
    mounts of one FUSE mount are one inode, one page cache)."""
    seen, uniq = set(), []
    for f in files:
        st = os.stat(f)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            uniq.append(f)
    r = h.sh(["fincore", "-b", "-n", "-o", "RES", *uniq]).stdout.split()
    return sum(int(x) for x in r)


def fmt(s):
    return f"{s['median']:.2f} s ({s['min']:.2f}–{s['max']:.2f})"


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


def report(results, args):
    lines = ["# Block root benchmark (bench/disk.sh)", "",
             f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} cores, "
             f"QEMU {'with KVM' if kvm() else 'with software emulation (TCG), 2 vCPUs'}, Debian's cloud kernel, 512 MiB guest. "
             f"Medians of {args.runs} runs (min–max; {args.runs_for or 'every workload alike'}), timed inside the guest, "
             "one boot per measurement, the roots' runs interleaved, "
             "host caches dropped and bux-fuse remounted before each boot. All three roots read-only "
             "(the workloads only read; a VM would add its overlay, see docs/disk.md).", "",
             "(a) virtio-fs root on a bux-fuse mount (virtiofsd), (b) virtio-blk root on "
             "`bux-fuse mount --disk`'s `root.erofs`, (c) virtio-blk root on `mkfs.erofs` of `umoci raw unpack` "
             "(the floor: a fully written local file).", ""]
    for r in results:
        lines += [f"## {r['image']} (`{r['ref'].split('/')[-1]}`; floor disk {r['floor_bytes'] / 2**20:.0f} MiB)", "",
                  "| workload | (a) virtio-fs | (b) bux disk | (c) mkfs.erofs | (b)/(c) | (a)/(b) |",
                  "|---|---|---|---|---|---|"]
        for w, v in r["workloads"].items():
            cell = lambda k: fmt(v[k]) if k in v else "–"
            ratio = lambda x, y: f"{v[x]['median'] / v[y]['median']:.2f}×" if x in v and y in v else "–"
            same = "" if v.get("same_output") else " (outputs differ!)"
            lines.append(f"| `{WORKLOADS[w].split(' 2>')[0].split(' |')[0].split(' &&')[0]}`{same} | {cell('a')} | "
                         f"{cell('b')} | {cell('c')} | {ratio('b', 'c')} | {ratio('a', 'b')} |")
        outs = "; ".join(f"{w}: {', '.join(v[next(k for k in ('a', 'b', 'c') if k in v)]['output'])}"
                         for w, v in r["workloads"].items())
        lines += ["", f"Guest output (equal across the roots where marked so): {outs}.", ""]
        if "host" in r:
            hh = r["host"]
            pc = hh["page_cache"]
            one, forty = pc["one"], pc["forty"]
            lines += ["Host side, on (b)'s disk:", "",
                      "| measure | value |", "|---|---|",
                      f"| disk size | {pc['disk_bytes'] / 2**20:.0f} MiB |",
                      f"| one disk mount, 1 reader of the whole disk: disk in the page cache (fincore) | "
                      f"{one['resident'] / 2**20:.0f} MiB |",
                      f"| one disk mount, 40 parallel readers (own opens): disk in the page cache | "
                      f"{forty['resident'] / 2**20:.0f} MiB ({forty['resident'] / max(1, one['resident']):.2f}× of one reader) |",
                      f"| bytes the server read from the store, 1 reader / 40 readers | {one['server_rchar'] / 2**20:.0f} MiB / "
                      f"{forty['server_rchar'] / 2**20:.0f} MiB |",
                      f"| whole-disk read, 1 reader / 40 readers | {one['seconds']:.2f} s / {forty['seconds']:.2f} s |",
                      f"| PSS of the server after 1 / 40 readers | {mib(one['pss_kib'])} / {mib(forty['pss_kib'])} |"]
            if "forty_mounts" in hh:
                fm = hh["forty_mounts"]
                lines += [f"| 40 disk mounts of the image (a mount per VM), each read {fm['prefix'] >> 20} MiB: "
                          f"in the page cache | {fm['resident_all'] / 2**20:.0f} MiB ({fm['resident_all'] / max(1, fm['resident_one']):.1f}× of one mount's) |",
                          f"| 40 disk mounts: distinct disk files (inodes), server processes, their PSS, bytes they read | "
                          f"{fm.get('inodes', '?')}, {fm['processes']}, {mib(fm['pss_kib'])}, {fm['server_rchar'] / 2**20:.0f} MiB |"]
            lines += [f"| `mount --disk` to the disk's first 4 KiB read | {fmt(hh['ready']['disk'])} |",
                      f"| `mount` to `/etc/os-release` read | {fmt(hh['ready']['mount'])} |",
                      f"| ratio (disk / mount) | {hh['ready']['disk']['median'] / hh['ready']['mount']['median']:.2f}× |", ""]
    lines += ["## Notes", "",
              "* debian-python is the large image's first two layers (debootstrap minbase, python3) and its "
              "cleanup layer, an OCI layout sharing its blobs (`derive_small` in bench/disk.py). The full read is "
              "measured on it only: on the large image (1.1 GB) it takes minutes per boot under TCG.",
              "* These machines are shared: other builds and tests ran during the runs (load average 4–7 on 2 cores), "
              "and under TCG the guest's timings move by tens of percent between runs; the full read most "
              "(it keeps QEMU, the host's disk and, on (a) and (b), bux-fuse busy). Compare ratios within one run.",
              "* (b)'s disk is bux-fuse's layout (all metadata at the head, every file's data in blocks of its own); "
              "(c) is mkfs.erofs's default (inline tails among the inodes), a little smaller. Cold `find /` reads "
              "only metadata, which is contiguous in (b).",
              "* The server's PSS after a whole-disk read is mostly clean file pages and caches: read by hand from "
              "/proc/PID/smaps on the large image, 15 MiB after the mount, 65 MiB after a whole-disk read: 30 MiB "
              "anonymous (heap, and the 16 MiB span cache, `--cache-mb`), 25 MiB the layers' `.access` indexes "
              "mapped (page cache, shared), 7 MiB the binary.",
              "* A page cache copy belongs to a file (an inode). Root's disk mounts of one image are bind mounts "
              "of one shared disk server's FUSE mount (since 1c52ca7): one inode, one copy, one server for 40 mounts. "
              "Before that commit every `mount --disk` was a FUSE mount and a server of its own: 40 mounts held "
              "40.0× one mount's page cache and 40 servers (1,230–1,260 MiB PSS in all).",
              ""]
    lines += args.notes
    md = "\n".join(lines) + "\n"
    print(md)
    with open(os.path.join(HERE, "RESULTS-disk.md"), "w") as f:
        f.write(md)
    with open(os.path.join(HERE, "results-disk.json"), "w") as f:
        json.dump({"runs": args.runs, "runs_for": args.runs_for, "results": results}, f, indent=1)


def kvm():
    try:
        return any(l.startswith(("kvm_intel ", "kvm_amd ")) for l in open("/proc/modules"))
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--image", action="append", default=[],
                    help="NAME=LAYOUT:TAG[@WORKLOADS] (repeatable; WORKLOADS e.g. find,python, or none; "
                         "default all)")
    ap.add_argument("--small-from", help="LAYOUT:TAG of the large image: derive the small one from it")
    ap.add_argument("--runs-for", default="", help="WORKLOAD=N,... runs of particular workloads (e.g. read=5)")
    ap.add_argument("--ways", default="a,b,c")
    ap.add_argument("--host-image", help="NAME of the image to take the host-side measures on "
                    "(default: the last; `none`: skip them)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds a guest may run")
    ap.add_argument("--work", default=os.path.join(h.ROOT, "target/disk-bench"))
    ap.add_argument("--note", dest="notes", action="append", default=[])
    ap.add_argument("--host-only", action="store_true",
                    help="take the host-side measures again on the last --image and rewrite the report "
                         "with the guest figures of bench/results-disk.json")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if os.geteuid() != 0:
        raise SystemExit("bench/disk.py drops the page cache and boots QEMU: run as root")
    ways = args.ways.split(",")
    runs_for = {k: int(v) for k, v in (x.split("=") for x in args.runs_for.split(",") if x)}
    if "b" in ways and "--disk" not in h.sh([h.BUX, "mount", "--help"]).stdout:
        print("bench: this bux-fuse has no `mount --disk`: (b) left out", file=sys.stderr)
        ways.remove("b")
    specs = list(args.image)
    if args.small_from:
        layout, tag = args.small_from.rsplit(":", 1)
        small = os.path.join(args.work, "layout-small")
        if not os.path.exists(os.path.join(small, "index.json")):
            derive_small(layout, tag, small)
        specs.insert(0, f"debian-python=small:{small}:{tag}")
    if args.host_only:
        prev = json.load(open(os.path.join(HERE, "results-disk.json")))
        name, rest = specs[-1].split("=", 1)
        layout, tag = rest.split("@")[0].rsplit(":", 1)
        store = os.path.join(args.work, f"store-{name}")
        ref = f"oci:{os.path.abspath(layout)}:{tag}"
        h.bux(store, "pull", "--quiet", ref)
        m = Mounts(store, ref, args.work)
        try:
            host = host_checks(m, store, args.runs)
        finally:
            m.umount("a"); m.umount("b")
        for r in prev["results"]:
            r.pop("host", None)
            if r["image"] == name:
                r["host"] = host
        args.runs = prev["runs"]
        args.runs_for = prev.get("runs_for", "")
        report(prev["results"], args)
        return
    results = []
    for spec in specs:
        name, rest = spec.split("=", 1)
        if rest.startswith("small:"):
            rest = rest[len("small:"):]
        workloads = list(WORKLOADS)
        if "@" in rest:
            rest, wl = rest.rsplit("@", 1)
            workloads = [] if wl == "none" else wl.split(",")
        layout, tag = rest.rsplit(":", 1)
        print(f"bench: {name}", file=sys.stderr)
        host = args.host_image == name if args.host_image else spec == specs[-1]
        results.append(bench_image(name, os.path.abspath(layout), tag, args.work, args.runs, runs_for, workloads, ways,
                                   host, args.timeout))
    report(results, args)


if __name__ == "__main__":
    main()
