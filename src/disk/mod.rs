//! The merged tree as a block device: one EROFS image holding every directory, inode and byte
//! of the image, for a guest to mount as its root over virtio-blk (libkrun's
//! `krun_add_disk` + `krun_set_root_disk_remount`), so that its own kernel answers lookups,
//! `stat` and `readdir` from cached blocks instead of asking the host for each.
//!
//! Nothing is converted ahead: [`crate::tree::erofs::disk_image`] lays the tree out — the
//! metadata (a few MiB for tens of thousands of files) is built in memory, and every regular
//! file gets a run of blocks in the walk's order — and a block of file data is produced when it
//! is read, through the same [`LayerReader`](crate::index::LayerReader)s as a file read (so a
//! lazy image's bytes are fetched by range and verified first). Where a block lies is a binary
//! search in [`Disk::files`]. The layout depends on the tree only, so every mount and every
//! export of one manifest gives the same bytes.
//!
//! Served by [`DiskFs`] (a FUSE directory holding `root.erofs`), or written whole by
//! [`export`].

use std::io;
use std::ops::Range;

use crate::tree::erofs::{DiskFile, DISK_BLOCK};
use crate::tree::Tree;

mod export;
mod fs;
pub use export::export;
pub use fs::{DiskFs, DISK_FILE};

/// Reads a file's data for a disk: (tree inode, offset in the file, bytes to fill).
pub type ReadFile<'a> = dyn FnMut(u64, u64, &mut [u8]) -> io::Result<()> + 'a;

/// An image's disk: its metadata bytes, and where each file's data lies.
pub struct Disk {
    head: Vec<u8>,
    files: Vec<DiskFile>,
    len: u64,
}

/// What one stretch of a disk holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes of the metadata at these offsets.
    Head(Range<usize>),
    /// Bytes of a file's data.
    File {
        /// The file's inode in the tree.
        ino: u64,
        /// Where in the file they start.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// Zeros (the rest of a file's last block).
    Zero(u64),
}

impl Disk {
    /// The disk of `tree`; fails for a tree EROFS cannot hold (a name over 255 bytes, over
    /// 16 TiB of blocks, an inode's xattrs over 256 KiB).
    pub fn new(tree: &Tree) -> Result<Disk, String> {
        let layout = crate::tree::erofs::disk_image(tree).map_err(|e| e.0)?;
        Ok(Disk {
            head: layout.head,
            files: layout.files,
            len: layout.blocks * DISK_BLOCK,
        })
    }

    /// The image's length in bytes (a whole number of 4 KiB blocks).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the image is empty (never: it has a superblock).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The metadata's bytes (the image's start).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Bytes of metadata (read from memory; the rest is file data).
    pub fn head_len(&self) -> u64 {
        self.head.len() as u64
    }

    /// The regular files with data, by first block.
    pub fn files(&self) -> &[DiskFile] {
        &self.files
    }

    /// What `[offset, offset + len)` holds, in order (clamped to the image).
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let end = offset.saturating_add(len).min(self.len);
        let mut pos = offset;
        let mut out = Vec::new();
        while pos < end {
            if pos < self.head.len() as u64 {
                let to = end.min(self.head.len() as u64);
                out.push(Piece::Head(pos as usize..to as usize));
                pos = to;
                continue;
            }
            let block = pos / DISK_BLOCK;
            // The file whose blocks start at or before this one (files follow the head and
            // each other without gaps but for the padding of their last block).
            let k = self
                .files
                .partition_point(|f| (f.first_block as u64) <= block);
            let Some(f) = k.checked_sub(1).map(|k| &self.files[k]) else {
                // No file starts at or before it: only possible past the head in an image
                // with no files, which ends at the head.
                out.push(Piece::Zero(end - pos));
                break;
            };
            let start = f.first_block as u64 * DISK_BLOCK;
            let data_end = start + f.size;
            let blocks_end = start + f.size.div_ceil(DISK_BLOCK) * DISK_BLOCK;
            if pos < data_end {
                let to = end.min(data_end);
                out.push(Piece::File {
                    ino: f.ino,
                    offset: pos - start,
                    len: to - pos,
                });
                pos = to;
            } else {
                // The padding of its last block: the next file starts at the next block (and
                // the last one ends the image), so `pos` is inside it.
                debug_assert!(pos < blocks_end);
                let to = end.min(blocks_end).max(pos + 1);
                out.push(Piece::Zero(to - pos));
                pos = to;
            }
        }
        out
    }

    /// Fills `buf` with the image's bytes at `offset`, reading files' data through `read`
    /// (tree inode, offset in the file, bytes to fill). Returns how many bytes it filled:
    /// `buf.len()`, or fewer at the end of the image.
    pub fn read_at(&self, offset: u64, buf: &mut [u8], read: &mut ReadFile) -> io::Result<usize> {
        self.read_pieces(&self.pieces(offset, buf.len() as u64), buf, read)
    }

    /// [`Disk::read_at`] of what [`Disk::pieces`] gave (`buf` at least as long as they are).
    pub fn read_pieces(
        &self,
        pieces: &[Piece],
        buf: &mut [u8],
        read: &mut ReadFile,
    ) -> io::Result<usize> {
        let mut at = 0usize;
        for piece in pieces.iter().cloned() {
            match piece {
                Piece::Head(r) => {
                    let n = r.len();
                    buf[at..at + n].copy_from_slice(&self.head[r]);
                    at += n;
                }
                Piece::File {
                    ino,
                    offset: from,
                    len,
                } => {
                    let n = len as usize;
                    read(ino, from, &mut buf[at..at + n])?;
                    at += n;
                }
                Piece::Zero(len) => {
                    let n = len as usize;
                    buf[at..at + n].fill(0);
                    at += n;
                }
            }
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{EntryKind, TarEntry};

    fn entry(path: &str, kind: EntryKind, size: u64, offset: u64) -> TarEntry {
        let mut e = crate::tree::test_support::entry(path, kind);
        e.size = size;
        e.offset = offset;
        e
    }

    /// A tree whose files' bytes are a function of (offset in the layer stream).
    fn sample() -> Tree {
        let l = vec![
            entry("etc", EntryKind::Dir, 0, 0),
            entry("etc/a", EntryKind::File, 5000, 0),
            entry("etc/empty", EntryKind::File, 0, 0),
            entry("etc/b", EntryKind::File, 4096, 10_000),
            entry("usr", EntryKind::Dir, 0, 0),
            entry("usr/c", EntryKind::File, 1, 20_000),
        ];
        crate::tree::test_support::merged(&[l]).unwrap()
    }

    fn byte(stream_off: u64) -> u8 {
        (stream_off % 251) as u8
    }

    /// Reads through the tree the way the server does: (inode, offset) → the layer's bytes.
    fn reader(tree: &Tree) -> impl FnMut(u64, u64, &mut [u8]) -> io::Result<()> + '_ {
        move |ino, off, buf| {
            let i = tree.inode(ino).unwrap();
            let crate::tree::NodeData::File { offset, .. } = i.data else {
                panic!("not a file")
            };
            assert!(off + buf.len() as u64 <= i.size, "read past the file");
            for (k, b) in buf.iter_mut().enumerate() {
                *b = byte(offset + off + k as u64);
            }
            Ok(())
        }
    }

    #[test]
    fn files_lie_in_whole_blocks_after_the_head_and_read_back() {
        let tree = sample();
        let disk = Disk::new(&tree).unwrap();
        assert_eq!(disk.len() % DISK_BLOCK, 0);
        assert_eq!(disk.head_len() % DISK_BLOCK, 0);
        // Three files with data (the empty one has no blocks): 2 + 1 + 1 blocks.
        assert_eq!(disk.files().len(), 3);
        assert_eq!(disk.len(), disk.head_len() + 4 * DISK_BLOCK);
        assert_eq!(
            disk.files()[0].first_block as u64 * DISK_BLOCK,
            disk.head_len()
        );
        // Read the whole image in odd-sized pieces: each file's bytes where the table says.
        let mut whole = vec![0u8; disk.len() as usize];
        let mut read = reader(&tree);
        let mut at = 0;
        for step in [1usize, 4095, 4097, 12_345, usize::MAX].iter().cycle() {
            if at >= whole.len() {
                break;
            }
            let n = (*step).min(whole.len() - at);
            let got = disk
                .read_at(at as u64, &mut whole[at..at + n], &mut read)
                .unwrap();
            assert_eq!(got, n);
            at += n;
        }
        for f in disk.files() {
            let i = tree.inode(f.ino).unwrap();
            let crate::tree::NodeData::File { offset, .. } = i.data else {
                panic!()
            };
            let start = f.first_block as usize * DISK_BLOCK as usize;
            for k in 0..f.size as usize {
                assert_eq!(whole[start + k], byte(offset + k as u64));
            }
            let padded = f.size.div_ceil(DISK_BLOCK) as usize * DISK_BLOCK as usize;
            assert!(whole[start + f.size as usize..start + padded]
                .iter()
                .all(|b| *b == 0));
        }
        // Past the end: nothing.
        let mut buf = [1u8; 10];
        assert_eq!(disk.read_at(disk.len(), &mut buf, &mut read).unwrap(), 0);
        assert_eq!(
            disk.read_at(disk.len() - 4, &mut buf, &mut read).unwrap(),
            4
        );
    }

    #[test]
    fn the_same_tree_gives_the_same_image() {
        let (a, b) = (Disk::new(&sample()).unwrap(), Disk::new(&sample()).unwrap());
        assert_eq!(a.head, b.head);
        assert_eq!(a.files, b.files);
        assert_eq!(a.len, b.len);
    }
}
