//! End to end through real parts: images built here, pushed by skopeo to Debian's
//! docker-registry on 127.0.0.1, pulled and mounted by bux-fuse, read through the kernel, and
//! compared field by field with umoci's unpack of the same image.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;

/// Three layers, one per compression, exercising whiteouts, hardlinks, symlinks, xattrs,
/// devices, special modes and a file spanning many gzip checkpoints.
fn sample_image() -> Image {
    let big = test_bytes(5 << 20, 7);
    let l1 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", b"NAME=bux-test\nID=bux\n")
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        .dir("etc/conf.d", 0o755)
        .file("etc/conf.d/a.conf", b"a=1\n")
        .file("etc/conf.d/b.conf", b"b=1\n")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file_with("usr/bin/sudo", b"#!/bin/sh\n", 0o4755, 0, 0)
        .file("usr/bin/tool", b"tool v1\n")
        .hardlink("usr/bin/tool-alias", "usr/bin/tool")
        .file("usr/share/big.bin", &big) // parents implied
        .dir("tmp", 0o1777)
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .file("var/cache/old", b"stale\n")
        .finish();
    let l2 = LayerBuilder::new()
        .whiteout("etc/conf.d", "a.conf")
        .opaque("var/cache")
        .dir("var/cache", 0o755)
        .file("var/cache/new", b"fresh\n")
        .file_xattrs(
            "usr/bin/ping",
            b"ping\n",
            &[("security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"), ("user.origin", b"layer2")],
        )
        .symlink("usr/bin/sh-link", "/usr/bin/tool")
        .symlink("etc/relative", "../usr/share")
        .symlink("dangling", "/nowhere/at/all")
        .device("dev-null", tar::EntryType::Char, 1, 3)
        .device("dev-fifo", tar::EntryType::Fifo, 0, 0)
        .file_with("home-file", b"owned\n", 0o640, 70000, 70001)
        .finish();
    let l3 = LayerBuilder::new()
        .file("etc/os-release", b"NAME=bux-test\nID=bux\nVERSION=3\n")
        .whiteout("var", "cache")
        .file_with("usr/bin/tool", b"tool v2\n", 0o755, 0, 0) // breaks the link for this name
        .dir("opt/app", 0o700)
        .file("opt/app/data", &test_bytes(300_000, 9))
        .finish();
    Image::new(vec![(l1, Comp::Gzip), (l2, Comp::Zstd), (l3, Comp::Plain)])
}

#[test]
fn mounted_tree_matches_umoci_unpack() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = sample_image();
    let layout = work.path().join("layout");
    write_layout(&layout, "v1", &image);
    reg.push(&layout, "v1", "test/sample", None);
    // umoci cannot read zstd: unpack the same tars gzip-compressed.
    let gz_layout = work.path().join("layout-gz");
    write_layout(&gz_layout, "v1", &image.as_gzip());
    let reference = work.path().join("reference");
    umoci_unpack(&gz_layout, "v1", &reference);

    let bux = Bux::new();
    let r = format!("{}/test/sample:v1", reg.host());
    let out = bux.run(&["pull", &r]);
    assert_success(&out);
    // As root, the pull also writes the metadata image root's shared mounts stand on.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("metadata image (EROFS, small files included)"),
        "{said}"
    );
    let m = bux.mount(&r);
    let root = &m.path;

    // umoci is wrong on three mtimes: implied parents (usr/share, opt) keep
    // unpack time, and so does `usr`, whose mtime umoci does not restore after creating the
    // implied usr/share in it. bux-fuse gives implied parents mtime 0 and `usr` its tar mtime.
    let (equal, report) = treediff(
        root,
        &reference,
        &[
            "--ignore-root",
            "--ignore-mtime-of",
            "usr/share",
            "--ignore-mtime-of",
            "opt",
            "--ignore-mtime-of",
            "usr",
        ],
    );
    assert!(equal, "mounted tree differs from umoci's unpack:\n{report}");

    // Reads through the kernel: the big gzip file at random offsets and whole.
    let big = std::fs::read(root.join("usr/share/big.bin")).unwrap();
    assert_eq!(sha256_hex(&big), sha256_hex(&test_bytes(5 << 20, 7)));
    // Hardlinks share an inode; the replaced name does not.
    let alias = std::fs::metadata(root.join("usr/bin/tool-alias")).unwrap();
    let tool = std::fs::metadata(root.join("usr/bin/tool")).unwrap();
    assert_ne!(alias.ino(), tool.ino());
    assert_eq!(
        std::fs::read(root.join("usr/bin/tool-alias")).unwrap(),
        b"tool v1\n"
    );
    assert_eq!(
        std::fs::read(root.join("usr/bin/tool")).unwrap(),
        b"tool v2\n"
    );
    assert!(!root.join("var/cache").exists());
    assert!(!root.join("etc/conf.d/a.conf").exists());
    // Read-only.
    let err = std::fs::write(root.join("etc/passwd"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    // Inode numbers are stable across remounts (virtio-fs keys inodes by them).
    let ino_before = std::fs::metadata(root.join("usr/share/big.bin"))
        .unwrap()
        .ino();
    drop(m);
    let m2 = bux.mount(&r);
    assert_eq!(
        std::fs::metadata(m2.path.join("usr/share/big.bin"))
            .unwrap()
            .ino(),
        ino_before
    );
}

#[test]
fn hardlinks_share_inode_and_count() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let l = LayerBuilder::new()
        .file("a", b"same bytes")
        .hardlink("b", "a")
        .hardlink("dir/c", "b")
        .finish();
    let layout = work.path().join("layout");
    write_layout(&layout, "t", &Image::new(vec![(l, Comp::Gzip)]));
    reg.push(&layout, "t", "test/links", None);
    let bux = Bux::new();
    let m = bux.mount_with(&format!("{}/test/links:t", reg.host()), &["--own-server"]);
    let metas: Vec<_> = ["a", "b", "dir/c"]
        .iter()
        .map(|p| std::fs::metadata(m.path.join(p)).unwrap())
        .collect();
    assert!(metas.iter().all(|x| x.ino() == metas[0].ino()));
    assert!(metas.iter().all(|x| x.nlink() == 3));
    assert_eq!(std::fs::read(m.path.join("dir/c")).unwrap(), b"same bytes");
    // The daemon serving it is confined (seccomp, no_new_privs) once mounted.
    let pid = daemon_pid(&m.path).expect("daemon");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"),
        "{status}"
    );
}

#[test]
fn readdir_offsets_are_stable() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut l = LayerBuilder::new().dir("many", 0o755);
    for i in 0..3000 {
        l = l.file(&format!("many/f{i:05}"), b"");
    }
    let layout = work.path().join("layout");
    write_layout(&layout, "t", &Image::new(vec![(l.finish(), Comp::Gzip)]));
    reg.push(&layout, "t", "test/many", None);
    let bux = Bux::new();
    let m = bux.mount(&format!("{}/test/many:t", reg.host()));
    let dir = m.path.join("many");
    // Seek to the offset telldir gave after k entries: the listing resumes at entry k + 1.
    let names = list_with_seek(&dir, 1234);
    assert_eq!(names.0.len(), 3002);
    assert_eq!(names.1, names.0[1235..].to_vec());
}

/// Lists `dir` with readdir; then seeks to the position after entry `k` and lists the rest.
fn list_with_seek(dir: &Path, k: usize) -> (Vec<String>, Vec<String>) {
    use std::ffi::{CStr, CString};
    let c = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: plain libc directory stream use on a valid path, closed at the end.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null());
        let mut all = Vec::new();
        let mut pos_after_k = 0;
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            all.push(
                CStr::from_ptr((*e).d_name.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
            );
            if all.len() == k + 1 {
                pos_after_k = libc::telldir(d);
            }
        }
        libc::seekdir(d, pos_after_k);
        let mut rest = Vec::new();
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            rest.push(
                CStr::from_ptr((*e).d_name.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        libc::closedir(d);
        (all, rest)
    }
}

/// File handles (NFS export, virtiofsd --inode-file-handles, overlay origin) decode after the
/// kernel forgot the inode: the mount answers lookups of "." and "..", which it advertises
/// export support for.
#[test]
fn file_handles_decode_after_the_inode_is_forgotten() {
    use std::os::fd::AsRawFd;
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let l = LayerBuilder::new()
        .file("deep/er/file", b"by handle\n")
        .finish();
    let layout = work.path().join("layout");
    write_layout(&layout, "t", &Image::new(vec![(l, Comp::Gzip)]));
    reg.push(&layout, "t", "test/handles", None);
    let bux = Bux::new();
    let m = bux.mount(&format!("{}/test/handles:t", reg.host()));
    let root = std::fs::File::open(&m.path).unwrap();
    let mut handles = Vec::new();
    for p in ["deep/er/file", "deep/er"] {
        let path = std::ffi::CString::new(m.path.join(p).as_os_str().as_encoded_bytes()).unwrap();
        // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[128] }
        let mut buf = vec![0u8; 8 + 128];
        buf[..4].copy_from_slice(&128u32.to_ne_bytes());
        let mut mount_id = 0;
        // SAFETY: buf is a file_handle with room for 128 bytes; path is a valid C string.
        let r = unsafe {
            libc::name_to_handle_at(
                libc::AT_FDCWD,
                path.as_ptr(),
                buf.as_mut_ptr().cast(),
                &mut mount_id,
                0,
            )
        };
        assert_eq!(
            r,
            0,
            "name_to_handle_at {p}: {}",
            std::io::Error::last_os_error()
        );
        handles.push(buf);
    }
    // Make the kernel forget the dentries and inodes.
    std::fs::write("/proc/sys/vm/drop_caches", "2\n").unwrap();
    for (mut h, flags) in handles
        .into_iter()
        .zip([libc::O_RDONLY, libc::O_RDONLY | libc::O_DIRECTORY])
    {
        // SAFETY: h holds the handle name_to_handle_at wrote.
        let fd = unsafe { libc::open_by_handle_at(root.as_raw_fd(), h.as_mut_ptr().cast(), flags) };
        assert!(
            fd >= 0,
            "open_by_handle_at: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just opened and is owned here.
        unsafe { libc::close(fd) };
    }
    assert_eq!(
        std::fs::read(m.path.join("deep/er/file")).unwrap(),
        b"by handle\n"
    );
}

/// Names that are not there are answered with negative entries the kernel caches: probing the
/// same missing names again (ld.so, Python's import path) costs no round trip.
#[test]
fn missing_names_are_cached_by_the_kernel() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let l = LayerBuilder::new()
        .file("usr/lib/present.so", b"x")
        .finish();
    let layout = work.path().join("layout");
    write_layout(&layout, "t", &Image::new(vec![(l, Comp::Gzip)]));
    reg.push(&layout, "t", "test/negative", None);
    let bux = Bux::new();
    let r = format!("{}/test/negative:t", reg.host());
    bux.ok(&["pull", "-q", &r]);
    let store = bux_fuse::Store::open(bux.store.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = bux_fuse::mount(
        &store,
        &r,
        &dir.path().join("root"),
        &bux_fuse::MountOptions::default(),
    )
    .unwrap();
    let probe = |n: usize| {
        for i in 0..n {
            assert!(!m.path().join(format!("usr/lib/missing{i}.so")).exists());
        }
    };
    probe(50);
    let first = m.stats().lookups;
    probe(50);
    let again = m.stats().lookups - first;
    assert!(first >= 50, "{first} lookups for 50 missing names");
    assert_eq!(again, 0, "{again} lookups for names already known missing");
    // As root, the mount's read-ahead is raised from FUSE's 128 KiB.
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(m.path()).unwrap().dev();
    let ra = std::fs::read_to_string(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    ))
    .unwrap();
    assert_eq!(ra.trim(), bux_fuse::mount::READ_AHEAD_KB.to_string());
    assert!(m.path().join("usr/lib/present.so").exists());
    m.unmount().unwrap();
}

/// A merged tree damaged on disk (truncated, or bytes flipped) is rebuilt from the layer
/// indexes at the next mount, which serves the image as before; with the indexes damaged too,
/// the mount fails in one line naming the file, and `check --repair` brings the store back.
#[test]
fn damaged_tree_files_are_rebuilt_or_refused_clearly() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, "t", &sample_image());
    reg.push(&layout, "t", "test/damaged", None);
    let r = format!("{}/test/damaged:t", reg.host());
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let files = |dir: &str, ext: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(bux.store.path().join(dir))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect()
    };
    let tree = files("trees/sha256", "tree").pop().expect("a tree file");
    let reference = {
        let m = bux.mount(&r);
        umoci_like_listing(&m.path)
    };
    let good = std::fs::read(&tree).unwrap();
    for damage in ["truncate", "flip", "one byte"] {
        let mut bytes = good.clone();
        match damage {
            "truncate" => bytes.truncate(bytes.len() / 2),
            // Inside the records: the header still reads, the checksum does not.
            "one byte" => bytes[good.len() / 2] ^= 0x01,
            _ => {
                for i in (8..bytes.len()).step_by(7) {
                    bytes[i] ^= 0x5a;
                }
            }
        }
        std::fs::write(&tree, &bytes).unwrap();
        let m = bux.mount(&r);
        assert_eq!(umoci_like_listing(&m.path), reference, "after {damage}");
        drop(m);
        assert_eq!(
            std::fs::read(&tree).unwrap(),
            good,
            "rebuilt after {damage}"
        );
    }
    // A tree an earlier version wrote (its format older) is merged again without a warning:
    // expected once after an upgrade, not damage.
    let mut older = good.clone();
    older[7] -= 1;
    std::fs::write(&tree, &older).unwrap();
    // Nor is it a problem to `check` (which merges it again too).
    bux.ok(&["check"]);
    std::fs::write(&tree, &older).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("m");
    let out = bux.run(&["mount", &r, at.to_str().unwrap()]);
    assert_success(&out);
    let m = MountGuard::adopt(at, dir);
    assert_eq!(umoci_like_listing(&m.path), reference);
    drop(m);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("WARN") && !err.contains("rebuilt"), "{err}");
    assert_eq!(std::fs::read(&tree).unwrap(), good, "merged again");
    // Tree and layer indexes damaged: one line, naming what is damaged.
    std::fs::write(&tree, b"junk").unwrap();
    for idx in files("layers/sha256", "idx") {
        std::fs::write(idx, b"junk").unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let err = bux.fails(&["mount", "-q", &r, dir.path().join("m").to_str().unwrap()]);
    assert!(
        err.trim().lines().count() == 1 && err.contains(".idx") && err.contains("check --repair"),
        "{err}"
    );
    assert!(!is_mounted(&dir.path().join("m")));
    bux.ok(&["check", "--repair"]);
    let m = bux.mount(&r);
    assert_eq!(umoci_like_listing(&m.path), reference);
    drop(m);
    // The zstd layer's re-framed copy cut short (a crash before it reached the disk): the
    // next pull finds it incomplete and fetches the layer again; the mount is whole.
    let zst = files("layers/sha256", "zst")
        .pop()
        .expect("a zstd layer's copy");
    let len = std::fs::metadata(&zst).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&zst).unwrap();
    f.set_len(len - 100).unwrap();
    drop(f);
    let out = bux.run(&["pull", &r]);
    assert_success(&out);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(!progress.contains("already in the store"), "{progress}");
    assert_eq!(std::fs::metadata(&zst).unwrap().len(), len);
    let m = bux.mount(&r);
    assert_eq!(umoci_like_listing(&m.path), reference);
}

/// Every path under `root` with its type, mode and size, and each file's bytes hashed.
fn umoci_like_listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let data = if md.is_file() {
                sha256_hex(&std::fs::read(&p).unwrap())
            } else {
                String::new()
            };
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.push(format!(
                "{} {:o} {} {data}",
                p.strip_prefix(root).unwrap().display(),
                md.mode(),
                md.len()
            ));
        }
    }
    out.sort();
    out
}

/// Root's mounts enforce the image's POSIX ACLs (`system.posix_acl_access`) for the host's
/// users, as a local filesystem would: an ACL entry denies a user what the mode bits allow,
/// and grants another what they deny.
#[test]
fn posix_acls_are_enforced_on_roots_mounts() {
    let user = AsUser::new();
    // struct posix_acl_xattr: version 2, then (tag u16, perm u16, id u32) sorted by tag, id.
    // The mask is the mode's group bits (the kernel consults ACLs only when those are set).
    let acl = |user_perm: u16, other_perm: u16| -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (0x01u16, 6u16, u32::MAX),    // owner rw-
            (0x02, user_perm, user.uid),  // the test user
            (0x04, 4, u32::MAX),          // group r--
            (0x10, 4, u32::MAX),          // mask r--
            (0x20, other_perm, u32::MAX), // others
        ] {
            v.extend(tag.to_le_bytes());
            v.extend(perm.to_le_bytes());
            v.extend(id.to_le_bytes());
        }
        v
    };
    let (deny, grant) = (acl(0, 4), acl(4, 0));
    let mut b = tar::Builder::new(Vec::new());
    for (name, mode, acl) in [
        ("denied", 0o644, Some(&deny)),
        ("granted", 0o640, Some(&grant)),
        ("plain", 0o644, None),
    ] {
        if let Some(acl) = acl {
            b.append_pax_extensions([("SCHILY.xattr.system.posix_acl_access", &acl[..])])
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(3);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, &b"ok\n"[..]).unwrap();
    }
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let layer = b.into_inner().unwrap();
    write_layout(&layout, "t", &Image::new(vec![(layer, Comp::Gzip)]));
    reg.push(&layout, "t", "test/acl", None);
    let bux = Bux::new();
    let m = bux.mount(&format!("{}/test/acl:t", reg.host()));
    std::fs::set_permissions(
        m.path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let cat = |name: &str| {
        user.sh(&format!("cat {}", m.path.join(name).display()))
            .status
            .success()
    };
    assert!(cat("plain"), "mode bits allow it");
    assert!(!cat("denied"), "the ACL denies what the mode bits allow");
    assert!(cat("granted"), "the ACL grants what the mode bits deny");
}

/// A pull leaves its caller's executor free: on a current-thread runtime, a task that asks to
/// run every millisecond keeps running while the pull merges the layers, saves the tree and
/// writes the metadata image — the progress callback, called there, waits until it has run
/// (which it could not if that work held the executor's one thread). A count, not a time. The
/// metadata image written at the pull is the one `check` expects.
#[test]
fn a_pull_leaves_the_callers_executor_free() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, "t", &sample_image());
    reg.push(&layout, "t", "test/executor", None);
    let r = format!("{}/test/executor:t", reg.host());
    let bux = Bux::new();
    let store = bux_fuse::Store::open(bux.store.path()).unwrap();
    let ticks = Arc::new(AtomicU64::new(0));
    // Per phase waited in: whether the ticker ran meanwhile.
    let waited = Arc::new(std::sync::Mutex::new(Vec::new()));
    let progress: bux_fuse::pull::ProgressFn = {
        let (ticks, waited) = (ticks.clone(), waited.clone());
        Arc::new(move |p| {
            let phase = match p {
                bux_fuse::Progress::Merged { .. } => "merged",
                bux_fuse::Progress::MetadataImage { .. } => "metadata image",
                _ => return,
            };
            let before = ticks.load(Ordering::SeqCst);
            let mut ran = false;
            for _ in 0..30_000 {
                if ticks.load(Ordering::SeqCst) > before + 2 {
                    ran = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            waited.lock().unwrap().push((phase, ran));
        })
    };
    let opts = bux_fuse::PullOptions {
        progress: Some(progress),
        registry: bux_fuse::registry::RegistryOptions {
            insecure: vec![reg.host()],
            ..Default::default()
        },
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    rt.block_on(async {
        let ticker = {
            let (ticks, done) = (ticks.clone(), done.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_millis(1));
                while !done.load(Ordering::SeqCst) {
                    every.tick().await;
                    ticks.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let pulled = store.pull(&r, &opts).await;
        done.store(true, Ordering::SeqCst);
        ticker.await.unwrap();
        pulled.unwrap();
    });
    let waited = waited.lock().unwrap().clone();
    assert!(!waited.is_empty(), "no merge reported");
    for (phase, ran) in waited {
        assert!(
            ran,
            "the executor did not run while the pull was at: {phase}"
        );
    }
    let out = bux.ok(&["check"]);
    assert!(out.contains(": 0 problems"), "{out}");
}

/// What a runtime calls for a block root: `mount` with `disk` set gives the disk's path and the
/// guest's mount arguments; many readers of the disk at once (a VM each) read the same bytes,
/// which are what `export` writes; a writable disk is refused in one line.
#[test]
fn a_library_disk_mount_names_its_disk_for_the_vmm() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, "t", &sample_image());
    reg.push(&layout, "t", "test/disk", None);
    let r = format!("{}/test/disk:t", reg.host());
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let store = bux_fuse::Store::open(bux.store.path()).unwrap();
    let opts = bux_fuse::MountOptions {
        disk: true,
        ..Default::default()
    };
    let m = bux_fuse::mount(&store, &r, &work.path().join("d"), &opts).unwrap();
    let disk = m.disk().expect("a disk mount names its disk");
    assert_eq!(disk.path, work.path().join("d/root.erofs"));
    assert_eq!((disk.fs_type, disk.read_only), ("erofs", true));
    let exported = work.path().join("exported.erofs");
    bux_fuse::disk::export(&store, &r, &exported, &Default::default(), &mut |_, _| {}).unwrap();
    let want = std::fs::read(&exported).unwrap();
    // fsck.erofs reads it back as umoci unpacks the image (but for what its extraction, 1.5's,
    // does not keep: it writes hardlinks as copies and no xattrs, and chowns after chmod, which
    // drops the setuid bit of usr/bin/sudo; tests/conformance.rs reads a disk through the
    // kernel, which keeps them all).
    if std::path::Path::new("/usr/bin/fsck.erofs").exists() {
        let extracted = work.path().join("extracted");
        let out = std::process::Command::new("fsck.erofs")
            .arg(format!("--extract={}", extracted.display()))
            .arg("--preserve")
            .arg(&exported)
            .output()
            .unwrap();
        assert!(out.status.success(), "fsck.erofs --extract: {out:?}");
        // (umoci unpacks no zstd layers: the same tars, gzipped.)
        let gz_layout = work.path().join("layout-gz");
        write_layout(&gz_layout, "t", &sample_image().as_gzip());
        let unpacked = work.path().join("unpacked");
        umoci_unpack(&gz_layout, "t", &unpacked);
        let (equal, report) = treediff(
            &extracted,
            &unpacked,
            &[
                "--ignore-root",
                "--ignore-dir-mtime",
                "--no-hardlinks",
                "--no-xattr",
                "--exclude",
                "usr/bin/sudo",
            ],
        );
        assert!(
            equal,
            "fsck.erofs's extraction differs from umoci's:\n{report}"
        );
    }
    let readers: Vec<_> = (0..40)
        .map(|_| {
            let path = disk.path.clone();
            std::thread::spawn(move || std::fs::read(path).unwrap())
        })
        .collect();
    for r in readers {
        assert!(r.join().unwrap() == want, "a reader saw other bytes");
    }
    // A mount that is not a disk names none.
    let plain = bux_fuse::mount(&store, &r, &work.path().join("p"), &Default::default()).unwrap();
    assert!(plain.disk().is_none());
    let writable = bux_fuse::MountOptions {
        disk: true,
        writable: true,
        ..Default::default()
    };
    let Err(e) = bux_fuse::mount(&store, &r, &work.path().join("w"), &writable) else {
        panic!("a writable disk was mounted");
    };
    assert!(e.to_string().contains("a disk is read-only"), "{e}");
}

/// `export` writes through a temporary file beside its target, in what may be a shared
/// directory (/tmp): a name there planted ahead (a symlink to a victim, at the temporary name
/// a pid predicts) is neither followed nor truncated, and the export still succeeds.
#[test]
fn an_export_never_writes_through_a_planted_temporary_name() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, "t", &sample_image());
    reg.push(&layout, "t", "test/export-tmp", None);
    let r = format!("{}/test/export-tmp:t", reg.host());
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let store = bux_fuse::Store::open(bux.store.path()).unwrap();
    let victim = work.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let pid = std::process::id();
    let planted: Vec<_> = [format!(".out.erofs.tmp-{pid}")]
        .into_iter()
        .chain((0..4).map(|k| format!(".out.erofs.tmp-{pid}-{k}")))
        .map(|n| work.path().join(n))
        .collect();
    for p in &planted {
        std::os::unix::fs::symlink(&victim, p).unwrap();
    }
    let out = work.path().join("out.erofs");
    let len =
        bux_fuse::disk::export(&store, &r, &out, &Default::default(), &mut |_, _| {}).unwrap();
    let v = std::fs::read(&victim).unwrap();
    assert!(
        v == b"precious",
        "the victim was written: {} bytes",
        v.len()
    );
    let md = std::fs::symlink_metadata(&out).unwrap();
    assert!(md.is_file() && md.len() == len, "{md:?}");
    for p in &planted {
        assert!(std::fs::symlink_metadata(p).unwrap().is_symlink());
    }
}

/// An export that runs out of space (a 1 MiB tmpfs for a 5 MiB file's image) fails in one
/// line and leaves nothing in the directory: neither the file nor its temporary.
#[test]
fn an_export_out_of_space_fails_in_one_line_and_leaves_nothing() {
    need("unshare");
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, "t", &sample_image());
    reg.push(&layout, "t", "test/export-full", None);
    let r = format!("{}/test/export-full:t", reg.host());
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let small = work.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs {small} && \
         {bin} --store {store} -q export --erofs {r} {small}/out.erofs; \
         echo rc=$?; ls -A {small} | wc -l",
        small = small.display(),
        bin = env!("CARGO_BIN_EXE_bux-fuse"),
        store = bux.store.path().display(),
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(stdout, "rc=1\n0\n", "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
}
