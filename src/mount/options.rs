//! What a caller asks of a mount ([`MountOptions`]) and what it reads back of one
//! ([`MountStats`], [`DiskRoot`]).

use std::path::PathBuf;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// FUSE worker threads (a slow read then does not stall `ls`). Default 4.
    pub threads: usize,
    /// Bytes of decompressed spans kept in memory. Default 16 MiB.
    pub cache_bytes: usize,
    /// Let other users (and virtiofsd's sandbox) use the mount; needs root or
    /// `user_allow_other` in `/etc/fuse.conf`. Default: true for root, false otherwise.
    pub allow_other: bool,
    /// Make the root writable: an overlay whose lower layer is the read-only image and whose
    /// upper layer takes every change (copy-up on first write; the image is never modified).
    /// Root gets a kernel overlay; other callers get one served by bux-fuse. Default false.
    pub writable: bool,
    /// Keep the writable layer here (`DIR/upper`, `DIR/work`) so a later mount with the same
    /// directory sees the changes. Without it, changes go to a scratch directory removed at
    /// unmount (`docker run --rm` semantics). Default none.
    pub upper: Option<PathBuf>,
    /// Registry access for layers fetched lazily (credentials, plain-HTTP registries,
    /// timeouts). Default: [`RegistryOptions::default`](crate::RegistryOptions).
    pub registry: crate::registry::RegistryOptions,
    /// How long a read waits for lazily fetched bytes before failing with `EIO` (keep it
    /// below the kernel's `fs.fuse.default_request_timeout` where that is set). Default 5 s.
    pub read_deadline: std::time::Duration,
    /// What to fetch of lazy layers besides what is read. Default [`Prefetch::All`].
    pub prefetch: Prefetch,
    /// Record which ranges reads need (saved at unmount for `push-index` to publish). A lazy
    /// mount of an image with no trace records one anyway. Default false.
    pub record_trace: bool,
    /// Serve through the image's shared server, run from this executable, where possible
    /// (every layer stored, no trace recorded): for host root, one daemon and one page cache
    /// for all mounts of an image; for an ordinary user's writable mount, its own daemon in
    /// this process that reads the image's files through the user's shared server, so that
    /// the user's mounts of an image hold its pages once (docs/rootless.md). Else the mount
    /// has a server of its own in this process. The executable is `bux-fuse`, or a program
    /// whose `main` calls [`crate::serve_if_requested`] first: [`crate::server_executable`]
    /// names this program, or `$BUX_FUSE_HELPER`. A mount that cannot stand on the image server
    /// (a user's, or fetched lazily, or recording a trace) is then served by a worker process
    /// run from it, which this process keeps (Linux 6.9+; replaced if it dies). Default none
    /// (the `bux-fuse` CLI sets it but for `--own-server`).
    pub shared_server: Option<PathBuf>,
    /// Serve the image as a disk: the mount point holds one file, [`crate::disk::DISK_FILE`],
    /// a complete EROFS image of the tree whose blocks are read (or fetched) as they are read,
    /// for a VMM to attach as the guest's root block device ([`Mount::disk`](super::Mount::disk)). Read-only (not
    /// with `writable`); served by the mount's own server. Default false.
    pub disk: bool,
}

/// Background fetching of lazily mounted layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Prefetch {
    /// Only what is read.
    None,
    /// What the image's read trace says a boot reads, in that order (then only what is read).
    Trace,
    /// Everything, in the background, after which the layers are ordinary stored layers.
    #[default]
    All,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 4,
            cache_bytes: 16 << 20,
            // SAFETY: geteuid has no preconditions.
            allow_other: unsafe { libc::geteuid() } == 0,
            writable: false,
            upper: None,
            registry: Default::default(),
            read_deadline: std::time::Duration::from_secs(5),
            prefetch: Prefetch::All,
            record_trace: false,
            shared_server: None,
            disk: false,
        }
    }
}

/// Counters of a live mount. [`MountStats::scope`] says whose: a mount over the image's
/// shared server reports the server's, which count the reads of every mount of the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountStats {
    /// Bytes read from blob files.
    pub blob_bytes: u64,
    /// Bytes produced by decompression.
    pub decompressed_bytes: u64,
    /// Span cache hits.
    pub cache_hits: u64,
    /// Span cache misses.
    pub cache_misses: u64,
    /// Lookups the kernel sent (names it found, and names it did not: those are cached too).
    pub lookups: u64,
    /// Bytes received from the registry by lazy fetches.
    pub fetched_bytes: u64,
    /// Requests sent to the registry by lazy fetches.
    pub fetch_requests: u64,
    /// What the counters count.
    pub scope: StatsScope,
}

/// What a mount's [`MountStats`] count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatsScope {
    /// This mount's reads: it is served from this process.
    #[default]
    Mount,
    /// The reads of every mount of the image since its shared server started (across worker
    /// restarts): the mount stands on that server ([`shared`](super::shared)), which counts them together
    /// and publishes them every 0.2 s. Reads the kernel serves without FUSE (metadata, and
    /// small files' bytes, from the image's EROFS metadata image) are not counted; a shared
    /// server never fetches (`fetched_bytes` and `fetch_requests` are 0: its images are stored
    /// whole).
    Image,
    /// None: the mount stands on a shared server that publishes no counters (one started by
    /// an earlier version of bux-fuse). Every counter is 0.
    Unavailable,
}

/// A disk for a VMM to attach as its guest's root ([`Mount::disk`](super::Mount::disk)). With libkrun:
/// `krun_add_disk(ctx, "root", path, read_only)`, then
/// `krun_set_root_disk_remount(ctx, "/dev/vda", fs_type, options)` (the device is the guest's
/// name for the first disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRoot {
    /// The image file.
    pub path: PathBuf,
    /// The filesystem the guest mounts: `erofs`.
    pub fs_type: &'static str,
    /// Attach it read-only (the image never changes; a guest overlays it to write).
    pub read_only: bool,
    /// Mount options for the guest (none needed).
    pub options: Option<&'static str>,
}
