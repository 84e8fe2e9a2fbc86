//! Read-only memory maps of store files (merged trees, access tables): what every process of
//! every mount reads, the page cache holds once, and a process pays only for the pages it
//! touches.

/// Bytes of a file, mapped read-only; or, for an empty file or one just built, held in memory.
pub(crate) enum Mapped {
    Map(*const u8, usize),
    Owned(Vec<u8>),
}

// SAFETY: the map is read-only and owned by this value, which unmaps it on drop.
unsafe impl Send for Mapped {}
// SAFETY: as above; nothing writes through the pointer.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Maps the first `len` bytes of `file`.
    fn map(file: &std::fs::File, len: usize) -> std::io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Ok(Mapped::Owned(Vec::new()));
        }
        // SAFETY: a fresh read-only mapping of a file we hold open; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped::Map(p as *const u8, len))
    }

    /// Maps the whole file at `path`.
    pub(crate) fn open(path: &std::path::Path) -> std::io::Result<Mapped> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Mapped::map(&file, len as usize)
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            // SAFETY: `p` maps `len` readable bytes for as long as `self` lives. The store only
            // replaces these files by rename, so a mapped file is never truncated under us.
            Mapped::Map(p, len) => unsafe { std::slice::from_raw_parts(*p, *len) },
            Mapped::Owned(v) => v,
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if let Mapped::Map(p, len) = *self {
            // SAFETY: unmaps exactly what `map` mapped, once.
            unsafe { libc::munmap(p as *mut libc::c_void, len) };
        }
    }
}
