//! The node table's journal: what a worker that takes over a user's writable mount needs to
//! answer the kernel about the nodes it was told of by the one that died.
//!
//! The kernel names files by node number, and those numbers are handed out as names are first
//! seen, so they follow from nothing on disk. Every change to a node (made, linked, unlinked,
//! renamed, copied up, dropped) is appended here before the request that made it is answered;
//! replaying the file gives each node's last state. The file lives in the mount's run
//! directory: a process that dies leaves its writes in the page cache, so nothing is synced
//! (a host crash ends the mount anyway). A worker that takes over rewrites it compactly.
//!
//! Records: `u32 length | u8 kind | u64 node | body` (little-endian). Kind 1, a node: `u64
//! lower (u64::MAX: none) | u8 flags (1 upper, 2 shared) | u32 links | (u64 parent | u32
//! length | name)*`. Kind 2: the node is gone. A torn last record (the writer killed inside
//! its write) is ignored.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::Node;

const NODE: u8 = 1;
const GONE: u8 = 2;
const UPPER: u8 = 1;
const SHARED: u8 = 2;
const NO_LOWER: u64 = u64::MAX;
/// Disk space allocated ahead of the journal's records (about 20,000 records' worth).
const RESERVE: u64 = 1 << 20;
/// Records kept for a journal that cannot be written (the disk full) before it gives up.
const MAX_PENDING: usize = 16 << 20;
/// A journal is compacted only past this size (and 8 times what its nodes need).
const COMPACT_MIN: u64 = 4 << 20;

/// What a journal says of a node: its state, or that it went.
pub(super) type Replayed = HashMap<u64, Option<Node>>;

/// An open journal, appended to.
pub(super) struct Journal {
    file: File,
    path: PathBuf,
    /// Bytes of whole records in the file.
    written: u64,
    /// Where the disk space allocated ahead for it ends (see [`Journal::reserve`]).
    reserved: u64,
    /// Records a failed write could not add (the disk full, say), tried again with the next.
    pending: Vec<u8>,
    /// The file could not be cut back to its whole records after a failed write: nothing more
    /// is written (a worker taking over knows the nodes up to there).
    broken: bool,
}

impl Journal {
    /// A new, empty journal at `path` (replacing any).
    pub(super) fn create(path: &Path) -> io::Result<Journal> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode_owner_only()
            .open(path)?;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            written: 0,
            reserved: 0,
            pending: Vec::new(),
            broken: false,
        })
    }

    /// The journal at `path`, appended to after its whole records (a torn tail cut off).
    pub(super) fn append_to(path: &Path) -> io::Result<Journal> {
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        let written = whole_records(&std::fs::read(path)?) as u64;
        file.set_len(written)?;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            written,
            reserved: 0,
            pending: Vec::new(),
            broken: false,
        })
    }

    /// Writes `nodes` as the whole journal (through a temporary file renamed over `path`),
    /// and returns it open for appending.
    pub(super) fn rewrite<'a>(
        path: &Path,
        nodes: impl Iterator<Item = (u64, &'a Node)>,
    ) -> io::Result<Journal> {
        let tmp = path.with_extension("new");
        let mut j = Journal::create(&tmp)?;
        let mut buf = Vec::new();
        for (n, node) in nodes {
            encode(&mut buf, n, Some(node));
        }
        if let Err(e) = j
            .file
            .write_all(&buf)
            .and_then(|()| std::fs::rename(&tmp, path))
        {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        j.path = path.to_path_buf();
        j.written = buf.len() as u64;
        Ok(j)
    }

    /// Allocates disk space ahead of the journal's end (not counted in its size), so that a
    /// guest filling the disk leaves room for [`RESERVE`] more bytes of records: the changes
    /// it still makes are journalled.
    fn reserve(&mut self) {
        use std::os::fd::AsRawFd;
        let end = self.written + self.pending.len() as u64;
        if end + RESERVE / 2 <= self.reserved {
            return;
        }
        // SAFETY: fallocate on an open descriptor; KEEP_SIZE changes no byte of the file.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                end as libc::off_t,
                RESERVE as libc::off_t,
            )
        };
        if r == 0 {
            self.reserved = end + RESERVE;
        }
    }

    /// Whether the journal is so much larger than `nodes` nodes need (a few dozen bytes each)
    /// that it is worth writing again as they are.
    pub(super) fn outgrew(&self, nodes: usize) -> bool {
        !self.broken && self.written > COMPACT_MIN && self.written > 8 * 64 * nodes as u64
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the records in `buf` (one write: a process killed inside it leaves a torn
    /// tail, which replay ignores, never a record half of another's). A write that fails is
    /// cut back to the records before it and tried again with the next; those records are
    /// missing from the file meanwhile.
    pub(super) fn append(&mut self, buf: &[u8]) {
        if self.broken {
            return;
        }
        self.pending.extend_from_slice(buf);
        if self.pending.is_empty() {
            return;
        }
        self.reserve();
        match self.file.write_all(&self.pending) {
            Ok(()) => {
                self.written += self.pending.len() as u64;
                self.pending.clear();
            }
            Err(e) => {
                if self.pending.len() == buf.len() {
                    tracing::warn!(
                        "writing the node journal {}: {e} (kept to write again; a worker \
                         taking over now would not know the nodes since)",
                        self.path.display()
                    );
                }
                // Cut the torn part off, and write again from there.
                let cut = self.file.set_len(self.written).and_then(|()| {
                    use std::io::Seek;
                    self.file
                        .seek(std::io::SeekFrom::Start(self.written))
                        .map(drop)
                });
                // Cutting frees the space set aside past the end too.
                self.reserved = self.written;
                if let Err(e) = cut {
                    tracing::warn!("cutting the node journal back: {e}: no more is written");
                    self.broken = true;
                    self.pending = Vec::new();
                } else if self.pending.len() > MAX_PENDING {
                    tracing::warn!(
                        "the node journal is {MAX_PENDING} bytes behind: no more is written"
                    );
                    self.broken = true;
                    self.pending = Vec::new();
                }
            }
        }
    }
}

trait OwnerOnly {
    fn mode_owner_only(&mut self) -> &mut Self;
}
impl OwnerOnly for std::fs::OpenOptions {
    fn mode_owner_only(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// Appends the record of node `n` (`None`: gone) to `buf`.
pub(super) fn encode(buf: &mut Vec<u8>, n: u64, node: Option<&Node>) {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_le_bytes());
    match node {
        None => {
            buf.push(GONE);
            buf.extend_from_slice(&n.to_le_bytes());
        }
        Some(node) => {
            buf.push(NODE);
            buf.extend_from_slice(&n.to_le_bytes());
            buf.extend_from_slice(&node.lower.unwrap_or(NO_LOWER).to_le_bytes());
            let flags = if node.upper { UPPER } else { 0 } | if node.shared { SHARED } else { 0 };
            buf.push(flags);
            buf.extend_from_slice(&(node.links.len() as u32).to_le_bytes());
            for (parent, name) in &node.links {
                buf.extend_from_slice(&parent.to_le_bytes());
                buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
                buf.extend_from_slice(name);
            }
        }
    }
    let len = (buf.len() - start - 4) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Every node's last state in the journal at `path`; nodes come back with no lookups
/// counted (the caller decides what the kernel may still hold).
/// How many bytes of `bytes` are whole records (a torn tail excluded).
fn whole_records(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Some(len) = bytes.get(at..at + 4) {
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        if bytes.len() < at + 4 + len {
            break;
        }
        at += 4 + len;
    }
    at
}

pub(super) fn replay(path: &Path) -> io::Result<Replayed> {
    let bytes = std::fs::read(path)?;
    let mut out = HashMap::new();
    let mut at = 0;
    while let Some(len) = bytes.get(at..at + 4) {
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        let Some(rec) = bytes.get(at + 4..at + 4 + len) else {
            break; // torn tail
        };
        let (n, node) = decode(rec).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "node journal {}: damaged record at byte {at}",
                    path.display()
                ),
            )
        })?;
        out.insert(n, node);
        at += 4 + len;
    }
    Ok(out)
}

fn decode(rec: &[u8]) -> Option<(u64, Option<Node>)> {
    let mut r = Reader(rec);
    let kind = r.u8()?;
    let n = r.u64()?;
    match kind {
        GONE => Some((n, None)),
        NODE => {
            let lower = Some(r.u64()?).filter(|&l| l != NO_LOWER);
            let flags = r.u8()?;
            let count = r.u32()?;
            let mut links = Vec::new();
            for _ in 0..count {
                let parent = r.u64()?;
                let len = r.u32()? as usize;
                links.push((parent, r.take(len)?.to_vec()));
            }
            r.0.is_empty().then_some(())?;
            let node = Node {
                links,
                lower,
                upper: flags & UPPER != 0,
                lookups: 0,
                shared: flags & SHARED != 0,
            };
            Some((n, Some(node)))
        }
        _ => None,
    }
}

struct Reader<'a>(&'a [u8]);
impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(links: &[(u64, &str)], lower: Option<u64>, upper: bool) -> Node {
        Node {
            links: links
                .iter()
                .map(|(p, n)| (*p, n.as_bytes().to_vec()))
                .collect(),
            lower,
            upper,
            lookups: 7,
            shared: lower.is_some() && !upper,
        }
    }

    #[test]
    fn the_last_record_of_each_node_wins_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut j = Journal::create(&path).unwrap();
        let mut buf = Vec::new();
        encode(&mut buf, 2, Some(&node(&[(1, "etc")], Some(5), false)));
        encode(&mut buf, 3, Some(&node(&[(2, "passwd")], Some(9), false)));
        encode(
            &mut buf,
            3,
            Some(&node(&[(2, "passwd"), (1, "pw")], Some(9), true)),
        );
        encode(&mut buf, 4, Some(&node(&[(1, "new")], None, true)));
        encode(&mut buf, 4, None);
        j.append(&buf);
        // A record cut short by a kill inside the write.
        let mut torn = Vec::new();
        encode(&mut torn, 5, Some(&node(&[(1, "late")], None, true)));
        j.append(&torn[..torn.len() - 3]);
        let got = replay(&path).unwrap();
        assert_eq!(got.len(), 3);
        let etc = got[&2].as_ref().unwrap();
        assert_eq!((etc.lower, etc.upper, etc.shared), (Some(5), false, true));
        let pw = got[&3].as_ref().unwrap();
        assert_eq!(pw.links, vec![(2, b"passwd".to_vec()), (1, b"pw".to_vec())]);
        assert!(pw.upper && pw.lookups == 0);
        assert!(got[&4].is_none());
        // Compacted: the same nodes, nothing else.
        let live: Vec<(u64, Node)> = got.into_iter().filter_map(|(n, v)| Some((n, v?))).collect();
        Journal::rewrite(&path, live.iter().map(|(n, v)| (*n, v))).unwrap();
        let again = replay(&path).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again[&3].as_ref().unwrap().links.len(), 2);
    }

    /// A journal taken over with a torn tail (its writer killed inside a write) is appended
    /// to after its whole records: the tail does not swallow what comes next.
    #[test]
    fn appending_after_a_torn_tail_cuts_it_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut buf = Vec::new();
        encode(&mut buf, 2, Some(&node(&[(1, "etc")], Some(5), false)));
        let mut torn = Vec::new();
        encode(&mut torn, 3, Some(&node(&[(1, "late")], None, true)));
        buf.extend_from_slice(&torn[..torn.len() - 2]);
        std::fs::write(&path, &buf).unwrap();
        let mut j = Journal::append_to(&path).unwrap();
        let mut more = Vec::new();
        encode(&mut more, 4, Some(&node(&[(1, "next")], None, true)));
        j.append(&more);
        let got = replay(&path).unwrap();
        assert_eq!(got.len(), 2, "{:?}", got.keys());
        assert!(got.contains_key(&2) && got.contains_key(&4));
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut buf = Vec::new();
        encode(&mut buf, 2, Some(&node(&[(1, "etc")], Some(5), false)));
        buf[4] = 9; // an unknown kind
        std::fs::write(&path, &buf).unwrap();
        let e = replay(&path).err().unwrap();
        assert!(e.to_string().contains("damaged record"), "{e}");
    }
}
