//! What the store's files are worth keeping: leases (a live mount's claim on its image's
//! files), disk usage by kind and by image, and [`Store::gc`], which removes what nothing
//! refers to.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::{alive, temp_owner, ImageRecord, Store};
use crate::error::IoContext;
use crate::{Digest, Error, Result};

/// A live mount's claim on its image's files (see [`Store::lease`]); released when dropped.
#[derive(Debug)]
pub struct Lease {
    _file: Option<File>,
    path: Option<PathBuf>,
}

impl Lease {
    /// No lease of this process's: the process that started it holds one for the same files,
    /// and this one ends with it (a mount's worker).
    pub(crate) fn held_by_parent() -> Lease {
        Lease {
            _file: None,
            path: None,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = fs::remove_file(path);
        }
    }
}

impl Store {
    /// Declares that a live mount uses these digests (manifest, config, layers): until the
    /// returned lease is dropped (or its process dies), [`Store::gc`] keeps them and
    /// [`Store::in_use`] reports the manifest.
    pub fn lease(&self, digests: &[Digest]) -> Result<Lease> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = self.root.join("leases");
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!(
            "{}.{}.lease",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
        // SAFETY: flock on a valid, owned descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io("locking lease", std::io::Error::last_os_error()));
        }
        let body: String = digests.iter().map(|d| format!("{}\n", d.hex())).collect();
        file.write_all(body.as_bytes())
            .ctx(|| format!("writing {}", path.display()))?;
        Ok(Lease {
            _file: Some(file),
            path: Some(path),
        })
    }

    /// Digests held by live leases (stale lease files of dead processes are removed).
    pub(super) fn leased(&self) -> Result<std::collections::HashSet<String>> {
        let mut out = std::collections::HashSet::new();
        let dir = self.root.join("leases");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(out);
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(file) = File::open(&path) else {
                continue;
            };
            // SAFETY: flock on a valid, owned descriptor.
            let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
            if free {
                let _ = fs::remove_file(&path);
                continue;
            }
            let body = fs::read_to_string(&path).unwrap_or_default();
            out.extend(body.lines().map(str::to_string));
        }
        Ok(out)
    }

    /// Whether a live mount uses the image with this manifest.
    pub fn in_use(&self, manifest: &Digest) -> Result<bool> {
        Ok(self.leased()?.contains(&manifest.hex()))
    }

    /// Disk usage by kind and by image.
    pub fn usage(&self) -> Result<Usage> {
        let mut u = Usage::default();
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        // A file under two names (see `inventory`) is counted once, as `du` does.
        let mut linked = std::collections::HashSet::new();
        // Each layer's files in `layers/` (its index, access table, small files, seekable copy,
        // the indexes a lazily served layer was published with) by the digest their names
        // start with: the store knows its layout, not what an index keeps beside it.
        let mut layer_files: std::collections::HashMap<String, u64> = Default::default();
        for (dir, slot) in [
            ("blobs/sha256", 0),
            ("layers/sha256", 1),
            ("trees/sha256", 2),
        ] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir)
                .ctx(|| format!("listing {}", dir.display()))?
                .flatten()
            {
                let len = match entry.metadata() {
                    Ok(m) => {
                        use std::os::unix::fs::MetadataExt;
                        let again = m.nlink() > 1 && !linked.insert((m.dev(), m.ino()));
                        if again {
                            0
                        } else {
                            m.len()
                        }
                    }
                    Err(_) => 0,
                };
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.ends_with(".partial") {
                    use std::os::unix::fs::MetadataExt;
                    let alloc = entry.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                    u.lazy.0 += alloc.min(len);
                    u.lazy.1 += len;
                    continue;
                }
                if slot == 1 {
                    let hex = name.split('.').next().unwrap_or("");
                    *layer_files.entry(hex.to_string()).or_default() += len;
                }
                let ext = name.rsplit('.').next().unwrap_or("");
                match (slot, ext) {
                    (0, _) => u.blobs += len,
                    (1, "zst") => u.seekable += len,
                    (1, "small") => u.small_files += len,
                    (1, _) => u.indexes += len,
                    (_, "erofs") => u.metadata_images += len,
                    _ => u.trees += len,
                }
            }
        }
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp)
            .ctx(|| format!("listing {}", tmp.display()))?
            .flatten()
        {
            u.temp += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
        let images = self.images()?;
        let mut users: std::collections::HashMap<Digest, usize> = Default::default();
        for rec in &images {
            for l in &rec.layers {
                *users.entry(l.digest).or_default() += 1;
            }
        }
        let layer_bytes =
            |d: &Digest| size(&self.blob_path(d)) + layer_files.get(&d.hex()).copied().unwrap_or(0);
        for (d, n) in &users {
            if *n > 1 {
                u.shared += layer_bytes(d);
            }
        }
        for rec in images {
            let tree =
                size(&self.tree_path(&rec.view())) + size(&self.meta_image_path(&rec.view()));
            let all: u64 = rec
                .layers
                .iter()
                .map(|l| layer_bytes(&l.digest))
                .sum::<u64>()
                + tree;
            let unique: u64 = rec
                .layers
                .iter()
                .filter(|l| users[&l.digest] == 1)
                .map(|l| layer_bytes(&l.digest))
                .sum::<u64>()
                + tree;
            u.images.push(ImageUsage {
                reference: rec.reference,
                size: all,
                unique,
            });
        }
        Ok(u)
    }

    /// Deletes blobs, indexes and trees that neither an image record nor a live mount refers
    /// to, temp files whose process is gone, and partial downloads nobody holds (left by
    /// pulls that failed or died). Waits for running pulls to finish first.
    /// Returns (files removed, bytes freed).
    pub fn gc(&self) -> Result<(u64, u64)> {
        let _pulls = self.flock("store", libc::LOCK_EX)?;
        self.gc_locked()
    }

    /// The digests (hex) that `images` and the live leases `leased` keep.
    pub(super) fn keep_set(
        images: &[&ImageRecord],
        leased: &std::collections::HashSet<String>,
    ) -> std::collections::HashSet<String> {
        let mut keep = leased.clone();
        for rec in images {
            keep.insert(rec.manifest_digest.hex());
            keep.insert(rec.view().hex());
            keep.insert(rec.config_digest.hex());
            for l in &rec.layers {
                keep.insert(l.digest.hex());
                if let Some(i) = &l.index {
                    keep.insert(i.hex());
                }
            }
        }
        keep
    }

    /// [`Store::gc`] with the store's pull guard already held exclusively (by the caller).
    pub(super) fn gc_locked(&self) -> Result<(u64, u64)> {
        let _lock = self.lock("images")?;
        let images = self.read_images()?;
        let leased = self.leased()?;
        let keep = Self::keep_set(&images.images.values().collect::<Vec<_>>(), &leased);
        let (mut files, mut bytes) = (0, 0);
        for dir in ["blobs/sha256", "layers/sha256", "trees/sha256", "tmp"] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
                let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let mut parts = name.split('.');
                let hex = parts.next().unwrap_or("");
                let second = parts.next().unwrap_or("");
                let stale_temp = temp_owner(&name).is_some_and(|pid| !alive(pid))
                    && (dir.ends_with("tmp") || name.contains(".tmp."));
                // A partial download whose layer lock is free: no pull is writing it (the
                // lock is held while it is removed, so none starts to).
                let mut ingest_lock = None;
                if dir.ends_with("tmp") && second == "ingest" && parts.next().is_none() {
                    ingest_lock = match format!("sha256:{hex}").parse::<Digest>() {
                        Ok(d) => self.try_lock(&Store::layer_lock_name(&d))?.map(Some),
                        Err(_) => Some(None),
                    };
                }
                let abandoned_ingest = ingest_lock.is_some();
                let orphan = !dir.ends_with("tmp") && orphan_file(&name, &keep, &leased);
                if stale_temp || orphan || abandoned_ingest {
                    let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(entry.path())
                        .ctx(|| format!("removing {}", entry.path().display()))?;
                    super::budget::removed_one();
                    files += 1;
                    bytes += len;
                }
            }
        }
        // Files of the store's root written through a temp file by a process that died
        // mid-write (`images.json.tmp.PID.SEQ`), and last-use marks of images no longer stored.
        if let Ok(entries) = fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains(".tmp.") && temp_owner(&name).is_some_and(|pid| !alive(pid)) {
                    let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    if fs::remove_file(entry.path()).is_ok() {
                        files += 1;
                        bytes += len;
                    }
                }
            }
        }
        self.forget_unused_marks(&images.images);
        Ok((files, bytes))
    }
}

/// Whether a file of `blobs/`, `layers/` or `trees/` named `name` is one no image in `keep`
/// (digests kept by records and leases) nor a live lease (`leased`) needs.
pub(super) fn orphan_file(
    name: &str,
    keep: &std::collections::HashSet<String>,
    leased: &std::collections::HashSet<String>,
) -> bool {
    let mut parts = name.split('.');
    let hex = parts.next().unwrap_or("");
    let second = parts.next().unwrap_or("");
    // A lazily served layer's files are keyed by layer and index: both must be
    // kept. Those of earlier versions, keyed by the layer alone (any image's
    // index could have filled them), go once no live mount holds the layer.
    let by_index = second.len() == 64 && second.bytes().all(|b| b.is_ascii_hexdigit());
    let unkeyed_lazy = matches!(second, "partial" | "present" | "windows") && !leased.contains(hex);
    !name.contains(".tmp.")
        && (!keep.contains(hex) || (by_index && !keep.contains(second)) || unkeyed_lazy)
}

/// How the store's disk space is used (see [`Store::usage`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// Bytes of blobs (manifests, configs, gzip/tar layers).
    pub blobs: u64,
    /// Bytes of layer indexes (file tables, access tables).
    pub indexes: u64,
    /// Bytes of small files' bytes kept for metadata images (`pull --small-files`).
    pub small_files: u64,
    /// Bytes of seekable zstd copies.
    pub seekable: u64,
    /// Bytes of merged trees.
    pub trees: u64,
    /// Bytes of EROFS metadata images (what root's shared mounts stand on).
    pub metadata_images: u64,
    /// Bytes of downloads in progress or left by interrupted ones (`gc` removes the latter).
    pub temp: u64,
    /// Bytes fetched so far of lazily mounted layers (the allocated part of their partial
    /// blobs), and the bytes those layers will take once complete.
    pub lazy: (u64, u64),
    /// Per image.
    pub images: Vec<ImageUsage>,
    /// Bytes of layers used by more than one image.
    pub shared: u64,
}

/// Disk use of one image.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageUsage {
    /// The image reference.
    pub reference: String,
    /// Bytes of its layers and tree.
    pub size: u64,
    /// Bytes no other image shares.
    pub unique: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_keeps_leased_and_removes_dead_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let used = Digest::of(b"used by a mount");
        store.put_blob(&used, b"used by a mount", "t").unwrap();
        let lease = store.lease(&[used]).unwrap();
        assert!(store.in_use(&used).unwrap());
        // A temp file of a dead process (pid far above pid_max) and one of ours.
        let dead = dir.path().join("tmp/abc.999999999.0");
        fs::write(&dead, b"partial").unwrap();
        let ours = store.temp_path("live");
        fs::write(&ours, b"partial").unwrap();
        assert_eq!(store.usage().unwrap().temp, 14);
        let (n, _) = store.gc().unwrap();
        assert_eq!(n, 1);
        assert!(!dead.exists() && ours.exists());
        assert!(store.blob_path(&used).exists());
        drop(lease);
        assert!(!store.in_use(&used).unwrap());
        store.gc().unwrap();
        assert!(!store.blob_path(&used).exists());
    }

    #[test]
    fn gc_removes_abandoned_ingests_and_keeps_held_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (held, abandoned) = (Digest::of(b"held"), Digest::of(b"abandoned"));
        for d in [held, abandoned] {
            let (mut w, _) = store.ingest(d, 1 << 20, 1).unwrap();
            w.write_all(&[7u8; 1000]).unwrap();
        }
        // A live pull of `held` holds its layer lock (another process's would: flock
        // conflicts between open files, in one process too).
        let lock = store.lock(&Store::layer_lock_name(&held)).unwrap();
        assert_eq!(store.usage().unwrap().temp, 2000);
        assert_eq!(store.gc().unwrap(), (1, 1000));
        assert!(store.ingest_path(&held).exists());
        assert!(!store.ingest_path(&abandoned).exists());
        drop(lock);
        assert_eq!(store.gc().unwrap(), (1, 1000));
        assert!(!store.ingest_path(&held).exists());
    }
}
