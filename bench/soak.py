#!/usr/bin/env python3
"""Soak: 64 parallel readers over one read-only mount of the large image for --minutes, with the
kernel's caches dropped every 20 s so that reads keep reaching the daemon. Every whole-file
read is checked against the digest taken in a first pass; ranged reads are checked against the
same bytes of that pass (kept for a sample of files). Samples the daemon's RSS every 5 s.
Writes bench/RESULTS-soak.md and bench/results-soak.json. Run through bench/soak.sh.
"""
import argparse, datetime, hashlib, json, os, random, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUX = os.path.join(ROOT, "target/release/bux-fuse")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import daemon_pid  # noqa: E402

def sh(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def drop_caches():
    subprocess.run("sync", shell=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--readers", type=int, default=64)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bux-soak-")
    store, mnt = os.path.join(work, "store"), os.path.join(work, "m")
    sh(BUX, "--store", store, "-q", "pull", a.image)
    out = sh(BUX, "--store", store, "mount", a.image, mnt)
    pid = daemon_pid(out.stderr, store)
    try:
        run(a, mnt, pid)
    finally:
        subprocess.run([BUX, "--store", store, "umount", mnt], capture_output=True)
        time.sleep(1)
        subprocess.run(["rm", "-rf", work])


def run(a, mnt, pid):
    files = []
    for dp, _, fn in os.walk(mnt):
        for f in fn:
            p = os.path.join(dp, f)
            if os.path.isfile(p) and not os.path.islink(p):
                files.append(p)
    rng = random.Random(7)
    # First pass: a digest of every file; the bytes of a sample of files for ranged reads.
    digests, kept = {}, {}
    sample = set(rng.sample(files, min(400, len(files))))
    for p in files:
        b = open(p, "rb").read()
        digests[p] = hashlib.sha256(b).hexdigest()
        if p in sample and len(b) > 0:
            kept[p] = b
    kept_list = sorted(kept)
    stop = time.monotonic() + a.minutes * 60
    counts = {"whole": 0, "ranged": 0, "bytes": 0, "errors": 0, "mismatches": 0}
    errors = []
    lock = threading.Lock()

    def reader(seed):
        r = random.Random(seed)
        while time.monotonic() < stop:
            try:
                if r.random() < 0.5:
                    p = r.choice(files)
                    b = open(p, "rb").read()
                    ok = hashlib.sha256(b).hexdigest() == digests[p]
                    kind = "whole"
                else:
                    p = r.choice(kept_list)
                    want = kept[p]
                    off = r.randrange(len(want))
                    n = r.choice([4096, 65536, 131072, 1 << 20])
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        b = os.pread(fd, n, off)
                    finally:
                        os.close(fd)
                    ok = b == want[off:off + n]
                    kind = "ranged"
                with lock:
                    counts[kind] += 1
                    counts["bytes"] += len(b)
                    if not ok:
                        counts["mismatches"] += 1
                        errors.append(f"mismatch: {p}")
            except OSError as e:
                with lock:
                    counts["errors"] += 1
                    errors.append(f"{p}: {e}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(a.readers)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples, last_drop = [], t0
    while time.monotonic() < stop:
        time.sleep(5)
        samples.append((round(time.monotonic() - t0), rss_kib(pid)))
        if time.monotonic() - last_drop >= 20:
            drop_caches()
            last_drop = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    rss = [k for _, k in samples]
    half = len(rss) // 2
    first, second = max(rss[:half] or [0]), max(rss[half:] or [0])
    lines = [
        "# Soak: parallel readers over one mount",
        "",
        f"{datetime.date.today()}, image `{a.image}` ({len(files)} files), {a.readers} readers for "
        f"{elapsed / 60:.1f} min, kernel caches dropped every 20 s. Half the reads are whole files "
        "checked against a first pass's sha256, half are 4 KiB-1 MiB ranges checked against that "
        "pass's bytes.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| whole-file reads | {counts['whole']} |",
        f"| ranged reads | {counts['ranged']} |",
        f"| bytes read | {counts['bytes'] / 2**30:.1f} GiB |",
        f"| errors | {counts['errors']} |",
        f"| mismatches | {counts['mismatches']} |",
        f"| daemon RSS, max of first half | {first / 1024:.1f} MiB |",
        f"| daemon RSS, max of second half | {second / 1024:.1f} MiB |",
        f"| daemon RSS, last sample | {rss[-1] / 1024:.1f} MiB |" if rss else "| daemon RSS | - |",
        "",
        "RSS over time (s, MiB): " + ", ".join(f"{s}:{k / 1024:.0f}" for s, k in samples[:: max(1, len(samples) // 20)]),
    ]
    if errors:
        lines += ["", "First errors:", ""] + [f"- {e}" for e in errors[:10]]
    text = "\n".join(lines) + "\n"
    print(text)
    open(os.path.join(ROOT, "bench/RESULTS-soak.md"), "w").write(text)
    json.dump({"counts": counts, "rss_samples_kib": samples, "elapsed_s": elapsed},
              open(os.path.join(ROOT, "bench/results-soak.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
