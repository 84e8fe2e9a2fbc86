//! Making and removing entries: a new name made free of whiteouts, owned and moded as a local
//! filesystem would make it, made beside and renamed in; a removal that leaves a whiteout
//! where the image has the name; hard links.

use super::*;

impl Upper {
    /// Makes `name` free in directory `parent` for a new entry: no whiteout left in the way.
    /// Returns whether the image had an entry there (then a new directory must be opaque).
    pub(super) fn prepare_new(
        &self,
        st: &mut State,
        parent: u64,
        name: &[u8],
    ) -> Res<(PathBuf, bool)> {
        if disk::is_refused_for_new(name) {
            return Err(Errno::EINVAL);
        }
        if self.child(st, parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        self.copy_up(st, parent)?;
        let dir = self.path(st, parent)?;
        let wh = dir.join(disk::whiteout_name(name));
        if wh.exists() {
            std::fs::remove_file(&wh).map_err(err)?;
        }
        let shadowed = self.lower_child(st, parent, name).is_some();
        Ok((dir.join(OsStr::from_bytes(name)), shadowed))
    }

    /// Records a new upper entry at `path` and names it.
    pub(super) fn created(&self, st: &mut State, parent: u64, name: &[u8]) -> Res<(u64, FileAttr)> {
        self.names_changed();
        let n = push(st, None, true);
        let node = st.at(n)?;
        node.links.push((parent, name.to_vec()));
        node.lookups += 1; // replied as an entry
        st.names.insert((parent, name.to_vec()), n);
        Ok((n, self.attr(st, n)?))
    }

    /// The owner and mode of something new, as a local filesystem gives them (setgid
    /// directories pass their group, and their setgid bit to subdirectories).
    pub(super) fn new_stat(
        &self,
        st: &State,
        req: &Request,
        parent: u64,
        mode: u32,
        umask: u32,
    ) -> Stat {
        let mut s = Stat {
            uid: req.uid(),
            gid: req.gid(),
            mode: mode & !(umask & 0o777),
            rdev: 0,
        };
        if let Ok(p) = self.attr(st, parent) {
            if p.perm as u32 & libc::S_ISGID != 0 {
                s.gid = p.gid;
                if mode & libc::S_IFMT == libc::S_IFDIR {
                    s.mode |= libc::S_ISGID;
                }
            }
        }
        s
    }

    /// Makes entry `name` in `parent` with `make(path, shadowed)` (`shadowed`: the image had
    /// one of that name, deleted since), owned and moded as a local filesystem would make it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn make_entry<R>(
        &self,
        req: &Request,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        make: impl FnOnce(&Path, bool) -> Res<R>,
    ) -> Res<(FileAttr, R)> {
        let mut st = self.state();
        if let Some(c) = self.checked(req) {
            self.may_create(&mut st, &c, parent, name)?;
        }
        let (path, shadowed) = self.prepare_new(&mut st, parent, name)?;
        let mut s = self.new_stat(&st, req, parent, mode, umask);
        s.rdev = rdev;
        // Made beside with its stat, then renamed in: a crash never leaves an entry the host
        // describes (a host-owned file, a symlink or device as a plain file).
        let tmp = path.with_file_name(disk::whiteout_name(NEW_TMP));
        disk::clear(&tmp).map_err(err)?;
        let made = make(&tmp, shadowed).and_then(|made| {
            disk::set_xattr(&tmp, disk::STAT_XATTR.as_bytes(), s.encode().as_bytes(), 0)
                .and_then(|()| disk::publish(&tmp, &path))
                .map_err(err)
                .map(|()| made)
        });
        let made = made.inspect_err(|_| {
            let _ = disk::clear(&tmp);
        })?;
        let (_, a) = self.created(&mut st, parent, name)?;
        Ok((a, made))
    }

    /// What creating `name` in `parent` checks, in the kernel's order: search on the path,
    /// then (the name being free) write to `parent`.
    pub(super) fn may_create(
        &self,
        st: &mut State,
        c: &Caller,
        parent: u64,
        name: &[u8],
    ) -> Res<()> {
        self.search(st, c, parent)?;
        if self.child(st, parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        self.may_change_in(st, c, parent)
    }

    /// Fails (`ENAMETOOLONG`) when `name` leaving directory `parent` would need a whiteout
    /// (the image has an entry of that name) that no name can hold: checked before anything
    /// changes, so a refused removal or rename changes nothing.
    pub(super) fn whiteout_fits(&self, st: &State, parent: u64, name: &[u8]) -> Res<()> {
        let needed = self.lower_child(st, parent, name).is_some();
        if needed && disk::whiteout_name(name).len() > self.name_max {
            return Err(Errno::ENAMETOOLONG);
        }
        Ok(())
    }

    /// Removes `name` from `parent`: the upper entry if any, and a whiteout if the image has
    /// one there. `dir`: rmdir semantics.
    pub(super) fn remove(
        &self,
        st: &mut State,
        c: Option<&Caller>,
        parent: u64,
        name: &[u8],
        dir: bool,
    ) -> Res<()> {
        if let Some(c) = c {
            self.search(st, c, parent)?;
        }
        let n = self.child(st, parent, name)?.ok_or(Errno::ENOENT)?;
        if let Some(c) = c {
            self.may_remove(st, c, parent, n)?;
        }
        self.whiteout_fits(st, parent, name)?;
        let a = self.attr(st, n)?;
        match (dir, a.kind == FileType::Directory) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if !self.listing(st, n)?.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.copy_up(st, parent)?;
        self.names_changed();
        let dir_path = self.path(st, parent)?;
        let at = dir_path.join(OsStr::from_bytes(name));
        let node = self.node(st, n)?;
        // Only this name's upper entry: another name of the node may be its first link.
        let on_disk = node
            .upper
            .then(|| std::fs::symlink_metadata(&at).ok())
            .flatten();
        let here_upper = on_disk.is_some();
        // Its last name known here (the file may have others on disk, never looked up): the
        // file is kept under a hidden name, for descriptors still open on it.
        let others = node
            .links
            .iter()
            .any(|(p, nm)| !(*p == parent && nm == name));
        let orphan = !dir && here_upper && !others;
        // The whiteout first: an upper entry of the name shows over it until it goes, so a
        // crash in between never brings the image's entry back.
        let wh = self
            .lower_child(st, parent, name)
            .map(|_| dir_path.join(disk::whiteout_name(name)));
        if let Some(wh) = &wh {
            disk::create_file(wh, false, true).map_err(err)?;
        }
        let gone = if orphan {
            // Its last name: the file may still be open, so it moves aside (a hidden name)
            // until the kernel forgets it, and everything keeps working on it meanwhile.
            std::fs::rename(&at, self.root.join(orphan_name(n)))
        } else if here_upper && dir {
            std::fs::remove_dir_all(&at)
        } else if here_upper {
            std::fs::remove_file(&at)
        } else {
            Ok(())
        };
        if let Err(e) = gone {
            if let Some(wh) = wh.filter(|_| here_upper) {
                let _ = std::fs::remove_file(wh);
            }
            return Err(err(e));
        }
        st.names.remove(&(parent, name.to_vec()));
        if dir {
            st.dir_fds.get_mut().remove(&n);
        }
        let node = st.at(n)?;
        node.links.retain(|(p, nm)| !(*p == parent && nm == name));
        if orphan {
            node.links = vec![(ROOT_INO, orphan_name(n).as_bytes().to_vec())];
        }
        Ok(())
    }

    /// Hardlinks node `n` as `newname` in `newparent`.
    pub(super) fn do_link(
        &self,
        c: Option<&Caller>,
        n: u64,
        newparent: u64,
        newname: &[u8],
    ) -> Res<FileAttr> {
        let mut st = self.state();
        if let Some(c) = c {
            self.check_link(&mut st, c, n, newparent, newname)?;
        }
        if self.attr(&st, n)?.kind == FileType::Directory {
            return Err(Errno::EPERM);
        }
        let (to, _) = self.prepare_new(&mut st, newparent, newname)?;
        self.copy_up(&mut st, n)?;
        let from = self.path(&st, n)?;
        std::fs::hard_link(&from, &to).map_err(err)?;
        self.names_changed();
        let md = std::fs::symlink_metadata(&to).map_err(err)?;
        st.by_upper.insert(md.ino(), n);
        let node = st.at(n)?;
        node.shared = true;
        node.lookups += 1; // replied as an entry
        node.links.push((newparent, newname.to_vec()));
        st.names.insert((newparent, newname.to_vec()), n);
        self.attr(&st, n)
    }
}
