use super::super::test_support::{entry, merged};
use super::encode::mode_type;
use super::*;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Every kind of entry, and the corners of the format: directories over several blocks,
/// long symlinks, large files, large ids, negative times, escaped overlay xattrs.
fn sample() -> Tree {
    let mut l = vec![entry("d", EntryKind::Dir)];
    for i in 0..700 {
        let mut f = entry(&format!("d/{:0>40}", i), EntryKind::File);
        f.size = i;
        l.push(f);
    }
    let mut big = entry("big", EntryKind::File);
    big.size = 5 << 30;
    big.uid = 100_000;
    big.gid = 200_000;
    big.mtime = -86_400;
    big.mtime_nsec = 123_456_789;
    big.xattrs = vec![
        (b"user.note".to_vec(), b"hello".to_vec()),
        (
            b"security.capability".to_vec(),
            // v2, effective, CAP_NET_BIND_SERVICE permitted (the kernel checks the format)
            [[1, 0, 0, 2, 0, 4, 0, 0], [0; 8]]
                .concat()
                .into_iter()
                .chain([0; 4])
                .collect(),
        ),
        (b"trusted.overlay.opaque".to_vec(), b"y".to_vec()),
    ];
    l.push(big);
    let mut one = entry("one", EntryKind::File);
    one.size = 1;
    l.push(one);
    let mut empty = entry("empty", EntryKind::File);
    empty.size = 0;
    l.push(empty);
    let mut hard = entry("hard", EntryKind::Hardlink);
    hard.link = b"one".to_vec();
    l.push(hard);
    let mut s = entry("short", EntryKind::Symlink);
    s.link = b"d/x".to_vec();
    l.push(s);
    let mut s = entry("long", EntryKind::Symlink);
    s.link = vec![b'a'; 4000];
    l.push(s);
    let mut c = entry("null", EntryKind::Char);
    (c.dev_major, c.dev_minor) = (1, 3);
    l.push(c);
    let mut b = entry("disk", EntryKind::Block);
    (b.dev_major, b.dev_minor) = (259, 300_000);
    l.push(b);
    l.push(entry("fifo", EntryKind::Fifo));
    // Small files the image holds: sizes around block boundaries (see `held`).
    l.push(entry("small", EntryKind::Dir));
    for (k, size) in SMALL_SIZES.iter().enumerate() {
        let mut f = entry(&format!("small/{size}"), EntryKind::File);
        f.size = *size;
        f.offset = (k as u64 + 1) << 20;
        l.push(f);
    }
    let mut o = entry("o", EntryKind::Dir);
    o.mode = 0o1777;
    o.xattrs = vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())];
    l.push(o);
    merged(&[l]).unwrap()
}

const SMALL_SIZES: [u64; 12] = [
    1, 100, 512, 513, 3000, 4095, 4096, 4097, 8192, 12_000, 16_384, 65_536,
];

/// The bytes the image holds for `sample`'s small files, by stream offset.
fn held(tree: &Tree) -> std::collections::HashMap<u64, Vec<u8>> {
    SMALL_SIZES
        .iter()
        .map(|size| {
            let ino = tree.resolve(format!("/small/{size}").as_bytes()).unwrap();
            let NodeData::File { offset, .. } = tree.inode(ino).unwrap().data else {
                panic!("not a file")
            };
            let bytes = (0..*size).map(|i| (i * 7 + size) as u8).collect();
            (offset, bytes)
        })
        .collect()
}

/// The image of `tree` holding the small files of `small` (bytes by stream offset).
fn image_holding(tree: &Tree, small: &std::collections::HashMap<u64, Vec<u8>>) -> Vec<u8> {
    let by_offset = |_, off, size| {
        small
            .get(&off)
            .filter(|b: &&Vec<u8>| b.len() as u64 == size)
            .map(|b| &b[..])
    };
    metadata_image(tree, &by_offset).unwrap()
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr {}", p.display());
    let mut out: Vec<_> = names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty() && !n.starts_with(b"system.posix_acl"))
        .map(|name| {
            let cn = CString::new(name).unwrap();
            let mut v = vec![0u8; 65536];
            // SAFETY: valid path, name and buffer.
            let len =
                unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
            assert!(
                len >= 0,
                "getxattr {} {}: {}",
                p.display(),
                String::from_utf8_lossy(name),
                std::io::Error::last_os_error()
            );
            v.truncate(len as usize);
            (name.to_vec(), v)
        })
        .collect();
    out.sort();
    out
}

/// One line per path: what `stat`, `readlink` and the xattr calls say.
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let size = if m.is_dir() { 0 } else { m.size() }; // the format's own business
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let link = match m.file_type().is_symlink() {
            true => std::fs::read_link(&p).unwrap().as_os_str().len(),
            false => 0,
        };
        let dev = match m.file_type().is_block_device() || m.file_type().is_char_device() {
            true => format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev())),
            false => String::new(),
        };
        out.push(format!(
            "/{rel} {:o} {}:{} size={} {}.{} nlink={} {dev} link={link} {:?}",
            m.mode(),
            m.uid(),
            m.gid(),
            size,
            m.mtime(),
            m.mtime_nsec(),
            m.nlink(),
            xattrs(&p)
        ));
        if m.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            stack.extend(names.into_iter().rev());
        }
    }
    out
}

fn mount(src: &Path, dir: &Path, fstype: &str, data: &str) -> std::io::Result<()> {
    let c = |s: &[u8]| CString::new(s).unwrap();
    let (src, dir) = (c(src.as_os_str().as_bytes()), c(dir.as_os_str().as_bytes()));
    let (fstype, data) = (c(fstype.as_bytes()), c(data.as_bytes()));
    // SAFETY: valid NUL-terminated strings.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            libc::MS_RDONLY,
            data.as_ptr().cast(),
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn umount(dir: &Path) {
    let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// A layer's small-file table of `small`'s bytes, saved beside `dir/<hex>.idx` in the
/// current format (`v2`: the second), and opened.
fn table_of(
    dir: &Path,
    small: &std::collections::HashMap<u64, Vec<u8>>,
    v2: bool,
) -> crate::index::small::SmallIndex {
    use crate::index::small::{SmallFiles, SmallIndex};
    let index = dir.join(format!("{}.idx", "ab".repeat(32)));
    let mut table = SmallFiles::default();
    let mut files: Vec<_> = small.iter().collect();
    files.sort();
    for (offset, bytes) in &files {
        table.push(**offset, bytes);
    }
    match v2 {
        true => table.save_v2(&index),
        false => table.save(&index).unwrap(),
    }
    SmallIndex::open(&index).unwrap().unwrap()
}

/// Written to a file from a layer's small-file table of an earlier format, the image is
/// the one made in memory from the same bytes, with as many of them as the cap lets in;
/// from a table of the current format, the one made in memory from it, naming it as a
/// device.
#[test]
fn written_from_tables_as_made_in_memory() {
    let tree = sample();
    let small = held(&tree);
    let dir = tempfile::tempdir().unwrap();
    let tables = [Some(table_of(dir.path(), &small, true))];
    for cap in [u64::MAX, 20_000, 0] {
        let given = std::cell::Cell::new(0u64);
        let by_offset = |_, off, size| {
            let b = small
                .get(&off)
                .filter(|b: &&Vec<u8>| b.len() as u64 == size)?;
            given.set(given.get() + size);
            (given.get() <= cap).then_some(&b[..])
        };
        let want = metadata_image(&tree, &by_offset).unwrap();
        let path = dir.path().join("meta.erofs");
        let f = std::fs::File::create(&path).unwrap();
        let len = write_metadata_image(&tree, &tables, cap, &f).unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(len as usize, got.len());
        assert!(got == want, "cap {cap}: the images differ");
        let in_memory = metadata_image_with_tables(&tree, &tables, cap).unwrap();
        assert!(in_memory == want, "cap {cap}: in memory, the images differ");
        assert_eq!(devices(&path).unwrap(), vec![]);
    }
    // The current format: a device, whose files the image does not copy.
    let tables = [Some(table_of(dir.path(), &small, false))];
    let path = dir.path().join("dev.erofs");
    let f = std::fs::File::create(&path).unwrap();
    write_metadata_image(&tree, &tables, 0, &f).unwrap();
    let got = std::fs::read(&path).unwrap();
    assert!(got == metadata_image_with_tables(&tree, &tables, 0).unwrap());
    let copied = metadata_image(&tree, &|_, off, _| small.get(&off).map(|b| &b[..])).unwrap();
    assert!(
        got.len() < copied.len(),
        "{} vs {}",
        got.len(),
        copied.len()
    );
    let t = tables[0].as_ref().unwrap();
    let named = devices(&path).unwrap();
    assert_eq!(named.len(), 1);
    assert_eq!(named[0].layer, "ab".repeat(32));
    assert_eq!(named[0].table, t.table_digest());
    assert_eq!(Some(named[0].blocks), t.device_blocks());
    // No table: as made in memory with none held.
    let f = tempfile::tempfile().unwrap();
    write_metadata_image(&tree, &[None], u64::MAX, &f).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut &f, &mut got).unwrap();
    assert!(got == metadata_image(&tree, &|_, _, _| None).unwrap());
}

/// More layers with small files than block 0 names devices for, among them one of tiny
/// files only (no device), one of the second format (copied in), the same layer twice (one
/// file, two positions), a small file whited out above, small files with xattrs of every
/// length mod 8 (and an ACL) before their chunk index, and a hardlink to one: fsck.erofs
/// and the kernel, given the devices the image names, read every file as kept.
#[allow(clippy::type_complexity)] // what each file must read back, spelled out
#[test]
fn many_layers_devices_read_back() {
    use crate::index::small::{SmallFiles, SmallIndex};
    const LAYERS: usize = 28;
    let bytes = |layer: usize, offset: u64, size: u64| -> Vec<u8> {
        (0..size)
            .map(|i| (i * 13 + offset / 512 + layer as u64 * 31) as u8)
            .collect()
    };
    // The same layer at positions 3 and 4: one table file.
    let source = |k: usize| if k == 4 { 3 } else { k };
    let mut layers = Vec::new();
    let mut want: Vec<(String, Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>)> = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let mut tables = Vec::new();
    let mut paths = std::collections::HashMap::new();
    for k in 0..LAYERS {
        let s = source(k);
        let mut l = vec![entry(&format!("l{s}"), EntryKind::Dir)];
        let mut files = Vec::new();
        let sizes: &[u64] = match s {
            1 => &[1, 200, 512],
            0 => &[513, 4096, 4097, 65_536, 600, 700, 800, 900, 1000, 1100],
            _ => &[600 + s as u64 * 37, 9000],
        };
        for (i, &size) in sizes.iter().enumerate() {
            let mut f = entry(&format!("l{s}/f{i}"), EntryKind::File);
            f.size = size;
            f.offset = (i as u64 + 1) * 100_000 + 512;
            if s == 0 {
                // xattr bodies of 4 bytes more at each step: every alignment of the index.
                f.xattrs = vec![(b"user.n".to_vec(), vec![b'v'; i * 3])];
                if i == 1 {
                    let acl: Vec<u8> = [
                        &2u32.to_le_bytes()[..],
                        &[1, 0, 6, 0],
                        &u32::MAX.to_le_bytes(),
                        &[4, 0, 4, 0],
                        &u32::MAX.to_le_bytes(),
                        &[0x20, 0, 4, 0],
                        &u32::MAX.to_le_bytes(),
                    ]
                    .concat();
                    f.xattrs.push((b"system.posix_acl_access".to_vec(), acl));
                }
            }
            files.push((f.offset, bytes(s, f.offset, size)));
            let mut x: Vec<_> = f.xattrs.clone();
            x.retain(|(n, _)| !n.starts_with(b"system."));
            want.push((format!("l{s}/f{i}"), bytes(s, f.offset, size), x));
            l.push(f);
        }
        if s == 0 {
            let mut h = entry("l0/hard", EntryKind::Hardlink);
            h.link = b"l0/f2".to_vec();
            l.push(h);
            let w = want.iter().find(|w| w.0 == "l0/f2").unwrap().clone();
            want.push(("l0/hard".into(), w.1, w.2));
        }
        if k == 6 {
            // Layer 5's first file whited out.
            l.push(entry("l5/.wh.f0", EntryKind::File));
            want.retain(|w| w.0 != "l5/f0");
        }
        layers.push(l);
        let index = dir.path().join(format!("{:064x}.idx", s + 1));
        if k != 4 {
            let mut t = SmallFiles::default();
            for (o, b) in &files {
                t.push(*o, b);
            }
            match s {
                2 => t.save_v2(&index),
                _ => t.save(&index).unwrap(),
            }
            paths.insert(format!("{:064x}", s + 1), SmallFiles::path(&index));
        }
        tables.push(SmallIndex::open(&index).unwrap());
    }
    want.sort();
    want.dedup_by(|a, b| a.0 == b.0);
    let tree = merged(&layers).unwrap();
    let image = dir.path().join("meta.erofs");
    let f = std::fs::File::create(&image).unwrap();
    write_metadata_image(&tree, &tables, u64::MAX, &f).unwrap();
    drop(f);
    assert!(
        std::fs::read(&image).unwrap()
            == metadata_image_with_tables(&tree, &tables, u64::MAX).unwrap()
    );
    let named = devices(&image).unwrap();
    assert_eq!(named.len(), DEVICES_MAX);
    assert!(
        named.iter().all(|d| d.layer != format!("{:064x}", 2)),
        "tiny only: no device"
    );
    assert!(
        named.iter().all(|d| d.layer != format!("{:064x}", 3)),
        "second format"
    );
    let device_paths: Vec<_> = named.iter().map(|d| paths[&d.layer].clone()).collect();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let erofs = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("erofs"));
    if !root || !erofs {
        eprintln!("kernel part skipped: needs root and EROFS (root {root}, erofs {erofs})");
        return;
    }
    let mut fsck = std::process::Command::new("fsck.erofs");
    for d in &device_paths {
        fsck.arg(format!("--device={}", d.display()));
    }
    match fsck.arg("--extract").arg(&image).output() {
        Ok(out) => assert!(out.status.success(), "fsck.erofs: {out:?}"),
        Err(e) => eprintln!("fsck.erofs not run: {e}"),
    }
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let options: Vec<_> = device_paths
        .iter()
        .map(|d| format!("device={}", d.display()))
        .collect();
    mount(&image, &mnt, "erofs", &options.join(",")).unwrap();
    let result = std::panic::catch_unwind(|| {
        for (path, data, x) in &want {
            let p = mnt.join(path);
            assert!(
                std::fs::read(&p).unwrap() == *data,
                "{path}: the bytes differ"
            );
            assert_eq!(&xattrs(&p), x, "{path}");
        }
        assert!(!mnt.join("l5/f0").exists());
        let ino = |p: &str| std::fs::metadata(mnt.join(p)).unwrap().ino();
        assert_eq!(ino("l0/hard"), ino("l0/f2"));
        assert_eq!(std::fs::metadata(mnt.join("l0/f2")).unwrap().nlink(), 2);
    });
    umount(&mnt);
    result.unwrap_or_else(|e| std::panic::resume_unwind(e));
}

/// An image naming devices is not taken for its own by a version before devices (which
/// would mount it without them and serve the image's metadata blocks as the files' bytes);
/// one naming none still is, and this version takes both.
#[test]
fn an_image_with_devices_is_not_current_to_earlier_versions() {
    // `is_current` as the version before devices had it.
    fn earlier_is_current(path: &Path) -> bool {
        let head = std::fs::read(path).unwrap();
        let s = &head[SUPER_OFFSET..];
        let blocks = u32::from_le_bytes(s[36..40].try_into().unwrap()) as u64;
        s[..4] == MAGIC.to_le_bytes()
            && s[64..80].starts_with(b"bux-fuse 2")
            && s[64 + 10] == 0
            && blocks * BLOCK as u64 == head.len() as u64
    }
    let tree = sample();
    let small = held(&tree);
    let dir = tempfile::tempdir().unwrap();
    for (v2, named) in [(true, 0), (false, 1)] {
        let tables = [Some(table_of(dir.path(), &small, v2))];
        let path = dir.path().join("meta.erofs");
        let f = std::fs::File::create(&path).unwrap();
        write_metadata_image(&tree, &tables, u64::MAX, &f).unwrap();
        assert_eq!(devices(&path).unwrap().len(), named);
        assert!(is_current(&path), "v2 {v2}");
        assert_eq!(earlier_is_current(&path), named == 0, "v2 {v2}");
    }
}

#[test]
fn layout_keeps_inline_data_within_a_block() {
    let tree = sample();
    let small = held(&tree);
    let img = image_holding(&tree, &small);
    assert_eq!(img.len() % BLOCK, 0);
    assert_eq!(
        u32::from_le_bytes(img[1024..1028].try_into().unwrap()),
        MAGIC
    );
    let blocks = u32::from_le_bytes(img[1060..1064].try_into().unwrap()) as usize;
    assert_eq!(blocks * BLOCK, img.len());
    // Writing is deterministic: the same tree, the same bytes (and so stable inode numbers).
    assert_eq!(img, image_holding(&tree, &small));
    // Without the small files' bytes, it is smaller by at least theirs.
    let lean = metadata_image(&tree, &|_, _, _| None).unwrap();
    let bytes: u64 = SMALL_SIZES.iter().sum();
    assert!(lean.len() as u64 + bytes <= img.len() as u64);
}

#[test]
fn what_overlayfs_or_one_chunk_cannot_carry_is_refused() {
    let mut c = entry("w", EntryKind::Char);
    (c.dev_major, c.dev_minor) = (0, 0);
    let tree = merged(&[vec![c]]).unwrap();
    assert!(metadata_image(&tree, &|_, _, _| None)
        .unwrap_err()
        .0
        .contains("whiteout"));
    // As is a file beyond what one chunk describes (a sparse entry may claim any size).
    let mut huge = entry("huge", EntryKind::File);
    huge.size = MAX_FILE + 1;
    let tree = merged(&[vec![huge]]).unwrap();
    assert!(metadata_image(&tree, &|_, _, _| None)
        .unwrap_err()
        .0
        .contains("8 TiB"));
    // And a name no Linux filesystem can carry (a tar may hold one).
    let long = entry(&"n".repeat(NAME_MAX + 1), EntryKind::File);
    let tree = merged(&[vec![long]]).unwrap();
    assert!(metadata_image(&tree, &|_, _, _| None)
        .unwrap_err()
        .0
        .contains("256 bytes"));
    let mut largest = entry("largest", EntryKind::File);
    largest.size = MAX_FILE;
    assert!(metadata_image(&merged(&[vec![largest]]).unwrap(), &|_, _, _| None).is_ok());
}

/// A path of `len` bytes (with its leading `/`): directories of 250 bytes, then the file.
fn long_path(len: usize) -> String {
    let dirs = (len - 2) / 251;
    let mut p: Vec<String> = (0..dirs).map(|i| format!("{i:a>250}")).collect();
    p.push("f".repeat(len - 1 - dirs * 251));
    let p = p.join("/");
    assert_eq!(p.len() + 1, len);
    p
}

/// Xattrs of a file with data at `/x`, encoded in `len` bytes (a multiple of 4), header,
/// metacopy reference and redirect (24 bytes) included.
fn xattrs_of_len(len: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut left = len - XATTR_HEADER - 4 - 24;
    let mut out = Vec::new();
    while left > 0 {
        // An entry: 4 bytes, a one-byte name, the value, padded to 4 bytes.
        let entry = left.min(65_536);
        let value = if entry == left { entry - 5 } else { 65_531 };
        out.push((
            format!("user.{}", out.len()).into_bytes(),
            vec![b'v'; value],
        ));
        left -= entry;
    }
    out
}

/// What EROFS inodes or overlayfs redirects cannot carry: inline xattrs past the 16 bits
/// that count them (a PAX header may hold a MiB of xattrs), and a redirect path over
/// PATH_MAX (which overlayfs cannot look up: the file would fail to open).
#[test]
fn what_an_inode_or_a_redirect_cannot_carry_is_refused() {
    let refused = |tree: &Tree| match metadata_image(tree, &|_, _, _| None) {
        Ok(img) => panic!("written ({} bytes) rather than refused", img.len()),
        Err(e) => e.0,
    };
    let mut f = entry("x", EntryKind::File);
    f.size = 1 << 20;
    f.xattrs = xattrs_of_len(XATTR_HEADER + 4 * u16::MAX as usize);
    let why = refused(&merged(&[vec![f.clone()]]).unwrap());
    assert!(why.contains("xattrs") && why.contains("/x"), "{why}");
    // As many as the count holds are written (and read back: see below).
    f.xattrs = xattrs_of_len(XATTR_HEADER + 4 * (u16::MAX as usize - 1));
    let most = merged(&[vec![f]]).unwrap();
    let img = metadata_image(&most, &|_, _, _| None).unwrap();
    // A redirect: at most PATH_MAX - 1 bytes.
    let mut long = entry(&long_path(libc::PATH_MAX as usize), EntryKind::File);
    long.size = 1 << 20;
    let why = refused(&merged(&[vec![long.clone()]]).unwrap());
    assert!(why.contains("path of 4096 bytes"), "{why}");
    long.path = long_path(libc::PATH_MAX as usize - 1).into_bytes();
    assert!(metadata_image(&merged(&[vec![long.clone()]]).unwrap(), &|_, _, _| None).is_ok());
    // A file the image holds has no redirect, whatever its path.
    long.path = long_path(libc::PATH_MAX as usize + 100).into_bytes();
    long.size = 3;
    let tree = merged(&[vec![long]]).unwrap();
    assert!(metadata_image(&tree, &|_, _, size| Some(&b"abc"[..size as usize])).is_ok());

    // The kernel reads the most xattrs back, and the redirect after them.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let erofs = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("erofs"));
    if !root || !erofs {
        eprintln!("kernel read skipped: needs root and EROFS (root {root}, erofs {erofs})");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (image, meta) = (tmp.path().join("meta.erofs"), tmp.path().join("meta"));
    std::fs::write(&image, &img).unwrap();
    std::fs::create_dir(&meta).unwrap();
    if let Ok(out) = std::process::Command::new("fsck.erofs")
        .arg(&image)
        .output()
    {
        assert!(out.status.success(), "fsck.erofs: {out:?}");
    }
    mount(&image, &meta, "erofs", "").unwrap();
    let seen = std::panic::catch_unwind(|| xattrs(&meta.join("x")));
    umount(&meta);
    let mut want: Vec<_> = most
        .inode(most.resolve(b"/x").unwrap())
        .unwrap()
        .xattrs
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    want.push((b"trusted.overlay.metacopy".to_vec(), Vec::new()));
    want.push((b"trusted.overlay.redirect".to_vec(), b"/x".to_vec()));
    want.sort();
    assert!(seen.unwrap() == want, "the xattrs read back differ");
}

/// The kernel reads the image as the tree says, through the overlay that serves it, with
/// data from a data-only lower layer.
#[test]
fn the_kernel_reads_the_tree_back_through_an_overlay() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let erofs = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("erofs"));
    if !root || !erofs {
        eprintln!("skipped: needs root and EROFS (root {root}, erofs {erofs})");
        return;
    }
    for on_device in [false, true] {
        kernel_reads_back(on_device);
    }
}

/// The image of the sample tree, its small files copied in or (`on_device`) on a layer's
/// small-file file as an extra device, read back by the kernel.
fn kernel_reads_back(on_device: bool) {
    let tree = sample();
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("meta.erofs");
    let small = held(&tree);
    let device = match on_device {
        false => {
            std::fs::write(&image, image_holding(&tree, &small)).unwrap();
            None
        }
        true => {
            let tables = [Some(table_of(tmp.path(), &small, false))];
            let f = std::fs::File::create(&image).unwrap();
            write_metadata_image(&tree, &tables, u64::MAX, &f).unwrap();
            Some(tmp.path().join(format!("{}.small", "ab".repeat(32))))
        }
    };
    // erofs-utils' own checker, an independent reader (scripts/setup.sh installs it).
    let mut fsck = std::process::Command::new("fsck.erofs");
    if let Some(d) = &device {
        fsck.arg(format!("--device={}", d.display()));
    }
    match fsck.arg(&image).output() {
        Ok(out) => assert!(out.status.success(), "fsck.erofs: {out:?}"),
        Err(e) => eprintln!("fsck.erofs not run: {e}"),
    }
    // The data-only layer: each file's bytes at its path (here: its path, repeated).
    let data = tmp.path().join("data");
    let (meta, merged) = (tmp.path().join("meta"), tmp.path().join("merged"));
    for d in [&data, &meta, &merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut expected = Vec::new();
    for line in tree.dump().lines() {
        let path = line.split(' ').next().unwrap();
        let ino = tree.resolve(path.as_bytes()).unwrap();
        let i = tree.inode(ino).unwrap();
        if let (EntryKind::File, NodeData::File { offset, .. }) = (i.kind, i.data) {
            if let Some(bytes) = small.get(&offset) {
                // Not in the data layer: only the image has these.
                expected.push((path.to_string(), bytes.clone()));
                continue;
            }
        }
        if i.kind == EntryKind::File && i.size > 0 {
            let p = data.join(&path[1..]);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let f = std::fs::File::create(&p).unwrap();
            if i.size < 1 << 20 {
                let bytes: Vec<u8> = path.bytes().cycle().take(i.size as usize).collect();
                std::fs::write(&p, &bytes).unwrap();
                expected.push((path.to_string(), bytes));
            } else {
                f.set_len(i.size).unwrap();
            }
        }
    }
    let devices = device.map(|d| format!("device={}", d.display()));
    mount(&image, &meta, "erofs", &devices.unwrap_or_default()).unwrap();
    let opts = format!(
        "metacopy=on,redirect_dir=follow,lowerdir={}::{}",
        meta.display(),
        data.display()
    );
    let mounted = mount(Path::new("overlay"), &merged, "overlay", &opts).map_err(|e| e.to_string());
    let result = std::panic::catch_unwind(|| {
        mounted.unwrap();
        let seen = listing(&merged);
        // The same listing from the tree itself, extracted to a plain directory.
        let want: Vec<String> = tree_listing(&tree);
        let differ: Vec<_> = seen
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .take(3)
            .collect();
        assert!(differ.is_empty(), "kernel vs tree: {differ:#?}");
        assert_eq!(seen.len(), want.len());
        for (path, bytes) in &expected {
            assert_eq!(
                &std::fs::read(merged.join(&path[1..])).unwrap(),
                bytes,
                "{path}"
            );
        }
        let ino = |p: &str| std::fs::metadata(merged.join(p)).unwrap().ino();
        assert_eq!(ino("one"), ino("hard"));
    });
    umount(&merged);
    umount(&meta);
    result.unwrap_or_else(|e| std::panic::resume_unwind(e));
}

/// What [`listing`] should print for `tree`.
fn tree_listing(tree: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((ino, rel)) = stack.pop() {
        let i = tree.inode(ino).unwrap();
        let dev = match i.kind {
            EntryKind::Char | EntryKind::Block => format!("{}:{}", i.dev_major, i.dev_minor),
            _ => String::new(),
        };
        let link = match i.data {
            NodeData::Symlink(t) => t.len(),
            _ => 0,
        };
        let mut x: Vec<(Vec<u8>, Vec<u8>)> = i
            .xattrs
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        x.sort();
        out.push(format!(
            "/{rel} {:o} {}:{} size={} {}.{} nlink={} {dev} link={link} {x:?}",
            mode_type(i.kind) | i.mode,
            i.uid,
            i.gid,
            if i.kind == EntryKind::Dir { 0 } else { i.size },
            i.mtime,
            i.mtime_nsec,
            i.nlink,
        ));
        let mut children: Vec<_> = tree.children(ino).iter().collect();
        children.sort_by(|a, b| a.name.cmp(b.name));
        for d in children.into_iter().rev() {
            let name = String::from_utf8_lossy(d.name);
            let p = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            stack.push((d.ino, p));
        }
    }
    out
}
