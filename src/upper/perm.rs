//! Permission checks for requests from users other than the mount's owner.
//!
//! A user's mount has no `default_permissions`: the owner is the VMM, whose guest enforces the
//! image's owners and modes itself, so its requests are never checked. With `--allow-other`,
//! anyone else on the host reaches the mount too (root, or a second user), and for them the
//! kernel checks nothing but an exec's x bits (FUSE leaves everything else to the server). So
//! their requests are checked here against the served owners and modes, as a kernel checks a
//! local filesystem's. The kernel still does what the VFS does for every filesystem from the
//! attributes it caches (sticky directories on delete and rename, `protected_hardlinks`,
//! `trusted.*` xattrs); doing those again here is harmless.

use fuser::{Errno, FileAttr, FileType, OpenAccMode, OpenFlags, Request, TimeOrNow};

use super::{Res, State, Upper};
use crate::tree::ROOT_INO;

/// Bits of a mode class a request needs (as in `rwx`).
pub(super) const R: u32 = 4;
pub(super) const W: u32 = 2;
pub(super) const X: u32 = 1;

/// The open flag of an exec (`__FMODE_EXEC`): the file must be executable by the caller.
const FMODE_EXEC: i32 = 0x20;

/// Someone other than the owner, as the checks need them: fsuid, fsgid and supplementary
/// groups (a FUSE request carries no groups: they are read from the caller's /proc entry).
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl Caller {
    /// The caller of `req`, or `None` when it is the mount's `owner` (never checked).
    pub fn of(req: &Request, owner: u32) -> Option<Caller> {
        if req.uid() == owner {
            return None;
        }
        Some(Caller {
            uid: req.uid(),
            gid: req.gid(),
            groups: groups_of(req.pid()),
        })
    }

    /// Root passes the checks a kernel lets CAP_DAC_OVERRIDE, CAP_FOWNER and CAP_CHOWN pass.
    pub fn privileged(&self) -> bool {
        self.uid == 0
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether the caller owns `a` or may act as its owner (chmod, times, sticky deletes).
    pub fn owns(&self, a: &FileAttr) -> bool {
        self.privileged() || self.uid == a.uid
    }

    /// Whether `a`'s mode grants the caller every bit of `want` ([`R`] | [`W`] | [`X`]).
    pub fn may(&self, a: &FileAttr, want: u32) -> bool {
        if self.privileged() {
            // Everything, but exec of a non-directory no one may execute.
            return want & X == 0 || a.kind == FileType::Directory || a.perm & 0o111 != 0;
        }
        let perm = u32::from(a.perm);
        let class = if self.uid == a.uid {
            perm >> 6
        } else if self.in_group(a.gid) {
            perm >> 3
        } else {
            perm
        };
        class & want == want
    }

    /// `EACCES` unless [`Caller::may`].
    pub fn need(&self, a: &FileAttr, want: u32) -> Result<(), Errno> {
        self.need_with(a, None, want)
    }

    /// [`Caller::may`] for a file with access ACL `acl` (`system.posix_acl_access` as the
    /// kernel stores it), decided as the kernel's `posix_acl_permission` does. The entries a
    /// chmod rewrites (owner, mask or owning group, other) are taken from the mode, which
    /// chmod(2) here changes without the stored ACL.
    pub fn may_with(&self, a: &FileAttr, acl: Option<&[u8]>, want: u32) -> bool {
        if self.privileged() {
            return self.may(a, want);
        }
        let Some(entries) = acl.and_then(acl_entries) else {
            return self.may(a, want);
        };
        let perm = u32::from(a.perm);
        let mask = entries
            .iter()
            .any(|e| e.0 == ACL_MASK)
            .then_some((perm >> 3) & 7);
        if self.uid == a.uid {
            return (perm >> 6) & want == want;
        }
        let within = |p: u32| p & mask.unwrap_or(7) & want == want;
        if let Some(e) = entries.iter().find(|e| e.0 == ACL_USER && e.2 == self.uid) {
            return within(e.1);
        }
        let mut found = false;
        for &(tag, p, id) in &entries {
            let p = match tag {
                ACL_GROUP_OBJ if mask.is_none() => (perm >> 3) & 7,
                _ => p,
            };
            let member = match tag {
                ACL_GROUP_OBJ => self.in_group(a.gid),
                ACL_GROUP => self.in_group(id),
                _ => false,
            };
            if member {
                found = true;
                if p & want == want {
                    return within(p);
                }
            }
        }
        !found && perm & 7 & want == want
    }

    /// `EACCES` unless [`Caller::may_with`].
    pub fn need_with(&self, a: &FileAttr, acl: Option<&[u8]>, want: u32) -> Result<(), Errno> {
        match self.may_with(a, acl, want) {
            true => Ok(()),
            false => Err(Errno::EACCES),
        }
    }

    /// A sticky directory `dir` lets only the owner of `victim` or of `dir` remove or rename
    /// it (`EPERM`).
    pub fn sticky(&self, dir: &FileAttr, victim: &FileAttr) -> Result<(), Errno> {
        let sticky = u32::from(dir.perm) & libc::S_ISVTX != 0;
        if sticky && !self.owns(victim) && !self.owns(dir) {
            return Err(Errno::EPERM);
        }
        Ok(())
    }
}

const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
/// The xattr of a file's access ACL.
const ACL_ACCESS: &[u8] = b"system.posix_acl_access";

/// An access ACL's entries (tag, permission bits, id), or `None` for a value that is not one
/// (the mode bits then decide).
fn acl_entries(v: &[u8]) -> Option<Vec<(u16, u32, u32)>> {
    let (version, rest) = v.split_at_checked(4)?;
    if version != 2u32.to_le_bytes() || rest.len() % 8 != 0 || rest.is_empty() {
        return None;
    }
    Some(
        rest.chunks_exact(8)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u32::from(u16::from_le_bytes([e[2], e[3]])) & 7,
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect(),
    )
}

/// The supplementary groups of process (or thread) `pid`, from its `Groups:` line; none if it
/// is gone or unreadable (the checks then use its gid alone).
fn groups_of(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What a setattr asks, as its checks need it.
pub(super) struct Change {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// A size change by path (truncate(2)); one through an open file (ftruncate(2), O_TRUNC)
    /// was checked at open.
    pub truncate: bool,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

impl Caller {
    /// Checks a setattr of `a` as Linux's chown(2), chmod(2), truncate(2) and utimensat(2) do
    /// (in that order), and returns the mode to set: chmod by someone outside the file's
    /// group drops its setgid bit.
    #[cfg(test)]
    pub fn setattr(&self, a: &FileAttr, c: &Change) -> Result<Option<u32>, Errno> {
        self.setattr_with(a, None, c)
    }

    /// [`Caller::setattr`] of a file with access ACL `acl` (see [`Caller::may_with`]).
    pub fn setattr_with(
        &self,
        a: &FileAttr,
        acl: Option<&[u8]>,
        c: &Change,
    ) -> Result<Option<u32>, Errno> {
        if self.privileged() {
            return Ok(c.mode);
        }
        if let Some(u) = c.uid {
            if u != a.uid || self.uid != a.uid {
                return Err(Errno::EPERM);
            }
        }
        if let Some(g) = c.gid {
            if self.uid != a.uid || (g != a.gid && !self.in_group(g)) {
                return Err(Errno::EPERM);
            }
        }
        let mut mode = c.mode;
        if let Some(m) = c.mode {
            let perm = u32::from(a.perm);
            // The kernel sends a mode that only drops setuid, setgid or both when a write or
            // chown by someone else must clear them: that needs no ownership. (With setgid
            // but no group exec, a write kills setuid alone and asks to keep setgid.)
            let dropped = perm & !m & 0o7777;
            let kills = m & 0o7777 & !perm == 0
                && dropped != 0
                && dropped & !(libc::S_ISUID | libc::S_ISGID) == 0;
            if self.uid != a.uid && !(kills && self.may_with(a, acl, W)) {
                return Err(Errno::EPERM);
            }
            // Linux's setattr_copy: for every kind of inode, directories included.
            let group = c.gid.unwrap_or(a.gid);
            if !self.in_group(group) {
                mode = Some(m & !libc::S_ISGID);
            }
        }
        if c.truncate {
            self.need_with(a, acl, W)?;
        }
        let now = |t: &Option<TimeOrNow>| matches!(t, Some(TimeOrNow::Now));
        match (
            c.atime.is_some() || c.mtime.is_some(),
            now(&c.atime) && now(&c.mtime),
        ) {
            // touch: the owner or anyone who may write.
            (true, true) if self.uid != a.uid => self.need_with(a, acl, W)?,
            // Times of one's choosing (or one of them now): the owner only.
            (true, false) if self.uid != a.uid => return Err(Errno::EPERM),
            _ => {}
        }
        Ok(mode)
    }
}

impl Upper {
    /// The caller of `req` when its requests are checked (it is not the mount's owner).
    pub(super) fn checked(&self, req: &Request) -> Option<Caller> {
        Caller::of(req, self.owner)
    }

    /// `EACCES` unless `c` may search directory `dir` and every directory above it (the
    /// kernel sends no lookup for a name it caches, so the path is checked at each request;
    /// a directory has one path).
    pub(super) fn search(&self, st: &State, c: &Caller, mut dir: u64) -> Res<()> {
        loop {
            self.need_node(st, c, dir, X)?;
            if dir == ROOT_INO {
                return Ok(());
            }
            dir = self.node(st, dir)?.links.first().ok_or(Errno::ENOENT)?.0;
        }
    }

    /// `EACCES` unless `c` may reach node `n` through one of its names (which one the caller
    /// used is unknown: any will do).
    pub(super) fn reach(&self, st: &State, c: &Caller, n: u64) -> Res<()> {
        if n == ROOT_INO {
            return Ok(());
        }
        let node = self.node(st, n)?;
        let mut r = Ok(());
        for &(parent, _) in &node.links {
            r = self.search(st, c, parent);
            if r.is_ok() {
                break;
            }
        }
        r
    }

    /// `EACCES` unless `c` may add or remove names in directory `dir`.
    pub(super) fn may_change_in(&self, st: &State, c: &Caller, dir: u64) -> Res<()> {
        self.search(st, c, dir)?;
        self.need_node(st, c, dir, W)
    }

    /// The access ACL of node `n`, if it has one.
    fn acl(&self, st: &State, n: u64) -> Option<Vec<u8>> {
        if let Ok(Some(i)) = self.image_inode(st, n) {
            return i.xattrs.get(ACL_ACCESS).map(<[u8]>::to_vec);
        }
        let key = [super::disk::XATTR_PREFIX, ACL_ACCESS].concat();
        super::disk::get_xattr(&self.path(st, n).ok()?, &key)
            .ok()
            .flatten()
    }

    /// `EACCES` unless `c` may do `want` to node `n` by its mode and access ACL.
    pub(super) fn need_node(&self, st: &State, c: &Caller, n: u64, want: u32) -> Res<()> {
        let a = self.attr(st, n)?;
        if c.privileged() {
            return c.need(&a, want);
        }
        c.need_with(&a, self.acl(st, n).as_deref(), want)
    }

    /// What unlink, rmdir and rename check before removing `victim` from `dir`: write to
    /// `dir`, and the sticky bit.
    pub(super) fn may_remove(&self, st: &State, c: &Caller, dir: u64, victim: u64) -> Res<()> {
        self.may_change_in(st, c, dir)?;
        c.sticky(&self.attr(st, dir)?, &self.attr(st, victim)?)
    }

    /// Checks `req`'s setattr of node `n` (see [`Caller::setattr`]); returns the mode to set.
    pub(super) fn check_setattr(&self, req: &Request, n: u64, change: &Change) -> Res<Option<u32>> {
        let Some(c) = self.checked(req) else {
            return Ok(change.mode);
        };
        let st = self.state();
        self.reach(&st, &c, n)?;
        c.setattr_with(&self.attr(&st, n)?, self.acl(&st, n).as_deref(), change)
    }

    /// Checks `req`'s open (or opendir) of node `n` with `flags`.
    pub(super) fn check_open(&self, req: &Request, n: u64, flags: OpenFlags) -> Res<()> {
        let Some(c) = self.checked(req) else {
            return Ok(());
        };
        let mut want = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => R,
            OpenAccMode::O_WRONLY => W,
            OpenAccMode::O_RDWR => R | W,
        };
        if flags.0 & libc::O_TRUNC != 0 {
            want |= W;
        }
        if flags.0 & FMODE_EXEC != 0 {
            want |= X;
        }
        let st = self.state();
        self.may_use(&st, &c, n, want)
    }

    /// Checks `req`'s reading ([`R`]) or changing ([`W`]) xattr `name` of node `n`. The
    /// kernel itself keeps `trusted.*` to root; `security.*` and `system.*` are left to the
    /// filesystem, and this one takes them from anyone who reaches the file (as no LSM here
    /// asks otherwise).
    pub(super) fn check_xattr(&self, req: &Request, n: u64, name: &[u8], want: u32) -> Res<()> {
        let Some(c) = self.checked(req) else {
            return Ok(());
        };
        let st = self.state();
        if name.starts_with(b"security.") || name.starts_with(b"system.") {
            return self.reach(&st, &c, n);
        }
        self.may_use(&st, &c, n, want)
    }

    /// `EACCES` unless `req`'s caller, if checked, reaches node `n` (readlink(2) and
    /// listxattr(2) need nothing more: search on the path).
    pub(super) fn check_reach(&self, st: &State, req: &Request, n: u64) -> Res<()> {
        match self.checked(req) {
            Some(c) => self.reach(st, &c, n),
            None => Ok(()),
        }
    }

    /// What `c` may do to node `n` ([`R`] | [`W`] | [`X`]), reached by a path.
    pub(super) fn may_use(&self, st: &State, c: &Caller, n: u64, want: u32) -> Res<()> {
        self.reach(st, c, n)?;
        self.need_node(st, c, n, want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: FileType, perm: u16, uid: u32, gid: u32) -> FileAttr {
        FileAttr {
            ino: fuser::INodeNo(2),
            size: 0,
            blocks: 0,
            atime: std::time::UNIX_EPOCH,
            mtime: std::time::UNIX_EPOCH,
            ctime: std::time::UNIX_EPOCH,
            crtime: std::time::UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        Caller {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn modes_grant_by_class_and_root_passes_but_for_exec() {
        let f = attr(FileType::RegularFile, 0o640, 10, 20);
        assert!(caller(10, 1, &[]).may(&f, R | W));
        assert!(!caller(10, 1, &[]).may(&f, X));
        assert!(caller(11, 1, &[20]).may(&f, R) && !caller(11, 1, &[20]).may(&f, W));
        assert!(!caller(11, 1, &[]).may(&f, R));
        // The owner class decides for the owner, even when the group class grants more.
        let g = attr(FileType::RegularFile, 0o070, 10, 20);
        assert!(!caller(10, 20, &[]).may(&g, R));
        assert!(caller(0, 0, &[]).may(&f, R | W) && !caller(0, 0, &[]).may(&f, X));
        let d = attr(FileType::Directory, 0o000, 10, 20);
        assert!(caller(0, 0, &[]).may(&d, R | W | X));
    }

    #[test]
    fn an_access_acl_decides_as_the_kernels() {
        let acl = |e: &[(u16, u16, u32)]| -> Vec<u8> {
            let mut v = 2u32.to_le_bytes().to_vec();
            for (tag, perm, id) in e {
                v.extend_from_slice(&tag.to_le_bytes());
                v.extend_from_slice(&perm.to_le_bytes());
                v.extend_from_slice(&id.to_le_bytes());
            }
            v
        };
        const ANY: u32 = u32::MAX;
        // user::rw- user:11:rw- group::--- group:30:r-- mask::rw- other::---, mode 0660.
        let a = acl(&[
            (1, 6, ANY),
            (2, 6, 11),
            (4, 0, ANY),
            (8, 4, 30),
            (0x10, 6, ANY),
            (0x20, 0, ANY),
        ]);
        let f = attr(FileType::RegularFile, 0o660, 10, 20);
        let may = |c: &Caller, want| c.may_with(&f, Some(&a), want);
        assert!(may(&caller(10, 1, &[]), R | W));
        assert!(may(&caller(11, 1, &[]), R | W));
        assert!(
            !may(&caller(12, 20, &[]), R),
            "the owning group's entry is ---"
        );
        assert!(may(&caller(12, 1, &[30]), R) && !may(&caller(12, 1, &[30]), W));
        // A group entry that grants nothing denies, though other would grant.
        let o = attr(FileType::RegularFile, 0o664, 10, 20);
        assert!(!caller(12, 20, &[]).may_with(&o, Some(&a), R));
        assert!(caller(12, 1, &[]).may_with(&o, Some(&a), R));
        // The mask is the mode's group bits (chmod 600 took user 11's rw away).
        let tight = attr(FileType::RegularFile, 0o600, 10, 20);
        assert!(!caller(11, 1, &[]).may_with(&tight, Some(&a), R));
        // No ACL, or not one: the mode.
        assert!(caller(12, 20, &[]).may_with(&f, None, R));
        assert!(caller(12, 20, &[]).may_with(&f, Some(b"junk"), R));
    }

    #[test]
    fn setattr_follows_linux() {
        let f = attr(FileType::RegularFile, 0o2755, 10, 20);
        let none = Change {
            mode: None,
            uid: None,
            gid: None,
            truncate: false,
            atime: None,
            mtime: None,
        };
        let other = caller(11, 11, &[]);
        let owner = caller(10, 10, &[]);
        let chown = |u, g| Change {
            uid: u,
            gid: g,
            ..none
        };
        assert_eq!(other.setattr(&f, &chown(Some(11), None)), Err(Errno::EPERM));
        assert_eq!(owner.setattr(&f, &chown(Some(11), None)), Err(Errno::EPERM));
        assert_eq!(owner.setattr(&f, &chown(Some(10), None)), Ok(None));
        assert_eq!(owner.setattr(&f, &chown(None, Some(30))), Err(Errno::EPERM));
        assert_eq!(
            caller(10, 10, &[30]).setattr(&f, &chown(None, Some(30))),
            Ok(None)
        );
        let chmod = |m| Change {
            mode: Some(m),
            ..none
        };
        assert_eq!(other.setattr(&f, &chmod(0o644)), Err(Errno::EPERM));
        // Outside the file's group, setgid goes.
        assert_eq!(owner.setattr(&f, &chmod(0o2700)), Ok(Some(0o700)));
        assert_eq!(
            caller(10, 20, &[]).setattr(&f, &chmod(0o2700)),
            Ok(Some(0o2700))
        );
        // Clearing setgid (a write by someone else) needs write permission, not ownership.
        assert_eq!(other.setattr(&f, &chmod(0o755)), Err(Errno::EPERM));
        let shared = attr(FileType::RegularFile, 0o2757, 10, 20);
        assert_eq!(other.setattr(&shared, &chmod(0o757)), Ok(Some(0o757)));
        // A write by someone else to a setuid file with setgid but no group exec: the
        // kernel asks to drop setuid alone; the writer outside the group loses setgid too.
        let odd = attr(FileType::RegularFile, 0o6646, 10, 20);
        assert_eq!(other.setattr(&odd, &chmod(0o2646)), Ok(Some(0o646)));
        assert_eq!(other.setattr(&odd, &chmod(0o646)), Ok(Some(0o646)));
        assert_eq!(other.setattr(&odd, &chmod(0o6656)), Err(Errno::EPERM));
        assert_eq!(other.setattr(&odd, &chmod(0o2606)), Err(Errno::EPERM));
        // chmod outside the group drops setgid from a directory too.
        let d = attr(FileType::Directory, 0o755, 10, 20);
        assert_eq!(owner.setattr(&d, &chmod(0o2755)), Ok(Some(0o755)));
        let times = |a, m| Change {
            atime: a,
            mtime: m,
            ..none
        };
        let now = Some(TimeOrNow::Now);
        let then = Some(TimeOrNow::SpecificTime(std::time::UNIX_EPOCH));
        let writable = attr(FileType::RegularFile, 0o666, 10, 20);
        assert_eq!(other.setattr(&writable, &times(now, now)), Ok(None));
        assert_eq!(other.setattr(&f, &times(now, now)), Err(Errno::EACCES));
        assert_eq!(
            other.setattr(&writable, &times(then, None)),
            Err(Errno::EPERM)
        );
        assert_eq!(owner.setattr(&f, &times(then, then)), Ok(None));
        let truncate = Change {
            truncate: true,
            ..none
        };
        assert_eq!(other.setattr(&f, &truncate), Err(Errno::EACCES));
        assert_eq!(other.setattr(&writable, &truncate), Ok(None));
    }
}
