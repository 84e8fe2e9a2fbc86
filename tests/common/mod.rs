//! Real parts for integration tests: Debian's `docker-registry` on a free 127.0.0.1 port, images
//! built here as OCI layouts and pushed with `skopeo`, the `bux-fuse` binary, and reference
//! unpacks with `umoci`.
#![allow(dead_code)]

pub mod slow_link;
pub mod treediff;

#[allow(unused_imports)] // not every test file compares trees
pub use treediff::treediff;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Whether the kernel resends a dead FUSE server's unanswered requests to the next one
/// (FUSE_NOTIFY_RESEND, Linux 6.9+): a worker that takes over answers what its predecessor held.
#[allow(dead_code)]
pub fn kernel_resends_fuse_requests() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 9)
}

/// Kills (SIGKILL, stopped ones too) every image server process serving from `store`: their
/// connections end, and reads held by them fail rather than wait for good.
#[allow(dead_code)]
pub fn kill_image_servers(store: &Path) {
    let pattern = format!("--store {} serve-shared", store.display());
    let _ = Command::new("pkill")
        .args(["-9", "-f", "--", &pattern])
        .status();
}

/// Fails the test with a clear message when a required tool is missing.
pub fn need(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is not installed: run scripts/setup.sh (installs the test dependencies)"
    );
}

/// Copies an executable in a child process (`cp`), so the file is never open for writing
/// in this process: the tests of one binary run in parallel, and a child that another
/// test forks between our `open` and `close` would inherit the write descriptor until it
/// execs, making running the copy fail with "Text file busy" (ETXTBSY).
pub fn copy_executable(src: impl AsRef<Path>, dst: impl AsRef<Path>) {
    let st = Command::new("cp")
        .arg("--")
        .arg(src.as_ref())
        .arg(dst.as_ref())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "cp {} {}",
        src.as_ref().display(),
        dst.as_ref().display()
    );
}

/// Asserts a finished command succeeded, showing its stderr otherwise.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ----------------------------------------------------------------------------------------------
// Registry

pub struct Registry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// A registry requiring basic auth for `user:password`.
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Registry::start_with(Some((user, password)))
    }

    fn start_with(auth: Option<(&str, &str)>) -> Registry {
        Registry::start_with_config(auth, "")
    }

    fn start_with_config(auth: Option<(&str, &str)>, extra: &str) -> Registry {
        need("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            need("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .unwrap();
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        config.push_str(extra);
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("starting docker-registry");
        let reg = Registry { port, dir, child };
        wait_for_registry(port);
        reg
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A pull-through cache (the registry's proxy mode) of the registry at `remote`
    /// (`host:port`, plain HTTP).
    pub fn start_pull_through(remote: &str) -> Registry {
        Registry::start_with_config(None, &format!("proxy:\n  remoteurl: http://{remote}\n"))
    }

    /// A registry with token auth, as Docker Hub and cloud registries have: bearer JWTs from
    /// `tests/token_server.py`, which issues them to `user:password` (basic auth) and for the
    /// refresh token `identity` (Docker identity tokens).
    pub fn start_with_token_server(user: &str, password: &str, identity: &str) -> TokenRegistry {
        Registry::start_with_tokens(user, password, identity, 600)
    }

    /// [`Registry::start_with_token_server`] whose tokens for the identity token live
    /// `lifetime` seconds (plus the registry's 60 s of leeway).
    pub fn start_with_tokens(
        user: &str,
        password: &str,
        identity: &str,
        lifetime: i64,
    ) -> TokenRegistry {
        need("openssl");
        let keys = tempfile::tempdir().unwrap();
        let (key, cert) = (keys.path().join("key.pem"), keys.path().join("cert.pem"));
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=bux-fuse-test-tokens", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert_success(&out);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = keys.path().join("requests.log");
        let server = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/token_server.py"
            ))
            .arg(port.to_string())
            .args([&key, &cert])
            .args(["bux-test", user, password, identity])
            .arg(&log)
            .arg(lifetime.to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port);
        let auth = format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{port}/token\n    service: bux-test\n    \
             issuer: bux-test-issuer\n    rootcertbundle: {}\n",
            cert.display()
        );
        let reg = Registry::start_with_config(None, &auth);
        TokenRegistry {
            reg,
            server,
            log,
            _keys: keys,
        }
    }

    /// Stops the registry (its data stays, see [`Registry::restart`]).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("starting docker-registry");
        wait_for_registry(self.port);
    }

    /// Path of a blob in the registry's own storage (to corrupt it).
    pub fn blob_data_path(&self, hex: &str) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes the OCI layout `layout:tag` as `repo:tag` with skopeo.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str, creds: Option<(&str, &str)>) {
        need("skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--all",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ]);
        if let Some((u, p)) = creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()));
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "skopeo push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A registry with token auth and its token server (see
/// [`Registry::start_with_token_server`]).
pub struct TokenRegistry {
    pub reg: Registry,
    server: Child,
    /// One JSON line per request the token server answered.
    pub log: PathBuf,
    _keys: tempfile::TempDir,
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_registry(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
            if resp.starts_with("HTTP/1.") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The project's slow link ([`slow_link::SlowLink`]) in front of a registry: counts the bytes
/// sent to clients, and can stall.
pub struct Proxy {
    pub port: u16,
    link: slow_link::SlowLink,
}

impl Proxy {
    /// A proxy to 127.0.0.1:`target` at `mbit` Mbit/s with `rtt_ms` round trips.
    pub fn start(target: u16, mbit: u32, rtt_ms: u32) -> Proxy {
        let link = slow_link::SlowLink::start(target, mbit.into(), rtt_ms.into())
            .expect("starting the slow link");
        Proxy {
            port: link.port(),
            link,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stalls the link: nothing passes, connections stay open.
    pub fn pause(&self) {
        self.link.pause();
    }

    /// Resumes a paused link.
    pub fn unpause(&self) {
        self.link.unpause();
    }

    /// Cuts every open connection (see [`slow_link::SlowLink::cut`]).
    pub fn cut(&self) {
        self.link.cut();
    }

    /// Bytes sent to clients so far.
    pub fn bytes(&self) -> u64 {
        self.link.bytes_sent()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----------------------------------------------------------------------------------------------
// Layers

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Comp {
    Gzip,
    Zstd,
    Plain,
}

impl Comp {
    pub fn media_type(self) -> &'static str {
        match self {
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Comp::Plain => "application/vnd.oci.image.layer.v1.tar",
        }
    }
    pub fn compress(self, tar: &[u8]) -> Vec<u8> {
        match self {
            Comp::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                e.write_all(tar).unwrap();
                e.finish().unwrap()
            }
            Comp::Zstd => zstd::encode_all(tar, 3).unwrap(),
            Comp::Plain => tar.to_vec(),
        }
    }
}

/// Builds one layer's tar with explicit headers (GNU format, PAX where needed).
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
    pub mtime: u64,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        LayerBuilder {
            b: tar::Builder::new(Vec::new()),
            mtime: 1_700_000_000,
        }
    }

    fn header(&self, kind: tar::EntryType, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(self.mtime);
        h.set_size(0);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = self.header(tar::EntryType::Directory, mode);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn file(self, path: &str, data: &[u8]) -> Self {
        self.file_with(path, data, 0o644, 0, 0)
    }

    pub fn file_with(mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = self.header(tar::EntryType::Regular, mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    /// A file with PAX xattrs.
    pub fn file_xattrs(mut self, path: &str, data: &[u8], xattrs: &[(&str, &[u8])]) -> Self {
        let pax: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.b
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self.file(path, data)
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = self.header(tar::EntryType::Symlink, 0o777);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = self.header(tar::EntryType::Link, 0o644);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn device(mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
        let mut h = self.header(kind, 0o660);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn whiteout(self, dir: &str, name: &str) -> Self {
        let p = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&p, b"")
    }

    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"")
    }

    /// Appends raw bytes (for hand-crafted headers).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.b.get_mut().extend_from_slice(bytes);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// Deterministic pseudo-random bytes, half compressible.
pub fn test_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 4096) % 2 == 0 {
                b"the quick brown fox "[i % 20]
            } else {
                x as u8
            }
        })
        .collect()
}

// ----------------------------------------------------------------------------------------------
// OCI layouts

pub struct Image {
    pub layers: Vec<(Vec<u8>, Comp)>,
    pub config: serde_json::Value,
    pub arch: String,
    /// Overrides the config's diff_ids (to build inconsistent images).
    pub diff_ids: Option<Vec<String>>,
}

impl Image {
    pub fn new(layers: Vec<(Vec<u8>, Comp)>) -> Image {
        Image {
            layers,
            config: serde_json::json!({
                "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "WorkingDir": "/"
            }),
            arch: "amd64".into(),
            diff_ids: None,
        }
    }

    /// The same image with every layer recompressed as gzip (for umoci, which cannot read zstd).
    pub fn as_gzip(&self) -> Image {
        Image {
            layers: self
                .layers
                .iter()
                .map(|(t, _)| (t.clone(), Comp::Gzip))
                .collect(),
            config: self.config.clone(),
            arch: self.arch.clone(),
            diff_ids: self.diff_ids.clone(),
        }
    }
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = sha256_hex(bytes);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

/// Writes an image's blobs; returns the manifest descriptor (without annotations).
pub fn write_image(layout: &Path, image: &Image) -> serde_json::Value {
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, comp) in &image.layers {
        diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
        let (digest, size) = put_blob(layout, &comp.compress(tar));
        layer_descs.push(
            serde_json::json!({"mediaType": comp.media_type(), "digest": digest, "size": size}),
        );
    }
    if let Some(d) = &image.diff_ids {
        diff_ids = d.clone();
    }
    let config = serde_json::json!({
        "architecture": image.arch,
        "os": "linux",
        "config": image.config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": []
    });
    let (cdigest, csize) = put_blob(layout, &serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
        "layers": layer_descs
    });
    let (mdigest, msize) = put_blob(layout, &serde_json::to_vec(&manifest).unwrap());
    serde_json::json!({"mediaType": OCI_MANIFEST, "digest": mdigest, "size": msize,
        "platform": {"os": "linux", "architecture": image.arch}})
}

fn write_index_json(layout: &Path, desc: serde_json::Value, tag: &str) {
    let mut desc = desc;
    desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    index["manifests"].as_array_mut().unwrap().push(desc);
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Writes `image` into the OCI layout at `layout` under `tag`.
pub fn write_layout(layout: &Path, tag: &str, image: &Image) -> serde_json::Value {
    let desc = write_image(layout, image);
    write_index_json(layout, desc.clone(), tag);
    desc
}

/// Writes a multi-platform image index under `tag`.
pub fn write_multiarch_layout(layout: &Path, tag: &str, images: &[&Image]) {
    let manifests: Vec<serde_json::Value> = images.iter().map(|i| write_image(layout, i)).collect();
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    let (digest, size) = put_blob(layout, &serde_json::to_vec(&index).unwrap());
    write_index_json(
        layout,
        serde_json::json!({"mediaType": OCI_INDEX, "digest": digest, "size": size}),
        tag,
    );
}

/// Unpacks `layout:tag` with umoci (the independent reference) into `dest`.
pub fn umoci_unpack(layout: &Path, tag: &str, dest: &Path) {
    need("umoci");
    let out = Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ----------------------------------------------------------------------------------------------
// The CLI

pub struct Bux {
    pub store: tempfile::TempDir,
}

impl Default for Bux {
    fn default() -> Self {
        Self::new()
    }
}

impl Bux {
    pub fn new() -> Bux {
        Bux {
            store: tempfile::tempdir().unwrap(),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bux-fuse"));
        c.arg("--store").arg(self.store.path());
        c.env_remove("BUX_FUSE_PASSWORD");
        c.env("DOCKER_CONFIG", self.store.path().join("no-docker-config"));
        c.stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "bux-fuse {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and asserts failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "bux-fuse {args:?} unexpectedly succeeded"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Waits until the bytes of the store's (first) image held locally stop growing: a
    /// background fetch (trace prefetch) has settled. Settled is the same count for 2 s,
    /// sampled every 0.5 s: a fetcher starved of CPU for a moment on a busy machine (CI
    /// building beside it) is not done. Returns the settled count; panics after 40 s, saying
    /// `what()`.
    pub fn wait_until_local_bytes_settle(&self, what: impl Fn() -> String) -> u64 {
        let store = self.store.path();
        let local = || {
            let s = bux_fuse::Store::open(store).unwrap();
            let image = s.images().unwrap()[0].clone();
            s.local_bytes(&image)
        };
        let deadline = Instant::now() + Duration::from_secs(40);
        let (mut last, mut same) = (0, 0);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = local();
            same = if now > 0 && now == last { same + 1 } else { 0 };
            if same == 4 {
                return now;
            }
            last = now;
            assert!(Instant::now() < deadline, "{} did not settle", what());
        }
    }

    /// Everything the store's mount daemons logged (`$STORE/logs`).
    pub fn daemon_log(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(self.store.path().join("logs")) {
            for e in dir.flatten() {
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        // Image servers' logs (root's mounts, lazy ones too, stand on them).
        if let Ok(dir) = std::fs::read_dir(self.store.path().join("shared")) {
            for e in dir.flatten() {
                out.push_str(&std::fs::read_to_string(e.path().join("log")).unwrap_or_default());
            }
        }
        out
    }

    /// Mounts via the CLI (background daemon); the guard unmounts.
    pub fn mount(&self, reference: &str) -> MountGuard {
        self.mount_with(reference, &[])
    }

    /// [`Bux::mount`] with more arguments.
    pub fn mount_with(&self, reference: &str, extra: &[&str]) -> MountGuard {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("root");
        let mut args = vec!["mount", reference, mnt.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.ok(&args);
        MountGuard {
            bin: env!("CARGO_BIN_EXE_bux-fuse"),
            path: mnt,
            _dir: dir,
        }
    }
}

/// Processes whose command line has `word` and the store path `store`, with their arguments.
#[allow(dead_code)]
fn processes_of(store: &Path, word: &[u8]) -> Vec<(u32, Vec<Vec<u8>>)> {
    let needle = store.as_os_str().as_encoded_bytes().to_vec();
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(c) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<Vec<u8>> = c.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
        if args.iter().any(|a| a == word) && args.contains(&needle) {
            out.push((pid, args));
        }
    }
    out
}

/// Processes of image servers (`serve-shared`: supervisors and workers) using the store at
/// `store`, and whether each is a worker.
#[allow(dead_code)]
pub fn image_servers(store: &Path) -> Vec<(u32, bool)> {
    processes_of(store, b"serve-shared")
        .into_iter()
        .map(|(pid, args)| (pid, args.iter().any(|a| a == b"--worker-fd")))
        .collect()
}

/// Workers serving kept mounts (`serve-mount`: a user's, and root's lazy ones) from the store
/// at `store`.
#[allow(dead_code)]
pub fn mount_workers(store: &Path) -> Vec<u32> {
    processes_of(store, b"serve-mount")
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// Waits at most `secs` seconds for `done`, failing the test with `what` past them.
pub fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits (at most 20 s) until `store`'s mount workers are `n`, none of them in `old`.
#[allow(dead_code)]
pub fn replaced_workers(store: &std::path::Path, old: &[u32], n: usize) -> Vec<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = mount_workers(store);
        if now.len() == n && now.iter().all(|p| !old.contains(p)) {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "workers not replaced: {now:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[allow(dead_code)]
pub fn kill9(pid: u32) {
    // SAFETY: signals a worker the test found.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// A tmpfs mounted at a directory (a small filesystem to fill), unmounted when dropped.
#[allow(dead_code)]
pub struct Tmpfs(PathBuf);

#[allow(dead_code)]
impl Tmpfs {
    /// Mounts a tmpfs with options `opts` at `dir` (made if missing).
    pub fn mount(dir: &Path, opts: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let t = Tmpfs(dir.to_path_buf());
        t.options(opts);
        t
    }

    /// Mounts it again with options `opts` (`remount,size=…`).
    pub fn options(&self, opts: &str) {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&self.0)
            .output()
            .unwrap();
        assert_success(&out);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

pub struct MountGuard {
    bin: &'static str,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl MountGuard {
    /// Takes charge of a mount made at `path` (inside `dir`).
    pub fn adopt(path: PathBuf, dir: tempfile::TempDir) -> MountGuard {
        MountGuard {
            bin: env!("CARGO_BIN_EXE_bux-fuse"),
            path,
            _dir: dir,
        }
    }
}

/// A read-only loop mount of an EROFS image file (root only); unmounted when dropped.
pub struct LoopMount(pub PathBuf);

impl LoopMount {
    pub fn erofs(image: &Path, at: &Path) -> LoopMount {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "erofs", "-o", "loop,ro"])
            .arg(image)
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t erofs {}: {out:?}",
            image.display()
        );
        LoopMount(at.to_path_buf())
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new(self.bin)
            .arg("umount")
            .arg(&self.path)
            .status();
        // Give the daemon a moment to notice, tear down and exit before the directory goes.
        for _ in 0..100 {
            if !is_mounted(&self.path) && !daemon_alive(&self.path) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether a mount daemon for `path` still runs (it cleans up after the unmount).
fn daemon_alive(path: &Path) -> bool {
    daemon_pid(path).is_some()
}

/// The pid of the daemon serving the mount at `path` (found by its command line).
pub fn daemon_pid(path: &Path) -> Option<u32> {
    let needle = path.as_os_str().as_encoded_bytes().to_vec();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let c = std::fs::read(p.path().join("cmdline")).ok()?;
        let ours = c.split(|&b| b == 0).any(|a| a == needle.as_slice())
            && c.windows(12).any(|w| w == b"notify-ready");
        ours.then(|| p.file_name().to_string_lossy().parse().ok())?
    })
}

/// Kills the daemon serving `path` with SIGKILL and gives the kernel a moment.
pub fn kill_daemon(path: &Path) {
    let pid = daemon_pid(path).unwrap_or_else(|| panic!("no daemon for {}", path.display()));
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
}

pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

// ----------------------------------------------------------------------------------------------
// Raw pushes (artifacts and broken manifests that skopeo would not copy)

/// Pushes blobs and a manifest of any media type straight through the registry API.
pub fn raw_push(
    reg: &Registry,
    repo: &str,
    tag: &str,
    blobs: &[Vec<u8>],
    manifest: &[u8],
    media_type: &str,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    bux_fuse::registry::install_crypto_provider(); // oci-client is built without one
    rt.block_on(async {
        let client = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        });
        let reference: oci_client::Reference =
            format!("{}/{repo}:{tag}", reg.host()).parse().unwrap();
        client
            .store_auth_if_needed(
                reference.resolve_registry(),
                &oci_client::secrets::RegistryAuth::Anonymous,
            )
            .await;
        for b in blobs {
            client
                .push_blob(&reference, b.clone(), &format!("sha256:{}", sha256_hex(b)))
                .await
                .unwrap();
        }
        let ct: http::HeaderValue = media_type.parse().unwrap();
        client
            .push_manifest_raw(&reference, manifest.to_vec(), ct)
            .await
            .unwrap();
    });
}

// ----------------------------------------------------------------------------------------------
// An ordinary user (tests run as root)

/// Runs bux-fuse as an unprivileged user that the test creates, with a store of its own.
pub struct AsUser {
    pub name: &'static str,
    pub uid: u32,
    /// Holds a copy of the binary and the user's store, both reachable by the user.
    pub dir: tempfile::TempDir,
}

impl AsUser {
    /// The user `buxfuse-test` (created if missing). `/dev/fuse` is made mode 0666, as udev's
    /// default rules make it on hosts that run udev (these machines do not).
    pub fn new() -> AsUser {
        use std::os::unix::fs::PermissionsExt;
        let name = "buxfuse-test";
        {
            // One creator at a time: tests run in parallel.
            use std::os::fd::AsRawFd;
            let lock = std::fs::File::create("/tmp/buxfuse-test-user.lock").unwrap();
            // SAFETY: flock on an open descriptor; released when `lock` closes.
            unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
            if !Command::new("id")
                .arg(name)
                .output()
                .unwrap()
                .status
                .success()
            {
                let st = Command::new("useradd")
                    .args(["--no-create-home", "--shell", "/bin/sh", name])
                    .status()
                    .unwrap();
                assert!(st.success(), "useradd {name}");
            }
        }
        let out = Command::new("id").args(["-u", name]).output().unwrap();
        assert!(out.status.success(), "no user {name}");
        let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        copy_executable(env!("CARGO_BIN_EXE_bux-fuse"), dir.path().join("bux-fuse"));
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(uid), Some(uid)).unwrap();
        AsUser { name, uid, dir }
    }

    /// The user's home (its store lives under it, in the XDG default place).
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn bin(&self) -> PathBuf {
        self.dir.path().join("bux-fuse")
    }

    /// A shell command as the user, in its home, with `$BUX` the binary.
    fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", self.name, "--", "env", "-i"])
            .arg(format!("HOME={}", self.home().display()))
            .arg(format!("BUX={}", self.bin().display()))
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .args(["sh", "-c"])
            .arg(format!("cd \"$HOME\" && {script}"));
        cmd
    }

    /// A shell command run as the user, in its home, with `$BUX` the binary.
    pub fn sh(&self, script: &str) -> Output {
        self.command(script).stdin(Stdio::null()).output().unwrap()
    }

    /// A shell command started as the user (as [`AsUser::sh`]), stdin and stdout piped.
    #[allow(dead_code)]
    pub fn spawn(&self, script: &str) -> std::process::Child {
        self.command(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Like [`AsUser::sh`], asserting success; returns stdout.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "as {}: {script}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        // Whatever the user left mounted under its home goes with it.
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let home = self.home();
        let mut mounts: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
            .filter(|p| p.starts_with(&home))
            .collect();
        mounts.reverse();
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}
