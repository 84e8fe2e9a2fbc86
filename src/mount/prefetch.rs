//! What a mount of a lazily fetched image does besides serving reads: it records which ranges
//! a boot reads (the image's read trace, saved when the mount ends) and fetches ahead in the
//! background (the trace's ranges first, then every layer whole). Done where the mount is
//! served: in the mounting process, or in a kept mount's worker (`shared::kept`), where each
//! worker that takes over starts again from what the store holds.

use std::path::PathBuf;
use std::sync::Arc;

use super::Prefetch;
use crate::index::published::PublishedLayer;
use crate::index::LayerReader;
use crate::lazy::LazyBlob;
use crate::store::ImageRecord;
use crate::Store;

/// A read trace being recorded, and where it is saved.
pub(crate) type Recording = (Arc<crate::trace::Recorder>, PathBuf);

/// The image's lazily fetched layers, with their published indexes.
pub(crate) type LazyLayers = Vec<(Arc<LazyBlob>, Arc<PublishedLayer>)>;

/// The trace to record for a mount of `record` (asked for, or a lazy image without one), its
/// `layers` made to record into it, and the trace already known of the image.
pub(crate) fn record_reads(
    store: &Store,
    record: &ImageRecord,
    tree: &crate::tree::Tree,
    layers: Vec<LayerReader>,
    lazy: bool,
    asked: bool,
) -> (
    Vec<LayerReader>,
    Option<Recording>,
    Option<Vec<crate::trace::Entry>>,
) {
    let path = store.trace_path(&record.manifest_digest);
    let known = crate::trace::load(&path);
    if !(asked || (lazy && known.is_none())) {
        return (layers, None, known);
    }
    let recorder = Arc::new(crate::trace::Recorder::new(
        tree.layers.iter().map(|l| l.digest).collect(),
    ));
    let layers = layers
        .into_iter()
        .map(|r| r.with_trace(recorder.clone()))
        .collect();
    (layers, Some((recorder, path)), known)
}

/// Saves what `recording` recorded, if anything.
pub(crate) fn save(recording: Option<Recording>) {
    let Some((recorder, path)) = recording else {
        return;
    };
    let entries = recorder.entries();
    if !entries.is_empty() {
        if let Err(e) = crate::trace::save(&path, &entries) {
            tracing::warn!("saving the read trace: {e}");
        }
    }
}

/// Fetches `lazy` layers in the background as `prefetch` says: reads first (they never wait
/// behind this), then the `known` trace's ranges, then (`Prefetch::All`) the rest. A layer that
/// does not match its digest marks the image bad; one that cannot be completed now marks it
/// incomplete (a later mount resumes).
pub(crate) fn start(
    store: &Store,
    record: &ImageRecord,
    lazy: LazyLayers,
    known: Option<Vec<crate::trace::Entry>>,
    prefetch: Prefetch,
) {
    if prefetch == Prefetch::None {
        return;
    }
    let replay: Vec<(Arc<LazyBlob>, std::ops::Range<u64>)> = known
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let (blob, _) = lazy.iter().find(|(_, p)| p.digest == e.layer)?;
            Some((blob.clone(), e.start..e.end))
        })
        .collect();
    let complete = match prefetch {
        Prefetch::All => lazy,
        _ => Vec::new(),
    };
    let bad = store.bad_path(&record.view());
    let incomplete = store.incomplete_path(&record.view());
    let _ = std::fs::remove_file(&incomplete);
    LazyBlob::prefetch(
        replay,
        complete,
        store.clone(),
        move |digest, res, mismatch| match res {
            Ok(()) => tracing::info!("layer {digest} is complete and verified"),
            Err(why) if mismatch => {
                tracing::error!("{why}: the image is marked bad");
                let _ = crate::store::write_atomic(&bad, why.as_bytes());
            }
            Err(why) => {
                tracing::warn!("completing layer {digest}: {why} (a later mount resumes)");
                let why = format!("layer {digest}: {why}");
                let _ = crate::store::write_atomic(&incomplete, why.as_bytes());
            }
        },
    );
}
