//! Reading a layer's small-file table back: [`SmallIndex`] finds a file's bytes by its offset
//! in the layer's stream (in blocks of their own, or tiny ones in the table), reads earlier
//! formats, and gives the metadata image what it needs of a table as a device ([`Blocks`]).

use super::*;

/// The records of a layer's saved small files without their bytes: what a metadata image is
/// laid out by, holding 12 bytes a file; [`SmallIndex::each`] then reads the bytes through
/// once, in order, without holding them.
pub(crate) struct SmallIndex {
    path: PathBuf,
    /// (offset in the stream, length), ascending by offset.
    files: Vec<(u64, u32)>,
    body: Body,
}

pub(super) enum Body {
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
    pub(super) files: Vec<(u64, u32, u32)>,
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
    pub(super) fn parse(
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
    pub(super) fn tiny_bytes(&self, i: usize) -> Option<&[u8]> {
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
