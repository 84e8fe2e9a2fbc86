//! The store budget (issue 21): eviction keeps the store within `--max-store-size`, least
//! recently used first, never touching what a live mount leases; many mounts read without an
//! error while pulls force eviction over and over; a gc killed mid-eviction leaves a store that
//! `check` finds whole and the next gc finishes; the fetched chunks of a lazily mounted image
//! no mount uses are dropped and fetched again when read.
//!
//! How the store is measured: `counted` is what the budget counts (`df --json`,
//! `budget.counted`: the allocated bytes of every file under blobs/, layers/, trees/, tmp/),
//! and `du` is the test's own walk of those directories summing `st_blocks * 512` — also
//! checked against `du -sx -B1` of the whole store (directories, locks and records included).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// An image's files: path and bytes.
type Files = Vec<(String, Vec<u8>)>;

/// Incompressible bytes (gzip keeps their size).
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The files of image `seed`: a shared base layer and a layer of its own.
fn files_of(seed: u64, unique: usize) -> (Files, Files) {
    let base = vec![
        ("etc/os-release".to_string(), b"ID=budget\n".to_vec()),
        ("usr/lib/shared.bin".to_string(), random_bytes(200_000, 1)),
    ];
    let own = vec![
        (
            format!("srv/{seed}/data.bin"),
            random_bytes(unique, 1000 + seed),
        ),
        (
            format!("srv/{seed}/small.txt"),
            format!("image {seed}\n").into_bytes(),
        ),
        (
            format!("srv/{seed}/mid.bin"),
            random_bytes(100_000, 2000 + seed),
        ),
    ];
    (base, own)
}

fn push_image(
    reg: &Registry,
    repo: &str,
    seed: u64,
    unique: usize,
) -> (String, Vec<(String, Vec<u8>)>) {
    let (base, own) = files_of(seed, unique);
    let mut l1 = LayerBuilder::new();
    for (p, d) in &base {
        l1 = l1.file(p, d);
    }
    let mut l2 = LayerBuilder::new();
    for (p, d) in &own {
        l2 = l2.file(p, d);
    }
    let img = Image::new(vec![(l1.finish(), Comp::Gzip), (l2.finish(), Comp::Gzip)]);
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &img);
    reg.push(&work.path().join("l"), "v1", repo, None);
    let mut all = base;
    all.extend(own);
    (format!("{}/{repo}:v1", reg.host()), all)
}

fn df(bux: &Bux) -> serde_json::Value {
    serde_json::from_str(&bux.ok(&["df", "--json"])).unwrap()
}

/// What the budget counts (`df --json`).
fn counted(bux: &Bux) -> u64 {
    df(bux)["budget"]["counted"].as_u64().unwrap()
}

/// The test's own measure: allocated bytes of the files under the counted directories.
fn du(store: &Path) -> u64 {
    let mut total = 0;
    for d in ["blobs/sha256", "layers/sha256", "trees/sha256", "tmp"] {
        for e in std::fs::read_dir(store.join(d)).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_file() {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// `du -sx -B1` of the whole store (not crossing into mounts).
fn du_whole(store: &Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-sx", "-B1"])
        .arg(store)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn stored(bux: &Bux) -> Vec<String> {
    bux.ok(&["images", "-q"])
        .lines()
        .map(str::to_string)
        .collect()
}

fn read_all(root: &Path, files: &[(String, Vec<u8>)]) -> Result<(), String> {
    for (p, want) in files {
        let got = std::fs::read(root.join(p)).map_err(|e| format!("{p}: {e}"))?;
        if &got != want {
            return Err(format!("{p}: bytes differ ({} read)", got.len()));
        }
    }
    Ok(())
}

#[test]
fn pulls_stay_within_the_budget_lru_first_and_a_mount_is_never_touched() {
    let reg = Registry::start();
    let bux = Bux::new();
    let images: Vec<(String, Files)> = (0..8)
        .map(|i| push_image(&reg, &format!("b/img{i}"), i, 1 << 20))
        .collect();
    // The budget holds image 0 (with the shared layer) and three and a half images more, from
    // what the store counts for them (what a layer costs moves with the store's formats).
    let budget = {
        let scratch = Bux::new();
        scratch.ok(&["pull", "-q", &images[0].0]);
        let first = counted(&scratch);
        scratch.ok(&["pull", "-q", &images[1].0]);
        let each = counted(&scratch) - first;
        eprintln!("image 0 and the shared layer: {first} bytes; each image more: {each}");
        first + each * 7 / 2
    };
    let budget_arg = budget.to_string();
    // Image 0, mounted before anything else: the least recently pulled, and never evicted.
    bux.ok(&["pull", "-q", &images[0].0]);
    let m = bux.mount(&images[0].0);
    read_all(&m.path, &images[0].1).unwrap();
    let mut evicted_any = false;
    for i in 1..8 {
        if i == 5 {
            // A mount is a use: image 2 becomes the most recently used but for image 4.
            let m2 = bux.mount(&images[2].0);
            read_all(&m2.path, &images[2].1).unwrap();
            drop(m2);
        }
        let out = bux.run(&["pull", "--max-store-size", &budget_arg, &images[i].0]);
        assert_success(&out);
        let said = String::from_utf8_lossy(&out.stderr);
        evicted_any |= said.contains("store budget");
        let (c, d, whole) = (
            counted(&bux),
            du(bux.store.path()),
            du_whole(bux.store.path()),
        );
        eprintln!("after pull {i}: counted {c}, du {d}, du -sx {whole}; {said}");
        assert_eq!(c, d, "the budget counts what is on disk");
        assert!(c <= budget, "after pull {i}: {c} counted > budget {budget}");
        // Directories, locks, records and logs on top: within 1% of the budget, plus what
        // an empty store takes.
        assert!(
            whole <= budget + budget / 100 + 256 * 1024,
            "after pull {i}: du -sx {whole} > budget {budget}"
        );
        let have = stored(&bux);
        assert!(
            have.contains(&images[0].0),
            "the mounted image was evicted: {have:?}"
        );
        assert!(
            have.contains(&images[i].0),
            "the image just pulled went: {have:?}"
        );
        assert!(
            have.contains(&images[i - 1].0),
            "the previous pull went first: {have:?}"
        );
        if i == 5 || i == 6 {
            // Without that mount, image 2 would have gone before images 3 and 4.
            assert!(
                have.contains(&images[2].0),
                "the recently mounted image went: {have:?}"
            );
        }
        // Least recently used first: what is kept is the mounted image and the latest uses.
        let order: Vec<usize> = match i {
            ..5 => (1..=i).rev().collect(),
            _ => (5..=i)
                .rev()
                .chain([2])
                .chain((1..5).rev().filter(|&k| k != 2))
                .collect(),
        };
        let kept: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&k| have.contains(&images[k].0))
            .collect();
        assert_eq!(
            kept,
            order[..kept.len()],
            "not LRU: kept {kept:?}, use order {order:?}"
        );
    }
    assert!(evicted_any, "nothing was ever evicted");
    assert!(stored(&bux).len() < 8);
    // Every file of the mounted image, byte for byte, after all that eviction.
    read_all(&m.path, &images[0].1).unwrap();
    // The budget cannot be met without the mount: one line says so, and keeps it.
    let out = bux.run(&["gc", "--max-size", "1M"]);
    assert_success(&out);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.lines()
            .filter(|l| l.contains("over its budget"))
            .count()
            == 1
            && said.contains("held by live mounts")
            && said.contains(&images[0].0),
        "{said}"
    );
    assert_eq!(stored(&bux), vec![images[0].0.clone()]);
    read_all(&m.path, &images[0].1).unwrap();
    bux.ok(&["check"]);
    drop(m);
}

#[test]
fn budget_settings_sizes_df_and_dry_run() {
    let reg = Registry::start();
    let bux = Bux::new();
    let a = push_image(&reg, "s/a", 1, 600_000).0;
    let b = push_image(&reg, "s/b", 2, 600_000).0;
    bux.ok(&["pull", "-q", &a]);
    bux.ok(&["pull", "-q", &b]);
    assert!(bux.ok(&["config"]).contains("max-store-size  none"));
    let err = bux.fails(&["config", "max-store-size", "12X"]);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("bad size '12X'"), "{err}");
    let err = bux.fails(&["pull", "--max-store-size", "lots", &a]);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let mut cmd = bux.cmd();
    let out = cmd
        .env("BUX_FUSE_MAX_STORE_SIZE", "1.5x")
        .args(["pull", &a])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BUX_FUSE_MAX_STORE_SIZE"));
    // Images show when they were last used.
    let table = bux.ok(&["images"]);
    assert!(
        table.contains("LAST USED") && table.contains("s ago"),
        "{table}"
    );
    // df names the budget and what goes next: the least recently used.
    let all = counted(&bux);
    let df_text = bux.ok(&["df"]);
    assert!(
        df_text.contains("budget") && df_text.contains("none"),
        "{df_text}"
    );
    assert!(
        df_text
            .lines()
            .any(|l| l.starts_with("next") && l.contains(&a)),
        "{df_text}"
    );
    // dry run: lists, removes nothing.
    let dry = bux.ok(&["gc", "--dry-run", "--max-size", &format!("{}", all - 1)]);
    assert!(
        dry.contains(&format!("would remove image {a}")) && !dry.contains(&b),
        "{dry}"
    );
    assert_eq!(stored(&bux).len(), 2);
    assert_eq!(counted(&bux), all);
    // A setting kept in the store; honoured by gc and by the next pull.
    bux.ok(&["config", "max-store-size", &format!("{}", all - 1)]);
    assert!(bux
        .ok(&["config"])
        .contains(&format!("({} bytes)", all - 1)));
    assert_eq!(
        stored(&bux),
        vec![b.clone()],
        "setting the budget applies it"
    );
    bux.ok(&["pull", "-q", &a]);
    assert_eq!(
        stored(&bux),
        vec![a.clone()],
        "the pull honoured the setting"
    );
    assert!(df(&bux)["budget"]["max_store_size"].as_u64() == Some(all - 1));
    bux.ok(&["config", "max-store-size", "none"]);
    bux.ok(&["pull", "-q", &b]);
    assert_eq!(stored(&bux).len(), 2, "unset: nothing evicted");
    // mount keeps the budget too, once its mount is live: what it mounts stays.
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    let out = bux.run(&["mount", "--max-store-size", "1", &a, mnt.to_str().unwrap()]);
    assert_success(&out);
    let m = MountGuard::adopt(mnt, dir);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("over its budget") && said.contains(&a),
        "{said}"
    );
    assert_eq!(stored(&bux), vec![a.clone()]);
    assert_eq!(
        std::fs::read(m.path.join("srv/1/small.txt")).unwrap(),
        b"image 1\n"
    );
    drop(m);
    bux.ok(&["pull", "-q", &b]);
    // The environment wins over the setting.
    bux.ok(&["config", "max-store-size", "1T"]);
    let out = bux
        .cmd()
        .env("BUX_FUSE_MAX_STORE_SIZE", "1")
        .args(["gc"])
        .output()
        .unwrap();
    assert_success(&out);
    assert!(stored(&bux).is_empty());
}

#[test]
fn a_hundred_mounts_read_while_pulls_force_eviction() {
    let reg = Registry::start();
    let bux = Bux::new();
    let (mounted, files) = push_image(&reg, "m/served", 50, 400_000);
    let churn: Vec<String> = (0..4)
        .map(|i| push_image(&reg, &format!("m/churn{i}"), 60 + i, 500_000).0)
        .collect();
    bux.ok(&["pull", "-q", &mounted]);
    let dir = tempfile::tempdir().unwrap();
    let n = 100;
    let t = Instant::now();
    let mut guards = Vec::new();
    for i in 0..n {
        let mnt = dir.path().join(format!("m{i}"));
        bux.ok(&["mount", "-q", &mounted, mnt.to_str().unwrap()]);
        guards.push(MountGuard::adopt(mnt, tempfile::tempdir().unwrap()));
    }
    eprintln!("{n} mounts in {:?}", t.elapsed());
    let paths: Vec<PathBuf> = guards.iter().map(|g| g.path.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let files = Arc::new(files);
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (stop, reads, errors) = (stop.clone(), reads.clone(), errors.clone());
            let (paths, files) = (paths.clone(), files.clone());
            std::thread::spawn(move || {
                let mut k = r;
                let mut first_error = None;
                while !stop.load(Ordering::Relaxed) {
                    let root = &paths[k % paths.len()];
                    for (p, want) in files.iter() {
                        let got = std::fs::File::open(root.join(p)).and_then(|mut f| {
                            let mut v = Vec::new();
                            f.read_to_end(&mut v).map(|_| v)
                        });
                        match got {
                            Ok(v) if &v == want => {}
                            other => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                first_error.get_or_insert(format!(
                                    "{}: {:?}",
                                    root.join(p).display(),
                                    other.map(|v| v.len())
                                ));
                            }
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    k += 2;
                    // Room for the pulls on a small machine: a pass over the files, then a breath.
                    std::thread::sleep(Duration::from_millis(1));
                }
                first_error
            })
        })
        .collect();
    // Another process pulls images that force eviction, over and over.
    let budget = counted(&bux) + 900_000;
    let mut evictions = 0;
    let t = Instant::now();
    for round in 0..12 {
        let r = &churn[round % churn.len()];
        let out = bux.run(&["pull", "--max-store-size", &budget.to_string(), r]);
        assert_success(&out);
        let said = String::from_utf8_lossy(&out.stderr);
        evictions += said.matches("store budget").count();
        assert!(
            counted(&bux) <= budget || said.contains("over its budget"),
            "{said}"
        );
    }
    // And a gc that takes everything it may, while the readers go on.
    assert_success(&bux.run(&["gc", "--max-size", "0"]));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let first_errors: Vec<String> = readers
        .into_iter()
        .filter_map(|h| h.join().unwrap())
        .collect();
    let (reads, errors) = (
        reads.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    eprintln!(
        "{reads} reads, {errors} errors or mismatches, {evictions} evicting pulls in {:?}",
        t.elapsed()
    );
    assert_eq!(errors, 0, "read errors or mismatches: {first_errors:?}");
    assert!(evictions >= 10, "only {evictions} pulls evicted");
    assert!(reads > 1000, "only {reads} reads");
    assert_eq!(stored(&bux), vec![mounted.clone()]);
    for p in paths.iter().step_by(10) {
        read_all(p, &files).unwrap();
    }
    bux.ok(&["check"]);
    drop(guards);
}

#[test]
fn a_gc_killed_mid_eviction_leaves_a_whole_store_and_the_next_gc_finishes() {
    let reg = Registry::start();
    let bux = Bux::new();
    let images: Vec<(String, Files)> = (0..4)
        .map(|i| push_image(&reg, &format!("k/img{i}"), 10 + i, 300_000))
        .collect();
    for (r, _) in &images {
        bux.ok(&["pull", "-q", r]);
    }
    let total = counted(&bux);
    // 60% of the store: two images go, two stay (whose files must all survive).
    let budget = total * 6 / 10;
    let half = budget.to_string();
    // Killed at several points: right after the records went, then among their files.
    for pause in [1, 2, 4, 6] {
        let mut child = bux
            .cmd()
            .env("BUX_FUSE_TEST_GC_PAUSE", pause.to_string())
            .args(["gc", "--max-size", &half])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let paused = lines.any(|l| l.is_ok_and(|l| l.contains("gc paused")));
        assert!(paused, "the gc ended before pausing");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let killed_at = counted(&bux);
        let out = bux.run(&["check"]);
        assert_success(&out);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(": 0 problems"), "{said}");
        let have = stored(&bux);
        eprintln!(
            "killed after {pause} removals: {} images left, {killed_at} of {total} counted",
            have.len(),
        );
        assert_eq!(have.len(), 2, "the records go first, all at once: {have:?}");
        // Each image still listed mounts and reads whole, then and after the next gc.
        let read_stored = || {
            for (r, files) in images.iter().filter(|(r, _)| have.contains(r)) {
                let m = bux.mount_with(r, &["--pull", "never"]);
                read_all(&m.path, files).unwrap();
            }
        };
        read_stored();
        let out = bux.ok(&["gc", "--max-size", &half]);
        assert!(out.contains("removed"), "{out}");
        assert_eq!(stored(&bux), have, "the next gc finished what was started");
        let finished = counted(&bux);
        assert!(finished <= budget, "the next gc finished");
        assert!(
            finished < killed_at,
            "the kill left nothing for the next gc to do"
        );
        bux.ok(&["check"]);
        read_stored();
        // Pull what went back, for the next kill.
        for (r, _) in &images {
            bux.ok(&["pull", "-q", r]);
        }
        assert!(counted(&bux) >= total - 64 * 1024);
    }
}

/// The fetched chunks of a lazily mounted layer go once no mount uses it, and come back.
#[test]
fn lazy_chunks_no_mount_uses_are_dropped_and_fetched_again() {
    let reg = Registry::start();
    let big = random_bytes(6 << 20, 77);
    let l1 = LayerBuilder::new()
        .file("etc/os-release", b"ID=lazy-budget\n")
        .file("data/big.bin", &big)
        .finish();
    let l2 = LayerBuilder::new()
        .file("data/other.bin", &random_bytes(2 << 20, 78))
        .finish();
    let layout = tempfile::tempdir().unwrap();
    write_layout(
        layout.path(),
        "v1",
        &Image::new(vec![(l1, Comp::Gzip), (l2, Comp::Gzip)]),
    );
    reg.push(layout.path(), "v1", "lz/app", None);
    let r = format!("{}/lz/app:v1", reg.host());
    let publisher = Bux::new();
    publisher.ok(&["pull", "-q", &r]);
    publisher.ok(&["push-index", &r]);

    let bux = Bux::new();
    let store = bux.store.path().to_path_buf();
    let partials = || -> BTreeMap<PathBuf, u64> {
        std::fs::read_dir(store.join("layers/sha256"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .map(|e| (e.path(), e.metadata().unwrap().blocks() * 512))
            .collect()
    };
    let read_part = |root: &Path| {
        let mut f = std::fs::File::open(root.join("data/big.bin")).unwrap();
        let mut head = vec![0u8; 1 << 20];
        f.read_exact(&mut head).unwrap();
        assert!(head == big[..1 << 20], "first MiB differs");
    };
    let lazy_mount = || {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("root");
        bux.ok(&[
            "mount",
            "-q",
            "--lazy",
            "--prefetch",
            "none",
            &r,
            mnt.to_str().unwrap(),
        ]);
        MountGuard::adopt(mnt, dir)
    };
    let m = lazy_mount();
    read_part(&m.path);
    let fetched: u64 = partials().values().sum();
    assert!((1 << 20..6 << 20).contains(&fetched), "fetched {fetched}");
    // Mounted: nothing of it goes, and gc says why.
    let out = bux.run(&["gc", "--max-size", "0"]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("held by live mounts"));
    assert_eq!(
        partials().values().sum::<u64>(),
        fetched,
        "chunks of a live mount dropped"
    );
    read_part(&m.path);
    drop(m);
    // Unmounted: a budget that dropping the chunks meets drops them, and keeps the image.
    // (The unmount saved the mount's read trace: counted again.)
    let before = counted(&bux);
    let budget = before - fetched / 2;
    let dry = bux.ok(&["gc", "--dry-run", "--max-size", &budget.to_string()]);
    assert!(
        dry.contains(&format!("would drop the fetched chunks of {r}")),
        "{dry}"
    );
    let out = bux.ok(&["gc", "--max-size", &budget.to_string()]);
    assert!(
        out.contains(&format!("dropped the fetched chunks of {r}")),
        "{out}"
    );
    let after = counted(&bux);
    assert!(
        after <= budget && before - after >= fetched,
        "{before} -> {after}"
    );
    assert_eq!(partials().values().sum::<u64>(), 0, "holes punched");
    for p in partials().keys() {
        let marks = std::fs::read(p.with_extension("present")).unwrap();
        assert!(
            marks.iter().all(|&b| b == 0),
            "present marks left on {}",
            p.display()
        );
    }
    assert_eq!(stored(&bux), vec![r.clone()]);
    bux.ok(&["check"]);
    // Mounted again: the bytes come back from the registry, right.
    let m = lazy_mount();
    read_part(&m.path);
    assert_eq!(std::fs::read(m.path.join("data/big.bin")).unwrap(), big);
    assert!(counted(&bux) >= after + (6 << 20), "not fetched again");
    drop(m);
    bux.ok(&["check"]);
}

/// The library keeps the store's budget setting after each pull by itself (a runtime that
/// embeds it need not call anything), and `Budget::Max` / `Budget::Unlimited` override it.
#[test]
fn library_pulls_keep_the_stores_setting() {
    let reg = Registry::start();
    let images: Vec<String> = (0..3)
        .map(|i| push_image(&reg, &format!("lib/b{i}"), 40 + i, 1_000_000).0)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let store = bux_fuse::Store::open(dir.path()).unwrap();
    store.set_max_store_size(Some(1_800_000)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stored = || -> Vec<String> {
        store
            .images()
            .unwrap()
            .into_iter()
            .map(|i| i.reference)
            .collect()
    };
    for r in &images {
        rt.block_on(store.pull(r, &bux_fuse::PullOptions::default()))
            .unwrap();
        assert!(
            store.counted_bytes().unwrap() <= 1_800_000,
            "{:?}",
            stored()
        );
    }
    assert_eq!(
        stored(),
        vec![images[2].clone()],
        "least recently used went first"
    );
    // Unlimited: the caller keeps the budget; nothing goes.
    let unlimited = bux_fuse::PullOptions {
        budget: bux_fuse::Budget::Unlimited,
        ..Default::default()
    };
    rt.block_on(store.pull(&images[0], &unlimited)).unwrap();
    assert_eq!(stored().len(), 2);
    assert!(store.counted_bytes().unwrap() > 1_800_000);
}
