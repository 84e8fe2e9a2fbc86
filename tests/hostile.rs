//! Hostile and broken images: every one ends in a one-line error that names the image, the layer
//! and (for tar problems) the entry; nothing is listed in the store, no temp file is left, nothing
//! is written outside the store; and memory stays bounded on decompression bombs.
//!
//! Policy (also in the README): `..` components, whiteouts of `.`/`..`, entries beneath a
//! symlink or a file, hardlinks to missing/later/outside entries, oversized PAX or long-name
//! headers and corrupt or mismatching content are refused; a leading `/` or `./` is stripped
//! (sanitized), as every unpacker does.

mod common;

use std::process::Command;

use common::*;

/// A tar header block with an arbitrary raw name (bypassing the tar crate's own checks).
fn raw_entry(name: &[u8], typeflag: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    {
        let g = h.as_gnu_mut().unwrap();
        g.name[..name.len()].copy_from_slice(name);
        g.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.as_gnu_mut().unwrap().typeflag = [typeflag];
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn with_end(mut blocks: Vec<u8>) -> Vec<u8> {
    blocks.extend_from_slice(&[0u8; 1024]);
    blocks
}

struct Case {
    name: &'static str,
    /// Layer tars (with compression) of the image.
    layers: Vec<(Vec<u8>, Comp)>,
    /// Replaces the stored blob of layer 0 (after computing digests from the tar).
    blob_override: Option<Vec<u8>>,
    /// Replaces the diff_id of layer 0.
    bad_diff_id: bool,
    /// Substrings the error must contain.
    want: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    // Registries share blobs across repositories: every case gets content of its own.
    let ok = |tag: &str| LayerBuilder::new().file("ok", tag.as_bytes()).finish();
    let gz = Comp::Gzip.compress(&ok("truncated"));
    let mut pax_bomb = tar::Builder::new(Vec::new());
    let huge_path = "p/".repeat(1 << 20);
    pax_bomb
        .append_pax_extensions([("path", huge_path.as_bytes())])
        .unwrap();
    let pax_bomb = pax_bomb.into_inner().unwrap();
    let mut absurd = raw_entry(b"absurd", b'0', b"", b"");
    {
        // Size field claims 64 GiB (octal 1000000000000) of data that is not there.
        absurd[124..136].copy_from_slice(b"01000000000\0");
        let mut h = tar::Header::from_byte_slice(&absurd[..512]).clone();
        h.set_cksum();
        absurd[..512].copy_from_slice(h.as_bytes());
    }
    vec![
        Case {
            name: "dotdot path",
            layers: vec![(
                with_end(raw_entry(b"a/../../etc/evil", b'0', b"", b"x")),
                Comp::Gzip,
            )],
            blob_override: None,
            bad_diff_id: false,
            want: &["a/../../etc/evil", "`..` component"],
        },
        Case {
            name: "whiteout of ..",
            layers: vec![(
                with_end(raw_entry(b"dir/.wh...", b'0', b"", b"")),
                Comp::Gzip,
            )],
            blob_override: None,
            bad_diff_id: false,
            want: &["dir/.wh...", "whiteout of an invalid name"],
        },
        Case {
            name: "symlink loop as a parent",
            layers: vec![(
                LayerBuilder::new()
                    .symlink("a", "b")
                    .symlink("b", "a")
                    .file("a/passwd", b"root::0:0::/:/bin/sh\n")
                    .finish(),
                Comp::Gzip,
            )],
            blob_override: None,
            bad_diff_id: false,
            want: &["a/passwd", "too many levels of symlinks"],
        },
        Case {
            name: "hardlink outside the layer",
            layers: vec![(
                with_end(raw_entry(b"pw", b'1', b"../../etc/passwd", b"")),
                Comp::Gzip,
            )],
            blob_override: None,
            bad_diff_id: false,
            want: &["pw", "hardlink target"],
        },
        Case {
            name: "forward hardlink",
            layers: vec![(
                with_end(
                    [
                        raw_entry(b"early", b'1', b"late", b""),
                        raw_entry(b"late", b'0', b"", b"x"),
                    ]
                    .concat(),
                ),
                Comp::Gzip,
            )],
            blob_override: None,
            bad_diff_id: false,
            want: &["early", "does not exist"],
        },
        Case {
            name: "hardlink to a missing entry",
            layers: vec![(
                with_end(raw_entry(b"h", b'1', b"missing", b"")),
                Comp::Plain,
            )],
            blob_override: None,
            bad_diff_id: false,
            want: &["\"h\"", "does not exist"],
        },
        Case {
            name: "parent is a regular file",
            layers: vec![(
                LayerBuilder::new()
                    .file("f", b"x")
                    .file("f/child", b"y")
                    .finish(),
                Comp::Zstd,
            )],
            blob_override: None,
            bad_diff_id: false,
            want: &["f/child", "not a directory"],
        },
        Case {
            name: "truncated gzip",
            layers: vec![(ok("truncated"), Comp::Gzip)],
            blob_override: Some(gz[..gz.len() / 2].to_vec()),
            bad_diff_id: false,
            want: &["truncated gzip"],
        },
        Case {
            // A plain tar is longer than the gzip its descriptor sized: refused on the first
            // chunk past the declared size, before it is decoded.
            name: "a blob larger than its descriptor (plain tar under a gzip media type)",
            layers: vec![(ok("not gzip"), Comp::Gzip)],
            blob_override: Some(ok("not gzip")),
            bad_diff_id: false,
            want: &["is larger than the", "bytes its descriptor declares"],
        },
        Case {
            name: "diff_id mismatch",
            layers: vec![(ok("diff_id"), Comp::Gzip)],
            blob_override: None,
            bad_diff_id: true,
            want: &["does not match the config's diff_id"],
        },
        Case {
            name: "oversized PAX header",
            layers: vec![(pax_bomb, Comp::Gzip)],
            blob_override: None,
            bad_diff_id: false,
            want: &["PAX header of", "limit"],
        },
        Case {
            name: "absurd size in a header",
            layers: vec![(absurd, Comp::Gzip)],
            blob_override: None,
            bad_diff_id: false,
            want: &["reading tar stream"],
        },
    ]
}

#[test]
fn hostile_layers_are_refused_cleanly() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    for (i, case) in cases().into_iter().enumerate() {
        let layout = work.path().join(format!("layout{i}"));
        let mut image = Image::new(case.layers.clone());
        if case.bad_diff_id {
            // The config describes other content than the layer holds.
            image.diff_ids = Some(vec![format!("sha256:{}", sha256_hex(b"other content"))]);
        }
        write_layout(&layout, "v1", &image);
        let repo = format!("hostile/case{i}");
        reg.push(&layout, "v1", &repo, None);
        if let Some(bytes) = &case.blob_override {
            // The registry serves whatever its storage holds, as a broken one would.
            let hex = sha256_hex(&case.layers[0].1.compress(&case.layers[0].0));
            std::fs::write(reg.blob_data_path(&hex), bytes).unwrap();
        }
        let bux = Bux::new();
        let outside = work.path().join(format!("outside{i}"));
        std::fs::create_dir_all(&outside).unwrap();
        let out = bux
            .cmd()
            .current_dir(&outside)
            .args(["pull", "--quiet", &format!("{}/{repo}:v1", reg.host())])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: pull succeeded", case.name);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{}: not one line: {err}", case.name);
        assert!(err.contains(&repo), "{}: image not named: {err}", case.name);
        assert!(
            err.contains("layer sha256:"),
            "{}: layer not named: {err}",
            case.name
        );
        for w in case.want {
            assert!(err.contains(w), "{}: {w:?} missing from: {err}", case.name);
        }
        assert_eq!(bux.ok(&["images", "--json"]).trim(), "[]", "{}", case.name);
        let tmp: Vec<_> = std::fs::read_dir(bux.store.path().join("tmp"))
            .unwrap()
            .collect();
        assert!(tmp.is_empty(), "{}: temp files left", case.name);
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "{}: wrote outside the store",
            case.name
        );
        assert!(!work.path().join("etc").exists());
    }
}

#[test]
fn absolute_paths_are_sanitized_into_the_root() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let l = with_end(
        [
            raw_entry(b"/etc/abs", b'0', b"", b"abs\n"),
            raw_entry(b"./rel", b'0', b"", b"rel\n"),
        ]
        .concat(),
    );
    let layout = work.path().join("layout");
    write_layout(&layout, "v1", &Image::new(vec![(l, Comp::Gzip)]));
    reg.push(&layout, "v1", "t/abs", None);
    let bux = Bux::new();
    let m = bux.mount(&format!("{}/t/abs:v1", reg.host()));
    assert_eq!(std::fs::read(m.path.join("etc/abs")).unwrap(), b"abs\n");
    assert_eq!(std::fs::read(m.path.join("rel")).unwrap(), b"rel\n");
}

/// Entries beneath a symlink land where it leads *inside the root*, as containerd and moby
/// unpack them (a layer adding `lib/x/libfoo.so` over a merged-usr base, `lib -> usr/lib`);
/// absolute targets and `..` never lead out of it.
#[test]
fn entries_beneath_symlinks_resolve_inside_the_root() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let base = LayerBuilder::new()
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .symlink("lib", "usr/lib")
        .symlink("escape", "/../../../../tmp")
        .finish();
    let top = LayerBuilder::new()
        .file("lib/x/libfoo.so", b"foo\n")
        .file("escape/planted", b"must stay inside\n")
        .finish();
    let layout = work.path().join("layout");
    write_layout(
        &layout,
        "v1",
        &Image::new(vec![(base, Comp::Gzip), (top, Comp::Gzip)]),
    );
    reg.push(&layout, "v1", "t/symlinked", None);
    let bux = Bux::new();
    let m = bux.mount(&format!("{}/t/symlinked:v1", reg.host()));
    assert_eq!(
        std::fs::read(m.path.join("usr/lib/x/libfoo.so")).unwrap(),
        b"foo\n"
    );
    assert_eq!(
        std::fs::read(m.path.join("lib/x/libfoo.so")).unwrap(),
        b"foo\n"
    );
    assert_eq!(
        std::fs::read(m.path.join("tmp/planted")).unwrap(),
        b"must stay inside\n"
    );
    assert!(!std::path::Path::new("/tmp/planted").exists());
}

#[test]
fn broken_manifests_and_configs_are_refused() {
    let reg = Registry::start();
    let layer = Comp::Gzip.compress(&LayerBuilder::new().file("x", b"x").finish());
    let config = b"this is { not json".to_vec();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", sha256_hex(&layer)), "size": layer.len()}]
    });
    raw_push(
        &reg,
        "t/badconfig",
        "v1",
        &[layer.clone(), config],
        &serde_json::to_vec(&manifest).unwrap(),
        OCI_MANIFEST,
    );
    let bux = Bux::new();
    let err = bux.fails(&["pull", "-q", &format!("{}/t/badconfig:v1", reg.host())]);
    assert!(
        err.contains("config sha256:") && err.contains("invalid"),
        "{err}"
    );

    // A manifest whose layer blob the registry lost.
    let work = tempfile::tempdir().unwrap();
    let tar = LayerBuilder::new().file("y", b"y").finish();
    let layout = work.path().join("layout");
    write_layout(&layout, "v1", &Image::new(vec![(tar.clone(), Comp::Gzip)]));
    reg.push(&layout, "v1", "t/lost", None);
    let hex = sha256_hex(&Comp::Gzip.compress(&tar));
    std::fs::remove_file(reg.blob_data_path(&hex)).unwrap();
    let err = bux.fails(&["pull", "-q", &format!("{}/t/lost:v1", reg.host())]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("t/lost"), "{err}");
    assert_eq!(bux.ok(&["images", "--json"]).trim(), "[]");
}

#[test]
fn decompression_bomb_pull_stays_bounded_in_memory() {
    // 256 MiB of zeros in one file: ~0.25 MiB of gzip.
    let size = 256u64 << 20;
    let mut tar = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar);
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "zeros", std::io::repeat(0).take(size))
            .unwrap();
        b.finish().unwrap();
    }
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, "v1", &Image::new(vec![(tar, Comp::Gzip)]));
    reg.push(&layout, "v1", "t/bomb", None);
    let bux = Bux::new();
    let mut cmd = bux.cmd();
    cmd.args(["pull", "-q", &format!("{}/t/bomb:v1", reg.host())]);
    let (ok, rss_kib) = run_with_peak_rss(cmd);
    assert!(ok);
    eprintln!("pull of a 256 MiB bomb peaked at {rss_kib} KiB");
    assert!(
        rss_kib < 128 * 1024,
        "pull peaked at {rss_kib} KiB for a 256 MiB bomb"
    );
    let m = bux.mount(&format!("{}/t/bomb:v1", reg.host()));
    let f = std::fs::File::open(m.path.join("zeros")).unwrap();
    use std::os::unix::fs::FileExt;
    let mut buf = vec![1u8; 4096];
    f.read_exact_at(&mut buf, size - 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

use std::io::Read as _;

/// Runs a command and returns (success, its peak RSS in KiB), read from /proc while it runs
/// (`VmHWM` only grows, so the last reading before exit is the peak to within one poll).
/// Not `wait4`'s rusage: that counts the test process's pages the child shared before exec.
fn run_with_peak_rss(mut cmd: Command) -> (bool, i64) {
    let mut child = cmd.spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            if let Some(v) = s.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                peak = peak.max(v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0));
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            return (st.success(), peak);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Counts the heap bytes each thread holds, and the most it held since [`alloc_peak_reset`]
/// (the tests of this file that measure run on one thread each).
mod alloc_meter {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Meter;

    thread_local! {
        static HELD: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn add(n: isize) {
        let _ = HELD.try_with(|h| {
            let v = h.get() + n;
            h.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
    }

    unsafe impl GlobalAlloc for Meter {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            add(l.size() as isize);
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            add(-(l.size() as isize));
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            add(l.size() as isize);
            unsafe { System.alloc_zeroed(l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            add(new as isize - l.size() as isize);
            unsafe { System.realloc(p, l, new) }
        }
    }

    /// Starts a measurement on this thread.
    pub fn reset() {
        let held = HELD.with(|h| h.get());
        PEAK.with(|p| p.set(held));
    }

    /// The most this thread held since [`reset`], above what it held then.
    pub fn peak_above(base: isize) -> isize {
        PEAK.with(|p| p.get()) - base
    }

    pub fn held() -> isize {
        HELD.with(|h| h.get())
    }
}

#[global_allocator]
static METER: alloc_meter::Meter = alloc_meter::Meter;

/// #15: checking a zstd:chunked chunk hashes what its frame decompresses to without holding
/// it: a few KiB of frame for 64 MiB of zeros (what a hole chunk of a sparse file is) is checked
/// in a few MiB of heap, and one that runs past its stated length is refused.
#[test]
fn verifying_a_zstd_chunk_holds_no_more_than_a_buffer() {
    use bux_fuse::index::published::Chunk;
    let len = 64u64 << 20;
    let (frame, digest) = {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        let mut h = bux_fuse::digest::Hasher::default();
        let block = vec![0u8; 1 << 20];
        for _ in 0..len >> 20 {
            std::io::Write::write_all(&mut enc, &block).unwrap();
            h.update(&block);
        }
        (enc.finish().unwrap(), h.finish())
    };
    assert!(frame.len() < 64 << 10, "{}", frame.len());
    let chunk = Chunk {
        start: 0,
        end: frame.len() as u64,
        digest,
        uncompressed: Some(len),
    };
    let base = alloc_meter::held();
    alloc_meter::reset();
    assert!(chunk.verify(&frame));
    let peak = alloc_meter::peak_above(base);
    eprintln!("verifying a chunk of {len} bytes held {peak} bytes at most");
    assert!(peak < 8 << 20, "verifying held {peak} bytes");
    // Stated shorter or longer than it is, or another digest: refused, within the same bound.
    for c in [
        Chunk {
            uncompressed: Some(len - 1),
            ..chunk
        },
        Chunk {
            uncompressed: Some(len + 1),
            ..chunk
        },
        Chunk {
            digest: bux_fuse::Digest::of(b"other"),
            ..chunk
        },
    ] {
        alloc_meter::reset();
        assert!(!c.verify(&frame));
        assert!(alloc_meter::peak_above(base) < 8 << 20);
    }
}
