#!/usr/bin/env python3
"""Rootless benchmark: the same image mounted read-only and writable by root and by an ordinary
user, side by side in one run, and a copy-up against `cp` on the same disk. Writes
bench/RESULTS-rootless.md and bench/results-rootless.json. Run through bench/rootless.sh.

Root's writable mount is a kernel overlay over the image mount; a user's is served by bux-fuse
itself (one FUSE hop). Warm = the same walk again with the page cache kept; cold = after
dropping caches. Timings are medians of --runs runs, taken inside the user's own shell so that
`runuser` costs nothing.
"""
import argparse, datetime, json, os, statistics, subprocess, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = "buxfuse-bench"


def sh(cmd, check=True):
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True, errors="replace")


def drop_caches():
    sh("sync")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Side:
    """Runs commands as root or as the bench user, each with its own store."""

    def __init__(self, name, work, bux, as_user):
        self.name, self.as_user = name, as_user
        self.home = os.path.join(work, name)
        os.makedirs(self.home)
        if as_user:
            sh(f"chown {USER}: {self.home}")
        self.bux = f"{bux} --store {self.home}/store"

    def run(self, script, check=True):
        q = script.replace("'", "'\\''")
        wrapped = f"cd {self.home} && {q}"
        if self.as_user:
            return sh(f"runuser -u {USER} -- sh -c '{wrapped}'", check)
        return sh(f"sh -c '{wrapped}'", check)

    def timed(self, script):
        out = self.run(f"a=$(date +%s%N); {script} >/dev/null; b=$(date +%s%N); echo $((b - a))")
        return int(out.stdout.split()[-1]) / 1e9


def median(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True, help="oci:LAYOUT:TAG")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    bux = os.path.join(ROOT, "target/release/bux-fuse")
    work = tempfile.mkdtemp(prefix="bux-rootless-")
    os.chmod(work, 0o755)
    sides = [Side("root", work, bux, False), Side("user", work, bux, True)]
    try:
        run(a, work, sides)
    finally:
        # Whatever a failed run left mounted goes, then the work directory.
        for s in sides:
            s.run(f"{s.bux} umount m", check=False)
        sh(f"rm -rf {work}", check=False)


def run(a, work, sides):
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
        f"{datetime.date.today()}, image `{a.image}`, medians of {a.runs} runs, one machine, one run.",
        f"Root's writable mount: kernel overlay over the image mount; the user's: bux-fuse serves the",
        f"upper layer itself. Large file used for cold reads and copy-up: `{big}`.",
        "",
        "| mount | measure | root | user | user / root |",
        "|---|---|---|---|---|",
    ]
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
