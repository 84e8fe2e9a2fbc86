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
use std::time::Duration;

use super::{read_pid, Place};

/// A request to an image server unanswered this long has its worker taken for hung, and
/// ended: decoding one span takes milliseconds, and a worker just started is given as long.
pub(crate) const HUNG: Duration = Duration::from_secs(5);

/// What [`end_hung_server`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The worker `pid` (serving for at least the grace asked): the supervisor starts another.
    Worker(u32),
    /// Nothing: no worker running, or one started within the grace (a replacement, given its
    /// time).
    Nothing,
    /// The connection (through fusectl's `abort`, where it is mounted) and the supervisor.
    Connection,
}

/// The progress report of the server at `mnt` (its read counters, which the worker rewrites
/// while they change, see `stats`): a server that changes it is alive, however slow.
pub(crate) fn progress(mnt: &Path) -> Option<Vec<u8>> {
    std::fs::read(Place::at(mnt.parent()?.to_path_buf()).stats()).ok()
}

/// Ends the server of the user's shared mount `mnt` that holds reads up. Its worker first, if
/// it has run for at least `grace`; with `connection` (a worker ended before did not bring the
/// server back), the connection itself: aborted through fusectl where that is mounted (the
/// `abort` file is the mount owner's; it works on a frozen server, which a signal waits for),
/// and its supervisor killed. Only processes of this user serving this place are signalled.
pub(crate) fn end_hung_server(mnt: &Path, grace: Duration, connection: bool) -> Ended {
    let Some(dir) = mnt.parent() else {
        return Ended::Nothing;
    };
    let place = Place::at(dir.to_path_buf());
    if connection {
        abort_connection(mnt);
        for pid in [read_pid(&place.pid()), read_pid(&place.worker_pid())]
            .into_iter()
            .flatten()
        {
            kill_server_process(pid, &place);
        }
        return Ended::Connection;
    }
    let Some(pid) = read_pid(&place.worker_pid()) else {
        return Ended::Nothing;
    };
    match running_for(pid) {
        Some(age) if age >= grace && kill_server_process(pid, &place) => Ended::Worker(pid),
        _ => Ended::Nothing,
    }
}

/// Aborts the FUSE connection of the mount at `mnt` (every request fails; the mount is dead),
/// where fusectl is mounted.
fn abort_connection(mnt: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(mnt) else {
        return; // dead already, or gone
    };
    let abort = format!("/sys/fs/fuse/connections/{}/abort", libc::minor(md.dev()));
    if let Err(e) = std::fs::write(&abort, "1") {
        tracing::debug!("aborting through {abort}: {e}");
    }
}

/// How long process `pid` has run (since boot, so the wall clock does not matter); `None` if
/// it does not run: gone, or a zombie (a worker killed while its supervisor is stopped stays
/// one, unreaped).
fn running_for(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": the fields follow the last ')' (comm may hold any byte); the start
    // time, in clock ticks after boot, is the 22nd field, the 20th after the state.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?;
    if matches!(state, "Z" | "X") {
        return None;
    }
    let start: u64 = fields.nth(18)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let age = uptime - start as f64 / ticks.max(1) as f64;
    Some(Duration::from_secs_f64(age.max(0.0)))
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
    // `$STORE/shared/<hex>`: the store it serves from, as its command line names it.
    let store = place.dir.parent().and_then(Path::parent);
    let store = store.map(|s| s.as_os_str().as_encoded_bytes());
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.contains(&&b"serve-shared"[..])
        && args.iter().any(|a| a.strip_prefix(b"sha256:") == Some(hex))
        && args
            .windows(2)
            .any(|w| w[0] == b"--store" && Some(w[1]) == store)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing is signalled at a place whose pid files name processes that do not serve it
    /// (here: this test process, which is no `serve-shared`).
    #[test]
    fn only_the_places_own_server_is_ended() {
        let dir = tempfile::tempdir().unwrap();
        let place_dir = dir.path().join("shared").join("ab".repeat(32));
        std::fs::create_dir_all(&place_dir).unwrap();
        let me = std::process::id().to_string();
        std::fs::write(place_dir.join("worker-pid"), &me).unwrap();
        std::fs::write(place_dir.join("pid"), &me).unwrap();
        let mnt = place_dir.join("mnt");
        assert_eq!(
            end_hung_server(&mnt, Duration::from_secs(3600), false),
            Ended::Nothing,
            "a worker that started within the grace"
        );
        assert_eq!(
            end_hung_server(&mnt, Duration::ZERO, false),
            Ended::Nothing,
            "not a server of this place"
        );
        std::fs::remove_file(place_dir.join("worker-pid")).unwrap();
        assert_eq!(end_hung_server(&mnt, Duration::ZERO, false), Ended::Nothing);
        assert!(!serves(std::process::id(), &Place::at(place_dir)));
    }

    #[test]
    fn a_zombie_does_not_run() {
        let me = running_for(std::process::id()).expect("this process runs");
        assert!(me < Duration::from_secs(24 * 3600), "{me:?}");
        // A child ended and not yet reaped: a zombie.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(running_for(pid), None, "a zombie");
        child.wait().unwrap();
        assert_eq!(running_for(pid), None, "gone");
    }

    /// `serve-shared` of the place's image, but from another store: not the place's server.
    #[test]
    fn a_server_of_another_store_is_not_the_places() {
        let hex = "cd".repeat(32);
        let dir = tempfile::tempdir().unwrap();
        let place = Place::at(dir.path().join("shared").join(&hex));
        let sleeper = |store: &Path| {
            // A shell whose command line carries a server's arguments (it waits for `sleep`).
            std::process::Command::new("sh")
                .args(["-c", "sleep 30; :", "sh"])
                .arg("--store")
                .arg(store)
                .args(["serve-shared", &format!("sha256:{hex}")])
                .spawn()
                .unwrap()
        };
        let mut other = sleeper(Path::new("/elsewhere"));
        let mut ours = sleeper(dir.path());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!serves(other.id(), &place));
        assert!(serves(ours.id(), &place));
        for c in [&mut other, &mut ours] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
