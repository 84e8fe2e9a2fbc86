//! Signature policy (`containers-policy.json(5)`) end to end: images pushed to Debian's
//! docker-registry on 127.0.0.1, signed with P-256 keys made here by `openssl` and published in
//! cosign's format (the `sha256-<hex>.sig` tag, and as an OCI referrer through the referrers
//! tag schema, which is what docker-registry 2.8 offers), pulled and mounted by the CLI under
//! policies written here. Every refusal must leave the store without blobs or image records.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use serde_json::json;

use common::*;

const SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const SIG_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const COSIGN_ARTIFACT: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

struct Fixture {
    reg: Registry,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        need("openssl");
        Fixture {
            reg: Registry::start(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn host(&self) -> String {
        self.reg.host()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A P-256 key pair (as `cosign generate-key-pair` makes: the public half is a PEM
    /// "PUBLIC KEY"): the private key's path and the public key's.
    fn keypair(&self, name: &str) -> (PathBuf, PathBuf) {
        let private = self.path(&format!("{name}.key"));
        let public = self.path(&format!("{name}.pub"));
        let out = Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&private)
            .output()
            .unwrap();
        assert_success(&out);
        let out = Command::new("openssl")
            .args(["ec", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .output()
            .unwrap();
        assert_success(&out);
        (private, public)
    }

    /// Pushes a one-layer image (its content made unique by `seed`) as `repo:tag`; returns its
    /// manifest digest.
    fn image(&self, repo: &str, tag: &str, seed: &str) -> String {
        let layout = self.path(&format!("layout-{repo}-{tag}"));
        let img = image(seed, "amd64");
        let desc = write_layout(&layout, tag, &img);
        self.reg.push(&layout, tag, repo, None);
        desc["digest"].as_str().unwrap().to_string()
    }

    /// Writes a policy file; returns its path.
    fn policy(&self, name: &str, policy: serde_json::Value) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, serde_json::to_vec_pretty(&policy).unwrap()).unwrap();
        p
    }
}

fn image(seed: &str, arch: &str) -> Image {
    let tar = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/seed", seed.as_bytes())
        .file("etc/os-release", b"ID=signed\n")
        .finish();
    let mut img = Image::new(vec![(tar, Comp::Gzip)]);
    img.arch = arch.into();
    img
}

/// A cosign payload ("simple signing" JSON) for `identity` and `digest`.
fn payload(identity: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "critical": {
            "identity": {"docker-reference": identity},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature"
        },
        "optional": null
    }))
    .unwrap()
}

/// `openssl dgst -sha256 -sign`: ECDSA P-256 SHA-256, ASN.1 DER, in base64.
fn sign(key: &Path, data: &[u8]) -> String {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), data).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg(f.path())
        .output()
        .unwrap();
    assert_success(&out);
    base64::engine::general_purpose::STANDARD.encode(out.stdout)
}

/// cosign's signature manifest: an image whose layers are payloads, each annotated with its
/// signature; returns (blobs, manifest bytes).
fn signature_manifest(
    sigs: &[(Vec<u8>, String)],
    referrer_of: Option<&str>,
) -> (Vec<Vec<u8>>, Vec<u8>) {
    let layers: Vec<_> = sigs
        .iter()
        .map(|(p, s)| {
            json!({
                "mediaType": SIMPLESIGNING,
                "digest": format!("sha256:{}", sha256_hex(p)),
                "size": p.len(),
                "annotations": {SIG_ANNOTATION: s}
            })
        })
        .collect();
    let mut blobs: Vec<Vec<u8>> = sigs.iter().map(|(p, _)| p.clone()).collect();
    let manifest = match referrer_of {
        None => {
            let config = serde_json::to_vec(&json!({
                "architecture": "", "os": "", "config": {},
                "rootfs": {"type": "layers", "diff_ids":
                    sigs.iter().map(|(p, _)| format!("sha256:{}", sha256_hex(p))).collect::<Vec<_>>()}
            }))
            .unwrap();
            let m = json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
                "layers": layers
            });
            blobs.push(config);
            m
        }
        Some(subject) => {
            blobs.push(b"{}".to_vec());
            json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": COSIGN_ARTIFACT,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                    "digest": format!("sha256:{}", sha256_hex(b"{}")), "size": 2},
                "layers": layers,
                "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1}
            })
        }
    };
    (blobs, serde_json::to_vec(&manifest).unwrap())
}

/// Publishes signatures of `subject` under cosign's tag `sha256-<hex>.sig`.
fn publish_tag(reg: &Registry, repo: &str, subject: &str, sigs: &[(Vec<u8>, String)]) {
    let (blobs, manifest) = signature_manifest(sigs, None);
    let tag = format!("{}.sig", subject.replace(':', "-"));
    raw_push(reg, repo, &tag, &blobs, &manifest, OCI_MANIFEST);
}

/// Publishes signatures of `subject` as an OCI referrer (`artifactType` cosign's), listed under
/// the referrers tag schema `sha256-<hex>` (docker-registry 2.8 has no referrers API).
fn publish_referrer(reg: &Registry, repo: &str, subject: &str, sigs: &[(Vec<u8>, String)]) {
    let (blobs, manifest) = signature_manifest(sigs, Some(subject));
    raw_push(
        reg,
        repo,
        "cosign-referrer",
        &blobs,
        &manifest,
        OCI_MANIFEST,
    );
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
            "artifactType": COSIGN_ARTIFACT
        }]
    }))
    .unwrap();
    raw_push(
        reg,
        repo,
        &subject.replace(':', "-"),
        &[],
        &index,
        OCI_INDEX,
    );
}

/// Signs `digest` for `identity` with `key` and publishes it under the `.sig` tag of `subject`.
fn sign_and_publish(
    reg: &Registry,
    repo: &str,
    subject: &str,
    identity: &str,
    digest: &str,
    key: &Path,
) {
    let p = payload(identity, digest);
    let s = sign(key, &p);
    publish_tag(reg, repo, subject, &[(p, s)]);
}

/// Files the store holds besides its locks: what a refused pull must not have left.
fn stored_files(bux: &Bux) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == "locks" {
                continue;
            }
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(bux.store.path(), bux.store.path(), &mut out);
    out
}

/// Asserts a refused pull left nothing: no blobs, no image record.
fn assert_nothing_stored(bux: &Bux) {
    let files = stored_files(bux);
    assert!(files.is_empty(), "a refused image left {files:?}");
    assert_eq!(bux.ok(&["images", "-q"]).trim(), "");
}

/// `pull` under `policy`, expected to fail; returns its one line of stderr.
fn refused(bux: &Bux, reference: &str, policy: &Path) -> String {
    let err = bux.fails(&[
        "-q",
        "pull",
        "--signature-policy",
        policy.to_str().unwrap(),
        reference,
    ]);
    let err = err.trim().to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err
}

fn pull_ok(bux: &Bux, reference: &str, policy: &Path) {
    bux.ok(&[
        "-q",
        "pull",
        "--signature-policy",
        policy.to_str().unwrap(),
        reference,
    ]);
}

/// `{"default": [reject], "transports": {"docker": {scope: [sigstoreSigned keyPath]}}}`.
fn signed_by(scope: &str, key: &Path) -> serde_json::Value {
    json!({
        "default": [{"type": "reject"}],
        "transports": {"docker": {scope: [{"type": "sigstoreSigned", "keyPath": key}]}}
    })
}

#[test]
fn signed_image_is_accepted_and_unsigned_or_badly_signed_ones_refused_with_nothing_stored() {
    let f = Fixture::new();
    let host = f.host();
    let (key, public) = f.keypair("a");
    let (other_key, _) = f.keypair("b");
    let policy = f.policy("policy.json", signed_by(&host, &public));

    // Signed (cosign's tag), with the identity the pull names: accepted.
    let signed = f.image("app", "v1", "signed");
    let reference = format!("{host}/app:v1");
    sign_and_publish(&f.reg, "app", &signed, &reference, &signed, &key);
    let bux = Bux::new();
    pull_ok(&bux, &reference, &policy);
    assert!(bux.ok(&["images"]).contains("app"), "not stored");

    // Unsigned: refused, in one line naming the file, the scope and the rule.
    let unsigned = f.image("unsigned", "v1", "unsigned");
    let bux = Bux::new();
    let err = refused(&bux, &format!("{host}/unsigned:v1"), &policy);
    assert!(
        err.contains(&format!(
            "{host}/unsigned:v1: rejected by signature policy {} (scope \"{host}\": sigstoreSigned: no signature",
            policy.display()
        )),
        "{err}"
    );
    assert!(err.contains(&unsigned), "{err}");
    assert_nothing_stored(&bux);

    // Signed by another key.
    let d = f.image("other-key", "v1", "other key");
    let r = format!("{host}/other-key:v1");
    sign_and_publish(&f.reg, "other-key", &d, &r, &d, &other_key);
    let err = refused(&bux, &r, &policy);
    assert!(
        err.contains(&format!("does not verify with key {}", public.display())),
        "{err}"
    );
    assert_nothing_stored(&bux);

    // A valid signature, but of another digest, published under this image's tag.
    let d = f.image("other-digest", "v1", "other digest");
    let r = format!("{host}/other-digest:v1");
    sign_and_publish(&f.reg, "other-digest", &d, &r, &signed, &key);
    let err = refused(&bux, &r, &policy);
    assert!(
        err.contains(&format!("is for digest {signed}, not {d}")),
        "{err}"
    );
    assert_nothing_stored(&bux);

    // A valid signature of this digest, for another identity (the default signedIdentity,
    // matchRepoDigestOrExact, wants exactly the tag pulled).
    let d = f.image("identity", "v1", "identity");
    let r = format!("{host}/identity:v1");
    sign_and_publish(
        &f.reg,
        "identity",
        &d,
        &format!("{host}/identity:v2"),
        &d,
        &key,
    );
    let err = refused(&bux, &r, &policy);
    assert!(err.contains("is for identity"), "{err}");
    assert!(err.contains("matchRepoDigestOrExact"), "{err}");
    assert_nothing_stored(&bux);

    // The typed error of the library: PolicyRejected, not transient.
    let store = bux_fuse::Store::open(bux.store.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = bux_fuse::PullOptions {
        signature_policy: bux_fuse::SignaturePolicy::File(policy.clone()),
        ..Default::default()
    };
    let e = rt
        .block_on(store.pull(&format!("{host}/unsigned:v1"), &opts))
        .unwrap_err();
    assert!(
        matches!(e.inner(), bux_fuse::Error::PolicyRejected { .. }),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert_nothing_stored(&bux);
}

#[test]
fn tampered_payloads_are_refused() {
    let f = Fixture::new();
    let host = f.host();
    let (key, public) = f.keypair("a");
    let policy = f.policy("policy.json", signed_by(&host, &public));
    let bux = Bux::new();

    // The payload changed after signing (another identity put in), the signature kept.
    let d = f.image("edited", "v1", "edited");
    let r = format!("{host}/edited:v1");
    let signed = payload(&format!("{host}/elsewhere:v1"), &d);
    let sig = sign(&key, &signed);
    publish_tag(&f.reg, "edited", &d, &[(payload(&r, &d), sig)]);
    let err = refused(&bux, &r, &policy);
    assert!(err.contains("does not verify with key"), "{err}");
    assert_nothing_stored(&bux);

    // A good signature whose payload blob the registry then serves altered (its digest no
    // longer matches the one the signature manifest names).
    let d = f.image("swapped", "v1", "swapped");
    let r = format!("{host}/swapped:v1");
    let p = payload(&r, &d);
    let sig = sign(&key, &p);
    publish_tag(&f.reg, "swapped", &d, &[(p.clone(), sig)]);
    // Accepted as published...
    pull_ok(&Bux::new(), &r, &policy);
    // ...refused once the registry's copy of the payload is altered.
    let mut altered = p.clone();
    let at = altered.len() - 3;
    altered[at] ^= 1;
    std::fs::write(f.reg.blob_data_path(&sha256_hex(&p)), &altered).unwrap();
    let err = refused(&bux, &r, &policy);
    assert!(err.contains("does not match its digest"), "{err}");
    assert_nothing_stored(&bux);
}

#[test]
fn referrers_indexes_and_signed_identities() {
    let f = Fixture::new();
    let host = f.host();
    let (key, public) = f.keypair("a");
    let policy = f.policy("policy.json", signed_by(&host, &public));

    // docker-registry 2.8 has no referrers API: a 404, so clients use the tag schema.
    let d = f.image("referred", "v1", "referred");
    let api = http_get(f.reg.port, &format!("/v2/referred/referrers/{d}"));
    assert!(api.starts_with("HTTP/1.1 404"), "{api}");
    let r = format!("{host}/referred:v1");
    let p = payload(&r, &d);
    let s = sign(&key, &p);
    let bux = Bux::new();
    refused(&bux, &r, &policy);
    publish_referrer(&f.reg, "referred", &d, &[(p, s)]);
    pull_ok(&bux, &r, &policy);

    // A multi-platform index: cosign signs what it is given. The index's digest signed...
    let layout = f.path("multi");
    write_multiarch_layout(
        &layout,
        "v1",
        &[&image("m amd64", "amd64"), &image("m arm64", "arm64")],
    );
    f.reg.push(&layout, "v1", "multi", None);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let index_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let r = format!("{host}/multi:v1");
    let bux = Bux::new();
    refused(&bux, &r, &policy);
    assert_nothing_stored(&bux);
    sign_and_publish(&f.reg, "multi", &index_digest, &r, &index_digest, &key);
    pull_ok(&bux, &r, &policy);
    // ...or only the platform's manifest (another tag of the same index, to start unsigned).
    f.reg.push(&layout, "v1", "multi2", None);
    let blob = std::fs::read(
        layout
            .join("blobs/sha256")
            .join(index_digest.strip_prefix("sha256:").unwrap()),
    )
    .unwrap();
    let idx: serde_json::Value = serde_json::from_slice(&blob).unwrap();
    let amd64 = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "amd64")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let r2 = format!("{host}/multi2:v1");
    let bux = Bux::new();
    sign_and_publish(&f.reg, "multi2", &amd64, &r2, &amd64, &key);
    pull_ok(&bux, &r2, &policy);
    // (The other platform's manifest is not signed: refused.)
    let err = bux.fails(&[
        "-q",
        "pull",
        "--pull",
        "always",
        "--platform",
        "linux/arm64",
        "--signature-policy",
        policy.to_str().unwrap(),
        &r2,
    ]);
    assert!(err.contains("rejected by signature policy"), "{err}");

    // cosign's own identity is the repository, no tag: refused by the default signedIdentity,
    // accepted by matchRepository (what containers-policy.json(5) advises for cosign).
    let d = f.image("repo-id", "v1", "repo identity");
    let r = format!("{host}/repo-id:v1");
    sign_and_publish(&f.reg, "repo-id", &d, &format!("{host}/repo-id"), &d, &key);
    let bux = Bux::new();
    let err = refused(&bux, &r, &policy);
    assert!(err.contains("is for identity"), "{err}");
    let by_repo = f.policy(
        "by-repo.json",
        json!({"default": [{"type": "reject"}], "transports": {"docker": {&host: [{
            "type": "sigstoreSigned", "keyData": base64::engine::general_purpose::STANDARD.encode(std::fs::read(&public).unwrap()),
            "signedIdentity": {"type": "matchRepository"}}]}}}),
    );
    pull_ok(&bux, &r, &by_repo);
    // By digest, matchRepoDigestOrExact accepts a signature of the repository's any tag.
    let bux = Bux::new();
    let d = f.image("by-digest", "v1", "by digest");
    sign_and_publish(
        &f.reg,
        "by-digest",
        &d,
        &format!("{host}/by-digest:whatever"),
        &d,
        &key,
    );
    pull_ok(&bux, &format!("{host}/by-digest@{d}"), &policy);
    refused(&Bux::new(), &format!("{host}/by-digest:v1"), &policy);
}

#[test]
fn scopes_most_specific_wins_and_reject_default() {
    let f = Fixture::new();
    let host = f.host();
    let (key, public) = f.keypair("a");
    f.image("open", "v1", "open");
    f.image("closed", "v1", "closed");
    let signed = f.image("app", "v1", "app v1");
    sign_and_publish(
        &f.reg,
        "app",
        &signed,
        &format!("{host}/app:v1"),
        &signed,
        &key,
    );
    f.image("app", "v2", "app v2");
    f.image("app", "v3", "app v3");

    // `reject` by default, one repository open.
    let policy = f.policy(
        "open.json",
        json!({"default": [{"type": "reject"}],
               "transports": {"docker": {format!("{host}/open"): [{"type": "insecureAcceptAnything"}]}}}),
    );
    let bux = Bux::new();
    pull_ok(&bux, &format!("{host}/open:v1"), &policy);
    let bux = Bux::new();
    let err = refused(&bux, &format!("{host}/closed:v1"), &policy);
    assert!(
        err.ends_with(&format!(
            "rejected by signature policy {} (default: reject)",
            policy.display()
        )),
        "{err}"
    );
    assert_nothing_stored(&bux);

    // The most specific scope present wins: the tag over the repository over the host.
    let policy = f.policy(
        "nested.json",
        json!({"default": [{"type": "insecureAcceptAnything"}],
        "transports": {"docker": {
            &host: [{"type": "reject"}],
            format!("{host}/app"): [{"type": "sigstoreSigned", "keyPath": public}],
            format!("{host}/app:v2"): [{"type": "insecureAcceptAnything"}],
            format!("{host}/app:v3"): [{"type": "insecureAcceptAnything"}, {"type": "reject"}]
        }}}),
    );
    let bux = Bux::new();
    pull_ok(&bux, &format!("{host}/app:v1"), &policy); // signed, scope host/app
    pull_ok(&bux, &format!("{host}/app:v2"), &policy); // unsigned, its own scope accepts
    let bux = Bux::new();
    let err = refused(&bux, &format!("{host}/open:v1"), &policy);
    assert!(
        err.ends_with(&format!("(scope \"{host}\": reject)")),
        "{err}"
    );
    // Requirements of a scope are ANDed.
    let err = refused(&bux, &format!("{host}/app:v3"), &policy);
    assert!(
        err.ends_with(&format!("(scope \"{host}/app:v3\": reject)")),
        "{err}"
    );
    assert_nothing_stored(&bux);
    // Wildcards: "*.0.0.1" is a parent domain of 127.0.0.1 (the port dropped), as in
    // containers/image; it applies only when nothing more specific does.
    let policy = f.policy(
        "wild.json",
        json!({"default": [{"type": "insecureAcceptAnything"}],
               "transports": {"docker": {"*.0.0.1": [{"type": "reject"}]}}}),
    );
    let err = refused(&bux, &format!("{host}/open:v1"), &policy);
    assert!(err.ends_with("(scope \"*.0.0.1\": reject)"), "{err}");
}

#[test]
fn lazy_mounts_and_push_index() {
    let f = Fixture::new();
    let host = f.host();
    let (key, public) = f.keypair("a");
    let policy = f.policy("policy.json", signed_by(&host, &public));
    let p = policy.to_str().unwrap();
    let signed = f.image("app", "v1", "lazy signed");
    let r = format!("{host}/app:v1");
    sign_and_publish(&f.reg, "app", &signed, &r, &signed, &key);
    f.image("unsigned", "v1", "lazy unsigned");

    // A lazy mount of the signed image serves it.
    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    bux.ok(&[
        "-q",
        "mount",
        "--lazy",
        "--signature-policy",
        p,
        &r,
        mnt.to_str().unwrap(),
    ]);
    let m = MountGuard::adopt(mnt.clone(), dir);
    assert_eq!(std::fs::read(mnt.join("etc/seed")).unwrap(), b"lazy signed");
    drop(m);

    // One of the unsigned one is refused, nothing stored.
    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    let err = bux.fails(&[
        "-q",
        "mount",
        "--lazy",
        "--signature-policy",
        p,
        &format!("{host}/unsigned:v1"),
        mnt.to_str().unwrap(),
    ]);
    assert!(err.contains("rejected by signature policy"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_nothing_stored(&bux);

    // push-index pins the signed image as a new manifest under its tag: no one signed that
    // digest; the signature of the manifest it was made from (its index's subject) holds.
    let publisher = Bux::new();
    pull_ok(&publisher, &r, &policy);
    publisher.ok(&["-q", "push-index", &r]);
    let bux = Bux::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("root");
    bux.ok(&[
        "mount",
        "--lazy",
        "--signature-policy",
        p,
        &r,
        mnt.to_str().unwrap(),
    ]);
    let m = MountGuard::adopt(mnt.clone(), dir);
    assert_eq!(std::fs::read(mnt.join("etc/seed")).unwrap(), b"lazy signed");
    drop(m);
    let pinned = pinned_digest(&f, "app", "v1");
    assert_ne!(pinned, signed, "push-index did not pin a new manifest");

    // A manifest claiming the signed one's index but with other layers is refused, even
    // under the tag the signature names (pushed over the pinned one).
    let other = f.image("app", "other", "forged layers");
    let other_bytes = manifest_bytes(&f, "app", &other);
    let mut forged: serde_json::Value = serde_json::from_slice(&other_bytes).unwrap();
    let pinned_bytes = manifest_bytes(&f, "app", &pinned);
    let pinned_json: serde_json::Value = serde_json::from_slice(&pinned_bytes).unwrap();
    forged["annotations"] = pinned_json["annotations"].clone();
    raw_push(
        &f.reg,
        "app",
        "v1",
        &[],
        &serde_json::to_vec(&forged).unwrap(),
        OCI_MANIFEST,
    );
    let bux = Bux::new();
    let err = refused(&bux, &r, &policy);
    assert!(err.contains("beyond the index annotation"), "{err}");
    assert_nothing_stored(&bux);
}

#[test]
fn policy_files_found_missing_malformed_and_stored_images() {
    let f = Fixture::new();
    let host = f.host();
    let (_, public) = f.keypair("a");
    f.image("app", "v1", "app");
    let r = format!("{host}/app:v1");
    let config = f.path("config");
    std::fs::create_dir_all(config.join("containers")).unwrap();

    // No policy file anywhere (the system's hidden by a tmpfs in a private mount namespace):
    // accepted, as bux-fuse always did.
    let bux = Bux::new();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mkdir -p /etc/containers && mount -t tmpfs none /etc/containers && \
             ! test -e /etc/containers/policy.json && \"$0\" --store \"$1\" -q pull \"$2\"",
        )
        .arg(env!("CARGO_BIN_EXE_bux-fuse"))
        .arg(bux.store.path())
        .arg(&r)
        .env("XDG_CONFIG_HOME", &config)
        .env("DOCKER_CONFIG", f.path("no-docker"))
        .output()
        .unwrap();
    assert_success(&out);
    assert!(bux.ok(&["images"]).contains("app"));

    // $XDG_CONFIG_HOME/containers/policy.json is read first (before /etc's).
    std::fs::write(
        config.join("containers/policy.json"),
        serde_json::to_vec(&signed_by(&host, &public)).unwrap(),
    )
    .unwrap();
    let bux = Bux::new();
    let err = bux
        .cmd()
        .args(["-q", "pull", &r])
        .env("XDG_CONFIG_HOME", &config)
        .output()
        .unwrap();
    assert!(!err.status.success());
    let err = String::from_utf8_lossy(&err.stderr);
    assert!(
        err.contains(&format!(
            "rejected by signature policy {}",
            config.join("containers/policy.json").display()
        )),
        "{err}"
    );
    assert_nothing_stored(&bux);
    // BUX_FUSE_SIGNATURE_POLICY names the file as --signature-policy does.
    let open = f.policy(
        "open.json",
        json!({"default": [{"type": "insecureAcceptAnything"}]}),
    );
    let out = bux
        .cmd()
        .args(["-q", "pull", &r])
        .env("XDG_CONFIG_HOME", &config)
        .env("BUX_FUSE_SIGNATURE_POLICY", &open)
        .output()
        .unwrap();
    assert_success(&out);

    // A stored image is served as stored under a policy changed since (as podman runs what
    // it has); `--pull always` holds it to the new policy.
    let strict = f.policy("strict.json", json!({"default": [{"type": "reject"}]}));
    bux.ok(&[
        "-q",
        "pull",
        "--signature-policy",
        strict.to_str().unwrap(),
        &r,
    ]);
    let err = bux.fails(&[
        "-q",
        "pull",
        "--pull",
        "always",
        "--signature-policy",
        strict.to_str().unwrap(),
        &r,
    ]);
    assert!(err.contains("(default: reject)"), "{err}");

    // Malformed policies: one line naming the file, nothing stored.
    let bux = Bux::new();
    for (name, text, want) in [
        ("notjson.json", "{\"default\": [", "not JSON"),
        (
            "unknown-type.json",
            r#"{"default":[{"type":"acceptEverything"}]}"#,
            "unknown requirement type \"acceptEverything\"",
        ),
        (
            "unknown-field.json",
            r#"{"default":[{"type":"reject","keyPath":"/k"}]}"#,
            "unknown field \"keyPath\"",
        ),
        (
            "typo.json",
            r#"{"default":[{"type":"sigstoreSigned","keyPth":"/k"}]}"#,
            "unknown field \"keyPth\"",
        ),
        ("no-default.json", r#"{"transports":{}}"#, "no \"default\""),
    ] {
        let p = f.path(name);
        std::fs::write(&p, text).unwrap();
        let err = refused(&bux, &r, &p);
        assert!(
            err.starts_with(&format!(
                "bux-fuse: {r}: signature policy {}: ",
                p.display()
            )),
            "{err}"
        );
        assert!(err.contains(want), "{name}: {err}");
    }
    // Known requirements bux-fuse cannot check (GPG, Fulcio) refuse the images of their scope
    // only: a host's policy that has them (Fedora's default) still serves the others.
    let gpg = f.policy(
        "gpg.json",
        json!({"default": [{"type": "insecureAcceptAnything"}], "transports": {"docker": {
            format!("{host}/app"): [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k.gpg"}],
            format!("{host}/other"): [{"type": "sigstoreSigned", "fulcio": {"caPath": "/ca",
                "oidcIssuer": "https://issuer", "subjectEmail": "a@b"}, "rekorPublicKeyPath": "/r.pub"}]
        }}}),
    );
    let err = refused(&bux, &r, &gpg);
    assert!(
        err.contains(&format!(
            "(scope \"{host}/app\": signedBy: GPG signatures are not checked"
        )),
        "{err}"
    );
    f.image("other", "v1", "other");
    let err = refused(&bux, &format!("{host}/other:v1"), &gpg);
    assert!(err.contains("sigstoreSigned with fulcio"), "{err}");
    assert_nothing_stored(&bux);
    f.image("third", "v1", "third");
    pull_ok(&Bux::new(), &format!("{host}/third:v1"), &gpg);
    let missing = f.path("missing.json");
    let err = refused(&bux, &r, &missing);
    assert!(
        err.contains(&format!("signature policy {}", missing.display())),
        "{err}"
    );
    // A key that is not P-256 is refused when the image is checked, naming the key.
    let ed = f.path("ed.pub");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl genpkey -algorithm ed25519 | openssl pkey -pubout -out {}",
            ed.display()
        ))
        .output()
        .unwrap();
    assert_success(&out);
    let p = f.policy("ed.json", signed_by(&host, &ed));
    let err = refused(&bux, &r, &p);
    assert!(
        err.contains(&format!("key {}: not an EC key", ed.display())),
        "{err}"
    );
    assert_nothing_stored(&bux);
}

/// The digest `repo:tag` names now.
fn pinned_digest(f: &Fixture, repo: &str, tag: &str) -> String {
    let resp = http_get(f.reg.port, &format!("/v2/{repo}/manifests/{tag}"));
    let bytes = resp.split_once("\r\n\r\n").unwrap().1.as_bytes().to_vec();
    format!("sha256:{}", sha256_hex(&bytes))
}

fn manifest_bytes(f: &Fixture, repo: &str, digest: &str) -> Vec<u8> {
    let resp = http_get(f.reg.port, &format!("/v2/{repo}/manifests/{digest}"));
    resp.split_once("\r\n\r\n").unwrap().1.as_bytes().to_vec()
}

/// A plain HTTP/1.1 GET (OCI manifests accepted); the whole answer as text.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {OCI_MANIFEST}, {OCI_INDEX}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// skopeo (containers/image, the reference implementation of containers-policy.json) on the
/// same registry: it finds the signatures published here (Debian's skopeo 1.9 has sigstore
/// verification disabled — "Debian-local change: sigstore disabled" — so it cannot check them,
/// but it says so only for an image it found a sigstore signature of; for the others "no
/// signature exists"), and it picks the same scope as bux-fuse for every reference.
#[test]
fn skopeo_agrees() {
    need("skopeo");
    let f = Fixture::new();
    let host = f.host();
    let (key, public) = f.keypair("a");
    let registries_d = f.path("registries.d");
    std::fs::create_dir_all(&registries_d).unwrap();
    std::fs::write(
        registries_d.join("test.yaml"),
        format!("docker:\n  {host}:\n    use-sigstore-attachments: true\n"),
    )
    .unwrap();
    let skopeo = |reference: &str, policy: &Path, i: usize| -> (bool, String) {
        let out = Command::new("skopeo")
            .arg("--policy")
            .arg(policy)
            .arg("--registries.d")
            .arg(&registries_d)
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("dir:{}", f.path(&format!("copy{i}")).display()))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    };

    // Signature format: containers/image finds those under cosign's tag; it does not read
    // OCI referrers (skopeo 1.9), which bux-fuse also reads.
    let signed = f.policy("signed.json", signed_by(&host, &public));
    let d = f.image("tagged", "v1", "tagged");
    sign_and_publish(&f.reg, "tagged", &d, &format!("{host}/tagged:v1"), &d, &key);
    let d2 = f.image("referred", "v1", "referred");
    let p = payload(&format!("{host}/referred:v1"), &d2);
    let sig = sign(&key, &p);
    publish_referrer(&f.reg, "referred", &d2, &[(p, sig)]);
    f.image("unsigned", "v1", "unsigned");
    for (i, (repo, skopeo_finds, accepted)) in [
        ("tagged", true, true),
        ("referred", false, true),
        ("unsigned", false, false),
    ]
    .into_iter()
    .enumerate()
    {
        let r = format!("{host}/{repo}:v1");
        let (_, err) = skopeo(&r, &signed, 100 + i);
        if skopeo_finds {
            assert!(err.contains("sigstore disabled"), "{repo}: {err}");
        } else {
            assert!(err.contains("no signature exists"), "{repo}: {err}");
        }
        let bux = Bux::new()
            .run(&[
                "-q",
                "pull",
                "--signature-policy",
                signed.to_str().unwrap(),
                &r,
            ])
            .status
            .success();
        assert_eq!(bux, accepted, "{repo}");
    }

    // Scopes: which one applies, for references at every level.
    let accept = json!([{"type": "insecureAcceptAnything"}]);
    let reject = json!([{"type": "reject"}]);
    let mut images = Vec::new();
    for (repo, tag) in [
        ("ns/deep/app", "v1"),
        ("ns/deep/app", "v2"),
        ("ns/deep/other", "v1"),
        ("ns/flat", "v1"),
        ("top", "v1"),
        ("top", "v2"),
    ] {
        images.push((repo, tag, f.image(repo, tag, &format!("{repo}:{tag}"))));
    }
    let top_v2 = images[5].2.clone();
    let policies = [
        json!({"default": reject, "transports": {"docker": {
            format!("{host}/ns/deep/app:v1"): accept,
            format!("{host}/ns/deep/app"): reject,
            format!("{host}/ns/deep"): accept,
            format!("{host}/ns"): reject,
            &host: accept,
            format!("{host}/top@{top_v2}"): reject,
        }}}),
        json!({"default": accept, "transports": {"docker": {
            "*.0.0.1": reject,
            format!("{host}/ns/flat"): accept,
            "": accept,
        }}}),
        json!({"default": accept, "transports": {"docker": {
            "": reject,
            format!("{host}/ns/deep/app:v2"): accept,
            "*.1": accept,
        }}}),
        json!({"default": accept, "transports": {"docker": {
            format!("{host}/ns"): reject,
            format!("{host}/ns/deep/other:v1"): accept,
        }}}),
    ];
    let mut table = String::new();
    let mut disagree = 0;
    let mut n = 0;
    for (pi, policy) in policies.iter().enumerate() {
        let path = f.policy(&format!("scopes{pi}.json"), policy.clone());
        for (repo, tag, digest) in &images {
            for r in [
                format!("{host}/{repo}:{tag}"),
                format!("{host}/{repo}@{digest}"),
            ] {
                n += 1;
                let (s, err) = skopeo(&r, &path, n);
                let b = Bux::new()
                    .run(&[
                        "-q",
                        "pull",
                        "--signature-policy",
                        path.to_str().unwrap(),
                        &r,
                    ])
                    .status
                    .success();
                disagree += (s != b) as usize;
                table.push_str(&format!(
                    "policy {pi} {r}: skopeo {s}, bux-fuse {b} {err}\n"
                ));
            }
        }
    }
    assert_eq!(disagree, 0, "{table}");
    assert!(
        table.contains("skopeo true") && table.contains("skopeo false"),
        "{table}"
    );
}

/// A local source is matched by its own transport's `""` scope, and a refusal names that
/// transport (it said "docker").
#[test]
fn a_local_layout_is_refused_under_its_own_transport() {
    let f = Fixture::new();
    let (_, public) = f.keypair("a");
    let layout = f.path("layout");
    write_layout(&layout, "v1", &image("local", "amd64"));
    let policy = f.path("oci-policy.json");
    std::fs::write(
        &policy,
        serde_json::to_vec(&json!({
            "default": [{"type": "insecureAcceptAnything"}],
            "transports": {"oci": {"": [{"type": "sigstoreSigned", "keyPath": public}]}}
        }))
        .unwrap(),
    )
    .unwrap();
    let bux = Bux::new();
    let err = refused(&bux, &format!("oci:{}:v1", layout.display()), &policy);
    assert!(err.contains("of transport oci"), "{err}");
    assert_nothing_stored(&bux);
}
