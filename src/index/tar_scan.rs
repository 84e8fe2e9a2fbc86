//! One pass over a layer's uncompressed tar stream, producing its per-file table.
//!
//! Paths are kept as bytes (tar names need not be UTF-8) and normalized here, once: leading `/`
//! and `./` and empty or `.` components are dropped (the layer root is the filesystem root, as
//! every unpacker treats it), and a `..` component is refused — a malicious path never reaches the
//! merged tree as written.

use std::io::Read;

use serde::{Deserialize, Serialize};
use tar::EntryType;

use crate::{Digest, Error, Result};

/// What a tar entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file; its bytes are at `offset` in the uncompressed stream.
    File,
    /// A directory.
    Dir,
    /// A symbolic link to `link`.
    Symlink,
    /// A hard link to the earlier entry at path `link`.
    Hardlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
}

/// One entry of a layer, as the layer's tar states it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarEntry {
    /// Normalized path relative to the root, `/`-separated, no trailing slash; empty for the root.
    pub path: Vec<u8>,
    /// What the entry is.
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch (may be negative).
    pub mtime: i64,
    /// Nanoseconds part of the modification time (PAX sub-second times).
    pub mtime_nsec: u32,
    /// Size of the data in bytes (0 except for regular files).
    pub size: u64,
    /// Symlink target (as written) or hardlink target (normalized path).
    pub link: Vec<u8>,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// Extended attributes from PAX `SCHILY.xattr.*` records.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Offset of the data in the layer's uncompressed tar stream.
    pub offset: u64,
}

/// Normalizes a tar path; `Err` names why it is refused.
pub fn normalize_path(raw: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
    if raw.contains(&0) {
        return Err("path contains a NUL byte");
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path has a `..` component"),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// Parses a PAX time (`123`, `123.45`, `-1.5`) into seconds and nanoseconds.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos: u32 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nanos += (b - b'0') as u32 * 10u32.pow(8 - i as u32);
    }
    if !neg {
        Some((secs, nanos))
    } else if nanos == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nanos))
    }
}

fn bad(layer: Digest, path: &[u8], detail: impl Into<String>) -> Error {
    Error::BadEntry {
        layer,
        path: String::from_utf8_lossy(path).into_owned(),
        detail: detail.into(),
    }
}

/// Reads every entry of the tar stream; returns the table and the reader, positioned after the
/// end-of-archive marker (the caller drains the rest to finish the stream's digest).
pub fn scan<R: Read>(reader: R, layer: Digest) -> Result<(Vec<TarEntry>, R)> {
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    let io_err = |e: std::io::Error| Error::CorruptLayer {
        layer,
        detail: format!("reading tar stream: {e}"),
    };
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        let raw_path = entry.path_bytes().into_owned();
        let header = entry.header();
        let etype = header.entry_type();
        let kind = match etype {
            EntryType::Regular | EntryType::Continuous if raw_path.ends_with(b"/") => {
                EntryKind::Dir
            }
            EntryType::Regular | EntryType::Continuous => EntryKind::File,
            EntryType::Directory => EntryKind::Dir,
            EntryType::Symlink => EntryKind::Symlink,
            EntryType::Link => EntryKind::Hardlink,
            EntryType::Char => EntryKind::Char,
            EntryType::Block => EntryKind::Block,
            EntryType::Fifo => EntryKind::Fifo,
            EntryType::XGlobalHeader => continue,
            EntryType::GNUSparse => {
                return Err(bad(
                    layer,
                    &raw_path,
                    "GNU sparse files are not supported yet (refused rather than served wrong)",
                ))
            }
            other => {
                return Err(bad(
                    layer,
                    &raw_path,
                    format!("unsupported tar entry type {:?}", other.as_byte() as char),
                ))
            }
        };
        let path = normalize_path(&raw_path).map_err(|why| bad(layer, &raw_path, why))?;
        // Some writers leave numeric fields blank (all NUL or spaces): that reads as 0.
        let num = |r: std::io::Result<u64>, field: &[u8], what: &str| -> Result<u64> {
            match r {
                Ok(v) => Ok(v),
                Err(_) if field.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
                Err(e) => Err(bad(layer, &raw_path, format!("bad {what} field: {e}"))),
            }
        };
        let old = header.as_old();
        let mode = num(header.mode().map(u64::from), &old.mode, "mode")? as u32 & 0o7777;
        let mut uid = num(header.uid(), &old.uid, "uid")?;
        let mut gid = num(header.gid(), &old.gid, "gid")?;
        let mut mtime = num(header.mtime(), &old.mtime, "mtime")? as i64;
        let mut mtime_nsec = 0;
        let dev_major = header.device_major().ok().flatten().unwrap_or(0);
        let dev_minor = header.device_minor().ok().flatten().unwrap_or(0);
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(io_err)? {
            for ext in pax {
                let ext = ext.map_err(io_err)?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                let parse_id = |v: &[u8]| -> Result<u64> {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| bad(layer, &raw_path, "bad PAX uid/gid"))
                };
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.retain(|(k, _): &(Vec<u8>, Vec<u8>)| k != name);
                    xattrs.push((name.to_vec(), value.to_vec()));
                } else if key == b"uid" {
                    uid = parse_id(value)?;
                } else if key == b"gid" {
                    gid = parse_id(value)?;
                } else if key == b"mtime" {
                    (mtime, mtime_nsec) = parse_pax_time(value)
                        .ok_or_else(|| bad(layer, &raw_path, "bad PAX mtime"))?;
                } else if key.starts_with(b"GNU.sparse.") {
                    return Err(bad(
                        layer,
                        &raw_path,
                        "PAX sparse files are not supported yet (refused rather than served wrong)",
                    ));
                }
            }
        }
        let link = match kind {
            EntryKind::Symlink => entry
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default(),
            EntryKind::Hardlink => {
                let target = entry.link_name_bytes().unwrap_or_default();
                normalize_path(&target)
                    .map_err(|why| bad(layer, &raw_path, format!("hardlink target: {why}")))?
            }
            _ => Vec::new(),
        };
        let (uid, gid) = match (u32::try_from(uid), u32::try_from(gid)) {
            (Ok(u), Ok(g)) => (u, g),
            _ => return Err(bad(layer, &raw_path, "uid or gid does not fit in 32 bits")),
        };
        let size = if kind == EntryKind::File {
            entry.size()
        } else {
            0
        };
        out.push(TarEntry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            size,
            link,
            dev_major,
            dev_minor,
            xattrs,
            offset: entry.raw_file_position(),
        });
        // Skipping the data is the archive's job; drop the entry to let it.
        let _ = &mut entry;
    }
    Ok((out, archive.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"./etc/passwd", Some(b"etc/passwd")),
            (b"/etc//passwd", Some(b"etc/passwd")),
            (b"etc/dir/", Some(b"etc/dir")),
            (b"./", Some(b"")),
            (b"a/./b", Some(b"a/b")),
            (b"a/../b", None),
            (b"..", None),
            (b"../../etc/shadow", None),
            (b".wh...", Some(b".wh...")),
        ];
        for (raw, want) in cases {
            let got = normalize_path(raw).ok();
            assert_eq!(got.as_deref(), *want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn parses_pax_times() {
        assert_eq!(parse_pax_time(b"1700000000"), Some((1700000000, 0)));
        assert_eq!(
            parse_pax_time(b"1700000000.123456789"),
            Some((1700000000, 123456789))
        );
        assert_eq!(parse_pax_time(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"-100"), Some((-100, 0)));
        assert_eq!(parse_pax_time(b"abc"), None);
        assert_eq!(parse_pax_time(b"1.2x"), None);
    }

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    #[test]
    fn records_offsets_links_and_xattrs() {
        let data = tar_of(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_path("./bin/hello").unwrap();
            h.set_size(5);
            h.set_mode(0o4755);
            h.set_uid(70000);
            h.set_entry_type(EntryType::Regular);
            h.set_cksum();
            b.append(&h, &b"hello"[..]).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(EntryType::Link);
            h.set_size(0);
            b.append_link(&mut h, "bin/hi", "./bin/hello").unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "lib", "/usr/lib").unwrap();
            b.append_pax_extensions([("SCHILY.xattr.user.k", &b"\x00\x01v"[..])])
                .unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_path("data").unwrap();
            h.set_size(3);
            h.set_cksum();
            b.append(&h, &b"abc"[..]).unwrap();
        });
        let (entries, _) = scan(&data[..], Digest::of(b"")).unwrap();
        assert_eq!(entries.len(), 4);
        let f = &entries[0];
        assert_eq!(f.path, b"bin/hello");
        assert_eq!((f.kind, f.mode, f.uid, f.size), (EntryKind::File, 0o4755, 70000, 5));
        assert_eq!(&data[f.offset as usize..f.offset as usize + 5], b"hello");
        assert_eq!(entries[1].kind, EntryKind::Hardlink);
        assert_eq!(entries[1].link, b"bin/hello");
        assert_eq!(entries[2].link, b"/usr/lib");
        let d = &entries[3];
        assert_eq!(d.xattrs, vec![(b"user.k".to_vec(), b"\x00\x01v".to_vec())]);
        assert_eq!(&data[d.offset as usize..d.offset as usize + 3], b"abc");
    }

    #[test]
    fn refuses_dotdot_paths() {
        let data = tar_of(|b| {
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../etc/passwd");
            h.set_size(0);
            h.set_cksum();
            b.append(&h, &b""[..]).unwrap();
        });
        let err = scan(&data[..], Digest::of(b"")).unwrap_err().to_string();
        assert!(err.contains("../etc/passwd") && err.contains(".."), "{err}");
    }
}
