//! `bux-fuse check`: verifies a store — every blob against its digest, every image's layers,
//! indexes and tree — and with `repair` removes what is damaged, so the next pull or mount
//! fetches or rebuilds it (a damaged blob is never served: it goes, and comes back verified).

use std::fs;
use std::io::Read;

use crate::index::published::PublishedLayer;
use crate::index::{Access, LayerIndex};
use crate::tree::Tree;
use crate::{Digest, Result, Store};

/// What [`Store::check`] found.
#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    /// Files verified.
    pub checked: u64,
    /// What is wrong, one line each (with `repair`, each was removed).
    pub problems: Vec<String>,
}

/// The other names of the file at `path` in its directory (its hard links there).
fn other_names(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Some(dir)) = (fs::metadata(path), path.parent()) else {
        return Vec::new();
    };
    if meta.nlink() < 2 {
        return Vec::new();
    }
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p != path)
        .filter(|p| {
            fs::symlink_metadata(p).is_ok_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev())
        })
        .collect()
}

fn digest_of_file(path: &std::path::Path) -> std::io::Result<Digest> {
    let mut f = fs::File::open(path)?;
    let mut h = crate::digest::Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

impl Store {
    /// Verifies the store (see the module docs). Holds the store like gc does, so no pull runs
    /// meanwhile.
    pub fn check(&self, repair: bool) -> Result<CheckReport> {
        let _pulls = self.lock("store")?;
        let mut r = CheckReport::default();
        let problem = |r: &mut CheckReport, path: &std::path::Path, what: String| {
            if repair {
                let _ = fs::remove_file(path);
            }
            r.problems.push(format!("{}: {what}", path.display()));
        };
        // Blobs: content matches name.
        let blobs = self.root().join("blobs/sha256");
        for e in fs::read_dir(&blobs).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(want) = format!("sha256:{name}").parse::<Digest>() else {
                continue; // temp files of a write in progress
            };
            r.checked += 1;
            match digest_of_file(&e.path()) {
                Ok(got) if got == want => {}
                Ok(got) => problem(&mut r, &e.path(), format!("content is {got}")),
                Err(err) => problem(&mut r, &e.path(), format!("unreadable: {err}")),
            }
        }
        // Images: what a mount needs is there and readable.
        for rec in self.images()? {
            for d in [rec.manifest_digest, rec.config_digest] {
                if !self.blob_path(&d).exists() {
                    r.problems.push(format!(
                        "{}: blob {d} is missing (pull again)",
                        rec.reference
                    ));
                }
            }
            let mut indexes = Some(Vec::new());
            for l in &rec.layers {
                let idx_path = self.layer_index_path(l);
                r.checked += 1;
                if l.index.is_some() && !idx_path.exists() {
                    // A store from before lazy indexes were keyed: derived as a mount would.
                    if let Err(e) = self.ensure_layer_index(l) {
                        r.problems.push(format!("{}: {e}", rec.reference));
                        indexes = None;
                        continue;
                    }
                }
                let idx = match LayerIndex::load(&idx_path) {
                    Ok(idx) => idx,
                    Err(e) => {
                        problem(&mut r, &idx_path, format!("{e}"));
                        let _ = repair.then(|| fs::remove_file(LayerIndex::access_path(&idx_path)));
                        indexes = None;
                        continue;
                    }
                };
                let small = crate::index::small::SmallFiles::path(&idx_path);
                if small.exists() {
                    r.checked += 1;
                    // Without it the layer's small files are read from the layer.
                    if let Err(e) = crate::index::small::SmallFiles::load(&idx_path)
                        .and_then(|_| self.small_files_agree(l, &idx, &idx_path))
                    {
                        // Its other names (a completed lazy layer's small files are linked
                        // beside both of its indexes) are the same bytes: they go too.
                        let others = match repair {
                            true => other_names(&small),
                            false => Vec::new(),
                        };
                        problem(&mut r, &small, format!("{e}"));
                        for other in others {
                            let _ = fs::remove_file(crate::index::small_reads::map_path(
                                &other.with_extension("idx"),
                            ));
                            let _ = fs::remove_file(other);
                        }
                        let map = crate::index::small_reads::map_path(&idx_path);
                        let _ = repair.then(|| fs::remove_file(map));
                    }
                }
                if let Some(index) = &l.index {
                    // A lazily served layer reads by what its published index says, and by
                    // nothing else: the table and the fetched chunks are checked against it.
                    r.checked += 1;
                    match self.published(l, index) {
                        Err(e) => r.problems.push(format!("{}: {e}", rec.reference)),
                        Ok(published) => {
                            if !same_index(&idx, &published.to_index()) {
                                problem(
                                    &mut r,
                                    &idx_path,
                                    format!(
                                        "is not what the image's published index {} says",
                                        index.short()
                                    ),
                                );
                                let _ = repair
                                    .then(|| fs::remove_file(LayerIndex::access_path(&idx_path)));
                                indexes = None;
                                continue;
                            }
                            for windows in [false, true] {
                                let partial = self.partial_path(&l.digest, index, windows);
                                if partial.exists() {
                                    r.checked += 1;
                                    self.check_partial(
                                        &mut r, &published, &partial, windows, repair,
                                    );
                                }
                            }
                            // Once the layer is whole (completed or pulled by any image), its
                            // own index says what it holds: the image's must agree, or the
                            // image was never completed against it (a mismatch a completion
                            // of this image would have marked bad).
                            let by_place = !matches!(published.access, Access::Frames(_));
                            let real = self.index_path(&l.digest);
                            if by_place && self.layer_local(l) && real.exists() {
                                r.checked += 1;
                                match LayerIndex::load(&real) {
                                    Ok(real) if !crate::lazy::same_as_published(&real, &published) => {
                                        r.problems.push(format!(
                                            "{}: layer {} is whole and not what the image's published index {} says",
                                            rec.reference,
                                            l.digest.short(),
                                            index.short()
                                        ))
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                }
                if let Access::Zstd(frames) = &idx.access {
                    let p = self.seekable_path(&l.digest);
                    if !crate::index::zstd_frames::last_frame_ok(&p, frames) && p.exists() {
                        problem(&mut r, &p, "seekable copy cut short".into());
                    }
                }
                if let Some(list) = indexes.as_mut() {
                    list.push(idx);
                }
            }
            let tree = self.tree_path(&rec.view());
            if tree.exists() {
                r.checked += 1;
                // Every byte is checked (as each image server does as it starts), and the
                // tree compared with the merge of the indexes. A damaged tree is rebuilt from
                // the layer indexes; one an earlier version wrote is not damaged: the next
                // mount merges it again.
                match Tree::load(&tree) {
                    Err(e) if crate::tree::of_another_version(&e) => {}
                    Err(e) => problem(&mut r, &tree, format!("{e}")),
                    Ok(t) => {
                        if let Err(e) = t.verify() {
                            problem(&mut r, &tree, e);
                        } else if let Some(list) = &indexes {
                            // Whole, but is it this image's? (A tree merged from indexes that
                            // another image named would be whole too.)
                            let merged = crate::tree::merge(
                                list.iter().map(|i| (i.source(), i.entries.as_slice())),
                            );
                            if !merged.is_ok_and(|m| m.same_as(&t)) {
                                problem(
                                    &mut r,
                                    &tree,
                                    "is not the merge of the image's layer indexes".into(),
                                );
                            }
                        }
                    }
                }
            }
            // The metadata image, compared with what it should hold; a damaged one is written
            // anew by the next server of the image.
            let meta = self.meta_image_path(&rec.view());
            if meta.exists() {
                r.checked += 1;
                if let Err(e) = crate::mount::shared::check_metadata_image(self, &rec) {
                    problem(&mut r, &meta, e);
                }
            }
        }
        Ok(r)
    }

    /// The published index `index` of lazily served layer `l`, checked against its digest.
    /// Whether the small files kept beside a layer stored whole (`.small`: what every mount
    /// reads them from, FUSE or the kernel's metadata image) hold the layer's bytes: each is
    /// compared with the layer, decoded in stream order (a span at a time, each once). A
    /// layer fetched lazily is checked chunk by chunk elsewhere.
    fn small_files_agree(
        &self,
        l: &crate::store::LayerRecord,
        idx: &LayerIndex,
        idx_path: &std::path::Path,
    ) -> Result<()> {
        if matches!(idx.access, Access::Frames(_)) {
            return Ok(());
        }
        let path = crate::mount::layer_data_path(self, &l.digest, &idx.access, idx.compression);
        if !self.layer_local(l) || !path.exists() {
            return Ok(());
        }
        let Some(kept) = crate::index::small::SmallIndex::open(idx_path)? else {
            return Ok(());
        };
        let layer =
            crate::index::LayerReader::open(0, &path, idx.access.clone(), idx.uncompressed_size)
                .map_err(|e| crate::Error::io(format!("opening {}", path.display()), e))?;
        let cache = crate::index::SpanCache::new(16 << 20);
        let mut buf = Vec::new();
        let mut differs = None;
        kept.each(|offset, bytes| {
            buf.resize(bytes.len(), 0);
            // A layer that cannot be read is not the kept file's fault (a damaged blob is
            // reported by its digest): left unchecked.
            let n = match layer.read_at(&cache, offset, &mut buf) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("{}: not compared with the layer: {e}", path.display());
                    return Ok(false);
                }
            };
            if n != bytes.len() || buf != bytes {
                differs = Some(offset);
                return Ok(false);
            }
            Ok(true)
        })?;
        match differs {
            Some(offset) => Err(crate::Error::CorruptStore {
                path: crate::index::small::SmallFiles::path(idx_path),
                detail: format!(
                    "the file at byte {offset} of layer {} is not the layer's",
                    l.digest.short()
                ),
            }),
            None => Ok(()),
        }
    }

    fn published(&self, l: &crate::store::LayerRecord, index: &Digest) -> Result<PublishedLayer> {
        let bytes = self.read_verified_blob(index, "published layer index")?;
        PublishedLayer::decode(&bytes, l.digest, l.size)
    }

    /// A lazily fetched layer (or, with `windows`, its gzip windows): every chunk marked
    /// present matches its digest in the published index. With `repair` the bad ones are
    /// unmarked, so they are fetched again.
    fn check_partial(
        &self,
        r: &mut CheckReport,
        published: &PublishedLayer,
        partial: &std::path::Path,
        windows: bool,
        repair: bool,
    ) {
        use std::os::unix::fs::FileExt;
        let chunks = match (&published.windows, windows) {
            (_, false) => published.chunks.clone(),
            (Some(w), true) => w.chunks(),
            (None, true) => Vec::new(),
        };
        let map_path = partial.with_extension("present");
        let (Ok(file), Ok(mut map)) = (fs::File::open(partial), fs::read(&map_path)) else {
            return;
        };
        let mut bad = 0;
        for (k, c) in chunks.iter().enumerate() {
            if map.get(k) != Some(&1) {
                continue;
            }
            let mut buf = vec![0u8; (c.end - c.start) as usize];
            if file.read_exact_at(&mut buf, c.start).is_err() || !c.verify(&buf) {
                bad += 1;
                map[k] = 0;
            }
        }
        if map.len() > chunks.len() && map[chunks.len()..].contains(&1) {
            bad += 1;
            map.truncate(chunks.len());
        }
        if bad > 0 {
            if repair {
                let _ = crate::store::write_atomic(&map_path, &map);
            }
            r.problems.push(format!(
                "{}: {bad} fetched chunks do not match their digests",
                partial.display()
            ));
        }
    }
}

/// A stored layer index says what the published one says: entries, and checkpoints (windows
/// compared by content, where the published index carries them inline: one that keeps them
/// apart is checked chunk by chunk as its windows are fetched).
fn same_index(stored: &LayerIndex, published: &LayerIndex) -> bool {
    stored.entries == published.entries
        && stored.compression == published.compression
        && stored.uncompressed_size == published.uncompressed_size
        && stored.diff_id == published.diff_id
        // (At the published spacing: a stored layer's checkpoints are denser, those among them.)
        && match (&stored.access.published(), &published.access.published()) {
            (Access::Gzip(x), Access::Gzip(y)) => crate::index::gzip::same_checkpoints(x, y, true),
            (x, y) => postcard::to_allocvec(x).ok() == postcard::to_allocvec(y).ok(),
        }
}
