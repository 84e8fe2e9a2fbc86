//! Opening the FUSE connection: a `/dev/fuse` descriptor mounted at a directory.
//!
//! Three callers, three ways, one result (the descriptor a [`fuser::Session`] serves):
//! - **root** (in the initial user namespace) mounts directly with mount(2): device nodes and
//!   setuid work, and the kernel enforces the image's modes for other users
//!   (`default_permissions`), since every user of the host may reach the mount;
//! - **root of a user namespace** that owns its mount namespace (`unshare -rm`, `podman
//!   unshare`) mounts directly too; the kernel maps the image's ids through the namespace;
//! - **an ordinary user** goes through the setuid `fusermount3` (as libfuse does), which mounts
//!   with `nodev,nosuid` and hands the descriptor back over a socket.
//!
//! Non-root mounts leave permission checks to whoever uses the mount (a VM guest enforces the
//! image's owners and modes itself): with `default_permissions` the kernel would deny libkrun,
//! running as the user, the image's `/etc/shadow` and `/root`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// What the mount presents.
pub(super) struct Request<'a> {
    /// Shown as the mount's source (`bux-fuse:<reference>`).
    pub fsname: &'a str,
    /// Let every user reach the mount (root's default; users need `user_allow_other`).
    pub allow_other: bool,
    /// Mount read-only (all but a user's writable mount, which bux-fuse serves itself).
    pub read_only: bool,
}

/// Whether this process is root of the initial user namespace (the host's root).
pub fn host_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    // The initial namespace maps every id onto itself.
    std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
        let f: Vec<&str> = m.split_whitespace().collect();
        f == ["0", "0", "4294967295"]
    })
}

/// Mounts a FUSE filesystem at `dir` and returns its connection.
pub(super) fn connect(dir: &Path, req: &Request) -> Result<OwnedFd, String> {
    // Mount options are comma-separated and fusermount3 splits on commas: keep them out.
    let fsname = req.fsname.replace([',', '\\'], "_");
    match mount_directly(dir, &fsname, req) {
        Ok(fd) => return Ok(fd),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {}
        Err(e) => return Err(e.to_string()),
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && !host_root() {
        // fusermount3's setuid bit does nothing where host root is unmapped.
        return Err(
            "mounting inside a user namespace needs that namespace to own a mount namespace \
             (`unshare --user --map-root-user --mount`, `podman unshare`), and /dev/fuse \
             readable by the user (mode 0666, as udev sets it)"
                .into(),
        );
    }
    via_fusermount(dir, &fsname, req)
}

/// mount(2) with a descriptor of our own: root, or root of a user namespace.
fn mount_directly(dir: &Path, fsname: &str, req: &Request) -> io::Result<OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    let host = host_root();
    let root_mode = std::fs::metadata(dir)?.mode() & libc::S_IFMT;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let fd = OwnedFd::from(dev);
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={uid},group_id={gid}",
        fd.as_raw_fd()
    );
    if req.allow_other {
        data.push_str(",allow_other");
    }
    if host {
        // The host's users may reach it: the kernel enforces the image's modes (and ACLs).
        data.push_str(",default_permissions");
    }
    let mut flags = libc::MS_NOATIME;
    if req.read_only {
        flags |= libc::MS_RDONLY;
    }
    if !host {
        flags |= libc::MS_NODEV | libc::MS_NOSUID;
    }
    let c = |s: &[u8]| std::ffi::CString::new(s).map_err(|_| io::Error::other("NUL in path"));
    let (source, target) = (
        c(fsname.as_bytes())?,
        c(dir.as_os_str().as_encoded_bytes())?,
    );
    let data = c(data.as_bytes())?;
    // SAFETY: valid NUL-terminated strings; the descriptor stays open across the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"fuse.bux-fuse".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The setuid helper's protocol: it mounts, then sends the descriptor over the socket named by
/// `_FUSE_COMMFD`.
fn via_fusermount(dir: &Path, fsname: &str, req: &Request) -> Result<OwnedFd, String> {
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let mut opts = format!("noatime,exec,fsname={fsname},subtype=bux-fuse");
    if req.read_only {
        opts.insert_str(0, "ro,");
    }
    if req.allow_other {
        opts.push_str(",allow_other");
    }
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(fusermount_path());
    cmd.arg("-o")
        .arg(opts)
        .arg("--")
        .arg(dir)
        .env("_FUSE_COMMFD", theirs_fd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only fcntl (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("running fusermount3 (install fuse3, or mount as root): {e}"))?;
    drop(theirs);
    let received = receive_fd(&ours);
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for fusermount3: {e}"))?;
    match received {
        Ok(fd) if out.status.success() => Ok(fd),
        _ => {
            let msg = String::from_utf8_lossy(&out.stderr);
            let msg = msg.trim().trim_start_matches("fusermount3: ");
            Err(if msg.is_empty() {
                format!("fusermount3 failed ({})", out.status)
            } else if msg.contains("/dev/fuse: Permission denied") {
                // udev's default rules make it 0666; hosts without udev keep the kernel's 0600.
                format!("{msg} (users need /dev/fuse mode 0666, as udev sets it: `chmod 0666 /dev/fuse` as root)")
            } else {
                msg.to_string()
            })
        }
    }
}

fn fusermount_path() -> std::ffi::OsString {
    std::env::var_os("FUSERMOUNT_PATH").unwrap_or_else(|| "fusermount3".into())
}

/// One descriptor passed with SCM_RIGHTS (EOF: the helper failed and said why on stderr).
fn receive_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one cmsghdr carrying one int, aligned as the kernel wants.
    let mut control = [0u64; 8];
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    loop {
        // SAFETY: msg describes live buffers.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // SAFETY: msg was filled by recvmsg; CMSG_* walk its control buffer.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return Ok(OwnedFd::from_raw_fd(fd));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "fusermount3 sent no descriptor",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_a_descriptor() {
        // The receiving half of the fusermount3 protocol, against a sender in this process.
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/mountinfo").unwrap();
        let fd = file.as_raw_fd();
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut control = [0u64; 8];
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
            assert_eq!(libc::sendmsg(a.as_raw_fd(), &msg, 0), 1);
        }
        let got = receive_fd(&b).unwrap();
        let mut s = String::new();
        use std::io::Read;
        std::fs::File::from(got).read_to_string(&mut s).unwrap();
        assert!(
            s.contains(" / "),
            "the received descriptor reads the same file"
        );
        drop(a);
        assert!(
            receive_fd(&b).is_err(),
            "EOF without a descriptor is an error"
        );
    }
}
