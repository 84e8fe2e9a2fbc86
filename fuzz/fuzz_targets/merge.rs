//! Arbitrary sequences of layer entries through the whiteout merge: it must return an error or a
//! tree, never panic; and a tree must be well formed: no whiteout or `..` names, sorted unique
//! entries, every dirent pointing at an inode, link counts matching the dirents, every directory
//! reachable once.
#![no_main]

use arbitrary::Arbitrary;
use bux_fuse::index::{Access, Compression, EntryKind, LayerSource, TarEntry};
use bux_fuse::tree::{merge, NodeData, ROOT_INO};
use bux_fuse::Digest;
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &["a", "b", "c", ".wh.a", ".wh.b", ".wh..wh..opq", ".wh..", ".wh..wh.plnk", "d/e", "a/b", "a/b/c", ""];

#[derive(Arbitrary, Debug)]
struct Op {
    path: [u8; 3],
    kind: u8,
    link: [u8; 3],
    mode: u16,
}

fn path(p: &[u8; 3]) -> Vec<u8> {
    let parts: Vec<&str> = p.iter().map(|b| NAMES[*b as usize % NAMES.len()]).filter(|s| !s.is_empty()).collect();
    parts.join("/").into_bytes()
}

fn entry(op: &Op) -> TarEntry {
    let kind = match op.kind % 5 {
        0 => EntryKind::File,
        1 => EntryKind::Dir,
        2 => EntryKind::Symlink,
        3 => EntryKind::Hardlink,
        _ => EntryKind::Fifo,
    };
    TarEntry {
        path: path(&op.path),
        kind,
        mode: op.mode as u32 & 0o7777,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        size: if kind == EntryKind::File { 1 } else { 0 },
        link: if matches!(kind, EntryKind::Symlink | EntryKind::Hardlink) { path(&op.link) } else { Vec::new() },
        dev_major: 0,
        dev_minor: 0,
        xattrs: Vec::new(),
        offset: 0,
        sparse: None,
    }
}

fuzz_target!(|layers: Vec<Vec<Op>>| {
    let layers: Vec<Vec<TarEntry>> = layers.iter().take(8).map(|l| l.iter().take(64).map(entry).collect()).collect();
    let sources = layers.iter().enumerate().map(|(i, l)| {
        (
            LayerSource { digest: Digest::of(&[i as u8]), compression: Compression::None, uncompressed_size: 1, access: Access::Tar },
            l.as_slice(),
        )
    });
    let Ok(tree) = merge(sources) else { return };
    let n = tree.inode_count();
    let mut refs = vec![0u32; n as usize + 1];
    let mut dir_seen = vec![false; n as usize + 1];
    dir_seen[ROOT_INO as usize] = true;
    for (ino, inode) in tree.inodes() {
        if let NodeData::Dir { .. } = inode.data {
            let kids: Vec<_> = tree.children(ino).iter().collect();
            assert!(kids.windows(2).all(|w| w[0].name < w[1].name), "unsorted or duplicate names");
            let mut subdirs = 0;
            for d in kids {
                assert!(d.ino >= 1 && d.ino <= n);
                assert!(!d.name.starts_with(b".wh."), "whiteout in tree: {:?}", d.name);
                assert!(d.name != b".." && d.name != b"." && !d.name.is_empty() && !d.name.contains(&b'/'));
                refs[d.ino as usize] += 1;
                let child = tree.inode(d.ino).unwrap();
                if child.kind == EntryKind::Dir {
                    assert!(!dir_seen[d.ino as usize], "directory linked twice");
                    dir_seen[d.ino as usize] = true;
                    assert_eq!(child.parent, ino);
                    subdirs += 1;
                }
            }
            assert_eq!(inode.nlink, 2 + subdirs);
        }
    }
    for (ino, inode) in tree.inodes().skip(1) {
        let i = ino as usize - 1;
        assert!(refs[i + 1] > 0, "unreachable inode");
        if inode.kind != EntryKind::Dir {
            assert_eq!(inode.nlink, refs[i + 1]);
        }
        assert_ne!(inode.kind, EntryKind::Hardlink);
    }
});
