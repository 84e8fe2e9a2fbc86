//! Ending a user's image server that holds reads up.
//!
//! A server that hangs (stopped, or stuck) rather than dies leaves every read sent to it
//! waiting, and a read on a FUSE file the server has taken can be ended by nothing short of
//! a fatal signal to the reader or the end of the connection. The user's writable mounts,
//! which read image files through their server (`crate::upper::Through`), watch their reads
//! and end the server's processes when one waits too long: the worker first (its supervisor
//! starts another on the same connection, and the kernel resends it what the dead one held),
//! then, if no worker comes back, the supervisor (the connection ends with it, the reads fail,
//! and the mounts decode the files themselves until the next mount starts a new server).

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{read_pid, Place};

/// A request to an image server unanswered this long has its worker taken for hung, and
/// ended: decoding one span takes milliseconds, and a worker just started is given as long.
pub(crate) const HUNG: Duration = Duration::from_secs(5);

/// What [`end_hung_server`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The worker, serving for at least the grace asked: the supervisor starts another.
    Worker,
    /// Nothing: the worker started within the grace (a replacement, given its time).
    Nothing,
    /// No worker is alive: the supervisor is not starting one (`None` if it is gone too).
    NoWorker,
    /// The supervisor (no worker being alive): the connection ends.
    Supervisor,
}

/// Ends the server of the user's shared mount `mnt` (its worker, if it has served for at least
/// `grace`; else, with `supervisor` and no worker alive, its supervisor). Only processes of
/// this user that serve this place are signalled.
pub(crate) fn end_hung_server(mnt: &Path, grace: Duration, supervisor: bool) -> Ended {
    let Some(dir) = mnt.parent() else {
        return Ended::Nothing;
    };
    let place = Place::at(dir.to_path_buf());
    let worker_file = place.worker_pid();
    if let Some(pid) = read_pid(&worker_file).filter(|&p| running(p)) {
        // The worker writes its pid as it starts.
        let serving_for = std::fs::metadata(&worker_file)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        if serving_for < grace {
            return Ended::Nothing;
        }
        return match kill_server_process(pid, &place) {
            true => Ended::Worker,
            false => Ended::Nothing,
        };
    }
    if supervisor {
        if let Some(pid) = read_pid(&place.pid()) {
            if kill_server_process(pid, &place) {
                return Ended::Supervisor;
            }
        }
    }
    Ended::NoWorker
}

/// Whether process `pid` exists and has not ended: a worker killed while its supervisor is
/// stopped stays a zombie, unreaped, and is no worker.
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')' (comm may hold any byte).
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// Sends SIGKILL to `pid` if it is this user's `bux-fuse serve-shared` of `place`'s image.
/// Through a pidfd taken before the check: a pid reused after it is not signalled.
fn kill_server_process(pid: u32, place: &Place) -> bool {
    // SAFETY: pidfd_open with a pid and no flags; the descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a descriptor pidfd_open just returned.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    if !serves(pid, place) {
        tracing::warn!(
            "pid {pid} is no longer the image server of {}",
            place.dir.display()
        );
        return false;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal on the pidfd, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

/// Whether process `pid` runs as this user and is `serve-shared` of `place`'s image.
fn serves(pid: u32, place: &Place) -> bool {
    let proc = Path::new("/proc").join(pid.to_string());
    let Ok(status) = std::fs::read_to_string(proc.join("status")) else {
        return false;
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() }.to_string();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    if effective != Some(me.as_str()) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(proc.join("cmdline")) else {
        return false;
    };
    let hex = place.dir.file_name().unwrap_or_default().as_encoded_bytes();
    let mut args = cmdline.split(|&b| b == 0);
    args.clone().any(|a| a == b"serve-shared")
        && args.any(|a| a.strip_prefix(b"sha256:") == Some(hex))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing is signalled at a place whose pid files name processes that do not serve it
    /// (here: this test process, which is no `serve-shared`).
    #[test]
    fn only_the_places_own_server_is_ended() {
        let dir = tempfile::tempdir().unwrap();
        let place_dir = dir.path().join("ab".repeat(32));
        std::fs::create_dir(&place_dir).unwrap();
        let me = std::process::id().to_string();
        std::fs::write(place_dir.join("worker-pid"), &me).unwrap();
        std::fs::write(place_dir.join("pid"), &me).unwrap();
        let mnt = place_dir.join("mnt");
        assert_eq!(
            end_hung_server(&mnt, Duration::from_secs(3600), true),
            Ended::Nothing,
            "a worker that started within the grace"
        );
        assert_eq!(
            end_hung_server(&mnt, Duration::ZERO, true),
            Ended::Nothing,
            "not a server of this place"
        );
        std::fs::remove_file(place_dir.join("worker-pid")).unwrap();
        assert_eq!(end_hung_server(&mnt, Duration::ZERO, true), Ended::NoWorker);
        assert!(!serves(std::process::id(), &Place::at(place_dir)));
        assert!(running(std::process::id()));
        // A child ended and not yet reaped: a zombie.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!running(pid), "a zombie");
        child.wait().unwrap();
        assert!(!running(pid), "gone");
    }
}
