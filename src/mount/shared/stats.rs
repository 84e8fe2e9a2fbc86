//! The image server's read counters, published for the mounts standing on it: the worker
//! rewrites a small file (`$STORE/shared/<manifest>/stats`, opened before it may open nothing
//! more) at most every [`EVERY`] while they change; a mount reads it.
//!
//! The record: nine little-endian u64s — a magic number with the format's version, seven
//! counters of [`MountStats`] (the last two, lazy fetches, zero for a shared server, which
//! serves images stored whole), and a checksum of the rest (a read that overlaps a write is
//! retried rather than believed).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::index::SpanCache;
use crate::lazy::Remote;
use crate::mount::{MountStats, StatsScope};

/// How often the worker publishes its counters (when they changed).
pub(super) const EVERY: Duration = Duration::from_millis(200);

const MAGIC: u64 = 0x6275_7873_7461_7402; // "buxstat", version 2
const MAGIC_V1: u64 = 0x6275_7873_7461_7401;
/// The counters: blob bytes, decompressed bytes, cache hits, misses, lookups, bytes fetched,
/// fetch requests.
const N: usize = 7;
const LEN: usize = 8 * (N + 2);

fn checksum(values: &[u64]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325, |h, v| {
        (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(17)
    })
}

fn encode(counters: [u64; N]) -> [u8; LEN] {
    let mut values = [0u64; N + 2];
    values[0] = MAGIC;
    values[1..=N].copy_from_slice(&counters);
    values[N + 1] = checksum(&values[..=N]);
    let mut out = [0u8; LEN];
    for (chunk, v) in out.chunks_exact_mut(8).zip(values) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out
}

fn decode(bytes: &[u8]) -> Option<[u64; N]> {
    let values: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let mut counters = [0u64; N];
    // A worker of the previous version (a live mount across an upgrade): five counters, no
    // fetches, in eight values.
    if values.len() >= 8 && values[0] == MAGIC_V1 && values[7] == checksum(&values[..7]) {
        counters[..5].copy_from_slice(&values[1..6]);
        return Some(counters);
    }
    if values.len() != N + 2 || values[0] != MAGIC || values[N + 1] != checksum(&values[..=N]) {
        return None;
    }
    counters.copy_from_slice(&values[1..=N]);
    Some(counters)
}

fn counters(cache: &SpanCache, remote: Option<&Remote>) -> [u64; N] {
    let s = &cache.stats;
    let fetched = |c: fn(&Remote) -> &std::sync::atomic::AtomicU64| {
        remote.map_or(0, |r| c(r).load(Ordering::Relaxed))
    };
    [
        s.blob_bytes.load(Ordering::Relaxed),
        s.decompressed.load(Ordering::Relaxed),
        s.hits.load(Ordering::Relaxed),
        s.misses.load(Ordering::Relaxed),
        s.lookups.load(Ordering::Relaxed),
        fetched(|r| &r.fetched),
        fetched(|r| &r.requests),
    ]
}

/// The worker's end: opens the file at `path` now (a worker that takes over (`resume`) counts
/// on from what its predecessor published; a new server starts from zero). [`Publisher::start`]
/// then publishes from a thread.
pub(super) struct Publisher {
    file: File,
    base: [u64; N],
}

impl Publisher {
    pub(super) fn open(path: &Path, resume: bool) -> std::io::Result<Publisher> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut base = [0; N];
        if resume {
            if let Some(c) = read_file(&file) {
                base = c;
            }
        }
        file.write_all_at(&encode(base), 0)?;
        file.set_len(LEN as u64)?;
        Ok(Publisher { file, base })
    }

    /// Publishes `cache`'s counters and `remote`'s (plus those it took over) from a thread of
    /// their own.
    pub(super) fn start(self, cache: Arc<SpanCache>, remote: Option<Arc<Remote>>) {
        let _ = std::thread::Builder::new()
            .name("bux-fuse-stats".into())
            .spawn(move || {
                let mut last = [0u64; N];
                loop {
                    std::thread::sleep(EVERY);
                    let now = counters(&cache, remote.as_deref());
                    if now == last {
                        continue;
                    }
                    last = now;
                    let mut total = self.base;
                    for (t, n) in total.iter_mut().zip(now) {
                        *t = t.wrapping_add(n);
                    }
                    if let Err(e) = self.file.write_all_at(&encode(total), 0) {
                        tracing::debug!("publishing the image server's counters: {e}");
                    }
                }
            });
    }
}

fn read_file(file: &File) -> Option<[u64; N]> {
    for _ in 0..5 {
        let mut buf = [0u8; LEN];
        let n = file.read_at(&mut buf, 0).ok()?;
        if let Some(c) = decode(&buf[..n]) {
            return Some(c);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// The counters the image server at `place_dir` published ([`StatsScope::Unavailable`], all
/// zero, if it publishes none: one started by an older version).
pub(super) fn read(path: &Path) -> MountStats {
    let counters = File::open(path).ok().and_then(|f| read_file(&f));
    let Some(
        [blob_bytes, decompressed_bytes, cache_hits, cache_misses, lookups, fetched_bytes, fetch_requests],
    ) = counters
    else {
        return MountStats {
            scope: StatsScope::Unavailable,
            ..MountStats::default()
        };
    };
    MountStats {
        blob_bytes,
        decompressed_bytes,
        cache_hits,
        cache_misses,
        lookups,
        fetched_bytes,
        fetch_requests,
        scope: StatsScope::Image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_seen() {
        let rec = encode([1, 2, 3, 4, u64::MAX, 6, 7]);
        assert_eq!(decode(&rec), Some([1, 2, 3, 4, u64::MAX, 6, 7]));
        for i in 0..LEN {
            let mut bad = rec;
            bad[i] ^= 0x10;
            assert_eq!(decode(&bad), None, "byte {i} flipped");
        }
        assert_eq!(decode(&rec[..40]), None);
        // The previous version's record: five counters, then a spare value and the checksum.
        let mut v1 = [MAGIC_V1, 1, 2, 3, 4, 5, 0, 0];
        v1[7] = checksum(&v1[..7]);
        let bytes: Vec<u8> = v1.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode(&bytes), Some([1, 2, 3, 4, 5, 0, 0]));
    }

    #[test]
    fn a_taking_over_worker_counts_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats");
        let p = Publisher::open(&path, false).unwrap();
        p.file
            .write_all_at(&encode([10, 20, 3, 4, 5, 6, 7]), 0)
            .unwrap();
        drop(p);
        let p = Publisher::open(&path, true).unwrap();
        assert_eq!(p.base, [10, 20, 3, 4, 5, 6, 7]);
        assert_eq!(read(&path).blob_bytes, 10);
        drop(p);
        let p = Publisher::open(&path, false).unwrap();
        assert_eq!(p.base, [0; N]);
        assert_eq!(read(&path).scope, StatsScope::Image);
        assert_eq!(
            read(&dir.path().join("none")).scope,
            StatsScope::Unavailable
        );
    }
}
