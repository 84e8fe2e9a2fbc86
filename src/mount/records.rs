//! The mounts a store made, one small record each (`$STORE/mounts/<digest of the path>.json`),
//! so that a runtime restarted after it was killed can see what it left behind — where, of
//! what, by which process, alive or dead — and tear it down or mount there again.
//!
//! A record is written once the mount is live and removed when it is unmounted through the
//! library (or found gone). The kernel's mount table stays the truth: a record only says that
//! this store made the mount at its path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::table;
use crate::error::IoContext;
use crate::{Digest, Error, MountOptions, Result, Store};

/// What a store knows of one of its mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// The mount point (absolute, as the mount table names it).
    pub path: PathBuf,
    /// The image mounted (its normalized reference).
    pub reference: String,
    /// Its manifest digest.
    pub manifest: Digest,
    /// Whether the mount is writable.
    pub writable: bool,
    /// The writable layer kept across mounts (`MountOptions::upper`), if any.
    pub upper: Option<PathBuf>,
    /// The process that made the mount. Unless `shared` is set, it also serves it: the mount
    /// dies with it.
    pub pid: u32,
    /// The user that process ran as.
    pub uid: u32,
    /// That process's name (`/proc/PID/comm`).
    pub program: String,
    /// The mount stands on the image's shared server (root's default), not on its maker.
    pub shared: bool,
    /// Seconds since the epoch when it was mounted.
    pub since: u64,
    /// The mount table's ID of the mount at `path` when it was made: a record whose path holds
    /// another mount now (this one gone, something else mounted there) is stale.
    #[serde(default)]
    pub mount_id: Option<String>,
    /// When process `pid` started (clock ticks since boot): a pid used again by another
    /// process is not taken for the maker.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// The mount serves the image as a disk ([`MountOptions::disk`]).
    #[serde(default)]
    pub disk: bool,
}

/// Whether a recorded mount still serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountState {
    /// Mounted and answering.
    Live,
    /// Still in the mount table, but its server is gone: every access fails with "Transport
    /// endpoint is not connected". [`Store::tear_down`] removes it; [`crate::mount()`] at its
    /// path replaces it by itself.
    Dead,
    /// Its server is there but did not answer within a second (stopped, frozen, or stuck):
    /// neither torn down nor replaced by itself.
    Unresponsive,
}

/// A mount the store made, and how it is.
#[derive(Debug, Clone)]
pub struct StoreMount {
    /// What was recorded when it was mounted.
    pub record: MountRecord,
    /// How it is now.
    pub state: MountState,
}

impl MountRecord {
    /// The options to mount the same thing at the same place again (other options default).
    pub fn options(&self) -> MountOptions {
        MountOptions {
            writable: self.writable || self.upper.is_some(),
            upper: self.upper.clone(),
            disk: self.disk,
            ..MountOptions::default()
        }
    }
}

fn dir(store: &Store) -> PathBuf {
    store.root().join("mounts")
}

fn file_for(store: &Store, path: &Path) -> PathBuf {
    let key = Digest::of(path.as_os_str().as_encoded_bytes());
    dir(store).join(format!("{}.json", key.hex()))
}

/// Records a mount just made; returns the record's file (removed at unmount).
pub(crate) fn write(
    store: &Store,
    path: &Path,
    reference: &str,
    manifest: Digest,
    opts: &MountOptions,
    shared: bool,
) -> Result<PathBuf> {
    let record = MountRecord {
        path: path.to_path_buf(),
        reference: reference.to_string(),
        manifest,
        writable: opts.writable || opts.upper.is_some(),
        upper: opts.upper.clone(),
        pid: std::process::id(),
        // SAFETY: getuid cannot fail.
        uid: unsafe { libc::getuid() },
        program: std::fs::read_to_string("/proc/self/comm")
            .unwrap_or_default()
            .trim()
            .to_string(),
        shared,
        since: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        mount_id: table::at(path).map(|m| m.id),
        pid_start: process_start(std::process::id()),
        disk: opts.disk,
    };
    let d = dir(store);
    std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
    let file = file_for(store, path);
    let bytes = serde_json::to_vec_pretty(&record).map_err(|e| Error::io("json", e.into()))?;
    crate::store::write_atomic(&file, &bytes)?;
    Ok(file)
}

/// The record of the mount at `path`, if this store made one there.
fn read(store: &Store, path: &Path) -> Option<MountRecord> {
    let bytes = std::fs::read(file_for(store, path)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn remove(store: &Store, path: &Path) {
    let _ = std::fs::remove_file(file_for(store, path));
}

/// When process `pid` started (field 22 of `/proc/PID/stat`), if it runs (a zombie does not).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is starttime.
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// How the server of what is mounted at `path` answers: the mount itself, or the image mount
/// an overlay there stands on. Asked with `statfs` (FUSE sends every one to its server; a stat
/// of the root is answered from the kernel's cache) on a thread of its own, waited for one
/// second: a stopped or stuck server holds that thread, not the caller.
pub(crate) fn probe(path: &Path) -> MountState {
    let mut target = path.to_path_buf();
    if let Some(lower) = table::at(path)
        .filter(|m| m.fstype == "overlay")
        .and_then(|m| m.path_option("lowerdir"))
    {
        target = lower;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("bux-fuse-probe".into())
        .spawn(move || {
            let Ok(c) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) else {
                let _ = tx.send(MountState::Live);
                return;
            };
            // SAFETY: a valid C string and a zeroed out-struct the call fills.
            let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
            let failed = unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0;
            let dead =
                failed && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN);
            let _ = tx.send(if dead {
                MountState::Dead
            } else {
                MountState::Live
            });
        });
    if spawned.is_err() {
        return MountState::Unresponsive;
    }
    rx.recv_timeout(std::time::Duration::from_secs(1))
        .unwrap_or(MountState::Unresponsive)
}

impl MountRecord {
    /// Whether the mount at its path is still the one it records (`here`: the mount table's
    /// entry there).
    fn matches(&self, here: &table::MountInfo) -> bool {
        self.mount_id.as_ref().is_none_or(|id| *id == here.id)
    }

    /// How the mount serves. A mount served by its maker (not shared) is dead once that
    /// process is gone, which needs no word with the server; one over the shared server is
    /// asked ([`probe`]).
    fn state(&self) -> MountState {
        if !self.shared {
            let alive = process_start(self.pid)
                .is_some_and(|start| self.pid_start.is_none_or(|s| s == start));
            if !alive {
                return MountState::Dead;
            }
        }
        probe(&self.path)
    }
}

impl Store {
    /// The mounts this store made that are still in the mount table, with whether each still
    /// serves. Records of mounts that are gone are dropped as they are found.
    pub fn mounts(&self) -> Result<Vec<StoreMount>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(dir(self)) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io("listing the store's mounts", e)),
        };
        for entry in entries.flatten() {
            let file = entry.path();
            if file.extension().is_none_or(|x| x != "json") {
                continue; // a temp file of write_atomic
            }
            let Some(record) = std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<MountRecord>(&b).ok())
            else {
                let _ = std::fs::remove_file(&file);
                continue;
            };
            if !table::at(&record.path).is_some_and(|here| record.matches(&here)) {
                let _ = std::fs::remove_file(&file); // gone, or something else is there now
                continue;
            }
            let state = record.state();
            out.push(StoreMount { record, state });
        }
        out.sort_by(|a, b| a.record.path.cmp(&b.record.path));
        Ok(out)
    }

    /// Unmounts a mount this store made at `path`, live or dead, with what stands under it
    /// (the image mount of a writable mount, its scratch upper layer), and drops the store's
    /// record of it. Anything else mounted there (another store's mount included) is left,
    /// with an error saying what it is.
    pub fn tear_down(&self, path: &Path) -> Result<()> {
        let path = super::mount_path(path);
        let ours = table::at(&path)
            .is_some_and(|here| read(self, &path).is_some_and(|r| r.matches(&here)));
        if !ours {
            return Err(Error::Mount {
                path,
                detail: "not a mount this store made (`bux-fuse umount` unmounts any of \
                         bux-fuse's)"
                    .into(),
            });
        }
        super::unmount_all(&path)?;
        remove(self, &path);
        super::clean_run_dir(&self.root().join("run"));
        Ok(())
    }
}

/// Before a mount at `path`: nothing mounted there is fine; a mount this store made whose
/// server died is torn down (a runtime killed and started again mounts its VMs' roots where
/// they were); anything else is [`Error::AlreadyMounted`].
pub(crate) fn clear(store: &Store, path: &Path) -> Result<()> {
    let path = super::mount_path(path);
    let Some(here) = table::at(&path) else {
        return Ok(());
    };
    let record = read(store, &path).filter(|r| r.matches(&here));
    let what = match &record {
        Some(r) => match r.state() {
            MountState::Dead => {
                tracing::info!(
                    "{}: a mount whose server died is here: unmounting it first",
                    path.display()
                );
                return store.tear_down(&path);
            }
            state => format!(
                "{} by {} (pid {}){}{}",
                r.reference,
                r.program,
                r.pid,
                if r.writable { ", writable" } else { "" },
                if state == MountState::Unresponsive {
                    ", its server not answering"
                } else {
                    ""
                }
            ),
        },
        None if super::unmount::is_ours(&here) => match probe(&path) {
            MountState::Dead => {
                "a bux-fuse mount whose server died, not made by this store (`bux-fuse umount` it)"
                    .into()
            }
            _ => "a bux-fuse mount not made by this store".into(),
        },
        None => format!("a {} mount", here.fstype),
    };
    Err(Error::AlreadyMounted { path, what })
}
