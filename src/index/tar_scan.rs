//! One pass over a layer's uncompressed tar stream, producing its per-file table.
//!
//! Paths are kept as bytes (tar names need not be UTF-8) and normalized here, once: leading `/`
//! and `./` and empty or `.` components are dropped (the layer root is the filesystem root, as
//! every unpacker treats it), and a `..` component is refused — a malicious path never reaches the
//! merged tree as written.

use std::cell::RefCell;
use std::io::Read;
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use tar::EntryType;

use crate::{Digest, Error, Result};

/// What a tar entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file; its bytes are at `offset` in the uncompressed stream.
    File,
    /// A directory.
    Dir,
    /// A symbolic link to `link`.
    Symlink,
    /// A hard link to the earlier entry at path `link`.
    Hardlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
}

/// One entry of a layer, as the layer's tar states it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarEntry {
    /// Normalized path relative to the root, `/`-separated, no trailing slash; empty for the root.
    pub path: Vec<u8>,
    /// What the entry is.
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch (may be negative).
    pub mtime: i64,
    /// Nanoseconds part of the modification time (PAX sub-second times).
    pub mtime_nsec: u32,
    /// Size of the data in bytes (0 except for regular files).
    pub size: u64,
    /// Symlink target (as written) or hardlink target (normalized path).
    pub link: Vec<u8>,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// Extended attributes from PAX `SCHILY.xattr.*` records.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Offset of the data in the layer's uncompressed tar stream.
    pub offset: u64,
    /// For sparse files: the data extents; everything else reads as zeros.
    pub sparse: Option<Vec<Extent>>,
}

/// A data extent of a sparse file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Offset in the file.
    pub file_off: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of these bytes in the layer's uncompressed stream.
    pub stream_off: u64,
}

/// Largest PAX extended header or GNU long name/link accepted. The tar crate reads these whole
/// into memory, so a bigger one (only a hostile layer has one) is refused before it is read.
pub const MAX_META_ENTRY: u64 = 1 << 20;
/// Most extents accepted in one sparse file's map.
pub const MAX_SPARSE_EXTENTS: usize = 1 << 20;
/// Most entries accepted in one layer, and most bytes of names, link targets and xattrs: with
/// them a layer's table stays under ~1.5 GiB of memory however the tar is built (real layers
/// are far below: a full Debian with toolchains has ~100k entries).
pub const MAX_ENTRIES: usize = 4_000_000;
/// See [`MAX_ENTRIES`].
pub const MAX_METADATA_BYTES: usize = 1 << 30;
const BLOCK: u64 = 512;

/// Watches the stream under the tar reader: remembers recent 512-byte header blocks (the GNU
/// sparse extension headers the tar crate consumes without exposing) and refuses oversized
/// metadata entries before the tar crate buffers them.
struct Tap<R> {
    inner: R,
    pos: u64,
    pending: Vec<u8>,
    pending_start: u64,
    recent: Rc<RefCell<RecentBlocks>>,
}

/// The last [`RECENT_BLOCKS`] header-sized blocks read, by stream offset.
#[derive(Default)]
struct RecentBlocks(std::collections::VecDeque<(u64, Box<[u8; 512]>)>);

impl RecentBlocks {
    fn block_at(&self, off: u64) -> Option<&[u8; 512]> {
        self.0
            .iter()
            .rev()
            .find(|(p, _)| *p == off)
            .map(|(_, b)| &**b)
    }
}

const RECENT_BLOCKS: usize = 256;

impl<R: Read> Tap<R> {
    fn new(inner: R, recent: Rc<RefCell<RecentBlocks>>) -> Self {
        Tap {
            inner,
            pos: 0,
            pending: Vec::with_capacity(512),
            pending_start: 0,
            recent,
        }
    }

    fn complete_block(&mut self) -> std::io::Result<()> {
        let mut block = Box::new([0u8; 512]);
        block.copy_from_slice(&self.pending);
        let typeflag = block[156];
        if matches!(typeflag, b'x' | b'g' | b'L' | b'K') && header_checksum_ok(&block) {
            let size = parse_num(&block[124..136]).unwrap_or(u64::MAX);
            if size > MAX_META_ENTRY {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "a {} header of {size} bytes at offset {} (limit {MAX_META_ENTRY})",
                        if typeflag == b'x' || typeflag == b'g' {
                            "PAX"
                        } else {
                            "GNU long name"
                        },
                        self.pending_start
                    ),
                ));
            }
        }
        let mut recent = self.recent.borrow_mut();
        if recent.0.len() == RECENT_BLOCKS {
            recent.0.pop_front();
        }
        recent.0.push_back((self.pending_start, block));
        drop(recent);
        self.pending.clear();
        Ok(())
    }
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        // Header blocks are read in requests of at most one block, starting block-aligned.
        if buf.len() as u64 <= BLOCK && n > 0 {
            if self.pos % BLOCK == 0 {
                self.pending.clear();
                self.pending_start = self.pos;
            }
            if self.pending_start + self.pending.len() as u64 == self.pos
                && self.pending.len() + n <= BLOCK as usize
            {
                self.pending.extend_from_slice(&buf[..n]);
                if self.pending.len() == BLOCK as usize {
                    self.complete_block()?;
                }
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

fn header_checksum_ok(block: &[u8; 512]) -> bool {
    let Some(want) = parse_num(&block[148..156]) else {
        return false;
    };
    let sum: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    sum == want
}

/// A tar numeric field: octal (space/NUL padded) or GNU base-256.
fn parse_num(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| *b != 0 && *b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&s).ok()?, 8).ok()
}

/// Builds a sparse file's extents from its (offset, length) map, its data laid out back to back
/// from `data_start`; checks order, overlap and that the map fits the file and the data.
fn extents_from_map(
    map: &[(u64, u64)],
    data_start: u64,
    real_size: u64,
    stored: u64,
) -> std::result::Result<Vec<Extent>, String> {
    let mut out = Vec::with_capacity(map.len());
    let (mut file_end, mut stream) = (0u64, data_start);
    for &(off, len) in map {
        if off < file_end {
            return Err("sparse map out of order or overlapping".into());
        }
        let end = off.checked_add(len).ok_or("sparse map overflows")?;
        if end > real_size {
            return Err("sparse map extends past the file size".into());
        }
        if len > 0 {
            out.push(Extent {
                file_off: off,
                len,
                stream_off: stream,
            });
        }
        file_end = end;
        stream = stream.checked_add(len).ok_or("sparse map overflows")?;
    }
    if stream - data_start > stored {
        return Err("sparse map holds more data than the entry".into());
    }
    Ok(out)
}

/// Reads a GNU old-style sparse map: 4 slots in the header, 21 per extension block.
fn gnu_sparse_map(
    header: &tar::Header,
    tap: &RecentBlocks,
    header_data_pos: u64,
) -> std::result::Result<(Vec<(u64, u64)>, u64), String> {
    let raw = header.as_bytes();
    let mut map = Vec::new();
    fn push(map: &mut Vec<(u64, u64)>, slot: &[u8]) -> std::result::Result<(), String> {
        let off = parse_num(&slot[..12]).ok_or("bad sparse offset")?;
        let len = parse_num(&slot[12..24]).ok_or("bad sparse length")?;
        if off != 0 || len != 0 {
            map.push((off, len));
        }
        Ok(())
    }
    for i in 0..4 {
        push(&mut map, &raw[386 + i * 24..386 + (i + 1) * 24])?;
    }
    let mut extended = raw[482] != 0;
    let mut pos = header_data_pos;
    while extended {
        let block = tap
            .block_at(pos)
            .ok_or("sparse extension header not seen (map too large)")?;
        for i in 0..21 {
            push(&mut map, &block[i * 24..(i + 1) * 24])?;
        }
        extended = block[504] != 0;
        pos += BLOCK;
        if map.len() > MAX_SPARSE_EXTENTS {
            return Err("sparse map too large".into());
        }
    }
    Ok((map, pos))
}

/// Reads a PAX 1.0 sparse map from the start of the entry's data: decimal numbers, one per
/// line (count, then offset/length pairs), padded to a block.
fn pax1_sparse_map(data: &mut impl Read) -> std::result::Result<(Vec<(u64, u64)>, u64), String> {
    let mut consumed = 0u64;
    let mut line = Vec::new();
    let mut next = |data: &mut dyn Read| -> std::result::Result<u64, String> {
        line.clear();
        let mut b = [0u8];
        loop {
            data.read_exact(&mut b)
                .map_err(|e| format!("sparse map: {e}"))?;
            consumed += 1;
            if b[0] == b'\n' {
                break;
            }
            if line.len() > 20 {
                return Err("sparse map: number too long".into());
            }
            line.push(b[0]);
        }
        std::str::from_utf8(&line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "sparse map: not a number".to_string())
    };
    let count = next(data)? as usize;
    if count > MAX_SPARSE_EXTENTS {
        return Err("sparse map too large".into());
    }
    let mut map = Vec::with_capacity(count);
    for _ in 0..count {
        let off = next(data)?;
        let len = next(data)?;
        map.push((off, len));
    }
    Ok((map, consumed.div_ceil(BLOCK) * BLOCK))
}

/// Reads a PAX 0.0/0.1 sparse map from the extension records.
fn pax0_sparse_map(
    offsets: &[u64],
    lengths: &[u64],
    map01: Option<&[u8]>,
) -> std::result::Result<Vec<(u64, u64)>, String> {
    if let Some(m) = map01 {
        let nums: Vec<u64> = std::str::from_utf8(m)
            .map_err(|_| "sparse map not UTF-8")?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| "sparse map: not a number".to_string())
            })
            .collect::<std::result::Result<_, _>>()?;
        if nums.len() % 2 != 0 || nums.len() / 2 > MAX_SPARSE_EXTENTS {
            return Err("sparse map: odd or too many numbers".into());
        }
        return Ok(nums.chunks(2).map(|c| (c[0], c[1])).collect());
    }
    if offsets.len() != lengths.len() {
        return Err("sparse map: offsets and lengths differ in number".into());
    }
    Ok(offsets
        .iter()
        .copied()
        .zip(lengths.iter().copied())
        .collect())
}

/// Normalizes a tar path; `Err` names why it is refused.
pub fn normalize_path(raw: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
    if raw.contains(&0) {
        return Err("path contains a NUL byte");
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path has a `..` component"),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// Parses a PAX time (`123`, `123.45`, `-1.5`) into seconds and nanoseconds.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos: u32 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nanos += (b - b'0') as u32 * 10u32.pow(8 - i as u32);
    }
    if !neg {
        Some((secs, nanos))
    } else if nanos == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nanos))
    }
}

fn bad(layer: Digest, path: &[u8], detail: impl Into<String>) -> Error {
    Error::BadEntry {
        layer,
        path: String::from_utf8_lossy(path).into_owned(),
        detail: detail.into(),
    }
}

/// Reads every entry of the tar stream; returns the table and the reader, positioned after the
/// end-of-archive marker (the caller drains the rest to finish the stream's digest).
pub fn scan<R: Read>(reader: R, layer: Digest) -> Result<(Vec<TarEntry>, R)> {
    scan_keeping(reader, layer, None)
}

/// [`scan`], keeping in `small` the bytes of every regular file it keeps (bytes the scan reads
/// anyway).
pub fn scan_keeping<R: Read>(
    reader: R,
    layer: Digest,
    mut small: Option<&mut super::small::SmallFiles>,
) -> Result<(Vec<TarEntry>, R)> {
    let recent = Rc::new(RefCell::new(RecentBlocks::default()));
    let mut archive = tar::Archive::new(Tap::new(reader, recent.clone()));
    let mut out = Vec::new();
    // Only bad data is a corrupt layer; a full disk or a lost connection is said as such.
    let io_err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::InvalidData
        | std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::InvalidInput
        | std::io::ErrorKind::Other => Error::CorruptLayer {
            layer,
            detail: format!("reading tar stream: {e}"),
        },
        _ => Error::io(format!("reading layer {layer}"), e),
    };
    let mut metadata_bytes = 0usize;
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        if let Some(e) = scan_entry(&mut entry, layer, &recent)? {
            metadata_bytes += e.path.len()
                + e.link.len()
                + e.xattrs
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            if out.len() >= MAX_ENTRIES || metadata_bytes > MAX_METADATA_BYTES {
                return Err(Error::CorruptLayer {
                    layer,
                    detail: format!(
                        "more than {MAX_ENTRIES} entries or {MAX_METADATA_BYTES} bytes of names \
                         (refused as a tar bomb)"
                    ),
                });
            }
            if let Some(small) = small.as_deref_mut() {
                if e.kind == EntryKind::File && e.sparse.is_none() && e.size > 0 {
                    small
                        .push_from(e.offset, e.size, &mut entry)
                        .map_err(io_err)?;
                }
            }
            out.push(e);
        }
    }
    Ok((out, archive.into_inner().inner))
}

/// Sparse-file facts gathered from PAX records.
#[derive(Default)]
struct PaxSparse {
    seen: bool,
    major: Option<u64>,
    name: Option<Vec<u8>>,
    size: Option<u64>,
    offsets: Vec<u64>,
    lengths: Vec<u64>,
    map: Option<Vec<u8>>,
}

fn scan_entry<R: Read>(
    entry: &mut tar::Entry<'_, Tap<R>>,
    layer: Digest,
    recent: &RefCell<RecentBlocks>,
) -> Result<Option<TarEntry>> {
    let io_err = |e: std::io::Error| Error::CorruptLayer {
        layer,
        detail: format!("reading tar stream: {e}"),
    };
    let mut raw_path = entry.path_bytes().into_owned();
    let header = entry.header().clone();
    let etype = header.entry_type();
    let mut kind = match etype {
        EntryType::Regular | EntryType::Continuous if raw_path.ends_with(b"/") => EntryKind::Dir,
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => EntryKind::File,
        EntryType::Directory => EntryKind::Dir,
        EntryType::Symlink => EntryKind::Symlink,
        EntryType::Link => EntryKind::Hardlink,
        EntryType::Char => EntryKind::Char,
        EntryType::Block => EntryKind::Block,
        EntryType::Fifo => EntryKind::Fifo,
        EntryType::XGlobalHeader => return Ok(None),
        other => {
            return Err(bad(
                layer,
                &raw_path,
                format!("unsupported tar entry type {:?}", other.as_byte() as char),
            ))
        }
    };
    // Some writers leave numeric fields blank (all NUL or spaces): that reads as 0.
    let num = |r: std::io::Result<u64>, field: &[u8], what: &str, path: &[u8]| -> Result<u64> {
        match r {
            Ok(v) => Ok(v),
            Err(_) if field.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
            Err(e) => Err(bad(layer, path, format!("bad {what} field: {e}"))),
        }
    };
    let old = header.as_old();
    let mode = num(header.mode().map(u64::from), &old.mode, "mode", &raw_path)? as u32 & 0o7777;
    let mut uid = num(header.uid(), &old.uid, "uid", &raw_path)?;
    let mut gid = num(header.gid(), &old.gid, "gid", &raw_path)?;
    let mut mtime = num(header.mtime(), &old.mtime, "mtime", &raw_path)? as i64;
    let mut mtime_nsec = 0;
    let dev_major = header.device_major().ok().flatten().unwrap_or(0);
    let dev_minor = header.device_minor().ok().flatten().unwrap_or(0);
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut ps = PaxSparse::default();
    if let Some(pax) = entry.pax_extensions().map_err(io_err)? {
        for ext in pax {
            let ext = ext.map_err(io_err)?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            let parse_u64 = |v: &[u8], what: &str| -> Result<u64> {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| bad(layer, &raw_path, format!("bad PAX {what}")))
            };
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.retain(|(k, _)| k != name);
                xattrs.push((name.to_vec(), value.to_vec()));
            } else if key == b"uid" {
                uid = parse_u64(value, "uid")?;
            } else if key == b"gid" {
                gid = parse_u64(value, "gid")?;
            } else if key == b"mtime" {
                (mtime, mtime_nsec) =
                    parse_pax_time(value).ok_or_else(|| bad(layer, &raw_path, "bad PAX mtime"))?;
            } else if let Some(k) = key.strip_prefix(b"GNU.sparse.") {
                ps.seen = true;
                match k {
                    b"major" => ps.major = Some(parse_u64(value, "sparse major")?),
                    b"name" => ps.name = Some(value.to_vec()),
                    b"size" | b"realsize" => ps.size = Some(parse_u64(value, "sparse size")?),
                    b"offset" => ps.offsets.push(parse_u64(value, "sparse offset")?),
                    b"numbytes" => ps.lengths.push(parse_u64(value, "sparse numbytes")?),
                    b"map" => ps.map = Some(value.to_vec()),
                    _ => {}
                }
            }
        }
    }
    if let Some(name) = &ps.name {
        raw_path = name.clone();
    }
    let path = normalize_path(&raw_path).map_err(|why| bad(layer, &raw_path, why))?;
    let link = match kind {
        EntryKind::Symlink => entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default(),
        EntryKind::Hardlink => {
            let target = entry.link_name_bytes().unwrap_or_default();
            normalize_path(&target)
                .map_err(|why| bad(layer, &raw_path, format!("hardlink target: {why}")))?
        }
        _ => Vec::new(),
    };
    let (uid, gid) = match (u32::try_from(uid), u32::try_from(gid)) {
        (Ok(u), Ok(g)) => (u, g),
        _ => return Err(bad(layer, &raw_path, "uid or gid does not fit in 32 bits")),
    };
    let mut offset = entry.raw_file_position();
    let mut size = if kind == EntryKind::File {
        entry.size()
    } else {
        0
    };
    let mut sparse = None;
    // The bytes the entry stores: the PAX size where one was given (the tar crate applies it),
    // else the header's.
    let stored = if ps.seen {
        entry.size()
    } else {
        header.entry_size().unwrap_or(0)
    };
    let sparse_err = |e: String| bad(layer, &raw_path, e);
    if etype == EntryType::GNUSparse {
        let (map, data_start) =
            gnu_sparse_map(&header, &recent.borrow(), offset).map_err(sparse_err)?;
        let real = parse_num(&header.as_bytes()[483..495])
            .ok_or_else(|| sparse_err("bad real size".into()))?;
        sparse = Some(extents_from_map(&map, data_start, real, stored).map_err(sparse_err)?);
        size = real;
        offset = data_start;
    } else if ps.seen && kind == EntryKind::File {
        let real = ps
            .size
            .ok_or_else(|| sparse_err("PAX sparse file without a size".into()))?;
        let (map, data_start, data_len) = if ps.major == Some(1) {
            // PAX 1.0: the map is at the start of the entry's data, not part of the file.
            let (map, map_len) = pax1_sparse_map(entry).map_err(sparse_err)?;
            (map, offset + map_len, stored.saturating_sub(map_len))
        } else {
            (
                pax0_sparse_map(&ps.offsets, &ps.lengths, ps.map.as_deref()).map_err(sparse_err)?,
                offset,
                stored,
            )
        };
        sparse = Some(extents_from_map(&map, data_start, real, data_len).map_err(sparse_err)?);
        size = real;
        offset = data_start;
    }
    if size > i64::MAX as u64 {
        // st_size is signed: a bigger size reads back negative.
        return Err(bad(
            layer,
            &raw_path,
            format!("size {size} is beyond what a file can have"),
        ));
    }
    if kind == EntryKind::File && path.is_empty() {
        kind = EntryKind::Dir; // a "./" regular entry is nonsense; treat as the root dir
    }
    Ok(Some(TarEntry {
        path,
        kind,
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec,
        size,
        link,
        dev_major,
        dev_minor,
        xattrs,
        offset,
        sparse,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"./etc/passwd", Some(b"etc/passwd")),
            (b"/etc//passwd", Some(b"etc/passwd")),
            (b"etc/dir/", Some(b"etc/dir")),
            (b"./", Some(b"")),
            (b"a/./b", Some(b"a/b")),
            (b"a/../b", None),
            (b"..", None),
            (b"../../etc/shadow", None),
            (b".wh...", Some(b".wh...")),
        ];
        for (raw, want) in cases {
            let got = normalize_path(raw).ok();
            assert_eq!(got.as_deref(), *want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn sparse_maps_that_overflow_are_refused() {
        let err = extents_from_map(&[(0, u64::MAX), (u64::MAX, 1)], 512, u64::MAX, 10).unwrap_err();
        assert!(
            err.contains("overflow") || err.contains("out of order"),
            "{err}"
        );
        let err = extents_from_map(&[(0, 10), (20, u64::MAX - 5)], u64::MAX - 8, u64::MAX, 100)
            .unwrap_err();
        assert!(err.contains("overflow"), "{err}");
        // The stored data bounds the map: 20 bytes of extents in 10 stored bytes are refused.
        assert!(extents_from_map(&[(0, 10), (100, 10)], 0, 200, 10).is_err());
        assert!(extents_from_map(&[(0, 10), (100, 10)], 0, 200, 20).is_ok());
    }

    #[test]
    fn parses_pax_times() {
        assert_eq!(parse_pax_time(b"1700000000"), Some((1700000000, 0)));
        assert_eq!(
            parse_pax_time(b"1700000000.123456789"),
            Some((1700000000, 123456789))
        );
        assert_eq!(parse_pax_time(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"-100"), Some((-100, 0)));
        assert_eq!(parse_pax_time(b"abc"), None);
        assert_eq!(parse_pax_time(b"1.2x"), None);
        // Extremes: representable ones parse, the rest are refused, nothing overflows.
        assert_eq!(
            parse_pax_time(b"-9223372036854775807.5"),
            Some((i64::MIN, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"-9223372036854775808"), None);
        assert_eq!(parse_pax_time(b"-9223372036854775808.5"), None);
        assert_eq!(parse_pax_time(b"9223372036854775808"), None);
    }

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    #[test]
    fn records_offsets_links_and_xattrs() {
        let data = tar_of(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_path("./bin/hello").unwrap();
            h.set_size(5);
            h.set_mode(0o4755);
            h.set_uid(70000);
            h.set_entry_type(EntryType::Regular);
            h.set_cksum();
            b.append(&h, &b"hello"[..]).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(EntryType::Link);
            h.set_size(0);
            b.append_link(&mut h, "bin/hi", "./bin/hello").unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "lib", "/usr/lib").unwrap();
            b.append_pax_extensions([("SCHILY.xattr.user.k", &b"\x00\x01v"[..])])
                .unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_path("data").unwrap();
            h.set_size(3);
            h.set_cksum();
            b.append(&h, &b"abc"[..]).unwrap();
        });
        let (entries, _) = scan(&data[..], Digest::of(b"")).unwrap();
        assert_eq!(entries.len(), 4);
        let f = &entries[0];
        assert_eq!(f.path, b"bin/hello");
        assert_eq!(
            (f.kind, f.mode, f.uid, f.size),
            (EntryKind::File, 0o4755, 70000, 5)
        );
        assert_eq!(&data[f.offset as usize..f.offset as usize + 5], b"hello");
        assert_eq!(entries[1].kind, EntryKind::Hardlink);
        assert_eq!(entries[1].link, b"bin/hello");
        assert_eq!(entries[2].link, b"/usr/lib");
        let d = &entries[3];
        assert_eq!(d.xattrs, vec![(b"user.k".to_vec(), b"\x00\x01v".to_vec())]);
        assert_eq!(&data[d.offset as usize..d.offset as usize + 3], b"abc");
    }

    #[test]
    fn refuses_dotdot_paths() {
        let data = tar_of(|b| {
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../etc/passwd");
            h.set_size(0);
            h.set_cksum();
            b.append(&h, &b""[..]).unwrap();
        });
        let err = scan(&data[..], Digest::of(b"")).unwrap_err().to_string();
        assert!(err.contains("../etc/passwd") && err.contains(".."), "{err}");
    }
}
