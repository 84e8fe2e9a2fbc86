//! Faults injected into pulls from a real registry: it dies mid-layer (the pull resumes from
//! the bytes it has), the link stalls (a clear timeout error, the bytes kept to resume), a pull
//! gives up or is killed (the next one resumes from its partial blob by Range).

mod common;

use std::time::{Duration, Instant};

use common::*;

fn big_image() -> Image {
    let l = LayerBuilder::new()
        .file("big.bin", &test_bytes(24 << 20, 21))
        .file("etc/marker", b"faults\n")
        .finish();
    Image::new(vec![(l, Comp::Gzip)])
}

#[test]
fn registry_killed_mid_layer_the_pull_resumes() {
    let mut reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(work.path(), "v1", &big_image());
    reg.push(work.path(), "v1", "f/resume", None);
    let compressed: u64 = std::fs::read_dir(work.path().join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let proxy = Proxy::start(reg.port, 80, 1);
    let r = format!("{}/f/resume:v1", proxy.host());
    let bux = Bux::new();
    let mut pull = bux.cmd().args(["pull", "-q", &r]).spawn().unwrap();
    // Kill the registry once a good part of the layer has arrived, then bring it back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.bytes() < compressed / 3 {
        assert!(Instant::now() < deadline, "download did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    reg.stop();
    std::thread::sleep(Duration::from_millis(300));
    reg.restart();
    assert!(
        pull.wait().unwrap().success(),
        "pull did not survive the registry restart"
    );
    let fetched = proxy.bytes();
    assert!(
        fetched < compressed + compressed / 20,
        "fetched {fetched} bytes for a {compressed}-byte image: the retry started over"
    );
    let m = bux.mount(&r);
    assert_eq!(
        std::fs::read(m.path.join("etc/marker")).unwrap(),
        b"faults\n"
    );
    assert_eq!(
        std::fs::read(m.path.join("big.bin")).unwrap(),
        test_bytes(24 << 20, 21)
    );
}

#[test]
fn a_stalled_registry_gives_a_clear_timeout() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(work.path(), "v1", &big_image());
    reg.push(work.path(), "v1", "f/stall", None);
    let proxy = Proxy::start(reg.port, 40, 1);
    let r = format!("{}/f/stall:v1", proxy.host());
    let bux = Bux::new();
    let pull = bux
        .cmd()
        .args(["pull", "-q", "--stall-timeout", "1", &r])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.bytes() < 1 << 20 {
        assert!(Instant::now() < deadline, "download did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy.pause();
    let t = Instant::now();
    let out = pull.wait_with_output().unwrap();
    proxy.unpause();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("stalled"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "gave up after {:?}",
        t.elapsed()
    );
    assert_eq!(bux.ok(&["images", "--json"]).trim(), "[]");
    // What arrived is kept as a resumable partial blob, nothing else.
    let left = temp_names(&bux);
    assert!(left.iter().all(|n| n.ends_with(".ingest")), "{left:?}");
}

/// A store on a small filesystem that fills in mid-pull: one line saying there is no space,
/// nothing half-written kept, and the pull works once there is room.
#[test]
fn a_full_disk_mid_pull_is_one_clear_line_and_recoverable() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(work.path(), "v1", &big_image());
    reg.push(work.path(), "v1", "f/full", None);
    let store = tempfile::tempdir().unwrap();
    let mnt = store.path().join("small");
    let small = Tmpfs::mount(&mnt, "size=6m");
    let r = format!("{}/f/full:v1", reg.host());
    let bin = env!("CARGO_BIN_EXE_bux-fuse");
    let pull = || {
        std::process::Command::new(bin)
            .arg("--store")
            .arg(&mnt)
            .args(["pull", "-q", &r])
            .env("DOCKER_CONFIG", store.path().join("none"))
            .output()
            .unwrap()
    };
    let out = pull();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pulled 12 MB into 6 MB?");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        !err.contains("corrupt"),
        "a full disk is not a corrupt layer: {err}"
    );
    assert_eq!(
        std::fs::read_dir(mnt.join("tmp")).unwrap().count(),
        0,
        "temp files kept"
    );
    small.options("remount,size=128m");
    let out = pull();
    assert_success(&out);
}

/// The names in the store's `tmp/`.
fn temp_names(bux: &Bux) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(bux.store.path().join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// An image with one large layer (`big.bin`: 48 MiB, half compressible), pushed as `repo:v1`;
/// returns the layer's compressed size and `big.bin`.
fn push_large(reg: &Registry, repo: &str, comp: Comp) -> (u64, Vec<u8>) {
    let big = test_bytes(48 << 20, 22);
    let l = LayerBuilder::new()
        .file("big.bin", &big)
        .file("etc/marker", b"resumed\n")
        .finish();
    let work = tempfile::tempdir().unwrap();
    write_layout(work.path(), "v1", &Image::new(vec![(l, comp)]));
    reg.push(work.path(), "v1", repo, None);
    let layer = std::fs::read_dir(work.path().join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .max()
        .unwrap();
    (layer, big)
}

fn wait_for_bytes(proxy: &Proxy, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.bytes() < n {
        assert!(Instant::now() < deadline, "download did not get that far");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pulled image mounts and reads as pushed.
fn assert_image(bux: &Bux, r: &str, big: &[u8]) {
    let m = bux.mount(r);
    assert_eq!(
        std::fs::read(m.path.join("etc/marker")).unwrap(),
        b"resumed\n"
    );
    assert!(
        std::fs::read(m.path.join("big.bin")).unwrap() == big,
        "big.bin differs"
    );
}

/// #19.16: the registry dies, the pull retries, gives up and fails; the partial blob stays, and
/// the next `pull` (another process) resumes it by Range instead of fetching it all again.
#[test]
fn a_pull_that_gave_up_is_resumed_by_the_next_pull() {
    let mut reg = Registry::start();
    let (layer, big) = push_large(&reg, "f/giveup", Comp::Gzip);
    let proxy = Proxy::start(reg.port, 80, 1);
    let r = format!("{}/f/giveup:v1", proxy.host());
    let bux = Bux::new();
    let pull = bux
        .cmd()
        .args(["pull", "-q", &r])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_bytes(&proxy, layer / 2);
    // What the registry had written before it died would still arrive (its socket's and the
    // link's buffers hold up to half this layer): the link holds it back while the registry is
    // killed, then the transfer is cut as a dead host's is (new connections find it dead).
    proxy.pause();
    reg.stop();
    proxy.cut();
    proxy.unpause();
    let out = pull.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "pulled from a dead registry? ({} of {layer} bytes sent by then)\n{}",
        proxy.bytes(),
        String::from_utf8_lossy(&out.stderr)
    );
    let left = temp_names(&bux);
    assert_eq!(left.len(), 1, "one partial blob, nothing else: {left:?}");
    assert!(left[0].ends_with(".ingest"), "{left:?}");
    let kept = std::fs::metadata(bux.store.path().join("tmp").join(&left[0]))
        .unwrap()
        .len();
    assert!(kept >= layer / 3, "kept {kept} of {layer} bytes");

    reg.restart();
    let before = proxy.bytes();
    let out = bux.cmd().args(["pull", &r]).output().unwrap();
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resuming at"), "{err}");
    let again = proxy.bytes() - before;
    eprintln!("layer {layer}, kept {kept}, fetched again {again}");
    assert!(
        again < layer * 6 / 10 && again < layer - kept + layer / 20,
        "the second pull fetched {again} bytes of a {layer}-byte layer ({kept} kept)"
    );
    assert_eq!(temp_names(&bux), Vec::<String>::new());
    assert_image(&bux, &r, &big);
}

/// #19.16, #19.21: a pull killed mid-layer (SIGKILL: nothing cleaned up) leaves its partial
/// blob; the next pull resumes it, removes what else the killed one left (the seekable copy
/// of a zstd layer being written), and the image is whole.
#[test]
fn a_killed_pull_is_resumed_and_its_temp_files_cleared() {
    let reg = Registry::start();
    let (layer, big) = push_large(&reg, "f/killed", Comp::Zstd);
    let proxy = Proxy::start(reg.port, 80, 1);
    let r = format!("{}/f/killed:v1", proxy.host());
    let bux = Bux::new();
    let mut pull = bux.cmd().args(["pull", "-q", &r]).spawn().unwrap();
    // Late enough that what was received but not yet written (in flight to the indexer)
    // when the pull dies leaves well over 40% on disk.
    wait_for_bytes(&proxy, layer * 3 / 4);
    pull.kill().unwrap();
    pull.wait().unwrap();
    let left = temp_names(&bux);
    let ingest = left.iter().find(|n| n.ends_with(".ingest"));
    let ingest = ingest.unwrap_or_else(|| panic!("no partial blob kept: {left:?}"));
    // The killed pull's seekable copy of the zstd layer, cut short: the next pull removes it.
    assert!(left.iter().any(|n| n.contains(".zst.")), "{left:?}");
    let kept = std::fs::metadata(bux.store.path().join("tmp").join(ingest))
        .unwrap()
        .len();

    // How much was on disk when SIGKILL came depends on the load (what was received but
    // still in flight to the indexer is lost); that the next pull fetches only the rest does not.
    assert!(kept >= layer / 10, "kept {kept} of {layer} bytes");

    let before = proxy.bytes();
    let out = bux.cmd().args(["pull", "-q", &r]).output().unwrap();
    assert_success(&out);
    let again = proxy.bytes() - before;
    eprintln!("layer {layer}, kept {kept}, fetched again {again}");
    assert!(
        again < layer - kept + layer / 20,
        "the second pull fetched {again} bytes of a {layer}-byte layer ({kept} kept)"
    );
    assert_eq!(
        temp_names(&bux),
        Vec::<String>::new(),
        "left before: {left:?}"
    );
    assert_image(&bux, &r, &big);
}
