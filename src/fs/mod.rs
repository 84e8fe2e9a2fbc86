//! The FUSE adapter: serves a merged [`Tree`] read-only, reading file bytes through the layers'
//! [`LayerReader`]s. It knows nothing of registries or tar; every handler is a lookup in the
//! frozen tree plus, for `read`, a call into the span reader.
//!
//! What virtio-fs needs of a root filesystem holds by construction: inode numbers come from the
//! tree (stable across remounts, shared by hardlinks), a directory's readdir offset `n` is always
//! its `n`th entry (`.` and `..` first), and xattrs are served exactly as the layer had them.
//! Since nothing changes under a mount, the kernel may cache entries, attributes, directory
//! listings and file pages for as long as it likes.
//!
//! Here: the handlers and attributes; `read` the read path (a file's bytes from the layers,
//! decompression ahead of a walk, fetched bytes waited for off the FUSE workers).

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

mod read;
pub(crate) use read::JobThreads;
use read::{ahead_jobs, decoding_read_threads, WAITING_READ_THREADS};

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
