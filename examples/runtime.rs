//! What a micro-VM runtime does with bux-fuse, start to end: pulls spawned on its executor,
//! errors it matches on to retry or give up, the image config for `krun_set_exec`, two VMs of
//! one image (read-only and writable roots for `krun_set_root`), recovery after the runtime was
//! killed with its mounts, unmounting, listing and removing. It runs as root or as an ordinary
//! user (whose mounts go through `fusermount3`).
//!
//! ```sh
//! cargo run --example runtime -- STORE_DIR VM_DIR REFERENCE MISSING_REFERENCE
//! ```
//!
//! `MISSING_REFERENCE` names an image the registry does not have. Each step prints one line
//! starting with `ok:`; the first failure ends the program with the error.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bux_fuse::mount::MountState;
use bux_fuse::{Error, MountOptions, Progress, PullOptions, Store};

type AnyError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), AnyError> {
    // First, before threads: where this program was started as the image's shared server,
    // this serves and exits; elsewhere it returns at once.
    bux_fuse::serve_if_requested();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child-mount") {
        return child_mount(&args[1..]);
    }
    let [store_dir, vm_dir, reference, missing] = &args[..] else {
        eprintln!("usage: runtime STORE_DIR VM_DIR REFERENCE MISSING_REFERENCE");
        std::process::exit(2);
    };
    let store = Store::open(store_dir)?;
    let vms = PathBuf::from(vm_dir);
    let rt = tokio::runtime::Runtime::new()?;

    // 1. Pulls on the runtime's executor: spawned, two at once (the second waits for the
    // first's layers rather than fetching them again), progress counted from both.
    let events = Arc::new(AtomicUsize::new(0));
    let pulled = rt.block_on(async {
        let spawn = |store: Store| {
            let events = events.clone();
            let reference = reference.clone();
            tokio::spawn(async move {
                let opts = PullOptions {
                    progress: Some(Arc::new(move |_: Progress| {
                        events.fetch_add(1, Ordering::Relaxed);
                    })),
                    ..Default::default()
                };
                store.pull(&reference, &opts).await
            })
        };
        let (a, b) = (spawn(store.clone()), spawn(store.clone()));
        let (a, b) = (a.await??, b.await??);
        assert_eq!(a.manifest_digest, b.manifest_digest);
        Ok::<_, AnyError>(a)
    })?;
    println!(
        "ok: pulled {} {} ({} progress events)",
        pulled.reference,
        pulled.manifest_digest,
        events.load(Ordering::Relaxed)
    );

    // 2. Errors to act on: an image that is not there is not retried; a registry that cannot be
    // reached is, a few times, with a pause.
    match rt.block_on(store.pull(missing, &PullOptions::default())) {
        Err(e) if matches!(e.inner(), Error::NotFound { .. }) => {
            println!("ok: {missing}: not found, not retried")
        }
        other => return Err(format!("{missing}: expected NotFound, got {other:?}").into()),
    }
    let unreachable = format!("127.0.0.1:{}/nothing/here:1", free_port()?);
    let mut tries = 0;
    let last = loop {
        tries += 1;
        match rt.block_on(store.pull(&unreachable, &PullOptions::default())) {
            Err(e) if e.is_transient() && tries < 3 => {
                std::thread::sleep(Duration::from_millis(100 * tries));
            }
            other => break other,
        }
    };
    match last {
        Err(e) if e.is_transient() => {
            println!("ok: unreachable registry: transient, gave up after {tries} tries ({e})")
        }
        other => return Err(format!("expected a transient error, got {other:?}").into()),
    }

    // 3. What krun_set_exec, krun_set_env and krun_set_workdir want.
    let config = store.config(reference)?.config;
    let mut argv = config.entrypoint.clone().unwrap_or_default();
    argv.extend(config.cmd.clone().unwrap_or_default());
    println!(
        "ok: exec {argv:?} env {:?} workdir {:?}",
        config.env.unwrap_or_default(),
        config.working_dir.unwrap_or_default()
    );

    // 4. Two VMs of the image: a read-only root and a writable one. The read-only one stands
    // on the image's shared server where it can (root), run from this program's executable.
    let (vm1, vm2) = (vms.join("vm1"), vms.join("vm2"));
    let ro_opts = MountOptions {
        shared_server: Some(bux_fuse::server_executable()?),
        ..Default::default()
    };
    let ro = bux_fuse::mount(&store, reference, &vm1, &ro_opts)?;
    let rw_opts = MountOptions {
        writable: true,
        ..Default::default()
    };
    let rw = bux_fuse::mount(&store, reference, &vm2, &rw_opts)?;
    let release = std::fs::read(ro.path().join("etc/os-release"))?;
    if std::fs::read(rw.path().join("etc/os-release"))? != release {
        return Err("the two roots differ".into());
    }
    std::fs::write(rw.path().join("etc/written-by-vm2"), b"vm2\n")?;
    if ro.path().join("etc/written-by-vm2").exists() {
        return Err("a write to vm2 shows in vm1".into());
    }
    println!(
        "ok: two roots at {} (read-only, {}) and {} (writable); vm1 {}, reads {} bytes of /etc/os-release",
        ro.path().display(),
        match ro.stats().scope {
            bux_fuse::mount::StatsScope::Image => "shared server",
            _ => "served here",
        },
        rw.path().display(),
        if ro.is_finished() { "finished" } else { "live" },
        release.len()
    );

    // 5. Killed with its mounts: a process of this program mounts a writable root and is
    // killed with SIGKILL, as a runtime crashing would be. The store lists the dead mount,
    // and mounting there again replaces it.
    let vm3 = vms.join("vm3");
    let mut child = Command::new(std::env::current_exe()?)
        .args(["child-mount", store_dir, reference])
        .arg(&vm3)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        return Err(format!("child: {line:?}").into());
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    let dead = store
        .mounts()?
        .into_iter()
        .find(|m| m.record.path == vm3)
        .ok_or("the killed process's mount is not listed")?;
    if dead.state != MountState::Dead {
        return Err(format!("{} is {:?}, not dead", vm3.display(), dead.state).into());
    }
    let again = bux_fuse::mount(&store, reference, &vm3, &dead.record.options())?;
    if std::fs::read(again.path().join("etc/os-release"))? != release {
        return Err("the recovered root differs".into());
    }
    println!(
        "ok: recovered {} (was served by pid {}, killed)",
        vm3.display(),
        dead.record.pid
    );

    // 6. Done with the VMs: unmount, list, remove.
    for m in [ro, rw, again] {
        m.unmount()?;
    }
    let left = store.mounts()?;
    if !left.is_empty() {
        return Err(format!("mounts left: {left:?}").into());
    }
    let images: Vec<String> = store.images()?.into_iter().map(|i| i.reference).collect();
    store.remove(reference, false)?;
    println!(
        "ok: unmounted all; listed {images:?}; removed {}",
        pulled.reference
    );
    Ok(())
}

/// `child-mount STORE REFERENCE DIR`: mounts a writable root, says `ready`, waits to be killed.
fn child_mount(args: &[String]) -> Result<(), AnyError> {
    let [store_dir, reference, dir] = args else {
        return Err("child-mount STORE REFERENCE DIR".into());
    };
    let store = Store::open(store_dir)?;
    let opts = MountOptions {
        writable: true,
        ..Default::default()
    };
    let _mount = bux_fuse::mount(&store, reference, Path::new(dir), &opts)?;
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// A loopback port nothing listens on (bound and released).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
