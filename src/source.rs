//! Where an image comes from: a registry, an OCI image layout directory (`oci:PATH[:TAG]`), or
//! a `docker save` / skopeo docker-archive tarball (`docker-archive:PATH[:NAME[:TAG]]`). All
//! three answer the same questions — the top manifest, manifests and small blobs by digest, a
//! blob as a stream — so a pull from any of them stores, indexes and mounts the same way.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::stream::{self, BoxStream, StreamExt};
use serde::Deserialize;

use crate::index::reader::PosReader;
use crate::registry::manifest::{self, OCI_MANIFEST};
use crate::registry::{self, Registry, RegistryOptions};
use crate::{Digest, Error, Result};

const CHUNK: u64 = 1 << 20;

/// A parsed image location.
#[derive(Debug, Clone)]
pub enum Location {
    /// A registry reference, normalized (`registry/repository[:tag][@digest]`).
    Registry(String),
    /// An OCI image layout directory and an optional tag (`org.opencontainers.image.ref.name`).
    Layout {
        /// The layout directory (absolute).
        path: PathBuf,
        /// The tag, if given.
        tag: Option<String>,
    },
    /// A docker-archive tarball and an optional `name:tag` from its `RepoTags`.
    Archive {
        /// The tarball (absolute).
        path: PathBuf,
        /// The image within it, if given.
        name: Option<String>,
    },
}

/// skopeo's transports that bux-fuse does not read (`TRANSPORT:...`).
const OTHER_TRANSPORTS: &[&str] = &[
    "oci-archive",
    "containers-storage",
    "docker-daemon",
    "dir",
    "ostree",
    "sif",
    "tarball",
];

/// The locations bux-fuse reads, for errors.
const SUPPORTED: &str =
    "a registry reference (REF or docker://REF), oci:DIR[:TAG] or docker-archive:FILE[:NAME:TAG]";

impl Location {
    /// Parses `oci:PATH[:TAG]`, `docker-archive:PATH[:NAME:TAG]` or a registry reference
    /// (plain, or as skopeo writes it: `docker://REF`). skopeo's other transports are refused
    /// in a sentence naming what is read.
    pub fn parse(s: &str) -> Result<Location> {
        if let Some(rest) = s.strip_prefix("docker://") {
            return match quick_normalize(rest) {
                Some(n) => Ok(Location::Registry(n)),
                None => registry::parse_reference(rest)
                    .map(|r| Location::Registry(r.whole()))
                    .map_err(|e| Error::InvalidReference {
                        reference: s.to_string(),
                        detail: match e {
                            Error::InvalidReference { detail, .. } => detail,
                            e => e.to_string(),
                        },
                    }),
            };
        }
        for t in OTHER_TRANSPORTS {
            let Some(rest) = s.strip_prefix(t).and_then(|r| r.strip_prefix(':')) else {
                continue;
            };
            // `dir:5000/app` is a registry on a host called `dir`, port 5000.
            let port = rest.split('/').next().unwrap_or("");
            if rest.contains('/') && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
                break;
            }
            return Err(Error::InvalidReference {
                reference: s.to_string(),
                detail: format!("the {t}: transport is not supported (bux-fuse reads {SUPPORTED})"),
            });
        }
        let abs = |p: &str| {
            std::path::absolute(p).map_err(|e| Error::InvalidReference {
                reference: s.to_string(),
                detail: format!("bad path: {e}"),
            })
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (path, tag) = match rest.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') && !p.is_empty() => (p, Some(t.to_string())),
                _ => (rest, None),
            };
            return Ok(Location::Layout {
                path: abs(path)?,
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            // The path ends at the first ':' after which a name follows.
            let (path, name) = match rest.split_once(':') {
                Some((p, n)) if !n.is_empty() => (p, Some(n.to_string())),
                _ => (rest, None),
            };
            return Ok(Location::Archive {
                path: abs(path)?,
                name,
            });
        }
        // A short name resolves as registries.conf says, where there is one (the first of its
        // candidates: see `Location::candidates`). Where it cannot (no alias, no search
        // registry, ambiguous, a broken file), the name keeps Docker Hub's meaning here, which
        // finds images stored by that name; a pull of it says why it cannot resolve.
        if let Ok(Some(c)) = short_name_candidates(s) {
            if let Some(first) = c.first() {
                return Location::parse(&format!("docker://{first}"));
            }
        }
        // The full grammar check compiles a large regex (~80 ms): only pay it when the quick
        // normalization cannot vouch for the string.
        match quick_normalize(s) {
            Some(n) => Ok(Location::Registry(n)),
            None => Ok(Location::Registry(registry::parse_reference(s)?.whole())),
        }
    }

    /// The locations `s` may name, in the order to try them: one, unless `s` is a short name
    /// that registries.conf resolves through several search registries (permissive mode).
    pub fn candidates(s: &str) -> Result<Vec<Location>> {
        let loc = Location::parse(s)?;
        // Only a bare registry reference can be a short name (`oci:dir:tag`, `docker://x` are
        // not).
        if !matches!(loc, Location::Registry(_)) || s.contains("://") {
            return Ok(vec![loc]);
        }
        match short_name_candidates(s)? {
            Some(c) if c.len() > 1 => c
                .iter()
                .map(|n| Location::parse(&format!("docker://{n}")))
                .collect(),
            _ => Ok(vec![loc]),
        }
    }

    /// The canonical name the store records the image under.
    pub fn key(&self) -> String {
        match self {
            Location::Registry(r) => r.clone(),
            Location::Layout { path, tag } => match tag {
                Some(t) => format!("oci:{}:{t}", path.display()),
                None => format!("oci:{}", path.display()),
            },
            Location::Archive { path, name } => match name {
                Some(n) => format!("docker-archive:{}:{n}", path.display()),
                None => format!("docker-archive:{}", path.display()),
            },
        }
    }
}

/// What registries.conf makes of `s` if it is a short name (`ubuntu:24.04`, no registry host)
/// and there is a registries.conf: its fully qualified candidates, or why there are none.
fn short_name_candidates(s: &str) -> Result<Option<Vec<String>>> {
    if !registry::conf::is_short(s) {
        return Ok(None);
    }
    match registry::conf::global()? {
        Some(conf) => conf.resolve_short(s).transpose(),
        None => Ok(None),
    }
}

/// Normalizes a plain reference as Docker does (`debian` → `docker.io/library/debian:latest`)
/// without the regex, for strings made only of the common characters; `None` means "let the
/// full parser decide".
pub fn quick_normalize(s: &str) -> Option<String> {
    let (name, digest) = match s.split_once('@') {
        Some((n, d)) => {
            let hex = d.strip_prefix("sha256:")?;
            if hex.len() != 64
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return None;
            }
            (n, Some(d))
        }
        None => (s, None),
    };
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t)),
        _ => (name, None),
    };
    if let Some(t) = tag {
        let ok = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-';
        if t.is_empty()
            || t.len() > 128
            || !t.bytes().all(ok)
            || !t.as_bytes()[0].is_ascii_alphanumeric() && t.as_bytes()[0] != b'_'
        {
            return None;
        }
    }
    let (domain, repo) = match path.split_once('/') {
        Some((d, r)) if d.contains('.') || d.contains(':') || d == "localhost" => {
            (d, r.to_string())
        }
        _ => ("docker.io", path.to_string()),
    };
    let domain_ok = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':')
        && !domain.starts_with(['.', '-', ':']);
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
            })
            && c.as_bytes()[0].is_ascii_alphanumeric()
            && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
            && !c.contains("..")
            && !c.contains("___")
    };
    if !domain_ok || repo.is_empty() || !repo.split('/').all(component_ok) || s.len() > 255 {
        return None;
    }
    // Docker's other name for Docker Hub: the full parser rewrites it to `docker.io`.
    if domain == "index.docker.io" {
        return None;
    }
    let repo = if domain == "docker.io" && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo
    };
    let mut out = format!("{domain}/{repo}");
    match (tag, digest) {
        (Some(t), _) => out.push_str(&format!(":{t}")),
        (None, None) => out.push_str(":latest"),
        _ => {}
    }
    if let Some(d) = digest {
        out.push_str(&format!("@{d}"));
    }
    Some(out)
}

/// An open image source.
// One per pull or mount, never in a collection: a registry client's size is of no account.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    /// A registry.
    Registry(Registry, oci_client::Reference),
    /// An OCI layout directory.
    Layout(PathBuf, Option<String>),
    /// A docker-archive tarball, with its members located.
    Archive(Arc<Archive>),
}

/// A docker-archive tarball: where each member's bytes are, and the manifest synthesized from
/// its `manifest.json`.
pub struct Archive {
    file: File,
    members: HashMap<String, (u64, u64)>,
    manifest: Vec<u8>,
    blobs: HashMap<Digest, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl Source {
    /// Opens the source at `loc`.
    pub fn open(loc: &Location, opts: &RegistryOptions) -> Result<Source> {
        Ok(match loc {
            Location::Registry(r) => {
                // Asked where registries.conf sends it (the same name when it says nothing).
                let reg = Registry::for_pull(&registry::parse_reference(r)?, opts)?;
                let at = reg.reference().clone();
                Source::Registry(reg, at)
            }
            Location::Layout { path, tag } => {
                if !path.join("index.json").exists() {
                    return Err(Error::NotFound {
                        reference: loc.key(),
                        detail: " (no index.json: not an OCI image layout)".into(),
                    });
                }
                Source::Layout(path.clone(), tag.clone())
            }
            Location::Archive { path, name } => {
                Source::Archive(Arc::new(Archive::open(path, name.as_deref(), &loc.key())?))
            }
        })
    }

    /// The manifest (or index) the location names: its bytes and digest.
    pub async fn top_manifest(&self) -> Result<(Vec<u8>, Digest)> {
        match self {
            Source::Registry(reg, r) => reg.manifest(r).await,
            Source::Layout(path, tag) => {
                let index = std::fs::read(path.join("index.json"))
                    .map_err(|e| Error::io(format!("reading {}/index.json", path.display()), e))?;
                let index: manifest::ManifestOrIndex =
                    serde_json::from_slice(&index).map_err(|e| Error::InvalidManifest {
                        what: format!("{}/index.json", path.display()),
                        detail: e.to_string(),
                    })?;
                let entries = index.manifests.unwrap_or_default();
                let chosen = match tag {
                    Some(t) => entries.iter().find(|d| d.ref_name() == Some(t.as_str())),
                    None if entries.len() == 1 => entries.first(),
                    None => None,
                };
                let d = chosen.ok_or_else(|| Error::NotFound {
                    reference: format!("oci:{}", path.display()),
                    detail: match tag {
                        Some(t) => format!(" (no manifest tagged {t:?})"),
                        None => " (several manifests: name one with :TAG)".into(),
                    },
                })?;
                let digest: Digest = d.digest.parse().map_err(|e| Error::InvalidManifest {
                    what: format!("{}/index.json", path.display()),
                    detail: format!("{e}"),
                })?;
                Ok((
                    self.small_blob(&digest, manifest::MAX_MANIFEST).await?,
                    digest,
                ))
            }
            Source::Archive(a) => Ok((a.manifest.clone(), Digest::of(&a.manifest))),
        }
    }

    /// A manifest by digest (verified).
    pub async fn manifest_by_digest(&self, digest: &Digest) -> Result<Vec<u8>> {
        match self {
            Source::Registry(reg, r) => Ok(reg
                .manifest(&r.clone_with_digest(digest.to_string()))
                .await?
                .0),
            _ => self.small_blob(digest, manifest::MAX_MANIFEST).await,
        }
    }

    /// A small blob, whole and verified.
    pub async fn small_blob(&self, digest: &Digest, max: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = self.blob_stream(digest).await?;
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.map_err(|e| Error::io(format!("reading {digest}"), e))?);
            if out.len() as u64 > max {
                return Err(Error::InvalidManifest {
                    what: format!("blob {digest}"),
                    detail: format!("larger than {max} bytes"),
                });
            }
        }
        let actual = Digest::of(&out);
        if actual != *digest {
            return Err(Error::DigestMismatch {
                what: format!("blob {digest}"),
                expected: *digest,
                actual,
            });
        }
        Ok(out)
    }

    /// A blob as a stream of chunks (verified by the store as it is written).
    pub async fn blob_stream(
        &self,
        digest: &Digest,
    ) -> Result<BoxStream<'static, io::Result<bytes::Bytes>>> {
        match self {
            Source::Registry(reg, _) => reg.blob_stream(digest).await,
            Source::Layout(path, _) => {
                let p = path.join("blobs/sha256").join(digest.hex());
                let file = File::open(&p).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => Error::NotFound {
                        reference: format!("oci:{}", path.display()),
                        detail: format!(" (blob {digest} is missing)"),
                    },
                    _ => Error::io(format!("opening {}", p.display()), e),
                })?;
                let len = file
                    .metadata()
                    .map_err(|e| Error::io("stat blob", e))?
                    .len();
                Ok(range_stream(Arc::new(file), 0, len))
            }
            Source::Archive(a) => {
                let member = a.blobs.get(digest).ok_or_else(|| Error::NotFound {
                    reference: "docker-archive".into(),
                    detail: format!(" (blob {digest} is not in the archive)"),
                })?;
                let (off, len) = a.members[member];
                Ok(range_stream(
                    Arc::new(a.file.try_clone().map_err(|e| Error::io("dup", e))?),
                    off,
                    len,
                ))
            }
        }
    }
}

impl Source {
    /// The blob from byte `offset` on (`total` is its size): resuming a broken download.
    pub async fn blob_stream_from(
        &self,
        digest: &Digest,
        offset: u64,
        total: u64,
    ) -> Result<BoxStream<'static, io::Result<bytes::Bytes>>> {
        match self {
            Source::Registry(reg, _) => match reg.blob_range(digest, offset, total - offset).await?
            {
                registry::RangeBody::Partial(s) => Ok(s),
                // The registry ignores Range: skip what we have.
                registry::RangeBody::Full(s) => Ok(skip_bytes(s, offset)),
            },
            _ => Ok(skip_bytes(self.blob_stream(digest).await?, offset)),
        }
    }
}

/// Drops the first `n` bytes of a stream.
fn skip_bytes(
    s: BoxStream<'static, io::Result<bytes::Bytes>>,
    n: u64,
) -> BoxStream<'static, io::Result<bytes::Bytes>> {
    s.scan(n, |left, item| {
        let out = match item {
            Ok(mut b) if *left > 0 => {
                let k = (*left).min(b.len() as u64);
                *left -= k;
                Ok(b.split_off(k as usize))
            }
            other => other,
        };
        std::future::ready(Some(out))
    })
    .filter(|r| std::future::ready(!matches!(r, Ok(b) if b.is_empty())))
    .boxed()
}

/// Streams `len` bytes of `file` from `off`, in chunks read off the async threads.
fn range_stream(
    file: Arc<File>,
    off: u64,
    len: u64,
) -> BoxStream<'static, io::Result<bytes::Bytes>> {
    stream::unfold(0u64, move |done| {
        let file = file.clone();
        async move {
            if done >= len {
                return None;
            }
            let n = CHUNK.min(len - done);
            let res = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n as usize];
                file.read_exact_at(&mut buf, off + done)
                    .map(|_| bytes::Bytes::from(buf))
            })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
            let next = if res.is_ok() { done + n } else { len };
            Some((res, next))
        }
    })
    .boxed()
}

impl Archive {
    fn open(path: &Path, name: Option<&str>, key: &str) -> Result<Archive> {
        let err = |detail: String| Error::InvalidManifest {
            what: key.to_string(),
            detail,
        };
        let file =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // Locate every member (the archive is an uncompressed tar: seekable, nothing buffered).
        let mut members = HashMap::new();
        {
            let mut ar = tar::Archive::new(&file);
            for entry in ar
                .entries_with_seek()
                .map_err(|e| err(format!("not a tar archive: {e}")))?
            {
                let entry = entry.map_err(|e| err(format!("reading the archive: {e}")))?;
                let name = String::from_utf8_lossy(&entry.path_bytes())
                    .trim_start_matches("./")
                    .to_string();
                members.insert(name, (entry.raw_file_position(), entry.size()));
            }
        }
        let read_member = |name: &str, max: u64| -> Result<Vec<u8>> {
            let &(off, len) = members
                .get(name.trim_start_matches("./"))
                .ok_or_else(|| err(format!("member {name:?} is missing")))?;
            if len > max {
                return Err(err(format!("member {name:?} is larger than {max} bytes")));
            }
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, off)
                .map_err(|e| Error::io(format!("reading {name}"), e))?;
            Ok(buf)
        };
        let list: Vec<ArchiveEntry> =
            serde_json::from_slice(&read_member("manifest.json", 16 << 20)?)
                .map_err(|e| err(format!("manifest.json: {e}")))?;
        let entry = match name {
            Some(n) => list
                .iter()
                .find(|e| e.repo_tags.iter().flatten().any(|t| same_name(t, n)))
                .ok_or_else(|| err(format!("no image tagged {n:?} in the archive")))?,
            None => list
                .first()
                .ok_or_else(|| err("manifest.json lists no image".into()))?,
        };
        let config = read_member(&entry.config, 16 << 20)?;
        let config_digest = Digest::of(&config);
        let mut blobs = HashMap::from([(
            config_digest,
            entry.config.trim_start_matches("./").to_string(),
        )]);
        let mut layers = Vec::new();
        for l in &entry.layers {
            let l = l.trim_start_matches("./").to_string();
            let &(off, len) = members
                .get(&l)
                .ok_or_else(|| err(format!("layer {l:?} is missing")))?;
            let digest = match l
                .strip_prefix("blobs/sha256/")
                .and_then(|h| format!("sha256:{h}").parse().ok())
            {
                Some(d) => d,
                None => {
                    hash_range(&file, off, len).map_err(|e| Error::io(format!("hashing {l}"), e))?
                }
            };
            let mut magic = [0u8; 4];
            let _ = file.read_at(&mut magic, off);
            let media_type = if magic[..2] == [0x1f, 0x8b] {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
                "application/vnd.oci.image.layer.v1.tar+zstd"
            } else {
                "application/vnd.oci.image.layer.v1.tar"
            };
            layers.push(serde_json::json!({"mediaType": media_type, "digest": digest.to_string(), "size": len}));
            blobs.insert(digest, l);
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
            "layers": layers,
        }))
        .map_err(|e| err(e.to_string()))?;
        Ok(Archive {
            file,
            members,
            manifest,
            blobs,
        })
    }
}

/// Whether two image names are the same once normalized (`app:v1` = `docker.io/library/app:v1`).
fn same_name(a: &str, b: &str) -> bool {
    a == b
        || match (registry::parse_reference(a), registry::parse_reference(b)) {
            (Ok(x), Ok(y)) => x.whole() == y.whole(),
            _ => false,
        }
}

fn hash_range(file: &File, off: u64, len: u64) -> io::Result<Digest> {
    let mut h = crate::digest::Hasher::default();
    let mut r = io::Read::take(PosReader { file, pos: off }, len);
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_normalization_agrees_with_the_full_parser() {
        for s in registry::sample_references() {
            let full = registry::parse_reference(&s).map(|r| r.whole()).ok();
            let quick = quick_normalize(&s);
            if quick.is_some() {
                assert_eq!(quick, full, "{s}");
            }
        }
        for bad in ["UPPER/app", "app:bad tag", "a//b", "-x", "app:", ""] {
            assert_eq!(quick_normalize(bad), None, "{bad}");
        }
        assert!(quick_normalize("127.0.0.1:5000/library/debian:bookworm").is_some());
    }

    #[test]
    fn skopeo_transports() {
        let key = |s: &str| Location::parse(s).map(|l| l.key());
        assert_eq!(
            key("docker://debian").unwrap(),
            "docker.io/library/debian:latest"
        );
        assert_eq!(
            key("docker://127.0.0.1:5000/a/b:v1").unwrap(),
            "127.0.0.1:5000/a/b:v1"
        );
        assert!(key("oci:/tmp/layout:v1")
            .unwrap()
            .starts_with("oci:/tmp/layout"));
        assert!(key("docker-archive:/tmp/a.tar")
            .unwrap()
            .starts_with("docker-archive:"));
        for unsupported in [
            "oci-archive:/tmp/a.tar",
            "oci-archive:a.tar:v1",
            "containers-storage:debian",
            "docker-daemon:debian:latest",
            "dir:/tmp/x",
        ] {
            let err = key(unsupported).unwrap_err().to_string();
            assert!(
                err.contains("not supported") && err.contains("docker-archive:"),
                "{unsupported}: {err}"
            );
        }
        // A registry host that happens to be called like a transport, with a port, stays one.
        assert_eq!(key("dir:5000/a:v1").unwrap(), "dir:5000/a:v1");
    }
}
