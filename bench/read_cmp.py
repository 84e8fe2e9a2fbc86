#!/usr/bin/env python3
"""Read-path A/B on one machine: cold full read (`tar -cf - . | wc -c`) and random cold reads
(bench/run.py's picks: 200 reads at random offsets of 64 files >= 1 MiB, seed 42) of root's
shared mount, for several bux-fuse binaries (each with its own store) in turn, round after
round, so that the load of whatever else runs on the machine falls on all of them alike; and
the same reads of a plain tree (e.g. `umoci raw unpack`'s) as the baseline. Caches are dropped
before every cold measurement; each mount is fresh. Prints every round and the medians,
with the image server's CPU time and counters for each full read.

  python3 bench/read_cmp.py ROUNDS NAME=BINARY:STORE ... [--native DIR] [--ref REF] [--as USER]

STOREs are absolute paths.

WHAT=full,rand128,rand4,find picks the measurements (default full,rand128). Needs root.
`--as USER` measures USER's writable mounts instead (issue #20's case: the user's stores, mount
point and binaries must be theirs to use; the server CPU is then that of the user's mount
daemon and of the image server, summed); it measures full and find (the default there).
"""
import glob, os, random, statistics, struct, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return
    rounds = int(args.pop(0))
    ref = "oci:" + os.path.join(ROOT, "target/debian/layout-large") + ":bookworm"
    cands, native, user = [], None, None
    while args:
        a = args.pop(0)
        if a == "--native":
            native = args.pop(0)
        elif a == "--ref":
            ref = args.pop(0)
        elif a == "--as":
            user = args.pop(0)
        else:
            name, rest = a.split("=", 1)
            binary, store = rest.split(":", 1)
            cands.append((name, binary, store))
    what = os.environ.get("WHAT", "full,find" if user else "full,rand128").split(",")
    mnt = os.path.join(ROOT, "target/read-cmp-mnt")
    os.makedirs(mnt, exist_ok=True)
    as_user = ["runuser", "-u", user, "--"] if user else []
    if user:
        mnt = os.path.join(os.path.dirname(os.path.abspath(cands[0][2])), "read-cmp-mnt")
        subprocess.run(as_user + ["mkdir", "-p", mnt], check=True)
        what = [w for w in what if w in ("full", "find")]

    def mount(b, s):
        writable = ["--writable"] if user else []
        subprocess.run(as_user + [b, "--store", s, "mount", *writable, ref, mnt], check=True,
                       capture_output=True)
        subprocess.run(as_user + ["ls", mnt], check=True, capture_output=True)

    def umount(b, s):
        subprocess.run(as_user + [b, "--store", s, "umount", mnt], capture_output=True)
        for _ in range(200):
            if not os.path.ismount(mnt):
                break
            time.sleep(0.02)
        time.sleep(0.3)  # the image server exits: the next mount starts a fresh one

    def counters(s):
        # The shared server's published counters: blob bytes, decompressed, hits, misses.
        for f in glob.glob(f"{s}/shared/*/stats"):
            return struct.unpack("<8Q", open(f, "rb").read()[:64])[1:6]

    def cpu(pid):
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def serving(s):
        # The processes serving the mount: the image server's worker, and a user's mount daemon.
        # (A user's serve-mount has --worker-fd too: R.daemon_pid would take either.)
        pids = []
        for p in os.listdir("/proc"):
            try:
                args = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if os.fsencode(s) not in args:
                continue
            if (b"serve-shared" in args and b"--worker-fd" in args) or (user and b"serve-mount" in args):
                pids.append(int(p))
        if not pids:
            raise RuntimeError("no process serves the mount")
        return pids

    def tar_read():
        if not user:
            return R.tar_read(mnt)
        r = subprocess.run(as_user + ["bash", "-c", 'set -o pipefail; tar -C "$1" -cf - . | wc -c',
                                      "tar_read", mnt], capture_output=True, text=True)
        if r.returncode != 0 or r.stderr.strip():
            raise RuntimeError(f"reading {mnt}: {r.stderr.strip() or f'exit {r.returncode}'}")

    def find():
        subprocess.run(as_user + ["find", mnt, "-printf", ""], check=True)

    picks = {}
    if any(w.startswith("rand") for w in what):
        name, b, s = cands[0]
        mount(b, s)
        files = R.large_files(mnt, 1 << 20)
        umount(b, s)
        rnd = random.Random(42)
        for size in (4096, 131072):
            picks[size] = [(f, rnd.randrange(0, max(1, sz - size))) for f, sz in (rnd.choice(files) for _ in range(200))]

    res = {}
    add = lambda k, v: res.setdefault(k, []).append(v)
    sizes = [sz for sz in (131072, 4096) if f"rand{sz // 1024}" in what]
    for r in range(rounds):
        add("load (1 min)", os.getloadavg()[0])
        for name, b, s in cands:
            if "full" in what:
                mount(b, s)
                R.drop_caches()
                pids = serving(s)
                c0 = sum(map(cpu, pids))
                t = time.perf_counter()
                tar_read()
                add(f"{name} full read s", time.perf_counter() - t)
                add(f"{name} full read, server CPU s", sum(map(cpu, pids)) - c0)
                time.sleep(0.3)
                c = counters(s)
                if c:
                    add(f"{name} full read, inflated MB", c[1] / 1e6)
                umount(b, s)
            if "find" in what:
                mount(b, s)
                R.drop_caches()
                t = time.perf_counter()
                find()
                add(f"{name} find s", time.perf_counter() - t)
                umount(b, s)
            for size in sizes:
                R.drop_caches()
                mount(b, s)
                lat = R.random_reads(mnt, picks[size], size)
                add(f"{name} random {size // 1024} KiB p50 ms", R.pct(lat, 50))
                add(f"{name} random {size // 1024} KiB p90 ms", R.pct(lat, 90))
                umount(b, s)
        if native:
            if "full" in what:
                R.drop_caches()
                t = time.perf_counter()
                R.tar_read(native)
                add("native full read s", time.perf_counter() - t)
            if "find" in what:
                R.drop_caches()
                t = time.perf_counter()
                subprocess.run(["find", native, "-printf", ""], check=True)
                add("native find s", time.perf_counter() - t)
            for size in sizes:
                R.drop_caches()
                add(f"native random {size // 1024} KiB p50 ms", R.pct(R.random_reads(native, picks[size], size), 50))
        print(f"round {r}: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in res.items()), flush=True)
    print("medians (min-max):")
    for k, v in res.items():
        print(f"  {k}: {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f}, n={len(v)})")


if __name__ == "__main__":
    main()
