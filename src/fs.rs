//! The FUSE adapter: serves a merged [`Tree`] read-only, reading file bytes through the layers'
//! [`LayerReader`]s. It knows nothing of registries or tar; every handler is a lookup in the
//! frozen tree plus, for `read`, a call into the span reader.
//!
//! What virtio-fs needs of a root filesystem holds by construction: inode numbers come from the
//! tree (stable across remounts, shared by hardlinks), a directory's readdir offset `n` is always
//! its `n`th entry (`.` and `..` first), and xattrs are served exactly as the layer had them.
//! Since nothing changes under a mount, the kernel may cache entries, attributes, directory
//! listings and file pages for as long as it likes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request,
};

use crate::index::{EntryKind, LayerReader, SpanCache};
use crate::tree::{Inode, NodeData, Tree, ROOT_INO};

/// The tree never changes while mounted: let the kernel cache lookups and attributes long.
const TTL: Duration = Duration::from_secs(24 * 3600);
const BLOCK_SIZE: u32 = 4096;

/// A read-only filesystem over one image.
pub struct ImageFs {
    shared: Arc<Shared>,
    statfs: (u64, u64),
    /// The kernel agreed to skip open/opendir (and release) round trips: with no open support
    /// it caches pages and directory listings by default, which suits an immutable tree.
    no_open: bool,
    /// Threads that answer reads whose bytes must first be fetched, so a FUSE worker never
    /// waits on the network (libkrun serves virtio-fs from one worker: a stuck read there
    /// would freeze the guest's whole filesystem).
    waiting_reads: JobThreads,
    /// Threads that answer reads which must first decompress (a span not cached, or not
    /// inflated that far), so that one VM's cold reads never hold the FUSE workers that answer
    /// every VM's lookups.
    decoding_reads: JobThreads,
    /// Serve the image's `trusted.overlay.*` xattrs escaped (`trusted.overlay.overlay.*`): this
    /// tree is the lower layer of a kernel overlay, which would otherwise take them for its
    /// own (an image built from an overlay upper carries them); the overlay (6.7+) unescapes
    /// them, so the guest sees the image's xattrs as they are.
    escape_overlay_xattrs: bool,
    /// Whether the kernel checks modes against the host's credentials (host root's mounts).
    check_permissions: bool,
    /// What the kernel offered at FUSE_INIT (a restarted server replays it, see
    /// [`crate::mount::shared`]).
    offered: Arc<std::sync::atomic::AtomicU64>,
}

const OVERLAY_XATTR: &[u8] = b"trusted.overlay.";
const ESCAPED_OVERLAY_XATTR: &[u8] = b"trusted.overlay.overlay.";

/// What handlers on any thread read from.
pub struct Shared {
    tree: Tree,
    layers: Vec<LayerReader>,
    cache: Arc<SpanCache>,
    /// Some layer is fetched lazily (else no read ever waits, and reads skip the check).
    may_fetch: bool,
    /// Jobs decompressing ahead of the reads (see [`Shared::claim_ahead`]), on `ahead`.
    ahead_jobs: std::sync::atomic::AtomicUsize,
    /// Threads for those jobs, apart from the decoding reads' so that a read never queues
    /// behind them.
    ahead: JobThreads,
    /// Where the reads it follows are: layer (top 16 bits) and stream offset.
    ahead_at: std::sync::atomic::AtomicU64,
}

impl std::ops::Deref for ImageFs {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// Threads that run the jobs handed to them, off the FUSE workers: reads that first wait for
/// bytes to be fetched or decompressed here, copy-ups in the user's writable layer.
pub(crate) struct JobThreads {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

/// Threads for waiting reads: a read waits at most its deadline, so this many slow reads at
/// once is plenty; more queue.
const WAITING_READ_THREADS: usize = 8;
/// Threads for decompressing reads: decompression is CPU work, so one per CPU (at least two,
/// so one long span does not hold up the rest).
fn decoding_read_threads() -> usize {
    crate::cpus()
}

/// Jobs decompressing ahead at once: one per CPU (at least two). A reader walking the image in
/// order (`tar`, `cp -a`, a first boot) reads one file at a time, and inflating is most of the
/// work: each job takes the next span not taken, so every core inflates while the reader
/// copies, instead of one core inflating while the other waits for it.
fn ahead_jobs() -> usize {
    decoding_read_threads()
}

impl JobThreads {
    /// `threads` threads named `bux-fuse-<name>-<n>`; more jobs than that queue.
    pub(crate) fn new(name: &str, threads: usize) -> JobThreads {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for n in 0..threads {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("bux-fuse-{name}-{n}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // the filesystem is gone
                    }
                });
        }
        JobThreads {
            tx: std::sync::Mutex::new(tx),
        }
    }

    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) {
        let _ = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Box::new(job));
    }
}

impl ImageFs {
    /// Serves `tree`, reading file bytes through `layers` (indexed like `tree.layers`).
    pub fn new(tree: Tree, layers: Vec<LayerReader>, cache: Arc<SpanCache>) -> ImageFs {
        // Both from the tree's header: a mount does not walk the inodes.
        let blocks = tree.blocks_4k();
        let files = tree.inode_count();
        ImageFs {
            shared: Arc::new(Shared {
                may_fetch: layers.iter().any(LayerReader::may_fetch),
                tree,
                layers,
                cache,
                ahead_jobs: Default::default(),
                ahead: JobThreads::new("ahead", ahead_jobs()),
                ahead_at: Default::default(),
            }),
            statfs: (blocks, files),
            no_open: false,
            waiting_reads: JobThreads::new("wait", WAITING_READ_THREADS),
            decoding_reads: JobThreads::new("decode", decoding_read_threads()),
            escape_overlay_xattrs: false,
            check_permissions: true,
            offered: Default::default(),
        }
    }

    /// Leaves permission checks to whoever uses the mount (a VM guest enforces the image's
    /// owners and modes itself): no POSIX ACL support, which would make the kernel check modes
    /// against the host's credentials (FUSE_POSIX_ACL implies `default_permissions`).
    pub fn without_permission_checks(mut self) -> ImageFs {
        self.check_permissions = false;
        self
    }

    /// Where the capabilities the kernel offers at FUSE_INIT are stored once it has.
    pub(crate) fn offered_capabilities(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.offered.clone()
    }

    /// Serves `trusted.overlay.*` xattrs escaped, for a tree under a kernel overlay.
    pub fn escaping_overlay_xattrs(mut self) -> ImageFs {
        self.escape_overlay_xattrs = true;
        self
    }

    /// The image's xattr name for a name asked through this mount (`None`: not one of ours).
    fn image_xattr_name<'a>(&self, asked: &'a [u8]) -> Option<std::borrow::Cow<'a, [u8]>> {
        if !self.escape_overlay_xattrs {
            return Some(asked.into());
        }
        if let Some(rest) = asked.strip_prefix(ESCAPED_OVERLAY_XATTR) {
            return Some([OVERLAY_XATTR, rest].concat().into());
        }
        if asked.starts_with(OVERLAY_XATTR) {
            return None; // the overlay's own attributes: the image has none
        }
        Some(asked.into())
    }

    /// The name an image xattr is listed under through this mount.
    fn listed_xattr_name<'a>(&self, name: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        match name.strip_prefix(OVERLAY_XATTR) {
            Some(rest) if self.escape_overlay_xattrs => {
                [ESCAPED_OVERLAY_XATTR, rest].concat().into()
            }
            _ => name.into(),
        }
    }
}

/// Files up to this size are fetched whole on their first read (a file read at all is
/// usually read in full); larger ones this far past the read.
const FETCH_AHEAD: u64 = 4 << 20;

impl Shared {
    fn inode(&self, ino: INodeNo) -> Result<Inode<'_>, Errno> {
        self.tree.inode(ino.0).ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64, i: Inode<'_>) -> FileAttr {
        let kind = file_type(i.kind);
        let mtime = to_system_time(i.mtime, i.mtime_nsec);
        let blocks = match i.kind {
            EntryKind::File => match &i.data {
                NodeData::Sparse { extents, .. } => {
                    extents.iter().map(|e| e.len).sum::<u64>().div_ceil(512)
                }
                _ => i.size.div_ceil(512),
            },
            EntryKind::Dir => (BLOCK_SIZE / 512) as u64,
            _ => 0,
        };
        FileAttr {
            ino: INodeNo(ino),
            size: i.size,
            blocks,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (i.mode & 0o7777) as u16,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: encode_dev(i.dev_major, i.dev_minor),
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn read_file(&self, i: Inode<'_>, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        self.read_file_with(i, offset, size, true)
    }

    /// With `decode` false, reads only what is decompressed already, else fails with `EAGAIN`
    /// (see [`LayerReader::read_decoded_at`]).
    fn read_file_with(
        &self,
        i: Inode<'_>,
        offset: u64,
        size: u32,
        decode: bool,
    ) -> Result<Vec<u8>, Errno> {
        if offset >= i.size || !matches!(i.data, NodeData::File { .. } | NodeData::Sparse { .. }) {
            return Ok(Vec::new());
        }
        let len = (size as u64).min(i.size - offset) as usize;
        let mut buf = vec![0u8; len];
        self.fill_file(i, offset, &mut buf, decode)?;
        Ok(buf)
    }

    /// Fills `buf` (zeroed) with `i`'s bytes at `offset`, holes left as they are; the caller
    /// keeps it within the file.
    fn fill_file(
        &self,
        i: Inode<'_>,
        offset: u64,
        buf: &mut [u8],
        decode: bool,
    ) -> Result<(), Errno> {
        match &i.data {
            NodeData::File {
                layer,
                offset: base,
            } => self.read_layer(*layer, base + offset, buf, decode),
            NodeData::Sparse { layer, extents } => {
                // Holes stay zero; copy the parts of extents that overlap [offset, offset+len).
                let end = offset + buf.len() as u64;
                let first = extents.partition_point(|e| e.file_off + e.len <= offset);
                for e in extents.iter_from(first).take_while(|e| e.file_off < end) {
                    let from = e.file_off.max(offset);
                    let to = (e.file_off + e.len).min(end);
                    let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                    let at = e.stream_off + (from - e.file_off);
                    self.read_layer(*layer, at, dst, decode)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// After a read of `ino` up to `end`: whether to start a job decompressing ahead in its
    /// layer's stream (see [`LayerReader::span_ahead`]). Records where the reads are and
    /// claims a job (at most [`ahead_jobs`] at once); the caller runs
    /// [`Shared::inflate_ahead`] on an ahead thread.
    fn claim_ahead(&self, ino: INodeNo, end: u64) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
        let Ok(i) = self.inode(ino) else { return false };
        let NodeData::File { layer, offset } = i.data else {
            return false;
        };
        let pos = offset + end.min(i.size).saturating_sub(1);
        let Some(reader) = self.layers.get(layer as usize) else {
            return false;
        };
        let at = (layer as u64) << 48 | pos.min((1 << 48) - 1);
        // Every read comes here: while every job runs, it only learns where the reads are.
        let max = ahead_jobs();
        if self.ahead_jobs.load(Acquire) >= max {
            self.ahead_at.store(at, Relaxed);
            return false;
        }
        if reader.span_ahead(&self.cache, pos).is_none() {
            return false;
        }
        self.ahead_at.store(at, Relaxed);
        self.ahead_jobs
            .fetch_update(AcqRel, Acquire, |n| (n < max).then_some(n + 1))
            .is_ok()
    }

    /// Starts a job decompressing ahead (claimed by [`Shared::claim_ahead`]).
    fn start_ahead(self: &Arc<Self>) {
        let shared = self.clone();
        self.ahead.run(move || shared.inflate_ahead());
    }

    /// Decompresses ahead of the reads, following them as they go on, until nothing is left
    /// to do ahead of where they are (each span once: the jobs take the first not taken).
    fn inflate_ahead(&self) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        loop {
            let at = self.ahead_at.load(Relaxed);
            let (layer, pos) = ((at >> 48) as usize, at & ((1 << 48) - 1));
            let Some(reader) = self.layers.get(layer) else {
                break;
            };
            let Some(span) = reader.span_ahead(&self.cache, pos) else {
                break;
            };
            if let Err(e) = reader.inflate_span(&self.cache, span) {
                tracing::debug!("decompressing ahead in layer {layer}: {e}");
                break;
            }
        }
        self.ahead_jobs.fetch_sub(1, Release);
    }

    fn read_layer(&self, layer: u32, at: u64, buf: &mut [u8], decode: bool) -> Result<(), Errno> {
        let reader = self.layers.get(layer as usize).ok_or(Errno::EIO)?;
        let read = match decode {
            true => reader.read_at(&self.cache, at, buf),
            false => reader.read_decoded_at(&self.cache, at, buf),
        };
        let n = read.map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Errno::EAGAIN;
            }
            tracing::error!("read of layer {layer} at {at}: {e}");
            Errno::EIO
        })?;
        if n < buf.len() {
            tracing::error!("layer {layer} ends before offset {}", at + buf.len() as u64);
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// The layer stream ranges a read of `i` at `offset` needs, and those worth fetching with
    /// it (the rest of a small file, a window ahead in a large one).
    fn stream_ranges(
        &self,
        i: Inode<'_>,
        offset: u64,
        size: u32,
    ) -> Vec<(u32, std::ops::Range<u64>, std::ops::Range<u64>)> {
        let end = offset.saturating_add(size as u64).min(i.size);
        if offset >= end {
            return Vec::new();
        }
        let ahead = if i.size <= FETCH_AHEAD {
            i.size
        } else {
            end.saturating_add(FETCH_AHEAD).min(i.size)
        };
        match &i.data {
            NodeData::File {
                layer,
                offset: base,
            } => {
                let from = if i.size <= FETCH_AHEAD { 0 } else { offset };
                vec![(*layer, base + offset..base + end, base + from..base + ahead)]
            }
            NodeData::Sparse { layer, extents } => extents
                .iter()
                .filter(|e| e.file_off < end && e.file_off + e.len > offset)
                .map(|e| {
                    let from = e.file_off.max(offset);
                    let to = (e.file_off + e.len).min(end);
                    let r = e.stream_off + (from - e.file_off)..e.stream_off + (to - e.file_off);
                    (*layer, r.clone(), r)
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether a read can be answered without waiting for a fetch.
    fn is_local(&self, i: Inode<'_>, offset: u64, size: u32) -> bool {
        !self.may_fetch
            || self
                .stream_ranges(i, offset, size)
                .into_iter()
                .all(|(l, need, _)| self.layers.get(l as usize).is_none_or(|r| r.is_local(need)))
    }

    /// A read that may wait on the network: fetch what it needs (and what is worth fetching
    /// with it) in one go, then read.
    fn fetch_and_read(&self, ino: INodeNo, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let i = self.inode(ino)?;
        self.fetch_for(ino, i, offset, size)?;
        self.read_file(i, offset, size)
    }

    /// Fetches what a read of `i` needs, and what is worth fetching with it.
    fn fetch_for(&self, ino: INodeNo, i: Inode<'_>, offset: u64, size: u32) -> Result<(), Errno> {
        for (l, _, ahead) in self.stream_ranges(i, offset, size) {
            if let Some(r) = self.layers.get(l as usize) {
                // A failed look-ahead is not the read's failure (the read asks for less),
                // except a timeout: the read has waited its deadline already.
                if let Err(e) = r.prefetch(ahead) {
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        tracing::warn!("read of inode {} at {offset}: {e}", ino.0);
                        return Err(Errno::EIO);
                    }
                    tracing::debug!("prefetch for inode {}: {e}", ino.0);
                }
            }
        }
        Ok(())
    }

    /// A directory's entries as (offset of the next entry, inode, name): `.` and `..` first,
    /// then the children in name order, so offset `n` always resumes after the `n`th entry.
    fn dir_entries(
        &self,
        ino: u64,
        i: Inode<'_>,
        offset: u64,
    ) -> impl Iterator<Item = (u64, u64, &[u8])> + '_ {
        let dots = [(ino, &b"."[..]), (i.parent, &b".."[..])];
        let children = self.tree.children(ino);
        // Resume at the offset directly (no walk over the entries before it).
        let from = offset.min(usize::MAX as u64) as usize;
        let dots_from = from.min(2);
        let children_from = from.saturating_sub(2).min(children.len());
        dots.into_iter()
            .skip(dots_from)
            .chain(children.iter_from(children_from).map(|d| (d.ino, d.name)))
            .enumerate()
            .map(move |(k, (ino, name))| ((from + k) as u64 + 1, ino, name))
    }
}

/// What a writable layer served over this tree reads of it (see [`crate::upper`]).
impl ImageFs {
    /// The tree served.
    pub(crate) fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Attributes of tree inode `ino`, reported with inode number `as_ino`.
    pub(crate) fn lower_attr(&self, ino: u64, as_ino: u64) -> Option<FileAttr> {
        let i = self.tree.inode(ino)?;
        let mut a = self.attr(ino, i);
        a.ino = INodeNo(as_ino);
        Some(a)
    }

    /// Runs `job` on the threads of reads that decompress (`wait` false) or wait for lazily
    /// fetched bytes (`wait` true), off the FUSE workers.
    pub(crate) fn run_read(&self, wait: bool, job: impl FnOnce() + Send + 'static) {
        match wait {
            true => self.waiting_reads.run(job),
            false => self.decoding_reads.run(job),
        }
    }

    /// Whether a read of tree inode `ino` can be answered without waiting for a fetch.
    pub(crate) fn lower_is_local(&self, ino: u64, offset: u64, size: u32) -> bool {
        self.inode(INodeNo(ino))
            .is_ok_and(|i| self.is_local(i, offset, size))
    }

    /// Fills `buf` with tree inode `ino`'s bytes at `offset` (all within the file), waiting for
    /// lazily fetched bytes as a read does: [`ImageFs::read_lower`] without a buffer of its own.
    pub(crate) fn read_lower_into(
        &self,
        ino: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Errno> {
        let i = self.inode(INodeNo(ino))?;
        let size = u32::try_from(buf.len()).map_err(|_| Errno::EINVAL)?;
        if offset.saturating_add(size as u64) > i.size {
            tracing::error!("inode {ino} ends before offset {}", offset + size as u64);
            return Err(Errno::EIO);
        }
        if !self.is_local(i, offset, size) {
            self.fetch_for(INodeNo(ino), i, offset, size)?;
        }
        buf.fill(0);
        self.fill_file(i, offset, buf, true)
    }

    /// All of tree inode `ino`'s bytes if they can be had without waiting: every layer it
    /// lies in stored whole, and its bytes kept uncompressed or decoded already (else
    /// `EAGAIN`: no fetch, no inflate).
    pub(crate) fn read_lower_at_once(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let i = self.inode(INodeNo(ino))?;
        let size = u32::try_from(i.size).map_err(|_| Errno::EFBIG)?;
        if !self.is_local(i, 0, size) {
            return Err(Errno::EAGAIN);
        }
        self.read_file_with(i, 0, size, false)
    }

    /// Bytes of tree inode `ino`, waiting for lazily fetched bytes as a read does.
    pub(crate) fn read_lower(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let i = self.inode(INodeNo(ino))?;
        if self.is_local(i, offset, size) {
            self.read_file(i, offset, size)
        } else {
            self.fetch_and_read(INodeNo(ino), offset, size)
        }
    }

    pub(crate) fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(data.len() as u32);
        } else if (size as usize) < data.len() {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(data);
        }
    }
}

/// `SEEK_DATA` / `SEEK_HOLE` over a file's extents (a non-sparse file is one extent).
fn seek_data_hole(i: Inode<'_>, off: u64, whence: i32) -> Result<u64, Errno> {
    if off >= i.size {
        return Err(Errno::ENXIO);
    }
    let whole = [crate::index::Extent {
        file_off: 0,
        len: i.size,
        stream_off: 0,
    }];
    let extents: Vec<crate::index::Extent> = match &i.data {
        NodeData::Sparse { extents, .. } => extents.iter().collect(),
        _ => whole.to_vec(),
    };
    match whence {
        libc::SEEK_DATA => extents
            .iter()
            .find(|e| e.file_off + e.len > off)
            .map(|e| e.file_off.max(off))
            .ok_or(Errno::ENXIO),
        libc::SEEK_HOLE => {
            let mut pos = off;
            for e in extents.iter().filter(|e| e.file_off + e.len > off) {
                if e.file_off > pos {
                    break; // a hole before this extent
                }
                pos = e.file_off + e.len;
            }
            Ok(pos.min(i.size))
        }
        _ => Err(Errno::EINVAL),
    }
}

pub(crate) fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::File | EntryKind::Hardlink => FileType::RegularFile,
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::Char => FileType::CharDevice,
        EntryKind::Block => FileType::BlockDevice,
        EntryKind::Fifo => FileType::NamedPipe,
    }
}

/// The kernel's 32-bit device encoding (`new_encode_dev`).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// A tar time as a `SystemTime`, clamped to what the platform can represent (a hostile PAX
/// mtime of ±2^63 seconds must not panic the server).
fn to_system_time(secs: i64, nsec: u32) -> SystemTime {
    let nsec = Duration::from_nanos(nsec.min(999_999_999) as u64);
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    t.and_then(|t| t.checked_add(nsec)).unwrap_or(if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 / 2)
    } else {
        UNIX_EPOCH
    })
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Every listing with attributes, not the kernel's adaptive choice
        // (`READDIRPLUS_AUTO`), which lists a directory's later batches without them and
        // then looks each entry up: 2,774 lookups in a user's cold `tar` of the large image.
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_EXPORT_SUPPORT,
        ] {
            let _ = config.add_capabilities(cap);
        }
        if self.check_permissions {
            // The kernel then enforces the image's POSIX ACLs (system.posix_acl_* xattrs).
            let _ = config.add_capabilities(InitFlags::FUSE_POSIX_ACL);
        }
        let _ = config
            .set_max_readahead(1 << 20)
            .or_else(|max| config.set_max_readahead(max));
        // Answering ENOSYS to open/opendir is all "no open" takes, where the kernel offers it.
        let caps = config.capabilities();
        self.offered
            .store(caps.bits(), std::sync::atomic::Ordering::Relaxed);
        self.no_open = caps.contains(InitFlags::FUSE_NO_OPEN_SUPPORT)
            && caps.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // "." and ".." come from NFS export and open_by_handle_at (EXPORT_SUPPORT): an inode
        // reached by handle finds its parent through "..".
        self.cache
            .stats
            .lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let found = match name.as_bytes() {
            b"." => self.tree.inode(parent.0).map(|_| parent.0),
            b".." => self.tree.inode(parent.0).map(|i| i.parent),
            n => self.tree.lookup(parent.0, n),
        };
        match found {
            Some(ino) => match self.tree.inode(ino) {
                Some(i) => reply.entry(&TTL, &self.attr(ino, i), Generation(0)),
                None => reply.error(Errno::EIO),
            },
            // A name that is not there never will be (the tree is immutable): answer with a
            // negative entry (inode 0) the kernel caches, so the probes of ld.so and Python's
            // import path cost one round trip per name, not one per probe.
            None if !matches!(name.as_bytes(), b"." | b"..")
                && self
                    .tree
                    .inode(parent.0)
                    .is_some_and(|p| p.kind == EntryKind::Dir) =>
            {
                let Some(root) = self.tree.inode(ROOT_INO) else {
                    return reply.error(Errno::EIO);
                };
                let mut attr = self.attr(ROOT_INO, root);
                attr.ino = INodeNo(0);
                reply.entry(&TTL, &attr, Generation(0))
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inode(ino) {
            Ok(i) => reply.attr(&TTL, &self.attr(ino.0, i)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inode(ino).map(|i| i.data) {
            Ok(NodeData::Symlink(target)) => reply.data(target),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY) || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        if self.no_open {
            // The mount is read-only (MS_RDONLY): the VFS refuses writable opens before us.
            return reply.error(Errno::ENOSYS);
        }
        match self.inode(ino) {
            Ok(i) if i.kind == EntryKind::Dir => reply.error(Errno::EISDIR),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let i = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if !self.is_local(i, offset, size) {
            let shared = self.shared.clone();
            return self.waiting_reads.run(move || {
                match shared.fetch_and_read(ino, offset, size) {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(e),
                }
            });
        }
        let end = offset + size as u64;
        match self.read_file_with(i, offset, size, false) {
            Ok(data) => {
                reply.data(&data);
                if self.shared.claim_ahead(ino, end) {
                    self.shared.start_ahead();
                }
            }
            // It must decompress first: on a decoding thread, not this FUSE worker.
            Err(Errno::EAGAIN) => {
                let shared = self.shared.clone();
                self.decoding_reads.run(move || {
                    match shared
                        .inode(ino)
                        .and_then(|i| shared.read_file(i, offset, size))
                    {
                        Ok(data) => reply.data(&data),
                        Err(e) => return reply.error(e),
                    }
                    if shared.claim_ahead(ino, end) {
                        shared.start_ahead();
                    }
                })
            }
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open {
            return reply.error(Errno::ENOSYS);
        }
        match self.inode(ino) {
            Ok(i) if i.kind == EntryKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let i = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        for (next, child, name) in self.dir_entries(ino.0, i, offset) {
            let kind = self
                .tree
                .inode(child)
                .map(|c| file_type(c.kind))
                .unwrap_or(FileType::RegularFile);
            if reply.add(INodeNo(child), next, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let i = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        for (next, child, name) in self.dir_entries(ino.0, i, offset) {
            let Some(c) = self.tree.inode(child) else {
                continue;
            };
            let attr = self.attr(child, c);
            if reply.add(
                INodeNo(child),
                next,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let i = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        match seek_data_hole(i, offset.max(0) as u64, whence) {
            Ok(off) => reply.offset(off as i64),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, files) = self.statfs;
        reply.statfs(blocks, 0, 0, files, 0, BLOCK_SIZE, 255, BLOCK_SIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let i = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let Some(name) = self.image_xattr_name(name.as_bytes()) else {
            return reply.error(Errno::NO_XATTR);
        };
        match i.xattrs.get(&name) {
            Some(v) => Self::xattr_reply(v, size, reply),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let i = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (k, _) in i.xattrs {
            names.extend_from_slice(&self.listed_xattr_name(k));
            names.push(0);
        }
        Self::xattr_reply(&names, size, reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are checked by the kernel (default_permissions); only writes differ.
        match self.inode(ino) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        // makedev(8, 1) → 0x801; a minor above 255 spills into the high bits.
        assert_eq!(encode_dev(8, 1), 0x801);
        assert_eq!(encode_dev(1, 0x12345), 0x45 | (1 << 8) | (0x123 << 20));
    }

    #[test]
    fn extreme_times_do_not_panic() {
        for secs in [i64::MIN, i64::MIN + 1, i64::MAX, -1, 0] {
            let _ = to_system_time(secs, u32::MAX);
        }
    }

    #[test]
    fn times_before_the_epoch() {
        let t = to_system_time(-2, 500_000_000);
        assert_eq!(
            UNIX_EPOCH.duration_since(t).unwrap(),
            Duration::from_millis(1500)
        );
    }
}
