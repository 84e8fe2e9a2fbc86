//! Opening a stored image for serving: finding it (refused if marked bad), leasing its files
//! against gc, and opening its merged tree and a reader per layer (lazily fetched ones too).

use std::sync::Arc;

use super::MountOptions;
use crate::index::published::PublishedLayer;
use crate::index::small_reads::SmallReads;
use crate::index::{Compression, LayerReader};
use crate::lazy::{LazyBlob, Remote};
use crate::pull::normalize_reference;
use crate::{Error, Result, Store};

/// The stored image `reference`, leased against gc (refused if marked bad).
pub(super) fn stored_image(
    store: &Store,
    reference: &str,
) -> Result<(crate::store::ImageRecord, crate::store::Lease)> {
    let name = normalize_reference(reference)?;
    // Held from reading the record to leasing its files: a gc (budget eviction) runs before
    // or after, never in between.
    let guard = store.pull_guard()?;
    let record = store.image(&name)?.ok_or_else(|| Error::NotFound {
        reference: name.clone(),
        detail: " in the local store (pull it first)".into(),
    })?;
    let lease = lease_image(store, &record)?;
    drop(guard);
    store.mark_used(&record.reference);
    if let Ok(why) = std::fs::read_to_string(store.bad_path(&record.view())) {
        return Err(Error::BadImage {
            reference: name,
            detail: why.trim().to_string(),
        });
    }
    Ok((record, lease))
}

/// Refuses (and marks bad) an image whose published index disagrees with the index of a
/// layer of it that is stored whole by now (see [`crate::lazy::whole_layer_agrees`]).
pub(crate) fn check_whole_layers(store: &Store, record: &crate::store::ImageRecord) -> Result<()> {
    for l in record.layers.iter().filter(|l| l.index.is_some()) {
        if store.layer_local(l) {
            if let Err(why) = crate::lazy::whole_layer_agrees(store, l) {
                tracing::error!("{why}: the image is marked bad");
                let _ = crate::store::write_atomic(&store.bad_path(&record.view()), why.as_bytes());
                return Err(Error::BadImage {
                    reference: record.reference.clone(),
                    detail: why,
                });
            }
        }
    }
    Ok(())
}

/// Keeps gc (and `rm` without --force) off every file of the image while the lease lives.
pub(crate) fn lease_image(
    store: &Store,
    record: &crate::store::ImageRecord,
) -> Result<crate::store::Lease> {
    let mut leased = vec![record.manifest_digest, record.config_digest, record.view()];
    leased.extend(record.layers.iter().map(|l| l.digest));
    leased.extend(record.layers.iter().filter_map(|l| l.index));
    store.lease(&leased)
}

/// The file a stored layer is read from: its blob, or for a zstd layer its seekable copy (a
/// zstd:chunked layer, read by its own frames, is its blob).
pub(crate) fn layer_data_path(
    store: &Store,
    digest: &crate::Digest,
    access: &crate::index::Access,
    compression: Compression,
) -> std::path::PathBuf {
    match (access, compression) {
        (crate::index::Access::Frames(_), _) => store.blob_path(digest),
        (_, Compression::Zstd) => store.seekable_path(digest),
        _ => store.blob_path(digest),
    }
}

/// A stored image opened for serving: its tree and a reader per layer.
pub(crate) struct OpenedImage {
    pub record: crate::store::ImageRecord,
    pub lease: crate::store::Lease,
    pub tree: crate::tree::Tree,
    pub layers: Vec<LayerReader>,
    /// The registry end of lazily fetched layers, if any.
    pub remote: Option<Arc<Remote>>,
    /// Lazily fetched layers and their published indexes.
    pub lazy: Vec<(Arc<LazyBlob>, Arc<PublishedLayer>)>,
}

/// Opens the stored image `reference` (leased against gc for the life of the result).
pub(crate) fn open_image(
    store: &Store,
    reference: &str,
    opts: &MountOptions,
) -> Result<OpenedImage> {
    let (record, lease) = stored_image(store, reference)?;
    open_record(store, record, lease, opts)
}

/// Opens the stored image `record` describes (`lease` holds its files against gc): what an
/// image server's restarted worker serves, found by the manifest its supervisor leased, even
/// once the name was re-tagged or removed.
pub(crate) fn open_record(
    store: &Store,
    record: crate::store::ImageRecord,
    lease: crate::store::Lease,
    opts: &MountOptions,
) -> Result<OpenedImage> {
    check_whole_layers(store, &record)?;
    let tree = store.tree(&record)?;
    let mut layers = Vec::with_capacity(tree.layers.len());
    let mut remote: Option<Arc<Remote>> = None;
    let mut lazy = Vec::new();
    for (i, l) in tree.layers.iter().enumerate() {
        let path = layer_data_path(store, &l.digest, &l.access, l.compression);
        let index = record
            .layers
            .iter()
            .find(|r| r.digest == l.digest)
            .and_then(|r| r.index.map(|d| (d, r.size)));
        let reader = match index {
            Some((index, size)) if !path.exists() => {
                let bytes = store.read_verified_blob(&index, "published layer index")?;
                let published = Arc::new(PublishedLayer::decode(&bytes, l.digest, size)?);
                let remote = match &remote {
                    Some(r) => r.clone(),
                    None => {
                        let r = crate::registry::parse_reference(&record.reference)?;
                        let reg = crate::registry::Registry::for_pull(&r, &opts.registry)?;
                        let made = Remote::new(reg, opts.read_deadline)
                            .map_err(|e| Error::io("starting the fetcher", e))?;
                        remote = Some(made.clone());
                        made
                    }
                };
                match LazyBlob::open(store, &published, &index, remote) {
                    Ok(blob) => {
                        lazy.push((blob.clone(), published));
                        LayerReader::new(
                            i as u32,
                            Box::new(blob),
                            l.access.clone(),
                            l.uncompressed_size,
                        )
                    }
                    // Completed by another mount while this one opened it: whole now, read
                    // by the index that completion wrote (its gzip windows inline).
                    Err(_) if path.exists() => {
                        let rec = &record.layers[i];
                        let access =
                            crate::index::LayerIndex::load_access(&store.layer_index_path(rec))?;
                        LayerReader::open(i as u32, &path, access, l.uncompressed_size)
                            .map_err(|e| Error::io(format!("opening layer {}", l.digest), e))?
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => {
                // A damaged table of kept small files loses only their fast way; a layer
                // stored uncompressed is read in place anyway.
                let index = store.layer_index_path(&record.layers[i]);
                let small = match l.access {
                    crate::index::Access::Tar => None,
                    _ => SmallReads::open(&index).unwrap_or_else(|e| {
                        tracing::warn!("small files of layer {} read through it: {e}", l.digest);
                        None
                    }),
                };
                LayerReader::open(i as u32, &path, l.access.clone(), l.uncompressed_size)
                    .map_err(|e| {
                        Error::io(
                            format!("opening layer {} ({})", l.digest, path.display()),
                            e,
                        )
                    })?
                    .with_small(small)
            }
        };
        layers.push(reader);
    }
    Ok(OpenedImage {
        record,
        lease,
        tree,
        layers,
        remote,
        lazy,
    })
}
