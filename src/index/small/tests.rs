use super::*;

#[test]
fn round_trips_and_finds_by_offset_and_length() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("x.idx");
    let mut s = SmallFiles::default();
    s.push(512, b"hello");
    s.push(2048, b"");
    s.push(4096, &vec![7u8; SMALL_MAX as usize]);
    s.push(4000, b"out of order: not kept");
    s.push(1 << 30, &vec![1u8; SMALL_MAX as usize + 1]); // too large: not kept
    assert_eq!(s.len(), 3);
    // Past what a layer keeps, nothing more is.
    let mut full = SmallFiles::default();
    let chunk = vec![3u8; SMALL_MAX as usize];
    for i in 0..(KEEP_MAX / chunk.len() + 5) as u64 {
        full.push(i << 20, &chunk);
    }
    assert_eq!(full.len(), KEEP_MAX / chunk.len());
    s.save(&index).unwrap();
    let back = SmallFiles::load(&index).unwrap().unwrap();
    assert_eq!(back, s);
    assert_eq!(back.get(512, 5), Some(&b"hello"[..]));
    assert_eq!(back.get(512, 6), None, "a length that does not match");
    assert_eq!(back.get(2048, 0), Some(&b""[..]));
    assert_eq!(back.get(4096, SMALL_MAX).map(|b| b[0]), Some(7));
    assert_eq!(back.get(513, 5), None);
    // A table that keeps files up to 5 bytes, and one that keeps only empty ones.
    let (mut fewer, mut none) = (SmallFiles::up_to(5), SmallFiles::up_to(0));
    for (offset, bytes) in back.iter() {
        fewer.push(offset, bytes);
        none.push(offset, bytes);
    }
    assert_eq!((fewer.len(), fewer.get(512, 5)), (2, Some(&b"hello"[..])));
    assert_eq!(fewer.get(4096, SMALL_MAX), None);
    assert_eq!((none.len(), none.get(2048, 0)), (1, Some(&b""[..])));
    // A file whose data ends early is not kept, and leaves nothing behind.
    let mut short = SmallFiles::default();
    short.push_from(1, 10, &b"four"[..]).unwrap();
    short.push(2, b"ok");
    assert_eq!((short.len(), short.get(2, 2)), (1, Some(&b"ok"[..])));
    // None kept: no file, and loading says so.
    let other = dir.path().join("y.idx");
    SmallFiles::default().save(&other).unwrap();
    assert!(!SmallFiles::path(&other).exists());
    assert_eq!(SmallFiles::load(&other).unwrap(), None);
}

#[test]
fn damaged_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("x.idx");
    let mut s = SmallFiles::default();
    for i in 0..100u64 {
        let len = [8, 600, 5000][i as usize % 3];
        s.push(i * 65536, &vec![i as u8; len]);
    }
    s.save(&index).unwrap();
    let path = SmallFiles::path(&index);
    let good = std::fs::read(&path).unwrap();
    assert_eq!(SmallFiles::load(&index).unwrap().unwrap(), s);
    // Earlier formats are still read: the first (one frame: count, records, bytes) and
    // the second (a table frame, then the bytes' frame).
    let mut body = (s.len() as u64).to_le_bytes().to_vec();
    for (offset, bytes) in s.iter() {
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    }
    for (_, bytes) in s.iter() {
        body.extend_from_slice(bytes);
    }
    std::fs::write(
        &path,
        [&MAGIC_V1[..], &zstd::bulk::compress(&body, 1).unwrap()].concat(),
    )
    .unwrap();
    assert_eq!(
        SmallFiles::load(&index).unwrap().unwrap(),
        s,
        "first format"
    );
    s.save_v2(&index);
    assert_eq!(
        SmallFiles::load(&index).unwrap().unwrap(),
        s,
        "second format"
    );
    let v2 = SmallIndex::open(&index).unwrap().unwrap();
    let mut seen = Vec::new();
    v2.each(|o, b| {
        seen.push((o, b.to_vec()));
        Ok(true)
    })
    .unwrap();
    assert!(
        seen.iter().map(|(o, b)| (*o, &b[..])).eq(s.iter()),
        "second format"
    );
    assert_eq!(
        (v2.placed_at(65536), v2.device_blocks()),
        (Some(Placed::Stream), None)
    );
    // The current format, damaged: its table rewritten (records as given, then the tiny
    // files' bytes), or its header.
    let table_at = u64::from_le_bytes(good[8..16].try_into().unwrap());
    let table_len = u64::from_le_bytes(good[16..24].try_into().unwrap());
    let frame = &good[table_at as usize..(table_at + table_len) as usize];
    let table = zstd::bulk::decompress(frame, 1 << 20).unwrap();
    let records = 8 + s.len() * RECORD_V3;
    let with_table = |t: &[u8]| {
        let frame = zstd::bulk::compress(t, 1).unwrap();
        let mut f = good[..table_at as usize].to_vec();
        f[16..24].copy_from_slice(&(frame.len() as u64).to_le_bytes());
        f.extend(frame);
        f
    };
    let record = |i: usize, field: std::ops::Range<usize>, v: &[u8]| {
        let mut t = table.clone();
        let at = 8 + i * RECORD_V3;
        t[at + field.start..at + field.end].copy_from_slice(v);
        with_table(&t)
    };
    let with_head = |at: usize, v: u64| {
        let mut f = good.clone();
        f[at..at + 8].copy_from_slice(&v.to_le_bytes());
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 2].to_vec()),
        ("table cut short", good[..good.len() - 3].to_vec()),
        ("bad magic", [b"BUXSML\x00\x09", &good[8..]].concat()),
        ("table not at a block", with_head(8, table_at + 1)),
        ("table in the header", with_head(8, 0)),
        ("table past the end", with_head(8, table_at + 4096)),
        (
            "damaged frame",
            [&good[..good.len() - 6], &[0xff; 6][..]].concat(),
        ),
        ("offsets out of order", record(1, 0..8, &0u64.to_le_bytes())),
        (
            "longer than kept files",
            record(1, 8..12, &(1u32 << 20).to_le_bytes()),
        ),
        (
            "block past the data",
            record(1, 12..16, &(table_at as u32).to_le_bytes()),
        ),
        (
            "a block for a tiny file",
            record(0, 12..16, &1u32.to_le_bytes()),
        ),
        (
            "no block for a larger one",
            record(1, 12..16, &0u32.to_le_bytes()),
        ),
        ("tiny bytes missing", with_table(&table[..table.len() - 1])),
        (
            "tiny bytes too many",
            with_table(&[&table[..], b"x"].concat()),
        ),
        ("count", {
            let mut t = table.clone();
            t[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            with_table(&t)
        }),
    ];
    assert!(records < table.len());
    for (what, bytes) in cases {
        std::fs::write(&path, bytes).unwrap();
        let err = SmallFiles::load(&index).unwrap_err().to_string();
        assert!(err.contains("x.small"), "{what}: {err}");
        let err = SmallIndex::open(&index).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("x.small")), "{what}: opened");
    }
}

/// A table of the current format is a device: each file's bytes at its block (or tiny, in
/// the table), zero-padded, and read back by [`SmallIndex::each`] as they were kept.
#[test]
fn files_lie_in_blocks_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("x.idx");
    let mut s = SmallFiles::default();
    let sizes = [0usize, 1, 512, 513, 4096, 4097, SMALL_MAX as usize, 3];
    for (i, &len) in sizes.iter().enumerate() {
        s.push(i as u64 * 100_000, &vec![i as u8 + 1; len]);
    }
    s.save(&index).unwrap();
    let file = std::fs::read(SmallFiles::path(&index)).unwrap();
    let t = SmallIndex::open(&index).unwrap().unwrap();
    assert_eq!(t.device_blocks(), Some((file.len() as u64).div_ceil(BLOCK)));
    let mut next = 1;
    for (i, &len) in sizes.iter().enumerate() {
        let placed = t.placed_at(i as u64 * 100_000).unwrap();
        if len as u64 <= TINY_MAX {
            assert_eq!(placed, Placed::Tiny(&vec![i as u8 + 1; len][..]), "{len}");
            continue;
        }
        assert_eq!(placed, Placed::Block(next), "{len}");
        let at = next as usize * BLOCK as usize;
        let blocks = (len as u64).div_ceil(BLOCK) as usize;
        assert!(file[at..at + len].iter().all(|&b| b == i as u8 + 1));
        assert!(file[at + len..at + blocks * BLOCK as usize]
            .iter()
            .all(|&b| b == 0));
        next += blocks as u32;
    }
    let mut seen = Vec::new();
    t.each(|o, b| {
        seen.push((o, b.to_vec()));
        Ok(true)
    })
    .unwrap();
    assert!(seen.iter().map(|(o, b)| (*o, &b[..])).eq(s.iter()));
    assert_eq!(t.placed_at(7), None);
    // Only tiny files: no blocks, so no device; the table follows the header.
    let mut tiny = SmallFiles::default();
    tiny.push(0, b"x");
    tiny.push(10, b"yz");
    let other = dir.path().join("t.idx");
    tiny.save(&other).unwrap();
    let len = std::fs::metadata(SmallFiles::path(&other)).unwrap().len();
    assert!(len < 100, "{len} bytes");
    let t = SmallIndex::open(&other).unwrap().unwrap();
    assert_eq!(
        (t.device_blocks(), t.placed_at(10)),
        (None, Some(Placed::Tiny(b"yz")))
    );
    assert_eq!(SmallFiles::load(&other).unwrap().unwrap(), tiny);
}

/// A spilling table holds only its records, and saves what a table in memory saves.
#[test]
fn spilled_tables_save_what_tables_in_memory_do() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("spill");
    let mut spilled = SmallFiles::spilling(SMALL_MAX, tmp.clone()).unwrap();
    let mut held = SmallFiles::default();
    for (i, len) in [
        5usize,
        0,
        4000,
        SMALL_MAX as usize,
        SMALL_MAX as usize + 1,
        17,
    ]
    .into_iter()
    .enumerate()
    {
        let bytes: Vec<u8> = (0..len).map(|k| (k * 7 + i) as u8).collect();
        spilled.push((i as u64) << 20, &bytes);
        held.push((i as u64) << 20, &bytes);
    }
    spilled.push_from(9 << 20, 10, &b"short"[..]).unwrap();
    assert_eq!((spilled.len(), held.len()), (5, 5));
    assert!(spilled.data.is_empty() && spilled.get(0, 5).is_none());
    let (a, b) = (dir.path().join("a.idx"), dir.path().join("b.idx"));
    spilled.save(&a).unwrap();
    held.save(&b).unwrap();
    assert_eq!(SmallFiles::load(&a).unwrap().unwrap(), held);
    assert_eq!(SmallFiles::load(&b).unwrap().unwrap(), held);
    // Saved beside a second index (a completed lazy layer's two names), the same file is
    // there too: linked, not written again (and not skipped).
    let c = dir.path().join("c.idx");
    spilled.save(&c).unwrap();
    assert_eq!(SmallFiles::load(&c).unwrap().unwrap(), held);
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| std::fs::metadata(SmallFiles::path(p)).unwrap().ino();
    assert_eq!(ino(&a), ino(&c));
    spilled.save(&a).unwrap(); // again where it is: nothing to do
    assert_eq!(SmallFiles::load(&a).unwrap().unwrap(), held);
    drop(spilled);
    assert!(!tmp.exists(), "the spill file is removed");
    // Dropped unsaved, it leaves nothing either.
    let other = SmallFiles::spilling(SMALL_MAX, tmp.clone()).unwrap();
    assert!(tmp.exists());
    drop(other);
    assert!(!tmp.exists());
}

/// A write to the spill that fails (the disk full, a file size limit) may leave part of a
/// file's blocks in the stream; if later ones succeed and the table is saved, the blocks
/// its records name must still hold those files' bytes — or the save fails. Run in a child
/// process: it sets a file size limit, which is the process's.
#[test]
fn a_failed_spill_write_never_saves_misplaced_bytes() {
    if !in_child("a_failed_spill_write_never_saves_misplaced_bytes") {
        return;
    }
    // SAFETY: ignoring SIGXFSZ has no preconditions (a write past the limit then fails
    // with EFBIG instead of ending the process).
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let set_limit = |n: u64| {
        let l = libc::rlimit {
            rlim_cur: n,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &l) }, 0);
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut failed, mut tried) = (0, 0);
    // Limits cutting a flush of the spill's buffer short at various points of a file.
    for cut in (0..12u64).map(|j| 300_000 + j * 1_000) {
        let tmp = dir.path().join("spill");
        let mut spilled = SmallFiles::spilling(SMALL_MAX, tmp).unwrap();
        let mut kept = SmallFiles::default();
        let bytes = |i: u64| -> Vec<u8> { (0..5_000).map(|k| (k * 7 + i * 3) as u8).collect() };
        set_limit(cut);
        for i in 0..100 {
            // A table in memory being saved pushes whatever comes, failed or not.
            match spilled.push_from(i * 65_536, 5_000, &bytes(i)[..]) {
                Ok(()) => kept.push(i * 65_536, &bytes(i)),
                Err(_) => failed += 1,
            }
        }
        set_limit(libc::RLIM_INFINITY);
        for i in 100..200 {
            if spilled.push_from(i * 65_536, 5_000, &bytes(i)[..]).is_ok() {
                kept.push(i * 65_536, &bytes(i));
            }
        }
        let index = dir.path().join(format!("{cut}.idx"));
        if spilled.save(&index).is_ok() {
            let saved = SmallFiles::load(&index).unwrap().unwrap();
            assert!(
                saved == kept,
                "limit {cut}: the saved bytes are not the files'"
            );
        }
        tried += 1;
    }
    assert!(failed > 0, "no write failed");
    eprintln!("{tried} limits tried, {failed} writes failed");
    eprintln!("child done");
}

/// Runs the test `name` (of this module) again in a child process, for limits that are
/// the process's, and checks that it passed; true in that child, which runs the test.
fn in_child(name: &str) -> bool {
    const CHILD: &str = "BUX_TEST_SMALL_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg(format!("index::small::tests::{name}"))
        .args(["--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("child done"),
        "{name}: {said} {out:?}"
    );
    false
}

/// A damaged file claiming a table (or a table's content) of gigabytes is refused without
/// a buffer of that size: under an address-space limit a gigabyte above what the process
/// holds, such a buffer is refused, which aborts the process.
#[test]
fn damaged_lengths_make_no_huge_buffers() {
    if !in_child("damaged_lengths_make_no_huge_buffers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("x.idx");
    let mut s = SmallFiles::default();
    for i in 0..10u64 {
        s.push(i * 65_536, &vec![i as u8; [8, 600, 5000][i as usize % 3]]);
    }
    s.save(&index).unwrap();
    let path = SmallFiles::path(&index);
    let good = std::fs::read(&path).unwrap();
    let table_at = u64::from_le_bytes(good[8..16].try_into().unwrap()) as usize;
    // A frame whose header says it holds 3 GB (and holds nothing).
    let mut claims = vec![0x28, 0xb5, 0x2f, 0xfd, 0xc0, 0x00];
    claims.extend(3_000_000_000u64.to_le_bytes());
    claims.extend([0x01, 0x00, 0x00]);
    assert_eq!(
        zstd::zstd_safe::get_frame_content_size(&claims).unwrap(),
        Some(3_000_000_000)
    );
    let mut long = good.clone();
    long[16..24].copy_from_slice(&4_000_000_000u64.to_le_bytes());
    let mut far = good.clone();
    far[8..16].copy_from_slice(&(u64::MAX - 4095).to_le_bytes());
    let mut big_table = good[..table_at].to_vec();
    big_table[16..24].copy_from_slice(&(claims.len() as u64).to_le_bytes());
    big_table.extend(&claims);
    let mut v2 = MAGIC_V2.to_vec();
    v2.extend((claims.len() as u64).to_le_bytes());
    v2.extend(&claims);
    let v1 = [&MAGIC_V1[..], &claims].concat();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let limit = (vm << 10) + (1 << 30);
    let l = libc::rlimit {
        rlim_cur: limit,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &l) }, 0);
    for (what, bytes) in [
        ("table length", long),
        ("table past the end of everything", far),
        ("table content", big_table),
        ("second format", v2),
        ("first format", v1),
    ] {
        std::fs::write(&path, bytes).unwrap();
        let err = SmallFiles::load(&index).unwrap_err().to_string();
        assert!(err.contains("x.small"), "{what}: {err}");
        let err = SmallIndex::open(&index).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("x.small")), "{what}: opened");
    }
    eprintln!("child done");
}
