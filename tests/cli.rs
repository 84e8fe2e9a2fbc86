//! The command line and the library example, against a real registry: listing, inspecting,
//! removing, garbage collection, disk usage, login, pull policies, concurrent pulls, completions,
//! the man page, and unmounting a mount whose daemon died.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn image_with(marker: &str, shared: &[u8]) -> Image {
    let base = LayerBuilder::new().file("shared.bin", shared).finish();
    let top = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/marker", marker.as_bytes())
        .finish();
    let mut img = Image::new(vec![(base, Comp::Gzip), (top, Comp::Gzip)]);
    img.config = serde_json::json!({
        "Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "Env": ["A=1"], "WorkingDir": "/srv",
        "User": "1000:1000", "ExposedPorts": {"8080/tcp": {}}, "Labels": {"org.example": "yes"}
    });
    img
}

fn push(reg: &Registry, repo: &str, img: &Image) -> String {
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", img);
    reg.push(&work.path().join("l"), "v1", repo, None);
    format!("{}/{repo}:v1", reg.host())
}

#[test]
fn images_inspect_rm_gc_df() {
    let reg = Registry::start();
    let shared = test_bytes(200_000, 3);
    let a = push(&reg, "t/a", &image_with("a", &shared));
    let b = push(&reg, "t/b", &image_with("b", &shared));
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &a]);
    let out = bux.run(&["pull", &b]);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("already stored"),
        "shared layer fetched twice: {progress}"
    );

    let table = bux.ok(&["images"]);
    assert!(
        table.starts_with("REFERENCE") && table.contains(&a) && table.contains(&b),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&bux.ok(&["images", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);

    let inspect = bux.ok(&["inspect", &a]);
    for want in [
        "[\"/bin/app\"]",
        "[\"--serve\"]",
        "/srv",
        "1000:1000",
        "A=1",
    ] {
        assert!(inspect.contains(want), "{want} missing: {inspect}");
    }
    let cfg: serde_json::Value = serde_json::from_str(&bux.ok(&["inspect", "--json", &a])).unwrap();
    assert_eq!(cfg["config"]["Labels"]["org.example"], "yes");
    assert!(cfg["config"]["ExposedPorts"]["8080/tcp"].is_object());

    let df = bux.ok(&["df"]);
    assert!(df.contains("shared") && df.contains(&a), "{df}");
    let usage: serde_json::Value = serde_json::from_str(&bux.ok(&["df", "--json"])).unwrap();
    assert!(usage["shared"].as_u64().unwrap() > 0);
    assert!(usage["images"][0]["reference"].is_string(), "{usage}");
    // What the metadata image costs is shown on its own (root's pull writes one per image).
    assert!(df.contains("small") && df.contains("metadata"), "{df}");
    for kind in ["small_files", "metadata_images"] {
        assert!(usage[kind].as_u64().unwrap() > 0, "{kind}: {usage}");
    }
    assert!(
        json[0]["manifest_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{json}"
    );

    bux.ok(&["rm", &a]);
    assert!(bux.fails(&["rm", &a]).contains("no such image"));
    let gc = bux.ok(&["gc"]);
    assert!(gc.contains("removed"), "{gc}");
    // b still mounts and reads after a's removal + gc (the shared layer stayed).
    let m = bux.mount(&b);
    assert_eq!(std::fs::read(m.path.join("shared.bin")).unwrap(), shared);
    // A mounted image is not removed from under its mount: rm refuses; with --force the
    // record goes but gc keeps its files until the mount ends.
    let err = bux.fails(&["rm", &b]);
    assert!(
        err.contains("in use by a mount") && err.contains("--force"),
        "{err}"
    );
    bux.ok(&["rm", "--force", &b]);
    bux.ok(&["gc"]);
    assert_eq!(std::fs::read(m.path.join("shared.bin")).unwrap(), shared);
    assert!(
        std::fs::read_dir(bux.store.path().join("blobs/sha256"))
            .unwrap()
            .count()
            > 0
    );
    // The JSON outputs name their fields and spell digests as strings.
    let images: serde_json::Value = serde_json::from_str(&bux.ok(&["images", "--json"])).unwrap();
    assert_eq!(images.as_array().unwrap().len(), 0);
    drop(m);
    bux.ok(&["gc"]);
    let blobs = std::fs::read_dir(bux.store.path().join("blobs/sha256"))
        .unwrap()
        .count();
    let layers = std::fs::read_dir(bux.store.path().join("layers/sha256"))
        .unwrap()
        .count();
    assert_eq!((blobs, layers), (0, 0));
}

#[test]
fn pull_policies_and_concurrent_pulls() {
    let reg = Registry::start();
    let r = push(&reg, "t/policy", &image_with("p", &test_bytes(3 << 20, 5)));
    let bux = Bux::new();
    assert!(bux
        .fails(&["pull", "--pull", "never", &r])
        .contains("not found"));
    // Two processes pulling the same image at once into one store.
    let kids: Vec<_> = (0..3)
        .map(|_| bux.cmd().args(["pull", "-q", &r]).spawn().unwrap())
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&bux.ok(&["images", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    bux.ok(&["pull", "--pull", "never", &r]);
    let out = bux.run(&["pull", "--pull", "always", &r]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already stored"));
    let m = bux.mount(&r);
    assert_eq!(
        std::fs::read(m.path.join("shared.bin")).unwrap(),
        test_bytes(3 << 20, 5)
    );
}

#[test]
fn login_stores_docker_credentials() {
    let reg = Registry::start_with_auth("bob", "pw");
    let r = push_auth(&reg);
    let bux = Bux::new();
    let cfg = tempfile::tempdir().unwrap();
    let bad = bux
        .cmd()
        .args(["login", &reg.host(), "-u", "bob"])
        .env("BUX_FUSE_PASSWORD", "nope")
        .env("DOCKER_CONFIG", cfg.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unauthorized"));
    assert!(!cfg.path().join("config.json").exists());
    let ok = bux
        .cmd()
        .args(["login", &reg.host(), "-u", "bob"])
        .env("BUX_FUSE_PASSWORD", "pw")
        .env("DOCKER_CONFIG", cfg.path())
        .output()
        .unwrap();
    assert_success(&ok);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cfg.path().join("config.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "credentials readable by others");
    let out = bux
        .cmd()
        .args(["pull", "-q", &r])
        .env("DOCKER_CONFIG", cfg.path())
        .output()
        .unwrap();
    assert_success(&out);
}

fn push_auth(reg: &Registry) -> String {
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &image_with("x", b"x"));
    reg.push(
        &work.path().join("l"),
        "v1",
        "t/private",
        Some(("bob", "pw")),
    );
    format!("{}/t/private:v1", reg.host())
}

#[test]
fn umount_clears_a_mount_whose_daemon_died() {
    let reg = Registry::start();
    let r = push(&reg, "t/dead", &image_with("d", b"d"));
    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    // Mounts with a daemon of its own and kills it (mount names its pid).
    let mount_and_kill = |bux: &Bux| {
        let out = bux.run(&["mount", "--own-server", &r, mnt.to_str().unwrap()]);
        assert!(out.status.success() && is_mounted(&mnt));
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        let pid = said
            .split("daemon pid ")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .expect("daemon pid")
            .to_string();
        Command::new("kill").args(["-9", &pid]).status().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let err = std::fs::read_dir(&mnt).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    };
    mount_and_kill(&bux);
    // Mounting there again with the store that made it replaces the dead mount (a runtime
    // restarted after a crash mounts its VMs' roots where they were).
    bux.ok(&["mount", "-q", &r, mnt.to_str().unwrap()]);
    assert_eq!(std::fs::read(mnt.join("etc/marker")).unwrap(), b"d");
    bux.ok(&["umount", mnt.to_str().unwrap()]);
    // Another store does not touch it: it says what to do, in one line.
    mount_and_kill(&bux);
    let other = Bux::new();
    let err = other.fails(&["mount", "-q", &r, mnt.to_str().unwrap()]);
    assert!(
        err.contains("bux-fuse umount") && err.lines().count() == 1,
        "{err}"
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = bux.fails(&["mount", &r, file.to_str().unwrap()]);
    assert!(err.contains("not a directory"), "{err}");
    bux.ok(&["umount", mnt.to_str().unwrap()]);
    assert!(!is_mounted(&mnt));
    // And the mount point is usable again.
    bux.ok(&["mount", &r, mnt.to_str().unwrap()]);
    assert_eq!(std::fs::read(mnt.join("etc/marker")).unwrap(), b"d");
    bux.ok(&["umount", mnt.to_str().unwrap()]);
    assert!(bux
        .fails(&["umount", mnt.to_str().unwrap()])
        .contains("not a mount point"));
}

/// `umount` unmounts only what bux-fuse mounted: anything else (as root, `bux-fuse umount /proc`
/// once detached the host's /proc) is refused in one line and left mounted, however its path is
/// spelled.
#[test]
fn umount_refuses_what_bux_fuse_did_not_mount() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (to mount a tmpfs)");
        return;
    }
    struct Tmpfs(PathBuf);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tmp");
    std::fs::create_dir_all(dir.path().join("sub")).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "not-bux", mnt.to_str().unwrap()])
        .output()
        .unwrap();
    assert_success(&out);
    let _tmpfs = Tmpfs(mnt.clone());
    std::fs::write(mnt.join("kept"), b"x").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&mnt, &link).unwrap();
    let dotted = dir.path().join("sub/../tmp");
    for p in [&mnt, &link, &dotted] {
        let err = bux.fails(&["umount", p.to_str().unwrap()]);
        assert_eq!(
            err,
            format!(
                "bux-fuse: {} is not a bux-fuse mount (it is tmpfs); not unmounting\n",
                mnt.display()
            ),
            "umount {}",
            p.display()
        );
        assert!(is_mounted(&mnt) && mnt.join("kept").exists());
    }
}

#[test]
fn help_completions_and_man_page() {
    let bux = Bux::new();
    let help = bux.ok(&["mount", "--help"]);
    assert!(
        help.contains("read-only") && help.contains("--foreground"),
        "{help}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let script = bux.ok(&["completions", shell]);
        assert!(
            script.contains("bux-fuse") && script.contains("umount"),
            "{shell}"
        );
    }
    let man = bux.ok(&["man"]);
    assert!(man.contains(".TH bux-fuse") && man.contains("mount"));
    // Every page the main page points to exists with --dir.
    let dir = tempfile::tempdir().unwrap();
    bux.ok(&["-q", "man", "--dir", dir.path().to_str().unwrap()]);
    let main = std::fs::read_to_string(dir.path().join("bux-fuse.1")).unwrap();
    let refs: Vec<String> = main
        .lines()
        .filter_map(|l| l.strip_suffix("(1)"))
        .filter(|l| l.starts_with("bux\\-fuse\\-"))
        .map(|l| l.replace("\\-", "-"))
        .collect();
    assert!(refs.len() >= 10, "{refs:?}");
    for r in refs {
        let page = std::fs::read_to_string(dir.path().join(format!("{r}.1")))
            .unwrap_or_else(|e| panic!("{r}.1: {e}"));
        assert!(page.contains(&format!(".TH {r} 1")), "{r}");
    }
    let bad = bux.run(&["mount"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn library_example_pulls_mounts_reads_unmounts() {
    let reg = Registry::start();
    let r = push(&reg, "t/example", &image_with("from the example", b"s"));
    let exe: PathBuf = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/pull_and_read");
    assert!(
        exe.exists(),
        "build the example first (cargo build --examples): {}",
        exe.display()
    );
    let store = tempfile::tempdir().unwrap();
    let out = Command::new(&exe)
        .args([&r, "/etc/marker"])
        .env("BUX_FUSE_HOME", store.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("from the example") && stdout.contains("cmd: Some([\"--serve\"])"),
        "{stdout}"
    );
    assert!(!is_mounted(&std::env::temp_dir()), "example left a mount");
}

/// Faults around a pull over a slow link: gc while a pull runs waits for it (the pull
/// succeeds, nothing of it is removed); kill -9 in mid-pull leaves temp files that `df`
/// counts and gc removes, and the next pull completes.
#[test]
fn gc_during_a_pull_and_kill_9_mid_pull() {
    let reg = Registry::start();
    let big = test_bytes(12 << 20, 11);
    let r = push(&reg, "t/slow", &image_with("slow", &big));
    let proxy = Proxy::start(reg.port, 40, 1);
    let slow = r.replace(&reg.host(), &proxy.host());

    let bux = Bux::new();
    let mut pull = bux.cmd().args(["pull", "-q", &slow]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    bux.ok(&["gc"]);
    assert!(pull.wait().unwrap().success(), "pull failed next to gc");
    let m = bux.mount(&r);
    assert_eq!(std::fs::read(m.path.join("shared.bin")).unwrap(), big);
    drop(m);

    let bux = Bux::new();
    let mut pull = bux.cmd().args(["pull", "-q", &slow]).spawn().unwrap();
    let tmp = bux.store.path().join("tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_dir(&tmp).map_or(0, |d| d.count()) == 0 {
        assert!(std::time::Instant::now() < deadline, "no download started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    pull.kill().unwrap();
    pull.wait().unwrap();
    let df: serde_json::Value = serde_json::from_str(&bux.ok(&["df", "--json"])).unwrap();
    assert!(df["temp"].as_u64().unwrap() > 0, "{df}");
    bux.ok(&["gc"]);
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "gc left temp files"
    );
    bux.ok(&["pull", "-q", &slow]);
    let m = bux.mount(&r);
    assert_eq!(std::fs::read(m.path.join("shared.bin")).unwrap(), big);
}

/// Looking never creates a store; -q works before the subcommand too.
#[test]
fn listing_a_missing_store_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("never");
    let bin = env!("CARGO_BIN_EXE_bux-fuse");
    for args in [
        &["images"][..],
        &["images", "--json"],
        &["df"],
        &["-q", "images"],
    ] {
        let out = Command::new(bin)
            .arg("--store")
            .arg(&store)
            .args(args)
            .output()
            .unwrap();
        assert_success(&out);
    }
    let out = Command::new(bin)
        .arg("--store")
        .arg(&store)
        .args(["inspect", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!store.exists(), "a look created the store");
}

/// `--small-files` sets which files' bytes the store keeps for the metadata image: none with 0
/// (the store as lean as before), and no more than the index holds.
#[test]
fn small_files_kept_as_asked() {
    let reg = Registry::start();
    let r = push(&reg, "t/small", &image_with("s", &test_bytes(100_000, 5)));
    let kept = |bux: &Bux| {
        std::fs::read_dir(bux.store.path().join("layers/sha256"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "small"))
            .count()
    };
    let (default, lean) = (Bux::new(), Bux::new());
    default.ok(&["pull", "-q", &r]);
    lean.ok(&["pull", "-q", "--small-files", "0", &r]);
    assert_eq!((kept(&default), kept(&lean)), (1, 0)); // etc/marker's layer; shared.bin is 100 kB
    for bux in [&default, &lean] {
        let m = bux.mount(&r);
        assert_eq!(std::fs::read(m.path.join("etc/marker")).unwrap(), b"s");
    }
    let err = lean.fails(&["pull", "--small-files", "65", &r]);
    assert!(err.contains("--small-files: at most 64"), "{err}");
}

/// `check` finds a blob damaged on disk, `--repair` removes it, the next pull fetches it again.
#[test]
fn check_finds_and_repairs_damage() {
    let reg = Registry::start();
    let big = test_bytes(300_000, 8);
    let r = push(&reg, "t/check", &image_with("c", &big));
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let out = bux.ok(&["check"]);
    assert!(out.contains(": 0 problems"), "{out}");
    // What a pull derives beside the blobs: a layer's small files, the metadata image.
    let derived = |dir: &str, ext: &str| {
        std::fs::read_dir(bux.store.path().join(dir))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == ext))
            .unwrap_or_else(|| panic!("no .{ext} in {dir}"))
    };
    let small = derived("layers/sha256", "small");
    let meta = derived("trees/sha256", "erofs");
    let len = std::fs::metadata(&small).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&small)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let mut bytes = std::fs::read(&meta).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1; // the size and superblock still agree: only a comparison sees it
    std::fs::write(&meta, &bytes).unwrap();
    let out = bux.run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "damage not reported: {text}");
    for p in [&small, &meta] {
        assert!(text.contains(&*p.to_string_lossy()), "{p:?} in {text}");
    }
    bux.ok(&["check", "--repair"]);
    assert!(!small.exists() && !meta.exists());
    assert!(bux.ok(&["check"]).contains(": 0 problems"));
    // Flip a byte of the largest stored blob (a layer).
    let blobs = bux.store.path().join("blobs/sha256");
    let victim = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&victim, &bytes).unwrap();
    let out = bux.run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "damage not reported: {text}");
    assert!(text.contains(&*victim.to_string_lossy()), "{text}");
    let out = bux.ok(&["check", "--repair"]);
    assert!(out.contains("(removed)"), "{out}");
    assert!(!victim.exists());
    bux.ok(&["pull", "-q", &r]);
    assert!(bux.ok(&["check"]).contains(": 0 problems"));
    let m = bux.mount(&r);
    assert_eq!(std::fs::read(m.path.join("shared.bin")).unwrap(), big);
}

/// A kept small file whose bytes rotted in the store (`.small`, which every mount reads them
/// from: the kernel's metadata image and FUSE alike) is found by `check`, compared with the
/// layer, and `--repair` removes it: mounts read the layer's bytes again.
#[test]
fn check_compares_kept_small_files_with_their_layer() {
    let reg = Registry::start();
    let small = test_bytes(3000, 5); // kept in blocks of its own (not a tiny file)
    let layer = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/conf", &small)
        .file("big.bin", &test_bytes(300_000, 6))
        .finish();
    let r = push(&reg, "t/rot", &Image::new(vec![(layer, Comp::Gzip)]));
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    assert!(bux.ok(&["check"]).contains(": 0 problems"));
    let kept = std::fs::read_dir(bux.store.path().join("layers/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "small"))
        .expect("no .small kept");
    let mut bytes = std::fs::read(&kept).unwrap();
    let at = bytes
        .windows(64)
        .position(|w| w == &small[1000..1064])
        .expect("the file's bytes are not in the .small file")
        + 10;
    bytes[at] ^= 0x40; // a flipped bit in the file's bytes: header and table intact
    std::fs::write(&kept, &bytes).unwrap();
    let out = bux.run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "rot not reported: {text}");
    assert!(text.contains(&*kept.to_string_lossy()), "{text}");
    assert!(text.contains("is not the layer's"), "{text}");
    bux.ok(&["check", "--repair"]);
    assert!(!kept.exists(), "--repair left {}", kept.display());
    assert!(bux.ok(&["check"]).contains(": 0 problems"));
    let m = bux.mount(&r);
    assert_eq!(std::fs::read(m.path.join("etc/conf")).unwrap(), small);
}

/// On a terminal, progress is a bar per layer: on an 80-column terminal no line is wider (a
/// wider one wraps and the redraws scroll).
#[test]
fn progress_bars_fit_an_80_column_terminal() {
    need("script");
    let reg = Registry::start();
    let r = push(
        &reg,
        "t/progress",
        &image_with("b", &test_bytes(4 << 20, 9)),
    );
    let bux = Bux::new();
    let cmd = format!(
        "stty cols 80 rows 24; {} --store {} pull {r}",
        env!("CARGO_BIN_EXE_bux-fuse"),
        bux.store.path().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("DOCKER_CONFIG", bux.store.path().join("no-docker-config"))
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_success(&out);
    // What the terminal shows, roughly: escape sequences (cursor moves, clears), \r and \n
    // all start a new piece; no piece may be wider than the terminal.
    let raw = String::from_utf8_lossy(&out.stdout);
    let mut text = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            text.push('\n');
            continue;
        }
        text.push(if c == '\r' { '\n' } else { c });
    }
    assert!(text.contains("indexed"), "no bar drawn: {text}");
    // indicatif pads a printed line to the terminal's width and lets the terminal wrap, so a
    // bar may follow on the same piece: cut before each bar's 12-hex-digit layer prefix.
    // The result (reference and digest, on stdout) is data, not progress.
    for piece in text.lines().filter(|l| !l.contains(" sha256:")) {
        let b = piece.as_bytes();
        let mut starts = vec![0];
        for i in 1..b.len().saturating_sub(12) {
            let word = &b[i..i + 12];
            if b[i - 1] == b' '
                && b[i + 12] == b' '
                && word
                    .iter()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
            {
                starts.push(i);
            }
        }
        starts.push(b.len());
        for w in starts.windows(2) {
            let seg = piece[w[0]..w[1]].trim_end();
            assert!(
                seg.chars().count() <= 80,
                "a {}-column line: {seg}",
                seg.chars().count()
            );
        }
    }
}

/// #19.16: a layer's partial download left in the store (`tmp/<hex>.ingest`) is resumed by
/// the next pull: only the rest is fetched (by Range), and the image is whole. One whose bytes
/// are damaged is fetched again from the start; one longer than the layer is discarded.
#[test]
fn a_partial_download_is_resumed_or_discarded() {
    let reg = Registry::start();
    let big = test_bytes(8 << 20, 31);
    let work = tempfile::tempdir().unwrap();
    write_layout(work.path(), "v1", &image_with("partial", &big));
    reg.push(work.path(), "v1", "t/partial", None);
    // The large layer's blob, as the registry serves it.
    let (hex, layer) = std::fs::read_dir(work.path().join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .max_by_key(|(_, b)| b.len())
        .unwrap();
    let proxy = Proxy::start(reg.port, 0, 0);
    let r = format!("{}/t/partial:v1", proxy.host());
    let pull_with = |partial: &[u8]| {
        let bux = Bux::new();
        let tmp = bux.store.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join(format!("{hex}.ingest")), partial).unwrap();
        let before = proxy.bytes();
        let out = bux.run(&["pull", &r]);
        assert_success(&out);
        let fetched = proxy.bytes() - before;
        assert_eq!(
            std::fs::read_dir(&tmp).unwrap().count(),
            0,
            "temp files left"
        );
        let m = bux.mount(&r);
        assert!(std::fs::read(m.path.join("shared.bin")).unwrap() == big);
        drop(m);
        (String::from_utf8_lossy(&out.stderr).into_owned(), fetched)
    };
    let len = layer.len() as u64;

    let (err, fetched) = pull_with(&layer[..layer.len() * 7 / 10]);
    assert!(err.contains("resuming at"), "{err}");
    assert!(fetched < len / 2, "fetched {fetched} of a {len}-byte layer");

    let mut damaged = layer[..layer.len() * 7 / 10].to_vec();
    damaged[layer.len() / 3] ^= 0x55;
    let (err, fetched) = pull_with(&damaged);
    assert!(err.contains("fetching it again from the start"), "{err}");
    assert!(fetched > len, "fetched {fetched} of a {len}-byte layer");

    let mut longer = layer.clone();
    longer.push(0);
    let (err, fetched) = pull_with(&longer);
    assert!(!err.contains("resuming at"), "{err}");
    assert!(fetched > len, "fetched {fetched} of a {len}-byte layer");
}

/// `images -q` prints the references alone, one a line, as `docker images -q` prints IDs.
#[test]
fn images_quiet_prints_only_references() {
    let reg = Registry::start();
    let a = push(&reg, "t/qa", &image_with("a", b"a"));
    let b = push(&reg, "t/qb", &image_with("b", b"b"));
    let bux = Bux::new();
    assert_eq!(bux.ok(&["images", "-q"]), "");
    bux.ok(&["pull", "-q", &a]);
    bux.ok(&["pull", "-q", &b]);
    assert_eq!(bux.ok(&["images", "-q"]), format!("{a}\n{b}\n"));
    assert_eq!(bux.ok(&["-q", "images"]), format!("{a}\n{b}\n"));
}

/// Removing one name of an image that is mounted under another name only removes that name (as
/// podman's `rmi` untags); the last name of a mounted image is still refused without --force.
#[test]
fn rm_of_one_name_of_a_mounted_image_untags_it() {
    let reg = Registry::start();
    let img = image_with("u", b"u");
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &img);
    reg.push(&work.path().join("l"), "v1", "t/one", None);
    reg.push(&work.path().join("l"), "v1", "t/two", None);
    let (one, two) = (
        format!("{}/t/one:v1", reg.host()),
        format!("{}/t/two:v1", reg.host()),
    );
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &one]);
    bux.ok(&["pull", "-q", &two]);
    let m = bux.mount(&one);
    bux.ok(&["rm", &two]);
    let images = bux.ok(&["images", "-q"]);
    assert_eq!(images, format!("{one}\n"));
    assert_eq!(std::fs::read(m.path.join("etc/marker")).unwrap(), b"u");
    let err = bux.fails(&["rm", &one]);
    assert!(err.contains("in use by a mount"), "{err}");
}

/// `inspect` of an image not in the store says how to get it.
#[test]
fn inspect_of_a_missing_image_says_pull_it_first() {
    let bux = Bux::new();
    let err = bux.fails(&["inspect", "127.0.0.1:1/t/missing:v1"]);
    assert!(err.contains("pull it first"), "{err}");
    let reg = Registry::start();
    let a = push(&reg, "t/there", &image_with("a", b"a"));
    bux.ok(&["pull", "-q", &a]);
    let err = bux.fails(&["inspect", "127.0.0.1:1/t/missing:v1"]);
    assert!(
        err.contains("pull it first") && err.contains("bux-fuse pull 127.0.0.1:1/t/missing:v1"),
        "{err}"
    );
}

/// `df` shows the bytes of layers several images share apart from the kinds it sums.
#[test]
fn df_shows_shared_bytes_as_a_note_not_a_kind() {
    let reg = Registry::start();
    let shared = test_bytes(200_000, 8);
    let a = push(&reg, "t/da", &image_with("a", &shared));
    let b = push(&reg, "t/db", &image_with("b", &shared));
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &a]);
    bux.ok(&["pull", "-q", &b]);
    let df = bux.ok(&["df"]);
    let kinds: Vec<&str> = df
        .lines()
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!kinds.contains(&"shared"), "shared listed as a kind: {df}");
    assert!(
        df.contains("of which shared by several images"),
        "no note on shared bytes: {df}"
    );
    assert!(kinds.contains(&"total"), "no total: {df}");
}

/// The flags that only mean something for a lazy mount are refused without --lazy.
#[test]
fn lazy_only_flags_need_lazy() {
    let bux = Bux::new();
    for flag in [
        &["--prefetch", "none"][..],
        &["--trust-index"],
        &["--read-timeout", "3"],
        &["--wait-complete"],
    ] {
        let mut args = vec!["mount", "127.0.0.1:1/t/x:v1", "/nonexistent/mnt"];
        args.extend_from_slice(flag);
        let out = bux.run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag:?}: {err}");
        assert!(err.contains("--lazy"), "{flag:?}: {err}");
    }
}

/// `login` spells the plain-HTTP flag as the other commands do (the old `--insecure` stays as
/// an alias), and its errors name the registry, not an internal probe.
#[test]
fn login_flags_and_errors_name_the_registry() {
    let reg = Registry::start_with_auth("bob", "pw");
    let bux = Bux::new();
    let cfg = tempfile::tempdir().unwrap();
    for flag in ["--insecure-registry", "--insecure"] {
        let out = bux
            .cmd()
            .args(["login", flag, &reg.host(), "-u", "bob"])
            .env("BUX_FUSE_PASSWORD", "pw")
            .env("DOCKER_CONFIG", cfg.path())
            .output()
            .unwrap();
        assert_success(&out);
    }
    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = format!("127.0.0.1:{closed}");
    let out = bux
        .cmd()
        .args(["login", &host, "-u", "bob"])
        .env("BUX_FUSE_PASSWORD", "pw")
        .env("DOCKER_CONFIG", cfg.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&host) && !err.contains("login-check") && !err.contains("probe"),
        "{err}"
    );
}

/// `push-index` takes credentials as `pull` and `login` do.
#[test]
fn push_index_takes_username_and_password_stdin() {
    let reg = Registry::start_with_auth("bob", "pw");
    let r = push_auth(&reg);
    let bux = Bux::new();
    let out = bux
        .cmd()
        .args(["pull", "-q", "-u", "bob", &r])
        .env("BUX_FUSE_PASSWORD", "pw")
        .output()
        .unwrap();
    assert_success(&out);
    let out = bux
        .cmd()
        .args(["push-index", "-u", "bob", &r])
        .env("BUX_FUSE_PASSWORD", "pw")
        .output()
        .unwrap();
    assert_success(&out);
    let mut child = bux
        .cmd()
        .args(["push-index", "--username", "bob", "--password-stdin", &r])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"pw\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_success(&out);
    // An image of two layers: "2 layers"; one of one layer: "1 layer", not "1 layers".
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("2 layers indexed"), "{said}");
    let one = LayerBuilder::new().file("only", b"one").finish();
    let work = tempfile::tempdir().unwrap();
    write_layout(
        &work.path().join("l"),
        "v1",
        &Image::new(vec![(one, Comp::Gzip)]),
    );
    reg.push(
        &work.path().join("l"),
        "v1",
        "t/single",
        Some(("bob", "pw")),
    );
    let single = format!("{}/t/single:v1", reg.host());
    for args in [&["pull", "-u", "bob"][..], &["push-index", "-u", "bob"]] {
        let out = bux
            .cmd()
            .args(args)
            .arg(&single)
            .env("BUX_FUSE_PASSWORD", "pw")
            .output()
            .unwrap();
        assert_success(&out);
        if args[0] == "push-index" {
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(said.contains("1 layer indexed"), "{said}");
        } else {
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(
                said.contains(", 1 layer,") && said.contains("(1 entry)"),
                "{said}"
            );
        }
    }
}

/// Mounting over a directory with files in it says that the mount hides them; a writable
/// mount says where its changes go.
#[test]
fn mount_messages_warn_of_hidden_files_and_say_where_changes_go() {
    let reg = Registry::start();
    let r = push(&reg, "t/msg", &image_with("m", b"m"));
    let bux = Bux::new();
    bux.ok(&["pull", "-q", &r]);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::write(mnt.join("mine"), b"x").unwrap();
    let out = bux.run(&["mount", &r, mnt.to_str().unwrap()]);
    assert_success(&out);
    let m = MountGuard::adopt(mnt.clone(), dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not empty") && err.contains("hides"),
        "no warning: {err}"
    );
    drop(m);

    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    let out = bux.run(&["mount", "--writable", &r, mnt.to_str().unwrap()]);
    assert_success(&out);
    let m = MountGuard::adopt(mnt, dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("writable") && err.contains("discarded at unmount"),
        "{err}"
    );
    assert!(!err.contains("is not empty"), "{err}");
    drop(m);

    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    let upper = dir.path().join("upper");
    let out = bux.run(&[
        "mount",
        "--upper",
        upper.to_str().unwrap(),
        &r,
        mnt.to_str().unwrap(),
    ]);
    assert_success(&out);
    let m = MountGuard::adopt(mnt, dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("kept in {}", upper.display())),
        "{err}"
    );
    drop(m);
}

/// Help, man page and the crate's description do not call every mount read-only, now that
/// --writable exists.
#[test]
fn help_mentions_writable_mounts() {
    let bux = Bux::new();
    let help = bux.ok(&["--help"]);
    assert!(help.contains("writable"), "{help}");
    let mount = bux.ok(&["mount", "--help"]);
    assert!(!mount.starts_with("Mount an image read-only"), "{mount}");
    let man = bux.ok(&["man"]);
    assert!(man.contains("writable"), "{man}");
    let description = env!("CARGO_PKG_DESCRIPTION");
    assert!(
        !description.contains("read-only") || description.contains("writable"),
        "{description}"
    );
}

/// A progress line is ended with a newline, not padded to the terminal's width for the
/// terminal to wrap: on a terminal wider than the one reported (or reported as none), the
/// next output would otherwise run on in the same line.
#[test]
fn progress_lines_end_with_a_newline() {
    need("script");
    let reg = Registry::start();
    let r = push(&reg, "t/lines", &image_with("l", &test_bytes(1 << 20, 10)));
    let bux = Bux::new();
    let run = |args: &str| {
        let cmd = format!(
            "stty cols 200 rows 24; {} --store {} {args}",
            env!("CARGO_BIN_EXE_bux-fuse"),
            bux.store.path().display()
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("DOCKER_CONFIG", bux.store.path().join("no-docker-config"))
            .env("TERM", "xterm")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_success(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // After each message, only blanks and escape sequences may come before the line ends.
    let ended = |raw: &str, what: &str, end: &str| {
        let at = raw
            .find(what)
            .unwrap_or_else(|| panic!("{what:?} not shown: {raw:?}"));
        let rest = &raw[at + what.len()..];
        let rest = &rest[rest.find(end).unwrap() + end.len()..];
        let line = rest.split(['\n', '\r']).next().unwrap();
        let mut visible = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
                continue;
            }
            visible.push(c);
        }
        assert!(
            visible.trim().is_empty() && !visible.contains("  "),
            "{what:?} runs on into {visible:?}: {raw:?}"
        );
    };
    let first = run(&format!("pull {r}"));
    ended(&first, "layers, ", "B");
    ended(&first, "merged tree: ", "inodes");
    let again = run(&format!("pull {r}"));
    ended(&again, "already in the store", "");
}

/// #19.22: the shipped binary is lean — the release profile keeps no debug info (the
/// `profiling` profile does, for debuggers) — and README installs with the locked dependency
/// versions. Before: `debug = 1` (a 97 MB binary) and `cargo install --path .`.
#[test]
fn the_release_profile_ships_no_debug_info_and_install_is_locked() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let release: Vec<&str> = cargo
        .lines()
        .skip_while(|l| l.trim() != "[profile.release]")
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .map(str::trim)
        .collect();
    assert!(release.contains(&"debug = false"), "{release:?}");
    assert!(
        release.iter().any(|l| l.starts_with("strip = ")),
        "{release:?}"
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("cargo install --locked --path ."));
    assert!(!readme.contains("cargo install --path ."));
}

/// `--timings` prints the pull's timeline: each step with the seconds since the command began,
/// never going back, ending with the pull done (and, for `mount`, the mount made).
#[test]
fn timings_print_the_pulls_timeline() {
    let reg = Registry::start();
    let r = push(&reg, "t/timings", &image_with("t", b"shared"));
    let bux = Bux::new();
    let out = bux.run(&["pull", "--timings", &r]);
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let steps: Vec<(f64, &str)> = err
        .lines()
        .map(|l| {
            let (secs, what) = l
                .trim_start()
                .split_once(" s  ")
                .unwrap_or_else(|| panic!("{l}"));
            (secs.parse().unwrap_or_else(|_| panic!("{l}")), what)
        })
        .collect();
    assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "{err}");
    assert!(
        steps.iter().any(|(_, w)| w.contains("pulled and indexed")),
        "{err}"
    );
    assert!(
        steps.iter().any(|(_, w)| w.starts_with("merged tree")),
        "{err}"
    );
    assert_eq!(steps.last().map(|s| s.1), Some("pulled"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("m");
    let out = bux.run(&["mount", "--timings", &r, mnt.to_str().unwrap()]);
    assert_success(&out);
    let _guard = MountGuard::adopt(mnt, dir);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(" s  mounted"),
        "{out:?}"
    );
}
