//! After the process that served its mounts was killed (`kill -9`), a runtime restarted on the
//! same store lists what is left (where, of what, by whom, dead or alive), mounts again over
//! its dead mounts without being asked to clean up first, tears down the others, and gets a
//! distinct error for a place where something live is mounted.

mod common;

use std::path::Path;

use bux_fuse::mount::{MountState, StoreMount};
use bux_fuse::{Error, MountOptions, Store};
use common::*;

fn image() -> Image {
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", b"ID=recovery\n")
        .finish();
    Image::new(vec![(base, Comp::Gzip)])
}

fn find<'a>(mounts: &'a [StoreMount], path: &Path) -> &'a StoreMount {
    mounts
        .iter()
        .find(|m| m.record.path == path)
        .unwrap_or_else(|| panic!("{} not listed: {mounts:?}", path.display()))
}

#[test]
fn a_killed_servers_mounts_are_listed_replaced_and_torn_down() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(work.path(), "v1", &image());
    reg.push(work.path(), "v1", "r/img", None);
    let reference = format!("{}/r/img:v1", reg.host());
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &reference]);
    let dirs = tempfile::tempdir().unwrap();
    let (ro, rw, shared) = (
        dirs.path().join("ro"),
        dirs.path().join("rw"),
        dirs.path().join("shared"),
    );
    // Two mounts served by daemons of their own (as a runtime's own process serves its
    // mounts), one on the image's shared server.
    bux.ok(&["mount", "--own-server", &reference, ro.to_str().unwrap()]);
    bux.ok(&[
        "mount",
        "--own-server",
        "--writable",
        &reference,
        rw.to_str().unwrap(),
    ]);
    bux.ok(&["mount", &reference, shared.to_str().unwrap()]);
    let _guards = [&ro, &rw, &shared]
        .map(|p| MountGuard::adopt(p.to_path_buf(), tempfile::tempdir().unwrap()));
    let store = Store::open(bux.store.path()).unwrap();
    let live = store.mounts().unwrap();
    assert_eq!(live.len(), 3, "{live:?}");
    for m in &live {
        assert_eq!(m.state, MountState::Live, "{m:?}");
        assert_eq!(m.record.program, "bux-fuse");
        assert!(m.record.reference.ends_with("r/img:v1"), "{m:?}");
    }
    assert!(find(&live, &rw).record.writable);
    assert!(find(&live, &shared).record.shared);
    let rw_pid = find(&live, &rw).record.pid;
    let ro_pid = find(&live, &ro).record.pid;

    kill_daemon(&ro);
    kill_daemon(&rw);
    let after = store.mounts().unwrap();
    assert_eq!(find(&after, &ro).state, MountState::Dead, "{after:?}");
    assert_eq!(find(&after, &rw).state, MountState::Dead, "{after:?}");
    assert_eq!(find(&after, &rw).record.pid, rw_pid);
    assert_eq!(find(&after, &shared).state, MountState::Live);
    let listed = bux.ok(&["mounts"]);
    assert!(
        listed.contains("dead") && listed.contains("live"),
        "{listed}"
    );
    assert!(listed.contains(&ro_pid.to_string()), "{listed}");

    // Mounting over the dead writable mount replaces it (the overlay, the image mount it stood
    // on, its scratch layer), here through the library, as a restarted runtime would.
    let opts = MountOptions {
        shared_server: None,
        ..find(&after, &rw).record.options()
    };
    let m = bux_fuse::mount(&store, &reference, &rw, &opts).expect("mount over a dead mount");
    assert_eq!(
        std::fs::read(rw.join("etc/os-release")).unwrap(),
        b"ID=recovery\n"
    );
    std::fs::write(rw.join("etc/new"), b"written").unwrap();
    assert_eq!(store.mounts().unwrap().len(), 3);
    // A live mount is not replaced: a distinct error naming what is there.
    let again = bux_fuse::mount(&store, &reference, &rw, &opts)
        .err()
        .expect("mounted twice");
    match &again {
        Error::AlreadyMounted { what, .. } => assert!(what.contains("r/img:v1"), "{again}"),
        e => panic!("not AlreadyMounted: {e:?}"),
    }
    m.unmount().unwrap();
    assert!(!is_mounted(&rw));

    // The other dead mount is torn down on request; nothing of it is left in the store.
    store.tear_down(&ro).unwrap();
    assert!(!is_mounted(&ro));
    let left: Vec<_> = store
        .mounts()
        .unwrap()
        .into_iter()
        .map(|m| m.record.path)
        .collect();
    assert_eq!(left, vec![shared.clone()]);
    let run = bux.store.path().join("run");
    let runs = std::fs::read_dir(&run).map_or(0, |d| d.count());
    assert_eq!(runs, 0, "left in {}", run.display());

    // Not a mount of ours: left alone, with the same distinct error.
    let tmpfs = dirs.path().join("tmpfs");
    std::fs::create_dir(&tmpfs).unwrap();
    assert!(std::process::Command::new("mount")
        .args(["-t", "tmpfs", "none", tmpfs.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    let e = bux_fuse::mount(&store, &reference, &tmpfs, &MountOptions::default())
        .err()
        .expect("mounted over a tmpfs");
    let _ = std::process::Command::new("umount").arg(&tmpfs).status();
    match &e {
        Error::AlreadyMounted { what, .. } => assert!(what.contains("tmpfs"), "{e}"),
        e => panic!("not AlreadyMounted: {e:?}"),
    }
    assert!(store.tear_down(&tmpfs).is_err());
}
