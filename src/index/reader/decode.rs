//! Decoding one span of a layer's stream (between two gzip checkpoints, or one zstd frame) into
//! the cache, and streaming through the spans too large to cache: what a [`LayerReader`]'s
//! reads call on once they know which spans they need.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::{BlobReader, LayerReader, Stream, STREAMS};
use crate::index::gzip::{Checkpoint, GzipReader, WINDOW};
use crate::index::span_cache::{GzipSpan, GzipSpanState, Span, SpanCache};
use crate::index::{chunked, gzip_whole, span_buffers, Access};

impl LayerReader {
    /// Span `i`, from the cache or decompressed into it. A gzip span is inflated whole when
    /// the caller needs it `whole` (and libdeflate can: see [`gzip_whole`]), else only as far
    /// as reads ask.
    pub(super) fn span(&self, i: usize, cache: &SpanCache, whole: bool) -> io::Result<Span> {
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
                                bytes: span_buffers::take(len),
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
                let compressed = self.read_compressed(cstart..cend, cache)?;
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
                let compressed = self.read_compressed(f.coff..f.cend, cache)?;
                // (Its content: the frame's first `len` bytes, zstd or gzip.)
                let mut span = span_buffers::take(len);
                chunked::frame_reader(&compressed, len as u64)?.read_to_end(&mut span)?;
                if span.len() != len {
                    return Err(chunked::short_frame());
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

    /// The blob's bytes in `range`, counted as read.
    fn read_compressed(
        &self,
        range: std::ops::Range<u64>,
        cache: &SpanCache,
    ) -> io::Result<Vec<u8>> {
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
        Ok(compressed)
    }

    /// Gzip checkpoint `i`, with its window (fetched, for an index that keeps them apart).
    pub(super) fn checkpoint(&self, i: usize) -> io::Result<std::borrow::Cow<'_, Checkpoint>> {
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
    pub(super) fn resume_gzip(&self, i: usize) -> io::Result<GzipReader<BlobReader>> {
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
    pub(super) fn inflate_whole(
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
            .filter(|(bytes, from)| bytes.len() - from >= WINDOW);
        let decoded = match before {
            Some(_) => None,
            None => {
                let cp = self.checkpoint(i)?;
                Some(cp.window.decode()?)
            }
        };
        let window = match (&before, &decoded) {
            (Some((bytes, _)), _) => &bytes[bytes.len() - WINDOW..],
            (None, Some(w)) => &w[..],
            (None, None) => unreachable!("one of the two is there"),
        };
        let (start, end) = self.span_bounds(i);
        let range = self.compressed_range(start..end);
        let compressed = self.read_compressed(range.clone(), cache)?;
        // Bit positions in `compressed`: a checkpoint's block starts `bits` bits before its
        // byte offset.
        let bit = |c: &Checkpoint| (c.coff * 8 - u64::from(c.bits)) - range.start * 8;
        let end_bit = cps.get(i + 1).map_or(compressed.len() as u64 * 8, bit);
        Ok(gzip_whole::inflate_span(
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
    pub(super) fn stream_from(
        &self,
        i: usize,
        cache: &SpanCache,
        pos: u64,
        out: &mut [u8],
    ) -> io::Result<()> {
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
