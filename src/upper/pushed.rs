//! Small image files' bytes handed to the kernel as they are opened.
//!
//! A user's writable mount reads a small image file (at most [`through::THROUGH_MIN`]) itself
//! and keeps its pages. Cold, each such file cost a `tar` two round trips to this daemon after
//! its OPEN: the READ of its bytes, and the GETATTR the kernel sends at the next `stat` because
//! a READ marks the file's atime stale (GNU tar stats each file it read). 93% of the large test
//! image's files are small. So a read-only OPEN of one puts its bytes into the kernel's page
//! cache (`FUSE_NOTIFY_STORE`) before it is answered, when they can be had at once (kept in
//! the store uncompressed, or decoded already; never a fetch or an inflate on a FUSE worker):
//! the reader then finds them cached, and sends neither. Once per node while the kernel knows
//! it (the open keeps the cache, so the pages stay).
//!
//! Two orderings make it safe:
//! * **Never after newer bytes.** The kernel writes a writer's bytes into its pages before it
//!   sends the WRITE, so the image's bytes pushed after them would be served stale. Every
//!   change of a file's bytes starts with an open for writing or a truncation, which copies the
//!   file up; before either, pushes of the node are stopped and those under way waited for
//!   ([`Pushed::stop`]), and a push checks that its node is still the image's only once it is
//!   registered as under way.
//! * **Never every FUSE worker stuck.** A push waits (in the kernel) for any page of the file
//!   that a READ under way holds, and only a FUSE worker can answer that READ. What guarantees
//!   one is free: at most one push fewer than the mount's FUSE workers runs at once, and a
//!   change that would wait for a push under way waits on a copy-up thread instead
//!   ([`Pushed::try_stop`]). What makes such a wait rare: a node is pushed only while no other
//!   handle of it is open here (the kernel sends a handle's RELEASE after its last READ is
//!   answered), so a push waits only for a handle opened while it runs, or one a worker that
//!   took over knows nothing of. While pushes wait, fewer workers serve the mount: should the
//!   one left wait too (a read through a hung image server, until `watch` ends it), the mount
//!   waits with it.
//!
//! [`through::THROUGH_MIN`]: super::through::THROUGH_MIN

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Pushes of small image files' bytes, and their gate.
pub struct Pushed {
    /// The session's channel to the kernel (the one `pages` drops pages with).
    notifier: Arc<OnceLock<fuser::Notifier>>,
    gate: Mutex<Gate>,
    done: Condvar,
    /// Pushes allowed at once: one fewer than the mount's FUSE workers.
    at_once: usize,
}

#[derive(Default)]
struct Gate {
    /// Pushes under way, by node, and in all.
    under_way: HashMap<u64, u32>,
    pushing: usize,
    /// Nodes whose bytes are about to change: no push starts.
    stopped: HashMap<u64, u32>,
    /// Nodes pushed, until the kernel forgets them: a bit a node, where a set of numbers
    /// would cost a mount that has opened every small file of a 500,000-file image megabytes.
    pushed: Bits,
    /// Read-only handles open, by node (those this worker gave out).
    open: HashMap<u64, u32>,
    /// Changes waiting in [`Pushed::stop`] for a push to end: a push ending wakes them only if
    /// there are some (a wake is a system call, and every small file's open pushes). So every
    /// wait on `done` counts itself here, under the gate's lock.
    waiting: usize,
}

/// A set of node numbers, a bit each in words of 64 kept by number (numbers are given out in
/// order, but a worker that takes over skips ahead by 2^32: a flat bitmap would follow).
#[derive(Default)]
struct Bits(HashMap<u64, u64>);

impl Bits {
    fn contains(&self, n: u64) -> bool {
        self.0
            .get(&(n / 64))
            .is_some_and(|w| w & (1 << (n % 64)) != 0)
    }
    fn insert(&mut self, n: u64) {
        *self.0.entry(n / 64).or_default() |= 1 << (n % 64);
    }
    fn remove(&mut self, n: u64) {
        if let Some(w) = self.0.get_mut(&(n / 64)) {
            *w &= !(1 << (n % 64));
            if *w == 0 {
                self.0.remove(&(n / 64));
            }
        }
    }
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
    /// Pushes through the session's `notifier` (once made) on a mount served by `workers`
    /// FUSE workers (one: none is pushed).
    pub fn new(notifier: Arc<OnceLock<fuser::Notifier>>, workers: usize) -> Pushed {
        Pushed {
            notifier,
            gate: Mutex::new(Gate::default()),
            done: Condvar::new(),
            at_once: workers.saturating_sub(1),
        }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Node `n` is opened read-only (counted until [`Pushed::closed`]): a push of its bytes
    /// if one may start now. The caller then checks that the node is still the image's file.
    pub fn opened(&self, n: u64) -> Option<Push<'_>> {
        let notifier = self.notifier.get().cloned();
        let session = notifier.is_some();
        self.count_open(n, notifier, session)
    }

    /// Counts an open of node `n`: a push if one may start (`session`: the kernel can be told).
    fn count_open(
        &self,
        n: u64,
        notifier: Option<fuser::Notifier>,
        session: bool,
    ) -> Option<Push<'_>> {
        let mut gate = self.gate();
        let count = gate.open.entry(n).or_default();
        let others = *count;
        *count += 1;
        if !session || others > 0 {
            return None;
        }
        self.enter(gate, n, notifier)
    }

    fn enter(
        &self,
        mut gate: std::sync::MutexGuard<'_, Gate>,
        n: u64,
        notifier: Option<fuser::Notifier>,
    ) -> Option<Push<'_>> {
        let busy = gate.pushing >= self.at_once || gate.under_way.contains_key(&n);
        if busy || gate.stopped.contains_key(&n) || gate.pushed.contains(n) {
            return None;
        }
        gate.under_way.insert(n, 1);
        gate.pushing += 1;
        Some(Push {
            of: self,
            n,
            notifier,
        })
    }

    /// A read-only handle of node `n` was closed.
    pub fn closed(&self, n: u64) {
        let mut gate = self.gate();
        if let Some(c) = gate.open.get_mut(&n) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                gate.open.remove(&n);
            }
        }
    }

    /// Stops pushes of node `n` while the result is held, unless one is under way (`Err`:
    /// then [`Pushed::stop`] it on a thread that is not a FUSE worker): its bytes are about
    /// to change.
    pub fn try_stop(self: &Arc<Self>, n: u64) -> Result<Stopped, ()> {
        let mut gate = self.gate();
        if gate.under_way.contains_key(&n) {
            return Err(());
        }
        *gate.stopped.entry(n).or_default() += 1;
        Ok(Stopped {
            of: self.clone(),
            n,
        })
    }

    /// Stops pushes of node `n` while the result is held, once those under way have ended.
    pub fn stop(self: &Arc<Self>, n: u64) -> Stopped {
        let mut gate = self.gate();
        *gate.stopped.entry(n).or_default() += 1;
        while gate.under_way.contains_key(&n) {
            gate.waiting += 1;
            gate = self.done.wait(gate).unwrap_or_else(|p| p.into_inner());
            gate.waiting -= 1;
        }
        Stopped {
            of: self.clone(),
            n,
        }
    }

    /// The kernel forgot node `n`: its pages, and every handle of it, are gone.
    pub fn forgotten(&self, n: u64) {
        let mut gate = self.gate();
        gate.pushed.remove(n);
        gate.open.remove(&n);
    }
}

impl Push<'_> {
    /// Puts `bytes` (the node's, from its start) into the kernel's page cache.
    pub fn send(self, bytes: &[u8]) {
        // Tests widen the window between the check that the node is the image's and the push,
        // where a change must wait (debug builds only: `BUX_FUSE_TEST_PUSH_DELAY_MS`).
        #[cfg(debug_assertions)]
        if let Some(ms) = std::env::var("BUX_FUSE_TEST_PUSH_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let Some(notifier) = &self.notifier else {
            return self.sent();
        };
        match notifier.store(fuser::INodeNo(self.n), 0, bytes) {
            Ok(()) => self.sent(),
            // (fuser counts "no such inode" as done: harmless, the kernel holds no pages of it.)
            Err(e) => tracing::debug!("pushing node {}'s bytes: {e}", self.n),
        }
    }

    fn sent(&self) {
        self.of.gate().pushed.insert(self.n);
    }
}

impl Drop for Push<'_> {
    fn drop(&mut self) {
        let mut gate = self.of.gate();
        gate.under_way.remove(&self.n);
        gate.pushing -= 1;
        if gate.waiting > 0 {
            self.of.done.notify_all();
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
        gate.pushed.remove(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pushed(workers: usize) -> Arc<Pushed> {
        Arc::new(Pushed::new(Arc::new(OnceLock::new()), workers))
    }

    /// A push as `opened` starts one, without a session to send it through.
    fn open(p: &Pushed, n: u64) -> Option<Push<'_>> {
        p.count_open(n, None, true)
    }

    #[test]
    fn a_node_is_pushed_once_until_forgotten() {
        let p = pushed(4);
        open(&p, 7).unwrap().send(b"x");
        p.closed(7);
        assert!(open(&p, 7).is_none(), "pushed twice");
        p.closed(7);
        p.forgotten(7);
        let push = open(&p, 7).expect("not pushed again once forgotten");
        // A push that did not send (the bytes could not be had) leaves it to the next open.
        drop(push);
        p.closed(7);
        assert!(open(&p, 7).is_some());
    }

    #[test]
    fn bits_hold_what_is_put() {
        let mut b = Bits::default();
        for n in [0, 1, 63, 64, 1 << 33] {
            assert!(!b.contains(n));
            b.insert(n);
            assert!(b.contains(n));
        }
        b.remove(64);
        assert!(!b.contains(64) && b.contains(63) && b.contains(1 << 33));
        assert_eq!(b.0.len(), 2, "a word for 0..64 and one for 2^33");
    }

    #[test]
    fn a_node_open_elsewhere_is_not_pushed() {
        let p = pushed(4);
        drop(open(&p, 5)); // opened, its bytes not had at once: not pushed
        assert!(open(&p, 5).is_none(), "pushed while another handle is open");
        p.closed(5);
        assert!(open(&p, 5).is_none(), "pushed while another handle is open");
        p.closed(5);
        p.closed(5);
        assert!(open(&p, 5).is_some(), "not pushed once every handle closed");
    }

    #[test]
    fn pushes_leave_a_fuse_worker_free() {
        let p = pushed(3);
        let (a, b) = (open(&p, 1).unwrap(), open(&p, 2).unwrap());
        assert!(open(&p, 3).is_none(), "a third push with three workers");
        drop((a, b));
        assert!(open(&p, 4).is_some());
        assert!(open(&pushed(1), 1).is_none(), "a push with one worker");
    }

    #[test]
    fn a_change_waits_for_pushes_under_way_and_stops_new_ones() {
        let p = pushed(4);
        let push = open(&p, 3).unwrap();
        assert!(
            p.try_stop(3).is_err(),
            "a FUSE worker would wait for the push"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        let changer = std::thread::spawn(move || {
            let stopped = p2.stop(3);
            tx.send(()).unwrap();
            // Stopped: no push of the node starts, another node's does.
            p2.closed(3);
            assert!(open(&p2, 3).is_none(), "a push started while stopped");
            p2.closed(3);
            assert!(open(&p2, 4).is_some());
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
        assert!(open(&p, 3).is_some(), "still marked pushed after a change");
        let stopped = p.try_stop(9).expect("no push of it under way");
        assert!(open(&p, 9).is_none(), "a push started while stopped");
        drop(stopped);
    }
}
