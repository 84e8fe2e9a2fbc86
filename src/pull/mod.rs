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

mod layers;
mod record;
mod resolve;
mod stored;
mod stream;

pub(crate) use stream::ChannelReader;

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::index::Compression;
use crate::registry::manifest::{Descriptor, ImageConfig, Platform};
use crate::registry::RegistryOptions;
use crate::source::{Location, Source};
use crate::store::ImageRecord;
use crate::{Digest, Error, Result, Store};

/// How long a download may go without data before it is treated as broken.
pub const DEFAULT_STALL: std::time::Duration = std::time::Duration::from_secs(30);

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

    async fn pull_from_source(&self, loc: &Location, opts: &PullOptions) -> Result<PulledImage> {
        let reg = Arc::new(open_source(loc, opts).await?);
        let r = self.resolve(&reg, &loc.key(), opts).await?;
        self.fetch_layers(&reg, &r.jobs, opts).await?;
        self.record(r, &[], opts).await
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
