//! A merged tree file damaged in arbitrary ways: opening checks only the header, so whatever
//! opens must then read (and be written as an EROFS metadata image) without panicking or
//! looping (every record bounds-checked, walks bounded), and bytes that are not what was
//! written must fail the full check.
//!
//! The input is a list of edits (offset, xor) to a real tree file with every kind of record, so
//! that the fuzzer starts past the header instead of guessing one.
#![no_main]

use std::sync::OnceLock;

use bux_fuse::index::{Access, Compression, EntryKind, Extent, LayerSource, TarEntry};
use bux_fuse::tree::{merge, NodeData, Tree};
use bux_fuse::Digest;
use libfuzzer_sys::fuzz_target;

fn entry(path: &str, kind: EntryKind, link: &str) -> TarEntry {
    TarEntry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 1,
        gid: 2,
        mtime: 3,
        mtime_nsec: 4,
        size: if kind == EntryKind::File { 10 } else { 0 },
        link: link.as_bytes().to_vec(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: Vec::new(),
        offset: 512,
        sparse: None,
    }
}

fn base() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut x = entry("d/x", EntryKind::File, "");
        x.xattrs = vec![(b"user.a".to_vec(), b"1".to_vec()), (b"trusted.overlay.b".to_vec(), vec![])];
        let mut s = entry("d/s", EntryKind::File, "");
        s.size = 1 << 20;
        s.sparse = Some(vec![Extent { file_off: 4096, len: 10, stream_off: 512 }]);
        let layer = vec![
            entry("d", EntryKind::Dir, ""),
            x,
            s,
            entry("d/l", EntryKind::Symlink, "../d/x"),
            entry("d/h", EntryKind::Hardlink, "d/x"),
            entry("d/e", EntryKind::Dir, ""),
            entry("d/e/f", EntryKind::Fifo, ""),
        ];
        let source = LayerSource {
            digest: Digest::of(b"layer"),
            compression: Compression::None,
            uncompressed_size: 1 << 20,
            access: Access::Tar,
        };
        merge([(source, layer.as_slice())]).unwrap().as_bytes().to_vec()
    })
}

fuzz_target!(|edits: Vec<(u16, u8)>| {
    let mut bytes = base().to_vec();
    let len = bytes.len();
    let mut changed = false;
    for (at, xor) in edits.iter().take(64) {
        let at = *at as usize;
        if at >= len {
            bytes.truncate(at % len);
        } else if let Some(b) = bytes.get_mut(at) {
            *b ^= xor;
        }
        changed |= *xor != 0 || at >= len;
    }
    let changed = changed && bytes != base();
    let Ok(tree) = Tree::from_vec(bytes) else { return };
    let _ = tree.dump();
    // The EROFS metadata image is written from verified trees only; still, a damaged one must
    // give an error, not a panic or a loop.
    let _ = bux_fuse::tree::erofs::metadata_image(&tree);
    if changed {
        assert!(tree.verify().is_err(), "a changed tree passed the full check");
    }
    for (ino, inode) in tree.inodes().take(10_000) {
        for d in tree.children(ino).iter().take(1000) {
            let _ = tree.lookup(ino, d.name);
        }
        let _ = (inode.xattrs.iter().count(), tree.path_of(ino), tree.resolve(b"d/e/f"));
        if let NodeData::Sparse { extents, .. } = inode.data {
            let _ = (extents.iter().count(), extents.partition_point(|e| e.file_off < 4096));
        }
    }
});
