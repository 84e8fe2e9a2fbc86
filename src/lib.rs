//! bux-fuse: OCI container images as read-only FUSE root filesystems, without extraction.
//!
//! The data flows one way through the stages:
//!
//! ```text
//! registry ──► store ──► index ──► tree ──► fs (FUSE)
//! (HTTP, auth)  (CAS)   (tar offsets,  (merged,    (lookups, reads
//!                        checkpoints)   whiteouts)   from spans)
//! ```
//!
//! # The API
//!
//! What a VM runtime calls is re-exported here; the stages underneath (`index`, `tree`, `fs`,
//! `lazy`, `source`, `upper`, …) are public only for the project's own binary, tests and
//! fuzzers, hidden from these docs, and not part of the API.
//!
//! * [`Store`]: the content-addressed store on disk. [`Store::pull`] (and
//!   [`Store::pull_lazy`]) fetch and index an image; [`Store::config`] gives what
//!   `krun_set_exec` wants; [`Store::images`], [`Store::remove`], [`Store::gc`],
//!   [`Store::usage`] and [`Store::check`] manage the store.
//! * [`mount()`]: a read-only or writable root at a directory, for `krun_set_root`; the
//!   [`Mount`] unmounts when dropped. [`Store::mounts`] lists the mounts a store made (after a
//!   crash: dead ones too), [`Store::tear_down`] removes one, and a mount over a dead mount of
//!   the store's replaces it by itself.
//! * [`Error`]: typed, one line each. [`Error::is_transient`] says whether a retry may help
//!   (the registry unreachable or slow to answer, 408/429/5xx); [`Error::status`] gives the
//!   registry's HTTP status; [`Error::inner`] strips the image context to match on;
//!   `source()` chains to the transport's or the OS's error.
//! * Every future is `Send` (spawn a pull on any executor); the blocking work of a pull runs on
//!   tokio's blocking threads. A pull never waits on the network for longer than
//!   [`RegistryOptions::connect_timeout`] / [`RegistryOptions::request_timeout`] (10 s / 30 s by
//!   default) without an answer.
//!
//! Defaults ([`PullOptions::default`], [`MountOptions::default`]) are what the `bux-fuse` CLI
//! uses; each field's docs say its default.
//!
//! ```no_run
//! # async fn demo() -> Result<(), bux_fuse::Error> {
//! use bux_fuse::{Store, PullOptions, MountOptions};
//! let store = Store::open_default()?;
//! let image = store.pull("127.0.0.1:5000/library/debian:bookworm", &PullOptions::default()).await?;
//! let mount = bux_fuse::mount(&store, &image.reference, "/mnt/root".as_ref(), &MountOptions::default())?;
//! println!("hand {} to krun_set_root", mount.path().display());
//! # Ok(()) }
//! ```
//!
//! **Embedding.** By default a mount is served from the calling process. Root's mounts can
//! instead stand on the image's shared server (one daemon and one page cache for every VM of
//! an image): set [`MountOptions::shared_server`] to [`server_executable()`], and call
//! [`serve_if_requested()`] first thing in `main`, before parsing arguments or starting
//! threads: the server runs as this program's executable, started again with
//! `BUX_FUSE_SERVE` in its environment, and that call serves and exits there (it returns at
//! once otherwise). A program that cannot (a test harness, say) sets `$BUX_FUSE_HELPER` to a
//! `bux-fuse` binary, which then runs the server. Forgetting the call fails the mount with an
//! error naming it (see [`embed`]).
//!
//! ```no_run
//! fn main() -> Result<(), bux_fuse::Error> {
//!     bux_fuse::serve_if_requested(); // first: in an image server, serves and exits
//!     let store = bux_fuse::Store::open_default()?;
//!     let opts = bux_fuse::MountOptions {
//!         shared_server: Some(bux_fuse::server_executable()?),
//!         ..Default::default()
//!     };
//!     let mount = bux_fuse::mount(&store, "debian:bookworm", "/run/vm1/root".as_ref(), &opts)?;
//!     assert!(!mount.is_finished());
//!     # Ok(()) }
//! ```
#![deny(missing_docs)]

// The API: what a runtime calls. Stable within a minor version.
pub mod check;
pub mod digest;
pub mod disk;
pub mod embed;
pub mod error;
pub mod mount;
pub mod policy;
pub mod publish;
pub mod pull;
pub mod registry;
pub mod store;

// The stages underneath, public only for the project's own binary, tests, fuzzers and
// benchmarks: not part of the API, and may change in any release.
#[doc(hidden)]
pub mod cli;
#[doc(hidden)]
pub mod fs;
#[doc(hidden)]
pub mod index;
#[doc(hidden)]
pub mod lazy;
mod mapped;
#[doc(hidden)]
pub mod sandbox;
#[doc(hidden)]
pub mod source;
#[doc(hidden)]
pub mod trace;
#[doc(hidden)]
pub mod tree;
#[doc(hidden)]
pub mod upper;

pub use check::CheckReport;
pub use digest::Digest;
pub use embed::{serve_if_requested, server_executable};
pub use error::{Error, Result};
pub use lazy::LazyOutcome;
pub use mount::{
    mount, unmount_all, DiskRoot, Mount, MountOptions, MountRecord, MountState, MountStats,
    Prefetch, StoreMount,
};
pub use policy::{Policy, SignaturePolicy};
pub use publish::{PushIndexOptions, PushedIndex};
pub use pull::{Budget, Progress, ProgressFn, PullOptions, PullPolicy, PulledImage};
pub use registry::manifest::{ImageConfig, Platform, RuntimeConfig};
pub use registry::{Credentials, RegistryOptions};
pub use store::{ImageRecord, ImageUsage, LayerRecord, Lease, Store, Usage};

/// CPUs this process may run on (at least two), asked once: `available_parallelism` reads the
/// process's cgroup files at every call (seven system calls here), and every FUSE read asked it
/// (how many jobs may decompress ahead), after its reply, on the core a split read wanted.
pub(crate) fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))
}
