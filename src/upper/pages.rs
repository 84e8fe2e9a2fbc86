//! The pages a user's writable mount keeps of image files it reads through the shared mount.
//!
//! Such a file is cached in the image's shared mount, once for all of the user's mounts
//! (`through`). Opened with direct I/O here, every read of it is a round trip to this daemon
//! at the reader's own size: `tar` reads 10 KiB at a time, so a cold `tar` of the large image
//! took 2.25× umoci's tree. Opened cached instead, the kernel reads ahead in 128 KiB requests
//! and serves the reader from this mount's pages; to keep those pages from becoming a second
//! copy per mount of what the shared mount holds, the daemon tells the kernel to drop them
//! (`FUSE_NOTIFY_INVAL_INODE`): behind a reader walking the file, and all of them when the last
//! handle of the file is closed. What stays is what open files are reading: a file read at
//! random (a mapped library's faults) keeps what was read until its last close, and a drop
//! also makes the kernel ask the file's attributes again (the notification drops both).
//!
//! Each open gets a handle of its own, and each handle its own walk: two readers of a file,
//! or a reader going back to the start, are followed apart. A worker taking over a mount knows
//! nothing of the handles opened before it: a read through one adopts it, and the close of one
//! drops the file's pages if no handle this worker knows of is open.
//!
//! The drops are sent from a thread of their own: the kernel waits for pages under read to be
//! answered before it drops them, and a FUSE worker waiting there could be the one to answer.
//! (That thread can then be held in the kernel, even through a SIGKILL, until the read is
//! answered: the keeper does not wait for such a worker to be reaped before starting the next,
//! whose answer to the resent read lets it go: `kept::supervise`.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

/// Pages this far behind a reader walking a file are kept (a reader that steps back a little,
/// `tar`'s or a decompressor's, finds them).
const KEEP_BEHIND: u64 = 1 << 20;

/// Dropped in steps of at least this much: one notification per 2 MiB read, not per request.
const STEP: u64 = 2 << 20;

/// The bit that marks a handle as one of these (the mount's other handles are 0 and 1).
const TAG: u64 = 1 << 63;

/// Whether `fh` is the handle of an image file opened cached and read through.
pub fn is_cached(fh: u64) -> bool {
    fh & TAG != 0
}

/// Where one handle's reads are.
#[derive(Default)]
struct Walk {
    /// Where the reads walking the file in order started, and the furthest they reached.
    from: u64,
    end: u64,
    /// Pages below this were dropped (of this walk).
    dropped: u64,
}

impl Walk {
    /// A read at `offset` of `len` bytes: the pages to drop now, if any (`from..to`).
    fn read(&mut self, offset: u64, len: u64) -> Option<(u64, u64)> {
        // The kernel's read-ahead requests may be answered a little out of order (several
        // FUSE workers): a read near the walk's end goes on with it. One elsewhere starts a
        // new walk: a jump ahead, or back (to pages dropped already, say: a second pass), and
        // pages before it may be what the reader comes back to.
        if offset < self.from.max(self.dropped) || offset > self.end + KEEP_BEHIND {
            self.from = offset;
            self.end = offset;
            self.dropped = offset;
        }
        self.end = self.end.max(offset + len);
        let to = self.end.saturating_sub(KEEP_BEHIND);
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
    /// Open handles by node, each with its walk.
    open: Mutex<HashMap<u64, HashMap<u64, Walk>>>,
    /// Handles are `TAG | this process's id << 32 | a count`: never one a worker before this
    /// one gave out (it had another process id).
    base: u64,
    next: AtomicU32,
    /// To the thread that sends the drops, started with the first.
    drops: Mutex<Option<Sender<Drop>>>,
    /// The drops made, kept rather than sent (the unit tests' view).
    #[cfg(test)]
    sent: Mutex<Vec<Drop>>,
}

impl Pages {
    pub fn new() -> Pages {
        Pages {
            notifier: Arc::new(OnceLock::new()),
            open: Mutex::new(HashMap::new()),
            base: TAG | u64::from(std::process::id()) << 32,
            next: AtomicU32::new(0),
            drops: Mutex::new(None),
            #[cfg(test)]
            sent: Mutex::new(Vec::new()),
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

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HashMap<u64, Walk>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Node `n` is opened cached: the handle to answer the open with.
    pub fn opened(&self, n: u64) -> u64 {
        let fh = self.base | u64::from(self.next.fetch_add(1, Ordering::Relaxed));
        self.open()
            .entry(n)
            .or_default()
            .insert(fh, Walk::default());
        fh
    }

    /// Handle `fh` of node `n` was closed: if no other handle of it is known to be open, all
    /// its pages are dropped.
    pub fn released(&self, n: u64, fh: u64) {
        let mut open = self.open();
        if let Some(handles) = open.get_mut(&n) {
            handles.remove(&fh);
            if !handles.is_empty() {
                return;
            }
            open.remove(&n);
        }
        drop(open);
        self.drop_pages((n, 0, 0));
    }

    /// Handle `fh` of node `n` read `len` bytes at `offset` (a handle not known, opened before
    /// this worker took over, is adopted): pages well behind a reader walking the file are
    /// dropped.
    pub fn read(&self, n: u64, fh: u64, offset: u64, len: u64) {
        let step = self
            .open()
            .entry(n)
            .or_default()
            .entry(fh)
            .or_default()
            .read(offset, len);
        if let Some((from, to)) = step {
            self.drop_pages((n, from as i64, (to - from) as i64));
        }
    }

    fn drop_pages(&self, d: Drop) {
        #[cfg(test)]
        {
            self.sent.lock().unwrap().push(d);
            return;
        }
        #[allow(unreachable_code)]
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

    const K: u64 = 128 << 10;

    /// The drops a handle's reads make.
    fn drops(reads: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut w = Walk::default();
        reads
            .iter()
            .filter_map(|&(off, len)| w.read(off, len))
            .collect()
    }

    fn walk(from: u64, n: u64) -> Vec<(u64, u64)> {
        (0..n).map(|i| (from + i * K, K)).collect()
    }

    #[test]
    fn pages_are_dropped_behind_a_walk_and_never_ahead_of_a_jump() {
        // A walk of 8 MiB in 128 KiB reads: dropped in 2 MiB steps, 1 MiB behind the reader.
        let d = drops(&walk(0, 64));
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
        let d = drops(&walk(10 << 20, 40));
        assert!(
            !d.is_empty() && d.iter().all(|&(from, _)| from >= 10 << 20),
            "{d:?}"
        );
        // Read-ahead answered out of order (pairs swapped) still walks, and drops the same.
        let mut swapped = walk(0, 64);
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
    fn a_second_pass_is_a_walk_of_its_own() {
        let mut twice = walk(0, 64);
        twice.extend(walk(0, 64));
        let d = drops(&twice);
        let starts = d.iter().filter(|s| s.0 == 0).count();
        assert_eq!(starts, 2, "the second pass drops behind itself too: {d:?}");
    }

    #[test]
    fn handles_are_followed_apart_and_the_last_close_drops_the_file() {
        let pages = Pages::new();
        let (a, b) = (pages.opened(3), pages.opened(3));
        assert!(a != b && is_cached(a) && is_cached(b));
        // Two readers 6 MiB apart, their reads interleaved: each drops behind itself.
        for i in 0..48 {
            pages.read(3, a, i * K, K);
            pages.read(3, b, (6 << 20) + i * K, K);
        }
        let sent = pages.sent.lock().unwrap().clone();
        assert!(sent.iter().any(|d| d.1 == 0), "{sent:?}");
        assert!(sent.iter().any(|d| d.1 == 6 << 20), "{sent:?}");
        pages.sent.lock().unwrap().clear();
        pages.released(3, a);
        assert!(pages.sent.lock().unwrap().is_empty(), "b is still open");
        pages.released(3, b);
        assert_eq!(*pages.sent.lock().unwrap(), vec![(3, 0, 0)]);
        assert!(pages.open().is_empty());
    }

    #[test]
    fn a_handle_from_before_a_takeover_is_adopted_by_its_reads_and_dropped_at_its_close() {
        let before = Pages::new();
        let old = before.opened(5);
        // The worker that takes over knows nothing of `old`.
        let pages = Pages {
            base: TAG | 1 << 32,
            ..Pages::new()
        };
        let new = pages.opened(5);
        assert_ne!(old, new, "handles differ across workers");
        // The old handle walks: dropped behind it. Its close leaves the new handle's pages.
        for i in 0..48 {
            pages.read(5, old, i * K, K);
        }
        assert!(!pages.sent.lock().unwrap().is_empty());
        pages.sent.lock().unwrap().clear();
        pages.released(5, old);
        assert!(
            pages.sent.lock().unwrap().is_empty(),
            "the new handle is open"
        );
        pages.released(5, new);
        assert_eq!(*pages.sent.lock().unwrap(), vec![(5, 0, 0)]);
        // An old handle closed with none of this worker's open drops the file.
        pages.sent.lock().unwrap().clear();
        pages.released(9, old);
        assert_eq!(*pages.sent.lock().unwrap(), vec![(9, 0, 0)]);
    }
}
