//! Directory listings: upper entries, then the image's not deleted or shadowed, kept while a
//! directory is read so that offsets stay stable, made again once names change.

use super::*;

impl Upper {
    /// A directory's entries, merged: upper ones, then image ones not deleted or shadowed.
    pub(super) fn listing(&self, st: &mut State, n: u64) -> Res<Vec<(u64, FileType, OsString)>> {
        let node = self.node(st, n)?;
        let (upper, lower) = (node.upper, node.lower);
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut hidden = std::collections::HashSet::new();
        if upper {
            for e in std::fs::read_dir(self.path(st, n)?).map_err(err)? {
                let e = e.map_err(err)?;
                let name = e.file_name().as_bytes().to_vec();
                if let Some(gone) = name.strip_prefix(disk::WHITEOUT_PREFIX) {
                    hidden.insert(gone.to_vec());
                } else {
                    hidden.insert(name.clone());
                    names.push(name);
                }
            }
        }
        if let Some(d) = lower {
            for e in self.lower.tree().children(d) {
                if !hidden.contains(e.name) {
                    names.push(e.name.to_vec());
                }
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(c) = self.child(st, n, &name)? {
                let kind = self.attr(st, c)?.kind;
                out.push((c, kind, OsString::from_vec_bytes(name)));
            }
        }
        Ok(out)
    }

    /// Some directory's entries changed: listings must be made again.
    pub(super) fn names_changed(&self) {
        self.listings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Directory `ino`'s listing: the one being read, or a new one at offset 0.
    pub(super) fn listing_from(&self, ino: u64, offset: u64) -> Res<Listing> {
        if offset > 0 {
            if let Some(l) = self
                .listings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&ino)
            {
                return Ok(l.clone());
            }
        }
        let mut st = self.state();
        let parent = self.node(&st, ino)?.links.first().map_or(ROOT_INO, |l| l.0);
        let mut all = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (parent, FileType::Directory, OsString::from("..")),
        ];
        all.extend(self.listing(&mut st, ino)?);
        let l = Arc::new(all);
        self.listings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino, l.clone());
        Ok(l)
    }
}
