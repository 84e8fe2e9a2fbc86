//! Embedding the image server in a program that links the library.
//!
//! Root's mounts of an image share one image server (see [`crate::mount::shared`]): a
//! supervisor and a worker that run apart from the caller, started from an executable —
//! [`MountOptions::shared_server`](crate::MountOptions::shared_server). That executable is
//! started with `BUX_FUSE_SERVE` in its environment and must then run the server instead of
//! doing what it usually does: the `bux-fuse` binary does, and so does any program whose
//! `main` calls [`serve_if_requested`] first. A program can also leave serving to a
//! `bux-fuse` binary installed beside it ([`server_executable`] with `$BUX_FUSE_HELPER`).
//!
//! The handshake: a server's first line on its standard output is a hello naming this protocol;
//! a mount that starts a server and does not get it (the process exits, says something else,
//! or says nothing for [`HELLO_TIMEOUT`]) fails at once with an error that names
//! [`serve_if_requested`], instead of waiting for a server that is not coming. (A `bux-fuse`
//! binary from before the hello, which answers `ready` straight away, is still taken.)

use std::path::PathBuf;
use std::time::Duration;

/// The variable the library sets on the processes it starts as image servers; its value is the
/// protocol's version.
pub(crate) const SERVE_ENV: &str = "BUX_FUSE_SERVE";

/// The version of the protocol between the library and the servers it starts (the arguments
/// they are given, what they print, since 3 what a kept mount's worker reads on its stdin, and
/// since 4 what the image server reads on its stdin — it serves images fetched lazily — and
/// the `error` lines it prints when it cannot start): a server of another version is refused.
pub(crate) const PROTOCOL: &str = "4";

/// Earlier versions a server still answers: a keeper of version 2 (the binary upgraded under
/// its live mount) tells its worker nothing on stdin, and gets the defaults it served with; a
/// client of version 3 starts image servers only for images stored whole, and tells them
/// nothing.
const ALSO_SERVED: &[&str] = &["2", "3"];

/// The variable naming an executable to run image servers from (see [`server_executable`]).
pub const HELPER_ENV: &str = "BUX_FUSE_HELPER";

/// How long a started server has to say hello before the mount gives up on it.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The line a server prints first.
pub(crate) fn hello() -> String {
    format!("bux-fuse-server {PROTOCOL}")
}

/// Runs the image server and exits if this process was started as one, else returns at once.
///
/// A program that mounts through the image's shared server from its own executable
/// (`MountOptions::shared_server: Some(bux_fuse::server_executable()?)`) calls this first
/// thing in `main`, before it parses its arguments and before any thread starts (so before a
/// multi-threaded async runtime is built: the server's worker confines its threads as they
/// exist when it starts). The server processes are that executable, started with
/// `BUX_FUSE_SERVE` in the environment and their own arguments; this recognizes them, serves
/// the image (until no mount stands on it) and exits, so that the rest of `main` never sees
/// them. In any other process it does nothing.
///
/// ```no_run
/// fn main() {
///     bux_fuse::serve_if_requested();
///     // ... the runtime's own main: parse arguments, build the async runtime, mount ...
/// }
/// ```
///
/// A program that forgets to call it gets an error from the first shared mount, naming this
/// function, within [`HELLO_TIMEOUT`] at worst.
#[allow(clippy::needless_doctest_main)] // main is the point
pub fn serve_if_requested() {
    if !started_as_server() {
        return;
    }
    std::process::exit(serve());
}

/// The executable image servers are run from, for
/// [`MountOptions::shared_server`](crate::MountOptions::shared_server): `$BUX_FUSE_HELPER`
/// if set (a `bux-fuse` binary, or any program that calls [`serve_if_requested`] first), else
/// this program's own executable (whose `main` must then call [`serve_if_requested`]).
pub fn server_executable() -> crate::Result<PathBuf> {
    match std::env::var_os(HELPER_ENV).filter(|v| !v.is_empty()) {
        Some(helper) => Ok(PathBuf::from(helper)),
        None => std::env::current_exe()
            .map_err(|e| crate::Error::io("finding this program's executable", e)),
    }
}

/// Whether this process was started by the library as an image server: `BUX_FUSE_SERVE` set
/// and the server's arguments given.
pub(crate) fn started_as_server() -> bool {
    std::env::var_os(SERVE_ENV).is_some()
        && std::env::args_os().any(|a| a == "serve-shared" || a == "serve-mount")
}

/// Serves as asked (the arguments are the `bux-fuse` CLI's `serve-shared` or `serve-mount`); returns
/// the exit code.
fn serve() -> i32 {
    use std::io::Write;
    // First, whatever comes next: the starting process knows then that this program serves,
    // in the protocol it asked for where this one speaks it.
    let asked = std::env::var(SERVE_ENV).unwrap_or_default();
    let speaks = asked == PROTOCOL || ALSO_SERVED.contains(&asked.as_str());
    match speaks {
        true => println!("bux-fuse-server {asked}"),
        false => println!("{}", hello()),
    }
    let _ = std::io::stdout().flush();
    if !speaks {
        eprintln!(
            "bux-fuse: asked to serve protocol {asked:?}, this library speaks {PROTOCOL}: \
             the image server's executable and the program mounting are different versions"
        );
        return 2;
    }
    let threads = threads();
    if threads > 1 {
        eprintln!(
            "bux-fuse: bux_fuse::serve_if_requested() was called with {threads} threads running: \
             call it first in main, before any thread or async runtime starts"
        );
        return 2;
    }
    crate::cli::main()
}

/// The threads of this process (1 if unknown).
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(1)
}
