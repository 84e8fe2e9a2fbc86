//! Mounting a stored image: load its merged tree, open its layers, start the FUSE session.
//!
//! [`mount`] returns a [`Mount`] whose [`Mount::path`] is what a VM runtime hands to
//! `krun_set_root`; dropping it unmounts. Unmounting detaches (`MNT_DETACH`), so it succeeds even
//! while files are open, and also clears a mount whose serving process died ("Transport endpoint
//! is not connected").

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::{Config, Session, SessionACL};

use crate::fs::ImageFs;
use crate::index::SpanCache;
use crate::lazy::Remote;
use crate::{Error, Result, Store};

mod connect;
mod detached;
mod kernel;
mod open;
pub(crate) use open::check_whole_layers;
mod options;
pub(crate) mod prefetch;
mod records;
#[doc(hidden)]
pub mod shared;
mod table;
mod unmount;
mod upper_dir;
#[doc(hidden)]
pub use connect::host_root;
pub(crate) use detached::{last_logged, spawn_detached, start_detached};
pub(crate) use kernel::kernel_mount;
#[doc(hidden)]
pub use kernel::READ_AHEAD_KB;
use kernel::{mount_overlay, raise_readahead};
use open::stored_image;
pub(crate) use open::{layer_data_path, lease_image, open_image, open_record, OpenedImage};
pub use options::{DiskRoot, MountOptions, MountStats, Prefetch, StatsScope};
pub use records::{MountRecord, MountState, StoreMount};
pub use unmount::unmount_all;
use unmount::unmount_over_server;
#[doc(hidden)]
pub use unmount::{
    clean_run_dir, clean_scratch, foreign_mount, mount_path, unmount, wait_for_cleanup,
};
use upper_dir::{lock_upper, make_scratch, UpperKind};

/// A live mount. Dropping it unmounts.
pub struct Mount {
    path: PathBuf,
    /// Where the FUSE filesystem itself is mounted (`path` unless writable).
    fuse_path: PathBuf,
    writable: Option<WritableLayer>,
    cache: Arc<SpanCache>,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// Keeps gc (and `rm` without --force) off this image's files while mounted.
    _lease: crate::store::Lease,
    /// The registry end of lazily fetched layers, if any.
    remote: Option<Arc<Remote>>,
    /// The read trace being recorded, and where it goes at unmount.
    trace: Option<prefetch::Recording>,
    /// `path` is a kernel mount over the FUSE mount (an overlay, or a bind mount of the
    /// image's shared mount), unmounted first.
    kernel_mount: bool,
    /// The store's record of this mount (see [`Store::mounts`]), removed at unmount.
    record: Option<PathBuf>,
    /// The mount serves the image as a disk ([`MountOptions::disk`]).
    disk: bool,
    /// The image server a user's writable mount reads image files through (its place), which
    /// leaves once this mount's session has ended: unmounting waits for that.
    read_through: Option<PathBuf>,
    /// A user's mount served by a worker this process keeps (`shared::keep`).
    kept: Option<KeptMount>,
}

/// What a process keeping a mount's worker knows of it.
struct KeptMount {
    /// The mount's run directory (the worker's counters, INIT, journal), removed at unmount.
    run_dir: PathBuf,
    /// The mount's ID in the mount table (see [`Mount::still_mounted`]).
    id: String,
}

/// The overlay that makes a mount writable.
struct WritableLayer {
    /// Per-mount directory in the store (holds the FUSE mount point and scratch upper).
    run_dir: PathBuf,
    /// An exclusive lock on `--upper DIR` for the life of the mount: two overlays on one upper
    /// directory is undefined behaviour in the kernel.
    _upper_lock: Option<std::fs::File>,
}

impl Mount {
    /// The disk this mount serves, if it is a disk mount ([`MountOptions::disk`]).
    pub fn disk(&self) -> Option<DiskRoot> {
        self.disk.then(|| DiskRoot {
            path: self.path.join(crate::disk::DISK_FILE),
            fs_type: "erofs",
            read_only: true,
            options: None,
        })
    }

    /// The mount point (hand this to `krun_set_root`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read-path counters: this mount's, or its image server's ([`MountStats::scope`]).
    pub fn stats(&self) -> MountStats {
        if self.thread.is_none() && self.kernel_mount {
            return shared::server_stats(&self.fuse_path);
        }
        if let Some(k) = &self.kept {
            return shared::kept_stats(&shared::kept_stats_path(&k.run_dir));
        }
        let s = &self.cache.stats;
        MountStats {
            blob_bytes: s.blob_bytes.load(Ordering::Relaxed),
            decompressed_bytes: s.decompressed.load(Ordering::Relaxed),
            cache_hits: s.hits.load(Ordering::Relaxed),
            cache_misses: s.misses.load(Ordering::Relaxed),
            lookups: s.lookups.load(Ordering::Relaxed),
            fetched_bytes: self
                .remote
                .as_ref()
                .map_or(0, |r| r.fetched.load(Ordering::Relaxed)),
            fetch_requests: self
                .remote
                .as_ref()
                .map_or(0, |r| r.requests.load(Ordering::Relaxed)),
            scope: StatsScope::Mount,
        }
    }

    /// Whether the mount has ended: unmounted from outside, or its server gone (the FUSE
    /// session in this process, or the image's shared server).
    pub fn is_finished(&self) -> bool {
        let gone = self.kernel_mount && !is_mount_point(&self.path);
        match &self.thread {
            Some(t) => t.is_finished() || gone,
            None => !self.kernel_mount || gone || !shared::serving(&self.fuse_path),
        }
    }

    /// Whether a worker process this one keeps serves the mount (see `shared::kept`).
    pub(crate) fn is_kept(&self) -> bool {
        self.kept.is_some()
    }

    /// Whether this mount is still in place at its path (for a mount whose server ended:
    /// then dead, to be unmounted), and not another mounted there since.
    pub fn still_mounted(&self) -> bool {
        match &self.kept {
            Some(k) => shared::kept_mount_is_ours(&self.fuse_path, &k.id),
            None => is_mount_point(&self.path),
        }
    }

    /// Leaves the mount in place and forgets it, where the mount needs no serving by this
    /// process (a mount over the image's shared server): `bux-fuse umount` (or
    /// [`unmount_all`]) ends it. Returns the mount back otherwise.
    pub fn detach(mut self) -> std::result::Result<(), Box<Mount>> {
        if self.thread.is_some() || !self.kernel_mount {
            return Err(Box::new(self));
        }
        self.kernel_mount = false;
        self.writable = None;
        Ok(())
    }

    /// Blocks until the session ends (someone unmounted it).
    pub fn wait(mut self) -> Result<()> {
        self.teardown()
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        // Found while this mount still holds it up (see `shared::Leaving`); forgotten only once
        // unmounted (a failed unmount is tried again at drop, and waits then).
        let read_through = self.read_through.as_deref().and_then(shared::Leaving::of);
        if let Some(r) = &self.remote {
            r.shutdown();
        }
        prefetch::save(self.trace.take());
        if self.kernel_mount && is_mount_point(&self.path) {
            unmount_over_server(&self.path)?;
        }
        if self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            unmount(&self.fuse_path)?;
        }
        let res = self.join();
        self.read_through = None;
        if let Some(server) = read_through {
            // The image is then free for `rm` and `gc` when this returns.
            server.wait(std::time::Instant::now() + std::time::Duration::from_secs(5));
        }
        if let Some(w) = self.writable.take() {
            // The scratch upper (if any) lives in run_dir; a persistent one is elsewhere.
            let _ = std::fs::remove_dir_all(&w.run_dir);
        }
        if let Some(k) = self.kept.take() {
            let _ = std::fs::remove_dir_all(k.run_dir);
        }
        self.kernel_mount = false;
        if let Some(record) = self.record.take() {
            let _ = std::fs::remove_file(record);
        }
        res
    }

    /// Records the mount in the store (see [`Store::mounts`]); a record that cannot be written
    /// costs the listing only, not the mount.
    fn recorded(
        mut self,
        store: &Store,
        reference: &str,
        manifest: crate::Digest,
        opts: &MountOptions,
        shared: bool,
    ) -> Mount {
        match records::write(store, &self.path, reference, manifest, opts, shared) {
            Ok(file) => self.record = Some(file),
            Err(e) => tracing::warn!("recording the mount at {}: {e}", self.path.display()),
        }
        self
    }

    fn join(&mut self) -> Result<()> {
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(r) => r.map_err(|e| Error::Mount {
                    path: self.path.clone(),
                    detail: format!("FUSE session: {e}"),
                })?,
                Err(_) => {
                    return Err(Error::Mount {
                        path: self.path.clone(),
                        detail: "FUSE session thread panicked".into(),
                    })
                }
            }
        }
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.thread.is_some() || self.writable.is_some() || self.kernel_mount {
            let _ = self.teardown();
        }
    }
}

/// Whether `path` is a mount point (per `/proc/self/mountinfo`).
#[doc(hidden)]
pub fn is_mount_point(path: &Path) -> bool {
    table::read().iter().any(|m| m.is_at(path))
}

/// Polls `busy` every 10 ms while it holds, for at most `timeout`.
pub(crate) fn wait_while(timeout: std::time::Duration, mut busy: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while busy() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Tunes glibc's allocator for a process that serves mounts: decompressed spans (512 KiB to
/// 1 MiB) come and go all the time, and per-thread arenas would each keep their own freed
/// spans (measured: +60 MiB RSS over a full read of a 1 GiB image). Two arenas bound that;
/// spans stay below the mapping threshold, since mapping each one afresh (page faults,
/// zeroing, an unmap per span) made a cold full read of the large image 20% slower
/// (`bench/read_profile.rs`: 3.6–3.7 s with a 256 KiB threshold, 3.0–3.2 s with 2 MiB, for
/// +9 MiB RSS: 61 MiB at the end of the read, against 79 MiB untuned). Freed spans are kept
/// mapped (up to 64 MiB at the top of each arena's heap) rather than handed back at once:
/// fixing the mapping threshold also fixes glibc's trim threshold, at 128 KiB when nothing
/// had raised it yet, and each fresh page costs a fault (2.5–4.5 µs in a guest of a software
/// hypervisor). Where this was called before the process's first large frees (a daemon
/// serving its own mount, `bench/read_profile.rs`), the heap shrank and grew with every span
/// the cache let go: 130,000–200,000 faults in a cold full read of the large image, ~8,000–
/// 9,600 now (CPU 4.4–5.3 s → 4.2–4.8 s, RSS at the end +5–11 MiB); a shared image server,
/// which calls it after opening the image, had ~32 MiB already (13,000 → 11,000 faults). The
/// `bux-fuse` daemon calls it; a library caller decides for its own process (it changes the
/// whole process's allocator).
#[doc(hidden)]
pub fn tune_allocator_for_serving() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Raises the soft limit on open descriptors to the hard one, for a process that serves
/// mounts: a user's writable mount keeps up to 256 upper files, 256 upper directories and 256
/// image files in the shared mount open besides its layers, and the soft limit is often 1024.
/// The `bux-fuse` daemon calls it; a library caller decides for its own process.
#[doc(hidden)]
pub fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Creates the mount point if missing and resolves it; refuses one that is mounted already.
fn prepare_mount_point(store: &Store, dir: &Path) -> Result<PathBuf> {
    records::clear(store, dir)?;
    let mount_err = |detail: String| Error::Mount {
        path: dir.to_path_buf(),
        detail,
    };
    let dead = |e: &io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    if let Err(e) = std::fs::create_dir_all(dir) {
        let stat = std::fs::metadata(dir);
        return Err(mount_err(if dead(&e) || stat.as_ref().is_err_and(dead) {
            "a mount whose daemon died is still here: run `bux-fuse umount` on it first".into()
        } else if dir.exists() && !dir.is_dir() {
            "exists and is not a directory".into()
        } else {
            format!("creating mount point: {e}")
        }));
    }
    let canonical = dir.canonicalize().map_err(|e| {
        mount_err(if dead(&e) {
            "a mount whose daemon died is still here: run `bux-fuse umount` on it first".into()
        } else {
            format!("resolving mount point: {e}")
        })
    })?;
    if let Some(here) = table::at(&canonical) {
        return Err(Error::AlreadyMounted {
            path: canonical,
            what: format!("a {} mount", here.fstype),
        });
    }
    Ok(canonical)
}

fn disk_is_read_only(dir: &Path) -> Error {
    Error::Mount {
        path: dir.to_path_buf(),
        detail: "a disk is read-only: a guest makes its root writable with an overlay of its own \
                 (see docs/disk.md)"
            .into(),
    }
}

/// Mounts `dir` over the image's shared server (see [`shared`]), or its disk server: `None`
/// if the image is fetched lazily by a server that fetches otherwise than `opts` say (other
/// credentials, registries or deadlines).
fn mount_shared(
    store: &Store,
    record: &crate::store::ImageRecord,
    lease: crate::store::Lease,
    dir: &Path,
    opts: &MountOptions,
    exe: &Path,
) -> Result<Option<Mount>> {
    let mount_err = |detail: String| Error::Mount {
        path: dir.to_path_buf(),
        detail,
    };
    let dir = prepare_mount_point(store, dir)?;
    // The tree's header says whether a read-only mount needs an overlay (mapped, not read).
    let overlay_xattrs = match crate::tree::Tree::load(&store.tree_path(&record.view())) {
        Ok(t) => t.has_overlay_xattrs(),
        Err(_) => store.tree(record)?.has_overlay_xattrs(), // rebuilt
    };
    let upper_lock = match &opts.upper {
        Some(u) => Some(lock_upper(u, UpperKind::Overlay).map_err(mount_err)?),
        None => None,
    };
    let mut told = shared::Told::of(opts, shared::KeptKind::Image, false);
    told.reference = Some(record.reference.clone());
    let Some((lower, _image_lock)) = shared::lower(store, record, exe, opts.disk, Some(&told))?
    else {
        // The image is fetched lazily by a server that fetches as another mount said.
        return Ok(None);
    };
    let writable = if opts.disk {
        // Every disk mount of the image binds the disk server's one FUSE mount: one file,
        // one page cache for all of the image's VMs.
        kernel_mount(&lower.mnt, &dir, "", libc::MS_BIND, "")
            .map_err(|e| mount_err(format!("bind-mounting the image's disk: {e}")))?;
        None
    } else if opts.writable {
        // No process of this mount outlives it: the scratch upper is found (and removed) by
        // `bux-fuse umount` through the overlay's options.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let scratch = store.root().join("scratch").join(format!(
            "{}-{}-{}",
            crate::Digest::of(dir.as_os_str().as_encoded_bytes()).short(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        if opts.upper.is_none() {
            make_scratch(&scratch)
                .map_err(|e| mount_err(format!("creating {}: {e}", scratch.display())))?;
        }
        let base = opts.upper.clone().unwrap_or_else(|| scratch.clone());
        if let Err(e) = mount_overlay(&lower.lowerdir(), lower.in_kernel(), &base, &dir) {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(mount_err(e));
        }
        Some(WritableLayer {
            run_dir: scratch,
            _upper_lock: upper_lock,
        })
    } else {
        shared::mount_read_only(&lower, &dir, overlay_xattrs).map_err(mount_err)?;
        None
    };
    Ok(Some(
        Mount {
            path: dir,
            fuse_path: lower.mnt,
            writable,
            cache: Arc::new(SpanCache::new(0)),
            thread: None,
            _lease: lease,
            remote: None,
            trace: None,
            kernel_mount: true,
            record: None,
            disk: opts.disk,
            read_through: None,
            kept: None,
        }
        .recorded(store, &record.reference, record.manifest_digest, opts, true),
    ))
}

/// Mounts `dir` over the image's shared server when this mount would stand on one (`opts`
/// names the server's executable, host root, no trace to record; for a disk, the image stored
/// whole; for an image fetched lazily, no server of it fetching otherwise than `opts` say):
/// `None` otherwise, with nothing done.
#[doc(hidden)]
pub fn mount_if_shared(
    store: &Store,
    reference: &str,
    dir: &Path,
    opts: &MountOptions,
) -> Result<Option<Mount>> {
    let Some(exe) = opts.shared_server.as_deref() else {
        return Ok(None);
    };
    if opts.disk && opts.writable {
        return Err(disk_is_read_only(dir));
    }
    if !connect::host_root() || opts.record_trace {
        return Ok(None);
    }
    let (record, lease) = stored_image(store, reference)?;
    // An image fetched lazily stands on it too (its server fetches), but for a disk.
    if opts.disk && !shared::all_local(store, &record) {
        return Ok(None);
    }
    // (The worker checks again as it opens the image; here the refusal reaches the caller.)
    open::check_whole_layers(store, &record)?;
    mount_shared(store, &record, lease, dir, opts, exe)
}

/// Mounts the stored image `reference` read-only at `dir` (created if missing).
pub fn mount(store: &Store, reference: &str, dir: &Path, opts: &MountOptions) -> Result<Mount> {
    if let Some(m) = mount_if_shared(store, reference, dir, opts)? {
        return Ok(m);
    }
    // A mount served by a worker process this one keeps (replaced if it dies), where the
    // program can start one: a user's (root's stand on the image server), and root's that
    // cannot stand on it (fetched lazily, or recording a trace).
    let keeper = match &opts.shared_server {
        Some(exe) if shared::kernel_resends() => Some(exe),
        _ => None,
    };
    // The worker opens the image (and asks the registry for what is fetched lazily): this
    // process needs its record, leased. Else it opens the image to serve it.
    let (record, lease, opened) = match keeper {
        Some(_) => {
            let (record, lease) = stored_image(store, reference)?;
            open::check_whole_layers(store, &record)?;
            // What an earlier completion left goes before this mount is live (a caller then
            // waiting for completion must not read it); the worker's own may follow.
            let _ = std::fs::remove_file(store.incomplete_path(&record.view()));
            (record, lease, None)
        }
        None => {
            let o = open_image(store, reference, opts)?;
            (
                o.record,
                o.lease,
                Some((o.tree, o.layers, o.remote, o.lazy)),
            )
        }
    };
    let name = record.reference.clone();
    let mount_err = |detail: String| Error::Mount {
        path: dir.to_path_buf(),
        detail,
    };
    if opts.disk && opts.writable {
        return Err(disk_is_read_only(dir));
    }
    let dir = prepare_mount_point(store, dir)?;
    // Users cannot mount a kernel overlay: bux-fuse serves their upper layer itself.
    let own_upper = opts.writable && !connect::host_root();
    let run_dir = store.root().join("run").join(format!(
        "{}-{}",
        crate::Digest::of(dir.as_os_str().as_encoded_bytes()).short(),
        std::process::id()
    ));
    let (fuse_dir, writable) = if opts.writable {
        let run_dir = run_dir.clone();
        let lower = run_dir.join("lower");
        // The image mount point, under a kernel overlay only.
        let made = if own_upper { &run_dir } else { &lower };
        std::fs::create_dir_all(made)
            .map_err(|e| mount_err(format!("creating {}: {e}", made.display())))?;
        let upper_lock = match &opts.upper {
            Some(u) => {
                let kind = match own_upper {
                    true => UpperKind::User,
                    false => UpperKind::Overlay,
                };
                Some(lock_upper(u, kind).map_err(mount_err)?)
            }
            None => None,
        };
        (
            if own_upper { dir.clone() } else { lower },
            Some(WritableLayer {
                run_dir,
                _upper_lock: upper_lock,
            }),
        )
    } else {
        (dir.clone(), None)
    };
    // A user's writable mount reads image files through the image's shared mount, where
    // one is possible (every layer stored, nothing recorded): one page cache for them all.
    let through = match &opts.shared_server {
        Some(exe)
            if own_upper
                && !opts.record_trace
                && shared::all_local(store, &record)
                && !opts.disk =>
        {
            match shared::reading_through(store, &record, exe) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("image files are decoded by this mount alone: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    let read_through = through
        .as_ref()
        .and_then(|(mnt, _)| mnt.parent())
        .map(Path::to_path_buf);
    if keeper.is_some() {
        // Its run directory (a writable mount has made it already).
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| mount_err(format!("creating {}: {e}", run_dir.display())))?;
    }
    let mut kept = None;
    let cache = Arc::new(SpanCache::new(opts.cache_bytes));
    // Served here: the tree, its reads recorded where asked (or a lazy image's first trace),
    // and lazy layers fetched ahead (below, once it serves).
    let (fs, trace, known_trace, remote, lazy) = match opened {
        Some((tree, layers, remote, lazy)) => {
            let (layers, trace, known) = prefetch::record_reads(
                store,
                &record,
                &tree,
                layers,
                !lazy.is_empty(),
                opts.record_trace,
            );
            let fs = image_fs(tree, layers, cache.clone(), opts.writable && !own_upper);
            (Some(fs), trace, known, remote, lazy)
        }
        None => (None, None, None, None, Vec::new()),
    };
    let mut config = Config::default();
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let request = connect::Request {
        fsname: &format!("bux-fuse:{name}"),
        allow_other: opts.allow_other,
        read_only: !own_upper,
    };
    let upper_root = match (&writable, own_upper) {
        (Some(w), true) => Some(
            opts.upper
                .as_ref()
                .map_or_else(|| w.run_dir.join("scratch"), Clone::clone)
                .join("upper"),
        ),
        _ => None,
    };
    let thread = match (keeper, fs, upper_root) {
        (Some(exe), _, upper) => {
            let what = match (&upper, opts.disk) {
                (Some(u), _) => shared::KeptKind::Writable(u),
                (None, true) => shared::KeptKind::Disk,
                (None, false) => shared::KeptKind::Image,
            };
            let served = shared::KeptServed {
                store,
                record: &record,
                dir: &fuse_dir,
                what,
                run_dir: &run_dir,
                opts,
            };
            let fd = connect::connect(&fuse_dir, &request).map_err(|e| {
                let _ = std::fs::remove_dir_all(&run_dir);
                mount_err(e)
            })?;
            let holder = through.map(|(_, holder)| holder);
            match shared::keep(exe, &served, fd, holder) {
                Ok((thread, id)) => {
                    let run_dir = run_dir.clone();
                    kept = Some(KeptMount { run_dir, id });
                    Ok(thread)
                }
                Err(e) => {
                    let _ = unmount(&fuse_dir);
                    let _ = std::fs::remove_dir_all(&run_dir);
                    // What the worker met opening the image (the registry's refusal, a
                    // damaged store), as a mount served here would have returned it.
                    if let Some(error) = e.error {
                        return Err(error);
                    }
                    Err(e.said)
                }
            }
        }
        (None, Some(fs), None) if opts.disk => {
            let fs = crate::disk::DiskFs::new(fs)
                .map_err(|e| mount_err(format!("laying the image out as a disk: {e}")))?;
            serve(fs, &fuse_dir, &request, config, None)
        }
        (None, Some(fs), Some(upper)) => {
            let mut fs = crate::upper::UpperFs::new(fs, &upper)
                .map_err(|e| mount_err(format!("opening upper layer {}: {e}", upper.display())))?
                .serving_others(opts.allow_other)
                .with_workers(opts.threads.max(1));
            if let Some((mnt, holder)) = through {
                fs = fs.reading_through(crate::upper::Through::new(mnt, holder));
            }
            let notifier = fs.notifier_slot();
            serve(fs, &fuse_dir, &request, config, Some(notifier))
        }
        (None, Some(fs), None) => serve(fs, &fuse_dir, &request, config, None),
        (None, None, _) => Err("the image was not opened".into()),
    }
    .map_err(mount_err)?;
    raise_readahead(&fuse_dir);
    let mut m = Mount {
        path: dir.clone(),
        fuse_path: fuse_dir.clone(),
        writable,
        cache,
        thread: Some(thread),
        _lease: lease,
        remote,
        trace,
        kernel_mount: opts.writable && !own_upper,
        record: None,
        disk: opts.disk,
        read_through,
        kept,
    };
    if m.kept.is_none() {
        prefetch::start(store, &record, lazy, known_trace, opts.prefetch);
    }
    if let Some(w) = m.writable.as_ref().filter(|_| m.kernel_mount) {
        let base = opts
            .upper
            .clone()
            .unwrap_or_else(|| w.run_dir.join("scratch"));
        let lowerdir = fuse_dir.display().to_string();
        if let Err(e) = mount_overlay(&lowerdir, false, &base, &dir) {
            let _ = m.teardown();
            return Err(mount_err(e));
        }
    }
    Ok(m.recorded(store, &name, record.manifest_digest, opts, false))
}

/// The image's tree served by a mount of its own (in this process or a kept worker):
/// `overlay_lower`, the lower layer of root's kernel overlay, shows the image's own overlay
/// xattrs escaped; a user's leaves permission checks to the guest.
pub(crate) fn image_fs(
    tree: crate::tree::Tree,
    layers: Vec<crate::index::LayerReader>,
    cache: Arc<SpanCache>,
    overlay_lower: bool,
) -> ImageFs {
    let mut fs = ImageFs::new(tree, layers, cache);
    if overlay_lower {
        fs = fs.escaping_overlay_xattrs();
    }
    if !connect::host_root() {
        fs = fs.without_permission_checks();
    }
    fs
}

/// Mounts `fs` at `dir` and serves it on a thread of its own, its notifier put in `notifier`.
fn serve<FS: fuser::Filesystem + Send + 'static>(
    fs: FS,
    dir: &Path,
    request: &connect::Request,
    config: Config,
    notifier: Option<Arc<std::sync::OnceLock<fuser::Notifier>>>,
) -> std::result::Result<JoinHandle<io::Result<()>>, String> {
    let fd = connect::connect(dir, request)?;
    let session = match Session::from_fd(fs, fd, config.acl, config) {
        Ok(s) => s,
        Err(e) => {
            let _ = unmount(dir);
            return Err(format!("FUSE handshake: {e}"));
        }
    };
    if let Some(slot) = notifier {
        let _ = slot.set(session.notifier());
    }
    std::thread::Builder::new()
        .name("bux-fuse-session".into())
        .spawn(move || session.run())
        .map_err(|e| format!("starting session thread: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(table::unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(table::unescape("/plain"), "/plain");
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self")));
    }
}
