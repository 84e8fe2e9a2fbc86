//! The `bux-fuse` command line: one library call per command (`run`), on top of its
//! arguments (`args`), what it prints (`output`), the mount daemon (`daemon`) and the store
//! budget as commands keep it (`budget`).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::registry::manifest::Platform;
use crate::registry::{Credentials, RegistryOptions};
use crate::{mount, Progress, PullOptions, PullPolicy, Store};

mod args;
mod budget;
mod daemon;
mod mount_cmd;
mod output;
pub use args::Cli;
use args::*;
use budget::*;
use daemon::*;
use output::*;

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`bux-fuse images | head`) instead of panicking in println!.
    // SAFETY: resetting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bux-fuse: {}", one_line(&e));
            1
        }
    }
}

fn init_logging(level: &str) {
    use std::io::IsTerminal;
    // fuser warns on every request it does not implement (ioctl, flush): noise per call in a
    // daemon's log, so only its errors are shown unless RUST_LOG asks for more.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},fuser=error")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| CappedStderr)
        .try_init();
}

/// Bytes of log a process writes at most: a daemon's stderr is its log file in the store, which
/// must not grow without bound however long it serves (or however noisy a failure is).
const LOG_CAP: u64 = 16 << 20;
static LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static CAPPED: AtomicBool = AtomicBool::new(false);

/// stderr, up to [`LOG_CAP`] bytes of log, then one line saying so.
struct CappedStderr;

impl std::io::Write for CappedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let before = LOGGED.fetch_add(buf.len() as u64, Ordering::Relaxed);
        if before < LOG_CAP {
            // A log that cannot be written (its disk full) must not fail what is logged:
            // tracing would panic the thread that logs.
            let _ = std::io::stderr().write_all(buf);
        } else if !CAPPED.swap(true, Ordering::Relaxed) {
            let _ = writeln!(std::io::stderr(), "bux-fuse: log capped at {LOG_CAP} bytes");
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The store, if it exists (commands that only look never create one).
fn existing_store(path: &Option<PathBuf>) -> Result<Option<Store>> {
    let p = path.clone().unwrap_or_else(Store::default_path);
    if p.join("blobs").exists() {
        open_store(path).map(Some)
    } else {
        Ok(None)
    }
}

fn open_store(path: &Option<PathBuf>) -> Result<Store> {
    let path = path.clone().unwrap_or_else(Store::default_path);
    Store::open(&path).with_context(|| format!("opening store {}", path.display()))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting async runtime")
}

/// Opens the store and pulls `reference` as `pull` asks, its progress printed and ended (with
/// `--timings`, the moment it was done) before this returns; the store budget is the
/// command's to keep afterwards.
fn pull_for_command(
    store_arg: &Option<PathBuf>,
    reference: &str,
    pull: &PullArgs,
) -> Result<(Store, crate::PulledImage, Option<u64>)> {
    let store = open_store(store_arg)?;
    let opts = pull.options(false)?;
    let budget = budget(&store, pull.max_store_size.as_deref())?;
    let image = runtime()?.block_on(store.pull(reference, &opts))?;
    // The progress bars end (their last line completed) before anything else is printed.
    drop(opts);
    if pull.timings && !pull.quiet {
        eprintln!("{:>8.3} s  pulled", since_start());
    }
    Ok((store, image, budget))
}

fn run(cli: Cli) -> Result<()> {
    let store_arg = cli.store.clone();
    let quiet = cli.quiet;
    match cli.command {
        Cmd::Pull {
            reference,
            mut pull,
        } => {
            pull.quiet = quiet;
            let (store, image, budget) = pull_for_command(&store_arg, &reference, &pull)?;
            if !pull.quiet {
                println!("{} {}", image.reference, image.manifest_digest);
            }
            apply_budget(&store, budget, &[image.reference], pull.quiet)
        }
        Cmd::Export {
            reference,
            file,
            erofs: _,
            mut pull,
        } => {
            pull.quiet = quiet;
            let (store, image, budget) = pull_for_command(&store_arg, &reference, &pull)?;
            let mopts = crate::MountOptions {
                registry: pull.options(false)?.registry,
                ..Default::default()
            };
            let started = std::time::Instant::now();
            let mut shown = std::time::Instant::now();
            let tty = !quiet && std::io::stderr().is_terminal();
            let mut progress = |done: u64, all: u64| {
                if tty && (shown.elapsed().as_millis() >= 250 || done == all) {
                    shown = std::time::Instant::now();
                    eprint!("\rexporting: {} of {} MiB ", done >> 20, all >> 20);
                    if done == all {
                        eprintln!();
                    }
                }
            };
            let len = crate::disk::export(&store, &image.reference, &file, &mopts, &mut progress)
                .with_context(|| format!("exporting {}", image.reference))?;
            apply_budget(&store, budget, &[], quiet)?;
            if !quiet {
                eprintln!(
                    "{}: EROFS image of {} MiB written to {} in {:.1} s",
                    image.reference,
                    len >> 20,
                    file.display(),
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
        Cmd::Mount(args) => mount_cmd::run(&store_arg, quiet, args),
        Cmd::PushIndex {
            reference,
            tag,
            username,
            password_stdin,
            insecure_registry,
        } => {
            let store = open_store(&store_arg)?;
            let opts = crate::publish::PushIndexOptions {
                registry: RegistryOptions {
                    credentials: credentials(username.as_deref(), password_stdin)?,
                    insecure: insecure_registry,
                    ..Default::default()
                },
                tag,
            };
            let pushed = runtime()?.block_on(store.push_index(&reference, &opts))?;
            for (layer, why) in &pushed.skipped {
                eprintln!("layer {}: not indexed: {why}", layer.short());
            }
            println!(
                "{}@{} (index {}, {} indexed)",
                pushed.reference,
                pushed.manifest_digest,
                pushed.index_digest,
                plural(pushed.layers as u64, "layer")
            );
            Ok(())
        }
        Cmd::ServeShared {
            manifest,
            worker_fd,
            resume,
            disk,
        } => {
            let store = open_store(&store_arg)?;
            let manifest: crate::Digest = manifest
                .parse()
                .map_err(|e| anyhow::anyhow!("bad manifest digest: {e:?}"))?;
            match worker_fd {
                Some(fd) => crate::mount::shared::serve_worker(&store, manifest, fd, resume, disk)
                    .context("image server worker"),
                None => {
                    stop_on_signals();
                    crate::mount::shared::supervise(&store, manifest, &STOP, disk)
                        .context("image server")
                }
            }
        }
        Cmd::ServeMount {
            manifest,
            worker_fd,
            resume,
            upper,
            disk,
            run_dir,
            allow_other,
            threads,
            cache_bytes,
        } => {
            let store = open_store(&store_arg)?;
            let what = match (&upper, disk) {
                (Some(u), _) => crate::mount::shared::KeptKind::Writable(u),
                (None, true) => crate::mount::shared::KeptKind::Disk,
                (None, false) => crate::mount::shared::KeptKind::Image,
            };
            let worker = crate::mount::shared::Worker {
                fd: worker_fd,
                resume,
                what,
                run_dir: &run_dir,
                allow_other,
                threads,
                cache_bytes,
            };
            crate::mount::shared::serve_mount_worker(&store, &worker)
                .with_context(|| format!("mount worker of image {manifest}"))
        }
        Cmd::Info { reference } => {
            let store = store_arg.clone().unwrap_or_else(Store::default_path);
            println!("store: {}", store.display());
            let policy = std::env::var_os("BUX_FUSE_SIGNATURE_POLICY")
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from)
                .or_else(crate::policy::default_path);
            match policy {
                Some(path) => {
                    println!("signature policy: {}", path.display());
                    if let Some(r) = &reference {
                        let policy = crate::policy::Policy::from_file(&path)?;
                        let name = crate::pull::normalize_reference(r)?;
                        println!("  {name}: {}", policy.describe_scope(&name));
                    }
                }
                None => println!("signature policy: none (every image accepted)"),
            }
            let Some(conf) = crate::registry::conf::global()? else {
                println!(
                    "registries.conf: none (short names are Docker Hub's: docker.io/library/NAME)"
                );
                return Ok(());
            };
            println!("registries.conf: {}", conf.sources());
            match &conf.search {
                Some(s) => println!("unqualified-search-registries: {}", s.join(", ")),
                None => println!("unqualified-search-registries: none"),
            }
            let mode = conf
                .mode
                .unwrap_or(crate::registry::conf::ShortNameMode::Enforcing);
            println!("short-name-mode: {}", format!("{mode:?}").to_lowercase());
            for r in conf.registries.values() {
                let mut flags = Vec::new();
                if r.blocked {
                    flags.push("blocked".to_string());
                }
                if r.insecure {
                    flags.push("insecure".to_string());
                }
                for m in &r.mirrors {
                    let how = match m.pull_from {
                        crate::registry::conf::PullFromMirror::All => "",
                        crate::registry::conf::PullFromMirror::DigestOnly => ", digest-only",
                        crate::registry::conf::PullFromMirror::TagOnly => ", tag-only",
                    };
                    let plain = if m.insecure { ", insecure" } else { "" };
                    flags.push(format!("mirror {}{how}{plain}", m.location));
                }
                let location = if r.location.is_empty() || r.location == r.prefix {
                    String::new()
                } else {
                    format!(" -> {}", r.location)
                };
                println!(
                    "registry {}{location}{}{}",
                    r.prefix,
                    if flags.is_empty() { "" } else { ": " },
                    flags.join("; ")
                );
            }
            println!("aliases: {}", conf.aliases.len());
            if let Some(r) = &reference {
                let name = crate::pull::normalize_reference(r)?;
                let by_digest = name.contains('@');
                let ends = conf.endpoints(&name, by_digest)?;
                let mut via: Vec<String> = ends.mirrors.iter().map(|(m, _)| m.clone()).collect();
                via.push(ends.primary.clone());
                println!("  {name}: pulled from {}", via.join(", then "));
            }
            Ok(())
        }
        Cmd::Mounts { json } => {
            let mounts = match existing_store(&store_arg)? {
                Some(s) => s.mounts()?,
                None => Vec::new(),
            };
            let state = |m: &crate::mount::StoreMount| match m.state {
                crate::mount::MountState::Live => "live",
                crate::mount::MountState::Dead => "dead",
                crate::mount::MountState::Unresponsive => "stuck",
            };
            if json {
                let list: Vec<serde_json::Value> = mounts
                    .iter()
                    .map(|m| {
                        let mut v = serde_json::to_value(&m.record).unwrap_or_default();
                        v["state"] = state(m).into();
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let width = mounts
                .iter()
                .map(|m| m.record.reference.len())
                .max()
                .unwrap_or(0)
                .max("IMAGE".len());
            println!(
                "{:5}  {:>8}  {:16}  {:8}  {:width$}  PATH",
                "STATE", "PID", "PROGRAM", "MODE", "IMAGE"
            );
            for m in &mounts {
                let r = &m.record;
                println!(
                    "{:5}  {:>8}  {:16}  {:8}  {:width$}  {}",
                    state(m),
                    r.pid,
                    r.program,
                    if r.writable { "writable" } else { "ro" },
                    r.reference,
                    r.path.display()
                );
            }
            Ok(())
        }
        Cmd::Umount { dir } => {
            // What the mount table says is there: only bux-fuse's own mounts are unmounted.
            let dir = crate::mount::mount_path(&dir);
            if let Some(fstype) = crate::mount::foreign_mount(&dir) {
                bail!(
                    "{} is not a bux-fuse mount (it is {fstype}); not unmounting",
                    dir.display()
                );
            }
            // (A store that cannot be opened does not keep the mount: its error comes after.)
            let store = existing_store(&store_arg);
            // (Root's waits in `unmount_all`, for the server its mount stood on.)
            let servers = match &store {
                Ok(Some(store)) if !crate::mount::host_root() => {
                    crate::mount::shared::read_through_servers(store)
                }
                _ => Vec::new(),
            };
            crate::mount::unmount_all(&dir)
                .with_context(|| format!("unmounting {}", dir.display()))?;
            if let Some(store) = store? {
                let run = store.root().join("run");
                crate::mount::wait_for_cleanup(&run, &dir, std::time::Duration::from_secs(5));
                let wait = std::time::Duration::from_secs(5);
                crate::mount::shared::wait_for_unused_servers(&servers, wait);
            }
            Ok(())
        }
        Cmd::Images { json } => {
            // Listing never creates a store.
            let store = existing_store(&store_arg)?;
            let images = match &store {
                Some(s) => s.images()?,
                None => Vec::new(),
            };
            if json {
                let mut v = serde_json::to_value(&images)?;
                for (j, i) in v.as_array_mut().into_iter().flatten().zip(&images) {
                    j["last_used"] = store.as_ref().map_or(0, |s| s.last_used(i)).into();
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if quiet {
                for i in images {
                    println!("{}", i.reference);
                }
                return Ok(());
            }
            let width = images
                .iter()
                .map(|i| i.reference.len())
                .max()
                .unwrap_or(0)
                .max("REFERENCE".len());
            println!(
                "{:width$}  {:12}  {:>6}  {:>10}  {:>6}  {:>9}  PLATFORM",
                "REFERENCE", "MANIFEST", "LAYERS", "SIZE", "LOCAL", "LAST USED"
            );
            for i in images {
                let size: u64 = i.layers.iter().map(|l| l.size).sum();
                let local = store.as_ref().map_or(0, |s| s.local_bytes(&i));
                let used = store.as_ref().map_or(0, |s| s.last_used(&i));
                println!(
                    "{:width$}  {:12}  {:>6}  {:>10}  {:>5}%  {:>9}  {}",
                    i.reference,
                    i.manifest_digest.short(),
                    i.layers.len(),
                    human(size),
                    (local * 100).checked_div(size).unwrap_or(100),
                    ago(used),
                    i.platform
                );
            }
            Ok(())
        }
        Cmd::Rm { reference, force } => {
            let store = open_store(&store_arg)?;
            if !store.remove(&reference, force)? {
                bail!("{reference}: no such image in the store");
            }
            Ok(())
        }
        Cmd::Inspect { reference, json } => {
            let Some(store) = existing_store(&store_arg)? else {
                bail!(
                    "{reference}: not in the local store (there is no store yet); pull it first: \
                     bux-fuse pull {reference}"
                );
            };
            let config = match store.config(&reference) {
                Err(e @ crate::Error::NotFound { .. }) => {
                    bail!("{e}; pull it first: bux-fuse pull {reference}")
                }
                r => r?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&config)?);
                return Ok(());
            }
            let c = &config.config;
            let list = |v: &Option<Vec<String>>| {
                v.as_ref()
                    .map(|v| serde_json::to_string(v).unwrap_or_default())
                    .unwrap_or_else(|| "-".into())
            };
            println!("Platform:    {}/{}", config.os, config.architecture);
            println!("Entrypoint:  {}", list(&c.entrypoint));
            println!("Cmd:         {}", list(&c.cmd));
            println!("WorkingDir:  {}", c.working_dir.as_deref().unwrap_or("-"));
            println!("User:        {}", c.user.as_deref().unwrap_or("-"));
            println!("Env:");
            for e in c.env.iter().flatten() {
                println!("  {e}");
            }
            Ok(())
        }
        Cmd::Df { json } => {
            let store = existing_store(&store_arg)?;
            let u = match &store {
                Some(s) => s.usage()?,
                None => Default::default(),
            };
            let (max, source) = match (
                crate::store::budget_from_env().map_err(anyhow::Error::msg)?,
                &store,
            ) {
                (Some(b), _) => (Some(b), format!("${}", crate::store::BUDGET_ENV)),
                (None, Some(s)) => (s.settings()?.max_store_size, "store setting".into()),
                (None, None) => (None, String::new()),
            };
            let plan = match &store {
                Some(s) => Some(s.budget_plan(max.unwrap_or(u64::MAX), &[])?),
                None => None,
            };
            if json {
                let mut v = serde_json::to_value(&u)?;
                v["budget"] = serde_json::json!({
                    "max_store_size": max,
                    "counted": plan.as_ref().map_or(0, |p| p.total),
                    "plan": plan,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("{:10}  {:>10}", "KIND", "SIZE");
            let kinds = [
                ("blobs", u.blobs),
                ("indexes", u.indexes),
                ("seekable", u.seekable),
                ("small", u.small_files),
                ("trees", u.trees),
                ("metadata", u.metadata_images),
                ("temp", u.temp),
            ];
            for (k, v) in kinds {
                println!("{k:10}  {:>10}", human(v));
            }
            if u.lazy.1 > 0 {
                println!(
                    "{:10}  {:>10}  of {} (lazily mounted layers fetched so far)",
                    "lazy",
                    human(u.lazy.0),
                    human(u.lazy.1)
                );
            }
            let total = kinds.iter().map(|(_, v)| v).sum::<u64>() + u.lazy.0;
            println!("{:10}  {:>10}", "total", human(total));
            // Part of the kinds above, not one more: the layers (blobs and their indexes)
            // that more than one image uses.
            if u.shared > 0 {
                println!(
                    "{:10}  {:>10}  of which shared by several images",
                    "",
                    human(u.shared)
                );
            }
            if let Some(plan) = &plan {
                // What the budget counts: allocated bytes (sparse files as fetched), each
                // file once.
                println!(
                    "{:10}  {:>10}  counted against the budget (allocated bytes)",
                    "counted",
                    human(plan.total)
                );
                match max {
                    Some(m) => println!("{:10}  {:>10}  ({source})", "budget", human(m)),
                    None => println!("{:10}  {:>10}", "budget", "none"),
                }
                let next = plan.steps.first().or(plan.next.as_ref());
                if let Some(s) = next {
                    println!(
                        "{:10}  {:>10}  {} {} (last used {})",
                        "next",
                        human(s.bytes),
                        match s.action {
                            crate::store::BudgetAction::Remove => "remove",
                            crate::store::BudgetAction::DropChunks => "drop the fetched chunks of",
                        },
                        s.reference,
                        ago(s.last_used)
                    );
                }
            }
            let width = u
                .images
                .iter()
                .map(|i| i.reference.len())
                .max()
                .unwrap_or(0)
                .max(9);
            println!("\n{:width$}  {:>10}  {:>10}", "REFERENCE", "SIZE", "UNIQUE");
            for i in &u.images {
                println!(
                    "{:width$}  {:>10}  {:>10}",
                    i.reference,
                    human(i.size),
                    human(i.unique)
                );
            }
            Ok(())
        }
        Cmd::Login {
            registry,
            username,
            password_stdin,
            insecure_registry,
        } => {
            let password = read_password(password_stdin)?;
            let opts = RegistryOptions {
                credentials: Credentials::Basic {
                    username: username.clone(),
                    password: password.clone(),
                },
                insecure: if insecure_registry {
                    vec![registry.clone()]
                } else {
                    vec![]
                },
                ..Default::default()
            };
            runtime()?.block_on(crate::registry::verify_login(&registry, &opts))?;
            let path = crate::registry::save_docker_login(&registry, &username, &password)?;
            println!("Login Succeeded (credentials stored in {})", path.display());
            Ok(())
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "bux-fuse",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory;
            let Some(dir) = dir else {
                return clap_mangen::Man::new(Cli::command())
                    .render(&mut std::io::stdout())
                    .context("writing the man page");
            };
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            if !quiet {
                println!("man pages written to {}", dir.display());
            }
            Ok(())
        }
        Cmd::Check { repair } => {
            let store = open_store(&store_arg)?;
            let report = store.check(repair)?;
            for p in &report.problems {
                println!("{p}");
            }
            println!(
                "checked {}: {}{}",
                plural(report.checked, "file"),
                plural(report.problems.len() as u64, "problem"),
                if repair && !report.problems.is_empty() {
                    " (removed)"
                } else {
                    ""
                }
            );
            if !report.problems.is_empty() && !repair {
                bail!("the store has damaged files (bux-fuse check --repair removes them)");
            }
            Ok(())
        }
        Cmd::Config { key, value } => {
            if let (None, None) = (&value, existing_store(&store_arg)?) {
                // Looking never creates a store.
                println!("max-store-size  none");
                return Ok(());
            }
            let store = open_store(&store_arg)?;
            if let Some(k) = key.as_deref().filter(|k| *k != "max-store-size") {
                bail!("unknown setting '{k}' (settings: max-store-size)");
            }
            match value {
                None => {
                    let show = store
                        .settings()?
                        .max_store_size
                        .map_or("none".to_string(), |b| format!("{} ({b} bytes)", human(b)));
                    println!("max-store-size  {show}");
                    if let Ok(v) = std::env::var(crate::store::BUDGET_ENV) {
                        println!("  (${}={v} overrides it)", crate::store::BUDGET_ENV);
                    }
                }
                Some(v) => {
                    let max = match v.trim() {
                        "none" | "unset" | "off" | "" => None,
                        s => Some(crate::store::parse_size(s).map_err(anyhow::Error::msg)?),
                    };
                    store.set_max_store_size(max)?;
                    if let Some(max) = max {
                        let r = store.enforce_budget(max, &[])?;
                        report_budget(&r, quiet);
                    }
                }
            }
            Ok(())
        }
        Cmd::Gc { max_size, dry_run } => {
            let store = open_store(&store_arg)?;
            let budget = match max_size {
                Some(s) => Some(
                    crate::store::parse_size(&s).map_err(|e| anyhow::anyhow!("--max-size: {e}"))?,
                ),
                None => match crate::store::budget_from_env().map_err(anyhow::Error::msg)? {
                    Some(b) => Some(b),
                    None => store.settings()?.max_store_size,
                },
            };
            if dry_run {
                return gc_dry_run(&store, budget);
            }
            let (files, bytes) = match budget {
                Some(max) => {
                    let r = store.enforce_budget(max, &[])?;
                    for i in &r.removed {
                        println!("removed image {i}");
                    }
                    for i in &r.dropped {
                        println!("dropped the fetched chunks of {i}");
                    }
                    report_over(&r);
                    (r.files, r.before.saturating_sub(r.after))
                }
                None => store.gc()?,
            };
            let runs = crate::mount::clean_run_dir(&store.root().join("run"))
                + crate::mount::clean_scratch(&store.root().join("scratch"));
            let places = crate::mount::shared::remove_idle_places(&store);
            println!("removed {}, freed {}", plural(files, "file"), human(bytes));
            if places > 0 {
                println!(
                    "removed the state of {} that {}",
                    plural(places as u64, "image server"),
                    if places == 1 { "has left" } else { "have left" }
                );
            }
            if runs > 0 {
                println!(
                    "cleaned {} whose daemon died",
                    plural(runs as u64, "writable mount")
                );
            }
            Ok(())
        }
    }
}
