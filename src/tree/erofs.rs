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
//! a server mounts the very files the image was written for ([`devices`]). Files of at most
//! `INLINE_FILE_MAX` bytes sit inline after their inode. Small files of a layer whose table
//! is of an earlier format (or past the devices one block 0 can name) are copied into the
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

/// The metadata image of `tree` with the small files the layers' tables (`tables`, by layer)
/// keep: tables of the current format become extra devices ([`Device`]), the bytes of earlier
/// ones are copied in, in the walk's order until `max_bytes` of them. Laid out here; the
/// copied bytes are written by [`fill_from_tables`].
fn lay_out_with_tables<'t>(
    tree: &Tree,
    tables: &'t [Option<crate::index::small::SmallIndex>],
    max_bytes: u64,
) -> Result<Layout<'t>, String> {
    use crate::index::small::Placed;
    let mut devices = Vec::new();
    let mut device_of = vec![None; tables.len()];
    for (layer, t) in tables.iter().enumerate() {
        let Some((t, blocks)) = t.as_ref().and_then(|t| Some((t, t.device_blocks()?))) else {
            continue;
        };
        if devices.len() < DEVICES_MAX {
            devices.push(Device {
                layer: t.layer_hex(),
                blocks,
                table: t.table_digest(),
            });
            device_of[layer] = Some(devices.len() as u16);
        }
    }
    let given = std::cell::Cell::new(0u64);
    let copied = |size: u64| {
        given.set(given.get() + size);
        given.get() <= max_bytes
    };
    let held = |layer: u32, offset: u64, size: u64| {
        let table = tables.get(layer as usize)?.as_ref()?;
        (table.len_at(offset)? == size).then_some(())?;
        match (table.placed_at(offset)?, device_of[layer as usize]) {
            (Placed::Tiny(b), _) => copied(size).then_some(Held::Now(b)),
            (Placed::Block(block), Some(device)) => Some(Held::Device { device, block }),
            _ => copied(size).then_some(Held::Later),
        }
    };
    lay_out(tree, Purpose::Metadata, &held, devices).map_err(|e| e.0)
}

/// Writes the bytes [`lay_out_with_tables`] left for later, a layer at a time, in the order of
/// their tables.
fn fill_from_tables(
    layout: &Layout<'_>,
    tables: &[Option<crate::index::small::SmallIndex>],
    out: &mut dyn Out,
) -> Result<(), String> {
    let mut wanted: Vec<(u32, u64, usize)> = layout
        .order
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.later.map(|(layer, offset)| (layer, offset, i)))
        .collect();
    wanted.sort_unstable();
    for (layer, table) in tables.iter().enumerate() {
        let mine: Vec<_> = wanted.iter().filter(|w| w.0 == layer as u32).collect();
        let (Some(table), false) = (table, mine.is_empty()) else {
            continue;
        };
        let mut next = mine.into_iter().peekable();
        table
            .each(|offset, bytes| {
                while let Some(&&(_, o, i)) = next.peek() {
                    if o > offset {
                        break;
                    }
                    next.next();
                    if o == offset {
                        put_data(out, &layout.order[i], bytes)?;
                    }
                }
                Ok(next.peek().is_some())
            })
            .map_err(|e| e.to_string())?;
        if next.peek().is_some() {
            return Err("a small file's bytes are missing from its table".into());
        }
    }
    Ok(())
}

/// The metadata image [`write_metadata_image`] writes, in memory (to check one on disk).
pub(crate) fn metadata_image_with_tables(
    tree: &Tree,
    tables: &[Option<crate::index::small::SmallIndex>],
    max_bytes: u64,
) -> Result<Vec<u8>, String> {
    let mut layout = lay_out_with_tables(tree, tables, max_bytes)?;
    let mut out = vec![0u8; layout.blocks * BLOCK];
    write(tree, &mut layout, &mut out).expect("writing to memory");
    fill_from_tables(&layout, tables, &mut out)?;
    Ok(out)
}

/// The metadata image of `tree` with the small files of the layers' tables (`tables`, by
/// layer; see [`lay_out_with_tables`]) written to `file` (from its start; its length set). It
/// holds the metadata blocks and the tables' records, not the files' bytes: those copied in
/// are read through once, a layer at a time, and written where they go. Returns the image's
/// length.
pub(crate) fn write_metadata_image(
    tree: &Tree,
    tables: &[Option<crate::index::small::SmallIndex>],
    max_bytes: u64,
    file: &std::fs::File,
) -> Result<u64, String> {
    let mut layout = lay_out_with_tables(tree, tables, max_bytes)?;
    let len = (layout.blocks * BLOCK) as u64;
    file.set_len(0)
        .and_then(|_| file.set_len(len))
        .map_err(|e| format!("sizing the image: {e}"))?;
    let mut out = FileOut {
        meta: vec![0u8; layout.meta_blocks * BLOCK],
        file,
    };
    let io = |e: std::io::Error| format!("writing the image: {e}");
    write(tree, &mut layout, &mut out).map_err(io)?;
    fill_from_tables(&layout, tables, &mut out)?;
    use std::os::unix::fs::FileExt;
    file.write_all_at(&out.meta, 0).map_err(io)?;
    Ok(len)
}

/// The extra devices the image at `path` names, in the order of their ids (what `mount -o
/// device=` must give, one per device).
pub fn devices(path: &std::path::Path) -> std::io::Result<Vec<Device>> {
    use std::io::Read;
    let mut head = vec![0u8; BLOCK];
    std::fs::File::open(path)?.read_exact(&mut head)?;
    let s = &head[SUPER_OFFSET..];
    let features = u32::from_le_bytes(s[80..84].try_into().expect("4 bytes"));
    if features & FEATURE_INCOMPAT_DEVICE_TABLE == 0 {
        return Ok(Vec::new());
    }
    let count = u16::from_le_bytes(s[86..88].try_into().expect("2 bytes")) as usize;
    let slot_off = u16::from_le_bytes(s[88..90].try_into().expect("2 bytes")) as usize;
    if slot_off * DEVT_SLOT != DEVT_OFFSET || count > DEVICES_MAX {
        return Err(std::io::Error::other(
            "a device table this version does not write",
        ));
    }
    Ok(head[DEVT_OFFSET..DEVT_OFFSET + count * DEVT_SLOT]
        .chunks_exact(DEVT_SLOT)
        .map(|d| Device {
            layer: String::from_utf8_lossy(&d[..64])
                .trim_end_matches('\0')
                .to_string(),
            blocks: u32::from_le_bytes(d[64..68].try_into().expect("4 bytes")) as u64,
            table: d[DEVT_DIGEST..DEVT_DIGEST + 32]
                .try_into()
                .expect("32 bytes"),
        })
        .collect())
}

/// Where the image finds a small file's bytes: here they are, they are written later, or they
/// are on an extra device.
enum Held<'a> {
    Now(&'a [u8]),
    Later,
    Device { device: u16, block: u32 },
}

/// An extra device of an image: a layer's small-file file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The layer's digest, hex.
    pub layer: String,
    pub blocks: u64,
    /// The SHA-256 of its table frame: what ties the image to that very file.
    pub table: [u8; 32],
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

/// An inode's xattrs as stored after it (empty: none), with a reference to the shared
/// metacopy mark if `metacopy`.
fn encode_xattrs(
    xattrs: &[XattrEntry],
    metacopy: bool,
    path: &[u8],
) -> Result<Vec<u8>, Unsupported> {
    let mut encoded = Vec::new();
    if !xattrs.is_empty() || metacopy {
        encoded.resize(XATTR_HEADER, 0);
        if metacopy {
            encoded[4] = 1; // h_shared_count
            encoded.extend_from_slice(&METACOPY_ID.to_le_bytes());
        }
        for (index, suffix, value) in xattrs {
            let name_len = u8::try_from(suffix.len())
                .map_err(|_| Unsupported("an xattr name is over 255 bytes".into()))?;
            let value_len = u16::try_from(value.len())
                .map_err(|_| Unsupported("an xattr value is over 64 KiB".into()))?;
            encoded.push(name_len);
            encoded.push(*index);
            encoded.extend_from_slice(&value_len.to_le_bytes());
            encoded.extend_from_slice(suffix);
            encoded.extend_from_slice(value);
            encoded.resize(encoded.len().next_multiple_of(4), 0);
        }
        if encoded.len() > XATTRS_MAX {
            return Err(Unsupported(format!(
                "{}: xattrs of {} bytes (an EROFS inode holds at most {XATTRS_MAX})",
                shown(path),
                encoded.len()
            )));
        }
    }
    Ok(encoded)
}

/// `path` for a message: lossy, and cut short past 200 bytes (a path may run to megabytes).
fn shown(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(&path[..path.len().min(200)]);
    match path.len() > 200 {
        true => format!("{s}… ({} bytes)", path.len()),
        false => s.into_owned(),
    }
}

/// An xattr as EROFS stores it: (prefix index, name after the prefix, value).
type XattrEntry<'a> = (u8, Cow<'a, [u8]>, &'a [u8]);

/// An image xattr as EROFS stores it; `None`
/// for names outside the namespaces Linux lets a filesystem carry.
fn xattr_entry<'a>(name: &'a [u8], value: &'a [u8], escape: bool) -> Option<XattrEntry<'a>> {
    const PREFIXES: [(&[u8], u8); 5] = [
        (b"user.", 1),
        (b"system.posix_acl_access", 2),
        (b"system.posix_acl_default", 3),
        (b"trusted.", 4),
        (b"security.", 6),
    ];
    let (prefix, index) = PREFIXES.iter().find(|(p, _)| name.starts_with(p))?;
    let suffix = &name[prefix.len()..];
    if matches!(index, 2 | 3) && !suffix.is_empty() {
        return None;
    }
    if escape && *index == 4 && suffix.starts_with(b"overlay.") {
        // Escaped: overlayfs shows it as it is.
        return Some((4, Cow::Owned([b"overlay.", suffix].concat()), value));
    }
    Some((*index, Cow::Borrowed(suffix), value))
}

/// A directory's names with their inodes, `.` and `..` included, in EROFS order (bytewise).
fn dir_names(tree: &Tree, ino: u64) -> Vec<(&[u8], u64)> {
    let mut names: Vec<(&[u8], u64)> = tree.children(ino).iter().map(|d| (d.name, d.ino)).collect();
    names.push((b".", ino));
    names.push((b"..", 0));
    names.sort_by(|a, b| a.0.cmp(b.0));
    names
}

/// How a directory's entries fall into blocks: a block holds a run of entries (12-byte
/// records, then their names); `len` is the bytes it uses.
struct DirBlock {
    first: usize,
    count: usize,
    len: usize,
}

fn dir_blocks(names: &[(&[u8], u64)]) -> Vec<DirBlock> {
    let mut blocks = vec![DirBlock {
        first: 0,
        count: 0,
        len: 0,
    }];
    for (i, (name, _)) in names.iter().enumerate() {
        let need = DIRENT_SIZE + name.len();
        let b = blocks.last_mut().expect("one block at least");
        if b.len + need > BLOCK && b.count > 0 {
            blocks.push(DirBlock {
                first: i,
                count: 0,
                len: 0,
            });
        }
        let b = blocks.last_mut().expect("one block at least");
        b.count += 1;
        b.len += need;
    }
    blocks
}

/// A directory's data: its blocks, each full but the last.
fn dir_bytes(tree: &Tree, ino: u64, own: u64, parent: u64, nid_of: &dyn Fn(u64) -> u64) -> Vec<u8> {
    let names = dir_names(tree, ino);
    let blocks = dir_blocks(&names);
    let mut out = Vec::new();
    for (k, b) in blocks.iter().enumerate() {
        let start = out.len();
        let entries = &names[b.first..b.first + b.count];
        let mut nameoff = b.count * DIRENT_SIZE;
        for (name, child) in entries {
            let (nid, ft) = match *name {
                b"." => (own, FT_DIR),
                b".." => (parent, FT_DIR),
                _ => (
                    nid_of(*child),
                    tree.inode(*child).map_or(0, |i| file_type(i.kind)),
                ),
            };
            out.extend_from_slice(&nid.to_le_bytes());
            out.extend_from_slice(&(nameoff as u16).to_le_bytes());
            out.push(ft);
            out.push(0);
            nameoff += name.len();
        }
        for (name, _) in entries {
            out.extend_from_slice(name);
        }
        if k + 1 < blocks.len() {
            out.resize(start + BLOCK, 0); // a full block; the kernel stops at the NULs
        }
    }
    out
}

fn file_type(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::File | EntryKind::Hardlink => FT_REG,
        EntryKind::Dir => FT_DIR,
        EntryKind::Symlink => FT_LNK,
        EntryKind::Char => FT_CHR,
        EntryKind::Block => FT_BLK,
        EntryKind::Fifo => FT_FIFO,
    }
}

fn mode_type(kind: EntryKind) -> u32 {
    match kind {
        EntryKind::File | EntryKind::Hardlink => libc::S_IFREG,
        EntryKind::Dir => libc::S_IFDIR,
        EntryKind::Symlink => libc::S_IFLNK,
        EntryKind::Char => libc::S_IFCHR,
        EntryKind::Block => libc::S_IFBLK,
        EntryKind::Fifo => libc::S_IFIFO,
    }
}

fn write_inode(out: &mut dyn Out, n: &Node, inode: &Inode<'_>) -> std::io::Result<()> {
    let mut b = [0u8; INODE_SIZE];
    b[0..2].copy_from_slice(&(EXTENDED | n.layout << 1).to_le_bytes());
    let icount = match n.xattrs.len() {
        0 => 0,
        len => (len - XATTR_HEADER) / 4 + 1,
    };
    b[2..4].copy_from_slice(&(icount as u16).to_le_bytes());
    let mode = mode_type(inode.kind) | (inode.mode & 0o7777);
    b[4..6].copy_from_slice(&(mode as u16).to_le_bytes());
    b[8..16].copy_from_slice(&n.size.to_le_bytes());
    let i_u = match (inode.kind, n.layout) {
        (EntryKind::Char | EntryKind::Block, _) => {
            let (major, minor) = (inode.dev_major, inode.dev_minor);
            (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12) // Linux's new_encode_dev
        }
        // Chunks of 2^(12 + bits) bytes, as few bits as make one chunk hold the file (at most
        // MAX_FILE, checked in `node`).
        (_, LAYOUT_CHUNK_BASED) => {
            let bits = 64 - (n.size.max(1) - 1).leading_zeros();
            let format = bits.saturating_sub(BLOCK_BITS as u32);
            match n.device {
                Some(_) => format | CHUNK_INDEXES,
                None => format,
            }
        }
        (_, LAYOUT_FLAT_PLAIN | LAYOUT_FLAT_INLINE) if n.out_of_line_blocks() > 0 => n.blkaddr,
        _ => 0,
    };
    b[16..20].copy_from_slice(&i_u.to_le_bytes());
    b[20..24].copy_from_slice(&(n.ino as u32).to_le_bytes());
    b[24..28].copy_from_slice(&inode.uid.to_le_bytes());
    b[28..32].copy_from_slice(&inode.gid.to_le_bytes());
    b[32..40].copy_from_slice(&(inode.mtime as u64).to_le_bytes());
    b[40..44].copy_from_slice(&inode.mtime_nsec.to_le_bytes());
    b[44..48].copy_from_slice(&inode.nlink.max(1).to_le_bytes());
    out.put(n.pos, &b)?;
    out.put(n.pos + INODE_SIZE, &n.xattrs)?;
    match (n.layout, n.device) {
        // One chunk: the file's blocks on its layer's device.
        (LAYOUT_CHUNK_BASED, Some((device, block))) => {
            let mut index = [0u8; 8];
            index[2..4].copy_from_slice(&device.to_le_bytes());
            index[4..8].copy_from_slice(&block.to_le_bytes());
            out.put(n.pos + n.chunk_index_at(), &index)
        }
        (LAYOUT_CHUNK_BASED, None) => {
            // One chunk index: no block (a hole), for the data lives in the lower layer.
            let at = n.pos + INODE_SIZE + n.xattrs.len();
            out.put(at, &NULL_ADDR.to_le_bytes())
        }
        _ => put_data(out, n, &n.data),
    }
}

/// A node's data: its full blocks out of line, the rest inline after its inode and xattrs.
fn put_data(out: &mut dyn Out, n: &Node, data: &[u8]) -> std::io::Result<()> {
    let blocks_len = n.out_of_line_blocks() * BLOCK;
    let in_blocks = blocks_len.min(data.len());
    if in_blocks > 0 {
        out.put(n.blkaddr as usize * BLOCK, &data[..in_blocks])?;
    }
    let tail = &data[in_blocks..];
    match tail.is_empty() {
        true => Ok(()),
        false => out.put(n.pos + INODE_SIZE + n.xattrs.len(), tail),
    }
}

fn write_super(
    out: &mut dyn Out,
    purpose: Purpose,
    root_nid: u16,
    inodes: u64,
    blocks: u32,
    devices: &[Device],
) -> std::io::Result<()> {
    let (volume, mut features) = match purpose {
        Purpose::Metadata => (VOLUME, FEATURE_INCOMPAT_CHUNKED_FILE),
        Purpose::Disk => (DISK_VOLUME, 0),
    };
    let volume = match devices.is_empty() {
        true => volume,
        false => VOLUME_DEVICES,
    };
    if !devices.is_empty() {
        features |= FEATURE_INCOMPAT_DEVICE_TABLE;
        for (i, d) in devices.iter().enumerate() {
            let mut slot = [0u8; DEVT_SLOT];
            let tag = d.layer.as_bytes();
            slot[..tag.len().min(64)].copy_from_slice(&tag[..tag.len().min(64)]);
            slot[64..68].copy_from_slice(&(d.blocks as u32).to_le_bytes());
            slot[DEVT_DIGEST..DEVT_DIGEST + 32].copy_from_slice(&d.table);
            out.put(DEVT_OFFSET + i * DEVT_SLOT, &slot)?;
        }
    }
    let mut s = [0u8; 128];
    s[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    s[12] = BLOCK_BITS;
    s[14..16].copy_from_slice(&root_nid.to_le_bytes());
    s[16..24].copy_from_slice(&inodes.to_le_bytes());
    s[36..40].copy_from_slice(&blocks.to_le_bytes());
    s[40..44].copy_from_slice(&(META_BLOCK as u32).to_le_bytes());
    s[44..48].copy_from_slice(&(XATTR_BLOCK as u32).to_le_bytes());
    s[64..64 + volume.len()].copy_from_slice(volume);
    s[80..84].copy_from_slice(&features.to_le_bytes());
    if !devices.is_empty() {
        s[86..88].copy_from_slice(&(devices.len() as u16).to_le_bytes());
        s[88..90].copy_from_slice(&((DEVT_OFFSET / DEVT_SLOT) as u16).to_le_bytes());
    }
    out.put(SUPER_OFFSET, &s)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{entry, merged};
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::Path;

    /// Every kind of entry, and the corners of the format: directories over several blocks,
    /// long symlinks, large files, large ids, negative times, escaped overlay xattrs.
    fn sample() -> Tree {
        let mut l = vec![entry("d", EntryKind::Dir)];
        for i in 0..700 {
            let mut f = entry(&format!("d/{:0>40}", i), EntryKind::File);
            f.size = i;
            l.push(f);
        }
        let mut big = entry("big", EntryKind::File);
        big.size = 5 << 30;
        big.uid = 100_000;
        big.gid = 200_000;
        big.mtime = -86_400;
        big.mtime_nsec = 123_456_789;
        big.xattrs = vec![
            (b"user.note".to_vec(), b"hello".to_vec()),
            (
                b"security.capability".to_vec(),
                // v2, effective, CAP_NET_BIND_SERVICE permitted (the kernel checks the format)
                [[1, 0, 0, 2, 0, 4, 0, 0], [0; 8]]
                    .concat()
                    .into_iter()
                    .chain([0; 4])
                    .collect(),
            ),
            (b"trusted.overlay.opaque".to_vec(), b"y".to_vec()),
        ];
        l.push(big);
        let mut one = entry("one", EntryKind::File);
        one.size = 1;
        l.push(one);
        let mut empty = entry("empty", EntryKind::File);
        empty.size = 0;
        l.push(empty);
        let mut hard = entry("hard", EntryKind::Hardlink);
        hard.link = b"one".to_vec();
        l.push(hard);
        let mut s = entry("short", EntryKind::Symlink);
        s.link = b"d/x".to_vec();
        l.push(s);
        let mut s = entry("long", EntryKind::Symlink);
        s.link = vec![b'a'; 4000];
        l.push(s);
        let mut c = entry("null", EntryKind::Char);
        (c.dev_major, c.dev_minor) = (1, 3);
        l.push(c);
        let mut b = entry("disk", EntryKind::Block);
        (b.dev_major, b.dev_minor) = (259, 300_000);
        l.push(b);
        l.push(entry("fifo", EntryKind::Fifo));
        // Small files the image holds: sizes around block boundaries (see `held`).
        l.push(entry("small", EntryKind::Dir));
        for (k, size) in SMALL_SIZES.iter().enumerate() {
            let mut f = entry(&format!("small/{size}"), EntryKind::File);
            f.size = *size;
            f.offset = (k as u64 + 1) << 20;
            l.push(f);
        }
        let mut o = entry("o", EntryKind::Dir);
        o.mode = 0o1777;
        o.xattrs = vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())];
        l.push(o);
        merged(&[l]).unwrap()
    }

    const SMALL_SIZES: [u64; 12] = [
        1, 100, 512, 513, 3000, 4095, 4096, 4097, 8192, 12_000, 16_384, 65_536,
    ];

    /// The bytes the image holds for `sample`'s small files, by stream offset.
    fn held(tree: &Tree) -> std::collections::HashMap<u64, Vec<u8>> {
        SMALL_SIZES
            .iter()
            .map(|size| {
                let ino = tree.resolve(format!("/small/{size}").as_bytes()).unwrap();
                let NodeData::File { offset, .. } = tree.inode(ino).unwrap().data else {
                    panic!("not a file")
                };
                let bytes = (0..*size).map(|i| (i * 7 + size) as u8).collect();
                (offset, bytes)
            })
            .collect()
    }

    /// The image of `tree` holding the small files of `small` (bytes by stream offset).
    fn image_holding(tree: &Tree, small: &std::collections::HashMap<u64, Vec<u8>>) -> Vec<u8> {
        let by_offset = |_, off, size| {
            small
                .get(&off)
                .filter(|b: &&Vec<u8>| b.len() as u64 == size)
                .map(|b| &b[..])
        };
        metadata_image(tree, &by_offset).unwrap()
    }

    fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        let mut names = vec![0u8; 65536];
        // SAFETY: valid path and buffer.
        let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        assert!(n >= 0, "listxattr {}", p.display());
        let mut out: Vec<_> = names[..n as usize]
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty() && !n.starts_with(b"system.posix_acl"))
            .map(|name| {
                let cn = CString::new(name).unwrap();
                let mut v = vec![0u8; 65536];
                // SAFETY: valid path, name and buffer.
                let len = unsafe {
                    libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len())
                };
                assert!(
                    len >= 0,
                    "getxattr {} {}: {}",
                    p.display(),
                    String::from_utf8_lossy(name),
                    std::io::Error::last_os_error()
                );
                v.truncate(len as usize);
                (name.to_vec(), v)
            })
            .collect();
        out.sort();
        out
    }

    /// One line per path: what `stat`, `readlink` and the xattr calls say.
    fn listing(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(p) = stack.pop() {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let size = if m.is_dir() { 0 } else { m.size() }; // the format's own business
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let link = match m.file_type().is_symlink() {
                true => std::fs::read_link(&p).unwrap().as_os_str().len(),
                false => 0,
            };
            let dev = match m.file_type().is_block_device() || m.file_type().is_char_device() {
                true => format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev())),
                false => String::new(),
            };
            out.push(format!(
                "/{rel} {:o} {}:{} size={} {}.{} nlink={} {dev} link={link} {:?}",
                m.mode(),
                m.uid(),
                m.gid(),
                size,
                m.mtime(),
                m.mtime_nsec(),
                m.nlink(),
                xattrs(&p)
            ));
            if m.is_dir() {
                let mut names: Vec<_> = std::fs::read_dir(&p)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                names.sort();
                stack.extend(names.into_iter().rev());
            }
        }
        out
    }

    fn mount(src: &Path, dir: &Path, fstype: &str, data: &str) -> std::io::Result<()> {
        let c = |s: &[u8]| CString::new(s).unwrap();
        let (src, dir) = (c(src.as_os_str().as_bytes()), c(dir.as_os_str().as_bytes()));
        let (fstype, data) = (c(fstype.as_bytes()), c(data.as_bytes()));
        // SAFETY: valid NUL-terminated strings.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                dir.as_ptr(),
                fstype.as_ptr(),
                libc::MS_RDONLY,
                data.as_ptr().cast(),
            )
        };
        match r {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    fn umount(dir: &Path) {
        let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }

    /// A layer's small-file table of `small`'s bytes, saved beside `dir/<hex>.idx` in the
    /// current format (`v2`: the second), and opened.
    fn table_of(
        dir: &Path,
        small: &std::collections::HashMap<u64, Vec<u8>>,
        v2: bool,
    ) -> crate::index::small::SmallIndex {
        use crate::index::small::{SmallFiles, SmallIndex};
        let index = dir.join(format!("{}.idx", "ab".repeat(32)));
        let mut table = SmallFiles::default();
        let mut files: Vec<_> = small.iter().collect();
        files.sort();
        for (offset, bytes) in &files {
            table.push(**offset, bytes);
        }
        match v2 {
            true => table.save_v2(&index),
            false => table.save(&index).unwrap(),
        }
        SmallIndex::open(&index).unwrap().unwrap()
    }

    /// Written to a file from a layer's small-file table of an earlier format, the image is
    /// the one made in memory from the same bytes, with as many of them as the cap lets in;
    /// from a table of the current format, the one made in memory from it, naming it as a
    /// device.
    #[test]
    fn written_from_tables_as_made_in_memory() {
        let tree = sample();
        let small = held(&tree);
        let dir = tempfile::tempdir().unwrap();
        let tables = [Some(table_of(dir.path(), &small, true))];
        for cap in [u64::MAX, 20_000, 0] {
            let given = std::cell::Cell::new(0u64);
            let by_offset = |_, off, size| {
                let b = small
                    .get(&off)
                    .filter(|b: &&Vec<u8>| b.len() as u64 == size)?;
                given.set(given.get() + size);
                (given.get() <= cap).then_some(&b[..])
            };
            let want = metadata_image(&tree, &by_offset).unwrap();
            let path = dir.path().join("meta.erofs");
            let f = std::fs::File::create(&path).unwrap();
            let len = write_metadata_image(&tree, &tables, cap, &f).unwrap();
            let got = std::fs::read(&path).unwrap();
            assert_eq!(len as usize, got.len());
            assert!(got == want, "cap {cap}: the images differ");
            let in_memory = metadata_image_with_tables(&tree, &tables, cap).unwrap();
            assert!(in_memory == want, "cap {cap}: in memory, the images differ");
            assert_eq!(devices(&path).unwrap(), vec![]);
        }
        // The current format: a device, whose files the image does not copy.
        let tables = [Some(table_of(dir.path(), &small, false))];
        let path = dir.path().join("dev.erofs");
        let f = std::fs::File::create(&path).unwrap();
        write_metadata_image(&tree, &tables, 0, &f).unwrap();
        let got = std::fs::read(&path).unwrap();
        assert!(got == metadata_image_with_tables(&tree, &tables, 0).unwrap());
        let copied = metadata_image(&tree, &|_, off, _| small.get(&off).map(|b| &b[..])).unwrap();
        assert!(
            got.len() < copied.len(),
            "{} vs {}",
            got.len(),
            copied.len()
        );
        let t = tables[0].as_ref().unwrap();
        let named = devices(&path).unwrap();
        assert_eq!(named.len(), 1);
        assert_eq!(named[0].layer, "ab".repeat(32));
        assert_eq!(named[0].table, t.table_digest());
        assert_eq!(Some(named[0].blocks), t.device_blocks());
        // No table: as made in memory with none held.
        let f = tempfile::tempfile().unwrap();
        write_metadata_image(&tree, &[None], u64::MAX, &f).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut got).unwrap();
        assert!(got == metadata_image(&tree, &|_, _, _| None).unwrap());
    }

    /// More layers with small files than block 0 names devices for, among them one of tiny
    /// files only (no device), one of the second format (copied in), the same layer twice (one
    /// file, two positions), a small file whited out above, small files with xattrs of every
    /// length mod 8 (and an ACL) before their chunk index, and a hardlink to one: fsck.erofs
    /// and the kernel, given the devices the image names, read every file as kept.
    #[allow(clippy::type_complexity)] // what each file must read back, spelled out
    #[test]
    fn many_layers_devices_read_back() {
        use crate::index::small::{SmallFiles, SmallIndex};
        const LAYERS: usize = 28;
        let bytes = |layer: usize, offset: u64, size: u64| -> Vec<u8> {
            (0..size)
                .map(|i| (i * 13 + offset / 512 + layer as u64 * 31) as u8)
                .collect()
        };
        // The same layer at positions 3 and 4: one table file.
        let source = |k: usize| if k == 4 { 3 } else { k };
        let mut layers = Vec::new();
        let mut want: Vec<(String, Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>)> = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        let mut tables = Vec::new();
        let mut paths = std::collections::HashMap::new();
        for k in 0..LAYERS {
            let s = source(k);
            let mut l = vec![entry(&format!("l{s}"), EntryKind::Dir)];
            let mut files = Vec::new();
            let sizes: &[u64] = match s {
                1 => &[1, 200, 512],
                0 => &[513, 4096, 4097, 65_536, 600, 700, 800, 900, 1000, 1100],
                _ => &[600 + s as u64 * 37, 9000],
            };
            for (i, &size) in sizes.iter().enumerate() {
                let mut f = entry(&format!("l{s}/f{i}"), EntryKind::File);
                f.size = size;
                f.offset = (i as u64 + 1) * 100_000 + 512;
                if s == 0 {
                    // xattr bodies of 4 bytes more at each step: every alignment of the index.
                    f.xattrs = vec![(b"user.n".to_vec(), vec![b'v'; i * 3])];
                    if i == 1 {
                        let acl: Vec<u8> = [
                            &2u32.to_le_bytes()[..],
                            &[1, 0, 6, 0],
                            &u32::MAX.to_le_bytes(),
                            &[4, 0, 4, 0],
                            &u32::MAX.to_le_bytes(),
                            &[0x20, 0, 4, 0],
                            &u32::MAX.to_le_bytes(),
                        ]
                        .concat();
                        f.xattrs.push((b"system.posix_acl_access".to_vec(), acl));
                    }
                }
                files.push((f.offset, bytes(s, f.offset, size)));
                let mut x: Vec<_> = f.xattrs.clone();
                x.retain(|(n, _)| !n.starts_with(b"system."));
                want.push((format!("l{s}/f{i}"), bytes(s, f.offset, size), x));
                l.push(f);
            }
            if s == 0 {
                let mut h = entry("l0/hard", EntryKind::Hardlink);
                h.link = b"l0/f2".to_vec();
                l.push(h);
                let w = want.iter().find(|w| w.0 == "l0/f2").unwrap().clone();
                want.push(("l0/hard".into(), w.1, w.2));
            }
            if k == 6 {
                // Layer 5's first file whited out.
                l.push(entry("l5/.wh.f0", EntryKind::File));
                want.retain(|w| w.0 != "l5/f0");
            }
            layers.push(l);
            let index = dir.path().join(format!("{:064x}.idx", s + 1));
            if k != 4 {
                let mut t = SmallFiles::default();
                for (o, b) in &files {
                    t.push(*o, b);
                }
                match s {
                    2 => t.save_v2(&index),
                    _ => t.save(&index).unwrap(),
                }
                paths.insert(format!("{:064x}", s + 1), SmallFiles::path(&index));
            }
            tables.push(SmallIndex::open(&index).unwrap());
        }
        want.sort();
        want.dedup_by(|a, b| a.0 == b.0);
        let tree = merged(&layers).unwrap();
        let image = dir.path().join("meta.erofs");
        let f = std::fs::File::create(&image).unwrap();
        write_metadata_image(&tree, &tables, u64::MAX, &f).unwrap();
        drop(f);
        assert!(
            std::fs::read(&image).unwrap()
                == metadata_image_with_tables(&tree, &tables, u64::MAX).unwrap()
        );
        let named = devices(&image).unwrap();
        assert_eq!(named.len(), DEVICES_MAX);
        assert!(
            named.iter().all(|d| d.layer != format!("{:064x}", 2)),
            "tiny only: no device"
        );
        assert!(
            named.iter().all(|d| d.layer != format!("{:064x}", 3)),
            "second format"
        );
        let device_paths: Vec<_> = named.iter().map(|d| paths[&d.layer].clone()).collect();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let erofs = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("erofs"));
        if !root || !erofs {
            eprintln!("kernel part skipped: needs root and EROFS (root {root}, erofs {erofs})");
            return;
        }
        let mut fsck = std::process::Command::new("fsck.erofs");
        for d in &device_paths {
            fsck.arg(format!("--device={}", d.display()));
        }
        match fsck.arg("--extract").arg(&image).output() {
            Ok(out) => assert!(out.status.success(), "fsck.erofs: {out:?}"),
            Err(e) => eprintln!("fsck.erofs not run: {e}"),
        }
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let options: Vec<_> = device_paths
            .iter()
            .map(|d| format!("device={}", d.display()))
            .collect();
        mount(&image, &mnt, "erofs", &options.join(",")).unwrap();
        let result = std::panic::catch_unwind(|| {
            for (path, data, x) in &want {
                let p = mnt.join(path);
                assert!(
                    std::fs::read(&p).unwrap() == *data,
                    "{path}: the bytes differ"
                );
                assert_eq!(&xattrs(&p), x, "{path}");
            }
            assert!(!mnt.join("l5/f0").exists());
            let ino = |p: &str| std::fs::metadata(mnt.join(p)).unwrap().ino();
            assert_eq!(ino("l0/hard"), ino("l0/f2"));
            assert_eq!(std::fs::metadata(mnt.join("l0/f2")).unwrap().nlink(), 2);
        });
        umount(&mnt);
        result.unwrap_or_else(|e| std::panic::resume_unwind(e));
    }

    /// An image naming devices is not taken for its own by a version before devices (which
    /// would mount it without them and serve the image's metadata blocks as the files' bytes);
    /// one naming none still is, and this version takes both.
    #[test]
    fn an_image_with_devices_is_not_current_to_earlier_versions() {
        // `is_current` as the version before devices had it.
        fn earlier_is_current(path: &Path) -> bool {
            let head = std::fs::read(path).unwrap();
            let s = &head[SUPER_OFFSET..];
            let blocks = u32::from_le_bytes(s[36..40].try_into().unwrap()) as u64;
            s[..4] == MAGIC.to_le_bytes()
                && s[64..80].starts_with(b"bux-fuse 2")
                && s[64 + 10] == 0
                && blocks * BLOCK as u64 == head.len() as u64
        }
        let tree = sample();
        let small = held(&tree);
        let dir = tempfile::tempdir().unwrap();
        for (v2, named) in [(true, 0), (false, 1)] {
            let tables = [Some(table_of(dir.path(), &small, v2))];
            let path = dir.path().join("meta.erofs");
            let f = std::fs::File::create(&path).unwrap();
            write_metadata_image(&tree, &tables, u64::MAX, &f).unwrap();
            assert_eq!(devices(&path).unwrap().len(), named);
            assert!(is_current(&path), "v2 {v2}");
            assert_eq!(earlier_is_current(&path), named == 0, "v2 {v2}");
        }
    }

    #[test]
    fn layout_keeps_inline_data_within_a_block() {
        let tree = sample();
        let small = held(&tree);
        let img = image_holding(&tree, &small);
        assert_eq!(img.len() % BLOCK, 0);
        assert_eq!(
            u32::from_le_bytes(img[1024..1028].try_into().unwrap()),
            MAGIC
        );
        let blocks = u32::from_le_bytes(img[1060..1064].try_into().unwrap()) as usize;
        assert_eq!(blocks * BLOCK, img.len());
        // Writing is deterministic: the same tree, the same bytes (and so stable inode numbers).
        assert_eq!(img, image_holding(&tree, &small));
        // Without the small files' bytes, it is smaller by at least theirs.
        let lean = metadata_image(&tree, &|_, _, _| None).unwrap();
        let bytes: u64 = SMALL_SIZES.iter().sum();
        assert!(lean.len() as u64 + bytes <= img.len() as u64);
    }

    #[test]
    fn what_overlayfs_or_one_chunk_cannot_carry_is_refused() {
        let mut c = entry("w", EntryKind::Char);
        (c.dev_major, c.dev_minor) = (0, 0);
        let tree = merged(&[vec![c]]).unwrap();
        assert!(metadata_image(&tree, &|_, _, _| None)
            .unwrap_err()
            .0
            .contains("whiteout"));
        // As is a file beyond what one chunk describes (a sparse entry may claim any size).
        let mut huge = entry("huge", EntryKind::File);
        huge.size = MAX_FILE + 1;
        let tree = merged(&[vec![huge]]).unwrap();
        assert!(metadata_image(&tree, &|_, _, _| None)
            .unwrap_err()
            .0
            .contains("8 TiB"));
        // And a name no Linux filesystem can carry (a tar may hold one).
        let long = entry(&"n".repeat(NAME_MAX + 1), EntryKind::File);
        let tree = merged(&[vec![long]]).unwrap();
        assert!(metadata_image(&tree, &|_, _, _| None)
            .unwrap_err()
            .0
            .contains("256 bytes"));
        let mut largest = entry("largest", EntryKind::File);
        largest.size = MAX_FILE;
        assert!(metadata_image(&merged(&[vec![largest]]).unwrap(), &|_, _, _| None).is_ok());
    }

    /// A path of `len` bytes (with its leading `/`): directories of 250 bytes, then the file.
    fn long_path(len: usize) -> String {
        let dirs = (len - 2) / 251;
        let mut p: Vec<String> = (0..dirs).map(|i| format!("{i:a>250}")).collect();
        p.push("f".repeat(len - 1 - dirs * 251));
        let p = p.join("/");
        assert_eq!(p.len() + 1, len);
        p
    }

    /// Xattrs of a file with data at `/x`, encoded in `len` bytes (a multiple of 4), header,
    /// metacopy reference and redirect (24 bytes) included.
    fn xattrs_of_len(len: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut left = len - XATTR_HEADER - 4 - 24;
        let mut out = Vec::new();
        while left > 0 {
            // An entry: 4 bytes, a one-byte name, the value, padded to 4 bytes.
            let entry = left.min(65_536);
            let value = if entry == left { entry - 5 } else { 65_531 };
            out.push((
                format!("user.{}", out.len()).into_bytes(),
                vec![b'v'; value],
            ));
            left -= entry;
        }
        out
    }

    /// What EROFS inodes or overlayfs redirects cannot carry: inline xattrs past the 16 bits
    /// that count them (a PAX header may hold a MiB of xattrs), and a redirect path over
    /// PATH_MAX (which overlayfs cannot look up: the file would fail to open).
    #[test]
    fn what_an_inode_or_a_redirect_cannot_carry_is_refused() {
        let refused = |tree: &Tree| match metadata_image(tree, &|_, _, _| None) {
            Ok(img) => panic!("written ({} bytes) rather than refused", img.len()),
            Err(e) => e.0,
        };
        let mut f = entry("x", EntryKind::File);
        f.size = 1 << 20;
        f.xattrs = xattrs_of_len(XATTR_HEADER + 4 * u16::MAX as usize);
        let why = refused(&merged(&[vec![f.clone()]]).unwrap());
        assert!(why.contains("xattrs") && why.contains("/x"), "{why}");
        // As many as the count holds are written (and read back: see below).
        f.xattrs = xattrs_of_len(XATTR_HEADER + 4 * (u16::MAX as usize - 1));
        let most = merged(&[vec![f]]).unwrap();
        let img = metadata_image(&most, &|_, _, _| None).unwrap();
        // A redirect: at most PATH_MAX - 1 bytes.
        let mut long = entry(&long_path(libc::PATH_MAX as usize), EntryKind::File);
        long.size = 1 << 20;
        let why = refused(&merged(&[vec![long.clone()]]).unwrap());
        assert!(why.contains("path of 4096 bytes"), "{why}");
        long.path = long_path(libc::PATH_MAX as usize - 1).into_bytes();
        assert!(metadata_image(&merged(&[vec![long.clone()]]).unwrap(), &|_, _, _| None).is_ok());
        // A file the image holds has no redirect, whatever its path.
        long.path = long_path(libc::PATH_MAX as usize + 100).into_bytes();
        long.size = 3;
        let tree = merged(&[vec![long]]).unwrap();
        assert!(metadata_image(&tree, &|_, _, size| Some(&b"abc"[..size as usize])).is_ok());

        // The kernel reads the most xattrs back, and the redirect after them.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let erofs = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("erofs"));
        if !root || !erofs {
            eprintln!("kernel read skipped: needs root and EROFS (root {root}, erofs {erofs})");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (image, meta) = (tmp.path().join("meta.erofs"), tmp.path().join("meta"));
        std::fs::write(&image, &img).unwrap();
        std::fs::create_dir(&meta).unwrap();
        if let Ok(out) = std::process::Command::new("fsck.erofs")
            .arg(&image)
            .output()
        {
            assert!(out.status.success(), "fsck.erofs: {out:?}");
        }
        mount(&image, &meta, "erofs", "").unwrap();
        let seen = std::panic::catch_unwind(|| xattrs(&meta.join("x")));
        umount(&meta);
        let mut want: Vec<_> = most
            .inode(most.resolve(b"/x").unwrap())
            .unwrap()
            .xattrs
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        want.push((b"trusted.overlay.metacopy".to_vec(), Vec::new()));
        want.push((b"trusted.overlay.redirect".to_vec(), b"/x".to_vec()));
        want.sort();
        assert!(seen.unwrap() == want, "the xattrs read back differ");
    }

    /// The kernel reads the image as the tree says, through the overlay that serves it, with
    /// data from a data-only lower layer.
    #[test]
    fn the_kernel_reads_the_tree_back_through_an_overlay() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let erofs = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("erofs"));
        if !root || !erofs {
            eprintln!("skipped: needs root and EROFS (root {root}, erofs {erofs})");
            return;
        }
        for on_device in [false, true] {
            kernel_reads_back(on_device);
        }
    }

    /// The image of the sample tree, its small files copied in or (`on_device`) on a layer's
    /// small-file file as an extra device, read back by the kernel.
    fn kernel_reads_back(on_device: bool) {
        let tree = sample();
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("meta.erofs");
        let small = held(&tree);
        let device = match on_device {
            false => {
                std::fs::write(&image, image_holding(&tree, &small)).unwrap();
                None
            }
            true => {
                let tables = [Some(table_of(tmp.path(), &small, false))];
                let f = std::fs::File::create(&image).unwrap();
                write_metadata_image(&tree, &tables, u64::MAX, &f).unwrap();
                Some(tmp.path().join(format!("{}.small", "ab".repeat(32))))
            }
        };
        // erofs-utils' own checker, an independent reader (scripts/setup.sh installs it).
        let mut fsck = std::process::Command::new("fsck.erofs");
        if let Some(d) = &device {
            fsck.arg(format!("--device={}", d.display()));
        }
        match fsck.arg(&image).output() {
            Ok(out) => assert!(out.status.success(), "fsck.erofs: {out:?}"),
            Err(e) => eprintln!("fsck.erofs not run: {e}"),
        }
        // The data-only layer: each file's bytes at its path (here: its path, repeated).
        let data = tmp.path().join("data");
        let (meta, merged) = (tmp.path().join("meta"), tmp.path().join("merged"));
        for d in [&data, &meta, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut expected = Vec::new();
        for line in tree.dump().lines() {
            let path = line.split(' ').next().unwrap();
            let ino = tree.resolve(path.as_bytes()).unwrap();
            let i = tree.inode(ino).unwrap();
            if let (EntryKind::File, NodeData::File { offset, .. }) = (i.kind, i.data) {
                if let Some(bytes) = small.get(&offset) {
                    // Not in the data layer: only the image has these.
                    expected.push((path.to_string(), bytes.clone()));
                    continue;
                }
            }
            if i.kind == EntryKind::File && i.size > 0 {
                let p = data.join(&path[1..]);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                let f = std::fs::File::create(&p).unwrap();
                if i.size < 1 << 20 {
                    let bytes: Vec<u8> = path.bytes().cycle().take(i.size as usize).collect();
                    std::fs::write(&p, &bytes).unwrap();
                    expected.push((path.to_string(), bytes));
                } else {
                    f.set_len(i.size).unwrap();
                }
            }
        }
        let devices = device.map(|d| format!("device={}", d.display()));
        mount(&image, &meta, "erofs", &devices.unwrap_or_default()).unwrap();
        let opts = format!(
            "metacopy=on,redirect_dir=follow,lowerdir={}::{}",
            meta.display(),
            data.display()
        );
        let mounted =
            mount(Path::new("overlay"), &merged, "overlay", &opts).map_err(|e| e.to_string());
        let result = std::panic::catch_unwind(|| {
            mounted.unwrap();
            let seen = listing(&merged);
            // The same listing from the tree itself, extracted to a plain directory.
            let want: Vec<String> = tree_listing(&tree);
            let differ: Vec<_> = seen
                .iter()
                .zip(&want)
                .filter(|(a, b)| a != b)
                .take(3)
                .collect();
            assert!(differ.is_empty(), "kernel vs tree: {differ:#?}");
            assert_eq!(seen.len(), want.len());
            for (path, bytes) in &expected {
                assert_eq!(
                    &std::fs::read(merged.join(&path[1..])).unwrap(),
                    bytes,
                    "{path}"
                );
            }
            let ino = |p: &str| std::fs::metadata(merged.join(p)).unwrap().ino();
            assert_eq!(ino("one"), ino("hard"));
        });
        umount(&merged);
        umount(&meta);
        result.unwrap_or_else(|e| std::panic::resume_unwind(e));
    }

    /// What [`listing`] should print for `tree`.
    fn tree_listing(tree: &Tree) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![(ROOT_INO, String::new())];
        while let Some((ino, rel)) = stack.pop() {
            let i = tree.inode(ino).unwrap();
            let dev = match i.kind {
                EntryKind::Char | EntryKind::Block => format!("{}:{}", i.dev_major, i.dev_minor),
                _ => String::new(),
            };
            let link = match i.data {
                NodeData::Symlink(t) => t.len(),
                _ => 0,
            };
            let mut x: Vec<(Vec<u8>, Vec<u8>)> = i
                .xattrs
                .iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            x.sort();
            out.push(format!(
                "/{rel} {:o} {}:{} size={} {}.{} nlink={} {dev} link={link} {x:?}",
                mode_type(i.kind) | i.mode,
                i.uid,
                i.gid,
                if i.kind == EntryKind::Dir { 0 } else { i.size },
                i.mtime,
                i.mtime_nsec,
                i.nlink,
            ));
            let mut children: Vec<_> = tree.children(ino).iter().collect();
            children.sort_by(|a, b| a.name.cmp(b.name));
            for d in children.into_iter().rev() {
                let name = String::from_utf8_lossy(d.name);
                let p = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((d.ino, p));
            }
        }
        out
    }
}
