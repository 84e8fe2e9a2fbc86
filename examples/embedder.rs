//! A VM runtime's image layer in miniature, as a program that links bux-fuse (and is not the
//! `bux-fuse` binary): it pulls an image, mounts it read-only through the image's shared
//! server (as root), reads a file, reports the mount's state and counters, and unmounts.
//!
//! The shared server runs from this program's own executable, so `main` first hands the
//! process to bux-fuse when it was started as that server (`bux_fuse::serve_if_requested`).
//! `$BUX_FUSE_HELPER=/usr/bin/bux-fuse` runs it from a bux-fuse binary instead.
//!
//! ```sh
//! cargo run --example embedder -- /var/lib/vm-images 127.0.0.1:5000/library/debian:bookworm \
//!     /run/vm1/root /etc/os-release
//! ```
//!
//! (`EMBEDDER_SKIP_HOOK=1` leaves the call out, as a runtime that forgot it would: the mount
//! then fails with an error that names it. `tests/embed.rs` runs both.)
use std::path::PathBuf;
use std::time::Duration;

use bux_fuse::mount::StatsScope;
use bux_fuse::{MountOptions, PullOptions, Store};

fn main() {
    // First thing: a process started as the image server serves and exits here.
    if std::env::var_os("EMBEDDER_SKIP_HOOK").is_none() {
        bux_fuse::serve_if_requested();
    }
    // Only now the runtime's own life: its arguments, its threads, its async runtime.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, reference, dir, file] = &args[..] else {
        eprintln!("usage: embedder STORE REFERENCE MOUNT-POINT PATH-IN-IMAGE");
        std::process::exit(2);
    };
    if let Err(e) = run(store.into(), reference, dir.into(), file) {
        eprintln!("embedder: {e}");
        std::process::exit(1);
    }
}

fn run(
    store: PathBuf,
    reference: &str,
    dir: PathBuf,
    file: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::open(store)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let image = runtime.block_on(store.pull(reference, &PullOptions::default()))?;
    println!("pulled {} ({})", image.reference, image.manifest_digest);

    let opts = MountOptions {
        // This program (or $BUX_FUSE_HELPER) runs the image's shared server.
        shared_server: Some(bux_fuse::server_executable()?),
        ..MountOptions::default()
    };
    let mount = bux_fuse::mount(&store, &image.reference, &dir, &opts)?;
    // mount.path() is what goes to krun_set_root.
    let bytes = std::fs::read(mount.path().join(file.trim_start_matches('/')))?;
    println!("{file}: {} bytes", bytes.len());
    if let Some(line) = bytes.split(|&b| b == b'\n').next() {
        println!(
            "first line: {}",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        );
    }
    println!("finished: {}", mount.is_finished());
    // A shared server publishes its counters every 0.2 s.
    let mut stats = mount.stats();
    for _ in 0..20 {
        if stats.scope != StatsScope::Image || stats.decompressed_bytes > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        stats = mount.stats();
    }
    println!(
        "stats: scope {:?}, {} bytes decompressed from {} blob bytes, {} lookups",
        stats.scope, stats.decompressed_bytes, stats.blob_bytes, stats.lookups
    );
    mount.unmount()?;
    println!("unmounted");
    Ok(())
}
