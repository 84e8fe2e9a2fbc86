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

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, Session, SessionACL};

use super::{connect, is_mount_point, mount_entry, open_image, unescape_mountinfo, unmount};
use crate::fs::ImageFs;
use crate::index::SpanCache;
use crate::store::ImageRecord;
use crate::{Digest, Error, MountOptions, Result, Store};

/// Where an image's server keeps its state.
pub(crate) struct Place {
    dir: PathBuf,
    lock: String,
}

impl Place {
    pub(crate) fn new(store: &Store, manifest: &Digest) -> Place {
        Place {
            dir: store.root().join("shared").join(manifest.hex()),
            lock: format!("shared-{}", manifest.hex()),
        }
    }
    /// The image's FUSE mount, which every mount of it stands on.
    pub(crate) fn mnt(&self) -> PathBuf {
        self.dir.join("mnt")
    }
    /// An empty directory: the second lower layer of a read-only overlay.
    fn empty(&self) -> PathBuf {
        self.dir.join("empty")
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
    fn log(&self) -> PathBuf {
        self.dir.join("log")
    }
}

/// Whether the image's server is up: its supervisor alive and its FUSE mount in place.
/// (A worker whose supervisor died serves on until its mount is unused.)
fn server_alive(place: &Place) -> bool {
    let alive = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(crate::store::alive)
    };
    (alive(place.pid()) || alive(place.worker_pid()))
        && mount_entry(&place.mnt()).is_some_and(|(t, _)| t.starts_with("fuse"))
}

/// Whether every layer of `record` is stored whole (a lazily mounted image is served by a
/// mount of its own, with its fetcher).
pub(crate) fn all_local(store: &Store, record: &ImageRecord) -> bool {
    record
        .layers
        .iter()
        .all(|l| store.blob_path(&l.digest).exists() || store.seekable_path(&l.digest).exists())
}

/// The image's shared mount, started if it is not up, with the image's lock: hold it until the
/// mount standing on it is made.
pub(crate) fn lower(
    store: &Store,
    record: &ImageRecord,
    exe: &Path,
) -> Result<(PathBuf, crate::store::Lock)> {
    let place = Place::new(store, &record.manifest_digest);
    let lock = store.lock(&place.lock)?;
    if !server_alive(&place) {
        start(store, record, exe, &place)?;
    }
    Ok((place.mnt(), lock))
}

/// Starts a detached supervisor (`bux-fuse serve-shared`) and waits until it serves.
fn start(store: &Store, record: &ImageRecord, exe: &Path, place: &Place) -> Result<()> {
    let err = |detail: String| Error::Mount {
        path: place.mnt(),
        detail,
    };
    if is_mount_point(&place.mnt()) {
        let _ = unmount(&place.mnt()); // a server that died
    }
    for d in [place.mnt(), place.empty()] {
        std::fs::create_dir_all(&d).map_err(|e| err(format!("creating {}: {e}", d.display())))?;
    }
    let mut cmd = Command::new(exe);
    cmd.arg("--store")
        .arg(store.root())
        .arg("serve-shared")
        .arg(record.manifest_digest.to_string());
    super::start_detached(cmd, &place.log(), "the image server")
        .map_err(|e| err(format!("image server: {e}")))?;
    Ok(())
}

/// Makes `dir` a mount of the image standing on its shared mount `lower`: a bind mount, or a
/// two-lower read-only overlay where the image has `trusted.overlay.*` xattrs (the shared mount
/// serves them escaped for overlays, and only an overlay shows them as they are).
pub(crate) fn mount_read_only(
    lower: &Path,
    dir: &Path,
    overlay_xattrs: bool,
) -> std::result::Result<(), String> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| "NUL in path".to_string())
    };
    if overlay_xattrs {
        let empty = lower.with_file_name("empty");
        let data =
            std::ffi::CString::new(format!("lowerdir={}:{}", lower.display(), empty.display()))
                .map_err(|e| e.to_string())?;
        // SAFETY: valid NUL-terminated strings for mount(2).
        let r = unsafe {
            libc::mount(
                c"overlay".as_ptr(),
                c(dir)?.as_ptr(),
                c"overlay".as_ptr(),
                libc::MS_RDONLY,
                data.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(format!(
                "mounting the read-only overlay: {}",
                std::io::Error::last_os_error()
            ));
        }
        return Ok(());
    }
    // SAFETY: valid NUL-terminated strings for mount(2); a bind mount takes no data.
    let r = unsafe {
        libc::mount(
            c(lower)?.as_ptr(),
            c(dir)?.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(format!(
            "bind-mounting the image: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// How many mounts stand on the shared mount at `mnt`: bind mounts of it (same device) and
/// overlays whose first lower layer it is.
fn users(mnt: &Path) -> usize {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return 1; // unknown: keep serving
    };
    let want = mnt.to_string_lossy();
    let mut dev = None;
    let mut lines = Vec::new();
    for l in info.lines() {
        let Some((left, right)) = l.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = left.split(' ').collect();
        let (Some(devno), Some(point)) = (f.get(2), f.get(4)) else {
            continue;
        };
        let point = unescape_mountinfo(point);
        if point == want {
            dev = Some(devno.to_string());
        }
        lines.push((devno.to_string(), point, right.to_string()));
    }
    let Some(dev) = dev else { return 0 };
    lines
        .iter()
        .filter(|(devno, point, right)| {
            let bind = *devno == dev && *point != want;
            let mut r = right.split(' ');
            let over = r.next() == Some("overlay")
                && r.nth(1).is_some_and(|opts| {
                    opts.split(',').any(|o| {
                        o.strip_prefix("lowerdir=").is_some_and(|l| {
                            unescape_mountinfo(l.split(':').next().unwrap_or(l)) == want
                        })
                    })
                });
            bind || over
        })
        .count()
}

/// The supervisor (`bux-fuse serve-shared MANIFEST`): mounts the image at its shared place,
/// runs a worker on the connection (another if it dies), and unmounts once nothing stands on
/// the mount. Prints `ready` once the mount serves.
pub fn supervise(
    store: &Store,
    manifest: Digest,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let place = Place::new(store, &manifest);
    let record = find_record(store, &manifest)?;
    let mut leased = vec![record.manifest_digest, record.config_digest];
    leased.extend(record.layers.iter().map(|l| l.digest));
    let _lease = store.lease(&leased)?;
    let mnt = place.mnt();
    let mount_err = |detail: String| Error::Mount {
        path: mnt.clone(),
        detail,
    };
    crate::store::write_atomic(&place.pid(), std::process::id().to_string().as_bytes())?;
    let request = connect::Request {
        fsname: &format!("bux-fuse:{}", record.reference),
        allow_other: true,
        read_only: true,
    };
    let fd = connect::connect(&mnt, &request).map_err(mount_err)?;
    let exe = std::env::current_exe().map_err(|e| Error::io("finding own executable", e))?;
    let mut resume = false;
    let mut restarts: Vec<Instant> = Vec::new();
    loop {
        let mut worker = match spawn_worker(store, &exe, &manifest, fd.as_raw_fd(), resume) {
            Ok(w) => w,
            Err(e) if !resume => {
                let _ = unmount(&mnt);
                return Err(mount_err(e));
            }
            Err(e) => {
                // The VMs' requests wait (they are not lost): try again shortly, as long as
                // somebody still uses the mount.
                tracing::error!("restarting the image server: {e}");
                std::thread::sleep(Duration::from_secs(1));
                if users(&mnt) == 0 {
                    let _ = unmount(&mnt);
                    return Ok(());
                }
                continue;
            }
        };
        if !resume {
            super::raise_readahead(&mnt);
            println!("ready");
            let _ = std::io::stdout().flush();
            silence_stdout();
        }
        let outcome = watch(store, &place, || {
            if stop.load(Ordering::SeqCst) {
                return Some(Outcome::Stop);
            }
            match worker.try_wait() {
                Ok(Some(status)) => Some(Outcome::WorkerDied(status)),
                _ => None,
            }
        })?;
        match outcome {
            Outcome::WorkerDied(status) if is_mount_point(&mnt) && !stop.load(Ordering::SeqCst) => {
                tracing::warn!("image server worker exited ({status}): starting another on the same connection");
                restarts.retain(|t| t.elapsed() < Duration::from_secs(60));
                restarts.push(Instant::now());
                if restarts.len() > 10 {
                    let _ = unmount(&mnt);
                    return Err(mount_err(
                        "the image server died 10 times in a minute: unmounted (see its log)"
                            .into(),
                    ));
                }
                resume = true;
            }
            Outcome::WorkerDied(_) => break, // unmounted from outside
            Outcome::Stop => {
                stop_serving(&mnt, &mut worker);
                break;
            }
            Outcome::Unused(lock) => {
                stop_serving(&mnt, &mut worker);
                let _ = std::fs::remove_file(place.pid());
                drop(lock); // now a client may start a new server
                return Ok(());
            }
        }
    }
    let _ = std::fs::remove_file(place.pid());
    Ok(())
}

fn stop_serving(mnt: &Path, worker: &mut std::process::Child) {
    let _ = unmount(mnt);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    let _ = worker.wait();
}

enum Outcome {
    WorkerDied(std::process::ExitStatus),
    Unused(crate::store::Lock),
    Stop,
}

/// Waits until nothing stands on the image's shared mount (returning the image's lock, held:
/// no client mounts on it while it is torn down) or `tick` has news.
fn watch(
    store: &Store,
    place: &Place,
    mut tick: impl FnMut() -> Option<Outcome>,
) -> Result<Outcome> {
    let mnt = place.mnt();
    loop {
        if let Some(o) = tick() {
            return Ok(o);
        }
        // The client that started the server holds the lock until its mount stands on it.
        if users(&mnt) == 0 {
            if let Some(lock) = store.try_lock(&place.lock)? {
                if users(&mnt) == 0 {
                    return Ok(Outcome::Unused(lock));
                }
            }
        }
        wait_for_mount_change(Duration::from_millis(500));
    }
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

fn find_record(store: &Store, manifest: &Digest) -> Result<ImageRecord> {
    store
        .images()?
        .into_iter()
        .find(|r| r.manifest_digest == *manifest)
        .ok_or_else(|| Error::NotFound {
            reference: manifest.to_string(),
            detail: " in the local store".into(),
        })
}

fn spawn_worker(
    store: &Store,
    exe: &Path,
    manifest: &Digest,
    fd: RawFd,
    resume: bool,
) -> std::result::Result<std::process::Child, String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe);
    cmd.arg("--store")
        .arg(store.root())
        .arg("serve-shared")
        .arg("--worker-fd")
        .arg(fd.to_string())
        .arg(manifest.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    // SAFETY: fcntl on a descriptor we own, in the child before exec: the worker inherits it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("starting worker: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    let offered = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|caps| u64::from_str_radix(caps, 16).ok());
    let Some(offered) = offered else {
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        return Err(format!("the worker did not start ({status}; see the log)"));
    };
    // What the kernel offered the first worker, for the ones that take over (a taking-over
    // worker reports what it was given again).
    if !resume {
        let place = Place::new(store, manifest);
        if let Err(e) = crate::store::write_atomic(&place.init(), &offered.to_le_bytes()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("recording FUSE_INIT: {e}"));
        }
    }
    Ok(child)
}

/// The worker (`bux-fuse serve-shared --worker-fd N MANIFEST`): serves the connection `fd`.
/// With `resume` the connection is live already: replay its INIT, then have the kernel resend
/// what a dead worker left unanswered.
pub fn serve_worker(store: &Store, manifest: Digest, fd: RawFd, resume: bool) -> Result<()> {
    let place = Place::new(store, &manifest);
    let record = find_record(store, &manifest)?;
    if !all_local(store, &record) {
        return Err(Error::Mount {
            path: place.mnt(),
            detail: "the image's layers are not all stored".into(),
        });
    }
    let opts = MountOptions::default();
    let io =
        |what: &str, e: std::io::Error| Error::io(format!("{what} ({})", place.mnt().display()), e);
    // Everything the worker reads, opened (or mapped) now; then it may open nothing more.
    let image = open_image(store, &record.reference, &opts)?;
    let replay = match resume {
        true => {
            Some(std::fs::read(place.init()).map_err(|e| io("reading the recorded FUSE_INIT", e))?)
        }
        false => None,
    };
    crate::store::write_atomic(
        &place.worker_pid(),
        std::process::id().to_string().as_bytes(),
    )?;
    let lock = store.lock_file(&place.lock)?;
    // Before any thread starts: Landlock binds the threads that exist and what they start.
    match crate::sandbox::open_nothing_more() {
        Ok(true) => {}
        Ok(false) => tracing::warn!("no Landlock in this kernel: the worker may open files"),
        Err(e) => return Err(io("restricting what the worker opens (Landlock)", e)),
    }
    let fs = ImageFs::new(
        image.tree,
        image.layers,
        Arc::new(SpanCache::new(opts.cache_bytes)),
    )
    .escaping_overlay_xattrs();
    let offered = fs.offered_capabilities();
    let mut config = Config::default();
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    // Threads read the supervisor's descriptor itself, not clones: a clone closed by a dying
    // worker would fail the requests it holds (ECONNABORTED) instead of keeping them for a
    // resend.
    config.clone_fd = false;
    // SAFETY: the supervisor passed this descriptor for us to own.
    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
    let session = match &replay {
        Some(init) => replay_init(fs, conn, init, config).map_err(|e| io("resuming", e))?,
        None => {
            Session::from_fd(fs, conn, config.acl, config).map_err(|e| io("FUSE handshake", e))?
        }
    };
    orphan_watch(lock, Place::new(store, &manifest));
    // Serving needs no privilege (the supervisor mounts and unmounts).
    crate::sandbox::drop_to_nobody().map_err(|e| io("giving up root", e))?;
    // The supervisor records what the kernel offered, for a worker that takes over.
    println!("ready {:x}", offered.load(Ordering::Relaxed));
    let _ = std::io::stdout().flush();
    silence_stdout();
    if let Err(e) = crate::sandbox::confine(true) {
        tracing::warn!("confining the image server (seccomp): {e}");
    }
    crate::mount::tune_allocator_for_serving();
    session.run().map_err(|e| io("serving", e))
}

/// If the supervisor dies, nobody would restart this worker, nor notice when the mount is no
/// longer used: serve on (the VMs keep their roots) until nothing stands on the mount, then
/// exit, which ends the connection (the next mount starts a new server).
fn orphan_watch(lock: std::fs::File, place: Place) {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let _ = std::thread::Builder::new()
        .name("bux-fuse-orphan".into())
        .spawn(move || {
            // SAFETY: as above.
            while unsafe { libc::getppid() } == parent {
                std::thread::sleep(Duration::from_millis(500));
            }
            tracing::warn!("the image server's supervisor died: serving until unused");
            let mnt = place.mnt();
            loop {
                // Held from here to exit: no client mounts on what is about to end.
                if users(&mnt) == 0 && crate::store::try_flock(&lock) && users(&mnt) == 0 {
                    std::process::exit(0);
                }
                wait_for_mount_change(Duration::from_millis(500));
            }
        });
}

const FUSE_INIT: u32 = 26;
const FUSE_INIT_EXT: u64 = 1 << 30;
const FUSE_NOTIFY_RESEND: i32 = 7;

/// A session on connection `conn` that has already been initialised: fuser only starts after a
/// handshake, so it is given the INIT the kernel sent the first worker (the capabilities it
/// offered, recorded then) through a pipe, and the pipe's descriptor is then replaced by the
/// connection. Its answer to the replayed INIT goes nowhere; the kernel keeps the first one.
fn replay_init<FS: fuser::Filesystem>(
    fs: FS,
    conn: OwnedFd,
    recorded: &[u8],
    config: Config,
) -> std::io::Result<Session<FS>> {
    let caps = u64::from_le_bytes(
        recorded
            .try_into()
            .map_err(|_| std::io::Error::other("recorded FUSE_INIT is damaged"))?,
    );
    let mut msg = Vec::with_capacity(104);
    msg.extend_from_slice(&104u32.to_le_bytes()); // len
    msg.extend_from_slice(&FUSE_INIT.to_le_bytes()); // opcode
    msg.extend_from_slice(&1u64.to_le_bytes()); // unique
    msg.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    msg.extend_from_slice(&[0; 16]); // uid, gid, pid, extlen, padding
    msg.extend_from_slice(&7u32.to_le_bytes()); // major
    msg.extend_from_slice(&40u32.to_le_bytes()); // minor
    msg.extend_from_slice(&(1u32 << 20).to_le_bytes()); // max_readahead
    msg.extend_from_slice(&((caps as u32 as u64 | FUSE_INIT_EXT) as u32).to_le_bytes());
    msg.extend_from_slice(&((caps >> 32) as u32).to_le_bytes());
    msg.extend_from_slice(&[0; 44]);
    let mut fds = [0; 2];
    // SAFETY: a valid two-element array for pipe2.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two descriptors, ours to own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    std::fs::File::from(wr).write_all(&msg)?;
    let rd_fd = rd.as_raw_fd();
    let session = Session::from_fd(fs, rd, SessionACL::All, config)?;
    // SAFETY: both descriptors are open; dup3 atomically makes `rd_fd` the connection.
    if unsafe { libc::dup3(conn.as_raw_fd(), rd_fd, libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop(conn);
    if let Err(e) = notify_resend(rd_fd) {
        tracing::warn!("asking the kernel to resend lost requests (Linux 6.9+): {e}");
    }
    Ok(session)
}

/// FUSE_NOTIFY_RESEND: the kernel queues again every request it had handed out and not had
/// answered (a dead worker's), marked as resent.
fn notify_resend(fd: RawFd) -> std::io::Result<()> {
    let mut hdr = Vec::with_capacity(16);
    hdr.extend_from_slice(&16u32.to_le_bytes());
    hdr.extend_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    hdr.extend_from_slice(&0u64.to_le_bytes());
    // SAFETY: writing a 16-byte buffer to an open descriptor.
    let r = unsafe { libc::write(fd, hdr.as_ptr().cast(), hdr.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
