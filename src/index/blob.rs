//! The one seam between the read path and where a layer's compressed bytes come from.
//!
//! A [`LayerReader`](super::LayerReader) asks its blob for byte ranges of the compressed layer.
//! A stored blob is a plain file: every range is local. A lazily fetched blob (see
//! [`crate::lazy`]) is a sparse file that fills in as ranges are fetched and verified; before
//! decompressing, the reader calls [`Blob::ensure`] for the range it needs. Nothing above the
//! layer reader knows which kind it has.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

/// Compressed bytes of one layer, readable at any offset once [`Blob::ensure`]d.
pub trait Blob: Send + Sync {
    /// Reads at `off` (short only at the end of the blob).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// The blob's size.
    fn len(&self) -> u64;
    /// Whether the blob is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether some range may have to be fetched before it can be read.
    fn may_fetch(&self) -> bool {
        false
    }
    /// Whether `range` can be read without waiting (on the network).
    fn is_local(&self, _range: Range<u64>) -> bool {
        true
    }
    /// Makes `range` readable: fetches and verifies what is missing, waiting at most the
    /// blob's deadline. Errors name the cause (a registry error, a timeout, a bad digest).
    fn ensure(&self, _range: Range<u64>) -> io::Result<()> {
        Ok(())
    }
    /// Says that `range` is about to be read in order: a stored blob starts reading it from
    /// disk now, so that a cold read's disk waits overlap its decompression instead of
    /// alternating with it (a hint: nothing fails).
    fn will_need(&self, _range: Range<u64>) {}
    /// The (zstd-compressed) window of gzip checkpoint `checkpoint`, for layers whose index
    /// keeps windows apart from its checkpoints (`None`: the checkpoint carries its own).
    fn window(&self, _checkpoint: usize) -> io::Result<Option<Vec<u8>>> {
        Ok(None)
    }
}

/// A blob stored whole in the store.
pub struct LocalBlob {
    file: File,
    len: u64,
}

impl LocalBlob {
    /// Opens the file at `path`.
    pub fn open(path: &std::path::Path) -> io::Result<LocalBlob> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(LocalBlob { file, len })
    }
}

impl Blob for LocalBlob {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.read_at(buf, off)
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn will_need(&self, range: Range<u64>) {
        use std::os::fd::AsRawFd;
        let len = range.end.saturating_sub(range.start);
        if len == 0 {
            return;
        }
        // SAFETY: fadvise on a descriptor we own; it reads nothing into our memory.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                range.start as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }
}
