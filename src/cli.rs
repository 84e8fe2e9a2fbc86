//! The `bux-fuse` command line: argument parsing and one library call per command.

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

/// Mount OCI container images as root filesystems, without extracting them: read-only, or
/// writable with --writable (changes go to an upper layer; the image is never modified).
///
/// Layers are pulled once into a content-addressed store, indexed (a per-file offset table plus
/// random-access checkpoints into the compressed stream) and merged with OCI whiteouts; a mount
/// then serves the merged tree through FUSE, decompressing only the spans that reads touch. The
/// mount point is a root filesystem for `krun_set_root`, `chroot` or virtiofsd.
#[derive(Parser, Debug)]
#[command(name = "bux-fuse", version, max_term_width = 100)]
pub struct Cli {
    /// Store directory (blobs, indexes, merged trees, image records).
    #[arg(long, global = true, env = "BUX_FUSE_HOME", value_name = "DIR")]
    store: Option<PathBuf>,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    log_level: String,

    /// Print nothing but errors (before or after the subcommand); `images -q` prints only
    /// the references.
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Fetch an image into the store and index it (nothing is extracted).
    Pull {
        /// Image reference, e.g. 127.0.0.1:5000/library/debian:bookworm or name@sha256:...
        reference: String,
        #[command(flatten)]
        pull: PullArgs,
    },
    /// Mount an image at DIR, read-only or with --writable (pulling it first if missing).
    ///
    /// Returns once the mount is live; a background process serves it until `bux-fuse umount
    /// DIR`. With --foreground it stays attached and unmounts on Ctrl-C or SIGTERM.
    ///
    /// By default the mount is read-only: writes fail with EROFS. With --writable, changes go to
    /// an upper layer (an overlay on the image, copy-up on first write; the image is never
    /// modified) kept in a scratch directory removed at unmount, or in --upper DIR to keep them
    /// for a later mount. Device nodes and setuid binaries work, as a root filesystem needs.
    ///
    /// Works as an ordinary user too (through fusermount3): the image's owners and modes are
    /// served as they are for the guest to enforce, and a writable mount keeps chown, setuid
    /// bits and special files as metadata in the upper layer (see README, "rootless").
    Mount {
        /// Image reference.
        reference: String,
        /// Mount point (created if missing).
        dir: PathBuf,
        /// Stay in the foreground; unmount on SIGINT/SIGTERM.
        #[arg(short, long)]
        foreground: bool,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Memory for decompressed spans, in MiB.
        #[arg(long, default_value_t = 16, value_name = "MIB")]
        cache_mb: usize,
        /// Make the root writable (changes kept in a scratch upper layer, see --upper).
        #[arg(short, long)]
        writable: bool,
        /// Keep the writable layer in DIR (implies --writable); remount with it to see changes.
        #[arg(long, value_name = "DIR")]
        upper: Option<PathBuf>,
        /// Let other users reach the mount. Root's mounts always do (virtiofsd's sandbox needs
        /// it); a user's need `user_allow_other` in /etc/fuse.conf, and then every user of the
        /// host reads the image's files whatever their modes (the image's owners and modes are
        /// enforced by the kernel only on root's mounts; a guest enforces them itself).
        #[arg(long)]
        allow_other: bool,
        /// Mount before the layers are downloaded: fetch manifest, config and the image's
        /// published index (see push-index), then fetch by HTTP range only what is read.
        /// Without a published index the image is pulled whole, and this says so.
        #[arg(long)]
        lazy: bool,
        /// With --lazy: also use an index found only as a referrer of the image, which the
        /// manifest digest does not cover (anyone who can push to the repository can add one).
        #[arg(long, requires = "lazy")]
        trust_index: bool,
        /// With --lazy: what to fetch besides what is read: `trace` fetches first what the
        /// image's read trace says a boot reads (see --record-trace), `all` does that and then
        /// completes the layers in the background (then they are ordinary stored layers),
        /// `none` fetches only what is read.
        #[arg(long, default_value = "all", value_parser = ["none", "trace", "all"], requires = "lazy")]
        prefetch: String,
        /// Record which parts of the image reads need, in order, saved at unmount; push-index
        /// publishes it and lazy mounts elsewhere fetch those parts first. (A lazy mount of an
        /// image with no trace records one anyway.)
        #[arg(long)]
        record_trace: bool,
        /// With --lazy: seconds a read waits for its bytes before failing with EIO (that read
        /// alone; the next read tries again).
        #[arg(long, default_value_t = 5.0, value_name = "SECS", requires = "lazy")]
        read_timeout: f64,
        /// With --lazy: return only once every layer is local and verified.
        #[arg(long, requires = "lazy")]
        wait_complete: bool,
        /// Serve this mount with a daemon of its own. By default root's mounts of an image
        /// stored whole share one server (one process, one page cache, mounts in
        /// milliseconds): each mount is a bind mount (read-only) or an overlay (writable) over
        /// the image's one FUSE mount, and a server that dies is restarted under them.
        #[arg(long)]
        own_server: bool,
        /// Internal: tell the parent process when the mount is live.
        #[arg(long, hide = true)]
        notify_ready: bool,
        #[command(flatten)]
        pull: PullArgs,
    },
    /// Publish the layer index of a pulled image to its registry, so that `mount --lazy`
    /// elsewhere starts it before its layers are downloaded.
    ///
    /// Pushes one index blob per gzip or plain-tar layer (file table, checkpoints, a sha256 per
    /// compressed chunk), an OCI artifact listing them (also found as a referrer of the image),
    /// and the image's manifest with an annotation naming that artifact, tagged --tag (default:
    /// the image's own tag). That manifest's digest covers the index: a lazy mount of it serves
    /// only bytes its digest vouches for. Layers and config are unchanged, so every runtime runs
    /// the image as before.
    PushIndex {
        /// Image reference (pulled into the store).
        reference: String,
        /// Tag for the indexed image (default: the image's own tag).
        #[arg(long)]
        tag: Option<String>,
        /// User name for the registry (password from --password-stdin or $BUX_FUSE_PASSWORD);
        /// default: the credentials `login` or Docker stored.
        #[arg(long, short = 'u')]
        username: Option<String>,
        /// Read the registry password from standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Speak plain HTTP to this registry (host[:port]); loopback registries always are.
        #[arg(long, value_name = "HOST[:PORT]")]
        insecure_registry: Vec<String>,
    },
    /// Internal: the image server that root's mounts of an image share (started by `mount`).
    #[command(hide = true)]
    ServeShared {
        /// The stored image's view digest (its manifest digest unless layers are lazy).
        manifest: String,
        /// Serve this inherited FUSE connection (the supervisor's worker).
        #[arg(long)]
        worker_fd: Option<i32>,
        /// The connection is live already (a worker restarted after one died).
        #[arg(long, requires = "worker_fd")]
        resume: bool,
    },
    /// Unmount DIR (also clears a mount whose serving process died).
    Umount {
        /// Mount point.
        dir: PathBuf,
    },
    /// Print the configuration in effect: the store, the signature policy file, the
    /// registries.conf files read and what they say (search registries, short-name mode,
    /// registries with their locations and mirrors, aliases).
    Info {
        /// Also say which policy scope and requirements apply to this image, and where its
        /// pulls go.
        reference: Option<String>,
    },
    /// List the mounts this store made that are still mounted: where, of what, by which
    /// process, and whether each still serves (a dead one: `bux-fuse umount` it, or mount
    /// there again).
    Mounts {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List stored images (with -q, only their references, one a line).
    Images {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Forget an image name (its blobs stay until no image uses them; see `gc`).
    ///
    /// A name of an image that has other names too only goes itself (it is untagged), even
    /// while the image is mounted; the last name of a mounted image needs --force.
    Rm {
        /// Image reference.
        reference: String,
        /// Forget it even while mounted (its files stay until the mount ends).
        #[arg(long)]
        force: bool,
    },
    /// Show an image's config: what a VM runtime passes to krun_set_exec.
    Inspect {
        /// Image reference.
        reference: String,
        /// Print the whole config as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete blobs and indexes no stored image refers to; with a budget (--max-size,
    /// $BUX_FUSE_MAX_STORE_SIZE or the store's setting), also least recently used images
    /// until the store is within it.
    Gc {
        /// Keep the store within SIZE this once (20G, 512M, 1.5GiB, bytes).
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
        /// List what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the store's settings, or set one: `config max-store-size 20G` (`none` unsets it).
    Config {
        /// The setting (max-store-size).
        key: Option<String>,
        /// Its new value.
        value: Option<String>,
    },
    /// Verify the store: every blob against its digest, every image's indexes, trees and
    /// lazily fetched chunks. Exits 1 if something is wrong; with --repair, removes what is
    /// damaged so the next pull or mount fetches or rebuilds it.
    Check {
        /// Remove what is damaged.
        #[arg(long)]
        repair: bool,
    },
    /// Show the store's disk usage: blobs, indexes, small files' bytes and metadata images (see
    /// pull --small-files), trees, their total and how much of it layers several images use
    /// take, and per image.
    Df {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check credentials for REGISTRY and store them in Docker's config.json.
    Login {
        /// Registry host[:port].
        registry: String,
        /// User name.
        #[arg(long, short = 'u')]
        username: String,
        /// Read the password from standard input (else $BUX_FUSE_PASSWORD).
        #[arg(long)]
        password_stdin: bool,
        /// Speak plain HTTP to this registry (loopback registries always are); also spelled
        /// --insecure.
        #[arg(long, alias = "insecure")]
        insecure_registry: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output, or write it and one page per subcommand
    /// (bux-fuse-mount.1, ...) into --dir.
    Man {
        /// Write bux-fuse.1 and the subcommands' pages here (e.g. /usr/local/share/man/man1).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Clone)]
struct PullArgs {
    /// Platform to pick from a multi-arch image (os/arch[/variant]); default: this host's.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// User name for the registry (password from --password-stdin or $BUX_FUSE_PASSWORD).
    #[arg(long, short = 'u')]
    username: Option<String>,
    /// Read the registry password from standard input.
    #[arg(long)]
    password_stdin: bool,
    /// Speak plain HTTP to this registry (host[:port]); loopback registries always are.
    #[arg(long, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// A mirror of the registry (same repository paths), tried first for blobs and manifests
    /// by digest, falling back to the registry; what it serves is verified all the same.
    /// Repeatable; also $BUX_FUSE_MIRRORS (comma-separated).
    #[arg(
        long,
        value_name = "HOST[:PORT]",
        env = "BUX_FUSE_MIRRORS",
        value_delimiter = ','
    )]
    mirror: Vec<String>,
    /// When to contact the registry: missing (default), always, never.
    #[arg(long, default_value = "missing", value_parser = ["missing", "always", "never"])]
    pull: String,
    /// Set from the global --quiet.
    #[arg(skip)]
    quiet: bool,
    /// Seconds a download may go without data before it is resumed (broken connections are
    /// resumed at once; five failed resumptions in a row end the pull).
    #[arg(long, default_value_t = 30.0, value_name = "SECS", value_parser = seconds)]
    stall_timeout: f64,
    /// Seconds to wait for a connection to the registry.
    #[arg(long, default_value_t = 10.0, value_name = "SECS", value_parser = seconds)]
    connect_timeout: f64,
    /// Seconds the registry may take to answer a request (or to send more of an answer).
    #[arg(long, default_value_t = 30.0, value_name = "SECS", value_parser = seconds)]
    request_timeout: f64,
    /// Keep the bytes of files up to this size (KiB) in the store, for root's shared mounts
    /// to read them in the kernel, without FUSE: fastest for images of many small files, for
    /// about a third of the compressed image more on disk. 0 keeps none; 64 at most.
    #[arg(long, default_value_t = 64, value_name = "KIB")]
    small_files: u64,
    /// Keep the store within SIZE (20G, 512M, 1.5GiB, bytes) after the pull: least recently
    /// used images go first, never one a live mount uses. Default: the store's setting (see
    /// `config max-store-size`).
    #[arg(long, value_name = "SIZE", env = "BUX_FUSE_MAX_STORE_SIZE")]
    max_store_size: Option<String>,
    /// The signature policy (containers-policy.json) images must satisfy; default: the
    /// first of $XDG_CONFIG_HOME/containers/policy.json (~/.config/…), /etc/containers/policy.json
    /// that exists, and with none every image is accepted.
    #[arg(long, value_name = "FILE", env = "BUX_FUSE_SIGNATURE_POLICY")]
    signature_policy: Option<std::path::PathBuf>,
}

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

/// A duration in seconds: positive, and short of forever.
fn seconds(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0 and 86400"
        )),
    }
}

/// The error and its causes on one line, each said once: the library's messages already
/// carry their causes' words, which `source()` also hands to callers that match on them.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if out.contains(&said) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&said);
    }
    out
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
            std::io::stderr().write_all(buf)?;
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

fn run(cli: Cli) -> Result<()> {
    let store_arg = cli.store.clone();
    let quiet = cli.quiet;
    match cli.command {
        Cmd::Pull {
            reference,
            mut pull,
        } => {
            pull.quiet = quiet;
            let store = open_store(&store_arg)?;
            let opts = pull.options(false)?;
            let budget = budget(&store, pull.max_store_size.as_deref())?;
            let image = runtime()?.block_on(store.pull(&reference, &opts))?;
            // The progress bars end (their last line completed) before the result is printed.
            drop(opts);
            if !pull.quiet {
                println!("{} {}", image.reference, image.manifest_digest);
            }
            apply_budget(&store, budget, &[image.reference], pull.quiet)
        }
        Cmd::Mount {
            reference,
            dir,
            foreground,
            threads,
            cache_mb,
            writable,
            upper,
            allow_other,
            lazy,
            trust_index,
            prefetch,
            record_trace,
            read_timeout,
            wait_complete,
            notify_ready,
            own_server,
            mut pull,
        } => {
            pull.quiet = quiet;
            let store = open_store(&store_arg)?;
            let mut opts = pull.options(false)?;
            let budget = match notify_ready {
                true => None, // a daemon: its parent keeps the budget
                false => budget(&store, pull.max_store_size.as_deref())?,
            };
            // Held until the mount has leased its image: no eviction between pull and lease.
            let hold = store.pull_guard()?;
            let image = if lazy {
                let (image, outcome) =
                    runtime()?.block_on(store.pull_lazy(&reference, &opts, trust_index))?;
                opts.progress = None; // the bars end before what follows is said
                if let Some(note) = outcome.note.filter(|_| !pull.quiet) {
                    eprintln!("{}: {note}", image.reference);
                }
                image
            } else {
                runtime()?.block_on(store.pull(&reference, &opts))?
            };
            opts.progress = None;
            if !(read_timeout > 0.0 && read_timeout < 86400.0) {
                bail!("--read-timeout must be between 0 and 86400 seconds");
            }
            let upper = upper.map(|u| std::path::absolute(&u).unwrap_or(u));
            let mopts = crate::MountOptions {
                threads,
                cache_bytes: cache_mb << 20,
                writable: writable || upper.is_some(),
                upper,
                registry: opts.registry.clone(),
                read_deadline: std::time::Duration::from_secs_f64(read_timeout),
                prefetch: match prefetch.as_str() {
                    "none" => crate::mount::Prefetch::None,
                    "trace" => crate::mount::Prefetch::Trace,
                    _ => crate::mount::Prefetch::All,
                },
                record_trace,
                allow_other: allow_other || crate::MountOptions::default().allow_other,
                shared_server: if own_server || lazy {
                    None
                } else {
                    Some(std::env::current_exe().context("finding own executable")?)
                },
            };
            if !quiet && !notify_ready {
                if let Some(n) = std::fs::read_dir(&dir)
                    .ok()
                    .map(|d| d.count())
                    .filter(|n| *n > 0)
                {
                    eprintln!(
                        "warning: {} is not empty: the mount hides its {} until it is unmounted",
                        dir.display(),
                        entries_word(n)
                    );
                }
            }
            let shared = match foreground || notify_ready {
                true => None,
                false => crate::mount::mount_if_shared(&store, &image.reference, &dir, &mopts)?,
            };
            if let Some(m) = shared {
                // Nothing of this process serves it: leave it mounted.
                let path = m.path().to_path_buf();
                if m.detach().is_err() {
                    bail!("mounting {}: expected a shared mount", dir.display());
                }
                drop(hold);
                apply_budget(&store, budget, &[], quiet)?;
                if !quiet {
                    eprintln!(
                        "{} mounted at {} (shared image server; `bux-fuse umount {}` to unmount)",
                        image.reference,
                        path.display(),
                        path.display()
                    );
                    if let Some(note) = writable_note(&mopts) {
                        eprintln!("{note}");
                    }
                }
                return Ok(());
            }
            if foreground || notify_ready {
                drop(hold);
                apply_budget(
                    &store,
                    budget,
                    std::slice::from_ref(&image.reference),
                    quiet,
                )?;
                serve(&store, &image.reference, &dir, &mopts, notify_ready)
            } else {
                spawn_daemon(&store, &image.reference, &dir, &mopts, &pull, lazy)?;
                drop(hold);
                apply_budget(&store, budget, &[], quiet)?;
                if wait_complete {
                    wait_complete_layers(&store, &image.record)?;
                }
                Ok(())
            }
        }
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
        } => {
            let store = open_store(&store_arg)?;
            let manifest: crate::Digest = manifest
                .parse()
                .map_err(|e| anyhow::anyhow!("bad manifest digest: {e:?}"))?;
            match worker_fd {
                Some(fd) => crate::mount::shared::serve_worker(&store, manifest, fd, resume)
                    .context("image server worker"),
                None => {
                    stop_on_signals();
                    crate::mount::shared::supervise(&store, manifest, &STOP).context("image server")
                }
            }
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
            crate::mount::unmount_all(&dir)
                .with_context(|| format!("unmounting {}", dir.display()))?;
            if let Some(store) = existing_store(&store_arg)? {
                let run = store.root().join("run");
                crate::mount::wait_for_cleanup(&run, &dir, std::time::Duration::from_secs(5));
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

impl PullArgs {
    fn options(&self, _: bool) -> Result<PullOptions> {
        let platform = self
            .platform
            .as_deref()
            .map(|p| p.parse::<Platform>().map_err(anyhow::Error::msg))
            .transpose()?;
        let credentials = credentials(self.username.as_deref(), self.password_stdin)?;
        let most = crate::index::small::SMALL_MAX >> 10;
        if self.small_files > most {
            bail!("--small-files: at most {most} (KiB)");
        }
        let policy = match self.pull.as_str() {
            "always" => PullPolicy::Always,
            "never" => PullPolicy::Never,
            _ => PullPolicy::IfMissing,
        };
        Ok(PullOptions {
            policy,
            platform,
            registry: RegistryOptions {
                credentials,
                insecure: self.insecure_registry.clone(),
                mirrors: self.mirror.clone(),
                connect_timeout: Some(std::time::Duration::from_secs_f64(self.connect_timeout)),
                request_timeout: Some(std::time::Duration::from_secs_f64(self.request_timeout)),
            },
            progress: (!self.quiet).then(progress_printer),
            parallel: 3,
            stall_timeout: Some(std::time::Duration::from_secs_f64(self.stall_timeout)),
            small_files: Some(self.small_files << 10),
            // Kept by the command itself, with its messages (and, for a mount, once the mount
            // holds its image).
            budget: crate::pull::Budget::Unlimited,
            signature_policy: match &self.signature_policy {
                Some(p) => crate::policy::SignaturePolicy::File(p.clone()),
                None => crate::policy::SignaturePolicy::Auto,
            },
        })
    }
}

/// Credentials from --username and --password-stdin (or $BUX_FUSE_PASSWORD); without a user
/// name, those `login` or Docker stored.
fn credentials(username: Option<&str>, password_stdin: bool) -> Result<Credentials> {
    Ok(match username {
        Some(user) => Credentials::Basic {
            username: user.to_string(),
            password: read_password(password_stdin)?,
        },
        None if password_stdin => bail!("--password-stdin needs --username"),
        None => Credentials::Auto,
    })
}

/// `1 layer`, `2 layers`.
fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// `1 entry`, `2 entries`.
fn entries_word(n: usize) -> String {
    format!("{n} {}", if n == 1 { "entry" } else { "entries" })
}

fn read_password(from_stdin: bool) -> Result<String> {
    if from_stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading password from stdin")?;
        Ok(s.trim_end_matches(['\n', '\r']).to_string())
    } else if let Ok(p) = std::env::var("BUX_FUSE_PASSWORD") {
        Ok(p)
    } else {
        bail!("a password is needed: --password-stdin or $BUX_FUSE_PASSWORD")
    }
}

fn human(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1} TiB")
}

/// Progress on stderr: a bar per layer on a terminal, plain lines otherwise.
fn progress_printer() -> crate::pull::ProgressFn {
    if std::io::stderr().is_terminal() {
        bars()
    } else {
        Arc::new(|p: Progress| {
            if let Some(line) = progress_line(&p) {
                eprintln!("{line}");
            }
        })
    }
}

/// The line printed for an event when not on a terminal (byte counts are skipped).
fn progress_line(p: &Progress) -> Option<String> {
    Some(match p {
        Progress::Resolved {
            reference,
            manifest,
            layers,
        } => {
            let total: u64 = layers.iter().map(|l| l.1).sum();
            format!(
                "{reference}: manifest {}, {}, {}",
                manifest.short(),
                plural(layers.len() as u64, "layer"),
                human(total)
            )
        }
        Progress::Cached { reference } => format!("{reference}: already in the store"),
        Progress::LayerCached { layer } => format!("  {} already stored", layer.short()),
        Progress::LayerBytes { .. } => return None,
        Progress::LayerResumed {
            layer,
            offset,
            total,
        } => format!(
            "  {} resuming at {} of {} (left by an earlier pull)",
            layer.short(),
            human(*offset),
            human(*total)
        ),
        Progress::LayerDone { layer, entries } => {
            format!(
                "  {} pulled and indexed ({})",
                layer.short(),
                entries_word(*entries)
            )
        }
        Progress::Merged { inodes } => format!("  merged tree: {inodes} inodes"),
        Progress::Warning { reference, message } => format!("{reference}: warning: {message}"),
        Progress::MetadataImage { bytes } => {
            format!(
                "  metadata image (EROFS, small files included): {}",
                human(*bytes)
            )
        }
    })
}

fn bars() -> crate::pull::ProgressFn {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    /// The bars of one pull: once they are gone, the terminal's cursor goes below them (the
    /// last redraw leaves it at the end of the bottom bar, where the next output would follow).
    struct Bars {
        multi: MultiProgress,
        bars: std::sync::Mutex<std::collections::HashMap<crate::Digest, ProgressBar>>,
    }
    impl Drop for Bars {
        fn drop(&mut self) {
            let bars = self.bars.get_mut().unwrap_or_else(|e| e.into_inner());
            if !bars.is_empty() && !self.multi.is_hidden() {
                eprintln!();
            }
        }
    }
    let state = Bars {
        multi: MultiProgress::new(),
        bars: Default::default(),
    };
    // One bar per line at any terminal width: the bar takes what the numbers leave.
    let style = ProgressStyle::with_template(
        "{prefix} {bytes:>9}/{total_bytes:<9} {bytes_per_sec:>11} [{wide_bar}] {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    Arc::new(move |p: Progress| {
        let (multi, mut bars) = (
            &state.multi,
            state.bars.lock().unwrap_or_else(|e| e.into_inner()),
        );
        match &p {
            Progress::Resolved { layers, .. } => {
                multi.suspend(|| terminal_line(&progress_line(&p).unwrap_or_default()));
                for (d, size) in layers {
                    let bar = multi.add(ProgressBar::new(*size));
                    bar.set_style(style.clone());
                    bar.set_prefix(d.short());
                    bars.insert(*d, bar);
                }
            }
            Progress::LayerBytes { layer, done, .. } => {
                if let Some(b) = bars.get(layer) {
                    b.set_position(*done);
                }
            }
            Progress::LayerDone { layer, entries } => {
                if let Some(b) = bars.get(layer) {
                    b.finish_with_message(format!("indexed, {}", entries_word(*entries)));
                }
            }
            Progress::LayerCached { layer } => {
                if let Some(b) = bars.get(layer) {
                    b.finish_with_message("already stored");
                }
            }
            _ => {
                multi.suspend(|| terminal_line(&progress_line(&p).unwrap_or_default()));
            }
        }
    })
}

/// Writes a line on the terminal below the bars (which `suspend` takes away and draws again):
/// from the line's start, clearing what was there, and ended with a newline. (indicatif's
/// `println` pads a line to the width it reads from the terminal instead of ending it, for the
/// terminal to wrap: where that width is wrong, as on a terminal that reports none, the next
/// output runs on in the same line.)
fn terminal_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[K{line}\n");
    let _ = err.flush();
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set [`STOP`]: a serving process then unmounts and ends.
fn stop_on_signals() {
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Serves a mount in this process until a signal or an external unmount.
fn serve(
    store: &Store,
    reference: &str,
    dir: &Path,
    opts: &crate::MountOptions,
    notify_ready: bool,
) -> Result<()> {
    stop_on_signals();
    crate::mount::tune_allocator_for_serving();
    let m = mount(store, reference, dir, opts)?;
    // Mounted: what is left is serving, which needs far less than the process may do.
    if let Err(e) = crate::sandbox::confine(crate::mount::host_root()) {
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
        if let Some(note) = writable_note(opts) {
            eprintln!("{note}");
        }
    }
    while !STOP.load(Ordering::SeqCst) && !m.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if m.is_finished() {
        m.wait()?;
    } else {
        m.unmount()?;
    }
    Ok(())
}

/// Waits until every layer of `record` is stored whole (a lazy mount's background completion),
/// or the image is marked bad.
fn wait_complete_layers(store: &Store, record: &crate::store::ImageRecord) -> Result<()> {
    loop {
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
fn spawn_daemon(
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
        .arg("--own-server")
        .arg("--pull=never")
        .arg("--quiet")
        .arg(format!("--threads={}", opts.threads))
        .arg(format!("--cache-mb={}", opts.cache_bytes >> 20));
    if opts.writable {
        cmd.arg("--writable");
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
        if let Some(note) = writable_note(opts) {
            eprintln!("{note}");
        }
    }
    Ok(())
}

/// Where a writable mount's changes go, for the message that it is mounted.
fn writable_note(opts: &crate::MountOptions) -> Option<String> {
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

/// The budget: --max-store-size (or $BUX_FUSE_MAX_STORE_SIZE), else the store's setting.
fn budget(store: &Store, given: Option<&str>) -> Result<Option<u64>> {
    if let Some(s) = given.filter(|s| !s.trim().is_empty()) {
        return crate::store::parse_size(s).map(Some).map_err(|e| {
            anyhow::anyhow!("--max-store-size (or ${}): {e}", crate::store::BUDGET_ENV)
        });
    }
    Ok(store.settings()?.max_store_size)
}

/// Keeps the store within `budget` (if any), `protect` kept whatever it costs.
fn apply_budget(store: &Store, budget: Option<u64>, protect: &[String], quiet: bool) -> Result<()> {
    if let Some(max) = budget {
        let r = store.enforce_budget(max, protect)?;
        report_budget(&r, quiet);
    }
    Ok(())
}

fn report_budget(r: &crate::store::BudgetReport, quiet: bool) {
    if !quiet && (!r.removed.is_empty() || !r.dropped.is_empty()) {
        let mut what = Vec::new();
        if !r.removed.is_empty() {
            what.push(format!("removed {}", r.removed.join(", ")));
        }
        if !r.dropped.is_empty() {
            what.push(format!(
                "dropped the fetched chunks of {}",
                r.dropped.join(", ")
            ));
        }
        eprintln!(
            "store budget {}: {}; {} now",
            human(r.max),
            what.join("; "),
            human(r.after)
        );
    }
    report_over(r);
}

/// One line when the budget cannot be met: by how much, and what mounts hold.
fn report_over(r: &crate::store::BudgetReport) {
    if let Some(over) = r.over {
        eprintln!(
            "warning: the store ({}) is {} over its budget of {}: {} of it is held by live mounts{} \
             or the image in use; kept",
            human(r.after),
            human(over),
            human(r.max),
            human(r.held),
            match r.mounted.is_empty() {
                true => String::new(),
                false => format!(" ({})", r.mounted.join(", ")),
            }
        );
    }
}

/// `gc --dry-run`: what gc would remove.
fn gc_dry_run(store: &Store, budget: Option<u64>) -> Result<()> {
    let plan = store.budget_plan(budget.unwrap_or(u64::MAX), &[])?;
    println!(
        "would remove {} that nothing refers to",
        human(plan.unreferenced)
    );
    for s in &plan.steps {
        let verb = match s.action {
            crate::store::BudgetAction::Remove => "would remove image",
            crate::store::BudgetAction::DropChunks => "would drop the fetched chunks of",
        };
        println!(
            "{verb} {} ({}, last used {})",
            s.reference,
            human(s.bytes),
            ago(s.last_used)
        );
    }
    match budget {
        Some(max) => {
            println!(
                "store {} -> {} (budget {})",
                human(plan.total),
                human(plan.after),
                human(max)
            );
            if plan.after > max {
                println!(
                    "the budget cannot be met: {} over, {} held by live mounts{}",
                    human(plan.after - max),
                    human(plan.held),
                    match plan.mounted.is_empty() {
                        true => String::new(),
                        false => format!(" ({})", plan.mounted.join(", ")),
                    }
                );
            }
        }
        None => println!(
            "store {} -> {} (no budget)",
            human(plan.total),
            human(plan.after)
        ),
    }
    Ok(())
}

/// How long ago `secs` (since the epoch) was, shortly.
fn ago(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let d = now.saturating_sub(secs);
    match d {
        _ if secs == 0 => "never".into(),
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}
