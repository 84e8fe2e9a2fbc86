//! Decompressed spans of layers, and the cache of them a mount's layers share: bounded in
//! bytes, least recently used evicted first. A gzip span may be inflated only as far as reads
//! have asked (a random read pays for the bytes up to its end); a second reader of a span
//! being decompressed waits for it rather than doing the same work.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use super::gzip::GzipReader;
use super::reader::{eof, would_block, BlobReader};

/// Counters of the read path.
#[derive(Debug, Default)]
pub struct ReadStats {
    /// Bytes produced by decompression.
    pub decompressed: AtomicU64,
    /// Span lookups answered from the cache.
    pub hits: AtomicU64,
    /// Span lookups that had to decompress.
    pub misses: AtomicU64,
    /// Bytes read from blob files.
    pub blob_bytes: AtomicU64,
    /// Lookups the kernel sent (the FUSE layer counts them here, with the read counters).
    pub lookups: AtomicU64,
}

/// Decompressed spans, least recently used evicted first, bounded by total bytes.
pub struct SpanCache {
    inner: Mutex<CacheInner>,
    limit: usize,
    /// Spans being decompressed: a second reader of one waits for it rather than doing the
    /// same work (a program's threads, or the kernel's read-ahead, often ask at once).
    loading: Mutex<Claims>,
    loaded: std::sync::Condvar,
    /// Counters.
    pub stats: ReadStats,
}

/// Spans being decompressed, and the readers waiting for one.
#[derive(Default)]
struct Claims {
    spans: std::collections::HashSet<(u32, u32)>,
    /// A load ending wakes the waiting readers only if there are some: a wake is a system
    /// call, and every span decompressed ends a load. (So every wait on `loaded` counts
    /// itself here, under this lock.)
    waiting: usize,
}

/// Marks a span as being loaded; dropping it (loaded or failed) lets waiters go on.
pub(super) struct Loading<'a> {
    cache: &'a SpanCache,
    key: (u32, u32),
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let mut claims = self.cache.loading.lock().unwrap_or_else(|p| p.into_inner());
        claims.spans.remove(&self.key);
        if claims.waiting > 0 {
            self.cache.loaded.notify_all();
        }
    }
}

struct CacheInner {
    lru: LruCache<(u32, u32), Span>,
    bytes: usize,
}

/// A cached span: decompressed whole, or a gzip span inflated only as far as reads have asked
/// (a random read pays for the bytes up to its end, not for the whole span; the next read
/// further on goes on from there).
#[derive(Clone)]
pub(super) enum Span {
    /// The span's bytes from the given offset on (before it, libdeflate's output starts with
    /// the checkpoint's window: left there rather than moved out of the way).
    Whole(Arc<Vec<u8>>, usize),
    Gzip(Arc<GzipSpan>),
}

impl Span {
    /// Bytes it takes once whole (what the cache counts from the start).
    pub(super) fn len(&self) -> usize {
        match self {
            Span::Whole(v, _) => v.len(),
            Span::Gzip(g) => g.len,
        }
    }
}

/// A gzip span and the inflater that goes on filling it.
pub(super) struct GzipSpan {
    pub(super) len: usize,
    pub(super) state: Mutex<GzipSpanState>,
}

pub(super) struct GzipSpanState {
    /// What is inflated so far (the span's first `bytes.len()` bytes).
    pub(super) bytes: Vec<u8>,
    /// Where inflating goes on (`None` once the span is whole, or after an error).
    pub(super) gz: Option<GzipReader<BlobReader>>,
}

impl GzipSpan {
    /// Copies the span's bytes at `at` into `out` if they are inflated already and no reader
    /// is inflating the span (never waits).
    pub(super) fn copy_decoded(&self, at: usize, out: &mut [u8]) -> io::Result<()> {
        let st = self.state.try_lock().map_err(|_| would_block())?;
        let bytes = st.bytes.get(at..at + out.len()).ok_or_else(would_block)?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    /// Copies the span's bytes at `at` into `out`, inflating on as far as they end.
    pub(super) fn copy_to(&self, at: usize, out: &mut [u8], stats: &ReadStats) -> io::Result<()> {
        let end = at + out.len();
        if end > self.len {
            return Err(eof());
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let have = st.bytes.len();
        if have < end {
            let st = &mut *st;
            let gz = st
                .gz
                .as_mut()
                .ok_or_else(|| io::Error::other("span inflater failed earlier"))?;
            if let Err(e) = gz.read_append(&mut st.bytes, end - have) {
                st.bytes.truncate(have);
                st.gz = None;
                return Err(e);
            }
            stats
                .decompressed
                .fetch_add((end - have) as u64, Ordering::Relaxed);
            if end == self.len {
                st.gz = None;
            }
        }
        out.copy_from_slice(&st.bytes[at..end]);
        Ok(())
    }
}

impl SpanCache {
    /// A cache holding at most `limit` bytes of decompressed data.
    pub fn new(limit: usize) -> SpanCache {
        SpanCache {
            inner: Mutex::new(CacheInner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            limit,
            loading: Mutex::new(Default::default()),
            loaded: std::sync::Condvar::new(),
            stats: ReadStats::default(),
        }
    }

    /// The cached span `key`, or the right to load it: waits while another reader loads it.
    pub(super) fn get_or_claim(&self, key: (u32, u32)) -> Result<Span, Loading<'_>> {
        // A hit (most reads) takes the cache's lock only.
        if let Some(span) = self.get(key) {
            return Ok(span);
        }
        let mut claims = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(span) = self.get(key) {
                return Ok(span);
            }
            if claims.spans.insert(key) {
                return Err(Loading { cache: self, key });
            }
            claims.waiting += 1;
            claims = self.loaded.wait(claims).unwrap_or_else(|p| p.into_inner());
            claims.waiting -= 1;
        }
    }

    /// Whether span `key` is cached and decompressed to its end (without making it recently
    /// used; a span being inflated right now is not).
    pub(super) fn is_whole(&self, key: (u32, u32)) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.lru.peek(&key) {
            Some(Span::Whole(..)) => true,
            Some(Span::Gzip(g)) => g.state.try_lock().is_ok_and(|st| st.bytes.len() == g.len),
            None => false,
        }
    }

    /// The first span of layer `id` in `spans` neither cached nor being loaded (nothing is
    /// made recently used): what a job decompressing ahead takes next, not one another job
    /// (or a read) is on.
    pub(super) fn first_uncached(
        &self,
        id: u32,
        spans: std::ops::RangeInclusive<u32>,
    ) -> Option<u32> {
        let loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        spans
            .into_iter()
            .find(|&k| !inner.lru.contains(&(id, k)) && !loading.spans.contains(&(id, k)))
    }

    /// Span `key` if it is cached decompressed whole: its bytes and where the span starts in
    /// them (without making it recently used).
    pub(super) fn peek_whole(&self, key: (u32, u32)) -> Option<(Arc<Vec<u8>>, usize)> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.lru.peek(&key) {
            Some(Span::Whole(bytes, from)) => Some((bytes.clone(), *from)),
            _ => None,
        }
    }

    /// Whether span `key` is cached (without making it recently used).
    pub(super) fn contains(&self, key: (u32, u32)) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.lru.contains(&key)
    }

    pub(super) fn get(&self, key: (u32, u32)) -> Option<Span> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.lru.get(&key).cloned()
    }

    pub(super) fn remove(&self, key: (u32, u32)) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = inner.lru.pop(&key) {
            inner.bytes -= old.len();
        }
    }

    pub(super) fn insert(&self, key: (u32, u32), span: Span) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = inner.lru.put(key, span.clone()) {
            inner.bytes -= old.len();
        }
        inner.bytes += span.len();
        while inner.bytes > self.limit {
            match inner.lru.pop_lru() {
                Some((_, old)) => inner.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// Bytes currently cached.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

impl Default for SpanCache {
    fn default() -> Self {
        SpanCache::new(64 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader waiting for a span another loads goes on once the load ends, loaded or not
    /// (a load ending wakes waiters only when it counts some: one uncounted would hang here).
    #[test]
    fn a_reader_waiting_for_a_load_goes_on_when_it_ends() {
        let cache = Arc::new(SpanCache::new(1 << 20));
        for loaded in [true, false] {
            let claim = cache.get_or_claim((0, 1)).err().expect("not cached");
            let (tx, rx) = std::sync::mpsc::channel();
            let c = cache.clone();
            // (Not joined: a reader never woken fails the test rather than hanging it.)
            std::thread::spawn(move || {
                let got = c.get_or_claim((0, 1)).is_ok(); // (a claim ends here)
                tx.send(got).unwrap();
            });
            while cache.loading.lock().unwrap().waiting == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if loaded {
                cache.insert((0, 1), Span::Whole(Arc::new(vec![0; 16]), 0));
            }
            drop(claim);
            let got = rx.recv_timeout(std::time::Duration::from_secs(10));
            assert_eq!(got, Ok(loaded), "the waiting reader was not woken");
            if !loaded {
                // It claimed the span: its claim ended with its thread.
                assert!(cache.loading.lock().unwrap().spans.is_empty());
            }
            cache.remove((0, 1));
        }
    }
}
