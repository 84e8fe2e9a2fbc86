//! Processes that outlive whoever started them: a mount's daemon, an image server.

use std::io;
use std::path::Path;

/// Starts `cmd` detached (its own session, stdin closed, stderr to the file `log`) and waits
/// for it to print `ready`. Else: the last line it logged (`what` if none).
pub(crate) fn start_detached(
    cmd: std::process::Command,
    log: &Path,
    what: &str,
) -> std::result::Result<std::process::Child, String> {
    use std::io::BufRead;
    let mut child = spawn_detached(cmd, log, what, &[])?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = io::BufReader::new(out).read_line(&mut line);
    }
    if line.trim() == "ready" {
        return Ok(child);
    }
    let _ = child.wait();
    Err(last_logged(log, what))
}

/// Spawns `cmd` in a session of its own, stdout piped, stderr to the file `log`, `input` on
/// its stdin (closed after it; closed at once if there is none): a process that outlives
/// whoever started it.
pub(crate) fn spawn_detached(
    mut cmd: std::process::Command,
    log: &Path,
    what: &str,
    input: &[u8],
) -> std::result::Result<std::process::Child, String> {
    use std::os::unix::process::CommandExt;
    let file =
        std::fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let stdin = match input.is_empty() {
        true => std::process::Stdio::null(),
        false => super::shared::stdin_holding(input)
            .map_err(|e| format!("telling {what} its options: {e}"))?,
    };
    cmd.stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(file);
    // SAFETY: setsid is async-signal-safe; the process outlives whoever started it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| format!("starting {what}: {e}"))
}

/// The last line a detached process logged (`bux-fuse: ` left out), or that `what` exited
/// without a message.
pub(crate) fn last_logged(log: &Path, what: &str) -> String {
    let logged = std::fs::read_to_string(log).unwrap_or_default();
    let last = logged.lines().rev().find(|l| !l.trim().is_empty());
    last.map_or_else(
        || format!("{what} exited without a message"),
        |l| l.trim_start_matches("bux-fuse: ").to_string(),
    )
}
