//! Small image files' bytes pushed into the kernel's page cache as they are first opened.
//!
//! On a FUSE mount that is not read-only every read the server answers costs two round
//! trips: the `READ`, and a `GETATTR` at the next `stat` (the kernel drops a file's cached
//! atime whenever it reads pages from the server, `fuse_invalidate_atime`). A user's writable
//! mount sees both for each small file a walk reads (87% of a Debian image's files are
//! ≤ 32 KiB). Answering the file's first open, the server already knows the bytes it will be
//! asked for (kept whole in the store's small-file copy, no decoding), so it stores them in
//! the inode's page cache first (`FUSE_NOTIFY_STORE`) and opens with `FOPEN_KEEP_CACHE`: the
//! reads that follow are page-cache hits, with no request at all.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use fuser::{INodeNo, Notifier};

use crate::fs::ImageFs;

/// The largest file pushed: one request's worth of small-file bytes.
pub(crate) const PUSH_MAX: u64 = 64 << 10;

/// The session's notifier (once it is made) and the nodes whose pages were pushed.
#[derive(Clone, Default)]
pub struct Pusher(Arc<Inner>);

#[derive(Default)]
struct Inner {
    notifier: OnceLock<Notifier>,
    /// Nodes pushed since the kernel last forgot them (its inode's pages live as long).
    pushed: Mutex<HashSet<u64>>,
}

impl Pusher {
    /// Pushes through `notifier` (the session's, [`fuser::Session::notifier`]) from now on.
    pub fn connect(&self, notifier: Notifier) {
        let _ = self.0.notifier.set(notifier);
    }

    pub(super) fn ready(&self) -> bool {
        self.0.notifier.get().is_some()
    }

    /// Pushes image inode `ino`'s bytes as node `node`'s pages, once per kernel inode, if the
    /// file is small and its bytes are at hand without decoding.
    pub(super) fn push(&self, image: &ImageFs, ino: u64, node: u64) {
        let Some(notifier) = self.0.notifier.get() else {
            return;
        };
        if !self.pushed().insert(node) {
            return;
        }
        if let Some(bytes) = image.small_file_now(ino, PUSH_MAX) {
            // A failure (the inode already evicted) leaves the reads to come as they were.
            if let Err(e) = notifier.store(INodeNo(node), 0, &bytes) {
                tracing::debug!("pushing node {node}'s pages: {e}");
            }
        }
    }

    /// The kernel dropped node `node`'s inode, and its pages with it.
    pub(super) fn forget(&self, node: u64) {
        self.pushed().remove(&node);
    }

    fn pushed(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.0.pushed.lock().unwrap_or_else(|p| p.into_inner())
    }
}
