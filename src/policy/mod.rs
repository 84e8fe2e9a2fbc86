//! Signature policy: `containers-policy.json(5)`, the file podman, skopeo and buildah read to
//! decide which images must be signed and by whom.
//!
//! Which file: [`SignaturePolicy`] (`--signature-policy FILE` on the command line); by default
//! `$XDG_CONFIG_HOME/containers/policy.json` (else `~/.config/containers/policy.json`), else
//! `/etc/containers/policy.json`, the first that exists, as containers/image looks. With no file
//! at all every image is accepted, as bux-fuse always did (podman refuses to pull without one;
//! bux-fuse runs on hosts that never had podman installed, and a missing file must not stop
//! their VMs).
//!
//! What is read: `default` and `transports` (scopes of `docker`: `host[:port]/repo:tag`,
//! `host/repo@digest`, `host/repo`, `host/namespace`, `host[:port]`, `*.example.com`; the most
//! specific scope that is present wins, else the transport's `""` scope, else `default`, as
//! containers/image's `policy_eval.go` decides). Requirements of a scope are all checked (AND):
//! `insecureAcceptAnything`, `reject`, and `sigstoreSigned` with `keyPath`, `keyPaths`,
//! `keyData` or `keyDatas` (ECDSA P-256 public keys, as `cosign generate-key-pair` makes them)
//! and `signedIdentity` (`matchRepoDigestOrExact` by default, `matchExact`, `matchRepository`,
//! `exactReference`, `exactRepository`, `remapIdentity`). Requirements containers/image knows and
//! bux-fuse cannot check — `signedBy` (GPG), `signedBaseLayer`, `sigstoreSigned` with `fulcio`,
//! `pki` or Rekor keys — refuse the images of their scope, saying why (Fedora's default policy
//! has `signedBy` for Red Hat's registries: the others are still served). Anything unknown —
//! types, fields, transports — fails the file when it is read, in one line naming it: a policy
//! silently half-applied is worse than none.
//!
//! Signatures are looked up as cosign stores them (the `sha256-<hex>.sig` tag, and OCI referrers
//! of artifactType `application/vnd.dev.cosign.artifact.sig.v1+json`), for the digest the
//! reference resolves to, and for an image index also the digest of the platform's manifest (cosign signs
//! what it is given: `cosign sign` of a multi-arch tag signs the index; one of a platform's
//! manifest digest signs that). A manifest pinned by `bux-fuse push-index` (the image's own
//! manifest with the annotation `dev.bux-fuse.index`) is a new digest no one signed: its
//! signature is the one of the manifest it was made from, found through the index manifest the
//! annotation names (its `subject`), and accepted only when that manifest is the pinned one
//! but for the annotation.
//!
//! When: each time an image's manifest is fetched from its source (a pull, a lazy mount, `pull
//! --pull always`, a stored image resolved again for this host), before anything of it is
//! stored. An image already in the store is served as it is, as podman runs the images it has
//! without checking their signatures again: `bux-fuse rm` it, or pull with `--pull always`, to
//! hold it to a policy changed since.

pub(crate) mod cosign;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::registry::manifest::Platform;
use crate::source::Source;
use crate::{Digest, Error, Result};

/// Which signature policy a pull obeys.
#[derive(Debug, Clone, Default)]
pub enum SignaturePolicy {
    /// The user's or the system's `policy.json`, as podman finds it (see [`default_path`]);
    /// with none, every image is accepted. The default.
    #[default]
    Auto,
    /// This file (it must exist), as `--signature-policy` names it.
    File(PathBuf),
    /// A policy read already (see [`Policy::from_file`], [`Policy::parse`]).
    Policy(Arc<Policy>),
}

impl SignaturePolicy {
    /// The policy in effect, read now; `None` when there is none (every image accepted).
    pub fn load(&self) -> Result<Option<Arc<Policy>>> {
        match self {
            SignaturePolicy::Auto => match default_path() {
                Some(p) => Ok(Some(Arc::new(Policy::from_file(&p)?))),
                None => Ok(None),
            },
            SignaturePolicy::File(p) => Ok(Some(Arc::new(Policy::from_file(p)?))),
            SignaturePolicy::Policy(p) => Ok(Some(p.clone())),
        }
    }
}

/// Where the policy is looked for, first first: `$XDG_CONFIG_HOME/containers/policy.json`
/// (`$HOME/.config/containers/policy.json` when `XDG_CONFIG_HOME` is unset or empty), then
/// `/etc/containers/policy.json`.
pub fn search_paths() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        });
    if let Some(c) = config {
        out.push(c.join("containers/policy.json"));
    }
    out.push(PathBuf::from("/etc/containers/policy.json"));
    out
}

/// The first of [`search_paths`] that exists, if any.
pub fn default_path() -> Option<PathBuf> {
    search_paths().into_iter().find(|p| p.exists())
}

/// A parsed `containers-policy.json(5)`.
#[derive(Debug, Clone)]
pub struct Policy {
    path: PathBuf,
    default: Vec<Requirement>,
    /// transport → scope → requirements.
    transports: BTreeMap<String, BTreeMap<String, Vec<Requirement>>>,
}

/// One requirement of a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Requirement {
    InsecureAcceptAnything,
    Reject,
    SigstoreSigned {
        keys: Vec<KeySource>,
        identity: SignedIdentity,
    },
    /// A requirement containers/image knows and bux-fuse cannot check (GPG `signedBy`,
    /// `signedBaseLayer`, Fulcio, Rekor, PKI): it refuses the images of its scope, saying so.
    Unsupported(String),
}

/// Where a public key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeySource {
    Path(PathBuf),
    /// PEM bytes (`keyData` is their base64), with its position for messages.
    Data(Vec<u8>, usize),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Path(p) => write!(f, "{}", p.display()),
            KeySource::Data(_, i) => write!(f, "keyData #{}", i + 1),
        }
    }
}

/// How a signature's claimed identity must relate to the image's reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SignedIdentity {
    MatchExact,
    MatchRepoDigestOrExact,
    MatchRepository,
    ExactReference(String),
    ExactRepository(String),
    RemapIdentity {
        prefix: String,
        signed_prefix: String,
    },
}

impl SignedIdentity {
    fn name(&self) -> &'static str {
        match self {
            SignedIdentity::MatchExact => "matchExact",
            SignedIdentity::MatchRepoDigestOrExact => "matchRepoDigestOrExact",
            SignedIdentity::MatchRepository => "matchRepository",
            SignedIdentity::ExactReference(_) => "exactReference",
            SignedIdentity::ExactRepository(_) => "exactRepository",
            SignedIdentity::RemapIdentity { .. } => "remapIdentity",
        }
    }

    /// Whether a signature claiming `signed` (its `docker-reference`) is accepted for the image
    /// pulled as `intended`.
    pub(crate) fn accepts(&self, intended: &DockerRef, signed: &str) -> bool {
        let Some(signed) = DockerRef::parse(signed) else {
            return false;
        };
        match self {
            SignedIdentity::MatchExact => {
                !intended.name_only() && !signed.name_only() && signed == *intended
            }
            SignedIdentity::MatchRepoDigestOrExact => repo_digest_or_exact(intended, &signed),
            SignedIdentity::MatchRepository => signed.name == intended.name,
            SignedIdentity::ExactReference(r) => DockerRef::parse(r)
                .is_some_and(|r| !r.name_only() && !signed.name_only() && r == signed),
            SignedIdentity::ExactRepository(r) => {
                DockerRef::parse(r).is_some_and(|r| r.name == signed.name)
            }
            SignedIdentity::RemapIdentity {
                prefix,
                signed_prefix,
            } => {
                let n = &intended.name;
                let matches = n == prefix
                    || (n.starts_with(prefix.as_str())
                        && n.as_bytes().get(prefix.len()) == Some(&b'/'));
                if !matches {
                    return repo_digest_or_exact(intended, &signed);
                }
                let remapped = format!("{signed_prefix}{}", &intended.to_string()[prefix.len()..]);
                DockerRef::parse(&remapped).is_some_and(|r| repo_digest_or_exact(&r, &signed))
            }
        }
    }
}

/// containers/image's `matchRepoDigestOrExactReferenceValues`: a tagged image needs a signature
/// of exactly that `repo:tag`; an image named by digest one of its repository.
fn repo_digest_or_exact(intended: &DockerRef, signed: &DockerRef) -> bool {
    if signed.name_only() {
        return false;
    }
    if intended.tag.is_some() {
        signed == intended
    } else if intended.digest.is_some() {
        signed.name == intended.name
    } else {
        false
    }
}

/// A Docker reference as containers/image normalizes it: `name` is `host[:port]/path`
/// (`docker.io/library/` added as Docker does), with an optional tag and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DockerRef {
    pub(crate) name: String,
    pub(crate) tag: Option<String>,
    pub(crate) digest: Option<String>,
}

impl DockerRef {
    /// Parses `[host[:port]/]path[:tag][@digest]`; `None` when it is not a reference.
    pub(crate) fn parse(s: &str) -> Option<DockerRef> {
        if s.is_empty() || s.contains("://") || s.chars().any(|c| c.is_whitespace()) {
            return None;
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let (algo, hex) = d.split_once(':')?;
                if algo.is_empty() || hex.is_empty() {
                    return None;
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                if tag.is_empty() || tag.len() > 128 {
                    return None;
                }
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() || name.ends_with('/') || name.contains("//") {
            return None;
        }
        let name = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                let host = if first == "index.docker.io" {
                    "docker.io"
                } else {
                    first
                };
                if path.chars().any(|c| c.is_ascii_uppercase()) {
                    return None;
                }
                format!("{host}/{path}")
            }
            Some(_) => format!("docker.io/{name}"),
            None => format!("docker.io/library/{name}"),
        };
        if name.contains(':') && !name.split('/').next()?.contains(':') {
            return None;
        }
        Some(DockerRef { name, tag, digest })
    }

    fn name_only(&self) -> bool {
        self.tag.is_none() && self.digest.is_none()
    }

    /// The most specific policy scope: `name@digest` for a reference by digest, else
    /// `name:tag` (`latest` when there is none).
    fn identity(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{}@{d}", self.name),
            (None, Some(t)) => format!("{}:{t}", self.name),
            (None, None) => format!("{}:latest", self.name),
        }
    }
}

impl std::fmt::Display for DockerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// containers/image's `DockerReferenceNamespaces`: `host/a/b`, `host/a`, `host` (port kept),
/// then `*.domain` for each parent domain of the host (port dropped).
pub(crate) fn namespaces(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut n = name;
    loop {
        out.push(n.to_string());
        match n.rfind('/') {
            Some(i) => n = &n[..i],
            None => break,
        }
    }
    let mut host = n.split(':').next().unwrap_or(n);
    while let Some(i) = host.find('.') {
        host = &host[i + 1..];
        out.push(format!("*.{host}"));
    }
    out
}

/// The transports containers/image knows (scopes of the others are errors there too).
const TRANSPORTS: &[&str] = &[
    "atomic",
    "containers-storage",
    "dir",
    "docker",
    "docker-archive",
    "docker-daemon",
    "oci",
    "oci-archive",
    "ostree",
    "sif",
    "tarball",
];

impl Policy {
    /// Reads and checks the file at `path`.
    pub fn from_file(path: &Path) -> Result<Policy> {
        let bytes = std::fs::read(path).map_err(|e| Error::InvalidPolicy {
            path: path.to_path_buf(),
            detail: crate::registry::describe_io(&e),
        })?;
        Policy::parse(&bytes, path)
    }

    /// Parses a policy; `path` is what messages call it.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Policy> {
        let bad = |detail: String| Error::InvalidPolicy {
            path: path.to_path_buf(),
            detail,
        };
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let top = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        only_fields(top, &["default", "transports"], "the policy").map_err(bad)?;
        let default = requirements(
            top.get("default")
                .ok_or_else(|| bad("no \"default\" (containers-policy.json requires it)".into()))?,
            "default",
        )
        .map_err(bad)?;
        let mut transports = BTreeMap::new();
        if let Some(t) = top.get("transports") {
            let t = t
                .as_object()
                .ok_or_else(|| bad("\"transports\" is not an object".into()))?;
            for (name, scopes) in t {
                if !TRANSPORTS.contains(&name.as_str()) {
                    return Err(bad(format!("unknown transport {name:?}")));
                }
                let scopes = scopes
                    .as_object()
                    .ok_or_else(|| bad(format!("transport {name:?} is not an object")))?;
                let mut parsed = BTreeMap::new();
                for (scope, reqs) in scopes {
                    if name == "docker" && !scope.is_empty() {
                        check_docker_scope(scope).map_err(bad)?;
                    }
                    let what = format!("scope {scope:?} of transport {name:?}");
                    parsed.insert(scope.clone(), requirements(reqs, &what).map_err(bad)?);
                }
                transports.insert(name.clone(), parsed);
            }
        }
        Ok(Policy {
            path: path.to_path_buf(),
            default,
            transports,
        })
    }

    /// A policy that accepts anything (`{"default":[{"type":"insecureAcceptAnything"}]}`).
    pub fn accept_anything() -> Policy {
        Policy {
            path: PathBuf::from("(built in)"),
            default: vec![Requirement::InsecureAcceptAnything],
            transports: BTreeMap::new(),
        }
    }

    /// The file the policy was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The scope that applies to the registry image `reference` (normalized, as the store
    /// keys it) and its requirements: the most specific `transports.docker` scope present,
    /// else its `""` scope, else `default`. The scope is `None` for `default`.
    pub(crate) fn for_docker(&self, reference: &DockerRef) -> (Option<String>, &[Requirement]) {
        if let Some(scopes) = self.transports.get("docker") {
            let identity = reference.identity();
            let tagged = reference
                .tag
                .as_ref()
                .map(|t| format!("{}:{t}", reference.name));
            for s in std::iter::once(identity)
                .chain(tagged)
                .chain(namespaces(&reference.name))
                .chain(std::iter::once(String::new()))
            {
                if let Some(r) = scopes.get(&s) {
                    return (Some(s), r);
                }
            }
        }
        (None, &self.default)
    }

    /// What applies to a local source of `transport` (`oci`, `docker-archive`): its `""`
    /// scope, else `default` (path scopes are not matched).
    pub(crate) fn for_transport(&self, transport: &str) -> (Option<String>, &[Requirement]) {
        match self.transports.get(transport).and_then(|s| s.get("")) {
            Some(r) => (Some(String::new()), r),
            None => (None, &self.default),
        }
    }

    /// A human description of which scopes apply to `reference`, for `info`-like output.
    pub fn describe_scope(&self, reference: &str) -> String {
        match DockerRef::parse(reference) {
            Some(r) => {
                let (scope, reqs) = self.for_docker(&r);
                format!(
                    "{}: {}",
                    scope_label(scope.as_deref(), "docker"),
                    describe(reqs)
                )
            }
            None => format!("{reference:?} is not a registry reference"),
        }
    }
}

fn scope_label(scope: Option<&str>, transport: &str) -> String {
    match scope {
        None => "default".into(),
        Some("") => format!("scope \"\" of transport {transport}"),
        Some(s) => format!("scope {s:?}"),
    }
}

fn describe(reqs: &[Requirement]) -> String {
    reqs.iter()
        .map(|r| match r {
            Requirement::InsecureAcceptAnything => "insecureAcceptAnything".to_string(),
            Requirement::Reject => "reject".to_string(),
            Requirement::SigstoreSigned { keys, identity } => format!(
                "sigstoreSigned (keys {}; {})",
                keys.iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                identity.name()
            ),
            Requirement::Unsupported(what) => format!("{what} (unsupported: refuses)"),
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

/// A scope of `transports.docker`: refused only when it can never match anything.
fn check_docker_scope(scope: &str) -> std::result::Result<(), String> {
    let bad = |why: &str| Err(format!("transports.docker scope {scope:?}: {why}"));
    if scope.contains("://") {
        return bad("a scope is host[/repo][:tag|@digest], without a transport:// prefix");
    }
    if let Some(rest) = scope.strip_prefix("*.") {
        if rest.is_empty() || rest.contains('/') || rest.contains('*') || rest.contains(':') {
            return bad("a wildcard is *.domain, without a path or port");
        }
        return Ok(());
    }
    if scope.contains('*') {
        return bad("only a leading *. is a wildcard");
    }
    if scope.ends_with('/') || scope.chars().any(char::is_whitespace) {
        return bad("not a host, repository or reference");
    }
    Ok(())
}

fn only_fields(
    obj: &serde_json::Map<String, Value>,
    allowed: &[&str],
    what: &str,
) -> std::result::Result<(), String> {
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(format!("{what}: unknown field {k:?}"));
        }
    }
    Ok(())
}

fn string_field<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
    what: &str,
) -> std::result::Result<Option<&'a str>, String> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(_) => Err(format!("{what}: {key:?} is not a non-empty string")),
    }
}

fn string_list(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    what: &str,
) -> std::result::Result<Option<Vec<String>>, String> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(format!(
                    "{what}: {key:?} holds something not a non-empty string"
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(format!(
            "{what}: {key:?} is not a non-empty list of strings"
        )),
    }
}

fn requirements(v: &Value, what: &str) -> std::result::Result<Vec<Requirement>, String> {
    let list = v
        .as_array()
        .ok_or_else(|| format!("{what} is not a list of requirements"))?;
    if list.is_empty() {
        return Err(format!("{what}: an empty list of requirements"));
    }
    list.iter()
        .enumerate()
        .map(|(i, r)| requirement(r, &format!("{what}, requirement {}", i + 1)))
        .collect()
}

fn requirement(v: &Value, what: &str) -> std::result::Result<Requirement, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{what} is not an object"))?;
    let ty = string_field(obj, "type", what)?.ok_or_else(|| format!("{what}: no \"type\""))?;
    let what = format!("{what} ({ty})");
    match ty {
        "insecureAcceptAnything" => {
            only_fields(obj, &["type"], &what)?;
            Ok(Requirement::InsecureAcceptAnything)
        }
        "reject" => {
            only_fields(obj, &["type"], &what)?;
            Ok(Requirement::Reject)
        }
        "signedBy" => {
            only_fields(
                obj,
                &[
                    "type",
                    "keyType",
                    "keyPath",
                    "keyPaths",
                    "keyData",
                    "signedIdentity",
                ],
                &what,
            )?;
            Ok(Requirement::Unsupported(
                "signedBy: GPG signatures are not checked by bux-fuse (sign with cosign and \
                 use sigstoreSigned)"
                    .into(),
            ))
        }
        "signedBaseLayer" => {
            only_fields(obj, &["type", "baseLayerIdentity"], &what)?;
            Ok(Requirement::Unsupported(
                "signedBaseLayer: not checked by bux-fuse".into(),
            ))
        }
        "sigstoreSigned" => {
            const KNOWN: &[&str] = &[
                "type",
                "keyPath",
                "keyPaths",
                "keyData",
                "keyDatas",
                "fulcio",
                "rekorPublicKeyPath",
                "rekorPublicKeyPaths",
                "rekorPublicKeyData",
                "rekorPublicKeyDatas",
                "pki",
                "signedIdentity",
            ];
            only_fields(obj, KNOWN, &what)?;
            if let Some(k) = [
                "fulcio",
                "pki",
                "rekorPublicKeyPath",
                "rekorPublicKeyPaths",
                "rekorPublicKeyData",
                "rekorPublicKeyDatas",
            ]
            .into_iter()
            .find(|k| obj.contains_key(*k))
            {
                return Ok(Requirement::Unsupported(format!(
                    "sigstoreSigned with {k}: not checked by bux-fuse (only public keys: \
                     keyPath, keyPaths, keyData, keyDatas)"
                )));
            }
            let mut sources = Vec::new();
            let mut given = 0;
            if let Some(p) = string_field(obj, "keyPath", &what)? {
                given += 1;
                sources.push(KeySource::Path(PathBuf::from(p)));
            }
            if let Some(ps) = string_list(obj, "keyPaths", &what)? {
                given += 1;
                sources.extend(ps.into_iter().map(|p| KeySource::Path(PathBuf::from(p))));
            }
            let mut datas = Vec::new();
            if let Some(d) = string_field(obj, "keyData", &what)? {
                given += 1;
                datas.push(d.to_string());
            }
            if let Some(ds) = string_list(obj, "keyDatas", &what)? {
                given += 1;
                datas.extend(ds);
            }
            if given != 1 {
                return Err(format!(
                    "{what}: exactly one of keyPath, keyPaths, keyData and keyDatas must be given"
                ));
            }
            for (i, d) in datas.iter().enumerate() {
                use base64::Engine;
                let pem = base64::engine::general_purpose::STANDARD
                    .decode(d)
                    .map_err(|e| format!("{what}: key data #{} is not base64: {e}", i + 1))?;
                cosign::PublicKey::from_pem(&pem, &format!("keyData #{}", i + 1))
                    .map_err(|e| format!("{what}: {e}"))?;
                sources.push(KeySource::Data(pem, i));
            }
            let identity = match obj.get("signedIdentity") {
                None => SignedIdentity::MatchRepoDigestOrExact,
                Some(v) => signed_identity(v, &format!("{what}: signedIdentity"))?,
            };
            Ok(Requirement::SigstoreSigned {
                keys: sources,
                identity,
            })
        }
        other => Err(format!("{what}: unknown requirement type {other:?}")),
    }
}

fn signed_identity(v: &Value, what: &str) -> std::result::Result<SignedIdentity, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{what} is not an object"))?;
    let ty = string_field(obj, "type", what)?.ok_or_else(|| format!("{what}: no \"type\""))?;
    let what = format!("{what} ({ty})");
    let reference = |key: &str, need_tag: bool| -> std::result::Result<String, String> {
        only_fields(obj, &["type", key], &what)?;
        let r = string_field(obj, key, &what)?.ok_or_else(|| format!("{what}: no {key:?}"))?;
        match DockerRef::parse(r) {
            Some(p) if need_tag && p.name_only() => {
                Err(format!("{what}: {r:?} names no tag or digest"))
            }
            Some(p) if !need_tag && !p.name_only() => {
                Err(format!("{what}: {r:?} is not a repository name"))
            }
            Some(_) => Ok(r.to_string()),
            None => Err(format!("{what}: {r:?} is not a docker reference")),
        }
    };
    Ok(match ty {
        "matchExact" | "matchRepoDigestOrExact" | "matchRepository" => {
            only_fields(obj, &["type"], &what)?;
            match ty {
                "matchExact" => SignedIdentity::MatchExact,
                "matchRepository" => SignedIdentity::MatchRepository,
                _ => SignedIdentity::MatchRepoDigestOrExact,
            }
        }
        "exactReference" => SignedIdentity::ExactReference(reference("dockerReference", true)?),
        "exactRepository" => SignedIdentity::ExactRepository(reference("dockerRepository", false)?),
        "remapIdentity" => {
            only_fields(obj, &["type", "prefix", "signedPrefix"], &what)?;
            let prefix = string_field(obj, "prefix", &what)?
                .ok_or_else(|| format!("{what}: no \"prefix\""))?;
            let signed_prefix = string_field(obj, "signedPrefix", &what)?
                .ok_or_else(|| format!("{what}: no \"signedPrefix\""))?;
            for p in [prefix, signed_prefix] {
                if p.contains("://") || p.contains('@') || p.ends_with('/') {
                    return Err(format!("{what}: {p:?} is not a host[/namespace] prefix"));
                }
            }
            SignedIdentity::RemapIdentity {
                prefix: prefix.to_string(),
                signed_prefix: signed_prefix.to_string(),
            }
        }
        other => Err(format!("{what}: unknown signedIdentity type {other:?}"))?,
    })
}

/// Checks the image `name` (normalized, as the store keys it), whose top manifest (`top`,
/// `top_digest`) was just fetched from `src`, against the policy: `Ok` when accepted,
/// [`Error::PolicyRejected`] when not, the registry's error when signatures could not be read.
pub(crate) async fn check(
    which: &SignaturePolicy,
    src: &Source,
    name: &str,
    top: &[u8],
    top_digest: &Digest,
    want: &Platform,
) -> Result<()> {
    let Some(policy) = which.load()? else {
        return Ok(());
    };
    let transport = match src {
        Source::Registry(..) => "docker",
        Source::Layout(..) => "oci",
        Source::Archive(..) => "docker-archive",
    };
    let (scope, reqs, intended) = match src {
        Source::Registry(..) => {
            let intended = DockerRef::parse(name).ok_or_else(|| Error::InvalidReference {
                reference: name.to_string(),
                detail: "not a docker reference the signature policy can match".into(),
            })?;
            let (scope, reqs) = policy.for_docker(&intended);
            (scope, reqs, Some(intended))
        }
        Source::Layout(..) => {
            let (s, r) = policy.for_transport("oci");
            (s, r, None)
        }
        Source::Archive(..) => {
            let (s, r) = policy.for_transport("docker-archive");
            (s, r, None)
        }
    };
    let reject = |rule: &str| Error::PolicyRejected {
        reference: name.to_string(),
        detail: format!(
            "{} ({}: {rule})",
            policy.path.display(),
            scope_label(scope.as_deref(), transport)
        ),
    };
    let mut found: Option<cosign::Found> = None;
    for req in reqs {
        match req {
            Requirement::InsecureAcceptAnything => {}
            Requirement::Reject => return Err(reject("reject")),
            Requirement::Unsupported(what) => return Err(reject(what)),
            Requirement::SigstoreSigned { keys, identity } => {
                let (Source::Registry(..), Some(intended)) = (src, &intended) else {
                    return Err(reject(
                        "sigstoreSigned: signatures of a local source are not read",
                    ));
                };
                if found.is_none() {
                    found = Some(cosign::Found::new(src, top, top_digest, want)?);
                }
                let f = found.as_mut().expect("set above");
                if let Err(why) = f.verify(keys, identity, intended).await? {
                    return Err(reject(&format!("sigstoreSigned: {why}")));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Policy> {
        Policy::parse(s.as_bytes(), Path::new("/p.json"))
    }

    fn scope(p: &Policy, r: &str) -> Option<String> {
        p.for_docker(&DockerRef::parse(r).unwrap()).0
    }

    #[test]
    fn namespaces_as_containers_image() {
        assert_eq!(
            namespaces("foo.example.com:5000/ns/repo"),
            [
                "foo.example.com:5000/ns/repo",
                "foo.example.com:5000/ns",
                "foo.example.com:5000",
                "*.example.com",
                "*.com"
            ]
        );
        assert_eq!(namespaces("localhost/a"), ["localhost/a", "localhost"]);
    }

    #[test]
    fn references_normalize() {
        let r = DockerRef::parse("busybox").unwrap();
        assert_eq!(r.name, "docker.io/library/busybox");
        assert_eq!(r.tag, None);
        let r = DockerRef::parse("127.0.0.1:5000/app:v1").unwrap();
        assert_eq!(
            (r.name.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000/app", Some("v1"))
        );
        let r = DockerRef::parse("index.docker.io/a/b@sha256:00").unwrap();
        assert_eq!(r.name, "docker.io/a/b");
        assert_eq!(r.digest.as_deref(), Some("sha256:00"));
        assert!(DockerRef::parse("docker://x").is_none());
        assert!(DockerRef::parse("").is_none());
    }

    #[test]
    fn most_specific_scope_wins() {
        let p = parse(
            r#"{"default":[{"type":"reject"}],"transports":{"docker":{
                "":[{"type":"reject"}],
                "*.example.com":[{"type":"insecureAcceptAnything"}],
                "reg.example.com:5000":[{"type":"reject"}],
                "reg.example.com:5000/ns":[{"type":"insecureAcceptAnything"}],
                "reg.example.com:5000/ns/app":[{"type":"reject"}],
                "reg.example.com:5000/ns/app:v1":[{"type":"insecureAcceptAnything"}],
                "reg.example.com:5000/ns/app@sha256:ab":[{"type":"insecureAcceptAnything"}]
            }}}"#,
        )
        .unwrap();
        let s = |r| scope(&p, r);
        assert_eq!(
            s("reg.example.com:5000/ns/app:v1").as_deref(),
            Some("reg.example.com:5000/ns/app:v1")
        );
        assert_eq!(
            s("reg.example.com:5000/ns/app:v2").as_deref(),
            Some("reg.example.com:5000/ns/app")
        );
        assert_eq!(
            s("reg.example.com:5000/ns/app@sha256:ab").as_deref(),
            Some("reg.example.com:5000/ns/app@sha256:ab")
        );
        assert_eq!(
            s("reg.example.com:5000/ns/other").as_deref(),
            Some("reg.example.com:5000/ns")
        );
        assert_eq!(
            s("reg.example.com:5000/x").as_deref(),
            Some("reg.example.com:5000")
        );
        assert_eq!(s("other.example.com/x").as_deref(), Some("*.example.com"));
        assert_eq!(s("quay.io/x").as_deref(), Some(""));
        let d = parse(r#"{"default":[{"type":"reject"}]}"#).unwrap();
        assert_eq!(scope(&d, "quay.io/x"), None);
    }

    #[test]
    fn known_but_unsupported_requirements_refuse_their_scope_only() {
        // Fedora's and RHEL's default policy: GPG for Red Hat's registries, anything elsewhere.
        let p = parse(
            r#"{"default":[{"type":"insecureAcceptAnything"}],"transports":{
                "docker":{"registry.redhat.io":[{"type":"signedBy","keyType":"GPGKeys",
                    "keyPaths":["/etc/pki/rpm-gpg/RPM-GPG-KEY-redhat-release"]}],
                    "quay.io/x":[{"type":"sigstoreSigned","fulcio":{"caPath":"/ca","oidcIssuer":"i",
                    "subjectEmail":"e"},"rekorPublicKeyPath":"/r"}]},
                "docker-daemon":{"":[{"type":"insecureAcceptAnything"}]}}}"#,
        )
        .unwrap();
        let r = DockerRef::parse("registry.redhat.io/ubi9:latest").unwrap();
        assert!(matches!(p.for_docker(&r).1, [Requirement::Unsupported(w)] if w.contains("GPG")));
        let r = DockerRef::parse("quay.io/x/y:1").unwrap();
        assert!(
            matches!(p.for_docker(&r).1, [Requirement::Unsupported(w)] if w.contains("fulcio"))
        );
        let r = DockerRef::parse("docker.io/library/debian:12").unwrap();
        assert_eq!(p.for_docker(&r).1, [Requirement::InsecureAcceptAnything]);
    }

    #[test]
    fn sigstore_requirement_parses() {
        let p = parse(
            r#"{"default":[{"type":"sigstoreSigned","keyPaths":["/a.pub","/b.pub"],
                "signedIdentity":{"type":"remapIdentity","prefix":"mirror.local/x","signedPrefix":"docker.io/x"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            p.default,
            vec![Requirement::SigstoreSigned {
                keys: vec![
                    KeySource::Path("/a.pub".into()),
                    KeySource::Path("/b.pub".into())
                ],
                identity: SignedIdentity::RemapIdentity {
                    prefix: "mirror.local/x".into(),
                    signed_prefix: "docker.io/x".into()
                }
            }]
        );
    }

    #[test]
    fn malformed_policies_are_refused_in_one_line() {
        for (text, want) in [
            ("{", "not JSON"),
            ("{}", "no \"default\""),
            (r#"{"default":[]}"#, "empty list"),
            (
                r#"{"default":[{"type":"nope"}]}"#,
                "unknown requirement type \"nope\"",
            ),
            (
                r#"{"default":[{"type":"reject","x":1}]}"#,
                "unknown field \"x\"",
            ),
            (
                r#"{"default":[{"type":"insecureAcceptAnything"}],"extra":1}"#,
                "unknown field \"extra\"",
            ),
            (
                r#"{"default":[{"type":"reject"}],"transports":{"dockr":{}}}"#,
                "unknown transport",
            ),
            (
                r#"{"default":[{"type":"reject"}],"transports":{"docker":{"docker://x":[{"type":"reject"}]}}}"#,
                "transport:// prefix",
            ),
            (
                r#"{"default":[{"type":"sigstoreSigned"}]}"#,
                "exactly one of",
            ),
            (
                r#"{"default":[{"type":"sigstoreSigned","keyPath":"/a","keyPaths":["/b"]}]}"#,
                "exactly one of",
            ),
            (
                r#"{"default":[{"type":"sigstoreSigned","keyPath":"/a","fulcia":{}}]}"#,
                "unknown field \"fulcia\"",
            ),
            (
                r#"{"default":[{"type":"signedBy","keyType":"GPGKeys","keyPat":"/a"}]}"#,
                "unknown field \"keyPat\"",
            ),
            (
                r#"{"default":[{"type":"sigstoreSigned","keyPath":"/a","signedIdentity":{"type":"matchAll"}}]}"#,
                "unknown signedIdentity type",
            ),
            (
                r#"{"default":[{"type":"sigstoreSigned","keyPath":"/a","signedIdentity":{"type":"exactReference","dockerReference":"x/y"}}]}"#,
                "names no tag",
            ),
            (
                r#"{"default":[{"type":"sigstoreSigned","keyData":"!!"}]}"#,
                "not base64",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with("signature policy /p.json: "), "{text}: {e}");
            assert!(e.contains(want), "{text}: {e} (wanted {want})");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn signed_identities() {
        let tagged = DockerRef::parse("reg.io/app:v1").unwrap();
        let digested = DockerRef::parse("reg.io/app@sha256:aa").unwrap();
        let d = SignedIdentity::MatchRepoDigestOrExact;
        assert!(d.accepts(&tagged, "reg.io/app:v1"));
        assert!(!d.accepts(&tagged, "reg.io/app:v2"));
        assert!(!d.accepts(&tagged, "reg.io/app"));
        assert!(d.accepts(&digested, "reg.io/app:v9"));
        assert!(!d.accepts(&digested, "reg.io/other:v9"));
        assert!(!d.accepts(&digested, "reg.io/app"));
        let r = SignedIdentity::MatchRepository;
        assert!(r.accepts(&tagged, "reg.io/app"));
        assert!(!r.accepts(&tagged, "reg.io/apps"));
        let e = SignedIdentity::MatchExact;
        assert!(e.accepts(&tagged, "reg.io/app:v1"));
        assert!(!e.accepts(&digested, "reg.io/app:v1"));
        let x = SignedIdentity::ExactReference("docker.io/library/busybox:1".into());
        assert!(x.accepts(&tagged, "busybox:1"));
        assert!(!x.accepts(&tagged, "reg.io/app:v1"));
        let m = SignedIdentity::RemapIdentity {
            prefix: "mirror.local/app".into(),
            signed_prefix: "reg.io/app".into(),
        };
        assert!(m.accepts(
            &DockerRef::parse("mirror.local/app:v1").unwrap(),
            "reg.io/app:v1"
        ));
        assert!(!m.accepts(
            &DockerRef::parse("mirror.local/apps:v1").unwrap(),
            "reg.io/app:v1"
        ));
    }
}
