//! The real consumer path: a guest whose root filesystem is a bux-fuse mount served over
//! virtio-fs (QEMU + virtiofsd; libkrun needs hardware KVM, which these machines lack), running
//! commands that exercise what a root needs — a pipeline, a large file's bytes, a big directory,
//! hardlinks and symlinks — and writing to the writable layer from inside the guest.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn guest_boots_on_a_bux_fuse_root_and_writes_to_it() {
    if !vm_host() {
        return;
    }
    let (r, _reg, big) = vm_image("t/vm");
    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    bux.ok(&["mount", "--writable", &r, mnt.to_str().unwrap()]);
    let _guard = MountGuard::adopt(mnt.clone(), dir);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/vm-run.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&mnt)
        .arg(GUEST)
        .output()
        .unwrap();
    check_guest(&out, &big);
    // The guest's write landed in the writable layer, visible on the host, image untouched.
    assert_eq!(
        std::fs::read(mnt.join("etc/resolv.conf")).unwrap(),
        b"nameserver 10.0.2.3\n"
    );
}

/// The block root: a guest whose root is `bux-fuse mount --disk`'s `root.erofs` attached as a
/// read-only virtio-blk disk (what `krun_add_disk` + `krun_set_root_disk_remount` do), mounted
/// by the guest's own EROFS driver and made writable by an overlay on a tmpfs, passes the same
/// checks as the guest on a virtio-fs root. The disk is the same bytes before and after the
/// boot, and the same as `export --erofs` writes.
#[test]
fn guest_boots_on_a_bux_fuse_disk_and_writes_through_an_overlay() {
    if !vm_host() {
        return;
    }
    let (r, _reg, big) = vm_image("t/vmdisk");
    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("disk");
    let exported = dir.path().join("exported.erofs");
    bux.ok(&["mount", "--disk", &r, mnt.to_str().unwrap()]);
    let _guard = MountGuard::adopt(mnt.clone(), dir);
    let disk = mnt.join("root.erofs");
    let names: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["root.erofs"], "the disk mount holds one file");
    let before = std::fs::read(&disk).unwrap();
    assert_eq!(before.len() % 4096, 0, "not whole 4 KiB blocks");

    let out = vm_run_disk(&disk, &[], GUEST, &[]);
    check_guest(&out, &big);
    assert!(
        sha256_hex(&std::fs::read(&disk).unwrap()) == sha256_hex(&before),
        "the disk changed under the guest"
    );
    bux.ok(&["export", "--erofs", &r, exported.to_str().unwrap()]);
    assert!(
        sha256_hex(&std::fs::read(&exported).unwrap()) == sha256_hex(&before),
        "export --erofs differs from the served disk"
    );
}

/// An image for the lazy disk tests, pushed with its index published: [`vm_layers`] as gzip
/// (lazy mounts fetch gzip spans) and a third layer of three 12 MiB files of noise (36 MiB
/// compressed) the first commands never read, as the bulk of a real image is. Returns the setup
/// and the far layer's path in the registry's storage.
fn lazy_disk_image(repo: &str) -> (LazyDisk, std::path::PathBuf) {
    let (mut layers, big) = vm_layers();
    for l in &mut layers {
        l.1 = Comp::Gzip;
    }
    let mut far = LayerBuilder::new().dir("far", 0o755);
    for i in 0..3 {
        far = far.file(&format!("far/f{i}.bin"), &noise(12 << 20, 100 + i));
    }
    layers.push((far.finish(), Comp::Gzip));
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    write_layout(layout.path(), "v1", &Image::new(layers));
    reg.push(layout.path(), "v1", repo, None);
    let reference = format!("{}/{repo}:v1", reg.host());
    let publisher = Bux::new();
    publisher.ok(&["pull", "-q", &reference]);
    publisher.ok(&["push-index", &reference]);
    let blobs: Vec<(String, u64)> = std::fs::read_dir(layout.path().join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    let compressed = blobs.iter().map(|b| b.1).filter(|&l| l > 64 << 10).sum();
    let far = blobs.iter().max_by_key(|b| b.1).unwrap();
    let far = reg.blob_data_path(&far.0);
    (
        LazyDisk {
            reg,
            _layout: layout,
            reference,
            compressed,
            big,
        },
        far,
    )
}

/// `n` bytes that do not compress (xorshift).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

struct LazyDisk {
    reg: Registry,
    _layout: tempfile::TempDir,
    reference: String,
    /// The layers' compressed bytes.
    compressed: u64,
    big: Vec<u8>,
}

/// What a guest's first commands on a lazy disk do: a pipeline, a big directory, hardlinks and
/// a symlink, a write to its overlay; nothing of the big files.
const FIRST: &str = "echo pipeline works | tr a-z A-Z | rev; ls /many | wc -l; \
                     stat -c '%i %h' /links/a /links/b; readlink /links/sl; cat /links/sl; \
                     echo nameserver 10.0.2.3 > /etc/resolv.conf && cat /etc/resolv.conf; echo BUX-GUEST-OK";

fn lazy_disk_mount(bux: &Bux, reference: &str) -> (MountGuard, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("disk");
    bux.ok(&[
        "mount",
        "--disk",
        "--lazy",
        "--prefetch",
        "none",
        "--read-timeout",
        "5",
        reference,
        mnt.to_str().unwrap(),
    ]);
    let disk = mnt.join("root.erofs");
    (MountGuard::adopt(mnt, dir), disk)
}

/// Lazy block root: `mount --disk --lazy` behind the slow link; a guest boots on the disk and
/// its first commands succeed having fetched at most 8% of the image's compressed bytes
/// (counted at the link), the mount itself nothing of the layers.
#[test]
fn a_guest_on_a_lazy_disk_fetches_only_what_it_reads() {
    if !vm_host() {
        return;
    }
    let (s, _) = lazy_disk_image("t/lazydisk");
    let proxy = Proxy::start(s.reg.port, 200, 2);
    let bux = Bux::new();
    let (_m, disk) = lazy_disk_mount(&bux, &s.reference.replace(&s.reg.host(), &proxy.host()));
    let at_mount = proxy.bytes();
    let out = vm_run_disk(&disk, &[], FIRST, &[("BUX_VM_TIMEOUT", "300")]);
    let fetched = proxy.bytes();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("guest output:\n{stdout}\n{stderr}");
    eprintln!(
        "fetched: {at_mount} bytes at mount, {fetched} after the guest, of {} compressed",
        s.compressed
    );
    assert!(out.status.success(), "guest failed: {stdout}{stderr}");
    assert!(stdout.contains("SKROW ENILEPIP"), "{stdout}");
    assert!(stdout.lines().any(|l| l.trim() == "3000"), "{stdout}");
    let inos: Vec<&str> = stdout.lines().filter(|l| l.ends_with(" 2")).collect();
    assert!(inos.len() == 2 && inos[0] == inos[1], "hardlinks: {stdout}");
    assert!(stdout.contains("/links/a\nlinked\n"), "{stdout}");
    assert!(stdout.contains("nameserver 10.0.2.3"), "{stdout}");
    assert!(stdout.contains("BUX-GUEST-OK"), "{stdout}");
    assert!(
        fetched * 100 <= s.compressed * 8,
        "the guest's first commands fetched {fetched} of {} bytes (> 8%)",
        s.compressed
    );
    // What was not read is still there to read: the big file, fetched now, is whole.
    let out = vm_run_disk(
        &disk,
        &["--read-only"],
        "sha256sum /data/big.bin",
        &[("BUX_VM_TIMEOUT", "300")],
    );
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&sha256_hex(&s.big)), "{stdout}");
}

/// A chunk of a layer corrupted in the registry's storage is never served through a lazy
/// disk: the guest's read of the file over it fails with EIO, its other files read on, and
/// the mount's log names the chunk (its byte range in the layer holds the damage).
#[test]
fn a_guest_on_a_lazy_disk_never_reads_a_corrupted_chunk() {
    if !vm_host() {
        return;
    }
    let (s, path) = lazy_disk_image("t/evildisk");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&path, &bytes).unwrap();
    let bux = Bux::new();
    let (_m, disk) = lazy_disk_mount(&bux, &s.reference);
    // f1 is the middle third of the far layer: the damage is in it.
    let guest = "cat /links/a; cat /far/f1.bin > /dev/null; echo far-exit=$?; \
                 cat /far/f0.bin | wc -c; cat /links/a; echo BUX-GUEST-OK";
    let out = vm_run_disk(&disk, &["--read-only"], guest, &[("BUX_VM_TIMEOUT", "300")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("guest output:\n{stdout}\n{stderr}");
    assert!(out.status.success(), "guest failed: {stdout}{stderr}");
    let far = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("far-exit="))
        .unwrap_or_else(|| panic!("no exit code of the corrupted read: {stdout}"));
    assert_ne!(far, "0", "the guest read a corrupted chunk: {stdout}");
    assert!(
        stdout.contains("Input/output error") || stdout.contains("I/O error"),
        "not EIO: {stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim() == (12u64 << 20).to_string()),
        "f0: {stdout}"
    );
    assert_eq!(stdout.matches("linked").count(), 2, "{stdout}");
    assert!(stdout.contains("BUX-GUEST-OK"), "{stdout}");
    let log = bux.daemon_log();
    let named = log.lines().any(|l| {
        l.contains("do not match their published digest")
            && l.split("bytes ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|r| r.split_once(".."))
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
                .is_some_and(|(a, b)| a <= mid + 63 && mid < b)
    });
    assert!(
        named,
        "the log does not name the damaged chunk (at {mid}): {log}"
    );
}

/// The floor the served disk is measured against, and the guest side of a block root on its
/// own: `mkfs.erofs` of umoci's unpack of the image, booted as a read-only virtio-blk root,
/// writable through an overlay whose upper layer is a second, per-VM ext4 disk. The guest's
/// write lands on that disk (read on the host with debugfs), the image's disk is untouched.
#[test]
fn guest_boots_on_an_erofs_disk_with_an_overlay_on_a_second_disk() {
    if !vm_host() {
        return;
    }
    need("mkfs.erofs");
    need("debugfs");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("l");
    let (image, big) = vm_layout();
    write_layout(&layout, "v1", &image.as_gzip()); // umoci reads no zstd
    let tree = work.path().join("tree");
    umoci_unpack(&layout, "v1", &tree);
    let disk = work.path().join("root.erofs");
    let out = Command::new("mkfs.erofs")
        .arg(&disk)
        .arg(&tree)
        .output()
        .unwrap();
    assert_success(&out);
    let image = std::fs::read(&disk).unwrap();
    let upper = work.path().join("upper.ext4");
    let out = vm_run_disk(
        &disk,
        &["--upper-disk", upper.to_str().unwrap()],
        GUEST,
        &[],
    );
    check_guest(&out, &big);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        image,
        "the read-only disk changed"
    );
    let out = Command::new("debugfs")
        .args(["-R", "cat /upper/etc/resolv.conf"])
        .arg(&upper)
        .output()
        .unwrap();
    assert_success(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "nameserver 10.0.2.3\n",
        "the guest's write is not on its upper disk"
    );
}

/// Boots `scripts/vm-run.sh --disk DISK [OPTS] COMMAND` with extra environment `env`.
fn vm_run_disk(
    disk: &Path,
    opts: &[&str],
    command: &str,
    env: &[(&str, &str)],
) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/vm-run.sh");
    Command::new("bash")
        .arg(script)
        .arg("--disk")
        .arg(disk)
        .args(opts)
        .arg(command)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Whether this host can run the VM tests (else they say why and pass).
fn vm_host() -> bool {
    let ok =
        std::env::consts::ARCH == "x86_64" && std::path::Path::new("/usr/bin/apt-get").exists();
    if !ok {
        eprintln!("SKIPPED: the VM test needs an x86_64 Debian host (QEMU from Debian's packages)");
    }
    ok
}

/// The Rust virtiofsd that scripts/setup.sh builds.
fn rust_virtiofsd() -> &'static str {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/virtiofsd/bin/virtiofsd"
    );
    assert!(
        std::path::Path::new(path).exists(),
        "{path} missing: scripts/setup.sh builds it"
    );
    path
}

/// The host's static busybox, the guests' only program.
fn busybox() -> Vec<u8> {
    need("busybox");
    let path = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap();
    std::fs::read(path).unwrap()
}

/// What the guest runs: a pipeline, a large file's bytes, a big directory, hardlinks and
/// symlinks, and a write.
const GUEST: &str = "echo pipeline works | tr a-z A-Z | rev; sha256sum /data/big.bin; ls /many | wc -l; \
                     stat -c '%i %h' /links/a /links/b; readlink /links/sl; cat /links/sl; \
                     echo nameserver 10.0.2.3 > /etc/resolv.conf && cat /etc/resolv.conf; echo BUX-GUEST-OK";

/// A busybox image for [`GUEST`] pushed to a new registry: (reference, registry, big file).
fn vm_image(repo: &str) -> (String, Registry, Vec<u8>) {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (image, big) = vm_layout();
    write_layout(&work.path().join("l"), "v1", &image);
    reg.push(&work.path().join("l"), "v1", repo, None);
    (format!("{}/{repo}:v1", reg.host()), reg, big)
}

/// The image for [`GUEST`] (a gzip and a zstd layer) and its big file.
fn vm_layout() -> (Image, Vec<u8>) {
    let (layers, big) = vm_layers();
    (Image::new(layers), big)
}

/// The layers of [`vm_layout`]'s image and its big file.
fn vm_layers() -> (Vec<(Vec<u8>, Comp)>, Vec<u8>) {
    let busybox = busybox();
    let mut base =
        LayerBuilder::new()
            .dir("bin", 0o755)
            .file_with("bin/busybox", &busybox, 0o755, 0, 0);
    for tool in [
        "sh",
        "cat",
        "ls",
        "wc",
        "tr",
        "sha256sum",
        "stat",
        "readlink",
        "echo",
        "rev",
    ] {
        base = base.symlink(&format!("bin/{tool}"), "busybox");
    }
    let big = test_bytes(2 << 20, 11);
    let mut data = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/resolv.conf", b"nameserver 127.0.0.53\n")
        .file("data/big.bin", &big)
        .file("links/a", b"linked\n")
        .hardlink("links/b", "links/a")
        .symlink("links/sl", "/links/a")
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("dev", 0o755)
        .dir("many", 0o755);
    for i in 0..3000 {
        data = data.file(&format!("many/e{i:04}"), b"");
    }
    let layers = vec![(base.finish(), Comp::Gzip), (data.finish(), Comp::Zstd)];
    (layers, big)
}

/// What a run of [`GUEST`] must have printed.
fn check_guest(out: &std::process::Output, big: &[u8]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("guest output:\n{stdout}\n{stderr}");
    assert!(out.status.success(), "guest failed: {stdout}{stderr}");
    assert!(stdout.contains("SKROW ENILEPIP"), "{stdout}");
    assert!(stdout.contains(&sha256_hex(big)), "{stdout}");
    assert!(stdout.lines().any(|l| l.trim() == "3000"), "{stdout}");
    let inos: Vec<&str> = stdout.lines().filter(|l| l.ends_with(" 2")).collect();
    assert_eq!(inos.len(), 2, "hardlinks: {stdout}");
    assert_eq!(
        inos[0], inos[1],
        "hardlinks do not share an inode in the guest: {stdout}"
    );
    assert!(stdout.contains("/links/a\nlinked\n"), "{stdout}");
    assert!(stdout.contains("nameserver 10.0.2.3"), "{stdout}");
    assert!(stdout.contains("BUX-GUEST-OK"));
}

/// A guest on a *lazy* root, served by the Rust virtiofsd with one worker thread (as libkrun
/// serves virtio-fs): with the registry's link stalled, a read of a file not yet fetched fails
/// with EIO at the read deadline instead of freezing the guest's filesystem, and the files
/// already fetched keep working — before, while and after.
#[test]
fn a_stalled_registry_does_not_freeze_a_guest_on_a_lazy_root() {
    if !vm_host() {
        return;
    }
    let virtiofsd = rust_virtiofsd();
    let busybox = busybox();
    let mut base = LayerBuilder::new()
        .dir("bin", 0o755)
        .file_with("bin/busybox", &busybox, 0o755, 0, 0)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("dev", 0o755)
        .file("etc/cached", b"fetched before the stall\n");
    for tool in ["sh", "cat", "echo", "sleep"] {
        base = base.symlink(&format!("bin/{tool}"), "busybox");
    }
    let far = LayerBuilder::new()
        .file("data/far.bin", &test_bytes(6 << 20, 17))
        .finish();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(
        &work.path().join("l"),
        "v1",
        &Image::new(vec![(base.finish(), Comp::Gzip), (far, Comp::Gzip)]),
    );
    reg.push(&work.path().join("l"), "v1", "t/lazyvm", None);
    let direct = format!("{}/t/lazyvm:v1", reg.host());
    let publisher = Bux::new();
    publisher.ok(&["pull", "-q", &direct]);
    publisher.ok(&["push-index", &direct]);

    let proxy = Proxy::start(reg.port, 1000, 1);
    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    bux.ok(&[
        "mount",
        "--lazy",
        "--prefetch",
        "none",
        "--read-timeout",
        "3",
        &direct.replace(&reg.host(), &proxy.host()),
        mnt.to_str().unwrap(),
    ]);
    let _guard = MountGuard::adopt(mnt.clone(), dir);
    // What the guest needs to boot is fetched (read once on the host); then the link stalls.
    for f in ["bin/busybox", "etc/cached"] {
        std::fs::read(mnt.join(f)).unwrap();
    }
    proxy.pause();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/vm-run.sh");
    let guest = "cat /etc/cached; \
                 (cat /data/far.bin > /dev/null 2>&1; echo far-exit=$?) & sleep 1; \
                 cat /etc/cached; wait; cat /etc/cached; echo BUX-GUEST-OK";
    let out = Command::new("bash")
        .arg(script)
        .arg(&mnt)
        .arg(guest)
        .env("BUX_VIRTIOFSD", virtiofsd)
        .env("BUX_VM_TIMEOUT", "300")
        .output()
        .unwrap();
    proxy.unpause();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("guest output:\n{stdout}\n{stderr}");
    assert!(out.status.success(), "guest failed: {stdout}{stderr}");
    assert_eq!(
        stdout.matches("fetched before the stall").count(),
        3,
        "cached reads failed: {stdout}"
    );
    let far = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("far-exit="))
        .unwrap_or_else(|| panic!("the stalled read never returned: {stdout}"));
    assert_ne!(far, "0", "a read with the registry stalled succeeded?");
    assert!(stdout.contains("BUX-GUEST-OK"));
}

/// The guest of the first test booted by an ordinary user, as libkrun tools run: the user's
/// writable mount (bux-fuse serves the upper layer itself), the Rust virtiofsd as that user
/// with `--sandbox none` (libkrun serves virtio-fs in-process, unsandboxed, the same way).
#[test]
fn a_user_boots_a_guest_on_a_writable_root() {
    if !vm_host() {
        return;
    }
    let (user, cache) = vm_user();
    let (r, _reg, big) = vm_image("t/vmuser");
    user.ok(&format!("$BUX -q mount --writable {r} root"));
    let guest = GUEST.replace('\'', "'\\''");
    let out = user.sh(&format!(
        "BUX_VM_CACHE={cache} BUX_VIRTIOFSD={dir}/virtiofsd BUX_VIRTIOFSD_ARGS=--sandbox=none \
         BUX_VM_TIMEOUT=300 bash {dir}/vm-run.sh root '{guest}'",
        cache = cache.display(),
        dir = user.dir.path().display(),
    ));
    check_guest(&out, &big);
    assert_eq!(
        user.ok("cat root/etc/resolv.conf && $BUX umount root"),
        "nameserver 10.0.2.3\n"
    );
}

/// An ordinary user set up to boot guests: vm-run.sh, the Rust virtiofsd and a copy of the
/// kernel cache (root fetches the kernel once; the user boots from a copy it can read and
/// lock) in its directory. Returns the user and its kernel cache.
fn vm_user() -> (AsUser, std::path::PathBuf) {
    let virtiofsd = rust_virtiofsd();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/vm-run.sh");
    let prep = Command::new("bash")
        .arg(script)
        .arg("--prepare")
        .output()
        .unwrap();
    assert_success(&prep);
    let user = AsUser::new();
    let cache = user.dir.path().join("vm");
    let kernel = concat!(env!("CARGO_MANIFEST_DIR"), "/target/vm");
    for (from, to) in [
        (format!("{kernel}/vmlinux"), cache.join("vmlinux")),
        (format!("{kernel}/modules"), cache.join("modules")),
    ] {
        std::fs::create_dir_all(&cache).unwrap();
        let st = Command::new("cp")
            .arg("-r")
            .arg(&from)
            .arg(&to)
            .status()
            .unwrap();
        assert!(st.success());
    }
    for p in [
        user.dir.path().join("vm-run.sh"),
        user.dir.path().join("virtiofsd"),
    ] {
        let src = if p.ends_with("vm-run.sh") {
            script
        } else {
            virtiofsd
        };
        copy_executable(src, &p);
    }
    Command::new("chown")
        .arg("-R")
        .arg(user.name)
        .arg(&cache)
        .status()
        .unwrap();
    (user, cache)
}

/// The block root booted by an ordinary user: the user's `mount --disk` (through fusermount3),
/// its disk attached by the user's QEMU, the guest's writes in its overlay on a tmpfs.
#[test]
fn a_user_boots_a_guest_on_a_disk() {
    if !vm_host() {
        return;
    }
    let (user, cache) = vm_user();
    let (r, _reg, big) = vm_image("t/vmuserdisk");
    user.ok(&format!("$BUX -q mount --disk {r} disk"));
    let guest = GUEST.replace('\'', "'\\''");
    let out = user.sh(&format!(
        "BUX_VM_CACHE={cache} BUX_VM_TIMEOUT=300 bash {dir}/vm-run.sh --disk disk/root.erofs '{guest}'",
        cache = cache.display(),
        dir = user.dir.path().display(),
    ));
    check_guest(&out, &big);
    user.ok("$BUX umount disk");
}
