//! Many mounts of one image on one host (root): one shared image server and one FUSE mount
//! under all of them, writes kept apart, the server released by the last unmount, and a server
//! killed with -9 restarted under its mounts without a VM-visible error.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn image(reg: &Registry, repo: &str) -> String {
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", b"ID=density\n")
        .file("etc/services", &test_bytes(20_000, 3))
        .file("big.bin", &test_bytes(3 << 20, 7))
        .hardlink("big-link.bin", "big.bin")
        .finish();
    let top = LayerBuilder::new()
        .dir("srv", 0o755)
        .file("srv/marker", b"top")
        .file("srv/page", &test_bytes(5_000, 4))
        .finish();
    let img = Image::new(vec![(base, Comp::Gzip), (top, Comp::Zstd)]);
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &img);
    reg.push(&work.path().join("l"), "v1", repo, None);
    format!("{}/{repo}:v1", reg.host())
}

/// Processes of the image server (supervisor and worker) using `store`.
fn servers(store: &Path) -> Vec<(u32, bool)> {
    image_servers(store)
}

fn worker(store: &Path) -> u32 {
    let w: Vec<u32> = servers(store)
        .into_iter()
        .filter(|(_, w)| *w)
        .map(|(p, _)| p)
        .collect();
    assert_eq!(w.len(), 1, "one worker expected: {w:?}");
    w[0]
}

/// FUSE filesystems (distinct devices) bux-fuse mounted of image `reference`.
fn fuse_devices(reference: &str) -> std::collections::BTreeSet<String> {
    let source = format!(" - fuse.bux-fuse bux-fuse:{reference} ");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&source))
        .map(|l| l.split(' ').nth(2).unwrap().to_string())
        .collect()
}

/// A mount made by the test, unmounted when dropped (also when an assertion fails, so that
/// the image server leaves).
struct Mounted<'a> {
    bux: &'a Bux,
    path: PathBuf,
}

impl<'a> Mounted<'a> {
    fn new(bux: &'a Bux, reference: &str, path: PathBuf, writable: bool) -> Mounted<'a> {
        Mounted::with(bux, reference, path, writable, Metadata::Kernel)
    }

    /// A mount whose server (if this mount starts it) takes its metadata from `metadata`.
    fn with(
        bux: &'a Bux,
        reference: &str,
        path: PathBuf,
        writable: bool,
        metadata: Metadata,
    ) -> Mounted<'a> {
        let mut cmd = bux.cmd();
        cmd.args(["mount", "-q", reference, path.to_str().unwrap()]);
        if writable {
            cmd.arg("--writable");
        }
        if metadata == Metadata::Fuse {
            cmd.env("BUX_FUSE_METADATA", "fuse");
        }
        assert_success(&cmd.output().unwrap());
        Mounted { bux, path }
    }

    fn unmount(self) {
        self.bux.ok(&["umount", self.path.to_str().unwrap()]);
        assert!(!is_mounted(&self.path));
        std::mem::forget(self);
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = self.bux.run(&["umount", self.path.to_str().unwrap()]);
    }
}

/// Where a shared server takes the image's metadata from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Metadata {
    /// An EROFS image under an overlay: walks stay in the kernel (the default).
    Kernel,
    /// The FUSE mount (`BUX_FUSE_METADATA=fuse`, and kernels without EROFS files).
    Fuse,
}

/// The filesystem type at `path` and its overlay `lowerdir`, from the mount table.
fn mounted_as(path: &Path) -> (String, String) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let at = format!(" {} ", path.display());
    let line = info
        .lines()
        .rev()
        .find(|l| l.contains(&at))
        .expect("mounted");
    let (_, sup) = line.split_once(" - ").unwrap();
    let mut f = sup.split(' ');
    let fstype = f.next().unwrap().to_string();
    let lower = f
        .nth(1)
        .unwrap_or("")
        .split(',')
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap_or("")
        .to_string();
    (fstype, lower)
}

/// Empties the image servers' logs of `bux`'s store.
fn clear_logs(bux: &Bux) {
    for d in std::fs::read_dir(bux.store.path().join("shared")).unwrap() {
        let log = d.unwrap().path().join("log");
        if log.exists() {
            std::fs::write(log, b"").unwrap();
        }
    }
}

/// The image servers' logs of `bux`'s store.
fn server_logs(bux: &Bux) -> String {
    let dirs = std::fs::read_dir(bux.store.path().join("shared"));
    dirs.into_iter()
        .flatten()
        .flatten()
        .map(|d| std::fs::read_to_string(d.path().join("log")).unwrap_or_default())
        .collect()
}

/// Waits up to 10 s for `f`; on a timeout, shows the servers, the mounts and their logs.
fn wait_until(bux: &Bux, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > Duration::from_secs(10) {
            let store = bux.store.path().to_string_lossy().into_owned();
            let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .filter(|l| l.contains(&store) || l.contains("bux-fuse"))
                .map(String::from)
                .collect();
            panic!(
                "timed out: {what}; servers {:?}; mounts:\n{}\nlog:\n{}",
                servers(bux.store.path()),
                mounts.join("\n"),
                server_logs(bux)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_hundred_mounts_share_one_server_and_the_last_unmount_releases_it() {
    a_hundred_mounts(Metadata::Kernel);
}

#[test]
fn a_hundred_mounts_with_metadata_from_fuse() {
    a_hundred_mounts(Metadata::Fuse);
}

fn a_hundred_mounts(metadata: Metadata) {
    let reg = Registry::start();
    let r = image(&reg, "t/dense");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let dir = tempfile::tempdir().unwrap();
    let mut guards: Vec<Option<Mounted>> = Vec::new();
    let mut mounts: Vec<(PathBuf, bool)> = Vec::new();
    for i in 0..100 {
        let mnt = dir.path().join(format!("m{i}"));
        let writable = i % 2 == 1;
        guards.push(Some(Mounted::with(
            &bux,
            &r,
            mnt.clone(),
            writable,
            metadata,
        )));
        mounts.push((mnt, writable));
    }
    // Each mount stands on the image's metadata as asked: every one an overlay over the EROFS
    // image and the FUSE mount, or a bind mount of (read-only) / an overlay over the FUSE mount.
    for (mnt, writable) in &mounts {
        let (fstype, lower) = mounted_as(mnt);
        match (metadata, writable) {
            (Metadata::Kernel, _) => {
                assert_eq!(fstype, "overlay", "{}", mnt.display());
                assert!(
                    lower.ends_with("/mnt") && lower.contains("/meta::"),
                    "{lower}"
                );
            }
            (Metadata::Fuse, false) => assert_eq!(fstype, "fuse.bux-fuse"),
            (Metadata::Fuse, true) => assert!(lower.ends_with("/mnt") && !lower.contains("::")),
        }
    }
    // One server, one FUSE filesystem under all hundred.
    let procs = servers(bux.store.path());
    assert_eq!(procs.len(), 2, "supervisor and worker: {procs:?}");
    let new = fuse_devices(&r);
    assert_eq!(new.len(), 1, "one FUSE mount for all: {new:?}");
    let expect = test_bytes(3 << 20, 7);
    let big_ino = std::fs::metadata(mounts[0].0.join("big.bin"))
        .unwrap()
        .ino();
    for (i, (mnt, writable)) in mounts.iter().enumerate() {
        assert_eq!(std::fs::read(mnt.join("srv/marker")).unwrap(), b"top");
        if i % 10 == 0 {
            assert_eq!(std::fs::read(mnt.join("big.bin")).unwrap(), expect);
        }
        let link = std::fs::metadata(mnt.join("big-link.bin")).unwrap();
        assert_eq!(link.nlink(), 2);
        if *writable {
            std::fs::write(mnt.join("srv/mine"), format!("{i}")).unwrap();
            std::fs::write(mnt.join("etc/os-release"), format!("ID=vm{i}\n")).unwrap();
        } else {
            assert_eq!(link.ino(), big_ino, "inode numbers are the image's");
            let e = std::fs::write(mnt.join("srv/mine"), b"x").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        }
    }
    // The worker serving them all is confined (seccomp, no_new_privs).
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", worker(bux.store.path()))).unwrap();
    assert!(
        status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"),
        "{status}"
    );
    // And holds no privilege: the image's own ids, no capabilities (its supervisor mounts).
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:\t"))
        .unwrap();
    let first: u32 = uid.split('\t').next().unwrap().parse().unwrap();
    assert!(
        (0x7F00_0000..0x7F80_0000).contains(&first) && uid == vec![first.to_string(); 4].join("\t"),
        "{status}"
    );
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("CapPrm:\t0000000000000000"), "{status}");

    // Writes stay in their own mount.
    for (i, (mnt, writable)) in mounts.iter().enumerate() {
        let os = std::fs::read_to_string(mnt.join("etc/os-release")).unwrap();
        if *writable {
            assert_eq!(
                std::fs::read_to_string(mnt.join("srv/mine")).unwrap(),
                format!("{i}")
            );
            assert_eq!(os, format!("ID=vm{i}\n"));
        } else {
            assert!(!mnt.join("srv/mine").exists());
            assert_eq!(os, "ID=density\n");
        }
    }
    // Unmount in a scrambled order: the server stays while anything stands on it.
    let mut order: Vec<usize> = (0..100).collect();
    order.sort_by_key(|i| (i * 37) % 100);
    let scratch = bux.store.path().join("scratch");
    for (k, i) in order.iter().enumerate() {
        guards[*i].take().unwrap().unmount();
        if k == 98 {
            std::thread::sleep(Duration::from_millis(700));
            assert_eq!(servers(bux.store.path()).len(), 2, "released while in use");
            let last = &mounts[order[99]].0;
            assert_eq!(std::fs::read(last.join("srv/marker")).unwrap(), b"top");
        }
    }
    // `umount` of the last mount returns once the server has left.
    assert_eq!(
        servers(bux.store.path()),
        vec![],
        "the server outlived the last umount"
    );
    assert!(fuse_devices(&r).is_empty(), "the shared FUSE mount is gone");
    let erofs = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let shared = bux.store.path().join("shared");
    assert!(
        !erofs.contains(shared.to_str().unwrap()),
        "the metadata image and its overlay are gone: {erofs}"
    );
    let left = std::fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "scratch upper layers removed");
    // And the next mount starts a new one.
    let again = Mounted::new(&bux, &r, dir.path().join("again"), false);
    assert_eq!(
        std::fs::read(again.path.join("srv/marker")).unwrap(),
        b"top"
    );
    again.unmount();
    wait_until(&bux, "released again", || {
        servers(bux.store.path()).is_empty()
    });
}

#[test]
fn a_server_killed_with_9_is_restarted_under_its_mounts() {
    let reg = Registry::start();
    let r = image(&reg, "t/restart");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    let rw = dir.path().join("rw");
    let ro_guard = Mounted::new(&bux, &r, ro.clone(), false);
    let rw_guard = Mounted::new(&bux, &r, rw.clone(), true);
    let expect = test_bytes(3 << 20, 7);
    // Open descriptors (as libkrun holds) and readers running through the kills.
    let held = std::fs::File::open(ro.join("big.bin")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = [ro.clone(), rw.clone()]
        .into_iter()
        .map(|m| {
            let stop = stop.clone();
            let expect = expect.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Fresh names each time: lookups and reads reach the server (the page
                    // cache would answer repeats).
                    let _ = std::fs::metadata(m.join(format!("etc/missing-{n}")));
                    let got = std::fs::read(m.join("big.bin")).map_err(|e| e.to_string())?;
                    if got != expect {
                        return Err("wrong bytes".to_string());
                    }
                    std::fs::read_dir(m.join("etc"))
                        .map_err(|e| e.to_string())?
                        .count();
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    for round in 0..3 {
        let w = worker(bux.store.path());
        // Drop the kernel's cached pages so reads must go to the server.
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        Command::new("kill")
            .args(["-9", &w.to_string()])
            .status()
            .unwrap();
        wait_until(&bux, "a new worker", || {
            servers(bux.store.path())
                .iter()
                .any(|(p, wk)| *wk && *p != w)
        });
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            std::fs::read(rw.join("srv/marker")).unwrap(),
            b"top",
            "round {round}"
        );
    }
    let mut buf = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    held.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, expect[1 << 20..(1 << 20) + 4096]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        let n = r.join().unwrap().expect("no reader saw an error");
        assert!(n > 0);
    }
    let logs = server_logs(&bux);
    assert!(
        logs.matches("starting another on the same connection")
            .count()
            >= 3,
        "{logs}"
    );
    assert!(
        !logs.contains("resend"),
        "the kernel took FUSE_NOTIFY_RESEND: {logs}"
    );
    // The supervisor killed: the worker serves on, and leaves once nothing uses the mount.
    let sup = servers(bux.store.path())
        .into_iter()
        .find(|(_, w)| !*w)
        .unwrap()
        .0;
    Command::new("kill")
        .args(["-9", &sup.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(std::fs::read(ro.join("srv/marker")).unwrap(), b"top");
    drop(held);
    ro_guard.unmount();
    rw_guard.unmount();
    wait_until(&bux, "the orphaned worker leaves", || {
        servers(bux.store.path()).is_empty()
    });
    // A new mount finds the dead connection, clears it and starts afresh.
    let again = Mounted::new(&bux, &r, ro.clone(), false);
    assert_eq!(std::fs::read(ro.join("srv/marker")).unwrap(), b"top");
    again.unmount();
    wait_until(&bux, "released", || servers(bux.store.path()).is_empty());
}

/// With metadata in the kernel, walking the tree (`find`, `stat`, `readdir`, `readlink`,
/// xattrs) never reaches the server: it completes with the server's worker stopped, from cold
/// caches, where over FUSE every directory would wait for it.
#[test]
fn metadata_walks_never_reach_the_server() {
    let reg = Registry::start();
    let r = image(&reg, "t/walk");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let dir = tempfile::tempdir().unwrap();
    let ro = Mounted::new(&bux, &r, dir.path().join("ro"), false);
    let rw = Mounted::new(&bux, &r, dir.path().join("rw"), true);
    let w = worker(bux.store.path());
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let signal = |sig: &str| {
        let s = Command::new("kill").args([sig, &w.to_string()]).status();
        assert!(s.unwrap().success());
    };
    signal("-STOP");
    let roots = [ro.path.clone(), rw.path.clone()];
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let walked: Vec<Vec<String>> = roots.iter().map(|r| walk(r)).collect();
        // Small files' bytes are in the metadata image too (of a gzip and a zstd layer).
        let small: Vec<Vec<u8>> = roots
            .iter()
            .flat_map(|r| [r.join("etc/os-release"), r.join("srv/marker")])
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        // Those of more than 512 bytes are read from their layers' small-file files, extra
        // devices of the metadata image.
        for r in &roots {
            assert_eq!(
                std::fs::read(r.join("etc/services")).unwrap(),
                test_bytes(20_000, 3)
            );
            assert_eq!(
                std::fs::read(r.join("srv/page")).unwrap(),
                test_bytes(5_000, 4)
            );
        }
        let _ = tx.send((walked, small));
    });
    let walked = rx.recv_timeout(Duration::from_secs(20));
    signal("-CONT");
    let (walked, small) = walked.expect("the walk finished with the server stopped");
    assert_eq!(
        small,
        [&b"ID=density\n"[..], b"top", b"ID=density\n", b"top"]
    );
    assert_eq!(walked[0], walked[1]);
    for want in [
        "/big-link.bin 3145728 2",
        "/etc/os-release 11 1",
        "/srv/marker 3 1",
    ] {
        assert!(
            walked[0].iter().any(|l| l == want),
            "{want} in {:?}",
            walked[0]
        );
    }
    // And large files' data comes from the server, now running again.
    assert_eq!(
        std::fs::read(ro.path.join("big.bin")).unwrap(),
        test_bytes(3 << 20, 7)
    );
    ro.unmount();
    rw.unmount();
}

/// A read the image server answers costs it one read(2), of the FUSE device, and the blob's
/// where the bytes are not decoded yet: nothing of its own besides. (Every read asked for the
/// number of CPUs, which reads the process's cgroup files: three more reads a request, ~7%
/// of a user's cold `tar` of the large image.) Reads bypass the page cache (`O_DIRECT`), so
/// each is a request; the spans are decoded by the first pass.
#[test]
fn a_served_read_costs_the_server_no_reads_of_its_own() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let reg = Registry::start();
    let r = image(&reg, "t/reads");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let dir = tempfile::tempdir().unwrap();
    let ro = Mounted::new(&bux, &r, dir.path().join("ro"), false);
    let w = worker(bux.store.path());
    // The worker runs as ids of its own: root reads its counters only with CAP_SYS_PTRACE,
    // which a container's root may lack.
    if let Err(e) = std::fs::read_to_string(format!("/proc/{w}/io")) {
        if e.kind() == std::io::ErrorKind::PermissionDenied && std::env::var_os("CI").is_none() {
            eprintln!("/proc/{w}/io: {e}: skipped");
            return;
        }
    }
    let reads = || -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{w}/io")).unwrap();
        let line = io.lines().find(|l| l.starts_with("syscr:")).unwrap();
        line[6..].trim().parse().unwrap()
    };
    let f = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(ro.path.join("big.bin"))
        .unwrap();
    let want = test_bytes(3 << 20, 7);
    // O_DIRECT wants an aligned buffer: 4 KiB blocks of an 8 KiB one, from the first aligned.
    let mut buf = vec![0u8; 8192];
    let skip = buf.as_ptr().align_offset(4096);
    let blocks = (3 << 20) / 4096;
    let mut pass = |n: usize| {
        for i in 0..n {
            let at = (i * 7919 % blocks) * 4096;
            let b = &mut buf[skip..skip + 4096];
            assert_eq!(f.read_at(b, at as u64).unwrap(), 4096);
            assert!(b[..] == want[at..at + 4096], "bytes at {at}");
        }
    };
    pass(blocks);
    let before = reads();
    pass(300);
    let per = (reads() - before) as f64 / 300.0;
    assert!(
        per < 1.5,
        "{per:.2} read(2) calls by the image server per 4 KiB read"
    );
    drop(f);
    ro.unmount();
}

/// Every path under `root` with its size and link count (files), depth first.
fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            out.push(format!("/{rel} {} {}", m.len(), m.nlink()));
        }
    }
    out.sort();
    out
}

/// A small file's bytes are stored once, in its layer's small-file file, which the metadata
/// image names as a device: not again in the image (before: each image copied them in, and the
/// layer's table kept them compressed besides).
#[test]
fn small_files_bytes_are_stored_once() {
    let reg = Registry::start();
    let r = image(&reg, "t/once");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let store = bux.store.path();
    let want = test_bytes(20_000, 3);
    let mut holding = Vec::new();
    let mut images = 0;
    for dir in ["layers/sha256", "trees/sha256"] {
        for e in std::fs::read_dir(store.join(dir)).unwrap() {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            if bytes.windows(want.len()).any(|w| w == &want[..]) {
                holding.push(p.clone());
            }
            if p.extension().is_some_and(|x| x == "erofs") {
                images += 1;
                assert!(
                    bytes.len() < 20_000,
                    "{}: {} bytes",
                    p.display(),
                    bytes.len()
                );
            }
        }
    }
    assert_eq!(images, 1);
    assert_eq!(holding.len(), 1, "{holding:?}");
    assert!(
        holding[0].extension().is_some_and(|x| x == "small"),
        "{holding:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let ro = Mounted::new(&bux, &r, dir.path().join("ro"), false);
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(std::fs::read(ro.path.join("etc/services")).unwrap(), want);
    ro.unmount();
}

/// The small files' files a metadata image names as devices, gone, damaged, or of the earlier
/// format (as a store of an earlier version holds them) when a server mounts it: the server
/// writes the image anew without them (their files then read through FUSE, or copied in), and
/// every file reads as the layer has it; `check` then finds nothing wrong with the image (a
/// damaged file it reports as such).
#[test]
fn small_files_files_gone_damaged_or_of_an_earlier_format_are_not_mounted() {
    let reg = Registry::start();
    let r = image(&reg, "t/devices");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let store = bux.store.path();
    let layers = store.join("layers/sha256");
    let small = |holding: &[u8]| -> PathBuf {
        let found: Vec<PathBuf> = std::fs::read_dir(&layers)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "small"))
            .filter(|p| {
                let b = std::fs::read(p).unwrap();
                b.windows(holding.len()).any(|w| w == holding)
            })
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        found[0].clone()
    };
    let (services, page) = (test_bytes(20_000, 3), test_bytes(5_000, 4));
    let (base, top) = (small(&services), small(&page));
    let dir = tempfile::tempdir().unwrap();
    let reads_right = |case: &str| {
        let ro = Mounted::new(&bux, &r, dir.path().join("ro"), false);
        assert_eq!(mounted_as(&ro.path).0, "overlay", "{case}");
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        for (path, want) in [("etc/services", &services), ("srv/page", &page)] {
            let got = std::fs::read(ro.path.join(path)).unwrap();
            assert!(got == *want, "{case}: {path} differs");
        }
        assert_eq!(
            std::fs::read(ro.path.join("srv/marker")).unwrap(),
            b"top",
            "{case}"
        );
        ro.unmount();
        wait_until(&bux, "the server leaves", || servers(store).is_empty());
        assert!(
            server_logs(&bux).contains("writing it anew"),
            "{case}: not written anew"
        );
        // Nothing wrong with the image; a damaged small files' file is reported as such.
        let out = bux.run(&["check"]);
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        let small_damaged = said.contains(".small: cut short");
        assert!(out.status.success() != small_damaged, "{case}: {said}");
        assert_eq!(small_damaged, case == "cut short", "{case}: {said}");
        assert!(!said.contains(".erofs"), "{case}: {said}");
    };
    let (base_whole, whole) = (std::fs::read(&base).unwrap(), std::fs::read(&top).unwrap());
    // The top layer's file in the second format, as an earlier version wrote it: its table
    // (offset, length), then the files' bytes, each a zstd frame.
    let word = |at: usize| u64::from_le_bytes(whole[at..at + 8].try_into().unwrap()) as usize;
    let (table_at, table_len) = (word(8), word(16));
    let table = zstd::bulk::decompress(&whole[table_at..table_at + table_len], 1 << 20).unwrap();
    let count = u64::from_le_bytes(table[..8].try_into().unwrap()) as usize;
    let (mut records, mut bytes) = (table[..8].to_vec(), Vec::new());
    let mut tiny = &table[8 + 16 * count..];
    for r in table[8..8 + 16 * count].chunks(16) {
        let len = u32::from_le_bytes(r[8..12].try_into().unwrap()) as usize;
        let block = u32::from_le_bytes(r[12..16].try_into().unwrap()) as usize;
        records.extend_from_slice(&r[..12]);
        match block {
            0 => (bytes.extend_from_slice(&tiny[..len]), tiny = &tiny[len..]).0,
            b => bytes.extend_from_slice(&whole[b * 4096..b * 4096 + len]),
        }
    }
    assert!(bytes.windows(page.len()).any(|w| w == &page[..]));
    let records = zstd::bulk::compress(&records, 3).unwrap();
    let mut v2 = b"BUXSML\x00\x02".to_vec();
    v2.extend((records.len() as u64).to_le_bytes());
    v2.extend(records);
    v2.extend(zstd::bulk::compress(&bytes, 3).unwrap());
    let images = || -> Vec<PathBuf> {
        std::fs::read_dir(store.join("trees/sha256"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "erofs"))
            .collect()
    };
    let cases: [(&str, &Path, Option<&[u8]>); 3] = [
        ("gone", &base, None),
        ("cut short", &top, Some(&whole[..whole.len() / 2])),
        ("second format", &top, Some(&v2)),
    ];
    for (case, file, bytes) in cases {
        // An image written anew, naming both layers' files, mounted once.
        std::fs::write(&base, &base_whole).unwrap();
        std::fs::write(&top, &whole).unwrap();
        for i in images() {
            std::fs::remove_file(i).unwrap();
        }
        let ro = Mounted::new(&bux, &r, dir.path().join("ro"), false);
        ro.unmount();
        wait_until(&bux, "the server leaves", || servers(store).is_empty());
        assert!(!server_logs(&bux).contains("writing it anew"), "{case}");
        clear_logs(&bux);
        match bytes {
            None => std::fs::remove_file(file).unwrap(),
            Some(b) => std::fs::write(file, b).unwrap(),
        }
        reads_right(case);
    }
    // The image copies the bytes of the layer of the second format in (they are in it now).
    let image = std::fs::read(&images()[0]).unwrap();
    assert!(image.windows(page.len()).any(|w| w == &page[..]));
}

/// An image whose manifest names the same layer twice (with another between): its small
/// files' file is one device named twice, and the server mounts it, every file read as the
/// topmost copy has it; `check` finds nothing wrong.
#[test]
fn the_same_layer_twice_in_a_manifest() {
    let reg = Registry::start();
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/services", &test_bytes(20_000, 3))
        .file("etc/hosts", b"base\n")
        .finish();
    let mid = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/services", &test_bytes(9_000, 5))
        .file("etc/mid", &test_bytes(6_000, 6))
        .finish();
    let img = Image::new(vec![
        (base.clone(), Comp::Gzip),
        (mid, Comp::Gzip),
        (base, Comp::Gzip),
    ]);
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &img);
    reg.push(&work.path().join("l"), "v1", "t/twice", None);
    let r = format!("{}/t/twice:v1", reg.host());
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    // Three devices (the superblock's count of extra devices), two of them one file.
    let images: Vec<PathBuf> = std::fs::read_dir(bux.store.path().join("trees/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "erofs"))
        .collect();
    let image = std::fs::read(&images[0]).unwrap();
    assert_eq!(u16::from_le_bytes([image[1024 + 86], image[1024 + 87]]), 3);
    let dir = tempfile::tempdir().unwrap();
    let ro = Mounted::new(&bux, &r, dir.path().join("ro"), false);
    assert_eq!(mounted_as(&ro.path).0, "overlay");
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let read = |p: &str| std::fs::read(ro.path.join(p)).unwrap();
    assert!(read("etc/services") == test_bytes(20_000, 3));
    assert!(read("etc/mid") == test_bytes(6_000, 6));
    assert_eq!(read("etc/hosts"), b"base\n");
    ro.unmount();
    assert!(!server_logs(&bux).contains("writing it anew"));
    bux.ok(&["check"]);
}

/// An image the EROFS layout cannot carry (a 0/0 character device, which overlayfs takes for a
/// whiteout) is served with metadata from FUSE, with the reason in the server's log.
#[test]
fn an_image_the_metadata_image_cannot_carry_is_served_by_fuse() {
    let reg = Registry::start();
    let layer = LayerBuilder::new()
        .file("etc/os-release", b"ID=odd\n")
        .device("dev/odd", tar::EntryType::Char, 0, 0)
        .finish();
    let work = tempfile::tempdir().unwrap();
    write_layout(
        &work.path().join("l"),
        "v1",
        &Image::new(vec![(layer, Comp::Gzip)]),
    );
    reg.push(&work.path().join("l"), "v1", "t/odd", None);
    let r = format!("{}/t/odd:v1", reg.host());
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let dir = tempfile::tempdir().unwrap();
    let ro = Mounted::new(&bux, &r, dir.path().join("ro"), false);
    let rw = Mounted::new(&bux, &r, dir.path().join("rw"), true);
    assert_eq!(mounted_as(&ro.path).0, "fuse.bux-fuse");
    assert!(!mounted_as(&rw.path).1.contains("::"));
    assert!(
        server_logs(&bux).contains("metadata served by FUSE"),
        "{}",
        server_logs(&bux)
    );
    use std::os::unix::fs::FileTypeExt;
    let odd = std::fs::symlink_metadata(ro.path.join("dev/odd")).unwrap();
    assert!(odd.file_type().is_char_device());
    assert_eq!(
        std::fs::read(rw.path.join("etc/os-release")).unwrap(),
        b"ID=odd\n"
    );
    ro.unmount();
    rw.unmount();
}

/// A worker that hangs (stopped) rather than dies is ended by its supervisor, whose probe it
/// no longer answers, and another takes over the connection: a VM's read waiting on the
/// stopped one is answered, with the right bytes.
#[test]
fn a_stopped_worker_is_replaced_under_its_mounts() {
    if !kernel_resends_fuse_requests() {
        eprintln!("skipped: the kernel resends no FUSE request to a new worker (before 6.9)");
        return;
    }
    let reg = Registry::start();
    let r = image(&reg, "t/stopped");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw");
    let _guard = Mounted::new(&bux, &r, rw.clone(), true);
    let expect = test_bytes(3 << 20, 7);
    let w = worker(bux.store.path());
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    Command::new("kill")
        .args(["-STOP", &w.to_string()])
        .status()
        .unwrap();
    // Should the worker not be ended, the read would wait for good: end it after 90 s, for
    // the test to fail rather than hang.
    let reader = std::thread::spawn(move || std::fs::read(rw.join("big.bin")).unwrap());
    let t = Instant::now();
    while !reader.is_finished() && t.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let finished = reader.is_finished();
    if !finished {
        kill_image_servers(bux.store.path()); // the connection ends, the read fails
    }
    assert!(finished, "the read waited 90 s");
    assert!(reader.join().unwrap() == expect, "the right bytes");
    assert_ne!(worker(bux.store.path()), w, "another worker");
    let logs = server_logs(&bux);
    assert!(logs.contains("answered nothing"), "{logs}");
}

/// Hardening II, finding 3: a worker that takes over finds the image by the manifest its
/// supervisor leased, not by the name in `images.json`: here the name was re-tagged to another
/// image and then removed with `rm --force`. Before the fix the new worker could not find
/// the image, the supervisor retried every second forever, and every read hung.
#[test]
fn a_restarted_worker_serves_its_image_after_a_retag_and_rm_force() {
    let reg = Registry::start();
    let r = image(&reg, "t/retag");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    let guard = Mounted::new(&bux, &r, ro.clone(), false);
    assert_eq!(std::fs::read(ro.join("srv/marker")).unwrap(), b"top");
    // The name now means another image (pushed under the same tag), then nothing at all.
    let other = LayerBuilder::new().file("srv/marker", b"other").finish();
    let work = tempfile::tempdir().unwrap();
    write_layout(
        &work.path().join("l"),
        "v1",
        &Image::new(vec![(other, Comp::Gzip)]),
    );
    reg.push(&work.path().join("l"), "v1", "t/retag", None);
    bux.ok(&["pull", "-q", "--pull", "always", &r]);
    bux.ok(&["rm", "--force", &r]);
    let w = worker(bux.store.path());
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    Command::new("kill")
        .args(["-9", &w.to_string()])
        .status()
        .unwrap();
    wait_until(&bux, "a new worker", || {
        servers(bux.store.path())
            .iter()
            .any(|(p, wk)| *wk && *p != w)
    });
    // Read in a thread: a hang must fail the test, not stall it.
    let path = ro.join("big.bin");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(path).map_err(|e| e.to_string()));
    });
    let got = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a read hung after the worker restarted")
        .unwrap();
    assert!(
        got == test_bytes(3 << 20, 7),
        "the worker serves another image"
    );
    assert_eq!(std::fs::read(ro.join("srv/marker")).unwrap(), b"top");
    guard.unmount();
    wait_until(&bux, "released", || servers(bux.store.path()).is_empty());
}

/// Images whose metadata image the kernel would misread or overlayfs could not follow: one
/// with a file of over 256 KiB of xattrs (past the 16-bit count of an EROFS inode's xattrs; a
/// PAX header may hold a MiB), one with a large file at a path of over 4 KiB (past what an
/// overlay redirect can name). Both are served with metadata from FUSE, the reason in the
/// server's log, and the file whole: its data, its xattrs, and it opens.
#[test]
fn files_the_metadata_image_cannot_carry_are_served_whole_by_fuse() {
    let reg = Registry::start();
    let data = test_bytes(300_000, 11);
    let values: Vec<(String, Vec<u8>)> = (0..5u8)
        .map(|i| (format!("user.big{i}"), vec![b'a' + i; 60_000]))
        .collect();
    let xattrs: Vec<(&str, &[u8])> = values
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let dirs: Vec<String> = (0..17).map(|i| format!("{i:d>250}")).collect();
    let long = format!("{}/file", dirs.join("/"));
    assert!(long.len() > 4200);
    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    for (repo, layer, why) in [
        (
            "t/xattrs",
            LayerBuilder::new().file_xattrs("x", &data, &xattrs),
            "xattrs of",
        ),
        (
            "t/long",
            LayerBuilder::new().file(&long, &data),
            "a path of",
        ),
    ] {
        let layer = layer.file("etc/os-release", b"ID=odd\n").finish();
        let work = tempfile::tempdir().unwrap();
        let img = Image::new(vec![(layer, Comp::Gzip)]);
        write_layout(&work.path().join("l"), "v1", &img);
        reg.push(&work.path().join("l"), "v1", repo, None);
        let r = format!("{}/{repo}:v1", reg.host());
        bux.ok(&["pull", "-q", &r]);
        let m = Mounted::new(&bux, &r, dir.path().join(repo.replace('/', "-")), false);
        if repo == "t/xattrs" {
            let x = m.path.join("x");
            assert_eq!(std::fs::read(&x).unwrap(), data);
            for (name, value) in &values {
                assert_eq!(&get_xattr(&x, name).unwrap(), value, "{name}");
            }
        } else {
            let mut f = open_long(&m.path, &long).unwrap();
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut got).unwrap();
            assert!(got == data, "the long path's data differs");
        }
        let log = server_logs(&bux);
        assert!(
            log.contains("metadata served by FUSE") && log.contains(why),
            "{log}"
        );
        m.unmount();
    }
}

/// lgetxattr(2).
fn get_xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    use std::ffi::CString;
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65_536];
    // SAFETY: valid path, name and buffer.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// Opens `rel` under `root`, a path too long for open(2): its directories a few at a time.
fn open_long(root: &Path, rel: &str) -> std::io::Result<std::fs::File> {
    use std::ffi::CString;
    use std::os::fd::FromRawFd;
    let c = |s: &[u8]| CString::new(s).unwrap();
    let root = c(root.as_os_str().as_encoded_bytes());
    // SAFETY: a valid path.
    let mut fd = unsafe { libc::open(root.as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
    let parts: Vec<&str> = rel.split('/').collect();
    let (dirs, name) = parts.split_at(parts.len() - 1);
    let steps: Vec<(&[&str], libc::c_int)> = dirs
        .chunks(8)
        .map(|c| (c, libc::O_PATH | libc::O_DIRECTORY))
        .chain([(name, libc::O_RDONLY)])
        .collect();
    for (chunk, flags) in steps {
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let p = c(chunk.join("/").as_bytes());
        // SAFETY: fd is an open directory, p a valid relative path.
        let next = unsafe { libc::openat(fd, p.as_ptr(), flags) };
        let err = std::io::Error::last_os_error();
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        if next < 0 {
            return Err(err);
        }
        fd = next;
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is an open file, ours.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// `gc` removes what an image server that has left kept (its log, recorded FUSE_INIT, pid
/// files, leased record, mount points), and keeps that of a live one. Before, `shared/<hex>/`
/// stayed for good.
#[test]
fn gc_removes_the_state_of_servers_that_have_left() {
    let reg = Registry::start();
    let r = image(&reg, "t/gcplace");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let dir = tempfile::tempdir().unwrap();
    let m = Mounted::new(&bux, &r, dir.path().join("ro"), false);
    let places = || -> Vec<PathBuf> {
        std::fs::read_dir(bux.store.path().join("shared"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    assert_eq!(places().len(), 1);
    bux.ok(&["gc"]);
    assert_eq!(places().len(), 1, "a live server's state was removed");
    assert!(places()[0].join("log").exists());
    m.unmount();
    wait_until(&bux, "released", || servers(bux.store.path()).is_empty());
    let out = bux.ok(&["gc"]);
    assert!(
        out.contains("state of 1 image server that has left"),
        "{out}"
    );
    assert_eq!(places(), Vec::<PathBuf>::new());
    // And the image mounts again as ever.
    let m = Mounted::new(&bux, &r, dir.path().join("ro"), false);
    assert_eq!(
        std::fs::read(dir.path().join("ro/srv/marker")).unwrap(),
        b"top"
    );
    m.unmount();
}

/// #14: each image's worker runs as ids of its own, derived from its manifest digest, so a
/// worker subverted by one image cannot signal (nor, being another user, touch) the worker of
/// another: `kill -0` from the first one's ids at the second is refused.
#[test]
fn workers_of_two_images_run_as_ids_of_their_own() {
    let reg = Registry::start();
    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    let a = image(&reg, "t/ids-a");
    let b = {
        let layer = LayerBuilder::new().file("other", b"another image").finish();
        let work = tempfile::tempdir().unwrap();
        write_layout(
            &work.path().join("l"),
            "v1",
            &Image::new(vec![(layer, Comp::Gzip)]),
        );
        reg.push(&work.path().join("l"), "v1", "t/ids-b", None);
        format!("{}/t/ids-b:v1", reg.host())
    };
    bux.ok(&["pull", "-q", &a]);
    bux.ok(&["pull", "-q", &b]);
    let _ma = Mounted::new(&bux, &a, dir.path().join("a"), false);
    let _mb = Mounted::new(&bux, &b, dir.path().join("b"), false);
    let workers: Vec<u32> = servers(bux.store.path())
        .into_iter()
        .filter(|(_, w)| *w)
        .map(|(p, _)| p)
        .collect();
    assert_eq!(workers.len(), 2, "a worker per image: {workers:?}");
    let ids = |pid: u32| -> (String, String) {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        (field("Uid:"), field("Gid:"))
    };
    let (ua, ga) = ids(workers[0]);
    let (ub, gb) = ids(workers[1]);
    for (u, g) in [(&ua, &ga), (&ub, &gb)] {
        let first = u.split(' ').next().unwrap();
        assert!(first != "0" && first != "65534", "uid {u}");
        assert_eq!(u, &[first; 4].join(" "), "real, effective, saved, fs: {u}");
        assert_eq!(g, u, "gid as uid");
    }
    assert_ne!(ua, ub, "two images' workers share their uid");
    let uid_a = ua.split(' ').next().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid", uid_a, "--regid", uid_a, "--clear-groups"])
        .args(["kill", "-0", &workers[1].to_string()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the first worker's ids may signal the second"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not permitted"), "{err}");
    // A worker's ids can signal itself (the check above is about ids, not about kill).
    let own = Command::new("setpriv")
        .args(["--reuid", uid_a, "--regid", uid_a, "--clear-groups"])
        .args(["kill", "-0", &workers[0].to_string()])
        .output()
        .unwrap();
    assert!(own.status.success(), "{own:?}");
}

/// #14: what confines a daemon of its own (`--own-server`; lazy mounts' workers likewise), as the
/// README states it: `no_new_privs` and the seccomp filter, and nothing else: it stays uid 0
/// with root's capabilities (so the kernel's ptrace rules let it write other processes'
/// memory through `/proc/PID/mem`; see `sandbox::tests::proc_mem_writes_under_each_confinement`).
#[test]
fn a_daemon_of_its_own_is_root_under_the_seccomp_filter() {
    let reg = Registry::start();
    let bux = Bux::new();
    let r = image(&reg, "t/own");
    let m = bux.mount_with(&r, &["--own-server"]);
    let pid = daemon_pid(&m.path).expect("the mount's daemon");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"),
        "{status}"
    );
    assert!(status.contains("Uid:\t0\t0\t0\t0"), "{status}");
    assert!(!status.contains("CapEff:\t0000000000000000"), "{status}");
}

/// Root's disk mounts of one image stand on one disk server: every `mount --disk` binds its
/// one FUSE mount, so all VMs open the same `root.erofs` (one inode, one page cache, one
/// server); a worker killed with -9 is replaced under them; the server leaves with the last
/// mount. A disk mount beside a directory mount of the image: two servers, one each.
#[test]
fn disk_mounts_of_an_image_share_one_disk_server() {
    let reg = Registry::start();
    let r = image(&reg, "t/disk-density");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let dirs = tempfile::tempdir().unwrap();
    let mount = |name: &str| {
        let path = dirs.path().join(name);
        bux.ok(&["mount", "-q", "--disk", &r, path.to_str().unwrap()]);
        Mounted { bux: &bux, path }
    };
    let (a, b, c) = (mount("a"), mount("b"), mount("c"));
    let disk = |m: &Mounted| m.path.join("root.erofs");
    let ids: std::collections::BTreeSet<(u64, u64)> = [&a, &b, &c]
        .iter()
        .map(|m| {
            let md = std::fs::metadata(disk(m)).unwrap();
            (md.dev(), md.ino())
        })
        .collect();
    assert_eq!(ids.len(), 1, "three disks, not one: {ids:?}");
    assert_eq!(fuse_devices(&r).len(), 1);
    let servers_now = servers(bux.store.path());
    assert_eq!(servers_now.len(), 2, "{servers_now:?}"); // a supervisor and its worker
    let want = std::fs::read(disk(&a)).unwrap();
    assert!(want.len() > 3 << 20);

    // A worker killed with -9: the supervisor starts another on the same connection.
    let w = worker(bux.store.path());
    // SAFETY: sending a signal to a process of this test's.
    unsafe { libc::kill(w as i32, libc::SIGKILL) };
    wait_until(&bux, "a new worker", || {
        servers(bux.store.path())
            .iter()
            .any(|(p, is_worker)| *is_worker && *p != w)
    });
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert!(std::fs::read(disk(&b)).unwrap() == want, "the disk changed");

    // A directory mount of the image has a server of its own.
    let dir = Mounted::new(&bux, &r, dirs.path().join("dir"), false);
    assert_eq!(servers(bux.store.path()).len(), 4);
    dir.unmount();

    // The first mount goes; the others still read; the last one takes the server with it.
    a.unmount();
    assert!(std::fs::read(disk(&c)).unwrap() == want);
    b.unmount();
    c.unmount();
    wait_until(&bux, "the disk server leaves", || {
        servers(bux.store.path()).is_empty()
    });
    assert!(fuse_devices(&r).is_empty());
}
