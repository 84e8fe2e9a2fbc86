//! How the writable layer of a user's mount is kept on disk.
//!
//! An unprivileged daemon can create only directories and regular files it owns, so everything
//! else is recorded beside them (the upper directory reads as an OCI layer diff):
//! - the served owner, mode (with the file type) and device number are the xattr
//!   [`STAT_XATTR`]: `uid:gid:mode:rdev`, mode in octal with its type bits;
//! - symlinks, fifos, sockets and devices are regular files: a symlink's target is its
//!   content;
//! - the guest's xattrs (any namespace: `security.*` and `trusted.*` too) are stored under
//!   [`XATTR_PREFIX`];
//! - a deleted image entry is a whiteout file `.wh.NAME`; a directory whose image contents are
//!   hidden holds `.wh..wh..opq` (the OCI layer conventions);
//! - an image directory renamed elsewhere records the image path it came from in
//!   [`REDIRECT_XATTR`], so its image contents follow it.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub const STAT_XATTR: &str = "user.bux-fuse.stat";
pub const XATTR_PREFIX: &[u8] = b"user.bux-fuse.x.";
pub const REDIRECT_XATTR: &str = "user.bux-fuse.redirect";
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
pub const OPAQUE: &str = ".wh..wh..opq";

/// Owner, mode (with type bits) and device number as served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub rdev: u32,
}

impl Stat {
    pub fn encode(&self) -> String {
        format!("{}:{}:{:o}:{}", self.uid, self.gid, self.mode, self.rdev)
    }

    pub fn decode(s: &[u8]) -> Option<Stat> {
        let s = std::str::from_utf8(s).ok()?;
        let mut f = s.split(':');
        let stat = Stat {
            uid: f.next()?.parse().ok()?,
            gid: f.next()?.parse().ok()?,
            mode: u32::from_str_radix(f.next()?, 8).ok()?,
            rdev: f.next()?.parse().ok()?,
        };
        (f.next().is_none() && stat.mode & libc::S_IFMT != 0).then_some(stat)
    }
}

/// Mode of every file in the upper directory: the served mode is [`STAT_XATTR`], and the
/// guest's `/etc/shadow` or keys must not be readable by other host users.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory in the upper directory (the guest's `/root` is 0700 too).
pub const DIR_MODE: u32 = 0o700;

/// Opens `path` for reading and writing, created owner-only if missing (truncated if
/// `truncate`, refused if there if `new`).
pub fn create_file(path: &Path, new: bool, truncate: bool) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true).mode(FILE_MODE);
    if new {
        o.create_new(true);
    } else {
        o.create(true).truncate(truncate);
    }
    o.open(path)
}

/// Makes directory `path`, owner-only (`recursive`: and its missing parents).
pub fn create_dir(path: &Path, recursive: bool) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(recursive)
        .mode(DIR_MODE)
        .create(path)
}

/// A descriptor of directory `path` that paths can go through (`/proc/self/fd/N/...`) and
/// that follows the directory wherever it is renamed.
pub fn open_dir_path(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let p = c_path(path)?;
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid C string; the descriptor returned is ours alone.
    let fd = unsafe { libc::open(p.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Removes whatever an interrupted operation left at the temporary name `tmp`.
pub fn clear(tmp: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(tmp) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(tmp),
        Ok(_) => std::fs::remove_file(tmp),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Moves `tmp`, made and described in full (its [`STAT_XATTR`] set), into place at `to`: a
/// crash leaves either nothing or the whole entry, never one the host would describe (a
/// host-owned file, a symlink or device as a plain file). `tmp` is removed if that fails.
pub fn publish(tmp: &Path, to: &Path) -> io::Result<()> {
    debug_assert!(
        matches!(get_xattr(tmp, STAT_XATTR.as_bytes()), Ok(Some(_))),
        "{} published without its stat",
        to.display()
    );
    std::fs::rename(tmp, to).inspect_err(|_| {
        let _ = clear(tmp);
    })
}

/// The name of a whiteout for `name`.
pub fn whiteout_name(name: &[u8]) -> std::ffi::OsString {
    OsStr::from_bytes(&[WHITEOUT_PREFIX, name].concat()).to_os_string()
}

/// Names that are our bookkeeping, never served.
pub fn is_reserved(name: &[u8]) -> bool {
    name.starts_with(WHITEOUT_PREFIX)
}

/// The start of our hidden files' names (orphans, staged copies, replaced directories,
/// temporary names), which are kept as whiteouts of these names.
const OURS: &[u8] = b".bux-fuse-";

/// Names refused to new entries (EINVAL): besides our bookkeeping, names whose whiteout would
/// be one of our hidden files: making one removes its "whiteout", which would be, say, the
/// data of a file unlinked while open.
pub fn is_refused_for_new(name: &[u8]) -> bool {
    is_reserved(name) || name.starts_with(OURS)
}

fn c_path(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("NUL in path"))
}

/// One xattr of `path` (not following symlinks; there are none in the upper directory).
pub fn get_xattr(path: &Path, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let p = c_path(path)?;
    let n = std::ffi::CString::new(name).map_err(|_| io::Error::other("NUL in name"))?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: valid C strings; buf is writable for its length.
        let r =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < (1 << 16) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

pub fn set_xattr(path: &Path, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    let p = c_path(path)?;
    let n = std::ffi::CString::new(name).map_err(|_| io::Error::other("NUL in name"))?;
    // SAFETY: valid C strings and value buffer.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn remove_xattr(path: &Path, name: &[u8]) -> io::Result<()> {
    let p = c_path(path)?;
    let n = std::ffi::CString::new(name).map_err(|_| io::Error::other("NUL in name"))?;
    // SAFETY: valid C strings.
    if unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Every xattr name of `path`.
pub fn list_xattrs(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let p = c_path(path)?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: valid C string; buf is writable for its length.
        let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf
                .split(|&b| b == 0)
                .filter(|n| !n.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

/// The served stat of an upper entry: its [`STAT_XATTR`], else what the host says.
pub fn stat_of(path: &Path, md: &std::fs::Metadata) -> Stat {
    use std::os::unix::fs::MetadataExt;
    if let Ok(Some(v)) = get_xattr(path, STAT_XATTR.as_bytes()) {
        if let Some(s) = Stat::decode(&v) {
            return s;
        }
    }
    Stat {
        uid: md.uid(),
        gid: md.gid(),
        mode: md.mode(),
        rdev: md.rdev() as u32,
    }
}

/// Up to `size` bytes of `f` at `offset` (fewer only at its end).
pub fn read_at_most(f: &std::fs::File, offset: u64, size: u32) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; size as usize];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_published_with_its_stat() {
        let d = tempfile::tempdir().unwrap();
        let (tmp, to) = (d.path().join(".wh.tmp"), d.path().join("to"));
        create_dir(&tmp, false).unwrap();
        create_file(&tmp.join("inside"), true, false).unwrap();
        let s = Stat {
            uid: 0,
            gid: 0,
            mode: libc::S_IFDIR | 0o700,
            rdev: 0,
        };
        set_xattr(&tmp, STAT_XATTR.as_bytes(), s.encode().as_bytes(), 0).unwrap();
        publish(&tmp, &to).unwrap();
        assert!(!tmp.exists() && to.join("inside").exists());
        let md = std::fs::symlink_metadata(&to).unwrap();
        assert_eq!(stat_of(&to, &md), s);
        // A failed move leaves nothing behind at the temporary name.
        create_file(&tmp, true, false).unwrap();
        set_xattr(&tmp, STAT_XATTR.as_bytes(), s.encode().as_bytes(), 0).unwrap();
        assert!(publish(&tmp, &d.path().join("missing/to")).is_err());
        assert!(!tmp.exists());
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "published without its stat")]
    fn an_entry_without_its_stat_is_not_published() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join(".wh.tmp");
        create_file(&tmp, true, false).unwrap();
        let _ = publish(&tmp, &d.path().join("to"));
    }

    #[test]
    fn stat_round_trips_and_rejects_junk() {
        let s = Stat {
            uid: 1234,
            gid: 5678,
            mode: libc::S_IFCHR | 0o620,
            rdev: 0x0103,
        };
        assert_eq!(Stat::decode(s.encode().as_bytes()), Some(s));
        for junk in ["", "1:2:3", "1:2:0644:0", "a:b:c:d", "1:2:100644:0:9"] {
            assert_eq!(Stat::decode(junk.as_bytes()), None, "{junk}");
        }
    }
}
