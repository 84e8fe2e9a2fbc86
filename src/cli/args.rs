//! The command line's arguments: the commands, their flags, and the pull flags they share.

use super::*;

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
    pub(super) store: Option<PathBuf>,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    pub(super) log_level: String,

    /// Print nothing but errors (before or after the subcommand); `images -q` prints only
    /// the references.
    #[arg(short, long, global = true)]
    pub(super) quiet: bool,

    #[command(subcommand)]
    pub(super) command: Cmd,
}

#[derive(Subcommand, Debug)]
pub(super) enum Cmd {
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
    Mount(MountArgs),
    /// Write an image as a file: with --erofs, the EROFS disk image `mount --disk` serves
    /// (pulling the image first if missing).
    ///
    /// The file is written whole through a temporary file (a failure leaves nothing at FILE);
    /// runs of zeros are left as holes. The same image gives the same bytes.
    Export {
        /// Image reference.
        reference: String,
        /// The file to write.
        file: PathBuf,
        /// Write an EROFS disk image (the one format there is, for now: required).
        #[arg(long, required = true)]
        erofs: bool,
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
        /// Serve the image's disk (`mount --disk`) rather than its tree.
        #[arg(long)]
        disk: bool,
    },
    /// Internal: the worker serving a user's mount (started by the process that mounted it,
    /// which keeps the connection and replaces a worker that dies).
    #[command(hide = true)]
    ServeMount {
        /// The stored image's view digest.
        manifest: String,
        /// The inherited FUSE connection.
        #[arg(long)]
        worker_fd: i32,
        /// The connection is live already (a worker restarted after one died).
        #[arg(long)]
        resume: bool,
        /// Serve the image writable, with this upper directory.
        #[arg(long, conflicts_with = "disk")]
        upper: Option<PathBuf>,
        /// Serve the image's disk.
        #[arg(long)]
        disk: bool,
        /// The mount's run directory (its image record, INIT, counters, node journal).
        #[arg(long)]
        run_dir: PathBuf,
        /// The mount is `allow_other`.
        #[arg(long)]
        allow_other: bool,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Bytes of decompressed spans cached.
        #[arg(long, default_value_t = 16 << 20)]
        cache_bytes: usize,
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
pub(super) struct PullArgs {
    /// Print the pull's timeline: each step's line (resolved, each layer fetched and indexed,
    /// the tree merged, the metadata image written) with the seconds since the command began.
    #[arg(long)]
    pub(super) timings: bool,
    /// Platform to pick from a multi-arch image (os/arch[/variant]); default: this host's.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub(super) platform: Option<String>,
    /// User name for the registry (password from --password-stdin or $BUX_FUSE_PASSWORD).
    #[arg(long, short = 'u')]
    pub(super) username: Option<String>,
    /// Read the registry password from standard input.
    #[arg(long)]
    pub(super) password_stdin: bool,
    /// Speak plain HTTP to this registry (host[:port]); loopback registries always are.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub(super) insecure_registry: Vec<String>,
    /// A mirror of the registry (same repository paths), tried first for blobs and manifests
    /// by digest, falling back to the registry; what it serves is verified all the same.
    /// Repeatable; also $BUX_FUSE_MIRRORS (comma-separated).
    #[arg(
        long,
        value_name = "HOST[:PORT]",
        env = "BUX_FUSE_MIRRORS",
        value_delimiter = ','
    )]
    pub(super) mirror: Vec<String>,
    /// When to contact the registry: missing (default), always, never.
    #[arg(long, default_value = "missing", value_parser = ["missing", "always", "never"])]
    pub(super) pull: String,
    /// Set from the global --quiet.
    #[arg(skip)]
    pub(super) quiet: bool,
    /// Seconds a download may go without data before it is resumed (broken connections are
    /// resumed at once; five failed resumptions in a row end the pull).
    #[arg(long, default_value_t = 30.0, value_name = "SECS", value_parser = seconds)]
    pub(super) stall_timeout: f64,
    /// Seconds to wait for a connection to the registry.
    #[arg(long, default_value_t = 10.0, value_name = "SECS", value_parser = seconds)]
    pub(super) connect_timeout: f64,
    /// Seconds the registry may take to answer a request (or to send more of an answer).
    #[arg(long, default_value_t = 30.0, value_name = "SECS", value_parser = seconds)]
    pub(super) request_timeout: f64,
    /// Keep the bytes of files up to this size (KiB) in the store, uncompressed: root's shared
    /// mounts read them in the kernel, without FUSE, every other mount without inflating
    /// anything. Fastest for images of many small files, for about a third of the compressed
    /// image more on disk. 0 keeps none; 64 at most.
    #[arg(long, default_value_t = 64, value_name = "KIB")]
    pub(super) small_files: u64,
    /// Keep the store within SIZE (20G, 512M, 1.5GiB, bytes) after the pull: least recently
    /// used images go first, never one a live mount uses. Default: the store's setting (see
    /// `config max-store-size`).
    #[arg(long, value_name = "SIZE", env = "BUX_FUSE_MAX_STORE_SIZE")]
    pub(super) max_store_size: Option<String>,
    /// The signature policy (containers-policy.json) images must satisfy; default: the
    /// first of $XDG_CONFIG_HOME/containers/policy.json (~/.config/…), /etc/containers/policy.json
    /// that exists, and with none every image is accepted.
    #[arg(long, value_name = "FILE", env = "BUX_FUSE_SIGNATURE_POLICY")]
    pub(super) signature_policy: Option<std::path::PathBuf>,
}

/// A duration in seconds: positive, and short of forever.
pub(super) fn seconds(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0 and 86400"
        )),
    }
}

impl PullArgs {
    pub(super) fn options(&self, _: bool) -> Result<PullOptions> {
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
            progress: (!self.quiet).then(|| progress_printer(self.timings)),
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
pub(super) fn credentials(username: Option<&str>, password_stdin: bool) -> Result<Credentials> {
    Ok(match username {
        Some(user) => Credentials::Basic {
            username: user.to_string(),
            password: read_password(password_stdin)?,
        },
        None if password_stdin => bail!("--password-stdin needs --username"),
        None => Credentials::Auto,
    })
}

pub(super) fn read_password(from_stdin: bool) -> Result<String> {
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

/// `bux-fuse mount`'s arguments.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// Image reference.
    pub reference: String,
    /// Mount point (created if missing).
    pub dir: PathBuf,
    /// Stay in the foreground; unmount on SIGINT/SIGTERM.
    #[arg(short, long)]
    pub foreground: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Memory for decompressed spans, in MiB.
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub cache_mb: usize,
    /// Make the root writable (changes kept in a scratch upper layer, see --upper).
    #[arg(short, long)]
    pub writable: bool,
    /// Serve the image as a disk: DIR holds one file, root.erofs, a complete EROFS image
    /// of the image's tree, for a VMM to attach as the guest's root block device (libkrun:
    /// krun_add_disk + krun_set_root_disk_remount; see docs/disk.md). Its blocks are read
    /// from the layers (with --lazy, fetched) as the guest reads them. Read-only: a guest
    /// makes its root writable with an overlay of its own.
    #[arg(long, conflicts_with_all = ["writable", "upper"])]
    pub disk: bool,
    /// Keep the writable layer in DIR (implies --writable); remount with it to see changes.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Let other users reach the mount. Root's mounts always do (virtiofsd's sandbox needs
    /// it); a user's need `user_allow_other` in /etc/fuse.conf, and then every user of the
    /// host reads the image's files whatever their modes (the image's owners and modes are
    /// enforced by the kernel only on root's mounts; a guest enforces them itself).
    #[arg(long)]
    pub allow_other: bool,
    /// Mount before the layers are downloaded: fetch manifest, config and the image's
    /// published index (see push-index), then fetch by HTTP range only what is read.
    /// Without a published index the image is pulled whole, and this says so.
    #[arg(long)]
    pub lazy: bool,
    /// With --lazy: also use an index found only as a referrer of the image, which the
    /// manifest digest does not cover (anyone who can push to the repository can add one).
    #[arg(long, requires = "lazy")]
    pub trust_index: bool,
    /// With --lazy: what to fetch besides what is read: `trace` fetches first what the
    /// image's read trace says a boot reads (see --record-trace), `all` does that and then
    /// completes the layers in the background (then they are ordinary stored layers),
    /// `none` fetches only what is read.
    #[arg(long, default_value = "all", value_parser = ["none", "trace", "all"], requires = "lazy")]
    pub prefetch: String,
    /// Record which parts of the image reads need, in order, saved at unmount; push-index
    /// publishes it and lazy mounts elsewhere fetch those parts first. (A lazy mount of an
    /// image with no trace records one anyway.)
    #[arg(long)]
    pub record_trace: bool,
    /// With --lazy: seconds a read waits for its bytes before failing with EIO (that read
    /// alone; the next read tries again).
    #[arg(long, default_value_t = 5.0, value_name = "SECS", requires = "lazy")]
    pub read_timeout: f64,
    /// With --lazy: return only once every layer is local and verified.
    #[arg(long, requires = "lazy")]
    pub wait_complete: bool,
    /// Serve this mount with a daemon of its own. By default root's mounts of an image
    /// stored whole share one server (one process, one page cache, mounts in
    /// milliseconds): each mount is a bind mount (read-only) or an overlay (writable) over
    /// the image's one FUSE mount, and a server that dies is restarted under them. A user's
    /// writable mount reads the image's files through the user's shared server (one page
    /// cache for all of them); with this it decodes and caches them itself. A mount that
    /// cannot share (a user's, a lazy one) is served by a worker the daemon replaces if it
    /// dies; with this, by the daemon alone.
    #[arg(long)]
    pub own_server: bool,
    /// Internal: tell the parent process when the mount is live.
    #[arg(long, hide = true)]
    pub notify_ready: bool,
    #[command(flatten)]
    pub pull: PullArgs,
}
