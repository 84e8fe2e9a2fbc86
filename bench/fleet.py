#!/usr/bin/env python3
"""Fleet benchmark: hosts behind a pull-through cache. The origin registry serves the image
behind the project's slow link (bench/slow_link.rs); Debian's docker-registry in proxy mode
caches it on this side of the link and is named as a registries.conf mirror. Five fresh stores,
one after another, mount the image lazily through it, run the first commands in a chroot,
then wait until every layer is local.

For each host: seconds until the first commands finished, bytes the origin sent by then and in
all (what the slow link carried), and seconds until every layer was local. The origin should
send each layer once (to the cache), plus what the first host read before the cache held it.
Writes bench/RESULTS-fleet.md and bench/results-fleet.json. Run through bench/fleet.sh.
"""
import argparse, datetime, json, os, shutil, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as h  # noqa: E402
from lazy import Proxy, all_local  # noqa: E402


class Cache:
    """docker-registry in proxy mode in front of `remote` (host:port, plain HTTP)."""

    def __init__(self, work, remote):
        os.makedirs(work, exist_ok=True)
        self.port = h.free_port()
        cfg = os.path.join(work, "cache.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {work}/data}}}}\n"
                    f"http: {{addr: 127.0.0.1:{self.port}}}\nproxy: {{remoteurl: 'http://{remote}'}}\n")
        self.proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(1)

    def stop(self):
        self.proc.kill(); self.proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", required=True, help="NAME=LAYOUT:TAG")
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--mbit", type=float, default=200)
    ap.add_argument("--rtt", type=float, default=10)
    ap.add_argument("--cmd", default="python3 -c 'import json'")
    args = ap.parse_args()
    name, rest = args.image.split("=", 1)
    layout, tag = rest.rsplit(":", 1)
    work = tempfile.mkdtemp(prefix="bux-fleet-bench-", dir=os.path.join(h.ROOT, "target"))
    reg = h.Registry(work)
    proxy = cache = None
    hosts = []
    try:
        direct = reg.push(layout, tag, "bench/fleet")
        layers = [l["digest"] for l in h.manifest_layers(layout, tag)]
        compressed = sum(l["size"] for l in h.manifest_layers(layout, tag))
        publisher = tempfile.mkdtemp(prefix="publisher-", dir=work)
        h.bux(publisher, "pull", "--quiet", direct)
        h.bux(publisher, "push-index", direct)
        proxy = Proxy(reg.port, args.mbit, args.rtt)
        origin = f"127.0.0.1:{proxy.port}"
        cache = Cache(os.path.join(work, "cache"), origin)
        ref = direct.replace(f"127.0.0.1:{reg.port}", origin)
        conf = os.path.join(work, "registries.conf")
        with open(conf, "w") as f:
            f.write(f'[[registry]]\nprefix = "{origin}"\nlocation = "{origin}"\n'
                    f'[[registry.mirror]]\nlocation = "127.0.0.1:{cache.port}"\n')
        env = dict(os.environ, CONTAINERS_REGISTRIES_CONF=conf)
        for i in range(args.hosts):
            print(f"bench: host {i + 1}/{args.hosts}", file=sys.stderr)
            store = tempfile.mkdtemp(prefix=f"host{i}-", dir=work)
            mnt = os.path.join(work, f"mnt-{i}")
            os.makedirs(mnt)
            h.drop_caches()
            b0 = proxy.bytes()
            t = h.Timer()
            subprocess.run([h.BUX, "--store", store, "mount", "--quiet", "--lazy", ref, mnt], env=env,
                           check=True, capture_output=True, text=True)
            out = {"ready": t.s()}
            r = subprocess.run(["chroot", mnt, "/bin/sh", "-c", args.cmd], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"host {i}: {args.cmd!r} failed: {r.stderr.strip()}")
            out["first"] = t.s()
            out["first_bytes"] = proxy.bytes() - b0
            while not all_local(store, layers):
                time.sleep(0.1)
            out["local"] = t.s()
            out["origin_bytes"] = proxy.bytes() - b0
            h.umount(store, mnt)
            hosts.append(out)
        report(name, args, compressed, hosts)
    finally:
        for d in os.listdir(work):
            p = os.path.join(work, d)
            if d.startswith("mnt-") and os.path.ismount(p):
                subprocess.run([h.BUX, "umount", p])
        if cache:
            cache.stop()
        if proxy:
            proxy.stop()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(name, args, compressed, hosts):
    mb = lambda b: f"{b / 1e6:.1f} MB"
    total = sum(x["origin_bytes"] for x in hosts)
    lines = [
        f"# Fleet behind a pull-through cache ({datetime.date.today()})", "",
        f"Image `{name}`, {mb(compressed)} of compressed layers. Origin: docker-registry behind the slow link "
        f"(`bench/slow_link.rs`) at {args.mbit:g} Mbit/s, {args.rtt:g} ms RTT; cache: docker-registry in proxy mode "
        "(`proxy.remoteurl`) on this side, named as a registries.conf mirror. Each host is a fresh store: "
        f"`mount --lazy`, then `{args.cmd}` in a chroot (first commands), then every layer local (completed "
        "from the cache). Page cache dropped before each host. One run (`bench/fleet.sh`).", "",
        "| host | ready | first commands | origin bytes by then | all local | origin bytes in all |",
        "|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(hosts):
        lines.append(f"| {i + 1} | {x['ready']:.2f} s | {x['first']:.2f} s | {mb(x['first_bytes'])} | "
                     f"{x['local']:.2f} s | {mb(x['origin_bytes'])} |")
    lines += ["", f"The origin sent {mb(total)} in all: {total / compressed:.2f}× the layers "
              "(one copy to the cache, plus the first host's reads before the cache held them).", ""]
    with open(os.path.join(HERE, "RESULTS-fleet.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(HERE, "results-fleet.json"), "w") as f:
        json.dump({"image": name, "compressed": compressed, "hosts": hosts}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
