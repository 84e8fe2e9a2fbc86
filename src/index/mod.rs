//! The layer index: one pass over a layer produces its per-file offset table and the means to
//! read any byte range of its uncompressed tar stream back without decompressing from the start.
//!
//! Random access, per compression:
//! * **gzip** — zran-style checkpoints (see [`gzip`]): a restart point at a deflate block boundary
//!   every [`GZIP_SPACING`] of output, with its 32 KiB window stored zstd-compressed. The blob
//!   itself is kept as pulled.
//! * **zstd** — a single zstd frame cannot be entered mid-way, and most zstd layers are one frame.
//!   While indexing, the decompressed stream is re-encoded into independent zstd frames of
//!   [`ZSTD_FRAME`] each (a "seekable" copy, [`zstd_frames`]); reads decompress only the frames
//!   they touch.
//! * **plain tar** — the blob is the uncompressed stream; reads are `pread`s.

mod beside;
pub mod blob;
pub mod chunked;
pub mod estargz;
pub mod gzip;
pub(crate) mod gzip_whole;
pub mod published;
pub mod reader;
pub mod small;
pub mod small_reads;
mod span_buffers;
pub mod span_cache;
pub mod tar_scan;
pub mod zstd_frames;

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use reader::LayerReader;
pub use span_cache::{ReadStats, SpanCache};
pub use tar_scan::{EntryKind, Extent, TarEntry};

use crate::digest::Hasher;
use crate::error::IoContext;
use crate::{Digest, Error, Result};

/// Output between two gzip checkpoints of a stored layer. A cold random read inflates from the
/// checkpoint before it to its own end: an eighth of a MiB on average here. Measured on the
/// large Debian image, root's shared mount: random 128 KiB cold read p50 1.14 ms against
/// 1.27 ms at 512 KiB, for 30.7 MB more of windows in the store (+0.067× the compressed
/// image; one ~14 KiB compressed window per checkpoint); 1 MiB had given 2.39 ms against
/// 1.62 ms at 512 KiB.
pub const GZIP_SPACING: u64 = 256 << 10;
/// Spacing of the checkpoints in published indexes, as every version since they exist
/// publishes and checks them: a layer's stored checkpoints hold all of these (see
/// [`gzip::GzipReader::with_sparser`]), and [`Access::published`] picks them out, so that an
/// index built here says what a published one says, whichever version published it, and an
/// index published from here says what an earlier version builds.
pub const PUBLISHED_SPACING: u64 = 512 << 10;
/// Uncompressed size of each frame of the seekable zstd copy.
pub const ZSTD_FRAME: usize = 1 << 20;
/// zstd level for the seekable copy (the fast default).
pub const ZSTD_LEVEL: i32 = 3;

/// Numbers this process's temp files apart.
static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const MAGIC: &[u8; 8] = b"BUXIDX\x00\x03";
/// Access tables of the first format: the whole table postcard-encoded (windows inline).
const ACCESS_MAGIC_V1: &[u8; 8] = b"BUXACC\x00\x01";
/// Access tables now: `ACCESS_MAGIC`, the length of the table (u64 LE), the table
/// postcard-encoded ([`AccessFile`]: gzip windows left out), then the windows end to end. A
/// mount maps the file and reads each window where it lies.
const ACCESS_MAGIC: &[u8; 8] = b"BUXACC\x00\x02";

/// Deserializes a sequence of at most `N` elements, refusing a longer one as soon as it
/// passes `N` (before holding more): for tables read from the network, whose lengths are
/// stated by whoever wrote them.
pub(crate) fn bounded_vec<'de, D, T, const N: usize>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    use serde::de::{Error as _, SeqAccess, Visitor};
    struct Bounded<T, const N: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for Bounded<T, N> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a sequence of at most {N} elements")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Vec<T>, A::Error> {
            let too_many = || A::Error::custom(format!("more than {N} elements"));
            let hint = seq.size_hint().unwrap_or(0);
            if hint > N {
                return Err(too_many());
            }
            let mut out = Vec::with_capacity(hint.min(4096));
            while let Some(x) = seq.next_element()? {
                if out.len() == N {
                    return Err(too_many());
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded::<T, N>(std::marker::PhantomData))
}

/// The table part of an access file.
#[derive(Serialize, Deserialize)]
struct AccessFile {
    /// The access method, gzip checkpoints without their windows.
    access: Access,
    /// Per gzip checkpoint: (offset, length) of its window after the table.
    windows: Vec<(u64, u32)>,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// Uncompressed tar.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

impl Compression {
    /// The compression of a layer media type, or `None` if it is not a layer type we can serve.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }
}

/// How to reach a byte of the uncompressed stream. Stored once per layer, in its own file
/// (`<digest>.access`), which every image's tree shares.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub enum Access {
    /// The blob is the stream.
    #[default]
    Tar,
    /// Checkpoints into the gzip blob, first at offset 0, ascending.
    Gzip(Vec<gzip::Checkpoint>),
    /// Frames of the seekable zstd copy: (uncompressed offset, compressed offset), ascending.
    Zstd(Vec<(u64, u64)>),
    /// Independent zstd frames inside the blob itself, not back to back (zstd:chunked: each
    /// file's content in its own frames, tar headers in others). The stream these offsets
    /// address is the files' contents laid end to end (see [`chunked`]).
    Frames(Vec<Frame>),
}

impl Access {
    /// The table as indexes are published and compared: a gzip layer's checkpoints every
    /// [`PUBLISHED_SPACING`] (those of a stored layer are denser, these among them; a table
    /// of that spacing already is its own).
    pub fn published(&self) -> Access {
        match self {
            Access::Gzip(cps) => Access::Gzip(gzip::sparser(cps, PUBLISHED_SPACING)),
            other => other.clone(),
        }
    }
}

/// One independently decodable zstd frame of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// Where its output starts in the layer's stream.
    pub uoff: u64,
    /// Its first byte in the blob.
    pub coff: u64,
    /// One past its last byte in the blob.
    pub cend: u64,
}

/// What the read path needs of a layer: where its bytes are and how to reach them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSource {
    /// Digest of the blob as pulled.
    pub digest: Digest,
    /// Compression of the blob.
    pub compression: Compression,
    /// Size of the uncompressed tar stream.
    pub uncompressed_size: u64,
    /// Random-access method (kept in the layer's `.access` file, not in trees).
    #[serde(skip)]
    pub access: Access,
}

/// Everything known about one layer after its single pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerIndex {
    /// Digest of the blob as pulled.
    pub digest: Digest,
    /// Digest of the uncompressed tar stream (the config's `diff_id`).
    pub diff_id: Digest,
    /// Compression of the blob.
    pub compression: Compression,
    /// Size of the blob.
    pub compressed_size: u64,
    /// Size of the uncompressed tar stream.
    pub uncompressed_size: u64,
    /// Random-access method (saved beside the index, see [`LayerIndex::access_path`]).
    #[serde(skip)]
    pub access: Access,
    /// The entries, in tar order.
    pub entries: Vec<TarEntry>,
    /// The bytes of its small files (saved beside the index, see [`small`]).
    #[serde(skip)]
    pub small: small::SmallFiles,
}

/// Counts and hashes what passes through (the uncompressed stream, for the diff_id).
struct Measured<R> {
    inner: R,
    hasher: Hasher,
    bytes: u64,
}

impl<R: Read> Read for Measured<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Scans a layer blob streamed through `blob`, in one pass. `seekable` receives the seekable
/// zstd copy for zstd layers (unused otherwise). The bytes of regular files of at most
/// `small_max` bytes are kept (see [`small`]; 0 keeps none). `blob` is read to its end.
pub fn build<R: Read>(
    blob: R,
    compression: Compression,
    digest: Digest,
    seekable: Option<&mut dyn Write>,
    small_max: u64,
) -> Result<LayerIndex> {
    let small = small::SmallFiles::up_to(small_max);
    build_keeping(blob, compression, digest, seekable, small)
}

/// [`build`], keeping small files' bytes in `small` (a pull's table spills them to disk as it
/// goes: see [`small::SmallFiles::spilling`]).
pub(crate) fn build_keeping<R: Read>(
    blob: R,
    compression: Compression,
    digest: Digest,
    seekable: Option<&mut dyn Write>,
    mut small: small::SmallFiles,
) -> Result<LayerIndex> {
    let corrupt = |detail: String| Error::CorruptLayer {
        layer: digest,
        detail,
    };
    let decode_err = |e: io::Error| match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => corrupt(e.to_string()),
        _ => Error::io(format!("reading layer {digest}"), e),
    };
    let (entries, uncompressed_size, diff_id, access) = match compression {
        Compression::None => {
            let (entries, m) = scan_and_drain(blob, digest, &mut small)?;
            (entries, m.bytes, m.hasher.finish(), Access::Tar)
        }
        Compression::Gzip => {
            let gz = gzip::GzipReader::new(blob, Some(GZIP_SPACING))
                .map_err(decode_err)?
                .with_sparser(PUBLISHED_SPACING);
            let gz = io::BufReader::with_capacity(INFLATE_CHUNK, gz);
            let (entries, m) = scan_and_drain(gz, digest, &mut small)?;
            let mut gz = m.inner.into_inner();
            let checkpoints = gz.take_checkpoints();
            (
                entries,
                m.bytes,
                m.hasher.finish(),
                Access::Gzip(checkpoints),
            )
        }
        Compression::Zstd => {
            let out = seekable.ok_or_else(|| corrupt("no output for the seekable copy".into()))?;
            let decoder = zstd::stream::read::Decoder::new(blob).map_err(decode_err)?;
            let framer = zstd_frames::Reframer::new(decoder, out, ZSTD_FRAME, ZSTD_LEVEL);
            let (entries, m) = scan_and_drain(framer, digest, &mut small)?;
            let frames = m.inner.finish().map_err(decode_err)?;
            (entries, m.bytes, m.hasher.finish(), Access::Zstd(frames))
        }
    };
    Ok(LayerIndex {
        digest,
        diff_id,
        compression,
        compressed_size: 0,
        uncompressed_size,
        access,
        entries,
        small,
    })
}

/// How much a layer's gzip stream is inflated at a time while it is indexed. The tar scan
/// asks for 512-byte headers and 32 KiB of skipped data; inflating into so small a buffer costs
/// zlib a copy of every byte into its window and the checkpoint ring another (one of the last
/// 32 KiB per call otherwise), ~10% of the inflate.
const INFLATE_CHUNK: usize = 256 << 10;

fn scan_and_drain<R: Read>(
    reader: R,
    digest: Digest,
    small: &mut small::SmallFiles,
) -> Result<(Vec<TarEntry>, Measured<R>)> {
    let measured = Measured {
        inner: reader,
        hasher: Hasher::default(),
        bytes: 0,
    };
    let (entries, mut measured) = tar_scan::scan_keeping(measured, digest, Some(small))?;
    // Whatever follows the end-of-archive marker still belongs to the stream and its diff_id.
    io::copy(&mut measured, &mut io::sink()).map_err(|e| Error::CorruptLayer {
        layer: digest,
        detail: format!("after the tar end: {e}"),
    })?;
    Ok((entries, measured))
}

impl LayerIndex {
    /// The read path's view of this layer.
    pub fn source(&self) -> LayerSource {
        LayerSource {
            digest: self.digest,
            compression: self.compression,
            uncompressed_size: self.uncompressed_size,
            access: self.access.clone(),
        }
    }

    /// Writes the index to `path` atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = MAGIC.to_vec();
        let body = postcard::to_allocvec(self).map_err(|e| Error::CorruptStore {
            path: path.into(),
            detail: format!("encoding index: {e}"),
        })?;
        bytes.extend_from_slice(&body);
        Self::save_access(path, &self.access)?;
        self.small.save(path)?;
        crate::store::write_atomic(path, &bytes)
    }

    /// Writes the access table: the table without the gzip windows, then the windows, each
    /// written from where it is (not gathered into one buffer first: a large layer's run to
    /// tens of megabytes).
    fn save_access(index_path: &Path, access: &Access) -> Result<()> {
        let path = Self::access_path(index_path);
        let mut windows: Vec<&[u8]> = Vec::new();
        let table = match access {
            Access::Gzip(cps) => {
                let mut spans = Vec::with_capacity(cps.len());
                let mut at = 0u64;
                let bare = cps
                    .iter()
                    .map(|cp| {
                        spans.push((at, cp.window.len() as u32));
                        at += cp.window.len() as u64;
                        windows.push(&cp.window);
                        gzip::Checkpoint {
                            uoff: cp.uoff,
                            coff: cp.coff,
                            bits: cp.bits,
                            member_start: cp.member_start,
                            window: gzip::Window::default(),
                        }
                    })
                    .collect();
                AccessFile {
                    access: Access::Gzip(bare),
                    windows: spans,
                }
            }
            other => AccessFile {
                access: other.clone(),
                windows: Vec::new(),
            },
        };
        let encoded = postcard::to_allocvec(&table).map_err(|e| Error::CorruptStore {
            path: path.clone(),
            detail: format!("encoding access: {e}"),
        })?;
        let mut head = ACCESS_MAGIC.to_vec();
        head.extend_from_slice(&(encoded.len() as u64).to_le_bytes());
        head.extend_from_slice(&encoded);
        // Written whole beside it, then renamed over it (as `write_atomic` does).
        let tmp = path.with_extension(format!(
            "tmp.{}.{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let written = (|| {
            let mut out = io::BufWriter::new(std::fs::File::create(&tmp)?);
            out.write_all(&head)?;
            for w in windows {
                out.write_all(w)?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.ctx(|| format!("writing {}", path.display()))?;
        crate::store::sync_dir(&path);
        Ok(())
    }

    /// Where the random-access table of the index at `index_path` lives.
    pub fn access_path(index_path: &Path) -> std::path::PathBuf {
        index_path.with_extension("access")
    }

    /// Reads only the random-access table of the index at `index_path` (what a mount needs).
    /// The table is mapped, and gzip windows are read from the map where they lie: what a
    /// mount holds of it is a few dozen bytes per checkpoint. A table of the first format is
    /// converted (rewritten) on the way.
    pub fn load_access(index_path: &Path) -> Result<Access> {
        let path = Self::access_path(index_path);
        let corrupt = |detail: String| Error::CorruptStore {
            path: path.clone(),
            detail,
        };
        let map = Arc::new(
            crate::mapped::Mapped::open(&path).ctx(|| format!("reading {}", path.display()))?,
        );
        let bytes = map.as_slice();
        if let Some(body) = bytes.strip_prefix(&ACCESS_MAGIC_V1[..]) {
            let access: Access = postcard::from_bytes(body)
                .map_err(|e| corrupt(format!("decoding access table: {e}")))?;
            if let Err(e) = Self::save_access(index_path, &access) {
                tracing::debug!("converting {}: {e}", path.display());
            }
            return Ok(access);
        }
        let body = bytes
            .strip_prefix(&ACCESS_MAGIC[..])
            .ok_or_else(|| corrupt("not an access table of this version".into()))?;
        let table_len = body
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .filter(|&n| n <= body.len() - 8)
            .ok_or_else(|| corrupt("access table cut short".into()))?;
        let mut table: AccessFile = postcard::from_bytes(&body[8..8 + table_len])
            .map_err(|e| corrupt(format!("decoding access table: {e}")))?;
        let blob_start = ACCESS_MAGIC.len() + 8 + table_len;
        if let Access::Gzip(cps) = &mut table.access {
            if table.windows.len() != cps.len() {
                return Err(corrupt(
                    "window table does not match the checkpoints".into(),
                ));
            }
            for (cp, &(off, len)) in cps.iter_mut().zip(&table.windows) {
                let start = blob_start.saturating_add(off as usize);
                let end = start.saturating_add(len as usize);
                if end > bytes.len() {
                    return Err(corrupt("a window lies outside the file".into()));
                }
                cp.window = gzip::Window::mapped(map.clone(), start..end);
            }
        }
        Ok(table.access)
    }

    /// Whether the access table at `index_path` is [`Access::Zstd`] (read from its first
    /// bytes: the tables of large gzip layers run to megabytes, and a mount asks this of every
    /// layer).
    pub fn access_is_zstd(index_path: &Path) -> Result<bool> {
        use std::io::Read;
        let path = Self::access_path(index_path);
        let mut head = Vec::with_capacity(ACCESS_MAGIC.len() + 9);
        std::fs::File::open(&path)
            .and_then(|f| f.take(ACCESS_MAGIC.len() as u64 + 9).read_to_end(&mut head))
            .ctx(|| format!("reading {}", path.display()))?;
        // postcard writes the variant's index first (a one-byte varint here), after the table's
        // length in this format, right after the magic in the first.
        let variant = match head.get(..ACCESS_MAGIC.len()) {
            Some(m) if m == ACCESS_MAGIC => head.get(ACCESS_MAGIC.len() + 8),
            Some(m) if m == ACCESS_MAGIC_V1 => head.get(ACCESS_MAGIC.len()),
            _ => None,
        };
        variant.map(|&v| v == 2).ok_or_else(|| Error::CorruptStore {
            path,
            detail: "not an access table of this version".into(),
        })
    }

    /// Reads an index written by [`LayerIndex::save`].
    pub fn load(path: &Path) -> Result<LayerIndex> {
        let bytes = std::fs::read(path).ctx(|| format!("reading {}", path.display()))?;
        let body = bytes
            .strip_prefix(&MAGIC[..])
            .ok_or_else(|| Error::CorruptStore {
                path: path.into(),
                detail: "not a layer index of this version".into(),
            })?;
        let mut idx: LayerIndex = postcard::from_bytes(body).map_err(|e| Error::CorruptStore {
            path: path.into(),
            detail: format!("decoding index: {e}"),
        })?;
        idx.access = Self::load_access(path)?;
        Ok(idx)
    }
}

/// Test bytes from xorshift64 state `x` (carried on across calls): byte `i` is `byte(i, x)`
/// with `x` the state after its step, so each test picks its own mix of text and noise.
#[cfg(test)]
pub(crate) fn xorshift_bytes(n: usize, x: &mut u64, byte: impl Fn(usize, u64) -> u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            byte(i, *x)
        })
        .collect()
}

/// One gzip member per part, each compressed at its own level.
#[cfg(test)]
pub(crate) fn gzip_members_at(parts: &[(&[u8], u32)]) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::new();
    for (p, level) in parts {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(*level));
        e.write_all(p).unwrap();
        out.extend(e.finish().unwrap());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer's stored checkpoints are denser than published ones, and hold exactly the
    /// checkpoints an index of the published spacing has (what earlier versions stored and
    /// every version publishes), windows and all: picked out, they are that index's.
    #[test]
    fn stored_checkpoints_hold_the_published_ones() {
        use std::io::Write;
        let mut x = 7u64;
        let mut parts = Vec::new();
        for (n, level) in [(3_000_000usize, 6u32), (700_000, 1), (2_000_000, 9)] {
            let data = super::xorshift_bytes(n, &mut x, |i, x| {
                if (i / 7000) % 2 == 0 {
                    b"tar entry "[(x % 10) as usize]
                } else {
                    x as u8
                }
            });
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
            e.write_all(&data).unwrap();
            parts.extend(e.finish().unwrap());
        }
        let checkpoints = |r: gzip::GzipReader<&[u8]>| {
            let mut r = r;
            io::copy(&mut r, &mut io::sink()).unwrap();
            r.take_checkpoints()
        };
        let dense = checkpoints(
            gzip::GzipReader::new(&parts[..], Some(GZIP_SPACING))
                .unwrap()
                .with_sparser(PUBLISHED_SPACING),
        );
        let published =
            checkpoints(gzip::GzipReader::new(&parts[..], Some(PUBLISHED_SPACING)).unwrap());
        assert!(
            dense.len() > published.len() + 5,
            "{} against {}",
            dense.len(),
            published.len()
        );
        let Access::Gzip(picked) = Access::Gzip(dense).published() else {
            unreachable!()
        };
        let key = |c: &gzip::Checkpoint| (c.uoff, c.coff, c.bits, c.member_start);
        assert_eq!(
            picked.iter().map(key).collect::<Vec<_>>(),
            published.iter().map(key).collect::<Vec<_>>()
        );
        let window =
            |c: &gzip::Checkpoint| zstd::bulk::decompress(&c.window, gzip::WINDOW).unwrap();
        assert!(picked
            .iter()
            .zip(&published)
            .all(|(a, b)| window(a) == window(b)));
        // A published table picks out as itself.
        let Access::Gzip(again) = Access::Gzip(published.clone()).published() else {
            unreachable!()
        };
        assert_eq!(
            again.iter().map(key).collect::<Vec<_>>(),
            published.iter().map(key).collect::<Vec<_>>()
        );
    }

    /// Indexing keeps the bytes of exactly the regular files up to `SMALL_MAX`, at the
    /// offsets the entries give, for every compression; they are saved beside the index.
    #[test]
    fn indexing_keeps_small_files_bytes() {
        let max = small::SMALL_MAX as usize;
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("a", b"tiny".to_vec()),
            ("empty", Vec::new()),
            ("edge", (0..max).map(|i| (i % 251) as u8).collect()),
            ("over", vec![9; max + 1]),
            ("d/b", (0..5000).map(|i| (i % 13) as u8).collect()),
        ];
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in &files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "hard", "a").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "sym", "a").unwrap();
        let plain = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::bulk::compress(&plain, 1).unwrap();
        let digest = Digest::of(b"layer");
        for (compression, blob) in [
            (Compression::None, &plain),
            (Compression::Gzip, &gz),
            (Compression::Zstd, &zst),
        ] {
            let mut seekable = Vec::new();
            let idx = build(
                &blob[..],
                compression,
                digest,
                Some(&mut seekable),
                max as u64,
            )
            .unwrap();
            let kept: Vec<&str> = idx
                .entries
                .iter()
                .filter(|e| idx.small.get(e.offset, e.size).is_some() && e.size > 0)
                .map(|e| std::str::from_utf8(&e.path).unwrap())
                .collect();
            assert_eq!(kept, ["a", "edge", "d/b"], "{compression:?}");
            assert_eq!(idx.small.len(), 3);
            for e in &idx.entries {
                if let Some(bytes) = idx.small.get(e.offset, e.size) {
                    let at = e.offset as usize;
                    assert_eq!(bytes, &plain[at..at + e.size as usize]);
                }
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("l.idx");
            idx.save(&path).unwrap();
            assert_eq!(small::SmallFiles::load(&path).unwrap().unwrap(), idx.small);
            // Read with the kept bytes, a small file inflates nothing; a larger one does.
            if compression == Compression::Gzip {
                let blob_path = dir.path().join("blob");
                std::fs::write(&blob_path, blob).unwrap();
                let small = small_reads::SmallReads::open(&path).unwrap();
                let r = LayerReader::open(0, &blob_path, idx.access.clone(), idx.uncompressed_size)
                    .unwrap()
                    .with_small(small);
                let cache = SpanCache::new(64 << 20);
                let inflated = || {
                    cache
                        .stats
                        .decompressed
                        .load(std::sync::atomic::Ordering::Relaxed)
                };
                for e in idx.entries.iter().filter(|e| e.size > 0) {
                    let (mut buf, before) = (vec![0u8; e.size as usize], inflated());
                    assert_eq!(r.read_at(&cache, e.offset, &mut buf).unwrap(), buf.len());
                    let at = e.offset as usize;
                    assert_eq!(buf, plain[at..at + buf.len()]);
                    let path = std::str::from_utf8(&e.path).unwrap();
                    assert_eq!(inflated() > before, path == "over", "{path}");
                }
            }
            // Asked for files of at most 4 bytes, it keeps only those.
            let idx = build(&blob[..], compression, digest, Some(&mut Vec::new()), 4).unwrap();
            assert_eq!(
                idx.small.iter().map(|(_, b)| b).collect::<Vec<_>>(),
                [b"tiny"]
            );
        }
    }

    /// A bounded sequence is refused once it passes its bound, in postcard (length first)
    /// and in JSON (no length), and read whole up to it.
    #[test]
    fn bounded_sequences() {
        #[derive(Serialize, Deserialize, Debug)]
        struct T {
            #[serde(deserialize_with = "bounded_vec::<_, _, 3>")]
            v: Vec<u32>,
        }
        for n in 0..=4 {
            let t = T { v: vec![7; n] };
            let pc = postcard::from_bytes::<T>(&postcard::to_allocvec(&t).unwrap());
            let js = serde_json::from_slice::<T>(&serde_json::to_vec(&t).unwrap());
            if n <= 3 {
                assert_eq!(pc.unwrap().v.len(), n);
                assert_eq!(js.unwrap().v.len(), n);
            } else {
                assert!(pc.is_err());
                assert!(js.unwrap_err().to_string().contains("more than 3"));
            }
        }
    }

    /// Access tables round-trip (gzip windows read from the map), tables of the first format
    /// are read and converted, and the quick look at a table's first bytes agrees with both.
    #[test]
    fn access_kind_from_the_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.idx");
        let frame = Frame {
            uoff: 0,
            coff: 0,
            cend: 1,
        };
        let cp = |uoff: u64, window: &[u8]| gzip::Checkpoint {
            uoff,
            coff: uoff / 2,
            bits: 3,
            member_start: window.is_empty(),
            window: window.to_vec().into(),
        };
        for access in [
            Access::Tar,
            Access::Gzip(Vec::new()),
            Access::Gzip(vec![
                cp(0, b""),
                cp(1 << 19, b"first window"),
                cp(1 << 20, b"2nd"),
            ]),
            Access::Zstd(vec![(0, 0), (1 << 20, 4096)]),
            Access::Frames(vec![frame]),
        ] {
            // A table of the first format, as older stores have: read, and converted.
            let mut bytes = ACCESS_MAGIC_V1.to_vec();
            bytes.extend(postcard::to_allocvec(&access).unwrap());
            let path = LayerIndex::access_path(&index);
            std::fs::write(&path, bytes).unwrap();
            for format in ["first", "converted"] {
                assert_eq!(
                    LayerIndex::access_is_zstd(&index).unwrap(),
                    matches!(access, Access::Zstd(_)),
                    "{access:?}, {format}"
                );
                let whole = LayerIndex::load_access(&index).unwrap();
                assert_eq!(
                    postcard::to_allocvec(&whole).unwrap(),
                    postcard::to_allocvec(&access).unwrap(),
                    "{format}"
                );
            }
            assert!(std::fs::read(&path).unwrap().starts_with(ACCESS_MAGIC));
        }
    }
}
