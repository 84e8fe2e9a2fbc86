//! Small image files' bytes handed to the kernel as they are opened.
//!
//! A user's writable mount reads a small image file (at most [`through::THROUGH_MIN`]) itself
//! and keeps its pages. Cold, each such file cost a `tar` three round trips to this daemon
//! after its OPEN: the READ of its bytes, and the GETATTR the kernel sends at the next `stat`
//! because a READ marks the file's atime stale (GNU tar stats each file it read). 87% of the
//! large test image's files are small. So a read-only OPEN of one puts its bytes into the
//! kernel's page cache (`FUSE_NOTIFY_STORE`) before it is answered, when they can be had at
//! once (kept in the store uncompressed, or decoded already; never a fetch or an inflate on a
//! FUSE worker): the reader then finds them cached, and sends neither. Once per node while
//! the kernel knows it (its pages stay: the open keeps the cache).
//!
//! What is pushed must never land after newer bytes: the kernel writes a writer's bytes into
//! its pages before it sends the WRITE, so a push of the image's bytes arriving after them
//! would serve stale data. Every change of a file's bytes starts with an open for writing or a
//! truncation, which copies the file up; before either, pushes of the node are stopped and
//! those under way waited for ([`Pushed::stop`]), and a push starts only for a node still
//! the image's. The wait holds no lock: a push may itself wait (in the kernel) for a read of
//! the file under way, which another FUSE worker answers.
//!
//! [`through::THROUGH_MIN`]: super::through::THROUGH_MIN

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Pushes of small image files' bytes, and their gate.
pub struct Pushed {
    /// The session's channel to the kernel (the one `pages` drops pages with).
    notifier: Arc<OnceLock<fuser::Notifier>>,
    gate: Mutex<Gate>,
    done: Condvar,
}

#[derive(Default)]
struct Gate {
    /// Pushes under way, by node.
    under_way: HashMap<u64, u32>,
    /// Nodes whose bytes are about to change: no push starts.
    stopped: HashMap<u64, u32>,
    /// Nodes pushed, until the kernel forgets them.
    pushed: HashSet<u64>,
}

/// A push of node `n` under way (ended when dropped).
pub struct Push<'a> {
    of: &'a Pushed,
    n: u64,
    notifier: Option<fuser::Notifier>,
}

/// Pushes of a node stopped while held.
pub struct Stopped {
    of: Arc<Pushed>,
    n: u64,
}

impl Pushed {
    pub fn new(notifier: Arc<OnceLock<fuser::Notifier>>) -> Pushed {
        Pushed {
            notifier,
            gate: Mutex::new(Gate::default()),
            done: Condvar::new(),
        }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A push of node `n` may start: none is stopped, it was not pushed since the kernel last
    /// learnt of it, and the session can notify. The caller then checks that the node is
    /// still the image's file.
    pub fn start(&self, n: u64) -> Option<Push<'_>> {
        let notifier = self.notifier.get()?.clone();
        self.enter(n, Some(notifier))
    }

    fn enter(&self, n: u64, notifier: Option<fuser::Notifier>) -> Option<Push<'_>> {
        let mut gate = self.gate();
        if gate.stopped.contains_key(&n) || gate.pushed.contains(&n) {
            return None;
        }
        *gate.under_way.entry(n).or_default() += 1;
        Some(Push {
            of: self,
            n,
            notifier,
        })
    }

    /// Stops pushes of node `n` while the result is held, once those under way have ended:
    /// its bytes are about to change.
    pub fn stop(self: &Arc<Self>, n: u64) -> Stopped {
        let mut gate = self.gate();
        *gate.stopped.entry(n).or_default() += 1;
        while gate.under_way.contains_key(&n) {
            gate = self.done.wait(gate).unwrap_or_else(|p| p.into_inner());
        }
        Stopped {
            of: self.clone(),
            n,
        }
    }

    /// The kernel forgot node `n`, and its pages with it.
    pub fn forgotten(&self, n: u64) {
        self.gate().pushed.remove(&n);
    }
}

impl Push<'_> {
    /// Puts `bytes` (the node's, from its start) into the kernel's page cache.
    pub fn send(self, bytes: &[u8]) {
        let Some(notifier) = &self.notifier else {
            return self.sent();
        };
        match notifier.store(fuser::INodeNo(self.n), 0, bytes) {
            Ok(()) => self.sent(),
            // (ENOENT: the kernel has no inode of it any more. Its reads come as requests.)
            Err(e) => tracing::debug!("pushing node {}'s bytes: {e}", self.n),
        }
    }
}

impl Push<'_> {
    fn sent(&self) {
        self.of.gate().pushed.insert(self.n);
    }
}

impl Drop for Push<'_> {
    fn drop(&mut self) {
        let mut gate = self.of.gate();
        if let Some(c) = gate.under_way.get_mut(&self.n) {
            *c -= 1;
            if *c == 0 {
                gate.under_way.remove(&self.n);
                self.of.done.notify_all();
            }
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let mut gate = self.of.gate();
        if let Some(c) = gate.stopped.get_mut(&self.n) {
            *c -= 1;
            if *c == 0 {
                gate.stopped.remove(&self.n);
            }
        }
        // Pushed before: the node's pages now hold what the change left (it came through
        // the kernel's cache, or dropped it), not the image's; and a copied-up node is not
        // pushed again.
        gate.pushed.remove(&self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pushed() -> Arc<Pushed> {
        Arc::new(Pushed::new(Arc::new(OnceLock::new())))
    }

    #[test]
    fn a_node_is_pushed_once_until_forgotten() {
        let p = pushed();
        p.enter(7, None).unwrap().send(b"x");
        assert!(p.enter(7, None).is_none(), "pushed twice");
        p.forgotten(7);
        assert!(
            p.enter(7, None).is_some(),
            "not pushed again once forgotten"
        );
        // A push that did not send (the bytes could not be had) leaves it to the next open.
        assert!(p.enter(7, None).is_some());
    }

    #[test]
    fn a_change_waits_for_pushes_under_way_and_stops_new_ones() {
        let p = pushed();
        let push = p.enter(3, None).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        let changer = std::thread::spawn(move || {
            let stopped = p2.stop(3);
            tx.send(()).unwrap();
            // Stopped: no push of the node starts, another node's does.
            assert!(p2.enter(3, None).is_none(), "a push started while stopped");
            assert!(p2.enter(4, None).is_some());
            drop(stopped);
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the change did not wait for the push under way"
        );
        push.send(b"image bytes");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the change went on once the push ended");
        changer.join().unwrap();
        // Stopped and let go: the node's pages are not the image's any more.
        assert!(
            p.enter(3, None).is_some(),
            "still marked pushed after a change"
        );
    }
}
