//! Metadata in the kernel: the image's tree as an EROFS image, under a read-only overlay whose
//! data-only lower layer is the image's FUSE mount.
//!
//! Over FUSE alone a cold walk of the tree costs a round trip per directory; with the metadata
//! in EROFS, lookups, `stat`, `readdir` and xattrs never leave the kernel, and FUSE is asked
//! only to open and read files' data (see [`crate::tree::erofs`]). The supervisor sets it up
//! when the server starts; a kernel without file-backed EROFS (Linux 6.12) or overlay
//! data-only layers (6.5), or an image the format cannot carry, keeps the FUSE-only layout,
//! with the reason in the server's log. `BUX_FUSE_METADATA=fuse` asks for that layout (to
//! compare the two).

use std::path::Path;

use super::Place;
use crate::mount::{is_mount_point, kernel_mount, table, unmount};
use crate::store::ImageRecord;
use crate::Store;

/// Whether the server at `place` serves metadata from the kernel (its overlay is up).
pub(crate) fn in_kernel(place: &Place) -> bool {
    table::at(&place.root()).is_some_and(|m| m.fstype == "overlay")
}

/// Writes the image's metadata image and mounts it with the overlay over it (after the FUSE
/// mount serves). An error leaves nothing mounted: the server then serves through FUSE alone.
pub(crate) fn set_up(store: &Store, record: &ImageRecord, place: &Place) -> Result<(), String> {
    if std::env::var("BUX_FUSE_METADATA").is_ok_and(|v| v == "fuse") {
        return Err("BUX_FUSE_METADATA=fuse".into());
    }
    let tree = store.tree(record).map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let image = crate::tree::erofs::metadata_image(&tree).map_err(|e| e.to_string())?;
    // Not synced: it is written anew at every start, and read only by this server's mount.
    let tmp = place.meta_image().with_extension("tmp");
    std::fs::write(&tmp, &image)
        .and_then(|()| std::fs::rename(&tmp, place.meta_image()))
        .map_err(|e| format!("writing {}: {e}", place.meta_image().display()))?;
    tracing::info!(
        "metadata image: {} inodes, {} KiB, written in {} ms",
        tree.inode_count(),
        image.len() >> 10,
        started.elapsed().as_millis()
    );
    for d in [place.meta(), place.root()] {
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    kernel_mount(
        &place.meta_image(),
        &place.meta(),
        "erofs",
        libc::MS_RDONLY,
        "",
    )
    .map_err(|e| format!("mounting the EROFS metadata image (Linux 6.12+): {e}"))?;
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

/// Unmounts what stands at `place` (the overlay, the metadata image, the FUSE mount) and
/// removes the metadata image, which the next server writes anew.
pub(crate) fn tear_down(place: &Place) {
    for p in [place.root(), place.meta(), place.mnt()] {
        if is_mount_point(&p) {
            let _ = unmount(&p);
        }
    }
    let _ = std::fs::remove_file(place.meta_image());
}
