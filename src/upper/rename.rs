//! Rename: the checks a kernel makes of it, and the steps taken in the upper directory (each
//! undone if a later one fails).

use super::*;

impl Upper {
    /// What rename checks of `c`, in the kernel's order: removing node `n` from its
    /// directory (`from`), removing what `newname` names in `newparent` or creating it there,
    /// and, for a directory changing parent, writing its `..`.
    pub(super) fn may_rename(
        &self,
        st: &mut State,
        c: &Caller,
        (parent, n): (u64, u64),
        newparent: u64,
        newname: &[u8],
        is_dir: bool,
    ) -> Res<()> {
        self.may_remove(st, c, parent, n)?;
        match self.child(st, newparent, newname)? {
            Some(old) if old != n => self.may_remove(st, c, newparent, old)?,
            Some(_) => {}
            None => self.may_change_in(st, c, newparent)?,
        }
        if is_dir && parent != newparent {
            self.need_node(st, c, n, perm::W)?;
        }
        Ok(())
    }

    /// Everything rename checks of `c` (see [`Upper::may_rename`]), searches first.
    pub(super) fn check_rename(
        &self,
        st: &mut State,
        c: &Caller,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
    ) -> Res<()> {
        self.search(st, c, parent)?;
        self.search(st, c, newparent)?;
        let n = self.child(st, parent, name)?.ok_or(Errno::ENOENT)?;
        let is_dir = self.attr(st, n)?.kind == FileType::Directory;
        self.may_rename(st, c, (parent, n), newparent, newname, is_dir)
    }

    /// Everything link checks of `c`: reaching node `n`, and creating `newname` in
    /// `newparent`.
    pub(super) fn check_link(
        &self,
        st: &mut State,
        c: &Caller,
        n: u64,
        newparent: u64,
        newname: &[u8],
    ) -> Res<()> {
        self.reach(st, c, n)?;
        self.may_create(st, c, newparent, newname)
    }

    /// The node `name` in `parent` resolves to, if any.
    pub(super) fn named(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.child(&mut self.state(), parent, name).ok().flatten()
    }

    /// Whether the rename of `name` in `parent` to `newname` in `newparent`, sent again by the
    /// kernel, was made on disk by the worker that died before it journalled it: then the node
    /// the kernel moved (found among the names the disk no longer shows, [`State::stale`])
    /// takes the new name here too.
    pub(super) fn renamed_before(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
    ) -> bool {
        let mut st = self.state();
        let Some(&n) = st.stale.get(&(parent, name.to_vec())) else {
            return false;
        };
        let there = self
            .path(&st, newparent)
            .is_ok_and(|d| std::fs::symlink_metadata(d.join(OsStr::from_bytes(newname))).is_ok());
        if !there || !st.nodes.contains_key(&n) {
            return false;
        }
        st.stale.remove(&(parent, name.to_vec()));
        self.names_changed();
        // What the new name showed before is its no more.
        match st.names.insert((newparent, newname.to_vec()), n) {
            Some(old) if old != n => {
                if let Ok(node) = st.at(old) {
                    node.links
                        .retain(|(p, nm)| !(*p == newparent && nm == newname));
                }
            }
            _ => {}
        }
        if let Ok(node) = st.at(n) {
            node.add_first_name((newparent, newname.to_vec()), n);
            node.upper = true; // a rename copies up
        }
        true
    }

    pub(super) fn do_rename(
        &self,
        c: Option<&Caller>,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: RenameFlags,
    ) -> Res<()> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.bits() & !libc::RENAME_NOREPLACE != 0
        {
            return Err(Errno::EINVAL);
        }
        if disk::is_refused_for_new(newname) {
            return Err(Errno::EINVAL);
        }
        let mut st = self.state();
        if let Some(c) = c {
            self.check_rename(&mut st, c, parent, name, newparent, newname)?;
        }
        let n = self.child(&mut st, parent, name)?.ok_or(Errno::ENOENT)?;
        let is_dir = self.attr(&st, n)?.kind == FileType::Directory;
        self.whiteout_fits(&st, parent, name)?;
        // The entry replaced, if any. It needs no whiteout, whatever its name's length: the
        // moved entry hides the image's.
        let old = match self.child(&mut st, newparent, newname)? {
            Some(old) if old == n => return Ok(()), // the same file (hardlinks, or itself)
            Some(_) if flags.contains(RenameFlags::RENAME_NOREPLACE) => {
                return Err(Errno::EEXIST);
            }
            Some(old) => {
                let old_dir = self.attr(&st, old)?.kind == FileType::Directory;
                match (is_dir, old_dir) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if !self.listing(&mut st, old)?.is_empty() => {
                        return Err(Errno::ENOTEMPTY);
                    }
                    _ => {}
                }
                Some(old)
            }
            None => None,
        };
        // Every step that can fail comes before the one rename(2) that makes the change, and
        // is taken back if a later one fails: a rename that fails changes nothing.
        // A moved image directory takes its image contents along (redirect); a moved file is
        // copied up first.
        let lower_dir = if is_dir {
            self.node(&st, n)?.lower
        } else {
            None
        };
        let had_upper = self.node(&st, n)?.upper;
        self.copy_up(&mut st, n)?;
        let from = self.path(&st, n)?;
        if let Some(d) = lower_dir {
            if !had_upper
                || disk::get_xattr(&from, disk::REDIRECT_XATTR.as_bytes())
                    .map_err(err)?
                    .is_none()
            {
                let image_path = self.lower.tree().path_of(d).ok_or(Errno::EIO)?;
                disk::set_xattr(&from, disk::REDIRECT_XATTR.as_bytes(), &image_path, 0)
                    .map_err(err)?;
            }
        }
        self.copy_up(&mut st, newparent)?;
        let to_dir = self.path(&st, newparent)?;
        let to = to_dir.join(OsStr::from_bytes(newname));
        let from_dir = self.path(&st, parent)?;
        // The first link may be another name of the node: move this name's entry.
        let from_here = from_dir.join(OsStr::from_bytes(name));
        let from = if from_here.exists() || from_here.is_symlink() {
            from_here
        } else {
            from
        };
        self.names_changed();
        let mut undo = Vec::new();
        let undone = |undo: Vec<Undo>, e: Errno| {
            for u in undo.into_iter().rev() {
                u.run();
            }
            Err(e)
        };
        // An upper directory with no image directory of its own must not merge with one that
        // happens to have the new name: marked before it moves (it hides nothing where it is).
        if is_dir && lower_dir.is_none() && self.lower_child(&st, newparent, newname).is_some() {
            let o = from.join(disk::OPAQUE);
            if !o.exists() {
                if let Err(e) = disk::create_file(&o, false, true) {
                    return undone(undo, err(e));
                }
                undo.push(Undo::Remove(o));
            }
        }
        // The whiteout of the image's entry of the old name: the upper entry shows over it
        // until it moves.
        if self.lower_child(&st, parent, name).is_some() {
            let wh = from_dir.join(disk::whiteout_name(name));
            if !wh.exists() {
                if let Err(e) = disk::create_file(&wh, false, true) {
                    return undone(undo, err(e));
                }
                undo.push(Undo::Remove(wh));
            }
        }
        // The replaced entry: a directory (empty, but for whiteouts) moves aside, as rename(2)
        // replaces only an empty one; a file's last name is linked to an orphan name first, as
        // it may still be open.
        let mut aside = None;
        let mut orphan = false;
        if let Some(old) = old {
            let on_disk = self
                .node(&st, old)?
                .upper
                .then(|| std::fs::symlink_metadata(&to).ok())
                .flatten();
            match on_disk {
                Some(md) if md.is_dir() => {
                    let a = self
                        .root
                        .join(disk::whiteout_name(format!("{REPLACED}{old}").as_bytes()));
                    if let Err(e) = std::fs::rename(&to, &a) {
                        return undone(undo, err(e));
                    }
                    undo.push(Undo::Move(a.clone(), to.clone()));
                    aside = Some(a);
                }
                // Its last name known here (others on disk, never looked up, keep the file
                // too, but nothing here can reach it through them).
                Some(_)
                    if !self
                        .node(&st, old)?
                        .links
                        .iter()
                        .any(|(p, nm)| !(*p == newparent && nm == newname)) =>
                {
                    let o = self.root.join(orphan_name(old));
                    if let Err(e) = std::fs::hard_link(&to, &o) {
                        return undone(undo, err(e));
                    }
                    undo.push(Undo::Remove(o));
                    orphan = true;
                }
                _ => {}
            }
        }
        if let Err(e) = std::fs::rename(&from, &to) {
            return undone(undo, err(e));
        }
        // Done: the replaced directory shows nowhere any more, nor does a whiteout under the
        // moved entry (a leftover of either is harmless).
        if let Some(a) = aside {
            let _ = std::fs::remove_dir_all(a);
        }
        let _ = std::fs::remove_file(to_dir.join(disk::whiteout_name(newname)));
        if let Some(old) = old {
            st.dir_fds.get_mut().remove(&old);
            let node = st.at(old)?;
            node.links
                .retain(|(p, nm)| !(*p == newparent && nm == newname));
            if orphan {
                node.links = vec![(ROOT_INO, orphan_name(old).as_bytes().to_vec())];
            }
        }
        st.names.remove(&(parent, name.to_vec()));
        st.names.insert((newparent, newname.to_vec()), n);
        let node = st.at(n)?;
        node.links.retain(|(p, nm)| !(*p == parent && nm == name));
        node.add_first_name((newparent, newname.to_vec()), n);
        Ok(())
    }
}

/// A step of a rename to take back if a later one fails.
enum Undo {
    Remove(PathBuf),
    Move(PathBuf, PathBuf),
}

impl Undo {
    fn run(self) {
        let _ = match self {
            Undo::Remove(p) => std::fs::remove_file(p),
            Undo::Move(a, b) => std::fs::rename(a, b),
        };
    }
}
