//! One image server for all of root's mounts of an image.
//!
//! A hundred VMs of one image should cost one daemon and one copy of the image's pages, not a
//! hundred. So (host root, image stored whole) the image is served once, read-only, at
//! `$STORE/shared/<manifest>/mnt`, and each mount is a kernel mount over it: a bind mount
//! (read-only), or an overlay with the mount's own upper layer (writable). The kernel keeps one
//! page cache for the FUSE mount, whichever VM reads a page first.
//!
//! Sharing must not widen the blast radius, so the server is two processes:
//! - a **supervisor** that mounts, holds the `/dev/fuse` descriptor, and never reads it;
//! - a **worker** that serves the descriptor it inherits. If the worker dies (a crash, `kill -9`,
//!   an upgrade), the supervisor starts another onto the same connection: the kernel keeps the
//!   connection as long as one descriptor is open, so VMs keep their roots (libkrun holds
//!   O_PATH descriptors there; a remount would lose them). Inode numbers are the tree's, so
//!   the new worker needs no state; it replays the INIT the kernel sent the first one (fuser
//!   insists on a handshake) and asks the kernel (FUSE_NOTIFY_RESEND, Linux 6.9+) to send again
//!   the requests the dead worker had read but not answered.
//!
//! The supervisor counts the mounts that stand on its mount (bind mounts of it and overlays
//! whose lower layer it is) in the mount table, and when none is left it unmounts and exits.
//! Clients hold the image's lock from "is the server up?" to "my mount is made", and the
//! supervisor takes it before it tears down, so neither race the other.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{kernel_mount, table};
use crate::store::ImageRecord;
use crate::{Digest, Error, Result, Store};

mod hung;
mod kept;
mod kernel_meta;
mod probe;
mod spawn;
mod stats;
mod supervisor;
mod told;
mod worker;
pub(crate) use hung::{end_hung_server, progress, Ended, HUNG};
pub(crate) use kept::{
    is_ours as kept_mount_is_ours, keep, kernel_resends, stats_path as kept_stats_path,
    Served as KeptServed,
};
pub use kept::{serve_mount_worker, Kind as KeptKind, Worker};
pub(crate) use spawn::stdin_holding;
pub use supervisor::supervise;
pub(crate) use told::Told;
pub use worker::serve_worker;

/// Where an image's server keeps its state.
pub(crate) struct Place {
    dir: PathBuf,
    lock: String,
}

impl Place {
    /// The place of the image's server, or (`disk`) of its disk's
    /// (`$STORE/shared/<manifest hex>-disk`: its FUSE mount holds the disk,
    /// [`crate::disk::DISK_FILE`], and every disk mount of the image is a bind mount of it).
    pub(crate) fn of(store: &Store, manifest: &Digest, disk: bool) -> Place {
        let name = match disk {
            true => format!("{}-disk", manifest.hex()),
            false => manifest.hex().to_string(),
        };
        Place::at(store.root().join("shared").join(name))
    }
    /// Whether the server serves the image's disk.
    fn is_disk(&self) -> bool {
        self.dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with("-disk"))
    }
    /// The place in `dir` (`$STORE/shared/<manifest hex>`).
    fn at(dir: PathBuf) -> Place {
        let hex = dir.file_name().unwrap_or_default().to_string_lossy();
        let lock = format!("shared-{hex}");
        Place { dir, lock }
    }
    /// The image's FUSE mount, which every mount of it stands on.
    pub(crate) fn mnt(&self) -> PathBuf {
        self.dir.join("mnt")
    }
    /// Where that image is mounted.
    fn meta(&self) -> PathBuf {
        self.dir.join("meta")
    }
    /// The read-only overlay of metadata (`meta`) and data (`mnt`) that read-only mounts bind.
    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// An empty directory: the second lower layer of a read-only overlay.
    fn empty(&self) -> PathBuf {
        self.dir.join("empty")
    }
    /// Held shared (flock) by each of a user's writable mounts that reads image files through
    /// the server ([`reading_through`]): those are FUSE mounts of their own, which the mount
    /// table does not show standing on it.
    fn readers(&self) -> PathBuf {
        self.dir.join("readers")
    }
    /// The supervisor's pid.
    fn pid(&self) -> PathBuf {
        self.dir.join("pid")
    }
    /// The worker's pid.
    fn worker_pid(&self) -> PathBuf {
        self.dir.join("worker-pid")
    }
    /// What the kernel offered at FUSE_INIT (for a restarted worker to replay).
    fn init(&self) -> PathBuf {
        self.dir.join("init")
    }
    /// The worker's read counters ([`stats`]).
    fn stats(&self) -> PathBuf {
        self.dir.join("stats")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("log")
    }
    /// Who the server of an image fetched lazily fetches as ([`Told::fetch_identity`]), salted
    /// and hashed: a mount that would fetch otherwise does not stand on it. None for an image
    /// stored whole.
    fn fetch_id(&self) -> PathBuf {
        self.dir.join("fetch-id")
    }
    /// Put there by a mount that wants the image completed; the worker of an image fetched
    /// lazily takes it away and completes the layers in the background.
    fn complete_request(&self) -> PathBuf {
        self.dir.join("complete")
    }
    /// The image record the supervisor leased: what every worker serves, whatever the store's
    /// names say by then (the image may have been re-tagged or removed with `rm --force`).
    fn record(&self) -> PathBuf {
        self.dir.join("record.json")
    }
}

/// The directory of the image server the mount at `path` stands on, if it stands on one: a
/// bind mount of the server's FUSE mount or overlay, or an overlay over them.
pub(crate) fn server_under(path: &Path) -> Option<PathBuf> {
    let table = table::read();
    let mount = table.iter().rev().find(|m| m.is_at(path))?;
    let place_of = |p: &Path| {
        let dir = p.parent()?;
        let ours = matches!(p.file_name()?.to_str()?, "mnt" | "meta" | "root")
            && dir.parent()?.file_name()? == "shared";
        ours.then(|| dir.to_path_buf())
    };
    if let Some(lower) = mount.path_option("lowerdir") {
        if let Some(dir) = place_of(&lower) {
            return Some(dir);
        }
    }
    table
        .iter()
        .filter(|m| m.dev == mount.dev && !m.is_at(path))
        .find_map(|m| place_of(Path::new(&m.point)))
}

/// An image server a client is about to let go of, found while the client still holds it up:
/// its supervisor removes its pid file a moment before its lease on the image ends, so the pid
/// is read before the client unmounts (read after, it may already be gone while the lease is
/// still held, and `rm` right after `umount` would find the image in use).
pub(crate) struct Leaving {
    place: Place,
    pid: u32,
    readers: Option<std::fs::File>,
}

impl Leaving {
    /// The server in `dir` (`$STORE/shared/<manifest hex>`), if it runs.
    pub(crate) fn of(dir: &Path) -> Option<Leaving> {
        let place = Place::at(dir.to_path_buf());
        let pid = read_pid(&place.pid())?;
        let readers = std::fs::File::open(place.readers()).ok();
        Some(Leaving {
            place,
            pid,
            readers,
        })
    }

    /// Waits (at most until `deadline`) until the server has exited — its last thread, so
    /// its lease with it — if nothing stands on it any more: so that `umount` returns with
    /// the image free for `rm` and `gc`.
    pub(crate) fn wait(&self, deadline: std::time::Instant) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        super::wait_while(left, || {
            !crate::store::exited(self.pid) && users(&self.place, self.readers.as_ref()) == 0
        });
    }
}

/// The store's image servers that a user's writable mounts read through (only those have
/// the `readers` file), found before the mounts are let go of ([`Leaving`]).
pub(crate) fn read_through_servers(store: &Store) -> Vec<Leaving> {
    let Ok(entries) = std::fs::read_dir(store.root().join("shared")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().join("readers").exists())
        .filter_map(|e| Leaving::of(&e.path()))
        .collect()
}

/// Waits (at most `timeout` in all) until those of `servers` that nothing uses any more have
/// gone: a user's writable mount holds its image's server until its daemon exits, after its
/// FUSE mount is gone, so `umount` waits for both (the image is then free for `rm` and `gc`).
pub(crate) fn wait_for_unused_servers(servers: &[Leaving], timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    for server in servers {
        server.wait(deadline);
    }
}

/// The counters of the image server whose FUSE mount is `mnt` (see [`Mount::stats`]).
///
/// [`Mount::stats`]: crate::Mount::stats
pub(crate) fn server_stats(mnt: &Path) -> crate::mount::MountStats {
    stats::read(&mnt.with_file_name("stats"))
}

/// The counters the worker of a user's mount published at `path` (its own reads; those a
/// writable mount sent through the image server are that server's).
pub(crate) fn kept_stats(path: &Path) -> crate::mount::MountStats {
    let s = stats::read(path);
    match s.scope {
        crate::mount::StatsScope::Unavailable => s,
        _ => crate::mount::MountStats {
            scope: crate::mount::StatsScope::Mount,
            ..s
        },
    }
}

/// Whether the image server whose FUSE mount is `mnt` serves: its FUSE mount in place and its
/// supervisor or worker alive (a dead worker is being replaced while the supervisor lives).
pub(crate) fn serving(mnt: &Path) -> bool {
    mnt.parent()
        .is_some_and(|dir| server_alive(&Place::at(dir.to_path_buf())))
}

/// Whether the image's server is up: its supervisor alive and its FUSE mount in place.
/// (A worker whose supervisor died serves on until its mount is unused.)
fn server_alive(place: &Place) -> bool {
    (pid_alive(&place.pid()) || pid_alive(&place.worker_pid()))
        && table::at(&place.mnt()).is_some_and(|m| m.fstype.starts_with("fuse"))
}

fn read_pid(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Whether the process whose pid the file holds is alive.
fn pid_alive(file: &Path) -> bool {
    read_pid(file).is_some_and(crate::store::alive)
}

/// Removes the state of image servers that have left (`shared/<manifest>/`: their log, the
/// recorded FUSE_INIT, pid files, the leased record and the empty mount points), as `gc` does;
/// a place with a live server or anything mounted under it stays. Returns how many went.
pub fn remove_idle_places(store: &Store) -> usize {
    let Ok(entries) = std::fs::read_dir(store.root().join("shared")) else {
        return 0;
    };
    let table = table::read();
    if table.is_empty() {
        return 0; // unreadable: nothing is known to be unmounted
    }
    let mut removed = 0;
    for entry in entries.flatten() {
        let place = Place::at(entry.path());
        if pid_alive(&place.pid()) || pid_alive(&place.worker_pid()) {
            continue;
        }
        // Held while it is checked and removed: a client starting a server takes it first.
        let Ok(Some(_lock)) = store.try_lock(&place.lock) else {
            continue;
        };
        let dir = place.dir.to_string_lossy().into_owned();
        let mounted = |table: &[table::MountInfo]| {
            table
                .iter()
                .any(|m| m.point == dir || m.point.starts_with(&format!("{dir}/")))
        };
        // A server killed outright leaves its FUSE mount dead ("not connected"): nothing can
        // stand on it any more, and nothing else would ever take it down.
        if mounted(&table) && dead(&place.mnt()) && users(&place, None) == 0 {
            kernel_meta::tear_down(&place);
        }
        if mounted(&table::read()) {
            continue;
        }
        if std::fs::remove_dir_all(&place.dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Whether `mnt` is a FUSE mount whose server is gone (asked with statfs, which the kernel
/// never answers from its cache).
fn dead(mnt: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and a zeroed struct for statvfs to fill.
    let r = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        libc::statvfs(c.as_ptr(), &mut st)
    };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// Whether every layer of `record` is stored whole (else the image's server fetches the rest
/// lazily; a user's, a disk's and a traced mount of such an image are served by a mount of
/// their own, with its fetcher).
pub(crate) fn all_local(store: &Store, record: &ImageRecord) -> bool {
    record
        .layers
        .iter()
        .all(|l| store.blob_path(&l.digest).exists() || store.seekable_path(&l.digest).exists())
}

/// What a mount of the image stands on.
pub(crate) struct Lower {
    /// The image's FUSE mount.
    pub mnt: PathBuf,
    /// With metadata in the kernel: the EROFS mount and the read-only overlay of it over `mnt`.
    kernel: Option<(PathBuf, PathBuf)>,
}

impl Lower {
    /// An overlay's `lowerdir` for the image (`meta::mnt` with metadata in the kernel).
    pub(crate) fn lowerdir(&self) -> String {
        match &self.kernel {
            Some((meta, _)) => format!("{}::{}", meta.display(), self.mnt.display()),
            None => self.mnt.display().to_string(),
        }
    }
    /// Whether metadata comes from the kernel (EROFS) rather than FUSE.
    pub(crate) fn in_kernel(&self) -> bool {
        self.kernel.is_some()
    }
}

/// The image's shared mount, started if it is not up, with the image's lock: hold it until the
/// mount standing on it is made.
/// With `disk`, the mount of the image's disk server instead (no metadata in the kernel: the
/// disk holds it).
/// A server started here for an image fetched lazily fetches with what `told` says (the
/// options of the mount that started it). Such a server is joined only by a mount that would
/// fetch as it does: `None` (nothing done) if it fetches otherwise. A joining mount that
/// prefetches everything has the server complete the image, whatever its first mount said.
pub(crate) fn lower(
    store: &Store,
    record: &ImageRecord,
    exe: &Path,
    disk: bool,
    told: Option<&Told>,
) -> Result<Option<(Lower, crate::store::Lock)>> {
    let place = Place::of(store, &record.view(), disk);
    let lock = store.lock(&place.lock)?;
    let lazy = told.filter(|_| !all_local(store, record));
    if !server_alive(&place) {
        start(store, record, exe, &place, told)?;
    } else if let Some(told) = lazy {
        if !fetches_as(&place, told) {
            return Ok(None);
        }
        if told.prefetch == crate::mount::Prefetch::All {
            // What an earlier completion left goes first (a caller then waiting for
            // completion must not read it); the one asked for here may follow.
            let _ = std::fs::remove_file(store.incomplete_path(&record.view()));
            crate::store::write_atomic(&place.complete_request(), b"")?;
        }
    }
    let kernel = (!disk && kernel_meta::in_kernel(&place)).then(|| (place.meta(), place.root()));
    Ok(Some((
        Lower {
            mnt: place.mnt(),
            kernel,
        },
        lock,
    )))
}

/// Records at `place` who its server will fetch as (`told`, for an image fetched lazily), or
/// that it fetches nothing: a random salt and the SHA-256 of it and the identity, so that the
/// file says nothing of the credentials themselves.
fn record_fetch_identity(place: &Place, told: Option<&Told>) -> Result<()> {
    let Some(told) = told else {
        let _ = std::fs::remove_file(place.fetch_id());
        return Ok(());
    };
    let mut salt = [0u8; 16];
    // SAFETY: getrandom writes at most `salt.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(salt.as_mut_ptr().cast(), salt.len(), 0) };
    if n != salt.len() as isize {
        return Err(Error::io(
            "salting the server's fetch identity",
            std::io::Error::last_os_error(),
        ));
    }
    let Some(hash) = salted(&salt, told) else {
        // Nothing to compare a joining mount with: none joins.
        let _ = std::fs::remove_file(place.fetch_id());
        return Ok(());
    };
    let line = format!("{} {hash}\n", hex(&salt));
    crate::store::write_atomic_mode(&place.fetch_id(), line.as_bytes(), 0o600)
}

/// Whether the server at `place` fetches as a mount told `told` would (see
/// [`record_fetch_identity`]); a server that recorded none (an image stored whole when it
/// started, or a server of an earlier version) does not.
fn fetches_as(place: &Place, told: &Told) -> bool {
    let Ok(line) = std::fs::read_to_string(place.fetch_id()) else {
        return false;
    };
    let Some((salt, hash)) = line.trim().split_once(' ') else {
        return false;
    };
    let salt: Option<Vec<u8>> = (0..salt.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(salt.get(i..i + 2)?, 16).ok())
        .collect();
    salt.is_some_and(|salt| salted(&salt, told).is_some_and(|h| h == hash))
}

/// Rounds of SHA-256 over an identity holding a password: a copy of the store (a backup) then
/// costs whoever guesses at the password that much per guess (a few ms per mount here).
const PASSWORD_ROUNDS: u32 = 20_000;

/// The SHA-256 of `salt` and `told`'s fetch identity (iterated where it holds a password).
fn salted(salt: &[u8], told: &Told) -> Option<String> {
    let mut d = Digest::of(&[salt, &told.fetch_identity()?].concat());
    if told.credentials.is_some() {
        for _ in 0..PASSWORD_ROUNDS {
            d = Digest::of(&[salt, d.hex().as_bytes()].concat());
        }
    }
    Some(d.hex().to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// For a user's writable mount, served by a daemon of its own: the image's shared read-only
/// mount (started if it is not up) to read unmodified image files through, so that all of the
/// user's mounts of the image hold its pages once ([`crate::upper::Through`]). The file
/// returned holds a shared lock the server counts as a user while it is open.
pub(crate) fn reading_through(
    store: &Store,
    record: &ImageRecord,
    exe: &Path,
) -> Result<(PathBuf, std::fs::File)> {
    let (lower, _image_lock) =
        lower(store, record, exe, false, None)?.ok_or_else(|| Error::Mount {
            path: store.root().join("shared"),
            detail: "no image server to read through".into(),
        })?;
    let place = Place::of(store, &record.view(), false);
    let readers = open_readers(&place)?;
    // Taken before the image's lock is let go: the server never sees the gap.
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(readers.as_raw_fd(), libc::LOCK_SH) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(
            format!("locking {}", place.readers().display()),
            e,
        ));
    }
    Ok((lower.mnt, readers))
}

fn open_readers(place: &Place) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = place.readers();
    // The owner's alone: another user holding a lock on it would keep the server up.
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// Whether a reader holds its lock on `readers` (the file open, [`Place::readers`]).
fn readers_held(readers: &std::fs::File) -> bool {
    // SAFETY: flock on an open descriptor.
    unsafe {
        if libc::flock(readers.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 {
            libc::flock(readers.as_raw_fd(), libc::LOCK_UN);
            return false;
        }
    }
    true
}

/// Whether this process's mounts can have metadata in the kernel (root, a kernel with EROFS):
/// else there is no use in metadata images, nor in keeping small files' bytes for them.
pub(crate) fn kernel_metadata_possible() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("\terofs"))
}

/// The largest file whose bytes indexing keeps, for what the user `asked` (default
/// [`SMALL_MAX`](crate::index::small::SMALL_MAX)): a metadata image serves them where one can
/// be mounted, FUSE reads them everywhere (see [`crate::index::small_reads`]).
pub(crate) fn small_files_kept(asked: Option<u64>) -> u64 {
    asked.unwrap_or(crate::index::small::SMALL_MAX)
}

/// `BUX_FUSE_METADATA=fuse`: metadata served by FUSE, no metadata image (to compare the two).
pub(crate) fn metadata_from_fuse() -> bool {
    std::env::var("BUX_FUSE_METADATA").is_ok_and(|v| v == "fuse")
}

/// Whether the image's metadata image in the store (if there is one) holds what it should: it
/// is written anew in memory and compared (for `check`). `Err` says what is wrong.
pub(crate) fn check_metadata_image(store: &Store, record: &ImageRecord) -> Result<(), String> {
    let path = store.meta_image_path(&record.view());
    let on_disk = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("unreadable: {e}")),
    };
    if !crate::tree::erofs::is_current(&path) {
        return Err("not an image of this version, or cut short".into());
    }
    match kernel_meta::image_bytes(store, record) {
        Ok((want, _)) if want == on_disk => Ok(()),
        Ok(_) => Err("differs from what the tree and small files give".into()),
        // Not this file's fault (the tree's, reported on its own).
        Err(_) => Ok(()),
    }
}

/// Starts a detached supervisor (`bux-fuse serve-shared`), tells it `told` (what its workers
/// fetch with), and waits until it serves.
fn start(
    store: &Store,
    record: &ImageRecord,
    exe: &Path,
    place: &Place,
    told: Option<&Told>,
) -> Result<()> {
    let err = |detail: String| Error::Mount {
        path: place.mnt(),
        detail,
    };
    kernel_meta::tear_down(place); // what a server that died left
    for d in [place.mnt(), place.empty()] {
        std::fs::create_dir_all(&d).map_err(|e| err(format!("creating {}: {e}", d.display())))?;
    }
    spawn::refuse_if_hookless().map_err(err)?;
    let mut cmd = Command::new(exe);
    cmd.arg("--store")
        .arg(store.root())
        .arg("serve-shared")
        .arg(record.view().to_string());
    if place.is_disk() {
        cmd.arg("--disk");
    }
    spawn::as_server(&mut cmd);
    let told = told.filter(|_| !all_local(store, record));
    let input = match told {
        Some(t) => {
            // What an earlier server's completion left goes before this one serves (a
            // caller then waiting for completion must not read it); this one's may follow.
            let _ = std::fs::remove_file(store.incomplete_path(&record.view()));
            serde_json::to_vec(t).map_err(|e| err(format!("encoding its options: {e}")))?
        }
        None => Vec::new(),
    };
    // (What an earlier server was asked for is not this one's business.)
    let _ = std::fs::remove_file(place.complete_request());
    record_fetch_identity(place, told)?;
    let mut child = start_detached(cmd, &place.log(), exe, &input).map_err(|n| match n.error {
        // What the server met opening the image, as a mount of the caller's own would say.
        Some(e) => e,
        None => err(format!("image server: {}", n.said)),
    })?;
    // A user's server is a child of the mount daemon that started it, which outlives it:
    // reaped when it exits (no zombie).
    let _ = std::thread::Builder::new()
        .name("bux-fuse-reaper".into())
        .spawn(move || child.wait());
    Ok(())
}

/// Starts the supervisor `cmd` (from `exe`) detached: its own session, `input` on its stdin,
/// stderr to the file `log`; waits for its hello, then for it to print `ready`. Else: why not
/// (what it said after `error `, with the error it told after that; else the last line it
/// logged).
fn start_detached(
    cmd: Command,
    log: &Path,
    exe: &Path,
    input: &[u8],
) -> std::result::Result<std::process::Child, spawn::NotReady> {
    let mut child = super::spawn_detached(cmd, log, &exe.display().to_string(), input)?;
    let Some(out) = child.stdout.take() else {
        spawn::kill(&mut child, true);
        return Err("no pipe to the image server".to_string().into());
    };
    let mut lines = spawn::Lines::new(out);
    let said = match spawn::await_hello(&mut child, &mut lines, exe, true)? {
        Some(line) => Ok(line),
        None => lines.next(None),
    };
    let said = said.unwrap_or_default();
    if said.trim() == "ready" {
        return Ok(child);
    }
    let said = said.trim().strip_prefix("error ").map(str::to_string);
    let error = said.as_ref().and_then(|_| spawn::wire_error(&mut lines));
    let _ = child.wait();
    Err(spawn::NotReady {
        said: said.unwrap_or_else(|| super::last_logged(log, "the image server")),
        error,
    })
}

/// Makes `dir` a read-only mount of the image standing on `lower`: a bind mount of its
/// overlay (metadata in the kernel) or of its FUSE mount; or, where the image has
/// `trusted.overlay.*` xattrs and FUSE serves metadata, a two-lower read-only overlay (the FUSE
/// mount serves them escaped for overlays, and only an overlay shows them as they are).
pub(crate) fn mount_read_only(
    lower: &Lower,
    dir: &Path,
    overlay_xattrs: bool,
) -> std::result::Result<(), String> {
    if let Some((_, root)) = &lower.kernel {
        return kernel_mount(root, dir, "", libc::MS_BIND, "")
            .map_err(|e| format!("bind-mounting the image: {e}"));
    }
    if overlay_xattrs {
        let empty = lower.mnt.with_file_name("empty");
        let data = format!("lowerdir={}:{}", lower.mnt.display(), empty.display());
        return kernel_mount(Path::new("overlay"), dir, "overlay", libc::MS_RDONLY, &data)
            .map_err(|e| format!("mounting the read-only overlay: {e}"));
    }
    kernel_mount(&lower.mnt, dir, "", libc::MS_BIND, "")
        .map_err(|e| format!("bind-mounting the image: {e}"))
}

/// How many mounts stand on the image's server at `place`: bind mounts of its FUSE mount or of
/// its overlay, overlays whose first lower layer is one of its mounts, and (at least one if
/// `readers`, [`Place::readers`] open, is locked) user mounts reading through it; 0 once the
/// FUSE mount is gone.
fn users(place: &Place, readers: Option<&std::fs::File>) -> usize {
    let table = table::read();
    if table.is_empty() {
        return 1; // unreadable: keep serving
    }
    let dev_at = |p: &Path| {
        table
            .iter()
            .rev()
            .find(|m| m.is_at(p))
            .map(|m| m.dev.clone())
    };
    let Some(fuse) = dev_at(&place.mnt()) else {
        return 0;
    };
    let devs = [Some(fuse), dev_at(&place.root())];
    let lowers = [place.mnt(), place.meta()];
    let standing = table
        .iter()
        .filter(|m| !Path::new(&m.point).starts_with(&place.dir))
        .filter(|m| {
            let bind = devs.contains(&Some(m.dev.clone()));
            let over = m.fstype == "overlay"
                && m.path_option("lowerdir")
                    .is_some_and(|l| lowers.contains(&l));
            bind || over
        })
        .count();
    standing + readers.is_some_and(readers_held) as usize
}

/// Sleeps until the mount table changes or `timeout` passes.
fn wait_for_mount_change(timeout: Duration) {
    let Ok(f) = std::fs::File::open("/proc/self/mountinfo") else {
        std::thread::sleep(timeout);
        return;
    };
    // The first poll reports the table as changed; the next waits for a change.
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLPRI,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe {
        libc::poll(&mut p, 1, 0);
        p.revents = 0;
        libc::poll(&mut p, 1, timeout.as_millis() as i32);
    }
}

fn silence_stdout() {
    // The parent stops reading once told; later writes must not fail (or SIGPIPE) us.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: both descriptors are valid; dup2 onto stdout.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

/// The record the supervisor of `place` leased for the image with this manifest.
fn leased_record(place: &Place, manifest: &Digest) -> Result<ImageRecord> {
    let path = place.record();
    let bytes =
        std::fs::read(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let record: ImageRecord = serde_json::from_slice(&bytes).map_err(|e| Error::CorruptStore {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    if record.view() != *manifest {
        return Err(Error::CorruptStore {
            path,
            detail: format!("records image {}, not {manifest}", record.view()),
        });
    }
    Ok(record)
}

/// The stored image whose view ([`ImageRecord::view`]: the manifest digest, or that with its
/// lazily served layers' indexes) is `view`.
fn find_record(store: &Store, view: &Digest) -> Result<ImageRecord> {
    store
        .images()?
        .into_iter()
        .find(|r| r.view() == *view)
        .ok_or_else(|| Error::NotFound {
            reference: view.to_string(),
            detail: " in the local store".into(),
        })
}
