//! Image files' bytes for a user's mount: large files read through the image's shared mount
//! (one page cache for all the user's mounts), small ones pushed into the kernel's page cache
//! as they are opened.

use super::*;

impl Upper {
    /// Up to `len` bytes at `off` of image file `lower` read through the image's shared
    /// mount, if its files of that size are read there and the mount serves it.
    pub(super) fn read_through(&self, lower: u64, off: u64, len: u32) -> Option<Vec<u8>> {
        let t = self.through_mount()?; // (`Through::read` declines while unusable)
        let tree = self.lower.tree();
        if tree.inode(lower)?.size <= through::THROUGH_MIN {
            return None;
        }
        t.read(lower, || tree.path_of(lower), off, len)
    }

    /// The shared mount, if files can be read through it: opened cached here (the pages
    /// dropped as read), or with direct I/O where the kernel can map such files shared.
    pub(super) fn through_mount(&self) -> Option<&Through> {
        self.through
            .as_ref()
            .filter(|t| self.pages.cached() || t.maps_direct())
    }

    /// Puts small image file `n`'s bytes into the kernel's page cache as it is opened
    /// read-only, when they can be had at once (see `pushed`).
    pub(super) fn push_small(&self, n: u64) {
        let small_image_file = || {
            let st = self.state();
            match self.image_inode(&st, n) {
                Ok(Some(i)) if i.kind == EntryKind::File && (1..=PUSH_MAX).contains(&i.size) => {
                    self.node(&st, n).ok().and_then(|node| node.lower)
                }
                _ => None,
            }
        };
        // Asked first so that opens of other files are not counted as pushes under way (a
        // truncation or a write-open would wait for them); asked again once the push is
        // registered, which is what orders it before a change (see `pushed`).
        if small_image_file().is_none() {
            return;
        }
        let Some(push) = self.pushed.opened(n) else {
            return;
        };
        if let Some(bytes) = small_image_file().and_then(|l| self.lower.read_lower_at_once(l).ok())
        {
            push.send(&bytes);
        }
    }

    /// Whether node `n` is an image file read through the shared mount (not copied up).
    pub(super) fn reads_through(&self, n: u64) -> bool {
        if !self.through_mount().is_some_and(|t| t.usable()) || self.open_file(n).is_some() {
            return false;
        }
        let st = self.state();
        matches!(self.image_inode(&st, n), Ok(Some(i)) if i.kind == EntryKind::File
            && i.size > through::THROUGH_MIN)
    }
}
