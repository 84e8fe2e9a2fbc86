//! Unmounting: what `bux-fuse umount` takes down (only mounts bux-fuse made, with what stands
//! under them), and removing what mounts whose daemon died left in the store.

use std::io;
use std::path::{Path, PathBuf};

use super::upper_dir::{overlay_upper_in_use, recorded_scratch};
use super::{is_mount_point, shared, table, wait_while};
use crate::{Error, Result};

/// Unmounts what `bux-fuse mount` made at `path`: the mount itself and, for a writable mount,
/// the read-only image mount under the store's `run/` directory that its overlay stands on and
/// the scratch upper layer there — also when the daemon that would have done so died. Over a
/// shared image server that nothing else stands on, it returns once the server has left (at
/// most 5 s), so that the image is free for `rm` and `gc`.
///
/// Anything else at `path` is left mounted: an error says what it is (see [`foreign_mount`]).
pub fn unmount_all(path: &Path) -> Result<()> {
    let refuse = |detail: String| {
        Err(Error::Mount {
            path: path.to_path_buf(),
            detail,
        })
    };
    let here = match table::at(path) {
        None => return refuse("not a mount point".into()),
        Some(m) if !is_ours(&m) => {
            return refuse(format!(
                "not a bux-fuse mount (it is {}); not unmounting",
                m.fstype
            ))
        }
        Some(m) => m,
    };
    let overlay = Some(here).filter(|m| m.fstype == "overlay");
    let option = |key: &str| overlay.as_ref().and_then(|m| m.path_option(key));
    let (lower, upper) = (option("lowerdir"), option("upperdir"));
    unmount_over_server(path)?;
    // A writable mount over a shared image server: its scratch upper layer goes (the server
    // itself leaves once nothing stands on it).
    if let Some(scratch) = upper.as_deref().and_then(recorded_scratch) {
        let _ = std::fs::remove_dir_all(scratch);
    }
    if let Some(lower) = lower {
        let ours = lower.ends_with("lower")
            && lower
                .parent()
                .and_then(Path::parent)
                .is_some_and(|run| run.ends_with("run"));
        if ours {
            if table::at(&lower).is_some_and(|m| m.fstype.starts_with("fuse")) {
                let _ = unmount(&lower);
            }
            if let Some(run_dir) = lower.parent() {
                let _ = std::fs::remove_dir_all(run_dir);
            }
        }
    }
    Ok(())
}

/// `path` as the mount table names it: absolute, with `..` and symlinks resolved (but for its
/// last component where that cannot be reached: a mount whose daemon died).
pub fn mount_path(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if let Ok(p) = abs.canonicalize() {
        return p;
    }
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => dir.canonicalize().map_or(abs.clone(), |d| d.join(name)),
        _ => abs,
    }
}

/// The filesystem type of what is mounted at `path` (as [`mount_path`] gives it) if bux-fuse
/// did not mount it: `None` for a mount of bux-fuse's, or nothing mounted there.
pub fn foreign_mount(path: &Path) -> Option<String> {
    table::at(path).filter(|m| !is_ours(m)).map(|m| m.fstype)
}

/// Whether bux-fuse made mount `m`: one of its FUSE mounts (or a bind mount of one), an overlay
/// standing on one of its mounts (a writable mount's, a shared image server's, or a bind mount
/// of that), or a shared image server's metadata image.
pub(crate) fn is_ours(m: &table::MountInfo) -> bool {
    // $STORE/shared/<image>/{mnt,meta,root}: a shared image server's mounts.
    let server_mount = |p: &Path| {
        p.file_name()
            .is_some_and(|n| n == "mnt" || n == "meta" || n == "root")
            && p.parent()
                .and_then(Path::parent)
                .is_some_and(|s| s.file_name().is_some_and(|n| n == "shared"))
    };
    // $STORE/run/<mount>/lower: a writable mount's image mount.
    let run_lower = |p: &Path| {
        p.file_name().is_some_and(|n| n == "lower")
            && p.parent()
                .and_then(Path::parent)
                .is_some_and(|r| r.file_name().is_some_and(|n| n == "run"))
    };
    match m.fstype.as_str() {
        "fuse.bux-fuse" => true,
        "overlay" => m.path_option("lowerdir").is_some_and(|lower| {
            server_mount(&lower)
                || run_lower(&lower)
                || table::at(&lower).is_some_and(|l| l.fstype == "fuse.bux-fuse")
        }),
        "erofs" => server_mount(Path::new(&m.point)),
        _ => false,
    }
}

/// Unmounts `path`. Over a shared image server that nothing else stands on, returns once the
/// server has left (at most 5 s), so that the image is free for `rm` and `gc`.
pub(super) fn unmount_over_server(path: &Path) -> Result<()> {
    let server = shared::server_under(path).and_then(|dir| shared::Leaving::of(&dir));
    unmount(path)?;
    if let Some(server) = server {
        server.wait(std::time::Instant::now() + std::time::Duration::from_secs(5));
    }
    Ok(())
}

/// Waits (at most `timeout`) until the daemon that served the writable mount at `dir` has
/// removed its directory under `run_dir` (`$STORE/run`), which it does once its mount is gone:
/// so that `umount` returns with the scratch upper layer removed. What a daemon that died left
/// there for this mount point is removed here (else [`clean_run_dir`], at `gc`).
pub fn wait_for_cleanup(run_dir: &Path, dir: &Path, timeout: std::time::Duration) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let prefix = format!(
        "{}-",
        crate::Digest::of(dir.as_os_str().as_encoded_bytes()).short()
    );
    let busy = || {
        std::fs::read_dir(run_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(&prefix)
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(crate::store::alive)
            })
    };
    wait_while(timeout, busy);
    for e in std::fs::read_dir(run_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dead = name
            .strip_prefix(&prefix)
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !crate::store::alive(pid));
        if dead {
            let lower = e.path().join("lower");
            if is_mount_point(&lower) {
                let _ = unmount(&lower);
            }
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes what writable mounts whose daemon died left in `run_dir` (`$STORE/run`): their
/// image mounts and scratch uppers. Returns how many.
pub fn clean_run_dir(run_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(crate::store::alive) {
            continue; // its daemon still serves it
        }
        let lower = e.path().join("lower");
        if is_mount_point(&lower) {
            let _ = unmount(&lower);
        }
        if std::fs::remove_dir_all(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// Removes scratch upper layers (`$STORE/scratch/*`) of writable mounts over a shared image
/// server that were unmounted some other way than `bux-fuse umount`: those no mounted overlay
/// uses. Returns how many.
pub fn clean_scratch(scratch: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        // One being made right now is not in use yet.
        let young = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < std::time::Duration::from_secs(10));
        if !young
            && !overlay_upper_in_use(&e.path().join("upper"))
            && std::fs::remove_dir_all(e.path()).is_ok()
        {
            n += 1;
        }
    }
    n
}

/// Unmounts `path` lazily (`MNT_DETACH`): works with files open and on dead mounts.
pub fn unmount(path: &Path) -> Result<()> {
    let err = |detail: String| Error::Mount {
        path: path.to_path_buf(),
        detail,
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| err("path contains a NUL byte".into()))?;
        // SAFETY: c is a valid NUL-terminated path.
        let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if r != 0 {
            let e = io::Error::last_os_error();
            let detail = match e.raw_os_error() {
                Some(libc::EINVAL) => "not a mount point".to_string(),
                _ => e.to_string(),
            };
            return Err(err(detail));
        }
        return Ok(());
    }
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(path)
        .output()
        .map_err(|e| err(format!("running fusermount3 (install fuse3): {e}")))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}
