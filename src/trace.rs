//! The read trace of a mount: which compressed ranges of which layers its reads needed, in the
//! order first needed. A lazy mount records one when none is known (or when asked); `push-index`
//! publishes it beside the index; the next lazy mount of the image fetches those ranges first,
//! before reads ask for them (the prefetch lists of stargz and Nydus). A boot reads much the
//! same files every time, so this turns a chain of round trips into a few large fetches.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::{Digest, Error, Result};

/// Media type of a published trace.
pub const MEDIA_TYPE: &str = "application/vnd.bux-fuse.trace.v1+json";
/// Most entries kept (a boot needs a few thousand at most).
const MAX_ENTRIES: usize = 100_000;

/// One range a read needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The layer blob.
    pub layer: Digest,
    /// First byte in the compressed blob.
    pub start: u64,
    /// One past the last.
    pub end: u64,
}

/// A trace being recorded by a mount.
pub struct Recorder {
    layers: Vec<Digest>,
    /// (layer, range start) already recorded, and the ranges in order.
    inner: Mutex<(HashSet<(u32, u64)>, Ranges)>,
}

/// A range of a layer (by its index in the mount) a read needed.
type Recorded = (u32, Range<u64>);

/// The ranges recorded, in order.
type Ranges = Vec<Recorded>;

impl Recorder {
    /// Records for a mount of these layers (indexed as the mount's layer readers).
    pub fn new(layers: Vec<Digest>) -> Recorder {
        Recorder {
            layers,
            inner: Mutex::new(Default::default()),
        }
    }

    /// Notes that a read of layer `layer` needed `range` (first time only).
    pub fn record(&self, layer: u32, range: Range<u64>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (seen, order) = &mut *g;
        if order.len() < MAX_ENTRIES && seen.insert((layer, range.start)) {
            order.push((layer, range));
        }
    }

    /// What was recorded, in order.
    pub fn entries(&self) -> Vec<Entry> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter()
            .filter_map(|(l, r)| {
                Some(Entry {
                    layer: *self.layers.get(*l as usize)?,
                    start: r.start,
                    end: r.end,
                })
            })
            .collect()
    }
}

/// Writes a trace (JSON) atomically.
pub fn save(path: &Path, entries: &[Entry]) -> Result<()> {
    let bytes = serde_json::to_vec(entries).map_err(|e| Error::io("encoding trace", e.into()))?;
    crate::store::write_atomic(path, &bytes)
}

/// Parses a trace (from the store or a registry).
pub fn parse(bytes: &[u8]) -> Result<Vec<Entry>> {
    let entries: Vec<Entry> =
        serde_json::from_slice(bytes).map_err(|e| Error::InvalidManifest {
            what: "read trace".into(),
            detail: e.to_string(),
        })?;
    Ok(entries
        .into_iter()
        .filter(|e| e.start < e.end)
        .take(MAX_ENTRIES)
        .collect())
}

/// Reads the trace at `path`, if there is one.
pub fn load(path: &Path) -> Option<Vec<Entry>> {
    parse(&std::fs::read(path).ok()?).ok()
}
