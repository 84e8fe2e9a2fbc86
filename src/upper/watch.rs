//! Watching the reads a user's writable mount sends through the image's shared mount, for a
//! server that hangs rather than dies: a FUSE read the server has taken ends only with a fatal
//! signal to the reader or the end of the connection, so a stopped server would hold every
//! VM's read for good. See [`watch`] for what is done, and `crate::mount::shared::end_hung_server`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

#[cfg(doc)]
use super::through::SUSPECT;

/// How often reads under way are looked at.
const WATCH_TICK: Duration = Duration::from_millis(500);

/// Reads through the shared mount, watched for a hung server.
#[derive(Default)]
pub(super) struct Reads {
    /// Reads under way (opening the file too): when each began, by a number of its own.
    under_way: Mutex<HashMap<u64, Instant>>,
    next: AtomicU64,
    /// When a read through the shared mount last failed (or was found held up).
    pub(super) failed: Mutex<Option<Instant>>,
}

/// A read under way (its number, when it began), until dropped.
pub(super) struct UnderWay<'a>(&'a Reads, u64, pub(super) Instant);

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0.lock_under_way().remove(&self.1);
    }
}

impl Reads {
    /// Reads through the shared mount at `mnt`, watched by a thread of their own while they are.
    pub(super) fn watched(mnt: PathBuf) -> Arc<Reads> {
        let reads = Arc::new(Reads::default());
        let watched = Arc::downgrade(&reads);
        if let Err(e) = std::thread::Builder::new()
            .name("bux-fuse-watch".into())
            .spawn(move || watch(watched, mnt))
        {
            tracing::warn!("watching reads through the shared mount: {e}");
        }
        reads
    }

    /// Marks a read under way until the guard is dropped.
    pub(super) fn start(&self) -> UnderWay<'_> {
        let (n, now) = (self.next.fetch_add(1, Ordering::Relaxed), Instant::now());
        self.lock_under_way().insert(n, now);
        UnderWay(self, n, now)
    }

    /// A read that began at `began` was answered: if it was one found held up, the server is
    /// back (another worker took over), and reads go through it again at once.
    pub(super) fn answered(&self, began: Instant) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_some_and(|t| began < t) {
            *failed = None;
        }
    }

    fn lock_under_way(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.under_way.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn failed(&self) {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// How long the oldest read under way has waited.
    fn longest_wait(&self) -> Option<Duration> {
        self.lock_under_way().values().min().map(Instant::elapsed)
    }
}

/// Watches the reads through the shared mount at `mnt`. A read held up for `HUNG` (5 s) while
/// the server shows no progress for as long (its read counters unchanged: a slow or throttled
/// server that answers anyone is left alone) sends later reads around the mount (for
/// [`SUSPECT`]) and ends the server's worker: its supervisor starts another, which the kernel
/// resends the held reads to. If that brings no progress within `HUNG` more (the supervisor
/// stopped too, or the server frozen), the connection is ended: the reads fail and are
/// decoded here.
fn watch(reads: Weak<Reads>, mnt: PathBuf) {
    use crate::mount::shared::{end_hung_server, progress, Ended, HUNG};
    // The server's progress report as last read, and when it last changed.
    let mut seen: (Option<Vec<u8>>, Instant) = (None, Instant::now());
    // When this mount last ended something of the server's.
    let mut ended: Option<Instant> = None;
    loop {
        std::thread::sleep(WATCH_TICK);
        let Some(reads) = reads.upgrade() else {
            return; // the mount is gone
        };
        let now = progress(&mnt);
        if now != seen.0 {
            seen = (now, Instant::now());
        }
        let held = reads.longest_wait();
        let connection = match next_step(held, seen.1.elapsed(), ended.map(|t| t.elapsed())) {
            Step::Wait => {
                if held.is_none_or(|w| w < HUNG) {
                    ended = None;
                }
                continue;
            }
            Step::EndWorker => false,
            Step::EndConnection => true,
        };
        reads.failed();
        match end_hung_server(&mnt, HUNG, connection) {
            Ended::Worker(pid) => {
                tracing::warn!(
                    "a read through {} waited {HUNG:?} on a server showing no progress: its worker (pid {pid}) was ended",
                    mnt.display()
                );
                ended = Some(Instant::now());
            }
            Ended::Connection => {
                tracing::warn!(
                    "no progress on {} after its worker was ended: its connection was ended (image files are decoded here)",
                    mnt.display()
                );
                ended = Some(Instant::now());
            }
            // No worker to end (one being started, or none: the supervisor then answers for
            // it once it has had its time).
            Ended::Nothing => {
                ended.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// What the watcher does next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Wait,
    EndWorker,
    EndConnection,
}

/// The watcher's rule: `held`, how long the oldest read under way has waited; `still`, how long
/// the server's progress report has not changed; `ended`, how long ago this mount last ended
/// something of the server's (or found no worker to end).
fn next_step(held: Option<Duration>, still: Duration, ended: Option<Duration>) -> Step {
    use crate::mount::shared::HUNG;
    if held.is_none_or(|w| w < HUNG) || still < HUNG {
        return Step::Wait; // nothing held up, or a server making progress, however slowly
    }
    match ended {
        None => Step::EndWorker,
        Some(t) if t < HUNG => Step::Wait, // the next worker given its time
        Some(_) => Step::EndConnection,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::shared::HUNG;

    #[test]
    fn a_held_read_ends_the_worker_only_when_the_server_makes_no_progress() {
        let s = |x: u64| Some(Duration::from_secs(x));
        let long = Duration::from_secs(HUNG.as_secs() + 1);
        assert_eq!(next_step(None, long, None), Step::Wait, "nothing held");
        assert_eq!(next_step(s(1), long, None), Step::Wait, "held briefly");
        assert_eq!(
            next_step(Some(long), Duration::from_secs(1), None),
            Step::Wait,
            "slow, but answering others"
        );
        assert_eq!(next_step(Some(long), long, None), Step::EndWorker);
        assert_eq!(
            next_step(Some(long), long, s(1)),
            Step::Wait,
            "its successor starting"
        );
        assert_eq!(next_step(Some(long), long, Some(long)), Step::EndConnection);
    }
}
