//! zstd:chunked layers (containers/storage): the blob carries its own table of contents, so it
//! can be mounted lazily with no index of ours.
//!
//! Such a blob is an ordinary zstd stream of the layer's tar in which every file's content
//! starts a new frame (large files are cut into several), followed by skippable frames holding
//! the TOC — a zstd-compressed JSON list of every entry with its metadata, the blob range of its
//! content frames and the sha256 of that content. The layer descriptor's annotations give the
//! TOC's position and digest, so the manifest digest covers the TOC, which covers every file.
//!
//! Tar headers sit in frames of their own between contents, and the TOC gives no sizes for
//! them, so offsets into the real tar stream are unknown until the blob is read in full. The
//! table built here therefore addresses a stream of the files' contents laid end to end, in TOC
//! order ([`Access::Frames`]); each content frame is a chunk whose digest is checked after it
//! is decompressed.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;

use super::published::{body_limit, Chunk, PublishedLayer, MAX_CHUNKS};
use super::tar_scan::{normalize_path, MAX_ENTRIES};
use super::{Access, Compression, EntryKind, Frame, TarEntry};
use crate::{Digest, Error, Result};

/// Annotation keys of the TOC position (`offset:length:uncompressed length:type`): current
/// containers/storage, then the older key (Debian's skopeo 1.9).
pub const POSITION_KEYS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];
/// Annotation keys of the TOC digest (sha256 of its compressed bytes), same order.
pub const CHECKSUM_KEYS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];
/// Largest TOC accepted, compressed or not.
pub const MAX_TOC: u64 = 256 << 20;

/// Where a layer's TOC is, from its descriptor's annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TocLocation {
    /// First byte of the compressed TOC in the blob.
    pub offset: u64,
    /// Its compressed length.
    pub length: u64,
    /// Its uncompressed length.
    pub uncompressed: u64,
    /// sha256 of the compressed TOC.
    pub digest: Digest,
}

impl TocLocation {
    /// Reads the annotations of a zstd:chunked layer (`None` if it is not one).
    pub fn from_annotations(a: &BTreeMap<String, String>, blob_size: u64) -> Option<TocLocation> {
        let (pos, sum) = POSITION_KEYS
            .iter()
            .zip(CHECKSUM_KEYS)
            .find_map(|(p, c)| Some((a.get(*p)?, a.get(c)?)))?;
        let mut parts = pos.split(':').map(|p| p.parse::<u64>().ok());
        let (offset, length, uncompressed, kind) = (
            parts.next()??,
            parts.next()??,
            parts.next()??,
            parts.next()??,
        );
        let digest = sum.parse().ok()?;
        let fits = offset.checked_add(length).is_some_and(|e| e <= blob_size);
        (kind == 1 && fits && length <= MAX_TOC && uncompressed <= MAX_TOC).then_some(TocLocation {
            offset,
            length,
            uncompressed,
            digest,
        })
    }
}

/// Most entries of a table of contents: the entries a pull accepts, and a chunk entry for each
/// chunk a table may have. Each costs some 300 bytes parsed.
const MAX_TOC_ENTRIES: usize = MAX_ENTRIES + MAX_CHUNKS;

/// A table of contents: zstd:chunked's, which is eStargz's with `endOffset` added.
#[derive(Deserialize)]
pub(super) struct Toc {
    version: u32,
    #[serde(deserialize_with = "super::bounded_vec::<_, _, MAX_TOC_ENTRIES>")]
    entries: Vec<TocEntry>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct TocEntry {
    inner_offset: i64,
    #[serde(rename = "type")]
    kind: String,
    name: String,
    link_name: String,
    mode: i64,
    size: i64,
    #[serde(rename = "uid")]
    uid: i64,
    #[serde(rename = "gid")]
    gid: i64,
    modtime: Option<String>,
    dev_major: i64,
    dev_minor: i64,
    xattrs: BTreeMap<String, String>,
    digest: String,
    offset: i64,
    end_offset: i64,
    chunk_size: i64,
    chunk_offset: i64,
    chunk_digest: String,
}

/// Builds the served table of a zstd:chunked layer from its compressed TOC bytes (already
/// checked against the annotation's digest). `diff_id` is the config's, checked when the layer
/// completes. Returns the table and its encoding (see [`PublishedLayer::encode`]), which the
/// store keeps.
pub fn parse(
    compressed_toc: &[u8],
    loc: &TocLocation,
    layer: Digest,
    blob_size: u64,
    diff_id: Digest,
) -> Result<(PublishedLayer, Vec<u8>)> {
    let bad = |detail: String| Error::CorruptLayer {
        layer,
        detail: format!("zstd:chunked table of contents: {detail}"),
    };
    if Digest::of(compressed_toc) != loc.digest {
        return Err(bad("does not match the digest in the manifest".into()));
    }
    let mut json = Vec::new();
    use std::io::Read;
    // As for our own indexes, bounded by what a real table compresses from (JSON with a hex
    // digest per file compresses less than they do) before anything is parsed.
    let limit = body_limit(compressed_toc.len()).min(MAX_TOC);
    zstd::stream::read::Decoder::new(compressed_toc)
        .and_then(|d| {
            d.take(loc.uncompressed.min(limit) + 1)
                .read_to_end(&mut json)
        })
        .map_err(|e| bad(format!("decompressing: {e}")))?;
    if json.len() as u64 > limit {
        return Err(bad(format!(
            "{} compressed bytes that inflate to more than {limit}: no real table does",
            compressed_toc.len()
        )));
    }
    let toc: Toc =
        serde_json::from_slice(&json).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    // The last content frame ends where the TOC's skippable frame starts (its 8-byte header
    // before `loc.offset`) at the latest.
    let (published, encoded, _) = table(
        &toc,
        layer,
        blob_size,
        diff_id,
        Compression::Zstd,
        loc.offset.saturating_sub(8),
        &bad,
    )?;
    Ok((published, encoded))
}

/// Names the eStargz writer (stargz-snapshotter's, which also writes zstd:chunked with
/// `ctr-remote image convert --zstdchunked`) adds at the root of a layer: the prefetch
/// landmarks and the TOC's own tar entry. They are not files of the image: not served.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// See [`PREFETCH_LANDMARK`].
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// See [`PREFETCH_LANDMARK`].
pub const TOC_TAR_NAME: &str = "stargz.index.json";

/// Whether `path` (normalized) is one of the eStargz writer's own entries, not the image's.
pub fn is_format_entry(path: &[u8]) -> bool {
    [PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME]
        .iter()
        .any(|n| n.as_bytes() == path)
}

/// Builds the served table from a parsed TOC (zstd:chunked or eStargz: same entries). The
/// stream it addresses is the files' contents laid end to end, in TOC order; each content
/// range (a zstd frame or a gzip member, from the entry's `offset`) is a chunk whose first
/// bytes, decompressed, are the content its digest vouches for. Where a frame ends: the
/// entry's `endOffset` when the TOC gives one (containers/storage), else where the next
/// content starts, or `content_end` for the last (stargz-snapshotter writes the tar headers
/// that follow a content into its frame or member).
///
/// Returns the table, its encoding (what the store keeps: made once, here, where the table is
/// checked as a published one would be), and, when the TOC has a `.prefetch.landmark`, where
/// in the blob its content starts: the contents before it are what the image wants prefetched.
pub(super) fn table(
    toc: &Toc,
    layer: Digest,
    blob_size: u64,
    diff_id: Digest,
    compression: Compression,
    content_end: u64,
    bad: &dyn Fn(String) -> Error,
) -> Result<(PublishedLayer, Vec<u8>, Option<u64>)> {
    if toc.version != 1 {
        return Err(bad(format!("version {} is not supported", toc.version)));
    }
    // Where each content starts, ascending: a frame without an end runs to the next.
    let mut starts: Vec<u64> = toc
        .entries
        .iter()
        .filter(|e| (e.kind == "reg" && e.size > 0) || e.kind == "chunk")
        .filter_map(|e| u64::try_from(e.offset).ok())
        .collect();
    starts.sort_unstable();
    starts.dedup();
    let next_start = |start: u64| -> u64 {
        let k = starts.partition_point(|&s| s <= start);
        starts.get(k).copied().unwrap_or(content_end)
    };
    let mut entries: Vec<TarEntry> = Vec::new();
    let mut frames: Vec<Frame> = Vec::new();
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut prefetch_end = None;
    let mut uoff = 0u64;
    let mut i = 0;
    while i < toc.entries.len() {
        let e = &toc.entries[i];
        let name = e.name.trim_end_matches('/');
        let path =
            normalize_path(name.as_bytes()).map_err(|why| bad(format!("{name:?}: {why}")))?;
        if e.kind == "chunk" {
            return Err(bad(format!("{name:?}: a chunk that follows no file")));
        }
        if is_format_entry(&path) {
            // Not the image's: skipped with its chunks. The prefetch landmark marks where
            // the contents to prefetch end.
            if path == PREFETCH_LANDMARK.as_bytes() {
                prefetch_end = u64::try_from(e.offset).ok().filter(|&o| o > 0);
            }
            i += 1;
            while i < toc.entries.len() && toc.entries[i].kind == "chunk" {
                i += 1;
            }
            continue;
        }
        let kind = match e.kind.as_str() {
            "reg" => EntryKind::File,
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::Char,
            "block" => EntryKind::Block,
            "fifo" => EntryKind::Fifo,
            other => return Err(bad(format!("{name:?}: unknown type {other:?}"))),
        };
        let num = |v: i64, what: &str| -> Result<u32> {
            u32::try_from(v).map_err(|_| bad(format!("{name:?}: {what} {v} out of range")))
        };
        let size = if kind == EntryKind::File {
            u64::try_from(e.size).map_err(|_| bad(format!("{name:?}: negative size")))?
        } else {
            0
        };
        let (mtime, mtime_nsec) = match &e.modtime {
            Some(t) => parse_time(t).ok_or_else(|| bad(format!("{name:?}: bad time {t:?}")))?,
            None => (0, 0),
        };
        let mut xattrs = Vec::new();
        for (k, v) in &e.xattrs {
            let v = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|_| bad(format!("{name:?}: xattr {k} is not base64")))?;
            xattrs.push((k.as_bytes().to_vec(), v));
        }
        let link = match kind {
            EntryKind::Hardlink => normalize_path(e.link_name.trim_end_matches('/').as_bytes())
                .map_err(|why| bad(format!("{name:?}: link {why}")))?,
            _ => e.link_name.as_bytes().to_vec(),
        };
        entries.push(TarEntry {
            path,
            kind,
            mode: (e.mode & 0o7777) as u32,
            uid: num(e.uid, "uid")?,
            gid: num(e.gid, "gid")?,
            mtime,
            mtime_nsec,
            size,
            link,
            dev_major: num(e.dev_major, "device major")?,
            dev_minor: num(e.dev_minor, "device minor")?,
            xattrs,
            offset: uoff,
            sparse: None,
        });
        i += 1;
        if kind != EntryKind::File || size == 0 {
            continue;
        }
        // The content's frames: one, or one per chunk entry that follows.
        let mut parts = vec![e];
        while i < toc.entries.len() && toc.entries[i].kind == "chunk" {
            parts.push(&toc.entries[i]);
            i += 1;
        }
        let whole = parts.len() == 1;
        let first = uoff;
        for (k, c) in parts.iter().enumerate() {
            if c.inner_offset != 0 {
                // (eStargz's MinChunkSize packs small files into one member.)
                return Err(bad(format!(
                    "{name:?}: content inside another's frame (innerOffset): not supported"
                )));
            }
            let coffset = u64::try_from(c.chunk_offset)
                .map_err(|_| bad(format!("{name:?}: bad chunk offset")))?;
            let coffset = if whole { 0 } else { coffset };
            if coffset != uoff - first {
                return Err(bad(format!("{name:?}: chunks out of order")));
            }
            let next_coffset = match parts.get(k + 1) {
                Some(n) => u64::try_from(n.chunk_offset)
                    .map_err(|_| bad(format!("{name:?}: bad chunk offset")))?,
                None => size,
            };
            let len = next_coffset
                .checked_sub(coffset)
                .filter(|&l| l > 0)
                .ok_or_else(|| bad(format!("{name:?}: chunks out of order")))?;
            if !whole && c.chunk_size != 0 && u64::try_from(c.chunk_size).ok() != Some(len) {
                return Err(bad(format!("{name:?}: chunk sizes do not add up")));
            }
            let start =
                u64::try_from(c.offset).map_err(|_| bad(format!("{name:?}: bad offset")))?;
            let end = match parts.get(k + 1) {
                Some(n) => n.offset,
                None if e.end_offset > 0 => e.end_offset,
                None => i64::try_from(next_start(start)).unwrap_or(i64::MAX),
            };
            let end = u64::try_from(end).map_err(|_| bad(format!("{name:?}: bad offset")))?;
            if start >= end || end > blob_size {
                return Err(bad(format!("{name:?}: content outside the blob")));
            }
            let digest = if whole && !c.digest.is_empty() {
                &c.digest
            } else {
                &c.chunk_digest
            };
            let digest: Digest = digest
                .parse()
                .map_err(|_| bad(format!("{name:?}: bad content digest {digest:?}")))?;
            frames.push(Frame {
                uoff,
                coff: start,
                cend: end,
            });
            chunks.push(Chunk {
                start,
                end,
                digest,
                uncompressed: Some(len),
            });
            uoff = uoff
                .checked_add(len)
                .ok_or_else(|| bad(format!("{name:?}: sizes overflow")))?;
        }
        if uoff - first != size {
            return Err(bad(format!("{name:?}: chunks do not add up to its size")));
        }
    }
    let published = PublishedLayer {
        digest: layer,
        diff_id,
        compression,
        compressed_size: blob_size,
        uncompressed_size: uoff,
        access: Access::Frames(frames),
        entries,
        chunks,
        windows: None,
    };
    // Same checks as for an index from the registry (ordering, ranges, names).
    // (At zstd's fastest level: this copy is the store's own, never sent anywhere, and it
    // is made before a lazy mount is live.)
    let encoded = published.encode_at(1)?;
    let published = PublishedLayer::decode(&encoded, layer, blob_size)?;
    Ok((published, encoded, prefetch_end))
}

/// The first `len` bytes of a content frame — a zstd frame, or a gzip member (eStargz) — as a
/// reader; what follows them in the frame (tar padding and headers, as stargz-snapshotter
/// writes them) is never decompressed.
pub fn frame_reader(frame: &[u8], len: u64) -> std::io::Result<impl std::io::Read + '_> {
    use std::io::Read;
    let r: Box<dyn Read + '_> = if frame.starts_with(&[0x1f, 0x8b]) {
        Box::new(super::gzip::GzipReader::new(frame, None)?)
    } else {
        Box::new(zstd::stream::read::Decoder::with_buffer(frame)?)
    };
    Ok(r.take(len))
}

/// Decompresses the first `len` bytes of a content frame (see [`frame_reader`]) into `out`, a
/// buffer at a time. Fails if the frame holds fewer.
pub fn frame_prefix(frame: &[u8], len: u64, out: &mut dyn FnMut(&[u8])) -> std::io::Result<()> {
    use std::io::Read;
    let mut r = frame_reader(frame, len)?;
    let mut buf = vec![0u8; (128 << 10).min(len as usize).max(1)];
    let mut left = len;
    while left > 0 {
        match r.read(&mut buf) {
            Ok(0) => return Err(short_frame()),
            Ok(n) => {
                out(&buf[..n]);
                left -= n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A frame that holds fewer bytes than its table says.
pub fn short_frame() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "frame shorter than its table says",
    )
}

/// Parses an RFC 3339 time as Go writes it (`2006-01-02T15:04:05.999999999Z07:00`).
fn parse_time(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, sec) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    let mut rest = &s[19..];
    let mut nsec = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in frac[..digits].bytes().take(9).enumerate() {
            nsec += (c - b'0') as u32 * 10u32.pow(8 - i as u32);
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = (
                rest.get(1..3)?.parse::<i64>().ok()?,
                rest.get(4..6)?.parse::<i64>().ok()?,
            );
            sign * (oh * 3600 + om * 60)
        }
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + h * 3600 + mi * 60 + sec - offset, nsec))
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

    #[test]
    fn go_times() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(parse_time("2026-12-02T08:22:57Z"), Some((1796199777, 0)));
        assert_eq!(
            parse_time("2000-02-29T12:00:00.5+01:00"),
            Some((951822000, 500_000_000))
        );
        assert_eq!(parse_time("0001-01-01T00:00:00Z"), Some((-62135596800, 0)));
        assert_eq!(parse_time("1969-12-31T23:59:59.000000001Z"), Some((-1, 1)));
        assert_eq!(parse_time("yesterday"), None);
    }

    /// #15: a table of contents that inflates far beyond what a real one compresses from
    /// (here 300,000 identical entries in a few KiB) is refused before it is parsed, naming
    /// the layer: each parsed entry costs some 300 bytes of memory.
    #[test]
    fn tocs_that_inflate_far_beyond_a_real_one_are_refused() {
        let layer = Digest::of(b"toc bomb");
        let toc = |n: usize| {
            let entries = vec![r#"{"type":"dir","name":"d"}"#; n].join(",");
            let json = format!(r#"{{"version":1,"entries":[{entries}]}}"#);
            let z = zstd::bulk::compress(json.as_bytes(), 19).unwrap();
            let loc = TocLocation {
                offset: 0,
                length: z.len() as u64,
                uncompressed: json.len() as u64,
                digest: Digest::of(&z),
            };
            (z, loc)
        };
        let (z, loc) = toc(300_000);
        assert!(z.len() < 16 << 10, "{}", z.len());
        let err = refused(parse(&z, &loc, layer, 1 << 20, Digest::of(b"diff")));
        assert!(err.contains(&layer.to_string()), "{err}");
        assert!(err.contains("inflate to more than"), "{err}");
        let (z, loc) = toc(3);
        parse(&z, &loc, layer, 1 << 20, Digest::of(b"diff")).unwrap();
    }

    /// stargz-snapshotter's zstd:chunked (`ctr-remote image convert --zstdchunked`): no
    /// `endOffset`, a `.no.prefetch.landmark` first, and the tar padding and next headers in
    /// each content frame after the content. Before: "content outside the blob".
    #[test]
    fn ctr_remote_tables_without_end_offsets() {
        let layer = Digest::of(b"ctr-remote layer");
        let frame = |d: &[u8]| zstd::bulk::compress(d, 3).unwrap();
        let mut blob = frame(&[0u8; 512]); // headers
        let lm = blob.len();
        blob.extend(frame(&[&[0xf][..], &[0u8; 1023]].concat()));
        let a = blob.len();
        blob.extend(frame(&[&b"hello"[..], &[0u8; 1019]].concat()));
        let end = blob.len();
        blob.extend([0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0]); // the TOC's skippable frame
        let sha = |d: &[u8]| Digest::of(d).to_string();
        let json = serde_json::json!({"version": 1, "entries": [
            {"name": ".no.prefetch.landmark", "type": "reg", "size": 1, "offset": lm,
             "digest": sha(&[0xf]), "chunkDigest": sha(&[0xf])},
            {"name": "etc", "type": "dir", "mode": 0o755},
            {"name": "etc/a", "type": "reg", "size": 5, "offset": a, "mode": 0o644,
             "digest": sha(b"hello"), "chunkDigest": sha(b"hello")},
        ]})
        .to_string();
        let z = zstd::bulk::compress(json.as_bytes(), 3).unwrap();
        let loc = TocLocation {
            offset: blob.len() as u64,
            length: z.len() as u64,
            uncompressed: json.len() as u64,
            digest: Digest::of(&z),
        };
        blob.extend(&z);
        let (p, _) = parse(&z, &loc, layer, blob.len() as u64, Digest::of(b"diff")).unwrap();
        let names: Vec<_> = p.entries.iter().map(|e| e.path.clone()).collect();
        assert_eq!(names, [b"etc".to_vec(), b"etc/a".to_vec()]);
        assert_eq!(p.chunks.len(), 1);
        let c = p.chunks[0];
        assert_eq!((c.start, c.end), (a as u64, end as u64));
        assert!(c.verify(&blob[a..end]));
        let mut other = blob[a..end].to_vec();
        other.truncate(other.len() - 1);
        assert!(!c.verify(&other), "a frame cut short");
    }

    #[test]
    fn annotations() {
        let d = Digest::of(b"toc");
        let mut a = BTreeMap::new();
        a.insert(POSITION_KEYS[1].to_string(), "100:20:50:1".to_string());
        a.insert(CHECKSUM_KEYS[1].to_string(), d.to_string());
        let loc = TocLocation::from_annotations(&a, 200).unwrap();
        assert_eq!(
            (loc.offset, loc.length, loc.uncompressed, loc.digest),
            (100, 20, 50, d)
        );
        assert!(
            TocLocation::from_annotations(&a, 110).is_none(),
            "past the blob"
        );
        a.insert(POSITION_KEYS[1].to_string(), "100:20:50:2".to_string());
        assert!(
            TocLocation::from_annotations(&a, 200).is_none(),
            "unknown type"
        );
    }
}
