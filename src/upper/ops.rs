//! The FUSE operations of [`UpperFs`].

use fuser::{
    AccessFlags, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, WriteFlags,
};

use std::sync::atomic::Ordering;

use super::pages;
use super::*;

/// The handle of a file opened read-only (others are 0).
const READ_ONLY: FileHandle = FileHandle(1);
/// The handle of an image file opened read-only with direct I/O, read through the shared mount
/// (its release is not counted as a read-only handle's: `pushed`).
const READ_DIRECT: FileHandle = FileHandle(2);
// A read-only open of an image file read through the shared mount, cached here while open,
// is answered with a handle of its own (`pages::is_cached`): its reads and its release drop
// its pages.

impl Filesystem for UpperFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        self.offered.store(caps.bits(), Ordering::Relaxed);
        // Reading through the shared mount needs opens (to answer them as cached or direct)
        // and releases (to drop a file's pages at its last close).
        let no_open =
            caps.contains(fuser::InitFlags::FUSE_NO_OPEN_SUPPORT) && self.through.is_none();
        self.no_open.store(no_open, Ordering::Relaxed);
        if !self.others {
            // Listings carry their entries' attributes: a walk (`tar`, `ls -l`, `cp -a`) then
            // sends no lookup per entry; and a symlink's target (fixed for the node: a new
            // link is a new node) is read once. Not where others' requests are checked: what
            // the kernel caches is never asked about again, so its permissions would not be.
            // Every listing request, not the kernel's adaptive choice (`READDIRPLUS_AUTO`):
            // that lists a directory's first batch with attributes and the rest without, so a
            // `tar` of the large image looked up 2,774 entries one request each.
            for cap in [
                fuser::InitFlags::FUSE_DO_READDIRPLUS,
                fuser::InitFlags::FUSE_CACHE_SYMLINKS,
            ] {
                let _ = config.add_capabilities(cap);
            }
        }
        if let Some(t) = &self.through {
            // Files opened with direct I/O can be mapped shared only with this (Linux 6.6+;
            // private mappings, ld.so's, always can): without it, none are.
            let mmap = fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
            if config.add_capabilities(mmap).is_err() {
                t.cannot_map_direct();
            }
        }
        Ok(())
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut st = self.state();
        let orphan = st.forget(ino.0, nlookup);
        if st.nodes.get(&ino.0).is_none_or(|node| node.lookups == 0) {
            // The kernel dropped the inode: no open file of it is left, nor its pages.
            self.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop(&ino.0);
            self.pushed.forgotten(ino.0);
        }
        if let Some(orphan) = orphan {
            let _ = std::fs::remove_file(self.root.join(orphan));
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.state();
        let searched = match self.checked(req) {
            Some(c) => self.search(&st, &c, parent.0),
            None => Ok(()),
        };
        let r = searched
            .and_then(|()| self.child(&mut st, parent.0, name.as_bytes()))
            .and_then(|c| c.ok_or(Errno::ENOENT))
            .and_then(|n| {
                let a = self.attr(&st, n)?;
                st.looked_up(n)?; // replied as an entry
                Ok(a)
            });
        drop(st); // journalled before the kernel hears of the node
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(&self.state(), ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let n = ino.0;
        let done = |r: Res<FileAttr>, reply: ReplyAttr| match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        };
        let change = perm::Change {
            mode,
            uid,
            gid,
            // A size through a file opened for writing was checked at its open; one through a
            // file opened read-only is O_TRUNC's (ftruncate(2) refuses such a file).
            truncate: size.is_some()
                && fh.is_none_or(|fh| {
                    fh == READ_ONLY || fh == READ_DIRECT || pages::is_cached(fh.0)
                }),
            atime,
            mtime,
        };
        let mode = match self.check_setattr(req, n, &change) {
            Ok(mode) => mode,
            Err(e) => return reply.error(e),
        };
        // O_TRUNC arrives as a truncation to 0: the image's bytes need not be copied.
        let copies = size != Some(0) && self.copies_bytes(n);
        self.changing(n, size.is_some(), copies, move |fs, staged| {
            let r = staged.and_then(|()| fs.do_setattr(n, mode, uid, gid, size, atime, mtime));
            done(r, reply)
        })
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let st = self.state();
        let r = (|| {
            // The kernel caches no target (no FUSE_CACHE_SYMLINKS): checked at each request.
            self.check_reach(&st, req, ino.0)?;
            self.target_of(&st, ino.0)
        })();
        match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        // Every type is a regular file in the upper directory; the type is metadata.
        let mode = match mode & libc::S_IFMT {
            0 => mode | libc::S_IFREG,
            _ => mode,
        };
        let r = self.make_entry(req, parent.0, name.as_bytes(), mode, umask, rdev, |p, _| {
            disk::create_file(p, true, false).map(drop).map_err(err)
        });
        let r = r.or_else(|e| self.made_before(req, e, parent.0, name, mode, None));
        match r {
            Ok((a, ())) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mode = libc::S_IFDIR | (mode & 0o7777);
        let r = self.make_entry(
            req,
            parent.0,
            name.as_bytes(),
            mode,
            umask,
            0,
            |p, shadowed| {
                disk::create_dir(p, false).map_err(err)?;
                if shadowed {
                    // The image's directory of that name was deleted: its entries stay hidden.
                    disk::create_file(&p.join(disk::OPAQUE), false, true).map_err(err)?;
                }
                Ok(())
            },
        );
        let r = r.or_else(|e| self.made_before(req, e, parent.0, name, mode, None));
        match r {
            Ok((a, ())) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = self.checked(req);
        // The state (and so the journal) let go before the answer.
        let r = self.remove(
            &mut self.state(),
            c.as_ref(),
            parent.0,
            name.as_bytes(),
            false,
        );
        match r {
            Ok(()) => reply.ok(),
            // Done by the worker that died before answering.
            Err(Errno::ENOENT) if resent(req) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = self.checked(req);
        // The state (and so the journal) let go before the answer.
        let r = self.remove(
            &mut self.state(),
            c.as_ref(),
            parent.0,
            name.as_bytes(),
            true,
        );
        match r {
            Ok(()) => reply.ok(),
            // Done by the worker that died before answering.
            Err(Errno::ENOENT) if resent(req) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mode = libc::S_IFLNK | 0o777;
        let r = self.make_entry(req, parent.0, link_name.as_bytes(), mode, 0, 0, |p, _| {
            let f = disk::create_file(p, true, false).map_err(err)?;
            f.write_all_at(target.as_os_str().as_bytes(), 0)
                .map_err(err)
        });
        let target = target.as_os_str().as_bytes();
        let r = r.or_else(|e| self.made_before(req, e, parent.0, link_name, mode, Some(target)));
        match r {
            Ok((a, ())) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        // A file moved is copied up first.
        let moved = self.named(parent.0, name.as_bytes());
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        let c = self.checked(req);
        // Checked before the copy too: a rename never allowed copies nothing.
        if let (Some(c), Some(n)) = (&c, moved) {
            if self.copies_bytes(n) {
                let r =
                    self.check_rename(&mut self.state(), c, parent.0, &name, newparent.0, &newname);
                if let Err(e) = r {
                    return reply.error(e);
                }
            }
        }
        let again = resent(req);
        let rename = move |fs: &Upper, reply: ReplyEmpty| match fs.do_rename(
            c.as_ref(),
            parent.0,
            &name,
            newparent.0,
            &newname,
            flags,
        ) {
            Ok(()) => reply.ok(),
            // Done by the worker that died before answering: the name is gone, the new one
            // there.
            Err(Errno::ENOENT)
                if again
                    && (fs.renamed_before(parent.0, &name, newparent.0, &newname)
                        || fs.named(newparent.0, &newname).is_some()) =>
            {
                reply.ok()
            }
            Err(e) => reply.error(e),
        };
        match moved {
            Some(n) if self.copies_bytes(n) => self.copy_then(n, move |fs, staged| match staged {
                Ok(()) => rename(fs, reply),
                Err(e) => reply.error(e),
            }),
            _ => rename(self, reply),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let n = ino.0;
        let newname = newname.as_bytes().to_vec();
        let c = self.checked(req);
        // Checked before the copy too: a link never allowed copies nothing.
        if let (Some(c), true) = (&c, self.copies_bytes(n)) {
            let r = self.check_link(&mut self.state(), c, n, newparent.0, &newname);
            if let Err(e) = r {
                return reply.error(e);
            }
        }
        let again = resent(req);
        let link = move |fs: &Upper, staged: Res<()>, reply: ReplyEntry| match staged
            .and_then(|()| fs.do_link(c.as_ref(), n, newparent.0, &newname))
        {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            // Done by the worker that died before answering: the new name is this node's.
            Err(Errno::EEXIST) if again && fs.named(newparent.0, &newname) == Some(n) => {
                match fs.entry_of(n) {
                    Ok(a) => reply.entry(&TTL, &a, Generation(0)),
                    Err(e) => reply.error(e),
                }
            }
            Err(e) => reply.error(e),
        };
        if self.copies_bytes(n) {
            return self.copy_then(n, move |fs, staged| link(fs, staged, reply));
        }
        link(self, Ok(()), reply)
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open.load(Ordering::Relaxed) && !self.others {
            // Reads and writes find their file by node; the first write copies up, and
            // O_TRUNC arrives as a truncation.
            return reply.error(Errno::ENOSYS);
        }
        let n = ino.0;
        if let Err(e) = self.check_open(req, n, flags) {
            return reply.error(e);
        }
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        // A later truncation through a read-only file is O_TRUNC's, to be checked then.
        let fh = if write { FileHandle(0) } else { READ_ONLY };
        let truncate = flags.0 & libc::O_TRUNC != 0;
        let open = move |fs: &Upper, staged: Res<()>, reply: ReplyOpen| {
            if write {
                if let Err(e) = staged.and_then(|()| fs.writable_file(n, truncate)) {
                    return reply.error(e);
                }
            }
            if !write && fs.reads_through(n) {
                // Its pages are cached once, in the shared mount: here only while it is read
                // (dropped behind the reader and at the last close), else not at all.
                if fs.pages.cached() {
                    let fh = FileHandle(fs.pages.opened(n));
                    return reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE);
                }
                return reply.opened(READ_DIRECT, FopenFlags::FOPEN_DIRECT_IO);
            }
            if !write {
                fs.push_small(n);
            }
            // Pages stay valid across opens: every write to the file comes through here.
            reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE)
        };
        let copies = write && !truncate && self.open_file(n).is_none() && self.copies_bytes(n);
        self.changing(n, write, copies, move |fs, staged| open(fs, staged, reply))
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mode = libc::S_IFREG | (mode & 0o7777);
        let r = self.make_entry(req, parent.0, name.as_bytes(), mode, umask, 0, |p, _| {
            disk::create_file(p, true, false).map_err(err)
        });
        let r = r.map(|(a, f)| {
            self.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(a.ino.0, Arc::new(f));
            a
        });
        // Made by the worker that died before answering: opened now.
        let r = r.or_else(|e| {
            let (a, ()) = self.made_before(req, e, parent.0, name, mode, None)?;
            self.writable_file(a.ino.0, false).map(|_| a)
        });
        match r {
            Ok(a) => {
                let flags = FopenFlags::FOPEN_KEEP_CACHE;
                reply.created(&TTL, &a, Generation(0), FileHandle(0), flags)
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // The upper file, or the image inode the node shows.
        let at = (|| {
            if let Some(f) = self.open_file(ino.0) {
                return Ok(Ok(f));
            }
            let st = self.state();
            let node = self.node(&st, ino.0)?;
            if !node.upper {
                return Ok(Err(node.lower.ok_or(Errno::EIO)?));
            }
            self.upper_file(&st, ino.0).map(Ok)
        })();
        let f = match at {
            Ok(Ok(f)) => f,
            // As the image's own mount reads it: bytes still to be fetched (or decompressed)
            // are waited for off this FUSE worker.
            Ok(Err(lower)) => {
                if let Some(d) = self.read_through(lower, offset, size) {
                    if pages::is_cached(fh.0) {
                        self.pages.read(ino.0, fh.0, offset, d.len() as u64);
                    }
                    return reply.data(&d);
                }
                let lower = INodeNo(lower);
                return self
                    .lower
                    .read(req, lower, fh, offset, size, flags, lock_owner, reply);
            }
            Err(e) => return reply.error(e),
        };
        match disk::read_at_most(&f, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let n = ino.0;
        let done = |r: Res<()>, len: usize, reply: ReplyWrite| match r {
            Ok(()) => reply.written(len as u32),
            Err(e) => reply.error(e),
        };
        // The first write copies the file up.
        if self.open_file(n).is_none() && self.copies_bytes(n) {
            let data = data.to_vec();
            return self.copy_then(n, move |fs, staged| {
                let r = staged
                    .and_then(|()| fs.writable_file(n, false))
                    .and_then(|f| f.write_all_at(&data, offset).map_err(err));
                done(r, data.len(), reply)
            });
        }
        let r = self
            .writable_file(n, false)
            .and_then(|f| f.write_all_at(data, offset).map_err(err));
        done(r, data.len(), reply)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if pages::is_cached(fh.0) {
            self.pages.released(ino.0, fh.0);
        } else if fh == READ_ONLY {
            self.pushed.closed(ino.0);
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close (writes go straight to the upper file): ENOSYS tells the
        // kernel to stop sending flushes, one round trip less per close.
        reply.error(Errno::ENOSYS);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let f = match self.open_file(ino.0) {
                Some(f) => f,
                None => {
                    let st = self.state();
                    if !self.node(&st, ino.0)?.upper {
                        return Ok(()); // the image's bytes, never written
                    }
                    self.upper_file(&st, ino.0)?
                }
            };
            sync(&f, datasync).map_err(err)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // A guest syncs a directory to make its names durable (after a rename, say): the
        // upper directory's are.
        let r = (|| {
            let dir = {
                let st = self.state();
                if !self.node(&st, ino.0)?.upper {
                    return Ok(()); // the image's entries, never changed
                }
                File::open(self.path(&st, ino.0)?).map_err(err)?
            };
            sync(&dir, datasync).map_err(err)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !self.others {
            // No opendir: the kernel then caches listings (and drops them when a name changes
            // through this mount) and sends no opendir/releasedir round trips.
            return reply.error(Errno::ENOSYS);
        }
        // Others' opens are checked; listings are cached all the same.
        match self.check_open(req, ino.0, flags) {
            Ok(()) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let list = match self.listing_from(ino.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (k, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), k as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let list = match self.listing_from(ino.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let mut st = self.state();
        for (k, (n, _, name)) in list.iter().enumerate().skip(offset as usize) {
            let a = match self.attr(&st, *n) {
                Ok(a) => a,
                Err(Errno::ENOENT) => continue, // gone since the listing was made
                // Not hidden from the listing: the request fails (the entries sent with it
                // counted as lookups the kernel never makes: only kept longer).
                Err(e) => return reply.error(e),
            };
            if reply.add(INodeNo(*n), k as u64 + 1, name, &TTL, &a, Generation(0)) {
                break; // full: this one was not sent
            }
            // Sent as an entry, which the kernel counts as a lookup (not "." and "..", which
            // it never links).
            if k >= 2 {
                let _ = st.looked_up(*n);
            }
        }
        drop(st);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let p = std::ffi::CString::new(self.root.as_os_str().as_bytes()).unwrap_or_default();
        // SAFETY: statvfs fills the zeroed struct.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(p.as_ptr(), &mut s) } != 0 {
            return reply.error(err(std::io::Error::last_os_error()));
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            255,
            s.f_frsize as u32,
        );
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let n = ino.0;
        if let Err(e) = self.check_xattr(req, n, name.as_bytes(), perm::W) {
            return reply.error(e);
        }
        let key = [disk::XATTR_PREFIX, name.as_bytes()].concat();
        let value = value.to_vec();
        let set = move |fs: &Upper, staged: Res<()>, reply: ReplyEmpty| {
            let r = staged.and_then(|()| {
                let mut st = fs.state();
                fs.copy_up(&mut st, n)?;
                let path = fs.path(&st, n)?;
                disk::set_xattr(&path, &key, &value, flags).map_err(err)
            });
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        };
        if self.copies_bytes(n) {
            return self.copy_then(n, move |fs, staged| set(fs, staged, reply));
        }
        set(self, Ok(()), reply)
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if let Err(e) = self.check_xattr(req, ino.0, name.as_bytes(), perm::R) {
            return reply.error(e);
        }
        let st = self.state();
        let r = (|| {
            if let Some(i) = self.image_inode(&st, ino.0)? {
                return i
                    .xattrs
                    .iter()
                    .find(|(k, _)| *k == name.as_bytes())
                    .map(|(_, v)| v.to_vec())
                    .ok_or(Errno::NO_XATTR);
            }
            let key = [disk::XATTR_PREFIX, name.as_bytes()].concat();
            disk::get_xattr(&self.path(&st, ino.0)?, &key)
                .map_err(err)?
                .ok_or(Errno::NO_XATTR)
        })();
        match r {
            Ok(v) => ImageFs::xattr_reply(&v, size, reply),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let st = self.state();
        let r = (|| {
            self.check_reach(&st, req, ino.0)?;
            let names: Vec<Vec<u8>> = match self.image_inode(&st, ino.0)? {
                Some(i) => i.xattrs.iter().map(|(k, _)| k.to_vec()).collect(),
                None => disk::list_xattrs(&self.path(&st, ino.0)?)
                    .map_err(err)?
                    .into_iter()
                    .filter_map(|n| n.strip_prefix(disk::XATTR_PREFIX).map(<[u8]>::to_vec))
                    .collect(),
            };
            Ok(names
                .iter()
                .flat_map(|n| n.iter().copied().chain([0]))
                .collect::<Vec<u8>>())
        })();
        match r {
            Ok(v) => ImageFs::xattr_reply(&v, size, reply),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let n = ino.0;
        if let Err(e) = self.check_xattr(req, n, name.as_bytes(), perm::W) {
            return reply.error(e);
        }
        let key = [disk::XATTR_PREFIX, name.as_bytes()].concat();
        let remove = move |fs: &Upper, staged: Res<()>, reply: ReplyEmpty| {
            let r = staged.and_then(|()| {
                let mut st = fs.state();
                fs.copy_up(&mut st, n)?;
                disk::remove_xattr(&fs.path(&st, n)?, &key).map_err(err)
            });
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        };
        if self.copies_bytes(n) {
            return self.copy_then(n, move |fs, staged| remove(fs, staged, reply));
        }
        remove(self, Ok(()), reply)
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // No checks for the owner: its guest enforces the owners and modes it is served.
        let st = self.state();
        let r = match self.checked(req) {
            Some(c) => self.may_use(&st, &c, ino.0, (mask.bits() & 7) as u32),
            None => self.attr(&st, ino.0).map(drop),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// fsync(2) or fdatasync(2) of an upper file or directory, as the guest asked.
fn sync(f: &File, datasync: bool) -> std::io::Result<()> {
    if datasync {
        f.sync_data()
    } else {
        f.sync_all()
    }
}

/// Whether the kernel sends `req` again (`FUSE_UNIQUE_RESEND`): the worker it was first sent
/// to died without answering it, perhaps after doing what it asked.
fn resent(req: &Request) -> bool {
    req.unique().0 & (1 << 63) != 0
}

impl Upper {
    /// What a resent request to make `name` in `parent` (of type and mode `mode`; a symlink
    /// to `target`) answers when it failed with `e`: the entry, if `e` is `EEXIST` because
    /// the worker that died made it (an entry of that type is there: a guess, as a server
    /// that lost its reply cache makes it); else `e`.
    fn made_before(
        &self,
        req: &Request,
        e: Errno,
        parent: u64,
        name: &OsStr,
        mode: u32,
        target: Option<&[u8]>,
    ) -> Res<(FileAttr, ())> {
        if e != Errno::EEXIST || !resent(req) {
            return Err(e);
        }
        let n = self.named(parent, name.as_bytes()).ok_or(e)?;
        let a = self.entry_of(n)?;
        let kind = attr::kind_of(mode);
        let same_target = match target {
            Some(t) => self.target_of(&self.state(), n).ok().as_deref() == Some(t),
            None => true,
        };
        if a.kind != kind || !same_target {
            return Err(e);
        }
        Ok((a, ()))
    }

    /// The target of symlink node `n`.
    fn target_of(&self, st: &State, n: u64) -> Res<Vec<u8>> {
        if let Some(i) = self.image_inode(st, n)? {
            return match &i.data {
                NodeData::Symlink(t) => Ok(t.to_vec()),
                _ => Err(Errno::EINVAL),
            };
        }
        if self.attr(st, n)?.kind != FileType::Symlink {
            return Err(Errno::EINVAL);
        }
        std::fs::read(self.path(st, n)?).map_err(err)
    }

    /// The attributes of node `n`, counted as an entry handed to the kernel.
    fn entry_of(&self, n: u64) -> Res<FileAttr> {
        let mut st = self.state();
        let a = self.attr(&st, n)?;
        st.looked_up(n)?;
        Ok(a)
    }
}
