//! Metadata in the kernel: the image's tree as an EROFS image, under a read-only overlay whose
//! data-only lower layer is the image's FUSE mount.
//!
//! Over FUSE alone a cold walk of the tree costs a round trip per directory; with the metadata
//! in EROFS, lookups, `stat`, `readdir` and xattrs never leave the kernel, and FUSE is asked
//! only to open and read files' data (see [`crate::tree::erofs`]) — and not even that for small
//! files, whose bytes the image holds (see [`crate::index::small`]). The supervisor sets it up
//! when the server starts; a kernel without file-backed EROFS (Linux 6.12) or overlay
//! data-only layers (6.5), or an image the format cannot carry, keeps the FUSE-only layout,
//! with the reason in the server's log. `BUX_FUSE_METADATA=fuse` asks for that layout (to
//! compare the two).

use std::path::{Path, PathBuf};

use super::Place;
use std::fs::File;
use std::os::fd::AsRawFd;

use crate::index::small::{SmallFiles, SmallIndex};
use crate::mount::{is_mount_point, kernel_mount, table, unmount};
use crate::store::ImageRecord;
use crate::tree::erofs;
use crate::Store;

/// Whether the server at `place` serves metadata from the kernel (its overlay is up).
pub(crate) fn in_kernel(place: &Place) -> bool {
    table::at(&place.root()).is_some_and(|m| m.fstype == "overlay")
}

/// The most bytes of small files one metadata image holds.
const IMAGE_SMALL_MAX: u64 = 1 << 30;

/// The image's metadata image in the store, written first if it is not there (or not of this
/// version): written once per image, since with small files' data it runs to a tenth of the
/// image (125 MB for the large Debian image, 0.4–0.8 s to write), and mounted from there by
/// every server after.
pub(crate) fn image(store: &Store, record: &ImageRecord) -> Result<PathBuf, String> {
    let path = store.meta_image_path(&record.view());
    if erofs::is_current(&path) {
        return Ok(path);
    }
    write_image(store, record, &path)?;
    Ok(path)
}

fn write_image(store: &Store, record: &ImageRecord, path: &Path) -> Result<(), String> {
    let started = std::time::Instant::now();
    let (image, inodes) = image_bytes(store, record)?;
    crate::store::write_atomic(path, &image).map_err(|e| e.to_string())?;
    tracing::info!(
        "metadata image: {inodes} inodes, {} KiB, written in {} ms",
        image.len() >> 10,
        started.elapsed().as_millis()
    );
    Ok(())
}

/// What the image's metadata image holds (and how many inodes).
pub(crate) fn image_bytes(store: &Store, record: &ImageRecord) -> Result<(Vec<u8>, u64), String> {
    let tree = store.tree(record).map_err(|e| e.to_string())?;
    // The layers' small-file tables (a damaged one only costs its layer the shortcut: its
    // files stay with FUSE). Past IMAGE_SMALL_MAX bytes copied into the image, the rest are
    // read through FUSE (the walk's order, so the same files each time).
    let tables: Vec<Option<SmallIndex>> = record
        .layers
        .iter()
        .map(|l| {
            SmallIndex::open(&store.layer_index_path(l)).unwrap_or_else(|e| {
                tracing::warn!("small files of layer {}: {e}", l.digest);
                None
            })
        })
        .collect();
    let image = erofs::metadata_image_with_tables(&tree, &tables, IMAGE_SMALL_MAX)?;
    Ok((image, tree.inode_count()))
}

/// The layers' small-file files the image at `image` names as its extra devices, opened, in
/// the order of their ids — each checked to be the very file the image was written for (its
/// table's digest), or an error.
fn open_devices(store: &Store, record: &ImageRecord, image: &Path) -> Result<Vec<File>, String> {
    let devices = erofs::devices(image).map_err(|e| format!("reading {}: {e}", image.display()))?;
    devices
        .iter()
        .map(|d| {
            let layer = record
                .layers
                .iter()
                .find(|l| l.digest.hex() == d.layer)
                .ok_or_else(|| format!("the image names a layer it does not have ({})", d.layer))?;
            let index = store.layer_index_path(layer);
            let file = File::open(SmallFiles::path(&index))
                .map_err(|e| format!("opening the small files of {}: {e}", layer.digest))?;
            // The table of the very file the kernel will be given (not of one renamed over it).
            let table = SmallIndex::read(&index, file.try_clone().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            match table.table_digest() == d.table {
                true => Ok(file),
                false => Err(format!("the small files of layer {} changed", layer.digest)),
            }
        })
        .collect()
}

/// Mounts the metadata image at `image` on `dir`, its extra devices given as this process's
/// descriptors (short options, whatever the store's path; the kernel opens them at mount).
fn mount_image(
    store: &Store,
    record: &ImageRecord,
    image: &Path,
    dir: &Path,
) -> Result<(), String> {
    let devices = open_devices(store, record, image)?;
    let options: Vec<String> = devices
        .iter()
        .map(|f| format!("device=/proc/self/fd/{}", f.as_raw_fd()))
        .collect();
    kernel_mount(image, dir, "erofs", libc::MS_RDONLY, &options.join(","))
        .map_err(|e| e.to_string())
}

/// Mounts the image's metadata image with the overlay over it (after the FUSE mount serves).
/// An error leaves nothing mounted: the server then serves through FUSE alone.
pub(crate) fn set_up(store: &Store, record: &ImageRecord, place: &Place) -> Result<(), String> {
    if super::metadata_from_fuse() {
        return Err("BUX_FUSE_METADATA=fuse".into());
    }
    let image = image(store, record)?;
    for d in [place.meta(), place.root()] {
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let mount_image = || mount_image(store, record, &image, &place.meta());
    if let Err(e) = mount_image() {
        // A damaged file the kernel refuses is written anew, once.
        tracing::warn!("mounting {}: {e}; writing it anew", image.display());
        write_image(store, record, &image)?;
        mount_image()
            .map_err(|e| format!("mounting the EROFS metadata image (Linux 6.12+): {e}"))?;
    }
    // Data-only layers alone enable data redirects (Linux 6.16+), which leaves room for file
    // handles (virtiofsd --inode-file-handles, NFS), for which a read-only overlay must not
    // follow directory redirects (the image has none). Earlier kernels need metacopy=on, which
    // rules file handles out.
    let lowerdir = format!("{}::{}", place.meta().display(), place.mnt().display());
    let mut last = String::new();
    for extra in [
        "redirect_dir=nofollow,nfs_export=on",
        "metacopy=on,redirect_dir=follow",
    ] {
        let options = format!("lowerdir={lowerdir},{extra}");
        match kernel_mount(
            Path::new("overlay"),
            &place.root(),
            "overlay",
            libc::MS_RDONLY,
            &options,
        ) {
            Ok(()) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    let _ = unmount(&place.meta());
    Err(format!(
        "mounting the overlay with a data-only layer (Linux 6.5+): {last}"
    ))
}

/// Unmounts what stands at `place` (the overlay, the metadata image, the FUSE mount).
pub(crate) fn tear_down(place: &Place) {
    for p in [place.root(), place.meta(), place.mnt()] {
        if is_mount_point(&p) {
            let _ = unmount(&p);
        }
    }
}
