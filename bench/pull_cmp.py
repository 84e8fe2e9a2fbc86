#!/usr/bin/env python3
"""Pull A/B on one machine: several bux-fuse binaries pull the same image into a fresh store
each, round after round, alternating, so that the load of whatever else runs on the machine
falls on all of them alike. Caches are dropped before every pull. Prints each round and the
medians: wall time, the pull's CPU time (user + system), and how busy the machine was.

  python3 bench/pull_cmp.py ROUNDS NAME=BINARY ... --ref REF [--work DIR] [-- PULL ARGS]

REF is what `bux-fuse pull` takes (a local registry's image: see bench/run.py's Registry).
Needs root (to drop caches).
"""
import os, resource, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R


def busy_ticks():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def main():
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return
    rounds = int(args.pop(0))
    cands, ref, work, extra = [], None, None, []
    while args:
        a = args.pop(0)
        if a == "--ref":
            ref = args.pop(0)
        elif a == "--work":
            work = args.pop(0)
        elif a == "--":
            extra, args = args, []
        else:
            cands.append(a.split("=", 1))
    work = work or tempfile.mkdtemp(prefix="bux-pull-cmp-")
    res = {}
    add = lambda k, v: res.setdefault(k, []).append(v)
    for r in range(rounds):
        add("load (1 min)", os.getloadavg()[0])
        for name, binary in cands:
            store = os.path.join(work, f"store-{name}")
            shutil.rmtree(store, ignore_errors=True)
            R.drop_caches()
            b0, t0 = busy_ticks()
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            subprocess.run([binary, "--store", store, "pull", "-q", *extra, ref], check=True, capture_output=True)
            add(f"{name} pull s", time.perf_counter() - t)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            add(f"{name} CPU s", (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime))
            b1, t1 = busy_ticks()
            add(f"{name} machine busy %", 100 * (b1 - b0) / max(1, t1 - t0))
        print(f"round {r}: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in res.items()), flush=True)
    for name, _ in cands:
        shutil.rmtree(os.path.join(work, f"store-{name}"), ignore_errors=True)
    print("medians (min-max):")
    for k, v in res.items():
        print(f"  {k}: {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f}, n={len(v)})")


if __name__ == "__main__":
    main()
