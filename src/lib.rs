//! bux-fuse: OCI container images as read-only FUSE root filesystems, without extraction.
//!
//! The data flows one way through the modules:
//!
//! ```text
//! registry ──► store ──► index ──► tree ──► fs (FUSE)
//! (HTTP, auth)  (CAS)   (tar offsets,  (merged,    (lookups, reads
//!                        checkpoints)   whiteouts)   from spans)
//! ```
//!
//! * [`registry`] resolves a reference to a manifest and streams blobs.
//! * [`store`] keeps blobs by digest, layer indexes, merged trees and image records on disk.
//! * [`index`] scans a layer once into a per-file offset table plus random-access checkpoints
//!   into the compressed stream, and reads any byte range back from those checkpoints.
//! * [`tree`] folds the layers' tables into one tree with OCI whiteouts applied.
//! * [`fs`] serves a tree through FUSE.
//!
//! [`Store::pull`] and [`mount()`] tie them together; the `bux-fuse` binary is a thin CLI on top.
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
pub mod embed;
pub mod error;
pub mod mount;
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
    mount, unmount_all, Mount, MountOptions, MountRecord, MountState, MountStats, Prefetch,
    StoreMount,
};
pub use publish::{PushIndexOptions, PushedIndex};
pub use pull::{Progress, ProgressFn, PullOptions, PullPolicy, PulledImage};
pub use registry::manifest::{ImageConfig, Platform, RuntimeConfig};
pub use registry::{Credentials, RegistryOptions};
pub use store::{ImageRecord, ImageUsage, LayerRecord, Lease, Store, Usage};
