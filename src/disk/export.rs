//! A disk written whole to a plain file: for VMMs that want a file of their own, and as the
//! check that the served disk is what it should be (the two read the files' data through the
//! same readers, each its own way: here file by file, there block range by block range).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Disk;
use crate::fs::ImageFs;
use crate::index::SpanCache;
use crate::mount::{open_image, MountOptions, OpenedImage};
use crate::tree::erofs::DISK_BLOCK;
use crate::tree::NodeData;
use crate::{Error, Result, Store};

/// Bytes read and written at a time.
const CHUNK: usize = 1 << 20;

/// Writes the stored image `reference` as an EROFS disk image to `path` — the bytes
/// `bux-fuse mount --disk` serves — through a temporary file renamed over `path` once whole,
/// so a failure leaves no partial image. Sparse files' holes and blocks' padding are left as
/// holes. The file's data is read file by file through the same readers as the served disk's
/// (`tests/conformance.rs` checks the two agree byte for byte).
/// `progress` is told (bytes done, bytes in all) as it goes. Lazily pulled layers are fetched
/// as they are read (`opts.registry`, `opts.read_deadline`). Returns the image's length.
pub fn export(
    store: &Store,
    reference: &str,
    path: &Path,
    opts: &MountOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let OpenedImage {
        tree,
        layers,
        lease,
        ..
    } = open_image(store, reference, opts)?;
    let failed = |detail: String| Error::Export {
        path: path.to_path_buf(),
        detail,
    };
    let image = ImageFs::new(tree, layers, Arc::new(SpanCache::new(opts.cache_bytes)));
    let disk = Disk::new(image.tree()).map_err(failed)?;
    let name = path
        .file_name()
        .ok_or_else(|| failed("not a file name".into()))?;
    let (file, tmp) = create_beside(path, name).map_err(|e| failed(e.to_string()))?;
    let written = (|| -> std::io::Result<()> {
        // Zeros throughout (holes): padding, and sparse files' holes, are never written.
        file.set_len(disk.len())?;
        file.write_all_at(disk.head(), 0)?;
        let mut buf = vec![0u8; CHUNK];
        let mut done = disk.head_len();
        for f in disk.files() {
            let start = f.first_block as u64 * DISK_BLOCK;
            for range in data_ranges(&image, f.ino, f.size) {
                let mut at = range.start;
                while at < range.end {
                    let n = (range.end - at).min(CHUNK as u64) as usize;
                    image
                        .read_lower_into(f.ino, at, &mut buf[..n])
                        .map_err(|e| std::io::Error::from_raw_os_error(e.code()))?;
                    file.write_all_at(&buf[..n], start + at)?;
                    at += n as u64;
                }
            }
            done = start + f.size.div_ceil(DISK_BLOCK) * DISK_BLOCK;
            progress(done, disk.len());
        }
        progress(done.max(disk.len()), disk.len());
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    drop(lease);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(failed(e.to_string()));
    }
    Ok(disk.len())
}

/// A new, empty file beside `path` (named after `name`, its file name) that nothing else
/// made: created with `O_EXCL`, so a name taken already — a symlink planted in a shared
/// directory, say — is never followed nor truncated, and another name is tried.
fn create_beside(path: &Path, name: &std::ffi::OsStr) -> std::io::Result<(std::fs::File, PathBuf)> {
    let mut last = None;
    for k in 0..100u32 {
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}-{k}",
            name.to_string_lossy(),
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
}

/// The parts of a file that hold data: all of it, or a sparse file's extents (its holes stay
/// holes in the image).
fn data_ranges(image: &ImageFs, ino: u64, size: u64) -> Vec<std::ops::Range<u64>> {
    match image.tree().inode(ino).map(|i| i.data) {
        Some(NodeData::Sparse { extents, .. }) => extents
            .iter()
            .map(|e| e.file_off.min(size)..(e.file_off + e.len).min(size))
            .filter(|r| !r.is_empty())
            .collect(),
        _ => std::iter::once(0..size).collect(),
    }
}
