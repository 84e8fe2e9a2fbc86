//! Reading byte ranges of a layer's uncompressed stream from its blob, by decompressing only the
//! spans (between two checkpoints, or one zstd frame) that hold them. Decompressed spans are kept
//! in a cache bounded in bytes and shared by all layers of a mount (`span_cache`).
//!
//! Here, which spans a read needs and how: from the small files' copy or the plain tar, split
//! across two cores, inflated whole or only as far as it asks, decompressed ahead of a walk.
//! Decoding one span is in `decode`.

use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::blob::{Blob, LocalBlob};
use super::gzip::GzipReader;
use super::span_cache::{Span, SpanCache};
use super::Access;

mod decode;
#[cfg(test)]
mod tests;

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
