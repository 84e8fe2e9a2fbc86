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
//!
//! Here: keeping the bytes while a layer is indexed, and writing and loading a table whole;
//! `index` reads a stored table in place (by offset, or as the metadata image's device).

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::IoContext;
use crate::{Error, Result};

mod index;
#[cfg(test)]
mod tests;

pub(crate) use index::{frame_digest, Blocks, Placed, SmallIndex};

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
