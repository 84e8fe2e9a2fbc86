//! The merged tree: the layers' tables folded bottom to top with OCI whiteouts applied, then
//! frozen into a flat, persisted form that the FUSE layer serves without further work.
//!
//! Merge rules (OCI image spec, "Representing Changes"):
//! * a layer's whiteouts apply to the layers below it only, so each layer is applied in two
//!   phases: first its whiteouts (`.wh.NAME` removes NAME; `.wh..wh..opq` empties the directory),
//!   then its other entries, in tar order, the last entry for a path winning;
//! * a directory entry over an existing directory changes its metadata and keeps its children;
//!   any other entry over an existing one replaces it (file ↔ directory, symlink → directory);
//! * parents with no entry of their own are created as `0755 root:root` directories;
//! * a hardlink names an existing non-directory in the tree (this layer or below) and shares its
//!   inode; entries beneath a file are refused;
//! * entries beneath a symlink land where the symlink leads, resolved inside the root (an
//!   absolute target starts at the root, `..` stops there), as containerd and moby unpack them.
//!
//! Frozen form: inodes are numbered in breadth-first order from the root (1) with children in
//! name order, so numbers are stable across remounts; each directory's entries are a contiguous,
//! sorted run of [`Dirent`]s, so a readdir offset is an index and lookups are binary searches.

use crate::index::{EntryKind, LayerSource, TarEntry};
use crate::{Digest, Error, Result};
use std::collections::BTreeMap;
use std::collections::VecDeque;

pub mod erofs;
mod flat;
pub(crate) use flat::of_another_version;
pub use flat::{Dirent, Dirents, Extents, Inode, NodeData, Tree, Xattrs, ROOT_INO};
use flat::{NewData, NewInode, Writer};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Mode of directories that have no tar entry of their own.
const IMPLIED_DIR_MODE: u32 = 0o755;
/// Deepest path accepted, in components: Linux's PATH_MAX (4096 bytes) cannot name anything
/// deeper (`a/` per level), so no real image has one, and a hostile one costs nothing.
pub const MAX_DEPTH: usize = 2048;

// ---------------------------------------------------------------------------------------------
// Building

#[derive(Debug, Clone)]
struct Node {
    meta: TarEntry,
    layer: u32,
    children: BTreeMap<Vec<u8>, usize>,
}

struct Builder {
    nodes: Vec<Node>,
}

/// Where a walk through the tree's directories ended.
enum Walk {
    /// At this directory.
    Dir(usize),
    /// This directory has no entry of that name.
    Missing(usize, Vec<u8>),
    /// A component is not a directory (nor a symlink to one).
    NotDir(String),
}

/// Symlinks followed in one path before giving up (Linux's limit).
const MAX_SYMLINKS: usize = 40;

fn implied_dir() -> TarEntry {
    TarEntry {
        path: Vec::new(),
        kind: EntryKind::Dir,
        mode: IMPLIED_DIR_MODE,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        size: 0,
        link: Vec::new(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: Vec::new(),
        offset: 0,
        sparse: None,
    }
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

impl Builder {
    fn new() -> Builder {
        Builder {
            nodes: vec![Node {
                meta: implied_dir(),
                layer: 0,
                children: BTreeMap::new(),
            }],
        }
    }

    /// The node at `path`. Symlinks among its parents are followed within the root (as
    /// containerd and moby unpack layers); the last component is not.
    fn find(&self, path: &[u8]) -> Option<usize> {
        let (parent, name) = split_parent(path);
        if name.is_empty() {
            return Some(0);
        }
        match self.walk_dirs(parent) {
            Walk::Dir(dir) => self.nodes[dir].children.get(name).copied(),
            _ => None,
        }
    }

    /// The directory at `path`, creating missing ones (implied directories, 0755, of this
    /// layer); errors if a component is not a directory.
    fn dir_for_add(&mut self, path: &[u8], layer: u32) -> std::result::Result<usize, String> {
        loop {
            match self.walk_dirs(path) {
                Walk::Dir(dir) => return Ok(dir),
                Walk::NotDir(why) => return Err(why),
                // A directory a symlink's target names, implied by an entry beneath the link:
                // the same rule as for the entry's own path.
                Walk::Missing(_, name) if name.starts_with(WHITEOUT_PREFIX) => {
                    return Err("a whiteout name used as a directory (through a symlink)".into());
                }
                Walk::Missing(parent, name) => {
                    // Nodes are found through their parents' child maps: an implied directory
                    // stores no path (a copy per level would cost the square of the depth).
                    self.nodes.push(Node {
                        meta: implied_dir(),
                        layer,
                        children: BTreeMap::new(),
                    });
                    let n = self.nodes.len() - 1;
                    self.nodes[parent].children.insert(name, n);
                }
            }
        }
    }

    /// Walks `path` from the root through directories, following symlinks *within the root*:
    /// a target is resolved against the link's directory (or the root, if absolute) and `..`
    /// stops at the root, so nothing leads outside (the rules of Go's securejoin, which
    /// containerd and moby use when they unpack a layer over `lib -> usr/lib`).
    fn walk_dirs(&self, path: &[u8]) -> Walk {
        let mut pending: VecDeque<Vec<u8>> = components(path).map(<[u8]>::to_vec).collect();
        let mut cur = 0;
        let mut walked: Vec<Vec<u8>> = Vec::new();
        let mut links = 0;
        while let Some(comp) = pending.pop_front() {
            let Some(&next) = self.nodes[cur].children.get(&comp) else {
                return Walk::Missing(cur, comp);
            };
            match self.nodes[next].meta.kind {
                EntryKind::Dir => {
                    cur = next;
                    walked.push(comp);
                }
                EntryKind::Symlink => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Walk::NotDir("too many levels of symlinks".into());
                    }
                    let target = &self.nodes[next].meta.link;
                    let mut base = if target.starts_with(b"/") {
                        Vec::new()
                    } else {
                        walked.clone()
                    };
                    for c in target.split(|&b| b == b'/') {
                        match c {
                            b"" | b"." => {}
                            b".." => {
                                base.pop();
                            }
                            c => base.push(c.to_vec()),
                        }
                    }
                    base.extend(pending.drain(..));
                    pending = base.into();
                    cur = 0;
                    walked.clear();
                }
                _ => {
                    walked.push(comp);
                    return Walk::NotDir(format!(
                        "parent {:?} is not a directory",
                        String::from_utf8_lossy(&walked.join(&b'/'))
                    ));
                }
            }
        }
        Walk::Dir(cur)
    }

    fn apply_whiteout(&mut self, entry: &TarEntry, layer: Digest) -> Result<()> {
        let (parent, name) = split_parent(&entry.path);
        let target = &name[WHITEOUT_PREFIX.len()..];
        let opaque = name == OPAQUE_MARKER;
        if !opaque && target.starts_with(WHITEOUT_PREFIX) {
            return Ok(()); // AUFS metadata (.wh..wh.plnk and the like): not a whiteout
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(Error::BadEntry {
                layer,
                path: String::from_utf8_lossy(&entry.path).into_owned(),
                detail: "whiteout of an invalid name".into(),
            });
        }
        // The directory the whiteout is in, through symlinks like any entry.
        let Walk::Dir(dir) = self.walk_dirs(parent) else {
            return Ok(()); // nothing below to hide
        };
        let children = &mut self.nodes[dir].children;
        if opaque {
            children.clear();
        } else {
            children.remove(target);
        }
        Ok(())
    }

    fn add(&mut self, entry: &TarEntry, layer_idx: u32, layer: Digest) -> Result<()> {
        let bad = |detail: String| Error::BadEntry {
            layer,
            path: String::from_utf8_lossy(&entry.path).into_owned(),
            detail,
        };
        if entry.path.is_empty() {
            if entry.kind != EntryKind::Dir {
                return Err(bad("the root must be a directory".into()));
            }
            self.nodes[0].meta = entry.clone();
            return Ok(());
        }
        let (parent, name) = split_parent(&entry.path);
        if components(parent).nth(MAX_DEPTH - 1).is_some() {
            return Err(bad(format!("deeper than {MAX_DEPTH} levels")));
        }
        if components(parent).any(|c| c.starts_with(WHITEOUT_PREFIX)) {
            return Err(bad("a whiteout name used as a directory".into()));
        }
        let dir = self.dir_for_add(parent, layer_idx).map_err(bad)?;
        let existing = self.nodes[dir].children.get(name).copied();
        let node = match entry.kind {
            EntryKind::Hardlink => {
                let target = self.find(&entry.link).ok_or_else(|| {
                    bad(format!(
                        "hardlink to {:?}, which does not exist (forward or outside the layer)",
                        String::from_utf8_lossy(&entry.link)
                    ))
                })?;
                if self.nodes[target].meta.kind == EntryKind::Dir {
                    return Err(bad("hardlink to a directory".into()));
                }
                target
            }
            EntryKind::Dir => {
                if let Some(e) = existing.filter(|&e| self.nodes[e].meta.kind == EntryKind::Dir) {
                    self.nodes[e].meta = entry.clone();
                    return Ok(());
                }
                self.push(entry, layer_idx)
            }
            _ => self.push(entry, layer_idx),
        };
        self.nodes[dir].children.insert(name.to_vec(), node);
        Ok(())
    }

    fn push(&mut self, entry: &TarEntry, layer: u32) -> usize {
        self.nodes.push(Node {
            meta: entry.clone(),
            layer,
            children: BTreeMap::new(),
        });
        self.nodes.len() - 1
    }

    fn freeze(self, layers: Vec<LayerSource>) -> Result<Tree> {
        // Breadth-first numbering from the root; a hardlinked node keeps its first number.
        let mut ino_of: Vec<u64> = vec![0; self.nodes.len()];
        let mut order: Vec<usize> = Vec::new();
        let mut parent_of: Vec<u64> = Vec::new();
        let mut queue = VecDeque::from([(0usize, ROOT_INO)]);
        ino_of[0] = ROOT_INO;
        order.push(0);
        parent_of.push(ROOT_INO);
        let mut links: Vec<u32> = vec![0; self.nodes.len()];
        while let Some((n, ino)) = queue.pop_front() {
            for &child in self.nodes[n].children.values() {
                links[child] += 1;
                if ino_of[child] == 0 {
                    order.push(child);
                    parent_of.push(ino);
                    ino_of[child] = order.len() as u64;
                    if self.nodes[child].meta.kind == EntryKind::Dir {
                        queue.push_back((child, ino_of[child]));
                    }
                }
            }
        }
        let mut w = Writer::default();
        for (i, &n) in order.iter().enumerate() {
            let node = &self.nodes[n];
            let m = &node.meta;
            let (data, size, nlink) = match m.kind {
                EntryKind::Dir => {
                    let subdirs = node
                        .children
                        .values()
                        .filter(|&&c| self.nodes[c].meta.kind == EntryKind::Dir)
                        .count() as u32;
                    let entries = node
                        .children
                        .iter()
                        .map(|(name, &child)| (name.as_slice(), ino_of[child]))
                        .collect();
                    (NewData::Dir(entries), 4096, 2 + subdirs)
                }
                EntryKind::Symlink => (NewData::Symlink(&m.link), m.link.len() as u64, links[n]),
                EntryKind::File if m.sparse.is_some() => (
                    NewData::Sparse {
                        layer: node.layer,
                        extents: m.sparse.as_deref().unwrap_or_default(),
                    },
                    m.size,
                    links[n],
                ),
                EntryKind::File if m.size > 0 => (
                    NewData::File {
                        layer: node.layer,
                        offset: m.offset,
                    },
                    m.size,
                    links[n],
                ),
                _ => (NewData::None, 0, links[n]),
            };
            let mut xattrs = m.xattrs.clone();
            xattrs.sort();
            w.inode(NewInode {
                kind: m.kind,
                mode: m.mode,
                uid: m.uid,
                gid: m.gid,
                mtime: m.mtime,
                mtime_nsec: m.mtime_nsec,
                size,
                nlink: nlink.max(1),
                dev_major: m.dev_major,
                dev_minor: m.dev_minor,
                parent: parent_of[i],
                data,
                xattrs: &xattrs,
            });
        }
        w.finish(layers)
    }
}

fn is_whiteout(path: &[u8]) -> bool {
    split_parent(path).1.starts_with(WHITEOUT_PREFIX)
}

/// Folds layers (bottom first) into one tree.
pub fn merge<'a>(layers: impl IntoIterator<Item = (LayerSource, &'a [TarEntry])>) -> Result<Tree> {
    let mut b = Builder::new();
    let mut sources = Vec::new();
    for (idx, (source, entries)) in layers.into_iter().enumerate() {
        let digest = source.digest;
        for e in entries.iter().filter(|e| is_whiteout(&e.path)) {
            b.apply_whiteout(e, digest)?;
        }
        for e in entries.iter().filter(|e| !is_whiteout(&e.path)) {
            b.add(e, idx as u32, digest)?;
        }
        sources.push(source);
    }
    b.freeze(sources)
}

// ---------------------------------------------------------------------------------------------
// Reading

impl Tree {
    /// The inode named `name` in directory `dir`.
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Option<u64> {
        self.children(dir).find(name).map(|d| d.ino)
    }

    /// Every (directory, name) that names inode `ino` (a scan of all entries: for hardlinks).
    pub fn links_of(&self, ino: u64) -> Vec<(u64, Vec<u8>)> {
        (1..=self.inode_count())
            .flat_map(|dir| {
                self.children(dir)
                    .iter()
                    .filter(move |d| d.ino == ino && dir != ino)
                    .map(move |d| (dir, d.name.to_vec()))
            })
            .collect()
    }

    /// The `/`-separated path of directory `ino` from the root (`/` for the root).
    pub fn path_of(&self, mut ino: u64) -> Option<Vec<u8>> {
        let mut names = Vec::new();
        while ino != ROOT_INO {
            if names.len() > MAX_DEPTH {
                return None; // a cycle: only a damaged file has one
            }
            let parent = self.inode(ino)?.parent;
            let d = self.children(parent).iter().find(|d| d.ino == ino)?;
            names.push(d.name);
            ino = parent;
        }
        let mut p = Vec::new();
        for n in names.iter().rev() {
            p.push(b'/');
            p.extend_from_slice(n);
        }
        if p.is_empty() {
            p.push(b'/');
        }
        Some(p)
    }

    /// The inode at a `/`-separated path from the root (no symlinks followed).
    pub fn resolve(&self, path: &[u8]) -> Option<u64> {
        components(path).try_fold(ROOT_INO, |dir, c| self.lookup(dir, c))
    }

    /// A canonical text listing (one line per path, depth-first, sorted), for tests and
    /// `inspect --tree`.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        let mut seen = std::collections::HashSet::from([ROOT_INO]);
        self.dump_dir(ROOT_INO, "", 0, &mut seen, &mut out);
        out
    }

    /// Each directory is listed once: a directory reached again (only a damaged file links one
    /// twice, or into itself) is not walked again, which bounds the listing by the file's size.
    fn dump_dir(
        &self,
        dir: u64,
        prefix: &str,
        depth: usize,
        seen: &mut std::collections::HashSet<u64>,
        out: &mut String,
    ) {
        if depth > MAX_DEPTH {
            return;
        }
        for d in self.children(dir).iter() {
            let path = format!("{prefix}/{}", String::from_utf8_lossy(d.name));
            let Some(i) = self.inode(d.ino) else { continue };
            let what = match &i.data {
                NodeData::Symlink(t) => format!(" -> {}", String::from_utf8_lossy(t)),
                NodeData::File { layer, .. } => format!(" size={} layer={layer}", i.size),
                NodeData::Sparse { layer, extents } => {
                    format!(" size={} layer={layer} extents={}", i.size, extents.len())
                }
                _ => String::new(),
            };
            out.push_str(&format!(
                "{path} {:?} {:o} {}:{} nlink={} ino={}{what}\n",
                i.kind, i.mode, i.uid, i.gid, i.nlink, d.ino
            ));
            if i.kind == EntryKind::Dir && seen.insert(d.ino) {
                self.dump_dir(d.ino, &path, depth + 1, seen, out);
            }
        }
    }
}

/// Entries and merged trees for the tests of the tree and of what is written from it.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// An entry of `kind` at `path`: 0755 directories, 0644 one-byte files.
    pub fn entry(path: &str, kind: EntryKind) -> TarEntry {
        TarEntry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            size: if kind == EntryKind::File { 1 } else { 0 },
            ..implied_dir()
        }
    }

    /// `layers` merged bottom first, each a plain tar layer.
    pub fn merged(layers: &[Vec<TarEntry>]) -> Result<Tree> {
        merge(layers.iter().enumerate().map(|(i, l)| {
            let source = LayerSource {
                digest: Digest::of(&[i as u8]),
                compression: crate::index::Compression::None,
                uncompressed_size: 0,
                access: crate::index::Access::Tar,
            };
            (source, l.as_slice())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{entry as e, merged};
    use super::*;

    fn f(path: &str) -> TarEntry {
        e(path, EntryKind::File)
    }
    fn d(path: &str) -> TarEntry {
        e(path, EntryKind::Dir)
    }
    fn link(path: &str, kind: EntryKind, target: &str) -> TarEntry {
        TarEntry {
            link: target.as_bytes().to_vec(),
            ..e(path, kind)
        }
    }

    fn paths(layers: &[Vec<TarEntry>]) -> Vec<String> {
        let t = merged(layers).unwrap();
        t.dump()
            .lines()
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect()
    }

    #[allow(clippy::type_complexity)] // a table of cases, spelled out
    #[test]
    fn whiteouts_and_opaque_dirs() {
        let cases: Vec<(&str, Vec<Vec<TarEntry>>, Vec<&str>)> = vec![
            (
                "file whiteout",
                vec![vec![d("a"), f("a/x"), f("a/y")], vec![f("a/.wh.x")]],
                vec!["/a", "/a/y"],
            ),
            (
                "directory whiteout removes the subtree",
                vec![vec![d("a"), d("a/b"), f("a/b/c")], vec![f("a/.wh.b")]],
                vec!["/a"],
            ),
            (
                "opaque keeps same-layer content",
                vec![
                    vec![d("a"), f("a/old")],
                    vec![d("a"), f("a/.wh..wh..opq"), f("a/new")],
                ],
                vec!["/a", "/a/new"],
            ),
            (
                "re-created after whiteout",
                vec![vec![f("x")], vec![f(".wh.x")], vec![d("x"), f("x/y")]],
                vec!["/x", "/x/y"],
            ),
            (
                "whiteout does not hide same-layer entry",
                vec![vec![f("x")], vec![f(".wh.x"), f("x")]],
                vec!["/x"],
            ),
            (
                "whiteout of missing is harmless",
                vec![vec![f("x")], vec![f("nope/.wh.y"), f(".wh.z")]],
                vec!["/x"],
            ),
            (
                "file replaced by dir and back",
                vec![
                    vec![f("p"), d("q"), f("q/r")],
                    vec![d("p"), f("p/s"), f("q")],
                ],
                vec!["/p", "/p/s", "/q"],
            ),
            (
                "implied parents",
                vec![vec![f("usr/lib/x")]],
                vec!["/usr", "/usr/lib", "/usr/lib/x"],
            ),
        ];
        for (name, layers, want) in cases {
            assert_eq!(paths(&layers), want, "{name}");
        }
    }

    #[test]
    fn hardlinks_share_an_inode() {
        let t = merged(&[vec![
            f("a"),
            link("b", EntryKind::Hardlink, "a"),
            link("c", EntryKind::Hardlink, "b"),
        ]])
        .unwrap();
        let (a, b, c) = (
            t.resolve(b"a").unwrap(),
            t.resolve(b"b").unwrap(),
            t.resolve(b"c").unwrap(),
        );
        assert!(a == b && b == c);
        assert_eq!(t.inode(a).unwrap().nlink, 3);
        // A later whiteout of one name leaves the others, with the count adjusted.
        let t = merged(&[
            vec![f("a"), link("b", EntryKind::Hardlink, "a")],
            vec![f(".wh.a")],
        ])
        .unwrap();
        assert_eq!(t.resolve(b"a"), None);
        assert_eq!(t.inode(t.resolve(b"b").unwrap()).unwrap().nlink, 1);
    }

    #[test]
    fn metadata_change_keeps_children() {
        let mut up = d("a");
        up.mode = 0o700;
        up.uid = 1000;
        let t = merged(&[vec![d("a"), f("a/x")], vec![up]]).unwrap();
        let a = t.inode(t.resolve(b"a").unwrap()).unwrap();
        assert_eq!((a.mode, a.uid), (0o700, 1000));
        assert!(t.resolve(b"a/x").is_some());
    }

    #[test]
    fn entries_beneath_symlinks_land_inside_the_root() {
        let t = merged(&[
            vec![
                d("usr"),
                d("usr/lib"),
                link("lib", EntryKind::Symlink, "usr/lib"),
            ],
            vec![
                f("lib/x/libfoo.so"),
                link("etc", EntryKind::Symlink, "/../../../real-etc"),
                f("etc/passwd"),
                link("up", EntryKind::Symlink, "../../.."),
                f("up/top"),
            ],
            vec![f("lib/.wh.x")],
        ])
        .unwrap();
        let dump = t.dump();
        assert!(t.resolve(b"lib").is_some(), "{dump}");
        // Absolute and `..`-escaping targets resolve within the root.
        assert!(t.resolve(b"real-etc/passwd").is_some(), "{dump}");
        assert!(
            t.resolve(b"etc/passwd").is_none(),
            "etc is a symlink: {dump}"
        );
        assert!(
            t.resolve(b"top").is_some(),
            "up/top belongs at the root: {dump}"
        );
        // The whiteout through the symlink removed usr/lib/x.
        assert!(t.resolve(b"usr/lib/x").is_none(), "{dump}");
        let t = merged(&[vec![
            d("usr/lib"),
            link("lib", EntryKind::Symlink, "usr/lib"),
            f("lib/y"),
        ]])
        .unwrap();
        assert!(t.resolve(b"usr/lib/y").is_some());
    }

    #[test]
    fn deep_but_legal_paths_merge() {
        let deep = format!("{}file", "d/".repeat(MAX_DEPTH - 1));
        let t = merged(&[vec![f(&deep)]]).unwrap();
        assert_eq!(t.inode_count(), MAX_DEPTH as u64 + 1);
        assert!(t.resolve(deep.as_bytes()).is_some());
    }

    #[test]
    fn refuses_what_would_escape() {
        let cases: Vec<(&str, Vec<Vec<TarEntry>>, &str)> = vec![
            (
                "symlink loop",
                vec![vec![
                    link("a", EntryKind::Symlink, "b"),
                    link("b", EntryKind::Symlink, "a"),
                    f("a/x"),
                ]],
                "too many levels of symlinks",
            ),
            (
                "beneath a file",
                vec![vec![f("x"), f("x/y")]],
                "not a directory",
            ),
            (
                "hardlink to missing",
                vec![vec![link("h", EntryKind::Hardlink, "nowhere")]],
                "does not exist",
            ),
            (
                "forward hardlink",
                vec![vec![link("h", EntryKind::Hardlink, "later"), f("later")]],
                "does not exist",
            ),
            ("whiteout of ..", vec![vec![f("a/.wh...")]], "invalid name"),
            (
                "40,000 levels deep (was 1.6 GB of implied-parent paths)",
                vec![vec![f(&"d/".repeat(40_000))]],
                "deeper than 2048 levels",
            ),
            // Found by the merge fuzzer: a whiteout name as a parent directory.
            (
                "whiteout as a directory",
                vec![vec![f(".wh..wh..opq/a")]],
                "whiteout name used as a directory",
            ),
            // Found by the merge fuzzer (30 minutes with overflow checks): the same, implied by
            // an entry beneath a symlink whose target names it.
            (
                "whiteout as a directory through a symlink",
                vec![vec![
                    link("a/b/a/b/a/b", EntryKind::Symlink, "a/b/a/b/.wh.b"),
                    f("a/b/a/b/a/b/c"),
                ]],
                "whiteout name used as a directory (through a symlink)",
            ),
        ];
        for (name, layers, want) in cases {
            let err = merged(&layers).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn inode_numbers_are_stable_and_persist() {
        let layers = vec![vec![d("b"), f("b/z"), f("a"), d("c")], vec![f("b/y")]];
        let t1 = merged(&layers).unwrap();
        let t2 = merged(&layers).unwrap();
        assert_eq!(t1.dump(), t2.dump());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tree");
        t1.save(&p).unwrap();
        let t3 = Tree::load(&p).unwrap();
        assert_eq!(t1.dump(), t3.dump());
        assert_eq!(t3.inode(ROOT_INO).unwrap().nlink, 4);
        std::fs::write(&p, b"garbage").unwrap();
        assert!(Tree::load(&p).is_err());
    }

    /// Every record kind round-trips through the file, and a damaged file never panics: cut
    /// short it is refused at open; with any byte changed it opens or is refused, reads only
    /// what its bounds allow, and fails the full check.
    #[test]
    fn flat_file_round_trips_and_damage_is_contained() {
        let mut x = f("a");
        x.xattrs = vec![
            (b"user.k".to_vec(), b"v".to_vec()),
            (b"security.c".to_vec(), vec![]),
        ];
        let mut sparse = f("s");
        sparse.size = 1 << 20;
        sparse.sparse = Some(vec![crate::index::Extent {
            file_off: 4096,
            len: 10,
            stream_off: 512,
        }]);
        let layers = vec![vec![
            d("b"),
            x,
            sparse,
            link("l", EntryKind::Symlink, "../b"),
            f("b/z"),
        ]];
        let t = merged(&layers).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tree");
        t.save(&p).unwrap();
        let back = Tree::load(&p).unwrap();
        assert_eq!(t.dump(), back.dump());
        back.verify().unwrap();
        let a = back.inode(back.resolve(b"a").unwrap()).unwrap();
        assert_eq!(a.xattrs.get(b"user.k"), Some(&b"v"[..]));
        assert_eq!(a.xattrs.iter().count(), 2);
        let s = back.inode(back.resolve(b"s").unwrap()).unwrap();
        let NodeData::Sparse { extents, .. } = s.data else {
            panic!("{s:?}")
        };
        assert_eq!(extents.get(0).unwrap().stream_off, 512);
        let l = back.inode(back.resolve(b"l").unwrap()).unwrap();
        assert_eq!(l.data, NodeData::Symlink(b"../b"));

        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        let e = Tree::load(&p).unwrap_err().to_string();
        assert!(e.contains("cut short"), "{e}");
        for at in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[at] ^= flip;
                if let Ok(t) = Tree::from_vec(b) {
                    let _ = t.dump();
                    for (ino, i) in t.inodes() {
                        let _ = (
                            t.children(ino).len(),
                            i.xattrs.iter().count(),
                            t.path_of(ino),
                        );
                    }
                    assert!(t.verify().is_err(), "byte {at} changed unnoticed");
                }
            }
        }
    }

    /// A damaged file whose directories all link back to the root (a cycle in every branch;
    /// found by the `tree_file` fuzzer as an exponential listing): walks stay bounded.
    #[test]
    fn directory_cycles_in_a_damaged_file_stay_bounded() {
        let layers = vec![vec![
            d("a"),
            d("a/b"),
            d("a/b/c"),
            f("a/b/c/x"),
            d("e"),
            d("e/f"),
        ]];
        let t = merged(&layers).unwrap();
        let mut bytes = t.as_bytes().to_vec();
        let word = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let (first, count) = (word(&bytes, 32) as usize, word(&bytes, 40) as usize);
        for k in 0..count {
            let at = first + 24 * k + 8;
            let ino = word(&bytes, at);
            if t.inode(ino).is_some_and(|i| i.kind == EntryKind::Dir) {
                bytes[at..at + 8].copy_from_slice(&ROOT_INO.to_le_bytes());
            }
        }
        let damaged = Tree::from_vec(bytes).unwrap();
        assert!(damaged.verify().is_err());
        let listing = damaged.dump();
        assert!(listing.lines().count() <= 16, "{listing}");
        for (ino, _) in damaged.inodes() {
            let _ = damaged.path_of(ino);
        }
    }
}
