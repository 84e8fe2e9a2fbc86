#!/usr/bin/env python3
"""Rootless benchmark: the same image mounted read-only and writable by root and by an ordinary
user, side by side in one run, and a copy-up against `cp` on the same disk. Writes
bench/RESULTS-rootless.md and bench/results-rootless.json. Run through bench/rootless.sh.

Root's writable mount is a kernel overlay over the image mount; a user's is served by bux-fuse
itself (one FUSE hop). Warm = the same walk again with the page cache kept; cold = after
dropping caches. Timings are medians of --runs runs, taken inside the user's own shell so that
`runuser` costs nothing.
"""
import argparse, datetime, json, os, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as base  # noqa: E402  (page cache and PSS sums, large files)
USER = "buxfuse-bench"


def sh(cmd, check=True):
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True, errors="replace")


def drop_caches():
    sh("sync")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def memory_cgroup(name):
    """A memory cgroup (v1, under this process's own) for one side's processes, or None: the
    page cache its processes bring in is charged to it, so a side's page cache is measured
    apart from whatever else the machine does (a global `Cached` delta counts every process's
    files)."""
    try:
        own = next(l.split(":", 2)[2].strip() for l in open("/proc/self/cgroup") if ":memory:" in l)
        path = f"/sys/fs/cgroup/memory{own}/bux-bench-{name}-{os.getpid()}"
        os.makedirs(path, exist_ok=True)
        return path
    except (StopIteration, OSError):
        return None


def cgroup_cache_kib(cg):
    for line in open(os.path.join(cg, "memory.stat")):
        if line.startswith("total_cache "):
            return int(line.split()[1]) // 1024
    return 0


class Side:
    """Runs commands as root or as the bench user, each with its own store (and, where it can,
    in a memory cgroup of its own)."""

    def __init__(self, name, work, bux, as_user):
        self.name, self.as_user = name, as_user
        self.home = os.path.join(work, name)
        os.makedirs(self.home)
        if as_user:
            sh(f"chown {USER}: {self.home}")
        self.bux = f"{bux} --store {self.home}/store"
        self.cgroup = memory_cgroup(name)

    def run(self, script, check=True):
        q = script.replace("'", "'\\''")
        wrapped = f"cd {self.home} && {q}"
        if self.as_user:
            cmd = f"runuser -u {USER} -- sh -c '{wrapped}'"
        else:
            cmd = f"sh -c '{wrapped}'"
        if self.cgroup:
            # The shell moves itself in; what it starts (daemons, image servers) stays there.
            cmd = f"echo $$ > {self.cgroup}/cgroup.procs && exec {cmd}"
        return sh(cmd, check)

    def page_cache_kib(self):
        """The page cache charged to this side's processes, or (no cgroup) the machine's."""
        return cgroup_cache_kib(self.cgroup) if self.cgroup else base.meminfo("Cached")

    def remove_cgroup(self):
        if self.cgroup:
            try:
                os.rmdir(self.cgroup)
            except OSError:
                pass

    def timed(self, script):
        out = self.run(f"a=$(date +%s%N); {script} >/dev/null; b=$(date +%s%N); echo $((b - a))")
        return int(out.stdout.split()[-1]) / 1e9


def median(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True, help="oci:LAYOUT:TAG")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="issue 20's table measured this many times")
    ap.add_argument("--mounts", type=int, default=40, help="writable mounts for the PSS row")
    ap.add_argument("--no-table", action="store_true", help="skip issue 20's side-by-side table")
    a = ap.parse_args()
    bux = os.path.join(ROOT, "target/release/bux-fuse")
    work = tempfile.mkdtemp(prefix="bux-rootless-")
    os.chmod(work, 0o755)
    sides = [Side("root", work, bux, False), Side("user", work, bux, True)]
    try:
        table = None if a.no_table else side_by_side(a, work, sides)
        run(a, work, sides, table)
    finally:
        # Whatever a failed run left mounted goes, then the work directory.
        for s in sides:
            s.run(f"for d in m m-*; do {s.bux} umount $d; done 2>/dev/null", check=False)
        time.sleep(1)
        for s in sides:
            s.remove_cgroup()
        sh(f"rm -rf {work}", check=False)


def bux_pss_kib():
    """PSS of every bux-fuse process on the host (daemons and image servers), KiB."""
    pids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.path.basename(os.readlink(f"/proc/{p}/exe")) == "bux-fuse":
                pids.append(int(p))
        except OSError:
            pass
    return base.proc_sum(pids, "smaps_rollup", "Pss")


def side_by_side(a, work, sides):
    """Issue 20's table, measured `--rounds` times: each cell the median over the rounds (and,
    with more than one, their range). umoci's tree reads a quarter faster or slower from one
    round to the next on these machines, so one round's ratio says little."""
    ts = []
    for i in range(a.rounds):
        if a.rounds > 1:
            print(f"rootless: issue 20's table, round {i + 1} of {a.rounds}", file=sys.stderr)
        ts.append(measure_table(a, work, sides))
    return format_table(a, ts)


def measure_table(a, work, sides):
    """One round of issue 20's table: root and the user, each with writable mounts of the
    image, against the tree unpacked by `umoci raw unpack` on the same disk (the fastest
    honest baseline)."""
    layout, tag = a.image.removeprefix("oci:").rsplit(":", 1)
    tree = os.path.join(work, "umoci")
    sh(f"umoci raw unpack --image {layout}:{tag} {tree}")
    files = [f for f, _ in base.large_files(tree, 64 << 10, limit=40)]
    t = {}

    def cold(side, cmd):
        xs = []
        for _ in range(a.runs):
            drop_caches()
            xs.append(side.timed(cmd) if side else timed_root(cmd))
        return median(xs)

    def timed_root(cmd):
        t0 = time.perf_counter()
        sh(cmd)
        return time.perf_counter() - t0

    full = "tar -C {d} -cf - . | wc -c"
    # What a VMM asks: large reads (cat's 128 KiB), where tar reads 10 KiB at a time.
    full_large = "find {d} -type f -exec cat {{}} + | wc -c"
    find = "find {d} -printf ''"
    t["umoci", "cold full read"] = cold(None, full.format(d=tree))
    t["umoci", "cold full read 128k"] = cold(None, full_large.format(d=tree))
    t["umoci", "cold find"] = cold(None, find.format(d=tree))
    for s in sides:
        s.run(f"{s.bux} -q pull {a.image}")
        # The same 40 large files through 1 and 8 writable mounts: the page cache they add.
        for n in (1, 8):
            for i in range(n):
                s.run(f"mkdir -p m-{i} && {s.bux} -q mount --writable {a.image} m-{i}")
            drop_caches()
            time.sleep(0.5)
            c0 = s.page_cache_kib()
            for i in range(n):
                s.run("cat " + " ".join(f"'m-{i}/{f}'" for f in files) + " >/dev/null")
            t[s.name, f"page cache {n}"] = s.page_cache_kib() - c0
            if n == 8:
                t[s.name, "cold full read"] = cold(s, full.format(d="m-0"))
                t[s.name, "cold full read 128k"] = cold(s, full_large.format(d="m-0"))
                t[s.name, "cold find"] = cold(s, find.format(d="m-0"))
            for i in range(n):
                s.run(f"{s.bux} umount m-{i}")
        # PSS of bux-fuse's processes with --mounts writable mounts standing.
        for i in range(a.mounts):
            s.run(f"mkdir -p m-{i} && {s.bux} -q mount --writable {a.image} m-{i} && ls m-{i} >/dev/null")
        time.sleep(1)
        t[s.name, "pss"] = bux_pss_kib()
        for i in range(a.mounts):
            s.run(f"{s.bux} umount m-{i}")
    sh(f"rm -rf {tree}")
    return t


def format_table(a, ts):
    """The table's lines from one or more rounds' measurements (`measure_table`)."""

    def cell(f, unit=""):
        # The median over the rounds; with more than one, their range after it.
        xs = sorted(f(t) for t in ts)
        mid = median(xs)
        if len(xs) == 1:
            return mid, f"{mid:.2f}{unit}"
        return mid, f"{mid:.2f}{unit} ({xs[0]:.2f}–{xs[-1]:.2f}{unit})"

    pc = lambda n: cell(lambda t: t[n, "page cache 8"] / max(1, t[n, "page cache 1"]), "×")[1]
    vs = lambda n, m: cell(lambda t: t[n, m] / t["umoci", m], "×")[1]
    secs = lambda n, m, f=".2f": f"{median([t[n, m] for t in ts]):{f}} s"
    mib = lambda n, m: median([t[n, m] for t in ts]) / 1024
    pjd = "see [RESULTS-pjdfstest.md](RESULTS-pjdfstest.md) (`scripts/posix-suite.sh`)"
    rounds = f" Medians over {len(ts)} rounds, their range in brackets." if len(ts) > 1 else ""
    return [
        f"Each round: medians of {a.runs} runs.{rounds}",
        "",
        "| | root | user | goal for the user |",
        "|---|---|---|---|",
        f"| page cache, the same 40 files (> 64 KiB) read through 8 writable mounts vs 1 | {pc('root')} "
        f"({mib('root', 'page cache 8'):.0f} MiB) | {pc('user')} ({mib('user', 'page cache 8'):.0f} MiB) | ≤ 1.5× |",
        f"| cold full read (`tar -c . \\| wc -c`) of a writable mount vs umoci's unpack | {vs('root', 'cold full read')} "
        f"({secs('root', 'cold full read')}) | {vs('user', 'cold full read')} ({secs('user', 'cold full read')}) | "
        f"≤ 1.3× (umoci: {secs('umoci', 'cold full read')}) |",
        f"| the same with 128 KiB reads (`find -exec cat`, as a VMM reads) | {vs('root', 'cold full read 128k')} "
        f"({secs('root', 'cold full read 128k')}) | {vs('user', 'cold full read 128k')} ({secs('user', 'cold full read 128k')}) | "
        f"(umoci: {secs('umoci', 'cold full read 128k')}) |",
        f"| cold `find` vs umoci's unpack | {vs('root', 'cold find')} | {vs('user', 'cold find')} | ≤ 1.2× "
        f"(umoci: {secs('umoci', 'cold find', '.3f')}) |",
        f"| bux-fuse PSS, {a.mounts} writable mounts | {mib('root', 'pss'):.1f} MiB | {mib('user', 'pss'):.1f} MiB | ≤ 150 MB |",
        f"| pjdfstest as root inside the writable mount | {pjd} | | 0 |",
    ]


def run(a, work, sides, table):
    for s in sides:
        s.run(f"{s.bux} -q pull {a.image}")
    walks = {
        "find": "find m -printf . | wc -c",
        "full read": "find m -type f -print0 | xargs -0 cat",
    }
    results = {}
    big = None
    for mode in ["read-only", "writable"]:
        for s in sides:
            flag = "--writable" if mode == "writable" else ""
            s.run(f"{s.bux} -q mount {flag} {a.image} m")
            if big is None:
                # The largest file of the image, for the cold sequential read and the copy-up.
                out = s.run("find m -type f -size +20M -printf '%s %P\\n' | sort -n | tail -1")
                big = out.stdout.split(maxsplit=1)[1].strip()
            for name, walk in walks.items():
                s.run(f"{walk} >/dev/null")  # warm the caches
                results[(mode, s.name, f"warm {name}")] = median(
                    [s.timed(walk) for _ in range(a.runs)]
                )
            cold = []
            for _ in range(a.runs):
                drop_caches()
                cold.append(s.timed(f"cat 'm/{big}'"))
            results[(mode, s.name, "cold sequential read")] = median(cold)
            if mode == "writable":
                # Copy-up: the first write to a large image file copies it whole.
                cu, cp = [], []
                for i in range(a.runs):
                    s.run(f"{s.bux} umount m && {s.bux} -q mount --writable {a.image} m")
                    cu.append(s.timed(f"printf x | dd of='m/{big}' bs=1 count=1 conv=notrunc status=none && sync"))
                    cp.append(s.timed(f"cp 'm/{big}' copy-{i} && sync"))
                    s.run(f"rm -f copy-{i}")
                results[(mode, s.name, "copy-up")] = median(cu)
                results[(mode, s.name, "cp of the same file")] = median(cp)
            s.run(f"{s.bux} umount m")
    lines = [
        "# Rootless: the same image as root and as an ordinary user",
        "",
        f"{datetime.date.today()}, image `{a.image}`, medians of {a.runs} runs, one machine.",
        f"Root's writable mount: kernel overlay over the image mount; the user's: bux-fuse serves the",
        f"upper layer itself. Large file used for cold reads and copy-up: `{big}`.",
        "",
    ]
    if table:
        lines += ["## Issue 20's table: root and the user side by side", ""] + table
        lines += ["", "## Each mount kind", ""]
    lines += ["| mount | measure | root | user | user / root |", "|---|---|---|---|---|"]
    keys = []
    for (mode, _, m) in results:
        if (mode, m) not in keys:
            keys.append((mode, m))
    for mode, m in keys:
        r, u = results[(mode, "root", m)], results[(mode, "user", m)]
        lines.append(f"| {mode} | {m} | {r:.3f} s | {u:.3f} s | {u / r:.2f}x |")
    w = lambda m: results[("writable", "user", m)]
    lines += [
        "",
        f"User copy-up vs `cp` of the same file: {w('copy-up') / w('cp of the same file'):.2f}x.",
        "Cold sequential reads may differ where root raises the mount's read-ahead through sysfs",
        "(users keep the kernel's 128 KiB default).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    open(os.path.join(ROOT, "bench/RESULTS-rootless.md"), "w").write(text)
    json.dump(
        {f"{m}|{s}|{k}": v for (m, s, k), v in results.items()},
        open(os.path.join(ROOT, "bench/results-rootless.json"), "w"),
        indent=1,
    )


if __name__ == "__main__":
    main()
