//! `mount --writable`: an upper layer over the read-only image, checked through the kernel with
//! POSIX behaviours a booting guest relies on; the image itself never changes.

mod common;

use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;

fn image() -> Image {
    let l = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/resolv.conf", b"nameserver 127.0.0.53\n")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .file("etc/big", &test_bytes(3 << 20, 2))
        .dir("srv", 0o755)
        .dir("srv/tree", 0o755)
        .file("srv/tree/a", b"a\n")
        .file("srv/tree/b", b"b\n")
        .file("doomed", b"to be removed\n")
        .file_xattrs(
            "from-an-overlay-upper",
            b"x\n",
            &[
                ("trusted.overlay.origin", b"image-value"),
                ("user.plain", b"1"),
            ],
        )
        .finish();
    Image::new(vec![(l, Comp::Gzip)])
}

fn writable_mount(bux: &Bux, r: &str, upper: Option<&Path>) -> MountGuard {
    writable_mount_with(bux, r, upper, &[])
}

fn writable_mount_with(bux: &Bux, r: &str, upper: Option<&Path>, extra: &[&str]) -> MountGuard {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    let mut args = vec![
        "mount".to_string(),
        "--writable".into(),
        r.to_string(),
        mnt.display().to_string(),
    ];
    args.extend(extra.iter().map(|e| e.to_string()));
    if let Some(u) = upper {
        args.push("--upper".into());
        args.push(u.display().to_string());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    bux.ok(&a);
    MountGuard::adopt(mnt, dir)
}

#[test]
fn writable_root_behaves_like_posix_and_leaves_the_image_alone() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image());
    reg.push(&work.path().join("l"), "v1", "t/rw", None);
    let r = format!("{}/t/rw:v1", reg.host());
    let bux = Bux::new();
    let m = writable_mount(&bux, &r, None);
    posix_cases(&m.path);
    drop(m);

    // The image is untouched: a read-only mount shows the original bytes.
    let ro = bux.mount(&r);
    assert_eq!(
        std::fs::read(ro.path.join("etc/resolv.conf")).unwrap(),
        b"nameserver 127.0.0.53\n"
    );
    assert!(ro.path.join("doomed").exists() && ro.path.join("srv/tree/a").exists());
    assert!(!ro.path.join("var").exists());
    drop(ro);
    // The scratch upper was removed at unmount.
    let run = bux.store.path().join("run");
    assert_eq!(
        std::fs::read_dir(&run).map(|d| d.count()).unwrap_or(0),
        0,
        "scratch left in {}",
        run.display()
    );
}

#[test]
fn upper_dir_persists_and_mounts_are_isolated() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image());
    reg.push(&work.path().join("l"), "v1", "t/rw2", None);
    let r = format!("{}/t/rw2:v1", reg.host());
    let bux = Bux::new();
    let upper = work.path().join("state");

    let a = writable_mount(&bux, &r, Some(&upper));
    // A second mount on the same --upper is refused, in one line.
    let other = tempfile::tempdir().unwrap();
    let err = bux.fails(&[
        "mount",
        "-q",
        "--upper",
        upper.to_str().unwrap(),
        &r,
        other.path().join("r").to_str().unwrap(),
    ]);
    assert!(
        err.contains("in use by another writable mount") && err.lines().count() == 1,
        "{err}"
    );
    let b = writable_mount(&bux, &r, None);
    std::fs::write(a.path.join("etc/only-a"), b"a\n").unwrap();
    std::fs::remove_file(a.path.join("doomed")).unwrap();
    assert!(
        !b.path.join("etc/only-a").exists(),
        "writable mounts share writes"
    );
    assert!(b.path.join("doomed").exists());
    drop(a);
    drop(b);
    // The deletion is a whiteout in the upper layer; the new file is plain.
    let wh = std::fs::symlink_metadata(upper.join("upper/doomed")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&wh.file_type()) && wh.rdev() == 0);
    let again = writable_mount(&bux, &r, Some(&upper));
    assert_eq!(
        std::fs::read(again.path.join("etc/only-a")).unwrap(),
        b"a\n"
    );
    assert!(!again.path.join("doomed").exists());
}

/// What a booting guest does to its root, checked through the kernel at `root` (a writable
/// mount of [`image`]). Run as root here, and as an ordinary user by `tests/rootless.rs`
/// (through [`posix_cases_at_env`]).
fn posix_cases(root: &Path) {
    let p = |s: &str| root.join(s);

    // Write a lower file (what a guest does to /etc/resolv.conf at boot).
    std::fs::write(p("etc/resolv.conf"), b"nameserver 10.0.2.3\n").unwrap();
    assert_eq!(
        std::fs::read(p("etc/resolv.conf")).unwrap(),
        b"nameserver 10.0.2.3\n"
    );
    // O_TRUNC of a lower file, then append.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(p("etc/hosts"))
        .unwrap();
    f.write_all(b"::1 localhost\n").unwrap();
    drop(f);
    assert_eq!(std::fs::read(p("etc/hosts")).unwrap(), b"::1 localhost\n");
    // Partial overwrite in the middle of a large lower file keeps the rest.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(p("etc/big"))
        .unwrap();
    f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(b"PATCH").unwrap();
    drop(f);
    let big = std::fs::read(p("etc/big")).unwrap();
    let mut want = test_bytes(3 << 20, 2);
    want[1 << 20..(1 << 20) + 5].copy_from_slice(b"PATCH");
    assert_eq!(big, want);
    // Rename over an existing file.
    std::fs::write(p("etc/new"), b"new\n").unwrap();
    std::fs::rename(p("etc/new"), p("etc/hosts")).unwrap();
    assert_eq!(std::fs::read(p("etc/hosts")).unwrap(), b"new\n");
    // Unlink of an open lower file: the descriptor still reads it.
    let mut open = std::fs::File::open(p("doomed")).unwrap();
    std::fs::remove_file(p("doomed")).unwrap();
    assert!(!p("doomed").exists());
    let mut s = String::new();
    open.read_to_string(&mut s).unwrap();
    assert_eq!(s, "to be removed\n");
    // Unlink of an open file written in this mount: the descriptor still writes and reads it.
    std::fs::write(p("etc/scratch"), b"one\n").unwrap();
    let mut scratch = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("etc/scratch"))
        .unwrap();
    std::fs::remove_file(p("etc/scratch")).unwrap();
    scratch.seek(std::io::SeekFrom::End(0)).unwrap();
    scratch.write_all(b"two\n").unwrap();
    scratch.sync_all().unwrap();
    scratch.seek(std::io::SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    scratch.read_to_string(&mut s).unwrap();
    assert_eq!(s, "one\ntwo\n");
    drop(scratch);
    // Directory rename of a lower directory with children.
    std::fs::rename(p("srv/tree"), p("srv/moved")).unwrap();
    assert_eq!(std::fs::read(p("srv/moved/b")).unwrap(), b"b\n");
    assert!(!p("srv/tree").exists());
    // chmod, chown, xattr, hardlink, symlink, mkdir, fifo.
    std::fs::set_permissions(p("srv/moved/a"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(p("srv/moved/a"), Some(1234), Some(5678)).unwrap();
    let md = std::fs::metadata(p("srv/moved/a")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid()),
        (0o600, 1234, 5678)
    );
    std::fs::hard_link(p("srv/moved/a"), p("srv/hl")).unwrap();
    assert_eq!(
        std::fs::metadata(p("srv/hl")).unwrap().ino(),
        std::fs::metadata(p("srv/moved/a")).unwrap().ino()
    );
    std::os::unix::fs::symlink("/etc/hosts", p("srv/sl")).unwrap();
    assert_eq!(
        std::fs::read_link(p("srv/sl")).unwrap(),
        Path::new("/etc/hosts")
    );
    std::fs::create_dir_all(p("var/log/app")).unwrap();
    std::fs::write(p("var/log/app/x.log"), b"log\n").unwrap();
    set_xattr(&p("etc/resolv.conf"), "user.note", b"guest");
    // An open file keeps the filesystem alive after a lazy unmount: close it first.
    drop(open);
}

/// [`posix_cases`] at `$BUX_POSIX_ROOT`, for a run of this test binary as another user.
#[test]
#[ignore = "run by the rootless tests as an ordinary user"]
fn posix_cases_at_env() {
    let root = std::env::var_os("BUX_POSIX_ROOT").expect("BUX_POSIX_ROOT");
    posix_cases(Path::new(&root));
}

/// The same cases as an ordinary user: bux-fuse serves the upper layer itself (no kernel
/// overlay), with root semantics for what reaches it (chown to any owner included).
#[test]
fn writable_root_behaves_like_posix_for_a_user_too() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image());
    reg.push(&work.path().join("l"), "v1", "t/rwu", None);
    let r = format!("{}/t/rwu:v1", reg.host());
    let user = AsUser::new();
    let exe = user.dir.path().join("writable-tests");
    copy_executable(std::env::current_exe().unwrap(), &exe);
    user.ok(&format!("$BUX -q mount --writable {r} m"));
    let m = user.home().join("m");
    let out = user.ok(&format!(
        "BUX_POSIX_ROOT={} {} --exact posix_cases_at_env --ignored --test-threads=1",
        m.display(),
        exe.display()
    ));
    assert!(out.contains("test posix_cases_at_env ... ok"), "{out}");
    user.ok("$BUX umount m");
    // The image is untouched and the scratch upper is gone.
    let out = user.ok(&format!(
        "$BUX -q mount {r} ro && cat ro/etc/resolv.conf ro/doomed ro/srv/tree/a && \
         test ! -e ro/var && $BUX umount ro && ls .local/share/bux-fuse/run | wc -l"
    ));
    assert_eq!(out, "nameserver 127.0.0.53\nto be removed\na\n0\n");
}

/// An image xattr in the overlay's own namespace (an image built from an overlay upper has
/// them) reaches the guest as it is, instead of being taken by the writable overlay as its own.
#[test]
fn image_overlay_xattrs_survive_the_writable_overlay() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image());
    reg.push(&work.path().join("l"), "v1", "t/rwx", None);
    let r = format!("{}/t/rwx:v1", reg.host());
    let bux = Bux::new();
    let m = writable_mount(&bux, &r, None);
    let f = m.path.join("from-an-overlay-upper");
    assert_eq!(
        get_xattr(&f, "trusted.overlay.origin").as_deref(),
        Some(&b"image-value"[..])
    );
    assert_eq!(get_xattr(&f, "user.plain").as_deref(), Some(&b"1"[..]));
    assert_eq!(std::fs::read(&f).unwrap(), b"x\n");
    drop(m);
    // Read-only mounts serve it under its own name, unescaped.
    let ro = bux.mount(&r);
    let f = ro.path.join("from-an-overlay-upper");
    assert_eq!(
        get_xattr(&f, "trusted.overlay.origin").as_deref(),
        Some(&b"image-value"[..])
    );
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

/// A writable mount whose daemon was killed leaves its image mount and scratch upper under the
/// store's run/ directory: `umount` of the mount point removes them too, and `gc` cleans up
/// after mounts that were unmounted some other way.
#[test]
fn a_dead_writable_daemon_leaves_nothing_behind() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image());
    reg.push(&work.path().join("l"), "v1", "t/rwdead", None);
    let r = format!("{}/t/rwdead:v1", reg.host());
    let bux = Bux::new();
    let run = bux.store.path().join("run");
    let mounts_under_run = || {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let run = run.to_string_lossy().into_owned();
        info.lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&run)))
            .count()
    };

    let m = writable_mount_with(&bux, &r, None, &["--own-server"]);
    std::fs::write(m.path.join("etc/scratch"), b"x").unwrap();
    assert_eq!(mounts_under_run(), 1);
    kill_daemon(&m.path);
    bux.ok(&["umount", m.path.to_str().unwrap()]);
    assert_eq!(mounts_under_run(), 0, "the image mount under run/ was left");
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        0,
        "scratch upper left in run/"
    );
    drop(m);

    // Unmounted behind our back (only the overlay): gc finds and removes the rest.
    let m = writable_mount_with(&bux, &r, None, &["--own-server"]);
    kill_daemon(&m.path);
    let c = std::ffi::CString::new(m.path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }, 0);
    assert_eq!(mounts_under_run(), 1);
    let out = bux.ok(&["gc"]);
    assert!(out.contains("cleaned 1 writable mount"), "{out}");
    assert_eq!(mounts_under_run(), 0);
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), 0);
}

/// A persistent `--upper` whose grandparent happens to be named `scratch` is the user's, not a
/// scratch layer: `umount` keeps it (only the store's own scratch layer goes).
#[test]
fn umount_keeps_an_upper_under_a_directory_named_scratch() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image());
    reg.push(&work.path().join("l"), "v1", "t/rwscratch", None);
    let r = format!("{}/t/rwscratch:v1", reg.host());
    let bux = Bux::new();
    let upper = work.path().join("scratch/mine");
    let m = writable_mount(&bux, &r, Some(&upper));
    std::fs::write(m.path.join("etc/kept"), b"kept\n").unwrap();
    drop(m);
    assert_eq!(
        std::fs::read(upper.join("upper/etc/kept")).unwrap(),
        b"kept\n",
        "umount removed the user's --upper"
    );
    // A scratch mount's layer still goes at umount.
    let m = writable_mount(&bux, &r, None);
    std::fs::write(m.path.join("etc/gone"), b"x\n").unwrap();
    drop(m);
    let scratch = bux.store.path().join("scratch");
    assert_eq!(
        std::fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0),
        0,
        "scratch left in {}",
        scratch.display()
    );
    // And the persistent one mounts again with the change.
    let m = writable_mount(&bux, &r, Some(&upper));
    assert_eq!(std::fs::read(m.path.join("etc/kept")).unwrap(), b"kept\n");
}

/// The same `--upper` directory reached through a symlink is the same upper layer: a second
/// mount on it is refused, and the first keeps working.
#[test]
fn an_upper_reached_through_a_symlink_is_still_in_use() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image());
    reg.push(&work.path().join("l"), "v1", "t/rwlink", None);
    let r = format!("{}/t/rwlink:v1", reg.host());
    let bux = Bux::new();
    let upper = work.path().join("state");
    let link = work.path().join("link");
    std::fs::create_dir(&upper).unwrap();
    std::os::unix::fs::symlink(&upper, &link).unwrap();

    let a = writable_mount(&bux, &r, Some(&upper));
    let other = tempfile::tempdir().unwrap();
    let second = other.path().join("r");
    for extra in [&[][..], &["--own-server"][..]] {
        let mut args = vec![
            "mount",
            "-q",
            "--upper",
            link.to_str().unwrap(),
            &r,
            second.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = bux.run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            let _ = bux.run(&["umount", second.to_str().unwrap()]);
        }
        assert!(
            !out.status.success() && err.contains("in use by another writable mount"),
            "a second mount on the same upper through a symlink ({extra:?}): {err}"
        );
    }
    std::fs::write(a.path.join("etc/still"), b"ok\n").unwrap();
    assert_eq!(std::fs::read(a.path.join("etc/still")).unwrap(), b"ok\n");
    drop(a);
    // Through the symlink, once free.
    let b = writable_mount(&bux, &r, Some(&link));
    assert_eq!(std::fs::read(b.path.join("etc/still")).unwrap(), b"ok\n");
}

// ----------------------------------------------------------------------------------------------
// Other users in a user's --allow-other writable mount (pjdfstest's classes of failures, #20)

/// Runs `script` (sh) as root inside an ordinary user's `mount --writable --allow-other` of
/// [`image`], at its root; returns what it printed (stdout and stderr). `as UID CMD...` runs a
/// command as another uid (gid the same, no other groups); `owner CMD...` as the mount's owner.
/// Runs in a private mount namespace whose /etc/fuse.conf allows `user_allow_other`.
fn in_a_users_shared_mount(repo: &str, script: &str) -> String {
    in_a_users_shared_mount_with(repo, "true", "", script)
}

/// [`in_a_users_shared_mount`], running `setup` (sh, as root, in the user's home, before the
/// mount; `$HOME_DIR` names it) and passing `extra` to the mount command.
fn in_a_users_shared_mount_with(repo: &str, setup: &str, extra: &str, script: &str) -> String {
    need("unshare");
    need("setpriv");
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image());
    reg.push(&work.path().join("l"), "v1", repo, None);
    let r = format!("{}/{repo}:v1", reg.host());
    let user = AsUser::new();
    user.ok(&format!("$BUX -q pull {r}"));
    let conf = user.dir.path().join("fuse.conf");
    std::fs::write(&conf, "user_allow_other\n").unwrap();
    let owner = format!(
        "runuser -u {} -- env HOME={} PATH=/usr/bin:/bin",
        user.name,
        user.home().display()
    );
    let bin = user.bin();
    let m = user.home().join("m");
    let full = format!(
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin && \
         mount --bind {conf} /etc/fuse.conf && cd {home} && HOME_DIR={home} && ( {setup} ) && \
         {owner} {bin} -q mount --writable --allow-other {extra} {r} m && cd m && \
         as() {{ u=$1; shift; setpriv --reuid=$u --regid=$u --clear-groups \"$@\"; }} && \
         owner() {{ {owner} \"$@\"; }} && \
         ( {script} ) 2>&1; cd / && {owner} {bin} umount {m}",
        conf = conf.display(),
        home = user.home().display(),
        bin = bin.display(),
        m = m.display(),
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &full])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The lines of `out`, one for each `want`, each containing every `*`-separated part of it
/// (tools quote names differently by locale).
fn assert_lines(out: &str, want: &[&str]) {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), want.len(), "{out}");
    for (l, w) in lines.iter().zip(want) {
        for part in w.split('*') {
            assert!(l.contains(part), "{l:?} lacks {part:?} in:\n{out}");
        }
    }
}

/// A sticky directory: another uid may neither remove nor rename a file it does not own there
/// (EPERM); the file's owner may. (Unchecked before: anyone could.)
#[test]
fn others_cannot_remove_or_rename_in_a_sticky_directory() {
    let out = in_a_users_shared_mount(
        "t/rw-sticky",
        "mkdir -m 1777 tmp2 && as 65533 touch tmp2/f && \
         (as 65534 rm -f tmp2/f || true) && (as 65534 mv tmp2/f tmp2/g || true) && ls tmp2 && \
         as 65533 mv tmp2/f tmp2/g && as 65533 rm tmp2/g && ls tmp2 | wc -l",
    );
    assert_lines(
        &out,
        &[
            "cannot remove*tmp2/f*Operation not permitted",
            "cannot move*tmp2/f*Operation not permitted",
            "f",
            "0",
        ],
    );
}

/// chown and chmod by someone who does not own the file fail (EPERM), chgrp to a group the
/// owner is not in too, and chmod by someone outside the file's group drops setgid; the
/// mount's owner (the VMM) stays unchecked and may chown anything to anyone.
#[test]
fn chown_and_chmod_follow_the_owner_rules_for_others_only() {
    let out = in_a_users_shared_mount(
        "t/rw-chown",
        "touch f && chmod 644 f && (as 65534 chown 65534 f || true) && \
         (as 65534 chmod 777 f || true) && chown 65534:65534 f && \
         (as 65534 chgrp 65533 f || true) && as 65534 chmod 2755 f && stat -c '%u:%g %a' f && \
         chgrp 65533 f && as 65534 chmod 2755 f && stat -c '%u:%g %a' f && \
         owner chown 1234:5678 etc/hosts && owner chmod 4700 etc/hosts && \
         stat -c '%u:%g %a' etc/hosts",
    );
    assert_lines(
        &out,
        &[
            "changing ownership of*Operation not permitted",
            "changing permissions of*Operation not permitted",
            "changing group of*Operation not permitted",
            "65534:65534 2755",
            "65534:65533 755",
            "1234:5678 4700",
        ],
    );
}

/// Opens are checked against the mode for the access asked, O_TRUNC included (it needs write
/// permission even with O_RDONLY), and a file may be executed only with its x bit for the
/// caller's class.
#[test]
fn others_open_files_as_their_modes_allow() {
    let out = in_a_users_shared_mount(
        "t/rw-open",
        "echo secret > s && chmod 600 s && echo data > r && chmod 644 r && \
         cp /bin/true x && chmod 744 x && \
         (as 65534 cat s || true) && as 65534 cat r && (as 65534 sh -c 'echo > r' || true) && \
         (as 65534 python3 -c 'import os; os.open(\"r\", os.O_RDONLY | os.O_TRUNC)' 2>&1 \
            | tail -1 || true) && \
         (as 65534 ./x || echo refused) && cat r",
    );
    assert_lines(
        &out,
        &[
            "s: Permission denied",
            "data",
            "cannot create r: Permission denied",
            "PermissionError",
            "failed to execute*Permission denied",
            "refused",
            "data",
        ],
    );
}

/// Creating or removing a name needs write and search permission on its directory, and
/// reaching a file needs search permission on every directory of its path, even where the
/// kernel has the names cached (it then asks nothing but the operation itself).
#[test]
fn others_need_write_and_search_on_directories() {
    let out = in_a_users_shared_mount(
        "t/rw-dirs",
        "mkdir -m 755 d && echo in > d/f && chmod 644 d/f && mkdir -m 700 p && \
         echo deep > p/g && chmod 644 p/g && cat p/g >/dev/null && \
         (as 65534 touch d/new || true) && (as 65534 mkdir d/sub || true) && \
         (as 65534 rm -f d/f || true) && (as 65534 ln -s f d/l || true) && \
         (as 65534 cat p/g || true) && (as 65534 sh -c 'cd p' || true) && \
         chmod 711 p && as 65534 cat p/g && ls d",
    );
    assert_lines(
        &out,
        &[
            "cannot touch*d/new*Permission denied",
            "cannot create directory*d/sub*Permission denied",
            "cannot remove*d/f*Permission denied",
            "failed to create symbolic link*d/l*Permission denied",
            "p/g: Permission denied",
            "can't cd to p",
            "deep",
            "f",
        ],
    );
}

/// truncate(2) needs write permission; utimensat(2) to now needs ownership or write
/// permission, to a time of one's choosing ownership.
#[test]
fn others_truncate_and_set_times_as_linux_allows() {
    let out = in_a_users_shared_mount(
        "t/rw-times",
        "echo keep > k && chmod 644 k && echo open > w && chmod 666 w && \
         (as 65534 python3 -c 'import os; os.truncate(\"k\", 0)' 2>&1 | tail -1) && \
         as 65534 python3 -c 'import os; os.truncate(\"w\", 2)' && \
         touch -d 2001-01-01 k w && (as 65534 touch k || true) && as 65534 touch w && \
         (as 65534 touch -d 2002-02-02 w || true) && \
         stat -c '%s %y' k | cut -c1-12 && stat -c '%s %y' w | cut -c1-4",
    );
    assert_lines(
        &out,
        &[
            "PermissionError",
            "cannot touch*k*Permission denied",
            "setting times of*w*Operation not permitted",
            "5 2001-01-01",
            "2 20",
        ],
    );
    assert!(!out.contains("2 2001") && !out.contains("2 2002"), "{out}");
}

/// Runs `script` (sh) as an ordinary user whose writable mount of [`image`] is at `m`;
/// returns its output.
fn as_user_with_a_writable_mount(repo: &str, script: &str) -> String {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image());
    reg.push(&work.path().join("l"), "v1", repo, None);
    let r = format!("{}/{repo}:v1", reg.host());
    let user = AsUser::new();
    user.ok(&format!(
        "$BUX -q mount --writable {r} m && ( {script} ) 2>&1; $BUX umount m"
    ))
}

/// A guest's path may be as long as PATH_MAX though the upper directory's own path comes
/// before it on the host: entries that deep are made, read, renamed and removed.
#[test]
fn paths_as_long_as_path_max_work_in_a_users_writable_mount() {
    // 16 names of 250 bytes: 4016 bytes under m/srv, and more than 4096 on the host.
    let out = as_user_with_a_writable_mount(
        "t/rw-long",
        "d=m/srv; for i in $(seq 16); do d=$d/$(printf %0250d $i); done; \
         mkdir -p $d && echo deep > $d/f && cat $d/f && mv $d/f $d/g && ls $d && \
         stat -c %s $d/g && rm $d/g && ls $d | wc -l",
    );
    assert_eq!(out, "deep\ng\n5\n0\n");
}

/// fstat(2) of an open file whose last name was removed says it has no link left.
#[test]
fn an_unlinked_open_file_has_no_link_left() {
    need("python3");
    let out = as_user_with_a_writable_mount(
        "t/rw-nlink",
        "python3 -c 'import os; f = open(\"m/etc/x\", \"w\"); os.unlink(\"m/etc/x\"); \
         g = open(\"m/etc/hosts\"); os.unlink(\"m/etc/hosts\"); \
         print(os.fstat(f.fileno()).st_nlink, os.fstat(g.fileno()).st_nlink)'",
    );
    assert_eq!(out, "0 0\n");
}

/// readlink(2) and listxattr(2) need search permission on every directory of the path like
/// every other request, also where the kernel has the names cached (it sends the operation
/// alone; it caches no symlink target, so a check in the server holds each time).
#[test]
fn others_read_no_link_target_nor_xattr_names_behind_a_directory_they_cannot_search() {
    need("python3");
    let out = in_a_users_shared_mount(
        "t/rw-readlink",
        "mkdir -m 700 p && ln -s secret-target p/l && touch p/f && \
         python3 -c 'import os; os.setxattr(\"p/f\", \"user.secret\", b\"x\")' && \
         readlink p/l && python3 -c 'import os; print(os.listxattr(\"p/f\"))' && \
         (as 65534 readlink p/l || echo refused) && \
         (as 65534 python3 -c 'import os; print(os.listxattr(\"p/f\"))' 2>&1 | tail -1) && \
         chmod 711 p && as 65534 readlink p/l && \
         as 65534 python3 -c 'import os; print(os.listxattr(\"p/f\"))'",
    );
    assert_lines(
        &out,
        &[
            "secret-target",
            "['user.secret']",
            "refused",
            "PermissionError",
            "secret-target",
            "['user.secret']",
        ],
    );
}

/// A write by someone else who may write kills a file's setuid bit as Linux does, also when
/// the file has setgid without group exec (the kernel then asks to keep setgid, which the
/// write's non-member loses all the same); and chmod by the owner of a directory outside its
/// group drops setgid there too, as Linux's `setattr_copy` does for every kind of inode.
#[test]
fn others_writes_kill_setuid_and_chmod_drops_setgid_on_directories_too() {
    let out = in_a_users_shared_mount(
        "t/rw-kill",
        "echo a > k && chmod 6646 k && (as 65534 sh -c 'echo b >> k' || echo refused) && \
         stat -c %a k && cat k && mkdir d && chown 65534 d && as 65534 chmod 2755 d && \
         stat -c %a d",
    );
    assert_lines(&out, &["646", "a", "b", "755"]);
}

/// More directories deep enough to need a descriptor of their own than are kept open (256):
/// entries in the ones past the limit are made and read all the same, through a descriptor
/// kept for a directory above them.
#[test]
fn more_deep_directories_than_descriptors_kept_all_work() {
    // 16 names of 250 bytes: 4016 bytes under m/srv, past 4096 with the upper root's path.
    let out = as_user_with_a_writable_mount(
        "t/rw-deep-many",
        "d=m/srv; for i in $(seq 16); do d=$d/$(printf %0250d $i); done; mkdir -p $d && \
         for i in $(seq 300); do mkdir $d/$i && echo $i > $d/$i/f || break; done; \
         cat $d/1/f $d/300/f && ls $d | wc -l",
    );
    assert_eq!(out, "1\n300\n300\n");
}

/// A POSIX access ACL decides for other users as in the kernel: with a mask, the owning
/// group's entry (not the mode's group bits, which show the mask) decides for its members, and
/// a named user's entry (within the mask) for that user.
#[test]
fn others_are_checked_against_a_files_access_acl() {
    need("python3");
    // version 2; user::rw- group::--- user:65534:rw- mask::rw- other::---
    let set_acl = "import os, struct; \
        e = [(1, 6, 0xffffffff), (2, 6, 65534), (4, 0, 0xffffffff), (0x10, 6, 0xffffffff), \
             (0x20, 0, 0xffffffff)]; \
        os.setxattr('s', 'system.posix_acl_access', \
                    struct.pack('<I', 2) + b''.join(struct.pack('<HHI', *x) for x in e))";
    let out = in_a_users_shared_mount(
        "t/rw-acl",
        &format!(
            "echo secret > s && chgrp 65533 s && python3 -c \"{set_acl}\" && chmod 660 s && \
             (as 65533 cat s || true) && as 65534 cat s"
        ),
    );
    assert_lines(&out, &["s: Permission denied", "secret"]);
}

/// Only a file's owner sets its ACL (EPERM for others, as set_posix_acl(9) says): another
/// user who reaches a file cannot grant themselves access through a named-user entry.
#[test]
fn others_cannot_set_the_acl_of_a_file_they_do_not_own() {
    need("python3");
    // version 2; user::rw- user:65534:rw- group::rw- mask::rw- other::---
    let set_acl = "import os, struct; \
        e = [(1, 6, 0xffffffff), (2, 6, 65534), (4, 6, 0xffffffff), (0x10, 6, 0xffffffff), \
             (0x20, 0, 0xffffffff)]; \
        os.setxattr('s', 'system.posix_acl_access', \
                    struct.pack('<I', 2) + b''.join(struct.pack('<HHI', *x) for x in e))";
    let out = in_a_users_shared_mount(
        "t/rw-setacl",
        &format!(
            "echo secret > s && chmod 660 s && \
             (as 65534 python3 -c \"{set_acl}\" 2>&1 | tail -1) && (as 65534 cat s || true) && \
             python3 -c \"{set_acl}\" && as 65534 cat s"
        ),
    );
    assert_lines(
        &out,
        &[
            "PermissionError*Operation not permitted",
            "s: Permission denied",
            "secret",
        ],
    );
}

/// A rename another user may not make is refused before the file's bytes are copied up for
/// it: with the upper layer on a 1 MiB filesystem, moving the image's 3 MiB file out of a
/// directory the caller cannot write says EACCES, not ENOSPC (the copy was made, then
/// thrown away, for a request that was never allowed).
#[test]
fn others_are_refused_a_rename_before_anything_is_copied_for_it() {
    let out = in_a_users_shared_mount_with(
        "t/rw-rename-first",
        "mkdir small && mount -t tmpfs -o size=1m,mode=0777 tmpfs small",
        "--upper $HOME_DIR/small/upper",
        "(as 65534 mv etc/big etc/big2 || true) && ls etc | grep -c big",
    );
    assert_lines(&out, &["cannot move*Permission denied", "1"]);
}
