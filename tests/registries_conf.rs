//! registries.conf as podman reads it, against real registries on 127.0.0.1: a prefix sent to
//! another location, mirrors asked first (by `pull-from-mirror`), a blocked registry, short
//! names by alias and by search registries (permissive and enforcing), drop-ins, and `info`.

mod common;

use std::process::Output;

use common::*;

fn image(marker: &str) -> Image {
    let layer = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/marker", marker.as_bytes())
        .finish();
    Image::new(vec![(layer, Comp::Gzip)])
}

/// Pushes `image(marker)` to `reg` as `repo:v1`; returns its manifest digest.
fn push(reg: &Registry, repo: &str, marker: &str) -> String {
    let work = tempfile::tempdir().unwrap();
    write_layout(work.path(), "v1", &image(marker));
    reg.push(work.path(), "v1", repo, None);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A store and a home whose registries.conf is `conf` (plus drop-ins in the user's
/// `registries.conf.d`).
struct Host {
    bux: Bux,
    home: tempfile::TempDir,
}

impl Host {
    fn new(conf: &str, drop_ins: &[(&str, &str)]) -> Host {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("registries.conf"), conf).unwrap();
        let dir = home.path().join(".config/containers/registries.conf.d");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in drop_ins {
            std::fs::write(dir.join(name), text).unwrap();
        }
        Host {
            bux: Bux::new(),
            home,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.bux
            .cmd()
            .env("HOME", self.home.path())
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.home.path().join("registries.conf"),
            )
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_success(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Mounts `reference` and returns what its /etc/marker says.
    fn marker(&self, reference: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("m");
        self.ok(&["mount", "--pull", "never", reference, mnt.to_str().unwrap()]);
        let _guard = MountGuard::adopt(mnt.clone(), dir);
        std::fs::read_to_string(mnt.join("etc/marker")).unwrap()
    }
}

#[test]
fn a_prefix_goes_to_its_location_and_mirrors_come_first() {
    let origin = Registry::start();
    let mirror = Registry::start();
    push(&origin, "real/app", "origin");
    let digest = push(&mirror, "mirrored/app", "mirror");
    let conf = format!(
        r#"
[[registry]]
prefix = "example.test/app"
location = "{origin}/real/app"

[[registry]]
prefix = "example.test/m"
location = "{origin}/nothing/here"
[[registry.mirror]]
location = "{mirror}/mirrored"

[[registry]]
prefix = "example.test/d"
location = "{origin}/nothing/here"
[[registry.mirror]]
location = "{mirror}/mirrored"
pull-from-mirror = "digest-only"

[[registry]]
prefix = "example.test/blocked"
location = "{origin}/real"
blocked = true
"#,
        origin = origin.host(),
        mirror = mirror.host()
    );
    let host = Host::new(&conf, &[]);
    // Stored under the name asked for; fetched from where registries.conf sends it.
    host.ok(&["pull", "-q", "example.test/app:v1"]);
    assert_eq!(host.ok(&["images", "-q"]).trim(), "example.test/app:v1");
    assert_eq!(host.marker("example.test/app:v1"), "origin");
    // The mirror is asked first, for the tag too; the registry itself has nothing there.
    host.ok(&["pull", "-q", "example.test/m/app:v1"]);
    assert_eq!(host.marker("example.test/m/app:v1"), "mirror");
    // A digest-only mirror is not asked for a tag...
    let err = host.fails(&["pull", "-q", "example.test/d/app:v1"]);
    assert!(err.contains("not found"), "{err}");
    // ...and is for a digest.
    let by_digest = format!("example.test/d/app@{digest}");
    host.ok(&["pull", "-q", &by_digest]);
    assert_eq!(host.marker(&by_digest), "mirror");
    // Blocked: refused in one line, nothing stored.
    let before = host.ok(&["images", "-q"]);
    let err = host.fails(&["pull", "-q", "example.test/blocked/app:v1"]);
    assert!(
        err.contains("blocked") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert_eq!(host.ok(&["images", "-q"]), before);
    let route = host.ok(&["info", "example.test/m/app:v1"]);
    assert!(
        route.contains(&format!(
            "pulled from {}/mirrored/app:v1, then {}/nothing/here/app:v1",
            mirror.host(),
            origin.host()
        )),
        "{route}"
    );
    let info = host.ok(&["info"]);
    assert!(
        info.contains("registry example.test/m ->")
            && info.contains("mirror ")
            && info.contains("blocked"),
        "{info}"
    );
}

#[test]
fn short_names_resolve_as_podman_resolves_them() {
    let first = Registry::start();
    let second = Registry::start();
    push(&second, "team/app", "second");
    push(&first, "team/tool", "first");
    // Permissive: each search registry in turn; an alias wins over the search; a drop-in in
    // the user's directory sets the mode.
    let conf = format!(
        "unqualified-search-registries = [\"{}\", \"{}\"]\n[aliases]\n\"tool\" = \"{}/team/tool\"\n",
        first.host(),
        second.host(),
        first.host()
    );
    let host = Host::new(
        &conf,
        &[("50-mode.conf", "short-name-mode = \"permissive\"\n")],
    );
    host.ok(&["pull", "-q", "team/app:v1"]);
    let want = format!("{}/team/app:v1", second.host());
    assert_eq!(host.ok(&["images", "-q"]).trim(), want);
    assert_eq!(host.marker(&want), "second");
    host.ok(&["pull", "-q", "tool:v1"]);
    assert_eq!(
        host.marker(&format!("{}/team/tool:v1", first.host())),
        "first"
    );
    // Enforcing (the default) with two search registries and no alias: refused, naming both.
    let strict = Host::new(&conf, &[]);
    let err = strict.fails(&["pull", "-q", "team/app:v1"]);
    assert!(
        err.contains("ambiguous") && err.contains(&first.host()),
        "{err}"
    );
    // One search registry: it.
    let one = Host::new(
        &format!("unqualified-search-registries = [\"{}\"]\n", second.host()),
        &[],
    );
    one.ok(&["pull", "-q", "team/app:v1"]);
    assert_eq!(one.ok(&["images", "-q"]).trim(), want);
    // Not short names: a layout named by a path without a slash, another transport.
    let work = tempfile::tempdir().unwrap();
    write_layout(&work.path().join("lay"), "v1", &image("layout"));
    let out = strict
        .bux
        .cmd()
        .env("HOME", strict.home.path())
        .env(
            "CONTAINERS_REGISTRIES_CONF",
            strict.home.path().join("registries.conf"),
        )
        .current_dir(work.path())
        .args(["pull", "-q", "oci:lay:v1"])
        .output()
        .unwrap();
    assert_success(&out);
    let err = strict.fails(&["pull", "-q", "containers-storage:app"]);
    assert!(err.contains("transport is not supported"), "{err}");
    // A broken file: one line naming it.
    let broken = Host::new("unqualified-search-registries = 3\n", &[]);
    let err = broken.fails(&["pull", "-q", "team/app:v1"]);
    assert!(
        err.contains("registries.conf") && err.trim().lines().count() == 1,
        "{err}"
    );
}
