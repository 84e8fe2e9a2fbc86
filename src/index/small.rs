//! Small files' bytes, kept beside a layer's index (`<digest>.small`).
//!
//! Most files of an image are small (56% of the large Debian image's files are under 4 KB, 78%
//! under 16 KiB), and over FUSE each one costs a lookup and a read round trip, and the inflation
//! of a span, however few its bytes. The indexing pass reads every byte of the layer anyway, so
//! it keeps the bytes of each regular file up to [`SMALL_MAX`]; the EROFS metadata image then
//! carries them (see [`crate::tree::erofs`]), and the kernel reads those files without asking
//! FUSE at all.
//!
//! Format: `MAGIC`, the length of the table's frame (u64 LE), the table — one zstd frame holding
//! the file count (u64 LE) and a record per file (its data's offset in the layer's uncompressed
//! stream, u64 LE, and its length, u32 LE), in ascending offset order — then one zstd frame of
//! the files' bytes end to end. (The first format, `MAGIC_V1`, had the table and the bytes in
//! one frame; it is still read.) A layer indexed before this file existed (or fetched lazily)
//! has none: its files are read through FUSE, as before.
//!
//! A pull does not hold the bytes while it indexes a layer: a table made by
//! [`SmallFiles::spilling`] compresses them into a temp file as they come, keeping only the
//! records (12 bytes per file) in memory, and [`SmallFiles::save`] moves that file into place.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::IoContext;
use crate::{Error, Result};

/// The largest file whose bytes are kept. Larger files are read through FUSE, where one
/// round trip brings up to 1 MiB.
pub const SMALL_MAX: u64 = 64 << 10;

/// The most bytes kept per layer: past them (a layer of a great many small files, or a
/// hostile one), files are read through FUSE, and indexing holds no more than this in memory.
pub const KEEP_MAX: usize = 256 << 20;

/// Numbers this process's temp files apart.
static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// The first format (see the module docs).
const MAGIC_V1: &[u8; 8] = b"BUXSML\x00\x01";
const MAGIC: &[u8; 8] = b"BUXSML\x00\x02";
/// Bound on what a `.small` file may claim to hold once decompressed: the bytes, and a record
/// per file (of one byte at least).
const MAX_TOTAL: u64 = 8 + (KEEP_MAX * (RECORD + 1)) as u64;
const RECORD: usize = 12;

/// The kept bytes of a layer's small files, by their offset in the layer's stream.
pub struct SmallFiles {
    /// (offset in the stream, start in `data`), ascending by offset; a file ends where the
    /// next one starts.
    at: Vec<(u64, usize)>,
    data: Vec<u8>,
    /// The largest file kept (at most [`SMALL_MAX`]).
    max: u64,
    /// Where the bytes go instead of `data`, for a table made by [`SmallFiles::spilling`]
    /// (taken by its save).
    spill: Option<Mutex<Option<Spill>>>,
}

/// The bytes of a spilling table: compressed into a temp file as they are kept.
struct Spill {
    /// Its path, removed when dropped unless saved.
    path: PathBuf,
    /// Until the save finishes it.
    out: Option<zstd::stream::write::Encoder<'static, io::BufWriter<std::fs::File>>>,
    /// Bytes kept so far (uncompressed).
    len: usize,
    /// A file's bytes on their way to `out`.
    buf: Vec<u8>,
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Clone for SmallFiles {
    /// A clone of a spilling table has its records but none of its bytes (they are on disk,
    /// for the one [`SmallFiles::save`]): it keeps no more files.
    fn clone(&self) -> SmallFiles {
        match &self.spill {
            None => SmallFiles {
                at: self.at.clone(),
                data: self.data.clone(),
                max: self.max,
                spill: None,
            },
            Some(_) => SmallFiles::up_to(0),
        }
    }
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
            spill: None,
        }
    }

    /// Like [`SmallFiles::up_to`], but the bytes are compressed into a new file at `tmp` as they
    /// are kept, not held: what the table holds in memory is its records, 12 bytes a file.
    /// Only [`SmallFiles::len`] and [`SmallFiles::save`] (which moves `tmp` into place) serve
    /// such a table; its bytes are not read back ([`SmallFiles::get`] finds none). `tmp` is
    /// removed if the table is dropped unsaved.
    pub fn spilling(max: u64, tmp: PathBuf) -> Result<SmallFiles> {
        let mut table = SmallFiles::up_to(max);
        if table.max == 0 {
            return Ok(table); // only empty files: nothing to spill
        }
        let file = std::fs::File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        let out = zstd::stream::write::Encoder::new(io::BufWriter::new(file), super::ZSTD_LEVEL)
            .ctx(|| format!("compressing {}", tmp.display()))?;
        table.spill = Some(Mutex::new(Some(Spill {
            path: tmp,
            out: Some(out),
            len: 0,
            buf: Vec::new(),
        })));
        Ok(table)
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
        let spill = match &mut self.spill {
            Some(m) => match m.get_mut().unwrap_or_else(|e| e.into_inner()) {
                Some(s) => Some(s),
                None => return Ok(()), // saved already
            },
            None => None,
        };
        let kept = spill.as_ref().map_or(self.data.len(), |s| s.len);
        if size > self.max
            || kept as u64 + size > KEEP_MAX as u64
            || self.at.last().is_some_and(|&(o, _)| o >= offset)
        {
            return Ok(());
        }
        if let Some(spill) = spill {
            spill.buf.clear();
            let read = data.take(size).read_to_end(&mut spill.buf);
            if read.is_err() || spill.buf.len() != size as usize {
                return read.map(|_| ());
            }
            if let Some(out) = &mut spill.out {
                io::Write::write_all(out, &spill.buf)?;
            }
            self.at.push((offset, spill.len));
            spill.len += size as usize;
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
        if self.spill.is_some() {
            return None;
        }
        let i = self.at.binary_search_by_key(&offset, |&(o, _)| o).ok()?;
        let start = self.at[i].1;
        let end = self.at.get(i + 1).map_or(self.data.len(), |&(_, s)| s);
        ((end - start) as u64 == len).then(|| &self.data[start..end])
    }

    /// The kept files: (offset, bytes), ascending by offset.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let at = match self.spill {
            None => &self.at[..],
            Some(_) => &[],
        };
        at.iter().enumerate().map(|(i, &(offset, start))| {
            let end = at.get(i + 1).map_or(self.data.len(), |&(_, s)| s);
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
    /// A spilling table is saved once: its bytes are moved (compressed as they are) from its
    /// temp file.
    pub fn save(&self, index_path: &Path) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let path = Self::path(index_path);
        let ctx = || format!("writing {}", path.display());
        let mut table = Vec::with_capacity(8 + self.at.len() * RECORD);
        table.extend_from_slice(&(self.at.len() as u64).to_le_bytes());
        let ends = self.at.iter().skip(1).map(|&(_, s)| s);
        let total = self.spill.as_ref().map_or(self.data.len(), |m| {
            let s = m.lock().unwrap_or_else(|e| e.into_inner());
            s.as_ref().map_or(0, |s| s.len)
        });
        for (&(offset, start), end) in self.at.iter().zip(ends.chain([total])) {
            table.extend_from_slice(&offset.to_le_bytes());
            table.extend_from_slice(&((end - start) as u32).to_le_bytes());
        }
        let table = zstd::bulk::compress(&table, super::ZSTD_LEVEL).ctx(ctx)?;
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&(table.len() as u64).to_le_bytes());
        head.extend_from_slice(&table);
        match &self.spill {
            None => {
                let bytes = zstd::bulk::compress(&self.data, super::ZSTD_LEVEL).ctx(ctx)?;
                head.extend_from_slice(&bytes);
                crate::store::write_atomic(&path, &head)
            }
            Some(m) => {
                let spill = m.lock().unwrap_or_else(|e| e.into_inner()).take();
                let Some(mut spill) = spill else {
                    return Ok(()); // saved already
                };
                if let Some(out) = spill.out.take() {
                    out.finish()
                        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
                        .ctx(ctx)?;
                }
                // Written whole beside it, then renamed over it (as `write_atomic` does).
                let tmp = path.with_extension(format!(
                    "tmp.{}.{}",
                    std::process::id(),
                    TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                let written = (|| {
                    let mut out = std::fs::File::create(&tmp)?;
                    io::Write::write_all(&mut out, &head)?;
                    io::copy(&mut std::fs::File::open(&spill.path)?, &mut out)?;
                    out.sync_all()?;
                    std::fs::rename(&tmp, &path)
                })();
                if written.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                written.ctx(ctx)?;
                crate::store::sync_dir(&path);
                Ok(())
            }
        }
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
        if let Some(frame) = bytes.strip_prefix(&MAGIC_V1[..]) {
            let claimed = zstd::zstd_safe::get_frame_content_size(frame)
                .ok()
                .flatten()
                .filter(|&n| n <= MAX_TOTAL)
                .ok_or_else(|| corrupt("no valid frame size"))?;
            let body = zstd::bulk::decompress(frame, claimed as usize)
                .map_err(|e| corrupt(&format!("decompressing: {e}")))?;
            return Self::decode(body).map(Some).map_err(corrupt);
        }
        let rest = bytes
            .strip_prefix(&MAGIC[..])
            .ok_or_else(|| corrupt("not a small-files table of this version"))?;
        let table_len = rest
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .filter(|&n| n <= rest.len() as u64 - 8)
            .ok_or_else(|| corrupt("cut short"))? as usize;
        let (table, data) = rest[8..].split_at(table_len);
        let claimed = zstd::zstd_safe::get_frame_content_size(table)
            .ok()
            .flatten()
            .filter(|&n| n <= (8 + KEEP_MAX * RECORD) as u64)
            .ok_or_else(|| corrupt("no valid frame size"))?;
        let table = zstd::bulk::decompress(table, claimed as usize)
            .map_err(|e| corrupt(&format!("decompressing: {e}")))?;
        let (at, total) = Self::records(&table, false).map_err(corrupt)?;
        let mut body = Vec::with_capacity(total);
        zstd::stream::read::Decoder::new(data)
            .and_then(|d| d.take(total as u64 + 1).read_to_end(&mut body))
            .map_err(|e| corrupt(&format!("decompressing: {e}")))?;
        if body.len() != total {
            return Err(corrupt("the lengths do not add up to the bytes"));
        }
        Ok(Some(SmallFiles {
            at,
            data: body,
            max: SMALL_MAX,
            spill: None,
        }))
    }

    /// The records of a table (`count`, then a record per file): (offset, start) of each, and
    /// where the last ends. The bytes start at 0, or `inline`, right after the records.
    fn records(
        table: &[u8],
        inline: bool,
    ) -> std::result::Result<(Vec<(u64, usize)>, usize), &'static str> {
        let count = table
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or("cut short")?;
        let records = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(RECORD))
            .filter(|&n| n <= table.len() - 8)
            .ok_or("more records than bytes")?;
        let mut at = Vec::with_capacity(count as usize);
        let mut start = if inline { 8 + records } else { 0 };
        for r in table[8..8 + records].chunks_exact(RECORD) {
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
        if start > KEEP_MAX + 8 + records {
            return Err("more bytes than a table keeps");
        }
        Ok((at, start))
    }

    /// The table of `body`, which it keeps as its bytes (the files' bytes are read where they
    /// lie in it, after the records).
    fn decode(body: Vec<u8>) -> std::result::Result<SmallFiles, &'static str> {
        let (at, end) = Self::records(&body, true)?;
        if end != body.len() {
            return Err("the lengths do not add up to the bytes");
        }
        Ok(SmallFiles {
            at,
            data: body,
            max: SMALL_MAX,
            spill: None,
        })
    }
}

/// The records of a layer's saved small files without their bytes: what a metadata image is
/// laid out by, holding 12 bytes a file; [`SmallIndex::each`] then reads the bytes through
/// once, in order, without holding them.
pub(crate) struct SmallIndex {
    path: PathBuf,
    /// (offset in the stream, length), ascending by offset.
    files: Vec<(u64, u32)>,
    body: Body,
}

enum Body {
    /// The bytes' frame starts at this offset of the file.
    Frame(u64),
    /// A table of the first format, read whole.
    Held(SmallFiles),
}

impl SmallIndex {
    /// The records of the table beside the index at `index_path`: `None` if there is none.
    pub(crate) fn open(index_path: &Path) -> Result<Option<SmallIndex>> {
        let path = SmallFiles::path(index_path);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let corrupt = |detail: &str| Error::CorruptStore {
            path: path.clone(),
            detail: detail.into(),
        };
        let mut head = [0u8; 16];
        file.read_exact(&mut head)
            .map_err(|_| corrupt("cut short"))?;
        if head[..8] == MAGIC_V1[..] {
            let held = SmallFiles::load(index_path)?.ok_or_else(|| corrupt("gone"))?;
            let files = held.iter().map(|(o, b)| (o, b.len() as u32)).collect();
            return Ok(Some(SmallIndex {
                path,
                files,
                body: Body::Held(held),
            }));
        }
        if head[..8] != MAGIC[..] {
            return Err(corrupt("not a small-files table of this version"));
        }
        let table_len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
        let mut table = Vec::new();
        (&mut file)
            .take(table_len.min((8 + KEEP_MAX * RECORD) as u64))
            .read_to_end(&mut table)
            .ctx(|| format!("reading {}", path.display()))?;
        if table.len() as u64 != table_len {
            return Err(corrupt("cut short"));
        }
        let claimed = zstd::zstd_safe::get_frame_content_size(&table)
            .ok()
            .flatten()
            .filter(|&n| n <= (8 + KEEP_MAX * RECORD) as u64)
            .ok_or_else(|| corrupt("no valid frame size"))?;
        let table = zstd::bulk::decompress(&table, claimed as usize)
            .map_err(|e| corrupt(&format!("decompressing: {e}")))?;
        let (at, total) = SmallFiles::records(&table, false).map_err(corrupt)?;
        let ends = at.iter().skip(1).map(|&(_, s)| s).chain([total]);
        let files = at
            .iter()
            .zip(ends)
            .map(|(&(o, start), end)| (o, (end - start) as u32))
            .collect();
        Ok(Some(SmallIndex {
            path,
            files,
            body: Body::Frame(16 + table_len),
        }))
    }

    /// The length of the file kept at `offset`, if one is.
    pub(crate) fn len_at(&self, offset: u64) -> Option<u64> {
        let i = self.files.binary_search_by_key(&offset, |&(o, _)| o).ok()?;
        Some(self.files[i].1 as u64)
    }

    /// Calls `f` with each file (offset, bytes), in order, until it returns `false`.
    pub(crate) fn each(&self, mut f: impl FnMut(u64, &[u8]) -> io::Result<bool>) -> Result<()> {
        let ctx = || format!("reading {}", self.path.display());
        match &self.body {
            Body::Held(held) => {
                for (offset, bytes) in held.iter() {
                    if !f(offset, bytes).ctx(ctx)? {
                        break;
                    }
                }
            }
            Body::Frame(start) => {
                let mut file = std::fs::File::open(&self.path).ctx(ctx)?;
                io::Seek::seek(&mut file, io::SeekFrom::Start(*start)).ctx(ctx)?;
                let mut bytes = zstd::stream::read::Decoder::new(file).ctx(ctx)?;
                let mut buf = vec![0u8; SMALL_MAX as usize];
                for &(offset, len) in &self.files {
                    let b = &mut buf[..len as usize];
                    bytes.read_exact(b).ctx(ctx)?;
                    if !f(offset, b).ctx(ctx)? {
                        break;
                    }
                }
            }
        }
        Ok(())
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
        // Tables of the first format (one frame: count, records, bytes), damaged.
        let mut body = (s.len() as u64).to_le_bytes().to_vec();
        for (offset, bytes) in s.iter() {
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        }
        for (_, bytes) in s.iter() {
            body.extend_from_slice(bytes);
        }
        let write_body = |b: &[u8]| {
            let mut f = MAGIC_V1.to_vec();
            f.extend(zstd::bulk::compress(b, 1).unwrap());
            std::fs::write(&path, f).unwrap();
        };
        write_body(&body);
        assert_eq!(
            SmallFiles::load(&index).unwrap().unwrap(),
            s,
            "first format"
        );
        let table_len = u64::from_le_bytes(good[8..16].try_into().unwrap()) as usize;
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() / 2].to_vec()),
            ("bytes cut short", good[..good.len() - 3].to_vec()),
            ("table cut short", good[..16 + table_len / 2].to_vec()),
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

    /// A spilling table holds only its records, and saves what a table in memory saves.
    #[test]
    fn spilled_tables_save_what_tables_in_memory_do() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("spill");
        let mut spilled = SmallFiles::spilling(SMALL_MAX, tmp.clone()).unwrap();
        let mut held = SmallFiles::default();
        for (i, len) in [
            5usize,
            0,
            4000,
            SMALL_MAX as usize,
            SMALL_MAX as usize + 1,
            17,
        ]
        .into_iter()
        .enumerate()
        {
            let bytes: Vec<u8> = (0..len).map(|k| (k * 7 + i) as u8).collect();
            spilled.push((i as u64) << 20, &bytes);
            held.push((i as u64) << 20, &bytes);
        }
        spilled.push_from(9 << 20, 10, &b"short"[..]).unwrap();
        assert_eq!((spilled.len(), held.len()), (5, 5));
        assert!(spilled.data.is_empty() && spilled.get(0, 5).is_none());
        let (a, b) = (dir.path().join("a.idx"), dir.path().join("b.idx"));
        spilled.save(&a).unwrap();
        held.save(&b).unwrap();
        assert_eq!(SmallFiles::load(&a).unwrap().unwrap(), held);
        assert_eq!(SmallFiles::load(&b).unwrap().unwrap(), held);
        drop(spilled);
        assert!(!tmp.exists(), "the spill file is removed");
        // Dropped unsaved, it leaves nothing either.
        let other = SmallFiles::spilling(SMALL_MAX, tmp.clone()).unwrap();
        assert!(tmp.exists());
        drop(other);
        assert!(!tmp.exists());
    }
}
