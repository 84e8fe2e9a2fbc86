//! Local image sources beside registries: an OCI image layout directory and a docker-archive
//! tarball (written by skopeo, as `docker save` would) pull, index and mount like a registry image.

mod common;

use std::process::Command;

use common::*;

fn image() -> Image {
    let l1 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/hello", b"from a local source\n")
        .finish();
    let l2 = LayerBuilder::new()
        .whiteout("etc", "gone")
        .file("data.bin", &test_bytes(2 << 20, 4))
        .finish();
    Image::new(vec![(l1, Comp::Gzip), (l2, Comp::Zstd)])
}

#[test]
fn oci_layout_directory() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, "v1", &image());
    let bux = Bux::new();
    let r = format!("oci:{}:v1", layout.display());
    bux.ok(&["pull", "-q", &r]);
    let images = bux.ok(&["images"]);
    assert!(images.contains(&r), "{images}");
    let m = bux.mount(&r);
    assert_eq!(
        std::fs::read(m.path.join("etc/hello")).unwrap(),
        b"from a local source\n"
    );
    assert_eq!(
        std::fs::read(m.path.join("data.bin")).unwrap(),
        test_bytes(2 << 20, 4)
    );
    drop(m);
    // A layout with a single image needs no tag; a missing tag is a clear error.
    bux.ok(&["pull", "-q", &format!("oci:{}", layout.display())]);
    let err = bux.fails(&["pull", &format!("oci:{}:nope", layout.display())]);
    assert!(err.contains("no manifest tagged \"nope\""), "{err}");
    let err = bux.fails(&["pull", &format!("oci:{}/missing", work.path().display())]);
    assert!(err.contains("not an OCI image layout"), "{err}");
}

#[test]
fn docker_archive_tarball() {
    need("skopeo");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, "v1", &image().as_gzip()); // docker-archive holds no zstd
    let archive = work.path().join("image.tar");
    let st = Command::new("skopeo")
        .args([
            "copy",
            &format!("oci:{}:v1", layout.display()),
            &format!("docker-archive:{}:example/app:v1", archive.display()),
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let bux = Bux::new();
    for r in [
        format!("docker-archive:{}", archive.display()),
        format!("docker-archive:{}:example/app:v1", archive.display()),
    ] {
        let m = bux.mount(&r);
        assert_eq!(
            std::fs::read(m.path.join("etc/hello")).unwrap(),
            b"from a local source\n"
        );
        assert_eq!(
            std::fs::read(m.path.join("data.bin")).unwrap(),
            test_bytes(2 << 20, 4)
        );
    }
    let err = bux.fails(&[
        "pull",
        &format!("docker-archive:{}:other:tag", archive.display()),
    ]);
    assert!(err.contains("no image tagged"), "{err}");
}

/// The transport names skopeo users type: `docker://REF` is the registry reference REF (stored
/// under its plain name), `oci:` and `docker-archive:` are read, and an archive kind bux-fuse
/// does not read (`oci-archive:`) is one clear line naming those it does, not a reference
/// with a `:latest` the user never typed.
#[test]
fn skopeo_transport_names() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, "v1", &image());
    reg.push(&layout, "v1", "t/skopeo", None);
    let plain = format!("{}/t/skopeo:v1", reg.host());
    let bux = Bux::new();
    let out = bux.ok(&["pull", &format!("docker://{plain}")]);
    assert!(out.starts_with(&format!("{plain} sha256:")), "{out}");
    assert_eq!(bux.ok(&["images", "-q"]), format!("{plain}\n"));
    let m = bux.mount(&format!("docker://{plain}"));
    assert_eq!(
        std::fs::read(m.path.join("etc/hello")).unwrap(),
        b"from a local source\n"
    );
    drop(m);
    bux.ok(&["rm", &format!("docker://{plain}")]);

    let tar = work.path().join("image.tar");
    std::fs::write(&tar, b"not read").unwrap();
    for (what, kind) in [
        (format!("oci-archive:{}", tar.display()), "oci-archive"),
        (format!("oci-archive:{}:v1", tar.display()), "oci-archive"),
        (
            "containers-storage:debian".to_string(),
            "containers-storage",
        ),
        (format!("dir:{}", layout.display()), "dir"),
    ] {
        let err = bux.fails(&["pull", &what]);
        assert!(
            err.lines().count() == 1
                && err.contains(&format!("{kind}:"))
                && err.contains("not supported")
                && err.contains("docker://")
                && err.contains("oci:")
                && err.contains("docker-archive:")
                && !err.contains("latest"),
            "{what}: {err}"
        );
    }
    // docker:// needs the two slashes skopeo writes; what follows is a reference.
    let err = bux.fails(&["pull", "docker://"]);
    assert!(err.lines().count() == 1, "{err}");
}
