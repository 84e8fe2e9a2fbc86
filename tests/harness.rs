//! The test harness's own tools, tested: the tree comparison (`common::treediff`) catches each
//! kind of difference and only that one, and the slow link (`common::slow_link`) forwards,
//! counts, delays, caps, stalls and stops.

mod common;

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::slow_link::SlowLink;
use common::treediff; // the function the tests call, and its module
use common::treediff::{compare, Options};

// ----------------------------------------------------------------------------------------------
// Tree comparison

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mknod(p: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    // SAFETY: a NUL-terminated path; the test runs as root.
    let r = unsafe { libc::mknod(c(p).as_ptr(), kind | 0o640, libc::makedev(major, minor)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: NUL-terminated path and name; `value` is valid for its length.
    let r = unsafe {
        libc::lsetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "lsetxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn set_mtime(p: &Path, secs: i64) {
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    // SAFETY: a NUL-terminated path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(p).as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        r,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// Gives every entry under `root` (and `root`) the same mtime, deepest first.
fn fix_mtimes(root: &Path) {
    fn walk(p: &Path) {
        if std::fs::symlink_metadata(p).unwrap().is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path());
            }
        }
        set_mtime(p, 1_600_000_000);
    }
    walk(root);
}

/// A tree with one of everything the comparison looks at.
fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("d/sub")).unwrap();
    std::fs::write(root.join("f"), b"some content\n").unwrap();
    std::fs::write(root.join("d/sub/deep"), b"deep\n").unwrap();
    std::fs::write(root.join("suid"), b"#!/bin/sh\n").unwrap();
    chmod(&root.join("suid"), 0o4755);
    std::fs::write(root.join("sgid"), b"#!/bin/sh\n").unwrap();
    chmod(&root.join("sgid"), 0o2755);
    std::fs::create_dir(root.join("tmp")).unwrap();
    chmod(&root.join("tmp"), 0o1777);
    symlink("f", root.join("link")).unwrap();
    std::fs::write(root.join("h1"), b"linked\n").unwrap();
    std::fs::hard_link(root.join("h1"), root.join("h2")).unwrap();
    mknod(&root.join("null"), libc::S_IFCHR, 1, 3);
    mknod(&root.join("loop"), libc::S_IFBLK, 7, 0);
    mknod(&root.join("fifo"), libc::S_IFIFO, 0, 0);
    set_xattr(&root.join("f"), "user.bux", b"one");
    set_xattr(&root.join("d"), "trusted.overlay.opaque", b"y");
    // Sparse: 1 MiB hole, a few bytes, a hole to 3 MiB.
    let f = std::fs::File::create(root.join("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"data in the middle", 1 << 20).unwrap();
    f.set_len(3 << 20).unwrap();
    std::os::unix::fs::chown(root.join("f"), Some(10), Some(20)).unwrap();
}

/// Two equal trees, `change` applied to the second, mtimes made equal (unless `change` sets
/// them after): the comparison's outcome with `args`.
fn diff_after(change: impl Fn(&Path), args: &[&str]) -> common::treediff::Diff {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for t in [&a, &b] {
        std::fs::create_dir(t).unwrap();
        tree(t);
    }
    change(&b);
    fix_mtimes(&a);
    fix_mtimes(&b);
    compare(&a, &b, &Options::parse(args).unwrap())
}

/// Asserts that the comparison finds exactly one difference, of `kind` at `path`.
fn only(kind: &str, path: &str, change: impl Fn(&Path)) {
    let d = diff_after(change, &[]);
    assert_eq!(d.differences.len(), 1, "{kind}: {}", d.report);
    let line = &d.differences[0];
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some(kind), "{}", d.report);
    assert_eq!(words.next(), Some(path), "{}", d.report);
    assert!(d.report.ends_with("\n1 differences\n"), "{}", d.report);
}

#[test]
fn equal_trees_have_no_differences() {
    let d = diff_after(|_| {}, &[]);
    assert!(d.equal(), "{}", d.report);
    assert!(d.report.ends_with("\n0 differences\n"), "{}", d.report);
    // Everything was looked at: 15 paths (the root too), 7 of them regular files.
    assert!(
        d.report
            .contains("compared 15 paths (A: 15, B: 15), 7 files read"),
        "{}",
        d.report
    );
}

#[test]
fn each_kind_of_difference_is_reported_alone() {
    only("ONLY_A", "d/sub/deep", |b| {
        std::fs::remove_file(b.join("d/sub/deep")).unwrap()
    });
    only("ONLY_B", "new", |b| {
        std::fs::write(b.join("new"), b"").unwrap()
    });
    only("TYPE", "fifo", |b| {
        std::fs::remove_file(b.join("fifo")).unwrap();
        std::fs::create_dir(b.join("fifo")).unwrap();
    });
    only("MODE", "f", |b| chmod(&b.join("f"), 0o640));
    only("MODE", "suid", |b| chmod(&b.join("suid"), 0o755));
    only("MODE", "sgid", |b| chmod(&b.join("sgid"), 0o755));
    only("MODE", "tmp", |b| chmod(&b.join("tmp"), 0o777));
    only("UID", "f", |b| {
        std::os::unix::fs::chown(b.join("f"), Some(11), None).unwrap()
    });
    only("GID", "link", |b| {
        std::os::unix::fs::lchown(b.join("link"), None, Some(5)).unwrap()
    });
    only("SIZE", "f", |b| {
        std::fs::OpenOptions::new()
            .append(true)
            .open(b.join("f"))
            .unwrap()
            .write_all(b"more")
            .unwrap()
    });
    only("CONTENT", "d/sub/deep", |b| {
        std::fs::write(b.join("d/sub/deep"), b"DEEP\n").unwrap()
    });
    only("CONTENT", "sparse", |b| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(b.join("sparse"))
            .unwrap();
        f.write_all_at(b"!", (3 << 20) - 1).unwrap();
    });
    only("TARGET", "link", |b| {
        std::fs::remove_file(b.join("link")).unwrap();
        symlink("d/sub/deep", b.join("link")).unwrap();
    });
    only("XATTR", "f", |b| {
        set_xattr(&b.join("f"), "user.bux", b"two")
    });
    only("XATTR", "d", |b| {
        set_xattr(&b.join("d"), "user.extra", b"x")
    });
    only("RDEV", "null", |b| {
        std::fs::remove_file(b.join("null")).unwrap();
        mknod(&b.join("null"), libc::S_IFCHR, 1, 5);
    });
    only("HARDLINK", "h1", |b| {
        // Same content, mode and owner; only no longer one inode.
        std::fs::remove_file(b.join("h2")).unwrap();
        std::fs::write(b.join("h2"), b"linked\n").unwrap();
    });
}

#[test]
fn a_different_mtime_is_reported_unless_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for t in [&a, &b] {
        std::fs::create_dir(t).unwrap();
        tree(t);
        fix_mtimes(t);
    }
    set_mtime(&b.join("d/sub/deep"), 1_700_000_000);
    set_mtime(&b.join("link"), 1_700_000_000);
    set_mtime(&b.join("d"), 1_700_000_000);
    set_mtime(&b, 1_700_000_000);
    let run = |args: &[&str]| compare(&a, &b, &Options::parse(args).unwrap());
    let d = run(&[]);
    assert_eq!(d.kinds(), ["MTIME"], "{}", d.report);
    assert_eq!(d.differences.len(), 4, "{}", d.report);
    assert!(
        d.report
            .contains("MTIME    d/sub/deep  A=1600000000 B=1700000000"),
        "{}",
        d.report
    );
    assert!(run(&["--ignore-mtime"]).equal());
    let d = run(&["--ignore-dir-mtime"]);
    assert_eq!(d.differences.len(), 2, "{}", d.report); // the root is a directory too
    let d = run(&["--ignore-symlink-mtime", "--ignore-root"]);
    assert_eq!(d.differences.len(), 2, "{}", d.report);
    let d = run(&["--ignore-mtime-of", "d", "--ignore-mtime-of", "/"]);
    assert_eq!(d.differences.len(), 1, "{}", d.report);
    assert!(
        d.differences[0].starts_with("MTIME    link"),
        "{}",
        d.report
    );
}

#[test]
fn excluded_paths_and_the_root_can_be_left_out() {
    let change = |b: &Path| {
        std::fs::write(b.join("d/sub/deep"), b"other\n").unwrap();
        std::fs::write(b.join("d/sub/new"), b"").unwrap();
        chmod(b, 0o700);
    };
    let d = diff_after(change, &[]);
    assert_eq!(d.differences.len(), 3, "{}", d.report);
    assert!(d.report.ends_with("\n3 differences\n"), "{}", d.report);
    assert!(
        d.report.contains("MODE     /  A=") && d.report.contains(" B=0700"),
        "{}",
        d.report
    );
    let d = diff_after(change, &["--exclude", "d/sub", "--ignore-root"]);
    assert!(d.equal(), "{}", d.report);
    // A path that only starts like an excluded one is not excluded.
    let d = diff_after(change, &["--exclude", "d/su", "--ignore-root"]);
    assert_eq!(d.differences.len(), 2, "{}", d.report);
}

#[test]
fn the_string_interface_reports_as_the_callers_expect() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for t in [&a, &b] {
        std::fs::create_dir(t).unwrap();
        std::fs::write(t.join("x"), b"x").unwrap();
    }
    std::fs::write(b.join("x"), b"y").unwrap();
    let (equal, report) = treediff(&a, &b, &["--ignore-mtime", "--ignore-root"]);
    assert!(!equal);
    assert!(report.starts_with("CONTENT  x  A="), "{report}");
    assert!(report.ends_with("1 differences\n"), "{report}");
    let (equal, report) = treediff(&a, &b, &["--ignore-root", "--no-content", "--ignore-mtime"]);
    assert!(equal, "{report}");
    assert!(Options::parse(&["--bogus"]).is_err());
    assert!(Options::parse(&["--exclude"]).is_err());
}

// ----------------------------------------------------------------------------------------------
// Slow link

/// A server on 127.0.0.1: for each line `N` a client sends, N bytes back; open until the client
/// closes.
fn byte_server() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(n) = line.unwrap_or_default().trim().parse::<usize>() else {
                        return;
                    };
                    if w.write_all(&vec![7u8; n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn fetch(s: &mut TcpStream, n: usize) {
    s.write_all(format!("{n}\n").as_bytes()).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 7));
}

#[test]
fn the_slow_link_forwards_and_counts_what_clients_get() {
    let link = SlowLink::start(byte_server(), 0.0, 0.0).unwrap();
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, link.port())).unwrap();
    fetch(&mut s, 1000);
    fetch(&mut s, 3 << 20);
    assert_eq!(link.bytes_sent(), 1000 + (3 << 20));
    let mut t = TcpStream::connect((Ipv4Addr::LOCALHOST, link.port())).unwrap();
    fetch(&mut t, 5);
    assert_eq!(link.bytes_sent(), 1005 + (3 << 20));
}

#[test]
fn the_slow_link_delays_by_the_round_trip() {
    let link = SlowLink::start(byte_server(), 0.0, 200.0).unwrap();
    let t = Instant::now();
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, link.port())).unwrap();
    fetch(&mut s, 10);
    // One round trip to connect, one for the request and its answer.
    let first = t.elapsed();
    assert!(first >= Duration::from_millis(390), "{first:?}");
    let t = Instant::now();
    fetch(&mut s, 10);
    let second = t.elapsed();
    assert!(second >= Duration::from_millis(195), "{second:?}");
    assert!(second < Duration::from_millis(1000), "{second:?}");
}

#[test]
fn the_slow_link_caps_bandwidth_across_connections() {
    // 8 Mbit/s = 1 MB/s, shared: two connections of 600 kB each take 1.2 s together.
    let link = SlowLink::start(byte_server(), 8.0, 0.0).unwrap();
    let port = link.port();
    let t = Instant::now();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
                fetch(&mut s, 600_000);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1100), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(link.bytes_sent(), 1_200_000);
}

#[test]
fn a_paused_slow_link_stalls_and_keeps_connections_open() {
    let link = SlowLink::start(byte_server(), 0.0, 0.0).unwrap();
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, link.port())).unwrap();
    fetch(&mut s, 100);
    link.pause();
    s.write_all(b"100\n").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    let mut buf = [0u8; 100];
    let e = s.read(&mut buf).unwrap_err();
    assert!(matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    assert_eq!(link.bytes_sent(), 100);
    // New connections wait too.
    let mut t = TcpStream::connect((Ipv4Addr::LOCALHOST, link.port())).unwrap();
    t.write_all(b"3\n").unwrap();
    t.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(t.read(&mut buf).is_err());
    link.unpause();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut buf).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    t.read_exact(&mut buf[..3]).unwrap();
    assert_eq!(link.bytes_sent(), 203);
}

#[test]
fn a_dropped_slow_link_stops() {
    let link = SlowLink::start(byte_server(), 0.0, 0.0).unwrap();
    let port = link.port();
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    fetch(&mut s, 10);
    let t = Instant::now();
    drop(link);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // The open connection is cut, and nothing listens any more.
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(b"10\n");
    let mut buf = [0u8; 10];
    assert!(!matches!(s.read(&mut buf), Ok(n) if n > 0));
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
}
