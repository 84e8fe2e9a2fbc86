//! Faults injected into pulls from a real registry: it dies mid-layer (the pull resumes from
//! the bytes it has), the link stalls (a clear timeout error, nothing kept).

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
    assert_eq!(
        std::fs::read_dir(bux.store.path().join("tmp"))
            .unwrap()
            .count(),
        0
    );
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
    std::fs::create_dir_all(&mnt).unwrap();
    let mount = |opts: &str| {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&mnt)
            .output()
            .unwrap();
        assert_success(&out);
    };
    mount("size=6m");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(mnt.clone());
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
    mount("remount,size=128m");
    let out = pull();
    assert_success(&out);
}
