//! Starting a server process (supervisor or worker) from an executable that may not be one: the
//! handshake of [`crate::embed`].

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdout, Command};
use std::time::Instant;

use crate::embed::{hello, HELLO_TIMEOUT, PROTOCOL, SERVE_ENV};

/// Lines from a child's standard output, each read with a deadline or without.
pub(super) struct Lines {
    out: ChildStdout,
    buf: Vec<u8>,
}

/// Why no line came.
pub(super) enum NoLine {
    /// The child closed its output (it exited, as a rule).
    Closed,
    /// Nothing for as long as the deadline allowed.
    TimedOut,
    Io(std::io::Error),
}

impl Lines {
    pub(super) fn new(out: ChildStdout) -> Lines {
        Lines {
            out,
            buf: Vec::new(),
        }
    }

    /// The next line (without its newline), waiting until `deadline` if one is given.
    pub(super) fn next(&mut self, deadline: Option<Instant>) -> Result<String, NoLine> {
        loop {
            if let Some(n) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=n).collect();
                return Ok(String::from_utf8_lossy(&line[..n]).into_owned());
            }
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                let mut p = libc::pollfd {
                    fd: self.out.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let r =
                    unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(NoLine::Io(e));
                }
                if r == 0 {
                    return Err(NoLine::TimedOut);
                }
            }
            let mut chunk = [0u8; 256];
            match self.out.read(&mut chunk) {
                Ok(0) => return Err(NoLine::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(NoLine::Io(e)),
            }
            if self.buf.len() > 4096 && !self.buf.contains(&b'\n') {
                // Not a server's hello, whatever it is.
                let line = String::from_utf8_lossy(&self.buf[..80]).into_owned();
                self.buf.clear();
                return Ok(line);
            }
        }
    }
}

/// Sets `cmd` up to start a server: the variable that tells [`crate::serve_if_requested`] so.
pub(super) fn as_server(cmd: &mut Command) {
    cmd.env(SERVE_ENV, PROTOCOL);
}

/// Waits for the hello of the server `child` started from `exe`; kills `child` (its process
/// group too, if it leads one) and says why if none comes. A `bux-fuse` from before the hello
/// answers `ready` at once (to the same arguments): that line is returned, for the caller to
/// take as the next.
pub(super) fn await_hello(
    child: &mut Child,
    lines: &mut Lines,
    exe: &Path,
    group: bool,
) -> Result<Option<String>, String> {
    let why = match lines.next(Some(Instant::now() + HELLO_TIMEOUT)) {
        Ok(line) if line == hello() => return Ok(None),
        Ok(line) if line == "ready" || line.starts_with("ready ") => return Ok(Some(line)),
        Ok(line) if line.starts_with("bux-fuse-server ") => format!(
            "it speaks protocol {:?}, this library {PROTOCOL:?} (different versions)",
            line.trim_start_matches("bux-fuse-server ")
        ),
        Ok(line) => format!(
            "it printed {:?} instead of the server's hello",
            truncate(&line)
        ),
        Err(NoLine::Closed) => {
            // It exits, as a rule: its status says more (but do not wait on one that lingers).
            let deadline = Instant::now() + std::time::Duration::from_secs(1);
            let mut status = None;
            while status.is_none() && Instant::now() < deadline {
                status = child.try_wait().ok().flatten();
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            match status {
                Some(s) => format!("it exited ({s}) without the server's hello"),
                None => "it closed its output without the server's hello".into(),
            }
        }
        Err(NoLine::TimedOut) => {
            format!("no hello in {} s", HELLO_TIMEOUT.as_secs())
        }
        Err(NoLine::Io(e)) => format!("reading its output: {e}"),
    };
    kill(child, group);
    Err(format!(
        "{} did not start as bux-fuse's image server ({why}): a program that mounts through the \
         shared server must call bux_fuse::serve_if_requested() first in main, or set \
         MountOptions::shared_server (or $BUX_FUSE_HELPER) to a bux-fuse executable",
        exe.display()
    ))
}

/// How long a worker may take from its hello to serving.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Why a server process did not start: what to say, and the error it met, where it told one
/// ([`crate::Error::to_wire`]) for the caller to get as it would from a mount of its own.
#[derive(Debug)]
pub(crate) struct NotReady {
    pub(crate) said: String,
    pub(crate) error: Option<crate::Error>,
}

impl From<String> for NotReady {
    fn from(said: String) -> NotReady {
        NotReady { said, error: None }
    }
}

impl From<NotReady> for String {
    fn from(n: NotReady) -> String {
        n.said
    }
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.said)
    }
}

/// The line a worker that cannot start prints after `error WHY`: the error as
/// [`crate::Error::to_wire`] makes it (keepers of earlier versions read the first line only).
pub(crate) const ERROR_WIRE: &str = "error-wire ";

/// The error a server told after its `error WHY` line ([`ERROR_WIRE`]), if it told one: it
/// follows at once (the server is exiting).
pub(super) fn wire_error(lines: &mut Lines) -> Option<crate::Error> {
    let line = lines
        .next(Some(Instant::now() + std::time::Duration::from_secs(1)))
        .ok()?;
    crate::Error::from_wire(line.trim().strip_prefix(ERROR_WIRE)?)
}

/// Prints what a server that cannot start met, for whoever started it: `error WHY`, then the
/// error itself ([`ERROR_WIRE`]) for a library caller to act on.
pub(crate) fn tell_error(e: &crate::Error) {
    use std::io::Write;
    println!("error {}", e.to_string().replace('\n', " "));
    if let Some(wire) = e.to_wire() {
        println!("{ERROR_WIRE}{wire}");
    }
    let _ = std::io::stdout().flush();
}

/// Waits for the worker `child` (started from `exe`) to say `ready CAPS` after its hello, and
/// returns CAPS: the capabilities the kernel offered it, in hex. Else kills it and says why
/// (what it said after `error `, if anything, and the error it told after that).
pub(super) fn await_ready(child: &mut Child, exe: &Path, what: &str) -> Result<u64, NotReady> {
    let Some(out) = child.stdout.take() else {
        kill(child, false);
        return Err(format!("no pipe to {what}").into());
    };
    let mut lines = Lines::new(out);
    // A worker opening a large image takes seconds; one stuck before it serves is given up.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let line = match await_hello(child, &mut lines, exe, false)? {
        Some(line) => line,
        None => lines.next(Some(deadline)).unwrap_or_default(),
    };
    let line = line.trim();
    if let Some(caps) = line.strip_prefix("ready ") {
        if let Ok(caps) = u64::from_str_radix(caps, 16) {
            return Ok(caps);
        }
    }
    let error = match line.starts_with("error ") {
        true => wire_error(&mut lines),
        false => None,
    };
    kill(child, false);
    let why = line.strip_prefix("error ").unwrap_or("see the log");
    Err(NotReady {
        said: format!("{what} did not start: {why}"),
        error,
    })
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Kills `child` (and its process group) and reaps it.
pub(super) fn kill(child: &mut Child, group: bool) {
    if let Ok(None) = child.try_wait() {
        let pid = child.id() as i32;
        // SAFETY: signalling our own child (and the group it leads, created by setsid).
        unsafe {
            if group {
                libc::kill(-pid, libc::SIGKILL);
            }
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let _ = child.wait();
}

/// Refuses to start a server from a process that was itself started as one: its `main` did not
/// call [`crate::serve_if_requested`] and went on as the program usually does (to a mount,
/// here): starting another would only repeat that.
pub(super) fn refuse_if_hookless() -> Result<(), String> {
    if crate::embed::started_as_server() {
        return Err(
            "this process was started as bux-fuse's image server, but its main did not call \
             bux_fuse::serve_if_requested() first"
                .into(),
        );
    }
    Ok(())
}

/// A standard input that holds `input`, then ends: one end of a socket pair, the bytes written
/// into it before the process starts (its buffer holds far more than a server's options), the
/// other end closed. Nothing is written once the process runs, so a process that dies early
/// cannot make its starter's write fail (or raise SIGPIPE in it).
pub(crate) fn stdin_holding(input: &[u8]) -> std::io::Result<std::process::Stdio> {
    use std::io::Write;
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    let kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    // SAFETY: a valid two-element array for socketpair.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair just returned these two descriptors, ours to own.
    let (theirs, ours) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut ours = std::os::unix::net::UnixStream::from(ours);
    ours.write_all(input)?;
    drop(ours);
    Ok(std::process::Stdio::from(theirs))
}
