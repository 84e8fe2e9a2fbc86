//! Where a read of a mount spends its work: mounts REF from STORE in this process (a server of
//! its own), runs a shell command against it with caches dropped, and prints the wall time with
//! the read path's counters (bytes inflated against bytes the command read).
//!
//! `read_profile STORE REF DIR 'tar -C "$MNT" -cf - . | wc -c'`
//!
//! `CACHE_MIB=N` sets the span cache; `TUNE=daemon` tunes the allocator as the daemons do,
//! `TUNE=arena[,MIB]` two arenas (and that mapping threshold), anything else leaves it as is.
//! The process's RSS at the end is printed too, and the command's errors if it had any (it
//! runs under bash with `pipefail`, so that a pipeline's first failure counts).
use std::path::Path;
use std::time::Instant;

use bux_fuse::{MountOptions, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, store, reference, dir, cmd] = &args[..] else {
        return Err("usage: read_profile STORE REF DIR COMMAND".into());
    };
    let store = Store::open(store.as_str())?;
    let mut opts = MountOptions::default();
    if let Ok(c) = std::env::var("CACHE_MIB") {
        opts.cache_bytes = c.parse::<usize>()? << 20;
    }
    match std::env::var("TUNE").as_deref() {
        Ok("daemon") => bux_fuse::mount::tune_allocator_for_serving(), // as the daemons do
        // SAFETY: mallopt only tunes the allocator.
        Ok(t) if t.starts_with("arena") => unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
            if let Some(mb) = t.strip_prefix("arena,") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, mb.parse::<i32>().unwrap() << 20);
            }
        },
        _ => {}
    }
    let mount = bux_fuse::mount(&store, reference, Path::new(dir), &opts)?;
    std::fs::write("/proc/sys/vm/drop_caches", "3")?;
    let (faults, cpu) = (minor_faults(), cpu_secs());
    let t = Instant::now();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; {cmd}"))
        .env("MNT", dir)
        .output()?;
    let secs = t.elapsed().as_secs_f64();
    let (faults, cpu) = (minor_faults() - faults, cpu_secs() - cpu);
    let s = mount.stats();
    use std::io::Write;
    let mut stdout = std::io::stdout();
    // A closed pipe (`| head`) must not stop us before the unmount.
    let _ = writeln!(
        stdout,
        "{secs:.2} s  out={}  inflated={:.0} MB  blob={:.0} MB  hits={} misses={} lookups={}  \
         server CPU {cpu:.2} s, page faults {faults}",
        String::from_utf8_lossy(&out.stdout).trim(),
        s.decompressed_bytes as f64 / 1e6,
        s.blob_bytes as f64 / 1e6,
        s.cache_hits,
        s.cache_misses,
        s.lookups
    );
    // A read error must not pass for a result: tar, for one, pads a file that reads short with
    // zeros and goes on, so the byte count stays the same.
    let errors = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !errors.trim().is_empty() {
        let first = errors.lines().next().unwrap_or("");
        let n = errors.lines().count();
        let _ = writeln!(
            stdout,
            "  FAILED ({}): {n} lines on stderr, first: {first}",
            out.status
        );
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    for l in status
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
    {
        let _ = writeln!(stdout, "  {l}");
    }
    mount.unmount()?;
    Ok(())
}

/// CPU time of this process's threads so far (the server's; not the command's).
fn cpu_secs() -> f64 {
    let u = usage();
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

fn usage() -> libc::rusage {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u
}

/// Minor page faults of this process's threads so far (the server's; not the command's):
/// each first touch of fresh memory, which costs microseconds in a guest.
fn minor_faults() -> i64 {
    usage().ru_minflt
}
