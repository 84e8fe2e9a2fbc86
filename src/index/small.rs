//! Small files' bytes, kept beside a layer's index (`<digest>.small`).
//!
//! Most files of an image are small (56% of the large Debian image's files are under 4 KB, 78%
//! under 16 KiB), and over FUSE each one costs a lookup and a read round trip, and the inflation
//! of a span, however few its bytes. The indexing pass reads every byte of the layer anyway, so
//! it keeps the bytes of each regular file up to [`SMALL_MAX`]; the EROFS metadata image then
//! serves them (see [`crate::tree::erofs`]), and the kernel reads those files without asking
//! FUSE at all.
//!
//! Format (the third): the file is an EROFS *device* the metadata image refers to, so the
//! bytes are stored once, uncompressed, and shared by every image with the layer. Block 0
//! (4 KiB) is the header: `MAGIC`, then where the table starts and its length (u64 LE each).
//! Each kept file of more than [`TINY_MAX`] bytes follows in whole blocks of its own (from
//! block 1, in stream order, zero-padded). Then the table: one zstd frame holding the file
//! count (u64 LE), a record per file (its data's offset in the layer's uncompressed stream, u64
//! LE; its length, u32 LE; its first block, u32 LE, or 0 for a tiny file), in ascending offset
//! order, then the tiny files' bytes end to end (the metadata image holds those inline). A
//! file with no file in blocks has its table right after the header (and is no device).
//! Earlier formats (`MAGIC_V1`: table and bytes in one frame; `MAGIC_V2`: a table frame, then
//! one frame of all bytes) are still read: their bytes are copied into the metadata image. A
//! layer indexed before this file existed (or fetched lazily) has none: its files are read
//! through FUSE, as before.
//!
//! Why not compressed: the bytes sit in the store once either way — compressed here and again
//! whole in each image's metadata image, as before, cost a zstd pass over 106 MB of the large
//! Debian image's small files at every pull (0.6 s of CPU on 2 cores) and a 119 MB image
//! write; as a device they cost one write, and the image is its metadata alone (3 MB).
//!
//! A pull does not hold the bytes while it indexes a layer: a table made by
//! [`SmallFiles::spilling`] writes them to a temp file in their final place as they come,
//! keeping only the records in memory, and [`SmallFiles::save`] writes the table and renames
//! that file into place.

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
/// The second format (see the module docs).
const MAGIC_V2: &[u8; 8] = b"BUXSML\x00\x02";
const MAGIC: &[u8; 8] = b"BUXSML\x00\x03";
/// The most a table of the current format holds decompressed: records (an empty file's count
/// none of [`KEEP_MAX`]) and tiny files' bytes.
const TABLE_MAX: u64 = (8 + KEEP_MAX * (RECORD_V3 + 1)) as u64;
/// The block size of the file as a device (the metadata image's).
pub const BLOCK: u64 = 4096;
/// Files of at most this many bytes are kept in the table, not in blocks: the metadata image
/// holds them inline after their inode (a block each would waste most of it).
pub const TINY_MAX: u64 = 512;
/// A record of the current format: offset, length, first block.
const RECORD_V3: usize = 16;
/// The header's length: magic, where the table starts, its length.
const HEAD_LEN: u64 = 24;
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
    /// Where a spilling table's file went at its save: saved again beside another index, the
    /// file is linked there (a completed lazy layer's index is saved under two names).
    saved: Mutex<Option<PathBuf>>,
}

/// The bytes of a spilling table: written to a temp file, in their blocks, as they are kept.
struct Spill {
    /// Its path, removed when dropped unless saved.
    path: PathBuf,
    /// Until the save finishes it; positioned after the last file's blocks.
    out: Option<io::BufWriter<std::fs::File>>,
    /// Bytes kept so far.
    len: usize,
    /// Blocks of data written so far (the next file's first block is one past them).
    blocks: u32,
    /// Each kept file's first block, or 0 for a tiny one (its bytes in `tiny`).
    placed: Vec<u32>,
    /// The tiny files' bytes, end to end.
    tiny: Vec<u8>,
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
                saved: Mutex::new(None),
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

/// Puts the file `from` at `to` too (atomically): a hard link (the store's files are never
/// written in place), or a copy where the filesystem has none.
fn link_into(from: &Path, to: &Path) -> io::Result<()> {
    let tmp = to.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    if std::fs::hard_link(from, &tmp).is_err() {
        std::fs::copy(from, &tmp)?;
    }
    if let Err(e) = std::fs::rename(&tmp, to) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    crate::store::sync_dir(to);
    Ok(())
}

/// A table's records: (offset, start) of each file, and where the last one's bytes end.
type Records = (Vec<(u64, usize)>, usize);

impl SmallFiles {
    /// None kept yet; files of at most `max` bytes (and [`SMALL_MAX`]) will be.
    pub fn up_to(max: u64) -> SmallFiles {
        SmallFiles {
            at: Vec::new(),
            data: Vec::new(),
            max: max.min(SMALL_MAX),
            spill: None,
            saved: Mutex::new(None),
        }
    }

    /// Like [`SmallFiles::up_to`], but the bytes are written into a new file at `tmp` as they
    /// are kept (in their final place: see the module docs), not held: what the table holds in
    /// memory is its records, 16 bytes a file, and the tiny files' bytes. Only
    /// [`SmallFiles::len`] and [`SmallFiles::save`] (which moves `tmp` into place) serve such a
    /// table; its bytes are not read back ([`SmallFiles::get`] finds none). `tmp` is removed if
    /// the table is dropped unsaved.
    pub fn spilling(max: u64, tmp: PathBuf) -> Result<SmallFiles> {
        let mut table = SmallFiles::up_to(max);
        if table.max == 0 {
            return Ok(table); // only empty files: nothing to spill
        }
        let ctx = || format!("creating {}", tmp.display());
        let mut file = std::fs::File::create(&tmp).ctx(ctx)?;
        // The header block is written last, over these zeros.
        io::Seek::seek(&mut file, io::SeekFrom::Start(BLOCK)).ctx(ctx)?;
        table.spill = Some(Mutex::new(Some(Spill {
            path: tmp,
            out: Some(io::BufWriter::with_capacity(1 << 18, file)),
            len: 0,
            blocks: 0,
            placed: Vec::new(),
            tiny: Vec::new(),
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
            if size <= TINY_MAX {
                spill.placed.push(0);
                spill.tiny.extend_from_slice(&spill.buf);
            } else {
                // A write that failed may have left part of this file (or of its padding) in
                // the stream: the blocks counted no longer say where the next file lands, so
                // no more are kept, and the save fails (a caller pushing on after an error, as
                // a table in memory being saved does, must not get misplaced bytes).
                let Some(out) = &mut spill.out else {
                    return Err(io::Error::other(
                        "an earlier write of the small files failed",
                    ));
                };
                let blocks = size.div_ceil(BLOCK);
                spill.buf.resize((blocks * BLOCK) as usize, 0);
                if let Err(e) = io::Write::write_all(out, &spill.buf) {
                    spill.out = None;
                    return Err(e);
                }
                spill.placed.push(1 + spill.blocks);
                spill.blocks += blocks as u32; // at most KEEP_MAX / 512 blocks
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
    /// A spilling table is saved once: the file it wrote as it went gets its table and header,
    /// and is renamed into place (its bytes are not copied). A table in memory is written the
    /// same way, through a spill of its own.
    pub fn save(&self, index_path: &Path) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let path = Self::path(index_path);
        let ctx = || format!("writing {}", path.display());
        let spill = match &self.spill {
            Some(m) => m.lock().unwrap_or_else(|e| e.into_inner()).take(),
            None => {
                let tmp = path.with_extension(format!(
                    "tmp.{}.{}",
                    std::process::id(),
                    TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                let mut copy = SmallFiles::spilling(SMALL_MAX, tmp)?;
                for (offset, bytes) in self.iter() {
                    copy.push_from(offset, bytes.len() as u64, bytes).ctx(ctx)?;
                }
                return copy.save(index_path);
            }
        };
        let Some(mut spill) = spill else {
            // Saved already: the same bytes beside this index too, linked (not copied).
            let first = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
            return match first {
                Some(first) if first != path => link_into(&first, &path).ctx(ctx),
                _ => Ok(()),
            };
        };
        let out = spill
            .out
            .take()
            .ok_or_else(|| Error::io(ctx(), io::ErrorKind::Other.into()))?;
        let file = out.into_inner().map_err(|e| e.into_error()).ctx(ctx)?;
        let mut table = Vec::with_capacity(8 + self.at.len() * RECORD_V3 + spill.tiny.len());
        table.extend_from_slice(&(self.at.len() as u64).to_le_bytes());
        let ends = self.at.iter().skip(1).map(|&(_, s)| s).chain([spill.len]);
        for ((&(offset, start), end), &block) in self.at.iter().zip(ends).zip(&spill.placed) {
            table.extend_from_slice(&offset.to_le_bytes());
            table.extend_from_slice(&((end - start) as u32).to_le_bytes());
            table.extend_from_slice(&block.to_le_bytes());
        }
        table.extend_from_slice(&spill.tiny);
        let table = zstd::bulk::compress(&table, super::ZSTD_LEVEL).ctx(ctx)?;
        // With no file in blocks, no device: the table follows the header (a file of a few
        // hundred bytes, not a block of zeros and then the table).
        let table_at = match spill.blocks {
            0 => HEAD_LEN,
            n => (1 + n as u64) * BLOCK,
        };
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&table_at.to_le_bytes());
        head.extend_from_slice(&(table.len() as u64).to_le_bytes());
        use std::os::unix::fs::FileExt;
        file.write_all_at(&table, table_at)
            .and_then(|_| file.write_all_at(&head, 0))
            .and_then(|_| file.sync_all())
            .and_then(|_| std::fs::rename(&spill.path, &path))
            .ctx(ctx)?;
        crate::store::sync_dir(&path);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
        Ok(())
    }

    /// Writes them in the second format (what earlier versions wrote), to test that stores
    /// holding such files still work.
    #[cfg(test)]
    pub(crate) fn save_v2(&self, index_path: &Path) {
        let mut table = (self.at.len() as u64).to_le_bytes().to_vec();
        for (offset, bytes) in self.iter() {
            table.extend_from_slice(&offset.to_le_bytes());
            table.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        }
        let table = zstd::bulk::compress(&table, 3).unwrap();
        let mut file = MAGIC_V2.to_vec();
        file.extend_from_slice(&(table.len() as u64).to_le_bytes());
        file.extend_from_slice(&table);
        file.extend(zstd::bulk::compress(&self.data, 3).unwrap());
        std::fs::write(Self::path(index_path), file).unwrap();
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
        if bytes.starts_with(&MAGIC[..]) {
            let t = Blocks::parse(
                &path,
                &bytes[..bytes.len().min(BLOCK as usize)],
                bytes.len() as u64,
                TABLE_MAX,
                |at, buf| {
                    let at = at as usize;
                    match bytes.get(at..at + buf.len()) {
                        Some(b) => {
                            buf.copy_from_slice(b);
                            Ok(())
                        }
                        None => Err(io::ErrorKind::UnexpectedEof.into()),
                    }
                },
            )?;
            let mut held = SmallFiles::default();
            for (i, &(offset, len, block)) in t.files.iter().enumerate() {
                held.at.push((offset, held.data.len()));
                match t.tiny_bytes(i) {
                    Some(b) => held.data.extend_from_slice(b),
                    None => {
                        let at = (block as u64 * BLOCK) as usize;
                        held.data.extend_from_slice(&bytes[at..at + len as usize]);
                    }
                }
            }
            return Ok(Some(held));
        }
        if let Some(frame) = bytes.strip_prefix(&MAGIC_V1[..]) {
            let body = unzstd(frame, MAX_TOTAL).map_err(|e| corrupt(&e))?;
            return Self::decode(body).map(Some).map_err(corrupt);
        }
        let rest = bytes
            .strip_prefix(&MAGIC_V2[..])
            .ok_or_else(|| corrupt("not a small-files table of this version"))?;
        let table_len = rest
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .filter(|&n| n <= rest.len() as u64 - 8)
            .ok_or_else(|| corrupt("cut short"))? as usize;
        let (table, data) = rest[8..].split_at(table_len);
        let table = unzstd(table, (8 + KEEP_MAX * RECORD) as u64).map_err(|e| corrupt(&e))?;
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
            saved: Mutex::new(None),
        }))
    }

    /// The records of a table (`count`, then a record per file): (offset, start) of each, and
    /// where the last ends. The bytes start at 0, or `inline`, right after the records.
    fn records(table: &[u8], inline: bool) -> std::result::Result<Records, &'static str> {
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
            saved: Mutex::new(None),
        })
    }
}

/// The content of the zstd frame `frame`, which must say its size, of at most `most` bytes.
/// The buffer grows with what the frame holds, not with what its header claims: a damaged
/// file claiming gigabytes (up to `most`) gets no buffer of gigabytes (which, refused, would
/// abort the process).
fn unzstd(frame: &[u8], most: u64) -> std::result::Result<Vec<u8>, String> {
    let claimed = zstd::zstd_safe::get_frame_content_size(frame)
        .ok()
        .flatten()
        .filter(|&n| n <= most)
        .ok_or("no valid frame size")?;
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(frame)
        .and_then(|d| d.take(claimed + 1).read_to_end(&mut out))
        .map_err(|e| format!("decompressing: {e}"))?;
    match out.len() as u64 == claimed {
        true => Ok(out),
        false => Err("the frame holds other than its size says".into()),
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
    /// The bytes' frame starts at this offset of the file (the second format).
    Frame(u64),
    /// A table of the first format, read whole.
    Held(SmallFiles),
    /// The current format: each file's bytes in blocks of the file, or tiny in the table.
    Blocks(Blocks),
}

/// Where a file's bytes are in a table of the current format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed<'a> {
    /// In blocks of their own from this one (the file as a device, 4 KiB blocks).
    Block(u32),
    /// Here (a file of at most [`TINY_MAX`] bytes).
    Tiny(&'a [u8]),
    /// In the compressed stream of a table of an earlier format ([`SmallIndex::each`]).
    Stream,
}

/// The SHA-256 of the table frame of `file`, a file of the current format (what
/// [`Blocks::digest`] says of it, read without decoding), and how many blocks precede the table
/// (the blocks files can lie in).
/// A frame of more than `most` bytes is refused before it is read.
pub(crate) fn frame_digest(file: &std::fs::File, most: u64) -> io::Result<([u8; 32], u64)> {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; HEAD_LEN as usize];
    file.read_exact_at(&mut head, 0)?;
    let word = |i: usize| u64::from_le_bytes(head[8 + 8 * i..16 + 8 * i].try_into().expect("8"));
    let (table_at, table_len) = (word(0), word(1));
    if !head.starts_with(MAGIC) || table_len > TABLE_MAX.min(most) {
        return Err(io::Error::other(
            "not a table of the current format, or too large",
        ));
    }
    // As `Blocks::parse` checks it: where a table can start, and within the file.
    let within = table_at
        .checked_add(table_len)
        .is_some_and(|end| end <= file.metadata().map_or(0, |m| m.len()));
    if (table_at % BLOCK != 0 && table_at != HEAD_LEN) || table_at == 0 || !within {
        return Err(io::Error::other("no valid table"));
    }
    let mut frame = vec![0u8; table_len as usize];
    file.read_exact_at(&mut frame, table_at)?;
    Ok((
        <sha2::Sha256 as sha2::Digest>::digest(&frame).into(),
        table_at / BLOCK,
    ))
}

/// The table of a file of the current format.
pub(crate) struct Blocks {
    /// (offset in the stream, length, first block or 0), ascending by offset.
    files: Vec<(u64, u32, u32)>,
    /// Where each tiny file's bytes start in `tiny` (0 for the others).
    tiny_at: Vec<u32>,
    tiny: Vec<u8>,
    /// The file's length in blocks: its size as a device.
    blocks: u64,
    /// The SHA-256 of the table's frame: the file's identity for an image naming it.
    digest: [u8; 32],
}

impl Blocks {
    /// Reads the header (`head`, the file's first bytes) and the table through `read_at`,
    /// checking that every record lies where a file of this format can put it.
    fn parse(
        path: &Path,
        head: &[u8],
        file_len: u64,
        most: u64,
        read_at: impl Fn(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<Blocks> {
        let corrupt = |detail: &str| Error::CorruptStore {
            path: path.to_path_buf(),
            detail: detail.into(),
        };
        let word = |i: usize| {
            head.get(8 + 8 * i..16 + 8 * i)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        let (Some(table_at), Some(table_len)) = (word(0), word(1)) else {
            return Err(corrupt("cut short"));
        };
        if (table_at % BLOCK != 0 && table_at != HEAD_LEN) || table_at == 0 || table_len > most {
            return Err(corrupt("no valid table"));
        }
        // Within the file: a damaged header makes no buffer of what it claims.
        if table_at
            .checked_add(table_len)
            .is_none_or(|end| end > file_len)
        {
            return Err(corrupt("cut short"));
        }
        let mut frame = vec![0u8; table_len as usize];
        read_at(table_at, &mut frame).map_err(|_| corrupt("cut short"))?;
        let table = unzstd(&frame, most).map_err(|e| corrupt(&e))?;
        let count = table
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| corrupt("cut short"))?;
        let records = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(RECORD_V3))
            .filter(|&n| n <= table.len() - 8)
            .ok_or_else(|| corrupt("more records than bytes"))?;
        // Blocks before the table: the header's and the files'.
        let data_blocks = table_at / BLOCK;
        let (mut files, mut tiny_at) = (Vec::with_capacity(count as usize), Vec::new());
        let mut tiny_len = 0u64;
        for r in table[8..8 + records].chunks_exact(RECORD_V3) {
            let offset = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
            let block = u32::from_le_bytes(r[12..].try_into().expect("4 bytes"));
            if files.last().is_some_and(|&(o, _, _)| o >= offset) {
                return Err(corrupt("offsets out of order"));
            }
            if len as u64 > SMALL_MAX {
                return Err(corrupt("a file larger than kept files are"));
            }
            let tiny = len as u64 <= TINY_MAX;
            let in_blocks =
                block >= 1 && block as u64 + (len as u64).div_ceil(BLOCK) <= data_blocks;
            if tiny != (block == 0) || (!tiny && !in_blocks) {
                return Err(corrupt("a file's bytes lie outside its blocks"));
            }
            tiny_at.push(tiny_len as u32);
            if tiny {
                tiny_len += len as u64;
            }
            files.push((offset, len, block));
        }
        let tiny = table[8 + records..].to_vec();
        if tiny.len() as u64 != tiny_len {
            return Err(corrupt("the lengths do not add up to the bytes"));
        }
        Ok(Blocks {
            files,
            tiny_at,
            tiny,
            blocks: (table_at + table_len).div_ceil(BLOCK),
            digest: <sha2::Sha256 as sha2::Digest>::digest(&frame).into(),
        })
    }

    /// Each kept file as (its offset in the stream, its length, where its bytes are: its first
    /// block, or for a file of at most [`TINY_MAX`] bytes their start in [`Blocks::tiny`]).
    pub(crate) fn placed(&self) -> impl Iterator<Item = (u64, u32, u32)> + '_ {
        self.files
            .iter()
            .zip(&self.tiny_at)
            .map(|(&(o, l, b), &t)| (o, l, if b == 0 { t } else { b }))
    }

    /// The bytes of the files of at most [`TINY_MAX`] bytes, end to end.
    pub(crate) fn tiny(&self) -> &[u8] {
        &self.tiny
    }

    /// The SHA-256 of the table's frame (see [`frame_digest`]).
    pub(crate) fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The bytes of the `i`th file if it is tiny.
    fn tiny_bytes(&self, i: usize) -> Option<&[u8]> {
        let (_, len, block) = self.files[i];
        let at = self.tiny_at[i] as usize;
        (block == 0).then(|| &self.tiny[at..at + len as usize])
    }
}

impl SmallIndex {
    /// The records of the table beside the index at `index_path`: `None` if there is none.
    pub(crate) fn open(index_path: &Path) -> Result<Option<SmallIndex>> {
        let path = SmallFiles::path(index_path);
        match std::fs::File::open(&path) {
            Ok(f) => Self::read(index_path, f).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// The records of the table `file` holds, opened from beside the index at `index_path`
    /// (a caller that goes on to use the file knows it read the table of that very file).
    pub(crate) fn read(index_path: &Path, file: std::fs::File) -> Result<SmallIndex> {
        Self::read_within(index_path, file, TABLE_MAX)
    }

    /// [`SmallIndex::read`], refusing a table of the current format that holds more than
    /// `most` bytes once decompressed (its records and tiny files' bytes).
    pub(crate) fn read_within(
        index_path: &Path,
        mut file: std::fs::File,
        most: u64,
    ) -> Result<SmallIndex> {
        let path = SmallFiles::path(index_path);
        let corrupt = |detail: &str| Error::CorruptStore {
            path: path.clone(),
            detail: detail.into(),
        };
        let mut head = [0u8; 24];
        file.read_exact(&mut head)
            .map_err(|_| corrupt("cut short"))?;
        if head[..8] == MAGIC[..] {
            use std::os::unix::fs::FileExt;
            let len = file
                .metadata()
                .ctx(|| format!("reading {}", path.display()))?
                .len();
            let most = most.min(TABLE_MAX);
            let blocks = Blocks::parse(&path, &head, len, most, |at, buf| {
                file.read_exact_at(buf, at)
            })?;
            let files = blocks.files.iter().map(|&(o, l, _)| (o, l)).collect();
            return Ok(SmallIndex {
                path,
                files,
                body: Body::Blocks(blocks),
            });
        }
        if head[..8] == MAGIC_V1[..] {
            let held = SmallFiles::load(index_path)?.ok_or_else(|| corrupt("gone"))?;
            let files = held.iter().map(|(o, b)| (o, b.len() as u32)).collect();
            return Ok(SmallIndex {
                path,
                files,
                body: Body::Held(held),
            });
        }
        if head[..8] != MAGIC_V2[..] {
            return Err(corrupt("not a small-files table of this version"));
        }
        let table_len = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        io::Seek::seek(&mut file, io::SeekFrom::Start(16))
            .ctx(|| format!("reading {}", path.display()))?;
        let mut table = Vec::new();
        (&mut file)
            .take(table_len.min((8 + KEEP_MAX * RECORD) as u64))
            .read_to_end(&mut table)
            .ctx(|| format!("reading {}", path.display()))?;
        if table.len() as u64 != table_len {
            return Err(corrupt("cut short"));
        }
        let table = unzstd(&table, (8 + KEEP_MAX * RECORD) as u64).map_err(|e| corrupt(&e))?;
        let (at, total) = SmallFiles::records(&table, false).map_err(corrupt)?;
        let ends = at.iter().skip(1).map(|&(_, s)| s).chain([total]);
        let files = at
            .iter()
            .zip(ends)
            .map(|(&(o, start), end)| (o, (end - start) as u32))
            .collect();
        Ok(SmallIndex {
            path,
            files,
            body: Body::Frame(16 + table_len),
        })
    }

    /// The table of the current format, for reads ([`crate::index::small_reads`]); `None`
    /// for a file of an earlier format.
    pub(crate) fn into_blocks(self) -> Option<Blocks> {
        match self.body {
            Body::Blocks(b) => Some(b),
            _ => None,
        }
    }

    /// Whether `head` (a file's first bytes) starts a table of the current format, the one
    /// whose files lie in blocks (earlier ones keep every byte in compressed frames).
    pub(crate) fn in_blocks(head: &[u8]) -> bool {
        head.starts_with(MAGIC)
    }

    /// The length of the file kept at `offset`, if one is.
    pub(crate) fn len_at(&self, offset: u64) -> Option<u64> {
        let i = self.files.binary_search_by_key(&offset, |&(o, _)| o).ok()?;
        Some(self.files[i].1 as u64)
    }

    /// Where the bytes of the file kept at `offset` are, if one is.
    pub(crate) fn placed_at(&self, offset: u64) -> Option<Placed<'_>> {
        let i = self.files.binary_search_by_key(&offset, |&(o, _)| o).ok()?;
        Some(match &self.body {
            Body::Blocks(b) => match b.tiny_bytes(i) {
                Some(bytes) => Placed::Tiny(bytes),
                None => Placed::Block(b.files[i].2),
            },
            _ => Placed::Stream,
        })
    }

    /// The layer's digest (hex), from the file's name.
    pub(crate) fn layer_hex(&self) -> String {
        // `<hex>.small`, or `<hex>.<key>.small` beside a lazily fetched layer's keyed index.
        let name = self.path.file_name().map(|s| s.to_string_lossy());
        name.map_or_else(String::new, |n| {
            n.split('.').next().unwrap_or("").to_string()
        })
    }

    /// The SHA-256 of the table's frame (the current format; zeros for earlier ones).
    pub(crate) fn table_digest(&self) -> [u8; 32] {
        match &self.body {
            Body::Blocks(b) => b.digest,
            _ => [0; 32],
        }
    }

    /// The file's size in blocks if it serves as a device: of the current format, with files
    /// in blocks.
    pub(crate) fn device_blocks(&self) -> Option<u64> {
        match &self.body {
            Body::Blocks(b) if b.files.iter().any(|f| f.2 != 0) => Some(b.blocks),
            _ => None,
        }
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
            Body::Blocks(blocks) => {
                use std::os::unix::fs::FileExt;
                let file = std::fs::File::open(&self.path).ctx(ctx)?;
                let mut buf = vec![0u8; SMALL_MAX as usize];
                for (i, &(offset, len, block)) in blocks.files.iter().enumerate() {
                    let b = match blocks.tiny_bytes(i) {
                        Some(b) => b,
                        None => {
                            let b = &mut buf[..len as usize];
                            file.read_exact_at(b, block as u64 * BLOCK).ctx(ctx)?;
                            b
                        }
                    };
                    if !f(offset, b).ctx(ctx)? {
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
            let len = [8, 600, 5000][i as usize % 3];
            s.push(i * 65536, &vec![i as u8; len]);
        }
        s.save(&index).unwrap();
        let path = SmallFiles::path(&index);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(SmallFiles::load(&index).unwrap().unwrap(), s);
        // Earlier formats are still read: the first (one frame: count, records, bytes) and
        // the second (a table frame, then the bytes' frame).
        let mut body = (s.len() as u64).to_le_bytes().to_vec();
        for (offset, bytes) in s.iter() {
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        }
        for (_, bytes) in s.iter() {
            body.extend_from_slice(bytes);
        }
        std::fs::write(
            &path,
            [&MAGIC_V1[..], &zstd::bulk::compress(&body, 1).unwrap()].concat(),
        )
        .unwrap();
        assert_eq!(
            SmallFiles::load(&index).unwrap().unwrap(),
            s,
            "first format"
        );
        s.save_v2(&index);
        assert_eq!(
            SmallFiles::load(&index).unwrap().unwrap(),
            s,
            "second format"
        );
        let v2 = SmallIndex::open(&index).unwrap().unwrap();
        let mut seen = Vec::new();
        v2.each(|o, b| {
            seen.push((o, b.to_vec()));
            Ok(true)
        })
        .unwrap();
        assert!(
            seen.iter().map(|(o, b)| (*o, &b[..])).eq(s.iter()),
            "second format"
        );
        assert_eq!(
            (v2.placed_at(65536), v2.device_blocks()),
            (Some(Placed::Stream), None)
        );
        // The current format, damaged: its table rewritten (records as given, then the tiny
        // files' bytes), or its header.
        let table_at = u64::from_le_bytes(good[8..16].try_into().unwrap());
        let table_len = u64::from_le_bytes(good[16..24].try_into().unwrap());
        let frame = &good[table_at as usize..(table_at + table_len) as usize];
        let table = zstd::bulk::decompress(frame, 1 << 20).unwrap();
        let records = 8 + s.len() * RECORD_V3;
        let with_table = |t: &[u8]| {
            let frame = zstd::bulk::compress(t, 1).unwrap();
            let mut f = good[..table_at as usize].to_vec();
            f[16..24].copy_from_slice(&(frame.len() as u64).to_le_bytes());
            f.extend(frame);
            f
        };
        let record = |i: usize, field: std::ops::Range<usize>, v: &[u8]| {
            let mut t = table.clone();
            let at = 8 + i * RECORD_V3;
            t[at + field.start..at + field.end].copy_from_slice(v);
            with_table(&t)
        };
        let with_head = |at: usize, v: u64| {
            let mut f = good.clone();
            f[at..at + 8].copy_from_slice(&v.to_le_bytes());
            f
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() / 2].to_vec()),
            ("table cut short", good[..good.len() - 3].to_vec()),
            ("bad magic", [b"BUXSML\x00\x09", &good[8..]].concat()),
            ("table not at a block", with_head(8, table_at + 1)),
            ("table in the header", with_head(8, 0)),
            ("table past the end", with_head(8, table_at + 4096)),
            (
                "damaged frame",
                [&good[..good.len() - 6], &[0xff; 6][..]].concat(),
            ),
            ("offsets out of order", record(1, 0..8, &0u64.to_le_bytes())),
            (
                "longer than kept files",
                record(1, 8..12, &(1u32 << 20).to_le_bytes()),
            ),
            (
                "block past the data",
                record(1, 12..16, &(table_at as u32).to_le_bytes()),
            ),
            (
                "a block for a tiny file",
                record(0, 12..16, &1u32.to_le_bytes()),
            ),
            (
                "no block for a larger one",
                record(1, 12..16, &0u32.to_le_bytes()),
            ),
            ("tiny bytes missing", with_table(&table[..table.len() - 1])),
            (
                "tiny bytes too many",
                with_table(&[&table[..], b"x"].concat()),
            ),
            ("count", {
                let mut t = table.clone();
                t[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                with_table(&t)
            }),
        ];
        assert!(records < table.len());
        for (what, bytes) in cases {
            std::fs::write(&path, bytes).unwrap();
            let err = SmallFiles::load(&index).unwrap_err().to_string();
            assert!(err.contains("x.small"), "{what}: {err}");
            let err = SmallIndex::open(&index).err().map(|e| e.to_string());
            assert!(err.is_some_and(|e| e.contains("x.small")), "{what}: opened");
        }
    }

    /// A table of the current format is a device: each file's bytes at its block (or tiny, in
    /// the table), zero-padded, and read back by [`SmallIndex::each`] as they were kept.
    #[test]
    fn files_lie_in_blocks_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.idx");
        let mut s = SmallFiles::default();
        let sizes = [0usize, 1, 512, 513, 4096, 4097, SMALL_MAX as usize, 3];
        for (i, &len) in sizes.iter().enumerate() {
            s.push(i as u64 * 100_000, &vec![i as u8 + 1; len]);
        }
        s.save(&index).unwrap();
        let file = std::fs::read(SmallFiles::path(&index)).unwrap();
        let t = SmallIndex::open(&index).unwrap().unwrap();
        assert_eq!(t.device_blocks(), Some((file.len() as u64).div_ceil(BLOCK)));
        let mut next = 1;
        for (i, &len) in sizes.iter().enumerate() {
            let placed = t.placed_at(i as u64 * 100_000).unwrap();
            if len as u64 <= TINY_MAX {
                assert_eq!(placed, Placed::Tiny(&vec![i as u8 + 1; len][..]), "{len}");
                continue;
            }
            assert_eq!(placed, Placed::Block(next), "{len}");
            let at = next as usize * BLOCK as usize;
            let blocks = (len as u64).div_ceil(BLOCK) as usize;
            assert!(file[at..at + len].iter().all(|&b| b == i as u8 + 1));
            assert!(file[at + len..at + blocks * BLOCK as usize]
                .iter()
                .all(|&b| b == 0));
            next += blocks as u32;
        }
        let mut seen = Vec::new();
        t.each(|o, b| {
            seen.push((o, b.to_vec()));
            Ok(true)
        })
        .unwrap();
        assert!(seen.iter().map(|(o, b)| (*o, &b[..])).eq(s.iter()));
        assert_eq!(t.placed_at(7), None);
        // Only tiny files: no blocks, so no device; the table follows the header.
        let mut tiny = SmallFiles::default();
        tiny.push(0, b"x");
        tiny.push(10, b"yz");
        let other = dir.path().join("t.idx");
        tiny.save(&other).unwrap();
        let len = std::fs::metadata(SmallFiles::path(&other)).unwrap().len();
        assert!(len < 100, "{len} bytes");
        let t = SmallIndex::open(&other).unwrap().unwrap();
        assert_eq!(
            (t.device_blocks(), t.placed_at(10)),
            (None, Some(Placed::Tiny(b"yz")))
        );
        assert_eq!(SmallFiles::load(&other).unwrap().unwrap(), tiny);
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
        // Saved beside a second index (a completed lazy layer's two names), the same file is
        // there too: linked, not written again (and not skipped).
        let c = dir.path().join("c.idx");
        spilled.save(&c).unwrap();
        assert_eq!(SmallFiles::load(&c).unwrap().unwrap(), held);
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(SmallFiles::path(p)).unwrap().ino();
        assert_eq!(ino(&a), ino(&c));
        spilled.save(&a).unwrap(); // again where it is: nothing to do
        assert_eq!(SmallFiles::load(&a).unwrap().unwrap(), held);
        drop(spilled);
        assert!(!tmp.exists(), "the spill file is removed");
        // Dropped unsaved, it leaves nothing either.
        let other = SmallFiles::spilling(SMALL_MAX, tmp.clone()).unwrap();
        assert!(tmp.exists());
        drop(other);
        assert!(!tmp.exists());
    }

    /// A write to the spill that fails (the disk full, a file size limit) may leave part of a
    /// file's blocks in the stream; if later ones succeed and the table is saved, the blocks
    /// its records name must still hold those files' bytes — or the save fails. Run in a child
    /// process: it sets a file size limit, which is the process's.
    #[test]
    fn a_failed_spill_write_never_saves_misplaced_bytes() {
        if !in_child("a_failed_spill_write_never_saves_misplaced_bytes") {
            return;
        }
        // SAFETY: ignoring SIGXFSZ has no preconditions (a write past the limit then fails
        // with EFBIG instead of ending the process).
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        let set_limit = |n: u64| {
            let l = libc::rlimit {
                rlim_cur: n,
                rlim_max: libc::RLIM_INFINITY,
            };
            // SAFETY: a valid rlimit.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &l) }, 0);
        };
        let dir = tempfile::tempdir().unwrap();
        let (mut failed, mut tried) = (0, 0);
        // Limits cutting a flush of the spill's buffer short at various points of a file.
        for cut in (0..12u64).map(|j| 300_000 + j * 1_000) {
            let tmp = dir.path().join("spill");
            let mut spilled = SmallFiles::spilling(SMALL_MAX, tmp).unwrap();
            let mut kept = SmallFiles::default();
            let bytes = |i: u64| -> Vec<u8> { (0..5_000).map(|k| (k * 7 + i * 3) as u8).collect() };
            set_limit(cut);
            for i in 0..100 {
                // A table in memory being saved pushes whatever comes, failed or not.
                match spilled.push_from(i * 65_536, 5_000, &bytes(i)[..]) {
                    Ok(()) => kept.push(i * 65_536, &bytes(i)),
                    Err(_) => failed += 1,
                }
            }
            set_limit(libc::RLIM_INFINITY);
            for i in 100..200 {
                if spilled.push_from(i * 65_536, 5_000, &bytes(i)[..]).is_ok() {
                    kept.push(i * 65_536, &bytes(i));
                }
            }
            let index = dir.path().join(format!("{cut}.idx"));
            if spilled.save(&index).is_ok() {
                let saved = SmallFiles::load(&index).unwrap().unwrap();
                assert!(
                    saved == kept,
                    "limit {cut}: the saved bytes are not the files'"
                );
            }
            tried += 1;
        }
        assert!(failed > 0, "no write failed");
        eprintln!("{tried} limits tried, {failed} writes failed");
        eprintln!("child done");
    }

    /// Runs the test `name` (of this module) again in a child process, for limits that are
    /// the process's, and checks that it passed; true in that child, which runs the test.
    fn in_child(name: &str) -> bool {
        const CHILD: &str = "BUX_TEST_SMALL_CHILD";
        if std::env::var_os(CHILD).is_some() {
            return true;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .arg(format!("index::small::tests::{name}"))
            .args(["--exact", "--nocapture", "--test-threads", "1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.contains("child done"),
            "{name}: {said} {out:?}"
        );
        false
    }

    /// A damaged file claiming a table (or a table's content) of gigabytes is refused without
    /// a buffer of that size: under an address-space limit a gigabyte above what the process
    /// holds, such a buffer is refused, which aborts the process.
    #[test]
    fn damaged_lengths_make_no_huge_buffers() {
        if !in_child("damaged_lengths_make_no_huge_buffers") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.idx");
        let mut s = SmallFiles::default();
        for i in 0..10u64 {
            s.push(i * 65_536, &vec![i as u8; [8, 600, 5000][i as usize % 3]]);
        }
        s.save(&index).unwrap();
        let path = SmallFiles::path(&index);
        let good = std::fs::read(&path).unwrap();
        let table_at = u64::from_le_bytes(good[8..16].try_into().unwrap()) as usize;
        // A frame whose header says it holds 3 GB (and holds nothing).
        let mut claims = vec![0x28, 0xb5, 0x2f, 0xfd, 0xc0, 0x00];
        claims.extend(3_000_000_000u64.to_le_bytes());
        claims.extend([0x01, 0x00, 0x00]);
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&claims).unwrap(),
            Some(3_000_000_000)
        );
        let mut long = good.clone();
        long[16..24].copy_from_slice(&4_000_000_000u64.to_le_bytes());
        let mut far = good.clone();
        far[8..16].copy_from_slice(&(u64::MAX - 4095).to_le_bytes());
        let mut big_table = good[..table_at].to_vec();
        big_table[16..24].copy_from_slice(&(claims.len() as u64).to_le_bytes());
        big_table.extend(&claims);
        let mut v2 = MAGIC_V2.to_vec();
        v2.extend((claims.len() as u64).to_le_bytes());
        v2.extend(&claims);
        let v1 = [&MAGIC_V1[..], &claims].concat();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let limit = (vm << 10) + (1 << 30);
        let l = libc::rlimit {
            rlim_cur: limit,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &l) }, 0);
        for (what, bytes) in [
            ("table length", long),
            ("table past the end of everything", far),
            ("table content", big_table),
            ("second format", v2),
            ("first format", v1),
        ] {
            std::fs::write(&path, bytes).unwrap();
            let err = SmallFiles::load(&index).unwrap_err().to_string();
            assert!(err.contains("x.small"), "{what}: {err}");
            let err = SmallIndex::open(&index).err().map(|e| e.to_string());
            assert!(err.is_some_and(|e| e.contains("x.small")), "{what}: opened");
        }
        eprintln!("child done");
    }
}
