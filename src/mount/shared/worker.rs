//! The worker: serves the supervisor's FUSE connection from files it opened before giving up
//! every privilege; a worker that takes over from a dead one resumes the live connection.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuser::{Config, Session, SessionACL};

use super::{
    all_local, find_record, leased_record, open_readers, silence_stdout, users,
    wait_for_mount_change, Place,
};
use crate::fs::ImageFs;
use crate::index::SpanCache;
use crate::mount::open_record;
use crate::{Digest, Error, MountOptions, Result, Store};

/// The worker (`bux-fuse serve-shared --worker-fd N MANIFEST`): serves the connection `fd`.
/// With `resume` the connection is live already: replay its INIT, then have the kernel resend
/// what a dead worker left unanswered.
/// With `disk`, the image's disk ([`crate::disk::DiskFs`]) is served instead of its tree.
/// Prints `ready CAPS` once it serves, or `error WHY` (and the error as
/// `Error::to_wire` makes it) if it cannot.
pub fn serve_worker(
    store: &Store,
    manifest: Digest,
    fd: RawFd,
    resume: bool,
    disk: bool,
) -> Result<()> {
    let r = serve(store, manifest, fd, resume, disk);
    if let Err(e) = &r {
        // The supervisor is waiting for a line: the reason, rather than a closed pipe.
        super::spawn::tell_error(e);
    }
    r
}

/// How a worker of an image fetched lazily exits once the image is whole (completed by it,
/// or by anyone): the supervisor starts a confined one in its place, as it would after a crash.
pub(super) const HANDED_OVER: i32 = 86;

fn serve(store: &Store, manifest: Digest, fd: RawFd, resume: bool, disk: bool) -> Result<()> {
    // Who started this worker, read before anything (it may die while this one starts).
    // SAFETY: getppid has no preconditions.
    let supervisor = unsafe { libc::getppid() };
    let place = Place::of(store, &manifest, disk);
    // The record the supervisor leased (its name may point elsewhere by now, or nowhere).
    let record = match leased_record(&place, &manifest) {
        Err(Error::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
            // Started by a supervisor of an earlier version, which records none.
            find_record(store, &manifest)?
        }
        r => r?,
    };
    // A user's server serves that user's own mounts (which check nothing: their guests do).
    let root = crate::mount::host_root();
    // Root's server of an image fetched lazily fetches what is read (and the rest in the
    // background) with what the mount that started the server said (see `Told`).
    let lazy = !all_local(store, &record);
    if lazy && (disk || !root) {
        return Err(Error::Mount {
            path: place.mnt(),
            detail: "the image's layers are not all stored".into(),
        });
    }
    let told = super::Told::from_stdin()
        .map_err(|e| Error::io("reading the image server's options", e))?;
    let opts = told.mount_options(MountOptions::default().cache_bytes);
    let io =
        |what: &str, e: std::io::Error| Error::io(format!("{what} ({})", place.mnt().display()), e);
    // Everything the worker reads, opened (or mapped) now; then it may open nothing more.
    let lease = crate::mount::lease_image(store, &record)?;
    if let Ok(why) = std::fs::read_to_string(store.bad_path(&record.view())) {
        return Err(Error::BadImage {
            reference: record.reference,
            detail: why.trim().to_string(),
        });
    }
    let image = open_record(store, record, lease, &opts)?;
    if lazy {
        // As root's lazy mount of its own: confined once the image is open (a credential
        // helper may have run), before it serves; it keeps root's ids and may open files and
        // connect (it writes what it fetches into the store).
        if let Err(e) = crate::sandbox::confine(true) {
            tracing::warn!("confining the image server (seccomp): {e}");
        }
    }
    // The reads of a first worker of a lazily fetched image are recorded (the image's trace,
    // for later mounts to fetch first); a worker that takes over records none.
    let (layers, recording, known) = crate::mount::prefetch::record_reads(
        store,
        &image.record,
        &image.tree,
        image.layers,
        lazy && !resume,
        false,
    );
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
    let readers = open_readers(&place)?;
    let stats = super::stats::Publisher::open(&place.stats(), resume)
        .map_err(|e| io("opening the server's counters", e))?;
    // The number of CPUs, asked while the cgroup files (a CPU quota) can still be read:
    // Landlock refuses them, and the answer is kept for the life of the process.
    crate::cpus();
    // Before any thread starts: Landlock binds the threads that exist and what they start.
    // (Not for a lazily fetched image, whose fetcher threads run already and write the store.)
    match lazy {
        true => {}
        false => match crate::sandbox::open_nothing_more() {
            Ok(true) => {}
            Ok(false) => tracing::warn!("no Landlock in this kernel: the worker may open files"),
            Err(e) => return Err(io("restricting what the worker opens (Landlock)", e)),
        },
    }
    let cache = Arc::new(SpanCache::new(opts.cache_bytes));
    let fs = ImageFs::new(image.tree, layers, cache.clone());
    let offered = fs.offered_capabilities();
    let fs = match disk {
        true => Served::Disk(crate::disk::DiskFs::new(fs).map_err(|e| Error::Mount {
            path: place.mnt(),
            detail: format!("laying the image out as a disk: {e}"),
        })?),
        false if !root => Served::Image(fs.without_permission_checks()),
        false => Served::Image(fs.escaping_overlay_xattrs()),
    };
    let mut config = Config::default();
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    // Threads read the supervisor's descriptor itself, not clones: a clone closed by a dying
    // worker would fail the requests it holds (ECONNABORTED) instead of keeping them for a
    // resend.
    config.clone_fd = false;
    // SAFETY: the supervisor passed this descriptor for us to own.
    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
    let (remote, lazy_layers, record) = (image.remote.clone(), image.lazy, &image.record);
    let place_of = || Place::of(store, &manifest, disk);
    let ready = || -> Result<()> {
        orphan_watch(lock, readers, Place::of(store, &manifest, disk), supervisor);
        stats.start(cache, remote);
        // Serving needs no privilege (the supervisor mounts and unmounts); ids of this image's
        // own keep it apart from other images' workers. (A lazily fetched image's writes
        // what it fetches into root's store.)
        if root && !lazy {
            crate::sandbox::drop_to_worker_ids(crate::sandbox::worker_id(&manifest))
                .map_err(|e| io("giving up root", e))?;
        }
        // The supervisor records what the kernel offered, for a worker that takes over.
        println!("ready {:x}", offered.load(Ordering::Relaxed));
        let _ = std::io::stdout().flush();
        silence_stdout();
        if !lazy {
            if let Err(e) = crate::sandbox::confine_worker() {
                tracing::warn!("confining the image server (seccomp): {e}");
            }
        }
        crate::mount::tune_allocator_for_serving();
        if lazy {
            let watched = lazy_layers.clone();
            crate::mount::prefetch::start(store, record, lazy_layers, known, opts.prefetch);
            let watch = (place_of(), watched, recording.clone());
            watch_completion(store, record, watch, supervisor);
        }
        Ok(())
    };
    let served = match fs {
        Served::Image(fs) => serve_session(fs, conn, replay.as_deref(), config, &io, None, ready),
        Served::Disk(fs) => serve_session(fs, conn, replay.as_deref(), config, &io, None, ready),
    };
    // The reads this worker saw (a worker that died saved none: its successor records anew).
    crate::mount::prefetch::save(recording);
    served
}

/// For a worker of an image fetched lazily: completes the image when a mount asks for it
/// ([`Place::complete_request`]: left in place until the image is whole, so that a worker
/// taking over from one that died completes it too; asked again, it is tried again), and once
/// the image is whole (by this worker's completion or anybody's) saves the reads it recorded
/// and exits [`HANDED_OVER`], for a confined worker to serve the image from the store. It
/// serves on where that worker could not take over: on a kernel that cannot resend what a
/// worker leaves unanswered, once its supervisor died (nobody would start one), or where the
/// image was marked bad (a confined worker refuses it; this one serves what it still can).
fn watch_completion(
    store: &Store,
    record: &crate::store::ImageRecord,
    (place, layers, recording): (
        Place,
        crate::mount::prefetch::LazyLayers,
        Option<crate::mount::prefetch::Recording>,
    ),
    supervisor: libc::pid_t,
) {
    use std::os::unix::fs::MetadataExt;
    let (store, record) = (store.clone(), record.clone());
    let mut hand_over = super::kernel_resends();
    let _ = std::thread::Builder::new()
        .name("bux-fuse-complete".into())
        .spawn(move || {
            let mut asked = None;
            loop {
                // A request is told apart from the last by its file (each is written anew)
                // and its time.
                let request = std::fs::metadata(place.complete_request())
                    .ok()
                    .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()));
                if request.is_some() && request != asked {
                    asked = request;
                    tracing::info!("a mount asked for the image whole: completing it");
                    let all = crate::mount::Prefetch::All;
                    crate::mount::prefetch::start(&store, &record, layers.clone(), None, all);
                }
                // SAFETY: getppid has no preconditions.
                let supervised = unsafe { libc::getppid() } == supervisor;
                if hand_over && supervised && all_local(&store, &record) {
                    // The next worker refuses an image whose layers disagree with what was
                    // served (stored whole by somebody else meanwhile): checked here, where
                    // serving on is still possible.
                    let bad = store.bad_path(&record.view()).exists();
                    if let Err(e) = crate::mount::check_whole_layers(&store, &record) {
                        tracing::error!("not handing the image over: {e}");
                        hand_over = false;
                    } else if !bad {
                        let _ = std::fs::remove_file(place.complete_request());
                        crate::mount::prefetch::save(recording.clone());
                        tracing::info!("the image is whole: a confined worker takes over");
                        std::process::exit(HANDED_OVER);
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
}

/// What a worker serves: the image's tree, or its disk.
enum Served {
    Image(ImageFs),
    Disk(crate::disk::DiskFs),
}

/// Takes over the connection `conn` with `fs` (replaying the `recorded` FUSE_INIT of a worker
/// that died, if any), puts the session's notifier in `notifier` (for a filesystem that tells
/// the kernel things), runs `ready` once the session is made, and serves until it ends.
pub(super) fn serve_session<FS: fuser::Filesystem>(
    fs: FS,
    conn: OwnedFd,
    recorded: Option<&[u8]>,
    config: Config,
    io: &dyn Fn(&str, std::io::Error) -> Error,
    notifier: Option<Arc<OnceLock<fuser::Notifier>>>,
    ready: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let session = match recorded {
        Some(init) => replay_init(fs, conn, init, config).map_err(|e| io("resuming", e))?,
        None => {
            Session::from_fd(fs, conn, config.acl, config).map_err(|e| io("FUSE handshake", e))?
        }
    };
    if let Some(slot) = notifier {
        let _ = slot.set(session.notifier());
    }
    ready()?;
    session.run().map_err(|e| io("serving", e))
}

/// If the supervisor dies, nobody would restart this worker, nor notice when the mount is no
/// longer used: serve on (the VMs keep their roots) until nothing stands on the mount, then
/// exit, which ends the connection (the next mount starts a new server).
fn orphan_watch(lock: std::fs::File, readers: std::fs::File, place: Place, parent: libc::pid_t) {
    let _ = std::thread::Builder::new()
        .name("bux-fuse-orphan".into())
        .spawn(move || {
            // SAFETY: as above.
            while unsafe { libc::getppid() } == parent {
                std::thread::sleep(Duration::from_millis(500));
            }
            tracing::warn!("the image server's supervisor died: serving until unused");
            loop {
                // Held from here to exit: no client mounts on what is about to end.
                let unused = || users(&place, Some(&readers)) == 0;
                if unused() && crate::store::try_flock(&lock) && unused() {
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
/// offered, recorded then) through one end of a socket pair, whose descriptor is then replaced
/// by the connection. Its answer to the replayed INIT goes to the other end, dropped unread;
/// the kernel keeps the first one.
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
    // SAFETY: a valid two-element array for socketpair. A pipe would take fuser's answer to
    // the INIT on its read end, and fail it (logged as an error at every takeover).
    let kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair just returned these two descriptors, ours to own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut wr = std::fs::File::from(wr);
    wr.write_all(&msg)?;
    let rd_fd = rd.as_raw_fd();
    let session = Session::from_fd(fs, rd, SessionACL::All, config)?;
    drop(wr);
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
