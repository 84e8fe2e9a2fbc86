//! Indexes that come from a registry: a published bux-fuse layer index (postcard inside zstd)
//! and a zstd:chunked table of contents (JSON inside zstd). Whatever the bytes, decoding either
//! must fail cleanly or give a table that passes validation and merges without panicking.
#![no_main]

use bux_fuse::index::chunked::{self, TocLocation};
use bux_fuse::index::published::PublishedLayer;
use bux_fuse::tree::merge;
use bux_fuse::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layer = Digest::of(b"layer");
    let size = 1 << 20;
    // The published index: our magic, then the fuzzer's bytes as the compressed body.
    let body = zstd::bulk::compress(data, 1).unwrap();
    let mut blob = b"BUXPUB\x00\x01".to_vec();
    blob.extend_from_slice(&body);
    if let Ok(p) = PublishedLayer::decode(&blob, layer, size) {
        let idx = p.to_index();
        let _ = merge([(idx.source(), idx.entries.as_slice())]);
    }
    // The zstd:chunked TOC: the fuzzer's bytes as its JSON, digest matching.
    let toc = zstd::bulk::compress(data, 1).unwrap();
    let loc = TocLocation {
        offset: 0,
        length: toc.len() as u64,
        uncompressed: data.len() as u64,
        digest: Digest::of(&toc),
    };
    if let Ok((p, _)) = chunked::parse(&toc, &loc, layer, size, layer) {
        let idx = p.to_index();
        let _ = merge([(idx.source(), idx.entries.as_slice())]);
    }
});
