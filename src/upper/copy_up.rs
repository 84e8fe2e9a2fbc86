//! Copy-up: an image entry made real in the upper directory (its parents first), its bytes
//! staged outside the state lock when they may have to be fetched.

use super::*;

impl Upper {
    /// Copies image node `n` (if not copied up yet) to a hidden name in the upper root with
    /// its metadata, holding no lock that other requests take: reading its bytes may wait for
    /// the network. Copy-up then publishes it (see [`Upper::copy_up_as`]).
    pub(super) fn stage(&self, n: u64) -> Res<()> {
        let (lower, a) = {
            let st = self.state();
            let node = self.node(&st, n)?;
            if node.upper {
                return Ok(());
            }
            let lower = node.lower.ok_or(Errno::EIO)?;
            (lower, self.lower.lower_attr(lower, n).ok_or(Errno::EIO)?)
        };
        // The image's tree never changes.
        let i = self.lower.tree().inode(lower).ok_or(Errno::EIO)?;
        let tmp = self.root.join(disk::whiteout_name(
            [STAGED, n.to_string().as_bytes()].concat().as_slice(),
        ));
        disk::clear(&tmp).map_err(err)?;
        if let Err(e) = self.copy_up_at(&tmp, lower, &a, &i, true) {
            let _ = disk::clear(&tmp);
            return Err(e);
        }
        self.staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n, (lower, tmp));
        Ok(())
    }

    /// Makes node `n` exist in the upper directory (its parents first).
    pub(super) fn copy_up(&self, st: &mut State, n: u64) -> Res<()> {
        self.copy_up_as(st, n, true)
    }

    /// [`UpperFs::copy_up`]; without `data` a file's bytes are not copied (it is about to be
    /// truncated to nothing).
    pub(super) fn copy_up_as(&self, st: &mut State, n: u64, data: bool) -> Res<()> {
        let node = self.node(st, n)?;
        if node.upper {
            return Ok(());
        }
        let lower = node.lower.ok_or(Errno::EIO)?;
        let nameless = node.links.is_empty();
        let a = self.lower.lower_attr(lower, n).ok_or(Errno::EIO)?;
        let i = self.lower.tree().inode(lower).ok_or(Errno::EIO)?;
        if nameless && a.kind != FileType::Directory {
            // Its names were all removed while it was open (the kernel declines opens, so
            // the first write copies up): the image's other names of it, if any still show
            // it, get the copy; else it is an orphan until the kernel forgets it.
            if i.nlink > 1 {
                self.link_image_names(st, lower)?;
            }
            let node = st.at(n)?;
            if node.links.is_empty() {
                node.links = vec![(ROOT_INO, orphan_name(n).as_bytes().to_vec())];
            }
        }
        let parent = self.node(st, n)?.links.first().ok_or(Errno::ENOENT)?.0;
        self.copy_up(st, parent)?;
        let path = self.path(st, n)?;
        // Made beside with all its metadata, then renamed in: a crash never leaves a half
        // copy, nor one described by the host (its owner and mode, a symlink as a file). A
        // file's bytes were copied already, without the state lock (see `stage`).
        let staged = self
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&n);
        let tmp = match staged {
            Some((of, tmp)) if data && of == lower => tmp,
            other => {
                if let Some((_, t)) = other {
                    let _ = disk::clear(&t);
                }
                let tmp = path.with_file_name(disk::whiteout_name(COPY_UP_TMP));
                disk::clear(&tmp).map_err(err)?;
                if let Err(e) = self.copy_up_at(&tmp, lower, &a, &i, data) {
                    let _ = disk::clear(&tmp);
                    return Err(e);
                }
                tmp
            }
        };
        disk::publish(&tmp, &path).map_err(err)?;
        let node = st.at(n)?;
        node.upper = true;
        if a.kind != FileType::Directory {
            node.lower = None;
            // Other names of this image file seen so far get the copy too.
            let others: Vec<(u64, Vec<u8>)> = node.links.iter().skip(1).cloned().collect();
            for (parent, name) in others {
                self.copy_up(st, parent)?;
                let to = self.path(st, parent)?.join(OsStr::from_bytes(&name));
                std::fs::hard_link(&path, to).map_err(err)?;
            }
            if i.nlink > 1 {
                st.by_upper
                    .insert(std::fs::symlink_metadata(&path).map_err(err)?.ino(), n);
                // And every other name of it in the image that still shows it: reaching the
                // name links it (see `child`), so a later mount finds the same file there.
                self.link_image_names(st, lower)?;
            }
        }
        Ok(())
    }

    /// Resolves every name of image inode `lower` that still shows it (each becomes a link of
    /// its node, see [`Upper::child`]).
    pub(super) fn link_image_names(&self, st: &mut State, lower: u64) -> Res<()> {
        for (dir, name) in self.lower.tree().links_of(lower) {
            let Some(dir_path) = self.lower.tree().path_of(dir) else {
                continue;
            };
            let mut at = Some(ROOT_INO);
            for c in dir_path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
                at = match at {
                    Some(d) => self.child(st, d, c)?,
                    None => break,
                };
            }
            if let Some(d) = at {
                self.child(st, d, &name)?;
            }
        }
        Ok(())
    }

    /// Makes at `tmp` the upper copy of image inode `lower` (attributes `a`) with its served
    /// stat, xattrs and times; without `data` a file's bytes are not copied.
    pub(super) fn copy_up_at(
        &self,
        tmp: &Path,
        lower: u64,
        a: &FileAttr,
        i: &crate::tree::Inode<'_>,
        data: bool,
    ) -> Res<()> {
        if a.kind == FileType::Directory {
            disk::create_dir(tmp, false).map_err(err)?;
        } else {
            let f = disk::create_file(tmp, true, false).map_err(err)?;
            match &i.data {
                NodeData::Symlink(target) => f.write_all_at(target, 0).map_err(err)?,
                NodeData::File { .. } | NodeData::Sparse { .. } if data => {
                    let mut off = 0;
                    while off < a.size {
                        let buf = self.image_bytes(lower, off, COPY_CHUNK)?;
                        if buf.is_empty() {
                            return Err(Errno::EIO);
                        }
                        f.write_all_at(&buf, off).map_err(err)?;
                        off += buf.len() as u64;
                    }
                }
                _ => {}
            }
            f.sync_data().map_err(err)?;
        }
        let s = stat_from_attr(a);
        disk::set_xattr(tmp, disk::STAT_XATTR.as_bytes(), s.encode().as_bytes(), 0).map_err(err)?;
        for (k, v) in i.xattrs.iter() {
            let name = [disk::XATTR_PREFIX, k].concat();
            disk::set_xattr(tmp, &name, v, 0).map_err(err)?;
        }
        set_times(tmp, Some(a.atime), Some(a.mtime)).map_err(err)
    }

    /// Up to `len` bytes at `off` of image file `lower`: through the image's shared mount if
    /// its files are read there (its page cache may hold them already), else decoded here.
    fn image_bytes(&self, lower: u64, off: u64, len: u32) -> Res<Vec<u8>> {
        match self.read_through(lower, off, len) {
            Some(b) => Ok(b),
            None => self.lower.read_lower(lower, off, len),
        }
    }
}
