//! Upper files: kept open while used, copied up for writing, and their served stat (owner,
//! mode, times, size) changed.

use super::*;

impl Upper {
    /// Upper node `n`'s file, open (kept in [`UpperFs::files`]).
    pub(super) fn upper_file(&self, st: &State, n: u64) -> Res<Arc<File>> {
        if let Some(f) = self.open_file(n) {
            return Ok(f);
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(st, n)?)
            .map_err(err)?;
        let f = Arc::new(f);
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(n, f.clone());
        Ok(f)
    }

    /// Node `n`'s upper file if it is open already.
    pub(super) fn open_file(&self, n: u64) -> Option<Arc<File>> {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&n)
            .cloned()
    }

    /// Node `n`'s file for writing: copied up first (without its bytes if `empty`).
    pub(super) fn writable_file(&self, n: u64, empty: bool) -> Res<Arc<File>> {
        if let Some(f) = self.open_file(n) {
            return Ok(f);
        }
        let mut st = self.state();
        self.copy_up_as(&mut st, n, !empty)?;
        self.upper_file(&st, n)
    }

    /// Changes the served stat of upper node `n`.
    pub(super) fn update_stat(&self, st: &State, n: u64, f: impl FnOnce(&mut Stat)) -> Res<()> {
        let path = self.path(st, n)?;
        let md = std::fs::symlink_metadata(&path).map_err(err)?;
        let mut s = disk::stat_of(&path, &md);
        f(&mut s);
        disk::set_xattr(&path, disk::STAT_XATTR.as_bytes(), s.encode().as_bytes(), 0).map_err(err)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_setattr(
        &self,
        n: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Res<FileAttr> {
        let mut st = self.state();
        // O_TRUNC arrives as a truncation to 0: the image's bytes need not be copied.
        self.copy_up_as(&mut st, n, size != Some(0))?;
        if mode.is_some() || uid.is_some() || gid.is_some() {
            self.update_stat(&st, n, |s| {
                if let Some(m) = mode {
                    s.mode = (s.mode & libc::S_IFMT) | (m & 0o7777);
                }
                if let Some(u) = uid {
                    s.uid = u;
                }
                if let Some(g) = gid {
                    s.gid = g;
                }
            })?;
        }
        let path = self.path(&st, n)?;
        if let Some(size) = size {
            self.upper_file(&st, n)?.set_len(size).map_err(err)?;
        }
        if atime.is_some() || mtime.is_some() {
            let t = |t: Option<TimeOrNow>| {
                t.map(|t| match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                })
            };
            set_times(&path, t(atime), t(mtime)).map_err(err)?;
        }
        self.attr(&st, n)
    }
}
