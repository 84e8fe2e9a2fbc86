//! bux-fuse as an ordinary user, the way libkrun tools run: pull and mount without root (through
//! fusermount3), and from inside a user namespace. The image's owners, modes, setuid bits,
//! device numbers and xattrs are served as they are, for the guest to enforce.

mod common;

use common::*;

const CAP_NET_RAW: [u8; 20] = [
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn image() -> Image {
    let l = LayerBuilder::new()
        .dir("etc", 0o755)
        .file_with("etc/shadow", b"root:*:19000::::::\n", 0o600, 0, 0)
        .file_with("etc/owned", b"theirs\n", 0o640, 1234, 5678)
        .dir("root", 0o700)
        .file_with("root/.profile", b"secret\n", 0o600, 0, 0)
        .file_with("bin/su", b"#!/bin/sh\n", 0o4755, 0, 0)
        .device("dev/null", tar::EntryType::Char, 1, 3)
        .file("usr/lib/one", b"v1\n")
        .hardlink("usr/bin/two", "usr/lib/one")
        // cap_net_raw+ep, as `setcap` writes it (VFS_CAP_REVISION_2).
        .file_xattrs(
            "bin/ping",
            b"ping\n",
            &[
                ("security.capability", &CAP_NET_RAW),
                ("user.note", b"kept"),
            ],
        )
        .finish();
    Image::new(vec![(l, Comp::Gzip)])
}

fn pushed(reg: &Registry, repo: &str) -> String {
    pushed_image(reg, repo, &image())
}

/// `image` pushed to `reg` as `repo:v1`: its reference.
fn pushed_image(reg: &Registry, repo: &str, image: &Image) -> String {
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", image);
    reg.push(&work.path().join("l"), "v1", repo, None);
    format!("{}/{repo}:v1", reg.host())
}

/// A registry of its own serving `layer` (gzip) as the one layer of `repo:v1`, the image's
/// reference, and a user of the host to use it (the registry serves while held).
fn image_for_a_user(repo: &str, layer: Vec<u8>) -> (Registry, String, AsUser) {
    let reg = Registry::start();
    let r = pushed_image(&reg, repo, &Image::new(vec![(layer, Comp::Gzip)]));
    (reg, r, AsUser::new())
}

/// Held while a test drops caches, and by a test asserting which pages are cached from its
/// first read to its last look (tests run in parallel: another's drop, of inodes too, evicts
/// the pages of files nobody holds open).
static PAGE_CACHE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes `what` to /proc/sys/vm/drop_caches, never inside another test's page-cache check.
fn drop_caches(what: &str) -> std::io::Result<()> {
    let _held = PAGE_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    std::fs::write("/proc/sys/vm/drop_caches", what)
}

#[test]
fn a_user_mounts_the_image_as_it_is_without_root() {
    need("fusermount3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless");
    let user = AsUser::new();
    user.ok(&format!("$BUX -q pull {r}"));
    // The default store is under the user's XDG data directory.
    let store = user.home().join(".local/share/bux-fuse");
    assert!(store.join("images.json").exists());
    // Without root, no metadata image can be mounted: none is written; small files' bytes
    // are kept (FUSE reads them from there).
    let derived = |ext: &str| -> Vec<_> {
        ["layers/sha256", "trees/sha256"]
            .iter()
            .flat_map(|d| std::fs::read_dir(store.join(d)).unwrap().flatten())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect()
    };
    assert!(derived("erofs").is_empty(), "{:?}", derived("erofs"));
    assert_eq!(derived("small").len(), 1, "the layer's small files");
    user.ok(&format!("$BUX -q mount {r} m"));
    let m = user.home().join("m");
    // What the user sees through the mount: everything, as the image has it (libkrun runs as
    // this user; the guest enforces owners and modes).
    let out = user.ok(
        "cat m/etc/shadow m/root/.profile && stat -c '%u:%g %a %F %t:%T' \
         m/etc/shadow m/etc/owned m/root m/bin/su m/dev/null",
    );
    assert_eq!(
        out,
        "root:*:19000::::::\nsecret\n\
         0:0 600 regular file 0:0\n\
         1234:5678 640 regular file 0:0\n\
         0:0 700 directory 0:0\n\
         0:0 4755 regular file 0:0\n\
         0:0 660 character special file 1:3\n"
    );
    let caps = user.ok("getfattr --absolute-names -e hex -d -m - m/bin/ping");
    assert!(
        caps.contains("security.capability=0x0100000200200000000000000000000000000000")
            && caps.contains("user.note=0x6b657074"),
        "{caps}"
    );
    // Mounted by fusermount3: nodev,nosuid (refused to users), only the user may enter, and
    // no default_permissions (which would deny the user the image's root-only files).
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(m.to_str().unwrap()))
        .expect("mounted");
    assert!(line.contains("nosuid,nodev"), "{line}");
    assert!(line.contains(&format!("user_id={}", user.uid)), "{line}");
    assert!(
        !line.contains("default_permissions") && !line.contains("allow_other"),
        "{line}"
    );
    // Root may not enter a user's mount without --allow-other.
    assert!(std::fs::read_dir(&m).is_err());
    // The image is read-only.
    let out = user.sh("echo x > m/etc/owned");
    assert!(!out.status.success());
    user.ok("$BUX umount m");
    assert!(!is_mounted(&m));
    // --allow-other needs user_allow_other in /etc/fuse.conf (not set here): one clear line.
    let allowed = std::fs::read_to_string("/etc/fuse.conf")
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim() == "user_allow_other");
    if !allowed {
        let out = user.sh(&format!("$BUX -q mount --allow-other {r} m2"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("user_allow_other") && err.lines().count() == 1,
            "{err}"
        );
        assert!(!is_mounted(&user.home().join("m2")));
    }
}

#[test]
fn a_mount_inside_a_user_namespace_shows_the_image_owners_as_the_namespace_maps_them() {
    need("unshare");
    let reg = Registry::start();
    let r = pushed(&reg, "t/userns");
    let user = AsUser::new();
    user.ok(&format!("$BUX -q pull {r}"));
    // `unshare -rm`: the user is root of a namespace that owns its mount namespace (as in
    // `podman unshare` and krunvm). Root-owned files are the namespace's root's; ids the
    // namespace does not map show as the overflow id.
    let out = user.ok(&format!(
        "unshare --user --map-root-user --mount sh -c '$BUX -q mount {r} m && \
         cat m/root/.profile && stat -c \"%u:%g %a\" m/etc/shadow m/etc/owned m/bin/su && \
         $BUX umount m'"
    ));
    assert_eq!(out, "secret\n0:0 600\n65534:65534 640\n0:0 4755\n");
    // Without a mount namespace of its own nobody can mount there: one line that says why.
    let out = user.sh(&format!(
        "unshare --user --map-root-user $BUX -q mount {r} m"
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("mount namespace") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!is_mounted(&user.home().join("m")));
}

/// What a user's writable layer keeps: owners the host would refuse the user (chown to root and
/// to 1234:5678), a setuid bit, a fifo, a renamed image directory, a deletion — across umount
/// and a remount with the same `--upper`; the image itself never changes.
#[test]
fn a_users_writable_layer_keeps_what_the_host_would_refuse_it() {
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-rw");
    let user = AsUser::new();
    user.ok(&format!("$BUX -q pull {r}"));
    // Listings are cached by the kernel: each change must show in the next one.
    let out = user.ok(&format!(
        "$BUX -q mount --upper state {r} m && cd m && ls etc bin && \
         echo new > etc/new && chown 0:0 etc/new && chmod 4755 etc/new && \
         chown 1234:5678 etc/shadow && mkfifo run-fifo && mv root home-root && \
         rm bin/su && echo more >> etc/owned && echo v2 > usr/lib/one && \
         echo -- && ls etc bin && ls | tr '\\n' ' ' && cd .. && $BUX umount m"
    ));
    assert_eq!(
        out,
        "bin:\nping\nsu\n\netc:\nowned\nshadow\n--\nbin:\nping\n\netc:\nnew\nowned\nshadow\n\
         bin dev etc home-root run-fifo usr "
    );
    let stat = "stat -c '%n %u:%g %a %F' m/etc/new m/etc/shadow m/run-fifo m/home-root \
                m/home-root/.profile m/etc/owned";
    let want = "m/etc/new 0:0 4755 regular file\n\
                m/etc/shadow 1234:5678 600 regular file\n\
                m/run-fifo 1001:1001 644 fifo\n\
                m/home-root 0:0 700 directory\n\
                m/home-root/.profile 0:0 600 regular file\n\
                m/etc/owned 1234:5678 640 regular file\n";
    let out = user.ok(&format!(
        "$BUX -q mount --upper state {r} m && {stat} && cat m/etc/owned m/home-root/.profile && \
         test ! -e m/bin/su && test ! -e m/root && cat m/usr/bin/two && \
         test $(stat -c %i m/usr/bin/two) = $(stat -c %i m/usr/lib/one) && $BUX umount m"
    ));
    let want = want.replace("1001:1001", &format!("{0}:{0}", user.uid));
    // A hardlinked image file written through one name: the other name, first reached in
    // the later mount, shows the same file.
    assert_eq!(out, format!("{want}theirs\nmore\nsecret\nv2\n"));
    // The upper directory holds only the user's files; what the host cannot represent is
    // metadata beside them, and deletions are OCI whiteouts.
    let upper = user.home().join("state/upper");
    let md = std::fs::metadata(upper.join("etc/new")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((md.uid(), md.mode() & 0o7000), (user.uid, 0));
    assert!(upper.join("bin/.wh.su").is_file() && upper.join(".wh.root").is_file());
    // The image is as it was.
    let out = user.ok(&format!(
        "$BUX -q mount {r} ro && stat -c '%u:%g %a' ro/etc/shadow && cat ro/etc/owned && \
         test -e ro/bin/su && $BUX umount ro"
    ));
    assert_eq!(out, "0:0 600\ntheirs\n");
}

/// Root may create device nodes on a user's `--allow-other` writable mount (the kernel refuses
/// mknod of devices to the user before FUSE sees it); they are served back as created. Runs in
/// a private mount namespace whose /etc/fuse.conf allows `user_allow_other`.
#[test]
fn root_makes_a_device_node_on_a_users_allow_other_mount() {
    need("unshare");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-dev");
    let user = AsUser::new();
    user.ok(&format!("$BUX -q pull {r}"));
    let conf = user.dir.path().join("fuse.conf");
    std::fs::write(&conf, "user_allow_other\n").unwrap();
    let m = user.home().join("m");
    let as_user = |cmd: &str| {
        format!(
            "runuser -u {} -- env HOME={} sh -c 'cd $HOME && {cmd}'",
            user.name,
            user.home().display()
        )
    };
    let script = format!(
        "mount --bind {conf} /etc/fuse.conf && \
         {mount} && mknod {m}/dev/console c 5 1 && chown 0:5 {m}/dev/console && \
         {umount} && {mount} && stat -c '%u:%g %a %F %t:%T' {m}/dev/console {m}/dev/null && \
         {umount}",
        conf = conf.display(),
        m = m.display(),
        mount = as_user(&format!(
            "{} -q mount --allow-other --upper state {r} m",
            user.bin().display()
        )),
        umount = as_user(&format!("{} umount m", user.bin().display())),
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "0:5 644 character special file 5:1\n0:0 660 character special file 1:3\n"
    );
}

/// Image names of 252–255 bytes: their whiteout (`.wh.` + name) would not fit in a name, so
/// deleting or moving them away fails cleanly and changes nothing, now and after a remount;
/// names the upper layer alone has come and go as usual.
#[test]
fn a_name_too_long_for_its_whiteout_is_refused_and_nothing_changes() {
    let (f253, d254, e255) = ("f".repeat(253), "d".repeat(254), "e".repeat(255));
    let l = LayerBuilder::new()
        .dir("long", 0o755)
        .file(&format!("long/{f253}"), b"image\n")
        .dir(&format!("long/{d254}"), 0o755)
        .file(&format!("long/{d254}/inside"), b"inside\n")
        .dir(&format!("long/{e255}"), 0o755)
        .file("long/short", b"short\n")
        .finish();
    let (_reg, r, user) = image_for_a_user("t/rootless-long", l);
    user.ok(&format!("$BUX -q pull {r}"));
    // Each refused change says so, and the next line shows nothing changed.
    let out = user.ok(&format!(
        "$BUX -q mount --upper state {r} m && cd m/long && echo edit >> {f253} && \
         (rm {f253} 2>&1 || true) && cat {f253} && \
         (mv {f253} moved 2>&1 || true) && cat {f253} && test ! -e moved && \
         (rm -r {d254} 2>&1 || true) && ls {d254} | wc -l && \
         (rmdir {e255} 2>&1 || true) && test -d {e255} && \
         touch {e255}/new && rm {e255}/new && \
         touch n{f253} && rm n{f253} && rm short && \
         ls | wc -l && cd ../.. && $BUX umount m"
    ));
    let long = "File name too long";
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 10, "{out}");
    assert!(lines[0].contains(long), "{out}");
    assert_eq!(lines[1..3], ["image", "edit"], "{out}");
    assert!(lines[3].contains(long), "{out}");
    assert_eq!(lines[4..6], ["image", "edit"], "{out}");
    assert!(lines[6].contains(long), "{out}");
    // `rm -r` removed what it could (the entry inside), and the directory stays.
    assert_eq!(lines[7], "0", "{out}");
    assert!(lines[8].contains(long), "{out}");
    assert_eq!(lines[9], "3", "{out}");
    // After a remount: the edit kept, the refused deletions never happened, the one that was
    // allowed did.
    let out = user.ok(&format!(
        "$BUX -q mount --upper state {r} m && cat m/long/{f253} && ls m/long/{d254} | wc -l && \
         test -d m/long/{e255} && test ! -e m/long/short && ls m/long | wc -l && $BUX umount m"
    ));
    assert_eq!(out, "image\nedit\n0\n3\n");
}

/// A rename onto an image entry of a name too long for its whiteout needs none (the moved
/// entry hides the image's): it replaces the file, or the empty directory, now and after a
/// remount.
#[test]
fn a_rename_onto_a_name_too_long_for_its_whiteout_replaces_it() {
    let (f253, d254) = ("f".repeat(253), "d".repeat(254));
    let l = LayerBuilder::new()
        .dir("long", 0o755)
        .file(&format!("long/{f253}"), b"image\n")
        .dir(&format!("long/{d254}"), 0o755)
        .finish();
    let (_reg, r, user) = image_for_a_user("t/rootless-long-mv", l);
    user.ok(&format!("$BUX -q pull {r}"));
    let out = user.ok(&format!(
        "$BUX -q mount --upper state {r} m && cd m/long && echo moved > x && mv x {f253} && \
         mkdir y && touch y/in && mv -T y {d254} && cat {f253} && ls {d254} && ls | wc -l && \
         cd ../.. && $BUX umount m"
    ));
    assert_eq!(out, "moved\nin\n2\n");
    let out = user.ok(&format!(
        "$BUX -q mount --upper state {r} m && cat m/long/{f253} && ls m/long/{d254} && \
         ls m/long | wc -l && $BUX umount m"
    ));
    assert_eq!(out, "moved\nin\n2\n");
}

/// The upper directory holds the guest's files owner-only (0600, directories 0700) whatever
/// mode the guest gave them: `/root`, `/etc/shadow` and keys are not for other host users.
/// The guest is served the modes it set. The same directory through a symlink is one upper
/// layer: a second mount on it is refused.
#[test]
fn a_users_upper_layer_is_owner_only_on_the_host() {
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-modes");
    let user = AsUser::new();
    user.ok(&format!("$BUX -q pull {r}"));
    let out = user.ok(&format!(
        "umask 022 && $BUX -q mount --upper state {r} m && cd m && \
         echo new > etc/new && mkdir -p var/lib/d && mkfifo var/fifo && ln -s /x var/sl && \
         echo more >> root/.profile && chown 1234:5678 etc/shadow && rm bin/su && \
         mkdir etc/ssh && echo key > etc/ssh/key && chmod 600 etc/ssh/key && \
         stat -c '%n %a' / etc/new var var/lib/d var/fifo root root/.profile etc/shadow \
         etc/ssh etc/ssh/key && cd .. && \
         ( ln -s state link && $BUX -q mount --upper link {r} m2 2>&1 || true ) && \
         $BUX umount m && find state/upper -perm /077 | wc -l && stat -c %a state/upper"
    ));
    let (served, rest) = out.split_at(out.find("bux-fuse: ").unwrap_or(0));
    assert_eq!(
        served,
        "/ 755\netc/new 644\nvar 755\nvar/lib/d 755\nvar/fifo 644\nroot 700\n\
         root/.profile 600\netc/shadow 600\netc/ssh 755\netc/ssh/key 600\n",
    );
    let rest: Vec<&str> = rest.lines().collect();
    assert!(
        rest.len() == 3 && rest[0].contains("link is in use by another writable mount"),
        "{out}"
    );
    // On the host: nothing in the upper directory for the group or others.
    assert_eq!(rest[1..], ["0", "700"], "{out}");
    // Served the same after a remount.
    let out = user.ok(&format!(
        "$BUX -q mount --upper state {r} m && cd m && \
         stat -c '%n %a' etc/new var/lib/d root root/.profile etc/ssh/key && cd .. && \
         $BUX umount m"
    ));
    assert_eq!(
        out,
        "etc/new 644\nvar/lib/d 755\nroot 700\nroot/.profile 600\netc/ssh/key 600\n"
    );
}

/// A guest's fsync of a directory (after a rename, say) reaches the upper directory: the
/// daemon syncs that directory. An image directory never written has nothing to sync.
#[test]
fn fsync_of_a_directory_syncs_the_upper_directory() {
    need("strace");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-fsyncdir");
    let user = AsUser::new();
    user.ok(&format!("$BUX -q pull {r}"));
    user.ok(&format!(
        "$BUX -q mount --upper state {r} m && echo x > m/etc/new"
    ));
    // The worker serving the mount (its daemon keeps the connection and runs nothing else).
    let workers = mount_workers(&user.home().join(".local/share/bux-fuse"));
    let pid = *workers.first().expect("the mount's worker");
    let log = user.dir.path().join("strace.log");
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&log)
        .arg("-p")
        .arg(pid.to_string())
        .spawn()
        .unwrap();
    // Attached once the daemon's threads show a tracer.
    let traced = || {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("TracerPid:") && !l.ends_with("\t0"))
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !traced() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let fsync = |d: &str| {
        format!("python3 -c 'import os; fd = os.open(\"m/{d}\", os.O_RDONLY); os.fsync(fd)'")
    };
    user.ok(&format!(
        "{} && {} && {}",
        fsync("etc"),
        fsync("usr"),
        fsync("etc")
    ));
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: signals the strace this test started.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let _ = strace.wait();
    user.ok("$BUX umount m");
    let log = std::fs::read_to_string(&log).unwrap();
    let synced = log
        .lines()
        .filter(|l| l.contains("fsync(") && l.contains("/state/upper/etc>"))
        .count();
    assert_eq!(synced, 2, "{log}");
}

/// Everything in `dir`: each entry's path, type, mode, owner, size and mtime.
fn snapshot(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let md = std::fs::symlink_metadata(&d).unwrap();
        out.push(format!(
            "{} {:o} {}:{} {} {}.{}",
            d.strip_prefix(dir).unwrap().display(),
            md.mode(),
            md.uid(),
            md.gid(),
            md.size(),
            md.mtime(),
            md.mtime_nsec()
        ));
        if md.is_dir() {
            todo.extend(std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out.sort();
    out
}

/// An `--upper` directory holds one kind of writable layer: one a user's mount kept (bux-fuse's
/// own format: whiteouts as `.wh.` files, symlinks as files) is refused by root's kernel
/// overlay, and one root's overlay kept is refused by a user's mount — in one line, with
/// nothing in it changed.
#[test]
fn an_upper_of_one_kind_is_refused_by_the_other() {
    need("fusermount3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/upper-kind");
    let user = AsUser::new();
    user.ok(&format!(
        "$BUX -q pull {r} && $BUX -q mount --upper state {r} m && rm m/bin/su && \
         ln -s shadow m/etc/link && $BUX umount m"
    ));
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let state = user.home().join("state");
    let mnt = user.dir.path().join("root-mnt");
    let root_refused = || {
        let before = snapshot(&state);
        let out = bux.run(&[
            "mount",
            "-q",
            "--upper",
            state.to_str().unwrap(),
            &r,
            mnt.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            bux.ok(&["umount", mnt.to_str().unwrap()]);
        }
        assert!(
            !out.status.success()
                && err.contains("was used by a user's (FUSE) writable mount")
                && err.lines().count() == 1,
            "root's overlay on a user's upper: {err}"
        );
        assert_eq!(snapshot(&state), before);
    };
    root_refused();
    // An upper directory from before the kind was recorded: told by what is in it.
    std::fs::remove_file(state.join("format")).unwrap();
    root_refused();

    // The reverse: root's overlay kept its layer there, then handed it to the user.
    let root_state = user.home().join("root-state");
    {
        let m = bux.mount_with(&r, &["--upper", root_state.to_str().unwrap()]);
        std::fs::remove_file(m.path.join("bin/su")).unwrap();
        std::os::unix::fs::symlink("shadow", m.path.join("etc/link")).unwrap();
    }
    let chown = std::process::Command::new("chown")
        .args(["-R", user.name])
        .arg(&root_state)
        .status()
        .unwrap();
    assert!(chown.success());
    let user_refused = || {
        let before = snapshot(&root_state);
        let out = user.sh(&format!(
            "$BUX -q mount --upper root-state {r} m2 || exit 1; ls m2/bin m2/etc; $BUX umount m2"
        ));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("was used by root's kernel overlay")
                && err.lines().count() == 1,
            "a user's mount on root's overlay upper: {}{err}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(snapshot(&root_state), before);
    };
    user_refused();
    std::fs::remove_file(root_state.join("format")).unwrap();
    user_refused();
}

/// A user's mount that fails (here: on a mount point the user cannot write) claims its
/// `--upper` directory for no kind: root's overlay takes it afterwards. A record of the kind
/// left empty (by a crash, say) is as good as none: what is in the directory tells.
#[test]
fn a_failed_mount_leaves_its_upper_unclaimed() {
    need("fusermount3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/upper-unclaimed");
    let user = AsUser::new();
    let ro = user.home().join("ro");
    std::fs::create_dir(&ro).unwrap(); // root's, 0755
    let out = user.sh(&format!(
        "$BUX -q pull {r} && $BUX -q mount --upper state {r} ro"
    ));
    assert!(
        !out.status.success(),
        "a mount on a directory the user cannot write"
    );
    let state = user.home().join("state");
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let root_mount = || {
        let m = bux.mount_with(&r, &["--upper", state.to_str().unwrap()]);
        std::fs::write(m.path.join("etc/new"), b"root\n").unwrap();
    };
    root_mount();
    assert_eq!(
        std::fs::read_to_string(state.join("format")).unwrap(),
        "kernel-overlay\n"
    );
    std::fs::write(state.join("format"), b"").unwrap();
    root_mount();
    // Still root's: a user's mount is refused.
    let out = user.sh(&format!("$BUX -q mount --upper state {r} m2"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("was used by root's kernel overlay"),
        "{err}"
    );
}

/// An image file open for writing keeps working once its name is gone (the kernel declines
/// opens, so it is copied up only at the first write): the write lands on the open file, which
/// reads back its bytes around it, a hardlink's other name shows it too, the removed name stays
/// gone, and the file's hidden copy goes once the kernel forgets it.
#[test]
fn an_image_file_written_after_its_name_is_removed() {
    need("python3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-unlinked");
    let user = AsUser::new();
    user.ok(&format!("$BUX -q pull {r}"));
    let script = "import os\n\
                  for name, other in (('m/etc/owned', None), ('m/usr/lib/one', 'm/usr/bin/two')):\n\
                  \x20   fd = os.open(name, os.O_RDWR)\n\
                  \x20   os.unlink(name)\n\
                  \x20   os.pwrite(fd, b'XY', 1)\n\
                  \x20   print(os.pread(fd, 64, 0), os.path.exists(name))\n\
                  \x20   if other:\n\
                  \x20       print(open(other, 'rb').read())\n\
                  \x20   os.close(fd)\n";
    std::fs::write(user.home().join("t.py"), script).unwrap();
    let out = user.ok(&format!(
        "$BUX -q mount --upper state {r} m && python3 t.py"
    ));
    assert_eq!(
        out, "b'tXYirs\\n' False\nb'vXY' False\nb'vXY'\n",
        "writes through the open files"
    );
    // Once the kernel forgets the file, its hidden copy goes.
    let upper = user.home().join("state/upper");
    let orphans = || -> Vec<_> {
        std::fs::read_dir(&upper)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("orphan"))
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !orphans().is_empty() && std::time::Instant::now() < deadline {
        let _ = drop_caches("2");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(orphans(), Vec::<String>::new());
    user.ok("$BUX umount m");
    let out = user.ok(&format!(
        "$BUX -q mount --upper state {r} m && ls m/etc m/usr/lib m/usr/bin && cat m/usr/bin/two \
         && $BUX umount m"
    ));
    assert_eq!(out, "m/etc:\nshadow\n\nm/usr/bin:\ntwo\n\nm/usr/lib:\nvXY");
    assert_eq!(orphans(), Vec::<String>::new());
}

/// An ordinary user serves an image as a disk (what a rootless VMM attaches): the served
/// `root.erofs` is the user's, passes `fsck.erofs`, and has the very bytes root's store
/// exports of the same image (one manifest, one disk, whoever serves it).
#[test]
fn a_user_serves_the_same_disk_as_root() {
    need("fusermount3");
    need("fsck.erofs");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-disk");
    let user = AsUser::new();
    let out = user.ok(&format!(
        "$BUX -q mount --disk {r} d && stat -c '%U %a %s' d/root.erofs && \
         fsck.erofs d/root.erofs >/dev/null && sha256sum < d/root.erofs && $BUX umount d"
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let user_name = user.ok("id -un");
    assert!(
        lines[0].starts_with(&format!("{} 444 ", user_name.trim())),
        "{out}"
    );
    let root = Bux::new();
    let file = root.store.path().join("root.erofs");
    root.ok(&["export", "--erofs", &r, file.to_str().unwrap()]);
    let len = std::fs::metadata(&file).unwrap().len();
    assert_eq!(lines[0].rsplit(' ').next(), Some(len.to_string().as_str()));
    assert_eq!(
        lines[1].split(' ').next().unwrap(),
        sha256_hex(&std::fs::read(&file).unwrap())
    );
}

/// The FUSE mounts under the user's store's `shared/` (its image servers').
fn shared_mounts(user: &AsUser) -> Vec<std::path::PathBuf> {
    let shared = user.home().join(".local/share/bux-fuse/shared");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter(|l| l.contains(" - fuse"))
        .filter_map(|l| l.split(' ').nth(4).map(std::path::PathBuf::from))
        .filter(|p| p.starts_with(&shared))
        .collect()
}

/// A user's 40 writable mounts of an image read its files through one read-only mount of the
/// image, the user's own image server: all read the same bytes, the mounts cache none of the
/// image's pages and the shared mount caches each once (mapped files too); writes stay in
/// their mount. With the server killed, the mounts decode the files themselves; the next
/// mount starts a new server, and the last `umount` leaves none behind.
#[test]
fn a_users_writable_mounts_hold_the_images_pages_once() {
    need("fusermount3");
    need("fincore");
    const N: usize = 40;
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let user = AsUser::new();
    // The user's own: the kernel tells a user which pages of a file are cached (mincore,
    // fincore) only for files it owns or may write; of others it says all are.
    let walk = test_bytes(12 << 20, 9);
    let l = LayerBuilder::new()
        .file_with("data/big", &big, 0o644, user.uid as u64, user.uid as u64)
        .file_with("data/walk", &walk, 0o644, user.uid as u64, user.uid as u64)
        .file("etc/small", b"small\n")
        .finish();
    let reg = Registry::start();
    let r = pushed_image(&reg, "t/rootless-cache", &Image::new(vec![(l, Comp::Gzip)]));
    let each = |cmd: &str| user.ok(&format!("for i in $(seq 0 {}); do {cmd}; done", N - 1));
    user.ok(&format!("$BUX -q pull {r}"));
    each(&format!("$BUX -q mount --writable {r} m$i"));
    let shared = shared_mounts(&user);
    assert_eq!(shared.len(), 1, "{shared:?}");
    let place = shared[0].parent().unwrap().to_path_buf();
    // This store's (tests running beside this one have servers of their own).
    let store = user.home().join(".local/share/bux-fuse");
    let servers = user.ok(&format!(
        "pgrep -c -f -- '--store {} [s]erve-shared sha256' || true",
        store.display()
    ));
    assert_eq!(servers.trim(), "1", "one image server (its worker aside)");
    let sum = sha256_hex(&big);
    let window = PAGE_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(
        each("sha256sum < m$i/data/big"),
        format!("{sum}  -\n").repeat(N)
    );
    // Mapped, shared and private (as ld.so maps), the same bytes.
    let mapped = user.ok("python3 -c 'import hashlib, mmap, sys\n\
         f = open(\"m0/data/big\", \"rb\")\n\
         for flags in (mmap.MAP_SHARED, mmap.MAP_PRIVATE):\n    \
             m = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)\n    \
             print(hashlib.sha256(m).hexdigest())'");
    assert_eq!(mapped, format!("{sum}\n{sum}\n"));
    // fincore pads its figures. A mount caches an image file only while it is open: the
    // pages go at the last close (told to the kernel a moment after it). Looked at once, after
    // a pause: fincore opens the file too, and its own close would drop what a missed drop
    // left, so a second look proves nothing.
    let resident = |p: &str| user.ok(&format!("fincore -bno RES {p} | tr -d ' '"));
    let settled = || std::thread::sleep(std::time::Duration::from_secs(1));
    settled();
    assert_eq!(
        each("fincore -bno RES m$i/data/big | tr -d ' '"),
        "0\n".repeat(N)
    );
    // While a file is read in order (in 10 KiB reads, as `tar` reads), the mount keeps only
    // the pages about its reader: read ahead of it, and at most 3 MiB behind.
    let out = user.ok(
        "python3 -c 'import hashlib, subprocess, time\n\
         f = open(\"m0/data/walk\", \"rb\")\n\
         h = hashlib.sha256()\n\
         while f.tell() < 10 << 20:\n    h.update(f.read(10240))\n\
         res = lambda: int(subprocess.check_output([\"fincore\", \"-bno\", \"RES\", \"m0/data/walk\"]))\n\
         for _ in range(200):\n    \
             if res() <= 4 << 20: break\n    \
             time.sleep(0.05)\n\
         print(res())\n\
         h.update(f.read())\n\
         print(h.hexdigest())'",
    );
    let (kept, read) = out.trim().split_once('\n').unwrap();
    let kept: u64 = kept.trim().parse().unwrap();
    assert_eq!(read, sha256_hex(&walk));
    assert!(
        kept > 0 && kept <= 4 << 20,
        "{kept} bytes of the 12 MiB file kept by the mount mid-walk"
    );
    settled();
    assert_eq!(resident("m0/data/walk"), "0\n");
    let shared_big = shared[0].join("data/big");
    // The whole file is in the shared mount's page cache, where the mounts' reads put it. The
    // host may take any page back at any time (these machines run DAMON's proactive `pageout`
    // on physical memory, which judges a region by sampled pages: 5 pages of it were missing
    // once): then the file is read again through mount `via`, which puts them back only if its
    // reads go through the shared mount.
    let shared_copy_whole = |via: &str| {
        let whole = format!("{}\n", big.len());
        if resident(shared_big.to_str().unwrap()) != whole {
            user.ok(&format!("cat {via}/data/big >/dev/null"));
        }
        assert_eq!(resident(shared_big.to_str().unwrap()), whole);
    };
    shared_copy_whole("m0");
    drop(window);

    // Writes stay in their mount; a file written there is that mount's own.
    each("printf $i > m$i/etc/small");
    let out = user.ok(
        "printf X | dd of=m1/data/big bs=1 seek=100 conv=notrunc status=none && \
         for i in 0 1 2; do sha256sum < m$i/data/big; done",
    );
    let mut changed = big.clone();
    changed[100] = b'X';
    let changed = sha256_hex(&changed);
    assert_eq!(out, format!("{sum}  -\n{changed}  -\n{sum}  -\n"));
    let want: String = (0..N).map(|i| format!("{i}\n")).collect();
    assert_eq!(each("cat m$i/etc/small; echo"), want);

    // The server killed (supervisor and worker): the mounts read on, decoding themselves.
    for pid in ["pid", "worker-pid"] {
        let pid = std::fs::read_to_string(place.join(pid)).unwrap();
        let st = std::process::Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    drop_caches("3\n").unwrap();
    let out = user.ok("sha256sum < m0/data/big && sha256sum < m2/data/big");
    assert_eq!(out, format!("{sum}  -\n{sum}  -\n"));
    // The mounts gone, the dead server's mount is left to `gc`, which takes it down.
    each("$BUX umount m$i");
    assert_eq!(shared_mounts(&user), shared, "dead, still mounted");
    user.ok("$BUX -q gc");
    assert_eq!(shared_mounts(&user), Vec::<std::path::PathBuf>::new());
    // The next mount starts a new server; the last umount returns with it gone, the image
    // free to remove.
    user.ok(&format!("$BUX -q mount --writable {r} m{N}"));
    assert_eq!(
        shared_mounts(&user),
        shared,
        "a live shared mount, at the same place"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(place.join("readers"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "another user locking it would keep the server up"
    );
    let out = user.ok(&format!(
        "sha256sum < m{N}/data/big && fincore -bno RES m{N}/data/big | tr -d ' '"
    ));
    assert_eq!(out, format!("{sum}  -\n0\n"));
    shared_copy_whole(&format!("m{N}"));
    user.ok(&format!("$BUX umount m{N} && $BUX rm {r}"));
    assert_eq!(shared_mounts(&user), Vec::<std::path::PathBuf>::new());
    assert!(!place.join("pid").exists(), "the server has left");
}

/// A user's mount serving in the foreground unmounts itself on Ctrl-C (SIGINT) or SIGTERM, as
/// root's does, though its daemon may run no setuid program once confined (no_new_privs):
/// `fusermount3` was started before.
#[test]
fn a_users_foreground_mount_unmounts_itself_on_a_signal() {
    need("fusermount3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-fg");
    let user = AsUser::new();
    user.ok(&format!("$BUX -q pull {r}"));
    for (flags, signal) in [("", "INT"), ("--writable", "TERM")] {
        let out = user.ok(&format!(
            "mkdir -p fg && ($BUX mount --foreground {flags} {r} fg 2>fg.log & echo $! > fg.pid) && \
             for i in $(seq 100); do [ -e fg/etc/owned ] && break; sleep 0.1; done && \
             cat fg/usr/lib/one && kill -{signal} $(cat fg.pid) && \
             while kill -0 $(cat fg.pid) 2>/dev/null; do sleep 0.1; done; cat fg.log"
        ));
        assert!(out.starts_with("v1\n"), "{out}");
        assert!(
            !out.contains("fusermount3") && !out.contains("rror"),
            "{out}"
        );
        assert!(!is_mounted(&user.home().join("fg")), "{flags}: {out}");
    }
}

/// The state letter of process `pid` (`None`: no such process).
fn process_state(pid: &str) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A user's image server that hangs (stopped) rather than dies does not hold its mounts' reads
/// for good: a read through it waits a few seconds, then its worker is ended and another takes
/// over the connection (the read is answered by it, the page cache still shared); with the
/// supervisor stopped too, it is ended as well and the mount decodes the file itself.
#[test]
fn a_users_reads_go_on_when_the_image_server_hangs() {
    need("fusermount3");
    need("fincore");
    let files: Vec<Vec<u8>> = (0..3u32)
        .map(|k| {
            (0..4u32 << 20)
                .map(|i| ((i ^ (k * 7919)).wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect()
        })
        .collect();
    let sums: Vec<String> = files
        .iter()
        .map(|f| format!("{}  -\n", sha256_hex(f)))
        .collect();
    // The user's own files (fincore tells of no other's pages, see above).
    if !kernel_resends_fuse_requests() {
        eprintln!("skipped: the kernel resends no FUSE request to a new worker (before 6.9)");
        return;
    }
    let user = AsUser::new();
    // Were the servers not ended, the reads would wait for good (and a FUSE read is deaf to
    // `timeout`): end them after 90 s, for the test to fail rather than hang; and whatever
    // happens, none is left behind, stopped.
    let store = user.home().join(".local/share/bux-fuse");
    let later = store.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(90));
        kill_image_servers(&later);
    });
    struct KilledOnDrop(std::path::PathBuf);
    impl Drop for KilledOnDrop {
        fn drop(&mut self) {
            kill_image_servers(&self.0);
        }
    }
    let _servers = KilledOnDrop(store);
    let own = user.uid as u64;
    let l = LayerBuilder::new()
        .file_with("data/a", &files[0], 0o644, own, own)
        .file_with("data/b", &files[1], 0o644, own, own)
        .file_with("data/c", &files[2], 0o644, own, own)
        .finish();
    let reg = Registry::start();
    let r = pushed_image(&reg, "t/rootless-hung", &Image::new(vec![(l, Comp::Gzip)]));
    user.ok(&format!(
        "$BUX -q pull {r} && $BUX -q mount --writable {r} m"
    ));
    let shared = shared_mounts(&user);
    assert_eq!(shared.len(), 1, "{shared:?}");
    let place = shared[0].parent().unwrap().to_path_buf();
    let pid = |f: &str| {
        std::fs::read_to_string(place.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    let signal = |sig: &str, pid: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, pid])
            .status()
            .unwrap();
        assert!(st.success());
    };
    assert_eq!(user.ok("sha256sum < m/data/a"), sums[0]);

    // The worker stopped: another takes over, and answers.
    let (supervisor, worker) = (pid("pid"), pid("worker-pid"));
    signal("-STOP", &worker);
    assert_eq!(user.ok("timeout 60 sha256sum < m/data/b"), sums[1]);
    assert_eq!(process_state(&worker), None, "the stopped worker was ended");
    let second = pid("worker-pid");
    assert_ne!(second, worker);
    assert_eq!(process_state(&supervisor).map(|s| s != 'Z'), Some(true));
    assert_eq!(shared_mounts(&user), shared);
    let resident = user.ok(&format!(
        "fincore -bno RES {}/data/b | tr -d ' '",
        shared[0].display()
    ));
    assert_ne!(resident.trim(), "0", "read through the shared mount");

    // Supervisor and worker stopped: both are ended, and the mount decodes the file itself.
    signal("-STOP", &supervisor);
    signal("-STOP", &second);
    assert_eq!(user.ok("timeout 60 sha256sum < m/data/c"), sums[2]);
    assert_eq!(process_state(&supervisor), None, "the supervisor was ended");
    assert!(
        matches!(process_state(&second), None | Some('Z')),
        "the worker was ended"
    );
    assert_eq!(
        user.ok("sha256sum < m/data/a && sha256sum < m/data/b"),
        sums[..2].concat()
    );
    // The dead server's mount goes with `gc` once unused; the next mount starts a new server.
    user.ok("$BUX umount m && $BUX -q gc");
    assert_eq!(shared_mounts(&user), Vec::<std::path::PathBuf>::new());
    user.ok(&format!("$BUX -q mount --writable {r} m"));
    assert_eq!(user.ok("sha256sum < m/data/c"), sums[2]);
    assert_eq!(shared_mounts(&user), shared);
    user.ok("$BUX umount m");
}

/// The kernel's dev_t of the user's mount at `dir` ((major << 20) | minor; only the user may
/// stat it): what FUSE trace events call its connection.
fn kernel_dev(user: &AsUser, dir: &str) -> u64 {
    let dev = user.ok(&format!("stat -c '%Hd %Ld' {dir}"));
    let (major, minor) = dev.trim().split_once(' ').unwrap();
    (major.parse::<u64>().unwrap() << 20) | minor.parse::<u64>().unwrap()
}

/// The kernel's trace of FUSE requests sent on one connection, in a tracing instance of its own
/// (tests beside this one send requests of their own; the global buffer stays untouched).
struct FuseTrace {
    dir: std::path::PathBuf,
}

impl FuseTrace {
    /// Traces requests to the FUSE mount of device number `dev`; `None` where the kernel has
    /// no FUSE trace events (before Linux 6.14) or tracefs cannot be mounted, which fails the
    /// test under CI (its kernel has them: there their absence is a failure, not a skip).
    fn start(dev: u64) -> Option<FuseTrace> {
        let root = std::path::Path::new("/sys/kernel/tracing");
        // A machine fresh from boot may have tracefs unmounted (nothing here mounts it at
        // boot): mounted here, as root, as `perf` or `trace-cmd` would.
        if !root.join("events").exists() {
            let _ = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev"])
                .arg(root)
                .status();
        }
        if !root.join("events/fuse/fuse_request_send").exists() {
            if std::env::var_os("CI").is_some() {
                panic!("no FUSE trace events in CI");
            }
            return None;
        }
        // One instance per trace (two tests of this process may trace at once).
        static TRACES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = TRACES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join(format!(
            "instances/bux-fuse-test-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).ok()?;
        // Made now: should what follows fail, the instance goes with it.
        let trace = FuseTrace { dir };
        let event = trace.dir.join("events/fuse/fuse_request_send");
        std::fs::write(event.join("filter"), format!("connection == {dev}")).unwrap();
        std::fs::write(event.join("enable"), "1").unwrap();
        Some(trace)
    }

    /// How many requests of `opcode` (e.g. `FUSE_LOOKUP`) were sent so far.
    fn count(&self, opcode: &str) -> usize {
        let trace = std::fs::read_to_string(self.dir.join("trace")).unwrap();
        trace.matches(&format!("({opcode})")).count()
    }
}

impl Drop for FuseTrace {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/fuse/fuse_request_send/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A listing of a user's mount, writable or read-only, carries its entries' attributes
/// (readdirplus): `ls -l` or `tar` of a directory sends no lookup per entry, however many
/// listing requests it takes (by the kernel's adaptive choice, a `tar` of 600 entries listed all
/// but the first batch without attributes, then looked each of those up: 400 lookups). Entries
/// the kernel learnt that way are counted as looked up: with the kernel's caches dropped (it
/// forgets them), names removed, renamed and linked since still serve the right files.
#[test]
fn a_users_listings_carry_their_entries_attributes() {
    need("fusermount3");
    const N: usize = 600;
    let mut l = LayerBuilder::new().dir("d", 0o755);
    for i in 0..N {
        l = l.file(&format!("d/f{i}"), format!("{i}\n").as_bytes());
    }
    let (_reg, r, user) = image_for_a_user("t/rootless-rdplus", l.finish());
    user.ok(&format!(
        "$BUX -q pull {r} && $BUX -q mount --writable {r} m"
    ));
    user.ok(
        "echo new > m/d/new && ln m/d/f1 m/d/link && mv m/d/f2 m/d/moved && rm m/d/f3 && \
         ln -s f0 m/sym",
    );
    drop_caches("3\n").unwrap();
    let dev = kernel_dev(&user, "m");
    let trace = FuseTrace::start(dev);
    let listed = user.ok("tar -C m -cf - d >/dev/null && ls -l m/d | tail -n +2 | wc -l");
    assert_eq!(listed.trim(), (N + 1).to_string(), "N - f3 + new + link");
    match trace {
        Some(trace) => {
            let (lookups, plain) = (trace.count("FUSE_LOOKUP"), trace.count("FUSE_READDIR"));
            assert!(
                lookups < 5 && plain == 0 && trace.count("FUSE_READDIRPLUS") > 1,
                "{lookups} lookups and {plain} listings without attributes for {N} entries"
            );
            // A symlink's target is read once (the kernel caches it).
            user.ok("for i in 1 2 3; do readlink m/sym >/dev/null; done");
            assert_eq!(trace.count("FUSE_READLINK"), 1);
            // The same of a read-only mount of the image, which the user's daemon serves too.
            user.ok(&format!("mkdir ro && $BUX -q mount {r} ro"));
            let trace = FuseTrace::start(kernel_dev(&user, "ro")).unwrap();
            user.ok("tar -C ro -cf - d >/dev/null");
            let (lookups, plain) = (trace.count("FUSE_LOOKUP"), trace.count("FUSE_READDIR"));
            assert!(
                lookups < 5 && plain == 0 && trace.count("FUSE_READDIRPLUS") > 1,
                "read-only: {lookups} lookups and {plain} listings without attributes"
            );
            user.ok("$BUX umount ro");
        }
        None => eprintln!("no FUSE trace events in this kernel: lookups not counted"),
    }
    // Forgotten and found again: each name its file; a listed file unlinked while open keeps
    // its bytes through its descriptor.
    let script = r#"
import os, subprocess
f = open("m/d/f4")
os.listdir("m/d")
os.unlink("m/d/f4")
os.listdir("m/d")
input()
print(f.read(), end="")
"#;
    let mut held = user.spawn(&format!("python3 -c '{script}'"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    for _ in 0..2 {
        drop_caches("3\n").unwrap();
        let out = user.ok(
            "ls m/d >/dev/null && cat m/d/f0 m/d/f1 m/d/link m/d/moved m/d/new && \
             stat -c %h m/d/f1 && ls m/d/f2 m/d/f3 m/d/f4 2>&1 | wc -l",
        );
        assert_eq!(out, "0\n1\n1\n2\nnew\n2\n3\n");
    }
    use std::io::Write;
    held.stdin.take().unwrap().write_all(b"\n").unwrap();
    let out = held.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "4\n");
    user.ok("$BUX umount m");
}

/// A small image file's bytes (at most 64 KiB) are in the kernel's cache as soon as it is
/// opened in a user's writable mount (`upper::pushed`): reading and then `stat`ing it (as
/// `tar` does) sends no READ and no GETATTR. And the image's bytes never land over newer ones:
/// files written, appended to and truncated while other processes open and read them read
/// back as changed (each push held 30 ms before it is sent: without the wait for it, some
/// read back stale).
#[test]
fn a_users_small_image_files_are_cached_as_they_are_opened() {
    need("fusermount3");
    const N: usize = 40;
    let mut l = LayerBuilder::new().dir("d", 0o755).dir("w", 0o755);
    // Small: up to 64 KiB, what a pull keeps whole in the store; three of them over 32 KiB
    // (33, 48 and 63 KiB), which were read through the image's shared mount before.
    let body = |i: usize| {
        match i {
            0..3 => format!("{i}:").repeat(((33 << 10) + i * (15 << 10)) / 2),
            _ => format!("{i}:").repeat(1 + i * 97),
        }
        .into_bytes()
    };
    for i in 0..N {
        l = l.file(&format!("d/f{i}"), &body(i));
        l = l.file(&format!("w/f{i}"), &body(i));
    }
    let (_reg, r, user) = image_for_a_user("t/rootless-pushed", l.finish());
    // Each push waits 30 ms between its check that the file is the image's and the push (a
    // hook of debug builds): a change of the file in that window must wait for it.
    user.ok(&format!(
        "$BUX -q pull {r} && BUX_FUSE_TEST_PUSH_DELAY_MS=30 $BUX -q mount --writable {r} m && \
         ls -l m/d m/w >/dev/null"
    ));
    let dev = kernel_dev(&user, "m");
    let trace = FuseTrace::start(dev);
    // (`stat` asks for the atime, as tar's does, which a READ makes the kernel ask again.)
    let sums =
        user.ok("for f in m/d/*; do sha256sum < $f; stat -c '%s %X' $f | cut -d' ' -f1; done");
    let want: String = (0..N)
        .map(|i| format!("{}  -\n{}\n", sha256_hex(&body(i)), body(i).len()))
        .collect::<Vec<_>>()
        .join("");
    let mut got: Vec<&str> = sums.lines().collect();
    let mut want: Vec<&str> = want.lines().collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the files' bytes");
    match &trace {
        Some(trace) => {
            let (reads, getattrs) = (trace.count("FUSE_READ"), trace.count("FUSE_GETATTR"));
            assert!(
                // (A GETATTR or two: the directory's.)
                trace.count("FUSE_OPEN") >= N && reads == 0 && getattrs <= 2,
                "{reads} READ and {getattrs} GETATTR for {N} small files read and stat'ed"
            );
        }
        None => eprintln!("no FUSE trace events in this kernel: requests not counted"),
    }
    // Readers open the files again and again while each is rewritten, appended to or
    // truncated: the bytes read after the change are the new ones.
    let script = r#"
import os, threading
N = int(os.environ["N"])
stop = False
def readers():
    while not stop:
        for i in range(N):
            with open(f"m/w/f{i}", "rb") as f:
                f.read()
ts = [threading.Thread(target=readers, daemon=True) for _ in range(3)]
for t in ts: t.start()
want, bad = {}, []
for i in range(N):
    p = f"m/w/f{i}"
    old = open(p, "rb").read()
    if i % 3 == 0:
        open(p, "wb").write(b"new %d" % i); want[i] = b"new %d" % i
    elif i % 3 == 1:
        open(p, "ab").write(b"+"); want[i] = old + b"+"
    else:
        os.truncate(p, 3); want[i] = old[:3]
    for _ in range(20):
        with open(p, "rb") as f:
            got = f.read()
        if got != want[i]:
            bad.append(i)
            break
stop = True
for t in ts: t.join()
bad += [i for i in range(N) if open(f"m/w/f{i}", "rb").read() != want[i]]
print("bad", sorted(set(bad)))
"#;
    let out = user.ok(&format!("N={N} python3 -c '{script}'"));
    assert_eq!(out.trim(), "bad []");
    user.ok("$BUX umount m");
}

/// A large image file read in order through a user's writable mount is asked of the image
/// server in windows of 256 KiB (the read-ahead window the kernel gives a file read in order,
/// twice a user mount's default), not 128 KiB: half the requests the shared server answers.
#[test]
fn a_users_walk_of_a_large_image_file_asks_the_image_server_in_large_windows() {
    need("fusermount3");
    const SIZE: usize = 4 << 20;
    let body = test_bytes(SIZE, 11);
    let l = LayerBuilder::new().file("big", &body).finish();
    let (_reg, r, user) = image_for_a_user("t/rootless-windows", l);
    user.ok(&format!(
        "$BUX -q pull {r} && $BUX -q mount --writable {r} m"
    ));
    let shared = shared_mounts(&user);
    assert_eq!(shared.len(), 1, "{shared:?}");
    let dev = kernel_dev(&user, &shared[0].display().to_string());
    let trace = FuseTrace::start(dev);
    let sum = user.ok("sha256sum < m/big");
    assert_eq!(sum.split(' ').next().unwrap(), sha256_hex(&body));
    match &trace {
        Some(trace) => {
            // 16 windows of 256 KiB; 128 KiB ones would be 32 at least.
            let reads = trace.count("FUSE_READ");
            assert!(
                (1..=24).contains(&reads),
                "{reads} READ to the image server for a 4 MiB file read in order"
            );
        }
        None => eprintln!("no FUSE trace events in this kernel: requests not counted"),
    }
    user.ok("$BUX umount m");
}

/// A name whose whiteout would be one of the writable layer's hidden files (the data of a file
/// unlinked while open, say) is refused to new entries (EINVAL), by create, mkdir, symlink and
/// rename alike: making one cannot remove that file.
#[test]
fn names_of_the_writable_layers_hidden_files_are_refused() {
    need("fusermount3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-hidden");
    let user = AsUser::new();
    user.ok(&format!(
        "$BUX -q pull {r} && $BUX -q mount --writable {r} m"
    ));
    let script = r#"
import errno, os
f = open("m/etc/victim", "w+"); f.write("kept"); f.flush()
os.unlink("m/etc/victim")
open("m/etc/other", "w").close()
refused = 0
for n in range(1, 300):
    for name in (f".bux-fuse-orphan-{n}", f".bux-fuse-staged-{n}"):
        for make in (lambda p: open(p, "x").close(), os.mkdir,
                     lambda p: os.symlink("x", p), lambda p: os.rename("m/etc/other", p)):
            try:
                make("m/" + name)
            except OSError as e:
                refused += e.errno == errno.EINVAL
# Enough other files opened that the mount closes its own descriptor of the orphan.
for _ in range(600):
    open("m/etc/other").close()
f.seek(0); print(refused, f.read())
"#;
    let out = user.ok(&format!("python3 -c '{script}'"));
    assert_eq!(out, format!("{} kept\n", 299 * 2 * 4));
    user.ok("$BUX umount m");
}

/// A user's writable mount is served by a worker its mounting process keeps: killed, or hung,
/// the worker is replaced on the same connection and the VM's root goes on as it was — the
/// same inode numbers, links, renamed and removed names, files held open (one unlinked), and
/// a request the hung worker held is answered by the next.
#[test]
fn a_users_writable_mount_outlives_its_worker() {
    need("fusermount3");
    let big: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let l = LayerBuilder::new()
        .file("etc/conf", b"image\n")
        .file("data/big", &big)
        .file("data/h1", b"linked\n")
        .hardlink("data/h2", "data/h1")
        .file("dir/sub/file", b"gone\n")
        .finish();
    let (_reg, r, user) = image_for_a_user("t/rootless-takeover", l);
    let store = user.home().join(".local/share/bux-fuse");
    user.ok(&format!(
        "$BUX -q pull {r} && $BUX -q mount --writable {r} m"
    ));
    let workers = || mount_workers(&store);
    let first = workers();
    assert_eq!(first.len(), 1, "one worker serves the mount: {first:?}");

    user.ok(
        "mkdir -p m/new/deep && echo one > m/new/deep/f && ln m/new/deep/f m/new/link \
         && mv m/new m/moved && echo changed > m/etc/conf && rm m/dir/sub/file \
         && ln m/data/h1 m/data/h3 && echo held > m/held",
    );
    let looks = "stat -c '%i %h %s %n' m/moved m/moved/deep m/moved/deep/f m/moved/link \
                 m/data/h1 m/data/h2 m/data/h3 m/etc/conf m/data/big m/dir/sub && ls -a m m/dir/sub";
    // Files held open across the takeovers, one of them unlinked while open.
    let mut holder = user.spawn(
        "exec 7<m/moved/deep/f 8<m/held && rm m/held && echo open \
         && read _ && cat <&7 && cat <&8 && echo more >> m/moved/link \
         && read _ && cat /proc/self/fd/8",
    );
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut stdin = holder.stdin.take().unwrap();
    let line = |out: &mut std::io::BufReader<std::process::ChildStdout>| {
        let mut l = String::new();
        std::io::BufRead::read_line(out, &mut l).unwrap();
        l
    };
    assert_eq!(line(&mut out), "open\n");
    let before = user.ok(looks);
    let replaced = |old: &[u32]| replaced_workers(&store, old, 1);

    // Killed: the next worker knows every node the kernel was told of.
    let st = std::process::Command::new("kill")
        .args(["-9", &first[0].to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let second = replaced(&first);
    assert_eq!(
        user.ok(looks),
        before,
        "the tree as it was, inode numbers and all"
    );
    use std::io::Write as _;
    writeln!(stdin).unwrap();
    assert_eq!(line(&mut out), "one\n", "a file held open");
    assert_eq!(line(&mut out), "held\n", "an unlinked file held open");
    assert_eq!(
        user.ok("cat m/moved/deep/f m/data/h3 && sha256sum < m/data/big"),
        format!("one\nmore\nlinked\n{}  -\n", sha256_hex(&big))
    );

    // Hung (stopped), with a request in it: the keeper ends it after 5 s without an answer,
    // and the next worker gets the request again (Linux 6.9+ resends it).
    let st = std::process::Command::new("kill")
        .args(["-STOP", &second[0].to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    if kernel_resends_fuse_requests() {
        user.ok("timeout 60 mkdir m/during && timeout 60 mv m/moved m/again");
    }
    let third = replaced(&second);
    if !kernel_resends_fuse_requests() {
        user.ok("mkdir m/during && mv m/moved m/again");
    }
    writeln!(stdin).unwrap();
    assert_eq!(
        line(&mut out),
        "held\n",
        "an unlinked file opened again by its descriptor"
    );
    assert!(holder.wait().unwrap().success());
    assert_eq!(
        user.ok("cat m/again/link && ls m/during | wc -l && stat -c %i m/again/deep/f"),
        format!(
            "one\nmore\n0\n{}\n",
            before.lines().nth(2).unwrap().split(' ').next().unwrap()
        )
    );
    assert_eq!(workers(), third);
    user.ok("$BUX umount m");
    wait_for(10, "a worker outlived its mount", || workers().is_empty());
}

/// A request the worker carried out but died before answering comes again to the next one
/// (the kernel resends it): it is answered as done, not failed because it was. The worker is
/// held after it carried the request out and journalled it, before it answers (strace delays
/// its return from the journal's `write`), and killed there.
#[allow(clippy::type_complexity)] // a table of cases, spelled out
#[test]
fn a_request_done_by_a_worker_that_died_before_answering_succeeds() {
    need("fusermount3");
    need("strace");
    if !kernel_resends_fuse_requests() {
        eprintln!("skipped: the kernel resends no FUSE request to a new worker (before 6.9)");
        return;
    }
    let l = LayerBuilder::new()
        .file("etc/conf", b"image\n")
        .file("etc/gone", b"image\n")
        .finish();
    let (_reg, r, user) = image_for_a_user("t/rootless-resent", l);
    let store = user.home().join(".local/share/bux-fuse");
    // Every name the cases reach is known to the worker first: looking one up for the first
    // time journals it too.
    user.ok(&format!(
        "$BUX -q pull {r} && $BUX -q mount --writable {r} m && echo a > m/file \
         && stat m/etc/conf m/etc/gone m/file > /dev/null"
    ));
    let upper = |name: &str| {
        let run = store.join("run");
        let mount = std::fs::read_dir(&run).unwrap().flatten().next().unwrap();
        mount.path().join("scratch/upper").join(name)
    };
    // Each: what to do, and what shows it was done on disk before the worker died.
    let cases: [(&str, &str, Box<dyn Fn() -> bool>); 5] = [
        ("mkdir m/dir", "mkdir", Box::new(|| upper("dir").is_dir())),
        (
            "echo b > m/new",
            "create",
            Box::new(|| upper("new").exists()),
        ),
        (
            "ln -s conf m/etc/link",
            "symlink",
            Box::new(|| upper("etc/link").exists()),
        ),
        (
            "mv m/file m/moved",
            "rename",
            Box::new(|| upper("moved").exists()),
        ),
        (
            "rm m/etc/gone",
            "unlink",
            Box::new(|| upper("etc/.wh.gone").exists()),
        ),
    ];
    // Held after the syscalls `sys` (the journal's `write`: after the change is journalled;
    // `rename`: before), then killed.
    let held = |cmd: &str, what: &str, sys: &str, done: &dyn Fn() -> bool| {
        let worker = mount_workers(&store)[0];
        let log = user.dir.path().join(format!("strace-{what}.log"));
        let mut strace = std::process::Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-e",
                &format!("trace={sys}"),
                "-e",
                &format!("inject={sys}:delay_exit=20000000"),
            ])
            .arg("-o")
            .arg(&log)
            .arg("-p")
            .arg(worker.to_string())
            .spawn()
            .unwrap();
        let traced = || {
            std::fs::read_to_string(format!("/proc/{worker}/status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.starts_with("TracerPid:") && !l.ends_with("\t0"))
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !traced() {
            assert!(
                std::time::Instant::now() < deadline,
                "strace did not attach"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut op = user.spawn(&format!("timeout 60 {cmd}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} was not carried out"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(
            op.try_wait().unwrap(),
            None,
            "{what} answered before the kill"
        );
        // SAFETY: signals the worker this test found (a process of the test user's), then
        // the strace this test started (which would otherwise sit out its delay first).
        unsafe { libc::kill(worker as i32, libc::SIGKILL) };
        let _ = strace.kill();
        let _ = strace.wait();
        let status = op.wait().unwrap();
        assert!(
            status.success(),
            "{what} done before the worker died failed: {status}"
        );
    };
    for (cmd, what, done) in &cases {
        held(cmd, what, "write", done);
    }
    assert_eq!(
        user.ok("cat m/new m/moved && readlink m/etc/link && ls m/etc && test -d m/dir && echo ok"),
        "b\na\nconf\nconf\nlink\nok\n"
    );
    // Done on disk, killed before the journal had it: the next worker finds the names the
    // disk no longer shows, and takes the node the kernel moved along with the rename.
    user.ok("mkdir m/dir/sub && echo t > m/dir/sub/f");
    let inodes = user.ok("stat -c %i m/moved m/dir m/dir/sub m/dir/sub/f m/moved");
    let renames = "rename,renameat,renameat2";
    held("mv m/moved m/moved2", "a rename", renames, &|| {
        upper("moved2").exists()
    });
    // A directory's entries move with it (they are numbered after it).
    held("mv m/dir m/dir2", "a directory's rename", renames, &|| {
        upper("dir2").is_dir()
    });
    held("rm m/new", "an unlink", renames, &|| !upper("new").exists());
    // A link made unjournalled: the new name is the same node.
    held("ln m/moved2 m/hard", "a link", "link,linkat", &|| {
        upper("hard").exists()
    });
    let after = "stat -c %i m/moved2 m/dir2 m/dir2/sub m/dir2/sub/f m/hard && cat m/moved2 \
                 && ls -a m/dir2 | wc -l && ! test -e m/new";
    let expected = format!("{inodes}a\n3\n");
    assert_eq!(user.ok(after), expected);
    drop_caches("2").unwrap();
    assert_eq!(
        user.ok(after),
        expected,
        "asked again of the worker that took over"
    );
    user.ok("echo c > m/new && mkdir m/dir && mv m/moved2 m/moved && cat m/new m/moved m/hard");
    user.ok("$BUX umount m");
}

/// A user's read-only and disk mounts are kept the same way: their workers killed, the next
/// ones serve the same inodes and bytes, descriptors held open read on.
#[test]
fn a_users_read_only_and_disk_mounts_outlive_their_workers() {
    need("fusermount3");
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
        .collect();
    let l = LayerBuilder::new()
        .file("etc/conf", b"image\n")
        .file("data/big", &big)
        .finish();
    let (_reg, r, user) = image_for_a_user("t/rootless-kept", l);
    let store = user.home().join(".local/share/bux-fuse");
    user.ok(&format!(
        "$BUX -q pull {r} && mkdir ro dk && $BUX -q mount {r} ro && $BUX -q mount --disk {r} dk"
    ));
    let first = mount_workers(&store);
    assert_eq!(first.len(), 2, "a worker for each mount: {first:?}");
    let looks = "stat -c '%i %s %n' ro ro/etc ro/etc/conf ro/data/big dk/root.erofs \
                 && sha256sum < dk/root.erofs";
    let before = user.ok(looks);
    let mut holder = user.spawn(
        "exec 7<ro/data/big 8<dk/root.erofs && echo open && read _ \
         && sha256sum <&7 && sha256sum <&8",
    );
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut l = String::new();
    std::io::BufRead::read_line(&mut out, &mut l).unwrap();
    assert_eq!(l, "open\n");
    for pid in &first {
        let st = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    replaced_workers(&store, &first, 2);
    assert_eq!(user.ok(looks), before, "the same inodes and bytes");
    assert_eq!(user.ok("cat ro/etc/conf"), "image\n");
    use std::io::Write as _;
    writeln!(holder.stdin.take().unwrap()).unwrap();
    let rest = std::io::read_to_string(out).unwrap();
    assert!(holder.wait().unwrap().success());
    let disk_sum = before.lines().last().unwrap();
    assert_eq!(rest, format!("{}  -\n{disk_sum}\n", sha256_hex(&big)));
    user.ok("$BUX umount ro && $BUX umount dk");
    wait_for(10, "a worker outlived its mount", || {
        mount_workers(&store).is_empty()
    });
    assert_eq!(
        std::fs::read_dir(store.join("run"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "run directories left"
    );
}

/// After a takeover, files removed are freed once the kernel lets them go (it tells a node's
/// last forget, whatever the count the dead worker had); a file removed while open through a
/// name the worker never looked up (its other name) keeps its bytes, across a takeover too.
#[test]
fn a_taken_over_mount_frees_what_is_removed_and_keeps_what_is_open() {
    need("fusermount3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-taken-over");
    let user = AsUser::new();
    let store = user.home().join(".local/share/bux-fuse");
    // A file with two names, made by an earlier mount of the same upper directory.
    user.ok(&format!(
        "$BUX -q pull {r} && mkdir m && $BUX -q mount --upper up {r} m \
         && echo hello > m/a && ln m/a m/b && $BUX umount m && $BUX -q mount --upper up {r} m \
         && head -c 3000000 /dev/zero > m/big"
    ));
    let orphans = || {
        std::fs::read_dir(user.home().join("up/upper"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("bux-fuse-orphan"))
            .count()
    };
    let mut holder = user.spawn("exec 3<m/a && rm m/a && echo open && read _ && cat <&3");
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut l = String::new();
    std::io::BufRead::read_line(&mut out, &mut l).unwrap();
    assert_eq!(l, "open\n");
    let first = mount_workers(&store);
    kill9(first[0]);
    replaced_workers(&store, &first, 1);
    use std::io::Write as _;
    writeln!(holder.stdin.take().unwrap()).unwrap();
    assert_eq!(
        std::io::read_to_string(out).unwrap(),
        "hello\n",
        "open through a takeover"
    );
    assert!(holder.wait().unwrap().success());
    assert_eq!(user.ok("cat m/b && stat -c %h m/b"), "hello\n1\n");
    // Removed after the takeover: freed once the kernel drops the inode.
    user.ok("rm m/big");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while orphans() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "removed files kept: {}",
            orphans()
        );
        drop_caches("2").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    user.ok("$BUX umount m");
}

/// A worker that dies over and over is not replaced for ever: past 10 deaths in a minute the
/// mount is unmounted (not left dead in place), and its daemon ends.
#[test]
fn a_mount_whose_worker_keeps_dying_is_unmounted() {
    need("fusermount3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-dying");
    let user = AsUser::new();
    let store = user.home().join(".local/share/bux-fuse");
    user.ok(&format!(
        "$BUX -q pull {r} && mkdir m && $BUX -q mount --writable {r} m"
    ));
    let m = user.home().join("m");
    let mut seen: Vec<u32> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while is_mounted(&m) {
        assert!(
            std::time::Instant::now() < deadline,
            "still mounted after {} kills",
            seen.len()
        );
        for p in mount_workers(&store) {
            if !seen.contains(&p) {
                seen.push(p);
                kill9(p);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(seen.len() >= 11, "unmounted after {} deaths", seen.len());
    let logs = std::fs::read_dir(store.join("logs")).unwrap().flatten();
    let log: String = logs
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(log.contains("died 11 times in a minute"), "{log}");
    assert_eq!(user.ok("$BUX mounts --json").trim(), "[]");
    wait_for(10, "the daemon outlived its mount", || {
        daemon_pid(&m).is_none()
    });
}

/// A guest that fills the disk its mount's upper layer is on: requests fail with ENOSPC (not
/// EIO), the worker lives on, and one that takes over on the full disk serves (it writes
/// nothing it needs to start); the journal writes what it could not once space is back.
#[test]
fn a_users_mount_serves_on_a_full_disk_across_a_takeover() {
    need("fusermount3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-full");
    let user = AsUser::new();
    let small = user.home().join("small");
    let opts = format!("size=24m,mode=0755,uid={0},gid={0}", user.uid);
    let _small = Tmpfs::mount(&small, &opts);
    let store = small.join("store");
    let bux = format!("$BUX --store {}", store.display());
    user.ok(&format!(
        "{bux} -q pull {r} && mkdir m && {bux} -q mount --writable {r} m"
    ));
    // Full: the file as large as it gets, then names until none more fits.
    let out = user.sh("head -c 100000000 /dev/zero > m/fill");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "{out:?}"
    );
    let made = user.sh("for i in $(seq 1 400); do mkdir m/d$i || exit 0; done");
    let said = String::from_utf8_lossy(&made.stderr);
    assert!(!said.contains("Input/output error"), "{said}");
    let first = mount_workers(&store);
    assert_eq!(first.len(), 1, "the worker lives on a full disk: {first:?}");
    // Made on the full disk too: the journal has room set aside.
    let looks = "stat -c '%i %n' m/d1 m/etc/shadow m/fill $(ls -d m/d[0-9]* | sort -V | tail -1)";
    let before = user.ok(looks);
    assert_eq!(before.lines().count(), 4, "{before}");
    kill9(first[0]);
    let second = replaced_workers(&store, &first, 1);
    // The kernel asks again (the names, then the numbers the new worker gives them).
    drop_caches("2").unwrap();
    assert_eq!(user.ok(looks), before);
    // Space back: what could not be journalled is, and a second takeover knows it all.
    user.ok("rm m/fill && mkdir m/after && echo x > m/after/f");
    let listed = user.ok("ls m | grep -c '^d'");
    kill9(second[0]);
    replaced_workers(&store, &second, 1);
    assert_eq!(user.ok("ls m | grep -c '^d'"), listed);
    assert_eq!(
        user.ok("cat m/after/f && stat -c '%i %n' m/d1"),
        format!("x\n{}\n", before.lines().next().unwrap())
    );
    user.ok(&format!("{bux} umount m"));
}

/// A user's mount whose daemon was killed (its worker dies with it) is taken down whole by
/// `umount`: nothing of it is left in the store's run directory for `gc` to find.
#[test]
fn umount_of_a_users_mount_whose_daemon_died_leaves_nothing() {
    need("fusermount3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless-daemon-died");
    let user = AsUser::new();
    let store = user.home().join(".local/share/bux-fuse");
    user.ok(&format!(
        "$BUX -q pull {r} && mkdir m && $BUX -q mount --writable {r} m && echo x > m/file"
    ));
    let m = user.home().join("m");
    let daemon = daemon_pid(&m).expect("the mount's daemon");
    kill9(daemon);
    wait_for(10, "the worker outlived its keeper", || {
        mount_workers(&store).is_empty() && daemon_pid(&m).is_none()
    });
    user.ok("$BUX umount m");
    assert!(!is_mounted(&m));
    let left: Vec<_> = std::fs::read_dir(store.join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left in run/: {left:?}");
}

/// A user's lazy mount is kept as the user's other mounts are: its worker killed, the next
/// fetches what is read.
#[test]
fn a_users_lazy_mount_outlives_its_worker() {
    need("fusermount3");
    if !kernel_resends_fuse_requests() {
        eprintln!("skipped: this kernel resends nothing to a new worker (Linux 6.9+)");
        return;
    }
    // Incompressible: a layer stored whole would be over the bound checked below.
    let big = test_bytes(3 << 20, 7);
    let l = LayerBuilder::new()
        .file("etc/conf", b"lazy\n")
        .file("data/big", &big)
        .finish();
    let reg = Registry::start();
    let r = pushed_image(&reg, "t/rootless-lazy", &Image::new(vec![(l, Comp::Gzip)]));
    // Its index published (by root), so that the user's mount fetches by range.
    let publisher = Bux::new();
    publisher.ok(&["pull", "-q", &r]);
    publisher.ok(&["push-index", &r]);
    let user = AsUser::new();
    let store = user.home().join(".local/share/bux-fuse");
    user.ok(&format!("$BUX -q mount --lazy --prefetch none {r} m"));
    let stored = || {
        std::fs::read_dir(store.join("blobs/sha256"))
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .max()
            .unwrap_or(0)
    };
    assert!(stored() < 1 << 20, "lazy: the layer is not stored whole");
    let first = mount_workers(&store);
    assert_eq!(first.len(), 1, "a worker serves the mount: {first:?}");
    assert_eq!(user.ok("cat m/etc/conf"), "lazy\n");
    kill9(first[0]);
    replaced_workers(&store, &first, 1);
    assert_eq!(
        user.ok("sha256sum < m/data/big"),
        format!("{}  -\n", sha256_hex(&big))
    );
    assert_eq!(user.ok("cat m/etc/conf"), "lazy\n");
    user.ok("$BUX umount m");
}

/// A user's writable mount drops the pages of files it reads through the image's shared mount
/// (`upper::pages`), and the kernel makes such a drop wait for pages under read. Its worker
/// killed while a drop waits on a read that worker held (the shared server stopped): the drop's
/// thread is held in the kernel and the worker is not reaped, yet the next worker starts on
/// the connection, answers the resent read once the server goes on, and the mount serves.
/// (Before, the keeper waited for the dead worker to be reaped: the mount hung for good.)
#[test]
fn a_users_mount_replaces_a_worker_held_by_a_page_drop() {
    need("fusermount3");
    if !kernel_resends_fuse_requests() {
        return;
    }
    let user = AsUser::new();
    let walk = test_bytes(12 << 20, 11);
    let l = LayerBuilder::new()
        .file_with("data/walk", &walk, 0o644, user.uid as u64, user.uid as u64)
        .file("etc/small", b"small\n")
        .finish();
    let reg = Registry::start();
    let r = pushed_image(&reg, "t/rootless-drop", &Image::new(vec![(l, Comp::Gzip)]));
    user.ok(&format!(
        "$BUX -q pull {r} && $BUX -q mount --writable {r} m"
    ));
    // Should the mount hang (the fault this test is about), its connection is aborted when
    // the test fails, so that no process is left waiting on it (and holding the test's output).
    struct AbortOnFailure(u64);
    impl Drop for AbortOnFailure {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let ctl = "/sys/fs/fuse/connections";
                let _ = std::process::Command::new("mount")
                    .args(["-t", "fusectl", "none", ctl])
                    .status();
                let _ = std::fs::write(format!("{ctl}/{}/abort", self.0), "1");
            }
        }
    }
    // (Root may not stat a user's FUSE mount: its number is the user's to tell.)
    let dev = user.ok("stat -c %Ld m");
    let _abort = AbortOnFailure(dev.trim().parse().unwrap());
    let store = user.home().join(".local/share/bux-fuse");
    let shared = shared_mounts(&user);
    assert_eq!(shared.len(), 1, "{shared:?}");
    let place = shared[0].parent().unwrap().to_path_buf();
    // The shared mount holds the file, but for 1.5..1.75 MiB: a read there waits for its server.
    let in_shared = shared[0].join("data/walk");
    user.ok(&format!(
        "sha256sum < m/data/walk >/dev/null && python3 -c 'import os\n\
         fd = os.open(\"{}\", os.O_RDONLY)\n\
         os.posix_fadvise(fd, 3 << 19, 1 << 18, os.POSIX_FADV_DONTNEED)'",
        in_shared.display()
    ));
    let line = |out: &mut std::io::BufReader<std::process::ChildStdout>| {
        let mut l = String::new();
        std::io::BufRead::read_line(out, &mut l).unwrap();
        l
    };
    // A walks 0..1 MiB; with the server stopped, B reads at 1.5 MiB (held); A jumps to 2 MiB
    // and walks to 5 MiB: the drop behind it (0..4 MiB) waits for B's page.
    let mut a = user.spawn(
        "exec python3 -u -c 'import os, sys\n\
         f = os.open(\"m/data/walk\", os.O_RDONLY)\n\
         for off in range(0, 1 << 20, 10240): os.pread(f, 10240, off)\n\
         print(\"walked\"); sys.stdin.readline()\n\
         for off in range(2 << 20, 5 << 20, 10240): os.pread(f, 10240, off)\n\
         print(\"on\"); sys.stdin.readline()'",
    );
    let mut a_out = std::io::BufReader::new(a.stdout.take().unwrap());
    let mut a_in = a.stdin.take().unwrap();
    assert_eq!(line(&mut a_out), "walked\n");
    let pid = |f: &str| {
        std::fs::read_to_string(place.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    let server = [pid("pid"), pid("worker-pid")];
    /// Sends SIGCONT to the stopped server when dropped (on a failure too).
    struct Stopped([String; 2]);
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .arg("-CONT")
                .args(&self.0)
                .status();
        }
    }
    let st = std::process::Command::new("kill")
        .arg("-STOP")
        .args(&server)
        .status();
    assert!(st.unwrap().success());
    let stopped = Stopped(server);
    let mut b = user.spawn(
        "exec python3 -u -c 'import hashlib, os\n\
         f = os.open(\"m/data/walk\", os.O_RDONLY)\n\
         print(\"open\")\n\
         print(hashlib.sha256(os.pread(f, 4096, (3 << 19) + 8192)).hexdigest())'",
    );
    let mut b_out = std::io::BufReader::new(b.stdout.take().unwrap());
    assert_eq!(line(&mut b_out), "open\n");
    std::thread::sleep(std::time::Duration::from_millis(500));
    use std::io::Write as _;
    writeln!(a_in).unwrap();
    assert_eq!(line(&mut a_out), "on\n");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let old = mount_workers(&store);
    assert_eq!(old.len(), 1, "{old:?}");
    kill9(old[0]);
    // Held: its main thread gone, a thread of it waiting in the kernel for the stopped read.
    let held = || {
        std::fs::read_to_string(format!("/proc/{}/stat", old[0])).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    };
    wait_for(5, "the killed worker held by its page drop", held);
    wait_for(10, "the next worker started beside the held one", || {
        mount_workers(&store).iter().any(|w| !old.contains(w))
    });
    drop(stopped);
    let at = (3 << 19) + 8192;
    let want = format!("{}\n", sha256_hex(&walk[at..at + 4096]));
    assert_eq!(line(&mut b_out), want, "the held read answered");
    assert!(b.wait().unwrap().success());
    assert_eq!(user.ok("timeout 20 cat m/etc/small"), "small\n");
    writeln!(a_in).unwrap();
    assert!(a.wait().unwrap().success());
    user.ok("$BUX umount m");
}
