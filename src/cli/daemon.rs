//! Mounts that outlive the command: the daemon a mount starts, serving in the foreground,
//! and stopping on a signal.

use super::*;

pub(super) static STOP: AtomicBool = AtomicBool::new(false);

pub(super) extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set [`STOP`]: a serving process then unmounts and ends.
pub(super) fn stop_on_signals() {
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Serves a mount in this process until a signal or an external unmount.
pub(super) fn serve(
    store: &Store,
    reference: &str,
    dir: &Path,
    opts: &crate::MountOptions,
    notify_ready: bool,
) -> Result<()> {
    stop_on_signals();
    crate::mount::tune_allocator_for_serving();
    crate::mount::raise_open_files_limit();
    let m = mount(store, reference, dir, opts)?;
    // What opening the image allocated is freed; give the pages back (a process that only
    // keeps a user's writable mount, its worker serving, needs little else).
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
    // Started before the filter: it sets no_new_privs, under which the setuid fusermount3
    // could no longer unmount a user's mount when a signal stops us.
    let unmounter = (!crate::mount::host_root()).then(|| Unmounter::start(m.path()));
    // Mounted: what is left is serving, which needs far less than the process may do (root's
    // may run nothing, but a keeper must start workers, which confine themselves).
    if let Err(e) = crate::sandbox::confine(crate::mount::host_root() && !m.is_kept()) {
        tracing::warn!("confining the daemon (seccomp): {e}");
    }
    if notify_ready {
        println!("ready");
        let _ = std::io::stdout().flush();
        // The parent stops reading once told; later writes must not fail (or SIGPIPE) us.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            use std::os::fd::AsRawFd;
            // SAFETY: both descriptors are valid; dup2 onto stdout.
            unsafe { libc::dup2(null.as_raw_fd(), 1) };
        }
    } else {
        eprintln!(
            "{reference} mounted at {}; Ctrl-C to unmount",
            m.path().display()
        );
        if let Some(note) = writable_note(opts, dir) {
            eprintln!("{note}");
        }
    }
    while !STOP.load(Ordering::SeqCst) && !m.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Unmounted from outside, nothing to do; else (a signal, or a kept mount whose worker could
    // not be replaced) unmounted here.
    let mounted = !m.is_finished() || m.still_mounted();
    if let Some(Some(u)) = unmounter.filter(|_| mounted) {
        u.unmount();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !m.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    if m.is_finished() {
        m.wait()?;
    } else {
        m.unmount()?;
    }
    Ok(())
}

/// A user's `fusermount3 -u -z DIR`, waiting to be told: started while this process may still
/// run a setuid program.
struct Unmounter(std::process::Child);

impl Unmounter {
    fn start(dir: &Path) -> Option<Unmounter> {
        let child = Command::new("sh")
            .arg("-c")
            // A line on stdin unmounts; its end (we exited: unmounted from outside) does not.
            .arg("read -r _ && exec fusermount3 -u -z \"$0\"")
            .arg(dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| tracing::warn!("starting the unmounter: {e}"))
            .ok()?;
        Some(Unmounter(child))
    }

    fn unmount(mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"unmount\n");
        }
        let _ = self.0.wait();
    }
}

/// Waits until every layer of `record` is stored whole (a lazy mount's background completion),
/// or the image is marked bad.
pub(super) fn wait_complete_layers(
    store: &Store,
    record: &crate::store::ImageRecord,
    dir: &Path,
) -> Result<()> {
    // Checked about once a second: a mount whose server ended completes nothing more. (The
    // mount table names it by its real path.)
    let real = std::fs::canonicalize(dir).ok();
    let mut polls = 0u32;
    loop {
        polls += 1;
        if polls % 10 == 0 {
            let dead =
                std::fs::metadata(dir).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
            let gone = real
                .as_ref()
                .is_some_and(|r| !crate::mount::is_mount_point(r));
            if dead || gone {
                bail!(
                    "{}: the mount at {} ended before the image was complete (a later mount resumes)",
                    record.reference,
                    dir.display()
                );
            }
        }
        if let Ok(why) = std::fs::read_to_string(store.bad_path(&record.view())) {
            bail!("{}: marked bad: {}", record.reference, why.trim());
        }
        if let Ok(why) = std::fs::read_to_string(store.incomplete_path(&record.view())) {
            bail!(
                "{}: completing the image gave up: {} (the mount stays; a later mount resumes)",
                record.reference,
                why.trim()
            );
        }
        if record
            .layers
            .iter()
            .all(|l| store.blob_path(&l.digest).exists() || store.seekable_path(&l.digest).exists())
        {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Starts a detached `bux-fuse mount --notify-ready` and waits until its mount is live.
pub(super) fn spawn_daemon(
    store: &Store,
    reference: &str,
    dir: &Path,
    opts: &crate::MountOptions,
    pull: &PullArgs,
    lazy: bool,
) -> Result<()> {
    let quiet = pull.quiet;
    let logs = store.root().join("logs");
    std::fs::create_dir_all(&logs).context("creating log directory")?;
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let log_path = logs.join(format!(
        "mount-{}.log",
        crate::Digest::of(abs.as_os_str().as_encoded_bytes()).short()
    ));
    let exe = std::env::current_exe().context("finding own executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--store")
        .arg(store.root())
        .arg("mount")
        .arg(reference)
        .arg(&abs)
        .arg("--notify-ready")
        .arg("--pull=never")
        .arg("--quiet")
        .arg(format!("--threads={}", opts.threads))
        .arg(format!("--cache-mb={}", opts.cache_bytes >> 20));
    // Unless told to serve alone, the daemon keeps a worker that serves (replaced if it dies:
    // a user's mounts, root's lazy ones), and a user's writable mount reads image files through
    // the image's shared server where it can (see `upper::Through`).
    if opts.shared_server.is_none() {
        cmd.arg("--own-server");
    }
    if opts.writable {
        cmd.arg("--writable");
    }
    if opts.disk {
        cmd.arg("--disk");
    }
    if opts.record_trace {
        cmd.arg("--record-trace");
    }
    if opts.allow_other {
        cmd.arg("--allow-other");
    }
    if let Some(u) = &opts.upper {
        cmd.arg("--upper").arg(u);
    }
    if lazy {
        cmd.arg("--lazy")
            .arg(format!(
                "--read-timeout={}",
                opts.read_deadline.as_secs_f64()
            ))
            .arg(match opts.prefetch {
                crate::mount::Prefetch::None => "--prefetch=none",
                crate::mount::Prefetch::Trace => "--prefetch=trace",
                crate::mount::Prefetch::All => "--prefetch=all",
            });
        for r in &pull.insecure_registry {
            cmd.arg("--insecure-registry").arg(r);
        }
        for m in &pull.mirror {
            cmd.arg("--mirror").arg(m);
        }
        if let Some(p) = &pull.platform {
            cmd.arg("--platform").arg(p);
        }
        if let (Some(u), Credentials::Basic { password, .. }) =
            (&pull.username, &opts.registry.credentials)
        {
            cmd.arg("--username")
                .arg(u)
                .env("BUX_FUSE_PASSWORD", password);
        }
    }
    let child = crate::mount::start_detached(cmd, &log_path, "the mount daemon")
        .map_err(|e| anyhow::anyhow!(e))?;
    if !quiet {
        eprintln!(
            "{reference} mounted at {} (daemon pid {}; `bux-fuse umount {}` to unmount)",
            abs.display(),
            child.id(),
            abs.display()
        );
        if let Some(note) = writable_note(opts, dir) {
            eprintln!("{note}");
        }
    }
    Ok(())
}

/// Where a writable mount's changes go (or where a disk is), for the message that it is
/// mounted.
pub(super) fn writable_note(opts: &crate::MountOptions, dir: &Path) -> Option<String> {
    if opts.disk {
        let disk = std::path::absolute(dir.join(crate::disk::DISK_FILE));
        return Some(format!(
            "disk: {} (EROFS, read-only; attach it as the guest's root, see docs/disk.md)",
            disk.unwrap_or_else(|_| dir.join(crate::disk::DISK_FILE))
                .display()
        ));
    }
    if !opts.writable {
        return None;
    }
    Some(match &opts.upper {
        Some(upper) => format!("writable: changes are kept in {}", upper.display()),
        None => "writable: changes go to a scratch layer, discarded at unmount (--upper DIR keeps \
                 them)"
            .to_string(),
    })
}
