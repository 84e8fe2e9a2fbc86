//! Reads of small files from a layer's kept bytes (`<digest>.small`, see [`super::small`])
//! instead of its compressed stream.
//!
//! The kernel reads those bytes itself where root's mounts have a metadata image. Everywhere
//! else — an ordinary user's mounts and image server, root's FUSE-only way, disk mounts — a
//! small file's read used to inflate the span holding it (a checkpoint's worth of bytes for a
//! few KiB), on a decoding thread, while the bytes sat uncompressed in the store. Now they are
//! read from there: one `pread` of blocks laid out in stream order, so a walk reads the file
//! in order and the kernel reads ahead of it, and every process reading the layer shares its
//! page cache. What a reader holds: 20 bytes per kept file and the bytes of the files of at
//! most 512 bytes (0.7 MB for the large test image's 12k small files). Layers stored
//! uncompressed (`Access::Tar`) read their stream in place and have none.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::small::{Blocks, Found, SmallIndex};

/// The most of a table a reader holds (its records and tiny files' bytes; the large test
/// image's largest layer holds 0.3 MB): a layer of a great many tiny files (a hostile one) is
/// read through its stream instead, rather than cost every mount process its table.
const HELD_MAX: u64 = 16 << 20;

/// A layer's kept small files, open for reads.
pub struct SmallReads {
    file: std::fs::File,
    table: Blocks,
}

impl SmallReads {
    /// The kept files beside the layer index at `index_path`: `None` if it has none (a layer
    /// pulled with `--small-files 0` or before they were kept, or fetched lazily) or keeps them
    /// in an earlier format (its reads go through the stream, as they did).
    pub fn open(index_path: &Path) -> crate::Result<Option<SmallReads>> {
        let path = super::small::SmallFiles::path(index_path);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(crate::Error::io(format!("reading {}", path.display()), e)),
        };
        let io = |e| crate::Error::io(format!("reading {}", path.display()), e);
        // Only the current format has the bytes in place (an earlier one would be decoded
        // whole here, for nothing).
        let mut head = [0u8; 8];
        if file.read_exact_at(&mut head, 0).is_err() || !SmallIndex::in_blocks(&head) {
            return Ok(None);
        }
        let table = SmallIndex::read_within(index_path, file.try_clone().map_err(io)?, HELD_MAX)?;
        Ok(table.into_blocks().map(|table| SmallReads { file, table }))
    }

    /// Fills `buf` with the stream's bytes at `off` if they lie within one kept file:
    /// `Ok(false)` (nothing read) if they do not.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<bool> {
        match self.table.find(off, buf.len() as u64) {
            None => Ok(false),
            Some(Found::Tiny(bytes)) => {
                buf.copy_from_slice(bytes);
                Ok(true)
            }
            Some(Found::At(at)) => self.file.read_exact_at(buf, at).map(|()| true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::small::SmallFiles;

    #[test]
    fn reads_within_one_kept_file_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.idx");
        let big: Vec<u8> = (0..9000u32).map(|i| (i % 253) as u8).collect();
        let mut s = SmallFiles::default();
        s.push(100, b"tiny file");
        s.push(1000, &big);
        s.push(20_000, b"");
        s.save(&index).unwrap();
        let r = SmallReads::open(&index).unwrap().unwrap();
        let read = |off: u64, len: usize| {
            let mut buf = vec![0u8; len];
            r.read_at(off, &mut buf).unwrap().then_some(buf)
        };
        assert_eq!(read(100, 9).unwrap(), b"tiny file");
        assert_eq!(read(105, 4).unwrap(), b"file", "inside a tiny file");
        assert_eq!(read(1000, 9000).unwrap(), big, "a file in blocks, whole");
        assert_eq!(
            read(1000 + 4095, 10).unwrap(),
            big[4095..4105],
            "across a block"
        );
        assert_eq!(read(1000 + 8990, 10).unwrap(), big[8990..]);
        assert_eq!(read(1000 + 8990, 11), None, "past the file's end");
        assert_eq!(read(99, 2), None, "before a file");
        assert_eq!(read(109, 1), None, "between files");
        assert_eq!(read(10, 1), None, "before the first");
        assert_eq!(read(20_001, 1), None, "past an empty file");
        // No kept files: none to read from.
        assert!(SmallReads::open(&dir.path().join("none.idx"))
            .unwrap()
            .is_none());
    }

    /// A table too large to hold in every mount process (a layer of a great many tiny files)
    /// is refused: that layer's files are read through its stream.
    #[test]
    fn a_table_too_large_to_hold_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.idx");
        let mut s = SmallFiles::default();
        for i in 0..40_000u64 {
            s.push(i * 1024, &[(i % 251) as u8; 500]);
        }
        s.save(&index).unwrap();
        let err = SmallReads::open(&index).err().expect("refused");
        assert!(err.to_string().contains("small"), "{err}");
    }
}
