//! The content-addressed store: blobs by digest, layer indexes, merged trees and image records.
//!
//! ```text
//! $STORE/
//! ├── blobs/sha256/<hex>         manifests, configs and layer blobs, exactly as pulled, verified
//! ├── layers/sha256/<hex>.idx    layer index: the file table             (key: layer blob digest)
//! ├── layers/sha256/<hex>.access checkpoints / zstd frame table           (key: layer blob digest)
//! ├── layers/sha256/<hex>.zst    seekable copy of a zstd layer           (key: layer blob digest)
//! ├── layers/sha256/<hex>.small  small files' bytes, zstd-compressed      (key: layer blob digest)
//! ├── layers/sha256/<hex>.<ix>.{idx,access}     a lazily served layer's index as the image's
//! │                                              published index <ix> gives it
//! ├── layers/sha256/<hex>.<ix>.{partial,present} its bytes fetched so far, and which chunks
//! │                                              (the windows': `.windows.partial`, ...)
//! ├── trees/sha256/<hex>.tree    merged tree of an image                 (key: manifest digest)
//! ├── trees/sha256/<hex>.erofs   its metadata (and small files) as EROFS (key: manifest digest)
//! ├── images.json                reference → manifest, config and layers, replaced atomically
//! ├── locks/                     flock(2) files: one per blob being fetched, one for images.json
//! └── tmp/                       downloads in progress; renamed into place once verified
//!     └── <hex>.ingest           a layer's download, kept when a pull fails or dies to be
//!                                resumed by the next pull (held under `locks/layer-<hex>`)
//! ```
//!
//! Everything under `blobs/`, `layers/` and `trees/` is immutable once renamed into place, so
//! readers need no locks; a crash leaves at most files in `tmp/`: a layer's partial download
//! (`<hex>.ingest`), which the next pull of that layer resumes, and temp files that the next
//! pull of the same layer, or [`Store::gc`], removes.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
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

impl ImageRecord {
    /// What the image's merged tree, metadata image, bad mark and shared server are keyed
    /// by: the manifest digest when no layer is served lazily; else a digest of the manifest
    /// and the published index of each layer, because one manifest may be stored under two
    /// names with two indexes (a referrer trusted for one name), and neither may change what
    /// the other serves.
    pub fn view(&self) -> Digest {
        if self.layers.iter().all(|l| l.index.is_none()) {
            return self.manifest_digest;
        }
        let mut text = format!("bux-fuse view\n{}\n", self.manifest_digest);
        for l in &self.layers {
            match &l.index {
                Some(i) => text.push_str(&format!("{} {i}\n", l.digest)),
                None => text.push_str(&format!("{} -\n", l.digest)),
            }
        }
        Digest::of(text.as_bytes())
    }
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
    /// The published bux-fuse index blob this layer was (or is being) served from lazily.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
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

/// A `flock(2)` held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Takes the exclusive lock on `file` if nobody holds it (kept until the file is closed).
pub fn try_flock(file: &File) -> bool {
    // SAFETY: flock on a valid, owned descriptor.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// A live mount's claim on its image's files (see [`Store::lease`]); released when dropped.
#[derive(Debug)]
pub struct Lease {
    _file: File,
    path: PathBuf,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers see the old or
/// the new content, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// [`write_atomic`] with the file created with permission bits `mode` (never wider, even
/// for a moment: for secrets).
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(path);
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.ctx(|| format!("writing {}", path.display()))
}

/// Makes a rename into `path`'s directory durable (best effort: some filesystems refuse).
pub fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// The pid in a temp file name written by [`Store::temp_path`] or [`write_atomic`]
/// (`NAME.PID.SEQ` or `NAME.tmp.PID.SEQ`).
fn temp_owner(name: &str) -> Option<u32> {
    let mut parts = name.rsplit('.');
    let _seq: u64 = parts.next()?.parse().ok()?;
    parts.next()?.parse().ok()
}

/// Whether process `pid` is alive (a zombie — killed, not yet reaped — is not).
pub(crate) fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
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

    /// Where the index of layer `layer` as `index` (a published index blob) described it lives:
    /// a lazily served layer reads by the index its image vouched for, never by one another
    /// image named for the same layer (`<layer>.idx` is written only from bytes that hashed
    /// to the layer's digest).
    pub fn lazy_index_path(&self, layer: &Digest, index: &Digest) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(format!("{}.{}.idx", layer.hex(), index.hex()))
    }

    /// Where the index a mount of this layer of an image reads by lives: its own published
    /// index's for a lazily served layer, else the one built from the layer's bytes.
    pub fn layer_index_path(&self, layer: &LayerRecord) -> PathBuf {
        match &layer.index {
            Some(index) => self.lazy_index_path(&layer.digest, index),
            None => self.index_path(&layer.digest),
        }
    }

    /// Where the bytes of layer `layer` fetched so far by the index `index` live (a sparse
    /// file; `<..>.present` beside it marks the chunks verified and written), and with
    /// `windows` those of its gzip windows. Keyed by the index as well as the layer: another
    /// image naming the same layer with another index never shares them.
    pub fn partial_path(&self, layer: &Digest, index: &Digest, windows: bool) -> PathBuf {
        let kind = if windows {
            "windows.partial"
        } else {
            "partial"
        };
        self.root
            .join("layers/sha256")
            .join(format!("{}.{}.{kind}", layer.hex(), index.hex()))
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

    /// Where the EROFS metadata image of the image with manifest `d` lives (root's shared
    /// mounts: see [`crate::tree::erofs`]).
    pub fn meta_image_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("trees/sha256")
            .join(format!("{}.erofs", d.hex()))
    }

    /// Bytes of an image's layers that are local: whole blobs, and what lazy mounts fetched
    /// (the allocated part of each sparse partial blob).
    pub fn local_bytes(&self, record: &ImageRecord) -> u64 {
        use std::os::unix::fs::MetadataExt;
        record
            .layers
            .iter()
            .map(|l| {
                if self.blob_path(&l.digest).exists() || self.seekable_path(&l.digest).exists() {
                    return l.size;
                }
                let Some(index) = &l.index else { return 0 };
                let partial = self.partial_path(&l.digest, index, false);
                fs::metadata(partial).map_or(0, |m| (m.blocks() * 512).min(l.size))
            })
            .sum()
    }

    /// The read trace of the image with this manifest (see [`crate::trace`]).
    pub fn trace_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("trees/sha256")
            .join(format!("{}.trace", manifest.hex()))
    }

    /// Present when a lazily served image proved different from its published index; holds why.
    pub fn bad_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("trees/sha256")
            .join(format!("{}.bad", manifest.hex()))
    }

    /// Present when the background completion of a lazily served image gave up (the next
    /// mount tries again); holds why, for `mount --wait-complete` to say.
    pub fn incomplete_path(&self, view: &Digest) -> PathBuf {
        self.root
            .join("trees/sha256")
            .join(format!("{}.incomplete", view.hex()))
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

    /// The name of the lock held by whoever fetches layer `d` (and so writes its partial
    /// download, [`Store::ingest_path`]).
    pub fn layer_lock_name(d: &Digest) -> String {
        format!("layer-{}", d.hex())
    }

    /// Where the download of blob `d` in progress, or left by a pull that failed or died, is
    /// kept: a prefix of the blob, resumed by the next pull (see [`Store::ingest`]).
    pub fn ingest_path(&self, d: &Digest) -> PathBuf {
        self.root.join("tmp").join(format!("{}.ingest", d.hex()))
    }

    /// Removes the partial download of blob `d` (the caller holds its layer lock).
    pub fn discard_ingest(&self, d: &Digest) {
        let _ = fs::remove_file(self.ingest_path(d));
    }

    /// Removes the temp files an earlier fetch of layer `d` left (a process killed mid-pull:
    /// its blob and seekable copy in progress, `<hex>.PID.SEQ` and `<hex>.zst.PID.SEQ`). The
    /// caller holds the layer's lock ([`Store::layer_lock_name`]), which whoever writes them
    /// holds too, so none of them is being written. Returns the bytes freed.
    pub fn clear_layer_temps(&self, d: &Digest) -> u64 {
        let prefix = format!("{}.", d.hex());
        let dir = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&dir) else {
            return 0;
        };
        let mut freed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && temp_owner(&name).is_some() {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(entry.path()).is_ok() {
                    freed += len;
                }
            }
        }
        freed
    }

    /// Opens the resumable download of blob `expected` ([`Store::ingest_path`]); the caller
    /// holds its layer lock. A partial download already there is kept if it has at least
    /// `min_resume` bytes and no more than `max_len` (the descriptor's size), else emptied.
    ///
    /// Returns the writer and a reader of the bytes already on disk (empty when starting
    /// afresh): those must be written to the writer first, as read — it hashes them again
    /// (sha256 state cannot be saved) without writing them — then the rest of the blob. The
    /// caller feeds the same bytes to whatever else consumes the blob (the indexer), so the
    /// resumed blob is still read in one pass. Dropped uncommitted, the writer leaves the file
    /// (for the next pull to resume); [`Store::discard_ingest`] removes it.
    pub fn ingest(
        &self,
        expected: Digest,
        max_len: u64,
        min_resume: u64,
    ) -> Result<(BlobWriter, Box<dyn Read + Send>)> {
        let path = self.ingest_path(&expected);
        let ctx = || format!("opening {}", path.display());
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx(ctx)?;
        let mut len = file.metadata().ctx(ctx)?.len();
        if len > max_len || len < min_resume {
            file.set_len(0).ctx(ctx)?;
            len = 0;
        }
        file.seek(std::io::SeekFrom::Start(len)).ctx(ctx)?;
        let kept: Box<dyn Read + Send> = if len > 0 {
            Box::new(File::open(&path).ctx(ctx)?.take(len))
        } else {
            Box::new(std::io::empty())
        };
        let writer = BlobWriter {
            file: Some(file),
            tmp: path,
            dest: self.blob_path(&expected),
            expected,
            hasher: Hasher::default(),
            bytes: 0,
            max_len,
            on_disk: len,
            keep: true,
        };
        Ok((writer, kept))
    }

    /// Takes the exclusive lock `name`, waiting for other processes that hold it.
    pub fn lock(&self, name: &str) -> Result<Lock> {
        self.flock(name, libc::LOCK_EX)
    }

    /// The file behind lock `name`, opened (for [`try_flock`] by a process that may no longer
    /// open it later).
    pub fn lock_file(&self, name: &str) -> Result<File> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening lock {}", path.display()))
    }

    /// [`Store::lock`] if nobody holds it, else `None` at once.
    pub fn try_lock(&self, name: &str) -> Result<Option<Lock>> {
        match self.flock(name, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(l) => Ok(Some(l)),
            Err(Error::Io { error, .. }) if error.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Held (shared) by every pull for its whole length; [`Store::gc`] takes it exclusively, so
    /// gc never deletes what a running pull has just stored but not yet recorded.
    pub fn pull_guard(&self) -> Result<Lock> {
        self.flock("store", libc::LOCK_SH)
    }

    fn flock(&self, name: &str, how: i32) -> Result<Lock> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening lock {}", path.display()))?;
        loop {
            // SAFETY: flock on a valid, owned descriptor.
            let r = unsafe { libc::flock(file.as_raw_fd(), how) };
            if r == 0 {
                return Ok(Lock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io(format!("locking {}", path.display()), e));
            }
        }
    }

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
        Ok(Lease { _file: file, path })
    }

    /// Digests held by live leases (stale lease files of dead processes are removed).
    fn leased(&self) -> Result<std::collections::HashSet<String>> {
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

    /// Starts writing a blob that will be verified against `expected` when committed. Writing
    /// more than `max_len` bytes (the descriptor's size) fails at once.
    pub fn blob_writer(&self, expected: Digest, max_len: u64) -> Result<BlobWriter> {
        let tmp = self.temp_path(&expected.hex());
        let file = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dest: self.blob_path(&expected),
            expected,
            hasher: Hasher::default(),
            bytes: 0,
            max_len,
            on_disk: 0,
            keep: false,
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
                if name.ends_with(".partial") {
                    use std::os::unix::fs::MetadataExt;
                    let alloc = entry.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                    u.lazy.0 += alloc.min(len);
                    u.lazy.1 += len;
                    continue;
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
        let layer_bytes = |d: &Digest| {
            let index = self.index_path(d);
            size(&self.blob_path(d))
                + size(&index)
                + size(&crate::index::LayerIndex::access_path(&index))
                + size(&crate::index::small::SmallFiles::path(&index))
                + size(&self.seekable_path(d))
        };
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
        let _lock = self.lock("images")?;
        let images = self.read_images()?;
        let leased = self.leased()?;
        let mut keep = leased.clone();
        for rec in images.images.values() {
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
                // A lazily served layer's files are keyed by layer and index: both must be
                // kept. Those of earlier versions, keyed by the layer alone (any image's
                // index could have filled them), go once no live mount holds the layer.
                let by_index = second.len() == 64 && second.bytes().all(|b| b.is_ascii_hexdigit());
                let unkeyed_lazy =
                    matches!(second, "partial" | "present" | "windows") && !leased.contains(hex);
                let orphan = !dir.ends_with("tmp")
                    && !name.contains(".tmp.")
                    && (!keep.contains(hex)
                        || (by_index && !keep.contains(second))
                        || unkeyed_lazy);
                if stale_temp || orphan || abandoned_ingest {
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

/// A blob being written: bytes go to a temp file and are hashed; [`BlobWriter::commit`] renames
/// the file into place only if the digest matches. Dropped uncommitted, the temp file is removed.
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    expected: Digest,
    hasher: Hasher,
    bytes: u64,
    max_len: u64,
    /// Bytes already in the file (a resumed download): hashed as they are written again,
    /// not written.
    on_disk: u64,
    /// Left in place when dropped uncommitted (a resumable download).
    keep: bool,
}

impl BlobWriter {
    /// Bytes that were on disk already when the writer was opened (a resumed download).
    pub fn on_disk(&self) -> u64 {
        self.on_disk
    }

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
        sync_dir(&self.dest);
        Ok(self.dest.clone())
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("committed"))?;
        if self.bytes + buf.len() as u64 > self.max_len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "blob {} is larger than the {} bytes its descriptor declares",
                    self.expected, self.max_len
                ),
            ));
        }
        if self.bytes < self.on_disk {
            // The bytes a resumed download had on disk, read back: hash, do not rewrite.
            let n = buf.len().min((self.on_disk - self.bytes) as usize);
            self.hasher.update(&buf[..n]);
            self.bytes += n as u64;
            return Ok(n);
        }
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
        if self.file.is_some() && !self.keep {
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
        let mut w = store.blob_writer(good, 11).unwrap();
        w.write_all(b"layer bytes").unwrap();
        assert_eq!(w.commit("test").unwrap(), store.blob_path(&good));
        assert_eq!(fs::read(store.blob_path(&good)).unwrap(), b"layer bytes");

        let other = Digest::of(b"something else");
        let mut w = store.blob_writer(other, 100).unwrap();
        w.write_all(b"tampered").unwrap();
        let err = w.commit("layer x").unwrap_err().to_string();
        assert!(err.contains("digest mismatch"), "{err}");
        assert!(!store.blob_path(&other).exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        // A blob longer than its descriptor fails on the write that crosses the size.
        let mut w = store.blob_writer(good, 4).unwrap();
        let err = w.write_all(b"layer bytes").unwrap_err().to_string();
        assert!(err.contains("larger than the 4 bytes"), "{err}");
    }

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
    fn an_ingest_is_kept_and_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d = Digest::of(&blob);
        let len = blob.len() as u64;
        // A first download gets 40 000 bytes and fails: the writer is dropped, the bytes stay.
        let (mut w, mut kept) = store.ingest(d, len, 1).unwrap();
        assert_eq!(w.on_disk(), 0);
        assert_eq!(std::io::copy(&mut kept, &mut std::io::sink()).unwrap(), 0);
        w.write_all(&blob[..40_000]).unwrap();
        drop(w);
        assert_eq!(fs::metadata(store.ingest_path(&d)).unwrap().len(), 40_000);
        // Too few bytes to be worth resuming: emptied.
        let (w, _) = store.ingest(d, len, 50_000).unwrap();
        assert_eq!(w.on_disk(), 0);
        drop(w);
        assert_eq!(fs::metadata(store.ingest_path(&d)).unwrap().len(), 0);
        // Resumed: the bytes on disk are read back and hashed, the rest written after them.
        let (mut w, _) = store.ingest(d, len, 1).unwrap();
        w.write_all(&blob[..40_000]).unwrap();
        drop(w);
        let (mut w, mut kept) = store.ingest(d, len, 1).unwrap();
        assert_eq!(w.on_disk(), 40_000);
        let mut back = Vec::new();
        kept.read_to_end(&mut back).unwrap();
        assert_eq!(back, &blob[..40_000]);
        w.write_all(&back).unwrap();
        w.write_all(&blob[40_000..]).unwrap();
        assert_eq!(w.commit("test").unwrap(), store.blob_path(&d));
        assert_eq!(fs::read(store.blob_path(&d)).unwrap(), blob);
        assert!(!store.ingest_path(&d).exists());
        // A partial longer than the blob is not resumed.
        fs::write(store.ingest_path(&d), vec![0u8; 100_001]).unwrap();
        let (w, _) = store.ingest(d, len, 1).unwrap();
        assert_eq!(w.on_disk(), 0);
        drop(w);
        // Damaged bytes on disk fail the digest: nothing lands.
        fs::write(store.ingest_path(&d), vec![0u8; 40_000]).unwrap();
        let (mut w, mut kept) = store.ingest(d, len, 1).unwrap();
        std::io::copy(&mut kept, &mut w).unwrap();
        w.write_all(&blob[40_000..]).unwrap();
        fs::remove_file(store.blob_path(&d)).unwrap();
        assert!(w.commit("test").is_err());
        assert!(!store.blob_path(&d).exists());
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

    #[test]
    fn a_layers_stale_temp_files_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (d, other) = (Digest::of(b"layer"), Digest::of(b"other"));
        let tmp = dir.path().join("tmp");
        for name in [
            format!("{}.999999999.0", d.hex()),
            format!("{}.zst.999999999.1", d.hex()),
            format!("{}.999999999.2", other.hex()),
        ] {
            fs::write(tmp.join(name), b"12345").unwrap();
        }
        let (mut w, _) = store.ingest(d, 100, 1).unwrap();
        w.write_all(b"kept").unwrap();
        assert_eq!(store.clear_layer_temps(&d), 10);
        let mut left: Vec<_> = fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![
            format!("{}.999999999.2", other.hex()),
            format!("{}.ingest", d.hex()),
        ];
        want.sort();
        assert_eq!(left, want);
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
