//! The node table: every entry the kernel was told of, by number, with its names; and the
//! journal of its changes that a worker taking over the mount replays (`journal`).
//!
//! Numbers are handed out as names are first seen (nothing on disk gives them), so a node
//! changed under the state lock is marked dirty and written to the journal when the lock is let
//! go ([`StateGuard`]), before the request that changed it is answered.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::MutexGuard;

use fuser::Errno;

use super::{disk, journal, orphan_name, Res, Upper};
use crate::tree::ROOT_INO;

/// One entry of the merged tree.
pub(super) struct Node {
    /// Names it is reached by: (parent node, name); the first is its path. Several for
    /// hardlinks; none once unlinked (open handles keep working).
    pub(super) links: Vec<(u64, Vec<u8>)>,
    /// The image inode it shows (a directory: the one whose entries merge into it).
    pub(super) lower: Option<u64>,
    /// Whether it exists in the upper directory (at its path).
    pub(super) upper: bool,
    /// How many times the kernel was handed it (entries replied) and has not forgotten: at 0
    /// with no name left, the node goes.
    pub(super) lookups: u64,
    /// Whether [`State::by_lower`] or [`State::by_upper`] may name it.
    pub(super) shared: bool,
}

impl Node {
    /// Gives node `n` `link` as the name its path follows: first, but after its hidden name
    /// if it has one (which stays first until the kernel forgets the node: see
    /// [`State::forget`]).
    pub(super) fn add_first_name(&mut self, link: (u64, Vec<u8>), n: u64) {
        let hidden = self
            .links
            .first()
            .is_some_and(|(p, name)| *p == ROOT_INO && name[..] == *orphan_name(n).as_bytes());
        self.links.insert(usize::from(hidden), link);
    }
}

pub(super) struct State {
    /// Nodes by number; node 1 is the root. Numbers are never reused.
    pub(super) nodes: HashMap<u64, Node>,
    /// The number of the next new node.
    pub(super) next: u64,
    /// Resolved names (all changes go through us, so this stays true).
    pub(super) names: HashMap<(u64, Vec<u8>), u64>,
    /// Image inodes with several names (hardlinks) share one node.
    pub(super) by_lower: HashMap<u64, u64>,
    /// Upper files with several names share one node (host inode number → node).
    pub(super) by_upper: HashMap<u64, u64>,
    /// Descriptors of upper directories deep enough that paths through them would pass the
    /// host's PATH_MAX (see [`Upper::path`]), by node. A descriptor follows its directory
    /// through renames; it is closed when the directory goes, under the state lock, as every
    /// path made from it is used under that lock.
    pub(super) dir_fds: std::cell::RefCell<HashMap<u64, std::os::fd::OwnedFd>>,
    /// Nodes changed under the lock held now, written to [`State::journal`] when it is let
    /// go (before the request is answered: see [`StateGuard`]).
    pub(super) dirty: Vec<u64>,
    /// Where a worker that takes over the mount finds the nodes (see `journal`); none for a
    /// mount served in the process that mounted it.
    pub(super) journal: Option<journal::Journal>,
    /// Names the journal gave a node that the disk no longer shows, found by a worker that
    /// takes over: the dead worker changed them and died before it journalled that. A
    /// rename the kernel sends again finds its node here (see `Upper::renamed_before`).
    pub(super) stale: HashMap<(u64, Vec<u8>), u64>,
}

/// The state, locked; changed nodes go to the journal when it is dropped. Requests drop it
/// before they answer: a node the kernel was told of is in the journal by then.
pub(super) struct StateGuard<'a>(pub(super) MutexGuard<'a, State>);

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.0
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        self.0.write_journal();
    }
}

/// Node numbers a worker may hand out past the last journalled one (journal writes failing)
/// that its successor skips.
const NUMBERS_UNJOURNALLED: u64 = 1 << 32;

/// Lookups counted for each node a worker takes over (the kernel's count died with the worker
/// before): more than the kernel ever forgets, and the mark that its first forget is its last
/// (see [`State::forget`]).
pub(super) const TAKEN_OVER: u64 = 1 << 48;

pub(super) fn push(st: &mut State, lower: Option<u64>, upper: bool) -> u64 {
    let n = st.next;
    st.next += 1;
    st.dirty.push(n);
    st.nodes.insert(
        n,
        Node {
            links: Vec::new(),
            lower,
            upper,
            lookups: 0,
            shared: false,
        },
    );
    n
}

impl State {
    /// Node `n`, to change (so journalled).
    pub(super) fn at(&mut self, n: u64) -> Res<&mut Node> {
        let node = self.nodes.get_mut(&n).ok_or(Errno::ENOENT)?;
        self.dirty.push(n);
        Ok(node)
    }

    /// Counts an entry of node `n` handed to the kernel (not journalled: a worker that takes
    /// over cannot know how many the kernel holds, and assumes it holds them all).
    pub(super) fn looked_up(&mut self, n: u64) -> Res<()> {
        self.nodes.get_mut(&n).ok_or(Errno::ENOENT)?.lookups += 1;
        Ok(())
    }

    /// Writes the nodes changed since the last write to the journal, if there is one.
    pub(super) fn write_journal(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        dirty.sort_unstable();
        dirty.dedup();
        let mut buf = Vec::new();
        for n in dirty {
            journal::encode(&mut buf, n, self.nodes.get(&n));
        }
        j.append(&buf);
        if j.outgrew(self.nodes.len()) {
            // Mostly records of nodes changed since: rewritten as the nodes are now.
            match journal::Journal::rewrite(j.path(), self.nodes.iter().map(|(n, v)| (*n, v))) {
                Ok(fresh) => *j = fresh,
                Err(e) => tracing::warn!("compacting the node journal: {e}"),
            }
        }
    }

    /// The kernel forgot `count` of its lookups of node `n`: once none is left, an orphan's
    /// file goes, and a node no name leads to is dropped. Returns the orphan file to remove.
    pub(super) fn forget(&mut self, n: u64, count: u64) -> Option<OsString> {
        let node = self.nodes.get_mut(&n)?;
        node.lookups = match node.lookups >= TAKEN_OVER {
            // The kernel forgets an inode all at once, when it drops it: what it held of a
            // node taken over is unknown, but after this it holds none.
            true => 0,
            false => node.lookups.saturating_sub(count),
        };
        if node.lookups > 0 {
            return None;
        }
        // Its hidden name goes (names it was found by since keep the file).
        let orphan = orphan_name(n);
        let gone = node.links.first().map(|(_, name)| name.as_slice()) == Some(orphan.as_bytes());
        if gone {
            node.links.remove(0);
        }
        let dropped = n != ROOT_INO && node.links.is_empty();
        let shared = node.shared;
        if gone || dropped {
            self.dirty.push(n);
        }
        if dropped {
            self.nodes.remove(&n);
            self.dir_fds.get_mut().remove(&n);
            if shared {
                self.by_lower.retain(|_, v| *v != n);
                self.by_upper.retain(|_, v| *v != n);
            }
        }
        gone.then_some(orphan)
    }
}

impl Upper {
    /// Fills `st` with the nodes `replayed` from the journal of the process that served the
    /// mount before. How many times the kernel holds each is unknown: each is kept until the
    /// kernel's forget of it, which the kernel sends once, when it drops the inode.
    pub(super) fn take_over(
        &self,
        st: &mut State,
        replayed: journal::Replayed,
    ) -> std::io::Result<()> {
        for (n, node) in replayed {
            match node {
                Some(mut node) if n != ROOT_INO => {
                    node.lookups = TAKEN_OVER;
                    st.nodes.insert(n, node);
                }
                Some(_) => {}
                None => {
                    st.nodes.remove(&n);
                }
            }
        }
        // A file moved to its hidden name by a worker killed before it journalled that: the
        // hidden name is where its bytes are (a descriptor may hold it open).
        let mut moved = Vec::new();
        for (&n, node) in st.nodes.iter_mut() {
            let orphan = orphan_name(n);
            let first = node.links.first().map(|(_, name)| name.as_slice());
            if node.upper && first != Some(orphan.as_bytes()) && self.root.join(&orphan).exists() {
                node.links.insert(0, (ROOT_INO, orphan.as_bytes().to_vec()));
                moved.push(n);
            }
        }
        st.dirty.extend(moved);
        self.drop_stale_links(st);
        // Past any number the dead worker may have handed out without journalling it (its
        // write failed): the kernel may hold those, and must never be given one again.
        st.next = st.nodes.keys().max().map_or(ROOT_INO, |m| *m) + NUMBERS_UNJOURNALLED;
        let mut names = HashMap::new();
        let mut by_lower = HashMap::new();
        let mut by_upper = HashMap::new();
        let mut now_shared = Vec::new();
        for (&n, node) in &st.nodes {
            for (parent, name) in &node.links {
                if n != ROOT_INO && !disk::is_reserved(name) {
                    names.insert((*parent, name.clone()), n);
                }
            }
            match (node.upper, node.lower) {
                (false, Some(lower)) if node.shared => {
                    by_lower.insert(lower, n);
                }
                (true, _) => {
                    // Found by its host inode when it has other names on disk (one the dead
                    // worker linked unjournalled among them). Not found if its file is not where
                    // its first name says: its other names then resolve to a node of their own.
                    let found = self
                        .full_path(st, n)
                        .ok()
                        .and_then(|path| std::fs::symlink_metadata(path).ok());
                    match found {
                        Some(md) if !md.is_dir() && (node.shared || md.nlink() > 1) => {
                            by_upper.insert(md.ino(), n);
                            if !node.shared {
                                now_shared.push(n);
                            }
                        }
                        Some(_) => {}
                        None if node.shared => {
                            tracing::warn!("node {n} of the journal: no file where it says")
                        }
                        None => {}
                    }
                }
                _ => {}
            }
        }
        for n in now_shared {
            if let Some(node) = st.nodes.get_mut(&n) {
                node.shared = true;
                st.dirty.push(n);
            }
        }
        st.names = names;
        st.by_lower = by_lower;
        st.by_upper = by_upper;
        Ok(())
    }

    /// Takes out of `st` the names the disk no longer shows for their node (into
    /// [`State::stale`]), and marks copied up the image directories the dead worker copied up
    /// before it could journal it. Every name is judged against the paths the journal gives
    /// (before any is taken out: a directory renamed unjournalled keeps its entries, found
    /// again once the rename is).
    fn drop_stale_links(&self, st: &mut State) {
        let mut verdicts = Vec::new();
        for (&n, node) in &st.nodes {
            if n == ROOT_INO {
                continue;
            }
            let mut kept = Vec::new();
            let mut stale = Vec::new();
            let mut upper = node.upper;
            for (parent, name) in &node.links {
                let shows = match self.path(st, *parent) {
                    _ if *parent == ROOT_INO && name[..] == *orphan_name(n).as_bytes() => true,
                    // A directory not where the journal says (itself renamed unjournalled):
                    // its entries are judged once it is found, or not at all.
                    Ok(dir) if !dir.exists() => true,
                    Ok(dir) => {
                        let here = std::fs::symlink_metadata(dir.join(OsStr::from_bytes(name)));
                        match (upper, here) {
                            (true, here) => here.is_ok(),
                            // An image directory with an upper one at its name: copied up
                            // (nothing else can be moved over a directory holding entries).
                            (false, Ok(md)) if md.is_dir() && node.lower.is_some() => {
                                upper = true;
                                true
                            }
                            // Something else now at an image file's name (a copy, or a file
                            // renamed over it): not this node's any more; served by name anew.
                            (false, Ok(_)) => false,
                            // The image's entry, unless deleted there since.
                            (false, Err(_)) => {
                                !dir.join(disk::whiteout_name(name)).exists()
                                    && !dir.join(disk::OPAQUE).exists()
                            }
                        }
                    }
                    Err(_) => true,
                };
                match shows {
                    true => kept.push((*parent, name.clone())),
                    false => stale.push((*parent, name.clone())),
                }
            }
            if !stale.is_empty() || upper != node.upper {
                verdicts.push((n, kept, stale, upper));
            }
        }
        for (n, kept, stale, upper) in verdicts {
            if let Some(node) = st.nodes.get_mut(&n) {
                node.links = kept;
                node.upper = upper;
            }
            for name in stale {
                st.stale.insert(name, n);
            }
            st.dirty.push(n);
        }
    }
}
