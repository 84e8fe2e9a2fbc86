//! A fleet behind a pull-through cache: Debian's docker-registry in proxy mode, named as a
//! registries.conf mirror, in front of the origin registry behind a slow link. Five fresh
//! stores mount an image lazily through it, one after another: each one's first reads succeed,
//! and the origin sends each layer once. (The cache answers a range request for a blob it does
//! not hold with the whole blob, copied from the origin while it stores a copy of its own: the
//! lazy path drops that answer, reads the range from the origin, and completes the layer from
//! the cache once it holds it.)

mod common;

use std::process::Output;

use common::*;

fn image() -> Image {
    let l1 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", b"ID=fleet\n")
        .file("usr/lib/one.bin", &test_bytes(3 << 20, 11))
        .finish();
    let l2 = LayerBuilder::new()
        .file("usr/lib/two.bin", &test_bytes(3 << 20, 12))
        .finish();
    let l3 = LayerBuilder::new()
        .file("opt/three.bin", &test_bytes(2 << 20, 13))
        .file("etc/motd", b"through the cache\n")
        .finish();
    Image::new(vec![(l1, Comp::Gzip), (l2, Comp::Gzip), (l3, Comp::Gzip)])
}

fn run(bux: &Bux, home: &std::path::Path, args: &[&str]) -> Output {
    bux.cmd()
        .env("HOME", home)
        .env("CONTAINERS_REGISTRIES_CONF", home.join("registries.conf"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn five_hosts_through_a_pull_through_cache_cost_the_origin_one_copy() {
    let origin = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    write_layout(layout.path(), "v1", &image());
    origin.push(layout.path(), "v1", "fleet/app", None);
    let reference = format!("{}/fleet/app:v1", origin.host());
    let publisher = Bux::new();
    publisher.ok(&["pull", "-q", &reference]);
    publisher.ok(&["push-index", &reference]);
    let layers: u64 = std::fs::read_dir(layout.path().join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .filter(|&l| l > 256 << 10)
        .sum();
    assert!(layers > 3 << 20, "{layers}");

    // The origin behind a slow link (what it sends is counted), the cache in front of it.
    let link = Proxy::start(origin.port, 200, 10);
    let cache = Registry::start_pull_through(&link.host());
    let conf = format!(
        "[[registry]]\nprefix = \"{o}\"\nlocation = \"{o}\"\n[[registry.mirror]]\nlocation = \"{c}\"\n",
        o = origin.host(),
        c = cache.host()
    );
    let mut sent = Vec::new();
    for host in 0..5 {
        let bux = Bux::new();
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("registries.conf"), &conf).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("root");
        let before = link.bytes();
        let out = run(
            &bux,
            home.path(),
            &["mount", "--lazy", &reference, mnt.to_str().unwrap()],
        );
        assert_success(&out);
        let _guard = MountGuard::adopt(mnt.clone(), dir);
        // First commands: a few small files and the start of a large one.
        assert_eq!(
            std::fs::read(mnt.join("etc/motd")).unwrap(),
            b"through the cache\n"
        );
        assert_eq!(
            std::fs::read(mnt.join("etc/os-release")).unwrap(),
            b"ID=fleet\n"
        );
        let mut head = vec![0; 64 << 10];
        std::io::Read::read_exact(
            &mut std::fs::File::open(mnt.join("usr/lib/one.bin")).unwrap(),
            &mut head,
        )
        .unwrap();
        assert_eq!(head, test_bytes(3 << 20, 11)[..64 << 10], "host {host}");
        // Then the rest, completed and verified in the background (waits for the cache).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let images = run(&bux, home.path(), &["images"]);
            let listed = String::from_utf8_lossy(&images.stdout).into_owned();
            if listed.contains("100%") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "host {host} did not complete: {listed}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        for (file, seed, len) in [
            ("usr/lib/one.bin", 11, 3 << 20),
            ("usr/lib/two.bin", 12, 3 << 20),
            ("opt/three.bin", 13, 2 << 20),
        ] {
            let got = std::fs::read(mnt.join(file)).unwrap();
            assert_eq!(got, test_bytes(len, seed), "host {host}: {file}");
        }
        sent.push(link.bytes() - before);
    }
    let total: u64 = sent.iter().sum();
    eprintln!("origin sent per host: {sent:?} (layers: {layers} bytes)");
    // One copy of each layer for the cache, plus the ranges the first host read (with the
    // kernel's read-ahead) before the cache held them, manifests and small blobs, and what the
    // origin sent of the second stream docker-registry's proxy opens to answer each first ask
    // of a blob (whole), until the first host hangs up on it: 1.35–1.65 measured on one
    // machine, 2.04–2.25 on another (the proxy's stream outruns the hang-up), 2.5 when the
    // cache's whole-blob answers were used. Under three copies, not the five the hosts would
    // cost without the cache.
    assert!(
        total < 3 * layers,
        "the origin sent {total} bytes for {layers} bytes of layers: {sent:?}"
    );
    // Hosts after the first cost the origin nothing but manifests.
    for (host, s) in sent.iter().enumerate().skip(1) {
        assert!(*s < 256 << 10, "host {host}: the origin sent {s} bytes");
    }
}
