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
            for l in &rec.layers {
                let idx_path = self.index_path(&l.digest);
                r.checked += 1;
                let access = match LayerIndex::load(&idx_path) {
                    Ok(idx) => idx.access,
                    Err(e) => {
                        problem(&mut r, &idx_path, format!("{e}"));
                        let _ = repair.then(|| fs::remove_file(LayerIndex::access_path(&idx_path)));
                        continue;
                    }
                };
                let small = crate::index::small::SmallFiles::path(&idx_path);
                if small.exists() {
                    r.checked += 1;
                    if let Err(e) = crate::index::small::SmallFiles::load(&idx_path) {
                        // Without it the layer's small files are read through FUSE.
                        problem(&mut r, &small, format!("{e}"));
                    }
                }
                let partial = self
                    .root()
                    .join("layers/sha256")
                    .join(format!("{}.partial", l.digest.hex()));
                match access {
                    Access::Zstd(frames) => {
                        let p = self.seekable_path(&l.digest);
                        if !crate::index::zstd_frames::last_frame_ok(&p, &frames) && p.exists() {
                            problem(&mut r, &p, "seekable copy cut short".into());
                        }
                    }
                    _ if partial.exists() => {
                        r.checked += 1;
                        self.check_partial(&mut r, l, &partial, repair);
                    }
                    _ => {}
                }
            }
            let tree = self.tree_path(&rec.manifest_digest);
            if tree.exists() {
                r.checked += 1;
                // A mount only checks the header (so that it costs the same at any size);
                // here every byte is checked. A damaged tree is rebuilt from the layer indexes.
                match Tree::load(&tree) {
                    Err(e) => problem(&mut r, &tree, format!("{e}")),
                    Ok(t) => {
                        if let Err(e) = t.verify() {
                            problem(&mut r, &tree, e);
                        }
                    }
                }
            }
            // The metadata image, compared with what it should hold; a damaged one is written
            // anew by the next server of the image.
            let meta = self.meta_image_path(&rec.manifest_digest);
            if meta.exists() {
                r.checked += 1;
                if let Err(e) = crate::mount::shared::check_metadata_image(self, &rec) {
                    problem(&mut r, &meta, e);
                }
            }
        }
        Ok(r)
    }

    /// A lazily fetched layer: every chunk marked present matches its digest.
    fn check_partial(
        &self,
        r: &mut CheckReport,
        l: &crate::store::LayerRecord,
        partial: &std::path::Path,
        repair: bool,
    ) {
        use std::os::unix::fs::FileExt;
        let Some(index) = l.index else { return };
        let Ok(bytes) = fs::read(self.blob_path(&index)) else {
            return;
        };
        let Ok(published) = PublishedLayer::decode(&bytes, l.digest, l.size) else {
            return;
        };
        let map_path = partial.with_extension("present");
        let (Ok(file), Ok(mut map)) = (fs::File::open(partial), fs::read(&map_path)) else {
            return;
        };
        let mut bad = 0;
        for (k, c) in published.chunks.iter().enumerate() {
            if map.get(k) != Some(&1) {
                continue;
            }
            let mut buf = vec![0u8; (c.end - c.start) as usize];
            if file.read_exact_at(&mut buf, c.start).is_err() || !c.verify(&buf) {
                bad += 1;
                map[k] = 0;
            }
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
