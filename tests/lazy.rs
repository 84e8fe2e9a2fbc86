//! Lazy start end to end: an image pushed to Debian's docker-registry on 127.0.0.1, its index
//! published by one store (`push-index`), mounted by another with `mount --lazy` before any
//! layer is downloaded, read through the kernel. Bytes fetched are counted at a proxy in front
//! of the registry (`common::Proxy`, the slow link of `tests/common/slow_link.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Three layers (gzip, gzip, plain tar) of ~40 MB in all, mostly in a few large files, plus
/// small files like those a boot reads.
fn image() -> Image {
    let mut l1 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", b"NAME=bux-lazy\nID=bux\n")
        .file("etc/hostname", b"lazy\n")
        .dir("usr/lib", 0o755)
        .file("usr/lib/big1.bin", &test_bytes(16 << 20, 1))
        .file_with("usr/bin/sudo", b"#!/bin/sh\n", 0o4755, 0, 0)
        .hardlink("usr/bin/sudo-alias", "usr/bin/sudo")
        .symlink("usr/bin/sh", "busybox");
    for i in 0..40 {
        l1 = l1.file(
            &format!("usr/share/doc/f{i}.txt"),
            format!("doc {i}\n").as_bytes(),
        );
    }
    let l2 = LayerBuilder::new()
        .file("usr/lib/big2.bin", &test_bytes(12 << 20, 2))
        .whiteout("usr/share/doc", "f3.txt")
        .file_xattrs("usr/bin/ping", b"ping\n", &[("user.origin", b"layer2")])
        .finish();
    let l3 = LayerBuilder::new()
        .file("opt/data.bin", &test_bytes(6 << 20, 3))
        .file("etc/motd", b"hello from a lazy layer\n")
        .finish();
    Image::new(vec![
        (l1.finish(), Comp::Gzip),
        (l2, Comp::Gzip),
        (l3, Comp::Plain),
    ])
}

struct Setup {
    reg: Registry,
    layout: tempfile::TempDir,
    /// The publishing store.
    publisher: Bux,
    /// `host/repo:tag` of the pinned (indexed) image.
    pinned: String,
    /// Digest of the original manifest (without the index annotation).
    original: String,
    compressed: u64,
}

fn setup() -> Setup {
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let desc = write_layout(layout.path(), "v1", &image());
    reg.push(layout.path(), "v1", "lazy/app", None);
    let reference = format!("{}/lazy/app:v1", reg.host());
    let publisher = Bux::new();
    publisher.ok(&["pull", "-q", &reference]);
    let out = publisher.ok(&["push-index", &reference]);
    assert!(out.contains("3 layers indexed"), "{out}");
    let compressed = std::fs::read_dir(layout.path().join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .filter(|&l| l > 1 << 20)
        .sum();
    Setup {
        original: desc["digest"].as_str().unwrap().to_string(),
        reg,
        layout,
        publisher,
        pinned: reference,
        compressed,
    }
}

fn lazy_mount(bux: &Bux, reference: &str, extra: &[&str]) -> (MountGuard, String) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    let mut args = vec!["mount", "--lazy", reference, mnt.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = bux.run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "mount --lazy failed: {stderr}");
    (MountGuard::adopt(mnt, dir), stderr)
}

fn through(proxy: &Proxy, reference: &str, reg: &Registry) -> String {
    reference.replace(&reg.host(), &proxy.host())
}

/// Compares the mount with umoci's unpack of `layout:v1` (asserting they are equal); returns
/// treediff's report. umoci does not restore the mtime of implied parents or of a directory
/// it changed: those mtimes are left out.
fn diff_with_umoci(mnt: &Path, layout: &Path) -> String {
    let unpacked = tempfile::tempdir().unwrap();
    umoci_unpack(layout, "v1", &unpacked.path().join("b"));
    let mut args = vec!["--ignore-root"];
    for d in [
        "opt",
        "usr",
        "usr/share",
        "usr/share/doc",
        "usr/bin",
        "usr/lib",
    ] {
        args.extend(["--ignore-mtime-of", d]);
    }
    let (same, diff) = treediff(mnt, &unpacked.path().join("b"), &args);
    assert!(same, "{diff}");
    diff
}

fn cat(path: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(path)
}

#[test]
fn lazy_mount_fetches_only_what_is_read_and_equals_umoci() {
    let s = setup();
    let proxy = Proxy::start(s.reg.port, 10_000, 0);
    let reference = through(&proxy, &s.pinned, &s.reg);
    let bux = Bux::new();
    let (m, stderr) = lazy_mount(&bux, &reference, &["--prefetch", "none"]);
    assert!(!stderr.contains("pulled whole"), "{stderr}");
    // Nothing of the layers is stored: the mount serves from the published index.
    assert!(!bux
        .store
        .path()
        .join("blobs/sha256")
        .read_dir()
        .unwrap()
        .any(|e| { e.unwrap().metadata().unwrap().len() > 1 << 20 }));
    let at_mount = proxy.bytes();
    let os =
        cat(&m.path.join("etc/os-release")).unwrap_or_else(|e| panic!("{e}: {}", bux.daemon_log()));
    assert_eq!(os, b"NAME=bux-lazy\nID=bux\n");
    assert_eq!(
        cat(&m.path.join("etc/motd")).unwrap(),
        b"hello from a lazy layer\n"
    );
    let after_cat = proxy.bytes();
    eprintln!(
        "image {} bytes compressed; fetched {at_mount} to mount, {} more for two small files",
        s.compressed,
        after_cat - at_mount
    );
    assert!(
        after_cat * 20 < s.compressed,
        "fetched {after_cat} of {} bytes (>= 5%) for a mount and two small files",
        s.compressed
    );

    // gc while mounted must not take the partial layers from under the mount.
    bux.ok(&["gc"]);
    // images and df say how much is local.
    let images = bux.ok(&["images"]);
    assert!(
        images.contains("LOCAL") && !images.contains(" 100%"),
        "{images}"
    );
    let df = bux.ok(&["df"]);
    assert!(df.contains("lazily mounted layers fetched so far"), "{df}");

    reads_as_umoci_fetched_once(&m.path, &s, &proxy);
}

/// Every file under `root`, read through the kernel, equals umoci's unpack of the image, and
/// the whole image came through `proxy` about once.
fn reads_as_umoci_fetched_once(root: &Path, s: &Setup, proxy: &Proxy) {
    let diff = diff_with_umoci(root, s.layout.path());
    assert!(diff.contains("0 differences"), "{diff}");
    let total = proxy.bytes();
    assert!(
        total < s.compressed + s.compressed / 10,
        "reading everything fetched {total} bytes for a {} byte image",
        s.compressed
    );
}

#[test]
fn without_a_pinned_index_lazy_pulls_whole_and_says_so() {
    let s = setup();
    // The original manifest has the index only as a referrer: not trusted by default.
    let by_digest = format!("{}/lazy/app@{}", s.reg.host(), s.original);
    let bux = Bux::new();
    let (m, stderr) = lazy_mount(&bux, &by_digest, &[]);
    assert!(stderr.contains("only as a referrer"), "{stderr}");
    assert!(stderr.contains("pulled whole"), "{stderr}");
    assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
    drop(m);

    // Trusted explicitly, the referrer's index is used and the mount is lazy.
    let bux = Bux::new();
    let (m, stderr) = lazy_mount(&bux, &by_digest, &["--trust-index", "--prefetch", "none"]);
    assert!(stderr.contains("trusted by request"), "{stderr}");
    assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
    assert!(bux
        .store
        .path()
        .join("layers/sha256")
        .read_dir()
        .unwrap()
        .any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".partial")));
    drop(m);

    // An image that was never indexed: pulled whole, said so, works.
    let other = tempfile::tempdir().unwrap();
    write_layout(
        other.path(),
        "plain",
        &Image::new(vec![(
            LayerBuilder::new().file("hello", b"world\n").finish(),
            Comp::Gzip,
        )]),
    );
    s.reg.push(other.path(), "plain", "lazy/plain", None);
    let bux = Bux::new();
    let (m, stderr) = lazy_mount(&bux, &format!("{}/lazy/plain:plain", s.reg.host()), &[]);
    assert!(stderr.contains("no bux-fuse index"), "{stderr}");
    assert_eq!(cat(&m.path.join("hello")).unwrap(), b"world\n");
    drop(s.publisher);
}

/// The layer blob stored by the registry, with the largest size (the 16 MiB file's layer).
fn largest_layer_in_registry(reg: &Registry, layout: &Path) -> (String, PathBuf) {
    let (hex, _) = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .max_by_key(|(_, l)| *l)
        .unwrap();
    let path = reg.blob_data_path(&hex);
    (hex, path)
}

/// Flips 64 bytes in the middle of the registry's copy of the largest layer (the big file's
/// compressed data).
fn damage_largest_layer_in_registry(s: &Setup) {
    let (_, path) = largest_layer_in_registry(&s.reg, s.layout.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&path, &bytes).unwrap();
}

#[test]
fn a_corrupted_chunk_is_never_served() {
    let s = setup();
    damage_largest_layer_in_registry(&s);
    let bux = Bux::new();
    let (m, _) = lazy_mount(
        &bux,
        &s.pinned,
        &["--prefetch", "none", "--read-timeout", "3"],
    );
    // The small files (other chunks) read fine; the big file fails rather than lie.
    assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
    let err = cat(&m.path.join("usr/lib/big1.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = bux.daemon_log();
    assert!(log.contains("do not match their published digest"), "{log}");
}

#[test]
fn registry_down_fails_reads_within_the_deadline_and_recovers() {
    let mut s = setup();
    let bux = Bux::new();
    let (m, _) = lazy_mount(
        &bux,
        &s.pinned,
        &["--prefetch", "none", "--read-timeout", "2"],
    );
    assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
    s.reg.stop();
    let t = Instant::now();
    let err = cat(&m.path.join("usr/lib/big2.bin")).unwrap_err();
    let waited = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(waited < Duration::from_secs(15), "EIO after {waited:?}");
    // What is local keeps working meanwhile.
    assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
    s.reg.restart();
    let big2 = cat(&m.path.join("usr/lib/big2.bin")).unwrap();
    assert_eq!(big2, test_bytes(12 << 20, 2));
}

#[test]
fn killed_daemon_keeps_what_it_verified() {
    let s = setup();
    let bux = Bux::new();
    let proxy = Proxy::start(s.reg.port, 10_000, 0);
    let reference = through(&proxy, &s.pinned, &s.reg);
    // A mount of its own (its daemon is what is killed).
    let own = ["--prefetch", "none", "--own-server"];
    let (m, _) = lazy_mount(&bux, &reference, &own);
    assert_eq!(
        cat(&m.path.join("opt/data.bin")).unwrap(),
        test_bytes(6 << 20, 3)
    );
    kill_daemon(&m.path);
    drop(m); // umount of the dead mount
    let before = proxy.bytes();
    let (m, _) = lazy_mount(&bux, &reference, &own);
    assert_eq!(
        cat(&m.path.join("opt/data.bin")).unwrap(),
        test_bytes(6 << 20, 3)
    );
    let again = proxy.bytes() - before;
    assert!(
        again < 64 << 10,
        "{again} bytes fetched again after kill -9"
    );
}

#[test]
fn background_completion_makes_ordinary_layers() {
    let mut s = setup();
    let bux = Bux::new();
    let (m, _) = lazy_mount(&bux, &s.pinned, &["--wait-complete"]);
    drop(m);
    // Each completed layer with small files keeps them once, beside both of its indexes (the
    // image's published one and its own): one file under two names, written to disk as
    // indexing went (a table held in memory is written anew under each name).
    use std::os::unix::fs::MetadataExt;
    let layers = bux.store.path().join("layers/sha256");
    let smalls: Vec<_> = std::fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "small"))
        .collect();
    assert!(
        !smalls.is_empty(),
        "no small files kept in {}",
        layers.display()
    );
    for p in &smalls {
        let meta = std::fs::metadata(p).unwrap();
        assert_eq!(
            meta.nlink(),
            2,
            "{} has {} names",
            p.display(),
            meta.nlink()
        );
    }
    // Damage under one name is damage under both: `check --repair` removes every name of it
    // (mounts then read the layer).
    let len = std::fs::metadata(&smalls[0]).unwrap().len();
    let file = std::fs::File::options()
        .write(true)
        .open(&smalls[0])
        .unwrap();
    file.set_len(len - 1).unwrap();
    let out = bux.run(&["check"]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    bux.ok(&["check", "--repair"]);
    let left = smalls.iter().filter(|p| p.exists()).count();
    assert_eq!(left, smalls.len() - 2, "both names of the damaged file go");
    assert!(bux.ok(&["check"]).contains(": 0 problems"));
    // Every layer is stored whole now: a plain mount works with the registry gone.
    s.reg.stop();
    let m = bux.mount(&s.pinned);
    assert_eq!(
        cat(&m.path.join("usr/lib/big1.bin")).unwrap(),
        test_bytes(16 << 20, 1)
    );
    assert_eq!(
        cat(&m.path.join("etc/motd")).unwrap(),
        b"hello from a lazy layer\n"
    );
}

/// A self-consistent lying index: every chunk digest is right, but the table makes
/// `etc/hostname` setuid root. Found as a referrer it is not used; trusted by request it is
/// served, then caught when the layer completes, and the image is refused from then on.
#[test]
fn a_lying_index_is_refused_unless_trusted_and_caught_at_completion() {
    use bux_fuse::index::blob::LocalBlob;
    use bux_fuse::index::published::PublishedLayer;
    use bux_fuse::index::LayerIndex;
    use std::os::unix::fs::PermissionsExt;

    let s = setup();
    let store = bux_fuse::Store::open(s.publisher.store.path()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.layout.path().join("blobs/sha256").join(&s.original[7..])).unwrap(),
    )
    .unwrap();
    let mut index_layers = Vec::new();
    let mut blobs = Vec::new();
    for l in manifest["layers"].as_array().unwrap() {
        let digest: bux_fuse::Digest = l["digest"].as_str().unwrap().parse().unwrap();
        let idx = LayerIndex::load(&store.index_path(&digest)).unwrap();
        let blob = LocalBlob::open(&store.blob_path(&digest)).unwrap();
        let mut p = PublishedLayer::build(&idx, &blob).unwrap();
        for e in &mut p.entries {
            if e.path == b"etc/hostname" {
                e.mode = 0o4755;
                e.uid = 0;
            }
        }
        let bytes = p.encode().unwrap();
        index_layers.push(serde_json::json!({
            "mediaType": bux_fuse::index::published::MEDIA_TYPE,
            "digest": format!("sha256:{}", sha256_hex(&bytes)),
            "size": bytes.len(),
            "annotations": { bux_fuse::publish::ANNOTATION_LAYER: digest.to_string() },
        }));
        blobs.push(bytes);
    }
    blobs.push(b"{}".to_vec());
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": bux_fuse::publish::ARTIFACT_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                   "digest": format!("sha256:{}", sha256_hex(b"{}")), "size": 2},
        "layers": index_layers,
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": s.original, "size": 0},
    }))
    .unwrap();
    raw_push(
        &s.reg,
        "lazy/app",
        "lying-index",
        &blobs,
        &index,
        "application/vnd.oci.image.manifest.v1+json",
    );
    // Replace the referrers list of the original image with the lying index alone.
    let referrers = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{}", sha256_hex(&index)), "size": index.len(),
                       "artifactType": bux_fuse::publish::ARTIFACT_TYPE}],
    }))
    .unwrap();
    let tag = format!("sha256-{}", &s.original[7..]);
    raw_push(
        &s.reg,
        "lazy/app",
        &tag,
        &[],
        &referrers,
        "application/vnd.oci.image.index.v1+json",
    );

    let by_digest = format!("{}/lazy/app@{}", s.reg.host(), s.original);
    let bux = Bux::new();
    let (m, stderr) = lazy_mount(&bux, &by_digest, &[]);
    assert!(stderr.contains("not trusted"), "{stderr}");
    let mode = std::fs::metadata(m.path.join("etc/hostname"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644, "the untrusted index was used");
    drop(m);

    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    let out = bux.run(&[
        "mount",
        "--lazy",
        "--trust-index",
        "--wait-complete",
        &by_digest,
        mnt.to_str().unwrap(),
    ]);
    let m = MountGuard::adopt(mnt.clone(), dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "completion did not catch the lie: {stderr}"
    );
    assert!(stderr.contains("marked bad"), "{stderr}");
    assert!(stderr.contains("etc/hostname"), "{stderr}");
    drop(m);
    let again = tempfile::tempdir().unwrap();
    // The image as that index describes it is refused from then on. (A plain pull of the
    // manifest would be another view of it — whole, the referrer ignored — and is not.)
    let err = bux.fails(&[
        "mount",
        "--lazy",
        "--trust-index",
        &by_digest,
        again.path().join("r").to_str().unwrap(),
    ]);
    assert!(err.contains("marked bad"), "{err}");
    // Forgotten and pulled again (whole, untrusted referrer ignored), it is the real image.
    bux.ok(&["rm", &by_digest]);
    let m = bux.mount(&by_digest);
    let mode = std::fs::metadata(m.path.join("etc/hostname"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644);
}

/// zstd:chunked (made by skopeo from the gzip image): mounted lazily from its own table of
/// contents with no index pushed; equals umoci's unpack of the gzip original; completes into
/// an ordinary stored layer.
#[test]
fn zstd_chunked_mounts_lazily_from_its_own_table() {
    need("skopeo");
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let gz = work.path().join("gz");
    write_layout(&gz, "v1", &image().as_gzip());
    let zc = zstd_chunked(&gz, &work.path().join("zc"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(zc.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let manifest = std::fs::read_to_string(zc.join("blobs/sha256").join(mdigest)).unwrap();
    assert!(
        manifest.contains("zstd-chunked.manifest-position"),
        "{manifest}"
    );
    reg.push(&zc, "v1", "lazy/chunked", None);
    let proxy = Proxy::start(reg.port, 10_000, 0);
    let reference = format!("{}/lazy/chunked:v1", proxy.host());
    let compressed: u64 = std::fs::read_dir(zc.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .filter(|&l| l > 1 << 20)
        .sum();

    let bux = Bux::new();
    let (m, stderr) = lazy_mount(&bux, &reference, &["--prefetch", "none"]);
    assert!(!stderr.contains("pulled whole"), "{stderr}");
    let os =
        cat(&m.path.join("etc/os-release")).unwrap_or_else(|e| panic!("{e}: {}", bux.daemon_log()));
    assert_eq!(os, b"NAME=bux-lazy\nID=bux\n");
    let fetched = proxy.bytes();
    assert!(
        fetched * 20 < compressed,
        "fetched {fetched} of {compressed} bytes (>= 5%) for a mount and a small file"
    );
    diff_with_umoci(&m.path, &gz);
    drop(m);

    // Completed in the background, verified against blob digest, diff_id and the tar itself.
    let bux = Bux::new();
    let (m, _) = lazy_mount(&bux, &reference, &["--wait-complete"]);
    drop(m);
    drop(proxy);
    drop(reg);
    let m = bux.mount(&reference);
    assert_eq!(
        cat(&m.path.join("usr/lib/big2.bin")).unwrap(),
        test_bytes(12 << 20, 2)
    );
}

/// A read trace recorded on one host (mount --record-trace), published by push-index, is
/// fetched first by a lazy mount elsewhere: the traced files are there before anything reads
/// them, and readable with the registry gone; files off the trace are not.
#[test]
fn a_published_read_trace_is_fetched_first() {
    let mut s = setup();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    s.publisher
        .ok(&["mount", "--record-trace", &s.pinned, mnt.to_str().unwrap()]);
    let m = MountGuard::adopt(mnt, dir);
    assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
    assert_eq!(
        cat(&m.path.join("opt/data.bin")).unwrap(),
        test_bytes(6 << 20, 3)
    );
    drop(m);
    let out = s.publisher.ok(&["push-index", &s.pinned]);
    assert!(out.contains("3 layers indexed"), "{out}");

    let bux = Bux::new();
    let (m, _) = lazy_mount(&bux, &s.pinned, &["--prefetch", "trace"]);
    // The trace is fetched in the background; wait until the partial layers stop growing.
    bux.wait_until_local_bytes_settle(|| "trace prefetch".into());
    s.reg.stop();
    assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
    assert_eq!(
        cat(&m.path.join("opt/data.bin")).unwrap(),
        test_bytes(6 << 20, 3)
    );
    let err = cat(&m.path.join("usr/lib/big2.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

/// A mirror is tried first for everything named by digest: a lazy mount with a mirror fetches
/// the layers' bytes from it (the origin sends only what names the image by tag), and falls
/// back to the origin when the mirror is gone.
#[test]
fn mirrors_serve_blobs_and_the_origin_stays_the_fallback() {
    let s = setup();
    let mirror = Registry::start();
    let copy = Command::new("skopeo")
        .args([
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ])
        .arg(format!("docker://{}", s.pinned))
        .arg(format!("docker://{}/lazy/app:v1", mirror.host()))
        .output()
        .unwrap();
    assert_success(&copy);
    // (The index artifact is not copied: the origin serves it, by digest, after the mirror
    // answers 404 — a fallback exercised on every mount here.)
    let origin = Proxy::start(s.reg.port, 10_000, 0);
    let reference = through(&origin, &s.pinned, &s.reg);
    let bux = Bux::new();
    let (m, _) = lazy_mount(
        &bux,
        &reference,
        &[
            "--prefetch",
            "none",
            "--mirror",
            &mirror.host(),
            "--read-timeout",
            "10",
        ],
    );
    assert_eq!(
        cat(&m.path.join("opt/data.bin")).unwrap(),
        test_bytes(6 << 20, 3)
    );
    let from_origin = origin.bytes();
    assert!(
        from_origin < 1 << 20,
        "{from_origin} bytes came from the origin with a mirror in front"
    );
    drop(mirror);
    assert_eq!(
        cat(&m.path.join("usr/lib/big2.bin")).unwrap(),
        test_bytes(12 << 20, 2)
    );
    assert!(
        origin.bytes() > from_origin + (4 << 20),
        "no fallback to the origin"
    );
}

/// Starts `python3 SCRIPT PORT ARGS...` on a free loopback port and waits until it accepts.
fn python_server(script: &Path, args: &[&std::ffi::OsStr]) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .args(args)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} did not start",
            script.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

/// A registry that answers blob GETs with a redirect (object storage, a CDN): the target is
/// learned once per blob, and the many range requests of a lazy mount go straight to it.
#[test]
fn redirect_targets_are_learned_once_per_blob() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests");
    let script = dir.path().join("redirector.py");
    std::fs::write(
        &script,
        r#"
import http.server, sys
port, target, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(log, "a") as f:
            f.write(self.path + "\n")
        self.send_response(307)
        self.send_header("Location", f"http://{target}{self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()
    do_HEAD = do_GET
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#,
    )
    .unwrap();
    let (mut child, port) = python_server(&script, &[s.reg.host().as_ref(), log.as_os_str()]);
    let reference = s
        .pinned
        .replace(&s.reg.host(), &format!("127.0.0.1:{port}"));
    let bux = Bux::new();
    let (m, _) = lazy_mount(&bux, &reference, &["--prefetch", "none"]);
    let blob_requests = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("/blobs/"))
            .count()
    };
    let spread_reads = |f: &str, len: u64, at: &[u64]| {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(m.path.join(f)).unwrap();
        for &off in at {
            let mut buf = vec![0u8; 4096];
            file.read_exact_at(&mut buf, off.min(len - 4096))
                .unwrap_or_else(|e| panic!("{f}@{off}: {e}: {}", bux.daemon_log()));
        }
    };
    // A first read of each big file: its blob's target is learned (in the background).
    spread_reads("usr/lib/big1.bin", 16 << 20, &[0]);
    spread_reads("usr/lib/big2.bin", 12 << 20, &[0]);
    // Wait for those reads' fetches (and look-ahead) to settle: no new request for a second.
    let mut learned = blob_requests();
    let settle = Instant::now() + Duration::from_secs(15);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = blob_requests();
        if now == learned || Instant::now() > settle {
            break;
        }
        learned = now;
    }
    // More ranges, far apart (each its own fetch): none goes through the registry.
    let mib = 1u64 << 20;
    spread_reads("usr/lib/big1.bin", 16 << 20, &[5 * mib, 10 * mib, 15 * mib]);
    spread_reads("usr/lib/big2.bin", 12 << 20, &[5 * mib, 10 * mib]);
    let after = blob_requests();
    let _ = child.kill();
    assert!(learned > 0);
    assert_eq!(
        after, learned,
        "ranges went through the redirecting registry after their target was learned"
    );
    // The ranges did happen: the layers are partly local.
    let images = bux.ok(&["images"]);
    assert!(!images.contains(" 0%"), "{images}");
}

/// Hardening II, finding 1: an image E (from a registry that lies about a layer's bytes) that
/// lists the layer L of a trusted image V with a forged index of its own (chunk digests of the
/// lie) must not change what V serves. Before the fix E's chunks went into the one partial
/// blob of L, and V, mounted again, served E's bytes; `check` saw nothing.
#[test]
fn another_image_naming_the_same_layer_cannot_change_what_it_serves() {
    use bux_fuse::index::blob::LocalBlob;
    use bux_fuse::index::published::PublishedLayer;
    use bux_fuse::index::Compression;

    let s = setup();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.layout.path().join("blobs/sha256").join(&s.original[7..])).unwrap(),
    )
    .unwrap();
    // L: the plain tar layer (opt/data.bin, etc/motd).
    let l = &manifest["layers"][2];
    let l_digest: bux_fuse::Digest = l["digest"].as_str().unwrap().parse().unwrap();
    let real = std::fs::read(s.layout.path().join("blobs/sha256").join(l_digest.hex())).unwrap();
    let data = test_bytes(6 << 20, 3);
    let at = real
        .windows(64)
        .position(|w| w == &data[4096..4096 + 64])
        .unwrap()
        - 4096;
    let lie = test_bytes(6 << 20, 99);
    let mut forged = real.clone();
    forged[at..at + data.len()].copy_from_slice(&lie);

    // E's index: L's entries, chunk digests of the forged bytes.
    let tmp = tempfile::tempdir().unwrap();
    let forged_path = tmp.path().join("forged");
    std::fs::write(&forged_path, &forged).unwrap();
    let mut idx =
        bux_fuse::index::build(&forged[..], Compression::None, l_digest, None, 0).unwrap();
    idx.compressed_size = forged.len() as u64;
    let published = PublishedLayer::build(&idx, &LocalBlob::open(&forged_path).unwrap()).unwrap();
    let index_blob = published.encode().unwrap();
    let empty = b"{}".to_vec();
    let index_manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": bux_fuse::publish::ARTIFACT_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                   "digest": format!("sha256:{}", sha256_hex(&empty)), "size": 2},
        "layers": [{
            "mediaType": bux_fuse::index::published::MEDIA_TYPE,
            "digest": format!("sha256:{}", sha256_hex(&index_blob)),
            "size": index_blob.len(),
            "annotations": { bux_fuse::publish::ANNOTATION_LAYER: l_digest.to_string() },
        }],
    }))
    .unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&forged))]},
    }))
    .unwrap();
    let e_manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
        "layers": [l.clone()],
        "annotations": { bux_fuse::publish::ANNOTATION_INDEX:
                         format!("sha256:{}", sha256_hex(&index_manifest)) },
    }))
    .unwrap();
    let evil = Registry::start();
    let oci = "application/vnd.oci.image.manifest.v1+json";
    raw_push(
        &evil,
        "evil/app",
        "index",
        &[index_blob, empty],
        &index_manifest,
        oci,
    );
    raw_push(
        &evil,
        "evil/app",
        "v1",
        &[config, real.clone()],
        &e_manifest,
        oci,
    );
    // The lying registry: its copy of L is the forged bytes (same length).
    std::fs::write(evil.blob_data_path(&l_digest.hex()), &forged).unwrap();
    let e_ref = format!("{}/evil/app:v1", evil.host());

    let bux = Bux::new();
    // V, partly fetched.
    let (m, _) = lazy_mount(&bux, &s.pinned, &["--prefetch", "none"]);
    assert_eq!(
        cat(&m.path.join("etc/motd")).unwrap(),
        b"hello from a lazy layer\n"
    );
    drop(m);
    // E serves what its own index vouches for (the lie: that is E's business alone) ...
    let (m, _) = lazy_mount(&bux, &e_ref, &["--prefetch", "none"]);
    assert!(cat(&m.path.join("opt/data.bin")).unwrap() == lie);
    drop(m);
    // ... and V, mounted again, still serves L's real bytes.
    let (m, _) = lazy_mount(&bux, &s.pinned, &["--prefetch", "none"]);
    let got = cat(&m.path.join("opt/data.bin")).unwrap();
    assert!(
        got == data,
        "V served bytes another image's index vouched for"
    );
    drop(m);
    let out = bux.ok(&["check"]);
    assert!(out.contains(": 0 problems"), "{out}");

    // An index file a mount of V reads by that is not what V's published index says (as an
    // earlier version's shared `<L>.idx` could be): `check` names it, `--repair` removes it,
    // and the next mount derives it again from V's index blob.
    let layers = bux.store.path().join("layers/sha256");
    let keyed: Vec<_> = std::fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with(&l_digest.hex()) && n.ends_with(".idx")
        })
        .collect();
    assert_eq!(
        keyed.len(),
        2,
        "one index of L per published index: {keyed:?}"
    );
    let (v_idx, e_idx) = {
        let v_index = bux_fuse::Store::open(bux.store.path())
            .unwrap()
            .image(&s.pinned)
            .unwrap()
            .unwrap()
            .layers[2]
            .index
            .unwrap();
        let v = keyed
            .iter()
            .find(|p| p.to_string_lossy().contains(&v_index.hex()))
            .unwrap()
            .clone();
        let e = keyed.iter().find(|p| **p != v).unwrap().clone();
        (v, e)
    };
    // Entries that differ: E's index says data.bin is setuid.
    let mut tampered = bux_fuse::index::LayerIndex::load(&e_idx).unwrap();
    for e in &mut tampered.entries {
        if e.path.ends_with(b"data.bin") {
            e.mode |= 0o4000;
        }
    }
    tampered.save(&v_idx).unwrap();
    let out = bux.run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a foreign index went unseen: {text}");
    assert!(
        text.contains(&*v_idx.to_string_lossy()) && text.contains("published index"),
        "{text}"
    );
    bux.ok(&["check", "--repair"]);
    let (m, _) = lazy_mount(&bux, &s.pinned, &["--prefetch", "none"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(m.path.join("opt/data.bin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o4000, 0, "the tampered index was served");
    assert!(cat(&m.path.join("opt/data.bin")).unwrap() == data);
}

/// Hardening II, finding 2: background completion skips the chunks fetched before, so a wrong
/// byte among them (here: flipped on disk) must not be promoted into `blobs/` under the
/// layer's digest. Before the fix the damaged file was renamed into place unhashed: `check`
/// found the blob's content wrong and a plain mount served the flipped byte.
#[test]
fn completion_never_promotes_bytes_that_do_not_hash_to_the_layer() {
    let s = setup();
    let bux = Bux::new();
    let (m, _) = lazy_mount(&bux, &s.pinned, &["--prefetch", "none"]);
    let data = test_bytes(6 << 20, 3);
    assert!(cat(&m.path.join("opt/data.bin")).unwrap() == data);
    drop(m);
    // The plain tar layer's partial blob: flip a byte of data.bin in it (a chunk marked present).
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.layout.path().join("blobs/sha256").join(&s.original[7..])).unwrap(),
    )
    .unwrap();
    let hex = manifest["layers"][2]["digest"].as_str().unwrap()[7..].to_string();
    let partial = std::fs::read_dir(bux.store.path().join("layers/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with(&hex) && n.ends_with(".partial") && !n.contains("windows")
        })
        .expect("a partial blob of the plain layer");
    let mut bytes = std::fs::read(&partial).unwrap();
    let at = bytes
        .windows(64)
        .position(|w| w == &data[4096..4096 + 64])
        .unwrap();
    bytes[at + 100] ^= 0x40;
    std::fs::write(&partial, &bytes).unwrap();

    let (m, _) = lazy_mount(&bux, &s.pinned, &["--wait-complete"]);
    drop(m);
    let blob = bux.store.path().join("blobs/sha256").join(&hex);
    assert_eq!(sha256_hex(&std::fs::read(&blob).unwrap()), hex);
    let log = bux.daemon_log();
    assert!(log.contains("does not match the layer digest"), "{log}");
    let out = bux.run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(": 0 problems"),
        "{text}"
    );
    let m = bux.mount(&s.pinned);
    assert!(cat(&m.path.join("opt/data.bin")).unwrap() == data);
}

/// Hardening II, finding 1 (found in review): one manifest stored under two names with two
/// indexes — an honest referrer trusted for V, a forged one (data.bin setuid) trusted for E
/// on another registry. Trees, bad marks and servers are keyed by the manifest and the
/// indexes together, so E neither changes V's tree nor gets V refused when E's lie is caught.
/// Before, E's pull replaced `trees/<manifest>.tree` (V served the setuid bit) and E's
/// completion marked the manifest bad for V too.
/// The image's manifest on another registry (the attacker's), with a forged referrer index
/// that makes `opt/data.bin` setuid; returns the registry and `host/evil/app@<manifest>`.
fn forged_referrer(s: &Setup) -> (Registry, String) {
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.layout.path().join("blobs/sha256").join(&s.original[7..])).unwrap(),
    )
    .unwrap();
    let l_hex = manifest["layers"][2]["digest"].as_str().unwrap()[7..].to_string();
    let evil = Registry::start();
    evil.push(s.layout.path(), "v1", "evil/app", None);
    let attacker = Bux::new();
    let e_tag = format!("{}/evil/app:v1", evil.host());
    attacker.ok(&["pull", "-q", &e_tag]);
    let idx_path = attacker
        .store
        .path()
        .join("layers/sha256")
        .join(format!("{l_hex}.idx"));
    let mut idx = bux_fuse::index::LayerIndex::load(&idx_path).unwrap();
    for e in &mut idx.entries {
        if e.path.ends_with(b"data.bin") {
            e.mode |= 0o4000;
        }
    }
    idx.save(&idx_path).unwrap();
    attacker.ok(&["push-index", &e_tag]);
    let e_ref = format!("{}/evil/app@{}", evil.host(), s.original);
    (evil, e_ref)
}

#[test]
fn one_manifest_under_two_indexes_keeps_them_apart() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup();
    let (_evil, e_ref) = forged_referrer(&s);
    let bux = Bux::new();
    let v_ref = format!("{}/lazy/app@{}", s.reg.host(), s.original);
    let mode = |m: &MountGuard| {
        std::fs::metadata(m.path.join("opt/data.bin"))
            .unwrap()
            .permissions()
            .mode()
    };
    let (m, _) = lazy_mount(&bux, &v_ref, &["--trust-index", "--prefetch", "none"]);
    assert_eq!(mode(&m) & 0o4000, 0);
    drop(m);
    let (m, _) = lazy_mount(&bux, &e_ref, &["--trust-index", "--prefetch", "none"]);
    assert_eq!(
        mode(&m) & 0o4000,
        0o4000,
        "E serves what its own index says"
    );
    drop(m);
    let (m, _) = lazy_mount(&bux, &v_ref, &["--trust-index", "--prefetch", "none"]);
    assert_eq!(
        mode(&m) & 0o4000,
        0,
        "V serves another image's forged index"
    );
    drop(m);
    // E's lie is caught at completion: E alone is refused from then on.
    let dir = tempfile::tempdir().unwrap();
    let out = bux.run(&[
        "mount",
        "--lazy",
        "--trust-index",
        "--wait-complete",
        &e_ref,
        dir.path().join("e").to_str().unwrap(),
    ]);
    let _e = MountGuard::adopt(dir.path().join("e"), tempfile::tempdir().unwrap());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("marked bad"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(_e);
    let (m, _) = lazy_mount(&bux, &v_ref, &["--trust-index", "--prefetch", "none"]);
    assert_eq!(mode(&m) & 0o4000, 0);
    assert!(cat(&m.path.join("opt/data.bin")).unwrap() == test_bytes(6 << 20, 3));
}

/// A user's writable lazy mount served by one FUSE worker: a copy-up (a write to an image file)
/// and a read, both waiting for bytes from a stalled registry, hold up nothing else — lookups,
/// stats, listings and new files answer at once — and both complete with the right bytes once
/// the registry answers.
#[test]
fn a_copy_up_waiting_for_the_registry_holds_up_nothing_else() {
    need("fusermount3");
    let s = setup();
    let proxy = Proxy::start(s.reg.port, 10_000, 0);
    let reference = through(&proxy, &s.pinned, &s.reg);
    let user = std::sync::Arc::new(AsUser::new());
    let out = user.ok(&format!(
        "$BUX -q mount --lazy --writable --prefetch none --threads 1 --read-timeout 60 \
         {reference} m && cat m/etc/hostname"
    ));
    assert_eq!(out, "lazy\n");
    let in_background = |script: &'static str| {
        let user = user.clone();
        std::thread::spawn(move || user.sh(script))
    };
    // Unrelated requests, each path looked up for the first time; they must answer within 5 s
    // (the registry is unpaused either way, so a failure does not hang).
    let others_answer = |round: u32| {
        let user = user.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let out = user.sh(&format!(
                "stat -c %s m/etc/os-release m/usr/bin/sudo-alias >/dev/null && \
                 ls m/usr/share/doc m/opt m/usr/bin >/dev/null && cat m/etc/hostname && \
                 mkdir m/dir{round} && echo {round} > m/dir{round}/new && cat m/dir{round}/new"
            ));
            let _ = tx.send(out);
        });
        let t = Instant::now();
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(out) => {
                assert_success(&out);
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    format!("lazy\n{round}\n")
                );
            }
            Err(_) => {
                proxy.unpause();
                panic!(
                    "round {round}: other requests blocked for {:?}",
                    t.elapsed()
                );
            }
        }
    };
    proxy.pause();
    let writer = in_background("echo tail >> m/usr/lib/big1.bin");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !writer.is_finished(),
        "the copy-up did not wait for the registry"
    );
    others_answer(1);
    let reader = in_background("sha256sum < m/opt/data.bin");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !reader.is_finished(),
        "the read did not wait for the registry"
    );
    others_answer(2);
    proxy.unpause();
    assert_success(&writer.join().unwrap());
    let read = reader.join().unwrap();
    assert_success(&read);
    assert!(
        String::from_utf8_lossy(&read.stdout).starts_with(&sha256_hex(&test_bytes(6 << 20, 3))),
        "{read:?}"
    );
    let mut big1 = test_bytes(16 << 20, 1);
    big1.extend_from_slice(b"tail\n");
    let out = user.ok("sha256sum < m/usr/lib/big1.bin && $BUX umount m");
    assert!(out.starts_with(&sha256_hex(&big1)), "{out}");
}

/// Found in review of #19.2: two mounts of one image completing it at once. One completes
/// each layer while the other waits for it, then finds the layer whole: the image is fetched
/// about once, no completion retries, and the store checks clean. Before, the second
/// process's rename failed (the first had moved the file), it retried, streamed every layer
/// again and wrote into the promoted blob (71 MB fetched for a 21 MB image).
#[test]
fn two_mounts_completing_at_once_fetch_the_image_once() {
    let s = setup();
    let proxy = Proxy::start(s.reg.port, 200, 0);
    let reference = through(&proxy, &s.pinned, &s.reg);
    let bux = Bux::new();
    let (m1, _) = lazy_mount(&bux, &reference, &["--prefetch", "none"]);
    drop(m1);
    let before = proxy.bytes();
    let (r1, store) = (reference.clone(), bux.store.path().to_path_buf());
    let other = std::thread::spawn(move || {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("root");
        let out = Command::new(env!("CARGO_BIN_EXE_bux-fuse"))
            .arg("--store")
            .arg(&store)
            .args(["mount", "--lazy", "--wait-complete", &r1])
            .arg(&mnt)
            .output()
            .unwrap();
        (MountGuard::adopt(mnt, dir), out)
    });
    let (m2, _) = lazy_mount(&bux, &reference, &["--wait-complete"]);
    let (m1, out) = other.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fetched = proxy.bytes() - before;
    let log = bux.daemon_log();
    assert!(!log.contains("attempt"), "{log}");
    assert!(
        fetched < s.compressed * 3 / 2,
        "{fetched} bytes fetched for a {} byte image",
        s.compressed
    );
    drop((m1, m2));
    let out = bux.run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(": 0 problems"),
        "{text}"
    );
}

/// Found in review of #19.2: `mount --wait-complete` returns, with the reason, once the
/// background completion gives up (here the registry's copy of a layer is damaged), instead
/// of waiting for good; the mount stays up.
#[test]
fn wait_complete_returns_when_completion_gives_up() {
    let s = setup();
    damage_largest_layer_in_registry(&s);
    let bux = Bux::new();
    let (store, r) = (bux.store.path().to_path_buf(), s.pinned.clone());
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    let m2 = mnt.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_bux-fuse"))
            .arg("--store")
            .arg(&store)
            .args(["mount", "--lazy", "--wait-complete", &r])
            .arg(&m2)
            .output()
            .unwrap();
        let _ = tx.send(out);
    });
    let got = rx.recv_timeout(Duration::from_secs(90));
    let m = MountGuard::adopt(mnt, dir);
    let out = got.expect("mount --wait-complete still waiting after completion gave up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("completing the image gave up"), "{stderr}");
    assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
}

/// Found in review of #19.1: a store from before lazy indexes were keyed by their published
/// index (`<L>.idx`, `<L>.partial`, ... for a lazily pulled image) checks clean before any
/// mount, and mounts as before. Before, `check` reported every lazy layer's keyed index
/// missing until the image had been mounted once.
#[test]
fn an_older_stores_lazy_image_checks_and_mounts() {
    let s = setup();
    let bux = Bux::new();
    let (m, _) = lazy_mount(&bux, &s.pinned, &["--prefetch", "none"]);
    assert_eq!(
        cat(&m.path.join("etc/motd")).unwrap(),
        b"hello from a lazy layer\n"
    );
    drop(m);
    // Back to the older names: <L>.<I>.x -> <L>.x
    let dir = bux.store.path().join("layers/sha256");
    let mut renamed = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let parts: Vec<&str> = n.splitn(3, '.').collect();
        if parts.len() == 3 && parts[1].len() == 64 {
            std::fs::rename(e.path(), dir.join(format!("{}.{}", parts[0], parts[2]))).unwrap();
            renamed += 1;
        }
    }
    assert!(renamed >= 6, "{renamed}");
    let out = bux.run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(": 0 problems"),
        "{text}"
    );
    let (m, _) = lazy_mount(&bux, &s.pinned, &["--prefetch", "none"]);
    assert_eq!(
        cat(&m.path.join("opt/data.bin")).unwrap(),
        test_bytes(6 << 20, 3)
    );
    drop(m);
    // The older, unkeyed partial files go at gc (no mount holds them).
    bux.ok(&["gc"]);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.split('.')
                .nth(1)
                .is_some_and(|x| x == "partial" || x == "present" || x == "windows")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Found in review of #19.1: an image whose forged index names a layer another image already
/// completed (so it is never streamed again) is still compared with that layer's own index
/// at its next mount, refused and marked bad; `check` names the mismatch too. Before, the
/// lie was served for good (its completion found the blob whole and returned). (An image
/// pulled lazily after its layers are whole is not lazy at all: its index is not used.)
#[test]
fn a_forged_index_for_a_layer_already_whole_is_caught() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup();
    let (_evil, e_ref) = forged_referrer(&s);
    let bux = Bux::new();
    let v_ref = format!("{}/lazy/app@{}", s.reg.host(), s.original);
    // E, lazily, nothing completed: it serves its lie (its own business so far) ...
    let (m, _) = lazy_mount(&bux, &e_ref, &["--trust-index", "--prefetch", "none"]);
    let mode = std::fs::metadata(m.path.join("opt/data.bin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o4000, 0o4000);
    drop(m);
    // ... then V completes every layer (E's, too).
    let (m, _) = lazy_mount(&bux, &v_ref, &["--trust-index", "--wait-complete"]);
    drop(m);
    let out = bux.run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("is whole and not what the image's published index"),
        "{text}"
    );
    // E's next mount finds its layers whole and compares: refused, and marked bad.
    let dir = tempfile::tempdir().unwrap();
    let err = bux.fails(&[
        "mount",
        "--lazy",
        "--trust-index",
        &e_ref,
        dir.path().join("e").to_str().unwrap(),
    ]);
    assert!(err.contains("marked bad") || err.contains("bad"), "{err}");
    assert!(err.contains("data.bin"), "{err}");
    // V is served as ever.
    let (m, _) = lazy_mount(&bux, &v_ref, &["--trust-index", "--prefetch", "none"]);
    assert!(cat(&m.path.join("opt/data.bin")).unwrap() == test_bytes(6 << 20, 3));
}

/// Found in review of #19.15: a zstd:chunked layer whose table of contents is past this
/// version's bounds (thousands of sequentially named empty files compress their TOC ~190×,
/// beyond the 64× a published index may inflate) is pulled whole, and the image mounts lazily
/// all the same, saying so. Before, `mount --lazy` failed outright.
#[test]
fn a_zstd_chunked_table_past_the_bounds_costs_its_layer_laziness_not_the_mount() {
    need("skopeo");
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut many = LayerBuilder::new().dir("many", 0o755);
    for i in 0..8000 {
        many = many.file(&format!("many/f{i:06}"), b"");
    }
    let other = LayerBuilder::new()
        .file("etc/motd", b"still lazy\n")
        .file("big.bin", &test_bytes(4 << 20, 5))
        .finish();
    let gz = work.path().join("gz");
    write_layout(
        &gz,
        "v1",
        &Image::new(vec![(many.finish(), Comp::Gzip), (other, Comp::Gzip)]),
    );
    let zc = zstd_chunked(&gz, &work.path().join("zc"));
    reg.push(&zc, "v1", "lazy/many", None);
    let reference = format!("{}/lazy/many:v1", reg.host());
    let bux = Bux::new();
    let (m, stderr) = lazy_mount(&bux, &reference, &["--prefetch", "none"]);
    assert!(
        stderr.contains("zstd:chunked table was not used") && stderr.contains("pulled whole"),
        "{stderr}"
    );
    assert_eq!(cat(&m.path.join("etc/motd")).unwrap(), b"still lazy\n");
    assert_eq!(
        std::fs::read_dir(m.path.join("many")).unwrap().count(),
        8000
    );
    assert!(cat(&m.path.join("big.bin")).unwrap() == test_bytes(4 << 20, 5));
}

/// `mount --disk --lazy`: the disk is served before any layer is downloaded; a guest's (here
/// the host kernel's, through a loop device) reads of the EROFS image fetch only what they
/// touch, and the whole tree read through it equals umoci's unpack.
#[test]
fn a_lazy_disk_fetches_what_is_read_and_equals_umoci() {
    need("fsck.erofs");
    let s = setup();
    let proxy = Proxy::start(s.reg.port, 10_000, 0);
    let reference = through(&proxy, &s.pinned, &s.reg);
    let bux = Bux::new();
    let (m, stderr) = lazy_mount(&bux, &reference, &["--disk", "--prefetch", "none"]);
    assert!(!stderr.contains("pulled whole"), "{stderr}");
    let at_mount = proxy.bytes();
    let loop_dir = tempfile::tempdir().unwrap();
    let root = LoopMount::erofs(&m.path.join("root.erofs"), loop_dir.path());
    let os =
        cat(&root.0.join("etc/os-release")).unwrap_or_else(|e| panic!("{e}: {}", bux.daemon_log()));
    assert_eq!(os, b"NAME=bux-lazy\nID=bux\n");
    assert_eq!(
        std::fs::read_dir(root.0.join("usr/share/doc"))
            .unwrap()
            .count(),
        39
    );
    let first = proxy.bytes();
    eprintln!(
        "image {} bytes compressed; fetched {at_mount} to mount, {first} after a lookup, a \
         directory listing and a small file",
        s.compressed
    );
    assert!(
        first * 20 < s.compressed,
        "fetched {first} of {} bytes (>= 5%) for a mount and a small file",
        s.compressed
    );
    reads_as_umoci_fetched_once(&root.0, &s, &proxy);
}

/// A disk never serves a block whose bytes do not match the published digests: the kernel
/// reading it gets EIO, and the log names the chunk.
#[test]
fn a_corrupted_chunk_is_never_served_on_a_disk() {
    let s = setup();
    damage_largest_layer_in_registry(&s);
    let bux = Bux::new();
    let (m, _) = lazy_mount(
        &bux,
        &s.pinned,
        &["--disk", "--prefetch", "none", "--read-timeout", "3"],
    );
    let loop_dir = tempfile::tempdir().unwrap();
    let root = LoopMount::erofs(&m.path.join("root.erofs"), loop_dir.path());
    assert_eq!(cat(&root.0.join("etc/hostname")).unwrap(), b"lazy\n");
    let err = cat(&root.0.join("usr/lib/big1.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = bux.daemon_log();
    assert!(log.contains("do not match their published digest"), "{log}");
}

/// A read of a lazy disk's blocks that waits for the registry holds up nothing else: with one
/// FUSE worker, the metadata and the mount's directory still answer while it waits.
#[test]
fn a_disk_read_waiting_for_the_registry_holds_up_nothing_else() {
    let s = setup();
    let proxy = Proxy::start(s.reg.port, 10_000, 0);
    let reference = through(&proxy, &s.pinned, &s.reg);
    let bux = Bux::new();
    let (m, _) = lazy_mount(
        &bux,
        &reference,
        &[
            "--disk",
            "--prefetch",
            "none",
            "--threads",
            "1",
            "--read-timeout",
            "60",
        ],
    );
    let disk = m.path.join("root.erofs");
    let len = std::fs::metadata(&disk).unwrap().len();
    proxy.pause();
    // The image's last MiB: file data (the plain layer's, fetched by range).
    let reader = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            let f = std::fs::File::open(disk).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, len - (1 << 20)).map(|_| buf)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !reader.is_finished(),
        "the read did not wait for the registry"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (disk, dir) = (disk.clone(), m.path.clone());
        std::thread::spawn(move || {
            let f = std::fs::File::open(&disk).unwrap();
            let mut head = [0u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
            let listed = std::fs::read_dir(dir).unwrap().count();
            let _ = tx.send((head[1024..1028].to_vec(), listed));
        });
    }
    let answer = rx.recv_timeout(Duration::from_secs(5));
    proxy.unpause();
    let (magic, listed) = answer.expect("the superblock and the listing waited behind the read");
    assert_eq!(magic, 0xE0F5_E1E2u32.to_le_bytes());
    assert_eq!(listed, 1);
    let tail = reader.join().unwrap().unwrap();
    assert!(tail.iter().any(|b| *b != 0), "the file data read as zeros");
}

/// One manifest, one disk: a lazy `mount --disk` (from a published index, and from
/// zstd:chunked tables of contents) serves byte for byte what `export --erofs` of a whole pull
/// in another store writes.
#[test]
fn a_lazy_disk_has_the_bytes_of_a_whole_pulls_export() {
    need("skopeo");
    let s = setup();
    let work = tempfile::tempdir().unwrap();
    let zc = zstd_chunked(s.layout.path(), &work.path().join("zc"));
    s.reg.push(&zc, "v1", "lazy/disk-chunked", None);
    let chunked = format!("{}/lazy/disk-chunked:v1", s.reg.host());
    for reference in [&s.pinned, &chunked] {
        let whole = Bux::new();
        let file = work.path().join("whole.erofs");
        whole.ok(&["export", "--erofs", reference, file.to_str().unwrap()]);
        let want = std::fs::read(&file).unwrap();
        let bux = Bux::new();
        let (m, stderr) = lazy_mount(&bux, reference, &["--disk", "--prefetch", "none"]);
        assert!(!stderr.contains("pulled whole"), "{stderr}");
        let got = std::fs::read(m.path.join("root.erofs"))
            .unwrap_or_else(|e| panic!("{e}: {}", bux.daemon_log()));
        assert_eq!(got.len(), want.len(), "{reference}");
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first, None, "{reference}: the disks differ");
    }
}

/// A manifest may name one layer twice (two identical `RUN` steps): its table of contents is
/// fetched and its layer counted once, as before the tables were fetched at once.
#[test]
fn a_layer_named_twice_is_one_lazy_layer() {
    need("skopeo");
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let a = LayerBuilder::new()
        .file("etc/twice", b"twice\n")
        .file("a.bin", &test_bytes(2 << 20, 7))
        .finish();
    let b = LayerBuilder::new()
        .file("b.bin", &test_bytes(2 << 20, 8))
        .finish();
    let gz = work.path().join("gz");
    write_layout(
        &gz,
        "v1",
        &Image::new(vec![
            (a.clone(), Comp::Gzip),
            (a, Comp::Gzip),
            (b, Comp::Gzip),
        ]),
    );
    let zc = zstd_chunked(&gz, &work.path().join("zc"));
    reg.push(&zc, "v1", "lazy/twice", None);
    let reference = format!("{}/lazy/twice:v1", reg.host());
    let bux = Bux::new();
    let store = bux_fuse::Store::open(bux.store.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_, outcome) = rt
        .block_on(store.pull_lazy(&reference, &bux_fuse::PullOptions::default(), false))
        .unwrap();
    assert_eq!(
        (outcome.lazy_layers, outcome.chunked_layers),
        (2, 2),
        "{outcome:?}"
    );
    let (m, _) = lazy_mount(&bux, &reference, &["--prefetch", "none"]);
    assert_eq!(cat(&m.path.join("etc/twice")).unwrap(), b"twice\n");
}

/// `layout:v1` converted by skopeo to zstd:chunked (its own tables of contents) at `to`.
fn zstd_chunked(layout: &Path, to: &Path) -> PathBuf {
    let out = Command::new("skopeo")
        .args(["copy", "--dest-compress-format", "zstd:chunked"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("oci:{}:v1", to.display()))
        .output()
        .unwrap();
    assert_success(&out);
    to.to_path_buf()
}

/// An HTTP/1.1 forwarder to a registry that logs each request as it arrives (`GET /v2/...`, a
/// line each) and holds answers to requests whose path contains a given word for a second
/// (so that what is sent meanwhile shows in the log before what follows the held answer).
struct RequestLog {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RequestLog {
    fn start(target: &str, hold: &str) -> RequestLog {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests");
        let script = dir.path().join("forwarder.py");
        std::fs::write(
            &script,
            r#"
import http.client, http.server, sys, time, threading
port, target, log, hold = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def forward(self, body=True):
        with lock, open(log, "a") as f:
            f.write(f"{self.command} {self.path}\n")
        if hold and hold in self.path:
            time.sleep(1)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        c = http.client.HTTPConnection(target)
        c.request(self.command, self.path, headers=headers)
        r = c.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
        c.close()
    def do_GET(self):
        self.forward()
    def do_HEAD(self):
        self.forward(False)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#,
        )
        .unwrap();
        let (child, port) =
            python_server(&script, &[target.as_ref(), log.as_os_str(), hold.as_ref()]);
        RequestLog {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The requests so far, in the order they arrived.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Each round trip before the mount is live costs a slow link's latency (50-100 ms between
/// continents). A registry that wants no auth is asked whether it does once (oci-client asked
/// `GET /v2/` again before every request, as no token came back): with the published index of
/// a gzip image, and with a zstd:chunked image's own tables.
#[test]
fn a_registry_without_auth_is_not_asked_for_a_token_before_each_request() {
    need("skopeo");
    let s = setup();
    let logged = RequestLog::start(&s.reg.host(), "");
    let reference = s.pinned.replace(&s.reg.host(), &logged.host());
    let bux = Bux::new();
    let (m, _) = lazy_mount(&bux, &reference, &["--prefetch", "none"]);
    let before_live = logged.requests();
    let pings = before_live.iter().filter(|r| *r == "GET /v2/").count();
    // Manifest, config, index manifest, three layer indexes. Token checks: oci-client's with
    // the first request and the probe beside it, and the mount daemon's probe as it starts;
    // one more when a request is retried (under load: anything but a 200 goes through
    // oci-client, which asks again). Before, there was one per request.
    assert!(before_live.len() >= 6, "{before_live:#?}");
    assert!(pings <= 4, "{pings} token checks: {before_live:#?}");
    diff_with_umoci(&m.path, s.layout.path());
    drop(m);

    let work = tempfile::tempdir().unwrap();
    let gz = work.path().join("gz");
    write_layout(&gz, "v1", &image().as_gzip());
    let zc = zstd_chunked(&gz, &work.path().join("zc"));
    s.reg.push(&zc, "v1", "lazy/chunked", None);
    let logged = RequestLog::start(&s.reg.host(), "");
    let bux = Bux::new();
    let reference = format!("{}/lazy/chunked:v1", logged.host());
    let (m, stderr) = lazy_mount(&bux, &reference, &["--prefetch", "none"]);
    assert!(!stderr.contains("pulled whole"), "{stderr}");
    let before_live = logged.requests();
    let pings = before_live.iter().filter(|r| *r == "GET /v2/").count();
    assert!(pings <= 4, "{pings} token checks: {before_live:#?}");
    diff_with_umoci(&m.path, &gz);
}

/// A zstd:chunked image's tables of contents are fetched while its published index is looked
/// for (the referrers API, then the tag its fallback names: round trips that the tables need
/// not wait for). The referrers answer is held a second: the tables' requests come first.
#[test]
fn zstd_chunked_tables_are_fetched_while_the_index_is_looked_for() {
    need("skopeo");
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let gz = work.path().join("gz");
    write_layout(&gz, "v1", &image().as_gzip());
    let zc = zstd_chunked(&gz, &work.path().join("zc"));
    reg.push(&zc, "v1", "lazy/chunked", None);
    let logged = RequestLog::start(&reg.host(), "/referrers/");
    let bux = Bux::new();
    let reference = format!("{}/lazy/chunked:v1", logged.host());
    let (m, stderr) = lazy_mount(&bux, &reference, &["--prefetch", "none"]);
    assert!(!stderr.contains("pulled whole"), "{stderr}");
    let requests = logged.requests();
    let referrers = requests
        .iter()
        .position(|r| r.contains("/referrers/"))
        .unwrap_or_else(|| panic!("no referrers request: {requests:#?}"));
    // (The referrers API's fallback, where the registry has none: the `sha256-<hex>` tag.)
    let lookup_done = requests
        .iter()
        .position(|r| r.contains("/manifests/sha256-"))
        .unwrap_or(referrers + 1);
    // The first blob is the config; the next ones are the tables.
    let first_table = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.contains("/blobs/"))
        .nth(1)
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no table fetched: {requests:#?}"));
    assert!(
        first_table < lookup_done,
        "the tables waited for the index lookup: {requests:#?}"
    );
    let os = cat(&m.path.join("etc/os-release")).unwrap();
    assert_eq!(os, b"NAME=bux-lazy\nID=bux\n");
}

/// Root's lazy mounts of an image stand on its one image server, as mounts of an image stored
/// whole do (one server and one page cache per image, whatever started it): a second mount, a
/// writable one, starts no server and reads what the first fetched without fetching it again;
/// a read waiting for the registry when the server's worker dies is answered by the next.
#[test]
fn lazy_mounts_stand_on_the_image_server_and_outlive_its_worker() {
    if !kernel_resends_fuse_requests() {
        eprintln!("skipped: this kernel resends nothing to a new worker (Linux 6.9+)");
        return;
    }
    let s = setup();
    let proxy = Proxy::start(s.reg.port, 10_000, 0);
    let reference = through(&proxy, &s.pinned, &s.reg);
    let bux = Bux::new();
    let store = bux.store.path();
    let workers = || -> Vec<u32> {
        image_servers(store)
            .into_iter()
            .filter_map(|(pid, worker)| worker.then_some(pid))
            .collect()
    };
    let extra = ["--prefetch", "none", "--read-timeout", "60"];
    let (m, said) = lazy_mount(&bux, &reference, &extra);
    assert!(said.contains("shared image server"), "{said}");
    let first = workers();
    assert_eq!(first.len(), 1, "the image server's worker: {first:?}");
    assert!(mount_workers(store).is_empty(), "a mount of its own");
    assert_eq!(
        cat(&m.path.join("etc/os-release")).unwrap(),
        b"NAME=bux-lazy\nID=bux\n"
    );
    // A read that waits for the registry when the worker dies.
    proxy.pause();
    let path = m.path.join("opt/data.bin");
    let reader = std::thread::spawn(move || cat(&path));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!reader.is_finished(), "the read waits for the registry");
    kill9(first[0]);
    wait_for(20, "the image server's worker replaced", || {
        let now = workers();
        now.len() == 1 && now[0] != first[0]
    });
    proxy.unpause();
    assert_eq!(reader.join().unwrap().unwrap(), test_bytes(6 << 20, 3));
    // The next worker fetches what was never read.
    assert_eq!(
        cat(&m.path.join("usr/lib/big2.bin")).unwrap(),
        test_bytes(12 << 20, 2)
    );
    // A writable lazy mount of the image, fetching as the first does: a kernel overlay over
    // the same server.
    let served = workers();
    let before = proxy.bytes();
    let (w, _) = lazy_mount(
        &bux,
        &reference,
        &["--writable", "--prefetch", "none", "--read-timeout", "60"],
    );
    assert_eq!(workers(), served, "one server for both mounts");
    assert_eq!(
        cat(&w.path.join("usr/lib/big2.bin")).unwrap(),
        test_bytes(12 << 20, 2)
    );
    let again = proxy.bytes() - before;
    assert!(
        again < 64 << 10,
        "{again} bytes fetched again for the second mount"
    );
    std::fs::write(w.path.join("etc/hostname"), b"changed\n").unwrap();
    kill9(served[0]);
    wait_for(20, "the image server's worker replaced again", || {
        let now = workers();
        now.len() == 1 && now[0] != served[0]
    });
    assert_eq!(cat(&w.path.join("etc/hostname")).unwrap(), b"changed\n");
    assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
    assert_eq!(
        cat(&w.path.join("etc/motd")).unwrap(),
        b"hello from a lazy layer\n"
    );
    // A mount that would fetch otherwise (here with another read deadline; as with other
    // credentials) does not stand on a server that fetches as somebody else: its own.
    let workers_now = workers();
    let (own, said) = lazy_mount(&bux, &reference, &["--prefetch", "none"]);
    assert!(!said.contains("shared image server"), "{said}");
    assert_eq!(workers(), workers_now, "no second image server");
    assert_eq!(mount_workers(store).len(), 1, "a mount of its own");
    assert_eq!(
        cat(&own.path.join("etc/motd")).unwrap(),
        b"hello from a lazy layer\n"
    );
    drop(own);
    // A mount that waits for the image whole joins a server that was told to fetch only
    // what is read: the server completes the image (the mount returns; it hung for good),
    // then hands it to a worker confined as for a stored image (not root's ids).
    let (ok, whole) = wait_complete_mount(&bux, &reference, 60);
    assert!(ok, "mount --wait-complete failed");
    assert!(bux.ok(&["check"]).contains("0 problems"));
    wait_for(20, "a confined worker took over", || {
        let now = workers();
        now.len() == 1
            && !workers_now.contains(&now[0])
            && std::fs::read_to_string(format!("/proc/{}/status", now[0])).is_ok_and(|st| {
                st.lines()
                    .any(|l| l.starts_with("Uid:") && !l.contains("\t0\t"))
            })
    });
    let before = proxy.bytes();
    proxy.pause();
    assert_eq!(
        cat(&whole.path.join("usr/lib/big2.bin")).unwrap(),
        test_bytes(12 << 20, 2)
    );
    assert_eq!(cat(&w.path.join("etc/hostname")).unwrap(), b"changed\n");
    // Files no mount read before, with the registry away: served from the store.
    assert_eq!(
        cat(&whole.path.join("usr/lib/big1.bin")).unwrap(),
        test_bytes(16 << 20, 1)
    );
    assert_eq!(
        cat(&w.path.join("usr/share/doc/f10.txt")).unwrap(),
        b"doc 10\n"
    );
    assert_eq!(
        proxy.bytes(),
        before,
        "nothing fetched once the image is whole"
    );
    proxy.unpause();
    // All gone, the server leaves.
    drop(whole);
    drop(w);
    drop(m);
    wait_for(20, "the image server left", || {
        image_servers(store).is_empty()
    });
}

/// The image server's supervisors and workers, apart.
fn lazy_server(store: &Path) -> (Vec<u32>, Vec<u32>) {
    let all = image_servers(store);
    let pick = |worker: bool| {
        all.iter()
            .filter(|(_, w)| *w == worker)
            .map(|(p, _)| *p)
            .collect()
    };
    (pick(false), pick(true))
}

/// Runs `mount --lazy REFERENCE DIR --wait-complete` and waits at most `secs` for it to
/// return; returns whether it succeeded, and the mount.
fn wait_complete_mount(bux: &Bux, reference: &str, secs: u64) -> (bool, MountGuard) {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("root");
    let mut child = bux
        .cmd()
        .args(["mount", "--lazy", reference, at.to_str().unwrap()])
        .args(["--wait-complete", "--read-timeout", "60"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let logs: Vec<String> = std::fs::read_dir(bux.store.path().join("shared"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| std::fs::read_to_string(e.path().join("log")).unwrap_or_default())
                .collect();
            panic!("mount --wait-complete did not return in {secs} s; servers' logs:\n{logs:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait().unwrap().success(), MountGuard::adopt(at, dir))
}

/// One manifest stored under two references (two registries, or repositories): a mount of
/// one does not stand on a server fetching by the other (from its registry, with its
/// credentials): the server fetches by the reference its first mount named.
#[test]
fn a_lazy_server_fetches_by_its_own_reference() {
    let s = setup();
    let (pa, pb) = (
        Proxy::start(s.reg.port, 10_000, 0),
        Proxy::start(s.reg.port, 10_000, 0),
    );
    let (ref_a, ref_b) = (
        through(&pa, &s.pinned, &s.reg),
        through(&pb, &s.pinned, &s.reg),
    );
    // A is the reference the store lists second (by name): the one a server that took the
    // manifest's first record would not fetch by.
    let ((pa, ref_a), (pb, ref_b)) = match ref_a < ref_b {
        true => ((pb, ref_b), (pa, ref_a)),
        false => ((pa, ref_a), (pb, ref_b)),
    };
    let bux = Bux::new();
    let store = bux.store.path();
    // Both stored (the store's first record of the manifest may be either), then A's server.
    for r in [&ref_b, &ref_a] {
        drop(lazy_mount(&bux, r, &["--prefetch", "none", "--own-server"]).0);
    }
    let (a, said) = lazy_mount(
        &bux,
        &ref_a,
        &["--prefetch", "none", "--read-timeout", "60"],
    );
    assert!(said.contains("shared image server"), "{said}");
    let (before_a, before_b) = (pa.bytes(), pb.bytes());
    assert_eq!(
        cat(&a.path.join("usr/lib/big1.bin")).unwrap(),
        test_bytes(16 << 20, 1)
    );
    assert!(
        pa.bytes() - before_a > 1 << 20,
        "A's mount fetched through A"
    );
    assert_eq!(pb.bytes(), before_b, "A's mount fetched from B's registry");
    // B's mount: a daemon of its own, fetching through B.
    let (b, said) = lazy_mount(
        &bux,
        &ref_b,
        &["--prefetch", "none", "--read-timeout", "60"],
    );
    assert!(!said.contains("shared image server"), "{said}");
    assert_eq!(lazy_server(store).1.len(), 1, "one image server");
    assert_eq!(
        cat(&b.path.join("usr/lib/big2.bin")).unwrap(),
        test_bytes(12 << 20, 2)
    );
    assert!(
        pb.bytes() - before_b > 1 << 20,
        "B's mount fetched through B"
    );
}

/// A `--wait-complete` mount whose request was taken by a worker that then died is still
/// completed by the next; a lazy server whose supervisor died keeps serving once the image
/// is whole (its worker hands over only to a supervisor that can start the next).
#[test]
fn completing_a_lazy_server_survives_its_processes_dying() {
    if !kernel_resends_fuse_requests() {
        eprintln!("skipped: this kernel resends nothing to a new worker (Linux 6.9+)");
        return;
    }
    let s = setup();
    // Slow enough that completion is under way when its worker is killed.
    let proxy = Proxy::start(s.reg.port, 16, 0);
    let reference = through(&proxy, &s.pinned, &s.reg);
    let bux = Bux::new();
    let store = bux.store.path();
    let opts = ["--prefetch", "none", "--read-timeout", "60"];
    let (m, _) = lazy_mount(&bux, &reference, &opts);
    assert_eq!(
        cat(&m.path.join("etc/os-release")).unwrap(),
        b"NAME=bux-lazy\nID=bux\n"
    );
    let (_, first) = lazy_server(store);
    let before = proxy.bytes();
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| wait_complete_mount(&bux, &reference, 120));
        wait_for(30, "completion under way", || {
            proxy.bytes() > before + (2 << 20)
        });
        kill9(first[0]);
        wait_for(20, "the worker replaced", || {
            let (_, now) = lazy_server(store);
            now.len() == 1 && now[0] != first[0]
        });
        // Once it serves, its supervisor dies too: the orphan completes the image, and
        // serves on.
        assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
        let (supervisor, _) = lazy_server(store);
        kill9(supervisor[0]);
        let (ok, whole) = waiting.join().unwrap();
        assert!(ok, "mount --wait-complete failed");
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(cat(&m.path.join("etc/hostname")).unwrap(), b"lazy\n");
        assert_eq!(
            cat(&whole.path.join("usr/lib/big2.bin")).unwrap(),
            test_bytes(12 << 20, 2)
        );
    });
    // The orphan exits once nothing stands on it, with no supervisor to take its FUSE mount
    // down: gc does (once the orphan's last thread has let go of the connection), and leaves
    // nothing mounted in the store.
    drop(m);
    let store_dir = store.to_string_lossy().into_owned();
    let in_store = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&store_dir)
    };
    wait_for(30, "gc to take the orphan's mount down", || {
        bux.ok(&["gc"]);
        !in_store()
    });
}
