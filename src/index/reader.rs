//! Reading byte ranges of a layer's uncompressed stream from its blob, by decompressing only the
//! spans (between two checkpoints, or one zstd frame) that hold them. Decompressed spans are kept
//! in a cache bounded in bytes and shared by all layers of a mount (`span_cache`).

use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::blob::{Blob, LocalBlob};
use super::gzip::{Checkpoint, GzipReader};
use super::span_cache::{GzipSpan, GzipSpanState, Span, SpanCache};
use super::Access;

/// Spans larger than this (only a hostile or very odd gzip stream has them: one deflate block
/// producing more than this) are streamed to the reader instead of being cached whole, so memory
/// stays bounded whatever the input.
pub const MAX_CACHED_SPAN: u64 = 16 << 20;

/// How much faster libdeflate inflates a whole span than zlib-rs inflates part of it, in
/// percent (1.3–1.6 times on the large Debian image's layers; the lower end, as a whole span
/// also waits for all its compressed bytes): a read that needs a span up to at least
/// 100/this of its length has it inflated whole.
const WHOLE_SPEEDUP_PCT: u64 = 130;

/// How far ahead of an in-order walk of a layer spans are decompressed (see
/// [`LayerReader::span_ahead`]): enough to keep the cores busy while the reader takes in the
/// spans before (2 MiB of gzip spans, two of the kernel's 1 MiB reads), little enough to
/// waste nothing much when the walk stops.
pub const AHEAD_SPANS: usize = (2 << 20) / super::GZIP_SPACING as usize;

/// Sequential reads from a position of a file shared between threads (positional I/O).
pub(crate) struct PosReader<'a> {
    pub(crate) file: &'a File,
    pub(crate) pos: u64,
}

impl Read for PosReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Sequential reads of a [`Blob`] from `pos`, ending at `end`. The end matters for gzip: after
/// a span's last byte inflate goes on to parse the next block's header, which lies past the
/// bytes fetched for this span; stopping the input there keeps it from reading (and choking
/// on) what is not there yet.
pub(super) struct BlobReader {
    blob: Arc<dyn Blob>,
    pos: u64,
    end: u64,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.end.saturating_sub(self.pos).min(buf.len() as u64) as usize;
        let n = self.blob.read_at(&mut buf[..room], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Random access to one layer's uncompressed stream.
pub struct LayerReader {
    id: u32,
    blob: Arc<dyn Blob>,
    access: Access,
    size: u64,
    trace: Option<std::sync::Arc<crate::trace::Recorder>>,
    /// The layer's small files kept uncompressed: reads within one come from there.
    small: Option<super::small_reads::SmallReads>,
    /// Inflaters left where the last read of an oversized span ended, so that reading one on
    /// (sequentially) goes on from there instead of inflating the span again from its start.
    streams: Mutex<Vec<Stream>>,
}

/// An inflater inside an oversized span (see [`MAX_CACHED_SPAN`]).
struct Stream {
    span: usize,
    gz: GzipReader<BlobReader>,
}

/// Oversized spans read on at once (one per sequential reader, oldest dropped first).
const STREAMS: usize = 4;

impl LayerReader {
    /// Opens the stored blob (or the seekable zstd copy) at `path`. `id` keys this layer in the
    /// cache.
    pub fn open(id: u32, path: &Path, access: Access, size: u64) -> io::Result<LayerReader> {
        Ok(Self::new(
            id,
            Box::new(LocalBlob::open(path)?),
            access,
            size,
        ))
    }

    /// Reads through any [`Blob`] (a stored file or a lazily fetched one).
    pub fn new(id: u32, blob: Box<dyn Blob>, access: Access, size: u64) -> LayerReader {
        LayerReader {
            id,
            blob: Arc::from(blob),
            access,
            size,
            trace: None,
            small: None,
            streams: Mutex::new(Vec::new()),
        }
    }

    /// Reads small files from `small` (the layer's kept bytes) rather than its stream.
    pub fn with_small(mut self, small: Option<super::small_reads::SmallReads>) -> LayerReader {
        self.small = small;
        self
    }

    /// Records the compressed ranges that reads need into `trace`.
    pub fn with_trace(mut self, trace: std::sync::Arc<crate::trace::Recorder>) -> LayerReader {
        self.trace = Some(trace);
        self
    }

    /// Makes a range the read path is about to decode local (and notes it in the trace).
    fn need(&self, range: Range<u64>) -> io::Result<()> {
        if let Some(t) = &self.trace {
            t.record(self.id, range.clone());
        }
        self.blob.ensure(range)
    }

    /// The compressed bytes that decoding the stream range `range` needs.
    pub fn compressed_range(&self, range: Range<u64>) -> Range<u64> {
        let end = range.end.min(self.size);
        if range.start >= end {
            return 0..0;
        }
        match &self.access {
            Access::Tar => range.start..end,
            Access::Gzip(cps) => {
                let (first, last) = (self.span_of(range.start), self.span_of(end - 1));
                let cp = &cps[first];
                let start = cp.coff - u64::from(cp.bits > 0);
                let end = cps.get(last + 1).map_or(self.blob.len(), |c| c.coff);
                start..end
            }
            Access::Zstd(frames) => {
                let (first, last) = (self.span_of(range.start), self.span_of(end - 1));
                let end = frames.get(last + 1).map_or(self.blob.len(), |f| f.1);
                frames[first].1..end
            }
            Access::Frames(frames) => {
                let (first, last) = (self.span_of(range.start), self.span_of(end - 1));
                frames[first].coff..frames[last].cend
            }
        }
    }

    /// Whether reading the stream range `range` needs no fetch.
    pub fn is_local(&self, range: Range<u64>) -> bool {
        !self.blob.may_fetch() || self.blob.is_local(self.compressed_range(range))
    }

    /// Whether some read of this layer may have to wait for a fetch.
    pub fn may_fetch(&self) -> bool {
        self.blob.may_fetch()
    }

    /// Fetches what reading the stream range `range` needs (no-op for stored blobs).
    pub fn prefetch(&self, range: Range<u64>) -> io::Result<()> {
        let r = self.compressed_range(range);
        if r.is_empty() {
            return Ok(());
        }
        self.blob.ensure(r)
    }

    /// Fills `buf` with the bytes at `off` of the uncompressed stream (short only at its end).
    pub fn read_at(&self, cache: &SpanCache, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.read_with(cache, off, buf, true)
    }

    /// [`LayerReader::read_at`] from what is decompressed already: fails with
    /// [`io::ErrorKind::WouldBlock`] where it would have to decompress (a span not cached, not
    /// inflated that far, or being inflated by another reader), so that a caller who must not
    /// wait can hand the read to one who may.
    pub fn read_decoded_at(
        &self,
        cache: &SpanCache,
        off: u64,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        self.read_with(cache, off, buf, false)
    }

    fn read_with(
        &self,
        cache: &SpanCache,
        off: u64,
        buf: &mut [u8],
        decode: bool,
    ) -> io::Result<usize> {
        let want = (buf.len() as u64).min(self.size.saturating_sub(off)) as usize;
        // (A read larger than any kept file is not one of them: no lookup.)
        let small = want > 0 && want as u64 <= super::small::SMALL_MAX;
        if let Some(small) = self.small.as_ref().filter(|_| small) {
            match small.read_at(off, &mut buf[..want]) {
                Ok(true) => {
                    // A boot's trace names the blob ranges it needs, wherever the bytes came
                    // from here (a lazy mount of the image fetches them by the trace).
                    if let Some(t) = &self.trace {
                        t.record(self.id, self.compressed_range(off..off + want as u64));
                    }
                    cache
                        .stats
                        .blob_bytes
                        .fetch_add(want as u64, Ordering::Relaxed);
                    return Ok(want);
                }
                Ok(false) => {}
                // The kept copy unreadable: the stream still has the bytes.
                Err(e) => tracing::warn!("small files of layer {}: {e}", self.id),
            }
        }
        if let Access::Tar = self.access {
            self.need(off..off + want as u64)?;
            let mut done = 0;
            while done < want {
                let n = self.blob.read_at(&mut buf[done..want], off + done as u64)?;
                if n == 0 {
                    return Err(eof());
                }
                done += n;
            }
            cache
                .stats
                .blob_bytes
                .fetch_add(done as u64, Ordering::Relaxed);
            return Ok(done);
        }
        if decode {
            self.will_need_spans_after_first(cache, off..off + want as u64);
            if let Some(split) = self.cold_split(cache, off, want) {
                return self.read_split(cache, off, &mut buf[..want], split);
            }
        }
        self.read_spans(cache, off, &mut buf[..want], decode, false)?;
        Ok(want)
    }

    /// Where a read of `want` bytes at `off` is best split in two decoded at once, on two
    /// cores: after its first span, when the read runs on into the next and neither is
    /// cached (a cold read that crosses a checkpoint), and the span before is not cached
    /// either (a random read: reads walking the stream in order have the spans ahead
    /// decompressed on other threads already, and one thread more would only compete with
    /// them). The first span is inflated to its end (whole), the next from its checkpoint,
    /// independently: one after the other they took the sum of both times, now about the
    /// longer one's.
    fn cold_split(&self, cache: &SpanCache, off: u64, want: usize) -> Option<usize> {
        if want == 0 || !matches!(self.access, Access::Gzip(_)) || self.blob.may_fetch() {
            return None;
        }
        let first = self.span_of(off);
        let (start, end) = self.span_bounds(first);
        let cold = |i: usize| !cache.contains((self.id, i as u32));
        let crosses = off + (want as u64) > end;
        let random = first == 0 || cold(first - 1);
        (crosses && random && end - start <= MAX_CACHED_SPAN && cold(first) && cold(first + 1))
            .then_some((end - off) as usize)
    }

    /// Reads `buf` at `off`, its bytes from `split` on in another thread (a kept one: see
    /// [`super::beside`]; see [`LayerReader::cold_split`]).
    fn read_split(
        &self,
        cache: &SpanCache,
        off: u64,
        buf: &mut [u8],
        split: usize,
    ) -> io::Result<usize> {
        let (head, tail) = buf.split_at_mut(split);
        let tail_off = off + split as u64;
        super::beside::join(
            // (The tail's first span comes after one this read loads: no sign of a walk.)
            || self.read_spans(cache, tail_off, tail, true, true),
            || self.read_spans(cache, off, head, true, false),
        )?;
        Ok(buf.len())
    }

    /// Fills `buf` from `off` on, span after span. `loaded_before`: this read loads the span
    /// before `off`'s (see [`LayerReader::wants_whole`]).
    fn read_spans(
        &self,
        cache: &SpanCache,
        off: u64,
        buf: &mut [u8],
        decode: bool,
        mut loaded_before: bool,
    ) -> io::Result<()> {
        let want = buf.len();
        let mut done = 0;
        while done < want {
            let pos = off + done as u64;
            let i = self.span_of(pos);
            let (start, end) = self.span_bounds(i);
            let in_span = (pos - start) as usize;
            let n = (want - done).min((end - pos) as usize);
            let out = &mut buf[done..done + n];
            if end - start > MAX_CACHED_SPAN {
                if !decode {
                    return Err(would_block());
                }
                self.stream_from(i, cache, pos, out)?;
            } else {
                let span = match decode {
                    true => {
                        let cached = cache.contains((self.id, i as u32));
                        let whole =
                            !cached && self.wants_whole(cache, i, in_span + n, loaded_before);
                        loaded_before = !cached;
                        self.span(i, cache, whole)?
                    }
                    false => cache.get((self.id, i as u32)).ok_or_else(would_block)?,
                };
                match span {
                    Span::Whole(span, from) => {
                        let span = &span[from..];
                        if span.len() < in_span + n {
                            return Err(eof());
                        }
                        out.copy_from_slice(&span[in_span..in_span + n]);
                    }
                    Span::Gzip(span) if !decode => span.copy_decoded(in_span, out)?,
                    Span::Gzip(span) => {
                        if let Err(e) = span.copy_to(in_span, out, &cache.stats) {
                            // The next read starts the span afresh.
                            cache.remove((self.id, i as u32));
                            return Err(e);
                        }
                    }
                }
                if !decode {
                    cache.stats.hits.fetch_add(1, Ordering::Relaxed); // `span` counts its own
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The span worth decompressing ahead of a read that reached `pos`: the first of the next
    /// [`AHEAD_SPANS`] not cached, when a reader walks this layer's stream in order (the span
    /// before `pos`'s was read whole, and the one before it is cached), unless it is too large
    /// to cache or far away (a fetch). Cheap: it decompresses nothing. A few reads of nearby
    /// files (a VM's boot) do not look like a walk, so they cost nothing ahead.
    ///
    /// A full read of an image (`tar`, `cp -a`, a VM's first boot) visits files in about the
    /// order the layer's tar holds them, one at a time: decompressing ahead on another core
    /// overlaps the two halves of the work instead of alternating them.
    pub fn span_ahead(&self, cache: &SpanCache, pos: u64) -> Option<usize> {
        if let Access::Tar = self.access {
            return None;
        }
        // In order: the reads took in the whole span before this one, and the one before that.
        let i = self.span_of(pos);
        let walking = i >= 1
            && cache.is_whole((self.id, i as u32 - 1))
            && (i < 2 || cache.contains((self.id, i as u32 - 2)));
        if !walking {
            return None;
        }
        let last = (i + AHEAD_SPANS).min(self.span_count() - 1);
        let next = cache.first_uncached(self.id, i as u32 + 1..=last as u32)? as usize;
        let (start, end) = self.span_bounds(next);
        (end - start <= MAX_CACHED_SPAN && self.is_local(start..end)).then_some(next)
    }

    /// Decompresses span `i` whole into the cache (see [`LayerReader::span_ahead`]).
    pub fn inflate_span(&self, cache: &SpanCache, i: usize) -> io::Result<()> {
        if let Span::Gzip(span) = self.span(i, cache, true)? {
            if span.len > 0 {
                span.copy_to(span.len - 1, &mut [0], &cache.stats)?;
            }
        }
        Ok(())
    }

    /// Whether a read that needs span `i` (not cached) up to its byte `need_end` should have
    /// it inflated whole, the fast way (libdeflate, about 1.4 times zlib-rs's speed, but only
    /// once the span's compressed bytes are all read), rather than only as far as it asks
    /// (zlib-rs, inflating as the disk reads): when the read itself needs most of the span
    /// (inflating the rest costs less than the slower inflate of what it needs), or when
    /// the span before was cached before this read (`loaded_before` false), a sign of reads
    /// walking the stream in order, which will want the rest next. A random read that runs
    /// into the next span needs only that span's start: inflating all of it (as when any
    /// cached span before counted as a walk) cost such reads twice the work.
    fn wants_whole(
        &self,
        cache: &SpanCache,
        i: usize,
        need_end: usize,
        loaded_before: bool,
    ) -> bool {
        let (start, end) = self.span_bounds(i);
        let most = need_end as u64 * WHOLE_SPEEDUP_PCT >= (end - start) * 100;
        most || (!loaded_before && i > 0 && cache.contains((self.id, i as u32 - 1)))
    }

    /// Starts the disk reading the compressed bytes of every span after the first that a
    /// read of `range` needs and that is not cached, so that they arrive while the first one
    /// is inflated (each span otherwise asks for its own when it is reached).
    fn will_need_spans_after_first(&self, cache: &SpanCache, range: Range<u64>) {
        if range.is_empty() || !matches!(self.access, Access::Gzip(_)) {
            return;
        }
        let (first, last) = (self.span_of(range.start), self.span_of(range.end - 1));
        if first == last || cache.contains((self.id, last as u32)) {
            return;
        }
        let (start, _) = self.span_bounds(first + 1);
        let compressed = self.compressed_range(start..range.end);
        if self.blob.is_local(compressed.clone()) {
            self.blob.will_need(compressed);
        }
    }

    /// Uncompressed offset where span `i` starts (`None` past the last one).
    fn span_start(&self, i: usize) -> Option<u64> {
        match &self.access {
            Access::Tar => (i == 0).then_some(0),
            Access::Gzip(cps) => cps.get(i).map(|c| c.uoff),
            Access::Zstd(frames) => frames.get(i).map(|f| f.0),
            Access::Frames(frames) => frames.get(i).map(|f| f.uoff),
        }
    }

    fn span_count(&self) -> usize {
        match &self.access {
            Access::Tar => 1,
            Access::Gzip(cps) => cps.len(),
            Access::Zstd(frames) => frames.len(),
            Access::Frames(frames) => frames.len(),
        }
    }

    /// The last span starting at or before `off` (spans are sorted by start).
    fn span_of(&self, off: u64) -> usize {
        let (mut lo, mut hi) = (0, self.span_count());
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if self.span_start(mid).unwrap_or(u64::MAX) <= off {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    fn span_bounds(&self, i: usize) -> (u64, u64) {
        (
            self.span_start(i).unwrap_or(0),
            self.span_start(i + 1).unwrap_or(self.size).min(self.size),
        )
    }

    /// Span `i`, from the cache or decompressed into it. A gzip span is inflated whole when
    /// the caller needs it `whole` (and libdeflate can: see [`gzip_whole`]), else only as far
    /// as reads ask.
    fn span(&self, i: usize, cache: &SpanCache, whole: bool) -> io::Result<Span> {
        let key = (self.id, i as u32);
        let _loading = match cache.get_or_claim(key) {
            Ok(span) => {
                cache.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(span);
            }
            Err(claim) => claim,
        };
        cache.stats.misses.fetch_add(1, Ordering::Relaxed);
        let (start, end) = self.span_bounds(i);
        let compressed = self.compressed_range(start..end);
        self.need(compressed.clone())?;
        self.blob.will_need(compressed);
        let len = (end - start) as usize;
        let span = match &self.access {
            Access::Tar => unreachable!("plain tar layers are read directly"),
            Access::Gzip(_) => {
                let inflated = match whole {
                    true => self.inflate_whole(i, cache, len)?,
                    false => None,
                };
                match inflated {
                    Some(out) => out,
                    None => {
                        let span = Span::Gzip(Arc::new(GzipSpan {
                            len,
                            state: Mutex::new(GzipSpanState {
                                bytes: super::span_buffers::take(len),
                                gz: Some(self.resume_gzip(i)?),
                            }),
                        }));
                        cache.insert(key, span.clone());
                        return Ok(span);
                    }
                }
            }
            Access::Zstd(frames) => {
                let cstart = frames[i].1;
                let cend = frames.get(i + 1).map(|f| f.1).unwrap_or(self.blob.len());
                let mut compressed = vec![0u8; (cend - cstart) as usize];
                BlobReader {
                    blob: self.blob.clone(),
                    pos: cstart,
                    end: cend,
                }
                .read_exact(&mut compressed)?;
                cache
                    .stats
                    .blob_bytes
                    .fetch_add(compressed.len() as u64, Ordering::Relaxed);
                let got = zstd::bulk::decompress(&compressed, len)?;
                if got.len() != len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "zstd frame shorter than indexed",
                    ));
                }
                (got, 0)
            }
            Access::Frames(frames) => {
                let f = frames[i];
                let mut compressed = vec![0u8; (f.cend - f.coff) as usize];
                BlobReader {
                    blob: self.blob.clone(),
                    pos: f.coff,
                    end: f.cend,
                }
                .read_exact(&mut compressed)?;
                cache
                    .stats
                    .blob_bytes
                    .fetch_add(compressed.len() as u64, Ordering::Relaxed);
                // (Its content: the frame's first `len` bytes, zstd or gzip.)
                let mut span = super::span_buffers::take(len);
                super::chunked::frame_reader(&compressed, len as u64)?.read_to_end(&mut span)?;
                if span.len() != len {
                    return Err(super::chunked::short_frame());
                }
                (span, 0)
            }
        };
        cache
            .stats
            .decompressed
            .fetch_add(len as u64, Ordering::Relaxed);
        let span = Span::Whole(Arc::new(span.0), span.1);
        cache.insert(key, span.clone());
        Ok(span)
    }

    /// Gzip checkpoint `i`, with its window (fetched, for an index that keeps them apart).
    fn checkpoint(&self, i: usize) -> io::Result<std::borrow::Cow<'_, Checkpoint>> {
        let Access::Gzip(cps) = &self.access else {
            return Err(io::Error::other("not a gzip layer"));
        };
        let mut cp = std::borrow::Cow::Borrowed(&cps[i]);
        if cp.window.is_empty() && !cp.member_start {
            let window = self.blob.window(i)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "gzip checkpoint without its window",
                )
            })?;
            cp.to_mut().window = window.into();
        }
        Ok(cp)
    }

    /// Inflates span `i` from its checkpoint, reading no further than the span's bytes.
    fn resume_gzip(&self, i: usize) -> io::Result<GzipReader<BlobReader>> {
        let cp = self.checkpoint(i)?;
        let (start, end) = self.span_bounds(i);
        let range = self.compressed_range(start..end);
        GzipReader::resume(
            BlobReader {
                blob: self.blob.clone(),
                pos: range.start,
                end: range.end,
            },
            &cp,
        )
    }

    /// Gzip span `i` (`len` bytes) inflated whole with libdeflate, as libdeflate's output and
    /// where the span starts in it; or `None` where it cannot be (a member starts or ends
    /// inside it): the caller inflates it with zlib-rs.
    fn inflate_whole(
        &self,
        i: usize,
        cache: &SpanCache,
        len: usize,
    ) -> io::Result<Option<(Vec<u8>, usize)>> {
        let Access::Gzip(cps) = &self.access else {
            return Ok(None);
        };
        if cps[i].member_start {
            return Ok(None);
        }
        // The window is the output just before the span: the end of the span before, when a
        // walk in order has it (no window to decompress), else the checkpoint's, taken first:
        // its bytes in the mapped access table come from disk while the span's compressed
        // bytes do (asked for already), not after them.
        let before = i
            .checked_sub(1)
            .and_then(|b| cache.peek_whole((self.id, b as u32)))
            .filter(|(bytes, from)| bytes.len() - from >= super::gzip::WINDOW);
        let decoded = match before {
            Some(_) => None,
            None => {
                let cp = self.checkpoint(i)?;
                Some(cp.window.decode()?)
            }
        };
        let window = match (&before, &decoded) {
            (Some((bytes, _)), _) => &bytes[bytes.len() - super::gzip::WINDOW..],
            (None, Some(w)) => &w[..],
            (None, None) => unreachable!("one of the two is there"),
        };
        let (start, end) = self.span_bounds(i);
        let range = self.compressed_range(start..end);
        let mut compressed = vec![0u8; (range.end - range.start) as usize];
        BlobReader {
            blob: self.blob.clone(),
            pos: range.start,
            end: range.end,
        }
        .read_exact(&mut compressed)?;
        cache
            .stats
            .blob_bytes
            .fetch_add(compressed.len() as u64, Ordering::Relaxed);
        // Bit positions in `compressed`: a checkpoint's block starts `bits` bits before its
        // byte offset.
        let bit = |c: &Checkpoint| (c.coff * 8 - u64::from(c.bits)) - range.start * 8;
        let end_bit = cps.get(i + 1).map_or(compressed.len() as u64 * 8, bit);
        Ok(super::gzip_whole::inflate_span(
            &compressed,
            bit(&cps[i]),
            end_bit,
            window,
            len,
        ))
    }

    /// Uncached path for oversized spans: go on from an inflater left at or before `pos` in
    /// span `i` (a sequential reader's previous read), else inflate from the checkpoint;
    /// discard up to `pos`, and leave the inflater after `out` for the next read.
    fn stream_from(&self, i: usize, cache: &SpanCache, pos: u64, out: &mut [u8]) -> io::Result<()> {
        if !matches!(self.access, Access::Gzip(_)) {
            return Err(io::Error::other("oversized span in a non-gzip layer"));
        }
        let (start, end) = self.span_bounds(i);
        self.need(self.compressed_range(start..end))?;
        let kept = {
            let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            // The closest one behind `pos` (another reader's, further back, stays theirs).
            streams
                .iter()
                .enumerate()
                .filter(|(_, s)| s.span == i && s.gz.uncompressed_offset() <= pos)
                .max_by_key(|(_, s)| s.gz.uncompressed_offset())
                .map(|(k, _)| k)
                .map(|k| streams.remove(k))
        };
        let mut gz = match kept {
            Some(s) => s.gz,
            None => self.resume_gzip(i)?,
        };
        let skip = pos - gz.uncompressed_offset();
        io::copy(&mut (&mut gz).take(skip), &mut io::sink())?;
        gz.read_exact(out)?;
        cache
            .stats
            .decompressed
            .fetch_add(skip + out.len() as u64, Ordering::Relaxed);
        if gz.uncompressed_offset() < end {
            let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            if streams.len() >= STREAMS {
                streams.remove(0);
            }
            streams.push(Stream { span: i, gz });
        }
        Ok(())
    }
}

pub(super) fn would_block() -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        "the bytes are not decompressed yet",
    )
}

pub(super) fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "layer stream ends early")
}

#[cfg(test)]
mod tests {
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
        let blocked =
            |r: io::Result<usize>| r.is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock);
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
}
