//! The supervisor: mounts the image's shared FUSE mount, holds its `/dev/fuse` descriptor, runs
//! a worker on it (another when one dies) and leaves once nothing stands on the mount.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    find_record, kernel_meta, open_readers, probe::Probe, silence_stdout, spawn, users,
    wait_for_mount_change, Place, HUNG,
};
use crate::mount::{connect, is_mount_point};
use crate::{Digest, Error, Result, Store};

/// Tries at starting a worker in a row (a second apart) before the supervisor gives up.
const MAX_START_FAILURES: u32 = 60;

/// The supervisor (`bux-fuse serve-shared MANIFEST`): mounts the image at its shared place,
/// runs a worker on the connection (another if it dies), and unmounts once nothing stands on
/// the mount. Prints `ready` once the mount serves.
pub fn supervise(
    store: &Store,
    manifest: Digest,
    stop: &std::sync::atomic::AtomicBool,
    disk: bool,
) -> Result<()> {
    let r = supervise_inner(store, manifest, stop, disk);
    if let Err(e) = &r {
        // The client is waiting for `ready` (nothing is printed once it came): the reason,
        // typed, as a mount of its own would have met it.
        spawn::tell_error(e);
    }
    r
}

fn supervise_inner(
    store: &Store,
    manifest: Digest,
    stop: &std::sync::atomic::AtomicBool,
    disk: bool,
) -> Result<()> {
    let place = Place::of(store, &manifest, disk);
    // What the client that started it said its workers fetch with (an image stored whole:
    // nothing), read whole before anything else; told to each worker, and again to each that
    // takes over.
    let mut told = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut told)
        .map_err(|e| Error::io("reading the image server's options", e))?;
    // The record of the reference the starting mount named (one manifest may be stored under
    // several: each its own registry and repository to fetch from), else any of the manifest.
    // (Named but gone or re-tagged meanwhile: refused, not served by another reference.)
    let record = match super::Told::read(&told).ok().and_then(|t| t.reference) {
        None => find_record(store, &manifest)?,
        Some(named) => store
            .image(&named)?
            .filter(|r| r.view() == manifest)
            .ok_or_else(|| Error::NotFound {
                reference: named,
                detail: format!(" in the local store as image {manifest}"),
            })?,
    };
    let _lease = crate::mount::lease_image(store, &record)?;
    // What the workers serve: this record, leased, found by its manifest (not by its name).
    let json = serde_json::to_vec(&record)
        .map_err(|e| Error::io("encoding the image record", e.into()))?;
    crate::store::write_atomic(&place.record(), &json)?;
    let mnt = place.mnt();
    let mount_err = |detail: String| Error::Mount {
        path: mnt.clone(),
        detail,
    };
    crate::store::write_atomic(&place.pid(), std::process::id().to_string().as_bytes())?;
    let readers = open_readers(&place)?;
    // Root's server is every user's (the kernel checks modes); a user's is the user's alone,
    // read by that user's own mounts.
    let root = connect::host_root();
    let request = connect::Request {
        fsname: &format!("bux-fuse:{}", record.reference),
        allow_other: root,
        read_only: true,
    };
    let fd = connect::connect(&mnt, &request).map_err(mount_err)?;
    let exe = std::env::current_exe().map_err(|e| Error::io("finding own executable", e))?;
    let mut resume = false;
    let mut probe = None;
    let mut restarts: Vec<Instant> = Vec::new();
    let mut failures = 0u32;
    loop {
        let conn = fd.as_raw_fd();
        // A worker of an image stored whole fetches nothing: it is told no credentials.
        let told: &[u8] = match super::all_local(store, &record) {
            true => &[],
            false => &told,
        };
        let mut worker = match spawn_worker(store, &exe, &manifest, conn, resume, disk, told) {
            Ok(w) => w,
            Err(e) if !resume => {
                kernel_meta::tear_down(&place);
                return Err(e.error.unwrap_or_else(|| mount_err(e.said)));
            }
            Err(e) => {
                // The VMs' requests wait (they are not lost): try again shortly, as long as
                // somebody still uses the mount — but not forever: a worker that cannot start
                // for a minute will not, and failing the requests beats hanging them.
                tracing::error!("restarting the image server: {e}");
                failures += 1;
                if failures >= MAX_START_FAILURES {
                    kernel_meta::tear_down(&place);
                    let _ = std::fs::remove_file(place.pid());
                    return Err(mount_err(format!(
                        "no worker could be started in {MAX_START_FAILURES} tries ({e}): unmounted"
                    )));
                }
                std::thread::sleep(Duration::from_secs(1));
                if users(&place, Some(&readers)) == 0 {
                    kernel_meta::tear_down(&place);
                    return Ok(());
                }
                continue;
            }
        };
        failures = 0;
        let started = Instant::now();
        if !resume {
            crate::mount::raise_readahead(&mnt);
            match disk {
                true => tracing::info!("serving the image's disk"),
                false if !root => tracing::info!("serving the user's mounts of the image"),
                // No metadata image for an image fetched lazily: its layers have no small
                // files kept, and one written now would differ from what the image holds
                // once they are whole.
                false if !super::all_local(store, &record) => {
                    tracing::info!("serving the image, fetching what is read (metadata by FUSE)")
                }
                false => match kernel_meta::set_up(store, &record, &place) {
                    Ok(()) => tracing::info!("metadata served by the kernel (EROFS), data by FUSE"),
                    Err(e) => tracing::warn!("metadata served by FUSE: {e}"),
                },
            }
            println!("ready");
            let _ = std::io::stdout().flush();
            silence_stdout();
        }
        // A question still unanswered was asked of the dead worker (a kernel without
        // FUSE_NOTIFY_RESEND never resends it): the next is asked of this one.
        if probe
            .as_ref()
            .is_some_and(|p: &Probe| p.waiting().is_some())
        {
            probe = None;
        }
        let probe: &Probe = probe.get_or_insert_with(|| Probe::start(mnt.clone()));
        let mut ended = false;
        let outcome = watch(store, &place, &readers, || {
            if stop.load(Ordering::SeqCst) {
                return Some(Outcome::Stop);
            }
            // A worker that answers nothing for HUNG (given as long to start) is ended: the
            // next one gets what it held.
            let hung = probe.waiting().is_some_and(|w| w >= HUNG) && started.elapsed() >= HUNG;
            if hung && !ended {
                tracing::warn!("the image server worker answered nothing for {HUNG:?}: ending it");
                // SAFETY: signalling our own child, not yet reaped.
                unsafe { libc::kill(worker.id() as i32, libc::SIGKILL) };
                ended = true;
            }
            match worker.try_wait() {
                Ok(Some(status)) => Some(Outcome::WorkerDied(status)),
                _ => None,
            }
        })?;
        match outcome {
            Outcome::WorkerDied(status)
                if status.code() == Some(super::worker::HANDED_OVER)
                    && is_mount_point(&mnt)
                    && !stop.load(Ordering::SeqCst) =>
            {
                // The image fetched lazily is whole: served from the store from now on, by a
                // worker confined as for any stored image (not counted as a failure).
                tracing::info!("the image is whole: starting a confined worker in its place");
                resume = true;
            }
            Outcome::WorkerDied(status) if is_mount_point(&mnt) && !stop.load(Ordering::SeqCst) => {
                tracing::warn!("image server worker exited ({status}): starting another on the same connection");
                restarts.retain(|t| t.elapsed() < Duration::from_secs(60));
                restarts.push(Instant::now());
                if restarts.len() > 10 {
                    kernel_meta::tear_down(&place);
                    return Err(mount_err(
                        "the image server died 10 times in a minute: unmounted (see its log)"
                            .into(),
                    ));
                }
                resume = true;
            }
            Outcome::WorkerDied(_) => {
                // Unmounted from outside: what stood over the FUSE mount goes too.
                kernel_meta::tear_down(&place);
                break;
            }
            Outcome::Stop => {
                stop_serving(&place, &mut worker);
                break;
            }
            Outcome::Unused(lock) => {
                stop_serving(&place, &mut worker);
                let _ = std::fs::remove_file(place.pid());
                drop(lock); // now a client may start a new server
                return Ok(());
            }
        }
    }
    let _ = std::fs::remove_file(place.pid());
    Ok(())
}

fn stop_serving(place: &Place, worker: &mut std::process::Child) {
    kernel_meta::tear_down(place);
    // Unmounted, its session ends: a moment to finish by itself (a lazily fetched image's
    // worker saves the reads it recorded), then it is told to.
    let deadline = Instant::now() + Duration::from_secs(2);
    while matches!(worker.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    let _ = worker.wait();
}

enum Outcome {
    WorkerDied(std::process::ExitStatus),
    Unused(crate::store::Lock),
    Stop,
}

/// Waits until nothing stands on the image's shared mount (returning the image's lock, held:
/// no client mounts on it while it is torn down) or `tick` has news.
fn watch(
    store: &Store,
    place: &Place,
    readers: &std::fs::File,
    mut tick: impl FnMut() -> Option<Outcome>,
) -> Result<Outcome> {
    loop {
        if let Some(o) = tick() {
            return Ok(o);
        }
        // The client that started the server holds the lock until its mount stands on it.
        if users(place, Some(readers)) == 0 {
            if let Some(lock) = store.try_lock(&place.lock)? {
                if users(place, Some(readers)) == 0 {
                    return Ok(Outcome::Unused(lock));
                }
            }
        }
        wait_for_mount_change(Duration::from_millis(500));
    }
}

fn spawn_worker(
    store: &Store,
    exe: &Path,
    manifest: &Digest,
    fd: RawFd,
    resume: bool,
    disk: bool,
    told: &[u8],
) -> std::result::Result<std::process::Child, spawn::NotReady> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe);
    cmd.arg("--store")
        .arg(store.root())
        .arg("serve-shared")
        .arg("--worker-fd")
        .arg(fd.to_string())
        .arg(manifest.to_string())
        .stdin(spawn::stdin_holding(told).map_err(|e| format!("telling the worker: {e}"))?)
        .stdout(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    if disk {
        cmd.arg("--disk");
    }
    spawn::as_server(&mut cmd);
    // SAFETY: fcntl on a descriptor we own, in the child before exec: the worker inherits it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("starting worker: {e}"))?;
    let offered = spawn::await_ready(&mut child, exe, "the worker")?;
    // What the kernel offered the first worker, for the ones that take over (a taking-over
    // worker reports what it was given again).
    if !resume {
        let place = Place::of(store, manifest, disk);
        if let Err(e) = crate::store::write_atomic(&place.init(), &offered.to_le_bytes()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("recording FUSE_INIT: {e}").into());
        }
    }
    Ok(child)
}
