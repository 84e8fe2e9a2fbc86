//! A mount served by a worker process, kept by the process that mounted it: the image server's
//! takeover, for the mounts that cannot stand on an image server (an ordinary user's, and
//! root's lazy mounts and mounts recording a read trace).
//!
//! Root's mounts of a stored image are kernel mounts over the image server's (bind mounts,
//! overlays): no daemon of their own to die, and the server is replaced under them. A user can
//! make no kernel mount, so each of a user's mounts is a FUSE mount of its own: the image's tree
//! (read-only), its disk (`--disk`), or the image with the user's upper layer
//! ([`crate::upper::UpperFs`], `--writable`). Each is split as the image server is: the
//! mounting process (the *keeper*) mounts, holds the `/dev/fuse` descriptor and runs a worker on
//! it; a worker that dies (a crash, `kill -9`, the OOM killer) or answers nothing for [`HUNG`]
//! is replaced on the same connection, and the kernel resends what it held. The image's inode
//! numbers are the tree's, so a read-only or disk mount's worker needs no state; a writable
//! mount's node numbers are handed out as names are first seen, so its worker journals its
//! nodes in the mount's run directory and the next one replays that journal (`upper::nodes`);
//! the upper directory holds everything else.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{Config, SessionACL};

use super::spawn::NotReady;
use super::told::Told;
use super::{probe::Probe, spawn, HUNG};
use crate::index::SpanCache;
use crate::mount::open_record;
use crate::store::ImageRecord;
use crate::{Error, MountOptions, Result, Store};

/// Restarts allowed in a minute before the keeper gives up and unmounts.
const MAX_RESTARTS: usize = 10;

/// What a worker serves: the mount at `dir` of image `record`.
pub(crate) struct Served<'a> {
    pub store: &'a Store,
    pub record: &'a ImageRecord,
    pub dir: &'a Path,
    pub what: Kind<'a>,
    /// The mount's run directory: the worker's record of the image, its INIT, its counters
    /// (and a writable mount's journal).
    pub run_dir: &'a Path,
    /// How: who reaches the mount, FUSE threads, span cache, and for lazily fetched layers
    /// the registry, the read deadline, what to fetch ahead, whether to record reads.
    pub opts: &'a MountOptions,
}

/// Which of the image's forms a mount serves.
#[derive(Clone, Copy)]
pub enum Kind<'a> {
    /// Its tree, read-only.
    Image,
    /// Its disk (`mount --disk`).
    Disk,
    /// Its tree with changes kept in this upper directory.
    Writable(&'a Path),
}

/// Files of the run directory.
fn journal_path(run_dir: &Path) -> PathBuf {
    run_dir.join("nodes.journal")
}
fn init_path(run_dir: &Path) -> PathBuf {
    run_dir.join("init")
}
fn record_path(run_dir: &Path) -> PathBuf {
    run_dir.join("image.json")
}
/// Where the worker publishes its read counters (for [`crate::Mount::stats`]).
pub(crate) fn stats_path(run_dir: &Path) -> PathBuf {
    run_dir.join("stats")
}

/// Starts the first worker on connection `fd` (mounted at `s.dir`) and returns once it
/// serves, with the thread that keeps the mount served until it is unmounted and the mount's
/// ID in the mount table. `holder` (the user's hold on the image server, if any) is kept as
/// long, so that the server stays up while a worker is replaced.
pub(crate) fn keep(
    exe: &Path,
    s: &Served,
    fd: OwnedFd,
    holder: Option<std::fs::File>,
) -> std::result::Result<(JoinHandle<std::io::Result<()>>, String), NotReady> {
    let json =
        serde_json::to_vec(s.record).map_err(|e| format!("encoding the image record: {e}"))?;
    crate::store::write_atomic(&record_path(s.run_dir), &json)
        .map_err(|e| format!("writing the image record: {e}"))?;
    let mut args: Vec<std::ffi::OsString> = vec![
        "--store".into(),
        s.store.root().into(),
        "serve-mount".into(),
        "--worker-fd".into(),
        fd.as_raw_fd().to_string().into(),
        "--run-dir".into(),
        s.run_dir.into(),
        "--threads".into(),
        s.opts.threads.to_string().into(),
        "--cache-bytes".into(),
        s.opts.cache_bytes.to_string().into(),
    ];
    match s.what {
        Kind::Image => {}
        Kind::Disk => args.push("--disk".into()),
        Kind::Writable(upper) => args.extend(["--upper".into(), upper.into()]),
    }
    if s.opts.allow_other {
        args.push("--allow-other".into());
    }
    args.push(s.record.view().to_string().into());
    let told = serde_json::to_vec(&Told::of(s.opts, s.what, holder.is_some()))
        .map_err(|e| format!("encoding the worker's options: {e}"))?;
    let spawn = {
        let (exe, run_dir, raw) = (exe.to_path_buf(), s.run_dir.to_path_buf(), fd.as_raw_fd());
        move |resume: bool| spawn_worker(&exe, &args, &told, raw, resume, &run_dir)
    };
    let dir = s.dir.to_path_buf();
    // This mount, not whatever is mounted at its path later (one mounted there after this one
    // ended): the mount table's ID.
    let id = crate::mount::table::at(&dir)
        .map(|m| m.id)
        .ok_or_else(|| String::from("the mount is not in the mount table"))?;
    // Workers are started by the keeper's thread, which lives as long as the mount: a worker
    // dies with the thread that started it (see `spawn_worker`), not with the caller's.
    let (started, first) = std::sync::mpsc::sync_channel(1);
    let kept_id = id.clone();
    let keeper = std::thread::Builder::new()
        .name("bux-fuse-keeper".into())
        .spawn(move || {
            let _fd = fd; // the connection lives while this thread does
            let _holder = holder;
            // Telling a worker killed as it starts its options must fail with EPIPE, not kill
            // the keeper (the CLI restores SIGPIPE's default): blocked on this thread, which
            // writes to them all (their own mask is restored as they start).
            sigpipe_mask(libc::SIG_BLOCK);
            match spawn(false) {
                Ok(w) => {
                    let _ = started.send(Ok(()));
                    supervise(w, &dir, &id, |resume| spawn(resume).map_err(String::from))
                }
                Err(e) => {
                    let said = e.said.clone();
                    let _ = started.send(Err(e));
                    Err(std::io::Error::other(said))
                }
            }
        })
        .map_err(|e| format!("starting the keeper thread: {e}"))?;
    match first.recv() {
        Ok(Ok(())) => Ok((keeper, kept_id)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(String::from("the keeper thread ended before its worker started").into()),
    }
}

/// Waits on `worker`, starting another (`spawn(true)`) when one dies while `dir` is still
/// mounted, and ends once it is not.
fn supervise(
    mut worker: Child,
    dir: &Path,
    id: &str,
    spawn: impl Fn(bool) -> std::result::Result<Child, String>,
) -> std::io::Result<()> {
    let mounted = || is_ours(dir, id);
    let mut probe: Option<Probe> = None;
    let mut restarts: Vec<Instant> = Vec::new();
    // Dead workers not yet reaped (see `leader_exited`), reaped when they end.
    let mut lingering = Lingering(Vec::new());
    let lingering = &mut lingering.0;
    loop {
        // A question the dead worker held is never answered on a kernel that resends nothing.
        if probe.as_ref().is_some_and(|p| p.waiting().is_some()) {
            probe = None;
        }
        let probe = probe.get_or_insert_with(|| Probe::start(dir.to_path_buf()));
        let started = Instant::now();
        let mut ended = false;
        let status = loop {
            lingering.retain_mut(|w| matches!(w.try_wait(), Ok(None)));
            if let Ok(Some(status)) = worker.try_wait() {
                break status.to_string();
            }
            if leader_exited(worker.id()) {
                // Its main thread is gone but a thread of it is held in the kernel (a page
                // drop waits for a read this worker held: `upper::pages`), so it is not
                // reaped: the next worker answers that read, resent, and lets it go.
                lingering.push(worker);
                break "its main thread exited, a thread of it held in the kernel".into();
            }
            let hung = probe.waiting().is_some_and(|w| w >= HUNG) && started.elapsed() >= HUNG;
            if hung && !ended {
                tracing::warn!("the mount's worker answered nothing for {HUNG:?}: ending it");
                // SAFETY: signalling our own child, not yet reaped.
                unsafe { libc::kill(worker.id() as i32, libc::SIGKILL) };
                ended = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !mounted() {
            return Ok(()); // unmounted: the worker's session ended with it
        }
        tracing::warn!(
            "the mount's worker exited ({status}): starting another on the same connection"
        );
        // One that cannot start (or dies as it starts) counts as a death too, tried again
        // after a pause, until too many in a minute.
        let mut attempt = 0u64;
        worker = loop {
            restarts.retain(|t| t.elapsed() < Duration::from_secs(60));
            restarts.push(Instant::now());
            let failed = if restarts.len() > MAX_RESTARTS {
                format!(
                    "the mount's worker died {} times in a minute",
                    restarts.len()
                )
            } else {
                match spawn(true) {
                    Ok(w) => break w,
                    Err(e) if mounted() => {
                        tracing::warn!("{e}: trying again");
                        attempt += 1;
                        std::thread::sleep(Duration::from_millis(100 * attempt.min(10)));
                        continue;
                    }
                    Err(_) => return Ok(()), // unmounted meanwhile
                }
            };
            // The mount is dead: unmounted here where this process may (a user's daemon,
            // under no_new_privs, cannot run fusermount3: it unmounts through the helper it
            // started before, once this thread has ended).
            tracing::error!("{failed}: unmounting {}", dir.display());
            if mounted() {
                if let Err(e) = crate::mount::unmount(dir) {
                    tracing::debug!("unmounting from the keeper: {e}");
                }
            }
            return Err(std::io::Error::other(failed));
        };
    }
}

/// Dead workers whose last thread the kernel still holds: waited for on threads of their own
/// once their keeper stops watching (a `Child` dropped is never reaped, and the keeper may
/// run in a library caller's process, for as long as it lives).
struct Lingering(Vec<Child>);

impl Drop for Lingering {
    fn drop(&mut self) {
        for mut w in self.0.drain(..) {
            let _ = std::thread::Builder::new()
                .name("bux-fuse-reap".into())
                .spawn(move || w.wait());
        }
    }
}

/// Whether process `pid`'s main thread has exited (a zombie leader) while another of its
/// threads lives on: it is dying (a worker's main thread never returns while it serves).
fn leader_exited(pid: u32) -> bool {
    crate::store::process_state(pid) == Some('Z')
}

/// Whether the mount with table ID `id` is still mounted at `dir`.
pub(crate) fn is_ours(dir: &Path, id: &str) -> bool {
    crate::mount::table::at(dir).is_some_and(|m| m.id == id)
}

/// Whether this kernel resends a dead worker's requests to the next (FUSE_NOTIFY_RESEND,
/// Linux 6.9+). Before, what a dead worker held would never be answered: the processes that
/// asked would wait for good, so such a mount is served in the mounting process there, as
/// before (and dies with it).
pub(crate) fn kernel_resends() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let mut next = || {
        parts
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0)
    };
    (next(), next()) >= (6, 9)
}

/// Blocks or unblocks (`how`) SIGPIPE for the calling thread (async-signal-safe).
fn sigpipe_mask(how: libc::c_int) {
    // SAFETY: a signal set on the stack, filled by sigemptyset/sigaddset, passed to
    // pthread_sigmask for this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

fn spawn_worker(
    exe: &Path,
    args: &[std::ffi::OsString],
    told: &[u8],
    fd: RawFd,
    resume: bool,
    run_dir: &Path,
) -> std::result::Result<Child, NotReady> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    spawn::as_server(&mut cmd);
    let keeper = std::process::id() as libc::pid_t;
    // SAFETY: fcntl, prctl and getppid are async-signal-safe, run in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            sigpipe_mask(libc::SIG_UNBLOCK);
            // The worker inherits the connection.
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // And ends with its keeper (the mount is recorded as the keeper's: were the
            // worker to serve on, nobody would replace it, and a `gc` would take the mount
            // for dead).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != keeper {
                return Err(std::io::Error::other("the keeper is gone"));
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| NotReady::from(format!("starting the mount's worker: {e}")))?;
    // Read whole before the worker starts serving (a pipe's buffer holds it). A worker that
    // failed before reading it says why below.
    if let Some(mut stdin) = child.stdin.take() {
        if let Err(e) = stdin.write_all(told) {
            tracing::debug!("telling the mount's worker its options: {e}");
        }
    }
    let offered = spawn::await_ready(&mut child, exe, "the mount's worker")?;
    if !resume {
        // What the kernel offered the first worker, for the ones that take over.
        if let Err(e) = crate::store::write_atomic(&init_path(run_dir), &offered.to_le_bytes()) {
            spawn::kill(&mut child, false);
            return Err(format!("recording FUSE_INIT: {e}").into());
        }
    }
    Ok(child)
}

/// What a worker serves, and how (see [`serve_mount_worker`]).
pub struct Worker<'a> {
    /// The inherited FUSE connection.
    pub fd: RawFd,
    /// The connection is live already: taking over from a worker that died.
    pub resume: bool,
    pub what: Kind<'a>,
    /// The mount's run directory.
    pub run_dir: &'a Path,
    /// Users other than the owner reach the mount.
    pub allow_other: bool,
    /// FUSE threads.
    pub threads: usize,
    /// Bytes of decompressed spans cached.
    pub cache_bytes: usize,
}

/// The worker (`bux-fuse serve-mount --worker-fd N --run-dir DIR [--upper DIR | --disk]
/// VIEW`): serves the mount whose connection is `w.fd`; with `w.resume`, taking over from a
/// worker that died. Prints `ready CAPS` once it serves (or `error WHY` if it cannot).
pub fn serve_mount_worker(store: &Store, w: &Worker) -> Result<()> {
    let r = serve(store, w);
    if let Err(e) = &r {
        // The keeper is waiting for a line: the reason, rather than a closed pipe.
        spawn::tell_error(e);
    }
    r
}

fn serve(store: &Store, w: &Worker) -> Result<()> {
    let (fd, resume, what, run_dir) = (w.fd, w.resume, w.what, w.run_dir);
    let (allow_other, threads) = (w.allow_other, w.threads);
    crate::mount::tune_allocator_for_serving();
    crate::mount::raise_open_files_limit();
    let io =
        |what: &str, e: std::io::Error| Error::io(format!("{what} ({})", run_dir.display()), e);
    let json =
        std::fs::read(record_path(run_dir)).map_err(|e| io("reading the image record", e))?;
    let record: ImageRecord = serde_json::from_slice(&json)
        .map_err(|e| io("reading the image record", std::io::Error::other(e)))?;
    let mut told = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut told)
        .map_err(|e| io("reading the keeper's options", e))?;
    let told = match told.is_empty() {
        // A keeper of an earlier version (the binary upgraded under a live mount) tells
        // nothing: what it keeps is an image stored whole, served with the defaults.
        // (It read through the user's image server where it could.)
        true => Told::of(
            &MountOptions::default(),
            what,
            matches!(what, Kind::Writable(_)),
        ),
        false => serde_json::from_slice(&told)
            .map_err(|e| io("reading the keeper's options", std::io::Error::other(e)))?,
    };
    let opts = told.mount_options(w.cache_bytes);
    // The keeper's lease keeps the image's files from gc, and this process dies with it: none
    // of its own to write (the disk may be full when a worker takes over).
    let lease = crate::store::Lease::held_by_parent();
    let through = match what {
        Kind::Writable(_) if told.read_through => through(store, &record),
        _ => None,
    };
    let image = open_record(store, record, lease, &opts)?;
    // Confined before it serves, as the mounting process's daemon is: after opening the image,
    // whose registry client may run a credential helper (`docker-credential-*`), and after a
    // user's image server is started (its fusermount3 is setuid, which no_new_privs disarms).
    if let Err(e) = crate::sandbox::confine(crate::mount::host_root()) {
        tracing::warn!("confining the mount's worker (seccomp): {e}");
    }
    // A worker that takes over records no trace: one that starts mid-boot would save a trace
    // without what the boot read before it, over the one saved before (asked for or not).
    let (layers, recording, known) = crate::mount::prefetch::record_reads(
        store,
        &image.record,
        &image.tree,
        image.layers,
        !image.lazy.is_empty() && !resume,
        opts.record_trace && !resume,
    );
    if resume && opts.record_trace {
        tracing::warn!("a worker that takes over records no read trace: the mount's is lost");
    }
    let cache = Arc::new(SpanCache::new(opts.cache_bytes));
    // Counters are for `Mount::stats`: a mount served without them (the disk full) beats none.
    let stats = super::stats::Publisher::open(&stats_path(run_dir), resume)
        .inspect_err(|e| tracing::warn!("publishing the mount's counters: {e}"))
        .ok();
    // As the mounting process would serve it.
    let lower = crate::mount::image_fs(image.tree, layers, cache.clone(), told.overlay_lower);
    let replay = match resume {
        true => Some(
            std::fs::read(init_path(run_dir))
                .map_err(|e| io("reading the recorded FUSE_INIT", e))?,
        ),
        false => None,
    };
    let mut config = Config::default();
    config.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(threads.max(1));
    // The keeper's descriptor itself, not clones: a clone closed by a dying worker would fail
    // the requests it holds instead of keeping them for a resend.
    config.clone_fd = false;
    // SAFETY: the keeper passed this descriptor for us to own.
    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
    let ready = |offered: Arc<std::sync::atomic::AtomicU64>| {
        let (remote, lazy, record) = (image.remote.clone(), image.lazy, &image.record);
        let (store, prefetch) = (store, opts.prefetch);
        move || -> Result<()> {
            if let Some(stats) = stats {
                stats.start(cache, remote);
            }
            println!("ready {:x}", offered.load(Ordering::Relaxed));
            let _ = std::io::stdout().flush();
            super::silence_stdout();
            crate::mount::prefetch::start(store, record, lazy, known, prefetch);
            Ok(())
        }
    };
    use super::worker::serve_session as session;
    let replay = replay.as_deref();
    let served = match what {
        Kind::Image => {
            let offered = lower.offered_capabilities();
            session(lower, conn, replay, config, &io, None, ready(offered))
        }
        Kind::Disk => {
            let offered = lower.offered_capabilities();
            let fs = crate::disk::DiskFs::new(lower)
                .map_err(|e| io("laying the image out as a disk", std::io::Error::other(e)))?;
            session(fs, conn, replay, config, &io, None, ready(offered))
        }
        Kind::Writable(upper) => {
            let journal = journal_path(run_dir);
            let fs = match resume {
                true => crate::upper::UpperFs::taking_over(lower, upper, &journal),
                false => crate::upper::UpperFs::journalled(lower, upper, &journal),
            }
            .map_err(|e| io("opening the upper layer", e))?
            .serving_others(allow_other)
            .with_workers(threads.max(1));
            let fs = match through {
                Some(t) => fs.reading_through(t),
                None => fs,
            };
            let (offered, notifier) = (fs.offered_capabilities(), fs.notifier_slot());
            session(
                fs,
                conn,
                replay,
                config,
                &io,
                Some(notifier),
                ready(offered),
            )
        }
    };
    // The reads this worker saw (a worker that died saved none: its successor records anew).
    crate::mount::prefetch::save(recording);
    served
}

/// The image server a writable mount reads unmodified image files through (see
/// [`crate::upper::Through`]), if it can be had.
fn through(store: &Store, record: &ImageRecord) -> Option<crate::upper::Through> {
    let r = crate::embed::server_executable()
        .and_then(|exe| super::reading_through(store, record, &exe));
    match r {
        Ok((mnt, holder)) => Some(crate::upper::Through::new(mnt, holder)),
        Err(e) => {
            tracing::warn!("image files are decoded by this mount alone: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Credentials;

    /// What the keeper tells a worker comes back as it was told; what an earlier keeper leaves
    /// out is the default.
    #[test]
    fn told_options_round_trip_and_default() {
        let mut opts = MountOptions::default();
        opts.registry.credentials = Credentials::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        opts.registry.insecure = vec!["127.0.0.1:5000".into()];
        opts.read_deadline = Duration::from_secs(60);
        opts.writable = true;
        let told = Told::of(&opts, Kind::Image, false);
        let back: Told = serde_json::from_slice(&serde_json::to_vec(&told).unwrap()).unwrap();
        let r = back.registry();
        assert!(
            matches!(r.credentials, Credentials::Basic { ref username, ref password }
            if username == "u" && password == "p")
        );
        assert_eq!(r.insecure, ["127.0.0.1:5000"]);
        assert_eq!(back.read_deadline, Duration::from_secs(60));
        assert!(
            back.overlay_lower,
            "root's writable tree under a kernel overlay"
        );
        let old: Told = serde_json::from_slice(br#"{"record_trace": true}"#).unwrap();
        assert!(old.record_trace);
        assert_eq!(old.read_deadline, MountOptions::default().read_deadline);
        assert!(matches!(old.registry().credentials, Credentials::Auto));
    }
}
