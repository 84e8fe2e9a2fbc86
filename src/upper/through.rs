//! Reads of unmodified image files through the image's shared read-only mount.
//!
//! A user's writable mount is a FUSE mount of its own, and the kernel keeps page cache per
//! superblock: eight VMs of one image would hold eight copies of every page they read. So
//! image files are read from the same file in the image's shared mount
//! (`$STORE/shared/<image>/mnt`, [`crate::mount::shared`]), whose one page cache all of the
//! user's mounts of the image share, and this mount keeps their pages only while they are
//! read (`pages`). Its server decodes each span once for all of them.
//! A read the shared mount cannot serve (its server gone) is decoded here instead; one it
//! holds up (its server hung) is ended by ending the server (`watch`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::watch::Reads;

/// Files of at most this many bytes are read (and cached) by each mount itself: those a pull
/// keeps whole in the store by default (`--small-files`), 93% of the large test image's files,
/// 9.2% of its bytes. Read through the shared mount, a file costs two FUSE hops and, cold, a
/// READ and a GETATTR after its OPEN; read here, its bytes are handed to the kernel at open
/// from the store's copy (`pushed`), for a few pages of sharing. At 32 KiB (the 805 files
/// between the two: 37.8 MB, 3.5% of the bytes, read through) a user's cold `tar` of that
/// image sent the shared server 6,661 READs, now 5,053, and took 5.2 s, now 4.8 s (alternated,
/// medians of 8). A store pulled keeping fewer (`--small-files 32`, `0`) has the files it does
/// not keep decoded by each mount that reads them, as files of at most 32 KiB were before.
pub const THROUGH_MIN: u64 = crate::index::small::SMALL_MAX;

/// After a read the shared mount failed, reads go around it this long (its server gone, say:
/// no path walk and failing open per read), then try it again.
pub(super) const SUSPECT: Duration = Duration::from_secs(10);

/// Image files kept open in the shared mount, by image inode.
const OPEN_FILES: usize = 256;

/// How far ahead of a reader walking a file the shared mount is asked to read. This mount's
/// reads are direct (no read-ahead of the kernel's here), so without it each read would wait
/// for the shared server to decode what it asks for, one read after another.
const AHEAD: u64 = 2 << 20;

/// What one `POSIX_FADV_WILLNEED` reads at most: the file's read-ahead window, which is the
/// kernel's 128 KiB on a FUSE mount whose owner cannot raise it (sysfs is root's), doubled for
/// a file marked as read in order (`POSIX_FADV_SEQUENTIAL`, as each is here). Each window is
/// one request to the shared server: a third fewer of them in a user's cold `tar` of the large
/// image (10,257 → 6,661).
const WINDOW: u64 = 256 << 10;

/// An image file open in the shared mount.
struct Opened {
    file: File,
    /// Where the last read ended: a read starting there walks the file.
    last_end: std::sync::atomic::AtomicU64,
    /// Where the read-ahead asked for ends.
    ahead: std::sync::atomic::AtomicU64,
}

/// The image's shared mount, read through.
pub struct Through {
    mnt: PathBuf,
    /// A shared lock on the server's `readers` file: the server serves while one is held
    /// (this mount is not in the mount table as standing on it).
    _holder: File,
    files: Mutex<lru::LruCache<u64, Arc<Opened>>>,
    /// The kernel cannot map files opened with direct I/O shared (before Linux 6.6): then
    /// files are read through only where this mount can cache them (`pages`).
    no_direct_mmap: AtomicBool,
    /// Reads under way, which a thread of its own watches (`watch`).
    reads: Arc<Reads>,
}

impl Through {
    /// Reads through the shared mount at `mnt`; `holder` keeps its server up while held.
    pub fn new(mnt: PathBuf, holder: File) -> Through {
        let n = std::num::NonZeroUsize::new(OPEN_FILES).expect("not zero");
        let reads = Reads::watched(mnt.clone());
        Through {
            mnt,
            _holder: holder,
            files: Mutex::new(lru::LruCache::new(n)),
            no_direct_mmap: AtomicBool::new(false),
            reads,
        }
    }

    /// The kernel cannot map files opened with direct I/O shared.
    pub fn cannot_map_direct(&self) {
        self.no_direct_mmap.store(true, Ordering::Relaxed);
    }

    /// Whether files opened with direct I/O can be mapped shared.
    pub fn maps_direct(&self) -> bool {
        !self.no_direct_mmap.load(Ordering::Relaxed)
    }

    /// Whether files are read through the shared mount now: no read failed there in the
    /// last [`SUSPECT`].
    pub fn usable(&self) -> bool {
        let failed = *self.reads.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.is_none_or(|t| t.elapsed() > SUSPECT)
    }

    /// Up to `size` bytes at `offset` of image inode `ino`, whose path in the image `path`
    /// gives: `None` if the shared mount does not serve it (its server gone, say).
    pub fn read(
        &self,
        ino: u64,
        path: impl FnOnce() -> Option<Vec<u8>>,
        offset: u64,
        size: u32,
    ) -> Option<Vec<u8>> {
        if !self.usable() {
            return None;
        }
        let under_way = self.reads.start();
        let Some(f) = self.file(ino, path) else {
            self.failed();
            return None;
        };
        f.read_ahead(offset, size);
        match super::disk::read_at_most(&f.file, offset, size) {
            Ok(buf) => {
                self.reads.answered(under_way.2);
                Some(buf)
            }
            Err(e) => {
                tracing::debug!("reading image inode {ino} through the shared mount: {e}");
                // Opened anew next time (another mount of the image may have started a new
                // server by then).
                self.lock().pop(&ino);
                self.failed();
                None
            }
        }
    }

    fn file(&self, ino: u64, path: impl FnOnce() -> Option<Vec<u8>>) -> Option<Arc<Opened>> {
        if let Some(f) = self.lock().get(&ino) {
            return Some(f.clone());
        }
        let path = path()?;
        let rel = std::ffi::OsStr::from_bytes(path.strip_prefix(b"/").unwrap_or(&path));
        // The path's directories are the image's (no symlinks among them); the file is not a
        // symlink either (only regular files are read).
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.mnt.join(rel))
            .map_err(|e| tracing::debug!("opening {rel:?} in the shared mount: {e}"))
            .ok()?;
        // SAFETY: fadvise on an open descriptor; only advice (doubles its read-ahead window).
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        let f = Arc::new(Opened {
            file: f,
            last_end: 0.into(),
            ahead: 0.into(),
        });
        self.lock().put(ino, f.clone());
        Some(f)
    }

    fn failed(&self) {
        self.reads.failed();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, lru::LruCache<u64, Arc<Opened>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Opened {
    /// Asks the shared mount to read ahead of a reader walking the file (the kernel sends
    /// those reads to the shared server without waiting for them), so that the server
    /// decodes while this mount serves: each time the reader comes within half of [`AHEAD`]
    /// of where the last request ended.
    fn read_ahead(&self, offset: u64, size: u32) {
        let end = offset + size as u64;
        if self.last_end.swap(end, Ordering::Relaxed) != offset {
            return; // not a walk (yet): random reads fetch what they ask, no more
        }
        let ahead = self.ahead.load(Ordering::Relaxed);
        if ahead >= end + AHEAD / 2 {
            return;
        }
        let from = ahead.max(end);
        if self
            .ahead
            .compare_exchange(ahead, from + AHEAD, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return; // another read asked
        }
        // The kernel reads at most the file's read-ahead window (128 KiB on a user's mount) of
        // each request: one per window, each sent to the server on its own, which decodes
        // them on its threads at once.
        for at in (from..from + AHEAD).step_by(WINDOW as usize) {
            // SAFETY: fadvise on an open descriptor; only advice.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    at as i64,
                    WINDOW as i64,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
        }
    }
}
