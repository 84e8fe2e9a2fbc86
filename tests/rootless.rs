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
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image());
    reg.push(&work.path().join("l"), "v1", repo, None);
    format!("{}/{repo}:v1", reg.host())
}

#[test]
fn a_user_mounts_the_image_as_it_is_without_root() {
    need("fusermount3");
    let reg = Registry::start();
    let r = pushed(&reg, "t/rootless");
    let user = AsUser::new();
    user.ok(&format!("$BUX -q pull {r}"));
    // The default store is under the user's XDG data directory.
    assert!(user
        .home()
        .join(".local/share/bux-fuse/images.json")
        .exists());
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
