//! A writable mount's upper directory: a user's `--upper DIR` (locked for one mount at a time,
//! marked with the kind of layer it holds) and the store's scratch layers (recorded as the
//! store's own, so that only those are ever removed), and whether an overlay writes to one.

use std::io;
use std::path::{Path, PathBuf};

use super::table;

/// Whether a mounted overlay has `upper` as its upper layer: the same directory (device and
/// inode), whatever path reaches it.
pub(super) fn overlay_upper_in_use(upper: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::fs::metadata(upper) else {
        return false; // no overlay writes to a directory that is not there
    };
    table::read()
        .iter()
        .filter(|m| m.fstype == "overlay")
        .filter_map(|m| m.path_option("upperdir"))
        .any(|u| {
            std::fs::metadata(u).is_ok_and(|md| (md.dev(), md.ino()) == (want.dev(), want.ino()))
        })
}

/// The file by which the store records, in a scratch layer's directory it made, that the
/// directory is its own: it holds the directory's device and inode number, so a copy or a
/// look-alike path (a user's `--upper .../scratch/x`) is never taken for one.
const SCRATCH_RECORD: &str = "bux-fuse-scratch";

/// Makes `dir` (a new scratch layer's directory) and records it as the store's.
pub(super) fn make_scratch(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(dir)?;
    let md = std::fs::symlink_metadata(dir)?;
    std::fs::write(
        dir.join(SCRATCH_RECORD),
        format!("{}:{}\n", md.dev(), md.ino()),
    )
}

/// The scratch layer directory whose upper layer is `upper`, if the store recorded it as one
/// it made ([`make_scratch`]); `None` for anything else (a user's `--upper`).
pub(super) fn recorded_scratch(upper: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    if upper.file_name()? != "upper" {
        return None;
    }
    let dir = upper.parent()?;
    let md = std::fs::symlink_metadata(dir).ok()?;
    let record = std::fs::read_to_string(dir.join(SCRATCH_RECORD)).ok()?;
    (md.is_dir() && record.trim() == format!("{}:{}", md.dev(), md.ino()))
        .then(|| dir.to_path_buf())
}

/// The two kinds of writable layer an `--upper DIR` can hold: their upper directories do not
/// read alike (whiteouts, symlinks, owners), so one never mounts the other's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum UpperKind {
    /// bux-fuse's own format, served by bux-fuse for a user ([`crate::upper`]).
    User,
    /// Root's kernel overlay (`DIR/upper` + `DIR/work`).
    Overlay,
}

/// The file in `--upper DIR` (beside `upper` and `work`, so never served) naming the kind of
/// layer kept there.
const UPPER_FORMAT: &str = "format";

impl UpperKind {
    fn marker(self) -> &'static str {
        match self {
            UpperKind::User => "bux-fuse-user",
            UpperKind::Overlay => "kernel-overlay",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            UpperKind::User => "a user's (FUSE) writable mount",
            UpperKind::Overlay => "root's kernel overlay",
        }
    }

    /// The kind recorded in `base`, or inferred for a directory from before the record: the
    /// overlay's work directory, or bux-fuse's stat on the upper root. `None`: unused (nothing
    /// in its upper and work directories, whatever the record says: a mount that failed wrote
    /// it), or nothing tells. An empty record (a crash before it reached the disk) is none.
    fn of(base: &Path) -> std::result::Result<Option<UpperKind>, String> {
        if unused_upper(base) {
            return Ok(None);
        }
        if let Some(m) = recorded_kind(base)? {
            return [UpperKind::User, UpperKind::Overlay]
                .into_iter()
                .find(|k| k.marker() == m)
                .map(Some)
                .ok_or_else(|| {
                    format!(
                        "{} names an unknown upper layer format {m:?}",
                        base.join(UPPER_FORMAT).display()
                    )
                });
        }
        let overlay = base.join("work").is_dir();
        let user = crate::upper::kept_by_bux_fuse(&base.join("upper"));
        Ok(match (user, overlay) {
            (true, false) => Some(UpperKind::User),
            (false, true) => Some(UpperKind::Overlay),
            _ => None,
        })
    }
}

/// The kind of layer `base`'s record names, if it has one that is not empty.
fn recorded_kind(base: &Path) -> std::result::Result<Option<String>, String> {
    let marker = base.join(UPPER_FORMAT);
    match std::fs::read_to_string(&marker) {
        Ok(m) if m.trim().is_empty() => Ok(None),
        Ok(m) => Ok(Some(m.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", marker.display())),
    }
}

/// Whether `base`'s upper and work directories hold nothing (or are missing): no mount of
/// either kind has kept anything there (a kernel overlay that was mounted leaves its
/// `work/work`).
fn unused_upper(base: &Path) -> bool {
    ["upper", "work"]
        .iter()
        .all(|d| match std::fs::read_dir(base.join(d)) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        })
}

/// Locks `--upper DIR` for one writable mount at a time: the directory itself (so every path
/// to it takes the same lock), held for the life of a mount served by this process. No process
/// holds it once the command that mounted an overlay over a shared server has left: the mount
/// table then tells whether an overlay still writes there. A directory that holds the other
/// `kind` of layer is refused, unchanged; one of no kind yet (or unused) is marked as `kind`.
pub(super) fn lock_upper(
    base: &Path,
    kind: UpperKind,
) -> std::result::Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(base).map_err(|e| format!("creating {}: {e}", base.display()))?;
    let file = std::fs::File::open(base).map_err(|e| format!("opening {}: {e}", base.display()))?;
    let in_use = || {
        format!(
            "--upper {} is in use by another writable mount (one upper layer, one mount)",
            base.display()
        )
    };
    // A mount unmounted a moment ago may still be exiting (unmounting detaches at once): give
    // its daemon a little time to let go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    // SAFETY: flock on a valid, owned descriptor.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        if std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        return Err(in_use());
    }
    if overlay_upper_in_use(&base.join("upper")) {
        return Err(in_use());
    }
    match UpperKind::of(base)? {
        Some(k) if k != kind => {
            return Err(format!(
                "--upper {} was used by {}; {} cannot use it",
                base.display(),
                k.describe(),
                kind.describe()
            ))
        }
        Some(_) if recorded_kind(base)?.is_some() => {}
        _ => {
            // Synced before it takes the name, and the name synced: a crash leaves the old
            // record or the new one.
            let tmp = base.join(format!(".{UPPER_FORMAT}.tmp"));
            std::fs::File::create(&tmp)
                .and_then(|mut f| {
                    io::Write::write_all(&mut f, format!("{}\n", kind.marker()).as_bytes())?;
                    f.sync_all()
                })
                .and_then(|()| std::fs::rename(&tmp, base.join(UPPER_FORMAT)))
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("marking {}: {e}", base.display()))?;
        }
    }
    Ok(file)
}
