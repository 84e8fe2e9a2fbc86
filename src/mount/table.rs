//! The mount table (`/proc/self/mountinfo`), read one way for every question asked of it: is
//! this a mount point, what is mounted there, which overlays stand on a mount.

use std::path::{Path, PathBuf};

/// One line of the mount table.
pub(crate) struct MountInfo {
    /// The mount's ID (unique while it is mounted).
    pub id: String,
    /// `major:minor` of the mounted filesystem (bind mounts of one share it).
    pub dev: String,
    /// Where it is mounted.
    pub point: String,
    /// Filesystem type (`overlay`, `fuse.bux-fuse`, …).
    pub fstype: String,
    /// Super options (`lowerdir=…,upperdir=…` for an overlay).
    options: String,
}

impl MountInfo {
    /// The first path of super option `key` (`key=path[:path…]`: an overlay's `lowerdir`,
    /// `upperdir`).
    pub fn path_option(&self, key: &str) -> Option<PathBuf> {
        self.options.split(',').find_map(|o| {
            let value = o.strip_prefix(key)?.strip_prefix('=')?;
            Some(PathBuf::from(unescape(
                value.split(':').next().unwrap_or(value),
            )))
        })
    }

    /// Whether it is mounted at `path`.
    pub fn is_at(&self, path: &Path) -> bool {
        self.point == path.to_string_lossy()
    }
}

/// The mount table, in mount order (empty if it cannot be read).
pub(crate) fn read() -> Vec<MountInfo> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?.to_string();
            let _source = right.next();
            Some(MountInfo {
                id: left.first()?.to_string(),
                dev: left.get(2)?.to_string(),
                point: unescape(left.get(4)?),
                fstype,
                options: right.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// What is mounted at `path` (the topmost mount there).
pub(crate) fn at(path: &Path) -> Option<MountInfo> {
    read().into_iter().rev().find(|m| m.is_at(path))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
