//! `examples/runtime.rs`, a VM runtime's use of the library start to end (spawned pulls,
//! matched errors, the image config, two VMs, recovery after `kill -9`, cleanup), run against
//! the test registry as root and as an ordinary user.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn example() -> PathBuf {
    built("runtime")
}

fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        exe.exists(),
        "build the example first (cargo build --examples): {}",
        exe.display()
    );
    exe
}

fn image() -> Image {
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", b"ID=runtime-example\n")
        .finish();
    let mut img = Image::new(vec![(base, Comp::Gzip)]);
    img.config = serde_json::json!({
        "Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "Env": ["A=1"], "WorkingDir": "/srv"
    });
    img
}

fn check(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "ok: pulled",
        "not found, not retried",
        "transient, gave up after 3 tries",
        "ok: exec [\"/bin/app\", \"--serve\"] env [\"A=1\"] workdir \"/srv\"",
        "ok: two roots",
        "ok: recovered",
        "ok: unmounted all",
    ] {
        assert!(stdout.contains(step), "no {step:?} in:\n{stdout}");
    }
    eprintln!("{stdout}");
    stdout
}

#[test]
fn as_root() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(work.path(), "v1", &image());
    reg.push(work.path(), "v1", "rt/img", None);
    let dirs = tempfile::tempdir().unwrap();
    let out = Command::new(example())
        .arg(dirs.path().join("store"))
        .arg(dirs.path().join("vms"))
        .arg(format!("{}/rt/img:v1", reg.host()))
        .arg(format!("{}/rt/absent:v1", reg.host()))
        .output()
        .unwrap();
    let said = check(&out);
    assert!(said.contains("(read-only, shared server)"), "{said}");
    assert!(
        !is_mounted(&dirs.path().join("vms/vm3")),
        "the example left a mount"
    );
}

#[test]
fn as_an_ordinary_user() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(work.path(), "v1", &image());
    reg.push(work.path(), "v1", "rt/img", None);
    let user = AsUser::new();
    let exe = user.dir.path().join("runtime");
    copy_executable(example(), &exe);
    let out = user.sh(&format!(
        "{} \"$HOME/store\" \"$HOME/vms\" {}/rt/img:v1 {}/rt/absent:v1",
        exe.display(),
        reg.host(),
        reg.host()
    ));
    check(&out);
}

/// The adapters of a3s-box's `ImageRegistry` and bux's `bux-oci` over the library, run.
#[test]
fn the_adapters_run() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    write_layout(work.path(), "v1", &image());
    reg.push(work.path(), "v1", "rt/img", None);
    let reference = format!("{}/rt/img:v1", reg.host());
    let dirs = tempfile::tempdir().unwrap();
    let out = Command::new(built("a3s_box_registry"))
        .arg(dirs.path().join("a3s"))
        .arg(dirs.path().join("mounts"))
        .arg(&reference)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("cached: true") && said.contains("removed: true"),
        "{said}"
    );
    let out = Command::new(built("bux_oci"))
        .arg(dirs.path().join("oci"))
        .arg(&reference)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("entrypoint: Some([\"/bin/app\"])"), "{said}");
    assert!(!is_mounted(&dirs.path().join("mounts")));
}
