//! Arbitrary bytes as a layer blob (first byte picks gzip / zstd / plain tar): indexing must
//! return an error or an index, never panic or hang; and when it succeeds, every file's bytes
//! must read back through the random-access reader exactly as the sequential stream had them.
#![no_main]

use std::io::Read;

use bux_fuse::index::{self, Compression, EntryKind, LayerReader, SpanCache};
use bux_fuse::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, blob)) = data.split_first() else { return };
    let compression = match sel % 3 {
        0 => Compression::Gzip,
        1 => Compression::Zstd,
        _ => Compression::None,
    };
    let digest = Digest::of(blob);
    let mut seekable = Vec::new();
    let Ok(idx) = index::build(blob, compression, digest, Some(&mut seekable)) else { return };
    // The sequential stream, for comparison.
    let stream: Vec<u8> = match compression {
        Compression::Gzip => {
            let mut out = Vec::new();
            index::gzip::GzipReader::new(blob, None).unwrap().read_to_end(&mut out).unwrap();
            out
        }
        Compression::Zstd => zstd::decode_all(blob).unwrap(),
        Compression::None => blob.to_vec(),
    };
    assert_eq!(stream.len() as u64, idx.uncompressed_size);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, if compression == Compression::Zstd { &seekable[..] } else { blob }).unwrap();
    let reader = LayerReader::open(0, &path, idx.access.clone(), idx.uncompressed_size).unwrap();
    let cache = SpanCache::new(1 << 20);
    for e in idx.entries.iter().filter(|e| e.kind == EntryKind::File && e.sparse.is_none()) {
        let len = e.size.min(1 << 16) as usize;
        let mut buf = vec![0u8; len];
        if let Ok(n) = reader.read_at(&cache, e.offset, &mut buf) {
            let start = e.offset as usize;
            let end = (start + n).min(stream.len());
            assert_eq!(&buf[..end - start], &stream[start..end]);
        }
    }
});
