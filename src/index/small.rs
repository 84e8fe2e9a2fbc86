//! Small files' bytes, kept beside a layer's index (`<digest>.small`).
//!
//! Most files of an image are small (56% of the large Debian image's files are under 4 KB, 78%
//! under 16 KiB), and over FUSE each one costs a lookup and a read round trip, and the inflation
//! of a span, however few its bytes. The indexing pass reads every byte of the layer anyway, so
//! it keeps the bytes of each regular file up to [`SMALL_MAX`]; the EROFS metadata image then
//! carries them (see [`crate::tree::erofs`]), and the kernel reads those files without asking
//! FUSE at all.
//!
//! Format: `MAGIC`, then one zstd frame holding the file count (u64 LE), a record per file
//! (its data's offset in the layer's uncompressed stream, u64 LE, and its length, u32 LE), in
//! ascending offset order, then the files' bytes end to end. A layer indexed before this file
//! existed (or fetched lazily) has none: its files are read through FUSE, as before.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::{Error, Result};

/// The largest file whose bytes are kept. Larger files are read through FUSE, where one
/// round trip brings up to 1 MiB.
pub const SMALL_MAX: u64 = 64 << 10;

/// The most bytes kept per layer: past them (a layer of a great many small files, or a
/// hostile one), files are read through FUSE, and indexing holds no more than this in memory.
pub const KEEP_MAX: usize = 256 << 20;

const MAGIC: &[u8; 8] = b"BUXSML\x00\x01";
/// Bound on what a `.small` file may claim to hold once decompressed: the bytes, and a record
/// per file (of one byte at least).
const MAX_TOTAL: u64 = 8 + (KEEP_MAX * (RECORD + 1)) as u64;
const RECORD: usize = 12;

/// The kept bytes of a layer's small files, by their offset in the layer's stream.
#[derive(Clone)]
pub struct SmallFiles {
    /// (offset in the stream, start in `data`), ascending by offset; a file ends where the
    /// next one starts.
    at: Vec<(u64, usize)>,
    data: Vec<u8>,
    /// The largest file kept (at most [`SMALL_MAX`]).
    max: u64,
}

impl Default for SmallFiles {
    fn default() -> SmallFiles {
        SmallFiles::up_to(SMALL_MAX)
    }
}

impl PartialEq for SmallFiles {
    fn eq(&self, other: &SmallFiles) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for SmallFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes: usize = self.iter().map(|(_, b)| b.len()).sum();
        write!(f, "SmallFiles({} files, {bytes} bytes)", self.len())
    }
}

impl SmallFiles {
    /// None kept yet; files of at most `max` bytes (and [`SMALL_MAX`]) will be.
    pub fn up_to(max: u64) -> SmallFiles {
        SmallFiles {
            at: Vec::new(),
            data: Vec::new(),
            max: max.min(SMALL_MAX),
        }
    }

    /// Keeps `bytes`, the whole data of the file at `offset` of the stream (see
    /// [`SmallFiles::push_from`]).
    pub fn push(&mut self, offset: u64, bytes: &[u8]) {
        let _ = self.push_from(offset, bytes.len() as u64, bytes);
    }

    /// Keeps the `size` bytes `data` gives, the whole data of the file at `offset` of the
    /// stream, read straight into the kept bytes — unless the file is larger than this table
    /// keeps, or would take it past [`KEEP_MAX`] (then nothing is read). Offsets come in stream
    /// order; one out of order (not possible from a tar scan) is not kept. Fewer bytes than
    /// `size` keep nothing.
    pub fn push_from(&mut self, offset: u64, size: u64, data: impl io::Read) -> io::Result<()> {
        if size > self.max
            || self.data.len() as u64 + size > KEEP_MAX as u64
            || self.at.last().is_some_and(|&(o, _)| o >= offset)
        {
            return Ok(());
        }
        let start = self.data.len();
        let read = data.take(size).read_to_end(&mut self.data);
        if read.is_err() || self.data.len() - start != size as usize {
            self.data.truncate(start);
            return read.map(|_| ());
        }
        self.at.push((offset, start));
        Ok(())
    }

    /// The bytes of the file at `offset`, if they were kept and are `len` long.
    pub fn get(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let i = self.at.binary_search_by_key(&offset, |&(o, _)| o).ok()?;
        let start = self.at[i].1;
        let end = self.at.get(i + 1).map_or(self.data.len(), |&(_, s)| s);
        ((end - start) as u64 == len).then(|| &self.data[start..end])
    }

    /// The kept files: (offset, bytes), ascending by offset.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.at.iter().enumerate().map(|(i, &(offset, start))| {
            let end = self.at.get(i + 1).map_or(self.data.len(), |&(_, s)| s);
            (offset, &self.data[start..end])
        })
    }

    /// How many files are kept.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether no file is kept.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Where the small files of the layer whose index is at `index_path` are kept.
    pub fn path(index_path: &Path) -> PathBuf {
        index_path.with_extension("small")
    }

    /// Writes them beside the index at `index_path` (atomically; nothing when there are none).
    pub fn save(&self, index_path: &Path) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let mut body = Vec::with_capacity(8 + self.at.len() * RECORD + self.data.len());
        body.extend_from_slice(&(self.at.len() as u64).to_le_bytes());
        for (offset, bytes) in self.iter() {
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        }
        for (_, bytes) in self.iter() {
            body.extend_from_slice(bytes);
        }
        let path = Self::path(index_path);
        let mut bytes = MAGIC.to_vec();
        bytes.extend(
            zstd::bulk::compress(&body, super::ZSTD_LEVEL)
                .ctx(|| format!("compressing {}", path.display()))?,
        );
        crate::store::write_atomic(&path, &bytes)
    }

    /// Reads those kept beside the index at `index_path`: `None` if there is no such file (a
    /// layer indexed before they were kept, or fetched lazily).
    pub fn load(index_path: &Path) -> Result<Option<SmallFiles>> {
        let path = Self::path(index_path);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let corrupt = |detail: &str| Error::CorruptStore {
            path: path.clone(),
            detail: detail.into(),
        };
        let frame = bytes
            .strip_prefix(&MAGIC[..])
            .ok_or_else(|| corrupt("not a small-files table of this version"))?;
        let claimed = zstd::zstd_safe::get_frame_content_size(frame)
            .ok()
            .flatten()
            .filter(|&n| n <= MAX_TOTAL)
            .ok_or_else(|| corrupt("no valid frame size"))?;
        let body = zstd::bulk::decompress(frame, claimed as usize)
            .map_err(|e| corrupt(&format!("decompressing: {e}")))?;
        Self::decode(body).map(Some).map_err(corrupt)
    }

    /// The table of `body`, which it keeps as its bytes (the files' bytes are read where they
    /// lie in it, after the records).
    fn decode(body: Vec<u8>) -> std::result::Result<SmallFiles, &'static str> {
        let count = body
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or("cut short")?;
        let records = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(RECORD))
            .filter(|&n| n <= body.len() - 8)
            .ok_or("more records than bytes")?;
        let table = &body[8..8 + records];
        let mut at = Vec::with_capacity(count as usize);
        let mut start = 8 + records;
        for r in table.chunks_exact(RECORD) {
            let offset = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(r[8..].try_into().expect("4 bytes")) as usize;
            if at.last().is_some_and(|&(o, _)| o >= offset) {
                return Err("offsets out of order");
            }
            if len as u64 > SMALL_MAX {
                return Err("a file larger than kept files are");
            }
            at.push((offset, start));
            start += len;
        }
        if start != body.len() {
            return Err("the lengths do not add up to the bytes");
        }
        Ok(SmallFiles {
            at,
            data: body,
            max: SMALL_MAX,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_finds_by_offset_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.idx");
        let mut s = SmallFiles::default();
        s.push(512, b"hello");
        s.push(2048, b"");
        s.push(4096, &vec![7u8; SMALL_MAX as usize]);
        s.push(4000, b"out of order: not kept");
        s.push(1 << 30, &vec![1u8; SMALL_MAX as usize + 1]); // too large: not kept
        assert_eq!(s.len(), 3);
        // Past what a layer keeps, nothing more is.
        let mut full = SmallFiles::default();
        let chunk = vec![3u8; SMALL_MAX as usize];
        for i in 0..(KEEP_MAX / chunk.len() + 5) as u64 {
            full.push(i << 20, &chunk);
        }
        assert_eq!(full.len(), KEEP_MAX / chunk.len());
        s.save(&index).unwrap();
        let back = SmallFiles::load(&index).unwrap().unwrap();
        assert_eq!(back, s);
        assert_eq!(back.get(512, 5), Some(&b"hello"[..]));
        assert_eq!(back.get(512, 6), None, "a length that does not match");
        assert_eq!(back.get(2048, 0), Some(&b""[..]));
        assert_eq!(back.get(4096, SMALL_MAX).map(|b| b[0]), Some(7));
        assert_eq!(back.get(513, 5), None);
        // A table that keeps files up to 5 bytes, and one that keeps only empty ones.
        let (mut fewer, mut none) = (SmallFiles::up_to(5), SmallFiles::up_to(0));
        for (offset, bytes) in back.iter() {
            fewer.push(offset, bytes);
            none.push(offset, bytes);
        }
        assert_eq!((fewer.len(), fewer.get(512, 5)), (2, Some(&b"hello"[..])));
        assert_eq!(fewer.get(4096, SMALL_MAX), None);
        assert_eq!((none.len(), none.get(2048, 0)), (1, Some(&b""[..])));
        // A file whose data ends early is not kept, and leaves nothing behind.
        let mut short = SmallFiles::default();
        short.push_from(1, 10, &b"four"[..]).unwrap();
        short.push(2, b"ok");
        assert_eq!((short.len(), short.get(2, 2)), (1, Some(&b"ok"[..])));
        // None kept: no file, and loading says so.
        let other = dir.path().join("y.idx");
        SmallFiles::default().save(&other).unwrap();
        assert!(!SmallFiles::path(&other).exists());
        assert_eq!(SmallFiles::load(&other).unwrap(), None);
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.idx");
        let mut s = SmallFiles::default();
        for i in 0..100u64 {
            s.push(i * 1024, &i.to_le_bytes());
        }
        s.save(&index).unwrap();
        let path = SmallFiles::path(&index);
        let good = std::fs::read(&path).unwrap();
        let body = zstd::bulk::decompress(&good[8..], 1 << 20).unwrap();
        let write_body = |b: &[u8]| {
            let mut f = MAGIC.to_vec();
            f.extend(zstd::bulk::compress(b, 1).unwrap());
            std::fs::write(&path, f).unwrap();
        };
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() / 2].to_vec()),
            ("bad magic", [b"BUXSML\x00\x09", &good[8..]].concat()),
        ];
        let mut swapped = body.clone();
        swapped[8..16].copy_from_slice(&5000u64.to_le_bytes()); // offsets out of order
        let mut long = body.clone();
        long[16..20].copy_from_slice(&9u32.to_le_bytes()); // lengths past the bytes
        let mut many = body.clone();
        many[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        for (what, b) in [("order", swapped), ("lengths", long), ("count", many)] {
            write_body(&b);
            cases.push((what, std::fs::read(&path).unwrap()));
        }
        for (what, bytes) in cases {
            std::fs::write(&path, bytes).unwrap();
            let err = SmallFiles::load(&index).unwrap_err().to_string();
            assert!(err.contains("x.small"), "{what}: {err}");
        }
    }
}
