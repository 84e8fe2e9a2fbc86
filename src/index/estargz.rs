//! eStargz layers (stargz-snapshotter, `nerdctl`/buildkit `--estargz`): a gzip layer that
//! carries its own table of contents, so it mounts lazily with no index of ours.
//!
//! The blob is a gzip stream of many members, each regular file's content starting a member of
//! its own (large files cut into chunks, a member each); the tar headers of the entries that
//! follow sit at the end of the member before. The last two members are the TOC — a tar entry
//! `stargz.index.json` holding a JSON list of every entry with its metadata, the blob offset of
//! its content's member(s) and the sha256 of each chunk — and a 51-byte footer: an empty gzip
//! member whose extra field holds the TOC's offset (`%016x` then `STARGZ`). The layer
//! descriptor's annotation [`TOC_DIGEST_KEY`] gives the sha256 of the TOC JSON, so the manifest
//! digest covers the TOC, which covers every chunk.
//!
//! zstd:chunked borrowed this TOC, and the table is built the same way (see
//! `chunked::table`): a stream of the files' contents laid end to end, each content
//! member a frame whose first bytes, inflated, are checked against their chunk digest.

use std::collections::BTreeMap;
use std::io::Read;

use super::chunked::{table, Toc, MAX_TOC};
use super::published::{body_limit, PublishedLayer};
use super::Compression;
use crate::{Digest, Error, Result};

/// Layer annotation holding the sha256 of the TOC JSON.
pub const TOC_DIGEST_KEY: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Size of the footer.
pub const FOOTER_SIZE: u64 = 51;
/// Size of the footer of the first stargz format (no `SG` subfield header).
const LEGACY_FOOTER_SIZE: u64 = 47;
/// Bytes fetched from the end of a blob at first: footer and, usually, the whole TOC (one
/// request). A larger TOC takes a second.
pub const TAIL: u64 = 64 << 10;

/// The TOC digest an eStargz layer's annotations pin (`None` without the annotation; an
/// error if it is not a digest).
pub fn toc_digest(a: &BTreeMap<String, String>) -> Option<std::result::Result<Digest, String>> {
    let v = a.get(TOC_DIGEST_KEY)?;
    Some(
        v.parse()
            .map_err(|_| format!("{TOC_DIGEST_KEY} {v:?} is not a digest")),
    )
}

/// Where the TOC starts and where it ends (the footer's first byte), from the last bytes of
/// a blob of `blob_size` bytes (`tail`, at least the footer); `None` if they are no eStargz
/// footer.
pub fn footer(tail: &[u8], blob_size: u64) -> Option<(u64, u64)> {
    let gzip_extra = |f: &[u8]| -> Option<Vec<u8>> {
        if f.len() < 12 || f[0..3] != [0x1f, 0x8b, 8] || f[3] & 4 == 0 {
            return None;
        }
        let xlen = u16::from_le_bytes([f[10], f[11]]) as usize;
        f.get(12..12 + xlen).map(<[u8]>::to_vec)
    };
    let offset = |sub: &[u8]| -> Option<u64> {
        if sub.len() != 22 || &sub[16..] != b"STARGZ" {
            return None;
        }
        u64::from_str_radix(std::str::from_utf8(&sub[..16]).ok()?, 16).ok()
    };
    let at = |size: u64| tail.len().checked_sub(size as usize).map(|s| &tail[s..]);
    let (toc, footer) = if let Some(extra) = at(FOOTER_SIZE).and_then(gzip_extra) {
        // `SG`, the subfield's length (22), then the subfield.
        if extra.len() != 26 || &extra[..2] != b"SG" || extra[2..4] != [22, 0] {
            return None;
        }
        (offset(&extra[4..])?, blob_size.checked_sub(FOOTER_SIZE)?)
    } else {
        let extra = at(LEGACY_FOOTER_SIZE).and_then(gzip_extra)?;
        (offset(&extra)?, blob_size.checked_sub(LEGACY_FOOTER_SIZE)?)
    };
    (toc < footer).then_some((toc, footer))
}

/// What an eStargz layer's TOC gives.
pub enum Parsed {
    /// The served table, and where the prefetch landmark's content starts if the TOC has one
    /// (the contents before it are the ones to fetch first).
    Table(PublishedLayer, Vec<u8>, Option<u64>),
    /// A TOC this version does not serve from (unreadable, past its bounds, packed chunks):
    /// the layer is pulled whole, which its digest checks.
    Unusable(Error),
}

/// Builds the served table of an eStargz layer from its TOC member (the blob's bytes from the
/// TOC offset to the footer), checking the TOC JSON against `toc_digest` (the annotation's)
/// first: a TOC that is not the annotated one is an error (the image contradicts itself).
/// `diff_id` is the config's, checked when the layer completes.
pub fn parse(
    member: &[u8],
    toc_offset: u64,
    toc_digest: &Digest,
    layer: Digest,
    blob_size: u64,
    diff_id: Digest,
) -> Result<Parsed> {
    let bad = |detail: String| Error::CorruptLayer {
        layer,
        detail: format!("eStargz table of contents: {detail}"),
    };
    let json = match toc_json(member) {
        Ok(json) => json,
        Err(e) => return Ok(Parsed::Unusable(bad(e))),
    };
    if Digest::of(&json) != *toc_digest {
        return Err(bad(format!(
            "does not match the digest in the manifest ({TOC_DIGEST_KEY})"
        )));
    }
    let toc: Toc = match serde_json::from_slice(&json) {
        Ok(toc) => toc,
        Err(e) => return Ok(Parsed::Unusable(bad(format!("not valid JSON: {e}")))),
    };
    Ok(
        match table(
            &toc,
            layer,
            blob_size,
            diff_id,
            Compression::Gzip,
            toc_offset,
            &bad,
        ) {
            Ok((p, encoded, prefetch)) => Parsed::Table(p, encoded, prefetch),
            Err(e) => Parsed::Unusable(e),
        },
    )
}

/// The TOC JSON out of its gzip member: a tar entry `stargz.index.json`. Bounded, as for our
/// own indexes, by what a real table compresses from.
fn toc_json(member: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if member.len() as u64 > MAX_TOC {
        return Err(format!("{} bytes, more than {MAX_TOC}", member.len()));
    }
    let limit = body_limit(member.len()).min(MAX_TOC);
    let gz = super::gzip::GzipReader::new(member, None).map_err(|e| e.to_string())?;
    // The tar header, then the JSON (and the tar's end, not read).
    let mut tar = tar::Archive::new(gz.take(limit + 1024));
    let mut entries = tar.entries().map_err(|e| format!("its tar: {e}"))?;
    let mut entry = entries
        .next()
        .ok_or("no tar entry in its member")?
        .map_err(|e| format!("its tar: {e}"))?;
    let path = entry.path_bytes().into_owned();
    if path != super::chunked::TOC_TAR_NAME.as_bytes() {
        return Err(format!(
            "its member holds {:?}, not {}",
            String::from_utf8_lossy(&path),
            super::chunked::TOC_TAR_NAME
        ));
    }
    let size = entry.size();
    if size > limit {
        return Err(format!(
            "{} compressed bytes that inflate to more than {limit}: no real table does",
            member.len()
        ));
    }
    let mut json = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut json)
        .map_err(|e| format!("decompressing: {e}"))?;
    if json.len() as u64 != size {
        return Err("cut short".into());
    }
    Ok(json)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::index::published::Chunk;
    use crate::index::Access;

    /// A gzip member of `data` (stored blocks: enough for tests, and a real member).
    pub fn member(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
        let mut chunks = data.chunks(65535).peekable();
        if chunks.peek().is_none() {
            out.extend([1, 0, 0, 0xff, 0xff]);
        }
        while let Some(c) = chunks.next() {
            out.push(u8::from(chunks.peek().is_none()));
            let n = c.len() as u16;
            out.extend(n.to_le_bytes());
            out.extend((!n).to_le_bytes());
            out.extend(c);
        }
        out.extend(crc32(data).to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    fn header(name: &str, size: u64, kind: u8) -> Vec<u8> {
        link_header(name, size, kind, None)
    }

    fn link_header(name: &str, size: u64, kind: u8, link: Option<&str>) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn pad(n: u64) -> Vec<u8> {
        vec![0; ((512 - n % 512) % 512) as usize]
    }

    fn footer_bytes(toc: u64) -> Vec<u8> {
        let extra = [&b"SG"[..], &[22, 0], format!("{toc:016x}STARGZ").as_bytes()].concat();
        let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255];
        f.extend((extra.len() as u16).to_le_bytes());
        f.extend(extra);
        f.extend([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.len() as u64, FOOTER_SIZE);
        f
    }

    /// An eStargz blob as stargz-snapshotter lays it out: `dir/`, the prefetch landmark,
    /// `dir/a` (one chunk), `dir/b` (two chunks of 3 bytes), a symlink; returns the blob, its
    /// TOC JSON, the uncompressed tar (for the diff_id) and the TOC offset.
    pub fn sample(toc_edit: impl Fn(&mut serde_json::Value)) -> (Vec<u8>, Vec<u8>, Vec<u8>, u64) {
        let (a, b) = (b"hello".to_vec(), b"abcdefg".to_vec());
        let landmark = vec![0xf];
        let mut blob = Vec::new();
        let mut tar = Vec::new();
        let mut put = |blob: &mut Vec<u8>, part: Vec<u8>| {
            tar.extend(&part);
            let off = blob.len() as u64;
            blob.extend(member(&part));
            off
        };
        put(
            &mut blob,
            [
                header("dir/", 0, b'5'),
                header(".prefetch.landmark", 1, b'0'),
            ]
            .concat(),
        );
        let lm = put(
            &mut blob,
            [landmark.clone(), pad(1), header("dir/a", 5, b'0')].concat(),
        );
        let a_off = put(
            &mut blob,
            [a.clone(), pad(5), header("dir/b", 7, b'0')].concat(),
        );
        let b1 = put(&mut blob, b[..3].to_vec());
        let b2 = put(&mut blob, b[3..6].to_vec());
        let ln = link_header("dir/l", 0, b'2', Some("a"));
        let b3 = put(&mut blob, [b[6..].to_vec(), pad(7), ln].concat());
        let sha = |d: &[u8]| Digest::of(d).to_string();
        let mut toc = serde_json::json!({"version": 1, "entries": [
            {"name": "dir/", "type": "dir", "mode": 0o755},
            {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": lm,
             "digest": sha(&landmark), "chunkDigest": sha(&landmark)},
            {"name": "dir/a", "type": "reg", "size": 5, "mode": 0o644, "offset": a_off,
             "modtime": "2024-01-02T03:04:05Z", "digest": sha(&a), "chunkDigest": sha(&a)},
            {"name": "dir/b", "type": "reg", "size": 7, "mode": 0o644, "offset": b1,
             "chunkSize": 3, "digest": sha(&b), "chunkDigest": sha(&b[..3])},
            {"name": "dir/b", "type": "chunk", "offset": b2, "chunkOffset": 3, "chunkSize": 3,
             "chunkDigest": sha(&b[3..6])},
            {"name": "dir/b", "type": "chunk", "offset": b3, "chunkOffset": 6,
             "chunkDigest": sha(&b[6..])},
            {"name": "dir/l", "type": "symlink", "linkName": "a"},
        ]});
        toc_edit(&mut toc);
        let json = serde_json::to_vec_pretty(&toc).unwrap();
        let toc_off = blob.len() as u64;
        let toc_tar = [
            header("stargz.index.json", json.len() as u64, b'0'),
            json.clone(),
            pad(json.len() as u64),
            vec![0; 1024],
        ]
        .concat();
        put(&mut blob, toc_tar);
        blob.extend(footer_bytes(toc_off));
        (blob, json, tar, toc_off)
    }

    fn parse_blob(blob: &[u8], json: &[u8]) -> Result<(PublishedLayer, Option<u64>)> {
        let (toc, end) = footer(&blob[blob.len() - 100..], blob.len() as u64).unwrap();
        match parse(
            &blob[toc as usize..end as usize],
            toc,
            &Digest::of(json),
            Digest::of(blob),
            blob.len() as u64,
            Digest::of(b"diff"),
        )? {
            Parsed::Table(p, _, prefetch) => Ok((p, prefetch)),
            Parsed::Unusable(e) => Err(e),
        }
    }

    #[test]
    fn footers() {
        let f = footer_bytes(0x1234);
        assert_eq!(footer(&f, 0x2000), Some((0x1234, 0x2000 - 51)));
        assert_eq!(footer(&f, 0x1234 + 51), None, "TOC at the footer");
        let mut legacy = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 22, 0];
        legacy.extend(b"0000000000000010STARGZ");
        legacy.extend([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(footer(&legacy, 100), Some((16, 53)));
        assert_eq!(footer(&[0u8; 51], 100), None);
        let mut wrong = f.clone();
        wrong[35] = b'X';
        assert_eq!(footer(&wrong, 0x2000), None);
    }

    /// The table addresses the contents end to end; each chunk's member inflates to its
    /// content first (tar padding and following headers after it), which verifies; the
    /// landmark is not served but marks the prefetch end.
    #[test]
    fn table_from_a_toc() {
        let (blob, json, _, toc_off) = sample(|_| {});
        let (p, prefetch) = parse_blob(&blob, &json).unwrap();
        let names: Vec<_> = p
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert_eq!(names, ["dir", "dir/a", "dir/b", "dir/l"]);
        assert_eq!(p.uncompressed_size, 12);
        assert_eq!(p.compression, Compression::Gzip);
        assert_eq!(p.entries[2].offset, 5);
        assert_eq!(p.entries[3].link, b"a");
        assert!(prefetch.is_some());
        let Access::Frames(frames) = &p.access else {
            panic!("not frames")
        };
        assert_eq!(frames.len(), 4);
        assert_eq!(frames.last().unwrap().cend, toc_off);
        let mut stream = Vec::new();
        for c in &p.chunks {
            let bytes = &blob[c.start as usize..c.end as usize];
            assert!(c.verify(bytes), "{c:?}");
            let mut flipped = bytes.to_vec();
            flipped[15] ^= 1; // (stored block: the first content byte)
            assert!(!c.verify(&flipped));
            crate::index::chunked::frame_prefix(bytes, c.uncompressed.unwrap(), &mut |b| {
                stream.extend_from_slice(b)
            })
            .unwrap();
        }
        assert_eq!(stream, b"helloabcdefg");
        // A wrong chunk digest: its chunk fails, not the table.
        let bad: Chunk = Chunk {
            digest: Digest::of(b"x"),
            ..p.chunks[0]
        };
        assert!(!bad.verify(&blob[bad.start as usize..bad.end as usize]));
    }

    #[test]
    fn a_toc_not_the_annotated_one_is_refused() {
        let (blob, json, _, toc) = sample(|_| {});
        let (_, end) = footer(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
        let err = parse(
            &blob[toc as usize..end as usize],
            toc,
            &Digest::of(&[&json[..], b" "].concat()),
            Digest::of(&blob),
            blob.len() as u64,
            Digest::of(b"diff"),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("does not match the digest"), "{err}");
    }

    /// An edit of a TOC's JSON.
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;

    #[test]
    fn broken_tocs_are_refused() {
        let cases: Vec<(&str, Edit)> = vec![
            (
                "outside the blob",
                Box::new(|t| t["entries"][2]["offset"] = 10_000_000u64.into()),
            ),
            (
                "innerOffset",
                Box::new(|t| t["entries"][2]["innerOffset"] = 3.into()),
            ),
            (
                "do not add up",
                Box::new(|t| t["entries"][4]["chunkSize"] = 4.into()),
            ),
            ("version", Box::new(|t| t["version"] = 2.into())),
        ];
        for (want, edit) in cases {
            let (blob, json, _, _) = sample(edit);
            let err = match parse_blob(&blob, &json) {
                Ok(_) => panic!("{want}: accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    /// The format's own entries are not served: the TOC's tar entry and the landmarks.
    #[test]
    fn format_entries_are_not_files() {
        use crate::index::chunked::is_format_entry;
        assert!(is_format_entry(b"stargz.index.json"));
        assert!(is_format_entry(b".no.prefetch.landmark"));
        assert!(!is_format_entry(b"dir/stargz.index.json"));
    }
}
