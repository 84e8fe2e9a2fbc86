//! The on-disk encodings: an inode and its inline data, xattrs (the metacopy mark shared,
//! `trusted.overlay.*` escaped), directory blocks (sorted names, dirents then names), the
//! superblock.

use super::*;

/// An inode's xattrs as stored after it (empty: none), with a reference to the shared
/// metacopy mark if `metacopy`.
pub(super) fn encode_xattrs(
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
pub(super) fn shown(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(&path[..path.len().min(200)]);
    match path.len() > 200 {
        true => format!("{s}… ({} bytes)", path.len()),
        false => s.into_owned(),
    }
}

/// An xattr as EROFS stores it: (prefix index, name after the prefix, value).
pub(super) type XattrEntry<'a> = (u8, Cow<'a, [u8]>, &'a [u8]);

/// An image xattr as EROFS stores it; `None`
/// for names outside the namespaces Linux lets a filesystem carry.
pub(super) fn xattr_entry<'a>(
    name: &'a [u8],
    value: &'a [u8],
    escape: bool,
) -> Option<XattrEntry<'a>> {
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
pub(super) fn dir_names(tree: &Tree, ino: u64) -> Vec<(&[u8], u64)> {
    let mut names: Vec<(&[u8], u64)> = tree.children(ino).iter().map(|d| (d.name, d.ino)).collect();
    names.push((b".", ino));
    names.push((b"..", 0));
    names.sort_by(|a, b| a.0.cmp(b.0));
    names
}

/// How a directory's entries fall into blocks: a block holds a run of entries (12-byte
/// records, then their names); `len` is the bytes it uses.
pub(super) struct DirBlock {
    pub(super) first: usize,
    pub(super) count: usize,
    pub(super) len: usize,
}

pub(super) fn dir_blocks(names: &[(&[u8], u64)]) -> Vec<DirBlock> {
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
pub(super) fn dir_bytes(
    tree: &Tree,
    ino: u64,
    own: u64,
    parent: u64,
    nid_of: &dyn Fn(u64) -> u64,
) -> Vec<u8> {
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

pub(super) fn file_type(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::File | EntryKind::Hardlink => FT_REG,
        EntryKind::Dir => FT_DIR,
        EntryKind::Symlink => FT_LNK,
        EntryKind::Char => FT_CHR,
        EntryKind::Block => FT_BLK,
        EntryKind::Fifo => FT_FIFO,
    }
}

pub(super) fn mode_type(kind: EntryKind) -> u32 {
    match kind {
        EntryKind::File | EntryKind::Hardlink => libc::S_IFREG,
        EntryKind::Dir => libc::S_IFDIR,
        EntryKind::Symlink => libc::S_IFLNK,
        EntryKind::Char => libc::S_IFCHR,
        EntryKind::Block => libc::S_IFBLK,
        EntryKind::Fifo => libc::S_IFIFO,
    }
}

pub(super) fn write_inode(out: &mut dyn Out, n: &Node, inode: &Inode<'_>) -> std::io::Result<()> {
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
pub(super) fn put_data(out: &mut dyn Out, n: &Node, data: &[u8]) -> std::io::Result<()> {
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

pub(super) fn write_super(
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
