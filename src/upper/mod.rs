//! A writable root for users: an upper directory over the image, served by bux-fuse itself.
//!
//! Root's writable mounts are a kernel overlay on the read-only image mount. A user can mount
//! neither an overlay nor (through fuse-overlayfs, measured) anything that takes a chown to
//! another owner: fuse-overlayfs always mounts with `default_permissions`, so the kernel refuses
//! the user a chown to root or a write into an image directory owned by someone else. Here one
//! FUSE mount serves both layers with root semantics for whatever reaches it (the guest
//! enforces permissions), keeping what the host cannot as metadata (`disk`).
//!
//! Entries are nodes named by (parent node, name); a node's upper path follows from its
//! parents, so renaming a directory moves its whole subtree. Image entries are read through the
//! [`ImageFs`] in this process (no second FUSE hop); the first write copies a file up.
//!
//! Here: resolving names to nodes and their paths and attributes; `nodes` holds the node table
//! (and `journal` journals it for a worker that takes over), `ops` answers the kernel's
//! requests, `entries` makes and removes entries (whiteouts), `rename` renames them,
//! `listing` lists directories, `files` keeps upper files and their stat, `copy_up` copies
//! image files up, `image_files` reads image files for a user's mount (`through` its shared
//! mount, small ones `pushed` into the page cache), `perm` checks others' requests, `attr`
//! turns what the upper directory holds into served attributes, `disk` says how it is kept.

mod attr;
mod copy_up;
mod disk;
mod entries;
mod files;
mod image_files;
mod journal;
mod listing;
mod nodes;
mod ops;
mod pages;
mod perm;
mod pushed;
mod rename;
mod through;
mod watch;
pub use through::Through;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{Errno, FileAttr, FileType, RenameFlags, Request, TimeOrNow};

use crate::fs::ImageFs;
use crate::index::EntryKind;
use crate::tree::{NodeData, ROOT_INO};
use attr::{attr_from, name_max, set_times, stat_from_attr};
use disk::Stat;
use nodes::{push, Node, State, StateGuard};
use perm::Caller;

/// Everything changes through this mount and the kernel applies each change it sends to its
/// own caches (entries, attributes, pages), so they may be kept as long as the image's.
const TTL: Duration = Duration::from_secs(24 * 3600);
const COPY_CHUNK: u32 = 1 << 20;
/// Upper files kept open (well under the usual 1024-descriptor limit).
const OPEN_FILES: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(256) {
    Some(n) => n,
    None => unreachable!(),
};

/// A directory's merged entries, `.` and `..` first.
type Listing = Arc<Vec<(u64, FileType, OsString)>>;

/// The writable filesystem. Requests that copy an image file's bytes up run on threads of its
/// own, which hold this.
pub struct UpperFs(Arc<Upper>);

impl std::ops::Deref for UpperFs {
    type Target = Upper;
    fn deref(&self) -> &Upper {
        &self.0
    }
}

/// What [`UpperFs`] serves from, shared with its copy threads.
pub struct Upper {
    lower: ImageFs,
    root: PathBuf,
    /// Shared only with the tests, which count nodes while the session has the filesystem.
    state: Arc<Mutex<State>>,
    /// Upper files by node, open: files are not opened through FUSE (the kernel sends no
    /// open when the filesystem declines them), so reads and writes find them here.
    files: Mutex<lru::LruCache<u64, Arc<File>>>,
    /// The kernel takes "no open" (FUSE_NO_OPEN_SUPPORT): one round trip less per open and
    /// none at close. Older kernels open, and get a handle-less answer.
    no_open: std::sync::atomic::AtomicBool,
    /// What the kernel offered at FUSE_INIT (a worker that takes over replays it).
    offered: Arc<std::sync::atomic::AtomicU64>,
    /// Listings being read (directories are not opened: the kernel sends readdir with the
    /// offset reached, and caches what it got); dropped whenever a name changes.
    listings: Mutex<HashMap<u64, Listing>>,
    /// The longest name the upper directory's filesystem takes (a whiteout is 4 bytes longer
    /// than the name it hides).
    name_max: usize,
    /// Threads for requests that copy an image file's bytes up: the bytes may have to be
    /// fetched, and no FUSE worker waits for the network.
    copiers: crate::fs::JobThreads,
    /// One lock per node being copied up on those threads (a second request for the node
    /// waits there, never under the state lock).
    copying: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    /// Copies of image files' bytes made without the state lock, by node: (image inode, the
    /// copy, a hidden name in the upper root). Copy-up publishes one instead of copying.
    staged: Mutex<HashMap<u64, (u64, PathBuf)>>,
    /// The mount's owner (this process's user): its requests are never checked, as its guest
    /// checks permissions itself. Anyone else's are (see `perm`).
    owner: u32,
    /// Whether users other than the owner reach the mount (`allow_other`): opens then come
    /// through, so they can be checked (with "no open" the kernel sends none).
    others: bool,
    /// The image's shared mount, which unmodified image files are read through (their pages
    /// are cached there, once for all of the user's mounts).
    through: Option<Through>,
    /// The pages this mount keeps of files read through (dropped as they are read).
    pages: pages::Pages,
    /// Small image files' bytes put into the kernel's cache at open.
    pushed: Arc<pushed::Pushed>,
}

/// Copies waiting for the network at once; more queue (each wait has its deadline).
const COPY_THREADS: usize = 4;

/// Image files of at most this many bytes are put into the kernel's cache as they are opened
/// (`pushed`): those this mount reads itself rather than through the shared mount.
const PUSH_MAX: u64 = through::THROUGH_MIN;

/// Whether `upper` is an upper directory a user's writable mount kept (bux-fuse marks its root
/// with its served stat; a kernel overlay's upper directory never has it).
pub fn kept_by_bux_fuse(upper: &Path) -> bool {
    matches!(
        disk::get_xattr(upper, disk::STAT_XATTR.as_bytes()),
        Ok(Some(_))
    )
}

fn err(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

type Res<T> = Result<T, Errno>;

impl UpperFs {
    /// Serves `lower` with changes kept in `upper` (created if missing).
    pub fn new(lower: ImageFs, upper: &Path) -> std::io::Result<UpperFs> {
        UpperFs::open(lower, upper, None)
    }

    /// As [`UpperFs::new`], journalling its nodes at `journal` (see `journal`): a worker
    /// started with [`UpperFs::taking_over`] can then serve the mount if this process dies.
    pub fn journalled(lower: ImageFs, upper: &Path, journal: &Path) -> std::io::Result<UpperFs> {
        UpperFs::open(lower, upper, Some((journal, false)))
    }

    /// Serves the mount a process that died served from `upper`, with the nodes of its
    /// `journal` (which goes on being kept).
    pub fn taking_over(lower: ImageFs, upper: &Path, journal: &Path) -> std::io::Result<UpperFs> {
        UpperFs::open(lower, upper, Some((journal, true)))
    }

    fn open(
        lower: ImageFs,
        upper: &Path,
        journal: Option<(&Path, bool)>,
    ) -> std::io::Result<UpperFs> {
        disk::create_dir(upper, true)?;
        // Owner-only, as everything in it (made so by older versions, too).
        std::fs::set_permissions(upper, std::fs::Permissions::from_mode(disk::DIR_MODE))?;
        let pages = pages::Pages::new();
        let fs = Upper {
            root: upper.to_path_buf(),
            state: Arc::new(Mutex::new(State {
                nodes: HashMap::from([(
                    ROOT_INO,
                    Node {
                        links: vec![(ROOT_INO, Vec::new())],
                        lower: Some(ROOT_INO),
                        upper: true,
                        lookups: 0,
                        shared: false,
                    },
                )]),
                next: ROOT_INO + 1,
                names: HashMap::new(),
                by_lower: HashMap::new(),
                by_upper: HashMap::new(),
                dir_fds: Default::default(),
                dirty: Vec::new(),
                journal: None,
                stale: HashMap::new(),
            })),
            lower,
            files: Mutex::new(lru::LruCache::new(OPEN_FILES)),
            no_open: false.into(),
            offered: Default::default(),
            listings: Mutex::new(HashMap::new()),
            name_max: name_max(upper)?,
            copiers: crate::fs::JobThreads::new("copy-up", COPY_THREADS),
            copying: Mutex::new(HashMap::new()),
            staged: Mutex::new(HashMap::new()),
            // SAFETY: geteuid has no preconditions.
            owner: unsafe { libc::geteuid() },
            others: false,
            through: None,
            pushed: Arc::new(pushed::Pushed::new(pages.slot(), 1)),
            pages,
        };
        let mut live_orphans = std::collections::HashSet::new();
        match journal {
            Some((path, true)) => {
                let mut st = fs.state.lock().unwrap_or_else(|p| p.into_inner());
                fs.take_over(&mut st, journal::replay(path)?)?;
                for (n, node) in &st.nodes {
                    if let Some((ROOT_INO, name)) = node.links.first() {
                        if name[..] == *orphan_name(*n).as_bytes() {
                            live_orphans.insert(name.clone());
                        }
                    }
                }
                // Compacted; else (the disk full, say) appended to as it is.
                let nodes = st.nodes.iter().map(|(n, v)| (*n, v));
                st.journal = Some(match journal::Journal::rewrite(path, nodes) {
                    Ok(j) => {
                        st.dirty.clear();
                        j
                    }
                    Err(e) => {
                        tracing::warn!("compacting the node journal: {e}");
                        journal::Journal::append_to(path)?
                    }
                });
                st.write_journal();
            }
            Some((path, false)) => {
                fs.state.lock().unwrap_or_else(|p| p.into_inner()).journal =
                    Some(journal::Journal::create(path)?);
            }
            None => {}
        }
        // Orphans of a mount that ended without the kernel forgetting them (not those of the
        // one taken over, still open), copies it had not published, and directories a rename
        // it did not finish had replaced.
        for e in std::fs::read_dir(upper)?.flatten() {
            let name = e.file_name();
            let orphan = name
                .as_bytes()
                .strip_prefix(disk::WHITEOUT_PREFIX)
                .is_some_and(|n| n.starts_with(ORPHAN.as_bytes()) || n.starts_with(STAGED))
                && !live_orphans.contains(name.as_bytes());
            if orphan {
                std::fs::remove_file(e.path())?;
            }
            let replaced = name
                .as_bytes()
                .strip_prefix(disk::WHITEOUT_PREFIX)
                .is_some_and(|n| n.starts_with(REPLACED.as_bytes()));
            if replaced {
                std::fs::remove_dir_all(e.path())?;
            }
        }
        // The root shows the image root's owner and mode until changed.
        if disk::get_xattr(upper, disk::STAT_XATTR.as_bytes())?.is_none() {
            if let Some(a) = fs.lower.lower_attr(ROOT_INO, ROOT_INO) {
                let s = stat_from_attr(&a);
                disk::set_xattr(upper, disk::STAT_XATTR.as_bytes(), s.encode().as_bytes(), 0)?;
            }
        }
        Ok(UpperFs(Arc::new(fs)))
    }

    /// Lets users other than the owner use the mount (it is mounted `allow_other`): their
    /// requests are checked as a kernel checks a local filesystem's, opens included.
    pub fn serving_others(mut self, others: bool) -> UpperFs {
        if let Some(fs) = Arc::get_mut(&mut self.0) {
            fs.others = others;
        }
        self
    }

    /// What the kernel offered at FUSE_INIT, once it has (for a worker that takes over).
    pub fn offered_capabilities(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.offered.clone()
    }

    /// Served by `workers` FUSE workers: small image files' bytes are pushed into the
    /// kernel's cache as they are opened if there are two or more (see `pushed`).
    pub fn with_workers(mut self, workers: usize) -> UpperFs {
        if let Some(fs) = Arc::get_mut(&mut self.0) {
            fs.pushed = Arc::new(pushed::Pushed::new(fs.pages.slot(), workers));
        }
        self
    }

    /// Reads unmodified image files through the image's shared mount ([`Through`]).
    pub fn reading_through(mut self, through: Through) -> UpperFs {
        if let Some(fs) = Arc::get_mut(&mut self.0) {
            fs.through = Some(through);
        }
        self
    }

    /// Where the session's notifier goes once the session is made: with it, files read
    /// through the shared mount are cached here while open, their pages dropped as they are
    /// read (`pages`); without it they are opened with direct I/O.
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.pages.slot()
    }

    /// Whether copying node `n` up copies bytes of an image file (which may have to be
    /// fetched): then the request runs through [`UpperFs::copy_then`].
    fn copies_bytes(&self, n: u64) -> bool {
        let st = self.state();
        matches!(self.image_inode(&st, n), Ok(Some(i)) if i.size > 0
            && matches!(i.data, NodeData::File { .. } | NodeData::Sparse { .. }))
    }

    /// Runs `job` on a copy thread, not on this FUSE worker.
    fn on_copy_thread(&self, job: impl FnOnce(&Upper) + Send + 'static) {
        let fs = self.0.clone();
        self.copiers.run(move || job(&fs));
    }

    /// Runs `job` for a request that may change node `n`'s bytes (`changes`: its image bytes
    /// are pushed no more, see `pushed`) and, if `copies`, needs them copied first (see
    /// [`UpperFs::copy_then`], whose outcome `job` gets). Here on this FUSE worker unless it
    /// would wait: for the copy, or for a push of the node under way.
    fn changing(
        &self,
        n: u64,
        changes: bool,
        copies: bool,
        job: impl FnOnce(&Upper, Res<()>) + Send + 'static,
    ) {
        let stopped = changes.then(|| self.pushed.try_stop(n));
        if copies {
            return self.copy_then(n, move |fs, staged| {
                let _stopped = stopped.map(|s| s.unwrap_or_else(|()| fs.pushed.stop(n)));
                job(fs, staged)
            });
        }
        match stopped {
            Some(Err(())) => self.on_copy_thread(move |fs| {
                let _stopped = fs.pushed.stop(n);
                job(fs, Ok(()))
            }),
            _stopped => job(self, Ok(())),
        }
    }

    /// Runs `job` on a copy thread once node `n`'s image bytes are copied beside the upper
    /// directory (see [`Upper::stage`]) — not on this FUSE worker, nor under the state lock,
    /// so a copy waiting for the network holds up no other request. `job` gets how the copy
    /// went; its copy-up of `n` publishes the copy.
    fn copy_then(&self, n: u64, job: impl FnOnce(&Upper, Res<()>) + Send + 'static) {
        self.on_copy_thread(move |fs| {
            let lock = {
                let mut copying = fs.copying.lock().unwrap_or_else(|p| p.into_inner());
                copying.retain(|_, l| Arc::strong_count(l) > 1);
                copying.entry(n).or_default().clone()
            };
            let _one_at_a_time = lock.lock().unwrap_or_else(|p| p.into_inner());
            let staged = fs.stage(n);
            job(fs, staged);
            // A copy the job did not publish (it failed, or the node went).
            let left = fs
                .staged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&n);
            if let Some((_, tmp)) = left {
                let _ = disk::clear(&tmp);
            }
        });
    }
}

impl Upper {
    fn state(&self) -> StateGuard<'_> {
        StateGuard(self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The upper path of node `n` (relative names joined under the upper root). A guest's
    /// path may be as long as the host's PATH_MAX, which the upper root's own path would push
    /// past: a long one goes through a descriptor of its directory
    /// (`/proc/self/fd/N/name`).
    fn path(&self, st: &State, n: u64) -> Res<PathBuf> {
        let p = self.full_path(st, n)?;
        if p.as_os_str().len() <= LONG_PATH || n == ROOT_INO {
            return Ok(p);
        }
        let (parent, name) = self.node(st, n)?.links.first().ok_or(Errno::ENOENT)?;
        Ok(self
            .dir_handle(st, *parent, p.parent())?
            .join(OsStr::from_bytes(name)))
    }

    /// A short path of upper directory node `d` (whose full path is `full` if known): through
    /// a descriptor kept in [`State::dir_fds`].
    fn dir_handle(&self, st: &State, d: u64, full: Option<&Path>) -> Res<PathBuf> {
        let through = |fd: &std::os::fd::OwnedFd| {
            use std::os::fd::AsRawFd;
            PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        };
        if let Some(fd) = st.dir_fds.borrow().get(&d) {
            return Ok(through(fd));
        }
        let p = self.path(st, d)?;
        if !self.node(st, d)?.upper {
            // Not there to open: the long path, refused by the host.
            return Ok(full.map_or(p, Path::to_path_buf));
        }
        if st.dir_fds.borrow().len() >= DIR_FDS {
            // Too many kept: its path through the nearest directory kept above it, which
            // is as short as the host takes unless that one is a PATH_MAX away.
            return Ok(p);
        }
        let fd = disk::open_dir_path(&p).map_err(err)?;
        let short = through(&fd);
        st.dir_fds.borrow_mut().insert(d, fd);
        Ok(short)
    }

    /// The upper path of node `n`, however long.
    fn full_path(&self, st: &State, mut n: u64) -> Res<PathBuf> {
        let mut names = Vec::new();
        while n != ROOT_INO {
            let node = st.nodes.get(&n).ok_or(Errno::ENOENT)?;
            let (parent, name) = node.links.first().ok_or(Errno::ENOENT)?;
            names.push(name.as_slice());
            n = *parent;
        }
        let mut p = self.root.clone();
        for name in names.iter().rev() {
            p.push(OsStr::from_bytes(name));
        }
        Ok(p)
    }

    fn node<'a>(&self, st: &'a State, n: u64) -> Res<&'a Node> {
        st.nodes.get(&n).ok_or(Errno::ENOENT)
    }

    /// Whether the image shows `name` in directory node `parent` (hidden or not by the upper).
    fn lower_child(&self, st: &State, parent: u64, name: &[u8]) -> Option<u64> {
        let p = self.node(st, parent).ok()?;
        self.lower.tree().lookup(p.lower?, name)
    }

    /// Resolves `name` in directory `parent` to a node, creating it on first sight.
    fn child(&self, st: &mut State, parent: u64, name: &[u8]) -> Res<Option<u64>> {
        if let Some(&n) = st.names.get(&(parent, name.to_vec())) {
            return Ok(Some(n));
        }
        if disk::is_reserved(name) {
            return Ok(None);
        }
        let p = self.node(st, parent)?;
        let (p_upper, p_lower) = (p.upper, p.lower);
        let mut upper_md = None;
        if p_upper {
            let dir = self.path(st, parent)?;
            let at = dir.join(OsStr::from_bytes(name));
            match std::fs::symlink_metadata(&at) {
                Ok(md) => upper_md = Some((at, md)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if dir.join(disk::whiteout_name(name)).exists()
                        || dir.join(disk::OPAQUE).exists()
                    {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(err(e)),
            }
        }
        let image = p_lower.and_then(|d| self.lower.tree().lookup(d, name));
        let from_image = upper_md.is_none();
        let id = match upper_md {
            Some((at, md)) => {
                let lower = if md.is_dir() {
                    self.merged_lower(&at, image)
                } else {
                    None
                };
                match st.by_upper.get(&md.ino()) {
                    Some(&n) if !md.is_dir() => n,
                    _ => {
                        let n = push(st, lower, true);
                        if !md.is_dir() && md.nlink() > 1 {
                            st.by_upper.insert(md.ino(), n);
                            st.at(n)?.shared = true;
                        }
                        n
                    }
                }
            }
            None => {
                let Some(ino) = image else { return Ok(None) };
                let i = self.lower.tree().inode(ino).ok_or(Errno::EIO)?;
                match st.by_lower.get(&ino) {
                    Some(&n) if i.kind != EntryKind::Dir => n,
                    _ => {
                        let n = push(st, Some(ino), false);
                        if i.kind != EntryKind::Dir && i.nlink > 1 {
                            st.by_lower.insert(ino, n);
                            st.at(n)?.shared = true;
                        }
                        n
                    }
                }
            }
        };
        st.at(id)?.links.push((parent, name.to_vec()));
        st.names.insert((parent, name.to_vec()), id);
        // A hardlink of an image file copied up earlier in this mount: link it here too.
        if from_image && st.at(id)?.upper {
            let from = self.path(st, id)?;
            self.copy_up(st, parent)?;
            let to = self.path(st, parent)?.join(OsStr::from_bytes(name));
            std::fs::hard_link(from, to).map_err(err)?;
        }
        Ok(Some(id))
    }

    /// The image directory whose entries merge into the upper directory `at`.
    fn merged_lower(&self, at: &Path, same_name: Option<u64>) -> Option<u64> {
        if let Ok(Some(from)) = disk::get_xattr(at, disk::REDIRECT_XATTR.as_bytes()) {
            return self.lower.tree().resolve(&from);
        }
        if at.join(disk::OPAQUE).exists() {
            return None;
        }
        same_name.filter(|&i| {
            self.lower
                .tree()
                .inode(i)
                .is_some_and(|i| i.kind == EntryKind::Dir)
        })
    }

    /// The image inode node `n` shows, when it has no upper entry (`None` when it has).
    fn image_inode(&self, st: &State, n: u64) -> Res<Option<crate::tree::Inode<'_>>> {
        let node = self.node(st, n)?;
        if node.upper {
            return Ok(None);
        }
        let ino = node.lower.ok_or(Errno::EIO)?;
        self.lower.tree().inode(ino).map(Some).ok_or(Errno::EIO)
    }

    fn attr(&self, st: &State, n: u64) -> Res<FileAttr> {
        let node = self.node(st, n)?;
        let mut a = if !node.upper {
            let ino = node.lower.ok_or(Errno::ENOENT)?;
            self.lower.lower_attr(ino, n).ok_or(Errno::EIO)?
        } else {
            let path = self.path(st, n)?;
            let md = std::fs::symlink_metadata(&path).map_err(err)?;
            attr_from(n, &md, disk::stat_of(&path, &md))
        };
        // Every name removed (open files keep it, the upper file under a hidden name): no
        // link left, as fstat(2) of an unlinked file says. The hidden name is no link.
        let hidden = |name: &[u8]| name == orphan_name(n).as_bytes();
        match &node.links[..] {
            [] => a.nlink = 0,
            [(ROOT_INO, name), ..] if hidden(name) => a.nlink = a.nlink.saturating_sub(1),
            _ => {}
        }
        Ok(a)
    }
}

/// Where an upper file whose last name was removed waits until the kernel forgets it (a
/// hidden name in the upper root).
fn orphan_name(n: u64) -> OsString {
    disk::whiteout_name(format!("{ORPHAN}{n}").as_bytes())
}

// Hidden names below all start with ".bux-fuse-", which new entries may not take
// (`disk::is_refused_for_new`): their whiteouts are these files.
const ORPHAN: &str = ".bux-fuse-orphan-";
/// Upper paths longer than this go through a directory descriptor (the host's PATH_MAX is
/// 4096, and a guest's path of up to that much is joined to the upper root's).
const LONG_PATH: usize = 2048;
/// Directory descriptors kept for long paths, at most (well under the usual 1024-descriptor
/// limit, with [`OPEN_FILES`]).
const DIR_FDS: usize = 256;
/// Where a directory a rename replaced waits until the rename is done (a hidden name in the
/// upper root, followed by the node number).
const REPLACED: &str = ".bux-fuse-replaced-";
/// Temporary names (hidden: whiteout names of these) of entries being made.
const COPY_UP_TMP: &[u8] = b".bux-fuse-copy-up";
/// Copies of image files' bytes made outside the state lock (hidden names in the upper root,
/// followed by the node number).
const STAGED: &[u8] = b".bux-fuse-staged-";
const NEW_TMP: &[u8] = b".bux-fuse-new";

trait FromVecBytes {
    fn from_vec_bytes(v: Vec<u8>) -> OsString;
}

impl FromVecBytes for OsString {
    fn from_vec_bytes(v: Vec<u8>) -> OsString {
        use std::os::unix::ffi::OsStringExt;
        OsString::from_vec(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::EntryKind;
    use crate::tree::test_support::{entry, merged};

    /// An image of these entries, its bytes nowhere (the tests read none of them).
    fn image_of(entries: &[(&str, EntryKind)]) -> ImageFs {
        let tree = merged(&[entries.iter().map(|&(p, k)| entry(p, k)).collect()]).unwrap();
        ImageFs::new(tree, Vec::new(), Arc::new(crate::index::SpanCache::new(0)))
    }

    /// Files made and removed over and over leave no nodes behind once the kernel forgets them
    /// (the daemon's memory stays flat however long the guest runs).
    #[test]
    fn forgotten_unlinked_nodes_are_dropped() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let image = image_of(&[("etc", EntryKind::Dir), ("etc/hosts", EntryKind::File)]);
        let (upper, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let fs = UpperFs::new(image, &upper.path().join("upper")).unwrap();
        let state = fs.state.clone();
        let nodes = || state.lock().unwrap().nodes.len();
        let session = fuser::spawn_mount(fs, mnt.path(), &fuser::Config::default()).unwrap();
        let etc = mnt.path().join("etc");
        for i in 0..2000 {
            let f = etc.join(format!("f{i}"));
            std::fs::write(&f, b"x").unwrap();
            std::fs::remove_file(&f).unwrap();
            // A directory made and removed, and an image file deleted and made again.
            if i % 100 == 0 {
                std::fs::create_dir(etc.join("d")).unwrap();
                std::fs::remove_dir(etc.join("d")).unwrap();
                std::fs::remove_file(etc.join("hosts")).unwrap();
                std::fs::write(etc.join("hosts"), b"h").unwrap();
            }
        }
        // Their files go too (an unlinked file waits under a hidden name until forgotten).
        let left = || -> Vec<_> {
            std::fs::read_dir(upper.path().join("upper"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect()
        };
        // The kernel sends its forgets in the background, the last one's maybe after the
        // node count is already low: wait for both.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (nodes() > 10 || left() != ["etc"]) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            nodes() <= 10,
            "{} nodes after 2000 files came and went",
            nodes()
        );
        assert_eq!(std::fs::read(etc.join("hosts")).unwrap(), b"h");
        let left = left();
        assert_eq!(left, ["etc"], "{left:?}");
        drop(session);
    }

    /// A rename replaces a file that is still open (which keeps its bytes) and a directory
    /// that is empty though its upper directory is not (whiteouts), leaving nothing aside.
    #[test]
    fn a_rename_replaces_open_files_and_emptied_directories() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let image = image_of(&[
            ("srv", EntryKind::Dir),
            ("srv/d", EntryKind::Dir),
            ("srv/d/f", EntryKind::File),
        ]);
        let (t, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let upper = t.path().join("upper");
        let fs = UpperFs::new(image, &upper).unwrap();
        let session = fuser::spawn_mount(fs, mnt.path(), &fuser::Config::default()).unwrap();
        let srv = mnt.path().join("srv");
        std::fs::remove_file(srv.join("d/f")).unwrap();
        std::fs::create_dir(srv.join("e")).unwrap();
        std::fs::write(srv.join("e/g"), b"g").unwrap();
        std::fs::rename(srv.join("e"), srv.join("d")).unwrap();
        let names: Vec<_> = std::fs::read_dir(srv.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["g"]);
        assert!(!srv.join("e").exists());
        std::fs::write(srv.join("x"), b"x").unwrap();
        std::fs::write(srv.join("y"), b"y").unwrap();
        let mut open = std::fs::File::open(srv.join("y")).unwrap();
        std::fs::rename(srv.join("x"), srv.join("y")).unwrap();
        let mut kept = String::new();
        std::io::Read::read_to_string(&mut open, &mut kept).unwrap();
        assert_eq!(kept, "y");
        assert_eq!(std::fs::read(srv.join("y")).unwrap(), b"x");
        assert!(!srv.join("x").exists());
        drop(open);
        drop(session);
        let leftovers: Vec<_> = std::fs::read_dir(&upper)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.as_bytes().starts_with(b".wh..bux-fuse-replaced"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// A tmpfs mounted on `dir` for as long as this lives.
    struct Tmpfs<'a>(&'a Path);

    impl<'a> Tmpfs<'a> {
        fn mount(dir: &'a Path, opts: &str) -> Self {
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
                .arg(dir)
                .status()
                .unwrap();
            assert!(st.success());
            Tmpfs(dir)
        }
    }

    impl Drop for Tmpfs<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }

    /// Makes empty files in `dir` until the filesystem has no inode left.
    fn fill_inodes(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for k in 0.. {
            if let Err(e) = std::fs::File::create(dir.join(format!("f{k}"))) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                return;
            }
        }
    }

    /// A rename that fails changes nothing: here nothing is left to make the whiteout of the
    /// source's image name with (no inode), and the file it would replace keeps its bytes, the
    /// source its name, and the image's file stays hidden.
    #[test]
    fn a_rename_that_fails_changes_nothing() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let image = image_of(&[("etc", EntryKind::Dir), ("etc/hosts", EntryKind::File)]);
        let (t, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let _tmpfs = Tmpfs::mount(t.path(), "nr_inodes=200,size=4m");
        let upper = t.path().join("upper");
        let fs = UpperFs::new(image, &upper).unwrap();
        let session = fuser::spawn_mount(fs, mnt.path(), &fuser::Config::default()).unwrap();
        let etc = mnt.path().join("etc");
        std::fs::write(etc.join("hosts"), b"new").unwrap();
        std::fs::write(etc.join("b"), b"keep").unwrap();
        fill_inodes(&t.path().join("filler"));
        let r = std::fs::rename(etc.join("hosts"), etc.join("b"));
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(std::fs::read(etc.join("b")).unwrap(), b"keep");
        assert_eq!(std::fs::read(etc.join("hosts")).unwrap(), b"new");
        drop(session);
        // On disk too (what the next mount shows).
        let mut names: Vec<_> = std::fs::read_dir(upper.join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["b", "hosts"]);
        assert_eq!(std::fs::read(upper.join("etc/b")).unwrap(), b"keep");
        assert_eq!(std::fs::read(upper.join("etc/hosts")).unwrap(), b"new");
    }
}
