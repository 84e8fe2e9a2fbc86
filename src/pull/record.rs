//! The end of a pull: the layers' indexes merged into the tree, the metadata image written,
//! and the image recorded.

use super::{off_thread, release_freed_memory, Progress, PullOptions, PulledImage, Resolved};
use crate::index::{self, LayerIndex};
use crate::store::{ImageRecord, LayerRecord};
use crate::tree::{self, Tree};
use crate::{Digest, Result, Store};

/// The most bytes of small files one metadata image holds (as the image server's writer,
/// `mount::shared::kernel_meta`, counts them: the same image either way).
const IMAGE_SMALL_MAX: u64 = 1 << 30;

impl Store {
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
}
