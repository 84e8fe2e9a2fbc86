#!/usr/bin/env python3
"""Store budget benchmark (see bench/gc.sh): how long `gc` takes on a store of 50 images, and
what eviction running alongside does to a full read of a mounted image.

Images come from one local OCI layout (no registry): 50 images of a shared base layer and a
layer of their own (random bytes, --unique-mib each), and one larger image to read
(--read-mib over 64 files). Writes bench/RESULTS-gc.md and bench/results-gc.json.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

BIN = os.path.abspath(os.environ.get("BUX_FUSE_BIN", "target/release/bux-fuse"))


def tar_layer(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def put(layout, data):
    h = hashlib.sha256(data).hexdigest()
    p = os.path.join(layout, "blobs/sha256", h)
    if not os.path.exists(p):
        with open(p, "wb") as f:
            f.write(data)
    return "sha256:" + h, len(data)


def add_image(layout, tag, layers, manifests):
    descs, diff_ids = [], []
    for tar in layers:
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        d, n = put(layout, gzip.compress(tar, compresslevel=1, mtime=0))
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()
    cd, cn = put(layout, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
        "layers": descs,
    }).encode()
    md, mn = put(layout, manifest)
    manifests.append({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
        "annotations": {"org.opencontainers.image.ref.name": tag},
        "platform": {"architecture": "amd64", "os": "linux"},
    })


def make_layout(layout, n, unique_mib, read_mib):
    os.makedirs(os.path.join(layout, "blobs/sha256"), exist_ok=True)
    rng = random.Random(1)
    base = tar_layer([("etc/os-release", b"ID=gc-bench\n"), ("usr/lib/base.bin", rng.randbytes(1 << 20))])
    manifests = []
    for i in range(n):
        own = tar_layer([(f"srv/{i}/data.bin", rng.randbytes(unique_mib << 20)),
                         (f"srv/{i}/note.txt", f"image {i}\n".encode())])
        add_image(layout, f"img{i}", [base, own], manifests)
    per = (read_mib << 20) // 64
    big = tar_layer([(f"data/f{k:02}.bin", rng.randbytes(per)) for k in range(64)])
    add_image(layout, "reader", [base, big], manifests)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": manifests}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')


def bux(store, *args, env=None, check=True):
    e = dict(os.environ)
    e.pop("BUX_FUSE_MAX_STORE_SIZE", None)
    e.update(env or {})
    r = subprocess.run([BIN, "--store", store, *args], capture_output=True, text=True, env=e)
    if check and r.returncode != 0:
        sys.exit(f"bux-fuse {' '.join(args)} failed: {r.stderr}")
    return r


def counted(store):
    return json.loads(bux(store, "df", "--json").stdout)["budget"]["counted"]


def drop_caches():
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def full_read(root):
    n = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    n += len(b)
    return n


def med(xs):
    return statistics.median(xs), min(xs), max(xs)


def fmt(t):
    m, lo, hi = t
    return f"{m:.3f} s ({lo:.3f}–{hi:.3f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--unique-mib", type=int, default=8)
    ap.add_argument("--read-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default="target/bench-gc")
    a = ap.parse_args()
    a.work = os.path.abspath(a.work)
    os.makedirs(a.work, exist_ok=True)
    layout = os.path.abspath(os.path.join(a.work, f"layout-{a.images}-{a.unique_mib}-{a.read_mib}"))
    if not os.path.exists(os.path.join(layout, "index.json")):
        t = time.time()
        make_layout(layout, a.images, a.unique_mib, a.read_mib)
        print(f"layout written in {time.time() - t:.1f} s", flush=True)
    ref = lambda tag: f"oci:{layout}:{tag}"
    res = {"args": vars(a)}

    # 1. gc on a store of N images: nothing to do, a dry run, evicting half of them.
    gc_none, gc_dry, gc_half, removed = [], [], [], []
    for run in range(a.runs):
        store = tempfile.mkdtemp(dir=a.work, prefix="store-")
        for i in range(a.images):
            bux(store, "pull", "-q", ref(f"img{i}"))
        total = counted(store)
        # The pulls' writes flushed first: a gc's first fsync would otherwise wait for them.
        subprocess.run(["sync"])
        for out, args in ((gc_none, ["gc"]), (gc_dry, ["gc", "--dry-run", "--max-size", str(total // 2)])):
            t = time.perf_counter()
            bux(store, *args)
            out.append(time.perf_counter() - t)
        n0 = len(bux(store, "images", "-q").stdout.split())
        subprocess.run(["sync"])
        t = time.perf_counter()
        bux(store, "gc", "--max-size", str(total // 2))
        gc_half.append(time.perf_counter() - t)
        removed.append(n0 - len(bux(store, "images", "-q").stdout.split()))
        subprocess.run(["rm", "-rf", store])
        print(f"run {run}: gc {gc_none[-1]:.3f} s, dry run {gc_dry[-1]:.3f} s, "
              f"evicting {removed[-1]} images {gc_half[-1]:.3f} s", flush=True)
    res["store_bytes"] = total
    res["gc_nothing"], res["gc_dry_run"], res["gc_evict_half"] = gc_none, gc_dry, gc_half
    res["evicted"] = removed

    # 2. A cold full read of a mounted image, alone and with eviction churning beside it.
    store = tempfile.mkdtemp(dir=a.work, prefix="store-")
    bux(store, "pull", "-q", ref("reader"))
    base_total = counted(store)
    budget = base_total + 3 * (a.unique_mib << 20)  # room for ~2 more images: every pull evicts
    mnt = tempfile.mkdtemp(dir=a.work, prefix="mnt-")
    bux(store, "mount", "-q", ref("reader"), mnt)
    alone, churned, evictions = [], [], []
    try:
        for run in range(a.runs):
            for mode in ("alone", "eviction"):
                drop_caches()
                stop = threading.Event()
                count = [0]

                def churn():
                    k = 0
                    while not stop.is_set():
                        r = bux(store, "pull", "--max-store-size", str(budget),
                                ref(f"img{k % a.images}"))
                        count[0] += r.stderr.count("store budget")
                        k += 1

                th = None
                if mode == "eviction":
                    th = threading.Thread(target=churn)
                    th.start()
                    time.sleep(0.2)
                t = time.perf_counter()
                n = full_read(mnt)
                dt = time.perf_counter() - t
                if th:
                    stop.set()
                    th.join()
                    evictions.append(count[0])
                    churned.append(dt)
                else:
                    alone.append(dt)
                print(f"run {run} {mode}: {n >> 20} MiB in {dt:.3f} s"
                      + (f" ({count[0]} evicting pulls beside it)" if th else ""), flush=True)
    finally:
        bux(store, "umount", mnt, check=False)
    res["read_bytes"] = n
    res["read_alone"], res["read_with_eviction"], res["evicting_pulls"] = alone, churned, evictions
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res["commit"] = commit
    with open("bench/results-gc.json", "w") as f:
        json.dump(res, f, indent=1)
    size = f"{a.images} images of a shared 1 MiB base layer and {a.unique_mib} MiB of their own"
    lines = [
        "# bux-fuse store budget: gc and eviction",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- commit: {commit}",
        f"- command: `bash bench/gc.sh --images {a.images} --unique-mib {a.unique_mib} "
        f"--read-mib {a.read_mib} --runs {a.runs}`",
        f"- machine: {os.cpu_count()} cores; runs: {a.runs}; median (min–max)",
        f"- store: {size} ({total / (1 << 20):.0f} MiB as the budget counts it), pulled from a "
        "local OCI layout",
        "",
        "| measurement (after `sync`) | time |",
        "|---|---|",
        f"| `gc` (nothing to remove) | {fmt(med(gc_none))} |",
        f"| `gc --dry-run --max-size HALF` | {fmt(med(gc_dry))} |",
        f"| `gc --max-size HALF` (evicts {statistics.median(removed):.0f} images) | {fmt(med(gc_half))} |",
        "",
        f"Full read of a mounted image ({n / (1 << 20):.0f} MiB in 64 files, shared server, page "
        "cache dropped before each read), alone and while another process pulls images with a "
        "budget that makes every pull evict (median "
        f"{statistics.median(evictions):.0f} evicting pulls from 0.2 s before the read to its end):",
        "",
        "| measurement | time |",
        "|---|---|",
        f"| full read, alone | {fmt(med(alone))} |",
        f"| full read, eviction beside it | {fmt(med(churned))} |",
        f"| ratio | {statistics.median(churned) / statistics.median(alone):.2f}× |",
        "",
        "The pulls beside the read also cost CPU (decompressing and indexing each image), on the "
        "same cores: the ratio is an upper bound on what eviction itself costs the read.",
    ]
    with open("bench/RESULTS-gc.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
