//! The registry end of lazy fetching: one per mount, shared by its lazy layers — the client,
//! the runtime its fetches run on, the read deadline, counters, and whether reads are waiting
//! (background work yields to them).

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::registry::Registry;

/// The registry end of lazy fetching, shared by every lazy layer of a mount.
pub struct Remote {
    pub(super) rt: Mutex<Option<tokio::runtime::Runtime>>,
    pub(super) registry: Registry,
    /// How long a read waits for its bytes before failing with `EIO`.
    pub deadline: Duration,
    /// Bytes received from the registry.
    pub fetched: AtomicU64,
    /// Range requests sent.
    pub requests: AtomicU64,
    /// Fetches that a read waits for, in flight: background completion yields to them.
    pub(super) demand: AtomicUsize,
    /// When the last of those ended (milliseconds since `started`).
    pub(super) last_demand: AtomicU64,
    pub(super) started: Instant,
}

/// Background completion waits this long after the last read that waited: reads come in
/// bursts (a program starting), and each gap in a burst is shorter than this.
const DEMAND_QUIET: Duration = Duration::from_millis(200);

/// Background completion with no read trace to fetch first starts once reads have left the
/// link alone this long (a boot's first programs are read in bursts with shorter gaps), or
/// [`START_LATEST`] after it was asked for. Started at once, it took the link from the first
/// command of a zstd:chunked image (1.59 s against 1.22 s without completion, 200 Mbit/s):
/// pausing a stream for reads leaves what is already in flight (socket buffers, the link's) to
/// arrive first. Now 1.19 s.
const START_QUIET: Duration = Duration::from_millis(500);
const START_LATEST: Duration = Duration::from_secs(10);

impl Remote {
    /// A fetcher for blobs of `registry`'s repository.
    pub fn new(registry: Registry, deadline: Duration) -> io::Result<Arc<Remote>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bux-fuse-fetch")
            .enable_all()
            .build()?;
        let remote = Arc::new(Remote {
            rt: Mutex::new(Some(rt)),
            registry,
            deadline,
            fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            demand: AtomicUsize::new(0),
            last_demand: AtomicU64::new(0),
            started: Instant::now(),
        });
        // What the first read's fetch would wait for (the registry's auth), learned while
        // the mount starts.
        let weak = Arc::downgrade(&remote);
        remote.spawn(async move {
            if let Some(me) = weak.upgrade() {
                me.registry.warm_up().await;
            }
        });
        Ok(remote)
    }

    pub(super) fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &*self.rt.lock().unwrap_or_else(|p| p.into_inner()) {
            rt.spawn(f);
        }
    }

    /// Whether reads are waiting on fetches, or did a moment ago.
    pub(super) fn demand_active(&self) -> bool {
        let last = self.last_demand.load(Ordering::SeqCst);
        let now = self.started.elapsed().as_millis() as u64;
        self.demand.load(Ordering::SeqCst) > 0
            || (last > 0 && now.saturating_sub(last) < DEMAND_QUIET.as_millis() as u64)
    }

    /// Waits until reads have left the link alone for [`START_QUIET`], or [`START_LATEST`] has
    /// passed: what background work may start now.
    pub(super) async fn settled(&self) {
        let since = |t: Instant| t.duration_since(self.started).as_millis() as u64;
        let asked = Instant::now();
        while asked.elapsed() < START_LATEST {
            let (demand, last) = (
                self.demand.load(Ordering::SeqCst),
                self.last_demand.load(Ordering::SeqCst),
            );
            let Some(wait) = start_wait(demand, last, since(asked), since(Instant::now())) else {
                return;
            };
            tokio::time::sleep(wait.clamp(Duration::from_millis(10), Duration::from_millis(100)))
                .await;
        }
    }

    /// Cancels every fetch in flight (unmount). Never blocks, so an async caller may call it.
    /// Reads waiting on a cancelled fetch fail at their deadline.
    pub fn shutdown(&self) {
        if let Some(rt) = self.rt.lock().unwrap_or_else(|p| p.into_inner()).take() {
            rt.shutdown_background();
        }
    }
}

/// How much longer background work asked for at `asked` waits at `now` (milliseconds since the
/// mount's start, as `last_demand` is, the end of the last read that waited: 0 for none), with
/// `demand` reads waiting now; `None`: it may start. The quiet time counts from the later of
/// the last read and the asking: an idle mount's first reads may be about to come.
fn start_wait(demand: usize, last_demand: u64, asked: u64, now: u64) -> Option<Duration> {
    let idle = now.saturating_sub(last_demand.max(asked));
    let quiet = START_QUIET.as_millis() as u64;
    if demand > 0 {
        return Some(START_QUIET);
    }
    (idle < quiet).then(|| Duration::from_millis(quiet - idle))
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_work_starts_once_reads_have_left_the_link_alone() {
        let quiet = START_QUIET.as_millis() as u64;
        // Asked at 300 ms of an idle mount: it waits a quiet time from then.
        assert_eq!(
            start_wait(0, 0, 300, 300),
            Some(Duration::from_millis(quiet))
        );
        assert_eq!(start_wait(0, 0, 300, 300 + quiet), None);
        // A read waiting: not yet, however long ago the last one ended.
        assert!(start_wait(1, 100, 300, 300 + 10 * quiet).is_some());
        // The last read ended after the asking: the quiet time counts from its end.
        assert_eq!(
            start_wait(0, 900, 300, 1000),
            Some(Duration::from_millis(quiet - 100))
        );
        assert_eq!(start_wait(0, 900, 300, 900 + quiet), None);
    }
}
