use super::*;
use crate::index::gzip::GzipReader;
use crate::index::gzip_members_at;

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    // Half compressible text, half noise, so deflate emits varied blocks.
    crate::index::xorshift_bytes(n, &mut { seed }, |i, x| {
        if (i / 5000) % 2 == 0 {
            b"abcdefgh"[(x % 8) as usize]
        } else {
            x as u8
        }
    })
}

/// Checkpoints of gzip stream `gz`, every `spacing` bytes of output.
fn checkpoints(gz: &[u8], spacing: u64) -> Vec<crate::index::gzip::Checkpoint> {
    let mut r = GzipReader::new(gz, Some(spacing)).unwrap();
    io::copy(&mut r, &mut io::sink()).unwrap();
    r.take_checkpoints()
}

/// A stored gzip layer (`size` bytes uncompressed) and its reader; the directory holds the
/// blob for as long as the reader is used.
fn open_layer(
    gz: &[u8],
    cps: Vec<crate::index::gzip::Checkpoint>,
    size: usize,
) -> (tempfile::TempDir, LayerReader) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, gz).unwrap();
    let reader = LayerReader::open(0, &path, Access::Gzip(cps), size as u64).unwrap();
    (dir, reader)
}

/// 3 MB of pseudo-random bytes (`seed`) in one gzip member with checkpoints every 256 KiB
/// (more than six spans): the bytes, the spans' starts, and a reader of them.
fn spans_of_256k(seed: u64) -> (Vec<u8>, Vec<u64>, tempfile::TempDir, LayerReader) {
    let data = pseudo_random(3_000_000, seed);
    let gz = gzip_members(&[&data]);
    let cps = checkpoints(&gz, 256 << 10);
    let starts: Vec<u64> = cps.iter().map(|c| c.uoff).collect();
    assert!(starts.len() > 6, "{} spans", starts.len());
    let (dir, reader) = open_layer(&gz, cps, data.len());
    (data, starts, dir, reader)
}

fn gzip_members(parts: &[&[u8]]) -> Vec<u8> {
    gzip_members_at(&parts.iter().map(|p| (*p, 6)).collect::<Vec<_>>())
}

/// A gzip stream that is one fixed-Huffman deflate block of `groups` runs: a literal
/// (varying), then `run` matches of 258 bytes at distance 1. Returns (gzip, content).
fn one_huge_block(groups: usize, run: usize) -> (Vec<u8>, Vec<u8>) {
    let mut b = crate::index::gzip_whole::Bits::default();
    let mut content = Vec::new();
    b.put(1, 1); // BFINAL
    b.put(1, 2); // fixed Huffman
    for g in 0..groups {
        let lit = (g % 143) as u64 + 1; // fixed 8-bit literal codes cover 0..=143
        b.code(0x30 + lit, 8);
        content.push(lit as u8);
        for _ in 0..run {
            b.code(0b1100_0101, 8); // length 258 (code 285)
            b.code(0, 5); // distance 1
            content.extend(std::iter::repeat_n(lit as u8, 258));
        }
    }
    b.code(0, 7); // end of block
    b.put(0, 7);
    let mut crc = flate2::Crc::new();
    crc.update(&content);
    let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    gz.extend(&b.out);
    gz.extend(crc.sum().to_le_bytes());
    gz.extend((content.len() as u32).to_le_bytes());
    (gz, content)
}

/// A span too big to cache (one deflate block of 20 MiB) read sequentially costs one
/// inflation of it, not one per read from its start; a reader elsewhere in it too.
#[test]
fn sequential_reads_of_an_oversized_span_inflate_it_once() {
    let (gz, data) = one_huge_block(800, 100);
    assert!(data.len() as u64 > MAX_CACHED_SPAN, "{}", data.len());
    let mut r = GzipReader::new(&gz[..], Some(1 << 20)).unwrap();
    let mut all = Vec::new();
    r.read_to_end(&mut all).unwrap();
    assert_eq!(all, data);
    let cps = r.take_checkpoints();
    let first_span = cps.get(1).map_or(data.len() as u64, |c| c.uoff);
    assert!(
        first_span > MAX_CACHED_SPAN,
        "one block, one span: {first_span}"
    );
    let (_dir, reader) = open_layer(&gz, cps, data.len());
    let cache = SpanCache::new(1 << 20);
    let chunk = 128 << 10;
    let mut other = 5_000_000;
    for off in (0..data.len()).step_by(chunk) {
        let mut buf = vec![0u8; chunk.min(data.len() - off)];
        assert_eq!(
            reader.read_at(&cache, off as u64, &mut buf).unwrap(),
            buf.len()
        );
        assert!(buf == data[off..off + buf.len()], "at {off}");
        // A second sequential reader, interleaved.
        if off % (8 * chunk) == 0 && other + 1000 < data.len() {
            let mut buf = vec![0u8; 1000];
            reader.read_at(&cache, other as u64, &mut buf).unwrap();
            assert!(buf == data[other..other + 1000], "other at {other}");
            other += 1000;
        }
    }
    let inflated = cache.stats.decompressed.load(Ordering::Relaxed);
    assert!(
        inflated < 2 * data.len() as u64,
        "{inflated} bytes inflated to read {} sequentially",
        data.len()
    );
}

#[test]
fn gzip_random_reads_match_across_members() {
    let a = pseudo_random(3_000_000, 1);
    let b = pseudo_random(1_500_000, 2);
    let data: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
    let gz = gzip_members(&[&a, &b]);
    let mut r = GzipReader::new(&gz[..], Some(256 * 1024)).unwrap();
    let mut all = Vec::new();
    r.read_to_end(&mut all).unwrap();
    assert_eq!(all, data);
    let cps = r.take_checkpoints();
    assert!(cps.len() > 10, "only {} checkpoints", cps.len());
    assert!(
        cps.iter().any(|c| c.bits != 0),
        "no primed checkpoint exercised"
    );

    let (_dir, reader) = open_layer(&gz, cps, data.len());
    let cache = SpanCache::new(1 << 20);
    for (off, len) in [
        (0u64, 10usize),
        (2_999_990, 20),
        (1_234_567, 300_000),
        (4_499_000, 5_000),
        (17, 4_000_000),
    ] {
        let mut buf = vec![0u8; len];
        let n = reader.read_at(&cache, off, &mut buf).unwrap();
        let end = (off as usize + len).min(data.len());
        assert_eq!(&buf[..n], &data[off as usize..end], "read at {off}+{len}");
    }
    assert!(cache.bytes() <= 1 << 20);
    assert!(cache.stats.misses.load(Ordering::Relaxed) > 0);
}

#[test]
fn concurrent_misses_of_one_span_decompress_it_once() {
    let data = pseudo_random(3_000_000, 5);
    let gz = gzip_members(&[&data]);
    let cps = checkpoints(&gz, 1 << 20);
    let (_dir, reader) = open_layer(&gz, cps, data.len());
    let cache = SpanCache::new(16 << 20);
    let barrier = std::sync::Barrier::new(8);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (reader, cache, barrier, data) = (&reader, &cache, &barrier, &data);
            s.spawn(move || {
                barrier.wait();
                let mut buf = vec![0u8; 4096];
                let off = 1_500_000 + t * 4096;
                reader.read_at(cache, off, &mut buf).unwrap();
                assert_eq!(&buf[..], &data[off as usize..off as usize + 4096]);
            });
        }
    });
    assert_eq!(cache.stats.misses.load(Ordering::Relaxed), 1);
    assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 7);
}

/// A read inflates its span only as far as the read ends; a read further on goes on from
/// there (nothing inflated twice); a read behind it is a copy.
#[test]
fn gzip_spans_inflate_only_to_the_end_of_the_read() {
    let data = pseudo_random(3_000_000, 9);
    let gz = gzip_members(&[&data]);
    let cps = checkpoints(&gz, 1 << 30);
    assert_eq!(cps.len(), 1, "one span");
    let (_dir, reader) = open_layer(&gz, cps, data.len());
    let cache = SpanCache::new(16 << 20);
    let inflated = || cache.stats.decompressed.load(Ordering::Relaxed);
    let mut buf = vec![0u8; 131072];
    for (off, inflated_after) in [
        (1_000_000u64, 1_131_072u64),
        (2_000_000, 2_131_072),
        (10, 2_131_072),
        (2_500_000, 2_631_072),
    ] {
        reader.read_at(&cache, off, &mut buf).unwrap();
        assert_eq!(&buf[..], &data[off as usize..off as usize + buf.len()]);
        assert_eq!(inflated(), inflated_after, "after the read at {off}");
    }
    assert_eq!(cache.stats.misses.load(Ordering::Relaxed), 1);
}

/// A walk of the stream in order gets the spans ahead of it decompressed (up to
/// [`AHEAD_SPANS`], each once); a read out of order gets nothing ahead.
#[test]
fn in_order_walks_are_decompressed_ahead_and_random_reads_are_not() {
    let data = pseudo_random(4_000_000, 12);
    let gz = gzip_members(&[&data]);
    let cps = checkpoints(&gz, 256 << 10);
    assert!(cps.len() > AHEAD_SPANS + 4, "{} spans", cps.len());
    let starts: Vec<u64> = cps.iter().map(|c| c.uoff).collect();
    let (_dir, reader) = open_layer(&gz, cps, data.len());

    // Out of order: a read in span 5 alone says nothing about what comes next.
    let cache = SpanCache::new(64 << 20);
    let mut buf = vec![0u8; 4096];
    reader.read_at(&cache, starts[5], &mut buf).unwrap();
    assert_eq!(reader.span_ahead(&cache, starts[5]), None);

    // Parts of spans 0 and 1 (a few nearby files) are not a walk either.
    let cache = SpanCache::new(64 << 20);
    reader.read_at(&cache, 0, &mut buf).unwrap();
    reader.read_at(&cache, starts[1], &mut buf).unwrap();
    assert_eq!(reader.span_ahead(&cache, starts[1]), None);

    // In order: spans 0 and 1 read whole, so 2..=1+AHEAD_SPANS come ahead, one by one.
    let cache = SpanCache::new(64 << 20);
    let mut whole = vec![0u8; starts[2] as usize];
    reader.read_at(&cache, 0, &mut whole).unwrap();
    let mut ahead = Vec::new();
    while let Some(i) = reader.span_ahead(&cache, starts[2] - 1) {
        reader.inflate_span(&cache, i).unwrap();
        ahead.push(i);
    }
    assert_eq!(ahead, (2..=1 + AHEAD_SPANS).collect::<Vec<_>>());
    // Decompressed whole: the reads there decompress nothing more and match.
    let before = cache.stats.decompressed.load(Ordering::Relaxed);
    let last = starts[1 + AHEAD_SPANS + 1] - 4096;
    reader.read_decoded_at(&cache, last, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[last as usize..last as usize + 4096]);
    assert_eq!(cache.stats.decompressed.load(Ordering::Relaxed), before);
}

/// A read in a span whose predecessor is cached (reads walking the stream in order) gets
/// the span inflated whole at once (the fast way); a read out of the blue gets it
/// inflated only as far as it asks. Both read the right bytes.
#[test]
fn walking_reads_inflate_spans_whole_and_random_ones_partly() {
    let (data, starts, _dir, reader) = spans_of_256k(13);
    let cache = SpanCache::new(64 << 20);
    let mut buf = vec![0u8; 4096];
    let whole = |i: u32| matches!(cache.get((0, i)), Some(Span::Whole(..)));
    // Out of the blue: span 4, partly.
    reader.read_at(&cache, starts[4] + 10, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[starts[4] as usize + 10..][..4096]);
    assert!(!whole(4));
    assert!(cache.stats.decompressed.load(Ordering::Relaxed) < 8192 + 10);
    // Span 4 cached: a read in span 5 walks on, and gets span 5 whole.
    reader.read_at(&cache, starts[5] + 10, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[starts[5] as usize + 10..][..4096]);
    assert!(whole(5));
}

/// A random read that runs from near the end of one span into the next gets the first
/// inflated whole (it needs most of it: the fast way) and the next only as far as it
/// asks: the span before being cached by this same read is no sign of a walk (it was
/// taken for one, and the next span inflated whole, twice the work such reads need).
/// A later read that goes on into the span after is a walk, and gets that one whole.
#[test]
fn a_read_into_the_next_span_inflates_only_its_start() {
    let (data, starts, _dir, reader) = spans_of_256k(14);
    let cache = SpanCache::new(64 << 20);
    let whole = |i: u32| matches!(cache.get((0, i)), Some(Span::Whole(..)));
    let inflated = || cache.stats.decompressed.load(Ordering::Relaxed);
    let off = starts[4] - 40_000;
    let mut buf = vec![0u8; 50_000];
    reader.read_at(&cache, off, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[off as usize..][..50_000]);
    assert!(whole(3), "the read needs most of span 3");
    assert!(!whole(4), "the read needs 10 kB of span 4");
    let span3 = starts[4] - starts[3];
    assert!(
        inflated() < span3 + 20_000,
        "{} bytes inflated for a read of span 3's end and 10 kB of span 4",
        inflated()
    );
    // On into span 5 from span 4 (cached before this read): a walk.
    let off = starts[5] - 1000;
    reader.read_at(&cache, off, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[off as usize..][..50_000]);
    assert!(whole(5));
}

/// Cold reads across checkpoints (decoded in two parts at once: the first span, and the
/// rest from the next checkpoint) read the right bytes, across one boundary or several,
/// whatever part of each span is cached already.
#[test]
fn cold_reads_across_checkpoints_split_and_match() {
    let (data, starts, _dir, reader) = spans_of_256k(15);
    for (k, &b) in starts.iter().enumerate().skip(1) {
        for (before, len) in [(1usize, 2usize), (5000, 131_072), (200_000, 400_000)] {
            let off = b - before as u64;
            let len = len.min(data.len() - off as usize);
            let cache = SpanCache::new(64 << 20);
            if k % 3 == 0 {
                // The span after the first partly inflated already.
                let mut one = [0u8];
                reader.read_at(&cache, b, &mut one).unwrap();
            }
            let mut buf = vec![0u8; len];
            assert_eq!(reader.read_at(&cache, off, &mut buf).unwrap(), len);
            assert!(buf == data[off as usize..][..len], "at {off}+{len}");
        }
    }
}

/// Jobs decompressing ahead take distinct spans: one being loaded is not offered again.
#[test]
fn spans_being_loaded_are_not_offered_ahead() {
    let data = pseudo_random(4_000_000, 14);
    let gz = gzip_members(&[&data]);
    let cps = checkpoints(&gz, 256 << 10);
    let starts: Vec<u64> = cps.iter().map(|c| c.uoff).collect();
    let (_dir, reader) = open_layer(&gz, cps, data.len());
    let cache = SpanCache::new(64 << 20);
    let mut whole = vec![0u8; starts[2] as usize];
    reader.read_at(&cache, 0, &mut whole).unwrap();
    assert_eq!(reader.span_ahead(&cache, starts[2] - 1), Some(2));
    let claim = cache.get_or_claim((0, 2)).err().expect("not cached");
    assert_eq!(reader.span_ahead(&cache, starts[2] - 1), Some(3));
    drop(claim);
    assert_eq!(reader.span_ahead(&cache, starts[2] - 1), Some(2));
}

/// Reading only what is decompressed never decompresses: it says `WouldBlock` until a
/// decoding read has inflated the span that far, then copies.
#[test]
fn decoded_only_reads_never_decompress() {
    let data = pseudo_random(3_000_000, 11);
    let gz = gzip_members(&[&data]);
    let cps = checkpoints(&gz, 1 << 30);
    let (_dir, reader) = open_layer(&gz, cps, data.len());
    let cache = SpanCache::new(16 << 20);
    let mut buf = vec![0u8; 4096];
    let blocked = |r: io::Result<usize>| r.is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock);
    assert!(
        blocked(reader.read_decoded_at(&cache, 1_000_000, &mut buf)),
        "not cached"
    );
    reader.read_at(&cache, 500_000, &mut buf).unwrap();
    assert!(
        blocked(reader.read_decoded_at(&cache, 1_000_000, &mut buf)),
        "not that far"
    );
    assert_eq!(cache.stats.decompressed.load(Ordering::Relaxed), 504_096);
    assert_eq!(
        reader.read_decoded_at(&cache, 400_000, &mut buf).unwrap(),
        4096
    );
    assert_eq!(&buf[..], &data[400_000..404_096]);
    assert_eq!(cache.stats.decompressed.load(Ordering::Relaxed), 504_096);
}

#[test]
fn gzip_refuses_garbage_and_truncation() {
    let gz = gzip_members(&[&pseudo_random(100_000, 3)]);
    let mut out = Vec::new();
    let err = GzipReader::new(&gz[..gz.len() / 2], None)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    let err = GzipReader::new(&b"this is not gzip at all"[..], None)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err();
    assert!(err.to_string().contains("not a gzip stream"), "{err}");
}

/// Every span inflates from the span's compressed bytes alone (as the read path gives
/// them: up to the next checkpoint), in pieces as reads come.
#[test]
fn each_span_inflates_from_its_own_bytes_in_pieces() {
    let parts: Vec<Vec<u8>> = (0..4).map(|k| pseudo_random(1_500_000, 20 + k)).collect();
    let gz = gzip_members(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let data = parts.concat();
    let cps = checkpoints(&gz, 16 << 10);
    assert!(cps.len() > 50, "{} checkpoints", cps.len());
    let (_dir, reader) = open_layer(&gz, cps.clone(), data.len());
    for i in 0..cps.len() {
        let (start, end) = reader.span_bounds(i);
        let mut span = vec![0u8; (end - start) as usize];
        let mut gz = reader.resume_gzip(i).unwrap();
        let piece = [4096, 131_072, 1 << 20][i % 3];
        for chunk in span.chunks_mut(piece) {
            gz.read_exact(chunk)
                .unwrap_or_else(|e| panic!("span {i} of {}: {e}", cps.len()));
        }
        assert!(span == data[start as usize..end as usize], "span {i}");
    }
}

/// A reader that hands out its bytes a few at a time (as a network stream may), so that
/// members end anywhere relative to the decoder's input buffer.
struct Trickle<'a>(&'a [u8], usize);

impl io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.1 = self.1 * 7 % 13 + 1; // 1..=13
        let n = self.1.min(buf.len()).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// Restarted at every checkpoint of a stream of members of every kind (stored, fast,
/// best, empty, one byte), read in odd-sized pieces from an input that trickles in, the
/// decoder gives exactly the stream's bytes from there, ends where the stream ends, and
/// refuses what follows a member that is not a member.
#[test]
fn resumes_at_every_checkpoint_across_members_of_every_kind() {
    let parts: Vec<(Vec<u8>, u32)> = vec![
        (pseudo_random(400_000, 11), 6),
        (pseudo_random(100_000, 12), 0),
        (Vec::new(), 6),
        (pseudo_random(400_000, 13), 1),
        (b"x".to_vec(), 9),
        (pseudo_random(150_000, 14), 9),
    ];
    let gz = gzip_members_at(
        &parts
            .iter()
            .map(|(p, level)| (p.as_slice(), *level))
            .collect::<Vec<_>>(),
    );
    let data: Vec<u8> = parts.iter().flat_map(|(p, _)| p.iter().copied()).collect();
    let cps = checkpoints(&gz, 16 << 10);
    assert!(
        cps.len() > 15 && cps.iter().any(|c| c.bits != 0),
        "{} checkpoints",
        cps.len()
    );
    assert!(cps.iter().filter(|c| c.member_start).count() > 2);
    let mut garbage = gz.clone();
    garbage.extend(b"\x1f\x8bnot a member");
    for (n, cp) in cps.iter().enumerate() {
        let start = (cp.coff - u64::from(cp.bits > 0)) as usize;
        let piece = [1000, 4096, 65_537][n % 3];
        let mut r = GzipReader::resume(Trickle(&gz[start..], n), cp).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; piece];
        loop {
            let k = r.read(&mut buf).unwrap_or_else(|e| panic!("at {n}: {e}"));
            if k == 0 {
                break;
            }
            out.extend_from_slice(&buf[..k]);
        }
        assert!(out == data[cp.uoff as usize..], "from checkpoint {n}");
        let mut r = GzipReader::resume(&garbage[start..], cp).unwrap();
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("gzip"), "at {n}: {err}");
    }
}
