//! The layer index as published to a registry (`bux-fuse push-index`), so that another host can
//! mount the image before downloading its layers.
//!
//! One blob per layer holds what a pull would have computed — the file table, the checkpoints,
//! the sizes and `diff_id` — plus a **chunk table**: the compressed blob cut into ranges, each
//! with its sha256. A lazy mount fetches chunks by HTTP range and verifies each before any byte
//! of it is served. Chunks follow the read path's spans: for gzip, chunk `i` runs from the byte
//! holding checkpoint `i`'s primed bits to checkpoint `i + 1` (so neighbours share one byte), so
//! decoding one span needs exactly one chunk; for plain tar they are 1 MiB slices.
//!
//! Trust: the chunk digests make every byte served match what the index says; the index itself
//! is trusted only when the image manifest's digest covers it (see [`crate::publish`]), and the
//! table it states is compared with the layer's real tar when the layer completes.

use std::io::Read;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::blob::Blob;
use super::tar_scan::{normalize_path, MAX_ENTRIES, MAX_METADATA_BYTES};
use super::{Access, Compression, EntryKind, LayerIndex, TarEntry};
use crate::digest::Hasher;
use crate::{Digest, Error, Result};

/// Media type of a published layer index blob.
pub const MEDIA_TYPE: &str = "application/vnd.bux-fuse.layer-index.v1";
/// Media type of a layer's checkpoint windows, published beside its index.
pub const WINDOWS_MEDIA_TYPE: &str = "application/vnd.bux-fuse.layer-windows.v1";
const MAGIC: &[u8; 8] = b"BUXPUB\x00\x01";
/// Slice size of plain-tar layers.
pub const TAR_CHUNK: u64 = 1 << 20;

/// Largest chunk accepted (compressed bytes), in a published index or a zstd:chunked table. A
/// fetch holds a chunk whole in memory to check it before any byte is served, so a table whose
/// chunks are most of the blob (one gzip checkpoint for the whole layer) would buffer the blob.
/// What real tables make: plain tar slices of [`TAR_CHUNK`] (1 MiB); gzip spans of
/// [`super::PUBLISHED_SPACING`] (512 KiB) of output plus the deflate block that crosses it (zlib
/// and the other common encoders close a block every 16-64 Ki symbols, under 1 MiB even for
/// incompressible data); zstd:chunked frames cut by containers/storage's rolling checksum (16
/// bits: 64 KiB on average). 64 times the largest of those.
pub const MAX_CHUNK: u64 = 64 << 20;
/// Largest chunk of a windows blob: one zstd-compressed 32 KiB window (zstd's bound for
/// 32 KiB is 32 KiB + 140 bytes).
pub const MAX_WINDOW_CHUNK: u32 = 64 << 10;
/// Most chunks in a table: gzip checkpoints every 512 KiB of output for 2 TiB, 1 MiB slices
/// for 4 TiB, 64 KiB zstd:chunked frames for 256 GiB. As many as the entries a pull accepts.
pub const MAX_CHUNKS: usize = MAX_ENTRIES;
/// How many times its compressed size an index body may inflate to. A real one: 8x for a
/// 400,000-file layer (the names of a Debian root), 12x for as many empty files (only the
/// names differ); zeros compress 1000x and more. Bodies under [`MIN_BODY_LIMIT`] are not
/// held to it.
pub const MAX_BODY_RATIO: u64 = 64;
/// See [`MAX_BODY_RATIO`].
pub const MIN_BODY_LIMIT: u64 = 1 << 20;
/// Largest index body at all: the names a pull accepts ([`MAX_METADATA_BYTES`]), and 64 bytes
/// of fixed fields for each entry and chunk it accepts.
pub const MAX_BODY: u64 = (MAX_METADATA_BYTES + 64 * MAX_ENTRIES + 64 * MAX_CHUNKS) as u64;

/// How many bytes a body of `compressed` bytes may decompress to (see [`MAX_BODY_RATIO`]).
pub fn body_limit(compressed: usize) -> u64 {
    (compressed as u64)
        .saturating_mul(MAX_BODY_RATIO)
        .clamp(MIN_BODY_LIMIT, MAX_BODY)
}

/// A verified range of the compressed blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// sha256 of those bytes, or (when `uncompressed` is set) of what they decompress to.
    pub digest: Digest,
    /// For a zstd frame whose table gives only the digest of its content (zstd:chunked):
    /// that content's length.
    pub uncompressed: Option<u64>,
}

impl Chunk {
    /// Whether `bytes` (this chunk's range) are what the table vouches for. A content frame
    /// (a zstd frame, or an eStargz gzip member) is hashed as it decompresses, a buffer at a
    /// time, up to its stated length and no further: what it inflates to is never held (a
    /// hole of a sparse file is a few KiB of frame for gigabytes of zeros), and what follows
    /// the content in the frame (tar headers, in stargz-snapshotter's) is never served.
    pub fn verify(&self, bytes: &[u8]) -> bool {
        let Some(len) = self.uncompressed else {
            return Digest::of(bytes) == self.digest;
        };
        let mut h = Hasher::default();
        super::chunked::frame_prefix(bytes, len, &mut |b| h.update(b)).is_ok()
            && h.finish() == self.digest
    }
}

/// A layer's published index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishedLayer {
    /// Digest of the layer blob.
    pub digest: Digest,
    /// Digest of its uncompressed tar stream.
    pub diff_id: Digest,
    /// Its compression.
    pub compression: Compression,
    /// Blob size.
    pub compressed_size: u64,
    /// Uncompressed stream size.
    pub uncompressed_size: u64,
    /// Checkpoints (gzip) or nothing (plain tar).
    pub access: Access,
    /// The file table, in tar order.
    #[serde(deserialize_with = "super::bounded_vec::<_, _, MAX_ENTRIES>")]
    pub entries: Vec<TarEntry>,
    /// The chunk table, ascending, covering the whole blob.
    #[serde(deserialize_with = "super::bounded_vec::<_, _, MAX_CHUNKS>")]
    pub chunks: Vec<Chunk>,
    /// Where the gzip checkpoints' windows are, when they are not inline in `access`.
    pub windows: Option<Windows>,
}

/// The gzip checkpoints' 32 KiB windows, kept in a blob of their own: they are most of an
/// index's bytes (a window per MiB of output), and a mount needs none of them to start, only
/// the windows of the spans it reads, and those once each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Windows {
    /// Digest of the windows blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Per checkpoint: (offset, length) of its zstd-compressed window in that blob.
    pub spans: Vec<(u64, u32)>,
    /// Per checkpoint: sha256 of that window (fetched and verified one by one, on demand).
    pub digests: Vec<Digest>,
}

impl Windows {
    /// The windows blob's chunk table: one chunk per non-empty window.
    pub fn chunks(&self) -> Vec<Chunk> {
        self.spans
            .iter()
            .zip(&self.digests)
            .filter(|((_, len), _)| *len > 0)
            .map(|(&(off, len), &digest)| Chunk {
                start: off,
                end: off + len as u64,
                digest,
                uncompressed: None,
            })
            .collect()
    }
}

/// The chunk boundaries for a layer's access method (digests filled in by the caller).
pub fn chunk_ranges(access: &Access, blob_len: u64) -> Result<Vec<Range<u64>>> {
    match access {
        Access::Tar => Ok((0..blob_len.div_ceil(TAR_CHUNK))
            .map(|i| i * TAR_CHUNK..((i + 1) * TAR_CHUNK).min(blob_len))
            .collect()),
        Access::Gzip(cps) => Ok(cps
            .iter()
            .enumerate()
            .map(|(i, cp)| {
                let start = cp.coff - u64::from(cp.bits > 0);
                let end = cps.get(i + 1).map_or(blob_len, |n| n.coff);
                start..end
            })
            .collect()),
        Access::Frames(frames) => Ok(frames.iter().map(|f| f.coff..f.cend).collect()),
        Access::Zstd(_) => Err(Error::InvalidManifest {
            what: "layer index".into(),
            detail: "zstd layers are served from a re-framed copy, which has no registry \
                     counterpart: publish them as zstd:chunked instead"
                .into(),
        }),
    }
}

impl PublishedLayer {
    /// Builds the published index of a stored layer from its index and blob.
    pub fn build(idx: &LayerIndex, blob: &dyn Blob) -> Result<PublishedLayer> {
        // Published at the spacing every version reads and checks (not the stored one's).
        let access = idx.access.published();
        let mut chunks = Vec::new();
        for r in chunk_ranges(&access, blob.len())? {
            if r.end - r.start > MAX_CHUNK {
                // A mount would refuse the index (see [`MAX_CHUNK`]): say so now.
                return Err(Error::CorruptLayer {
                    layer: idx.digest,
                    detail: format!(
                        "cannot be published: bytes {}..{} hold no checkpoint ({} bytes, more \
                         than {MAX_CHUNK} in one chunk)",
                        r.start,
                        r.end,
                        r.end - r.start
                    ),
                });
            }
            let mut h = Hasher::default();
            let mut left = r.end - r.start;
            let mut buf = vec![0u8; (1 << 20).min(left as usize)];
            let mut pos = r.start;
            while left > 0 {
                let n = blob
                    .read_at(&mut buf[..(left as usize).min(1 << 20)], pos)
                    .map_err(|e| Error::io(format!("reading layer {}", idx.digest), e))?;
                if n == 0 {
                    return Err(Error::CorruptLayer {
                        layer: idx.digest,
                        detail: "blob shorter than its index".into(),
                    });
                }
                h.update(&buf[..n]);
                pos += n as u64;
                left -= n as u64;
            }
            chunks.push(Chunk {
                start: r.start,
                end: r.end,
                digest: h.finish(),
                uncompressed: None,
            });
        }
        Ok(PublishedLayer {
            digest: idx.digest,
            diff_id: idx.diff_id,
            compression: idx.compression,
            compressed_size: blob.len(),
            uncompressed_size: idx.uncompressed_size,
            access,
            entries: idx.entries.clone(),
            chunks,
            windows: None,
        })
    }

    /// Moves the checkpoints' windows out of the table into a blob of their own (returned);
    /// `None` for layers without windows.
    pub fn split_windows(&mut self) -> Option<Vec<u8>> {
        let Access::Gzip(cps) = &mut self.access else {
            return None;
        };
        let (blob, spans) = super::gzip::take_windows(cps);
        let digests = spans
            .iter()
            .map(|&(off, len)| Digest::of(&blob[off as usize..off as usize + len as usize]))
            .collect();
        self.windows = Some(Windows {
            digest: Digest::of(&blob),
            size: blob.len() as u64,
            spans,
            digests,
        });
        Some(blob)
    }

    /// The blob pushed to the registry.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.encode_at(3)
    }

    /// [`PublishedLayer::encode`] at zstd level `level` (the format is the same).
    pub fn encode_at(&self, level: i32) -> Result<Vec<u8>> {
        let mut out = MAGIC.to_vec();
        let body = postcard::to_allocvec(self).map_err(|e| Error::InvalidManifest {
            what: "layer index".into(),
            detail: format!("encoding: {e}"),
        })?;
        // zstd: a file table is mostly names and repeats well (~4x).
        out.extend(
            zstd::bulk::compress(&body, level).map_err(|e| Error::io("compressing index", e))?,
        );
        Ok(out)
    }

    /// Parses and checks a published index for the layer `layer` of `size` bytes (both from the
    /// image manifest). Anything inconsistent is refused: it came from the network.
    pub fn decode(bytes: &[u8], layer: Digest, size: u64) -> Result<PublishedLayer> {
        let bad = |detail: String| Error::CorruptLayer {
            layer,
            detail: format!("published index: {detail}"),
        };
        let body = bytes
            .strip_prefix(&MAGIC[..])
            .ok_or_else(|| bad("not a bux-fuse layer index of this version".into()))?;
        // Bounded by what a real index compresses from, before anything is decoded.
        let limit = body_limit(body.len());
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::new(body)
            .and_then(|d| d.take(limit + 1).read_to_end(&mut raw))
            .map_err(|e| bad(format!("decompressing: {e}")))?;
        if raw.len() as u64 > limit {
            return Err(bad(format!(
                "{} compressed bytes that inflate to more than {limit}: no real index does",
                body.len()
            )));
        }
        let p: PublishedLayer =
            postcard::from_bytes(&raw).map_err(|e| bad(format!("decoding: {e}")))?;
        p.validate(layer, size).map_err(bad)?;
        Ok(p)
    }

    fn validate(&self, layer: Digest, size: u64) -> std::result::Result<(), String> {
        if self.digest != layer || self.compressed_size != size {
            return Err(format!(
                "describes {} ({} bytes), not this layer",
                self.digest, self.compressed_size
            ));
        }
        let frames = matches!(self.access, Access::Frames(_));
        if (self.compression == Compression::Zstd && !frames)
            || (self.compression == Compression::None && frames)
        {
            return Err("zstd layers are served only through their own frames".into());
        }
        // The chunks must be exactly what the checkpoints imply, so a read never needs a byte
        // that no chunk vouches for.
        let want = chunk_ranges(&self.access, size).map_err(|e| e.to_string())?;
        if let Some((i, c)) = self
            .chunks
            .iter()
            .enumerate()
            .find(|(_, c)| c.end.saturating_sub(c.start) > MAX_CHUNK)
        {
            return Err(format!(
                "chunk {i} is {} bytes (bytes {}..{}), more than the {MAX_CHUNK} a real index \
                 makes: a fetch would hold it whole",
                c.end - c.start,
                c.start,
                c.end
            ));
        }
        if want.len() != self.chunks.len()
            || want.iter().zip(&self.chunks).any(|(r, c)| {
                r.start != c.start
                    || r.end != c.end
                    || r.start > r.end
                    || r.end > size
                    || c.uncompressed.is_some() != frames
            })
        {
            return Err("chunk table does not match the checkpoints".into());
        }
        if let Access::Frames(fs) = &self.access {
            // Frames lay the contents end to end, in blob order, without overlap.
            let mut uoff = 0;
            for (i, (f, c)) in fs.iter().zip(&self.chunks).enumerate() {
                let len = c.uncompressed.unwrap_or(0);
                if f.uoff != uoff || (i > 0 && fs[i - 1].cend > f.coff) || f.coff >= f.cend {
                    return Err("frames out of order or overlapping".into());
                }
                uoff += len;
            }
            if uoff != self.uncompressed_size {
                return Err("frames do not add up to the stream size".into());
            }
        }
        if let Access::Gzip(cps) = &self.access {
            if let Some(w) = &self.windows {
                // Windows laid end to end in checkpoint order, as split_windows writes them.
                let mut at = 0u64;
                let fits = w.spans.len() == cps.len()
                    && w.digests.len() == cps.len()
                    && w.spans.iter().all(|&(o, l)| {
                        let ok = o == at;
                        at += l as u64;
                        ok
                    })
                    && at == w.size
                    && cps.iter().all(|c| c.window.is_empty());
                if !fits {
                    return Err("window table does not match the checkpoints".into());
                }
                if let Some(i) = w.spans.iter().position(|&(_, l)| l > MAX_WINDOW_CHUNK) {
                    return Err(format!(
                        "window {i} is {} bytes, more than a compressed 32 KiB window can be",
                        w.spans[i].1
                    ));
                }
            }
            let ok = cps.first().is_some_and(|c| c.uoff == 0 && c.coff == 0)
                && cps
                    .windows(2)
                    .all(|w| w[0].uoff < w[1].uoff && w[0].coff < w[1].coff)
                && cps
                    .iter()
                    .all(|c| c.coff <= size && c.uoff <= self.uncompressed_size)
                && cps
                    .iter()
                    .all(|c| c.bits < 8 && (c.bits == 0 || c.coff > 0));
            if !ok {
                return Err("checkpoints out of order or out of range".into());
            }
        }
        if let Access::Tar = self.access {
            if self.uncompressed_size != size {
                return Err("plain tar layer whose stream size differs from its blob".into());
            }
        }
        if self.entries.len() > MAX_ENTRIES {
            return Err("too many entries".into());
        }
        // Each entry of a tar stream takes a 512-byte header of it (zstd:chunked tables
        // address the files' contents only).
        if !frames && self.entries.len() as u64 > self.uncompressed_size / 512 + 1 {
            return Err(format!(
                "{} entries in a stream of {} bytes",
                self.entries.len(),
                self.uncompressed_size
            ));
        }
        let mut meta = 0usize;
        for e in &self.entries {
            let name = String::from_utf8_lossy(&e.path);
            if normalize_path(&e.path).ok().as_deref() != Some(&e.path[..]) {
                return Err(format!("entry {name:?}: path not normalized"));
            }
            if e.kind == EntryKind::Hardlink
                && normalize_path(&e.link).ok().as_deref() != Some(&e.link[..])
            {
                return Err(format!("entry {name:?}: hardlink target not normalized"));
            }
            let end = e.offset.checked_add(e.size);
            let in_stream = |o: u64, l: u64| {
                o.checked_add(l)
                    .is_some_and(|x| x <= self.uncompressed_size)
            };
            match &e.sparse {
                None if e.kind == EntryKind::File
                    && end.is_none_or(|x| x > self.uncompressed_size) =>
                {
                    return Err(format!("entry {name:?}: data outside the stream"));
                }
                Some(ext)
                    if ext.iter().any(|x| {
                        !in_stream(x.stream_off, x.len)
                            || x.file_off.checked_add(x.len).is_none_or(|y| y > e.size)
                    }) || ext
                        .windows(2)
                        .any(|w| w[0].file_off + w[0].len > w[1].file_off) =>
                {
                    return Err(format!("entry {name:?}: sparse map out of range"));
                }
                _ => {}
            }
            meta += e.path.len()
                + e.link.len()
                + e.xattrs
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
        }
        if meta > MAX_METADATA_BYTES {
            return Err("too many bytes of names".into());
        }
        Ok(())
    }

    /// The layer index a mount and the merge use.
    pub fn to_index(&self) -> LayerIndex {
        LayerIndex {
            digest: self.digest,
            diff_id: self.diff_id,
            compression: self.compression,
            compressed_size: self.compressed_size,
            uncompressed_size: self.uncompressed_size,
            access: self.access.clone(),
            entries: self.entries.clone(),
            // Only an indexing pass over the whole layer keeps them.
            small: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of a decode that must fail (an accepted one is not printed whole).
    fn refused<T>(r: Result<T>) -> String {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }
    use std::io::Write;

    fn gzip_tar(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        crate::index::xorshift_bytes(n, &mut { seed | 1 }, |_, x| (x % 7) as u8 + b'a')
    }

    /// A gzip layer's index with the given checkpoints (compressed offsets), empty windows
    /// split out, and no entries.
    fn gzip_index(layer: Digest, size: u64, coffs: &[u64]) -> PublishedLayer {
        let cps: Vec<_> = coffs
            .iter()
            .enumerate()
            .map(|(i, &coff)| super::super::gzip::Checkpoint {
                uoff: 2 * coff + i as u64,
                coff,
                bits: 0,
                member_start: true,
                window: Default::default(),
            })
            .collect();
        let access = Access::Gzip(cps);
        let chunks = chunk_ranges(&access, size)
            .unwrap()
            .into_iter()
            .map(|r| Chunk {
                start: r.start,
                end: r.end,
                digest: Digest::of(b"c"),
                uncompressed: None,
            })
            .collect();
        PublishedLayer {
            digest: layer,
            diff_id: Digest::of(b"diff"),
            compression: Compression::Gzip,
            compressed_size: size,
            uncompressed_size: 4 * size,
            access,
            entries: Vec::new(),
            chunks,
            windows: None,
        }
    }

    /// #15: a checkpoint table so sparse that one chunk is most of the blob (here one
    /// checkpoint for 100 MiB) is refused at decode, naming the layer: a fetch buffers a chunk
    /// whole. Honest chunks are a checkpoint spacing of output, far below [`MAX_CHUNK`].
    #[test]
    fn chunks_larger_than_a_real_index_makes_are_refused() {
        let layer = Digest::of(b"sparse layer");
        let size = 100 << 20;
        let sparse = gzip_index(layer, size, &[0]).encode().unwrap();
        let err = refused(PublishedLayer::decode(&sparse, layer, size));
        assert!(err.contains(&layer.to_string()), "{err}");
        assert!(err.contains("chunk"), "{err}");
        // Checkpoints every MiB of the same blob: accepted.
        let coffs: Vec<u64> = (0..100).map(|i| i << 20).collect();
        let dense = gzip_index(layer, size, &coffs).encode().unwrap();
        PublishedLayer::decode(&dense, layer, size).unwrap();
        // A zstd:chunked frame of 100 MiB, likewise.
        let frames = PublishedLayer {
            compression: Compression::Zstd,
            access: Access::Frames(vec![super::super::Frame {
                uoff: 0,
                coff: 0,
                cend: size,
            }]),
            chunks: vec![Chunk {
                start: 0,
                end: size,
                digest: Digest::of(b"c"),
                uncompressed: Some(1),
            }],
            uncompressed_size: 1,
            ..gzip_index(layer, size, &[0])
        };
        let err = refused(PublishedLayer::decode(
            &frames.encode().unwrap(),
            layer,
            size,
        ));
        assert!(
            err.contains(&layer.to_string()) && err.contains("chunk"),
            "{err}"
        );
    }

    /// #15: a window span (a chunk of the windows blob) is a zstd-compressed 32 KiB window;
    /// one of a GiB is refused.
    #[test]
    fn oversized_window_spans_are_refused() {
        let layer = Digest::of(b"windows layer");
        let size = 4 << 20;
        let coffs: Vec<u64> = (0..4).map(|i| i << 20).collect();
        let mut p = gzip_index(layer, size, &coffs);
        let spans = vec![
            (0, 100),
            (100, 1 << 30),
            (100 + (1 << 30), 0),
            (100 + (1 << 30), 7),
        ];
        p.windows = Some(Windows {
            digest: Digest::of(b"w"),
            size: 107 + (1 << 30),
            spans,
            digests: vec![Digest::of(b"w"); 4],
        });
        let err = refused(PublishedLayer::decode(&p.encode().unwrap(), layer, size));
        assert!(
            err.contains(&layer.to_string()) && err.contains("window"),
            "{err}"
        );
        let w = p.windows.as_mut().unwrap();
        w.spans = vec![(0, 100), (100, 20000), (20100, 0), (20100, 7)];
        w.size = 20107;
        PublishedLayer::decode(&p.encode().unwrap(), layer, size).unwrap();
    }

    /// #15: the index body may not decompress to far more than an index's bytes compress
    /// from (a real one: 8-12x, see [`MAX_BODY_RATIO`]): a few KiB that inflate into a
    /// million entries are refused before they are decoded.
    #[test]
    fn index_bodies_that_inflate_far_beyond_a_real_index_are_refused() {
        let layer = Digest::of(b"bomb layer");
        let size = 4 << 20;
        let chunks = chunk_ranges(&Access::Tar, size)
            .unwrap()
            .into_iter()
            .map(|r| Chunk {
                start: r.start,
                end: r.end,
                digest: Digest::of(b"c"),
                uncompressed: None,
            })
            .collect();
        let mut p = PublishedLayer {
            compression: Compression::None,
            uncompressed_size: size,
            access: Access::Tar,
            chunks,
            ..gzip_index(layer, size, &[0])
        };
        let dir = TarEntry {
            path: Vec::new(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            offset: 0,
            sparse: None,
        };
        p.entries = vec![dir.clone(); 1 << 20];
        let bytes = p.encode().unwrap();
        assert!(bytes.len() < 64 << 10, "{}", bytes.len());
        let err = refused(PublishedLayer::decode(&bytes, layer, size));
        assert!(err.contains(&layer.to_string()), "{err}");
        assert!(err.contains("inflate to more than"), "{err}");
        // A few of them: fine.
        p.entries = vec![dir; 3];
        PublishedLayer::decode(&p.encode().unwrap(), layer, size).unwrap();
    }

    /// A gzip layer's blob `gz` indexed, and its index as published: (digest, index, published).
    fn published(gz: &[u8]) -> (Digest, LayerIndex, PublishedLayer) {
        let digest = Digest::of(gz);
        let idx = crate::index::build(gz, Compression::Gzip, digest, None, 0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, gz).unwrap();
        let blob = super::super::blob::LocalBlob::open(&path).unwrap();
        let p = PublishedLayer::build(&idx, &blob).unwrap();
        (digest, idx, p)
    }

    #[test]
    fn round_trip_and_chunks_cover_each_span() {
        let gz = gzip_tar(&[("a", noise(3 << 20, 1)), ("b", b"hello".to_vec())]);
        let (digest, idx, p) = published(&gz);
        assert!(p.chunks.len() > 1);
        assert_eq!(p.chunks.last().unwrap().end, gz.len() as u64);
        for c in &p.chunks {
            assert_eq!(c.digest, Digest::of(&gz[c.start as usize..c.end as usize]));
        }
        let bytes = p.encode().unwrap();
        let back = PublishedLayer::decode(&bytes, digest, gz.len() as u64).unwrap();
        assert_eq!(back.entries, idx.entries);
        // Wrong layer, wrong size, tampered chunk table, a `..` path: refused.
        assert!(PublishedLayer::decode(&bytes, Digest::of(b"x"), gz.len() as u64).is_err());
        assert!(PublishedLayer::decode(&bytes, digest, 1).is_err());
        let mut t = back.clone();
        t.chunks[0].end += 1;
        assert!(PublishedLayer::decode(&t.encode().unwrap(), digest, gz.len() as u64).is_err());
        let mut t = back.clone();
        t.entries[0].path = b"../etc/passwd".to_vec();
        let err = refused(PublishedLayer::decode(
            &t.encode().unwrap(),
            digest,
            gz.len() as u64,
        ));
        assert!(err.contains("not normalized"), "{err}");
        let mut t = back;
        t.entries[1].offset = u64::MAX - 2;
        assert!(PublishedLayer::decode(&t.encode().unwrap(), digest, gz.len() as u64).is_err());
    }

    /// A published index's entries must keep within the stream it describes: a file's data,
    /// and a sparse file's extents (in the stream, within the file, in order, apart).
    #[test]
    fn entries_whose_data_leaves_the_stream_are_refused() {
        let gz = gzip_tar(&[("a", noise(1 << 20, 2)), ("b", b"hello".to_vec())]);
        let (digest, _, p) = published(&gz);
        let size = gz.len() as u64;
        let a = p.entries.iter().position(|e| e.path == b"a").unwrap();
        let (off, stream) = (p.entries[a].offset, p.uncompressed_size);
        let with = |f: &dyn Fn(&mut TarEntry)| {
            let mut t = p.clone();
            f(&mut t.entries[a]);
            PublishedLayer::decode(&t.encode().unwrap(), digest, size)
        };
        // The file's data running past the stream's end.
        let err = refused(with(&|e| e.size = stream));
        assert!(err.contains("data outside the stream"), "{err}");
        // As a sparse file: two extents, the second after a hole, both in the stream.
        let ext = |file_off, len, stream_off| crate::index::Extent {
            file_off,
            len,
            stream_off,
        };
        let good = vec![ext(0, 4096, off), ext(1 << 30, 4096, off + 4096)];
        with(&|e| {
            e.size = (1 << 30) + 4096;
            e.sparse = Some(good.clone());
        })
        .unwrap();
        for (what, bad) in [
            ("out of the stream", vec![ext(0, 4096, stream - 100)]),
            ("past the file's end", vec![ext(1 << 31, 4096, off)]),
            ("overflowing", vec![ext(u64::MAX - 10, 4096, off)]),
            (
                "overlapping",
                vec![ext(0, 8192, off), ext(4096, 4096, off + 8192)],
            ),
        ] {
            let err = refused(with(&|e| {
                e.size = (1 << 30) + 4096;
                e.sparse = Some(bad.clone());
            }));
            assert!(err.contains("sparse map out of range"), "{what}: {err}");
        }
    }
}
