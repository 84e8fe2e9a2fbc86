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
//!   allocated, against what the allocator keeps); `*_anon_mb` the same without the pages of
//!   files mapped (the program's own code among them: RssAnon);
//! * `max_stall_ms` — the longest the executor went without running a task that asks to run
//!   every millisecond (what blocking work on the async thread costs every other task);
//!   `ticks` — how many times it ran during the pull; `max_busy_ms` — the most CPU time the
//!   executor's thread spent between two of its runs (what the pull's work on that thread
//!   cost; on a loaded machine a stall can also be the thread waiting for a CPU, which this
//!   does not count).
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

/// CPU time of the calling thread, in µs.
fn thread_cpu_us() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
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
                eprintln!(
                    "{:7.3} s  rss {rss:6} MB  {p:?}",
                    t0.elapsed().as_secs_f64()
                );
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
    let max_busy_us = Arc::new(AtomicU64::new(0));
    let ticks = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (pulled, layers) = rt.block_on(async {
        // The ticker: asks to run every millisecond, and notes the longest it waited.
        let ticker = {
            let (done, max_gap_us, ticks) = (done.clone(), max_gap_us.clone(), ticks.clone());
            let max_busy_us = max_busy_us.clone();
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(Duration::from_millis(1));
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last = Instant::now();
                let mut last_cpu = thread_cpu_us();
                while !done.load(Ordering::Relaxed) {
                    interval.tick().await;
                    let now = Instant::now();
                    let gap = now.duration_since(last).as_micros() as u64;
                    let busy = thread_cpu_us() - last_cpu;
                    if trace && (gap > 20_000 || busy > 5_000) {
                        eprintln!(
                            "{:7.3} s  executor stalled {} ms, busy {} ms",
                            started.elapsed().as_secs_f64(),
                            gap / 1000,
                            busy / 1000
                        );
                    }
                    max_gap_us.fetch_max(gap, Ordering::Relaxed);
                    let cpu = thread_cpu_us();
                    max_busy_us.fetch_max(cpu - last_cpu, Ordering::Relaxed);
                    last_cpu = cpu;
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
    let retained_anon = status_kb("RssAnon");
    let trimmed = {
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only returns free memory to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        status_kb("VmRSS")
    };
    let trimmed_anon = status_kb("RssAnon");
    // Once the runtime's idle blocking threads have left (tokio keeps them 10 s), with their
    // stacks and allocator arenas.
    let threads_before = status_kb("Threads");
    std::thread::sleep(Duration::from_secs(11));
    let settled = status_kb("VmRSS");
    let threads_after = status_kb("Threads");
    if trace {
        eprintln!("threads {threads_before} -> {threads_after}");
        extern "C" {
            fn malloc_stats();
        }
        // SAFETY: prints the allocator's statistics to stderr.
        unsafe { malloc_stats() };
    }
    let ph = phases.lock().unwrap();
    let peak = ph.peaks.iter().map(|(_, kb)| *kb).max().unwrap_or(0);
    let phase_json: Vec<String> = ph
        .peaks
        .iter()
        .map(|(name, kb)| format!("\"{name}\": {}", mb(*kb)))
        .collect();
    println!(
        "{{\"reference\": \"{reference}\", \"small_files\": {}, \"layers\": {layers}, \"secs\": {secs:.2}, \
         \"base_mb\": {}, \"peak_mb\": {}, \"retained_mb\": {}, \"trimmed_mb\": {}, \"retained_anon_mb\": {}, \"trimmed_anon_mb\": {}, \"settled_mb\": {}, \
         \"max_stall_ms\": {:.1}, \"max_busy_ms\": {:.1}, \"ticks\": {}, \"phases\": {{{}}}}}",
        small_files.map_or("null".to_string(), |n: u64| n.to_string()),
        mb(base),
        mb(peak),
        mb(retained),
        mb(trimmed),
        mb(retained_anon),
        mb(trimmed_anon),
        mb(settled),
        max_gap_us.load(Ordering::Relaxed) as f64 / 1000.0,
        max_busy_us.load(Ordering::Relaxed) as f64 / 1000.0,
        ticks.load(Ordering::Relaxed),
        phase_json.join(", "),
    );
    drop(pulled);
    Ok(())
}
