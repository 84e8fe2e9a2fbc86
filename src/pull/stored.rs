//! Images already in the store: their records, configs, merged trees and layer indexes (rebuilt
//! from a stored blob where one is missing or damaged), and removing one.

use std::io::{self, Read};

use super::{normalize_reference, platform_ok, PullOptions, PulledImage};
use crate::index::published::PublishedLayer;
use crate::index::{self, Compression, LayerIndex};
use crate::registry::manifest::ImageConfig;
use crate::store::{ImageRecord, LayerRecord};
use crate::tree::{self, Tree};
use crate::{Digest, Error, Result, Store};

impl Store {
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

    pub(super) fn read_config(&self, digest: &Digest) -> Result<ImageConfig> {
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
