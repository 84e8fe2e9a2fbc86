//! The persisted tree: fixed-size records and a string table in one file, served straight from
//! a shared memory map. A mount decodes nothing but the header and the (few) layers, so it costs
//! the same at 500 files as at 500k, and every mount of an image shares the file's pages through
//! the page cache.
//!
//! Layout (little-endian; every section 8-byte aligned, after a 160-byte header):
//!
//! | section | record |
//! |---|---|
//! | inodes  | 80 bytes: kind, data kind, mode, uid, gid, mtime, size, nlink, parent, device, data, xattr run |
//! | dirents | 24 bytes: name (string offset, length), inode; each directory's run sorted by name |
//! | xattrs  | 16 bytes: string offset, name length, value length (value follows the name) |
//! | extents | 24 bytes: a sparse file's [`Extent`] |
//! | strings | names, link targets, xattr names and values |
//! | layers  | postcard `Vec<LayerSource>` |
//!
//! Opening checks the header: magic, the file's length, and that every section lies inside the
//! file. Records are bounds-checked when read (a reference out of range reads as a missing
//! inode, not a crash), and [`Tree::verify`] checks the checksum of the whole body (`check`,
//! every write, and each image server as it opens the image run it). The checksum is a CRC-32:
//! it is there to find damage (a torn write, a flipped byte), not tampering (whoever can write
//! the file can write its checksum), and it checks the 55 MB tree of a 500,000-file image in a
//! few milliseconds of every server start, where SHA-256 took 35 ms.

use std::path::Path;
use std::sync::Arc;

use crate::error::IoContext;
use crate::index::{EntryKind, Extent, LayerSource};
use crate::mapped::Mapped;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"BUXTRE\x00\x05";

/// Why a tree written by another version (or not a tree at all) does not open.
const OTHER_VERSION: &str = "not a merged tree of this version";

/// Whether `e`, from [`Tree::load`], says the tree was written by another version (not
/// damaged: the store merges it again from the layer indexes, as after an upgrade it must).
pub(crate) fn of_another_version(e: &Error) -> bool {
    matches!(e, Error::CorruptStore { detail, .. } if detail == OTHER_VERSION)
}
const HEADER: usize = 160;
const INODE: usize = 80;
const DIRENT: usize = 24;
const XATTR: usize = 16;
const EXTENT: usize = 24;

/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;

/// Where a node's contents are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeData<'a> {
    /// No contents (devices, fifos, empty files).
    None,
    /// Bytes at `offset` of layer `layer`'s uncompressed stream (`size` of them).
    File {
        /// Index into [`Tree::layers`].
        layer: u32,
        /// Offset in that layer's uncompressed tar stream.
        offset: u64,
    },
    /// A sparse file: these extents of layer `layer`; the rest reads as zeros.
    Sparse {
        /// Index into [`Tree::layers`].
        layer: u32,
        /// Data extents, ascending by file offset.
        extents: Extents<'a>,
    },
    /// A symlink's target.
    Symlink(&'a [u8]),
    /// A directory's entries: `first..first + count` of the dirents.
    Dir {
        /// First entry.
        first: u64,
        /// Number of entries.
        count: u32,
    },
}

/// One inode of the merged tree, read from its record.
#[derive(Debug, Clone, Copy)]
pub struct Inode<'a> {
    /// File type (never `Hardlink`: hardlinks are dirents sharing an inode).
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds).
    pub mtime: i64,
    /// Modification time (nanoseconds).
    pub mtime_nsec: u32,
    /// Size in bytes (files: data; symlinks: target length).
    pub size: u64,
    /// Link count.
    pub nlink: u32,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// Parent directory's inode (directories; the root is its own parent).
    pub parent: u64,
    /// Contents.
    pub data: NodeData<'a>,
    /// Extended attributes, sorted by name.
    pub xattrs: Xattrs<'a>,
}

/// A directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dirent<'a> {
    /// File name.
    pub name: &'a [u8],
    /// Inode number.
    pub ino: u64,
}

/// Section bounds, from the header.
#[derive(Debug, Clone, Copy, Default)]
struct Sections {
    inodes: (usize, u64),
    dirents: (usize, u64),
    xattrs: (usize, u64),
    extents: (usize, u64),
    strings: (usize, usize),
}

/// A merged, frozen tree.
#[derive(Clone)]
pub struct Tree {
    bytes: Arc<Mapped>,
    at: Sections,
    /// The layers, bottom first; [`NodeData::File::layer`] indexes this.
    pub layers: Vec<LayerSource>,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree")
            .field("inodes", &self.at.inodes.1)
            .field("layers", &self.layers.len())
            .finish()
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn kind_code(k: EntryKind) -> u8 {
    match k {
        EntryKind::File => 0,
        EntryKind::Dir => 1,
        EntryKind::Symlink => 2,
        EntryKind::Hardlink => 3,
        EntryKind::Char => 4,
        EntryKind::Block => 5,
        EntryKind::Fifo => 6,
    }
}
fn kind_of(c: u8) -> Option<EntryKind> {
    Some(match c {
        0 => EntryKind::File,
        1 => EntryKind::Dir,
        2 => EntryKind::Symlink,
        4 => EntryKind::Char,
        5 => EntryKind::Block,
        6 => EntryKind::Fifo,
        _ => return None,
    })
}

/// Header flag: see [`Tree::has_overlay_xattrs`].
const FLAG_OVERLAY_XATTRS: u64 = 1;

const DATA_NONE: u8 = 0;
const DATA_FILE: u8 = 1;
const DATA_SPARSE: u8 = 2;
const DATA_SYMLINK: u8 = 3;
const DATA_DIR: u8 = 4;

impl Tree {
    fn body(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Whether two trees are the same, byte for byte (as saved).
    pub fn same_as(&self, other: &Tree) -> bool {
        self.body() == other.body()
    }

    fn string(&self, off: u64, len: u64) -> Option<&[u8]> {
        let (start, size) = self.at.strings;
        let end = off.checked_add(len)?;
        if end > size as u64 {
            return None;
        }
        Some(&self.body()[start + off as usize..start + end as usize])
    }

    fn record(&self, (start, count): (usize, u64), size: usize, i: u64) -> Option<&[u8]> {
        (i < count).then(|| {
            let at = start + i as usize * size;
            &self.body()[at..at + size]
        })
    }

    /// How many inodes the tree has (they are numbered `1..=inode_count()`).
    pub fn inode_count(&self) -> u64 {
        self.at.inodes.1
    }

    /// The files' sizes summed in 4 KiB blocks (for `statfs`, kept in the header).
    pub fn blocks_4k(&self) -> u64 {
        u64_at(self.body(), 144)
    }

    /// Whether some inode has a `trusted.overlay.*` xattr (kept in the header): only then
    /// does serving the tree as an overlay's lower layer change what it shows.
    pub fn has_overlay_xattrs(&self) -> bool {
        u64_at(self.body(), 152) & FLAG_OVERLAY_XATTRS != 0
    }

    /// Every inode with its number, in order.
    pub fn inodes(&self) -> impl Iterator<Item = (u64, Inode<'_>)> {
        (1..=self.inode_count()).filter_map(|ino| Some((ino, self.inode(ino)?)))
    }

    /// The inode `ino`, if it exists (and its record is sound).
    pub fn inode(&self, ino: u64) -> Option<Inode<'_>> {
        let r = self.record(self.at.inodes, INODE, ino.checked_sub(1)?)?;
        let a = u64_at(r, 56);
        let b = u32_at(r, 64);
        let layer = u32_at(r, 68);
        let data = match r[1] {
            DATA_NONE => NodeData::None,
            DATA_FILE => NodeData::File { layer, offset: a },
            DATA_SPARSE => {
                (a.checked_add(b as u64)? <= self.at.extents.1).then_some(())?;
                NodeData::Sparse {
                    layer,
                    extents: Extents {
                        tree: self,
                        first: a,
                        len: b as usize,
                    },
                }
            }
            DATA_SYMLINK => NodeData::Symlink(self.string(a, b as u64)?),
            DATA_DIR => {
                (a.checked_add(b as u64)? <= self.at.dirents.1).then_some(())?;
                NodeData::Dir { first: a, count: b }
            }
            _ => return None,
        };
        if matches!(data, NodeData::File { .. } | NodeData::Sparse { .. })
            && layer as usize >= self.layers.len()
        {
            return None;
        }
        let xfirst = u32_at(r, 72) as u64;
        let xcount = u32_at(r, 76);
        (xfirst + xcount as u64 <= self.at.xattrs.1).then_some(())?;
        Some(Inode {
            kind: kind_of(r[0])?,
            mode: u32_at(r, 4),
            uid: u32_at(r, 8),
            gid: u32_at(r, 12),
            mtime: u64_at(r, 16) as i64,
            mtime_nsec: u32_at(r, 24),
            nlink: u32_at(r, 28),
            size: u64_at(r, 32),
            parent: u64_at(r, 40),
            dev_major: u32_at(r, 48),
            dev_minor: u32_at(r, 52),
            data,
            xattrs: Xattrs {
                tree: self,
                first: xfirst,
                len: xcount as usize,
            },
        })
    }

    fn dirent(&self, i: u64) -> Option<Dirent<'_>> {
        let r = self.record(self.at.dirents, DIRENT, i)?;
        let ino = u64_at(r, 8);
        (ino >= 1 && ino <= self.inode_count()).then_some(())?;
        Some(Dirent {
            name: self.string(u64_at(r, 0), u32_at(r, 16) as u64)?,
            ino,
        })
    }

    /// A directory's entries (empty for non-directories).
    pub fn children(&self, ino: u64) -> Dirents<'_> {
        let (first, len) = match self.inode(ino).map(|i| i.data) {
            Some(NodeData::Dir { first, count }) => (first, count as usize),
            _ => (0, 0),
        };
        Dirents {
            tree: self,
            first,
            len,
        }
    }

    /// Reads a tree written by [`Tree::save`] (mapped, not copied), checking its header.
    pub fn load(path: &Path) -> Result<Tree> {
        let bytes = Mapped::open(path).ctx(|| format!("reading {}", path.display()))?;
        Tree::from_bytes(bytes).map_err(|detail| Error::CorruptStore {
            path: path.into(),
            detail,
        })
    }

    /// Opens an encoded tree held in memory, checking its header as [`Tree::load`] does.
    pub fn from_vec(v: Vec<u8>) -> std::result::Result<Tree, String> {
        Tree::from_bytes(Mapped::Owned(v))
    }

    fn from_bytes(bytes: Mapped) -> std::result::Result<Tree, String> {
        let b = bytes.as_slice();
        if b.len() < HEADER || &b[..8] != MAGIC {
            return Err(OTHER_VERSION.into());
        }
        let file_len = u64_at(b, 8);
        if file_len != b.len() as u64 {
            return Err(format!(
                "{} bytes long, but written {file_len} long (cut short?)",
                b.len()
            ));
        }
        let section = |at: usize, record: usize| -> std::result::Result<(usize, u64), String> {
            let (off, count) = (u64_at(b, at), u64_at(b, at + 8));
            count
                .checked_mul(record as u64)
                .and_then(|n| n.checked_add(off))
                .filter(|&end| off >= HEADER as u64 && end <= file_len)
                .map(|_| (off as usize, count))
                .ok_or_else(|| "a section lies outside the file".into())
        };
        let at = Sections {
            inodes: section(16, INODE)?,
            dirents: section(32, DIRENT)?,
            xattrs: section(48, XATTR)?,
            extents: section(64, EXTENT)?,
            strings: {
                let (off, len) = section(80, 1)?;
                (off, len as usize)
            },
        };
        let (loff, llen) = section(96, 1)?;
        let layers: Vec<LayerSource> = postcard::from_bytes(&b[loff..loff + llen as usize])
            .map_err(|e| format!("decoding layers: {e}"))?;
        let tree = Tree {
            bytes: Arc::new(bytes),
            at,
            layers,
        };
        match tree.inode(ROOT_INO) {
            Some(i) if i.kind == EntryKind::Dir => Ok(tree),
            _ => Err("no root directory".into()),
        }
    }

    /// Checks the checksum of the whole tree (a scan of every byte, unlike opening).
    pub fn verify(&self) -> std::result::Result<(), String> {
        let b = self.body();
        if checksum(b) != b[112..144] {
            return Err("checksum mismatch (the file was changed after it was written)".into());
        }
        Ok(())
    }

    /// The encoded tree.
    pub fn as_bytes(&self) -> &[u8] {
        self.body()
    }

    /// Writes the tree to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::store::write_atomic(path, self.body())
    }
}

/// The checksum of everything but the checksum field (bytes 112..144 of the header; `b` is
/// at least a header long).
fn checksum(b: &[u8]) -> [u8; 32] {
    crate::digest::crc32_field(&[&b[..112], &b[144..]])
}

/// A directory's entries, in name order.
#[derive(Clone, Copy)]
pub struct Dirents<'a> {
    tree: &'a Tree,
    first: u64,
    len: usize,
}

impl<'a> Dirents<'a> {
    /// How many.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`th entry (`None` past the end, or if its record is unsound).
    pub fn get(&self, i: usize) -> Option<Dirent<'a>> {
        (i < self.len).then(|| self.tree.dirent(self.first + i as u64))?
    }

    /// The entries from the `from`th on.
    pub fn iter_from(self, from: usize) -> impl Iterator<Item = Dirent<'a>> + 'a {
        (from.min(self.len)..self.len).map_while(move |i| self.get(i))
    }

    /// All entries.
    pub fn iter(self) -> impl Iterator<Item = Dirent<'a>> + 'a {
        self.iter_from(0)
    }

    /// The entry named `name` (a binary search).
    pub fn find(&self, name: &[u8]) -> Option<Dirent<'a>> {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let d = self.get(mid)?;
            match d.name.cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(d),
            }
        }
        None
    }
}

impl std::fmt::Debug for Dirents<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A sparse file's data extents.
#[derive(Clone, Copy)]
pub struct Extents<'a> {
    tree: &'a Tree,
    first: u64,
    len: usize,
}

impl PartialEq for Extents<'_> {
    fn eq(&self, o: &Self) -> bool {
        self.iter().eq(o.iter())
    }
}
impl Eq for Extents<'_> {}

impl std::fmt::Debug for Extents<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> Extents<'a> {
    /// How many.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`th extent.
    pub fn get(&self, i: usize) -> Option<Extent> {
        if i >= self.len {
            return None;
        }
        let r = self
            .tree
            .record(self.tree.at.extents, EXTENT, self.first + i as u64)?;
        Some(Extent {
            file_off: u64_at(r, 0),
            len: u64_at(r, 8),
            stream_off: u64_at(r, 16),
        })
    }

    /// The extents from the `from`th on.
    pub fn iter_from(self, from: usize) -> impl Iterator<Item = Extent> + 'a {
        (from.min(self.len)..self.len).map_while(move |i| self.get(i))
    }

    /// All extents.
    pub fn iter(self) -> impl Iterator<Item = Extent> + 'a {
        self.iter_from(0)
    }

    /// The index of the first extent for which `pred` is false (they are sorted).
    pub fn partition_point(&self, pred: impl Fn(&Extent) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.get(mid) {
                Some(e) if pred(&e) => lo = mid + 1,
                _ => hi = mid,
            }
        }
        lo
    }
}

/// An inode's extended attributes, sorted by name.
#[derive(Clone, Copy)]
pub struct Xattrs<'a> {
    tree: &'a Tree,
    first: u64,
    len: usize,
}

impl std::fmt::Debug for Xattrs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> Xattrs<'a> {
    /// (name, value) pairs (an unsound record ends the list).
    pub fn iter(self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        (0..self.len).map_while(move |i| {
            let r = self
                .tree
                .record(self.tree.at.xattrs, XATTR, self.first + i as u64)?;
            let (off, nlen, vlen) = (u64_at(r, 0), u32_at(r, 8) as u64, u32_at(r, 12) as u64);
            let both = self.tree.string(off, nlen + vlen)?;
            Some(both.split_at(nlen as usize))
        })
    }

    /// The value of `name`.
    pub fn get(self, name: &[u8]) -> Option<&'a [u8]> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// What [`Writer::inode`] takes: one inode, its data still owned.
pub(super) struct NewInode<'n> {
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    pub nlink: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub parent: u64,
    pub data: NewData<'n>,
    /// Sorted by name.
    pub xattrs: &'n [(Vec<u8>, Vec<u8>)],
}

/// See [`NewInode`].
pub(super) enum NewData<'n> {
    None,
    File {
        layer: u32,
        offset: u64,
    },
    Sparse {
        layer: u32,
        extents: &'n [Extent],
    },
    Symlink(&'n [u8]),
    /// Entries (name, inode), sorted by name.
    Dir(Vec<(&'n [u8], u64)>),
}

/// Builds the encoded form, inode by inode in number order.
#[derive(Default)]
pub(super) struct Writer {
    inodes: Vec<u8>,
    blocks_4k: u64,
    flags: u64,
    dirents: Vec<u8>,
    xattrs: Vec<u8>,
    extents: Vec<u8>,
    strings: Vec<u8>,
}

impl Writer {
    fn string(&mut self, s: &[u8]) -> u64 {
        let at = self.strings.len() as u64;
        self.strings.extend_from_slice(s);
        at
    }

    pub(super) fn inode(&mut self, n: NewInode<'_>) {
        let (code, a, b, layer) = match n.data {
            NewData::None => (DATA_NONE, 0, 0, 0),
            NewData::File { layer, offset } => (DATA_FILE, offset, 0, layer),
            NewData::Sparse { layer, extents } => {
                let first = (self.extents.len() / EXTENT) as u64;
                for e in extents {
                    for v in [e.file_off, e.len, e.stream_off] {
                        self.extents.extend_from_slice(&v.to_le_bytes());
                    }
                }
                (DATA_SPARSE, first, extents.len() as u32, layer)
            }
            NewData::Symlink(t) => (DATA_SYMLINK, self.string(t), t.len() as u32, 0),
            NewData::Dir(entries) => {
                let first = (self.dirents.len() / DIRENT) as u64;
                for (name, ino) in &entries {
                    let off = self.string(name);
                    self.dirents.extend_from_slice(&off.to_le_bytes());
                    self.dirents.extend_from_slice(&ino.to_le_bytes());
                    self.dirents
                        .extend_from_slice(&(name.len() as u32).to_le_bytes());
                    self.dirents.extend_from_slice(&[0; 4]);
                }
                (DATA_DIR, first, entries.len() as u32, 0)
            }
        };
        let xfirst = (self.xattrs.len() / XATTR) as u32;
        for (k, v) in n.xattrs {
            if k.starts_with(b"trusted.overlay.") {
                self.flags |= FLAG_OVERLAY_XATTRS;
            }
            let off = self.string(k);
            self.string(v);
            self.xattrs.extend_from_slice(&off.to_le_bytes());
            self.xattrs
                .extend_from_slice(&(k.len() as u32).to_le_bytes());
            self.xattrs
                .extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        self.blocks_4k += n.size.div_ceil(4096);
        let r = &mut self.inodes;
        r.extend_from_slice(&[kind_code(n.kind), code, 0, 0]);
        for v in [n.mode, n.uid, n.gid] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        r.extend_from_slice(&n.mtime.to_le_bytes());
        r.extend_from_slice(&n.mtime_nsec.to_le_bytes());
        r.extend_from_slice(&n.nlink.to_le_bytes());
        r.extend_from_slice(&n.size.to_le_bytes());
        r.extend_from_slice(&n.parent.to_le_bytes());
        r.extend_from_slice(&n.dev_major.to_le_bytes());
        r.extend_from_slice(&n.dev_minor.to_le_bytes());
        r.extend_from_slice(&a.to_le_bytes());
        r.extend_from_slice(&b.to_le_bytes());
        r.extend_from_slice(&layer.to_le_bytes());
        r.extend_from_slice(&xfirst.to_le_bytes());
        r.extend_from_slice(&(n.xattrs.len() as u32).to_le_bytes());
    }

    /// The tree, encoded and opened.
    pub(super) fn finish(self, layers: Vec<LayerSource>) -> Result<Tree> {
        let layer_bytes = postcard::to_allocvec(&layers).map_err(|e| Error::CorruptStore {
            path: "tree".into(),
            detail: format!("encoding layers: {e}"),
        })?;
        let mut out = vec![0u8; HEADER];
        let mut header = Vec::new();
        let sections: [(&[u8], usize); 6] = [
            (&self.inodes, INODE),
            (&self.dirents, DIRENT),
            (&self.xattrs, XATTR),
            (&self.extents, EXTENT),
            (&self.strings, 1),
            (&layer_bytes, 1),
        ];
        for (bytes, record) in sections {
            while out.len() % 8 != 0 {
                out.push(0);
            }
            header.push((out.len() as u64, (bytes.len() / record) as u64));
            out.extend_from_slice(bytes);
        }
        out[..8].copy_from_slice(MAGIC);
        let len = out.len() as u64;
        out[8..16].copy_from_slice(&len.to_le_bytes());
        for (k, (off, count)) in header.into_iter().enumerate() {
            out[16 + 16 * k..24 + 16 * k].copy_from_slice(&off.to_le_bytes());
            out[24 + 16 * k..32 + 16 * k].copy_from_slice(&count.to_le_bytes());
        }
        out[144..152].copy_from_slice(&self.blocks_4k.to_le_bytes());
        out[152..160].copy_from_slice(&self.flags.to_le_bytes());
        let sum = checksum(&out);
        out[112..144].copy_from_slice(&sum);
        let tree = Tree::from_vec(out).map_err(|detail| Error::CorruptStore {
            path: "tree".into(),
            detail: format!("a tree just built does not read back: {detail}"),
        })?;
        Ok(Tree { layers, ..tree })
    }
}

impl<'a> IntoIterator for Dirents<'a> {
    type Item = Dirent<'a>;
    type IntoIter = Box<dyn Iterator<Item = Dirent<'a>> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl<'a> IntoIterator for Xattrs<'a> {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = Box<dyn Iterator<Item = (&'a [u8], &'a [u8])> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}
