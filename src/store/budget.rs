//! The store's disk budget: what the store counts, when each image was last used, and
//! eviction — least recently used images first, whole or (lazily fetched layers) by dropping
//! their fetched chunks, never what a live mount leases.
//!
//! What the budget counts: the allocated bytes (`st_blocks`, what `du` counts) of every file
//! under `blobs/`, `layers/`, `trees/` and `tmp/` — each file once, however many images share
//! it; a sparse partial blob costs only what was fetched into it.
//!
//! Last use: `used/<sha256 of the reference>` holds the reference; its mtime is when the image
//! was last pulled or mounted (an image without one: its record's `pulled_at`). Updating it is
//! one `utimensat`, so a crash leaves the old time or the new one.
//!
//! Eviction runs under the store's pull guard held exclusively (as [`Store::gc`] does): no
//! pull is between storing its files and recording its image, and no mount is between reading
//! its image's record and leasing its files (the mount takes the guard shared for that).
//! Every step leaves the store consistent: an image's record goes first (atomically), then
//! the files no kept image or lease needs; dropping a lazily fetched layer's chunks clears
//! their present marks (made durable) before punching the holes. A gc killed at any point
//! leaves files that only the next gc removes, never a record without its files.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::gc::orphan_file;
use super::{write_atomic, ImageRecord, Store};
use crate::error::IoContext;
use crate::{Digest, Error, Result};

/// The environment variable a budget may be given in (the `--max-store-size` flag wins).
pub const BUDGET_ENV: &str = "BUX_FUSE_MAX_STORE_SIZE";

/// Test hook: a gc pauses (sleeps) after this many removals, so that a test can kill it at
/// a known point.
const PAUSE_ENV: &str = "BUX_FUSE_TEST_GC_PAUSE";

static REMOVED: AtomicU64 = AtomicU64::new(0);

/// Counts one removal of a gc (a file, a record or a layer's chunks); see [`PAUSE_ENV`].
pub(super) fn removed_one() {
    let n = REMOVED.fetch_add(1, Ordering::Relaxed) + 1;
    let pause = std::env::var(PAUSE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if pause == Some(n) {
        eprintln!("bux-fuse: gc paused after {n} removals ({PAUSE_ENV})");
        std::thread::sleep(Duration::from_secs(600));
    }
}

/// Parses a size: plain bytes (`1048576`) or a number with a unit (`20G`, `512M`, `1.5GiB`,
/// `64k`, `2T`). Units are powers of 1024 whichever way they are spelled (`G`, `GB`, `GiB`),
/// as Docker's are.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let bad =
        || format!("bad size '{text}' (expected bytes or a number with a unit: 20G, 512M, 1.5GiB)");
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(bad()),
    };
    if shift == 0 {
        return num.parse::<u64>().map_err(|_| bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = v * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// A budget from [`BUDGET_ENV`], if set (an empty value is unset).
pub fn budget_from_env() -> std::result::Result<Option<u64>, String> {
    match std::env::var(BUDGET_ENV) {
        Ok(v) if !v.trim().is_empty() => parse_size(&v)
            .map(Some)
            .map_err(|e| format!("${BUDGET_ENV}: {e}")),
        _ => Ok(None),
    }
}

/// Settings kept in the store (`settings.json`, replaced atomically).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The store's budget in bytes (`bux-fuse config max-store-size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_store_size: Option<u64>,
}

/// What a budget step does to an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAction {
    /// Drop the chunks fetched into its lazily fetched layers (fetched again when read); the
    /// image stays stored.
    DropChunks,
    /// Forget the image and remove the files no kept image needs.
    Remove,
}

/// One step of eviction.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetStep {
    /// The image.
    pub reference: String,
    /// What happens to it.
    pub action: BudgetAction,
    /// Bytes (as the budget counts them) this step frees.
    pub bytes: u64,
    /// When the image was last pulled or mounted (seconds since the epoch).
    pub last_used: u64,
    #[serde(skip)]
    partials: Vec<PathBuf>,
}

/// What keeping the store within a budget takes (see [`Store::budget_plan`]).
#[derive(Debug, Clone, Serialize)]
pub struct BudgetPlan {
    /// The budget.
    pub max: u64,
    /// Bytes the store holds now, as the budget counts them.
    pub total: u64,
    /// Of them, bytes nothing refers to (gc removes them anyway).
    pub unreferenced: u64,
    /// The steps, in order (only as many as the budget needs).
    pub steps: Vec<BudgetStep>,
    /// Bytes the store holds after them.
    pub after: u64,
    /// Of `after`, bytes only live mounts (or the image being used now) keep.
    pub held: u64,
    /// The images live mounts use.
    pub mounted: Vec<String>,
    /// What would go next once the budget needs more (the first step beyond `steps`).
    pub next: Option<BudgetStep>,
}

/// What [`Store::enforce_budget`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BudgetReport {
    /// The budget.
    pub max: u64,
    /// Images removed.
    pub removed: Vec<String>,
    /// Images whose fetched chunks were dropped.
    pub dropped: Vec<String>,
    /// Files removed (the unreferenced included).
    pub files: u64,
    /// Bytes the store held before and after (as the budget counts them).
    pub before: u64,
    /// See `before`.
    pub after: u64,
    /// Bytes over the budget that could not be freed, if any: held by live mounts.
    pub over: Option<u64>,
    /// Of `after`, bytes only live mounts (or the image being used now) keep.
    pub held: u64,
    /// The images live mounts use.
    pub mounted: Vec<String>,
}

struct FileInfo {
    name: String,
    alloc: u64,
    tmp: bool,
    path: PathBuf,
}

impl Store {
    fn settings_path(&self) -> PathBuf {
        self.root.join("settings.json")
    }

    /// The settings kept in the store.
    pub fn settings(&self) -> Result<Settings> {
        let path = self.settings_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::CorruptStore {
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Sets (or with `None` unsets) the store's budget.
    pub fn set_max_store_size(&self, max: Option<u64>) -> Result<()> {
        let _lock = self.lock("settings")?;
        let mut s = self.settings()?;
        s.max_store_size = max;
        let json = serde_json::to_vec_pretty(&s).map_err(|e| Error::CorruptStore {
            path: self.settings_path(),
            detail: e.to_string(),
        })?;
        write_atomic(&self.settings_path(), &json)
    }

    fn used_path(&self, reference: &str) -> PathBuf {
        self.root
            .join("used")
            .join(Digest::of(reference.as_bytes()).hex())
    }

    /// Records that the image `reference` was used (pulled or mounted) now. Best effort: a
    /// store that cannot record it still serves.
    pub fn mark_used(&self, reference: &str) {
        let path = self.used_path(reference);
        let now = SystemTime::now();
        let touched = OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(now));
        if touched.is_err() {
            let _ = fs::create_dir_all(self.root.join("used"));
            if let Err(e) = write_atomic(&path, reference.as_bytes()) {
                tracing::warn!("recording the last use of {reference}: {e}");
            }
        }
    }

    /// When the image was last pulled or mounted (seconds since the epoch).
    pub fn last_used(&self, record: &ImageRecord) -> u64 {
        (self.last_used_ns(record) / 1_000_000_000) as u64
    }

    /// [`Store::last_used`] in nanoseconds (the order of uses within a second counts).
    fn last_used_ns(&self, record: &ImageRecord) -> u128 {
        let marked = fs::metadata(self.used_path(&record.reference))
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        marked.max(record.pulled_at as u128 * 1_000_000_000)
    }

    /// Removes the last-use marks of images no longer stored.
    pub(super) fn forget_unused_marks(&self, images: &BTreeMap<String, ImageRecord>) {
        let stored: HashSet<String> = images
            .keys()
            .map(|r| Digest::of(r.as_bytes()).hex())
            .collect();
        let Ok(entries) = fs::read_dir(self.root.join("used")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !stored.contains(&name) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    fn inventory(&self) -> Result<Vec<FileInfo>> {
        let mut out = Vec::new();
        // A file under two names (a completed lazy layer's small files, linked beside both of
        // its indexes) is counted once, as `du` does.
        let mut linked = std::collections::HashSet::new();
        for dir in ["blobs/sha256", "layers/sha256", "trees/sha256", "tmp"] {
            let path = self.root.join(dir);
            for entry in fs::read_dir(&path)
                .ctx(|| format!("listing {}", path.display()))?
                .flatten()
            {
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let again = meta.nlink() > 1 && !linked.insert((meta.dev(), meta.ino()));
                out.push(FileInfo {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    alloc: if again { 0 } else { meta.blocks() * 512 },
                    tmp: dir == "tmp",
                    path: entry.path(),
                });
            }
        }
        Ok(out)
    }

    /// Bytes the store holds as the budget counts them: the allocated bytes of every file
    /// under `blobs/`, `layers/`, `trees/` and `tmp/`.
    pub fn counted_bytes(&self) -> Result<u64> {
        Ok(self.inventory()?.iter().map(|f| f.alloc).sum())
    }

    /// What keeping the store within `max` bytes takes, without doing it: least recently used
    /// images first, never one a live mount uses nor those named in `protect`. (A snapshot:
    /// [`Store::enforce_budget`] plans again under the store's lock.)
    pub fn budget_plan(&self, max: u64, protect: &[String]) -> Result<BudgetPlan> {
        let images = self.read_images()?.images;
        let leased = self.leased()?;
        let inv = self.inventory()?;
        let recs: Vec<&ImageRecord> = images.values().collect();
        let removable = |kept: &[&ImageRecord]| -> HashSet<usize> {
            let keep = Store::keep_set(kept, &leased);
            inv.iter()
                .enumerate()
                .filter(|(_, f)| !f.tmp && orphan_file(&f.name, &keep, &leased))
                .map(|(i, _)| i)
                .collect()
        };
        let total: u64 = inv.iter().map(|f| f.alloc).sum();
        let mut gone = removable(&recs);
        let unreferenced: u64 = gone.iter().map(|&i| inv[i].alloc).sum();
        let mut cur = total - unreferenced;
        let in_use = |r: &ImageRecord| {
            leased.contains(&r.manifest_digest.hex()) || leased.contains(&r.view().hex())
        };
        let mut candidates: Vec<(u128, &ImageRecord)> = recs
            .iter()
            .filter(|r| !in_use(r) && !protect.contains(&r.reference))
            .map(|r| (self.last_used_ns(r), *r))
            .collect();
        candidates.sort_by(|a, b| (a.0, &a.1.reference).cmp(&(b.0, &b.1.reference)));
        let mut kept: Vec<&ImageRecord> = recs.clone();
        let mut dropped: HashSet<usize> = HashSet::new();
        let mut steps = Vec::new();
        let mut next = None;
        // The partial blobs of an image's lazily fetched layers that no lease holds.
        let partials_of = |r: &ImageRecord, dropped: &HashSet<usize>, gone: &HashSet<usize>| {
            let mut found = Vec::new();
            for l in r
                .layers
                .iter()
                .filter(|l| !leased.contains(&l.digest.hex()))
            {
                let Some(index) = l.index else { continue };
                let prefix = format!("{}.{}.", l.digest.hex(), index.hex());
                for (i, f) in inv.iter().enumerate() {
                    let kind = f.name.strip_prefix(&prefix);
                    if matches!(kind, Some("partial" | "windows.partial"))
                        && f.alloc > 0
                        && !dropped.contains(&i)
                        && !gone.contains(&i)
                    {
                        found.push(i);
                    }
                }
            }
            found
        };
        let remove = |r: &ImageRecord,
                      kept: &mut Vec<&ImageRecord>,
                      gone: &mut HashSet<usize>,
                      dropped: &HashSet<usize>,
                      commit: bool| {
            let rest: Vec<&ImageRecord> = kept
                .iter()
                .filter(|k| k.reference != r.reference)
                .copied()
                .collect();
            let now = removable(&rest);
            let bytes: u64 = now
                .iter()
                .filter(|i| !gone.contains(i) && !dropped.contains(i))
                .map(|&i| inv[i].alloc)
                .sum();
            if commit {
                *kept = rest;
                gone.extend(now);
            }
            bytes
        };
        let mut chunks_dropped: Vec<&ImageRecord> = Vec::new();
        for (last_used, r) in &candidates {
            let partials = partials_of(r, &dropped, &gone);
            let step = |action, bytes, partials: &[usize]| BudgetStep {
                reference: r.reference.clone(),
                action,
                bytes,
                last_used: (*last_used / 1_000_000_000) as u64,
                partials: partials.iter().map(|&i| inv[i].path.clone()).collect(),
            };
            let commit = cur > max;
            if !partials.is_empty() {
                let bytes: u64 = partials.iter().map(|&i| inv[i].alloc).sum();
                let s = step(BudgetAction::DropChunks, bytes, &partials);
                if !commit {
                    next = Some(s);
                    break;
                }
                cur -= bytes.min(cur);
                dropped.extend(partials);
                chunks_dropped.push(r);
                steps.push(s);
            } else {
                let bytes = remove(r, &mut kept, &mut gone, &dropped, commit);
                let s = step(BudgetAction::Remove, bytes, &[]);
                if !commit {
                    next = Some(s);
                    break;
                }
                cur -= bytes.min(cur);
                steps.push(s);
            }
        }
        // Still over: the images whose chunks went, whole, least recently used first.
        if next.is_none() {
            for r in chunks_dropped {
                let commit = cur > max;
                let bytes = remove(r, &mut kept, &mut gone, &dropped, commit);
                let s = BudgetStep {
                    reference: r.reference.clone(),
                    action: BudgetAction::Remove,
                    bytes,
                    last_used: self.last_used(r),
                    partials: Vec::new(),
                };
                if !commit {
                    next = Some(s);
                    break;
                }
                cur -= bytes.min(cur);
                steps.push(s);
            }
        }
        // What only mounts (and the protected images) keep: what would go without them.
        let free_of_mounts: Vec<&ImageRecord> = kept
            .iter()
            .filter(|r| !in_use(r) && !protect.contains(&r.reference))
            .copied()
            .collect();
        let none = HashSet::new();
        let keep = Store::keep_set(&free_of_mounts, &none);
        let held = inv
            .iter()
            .enumerate()
            .filter(|(i, f)| {
                !f.tmp
                    && !gone.contains(i)
                    && !dropped.contains(i)
                    && orphan_file(&f.name, &keep, &none)
            })
            .map(|(_, f)| f.alloc)
            .sum();
        let mounted = recs
            .iter()
            .filter(|r| in_use(r))
            .map(|r| r.reference.clone())
            .collect();
        Ok(BudgetPlan {
            max,
            total,
            unreferenced,
            steps,
            after: cur,
            held,
            mounted,
            next,
        })
    }

    /// Keeps the store within `max` bytes (see [`Store::budget_plan`]): removes what nothing
    /// refers to (as [`Store::gc`] does), then drops fetched chunks and removes images, least
    /// recently used first, until it is. Images live mounts use and those in `protect` are
    /// kept; if the budget cannot be met without them, the report says by how much it is over.
    /// Waits for running pulls (and mounts leasing their image) first; they wait for it.
    pub fn enforce_budget(&self, max: u64, protect: &[String]) -> Result<BudgetReport> {
        let _pulls = self.flock("store", libc::LOCK_EX)?;
        let before = self.counted_bytes()?;
        let (mut files, _) = self.gc_locked()?;
        let plan = self.budget_plan(max, protect)?;
        let mut report = BudgetReport {
            max,
            before,
            ..Default::default()
        };
        // Chunks first (each layer's marks cleared before its holes are punched), then the
        // records of every image that goes, in one atomic replacement of images.json, then
        // the files no kept record or lease needs: a gc killed anywhere leaves only files
        // nothing refers to.
        let mut victims = Vec::new();
        for step in &plan.steps {
            match step.action {
                BudgetAction::DropChunks => {
                    for p in &step.partials {
                        drop_chunks(p)?;
                        removed_one();
                    }
                    report.dropped.push(step.reference.clone());
                }
                BudgetAction::Remove => victims.push(step.reference.clone()),
            }
        }
        if !victims.is_empty() {
            self.update_images(|f| {
                for v in &victims {
                    f.images.remove(v);
                }
            })?;
            removed_one();
            files += self.gc_locked()?.0;
            report.removed = victims;
        }
        report.files = files;
        report.after = self.counted_bytes()?;
        if report.after > max {
            let now = self.budget_plan(max, protect)?;
            report.over = Some(report.after - max);
            report.held = now.held;
            report.mounted = now.mounted;
        }
        Ok(report)
    }
}

/// Drops the chunks fetched into a partial blob: clears its present marks (made durable),
/// then punches the hole, so that no chunk is ever marked present without its bytes.
fn drop_chunks(partial: &std::path::Path) -> Result<()> {
    let map_path = partial.with_extension("present");
    if let Ok(map) = OpenOptions::new().write(true).open(&map_path) {
        let len = map.metadata().map(|m| m.len()).unwrap_or(0);
        map.write_all_at(&vec![0u8; len as usize], 0)
            .and_then(|_| map.sync_data())
            .ctx(|| format!("clearing {}", map_path.display()))?;
    }
    let file: File = OpenOptions::new()
        .write(true)
        .open(partial)
        .ctx(|| format!("opening {}", partial.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    // SAFETY: fallocate on a valid, owned descriptor.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(Error::io(
            format!("punching {}", partial.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LayerRecord;

    /// A blob of `n` KiB that costs as much on disk.
    fn blob(store: &Store, tag: &str, n: usize) -> Digest {
        let bytes: Vec<u8> = (0..n << 10)
            .map(|i| (i * 7) as u8 ^ tag.len() as u8)
            .collect();
        let mut bytes = bytes;
        bytes.extend_from_slice(tag.as_bytes());
        let d = Digest::of(&bytes);
        store.put_blob(&d, &bytes, "t").unwrap();
        d
    }

    fn image(store: &Store, name: &str, layers: &[Digest]) -> ImageRecord {
        let rec = ImageRecord {
            reference: format!("r/{name}:1"),
            manifest_digest: blob(store, &format!("manifest {name}"), 1),
            config_digest: blob(store, &format!("config {name}"), 1),
            layers: layers
                .iter()
                .map(|d| LayerRecord {
                    digest: *d,
                    media_type: "t".into(),
                    size: 0,
                    index: None,
                })
                .collect(),
            platform: "linux/amd64".into(),
            pulled_at: 0,
        };
        store.put_image(rec.clone()).unwrap();
        store.mark_used(&rec.reference);
        rec
    }

    /// A file under two names (a completed lazy layer's small files) costs its blocks once, as
    /// `du` counts it, in the budget and in `df`.
    #[test]
    fn a_file_under_two_names_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let before = store.counted_bytes().unwrap();
        let layers = dir.path().join("layers/sha256");
        std::fs::create_dir_all(&layers).unwrap();
        let (a, b) = (layers.join("aa.small"), layers.join("aa.bb.small"));
        std::fs::write(&a, vec![7u8; 256 << 10]).unwrap();
        let one = store.counted_bytes().unwrap() - before;
        assert!(one >= 256 << 10, "{one}");
        let small = store.usage().unwrap().small_files;
        std::fs::hard_link(&a, &b).unwrap();
        assert_eq!(store.counted_bytes().unwrap() - before, one);
        assert_eq!(store.usage().unwrap().small_files, small);
        // A copy is another file.
        std::fs::remove_file(&b).unwrap();
        std::fs::copy(&a, &b).unwrap();
        assert_eq!(store.counted_bytes().unwrap() - before, 2 * one);
    }

    #[test]
    fn shared_layers_count_once_and_go_with_the_last_image_that_needs_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let shared = blob(&store, "shared", 64);
        let (ua, ub, uc) = (
            blob(&store, "a", 32),
            blob(&store, "b", 32),
            blob(&store, "c", 32),
        );
        let a = image(&store, "a", &[shared, ua]);
        let b = image(&store, "b", &[shared, ub]);
        let c = image(&store, "c", &[uc]);
        let total = store.counted_bytes().unwrap();
        // Each file once: 64 + 3 * 32 KiB of layers and 6 small blobs (a block or more each).
        assert!(((160 << 10)..=(220 << 10)).contains(&total), "{total}");
        // Just over: the least recently used goes, and frees only what is its own.
        let plan = store.budget_plan(total - 1, &[]).unwrap();
        assert_eq!(plan.steps.len(), 1);
        assert_eq!(plan.steps[0].reference, a.reference);
        assert!(plan.steps[0].bytes >= 32 << 10 && plan.steps[0].bytes < 64 << 10);
        assert_eq!(plan.next.as_ref().unwrap().reference, b.reference);
        // Image b used since: c goes before it.
        store.mark_used(&b.reference);
        let lease = store.lease(&[b.manifest_digest, shared, ub]).unwrap();
        let report = store.enforce_budget(0, &[]).unwrap();
        assert_eq!(
            report.removed,
            vec![a.reference.clone(), c.reference.clone()]
        );
        assert!(store.blob_path(&shared).exists() && !store.blob_path(&ua).exists());
        assert!(!store.blob_path(&uc).exists());
        // What is left is b's, held by its lease: said, and kept.
        assert_eq!(report.over, Some(report.after));
        assert_eq!(report.held, report.after);
        assert_eq!(report.mounted, vec![b.reference.clone()]);
        drop(lease);
        let report = store.enforce_budget(0, &[]).unwrap();
        assert_eq!(report.removed, vec![b.reference]);
        assert_eq!((report.after, report.over), (0, None));
        assert!(!store.blob_path(&shared).exists());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512mb"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size(" 64k "), Ok(64 << 10));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in [
            "",
            "G",
            "12X",
            "1.5",
            "-1G",
            "1..2G",
            "1e3G",
            "99999999999999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("12X").unwrap_err().contains("'12X'"));
    }
}
