//! The project's tree comparison: two directory trees entry by entry, never following symlinks.
//!
//! Compared for every path (the two roots too, shown as `/`):
//!
//! | kind | what |
//! |---|---|
//! | `ONLY_A` / `ONLY_B` | presence |
//! | `TYPE` | file, dir, symlink, chr, blk, fifo, sock |
//! | `MODE` | permission bits with setuid, setgid and sticky (`07777`; not of symlinks) |
//! | `UID` / `GID` | numeric owner |
//! | `SIZE` | size of regular files |
//! | `CONTENT` | contents of regular files, byte for byte (holes as zeros, not read); the report shows each side's sha256 |
//! | `TARGET` | symlink target |
//! | `XATTR` | extended attributes, every name the process can list |
//! | `RDEV` | major:minor of character and block devices |
//! | `HARDLINK` | which paths share an inode, compared as groups |
//! | `MTIME` | modification time in whole seconds |
//!
//! The report has one line per difference (`KIND     path  A=... B=...`), grouped by kind in
//! the order above (`ERROR` first: what could not be read), then a summary line, and ends with
//! `N differences`. Options, as strings so that a command line and a test read alike
//! ([`Options::parse`]):
//!
//! ```text
//! --ignore-root            the roots' own metadata is not compared
//! --ignore-mtime           no mtimes at all
//! --ignore-dir-mtime       no mtimes of directories
//! --ignore-symlink-mtime   no mtimes of symlinks
//! --ignore-mtime-of PATH   not the mtime of PATH and what is under it ("/": the root only)
//! --no-content             sizes but not contents
//! --no-xattr               no xattrs
//! --ignore-xattr PREFIX    not the xattrs whose name starts with PREFIX
//! --no-hardlinks           no hardlink groups
//! --exclude PATH           leave PATH and what is under it out (both sides)
//! --jobs N                 threads reading contents (default 2)
//! -q                       the summary only
//! ```
//!
//! Used by the integration tests (`common::treediff`) and, as `examples/treediff.rs`, by
//! `scripts/debian-e2e.sh`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::Metadata;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

/// What to compare; [`Options::default`] compares everything.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub ignore_root: bool,
    pub ignore_mtime: bool,
    pub ignore_dir_mtime: bool,
    pub ignore_symlink_mtime: bool,
    /// Relative paths (no leading or trailing `/`; empty = the root only).
    pub ignore_mtime_of: Vec<Vec<u8>>,
    pub no_content: bool,
    pub no_xattr: bool,
    pub ignore_xattr: Vec<Vec<u8>>,
    pub no_hardlinks: bool,
    /// Relative paths (no leading or trailing `/`).
    pub exclude: Vec<Vec<u8>>,
    /// Threads reading contents (0 = 2).
    pub jobs: usize,
    pub quiet: bool,
}

impl Options {
    /// Options from command-line style arguments (see the module documentation).
    pub fn parse<S: AsRef<OsStr>>(args: &[S]) -> Result<Options, String> {
        let mut o = Options::default();
        let mut it = args.iter().map(|a| a.as_ref());
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .map(|v| v.as_bytes().to_vec())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match a.to_str().unwrap_or("") {
                "--ignore-root" => o.ignore_root = true,
                "--ignore-mtime" => o.ignore_mtime = true,
                "--ignore-dir-mtime" => o.ignore_dir_mtime = true,
                "--ignore-symlink-mtime" => o.ignore_symlink_mtime = true,
                "--ignore-mtime-of" => o.ignore_mtime_of.push(rel(&value("--ignore-mtime-of")?)),
                "--no-content" => o.no_content = true,
                "--no-xattr" => o.no_xattr = true,
                "--ignore-xattr" => o.ignore_xattr.push(value("--ignore-xattr")?),
                "--no-hardlinks" => o.no_hardlinks = true,
                "--exclude" => o.exclude.push(rel(&value("--exclude")?)),
                "--jobs" => {
                    let v = value("--jobs")?;
                    o.jobs = std::str::from_utf8(&v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or("--jobs needs a number")?;
                }
                "-q" => o.quiet = true,
                _ => return Err(format!("unknown option {}", a.to_string_lossy())),
            }
        }
        Ok(o)
    }

    fn excluded(&self, rel: &[u8]) -> bool {
        self.exclude.iter().any(|e| under(rel, e))
    }

    fn mtime_ignored(&self, rel: &[u8]) -> bool {
        self.ignore_mtime_of.iter().any(|p| {
            if p.is_empty() {
                rel.is_empty()
            } else {
                under(rel, p)
            }
        })
    }
}

/// `path` with leading and trailing slashes taken off.
fn rel(path: &[u8]) -> Vec<u8> {
    let start = path.iter().position(|&b| b != b'/').unwrap_or(path.len());
    let end = path
        .iter()
        .rposition(|&b| b != b'/')
        .map_or(start, |e| e + 1);
    path[start..end.max(start)].to_vec()
}

/// Whether `rel` is `p` or lies under it.
fn under(rel: &[u8], p: &[u8]) -> bool {
    rel == p || (rel.len() > p.len() && rel.starts_with(p) && rel[p.len()] == b'/')
}

/// The outcome: the differences, one line each, and the report that ends with `N differences`.
#[derive(Debug)]
pub struct Diff {
    pub differences: Vec<String>,
    pub report: String,
}

impl Diff {
    pub fn equal(&self) -> bool {
        self.differences.is_empty()
    }

    /// The kinds that differ, each once, in report order.
    pub fn kinds(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self
            .differences
            .iter()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        k.dedup();
        k
    }
}

/// Compares the trees at `a` and `b` with command-line style options; returns (equal, report).
pub fn treediff<S: AsRef<OsStr>>(a: &Path, b: &Path, args: &[S]) -> (bool, String) {
    let opts = Options::parse(args).unwrap_or_else(|e| panic!("treediff: {e}"));
    let d = compare(a, b, &opts);
    (d.equal(), d.report)
}

const KINDS: [&str; 14] = [
    "ERROR", "ONLY_A", "ONLY_B", "TYPE", "MODE", "UID", "GID", "SIZE", "CONTENT", "TARGET",
    "XATTR", "RDEV", "HARDLINK", "MTIME",
];

/// Compares the trees at `a` and `b`.
pub fn compare(a: &Path, b: &Path, opts: &Options) -> Diff {
    let ta = Tree::scan(a, opts);
    let tb = Tree::scan(b, opts);
    let mut found: HashMap<&'static str, Vec<String>> = HashMap::new();
    let mut add = |kind: &'static str, rel: &[u8], msg: String| {
        let line = if msg.is_empty() {
            format!("{kind:8} {}", show(rel))
        } else {
            format!("{kind:8} {}  {msg}", show(rel))
        };
        found.entry(kind).or_default().push(line);
    };
    for (side, t) in [("A", &ta), ("B", &tb)] {
        for e in &t.errors {
            add("ERROR", b"", format!("{side}: {e}"));
        }
    }

    let paths: BTreeSet<&Vec<u8>> = ta.entries.keys().chain(tb.entries.keys()).collect();
    let mut to_read: Vec<(Vec<u8>, u64)> = Vec::new();
    let mut groups_seen: BTreeSet<Vec<Vec<u8>>> = BTreeSet::new();
    for &rel in &paths {
        let (ma, mb) = match (ta.entries.get(rel), tb.entries.get(rel)) {
            (Some(ma), Some(mb)) => (ma, mb),
            (Some(ma), None) => {
                add("ONLY_A", rel, kind_of(ma).to_string());
                continue;
            }
            (None, Some(mb)) => {
                add("ONLY_B", rel, kind_of(mb).to_string());
                continue;
            }
            (None, None) => unreachable!(),
        };
        if rel.is_empty() && opts.ignore_root {
            continue;
        }
        let (ka, kb) = (kind_of(ma), kind_of(mb));
        if ka != kb {
            add("TYPE", rel, format!("A={ka} B={kb}"));
            continue;
        }
        let (pa, pb) = (ma.mode() & 0o7777, mb.mode() & 0o7777);
        if pa != pb && ka != "symlink" {
            add("MODE", rel, format!("A={pa:04o} B={pb:04o}"));
        }
        if ma.uid() != mb.uid() {
            add("UID", rel, format!("A={} B={}", ma.uid(), mb.uid()));
        }
        if ma.gid() != mb.gid() {
            add("GID", rel, format!("A={} B={}", ma.gid(), mb.gid()));
        }
        let mtime_ignored = opts.ignore_mtime
            || (ka == "dir" && opts.ignore_dir_mtime)
            || (ka == "symlink" && opts.ignore_symlink_mtime)
            || opts.mtime_ignored(rel);
        if !mtime_ignored && ma.mtime() != mb.mtime() {
            add("MTIME", rel, format!("A={} B={}", ma.mtime(), mb.mtime()));
        }
        match ka {
            "file" if ma.size() != mb.size() => {
                add("SIZE", rel, format!("A={} B={}", ma.size(), mb.size()))
            }
            "file" if !opts.no_content => to_read.push((rel.clone(), ma.size())),
            "symlink" => {
                let read = |t: &Tree| {
                    std::fs::read_link(t.path(rel))
                        .map(|p| show(p.as_os_str().as_bytes()))
                        .unwrap_or_else(|e| format!("<{e}>"))
                };
                let (la, lb) = (read(&ta), read(&tb));
                if la != lb {
                    add("TARGET", rel, format!("A={la:?} B={lb:?}"));
                }
            }
            "chr" | "blk" if ma.rdev() != mb.rdev() => {
                let dev = |r: u64| format!("{}:{}", libc::major(r), libc::minor(r));
                add(
                    "RDEV",
                    rel,
                    format!("A={} B={}", dev(ma.rdev()), dev(mb.rdev())),
                );
            }
            _ => {}
        }
        if !opts.no_xattr {
            let (xa, xb) = (ta.xattrs(rel), tb.xattrs(rel));
            if xa != xb {
                let only = |x: &BTreeMap<Vec<u8>, Vec<u8>>, y: &BTreeMap<Vec<u8>, Vec<u8>>| {
                    let parts: Vec<String> = x
                        .iter()
                        .filter(|(k, v)| y.get(*k) != Some(*v))
                        .map(|(k, v)| format!("{}={}", show(k), show_value(v)))
                        .collect();
                    format!("{{{}}}", parts.join(", "))
                };
                add(
                    "XATTR",
                    rel,
                    format!("A={} B={}", only(&xa, &xb), only(&xb, &xa)),
                );
            }
        }
        if !opts.no_hardlinks && ka != "dir" {
            let (ga, gb) = (ta.link_group(rel), tb.link_group(rel));
            if ga != gb {
                let key: Vec<Vec<u8>> = ga
                    .iter()
                    .chain(&gb)
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if groups_seen.insert(key) {
                    let list = |g: &BTreeSet<Vec<u8>>| {
                        g.iter().map(|p| show(p)).collect::<Vec<_>>().join(", ")
                    };
                    add(
                        "HARDLINK",
                        rel,
                        format!("A=[{}] B=[{}]", list(&ga), list(&gb)),
                    );
                }
            }
        }
    }

    // Contents: both sides of a file in one job, jobs over a few threads.
    let next = AtomicUsize::new(0);
    let differing = Mutex::new(Vec::new());
    let jobs = if opts.jobs == 0 { 2 } else { opts.jobs };
    std::thread::scope(|s| {
        for _ in 0..jobs.min(to_read.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((rel, size)) = to_read.get(i) else {
                    return;
                };
                let (pa, pb) = (ta.path(rel), tb.path(rel));
                // Compared side by side; hashed for the report only when they differ.
                if !matches!(same_content(&pa, &pb, *size), Ok(true)) {
                    let hash = |p: &Path| hash_file(p, *size).unwrap_or_else(|e| format!("<{e}>"));
                    differing
                        .lock()
                        .unwrap()
                        .push((rel.clone(), hash(&pa), hash(&pb)));
                }
            });
        }
    });
    for (rel, ha, hb) in differing.into_inner().unwrap() {
        let short = |h: &str| h.chars().take(16).collect::<String>() + tail(h);
        add(
            "CONTENT",
            &rel,
            format!("A={} B={}", short(&ha), short(&hb)),
        );
    }

    let mut differences = Vec::new();
    let mut report = String::new();
    let mut by_kind = Vec::new();
    for kind in KINDS {
        let Some(mut lines) = found.remove(kind) else {
            continue;
        };
        lines.sort();
        by_kind.push(format!("{kind}={}", lines.len()));
        for l in &lines {
            if !opts.quiet {
                report.push_str(l);
                report.push('\n');
            }
        }
        differences.extend(lines);
    }
    report.push_str(&format!(
        "compared {} paths (A: {}, B: {}), {} files read\n",
        paths.len(),
        ta.entries.len(),
        tb.entries.len(),
        to_read.len()
    ));
    if !by_kind.is_empty() {
        report.push_str(&format!("by kind: {}\n", by_kind.join(", ")));
    }
    report.push_str(&format!("{} differences\n", differences.len()));
    Diff {
        differences,
        report,
    }
}

/// What follows a hash that is not only a hash (a short read, an error), kept in the report.
fn tail(h: &str) -> &str {
    h.find('(').map_or("", |i| &h[i..])
}

struct Tree<'o> {
    root: PathBuf,
    opts: &'o Options,
    entries: BTreeMap<Vec<u8>, Metadata>,
    /// (dev, ino) of files with more than one link -> their paths.
    inodes: HashMap<(u64, u64), BTreeSet<Vec<u8>>>,
    errors: Vec<String>,
}

impl<'o> Tree<'o> {
    fn scan(root: &Path, opts: &'o Options) -> Tree<'o> {
        let mut t = Tree {
            root: root.to_path_buf(),
            opts,
            entries: BTreeMap::new(),
            inodes: HashMap::new(),
            errors: Vec::new(),
        };
        match std::fs::symlink_metadata(root) {
            Ok(m) if m.is_dir() => {
                t.entries.insert(Vec::new(), m);
            }
            Ok(_) => {
                t.errors
                    .push(format!("{}: not a directory", root.display()));
                return t;
            }
            Err(e) => {
                t.errors.push(format!("{}: {e}", root.display()));
                return t;
            }
        }
        let mut dirs = vec![Vec::new()];
        while let Some(dir) = dirs.pop() {
            let list = match std::fs::read_dir(t.path(&dir)) {
                Ok(l) => l,
                Err(e) => {
                    t.errors.push(format!("cannot list {}: {e}", show(&dir)));
                    continue;
                }
            };
            for entry in list {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        t.errors.push(format!("cannot list {}: {e}", show(&dir)));
                        break;
                    }
                };
                let name = entry.file_name();
                let mut r = dir.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(name.as_bytes());
                if opts.excluded(&r) {
                    continue;
                }
                let m = match std::fs::symlink_metadata(t.path(&r)) {
                    Ok(m) => m,
                    Err(e) => {
                        t.errors.push(format!("cannot lstat {}: {e}", show(&r)));
                        continue;
                    }
                };
                if m.is_dir() {
                    dirs.push(r.clone());
                } else if m.nlink() > 1 {
                    t.inodes
                        .entry((m.dev(), m.ino()))
                        .or_default()
                        .insert(r.clone());
                }
                t.entries.insert(r, m);
            }
        }
        t
    }

    fn path(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(OsStr::from_bytes(rel))
        }
    }

    fn link_group(&self, rel: &[u8]) -> BTreeSet<Vec<u8>> {
        let m = &self.entries[rel];
        if m.is_dir() || m.nlink() <= 1 {
            return BTreeSet::from([rel.to_vec()]);
        }
        self.inodes[&(m.dev(), m.ino())].clone()
    }

    /// The entry's xattrs (not followed through symlinks), less the ignored prefixes.
    fn xattrs(&self, rel: &[u8]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut out = BTreeMap::new();
        let path = CString::new(self.path(rel).into_os_string().into_vec()).unwrap();
        let names = match fill(|buf, len| {
            // SAFETY: `path` is NUL-terminated; `buf` is null with `len` 0 or holds `len` bytes.
            unsafe { libc::llistxattr(path.as_ptr(), buf.cast(), len) }
        }) {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::ENODATA)) => {
                return out
            }
            Err(e) => {
                out.insert(b"<llistxattr error>".to_vec(), e.to_string().into_bytes());
                return out;
            }
        };
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if self.opts.ignore_xattr.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let cname = CString::new(name).unwrap();
            let value = fill(|buf, len| {
                // SAFETY: as above, for the name `cname` (NUL-terminated).
                unsafe { libc::lgetxattr(path.as_ptr(), cname.as_ptr(), buf.cast(), len) }
            })
            .unwrap_or_else(|e| format!("<lgetxattr error: {e}>").into_bytes());
            out.insert(name.to_vec(), value);
        }
        out
    }
}

/// Runs a size-then-fill call (`llistxattr`, `lgetxattr`): asks for the size, then fills a
/// buffer of that size, again if it grew in between.
fn fill(call: impl Fn(*mut u8, usize) -> isize) -> std::io::Result<Vec<u8>> {
    loop {
        let n = call(std::ptr::null_mut(), 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

fn kind_of(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "file"
    } else if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_char_device() {
        "chr"
    } else if t.is_block_device() {
        "blk"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "sock"
    } else {
        "unknown"
    }
}

/// A relative path on one line: `/` for the root, control characters, backslashes and bytes
/// that are not UTF-8 escaped.
pub fn show(p: &[u8]) -> String {
    if p.is_empty() {
        return "/".into();
    }
    let mut s = String::new();
    for chunk in p.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' || c.is_control() {
                s.extend(c.escape_default());
            } else {
                s.push(c);
            }
        }
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// An xattr value: quoted text when it is printable, hex otherwise (both cut short).
fn show_value(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(t) if !t.chars().any(char::is_control) => {
            if t.chars().count() <= 60 {
                format!("{t:?}")
            } else {
                format!("{:?}", t.chars().take(57).collect::<String>() + "...")
            }
        }
        _ if v.len() <= 40 => format!("0x{}", hex::encode(v)),
        _ => format!("0x{}...", hex::encode(&v[..40])),
    }
}

const CHUNK: usize = 1 << 20;

/// A regular file's first `size` bytes (its size by stat), read without following a symlink.
/// Holes (SEEK_DATA/SEEK_HOLE, where the filesystem has them) come out as zeros without being
/// read.
struct Contents {
    f: std::fs::File,
    pos: u64,
    size: u64,
    sparse: bool,
    /// The run `pos` is in: where it ends, and whether it is a hole.
    run_end: u64,
    hole: bool,
}

/// How reading a file's `size` bytes ended, besides the bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ending {
    Whole,
    /// The file ended before its stat size.
    ShortAt(u64),
    /// There is more than its stat size.
    Longer,
}

impl Contents {
    fn open(path: &Path, size: u64) -> std::io::Result<Contents> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        Ok(Contents {
            f,
            pos: 0,
            size,
            sparse: true,
            run_end: 0,
            hole: false,
        })
    }

    fn seek(&self, whence: libc::c_int) -> std::io::Result<u64> {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on a descriptor `self.f` owns; it moves nothing but the offset.
        let r = unsafe { libc::lseek(self.f.as_raw_fd(), self.pos as libc::off_t, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    }

    /// Finds the run (data or hole) that starts at `pos`.
    fn next_run(&mut self) {
        self.hole = false;
        self.run_end = self.size;
        if !self.sparse {
            return;
        }
        match self.seek(libc::SEEK_DATA) {
            Ok(d) if d > self.pos => {
                self.hole = true;
                self.run_end = d.min(self.size);
            }
            Ok(_) => {
                if let Ok(h) = self.seek(libc::SEEK_HOLE) {
                    self.run_end = h.clamp(self.pos + 1, self.size);
                }
            }
            // Only a hole is left.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => self.hole = true,
            // A filesystem without SEEK_DATA: all of it is read.
            Err(_) => self.sparse = false,
        }
    }

    /// Fills `buf` with the next bytes, as many as it holds unless the file ends first; 0 at
    /// the stat size. A count short of that is a short read.
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = (buf.len() as u64).min(self.size - self.pos) as usize;
        let mut got = 0;
        while got < want {
            if self.pos >= self.run_end {
                self.next_run();
            }
            let n = ((self.run_end - self.pos) as usize).min(want - got);
            let n = if self.hole {
                buf[got..got + n].fill(0);
                n
            } else {
                match self.f.read_at(&mut buf[got..got + n], self.pos) {
                    Ok(0) => return Ok(got),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            got += n;
            self.pos += n as u64;
        }
        Ok(got)
    }

    /// What is past the stat size, once all of it was read.
    fn ending(&self) -> std::io::Result<Ending> {
        use std::os::unix::fs::FileExt;
        if self.pos < self.size {
            return Ok(Ending::ShortAt(self.pos));
        }
        let mut one = [0u8; 1];
        Ok(if self.f.read_at(&mut one, self.size)? > 0 {
            Ending::Longer
        } else {
            Ending::Whole
        })
    }
}

/// Whether the files at `a` and `b` hold the same `size` bytes (and end alike).
fn same_content(a: &Path, b: &Path, size: u64) -> std::io::Result<bool> {
    let (mut ca, mut cb) = (Contents::open(a, size)?, Contents::open(b, size)?);
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    loop {
        let (na, nb) = (ca.fill(&mut ba)?, cb.fill(&mut bb)?);
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na < CHUNK {
            return Ok(ca.ending()? == cb.ending()?);
        }
    }
}

/// sha256 of the first `size` bytes of the file at `path`, as hex, with a note after it when
/// the file is shorter or longer than that.
fn hash_file(path: &Path, size: u64) -> std::io::Result<String> {
    let mut c = Contents::open(path, size)?;
    let mut buf = vec![0u8; CHUNK];
    let mut h = Sha256::new();
    loop {
        let n = c.fill(&mut buf)?;
        h.update(&buf[..n]);
        if n < CHUNK {
            break;
        }
    }
    let hex = hex::encode(h.finalize());
    Ok(match c.ending()? {
        Ending::Whole => hex,
        Ending::ShortAt(pos) => format!("{hex}(short read at {pos})"),
        Ending::Longer => format!("{hex}(longer than stat size)"),
    })
}
