//! Whether the worker answers: a `statfs` of the shared mount every second, on a thread of
//! its own. A worker that hangs (stopped, or stuck) answers none, and every VM reading through
//! the mount would wait on it for good: the supervisor ends a worker the probe has waited
//! [`HUNG`] for and starts another, which the kernel resends what the hung one held.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(doc)]
use super::HUNG;

/// How often the probe asks.
const EVERY: Duration = Duration::from_secs(1);

pub(super) struct Probe(Arc<Asking>);

#[derive(Default)]
struct Asking {
    /// When the question under way was asked.
    since: Mutex<Option<Instant>>,
    stop: AtomicBool,
}

impl Probe {
    /// Probes the FUSE mount at `mnt` until dropped.
    pub(super) fn start(mnt: PathBuf) -> Probe {
        let asking = Arc::new(Asking::default());
        let a = asking.clone();
        let spawned = std::thread::Builder::new()
            .name("bux-fuse-probe".into())
            .spawn(move || {
                let Ok(path) = std::ffi::CString::new(mnt.into_os_string().into_encoded_bytes())
                else {
                    return;
                };
                while !a.stop.load(Ordering::Relaxed) {
                    *a.lock() = Some(Instant::now());
                    // SAFETY: a NUL-terminated path and a zeroed struct for statvfs to fill.
                    unsafe {
                        let mut st: libc::statvfs = std::mem::zeroed();
                        libc::statvfs(path.as_ptr(), &mut st);
                    }
                    *a.lock() = None;
                    std::thread::sleep(EVERY);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("probing the image server: {e}");
        }
        Probe(asking)
    }

    /// How long the question under way has waited for an answer.
    pub(super) fn waiting(&self) -> Option<Duration> {
        self.0.lock().map(|t| t.elapsed())
    }
}

impl Asking {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.since.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}
