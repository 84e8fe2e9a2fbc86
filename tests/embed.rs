//! A program that links bux-fuse and is not the `bux-fuse` binary (`examples/embedder.rs`)
//! mounts through the image's shared server (root): from its own executable when its `main`
//! calls `bux_fuse::serve_if_requested()` first, from a `bux-fuse` binary named by
//! `$BUX_FUSE_HELPER`, and with an error naming the hook, quickly, when it calls nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// The example, built (once per test run) in the target directory this test was built in:
/// `cargo test --test embed` does not build examples.
fn embedder() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        // target/<profile>/deps/embed-<hash>
        let deps = std::env::current_exe().unwrap();
        let profile_dir = deps.parent().unwrap().parent().unwrap().to_path_buf();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--locked",
            "--example",
            "embedder",
            "--manifest-path",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("running cargo");
        assert_success(&out);
        let exe = profile_dir.join("examples").join("embedder");
        assert!(exe.exists(), "{} was not built", exe.display());
        exe
    })
}

fn image(reg: &Registry, repo: &str) -> String {
    let layer = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/motd", b"hello from the embedded server\n")
        .file("big.bin", &test_bytes(2 << 20, 3))
        .finish();
    let img = Image::new(vec![(layer, Comp::Gzip)]);
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("l"), "v1", &img);
    reg.push(&work.path().join("l"), "v1", repo, None);
    format!("{}/{repo}:v1", reg.host())
}

/// Runs `cmd`, killed if it takes longer than `limit` (a hang fails the test, not the run).
fn run_for(mut cmd: Command, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = (
        std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut out, &mut v).ok();
            v
        }),
        std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut err, &mut v).ok();
            v
        }),
    );
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let s = child.wait().unwrap();
            let stderr = String::from_utf8_lossy(&readers.1.join().unwrap()).into_owned();
            panic!("still running after {limit:?}: killed ({s}); stderr: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let output = Output {
        status,
        stdout: readers.0.join().unwrap(),
        stderr: readers.1.join().unwrap(),
    };
    (output, elapsed)
}

/// What the test sets up for one run of the embedder.
struct Run {
    _reg: Registry,
    reference: String,
    store: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl Run {
    fn new(repo: &str) -> Run {
        let reg = Registry::start();
        let reference = image(&reg, repo);
        Run {
            _reg: reg,
            reference,
            store: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
        }
    }

    fn mnt(&self) -> PathBuf {
        self.work.path().join("root")
    }

    /// The image pulled into the store by the `bux-fuse` binary.
    fn pull(&self) {
        let out = Command::new(env!("CARGO_BIN_EXE_bux-fuse"))
            .arg("--store")
            .arg(self.store.path())
            .args(["pull", "-q", &self.reference])
            .output()
            .unwrap();
        assert_success(&out);
    }

    /// The embedder reading `file`, with the hook unless `hook` is false.
    fn command(&self, file: &str, hook: bool) -> Command {
        let mut cmd = Command::new(embedder());
        cmd.arg(self.store.path())
            .arg(&self.reference)
            .arg(self.mnt())
            .arg(file)
            // A hookless embedder started as the server takes its arguments for its own.
            .current_dir(self.work.path())
            .env_remove("BUX_FUSE_HELPER")
            .env_remove("BUX_FUSE_SERVE")
            .env("DOCKER_CONFIG", self.work.path().join("no-docker-config"));
        if !hook {
            cmd.env("EMBEDDER_SKIP_HOOK", "1");
        }
        cmd
    }

    /// Processes that serve an image of this run's store.
    fn servers(&self) -> Vec<u32> {
        self.server_roles().into_iter().map(|(p, _)| p).collect()
    }

    /// Processes that serve an image of this run's store, and whether each is a worker.
    fn server_roles(&self) -> Vec<(u32, bool)> {
        image_servers(self.store.path())
    }

    fn assert_no_server_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.servers().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(self.servers().is_empty(), "image servers left running");
        assert!(!is_mounted(&self.mnt()), "the mount is left");
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // Whatever a failed test left: the mount, then the servers (which leave once unused).
        let _ = Command::new(env!("CARGO_BIN_EXE_bux-fuse"))
            .arg("--store")
            .arg(self.store.path())
            .arg("umount")
            .arg(self.mnt())
            .output();
        for pid in self.servers() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The counters the embedder printed: (scope, decompressed bytes).
fn stats_line(out: &str) -> (String, u64) {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("stats: scope "))
        .unwrap_or_else(|| panic!("no stats printed: {out}"));
    let mut words = line.split([',', ' ']).filter(|w| !w.is_empty());
    let scope = words.next().unwrap().to_string();
    let decompressed = words.next().unwrap().parse().unwrap();
    (scope, decompressed)
}

#[test]
fn an_embedder_that_calls_the_hook_serves_from_its_own_binary() {
    let run = Run::new("embed/own");
    let (out, _) = run_for(run.command("/etc/motd", true), Duration::from_secs(120));
    assert_success(&out);
    let said = stdout(&out);
    assert!(
        said.contains("first line: hello from the embedded server"),
        "{said}"
    );
    assert!(said.contains("finished: false"), "a live mount: {said}");
    assert!(said.contains("unmounted"), "{said}");
    // (No bux-fuse binary is involved: the server ran from the embedder's executable.)
    let shared = std::fs::read_dir(run.store.path().join("shared"))
        .expect("the shared server's state")
        .count();
    assert_eq!(shared, 1, "one image server");
    run.assert_no_server_left();
}

#[test]
fn a_shared_mount_reports_its_servers_counters() {
    let run = Run::new("embed/stats");
    let (out, _) = run_for(run.command("/big.bin", true), Duration::from_secs(120));
    assert_success(&out);
    let said = stdout(&out);
    assert!(
        said.contains(&format!("big.bin: {} bytes", 2 << 20)),
        "{said}"
    );
    assert!(said.contains("finished: false"), "a live mount: {said}");
    let (scope, decompressed) = stats_line(&said);
    assert_eq!(scope, "Image", "the image server's counters: {said}");
    assert!(
        decompressed >= 2 << 20,
        "the 2 MiB read was decompressed by the server: {said}"
    );
    run.assert_no_server_left();
}

#[test]
fn an_embedder_without_the_hook_is_told_which_function_to_call() {
    let run = Run::new("embed/nohook");
    let (out, took) = run_for(run.command("/etc/motd", false), Duration::from_secs(120));
    assert!(
        !out.status.success(),
        "mounted without the hook: {}",
        stdout(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("bux_fuse::serve_if_requested()") && err.contains("did not start"),
        "the error names the hook: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    run.assert_no_server_left();
}

#[test]
fn a_hookless_process_started_as_the_server_refuses_to_start_another() {
    // What the child of a hookless embedder is: started as a server (BUX_FUSE_SERVE set,
    // `serve-shared` among its arguments: here, as the file it reads) and going on to mount.
    let run = Run::new("embed/guard");
    let mut cmd = run.command("serve-shared", false);
    cmd.env("BUX_FUSE_SERVE", "1");
    let (out, took) = run_for(cmd, Duration::from_secs(120));
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("started as bux-fuse's image server")
            && err.contains("bux_fuse::serve_if_requested()"),
        "{err}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    run.assert_no_server_left();
}

#[test]
fn a_helper_that_never_answers_is_given_up_within_the_timeout() {
    let run = Run::new("embed/silent");
    // A "helper" that says nothing and never leaves.
    let helper = run.work.path().join("silent-helper");
    let pid_file = run.work.path().join("helper.pid");
    // Written under another name and copied by a child, so that no test's fork holds it
    // open for writing when it runs ("Text file busy").
    let draft = run.work.path().join("silent-helper.draft");
    std::fs::write(
        &draft,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
            pid_file.display()
        ),
    )
    .unwrap();
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&draft, mode).unwrap();
    copy_executable(&draft, &helper);
    let mut cmd = run.command("/etc/motd", true);
    cmd.env("BUX_FUSE_HELPER", &helper);
    let (out, took) = run_for(cmd, Duration::from_secs(120));
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("no hello in 10 s") && err.contains("bux_fuse::serve_if_requested()"),
        "{err}"
    );
    assert!(took < Duration::from_secs(40), "took {took:?}");
    // The helper was killed, not left behind.
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc_dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!proc_dir.exists(), "the silent helper was left running");
}

#[test]
fn a_bux_fuse_helper_serves_an_embedder_without_the_hook() {
    let run = Run::new("embed/helper");
    let mut cmd = run.command("/etc/motd", false);
    cmd.env("BUX_FUSE_HELPER", env!("CARGO_BIN_EXE_bux-fuse"));
    let (out, _) = run_for(cmd, Duration::from_secs(120));
    assert_success(&out);
    let said = stdout(&out);
    assert!(
        said.contains("first line: hello from the embedded server"),
        "{said}"
    );
    assert!(said.contains("finished: false"), "{said}");
    run.assert_no_server_left();
}

/// The worker's pid, once there is exactly one other than `not`.
fn worker_other_than(run: &Run, not: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let w: Vec<u32> = run
            .server_roles()
            .into_iter()
            .filter(|&(p, w)| w && Some(p) != not)
            .map(|(p, _)| p)
            .collect();
        if w.len() == 1 {
            return w[0];
        }
        assert!(Instant::now() < deadline, "workers: {w:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_mount_over_the_shared_server_is_live_and_counted_until_unmounted_from_outside() {
    use bux_fuse::mount::StatsScope;
    let run = Run::new("embed/live");
    let bux = env!("CARGO_BIN_EXE_bux-fuse");
    run.pull();
    // This test's harness cannot call the hook first in its main: a bux-fuse binary serves.
    let store = bux_fuse::Store::open(run.store.path()).unwrap();
    let opts = bux_fuse::MountOptions {
        shared_server: Some(PathBuf::from(bux)),
        ..Default::default()
    };
    let m = bux_fuse::mount(&store, &run.reference, &run.mnt(), &opts).unwrap();
    assert!(!m.is_finished(), "a live mount over the shared server");
    assert_eq!(m.stats().scope, StatsScope::Image);
    let big = std::fs::read(m.path().join("big.bin")).unwrap();
    assert_eq!(big, test_bytes(2 << 20, 3));
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.stats().decompressed_bytes < 2 << 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = m.stats();
    assert!(before.decompressed_bytes >= 2 << 20, "{before:?}");
    // The worker killed: the supervisor starts another, the mount stays live, and the new
    // worker counts on from what the dead one published.
    let first = worker_other_than(&run, None);
    Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .unwrap();
    assert!(!m.is_finished(), "live while the worker is replaced");
    worker_other_than(&run, Some(first));
    assert!(!m.is_finished(), "live under the new worker");
    let after = m.stats();
    assert_eq!(after.scope, StatsScope::Image);
    assert!(
        after.decompressed_bytes >= before.decompressed_bytes,
        "{before:?} then {after:?}"
    );
    // Unmounted from outside.
    let out = Command::new(bux)
        .arg("--store")
        .arg(run.store.path())
        .arg("umount")
        .arg(run.mnt())
        .output()
        .unwrap();
    assert_success(&out);
    assert!(m.is_finished(), "unmounted from outside");
    m.unmount().unwrap();
    run.assert_no_server_left();
}

/// A mount served by a worker process (here root's, recording a read trace: kept, not on the
/// image server) that cannot open the image returns the error a mount served in the caller's
/// own process returns — its variant, for a runtime to act on (`check --repair` for a damaged
/// store file), not the text of a worker that did not start.
#[test]
fn a_worker_that_cannot_open_the_image_returns_the_callers_error() {
    if !kernel_resends_fuse_requests() {
        eprintln!("skipped: kept mounts need Linux 6.9+");
        return;
    }
    let run = Run::new("embed/typed");
    let bux = env!("CARGO_BIN_EXE_bux-fuse");
    run.pull();
    // The image's tree and every layer index damaged in place (same length, garbage where
    // their entries are): nothing to rebuild the tree from.
    let mut damaged = 0;
    let dirs = ["layers/sha256", "trees/sha256"].map(|d| run.store.path().join(d));
    for e in dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap().flatten())
    {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "idx" || x == "tree") {
            let mut bytes = std::fs::read(&path).unwrap();
            let n = bytes.len();
            bytes[n / 4..].fill(0xa5);
            std::fs::write(&path, bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 1, "no tree or layer index in {dirs:?}");
    let store = bux_fuse::Store::open(run.store.path()).unwrap();
    let mount = |shared_server: Option<PathBuf>| {
        let opts = bux_fuse::MountOptions {
            shared_server,
            record_trace: true,
            ..Default::default()
        };
        bux_fuse::mount(&store, &run.reference, &run.mnt(), &opts)
            .map(|_| ())
            .unwrap_err()
    };
    let here = mount(None);
    let kept = mount(Some(PathBuf::from(bux)));
    assert!(
        !matches!(kept.inner(), bux_fuse::Error::Mount { .. }),
        "the worker's failure came back as text: {kept}"
    );
    assert_eq!(
        std::mem::discriminant(kept.inner()),
        std::mem::discriminant(here.inner()),
        "kept: {kept:?}; in this process: {here:?}"
    );
    assert_eq!(kept.to_string(), here.to_string());
    assert!(!is_mounted(&run.mnt()), "a failed mount left a mount");
}

/// The same through root's image server (a supervisor and its worker): what the worker met
/// opening the image reaches the caller typed, not as "see the log".
#[test]
fn an_image_server_that_cannot_open_the_image_returns_the_callers_error() {
    let run = Run::new("embed/typed-shared");
    let bux = env!("CARGO_BIN_EXE_bux-fuse");
    run.pull();
    // Every layer's access table (what a mount maps to read the layer) damaged in place; the
    // tree (which the mounting process reads to choose how to mount) left whole: only the
    // server's worker meets the damage.
    let mut damaged = 0;
    let dir = run.store.path().join("layers/sha256");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "access") {
            let mut bytes = std::fs::read(&path).unwrap();
            let n = bytes.len();
            bytes[8.min(n)..].fill(0xa5); // all but the magic number
            std::fs::write(&path, bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0, "no access table in {}", dir.display());
    let store = bux_fuse::Store::open(run.store.path()).unwrap();
    let mount = |shared_server: Option<PathBuf>| {
        let opts = bux_fuse::MountOptions {
            shared_server,
            ..Default::default()
        };
        bux_fuse::mount(&store, &run.reference, &run.mnt(), &opts)
            .map(|_| ())
            .unwrap_err()
    };
    let here = mount(None);
    let shared = mount(Some(PathBuf::from(bux)));
    assert!(
        !matches!(shared.inner(), bux_fuse::Error::Mount { .. }),
        "the image server's failure came back as text: {shared}"
    );
    assert_eq!(
        std::mem::discriminant(shared.inner()),
        std::mem::discriminant(here.inner()),
        "image server: {shared:?}; in this process: {here:?}"
    );
    assert_eq!(shared.to_string(), here.to_string());
    assert!(!is_mounted(&run.mnt()), "a failed mount left a mount");
    wait_for(10, "the image server left", || {
        image_servers(run.store.path()).is_empty()
    });
}
