//! a3s-box's `ImageRegistry` trait (a3s-box-core `traits/registry.rs`), implemented over
//! bux-fuse: the adapter is a few lines per method. The trait is written out here as
//! `#[async_trait]` expands it (boxed `Send` futures), so this compiles without a3s-box; the
//! `Send` bound is what `Store::pull`'s future must meet.
//!
//! a3s-box's `pull` returns an OCI layout directory to build a rootfs from; bux-fuse has no
//! rootfs to build: `path` here is a read-only mount of the image, which is what the rootfs
//! would have been (hand it, or a writable mount of the image, to `krun_set_root`).
//!
//! ```sh
//! cargo run --example a3s_box_registry -- STORE_DIR MOUNTS_DIR REFERENCE
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bux_fuse::{Error, MountOptions, PullOptions, PullPolicy, Store};

type Result<T> = std::result::Result<T, Error>;
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// a3s-box's `PulledImage`.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// Where the image's files are.
    pub path: PathBuf,
    /// Manifest digest (`sha256:…`).
    pub digest: String,
    /// The fully qualified reference.
    pub reference: String,
}

/// a3s-box's `ImageRegistry`, as `#[async_trait]` writes it.
pub trait ImageRegistry: Send + Sync {
    /// Pulls, using the local store when it has the image.
    fn pull<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<PulledImage>>;
    /// Pulls, bypassing the local store.
    fn force_pull<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<PulledImage>>;
    /// Whether the image is stored.
    fn is_cached<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, bool>;
    /// Removes a stored image; whether it was there.
    fn remove<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<bool>>;
    /// The stored images' references.
    fn list_cached(&self) -> BoxFuture<'_, Result<Vec<String>>>;
}

/// The adapter: a store, and a read-only mount per pulled image under `mounts`.
pub struct BuxFuseRegistry {
    store: Store,
    mounts: PathBuf,
    mounted: Mutex<HashMap<String, bux_fuse::Mount>>,
}

impl BuxFuseRegistry {
    /// A registry over the store at `store`, mounting images under `mounts`.
    pub fn new(store: Store, mounts: PathBuf) -> BuxFuseRegistry {
        BuxFuseRegistry {
            store,
            mounts,
            mounted: Mutex::new(HashMap::new()),
        }
    }

    async fn pull_with(&self, reference: &str, policy: PullPolicy) -> Result<PulledImage> {
        let opts = PullOptions {
            policy,
            ..Default::default()
        };
        let image = self.store.pull(reference, &opts).await?;
        let mut mounted = self.mounted.lock().unwrap();
        let path = match mounted.get(&image.reference) {
            Some(m) => m.path().to_path_buf(),
            None => {
                let dir = self.mounts.join(image.manifest_digest.hex());
                let m = bux_fuse::mount(
                    &self.store,
                    &image.reference,
                    &dir,
                    &MountOptions::default(),
                )?;
                let path = m.path().to_path_buf();
                mounted.insert(image.reference.clone(), m);
                path
            }
        };
        Ok(PulledImage {
            path,
            digest: image.manifest_digest.to_string(),
            reference: image.reference,
        })
    }
}

impl ImageRegistry for BuxFuseRegistry {
    fn pull<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<PulledImage>> {
        Box::pin(self.pull_with(reference, PullPolicy::IfMissing))
    }

    fn force_pull<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<PulledImage>> {
        Box::pin(self.pull_with(reference, PullPolicy::Always))
    }

    fn is_cached<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let name = bux_fuse::pull::normalize_reference(reference);
            name.is_ok_and(|n| self.store.image(&n).is_ok_and(|i| i.is_some()))
        })
    }

    fn remove<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let name = bux_fuse::pull::normalize_reference(reference)?;
            if let Some(m) = self.mounted.lock().unwrap().remove(&name) {
                m.unmount()?;
            }
            self.store.remove(reference, false)
        })
    }

    fn list_cached(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            Ok(self
                .store
                .images()?
                .into_iter()
                .map(|i| i.reference)
                .collect())
        })
    }
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, mounts, reference] = &args[..] else {
        eprintln!("usage: a3s_box_registry STORE_DIR MOUNTS_DIR REFERENCE");
        std::process::exit(2);
    };
    let registry: Arc<dyn ImageRegistry> = Arc::new(BuxFuseRegistry::new(
        Store::open(store)?,
        PathBuf::from(mounts),
    ));
    // As a3s-box's runtime calls it: from a spawned task, through the trait object.
    let r = registry.clone();
    let reference2 = reference.clone();
    let image = tokio::spawn(async move { r.pull(&reference2).await }).await??;
    println!(
        "pulled {} ({}) at {}",
        image.reference,
        image.digest,
        image.path.display()
    );
    println!("cached: {}", registry.is_cached(reference).await);
    println!("list: {:?}", registry.list_cached().await?);
    println!("removed: {}", registry.remove(reference).await?);
    Ok(())
}
