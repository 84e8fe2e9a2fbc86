//! bux's `bux-oci` API (`Oci::open_at`, `pull`, `ensure`, `images`, `remove`, and the
//! `PullResult` with its `rootfs` and `ImageConfig`), implemented over bux-fuse: each method is
//! a few lines. Where bux-oci extracts every layer into `rootfs/`, this `rootfs` is a mount of
//! the image, live as long as the `Oci` that made it.
//!
//! ```sh
//! cargo run --example bux_oci -- STORE_DIR REFERENCE
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bux_fuse::{MountOptions, Progress, PullOptions, PullPolicy, Store};

/// bux-oci's `Result`.
pub type Result<T> = std::result::Result<T, bux_fuse::Error>;

/// bux-oci's `ImageConfig`: what `krun_set_exec` and friends want.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// `CMD`.
    pub cmd: Option<Vec<String>>,
    /// `ENTRYPOINT`.
    pub entrypoint: Option<Vec<String>>,
    /// `ENV`.
    pub env: Option<Vec<String>>,
    /// `WORKDIR`.
    pub working_dir: Option<String>,
    /// `USER`.
    pub user: Option<String>,
}

/// bux-oci's `PullResult`.
#[derive(Debug, Clone)]
pub struct PullResult {
    /// The normalized reference.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// The root filesystem to hand to `krun_set_root`.
    pub rootfs: PathBuf,
    /// The image config.
    pub config: Option<ImageConfig>,
}

/// bux-oci's `ImageMeta`.
#[derive(Debug, Clone)]
pub struct ImageMeta {
    /// The reference.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Compressed size of the layers.
    pub size: u64,
    /// When it was pulled (seconds since the epoch; bux-oci keeps ISO 8601).
    pub created_at: String,
}

/// bux-oci's `Oci`, over a bux-fuse store.
pub struct Oci {
    store: Store,
    mounts: Mutex<HashMap<String, bux_fuse::Mount>>,
}

impl Oci {
    /// The manager for the store at `store_dir`.
    pub fn open_at(store_dir: &Path) -> Result<Oci> {
        Ok(Oci {
            store: Store::open(store_dir)?,
            mounts: Mutex::new(HashMap::new()),
        })
    }

    /// Pulls `image` (again, even when stored), reporting progress to `on_status`.
    pub async fn pull(&self, image: &str, on_status: impl Fn(&str)) -> Result<PullResult> {
        self.get(image, PullPolicy::Always, on_status).await
    }

    /// The stored image, pulled first if missing.
    pub async fn ensure(&self, image: &str, on_status: impl Fn(&str)) -> Result<PullResult> {
        self.get(image, PullPolicy::IfMissing, on_status).await
    }

    async fn get(
        &self,
        image: &str,
        policy: PullPolicy,
        on_status: impl Fn(&str),
    ) -> Result<PullResult> {
        on_status(&format!("Pulling {image}..."));
        // Progress arrives on the pull's threads: it is passed on from here.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let tx = Mutex::new(tx);
        let opts = PullOptions {
            policy,
            progress: Some(Arc::new(move |p: Progress| {
                if let Progress::LayerDone { layer, .. } = p {
                    let _ = tx
                        .lock()
                        .unwrap()
                        .send(format!("layer {} ready", layer.short()));
                }
            })),
            ..Default::default()
        };
        let pulled = self.store.pull(image, &opts).await?;
        for line in rx.try_iter() {
            on_status(&line);
        }
        let mut mounts = self.mounts.lock().unwrap();
        let rootfs = match mounts.get(&pulled.reference) {
            Some(m) => m.path().to_path_buf(),
            None => {
                let dir = self
                    .store
                    .root()
                    .join("rootfs")
                    .join(pulled.manifest_digest.hex());
                let m = bux_fuse::mount(
                    &self.store,
                    &pulled.reference,
                    &dir,
                    &MountOptions::default(),
                )?;
                let path = m.path().to_path_buf();
                mounts.insert(pulled.reference.clone(), m);
                path
            }
        };
        let c = pulled.config.config;
        Ok(PullResult {
            reference: pulled.reference,
            digest: pulled.manifest_digest.to_string(),
            rootfs,
            config: Some(ImageConfig {
                cmd: c.cmd,
                entrypoint: c.entrypoint,
                env: c.env,
                working_dir: c.working_dir,
                user: c.user,
            }),
        })
    }

    /// The stored images.
    pub fn images(&self) -> Result<Vec<ImageMeta>> {
        Ok(self
            .store
            .images()?
            .into_iter()
            .map(|i| ImageMeta {
                size: i.layers.iter().map(|l| l.size).sum(),
                digest: i.manifest_digest.to_string(),
                created_at: i.pulled_at.to_string(),
                reference: i.reference,
            })
            .collect())
    }

    /// Removes a stored image (its mount first, if this `Oci` made one).
    pub fn remove(&self, image: &str) -> Result<()> {
        let name = bux_fuse::pull::normalize_reference(image)?;
        if let Some(m) = self.mounts.lock().unwrap().remove(&name) {
            m.unmount()?;
        }
        self.store.remove(image, false).map(|_| ())
    }
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, image] = &args[..] else {
        eprintln!("usage: bux_oci STORE_DIR REFERENCE");
        std::process::exit(2);
    };
    let oci = Arc::new(Oci::open_at(Path::new(store))?);
    // As bux calls it: `ensure` from a spawned task.
    let (o, i) = (oci.clone(), image.clone());
    let r = tokio::spawn(async move { o.ensure(&i, |s| eprintln!("{s}")).await }).await??;
    println!(
        "rootfs {} ({}), config {:?}",
        r.rootfs.display(),
        r.digest,
        r.config
    );
    println!("images: {:?}", oci.images()?);
    oci.remove(image)?;
    Ok(())
}
