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

    /// Cancels every fetch in flight (unmount). Never blocks, so an async caller may call it.
    /// Reads waiting on a cancelled fetch fail at their deadline.
    pub fn shutdown(&self) {
        if let Some(rt) = self.rt.lock().unwrap_or_else(|p| p.into_inner()).take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.shutdown();
    }
}
