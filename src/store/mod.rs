//! The content-addressed store: blobs by digest, layer indexes, merged trees and image records.
//!
//! ```text
//! $STORE/
//! ├── blobs/sha256/<hex>         manifests, configs and layer blobs, exactly as pulled, verified
//! ├── layers/sha256/<hex>.idx    layer index: the file table             (key: layer blob digest)
//! ├── layers/sha256/<hex>.access checkpoints / zstd frame table           (key: layer blob digest)
//! ├── layers/sha256/<hex>.zst    seekable copy of a zstd layer           (key: layer blob digest)
//! ├── layers/sha256/<hex>.small  small files' bytes, in blocks (an EROFS device) (key: layer blob digest)
//! ├── layers/sha256/<hex>.small.map  its table decoded, for FUSE reads to map (derived, remade at will)
//! ├── layers/sha256/<hex>.<ix>.{idx,access}     a lazily served layer's index as the image's
//! │                                              published index <ix> gives it
//! ├── layers/sha256/<hex>.<ix>.{partial,present} its bytes fetched so far, and which chunks
//! │                                              (the windows': `.windows.partial`, ...)
//! ├── trees/sha256/<hex>.tree    merged tree of an image                 (key: manifest digest)
//! ├── trees/sha256/<hex>.erofs   its metadata as EROFS, .small files its devices (key: manifest digest)
//! ├── images.json                reference → manifest, config and layers, replaced atomically
//! ├── settings.json              the store's settings (its budget), replaced atomically
//! ├── used/<sha256 of reference> when each image was last pulled or mounted (its mtime)
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
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::{Digest, Error, Result};

mod budget;
mod gc;
mod ingest;
pub use budget::{
    budget_from_env, parse_size, BudgetAction, BudgetPlan, BudgetReport, BudgetStep, Settings,
    BUDGET_ENV,
};
pub use gc::{ImageUsage, Lease, Usage};
pub(crate) use ingest::BlobWriter;

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
pub(crate) struct Lock {
    _file: File,
}

/// Takes the exclusive lock on `file` if nobody holds it (kept until the file is closed).
pub(crate) fn try_flock(file: &File) -> bool {
    // SAFETY: flock on a valid, owned descriptor.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers see the old or
/// the new content, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// [`write_atomic`] with the file created with permission bits `mode` (never wider, even
/// for a moment: for secrets).
pub(crate) fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
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
pub(crate) fn sync_dir(path: &Path) {
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
    process_state(pid).is_some_and(|state| state != 'Z' && state != 'X')
}

/// Whether process `pid` has exited and let go of everything it held: gone, or a zombie whose
/// threads have all ended (a process's descriptors — its leases and locks — are closed by its
/// last thread to exit, which may come after its main thread shows `Z`).
pub(crate) fn exited(pid: u32) -> bool {
    match process_state(pid) {
        None => true,
        Some('Z' | 'X') => {
            fs::read_dir(format!("/proc/{pid}/task")).map_or(true, |t| t.count() <= 1)
        }
        Some(_) => false,
    }
}

/// Process `pid`'s state letter (`R`, `S`, `D`, `Z`…; of its main thread), if it exists.
pub(crate) fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": the state follows the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

impl Store {
    /// Opens (creating if needed) the store at `root` (made absolute: the image servers it
    /// starts run elsewhere).
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root: PathBuf = root.into();
        let root = std::path::absolute(&root)
            .map_err(|e| Error::io(format!("resolving {}", root.display()), e))?;
        let store = Store { root };
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
    #[doc(hidden)]
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Where the index of layer `d` lives.
    #[doc(hidden)]
    pub fn index_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(format!("{}.idx", d.hex()))
    }

    /// Where the index of layer `layer` as `index` (a published index blob) described it lives:
    /// a lazily served layer reads by the index its image vouched for, never by one another
    /// image named for the same layer (`<layer>.idx` is written only from bytes that hashed
    /// to the layer's digest).
    pub(crate) fn lazy_index_path(&self, layer: &Digest, index: &Digest) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(format!("{}.{}.idx", layer.hex(), index.hex()))
    }

    /// Where the index a mount of this layer of an image reads by lives: its own published
    /// index's for a lazily served layer, else the one built from the layer's bytes.
    pub(crate) fn layer_index_path(&self, layer: &LayerRecord) -> PathBuf {
        match &layer.index {
            Some(index) => self.lazy_index_path(&layer.digest, index),
            None => self.index_path(&layer.digest),
        }
    }

    /// Where the bytes of layer `layer` fetched so far by the index `index` live (a sparse
    /// file; `<..>.present` beside it marks the chunks verified and written), and with
    /// `windows` those of its gzip windows. Keyed by the index as well as the layer: another
    /// image naming the same layer with another index never shares them.
    pub(crate) fn partial_path(&self, layer: &Digest, index: &Digest, windows: bool) -> PathBuf {
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
    pub(crate) fn seekable_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(format!("{}.zst", d.hex()))
    }

    /// Where the merged tree of the image with manifest `d` lives.
    pub(crate) fn tree_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("trees/sha256")
            .join(format!("{}.tree", d.hex()))
    }

    /// Where the EROFS metadata image of the image with manifest `d` lives (root's shared
    /// mounts: see [`crate::tree::erofs`]).
    pub(crate) fn meta_image_path(&self, d: &Digest) -> PathBuf {
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
    pub(crate) fn trace_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("trees/sha256")
            .join(format!("{}.trace", manifest.hex()))
    }

    /// Present when a lazily served image proved different from its published index; holds why.
    pub(crate) fn bad_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("trees/sha256")
            .join(format!("{}.bad", manifest.hex()))
    }

    /// Present when the background completion of a lazily served image gave up (the next
    /// mount tries again); holds why, for `mount --wait-complete` to say.
    pub(crate) fn incomplete_path(&self, view: &Digest) -> PathBuf {
        self.root
            .join("trees/sha256")
            .join(format!("{}.incomplete", view.hex()))
    }

    /// A fresh temporary path in the store (same filesystem, so renames are atomic).
    pub(crate) fn temp_path(&self, what: &str) -> PathBuf {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        self.root.join("tmp").join(format!(
            "{what}.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Takes the exclusive lock `name`, waiting for other processes that hold it.
    pub(crate) fn lock(&self, name: &str) -> Result<Lock> {
        self.flock(name, libc::LOCK_EX)
    }

    /// The file behind lock `name`, opened (for [`try_flock`] by a process that may no longer
    /// open it later).
    pub(crate) fn lock_file(&self, name: &str) -> Result<File> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening lock {}", path.display()))
    }

    /// [`Store::lock`] if nobody holds it, else `None` at once.
    pub(crate) fn try_lock(&self, name: &str) -> Result<Option<Lock>> {
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
    pub(crate) fn pull_guard(&self) -> Result<Lock> {
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

    /// Stores `bytes` as a blob after checking that they hash to `expected`.
    pub(crate) fn put_blob(&self, expected: &Digest, bytes: &[u8], what: &str) -> Result<PathBuf> {
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
    pub(crate) fn put_image(&self, record: ImageRecord) -> Result<()> {
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
    #[doc(hidden)]
    pub fn remove_image(&self, reference: &str) -> Result<bool> {
        self.update_images(|f| f.images.remove(reference).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process whose main thread has ended shows `Z` while its other threads still hold its
    /// descriptors (here a lease): it has not exited until they end too.
    #[test]
    fn a_process_has_not_exited_while_a_thread_of_it_holds_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let held = Digest::of(b"held");
        // SAFETY: the child takes a lease, starts a thread and ends its main thread alone
        // (SYS_exit, not exit_group); it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let lease = store.lease(&[held]);
            std::thread::spawn(move || {
                let _lease = lease;
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            });
            unsafe { libc::syscall(libc::SYS_exit, 0) };
            unsafe { libc::_exit(1) };
        }
        let pid = pid as u32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_state(pid) != Some('Z') && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let (state, lease_held) = (process_state(pid), store.in_use(&held).unwrap());
        let was_exited = exited(pid);
        // SAFETY: our own child, reaped below.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        while !exited(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let exited_after_kill = exited(pid);
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
        assert_eq!(state, Some('Z'), "the child's main thread did not end");
        assert!(lease_held, "the child's lease was not held by its thread");
        assert!(
            !alive(pid) && !was_exited,
            "a process whose thread holds a lease has exited"
        );
        assert!(exited_after_kill, "a killed process has not exited");
        assert!(
            !store.in_use(&held).unwrap(),
            "the killed child's lease is held"
        );
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
