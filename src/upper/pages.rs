//! The pages a user's writable mount keeps of image files it reads through the shared mount.
//!
//! Such a file is cached in the image's shared mount, once for all of the user's mounts
//! (`through`). Opened with direct I/O here, every read of it is a round trip to this daemon
//! at the reader's own size: `tar` reads 10 KiB at a time, so a cold `tar` of the large image
//! took 2.25× umoci's tree. Opened cached instead, the kernel reads ahead in 128 KiB requests
//! and serves the reader from this mount's pages; to keep those pages from becoming a second
//! copy per mount of what the shared mount holds, the daemon tells the kernel to drop them
//! (`FUSE_NOTIFY_INVAL_INODE`): behind a reader walking the file, and all of them when the last
//! handle of the file is closed. What stays is what open files are reading.
//!
//! The drops are sent from a thread of their own: the kernel waits for pages under read to be
//! answered before it drops them, and a FUSE worker waiting there could be the one to answer.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

/// Pages this far behind a reader walking a file are kept (a reader that steps back a little,
/// `tar`'s or a decompressor's, finds them).
const KEEP_BEHIND: u64 = 1 << 20;

/// Dropped in steps of at least this much: one notification per 2 MiB read, not per request.
const STEP: u64 = 2 << 20;

/// An image file open here, read through the shared mount.
#[derive(Default)]
struct Open {
    /// Handles of it open.
    handles: u32,
    /// Where the reads walking the file in order started, and the furthest they reached.
    walk_from: u64,
    walk_end: u64,
    /// Pages below this were dropped (of this walk).
    dropped: u64,
}

impl Open {
    /// A read at `offset` of `len` bytes: the pages to drop now, if any (`from..to`).
    fn read(&mut self, offset: u64, len: u64) -> Option<(u64, u64)> {
        // The kernel's read-ahead requests may be answered a little out of order (several
        // FUSE workers): a read near the walk's end goes on with it; one elsewhere (a jump
        // back, or far ahead) starts a new walk, and pages before it may be what the reader
        // comes back to.
        if offset < self.walk_from || offset > self.walk_end + KEEP_BEHIND {
            self.walk_from = offset;
            self.walk_end = offset;
            self.dropped = offset;
        }
        self.walk_end = self.walk_end.max(offset + len);
        let to = self.walk_end.saturating_sub(KEEP_BEHIND);
        if to < self.dropped + STEP {
            return None;
        }
        let from = std::mem::replace(&mut self.dropped, to);
        Some((from, to))
    }
}

/// Drops of pages this mount need not keep: `(node, offset, length)`, length 0 to the end.
type Drop = (u64, i64, i64);

/// Pages kept of image files read through, and their drops.
pub struct Pages {
    /// The session's channel to the kernel, once it is made (see [`Pages::slot`]).
    notifier: Arc<OnceLock<fuser::Notifier>>,
    open: Mutex<HashMap<u64, Open>>,
    /// To the thread that sends the drops, started with the first.
    drops: Mutex<Option<Sender<Drop>>>,
}

impl Pages {
    pub fn new() -> Pages {
        Pages {
            notifier: Arc::new(OnceLock::new()),
            open: Mutex::new(HashMap::new()),
            drops: Mutex::new(None),
        }
    }

    /// Where the session's notifier is to be put once the session is made: until it is,
    /// image files are opened with direct I/O (pages this mount could not drop would be a
    /// copy per mount).
    pub fn slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Whether files read through may be cached here (their pages can be dropped).
    pub fn cached(&self) -> bool {
        self.notifier.get().is_some()
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Node `n` was opened cached.
    pub fn opened(&self, n: u64) {
        self.open().entry(n).or_default().handles += 1;
    }

    /// A handle of node `n` opened cached was closed: the last one drops all its pages.
    pub fn released(&self, n: u64) {
        let mut open = self.open();
        let Some(o) = open.get_mut(&n) else {
            return;
        };
        o.handles = o.handles.saturating_sub(1);
        if o.handles == 0 {
            open.remove(&n);
            drop(open);
            self.drop_pages((n, 0, 0));
        }
    }

    /// Node `n` (open cached) was read at `offset`, `len` bytes: pages well behind a reader
    /// walking the file are dropped.
    pub fn read(&self, n: u64, offset: u64, len: u64) {
        let step = self.open().get_mut(&n).and_then(|o| o.read(offset, len));
        if let Some((from, to)) = step {
            self.drop_pages((n, from as i64, (to - from) as i64));
        }
    }

    fn drop_pages(&self, d: Drop) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        let mut drops = self.drops.lock().unwrap_or_else(|p| p.into_inner());
        if drops.is_none() {
            let (tx, rx) = channel::<Drop>();
            let notifier = notifier.clone();
            let started = std::thread::Builder::new()
                .name("bux-fuse-drops".into())
                .spawn(move || {
                    for (n, off, len) in rx {
                        // ENOENT: the kernel has forgotten the inode, and its pages with it.
                        if let Err(e) = notifier.inval_inode(fuser::INodeNo(n), off, len) {
                            tracing::debug!("dropping node {n}'s pages: {e}");
                        }
                    }
                });
            match started {
                Ok(_) => *drops = Some(tx),
                Err(e) => {
                    tracing::warn!("starting the thread that drops pages: {e}");
                    return;
                }
            }
        }
        if let Some(tx) = drops.as_ref() {
            let _ = tx.send(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drops a file's reads make.
    fn drops(reads: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut o = Open::default();
        reads
            .iter()
            .filter_map(|&(off, len)| o.read(off, len))
            .collect()
    }

    #[test]
    fn pages_are_dropped_behind_a_walk_and_never_ahead_of_a_jump() {
        const K: u64 = 128 << 10;
        // A walk of 8 MiB in 128 KiB reads: dropped in 2 MiB steps, 1 MiB behind the reader.
        let reads: Vec<_> = (0..64).map(|i| (i * K, K)).collect();
        let d = drops(&reads);
        assert_eq!(d.first(), Some(&(0, 2 << 20)), "{d:?}");
        assert!(d.windows(2).all(|w| w[0].1 == w[1].0), "contiguous: {d:?}");
        assert!(d.iter().all(|&(from, to)| to - from >= STEP), "{d:?}");
        assert!(d.last().unwrap().1 <= (8 << 20) - KEEP_BEHIND, "{d:?}");
        assert!(
            d.last().unwrap().1 > (8 << 20) - KEEP_BEHIND - STEP,
            "{d:?}"
        );
        // Random reads (a mapped library's faults) drop nothing before the last close.
        let reads = [
            (5 << 20, K),
            (1 << 20, K),
            (9 << 20, K),
            (0, K),
            (3 << 20, K),
        ];
        assert!(drops(&reads).is_empty());
        // A walk from a jump drops only what it walked.
        let reads: Vec<_> = (0..40).map(|i| ((10 << 20) + i * K, K)).collect();
        let d = drops(&reads);
        assert!(
            !d.is_empty() && d.iter().all(|&(from, _)| from >= 10 << 20),
            "{d:?}"
        );
        // Read-ahead answered out of order (pairs swapped) still walks, and drops the same.
        let mut swapped: Vec<_> = (0..64).map(|i| (i * K, K)).collect();
        for pair in swapped.chunks_mut(2) {
            pair.swap(0, 1);
        }
        let d = drops(&swapped);
        assert!(d.windows(2).all(|w| w[0].1 == w[1].0), "contiguous: {d:?}");
        assert_eq!(d.first().map(|s| s.0), Some(0), "{d:?}");
        assert!(
            d.last().unwrap().1 > (8 << 20) - KEEP_BEHIND - STEP,
            "{d:?}"
        );
    }

    #[test]
    fn a_file_open_twice_keeps_its_pages_until_both_close() {
        let pages = Pages::new();
        pages.opened(3);
        pages.opened(3);
        pages.released(3);
        assert_eq!(pages.open().get(&3).map(|o| o.handles), Some(1));
        pages.released(3);
        assert!(pages.open().is_empty());
        // A release of what was never opened cached changes nothing.
        pages.released(3);
        assert!(pages.open().is_empty());
    }
}
