//! The disk served: a read-only FUSE directory holding one file, [`DISK_FILE`], whose bytes are
//! the image's [`Disk`]. A VMM opens it as a block device; every VM of an image opens the same
//! file, so the host keeps one page cache for all of them.
//!
//! Reads of the metadata are answered from memory on the FUSE worker; reads of file data go to
//! the image's read threads (decompressing ones, and ones that wait for lazily fetched bytes,
//! [`ImageFs::run_read`]), so that a read waiting on the network never holds up the others.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};

use super::{Disk, Piece};
use crate::fs::ImageFs;

/// The one file of a disk mount.
pub const DISK_FILE: &str = "root.erofs";

const ROOT: u64 = 1;
const FILE: u64 = 2;
/// Nothing changes under the mount: the kernel may cache for as long as it likes.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// A FUSE filesystem serving an image as `root.erofs`.
pub struct DiskFs {
    image: Arc<ImageFs>,
    disk: Arc<Disk>,
    uid: u32,
    gid: u32,
    /// The files' times: the image's root directory's, so that they too are the same in
    /// every mount of the image.
    mtime: SystemTime,
}

impl DiskFs {
    /// Serves `image`'s tree as a disk, owned by the calling user; fails for a tree EROFS
    /// cannot hold.
    pub fn new(image: ImageFs) -> Result<DiskFs, String> {
        let disk = Disk::new(image.tree())?;
        let root = image.lower_attr(crate::tree::ROOT_INO, ROOT);
        Ok(DiskFs {
            image: Arc::new(image),
            disk: Arc::new(disk),
            // SAFETY: getuid and getgid have no preconditions.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            mtime: root.map_or(SystemTime::UNIX_EPOCH, |a| a.mtime),
        })
    }

    /// The image's length in bytes.
    pub fn len(&self) -> u64 {
        self.disk.len()
    }

    /// Whether the image is empty (never).
    pub fn is_empty(&self) -> bool {
        self.disk.is_empty()
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o555, 4096, 2),
            _ => (FileType::RegularFile, 0o444, self.disk.len(), 1),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.mtime,
            crtime: self.mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// Fills `buf` with `pieces` of the disk, reading files' data through `image` (which fetches
/// lazily fetched bytes first).
pub(super) fn read_pieces(
    disk: &Disk,
    image: &ImageFs,
    pieces: &[Piece],
    buf: &mut [u8],
) -> std::io::Result<usize> {
    disk.read_pieces(pieces, buf, &mut |ino, from, out| {
        image
            .read_lower_into(ino, from, out)
            .map_err(|e| std::io::Error::from_raw_os_error(e.code()))
    })
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config
            .set_max_readahead(1 << 20)
            .or_else(|max| config.set_max_readahead(max));
        // Recorded for a worker of the image's disk server that takes over the connection.
        self.image.offered_capabilities().store(
            config.capabilities().bits(),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent.0, name.to_str()) {
            (ROOT, Some(DISK_FILE)) => reply.entry(&TTL, &self.attr(FILE), Generation(0)),
            (ROOT, _) => reply.error(Errno::ENOENT),
            _ => reply.error(Errno::ENOTDIR),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            ROOT | FILE => reply.attr(&TTL, &self.attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY) || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        match ino.0 {
            FILE => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
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
        if ino.0 != FILE {
            return reply.error(Errno::EISDIR);
        }
        let pieces = self.disk.pieces(offset, size as u64);
        let len: u64 = pieces
            .iter()
            .map(|p| match p {
                Piece::Head(r) => r.len() as u64,
                Piece::File { len, .. } => *len,
                Piece::Zero(n) => *n,
            })
            .sum();
        let mut local = true;
        let mut metadata_only = true;
        for p in &pieces {
            if let Piece::File {
                ino,
                offset,
                len: n,
            } = p
            {
                metadata_only = false;
                local &= self.image.lower_is_local(*ino, *offset, *n as u32);
            }
        }
        let (disk, image) = (self.disk.clone(), self.image.clone());
        let job = move || {
            let mut buf = vec![0u8; len as usize];
            match read_pieces(&disk, &image, &pieces, &mut buf) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))),
            }
        };
        match (metadata_only, local) {
            (true, _) => job(),
            (false, local) => self.image.run_read(!local, job),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino.0 {
            ROOT => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            _ => reply.error(Errno::ENOTDIR),
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
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, DISK_FILE),
        ];
        for (k, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(self.disk.len() / 4096, 0, 0, 2, 0, 4096, 255, 4096);
    }
}
