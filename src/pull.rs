//! Pulling an image into the store: resolve the manifest, fetch the config, stream every layer
//! (in parallel) through digest verification and the indexer in one pass, merge, record.
//!
//! A layer is downloaded and indexed at the same time: the HTTP stream feeds a blocking thread
//! that tees the compressed bytes into the store's temp file while decompressing them into the
//! tar scanner. Nothing is listed in `images.json` until every layer is verified (blob digest and
//! `diff_id`) and the merged tree is on disk, so a failed pull leaves the store as it was, apart
//! from whole verified layers that a retry reuses, and the part of a layer a broken download got
//! (`tmp/<hex>.ingest`), which the next pull resumes by Range: it reads those bytes back into the
//! hash and the indexer, then requests the rest.

use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::sync::Arc;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::index::published::PublishedLayer;
use crate::index::{self, Compression, LayerIndex};
use crate::registry::manifest::{self, Descriptor, ImageConfig, ManifestOrIndex, Platform};
use crate::registry::RegistryOptions;
use crate::source::{Location, Source};
use crate::store::{ImageRecord, LayerRecord};
use crate::tree::{self, Tree};
use crate::{Digest, Error, Result, Store};

/// Largest manifest or config accepted (real ones are a few KiB).
const MAX_JSON_BLOB: u64 = 16 << 20;
/// Consecutive failed attempts to resume a download before the pull gives up.
const MAX_RESUMES: u32 = 5;
/// How long a download may go without data before it is treated as broken.
pub const DEFAULT_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// Compressed bytes in flight between a download and its indexer (the download waits while
/// the indexer is this far behind).
const CHANNEL_BYTES: usize = 4 << 20;
/// A partial download left by an earlier pull is resumed if it has at least this many bytes
/// (less is not worth the extra request), and kept after a failure only then.
const MIN_RESUME: u64 = 1 << 20;

/// When to go to the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Use the stored image if there is one (bux-oci's `ensure`).
    #[default]
    IfMissing,
    /// Always fetch the manifest again; reuse layers already stored.
    Always,
    /// Never contact the registry; fail if the image is not stored.
    Never,
}

/// What is happening during a pull, for progress displays.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The manifest is resolved: these layers (digest, compressed size) will be needed.
    Resolved {
        /// Normalized reference.
        reference: String,
        /// Manifest digest.
        manifest: Digest,
        /// Layers, bottom first.
        layers: Vec<(Digest, u64)>,
    },
    /// The image was already in the store; nothing was fetched.
    Cached {
        /// Normalized reference.
        reference: String,
    },
    /// A layer is already stored and indexed.
    LayerCached {
        /// The layer.
        layer: Digest,
    },
    /// A layer's download goes on from the bytes an earlier pull (one that failed or was
    /// killed) left: they are read back and indexed, the rest is requested by Range.
    LayerResumed {
        /// The layer.
        layer: Digest,
        /// Bytes already there.
        offset: u64,
        /// Expected size.
        total: u64,
    },
    /// Bytes of a layer downloaded (and indexed) so far.
    LayerBytes {
        /// The layer.
        layer: Digest,
        /// Bytes so far.
        done: u64,
        /// Expected size.
        total: u64,
    },
    /// A layer is stored and indexed.
    LayerDone {
        /// The layer.
        layer: Digest,
        /// Its number of tar entries.
        entries: usize,
    },
    /// The merged tree is built.
    Merged {
        /// Number of inodes.
        inodes: usize,
    },
    /// The image's EROFS metadata image is in the store (root's shared mounts stand on it).
    MetadataImage {
        /// Its size.
        bytes: u64,
    },
    /// Something the user should know, though the pull goes on: the image's platform is not
    /// the one asked for (the host's when none was), or a stored image serves because the
    /// reference could not be resolved again.
    Warning {
        /// Normalized reference.
        reference: String,
        /// What is the matter, in a sentence.
        message: String,
    },
}

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// How to pull.
///
/// # Memory and threads
///
/// A pull's memory in the caller's process is bounded by the layers it fetches at once
/// ([`PullOptions::parallel`]) and the number of files, not by the image's size in bytes. It
/// holds, roughly:
///
/// * per layer being fetched, ~10 MiB: at most 4 MiB of download in flight to its indexer (the
///   download waits beyond that), the indexer's buffers, and the writer that puts the bytes of
///   small files (see [`PullOptions::small_files`]) on disk as they are read — they are not
///   held; a zstd layer adds its decoder's window (8 MiB at the usual levels);
/// * per gzip layer being indexed, its checkpoints' compressed windows until its index is
///   saved: ~6% of its uncompressed size (one ~15 KiB window per 256 KiB);
/// * per file of the image, a few hundred bytes (its entry in its layer's table, the merged
///   tree, the metadata image's inodes and directories while that image is written: it is
///   written to its file from the small files' tables, not built in memory).
///
/// Measured (`bench/memory.sh`, results in `bench/RESULTS-memory.md`): the large Debian test
/// image (1 GiB over 7 layers, 26k files) peaks at ~80 MB RSS in the caller's process, the
/// process's own ~20 MB included, with or without small files kept (before: 345 MB, 130 MB
/// without). Once the pull returns it holds nothing, and the freed memory is given back to
/// the system (glibc's `malloc_trim`: its arenas would otherwise keep it): 35–45 MB of RSS
/// remain (before: 130 and 100), the ~20 MB above and the stacks of tokio's idle blocking
/// threads among them.
///
/// The blocking work (hashing, decompressing, indexing, writing files, merging, the metadata
/// image) runs on tokio's blocking pool (`spawn_blocking`), never on the async threads: a
/// pull on a current-thread runtime leaves it free for the caller's other tasks.
#[derive(Clone, Default)]
pub struct PullOptions {
    /// When to contact the registry. Default [`PullPolicy::IfMissing`].
    pub policy: PullPolicy,
    /// Platform to pick from an image index (default: the host's).
    pub platform: Option<Platform>,
    /// Credentials, plain-HTTP registries, mirrors, timeouts. Default: Docker's `config.json`
    /// credentials, loopback registries over HTTP, no mirrors, timeouts of 10 s to connect and
    /// 30 s to answer.
    pub registry: RegistryOptions,
    /// Called with progress events (from several threads). Default none.
    pub progress: Option<ProgressFn>,
    /// Layers fetched at once (0 means 3); each costs ~10 MiB of memory while it is fetched
    /// (see [Memory and threads](PullOptions#memory-and-threads)).
    pub parallel: usize,
    /// A download without data for this long is resumed (default [`DEFAULT_STALL`]).
    pub stall_timeout: Option<std::time::Duration>,
    /// The largest file whose bytes the store keeps uncompressed, for the layers this pull
    /// indexes: the metadata image of root's shared mounts serves them (their reads never reach
    /// FUSE), and every other mount reads them from there instead of inflating the layer.
    /// Default 64 KiB (the large Debian image's store grows by 0.29× its compressed size, its
    /// pull not at all); `Some(0)` keeps none (the store stays at 1.15× the compressed image).
    pub small_files: Option<u64>,
    /// Which signature policy (`containers-policy.json(5)`) the image must satisfy, checked
    /// before anything of it is stored. Default [`crate::policy::SignaturePolicy::Auto`]: the
    /// user's or the system's `policy.json` as podman finds it; none, every image accepted.
    pub signature_policy: crate::policy::SignaturePolicy,
    /// The store budget kept once the pull has recorded its image (which stays, whatever it
    /// costs): by default the store's setting (`bux-fuse config max-store-size`, see
    /// [`Store::settings`]), none if unset.
    pub budget: Budget,
}

/// Which store budget a pull keeps (see [`Store::enforce_budget`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Budget {
    /// The store's own setting, if it has one.
    #[default]
    Setting,
    /// At most this many bytes.
    Max(u64),
    /// None: the caller keeps it (the CLI does, with its messages).
    Unlimited,
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("policy", &self.policy)
            .field("platform", &self.platform)
            .field("registry", &self.registry)
            .field("parallel", &self.parallel)
            .field("small_files", &self.small_files)
            .field("budget", &self.budget)
            .field("signature_policy", &self.signature_policy)
            .finish()
    }
}

impl PullOptions {
    pub(crate) fn emit(&self, p: Progress) {
        if let Some(f) = &self.progress {
            f(p);
        }
    }
}

/// An image ready to mount.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// Normalized reference (the key in the store).
    pub reference: String,
    /// Manifest digest.
    pub manifest_digest: Digest,
    /// The image config.
    pub config: ImageConfig,
    /// The store's record.
    pub record: ImageRecord,
}

/// The store keys `reference` may stand for, in the order to try them (one, but for a short
/// name with several search registries).
pub(crate) fn candidate_names(reference: &str) -> Result<Vec<String>> {
    Ok(Location::candidates(reference)?
        .iter()
        .map(Location::key)
        .collect())
}

/// Normalizes a user's reference the way the store keys it.
pub fn normalize_reference(reference: &str) -> Result<String> {
    Ok(Location::parse(reference)?.key())
}

/// Feeds downloaded chunks to the blocking indexer as a `Read`.
pub(crate) struct ChannelReader {
    rx: Chunks,
    cur: bytes::Bytes,
    /// What `cur` holds of the byte budget of a [`chunk_channel`], given back once it is read.
    _held: Option<tokio::sync::OwnedSemaphorePermit>,
}

enum Chunks {
    Std(mpsc::Receiver<io::Result<bytes::Bytes>>),
    Bounded(tokio::sync::mpsc::Receiver<Chunk>),
}

/// A chunk of a download, with its share of the channel's byte budget.
type Chunk = (
    io::Result<bytes::Bytes>,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

impl ChannelReader {
    /// Reads what is sent on `rx` until its sender is dropped.
    pub(crate) fn new(rx: mpsc::Receiver<io::Result<bytes::Bytes>>) -> ChannelReader {
        ChannelReader {
            rx: Chunks::Std(rx),
            cur: bytes::Bytes::new(),
            _held: None,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            self._held = None; // the chunk read: its bytes may be sent again
            let next = match &mut self.rx {
                Chunks::Std(rx) => rx.recv().ok().map(|c| (c, None)),
                Chunks::Bounded(rx) => rx.blocking_recv(),
            };
            match next {
                Some((Ok(b), held)) => (self.cur, self._held) = (b, held),
                Some((Err(e), _)) => return Err(e),
                None => return Ok(0), // sender finished: end of blob
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// The sending half of a [`chunk_channel`]: an async send that waits (without blocking the
/// executor) while the reader holds [`CHANNEL_BYTES`] not read yet.
pub(crate) struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<Chunk>,
    budget: Arc<tokio::sync::Semaphore>,
}

impl ChunkSender {
    /// Sends a chunk once the budget has room for it (a chunk larger than the whole budget
    /// waits for all of it); `Err` when the reader is gone.
    pub(crate) async fn send(
        &self,
        chunk: io::Result<bytes::Bytes>,
    ) -> std::result::Result<(), ()> {
        let want = match &chunk {
            Ok(b) => b.len().clamp(1, CHANNEL_BYTES) as u32,
            Err(_) => 0,
        };
        let held = match want {
            0 => None,
            n => Some(
                self.budget
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| ())?,
            ),
        };
        self.tx.send((chunk, held)).await.map_err(|_| ())
    }
}

/// A channel from a download (async) to its indexer (a blocking thread), bounded by the bytes
/// in flight ([`CHANNEL_BYTES`]) rather than the chunks, whose size is the HTTP stack's to
/// choose.
pub(crate) fn chunk_channel() -> (ChunkSender, ChannelReader) {
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_BYTES / 1024);
    let budget = Arc::new(tokio::sync::Semaphore::new(CHANNEL_BYTES));
    let reader = ChannelReader {
        rx: Chunks::Bounded(rx),
        cur: bytes::Bytes::new(),
        _held: None,
    };
    (ChunkSender { tx, budget }, reader)
}

/// Copies what is read into a writer (the blob's temp file).
struct Tee<'a, R, W> {
    inner: R,
    out: &'a mut W,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// A manifest resolved for the host (or chosen) platform, with its config stored.
pub(crate) struct Resolved {
    pub(crate) name: String,
    pub(crate) bytes: Vec<u8>,
    pub(crate) digest: Digest,
    pub(crate) config_digest: Digest,
    pub(crate) config: ImageConfig,
    pub(crate) jobs: Vec<LayerJob>,
}

pub(crate) struct LayerJob {
    pub(crate) desc: Descriptor,
    pub(crate) digest: Digest,
    pub(crate) compression: Compression,
    pub(crate) diff_id: Digest,
}

impl Store {
    /// Pulls `reference` according to `opts` and returns it ready to mount.
    ///
    /// A short name (`ubuntu:24.04`) resolves as registries.conf says (see
    /// [`crate::registry::conf`]); with several search registries to try (permissive mode),
    /// the first that has the image serves it (one stored already, first).
    pub async fn pull(&self, reference: &str, opts: &PullOptions) -> Result<PulledImage> {
        let image = self.pull_candidates(reference, opts).await?;
        self.keep_budget(opts.budget, &image.reference).await;
        Ok(image)
    }

    /// Keeps the store budget after a pull of `kept` (a failure to is logged: the pull stands).
    pub(crate) async fn keep_budget(&self, budget: Budget, kept: &str) {
        let max = match budget {
            Budget::Unlimited => return,
            Budget::Max(max) => max,
            Budget::Setting => match self.settings() {
                Ok(s) => match s.max_store_size {
                    Some(max) => max,
                    None => return,
                },
                Err(e) => return tracing::warn!("reading the store's settings: {e}"),
            },
        };
        let (store, kept) = (self.clone(), vec![kept.to_string()]);
        match tokio::task::spawn_blocking(move || store.enforce_budget(max, &kept)).await {
            Ok(Ok(r)) if !r.removed.is_empty() || !r.dropped.is_empty() => tracing::info!(
                "store budget {max}: removed {:?}, dropped the chunks of {:?}",
                r.removed,
                r.dropped
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("keeping the store budget: {e}"),
            Err(e) => tracing::warn!("keeping the store budget: {e}"),
        }
    }

    async fn pull_candidates(&self, reference: &str, opts: &PullOptions) -> Result<PulledImage> {
        let names = candidate_names(reference)?;
        if names.len() == 1 {
            return self.pull_one(reference, opts).await;
        }
        if opts.policy != PullPolicy::Always {
            if let Some(stored) = names
                .iter()
                .find(|n| self.image(n).is_ok_and(|i| i.is_some()))
            {
                return self.pull_one(stored, opts).await;
            }
        }
        let mut tried = Vec::new();
        for name in &names {
            match self.pull_one(name, opts).await {
                Err(e) if matches!(e.inner(), Error::NotFound { .. }) => tried.push(e.to_string()),
                r => return r,
            }
        }
        Err(Error::NotFound {
            reference: reference.to_string(),
            detail: format!(" in any search registry ({})", tried.join("; ")),
        })
    }

    async fn pull_one(&self, reference: &str, opts: &PullOptions) -> Result<PulledImage> {
        let parsed = Location::parse(reference)?;
        let name = parsed.key();
        let _guard = self.hold_pull_guard().await?;
        if opts.policy != PullPolicy::Always {
            if let Some(record) = self.stored_image(&name, opts, false)? {
                return self.serve_stored(record, opts);
            }
            if opts.policy == PullPolicy::Never {
                return Err(Error::NotFound {
                    reference: name,
                    detail: " in the local store (pull policy is never)".into(),
                });
            }
            // Stored for another platform than the host's, with none asked for: resolved
            // again for the host (see `platform_ok`).
            if let Some(record) = self.stored_for_another_platform(&name, opts, false)? {
                return self.resolve_for_host(&parsed, record, opts).await;
            }
        }
        self.pull_from_source(&parsed, opts)
            .await
            .map_err(|e| e.for_image(&name))
    }

    /// A stored image, as it is: said to be cached, and warned about when its platform is
    /// not the one asked for.
    pub(crate) fn serve_stored(
        &self,
        record: ImageRecord,
        opts: &PullOptions,
    ) -> Result<PulledImage> {
        if let Ok(have) = record.platform.parse::<Platform>() {
            if let Some(message) = platform_warning(&have, opts) {
                opts.emit(Progress::Warning {
                    reference: record.reference.clone(),
                    message,
                });
            }
        }
        opts.emit(Progress::Cached {
            reference: record.reference.clone(),
        });
        self.pulled(record)
    }

    /// The stored record of `name` when no platform was asked for and it would mount but for
    /// its platform (another than the host's): what a pull or mount resolves again for the host.
    pub(crate) fn stored_for_another_platform(
        &self,
        name: &str,
        opts: &PullOptions,
        lazy_ok: bool,
    ) -> Result<Option<ImageRecord>> {
        if opts.platform.is_some() {
            return Ok(None);
        }
        let any = PullOptions {
            policy: PullPolicy::Never,
            progress: None,
            ..opts.clone()
        };
        self.stored_image(name, &any, lazy_ok)
    }

    /// Resolves `loc` again for the host when the store has it for another platform: a
    /// multi-platform image is pulled for the host (the stored record is replaced); an image
    /// that is only there for another platform is served as stored, with a warning — also
    /// when the source cannot be reached.
    async fn resolve_for_host(
        &self,
        loc: &Location,
        record: ImageRecord,
        opts: &PullOptions,
    ) -> Result<PulledImage> {
        if self.host_resolves_elsewhere(loc, &record, opts).await {
            let name = loc.key();
            return self
                .pull_from_source(loc, opts)
                .await
                .map_err(|e| e.for_image(&name));
        }
        self.serve_stored(record, opts)
    }

    /// Whether `loc` resolves for the host to another manifest than the stored `record` (of
    /// another platform). Asked of the source for at most [`HOST_PROBE`]: a source that cannot
    /// be reached, or answers late, leaves the stored image serving, with a warning — a mount
    /// that worked offline keeps working.
    pub(crate) async fn host_resolves_elsewhere(
        &self,
        loc: &Location,
        record: &ImageRecord,
        opts: &PullOptions,
    ) -> bool {
        let name = loc.key();
        let probe = PullOptions {
            progress: None,
            ..opts.clone()
        };
        let resolved = match open_source(loc, opts).await {
            Ok(src) => tokio::time::timeout(HOST_PROBE, self.resolve(&src, &name, &probe))
                .await
                .unwrap_or_else(|_| {
                    Err(Error::io(
                        "asking the registry",
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no answer in {HOST_PROBE:?}"),
                        ),
                    ))
                }),
            Err(e) => Err(e),
        };
        match resolved {
            Ok(r) => r.digest != record.manifest_digest,
            Err(e) => {
                let why = e.to_string();
                let why = why.strip_prefix(&format!("{name}: ")).unwrap_or(&why);
                opts.emit(Progress::Warning {
                    reference: name.clone(),
                    message: format!(
                        "not resolved again for this host ({why}); the stored {} image serves",
                        record.platform
                    ),
                });
                false
            }
        }
    }

    /// Waits for, then holds, the store's pull guard (gc waits while any pull holds it, and a
    /// pull waits for a running gc), off the async threads.
    pub(crate) async fn hold_pull_guard(&self) -> Result<crate::store::Lock> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.pull_guard())
            .await
            .map_err(|e| Error::io("lock task", io::Error::other(e)))?
    }

    /// The stored record of `name` if it mounts as it is: every layer indexed by this version
    /// and its bytes there (or, when `lazy_ok`, its published index there to fetch them by),
    /// the tree saved, and the platform asked for.
    pub(crate) fn stored_image(
        &self,
        name: &str,
        opts: &PullOptions,
        lazy_ok: bool,
    ) -> Result<Option<ImageRecord>> {
        let Some(record) = self.image(name)? else {
            return Ok(None);
        };
        let usable = record.layers.iter().all(|l| {
            self.ensure_layer_index(l).is_ok()
                && (self.layer_local(l) || lazy_ok && l.index.is_some())
        });
        let ok = usable && self.tree_path(&record.view()).exists() && platform_ok(&record, opts);
        Ok(ok.then_some(record))
    }

    pub(crate) fn pulled(&self, record: ImageRecord) -> Result<PulledImage> {
        self.mark_used(&record.reference);
        let config = self.read_config(&record.config_digest)?;
        Ok(PulledImage {
            reference: record.reference.clone(),
            manifest_digest: record.manifest_digest,
            config,
            record,
        })
    }

    fn read_config(&self, digest: &Digest) -> Result<ImageConfig> {
        let path = self.blob_path(digest);
        let bytes =
            std::fs::read(&path).map_err(|e| Error::io(format!("reading config {digest}"), e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::InvalidManifest {
            what: format!("config {digest}"),
            detail: e.to_string(),
        })
    }

    /// The config of a stored image.
    pub fn config(&self, reference: &str) -> Result<ImageConfig> {
        let name = normalize_reference(reference)?;
        let record = self.image(&name)?.ok_or_else(|| Error::NotFound {
            reference: name.clone(),
            detail: " in the local store".into(),
        })?;
        self.read_config(&record.config_digest)
    }

    /// Forgets the image `reference` (as the user wrote it); returns whether it was stored.
    /// Its blobs stay until [`Store::gc`] (other images may share them). A name of an image
    /// that other names have too is only untagged (as podman's `rmi` does), mounted or not;
    /// the last name of an image a live mount uses is refused ([`Error::InUse`]) unless
    /// `force`, and even then gc keeps its files until the mount ends.
    pub fn remove(&self, reference: &str, force: bool) -> Result<bool> {
        let name = normalize_reference(reference)?;
        if let Some(rec) = self.image(&name)? {
            let named_otherwise = self
                .images()?
                .iter()
                .any(|i| i.reference != name && i.manifest_digest == rec.manifest_digest);
            if !named_otherwise {
                if !force && self.in_use(&rec.manifest_digest)? {
                    return Err(Error::InUse { reference: name });
                }
                // Forgetting an image marked bad clears the mark: the next pull starts afresh.
                let _ = std::fs::remove_file(self.bad_path(&rec.view()));
            }
        }
        self.remove_image(&name)
    }

    /// The merged tree of a stored image, re-merged from the layer indexes if its file is gone
    /// or damaged. Its checksum is verified here, once per server (a mount over a running
    /// shared server does not come here), so that a flipped byte is not served.
    pub(crate) fn tree(&self, record: &ImageRecord) -> Result<Tree> {
        let path = self.tree_path(&record.view());
        let loaded = Tree::load(&path).and_then(|t| {
            t.verify().map_err(|detail| Error::CorruptStore {
                path: path.clone(),
                detail,
            })?;
            Ok(t)
        });
        let mut tree = match loaded {
            Ok(t) => t,
            Err(e) => {
                let indexes = record
                    .layers
                    .iter()
                    .map(|l| {
                        self.ensure_layer_index(l)?;
                        LayerIndex::load(&self.layer_index_path(l))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let t = tree::merge(indexes.iter().map(|i| (i.source(), i.entries.as_slice())))?;
                t.save(&path)?;
                match &e {
                    Error::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound => {}
                    // Written by an earlier version (its format changed): expected once.
                    e if tree::of_another_version(e) => {
                        tracing::info!("{e}: merged it again from the layer indexes");
                    }
                    _ => tracing::warn!("{e}: rebuilt it from the layer indexes"),
                }
                t
            }
        };
        // Trees do not carry the layers' checkpoints (each layer's are stored once, beside
        // its index): attach them for reading — those of the index this image vouches for.
        if tree.layers.len() != record.layers.len() {
            return Err(Error::CorruptStore {
                path,
                detail: format!(
                    "{} layers in the tree, {} in the image record",
                    tree.layers.len(),
                    record.layers.len()
                ),
            });
        }
        for (layer, l) in tree.layers.iter_mut().zip(&record.layers) {
            self.ensure_layer_index(l)?;
            layer.access = LayerIndex::load_access(&self.layer_index_path(l))?;
        }
        Ok(tree)
    }

    /// Makes sure the index a mount of layer `l` reads by is there: a lazily served layer's
    /// is derived from its published index blob when missing (a store from before indexes
    /// were keyed by the published index, which kept one per layer). The blob is checked
    /// against its digest as it is read.
    pub(crate) fn ensure_layer_index(&self, l: &LayerRecord) -> Result<()> {
        let path = self.layer_index_path(l);
        if LayerIndex::access_path(&path).exists() && path.exists() {
            return Ok(());
        }
        let Some(index) = l.index else {
            return Err(Error::io(
                format!("index of layer {}", l.digest),
                io::Error::new(io::ErrorKind::NotFound, "not stored"),
            ));
        };
        let bytes = self.read_verified_blob(&index, "published layer index")?;
        let published = PublishedLayer::decode(&bytes, l.digest, l.size)?;
        let derived = published.to_index();
        let windows_apart = published.windows.is_some();
        if windows_apart && self.layer_local(l) {
            // A layer an earlier version completed: whole, but the published index keeps its
            // gzip windows apart, and what the earlier version left beside it cannot be
            // trusted. Index the blob once, after hashing it, and keep that if it proves to be
            // what the published index says (as a completion does).
            match self.index_whole_blob(l, published.compression) {
                Ok(real) if crate::lazy::same_as_published(&real, &published) => {
                    real.save(&self.index_path(&l.digest))?;
                    return real.save(&path);
                }
                Ok(_) => tracing::warn!(
                    "layer {}: its bytes are not what the published index {} says",
                    l.digest,
                    index.short()
                ),
                Err(e) => tracing::warn!("layer {}: {e}", l.digest),
            }
        }
        derived.save(&path)
    }

    /// The index of a whole stored layer blob, built from its bytes once they hashed to the
    /// layer's digest.
    fn index_whole_blob(&self, l: &LayerRecord, compression: Compression) -> Result<LayerIndex> {
        let path = self.blob_path(&l.digest);
        let open = || {
            std::fs::File::open(&path)
                .map(io::BufReader::new)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))
        };
        let mut hasher = crate::digest::Hasher::default();
        let mut f = open()?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        if hasher.finish() != l.digest {
            return Err(Error::CorruptStore {
                path,
                detail: "the blob does not match its digest (`bux-fuse check --repair`)".into(),
            });
        }
        let small_max = crate::mount::shared::small_files_kept(None);
        // Small files' bytes to disk as they come (see `index_layer`), not held.
        let small_tmp = self.temp_path(&format!("{}.small", l.digest.hex()));
        let small = index::small::SmallFiles::spilling(small_max, small_tmp)?;
        let mut idx = index::build_keeping(open()?, compression, l.digest, None, small)?;
        idx.compressed_size = l.size;
        Ok(idx)
    }

    /// A stored blob, checked against its digest.
    pub(crate) fn read_verified_blob(&self, d: &Digest, what: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(d);
        let bytes =
            std::fs::read(&path).map_err(|e| Error::io(format!("reading {what} {d}"), e))?;
        if Digest::of(&bytes) != *d {
            return Err(Error::CorruptStore {
                path,
                detail: format!("{what} does not match its digest (`bux-fuse check --repair`)"),
            });
        }
        Ok(bytes)
    }

    /// Whether the bytes a mount reads for layer `l` of an image are stored: for a lazily
    /// served layer the whole blob (promoted only once it hashed to its digest), else as
    /// [`Store::layer_bytes_present`] says.
    pub(crate) fn layer_local(&self, l: &LayerRecord) -> bool {
        match l.index {
            Some(_) => self.blob_path(&l.digest).exists(),
            None => self.layer_bytes_present(&l.digest),
        }
    }

    /// Resolves the manifest (through an index to the wanted platform) and stores the config.
    pub(crate) async fn resolve(
        &self,
        reg: &Source,
        name: &str,
        opts: &PullOptions,
    ) -> Result<Resolved> {
        let name = name.to_string();
        let want = opts.platform.clone().unwrap_or_else(Platform::host);

        // Manifest, through an index if there is one.
        let (mut bytes, mut digest) = reg.top_manifest().await?;
        crate::policy::check(&opts.signature_policy, reg, &name, &bytes, &digest, &want).await?;
        let mut parsed = parse_manifest(&bytes, &name)?;
        let single_platform = !parsed.is_index();
        if parsed.is_index() {
            let entries = parsed.manifests.clone().unwrap_or_default();
            let chosen =
                manifest::select(&entries, &want).ok_or_else(|| Error::NoMatchingPlatform {
                    reference: name.clone(),
                    platform: want.to_string(),
                    available: manifest::offered(&entries),
                })?;
            self.put_blob_off_thread(digest, bytes.clone(), "image index")
                .await?;
            digest = parse_digest(&chosen.digest, &name)?;
            bytes = reg.manifest_by_digest(&digest).await?;
            parsed = parse_manifest(&bytes, &name)?;
            if parsed.is_index() {
                return Err(Error::InvalidManifest {
                    what: format!("manifest {digest}"),
                    detail: "an index nested in an index".into(),
                });
            }
        }
        let config_desc = parsed
            .config
            .clone()
            .ok_or_else(|| Error::InvalidManifest {
                what: format!("manifest {digest}"),
                detail: "no config".into(),
            })?;
        if !manifest::IMAGE_CONFIGS.contains(&config_desc.media_type.as_str()) {
            return Err(Error::UnsupportedMediaType {
                reference: name.clone(),
                what: "config",
                hint: manifest::media_type_hint(&config_desc.media_type).into(),
                media_type: config_desc.media_type,
            });
        }
        let layers = parsed.layers.clone().unwrap_or_default();
        let mut jobs = Vec::with_capacity(layers.len());
        for desc in &layers {
            let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| {
                Error::UnsupportedMediaType {
                    reference: name.clone(),
                    what: "layer",
                    hint: manifest::media_type_hint(&desc.media_type).into(),
                    media_type: desc.media_type.clone(),
                }
            })?;
            jobs.push((
                desc.clone(),
                parse_digest(&desc.digest, &name)?,
                compression,
            ));
        }
        opts.emit(Progress::Resolved {
            reference: name.clone(),
            manifest: digest,
            layers: jobs.iter().map(|(d, g, _)| (*g, d.size)).collect(),
        });

        // Config.
        let config_digest = parse_digest(&config_desc.digest, &name)?;
        if config_desc.size > MAX_JSON_BLOB {
            return Err(Error::InvalidManifest {
                what: format!("config {config_digest}"),
                detail: format!("claims {} bytes", config_desc.size),
            });
        }
        if !self.blob_path(&config_digest).exists() {
            let bytes = reg.small_blob(&config_digest, MAX_JSON_BLOB).await?;
            self.put_blob_off_thread(config_digest, bytes, "config")
                .await?;
        }
        let config = self.read_config(&config_digest)?;
        // An image of one platform is what it is: said, as Docker says it, when it is not
        // the platform asked for (an index offers the one asked for, or the pull fails).
        if single_platform {
            let have = Platform {
                os: config.os.clone(),
                architecture: config.architecture.clone(),
                variant: config.variant.clone(),
            };
            if let Some(message) = platform_warning(&have, opts) {
                opts.emit(Progress::Warning {
                    reference: name.clone(),
                    message,
                });
            }
        }
        if config.rootfs.diff_ids.len() != jobs.len() {
            return Err(Error::InvalidManifest {
                what: format!("config {config_digest}"),
                detail: format!(
                    "{} diff_ids for {} layers",
                    config.rootfs.diff_ids.len(),
                    jobs.len()
                ),
            });
        }
        let jobs: Vec<LayerJob> = jobs
            .into_iter()
            .zip(&config.rootfs.diff_ids)
            .map(|((desc, digest, compression), diff)| {
                Ok(LayerJob {
                    desc,
                    digest,
                    compression,
                    diff_id: parse_digest(diff, &name)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Resolved {
            name,
            bytes,
            digest,
            config_digest,
            config,
            jobs,
        })
    }

    /// [`Store::put_blob`] on the blocking pool (it syncs the file).
    async fn put_blob_off_thread(
        &self,
        digest: Digest,
        bytes: Vec<u8>,
        what: &'static str,
    ) -> Result<()> {
        let store = self.clone();
        off_thread("store task", move || {
            store.put_blob(&digest, &bytes, what).map(|_| ())
        })
        .await
    }

    async fn pull_from_source(&self, loc: &Location, opts: &PullOptions) -> Result<PulledImage> {
        let reg = Arc::new(open_source(loc, opts).await?);
        let r = self.resolve(&reg, &loc.key(), opts).await?;
        self.fetch_layers(&reg, &r.jobs, opts).await?;
        self.record(r, &[], opts).await
    }

    /// Fetches and indexes the layers not stored yet, several at once.
    pub(crate) async fn fetch_layers(
        &self,
        reg: &Arc<Source>,
        jobs: &[LayerJob],
        opts: &PullOptions,
    ) -> Result<()> {
        let parallel = if opts.parallel == 0 { 3 } else { opts.parallel };
        // Largest first: the pull ends when its last layer does, and a layer is indexed on one
        // core, so the one started last should be short. In the manifest's order the large
        // Debian image's largest layer (120 MB, fifth) started last but one and ran alone at
        // the end (a scheduling model of its layers: 7 % longer than largest first).
        let mut order: Vec<&LayerJob> = jobs.iter().collect();
        order.sort_by_key(|job| std::cmp::Reverse(job.desc.size));
        // The futures are made before they are streamed: a closure inside the stream's type
        // would make this future (and `Store::pull`) not `Send` (rust-lang/rust#102211).
        let fetches: Vec<_> = order
            .into_iter()
            .map(|job| self.ensure_layer(reg.clone(), job, opts))
            .collect();
        let results: Vec<Result<()>> = futures_util::stream::iter(fetches)
            .buffer_unordered(parallel)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Merges the layers' indexes, saves the tree and records the image (on the blocking
    /// pool). `lazy` names the published index blob of each layer served lazily.
    pub(crate) async fn record(
        &self,
        r: Resolved,
        lazy: &[(Digest, Digest)],
        opts: &PullOptions,
    ) -> Result<PulledImage> {
        let (store, lazy, opts) = (self.clone(), lazy.to_vec(), opts.clone());
        off_thread("record task", move || {
            let recorded = store.record_blocking(r, &lazy, &opts);
            release_freed_memory();
            recorded
        })
        .await
    }

    fn record_blocking(
        &self,
        r: Resolved,
        lazy: &[(Digest, Digest)],
        opts: &PullOptions,
    ) -> Result<PulledImage> {
        let Resolved {
            name,
            bytes,
            digest,
            config_digest,
            config,
            jobs,
        } = r;
        // Merge and record.
        self.put_blob(&digest, &bytes, "manifest")?;
        let layers: Vec<LayerRecord> = jobs
            .iter()
            .map(|j| LayerRecord {
                digest: j.digest,
                media_type: j.desc.media_type.clone(),
                size: j.desc.size,
                index: lazy.iter().find(|(l, _)| *l == j.digest).map(|(_, i)| *i),
            })
            .collect();
        let indexes = layers
            .iter()
            .map(|l| LayerIndex::load(&self.layer_index_path(l)))
            .collect::<Result<Vec<_>>>()?;
        let tree = tree::merge(indexes.iter().map(|i| (i.source(), i.entries.as_slice())))?;
        drop(indexes);
        opts.emit(Progress::Merged {
            inodes: tree.inode_count() as usize,
        });
        let record = ImageRecord {
            reference: name,
            manifest_digest: digest,
            config_digest,
            layers,
            platform: match &config.variant {
                Some(v) => format!("{}/{}/{v}", config.os, config.architecture),
                None => format!("{}/{}", config.os, config.architecture),
            },
            pulled_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        tree.save(&self.tree_path(&record.view()))?;
        self.put_image(record.clone())?;
        self.mark_used(&record.reference);
        if lazy.is_empty() {
            // What root's first mount would write: done here, so that the mount is quick.
            if let Some(bytes) = self.prepare_metadata_image(&record, &tree) {
                opts.emit(Progress::MetadataImage { bytes });
            }
        }
        Ok(PulledImage {
            reference: record.reference.clone(),
            manifest_digest: digest,
            config,
            record,
        })
    }

    /// Writes the image's metadata image into the store ahead of its first shared mount, as
    /// the image server would at its start, where such mounts can be (root, a kernel with
    /// EROFS). Best effort. Written from the tree at hand and the layers' small-file tables,
    /// holding the metadata, not the files' bytes (see [`tree::erofs::write_metadata_image`]).
    /// Returns its size, if it is there.
    fn prepare_metadata_image(&self, record: &ImageRecord, tree: &Tree) -> Option<u64> {
        use crate::mount::shared::{kernel_metadata_possible, metadata_from_fuse};
        if !kernel_metadata_possible() || metadata_from_fuse() {
            return None;
        }
        let path = self.meta_image_path(&record.view());
        if !tree::erofs::is_current(&path) {
            let started = std::time::Instant::now();
            let tables: Vec<_> = record
                .layers
                .iter()
                .map(|l| {
                    index::small::SmallIndex::open(&self.layer_index_path(l)).unwrap_or_else(|e| {
                        tracing::warn!("small files of layer {}: {e}", l.digest);
                        None
                    })
                })
                .collect();
            let tmp = self.temp_path("meta.erofs");
            let written = std::fs::File::create(&tmp)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    tree::erofs::write_metadata_image(tree, &tables, IMAGE_SMALL_MAX, &f)?;
                    f.sync_all().map_err(|e| e.to_string())?;
                    std::fs::rename(&tmp, &path).map_err(|e| e.to_string())
                });
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                tracing::debug!("metadata image of {}: {e}", record.reference);
                return None;
            }
            crate::store::sync_dir(&path);
            tracing::info!(
                "metadata image: {} inodes, written in {} ms",
                tree.inode_count(),
                started.elapsed().as_millis()
            );
        }
        std::fs::metadata(path).ok().map(|m| m.len())
    }

    /// Makes sure a layer's blob and index are in the store, fetching and indexing it if not.
    async fn ensure_layer(
        &self,
        reg: Arc<Source>,
        job: &LayerJob,
        opts: &PullOptions,
    ) -> Result<()> {
        let store = self.clone();
        let digest = job.digest;
        // One process fetches a given layer at a time; the others wait, then find it done.
        let lock = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.lock(&Store::layer_lock_name(&digest)))
                .await
                .map_err(|e| Error::io("lock task", io::Error::other(e)))??
        };
        let index_path = self.index_path(&digest);
        let cached = {
            let (store, index_path) = (store.clone(), index_path.clone());
            off_thread("index task", move || {
                if index_path.exists() && store.layer_bytes_present(&digest) {
                    // An index this version cannot read (an older format) is rebuilt below.
                    if let Ok(idx) = LayerIndex::load(&index_path) {
                        return Ok(Some(idx));
                    }
                }
                // What a fetch of this layer killed mid-way left (its partial download is
                // resumed).
                let freed = store.clear_layer_temps(&digest);
                if freed > 0 {
                    tracing::debug!(
                        "layer {}: removed {freed} bytes of stale temp files",
                        digest.short()
                    );
                }
                Ok(None)
            })
            .await?
        };
        if let Some(idx) = cached {
            check_diff_id(&idx, job)?;
            opts.emit(Progress::LayerCached { layer: digest });
            return Ok(());
        }
        let idx = match self.download_layer(&reg, job, opts, true).await {
            Ok(idx) => idx,
            Err(Failed {
                resumed: true,
                network: false,
                error,
            }) => {
                // The bytes kept from an earlier pull did not make the layer with the rest (a
                // partial download damaged on disk, say): once more from the start.
                tracing::warn!(
                    "layer {}: {error}; fetching it again from the start",
                    digest.short()
                );
                self.download_layer(&reg, job, opts, false)
                    .await
                    .map_err(|f| f.error)?
            }
            Err(f) => return Err(f.error),
        };
        check_diff_id(&idx, job)?;
        let entries = idx.entries.len();
        off_thread("index task", move || idx.save(&index_path)).await?;
        drop(lock);
        opts.emit(Progress::LayerDone {
            layer: digest,
            entries,
        });
        Ok(())
    }

    /// Downloads, verifies, stores and indexes a layer in one pass (the caller holds its
    /// lock). The download goes to the layer's partial download file
    /// ([`Store::ingest_path`]); with `resume`, bytes left there by an earlier pull are read
    /// back (and indexed) first and only the rest is requested, by Range. A download that
    /// fails on the network (the registry gone, the link stalled) keeps what it got there for
    /// the next pull; any other failure removes it.
    async fn download_layer(
        &self,
        reg: &Arc<Source>,
        job: &LayerJob,
        opts: &PullOptions,
        resume: bool,
    ) -> std::result::Result<LayerIndex, Failed> {
        let digest = job.digest;
        let total = job.desc.size;
        let min_resume = if resume { MIN_RESUME } else { u64::MAX };
        let (blob, kept) = self
            .ingest(digest, total, min_resume)
            .map_err(|error| Failed {
                error,
                resumed: false,
                network: false,
            })?;
        let offset = blob.on_disk();
        let opened = if offset == 0 {
            reg.blob_stream(&digest).await
        } else if offset < total {
            reg.blob_stream_from(&digest, offset, total).await
        } else {
            Ok(futures_util::stream::empty().boxed())
        };
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                // Nothing changed on disk: what an earlier pull left stays for the next.
                if offset == 0 {
                    self.discard_ingest(&digest);
                }
                return Err(Failed {
                    error: e,
                    resumed: offset > 0,
                    network: true,
                });
            }
        };
        if offset > 0 {
            tracing::info!(
                "layer {}: resuming at byte {offset} of {total}",
                digest.short()
            );
            opts.emit(Progress::LayerResumed {
                layer: digest,
                offset,
                total,
            });
            opts.emit(Progress::LayerBytes {
                layer: digest,
                done: offset,
                total,
            });
        }
        let (tx, rx) = chunk_channel();
        let compression = job.compression;
        let small_max = crate::mount::shared::small_files_kept(opts.small_files);
        let store = self.clone();
        let indexer = tokio::task::spawn_blocking(move || {
            // The bytes on disk first (the writer hashes them without writing them again),
            // then the network's: the indexer reads the whole blob in one pass.
            let input = kept.chain(rx);
            index_layer(&store, digest, compression, small_max, blob, input)
        });
        let mut done = offset;
        let mut last_report = offset;
        let mut failures = 0u32;
        let mut network_failed = false;
        let mut network_cause = None;
        let stall = opts.stall_timeout.unwrap_or(DEFAULT_STALL);
        loop {
            let cause = match tokio::time::timeout(stall, stream.next()).await {
                Ok(None) => break,
                Ok(Some(Ok(c))) => {
                    done += c.len() as u64;
                    failures = 0;
                    // A send fails only when the indexer stopped early (it has an error).
                    if tx.send(Ok(c)).await.is_err() {
                        break;
                    }
                    if done - last_report >= 1 << 20 {
                        last_report = done;
                        opts.emit(Progress::LayerBytes {
                            layer: digest,
                            done,
                            total,
                        });
                    }
                    continue;
                }
                Ok(Some(Err(e))) => crate::registry::describe_io(&e),
                Err(_) => format!("no data for {} s (stalled)", stall.as_secs_f64()),
            };
            // The connection broke or stalled: go on from the bytes already received (the
            // hash and the indexer keep their state), after a pause, a few times in a row.
            let mut cause = cause;
            let resumed = loop {
                failures += 1;
                if failures > MAX_RESUMES || done >= total {
                    break None;
                }
                tracing::info!("layer {}: {cause}; resuming at byte {done}", digest.short());
                let pause = (250u64 << failures).min(2000);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                let attempt =
                    tokio::time::timeout(stall, reg.blob_stream_from(&digest, done, total));
                match attempt.await.unwrap_or_else(|_| {
                    Err(Error::registry_transient(
                        digest.to_string(),
                        format!("no answer for {} s (stalled)", stall.as_secs_f64()),
                    ))
                }) {
                    Ok(s) => break Some(s),
                    Err(e @ (Error::NotFound { .. } | Error::Unauthorized { .. })) => {
                        cause = e.to_string();
                        failures = MAX_RESUMES;
                    }
                    Err(e) => cause = e.to_string(),
                }
            };
            match resumed {
                Some(s) => stream = s,
                None => {
                    network_failed = true;
                    let said = format!("download failed after {done} of {total} bytes: {cause}");
                    network_cause = Some(said.clone());
                    let _ = tx
                        .send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, said)))
                        .await;
                    break;
                }
            }
        }
        drop(tx);
        let result = indexer
            .await
            .map_err(|e| Error::io("indexer task", io::Error::other(e)))
            .and_then(|r| r);
        match result {
            Ok(idx) => {
                opts.emit(Progress::LayerBytes {
                    layer: digest,
                    done,
                    total,
                });
                Ok(idx)
            }
            Err(error) => {
                let path = self.ingest_path(&digest);
                let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                if network_failed && len >= MIN_RESUME {
                    // Kept for the next pull to resume: made durable first.
                    if let Ok(f) = std::fs::File::open(&path) {
                        let _ = f.sync_all();
                    }
                    tracing::info!(
                        "layer {}: kept {len} bytes downloaded for the next pull to resume",
                        digest.short()
                    );
                } else {
                    self.discard_ingest(&digest);
                }
                // Given up on the network: a registry error the caller may retry (the next
                // pull resumes), with what the indexer saw as its cause.
                let error = if network_failed {
                    Error::Registry {
                        reference: format!("layer {digest}"),
                        detail: network_cause.unwrap_or_else(|| error.to_string()),
                        status: None,
                        transient: true,
                        source: Some(Box::new(error)),
                    }
                } else {
                    error
                };
                Err(Failed {
                    error,
                    resumed: offset > 0,
                    network: network_failed,
                })
            }
        }
    }

    /// Whether the bytes a mount reads for this layer are stored: the blob, or for a zstd
    /// layer served from its re-framed copy that copy, checked to end with a whole frame (a
    /// copy cut short by a crash is not). Decided by how the layer was indexed, not by its
    /// media type, which may be wrong.
    pub(crate) fn layer_bytes_present(&self, digest: &Digest) -> bool {
        let index = self.index_path(digest);
        match LayerIndex::access_is_zstd(&index) {
            Ok(true) => match LayerIndex::load_access(&index) {
                Ok(index::Access::Zstd(frames)) => {
                    index::zstd_frames::last_frame_ok(&self.seekable_path(digest), &frames)
                }
                _ => false,
            },
            Ok(false) => self.blob_path(digest).exists(),
            Err(_) => false,
        }
    }
}

/// Opens the source of `loc` on the blocking pool (making a registry client loads and parses
/// the system's root certificates: tens of ms of CPU).
pub(crate) async fn open_source(loc: &Location, opts: &PullOptions) -> Result<Source> {
    let (loc, registry) = (loc.clone(), opts.registry.clone());
    off_thread("registry task", move || Source::open(&loc, &registry)).await
}

/// Runs `f` on tokio's blocking pool: disk and CPU work (indexing, saving indexes, merging,
/// writing the metadata image) stays off the async threads, so a pull does not stall the
/// caller's executor.
pub(crate) async fn off_thread<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io(what, io::Error::other(e)))?
}

/// Gives the memory the pull freed back to the system. What a pull allocates is freed when it
/// returns, but glibc's allocator keeps freed pages in its arenas (one per thread that
/// allocated, and the pull's indexers run on several), where the caller's RSS would go on
/// counting them: trimmed once, at the end (a few ms, off the async threads).
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The most bytes of small files one metadata image holds (as the image server's writer,
/// `mount::shared::kernel_meta`, counts them: the same image either way).
const IMAGE_SMALL_MAX: u64 = 1 << 30;

/// How long a mount of an image stored for another platform asks the registry whether the
/// host has a manifest of its own before serving what is stored.
const HOST_PROBE: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a stored record serves the platform asked for, else the pull resolves the
/// reference again for that platform. None asked means the host's: a record for another
/// platform (left by `pull --platform`) is resolved again for the host, unless the pull may
/// not look beyond the store (policy never: whatever is stored serves).
fn platform_ok(record: &ImageRecord, opts: &PullOptions) -> bool {
    let have = record.platform.parse::<Platform>();
    match (&opts.platform, have) {
        (Some(want), Ok(have)) => want.matches(&have),
        (Some(_), Err(_)) => false,
        (None, _) if opts.policy == PullPolicy::Never => true,
        (None, Ok(have)) => Platform::host().matches(&have),
        // A record whose platform is unreadable: nothing to compare.
        (None, Err(_)) => true,
    }
}

/// What to say when an image's platform is not the one asked for (the host's when none was),
/// in Docker's words.
fn platform_warning(have: &Platform, opts: &PullOptions) -> Option<String> {
    match &opts.platform {
        Some(want) if !want.matches(have) => Some(format!(
            "the image's platform ({have}) does not match the requested platform ({want})"
        )),
        None if !Platform::host().matches(have) => Some(format!(
            "the image's platform ({have}) does not match the host's ({})",
            Platform::host()
        )),
        _ => None,
    }
}

fn check_diff_id(idx: &LayerIndex, job: &LayerJob) -> Result<()> {
    if idx.diff_id != job.diff_id {
        return Err(Error::CorruptLayer {
            layer: job.digest,
            detail: format!(
                "uncompressed content {} does not match the config's diff_id {}",
                idx.diff_id, job.diff_id
            ),
        });
    }
    Ok(())
}

/// Why a layer's download failed.
struct Failed {
    error: Error,
    /// It went on from bytes an earlier pull left.
    resumed: bool,
    /// The download gave up on the network (what it got is kept to resume).
    network: bool,
}

/// Blocking half of a layer pull: verify + store the blob (`blob`, a writer of the layer's
/// partial download) while indexing it; `input` is the whole blob from its first byte.
fn index_layer(
    store: &Store,
    digest: Digest,
    compression: Compression,
    small_max: u64,
    mut blob: crate::store::BlobWriter,
    input: impl Read,
) -> Result<LayerIndex> {
    let mut seekable_tmp = None;
    // Trust the bytes over the media type, as containerd does: a gzip or zstd magic number
    // decides, whatever the manifest says.
    let mut input = io::BufReader::with_capacity(1 << 16, input);
    let compression = match io::BufRead::fill_buf(&mut input) {
        Ok([0x1f, 0x8b, ..]) => Compression::Gzip,
        Ok([0x28, 0xb5, 0x2f, 0xfd, ..]) => Compression::Zstd,
        Ok(head) if head.len() >= 4 => Compression::None,
        _ => compression,
    };
    // The small files' bytes go to disk as they are read: indexing holds their records only.
    let small_tmp = store.temp_path(&format!("{}.small", digest.hex()));
    let small = index::small::SmallFiles::spilling(small_max, small_tmp)?;
    let mut idx = {
        let mut tee = Tee {
            inner: input,
            out: &mut blob,
        };
        match compression {
            Compression::Zstd => {
                let tmp = store.temp_path(&format!("{}.zst", digest.hex()));
                let file = std::fs::File::create(&tmp)
                    .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
                seekable_tmp = Some(TempFile(tmp));
                let mut out = io::BufWriter::new(file);
                let idx =
                    index::build_keeping(&mut tee, compression, digest, Some(&mut out), small)?;
                let file = out
                    .into_inner()
                    .map_err(|e| Error::io("writing seekable copy", e.into_error()))?;
                file.sync_all()
                    .map_err(|e| Error::io("syncing seekable copy", e))?;
                idx
            }
            _ => index::build_keeping(&mut tee, compression, digest, None, small)?,
        }
    };
    idx.compressed_size = blob.len();
    let blob_path = blob.commit(&format!("layer {digest}"))?;
    if let Some(tmp) = seekable_tmp {
        // The verified original is not needed to serve reads once its seekable copy exists.
        let dest = store.seekable_path(&digest);
        std::fs::rename(&tmp.0, &dest)
            .map_err(|e| Error::io(format!("storing {}", dest.display()), e))?;
        crate::store::sync_dir(&dest);
        let _ = std::fs::remove_file(blob_path);
    }
    Ok(idx)
}

/// Removes a temp file when dropped (a no-op once it was renamed into place).
struct TempFile(std::path::PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn parse_manifest(bytes: &[u8], name: &str) -> Result<ManifestOrIndex> {
    let m: ManifestOrIndex = serde_json::from_slice(bytes).map_err(|e| Error::InvalidManifest {
        what: format!("manifest of {name}"),
        detail: format!("not valid JSON: {e}"),
    })?;
    if let Some(mt) = &m.media_type {
        if !manifest::ACCEPT.contains(&mt.as_str()) {
            return Err(Error::UnsupportedMediaType {
                reference: name.to_string(),
                what: "manifest",
                hint: manifest::media_type_hint(mt).into(),
                media_type: mt.clone(),
            });
        }
    }
    Ok(m)
}

fn parse_digest(s: &str, name: &str) -> Result<Digest> {
    s.parse().map_err(|e| Error::InvalidManifest {
        what: format!("manifest of {name}"),
        detail: format!("{e}"),
    })
}
