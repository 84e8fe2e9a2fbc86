//! Reads of small files from a layer's kept bytes (`<digest>.small`, see [`super::small`])
//! instead of its compressed stream.
//!
//! The kernel reads those bytes itself where root's mounts have a metadata image. Everywhere
//! else — an ordinary user's mounts and image server, root's FUSE-only way, disk mounts — a
//! small file's read used to inflate the span holding it (a checkpoint's worth of bytes for a
//! few KiB), on a decoding thread, while the bytes sat uncompressed in the store. Now they are
//! read from there: one `pread` of blocks laid out in stream order, so a walk reads the file
//! in order and the kernel reads ahead of it, and every process reading the layer shares its
//! page cache. Layers stored uncompressed (`Access::Tar`) read their stream in place and have
//! none.
//!
//! Where each file lies is the `.small` file's table, which is zstd-compressed: decoded, it is
//! 16 bytes a file and the bytes of the files of at most 512 bytes (0.6 MB for the large test
//! image), which every mount process would hold — 26 MiB for a user's 40 writable mounts. So
//! the first reader writes it decoded beside the index (`<layer>.small.map`, the tiny files'
//! places resolved), and every reader maps that: one copy in the page cache for all of them. It
//! names the SHA-256 of the table it was made from, and is made again when that is not the
//! `.small` file's (or it does not check out); a store that cannot take it has each reader hold
//! its own.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::small::{frame_digest, SmallIndex, BLOCK, SMALL_MAX, TINY_MAX};
use crate::mapped::Mapped;

/// The most of a table a reader holds (its records and tiny files' bytes; the large test
/// image's largest layer holds 0.3 MB): a layer of a great many tiny files (a hostile one) is
/// read through its stream instead, rather than cost every mount process its table.
const HELD_MAX: u64 = 16 << 20;

const MAP_MAGIC: &[u8; 8] = b"BUXSMAP\x02";
/// The map's header: magic, the table frame's SHA-256 (which table it was made from), the
/// body's CRC-32 in 4 of 32 bytes (what it holds: checked at every open, so rot is made again,
/// not served; a CRC finds damage as well as a SHA-256 here, in a fraction of the time: the map
/// of a 500,000-file layer is 14 MB), file count, tiny bytes' length.
const MAP_HEAD: usize = 8 + 32 + 32 + 8 + 8;
const RECORD: usize = 16;

/// A layer's kept small files, open for reads.
pub struct SmallReads {
    file: std::fs::File,
    /// The map: header, records (offset, length, first block or tiny bytes' start), tiny bytes.
    map: Mapped,
    count: usize,
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
        // (A frame compresses what a reader would hold: no more than that, plus zstd's margin.)
        let (digest, blocks) =
            frame_digest(&file, HELD_MAX + (HELD_MAX >> 7) + 4096).map_err(io)?;
        let map_path = map_path(index_path);
        if let Some((map, count)) = Mapped::open(&map_path)
            .ok()
            .and_then(|m| checked(m, &digest, blocks))
        {
            return Ok(Some(SmallReads { file, map, count }));
        }
        let table = SmallIndex::read_within(index_path, file.try_clone().map_err(io)?, HELD_MAX)?;
        let Some(table) = table.into_blocks() else {
            return Ok(None);
        };
        let mut body = Vec::new();
        let mut count = 0;
        for (offset, len, at) in table.placed() {
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&len.to_le_bytes());
            body.extend_from_slice(&at.to_le_bytes());
            count += 1;
        }
        body.extend_from_slice(table.tiny());
        let mut bytes = MAP_MAGIC.to_vec();
        bytes.extend_from_slice(&table.digest());
        bytes.extend_from_slice(&crate::digest::crc32_field(&[&body]));
        bytes.extend_from_slice(&(count as u64).to_le_bytes());
        bytes.extend_from_slice(&(table.tiny().len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        // Mapped once written (shared with every other reader), if what is there now is what
        // this process wrote; else held.
        let map = match crate::store::write_atomic(&map_path, &bytes) {
            Ok(()) => Mapped::open(&map_path)
                .ok()
                .filter(|m| m.as_slice() == &bytes[..]),
            Err(e) => {
                tracing::debug!("writing {}: {e}", map_path.display());
                None
            }
        };
        let map = map.unwrap_or(Mapped::Owned(bytes));
        Ok(Some(SmallReads { file, map, count }))
    }

    /// Fills `buf` with the stream's bytes at `off` if they lie within one kept file:
    /// `Ok(false)` (nothing read) if they do not.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<bool> {
        let map = self.map.as_slice();
        let record = |i: usize| parse_record(&map[MAP_HEAD + i * RECORD..][..RECORD]);
        // The last file starting at or before `off`.
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match record(mid).0 <= off {
                true => lo = mid + 1,
                false => hi = mid,
            }
        }
        let Some(i) = lo.checked_sub(1) else {
            return Ok(false);
        };
        let (start, len, at) = record(i);
        let (from, want) = (off - start, buf.len() as u64);
        if from.checked_add(want).is_none_or(|end| end > len as u64) {
            return Ok(false);
        }
        if len as u64 <= TINY_MAX {
            let at = MAP_HEAD + self.count * RECORD + at as usize + from as usize;
            return match map.get(at..at + buf.len()) {
                Some(bytes) => {
                    buf.copy_from_slice(bytes);
                    Ok(true)
                }
                None => Ok(false),
            };
        }
        self.file
            .read_exact_at(buf, at as u64 * BLOCK + from)
            .map(|()| true)
    }
}

/// Where the map of the table beside the index at `index_path` is kept (`<layer>.small.map`:
/// its temp files, `<layer>.small.tmp.*`, never share a name with the `.small` file's own).
pub(crate) fn map_path(index_path: &Path) -> PathBuf {
    index_path.with_extension("small.map")
}

fn parse_record(r: &[u8]) -> (u64, u32, u32) {
    (
        u64::from_le_bytes(r[..8].try_into().expect("8 bytes")),
        u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")),
        u32::from_le_bytes(r[12..16].try_into().expect("4 bytes")),
    )
}

/// `map` with its file count, if it was made from the table whose frame hashes to `digest`
/// and every record lies where a file can (`blocks` blocks of files, the tiny bytes it holds):
/// else it is made again.
fn checked(map: Mapped, digest: &[u8; 32], blocks: u64) -> Option<(Mapped, usize)> {
    let m = map.as_slice();
    if m.len() < MAP_HEAD || &m[..8] != MAP_MAGIC || &m[8..40] != digest {
        return None;
    }
    if m[40..72] != crate::digest::crc32_field(&[&m[MAP_HEAD..]]) {
        return None;
    }
    let word = |at: usize| u64::from_le_bytes(m[at..at + 8].try_into().expect("8 bytes"));
    let (count, tiny_len) = (word(72), word(80));
    let records = usize::try_from(count).ok()?.checked_mul(RECORD)?;
    if (MAP_HEAD as u64)
        .checked_add(records as u64)?
        .checked_add(tiny_len)?
        != m.len() as u64
    {
        return None;
    }
    let mut last = None;
    for r in m[MAP_HEAD..MAP_HEAD + records].chunks_exact(RECORD) {
        let (offset, len, at) = parse_record(r);
        let (len, at) = (len as u64, at as u64);
        let placed = match len <= TINY_MAX {
            true => at + len <= tiny_len,
            false => at >= 1 && at + len.div_ceil(BLOCK) <= blocks,
        };
        if last.is_some_and(|l| l >= offset) || len > SMALL_MAX || !placed {
            return None;
        }
        last = Some(offset);
    }
    Some((map, count as usize))
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

    /// The decoded table is written beside the index once and mapped by every reader; one made
    /// from another table, or damaged, is made again; where none can be written, each reader
    /// holds its own.
    #[test]
    fn readers_map_one_decoded_table() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.idx");
        let save = |bytes: &[u8]| {
            let mut s = SmallFiles::default();
            s.push(100, b"tiny");
            s.push(1000, bytes);
            s.save(&index).unwrap();
        };
        let read = |r: &SmallReads, off: u64, len: usize| {
            let mut buf = vec![0u8; len];
            r.read_at(off, &mut buf).unwrap().then_some(buf)
        };
        let map = map_path(&index);
        let ino = || std::fs::metadata(&map).unwrap().ino();
        save(&[1u8; 5000]);
        let first = SmallReads::open(&index).unwrap().unwrap();
        assert!(matches!(first.map, Mapped::Map(..)), "mapped once written");
        let written = ino();
        let second = SmallReads::open(&index).unwrap().unwrap();
        assert_eq!(ino(), written, "the map is reused, not written again");
        assert_eq!(read(&second, 100, 4).unwrap(), b"tiny");
        assert_eq!(read(&second, 1000, 5000).unwrap(), [1u8; 5000]);
        // Another table (a layer's `.small` made anew): its own map.
        save(&[2u8; 6000]);
        let third = SmallReads::open(&index).unwrap().unwrap();
        assert!(matches!(third.map, Mapped::Map(..)));
        assert_ne!(ino(), written, "made again");
        assert_eq!(read(&third, 1000, 6000).unwrap(), [2u8; 6000]);
        // A tiny file's byte rotted in the map: made again, not served.
        let mut bytes = std::fs::read(&map).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&map, &bytes).unwrap();
        let fourth = SmallReads::open(&index).unwrap().unwrap();
        assert_eq!(read(&fourth, 100, 4).unwrap(), b"tiny");
        assert_eq!(read(&fourth, 1000, 6000).unwrap(), [2u8; 6000]);
        // Where no map can be put (its place taken): each reader holds its own.
        std::fs::remove_file(&map).unwrap();
        std::fs::create_dir_all(map.join("in-the-way")).unwrap();
        let held = SmallReads::open(&index).unwrap().unwrap();
        assert!(matches!(held.map, Mapped::Owned(_)));
        assert_eq!(read(&held, 100, 4).unwrap(), b"tiny");
        assert_eq!(read(&held, 1000, 6000).unwrap(), [2u8; 6000]);
    }

    /// A map whose hashes match but whose records place bytes where none can be (a block past
    /// the files' blocks, offsets out of order) is refused.
    #[test]
    fn a_consistent_map_of_impossible_places_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.idx");
        let mut s = SmallFiles::default();
        s.push(100, &[5u8; 3000]);
        s.push(9000, &[6u8; 3000]);
        s.save(&index).unwrap();
        drop(SmallReads::open(&index).unwrap().unwrap());
        let good = std::fs::read(map_path(&index)).unwrap();
        let file = std::fs::File::open(dir.path().join("x.small")).unwrap();
        let (digest, blocks) = frame_digest(&file, u64::MAX).unwrap();
        let forged = |edit: &dyn Fn(&mut [u8])| {
            let mut m = good.clone();
            edit(&mut m[MAP_HEAD..]);
            let body = crate::digest::crc32_field(&[&m[MAP_HEAD..]]);
            m[40..72].copy_from_slice(&body);
            checked(Mapped::Owned(m), &digest, blocks).is_some()
        };
        assert!(forged(&|_| {}), "the map as written checks out");
        assert!(!forged(
            &|b| b[12..16].copy_from_slice(&(blocks as u32).to_le_bytes())
        ));
        assert!(!forged(&|b| b[16..24].copy_from_slice(&50u64.to_le_bytes())));
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
