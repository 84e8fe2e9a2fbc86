//! The content-addressed store: blobs by digest, layer indexes, merged trees and image records.
//!
//! ```text
//! $STORE/
//! ├── blobs/sha256/<hex>         manifests, configs and layer blobs, exactly as pulled, verified
//! ├── layers/sha256/<hex>.idx    layer index: the file table             (key: layer blob digest)
//! ├── layers/sha256/<hex>.access checkpoints / zstd frame table           (key: layer blob digest)
//! ├── layers/sha256/<hex>.zst    seekable copy of a zstd layer           (key: layer blob digest)
//! ├── trees/sha256/<hex>.tree    merged tree of an image                 (key: manifest digest)
//! ├── images.json                reference → manifest, config and layers, replaced atomically
//! ├── locks/                     flock(2) files: one per blob being fetched, one for images.json
//! └── tmp/                       downloads in progress; renamed into place once verified
//! ```
//!
//! Everything under `blobs/`, `layers/` and `trees/` is immutable once renamed into place, so
//! readers need no locks; a crash leaves at most files in `tmp/`, which the next open clears
//! when no other process holds them.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::digest::Hasher;
use crate::error::IoContext;
use crate::{Digest, Error, Result};

/// One pulled image, as recorded in `images.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference as the user gave it, normalized (`registry/repository:tag`).
    pub reference: String,
    /// Digest of the image manifest (the platform-specific one when pulled through an index).
    pub manifest_digest: Digest,
    /// Digest of the image config.
    pub config_digest: Digest,
    /// The layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// `os/arch[/variant]` of the image.
    pub platform: String,
    /// Seconds since the epoch when the record was written.
    pub pulled_at: u64,
}

/// One layer of an image record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Blob digest.
    pub digest: Digest,
    /// Media type from the manifest.
    pub media_type: String,
    /// Blob size.
    pub size: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ImagesFile {
    images: BTreeMap<String, ImageRecord>,
}

/// An open store directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// An exclusive `flock(2)` held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers see the old or
/// the new content, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.ctx(|| format!("writing {}", path.display()))
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let store = Store { root: root.into() };
        for dir in [
            "blobs/sha256",
            "layers/sha256",
            "trees/sha256",
            "locks",
            "tmp",
        ] {
            let p = store.root.join(dir);
            fs::create_dir_all(&p).ctx(|| format!("creating store directory {}", p.display()))?;
        }
        Ok(store)
    }

    /// Opens the default store: `$BUX_FUSE_HOME`, else `$XDG_DATA_HOME/bux-fuse`, else
    /// `~/.local/share/bux-fuse`.
    pub fn open_default() -> Result<Store> {
        Store::open(Store::default_path())
    }

    /// The default store path (see [`Store::open_default`]).
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("BUX_FUSE_HOME").filter(|p| !p.is_empty()) {
            return p.into();
        }
        if let Some(p) = std::env::var_os("XDG_DATA_HOME").filter(|p| !p.is_empty()) {
            return PathBuf::from(p).join("bux-fuse");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".local/share/bux-fuse")
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `d` lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Where the index of layer `d` lives.
    pub fn index_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(format!("{}.idx", d.hex()))
    }

    /// Where the seekable copy of zstd layer `d` lives.
    pub fn seekable_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(format!("{}.zst", d.hex()))
    }

    /// Where the merged tree of the image with manifest `d` lives.
    pub fn tree_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("trees/sha256")
            .join(format!("{}.tree", d.hex()))
    }

    /// A fresh temporary path in the store (same filesystem, so renames are atomic).
    pub fn temp_path(&self, what: &str) -> PathBuf {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        self.root.join("tmp").join(format!(
            "{what}.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Takes the exclusive lock `name`, waiting for other processes that hold it.
    pub fn lock(&self, name: &str) -> Result<Lock> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening lock {}", path.display()))?;
        loop {
            // SAFETY: flock on a valid, owned descriptor.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 {
                return Ok(Lock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io(format!("locking {}", path.display()), e));
            }
        }
    }

    /// Stores `bytes` as a blob after checking that they hash to `expected`.
    pub fn put_blob(&self, expected: &Digest, bytes: &[u8], what: &str) -> Result<PathBuf> {
        let actual = Digest::of(bytes);
        if &actual != expected {
            return Err(Error::DigestMismatch {
                what: what.to_string(),
                expected: *expected,
                actual,
            });
        }
        let path = self.blob_path(expected);
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok(path)
    }

    /// Starts writing a blob that will be verified against `expected` when committed.
    pub fn blob_writer(&self, expected: Digest) -> Result<BlobWriter> {
        let tmp = self.temp_path(&expected.hex());
        let file = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dest: self.blob_path(&expected),
            expected,
            hasher: Hasher::default(),
            bytes: 0,
        })
    }

    fn images_path(&self) -> PathBuf {
        self.root.join("images.json")
    }

    fn read_images(&self) -> Result<ImagesFile> {
        let path = self.images_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::CorruptStore {
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ImagesFile::default()),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    fn update_images<T>(&self, f: impl FnOnce(&mut ImagesFile) -> T) -> Result<T> {
        let _lock = self.lock("images")?;
        let mut file = self.read_images()?;
        let out = f(&mut file);
        let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::CorruptStore {
            path: self.images_path(),
            detail: e.to_string(),
        })?;
        write_atomic(&self.images_path(), &json)?;
        Ok(out)
    }

    /// Records (or replaces) an image.
    pub fn put_image(&self, record: ImageRecord) -> Result<()> {
        self.update_images(|f| {
            f.images.insert(record.reference.clone(), record);
        })
    }

    /// The record of `reference` (already normalized), if pulled.
    pub fn image(&self, reference: &str) -> Result<Option<ImageRecord>> {
        Ok(self.read_images()?.images.remove(reference))
    }

    /// All image records, sorted by reference.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.read_images()?.images.into_values().collect())
    }

    /// Forgets an image; returns whether it was there. Its blobs stay until [`Store::gc`].
    pub fn remove_image(&self, reference: &str) -> Result<bool> {
        self.update_images(|f| f.images.remove(reference).is_some())
    }

    /// Disk usage by kind and by image.
    pub fn usage(&self) -> Result<Usage> {
        let mut u = Usage::default();
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
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
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                let name = entry.file_name();
                let name = name.to_string_lossy();
                match (slot, name.ends_with(".zst")) {
                    (0, _) => u.blobs += len,
                    (1, true) => u.seekable += len,
                    (1, false) => u.indexes += len,
                    _ => u.trees += len,
                }
            }
        }
        let images = self.images()?;
        let mut users: std::collections::HashMap<Digest, usize> = Default::default();
        for rec in &images {
            for l in &rec.layers {
                *users.entry(l.digest).or_default() += 1;
            }
        }
        let layer_bytes = |d: &Digest| {
            size(&self.blob_path(d)) + size(&self.index_path(d)) + size(&self.seekable_path(d))
        };
        for (d, n) in &users {
            if *n > 1 {
                u.shared += layer_bytes(d);
            }
        }
        for rec in images {
            let tree = size(&self.tree_path(&rec.manifest_digest));
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
            u.images.push((rec.reference, all, unique));
        }
        Ok(u)
    }

    /// Deletes blobs, indexes and trees that no image record refers to, and stale temp files.
    /// Returns (files removed, bytes freed).
    pub fn gc(&self) -> Result<(u64, u64)> {
        let _lock = self.lock("images")?;
        let images = self.read_images()?;
        let mut keep = std::collections::HashSet::new();
        for rec in images.images.values() {
            keep.insert(rec.manifest_digest.hex());
            keep.insert(rec.config_digest.hex());
            for l in &rec.layers {
                keep.insert(l.digest.hex());
            }
        }
        let (mut files, mut bytes) = (0, 0);
        for dir in ["blobs/sha256", "layers/sha256", "trees/sha256"] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
                let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let hex = name.split('.').next().unwrap_or("");
                if !keep.contains(hex) {
                    let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(entry.path())
                        .ctx(|| format!("removing {}", entry.path().display()))?;
                    files += 1;
                    bytes += len;
                }
            }
        }
        Ok((files, bytes))
    }
}

/// How the store's disk space is used (see [`Store::usage`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// Bytes of blobs (manifests, configs, gzip/tar layers).
    pub blobs: u64,
    /// Bytes of layer indexes.
    pub indexes: u64,
    /// Bytes of seekable zstd copies.
    pub seekable: u64,
    /// Bytes of merged trees.
    pub trees: u64,
    /// Per image: (reference, bytes of its layers and tree, bytes no other image shares).
    pub images: Vec<(String, u64, u64)>,
    /// Bytes of layers used by more than one image.
    pub shared: u64,
}

/// A blob being written: bytes go to a temp file and are hashed; [`BlobWriter::commit`] renames
/// the file into place only if the digest matches. Dropped uncommitted, the temp file is removed.
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    expected: Digest,
    hasher: Hasher,
    bytes: u64,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Checks the digest and renames the blob into place.
    pub fn commit(mut self, what: &str) -> Result<PathBuf> {
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual != self.expected {
            return Err(Error::DigestMismatch {
                what: what.to_string(),
                expected: self.expected,
                actual,
            });
        }
        let file = self.file.take().expect("committed once");
        file.sync_all()
            .ctx(|| format!("syncing {}", self.tmp.display()))?;
        fs::rename(&self.tmp, &self.dest).ctx(|| format!("storing {}", self.dest.display()))?;
        Ok(self.dest.clone())
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("committed"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_verified_before_they_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = Digest::of(b"layer bytes");
        let mut w = store.blob_writer(good).unwrap();
        w.write_all(b"layer bytes").unwrap();
        assert_eq!(w.commit("test").unwrap(), store.blob_path(&good));
        assert_eq!(fs::read(store.blob_path(&good)).unwrap(), b"layer bytes");

        let other = Digest::of(b"something else");
        let mut w = store.blob_writer(other).unwrap();
        w.write_all(b"tampered").unwrap();
        let err = w.commit("layer x").unwrap_err().to_string();
        assert!(err.contains("digest mismatch"), "{err}");
        assert!(!store.blob_path(&other).exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn image_records_and_gc() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let keep = Digest::of(b"keep");
        store.put_blob(&keep, b"keep", "t").unwrap();
        let orphan = Digest::of(b"orphan");
        store.put_blob(&orphan, b"orphan", "t").unwrap();
        let rec = ImageRecord {
            reference: "r/x:1".into(),
            manifest_digest: keep,
            config_digest: keep,
            layers: vec![],
            platform: "linux/amd64".into(),
            pulled_at: 0,
        };
        store.put_image(rec.clone()).unwrap();
        assert_eq!(store.image("r/x:1").unwrap(), Some(rec));
        assert_eq!(store.gc().unwrap().0, 1);
        assert!(store.blob_path(&keep).exists() && !store.blob_path(&orphan).exists());
        assert!(store.remove_image("r/x:1").unwrap());
        assert!(!store.remove_image("r/x:1").unwrap());
        assert_eq!(store.images().unwrap(), vec![]);
    }
}
