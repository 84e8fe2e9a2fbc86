//! The tree as an EROFS metadata image, for the kernel to walk instead of asking FUSE.
//!
//! A cold `find` over FUSE pays a round trip per directory however fast the daemon answers. The
//! way past that (composefs's) is to let the kernel hold the metadata: this module writes the
//! merged tree as an EROFS image that has every directory, name, mode, owner, time, xattr,
//! symlink and device but no file data. Each regular file with data is instead marked for
//! overlayfs as a metadata-only copy (`trusted.overlay.metacopy`) whose data lives at its own
//! path in a data-only lower layer (`trusted.overlay.redirect`): the image's FUSE mount. So
//!
//! ```text
//! mount -t erofs meta.erofs meta
//! mount -t overlay -o ro,metacopy=on,redirect_dir=follow,lowerdir=meta::fuse root
//! ```
//!
//! answers lookups, `stat`, `readdir` and `getxattr` in the kernel from the (shared, page
//! cached) image file, and goes to FUSE only to open and read a file's data (Linux 6.5+ looks
//! the data file up lazily, at open).
//!
//! Small files whose bytes the store keeps (see [`crate::index::small`]) are not redirected:
//! the kernel reads their data itself, so reading them never leaves the kernel either. A
//! layer's small-file file is an EROFS *extra device* of the image (`mount -o device=…`), and
//! each such file is chunk-based with one chunk index naming that device and its first block
//! there: the bytes sit in the store once, shared by every image with the layer, and the image
//! is its metadata alone. The device table (in block 0, after the superblock) tags each device
//! with its layer's digest and keeps the SHA-256 of its table in the slot's reserved bytes, so
//! a server mounts the very files the image was written for ([`devices`](fn@devices)). Files
//! of at most `INLINE_FILE_MAX` bytes sit inline after their inode. Small files of a layer whose
//! table is of an earlier format (or past the devices one block 0 can name) are copied into the
//! image instead: out of line, in blocks of its own after the metadata, in the order of the walk, not packed
//! after the inode as mkfs.erofs does by default: the kernel reads metadata a block at a time
//! (no read-ahead), so tails among the inodes made a cold `find` of the large Debian image read
//! 28 MB of metadata instead of 3 (0.14 s against 0.07 s), and a cold full read slower too
//! (medians 5.5 s against 4.5 s), where data blocks are read ahead in order. Only files of at
//! most `INLINE_FILE_MAX` bytes sit inline: they cost the metadata little, and a block each
//! out of line.
//!
//! Layout: 4 KiB blocks; the superblock in block 0; the one shared xattr (the metacopy mark) in
//! block 1; from block 2 the inodes, each an extended (64-byte) inode followed by its xattrs
//! (inline, and a reference to the shared one) and, for directories and symlinks, the last
//! partial block of its data (kept inside one block); then the full data blocks. Regular files
//! served by FUSE are chunk-based with a single null chunk: sparse, no data. Image xattrs named
//! `trusted.overlay.*` are written escaped (`trusted.overlay.overlay.*`), which overlayfs shows
//! as they were. What overlayfs would misread and cannot be escaped here (a 0/0 character
//! device, which it takes for a whiteout; a file to redirect at a path of `PATH_MAX` bytes or
//! more, which it cannot open), or that EROFS cannot (a name over 255 bytes, a file over 8 TiB,
//! over 256 KiB of xattrs on one inode), makes the writer refuse: the image is then served by
//! FUSE alone.

use std::borrow::Cow;

use super::{Inode, NodeData, Tree, ROOT_INO};
use crate::index::EntryKind;

mod devices;
mod encode;
#[cfg(test)]
mod tests;

use devices::Held;
pub use devices::{devices, Device};
pub(crate) use devices::{metadata_image_with_tables, write_metadata_image};
use encode::{
    dir_blocks, dir_bytes, dir_names, encode_xattrs, put_data, write_inode, write_super,
    xattr_entry, XattrEntry,
};

const BLOCK: usize = 4096;
const BLOCK_BITS: u8 = 12;
const MAGIC: u32 = 0xE0F5_E1E2;
const SUPER_OFFSET: usize = 1024;
const INODE_SIZE: usize = 64;
const DIRENT_SIZE: usize = 12;
const XATTR_HEADER: usize = 12;
const NULL_ADDR: u32 = u32::MAX;
/// The shared xattrs' block: every file with data refers to the one `trusted.overlay.metacopy`
/// there (4 bytes each instead of 20 inline).
const XATTR_BLOCK: usize = 1;
/// Metadata (inodes) starts at this block; nids count 32-byte slots from it.
const META_BLOCK: usize = 2;
/// Shared xattr id (4-byte units from the shared block) of `trusted.overlay.metacopy`.
const METACOPY_ID: u32 = 0;

const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// The superblock names extra devices (a device table).
const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// A chunk-based inode's chunk format bit: 8-byte chunk indexes (device and block) follow it,
/// not 4-byte block addresses.
const CHUNK_INDEXES: u32 = 0x20;
/// The device table: 128-byte slots in block 0, after the superblock.
const DEVT_OFFSET: usize = SUPER_OFFSET + 128;
const DEVT_SLOT: usize = 128;
/// The most extra devices (layers' small-file files) an image names.
const DEVICES_MAX: usize = (BLOCK - DEVT_OFFSET) / DEVT_SLOT;
/// Where a slot keeps its device's table digest (bytes the kernel does not read).
const DEVT_DIGEST: usize = 96;
/// The largest file one chunk describes (2^(12 + 31) bytes): larger ones (only a hostile
/// sparse entry claims such a size) make the writer refuse.
const MAX_FILE: u64 = (BLOCK as u64) << 31;
/// The longest name Linux passes (a directory block holds any entry up to it).
const NAME_MAX: usize = 255;
/// The most bytes of inline xattrs an inode has: `i_xattr_icount` (16 bits) counts them in
/// 4-byte units after the 12-byte header, which the first unit covers. Past it the count
/// would wrap, and the kernel read the file's xattrs (and chunk index) short.
const XATTRS_MAX: usize = XATTR_HEADER + 4 * (u16::MAX as usize - 1);
/// Redirect paths overlayfs can look up are shorter than this (PATH_MAX, with the NUL): a
/// longer one lists and stats but fails to open (`ENAMETOOLONG`).
const REDIRECT_MAX: usize = libc::PATH_MAX as usize;

/// `i_format`: bit 0 the inode version (1 = extended), bits 1–3 the data layout.
const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;
const LAYOUT_CHUNK_BASED: u16 = 4;
const EXTENDED: u16 = 1;

/// Files up to this size keep their data inline, after their inode (see the module docs).
const INLINE_FILE_MAX: usize = 512;

/// Directory entry file types.
const FT_REG: u8 = 1;
const FT_DIR: u8 = 2;
const FT_CHR: u8 = 3;
const FT_BLK: u8 = 4;
const FT_FIFO: u8 = 5;
const FT_LNK: u8 = 7;

/// The volume name: says which writer made an image, so that an image written by an earlier
/// version is written anew rather than used.
const VOLUME: &[u8] = b"bux-fuse 2";
/// The volume name of a metadata image naming extra devices. Not [`VOLUME`]: the kernel mounts
/// such an image without `device=` options too (it then reads each device's blocks from the
/// image itself, "flat" addressing) and serves the image's own metadata as those files' bytes
/// — which is what a version before devices would do with it, taking it for one of its own
/// (it checks for `VOLUME` and a NUL). This name makes that version write its image anew.
const VOLUME_DEVICES: &[u8] = b"bux-fuse 2 dev";
/// The volume name of a disk image ([`disk_image`]).
const DISK_VOLUME: &[u8] = b"bux-fuse disk 1";

/// What an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The metadata under an overlay whose data-only lower is the FUSE mount: regular files
    /// redirect to it (or hold small files' bytes); `trusted.overlay.*` xattrs are escaped.
    Metadata,
    /// A whole filesystem: every regular file's data in blocks of its own, which the writer
    /// only places (they are produced when read, see [`disk_image`]); xattrs as they are.
    Disk,
}

/// Whether `path` holds an image this version wrote, whole (its size is what its superblock
/// says). Cheap: reads the superblock only; the kernel checks the rest when it mounts it.
pub fn is_current(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; SUPER_OFFSET + 128];
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let len = f.metadata().map_or(0, |m| m.len());
    if f.read_exact(&mut head).is_err() {
        return false;
    }
    let s = &head[SUPER_OFFSET..];
    let blocks = u32::from_le_bytes(s[36..40].try_into().expect("4 bytes")) as u64;
    s[..4] == MAGIC.to_le_bytes()
        && [VOLUME, VOLUME_DEVICES]
            .iter()
            .any(|v| s[64..80].starts_with(v) && s[64 + v.len()] == 0)
        && blocks * BLOCK as u64 == len
}

/// Why a tree cannot be written as a metadata image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The bytes of a small file the image holds, given its layer, offset in that layer's stream
/// and size; `None` for a file FUSE serves.
pub type SmallBytes<'a> = dyn Fn(u32, u64, u64) -> Option<&'a [u8]> + 'a;

/// One inode of the image being laid out.
struct Node<'a> {
    ino: u64,
    /// Inline xattrs, encoded (empty: none).
    xattrs: Vec<u8>,
    /// Directory, symlink or small file data (directories: filled in once every nid is known).
    data: Cow<'a, [u8]>,
    /// Length of the data (directories: known before their bytes are).
    size: u64,
    layout: u16,
    /// Byte offset of the inode in the image.
    pos: usize,
    /// First block of its data out of line (`FLAT_*` layouts).
    blkaddr: u32,
    /// A small file whose bytes are written once the image is laid out, from the layer's
    /// table: (layer, offset in its stream).
    later: Option<(u32, u64)>,
    /// A disk's regular file: its data blocks are placed, not written.
    served: bool,
    /// A small file whose bytes are on an extra device: (device id from 1, first block).
    device: Option<(u16, u32)>,
}

impl Node<'_> {
    fn nid(&self) -> u64 {
        ((self.pos - META_BLOCK * BLOCK) / 32) as u64
    }
    /// Bytes of data that sit inline after the inode (the tail of a `FLAT_INLINE` inode).
    fn tail(&self) -> usize {
        match self.layout {
            LAYOUT_FLAT_INLINE => self.size as usize % BLOCK,
            _ => 0,
        }
    }
    /// Full blocks of data out of line.
    fn out_of_line_blocks(&self) -> usize {
        match self.layout {
            LAYOUT_FLAT_INLINE => self.size as usize / BLOCK,
            LAYOUT_FLAT_PLAIN => (self.size as usize).div_ceil(BLOCK),
            _ => 0,
        }
    }
    /// Everything stored with the inode, in the metadata area.
    fn body_len(&self) -> usize {
        match (self.layout, self.device) {
            (LAYOUT_CHUNK_BASED, Some(_)) => self.chunk_index_at() + 8,
            (LAYOUT_CHUNK_BASED, None) => INODE_SIZE + self.xattrs.len() + 4,
            _ => INODE_SIZE + self.xattrs.len() + self.tail(),
        }
    }
    /// Where an 8-byte chunk index goes, from the inode's start (the kernel aligns it to 8;
    /// inodes are 32-byte aligned).
    fn chunk_index_at(&self) -> usize {
        (INODE_SIZE + self.xattrs.len()).next_multiple_of(8)
    }
}

/// Writes `tree` as an EROFS metadata image whose regular files redirect to their own paths in
/// a data-only lower layer (the image's FUSE mount), but for those whose bytes `small` gives,
/// which the image holds.
pub fn metadata_image<'a>(tree: &Tree, small: &SmallBytes<'a>) -> Result<Vec<u8>, Unsupported> {
    let held = |layer, offset, size| small(layer, offset, size).map(Held::Now);
    let mut layout = lay_out(tree, Purpose::Metadata, &held, Vec::new())?;
    let mut out = vec![0u8; layout.blocks * BLOCK];
    write(tree, &mut layout, &mut out).expect("writing to memory");
    Ok(out)
}

/// A regular file of a disk image: its data fills blocks `first_block..` (the last one padded
/// with zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFile {
    pub first_block: u32,
    /// Its inode in the tree.
    pub ino: u64,
    pub size: u64,
}

/// A disk image laid out ([`disk_image`]).
pub struct DiskLayout {
    /// The image's bytes up to the first file's data: superblock, inodes, directories,
    /// symlinks.
    pub head: Vec<u8>,
    /// Where each regular file with data lies, by first block (after `head`, in the walk's
    /// order, so that a file's blocks and a directory's files are read ahead together).
    pub files: Vec<DiskFile>,
    /// The image's length in blocks.
    pub blocks: u64,
}

/// The block size of the images written here.
pub const DISK_BLOCK: u64 = BLOCK as u64;

/// Lays `tree` out as a complete EROFS image (a disk, see [`crate::disk`]): everything a
/// `mkfs.erofs` of the unpacked tree holds, regular files' data uncompressed in whole blocks.
/// The writer holds no file data: it returns the metadata's bytes and where each file's data
/// goes, for the caller to fill in from the layers as the blocks are read. The same tree
/// gives the same image, byte for byte.
pub fn disk_image(tree: &Tree) -> Result<DiskLayout, Unsupported> {
    let mut layout = lay_out(tree, Purpose::Disk, &|_, _, _| None, Vec::new())?;
    let mut head = vec![0u8; layout.head_blocks * BLOCK];
    write(tree, &mut layout, &mut head).expect("writing to memory");
    let mut files: Vec<DiskFile> = layout
        .order
        .iter()
        .filter(|n| n.served)
        .map(|n| DiskFile {
            first_block: n.blkaddr,
            ino: n.ino,
            size: n.size,
        })
        .collect();
    files.sort_unstable_by_key(|f| f.first_block);
    Ok(DiskLayout {
        head,
        files,
        blocks: layout.blocks as u64,
    })
}

/// The image laid out: every inode placed, every block counted.
struct Layout<'a> {
    purpose: Purpose,
    /// The extra devices its chunk indexes name (id = position + 1).
    devices: Vec<Device>,
    order: Vec<Node<'a>>,
    root_nid: u64,
    /// Blocks before the first one of data (superblock, shared xattr, inodes).
    meta_blocks: usize,
    /// Blocks before the first one of a served file (a disk's).
    head_blocks: usize,
    blocks: usize,
}

/// Where an image's bytes go.
trait Out {
    fn put(&mut self, at: usize, bytes: &[u8]) -> std::io::Result<()>;
}

impl Out for Vec<u8> {
    fn put(&mut self, at: usize, bytes: &[u8]) -> std::io::Result<()> {
        self[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

/// A file: the metadata blocks gathered in memory (many small writes; written last), the data
/// blocks written where they go.
struct FileOut<'f> {
    meta: Vec<u8>,
    file: &'f std::fs::File,
}

impl Out for FileOut<'_> {
    fn put(&mut self, at: usize, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match at < self.meta.len() {
            true => {
                self.meta[at..at + bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            false => self.file.write_all_at(bytes, at as u64),
        }
    }
}

/// Lays `tree` out; `small` says which small files the image holds.
fn lay_out<'a>(
    tree: &Tree,
    purpose: Purpose,
    small: &dyn Fn(u32, u64, u64) -> Option<Held<'a>>,
    devices: Vec<Device>,
) -> Result<Layout<'a>, Unsupported> {
    // Nodes in depth-first order from the root, so the root gets the first (small) nid, and a
    // directory's entries sit near it.
    let mut order: Vec<Node<'a>> = Vec::new();
    let mut slot = vec![usize::MAX; tree.inode_count() as usize + 1];
    // Directories' paths ("" for the root), and what is still to visit: (inode, index of its
    // directory's path, its name).
    let mut dir_paths: Vec<Vec<u8>> = Vec::new();
    let mut stack: Vec<(u64, usize, &[u8])> = vec![(ROOT_INO, usize::MAX, b"")];
    let mut path = Vec::new();
    while let Some((ino, dir, name)) = stack.pop() {
        if slot[ino as usize] != usize::MAX {
            continue; // a hardlink seen already (a directory twice only in a damaged tree)
        }
        let inode = tree
            .inode(ino)
            .ok_or_else(|| Unsupported(format!("inode {ino} is unreadable")))?;
        path.clear();
        if let Some(parent) = dir_paths.get(dir) {
            path.extend_from_slice(parent);
        }
        path.push(b'/');
        path.extend_from_slice(name);
        slot[ino as usize] = order.len();
        order.push(node(ino, &inode, &path, purpose, small)?);
        if let NodeData::Dir { .. } = inode.data {
            dir_paths.push(if ino == ROOT_INO {
                Vec::new()
            } else {
                path.clone()
            });
            let children: Vec<_> = tree.children(ino).iter().collect();
            for d in children.into_iter().rev() {
                if d.name.len() > NAME_MAX {
                    return Err(Unsupported(format!(
                        "a name of {} bytes (Linux allows {NAME_MAX})",
                        d.name.len()
                    )));
                }
                stack.push((d.ino, dir_paths.len() - 1, d.name));
            }
        }
    }
    drop(dir_paths);
    // Directory sizes depend on names only, so the layout can be fixed before any nid is.
    for n in order.iter_mut() {
        if tree.inode(n.ino).is_some_and(|i| i.kind == EntryKind::Dir) {
            let blocks = dir_blocks(&dir_names(tree, n.ino));
            let last = blocks.last().map_or(0, |b| b.len);
            n.size = ((blocks.len() - 1) * BLOCK + last) as u64;
        }
    }
    // Inodes from the metadata block at nid 1 (nid 0 would read as inode 0, which tools skip).
    let mut at = META_BLOCK * BLOCK + 32;
    for n in order.iter_mut() {
        at = at.next_multiple_of(32);
        if n.layout == LAYOUT_FLAT_INLINE && n.size % BLOCK as u64 == 0 {
            // The kernel takes the last block of a FLAT_INLINE inode to be inline, full or not:
            // data that ends on a block boundary is all out of line.
            n.layout = LAYOUT_FLAT_PLAIN;
        }
        if n.layout == LAYOUT_FLAT_INLINE && at % BLOCK + n.body_len() > BLOCK {
            if n.body_len() <= BLOCK {
                at = at.next_multiple_of(BLOCK); // the inline tail must not cross a block
            } else {
                n.layout = LAYOUT_FLAT_PLAIN; // too big to keep inline at all
            }
        } else if at % BLOCK + n.body_len() > BLOCK && n.body_len() <= BLOCK {
            at = at.next_multiple_of(BLOCK);
        }
        n.pos = at;
        at += n.body_len();
    }
    let meta_blocks = at.div_ceil(BLOCK);
    let mut block = meta_blocks;
    let mut head_blocks = block;
    // Data written with the image first, then a disk's served files: the head is one run.
    for served in [false, true] {
        for n in order.iter_mut().filter(|n| n.served == served) {
            if n.out_of_line_blocks() > 0 {
                n.blkaddr = u32::try_from(block)
                    .map_err(|_| Unsupported("the image would exceed 16 TiB".into()))?;
                block += n.out_of_line_blocks();
            }
        }
        if !served {
            head_blocks = block;
        }
    }
    if u32::try_from(block).is_err() {
        return Err(Unsupported("the image would exceed 16 TiB".into()));
    }
    let root_nid = order[0].nid();
    if root_nid > u16::MAX as u64 {
        return Err(Unsupported("the root's xattrs are too large".into()));
    }
    // Directory contents, now that every nid is known.
    let nid_of = |ino: u64| order[slot[ino as usize]].nid();
    let dirs: Vec<(usize, Vec<u8>)> = order
        .iter()
        .enumerate()
        .filter(|(_, n)| tree.inode(n.ino).is_some_and(|i| i.kind == EntryKind::Dir))
        .map(|(i, n)| {
            let parent = tree.inode(n.ino).map_or(ROOT_INO, |i| i.parent);
            let parent = if slot.get(parent as usize).is_some_and(|s| *s != usize::MAX) {
                parent
            } else {
                ROOT_INO
            };
            (i, dir_bytes(tree, n.ino, n.nid(), nid_of(parent), &nid_of))
        })
        .collect();
    for (i, bytes) in dirs {
        debug_assert_eq!(bytes.len() as u64, order[i].size);
        order[i].data = Cow::Owned(bytes);
    }
    Ok(Layout {
        purpose,
        devices,
        order,
        root_nid,
        meta_blocks,
        head_blocks,
        blocks: block,
    })
}

/// Writes the laid out image to `out` (whose bytes are zero), but for the data of the small
/// files held [`Held::Later`]. Directories' data is let go of once written.
fn write(tree: &Tree, layout: &mut Layout<'_>, out: &mut dyn Out) -> std::io::Result<()> {
    for n in layout.order.iter_mut() {
        let inode = tree.inode(n.ino).expect("read above");
        write_inode(out, n, &inode)?;
        if let Cow::Owned(_) = n.data {
            n.data = Cow::Borrowed(&[]);
        }
    }
    // The shared xattr: trusted.overlay.metacopy, empty (name length, prefix index, value
    // length, name).
    let mut shared = [0u8; 20];
    shared[..4].copy_from_slice(&[16, 4, 0, 0]);
    shared[4..20].copy_from_slice(b"overlay.metacopy");
    out.put(XATTR_BLOCK * BLOCK + METACOPY_ID as usize * 4, &shared)?;
    write_super(
        out,
        layout.purpose,
        layout.root_nid as u16,
        layout.order.len() as u64,
        layout.blocks as u32,
        &layout.devices,
    )
}

/// The node for `inode`, its xattrs encoded and (symlinks, small files) its data; directories
/// get theirs once every nid is known.
fn node<'a>(
    ino: u64,
    inode: &Inode<'_>,
    path: &[u8],
    purpose: Purpose,
    small: &dyn Fn(u32, u64, u64) -> Option<Held<'a>>,
) -> Result<Node<'a>, Unsupported> {
    let mut xattrs: Vec<XattrEntry> = Vec::new();
    for (name, value) in inode.xattrs.iter() {
        if let Some(x) = xattr_entry(name, value, purpose == Purpose::Metadata) {
            xattrs.push(x);
        }
    }
    if purpose == Purpose::Disk {
        let served = inode.kind == EntryKind::File && inode.size > 0;
        let (layout, data, size) = match inode.data {
            NodeData::Symlink(target) => (
                LAYOUT_FLAT_INLINE,
                Cow::Owned(target.to_vec()),
                target.len() as u64,
            ),
            NodeData::Dir { .. } => (LAYOUT_FLAT_INLINE, Cow::Borrowed(&[][..]), 0),
            _ if served => (LAYOUT_FLAT_PLAIN, Cow::Borrowed(&[][..]), inode.size),
            _ => (LAYOUT_FLAT_PLAIN, Cow::Borrowed(&[][..]), 0),
        };
        return Ok(Node {
            ino,
            xattrs: encode_xattrs(&xattrs, false, path)?,
            data,
            size,
            layout,
            pos: 0,
            blkaddr: 0,
            later: None,
            served,
            device: None,
        });
    }
    let mut later = None;
    let mut device = None;
    let held = match inode.data {
        NodeData::File { layer, offset } if inode.kind == EntryKind::File && inode.size > 0 => {
            match small(layer, offset, inode.size) {
                Some(Held::Now(b)) => Some(b).filter(|b| b.len() as u64 == inode.size),
                Some(Held::Later) => {
                    later = Some((layer, offset));
                    None
                }
                Some(Held::Device { device: d, block }) => {
                    device = Some((d, block));
                    None
                }
                None => None,
            }
        }
        _ => None,
    };
    let (layout, data, size) = match (inode.data, held) {
        (_, None) if device.is_some() => (LAYOUT_CHUNK_BASED, Cow::Borrowed(&[][..]), inode.size),
        (_, None) if later.is_some() => {
            let layout = match inode.size <= INLINE_FILE_MAX as u64 {
                true => LAYOUT_FLAT_INLINE,
                false => LAYOUT_FLAT_PLAIN,
            };
            (layout, Cow::Borrowed(&[][..]), inode.size)
        }
        (NodeData::Symlink(target), _) => (
            LAYOUT_FLAT_INLINE,
            Cow::Owned(target.to_vec()),
            target.len() as u64,
        ),
        (NodeData::Dir { .. }, _) => (LAYOUT_FLAT_INLINE, Cow::Borrowed(&[][..]), 0),
        (_, Some(bytes)) => {
            let layout = match bytes.len() <= INLINE_FILE_MAX {
                true => LAYOUT_FLAT_INLINE,
                false => LAYOUT_FLAT_PLAIN,
            };
            (layout, Cow::Borrowed(bytes), bytes.len() as u64)
        }
        _ if inode.kind == EntryKind::File && inode.size > MAX_FILE => {
            return Err(Unsupported(format!(
                "a file of {} bytes (one chunk holds at most 8 TiB)",
                inode.size
            )));
        }
        _ if inode.kind == EntryKind::File && inode.size > 0 && path.len() >= REDIRECT_MAX => {
            return Err(Unsupported(format!(
                "a file at a path of {} bytes (overlayfs opens a redirect of at most {})",
                path.len(),
                REDIRECT_MAX - 1
            )));
        }
        _ if inode.kind == EntryKind::File && inode.size > 0 => {
            xattrs.push((4, Cow::Borrowed(b"overlay.redirect"), path));
            (LAYOUT_CHUNK_BASED, Cow::Borrowed(&[][..]), inode.size)
        }
        _ => (LAYOUT_FLAT_PLAIN, Cow::Borrowed(&[][..]), 0),
    };
    if inode.kind == EntryKind::Char && inode.dev_major == 0 && inode.dev_minor == 0 {
        return Err(Unsupported(
            "the image has a 0/0 character device, which overlayfs reads as a whiteout".into(),
        ));
    }
    let metacopy = layout == LAYOUT_CHUNK_BASED && device.is_none();
    Ok(Node {
        ino,
        xattrs: encode_xattrs(&xattrs, metacopy, path)?,
        data,
        size,
        layout,
        pos: 0,
        blkaddr: 0,
        later,
        served: false,
        device,
    })
}
