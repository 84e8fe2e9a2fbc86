//! What a pull costs the process that embeds the library: pulls REF into a fresh store through
//! `Store::pull` on a current-thread tokio runtime (as a runtime's own executor would run it),
//! and prints one JSON line:
//!
//! * `peak_mb` — the process's peak RSS during the pull (VmHWM, reset just before it), and the
//!   peak of each phase (`phases`: resolving, layers fetched and indexed, merge, metadata image;
//!   VmHWM is reset at each boundary by writing 5 to `/proc/self/clear_refs`, from the
//!   progress callback);
//! * `base_mb` — RSS before the pull (the runtime made, nothing pulled);
//! * `retained_mb` — RSS once the pull returned and all but the `PulledImage` was dropped, the
//!   runtime still up (as in a long-running caller); `trimmed_mb` the same after glibc's
//!   `malloc_trim(0)`, which returns freed heap to the kernel (what the library leaves
//!   allocated, against what the allocator keeps);
//! * `max_stall_ms` — the longest the executor went without running a task that asks to run
//!   every millisecond (what blocking work on the async thread costs every other task);
//!   `ticks` — how many times it ran during the pull.
//!
//! `pull_memory [--small-files N] [--store DIR] REF` (a registry on 127.0.0.1 is spoken to in
//! plain HTTP). The store is made in a temp dir and removed unless `--store` names one.
//! `TRACE=1` prints each progress event but byte counts, and the RSS every 50 ms, to stderr.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bux_fuse::{Progress, PullOptions, Store};

/// A field of `/proc/self/status`, in kB.
fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("writing /proc/self/clear_refs");
}

fn mb(kb: u64) -> f64 {
    (kb as f64 / 1024.0 * 10.0).round() / 10.0
}

/// Peaks of the phases of a pull, told by its progress events.
struct Phases {
    current: &'static str,
    layers_left: usize,
    peaks: Vec<(&'static str, u64)>,
}

impl Phases {
    /// Ends the current phase (its peak recorded) and starts `next`.
    fn enter(&mut self, next: &'static str) {
        if next == self.current {
            return;
        }
        self.peaks.push((self.current, status_kb("VmHWM")));
        reset_peak();
        self.current = next;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut small_files, mut store_dir, mut reference) = (None, None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--small-files" => small_files = Some(args.next().ok_or("--small-files N")?.parse()?),
            "--store" => store_dir = Some(args.next().ok_or("--store DIR")?),
            _ => reference = Some(a),
        }
    }
    let reference =
        reference.ok_or("usage: pull_memory [--small-files N] [--store DIR] REFERENCE")?;
    let tmp = tempfile::tempdir()?;
    let root = store_dir.map_or_else(|| tmp.path().join("store"), Into::into);

    let trace = std::env::var("TRACE").is_ok_and(|v| v == "1");
    if trace {
        let t0 = Instant::now();
        std::thread::spawn(move || loop {
            let rss = mb(status_kb("VmRSS"));
            eprintln!("{:7.3} s  rss {rss:6} MB", t0.elapsed().as_secs_f64());
            std::thread::sleep(Duration::from_millis(50));
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let phases = Arc::new(Mutex::new(Phases {
        current: "resolve",
        layers_left: 0,
        peaks: Vec::new(),
    }));
    let progress: bux_fuse::pull::ProgressFn = {
        let phases = phases.clone();
        let t0 = Instant::now();
        Arc::new(move |p: Progress| {
            if trace && !matches!(p, Progress::LayerBytes { .. }) {
                let rss = mb(status_kb("VmRSS"));
                eprintln!("{:7.3} s  rss {rss:6} MB  {p:?}", t0.elapsed().as_secs_f64());
            }
            let mut ph = phases.lock().unwrap();
            match p {
                Progress::Resolved { layers, .. } => {
                    ph.layers_left = layers.len();
                    ph.enter("layers");
                }
                Progress::LayerDone { .. } | Progress::LayerCached { .. } => {
                    ph.layers_left = ph.layers_left.saturating_sub(1);
                    if ph.layers_left == 0 {
                        ph.enter("merge");
                    }
                }
                Progress::Merged { .. } => ph.enter("record"),
                _ => {}
            }
        })
    };
    let mut opts = PullOptions {
        small_files,
        progress: Some(progress),
        ..PullOptions::default()
    };
    if let Some(host) = reference
        .split('/')
        .next()
        .filter(|h| h.starts_with("127."))
    {
        opts.registry.insecure.push(host.to_string());
    }

    let base = status_kb("VmRSS");
    let done = Arc::new(AtomicBool::new(false));
    let max_gap_us = Arc::new(AtomicU64::new(0));
    let ticks = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (pulled, layers) = rt.block_on(async {
        // The ticker: asks to run every millisecond, and notes the longest it waited.
        let ticker = {
            let (done, max_gap_us, ticks) = (done.clone(), max_gap_us.clone(), ticks.clone());
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(Duration::from_millis(1));
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    interval.tick().await;
                    let now = Instant::now();
                    let gap = now.duration_since(last).as_micros() as u64;
                    max_gap_us.fetch_max(gap, Ordering::Relaxed);
                    ticks.fetch_add(1, Ordering::Relaxed);
                    last = now;
                }
            })
        };
        let store = Store::open(&root)?;
        reset_peak();
        let pulled = store.pull(&reference, &opts).await;
        done.store(true, Ordering::Relaxed);
        let _ = ticker.await;
        let pulled = pulled?;
        let layers = pulled.record.layers.len();
        Ok::<_, Box<dyn std::error::Error>>((pulled, layers))
    })?;
    let secs = started.elapsed().as_secs_f64();
    {
        let mut ph = phases.lock().unwrap();
        let last = ph.current;
        let hwm = status_kb("VmHWM");
        ph.peaks.push((last, hwm));
    }
    drop(opts); // the progress callback and what it holds
    let retained = status_kb("VmRSS");
    let trimmed = {
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only returns free memory to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        status_kb("VmRSS")
    };
    let ph = phases.lock().unwrap();
    let peak = ph.peaks.iter().map(|(_, kb)| *kb).max().unwrap_or(0);
    let phase_json: Vec<String> = ph
        .peaks
        .iter()
        .map(|(name, kb)| format!("\"{name}\": {}", mb(*kb)))
        .collect();
    println!(
        "{{\"reference\": \"{reference}\", \"small_files\": {}, \"layers\": {layers}, \"secs\": {secs:.2}, \
         \"base_mb\": {}, \"peak_mb\": {}, \"retained_mb\": {}, \"trimmed_mb\": {}, \
         \"max_stall_ms\": {:.1}, \"ticks\": {}, \"phases\": {{{}}}}}",
        small_files.map_or("null".to_string(), |n: u64| n.to_string()),
        mb(base),
        mb(peak),
        mb(retained),
        mb(trimmed),
        max_gap_us.load(Ordering::Relaxed) as f64 / 1000.0,
        ticks.load(Ordering::Relaxed),
        phase_json.join(", "),
    );
    drop(pulled);
    Ok(())
}
