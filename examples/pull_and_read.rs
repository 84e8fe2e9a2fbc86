//! Pull an image, mount it, read a file through the mount, unmount: what a VM runtime does
//! around `krun_set_root`.
//!
//! ```sh
//! cargo run --example pull_and_read -- 127.0.0.1:5000/library/debian:bookworm /etc/os-release
//! ```
use std::path::PathBuf;

use bux_fuse::{MountOptions, Progress, PullOptions, Store};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(reference), Some(file)) = (args.next(), args.next()) else {
        eprintln!("usage: pull_and_read REFERENCE PATH-IN-IMAGE");
        std::process::exit(2);
    };
    let store = Store::open_default()?;
    let opts = PullOptions {
        progress: Some(std::sync::Arc::new(|p: Progress| {
            if let Progress::LayerDone { layer, entries } = p {
                eprintln!("layer {} ready ({entries} entries)", layer.short());
            }
        })),
        ..Default::default()
    };
    let image = store.pull(&reference, &opts).await?;
    println!("pulled {} ({})", image.reference, image.manifest_digest);
    println!("cmd: {:?}", image.config.config.cmd);

    let dir = tempfile_dir();
    let mount = bux_fuse::mount(&store, &image.reference, &dir, &MountOptions::default())?;
    // mount.path() is what goes to krun_set_root.
    let bytes = std::fs::read(mount.path().join(file.trim_start_matches('/')))?;
    println!("{file}: {} bytes", bytes.len());
    print!("{}", String::from_utf8_lossy(&bytes));
    let stats = mount.stats();
    println!(
        "decompressed {} bytes, {} span cache misses",
        stats.decompressed_bytes, stats.cache_misses
    );
    mount.unmount()?;
    std::fs::remove_dir(&dir)?;
    Ok(())
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bux-fuse-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a mount point");
    dir
}
