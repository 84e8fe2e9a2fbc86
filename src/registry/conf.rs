//! `registries.conf` (containers-registries.conf(5), version 2, and the old version 1 lists), as
//! podman, skopeo and buildah read it, so that a host's mirrors, insecure and blocked registries
//! and short names apply to bux-fuse too.
//!
//! Files, in the order containers/image reads them: `$CONTAINERS_REGISTRIES_CONF` if set, else
//! `~/.config/containers/registries.conf` if it exists, else `/etc/containers/registries.conf`;
//! then the drop-ins `*.conf` of `/etc/containers/registries.conf.d/` (not read when the user's
//! own file is) and of `~/.config/containers/registries.conf.d/`, each directory in name order,
//! each file overriding the ones before: a `[[registry]]` replaces the one with the same
//! prefix, `unqualified-search-registries` and `short-name-mode` replace what was set, aliases
//! add up. With no file at all, nothing changes: short names are Docker Hub's (`debian` is
//! `docker.io/library/debian`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// How short names (`ubuntu:24.04`) resolve when no alias names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortNameMode {
    /// One search registry: it. Several: refused (podman would ask at a terminal; bux-fuse
    /// never asks).
    Enforcing,
    /// Each search registry in turn, until one has the image.
    Permissive,
    /// As permissive (podman then records no alias either).
    Disabled,
}

/// When a mirror is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullFromMirror {
    /// For images named by tag or by digest.
    All,
    /// Only for images named by digest.
    DigestOnly,
    /// Only for images named by tag.
    TagOnly,
}

/// A mirror of a `[[registry]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port][/path]` replacing the registry's prefix.
    pub location: String,
    /// Spoken to over plain HTTP.
    pub insecure: bool,
    /// When it is asked.
    pub pull_from: PullFromMirror,
}

/// A `[[registry]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConf {
    /// The references it applies to: `host[:port][/path]`, or `*.domain` for its subdomains.
    pub prefix: String,
    /// What replaces the prefix (empty for a wildcard prefix: the reference stays).
    pub location: String,
    /// Spoken to over plain HTTP.
    pub insecure: bool,
    /// Pulls from it are refused.
    pub blocked: bool,
    /// Asked first, in order.
    pub mirrors: Vec<Mirror>,
}

/// The merged configuration.
#[derive(Debug, Clone, Default)]
pub struct RegistriesConf {
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// `unqualified-search-registries`, when a file set it.
    pub search: Option<Vec<String>>,
    /// `short-name-mode` (default enforcing).
    pub mode: Option<ShortNameMode>,
    /// `[[registry]]` tables, by prefix.
    pub registries: BTreeMap<String, RegistryConf>,
    /// `[aliases]`: short name → fully qualified repository.
    pub aliases: BTreeMap<String, String>,
}

/// Where one pull of a reference goes: the mirrors to ask first, then the registry itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The reference as the registry itself is asked for it (`location` rewritten).
    pub primary: String,
    /// Speak plain HTTP to the registry itself.
    pub insecure: bool,
    /// Mirrors' references and whether each is plain HTTP, in order.
    pub mirrors: Vec<(String, bool)>,
}

/// The files the environment names, and where they are.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `$CONTAINERS_REGISTRIES_CONF`.
    pub env_file: Option<PathBuf>,
    /// The user's home (`$HOME`).
    pub home: Option<PathBuf>,
    /// `/etc/containers/registries.conf`.
    pub system_file: PathBuf,
    /// `/etc/containers/registries.conf.d`.
    pub system_dir: PathBuf,
}

impl Paths {
    /// From the environment, as podman finds them.
    pub fn from_env() -> Paths {
        Paths {
            env_file: std::env::var_os("CONTAINERS_REGISTRIES_CONF")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            home: std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            system_file: PathBuf::from("/etc/containers/registries.conf"),
            system_dir: PathBuf::from("/etc/containers/registries.conf.d"),
        }
    }
}

fn bad(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::InvalidManifest {
        what: format!("registries configuration {}", path.display()),
        detail: detail.to_string(),
    }
}

/// The configuration in effect for this process: read from the environment's files at first
/// use ([`Paths::from_env`]), unless [`set`] chose another. `None` when there is none.
pub fn global() -> Result<Option<Arc<RegistriesConf>>> {
    let mut slot = CONF.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        let loaded = RegistriesConf::load(&Paths::from_env());
        *slot = Some(loaded.map(|c| c.map(Arc::new)).map_err(|e| match e {
            Error::InvalidManifest { what, detail } => (what, detail),
            e => ("registries configuration".into(), e.to_string()),
        }));
    }
    match slot.as_ref().expect("filled above") {
        Ok(c) => Ok(c.clone()),
        Err((what, detail)) => Err(Error::InvalidManifest {
            what: what.clone(),
            detail: detail.clone(),
        }),
    }
}

/// Chooses the configuration for this process: `Some` to use this one, `None` for none at all
/// (short names are then Docker Hub's, nothing is rewritten), whatever the host's files say.
pub fn set(conf: Option<RegistriesConf>) {
    *CONF.lock().unwrap_or_else(|p| p.into_inner()) = Some(Ok(conf.map(Arc::new)));
}

/// Reads the host's files again at next use (after they changed).
pub fn reload() {
    *CONF.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// What a failed read said (its `what` and `detail`), kept to say it again.
type Failure = (String, String);

type Loaded = std::result::Result<Option<Arc<RegistriesConf>>, Failure>;

static CONF: Mutex<Option<Loaded>> = Mutex::new(None);

impl RegistriesConf {
    /// Reads the files `paths` names; `None` when there are none.
    pub fn load(paths: &Paths) -> Result<Option<RegistriesConf>> {
        let user_file = paths
            .home
            .as_ref()
            .map(|h| h.join(".config/containers/registries.conf"));
        let user_dir = paths
            .home
            .as_ref()
            .map(|h| h.join(".config/containers/registries.conf.d"));
        let (main, dirs): (PathBuf, Vec<PathBuf>) = match (&paths.env_file, &user_file) {
            (Some(f), _) => (
                f.clone(),
                [Some(paths.system_dir.clone()), user_dir]
                    .into_iter()
                    .flatten()
                    .collect(),
            ),
            (None, Some(u)) if u.exists() => (u.clone(), user_dir.into_iter().collect()),
            (None, _) => (
                paths.system_file.clone(),
                [Some(paths.system_dir.clone()), user_dir]
                    .into_iter()
                    .flatten()
                    .collect(),
            ),
        };
        let mut conf = RegistriesConf::default();
        match std::fs::read_to_string(&main) {
            Ok(text) => conf.merge(parse(&main, &text)?, main.clone()),
            // A file named by the environment must be there.
            Err(e) if paths.env_file.is_some() => return Err(bad(&main, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bad(&main, e)),
        }
        for dir in dirs {
            let mut confs: Vec<PathBuf> = match std::fs::read_dir(&dir) {
                Ok(entries) => entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "conf") && p.is_file())
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(bad(&dir, e)),
            };
            confs.sort();
            for f in confs {
                let text = std::fs::read_to_string(&f).map_err(|e| bad(&f, e))?;
                conf.merge(parse(&f, &text)?, f);
            }
        }
        Ok((!conf.files.is_empty()).then_some(conf))
    }

    fn merge(&mut self, file: RegistriesConf, path: PathBuf) {
        self.files.push(path);
        self.registries.extend(file.registries);
        if file.search.is_some() {
            self.search = file.search;
        }
        if file.mode.is_some() {
            self.mode = file.mode;
        }
        for (k, v) in file.aliases {
            match v.is_empty() {
                true => self.aliases.remove(&k),
                false => self.aliases.insert(k, v),
            };
        }
    }

    /// The fully qualified names a short name (no registry host in it) stands for, in the
    /// order to try them: its alias, else the search registries (one for enforcing mode).
    /// `name` may carry a tag or digest; `None` when `name` is not short.
    pub fn resolve_short(&self, name: &str) -> Option<Result<Vec<String>>> {
        if !is_short(name) {
            return None;
        }
        let (repo, suffix) = split_suffix(name);
        // An alias names a repository; Docker's `library/` is implied for one-part names only
        // at Docker Hub, which the alias spells out.
        if let Some(target) = self.aliases.get(repo) {
            return Some(Ok(vec![format!("{target}{suffix}")]));
        }
        let search = self.search.clone().unwrap_or_default();
        let qualify = |registry: &str| {
            if (registry == "docker.io" || registry == "index.docker.io") && !repo.contains('/') {
                format!("docker.io/library/{repo}{suffix}")
            } else {
                format!("{registry}/{repo}{suffix}")
            }
        };
        Some(
            match (search.len(), self.mode.unwrap_or(ShortNameMode::Enforcing)) {
                (0, _) => Err(Error::InvalidReference {
                    reference: name.to_string(),
                    detail: format!(
                    "a short name, with no alias for it and no unqualified-search-registries in {}",
                    self.sources()
                ),
                }),
                (1, _) => Ok(vec![qualify(&search[0])]),
                (_, ShortNameMode::Enforcing) => Err(Error::InvalidReference {
                    reference: name.to_string(),
                    detail: format!(
                        "an ambiguous short name: it may be on any of {} (short-name-mode is \
                     enforcing in {}): name the registry, or add an [aliases] entry",
                        search.join(", "),
                        self.sources()
                    ),
                }),
                _ => Ok(search.iter().map(|r| qualify(r)).collect()),
            },
        )
    }

    /// The `[[registry]]` whose prefix matches `reference` (`host/repo:tag` or `@digest`)
    /// longest.
    pub fn find(&self, reference: &str) -> Option<&RegistryConf> {
        self.registries
            .values()
            .filter(|r| matching_prefix(reference, &r.prefix).is_some())
            .max_by_key(|r| r.prefix.len())
    }

    /// Where a pull of `reference` goes (`by_digest`: the pull names a digest), or an error
    /// when its registry is blocked.
    pub fn endpoints(&self, reference: &str, by_digest: bool) -> Result<Endpoints> {
        let Some(r) = self.find(reference) else {
            return Ok(Endpoints {
                primary: reference.to_string(),
                insecure: false,
                mirrors: Vec::new(),
            });
        };
        if r.blocked {
            return Err(Error::registry(
                reference,
                format!(
                    "pulls from {} are blocked (registries.conf: {})",
                    r.prefix,
                    self.sources()
                ),
            ));
        }
        let rewrite = |location: &str| -> String {
            if location.is_empty() {
                return reference.to_string();
            }
            let at = matching_prefix(reference, &r.prefix).unwrap_or(0);
            format!("{location}{}", &reference[at..])
        };
        let mirrors = r
            .mirrors
            .iter()
            .filter(|m| match m.pull_from {
                PullFromMirror::All => true,
                PullFromMirror::DigestOnly => by_digest,
                PullFromMirror::TagOnly => !by_digest,
            })
            .map(|m| (rewrite(&m.location), m.insecure))
            .collect();
        Ok(Endpoints {
            primary: rewrite(&r.location),
            insecure: r.insecure,
            mirrors,
        })
    }

    /// The files read, for messages.
    pub fn sources(&self) -> String {
        self.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether `name` names no registry: its first component has no `.` or `:` and is not
/// `localhost`, and there is more than one component or none at all.
pub fn is_short(name: &str) -> bool {
    let (repo, _) = split_suffix(name);
    match repo.split_once('/') {
        Some((first, _)) => !(first.contains('.') || first.contains(':') || first == "localhost"),
        None => true,
    }
}

/// `repo` and its `:tag` / `@digest` suffix.
fn split_suffix(name: &str) -> (&str, &str) {
    let cut = match name.find('@') {
        Some(at) => name[..at]
            .rfind(':')
            .filter(|c| !name[c + 1..at].contains('/'))
            .unwrap_or(at),
        None => name
            .rfind(':')
            .filter(|c| !name[c + 1..].contains('/'))
            .unwrap_or(name.len()),
    };
    name.split_at(cut)
}

/// Where `prefix` ends in `reference` if it matches: the whole of it, or followed by `/`, `:`
/// or `@`; `*.domain` matches the subdomains of `domain` in the host.
fn matching_prefix(reference: &str, prefix: &str) -> Option<usize> {
    let end = if let Some(domain) = prefix.strip_prefix('*') {
        // ".example.com" inside the host part.
        let at = reference.find(domain)?;
        if reference[..at].contains('/') {
            return None;
        }
        at + domain.len()
    } else {
        if !reference.starts_with(prefix) {
            return None;
        }
        prefix.len()
    };
    match reference.as_bytes().get(end) {
        None | Some(b'/' | b':' | b'@') => Some(end),
        _ => None,
    }
}

/// One file's settings.
fn parse(path: &Path, text: &str) -> Result<RegistriesConf> {
    use toml_edit::{DocumentMut, Item};
    let doc: DocumentMut = text.parse().map_err(|e| bad(path, e))?;
    let string = |item: Option<&Item>, key: &str| -> Result<Option<String>> {
        match item {
            None => Ok(None),
            Some(i) => i
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| bad(path, format!("{key}: not a string"))),
        }
    };
    let boolean = |item: Option<&Item>, key: &str| -> Result<bool> {
        match item {
            None => Ok(false),
            Some(i) => i
                .as_bool()
                .ok_or_else(|| bad(path, format!("{key}: not true or false"))),
        }
    };
    let strings = |item: &Item, key: &str| -> Result<Vec<String>> {
        let a = item
            .as_array()
            .ok_or_else(|| bad(path, format!("{key}: not a list")))?;
        a.iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(path, format!("{key}: not a list of strings")))
            })
            .collect()
    };
    let mut conf = RegistriesConf::default();
    if let Some(item) = doc.get("unqualified-search-registries") {
        conf.search = Some(strings(item, "unqualified-search-registries")?);
    }
    if let Some(mode) = string(doc.get("short-name-mode"), "short-name-mode")? {
        conf.mode = Some(match mode.as_str() {
            "enforcing" => ShortNameMode::Enforcing,
            "permissive" => ShortNameMode::Permissive,
            "disabled" => ShortNameMode::Disabled,
            m => {
                return Err(bad(
                    path,
                    format!("short-name-mode {m:?}: not enforcing, permissive or disabled"),
                ))
            }
        });
    }
    if let Some(aliases) = doc.get("aliases") {
        let t = aliases
            .as_table_like()
            .ok_or_else(|| bad(path, "[aliases]: not a table"))?;
        for (k, v) in t.iter() {
            let v = v
                .as_str()
                .ok_or_else(|| bad(path, format!("alias {k:?}: not a string")))?;
            if v.is_empty() {
                // Resets an alias an earlier file set.
                conf.aliases.insert(k.to_string(), String::new());
                continue;
            }
            if is_short(v) {
                return Err(bad(
                    path,
                    format!("alias {k:?} = {v:?}: not a fully qualified name"),
                ));
            }
            if !split_suffix(v).1.is_empty() {
                return Err(bad(
                    path,
                    format!("alias {k:?} = {v:?}: names a tag or digest, not a repository"),
                ));
            }
            conf.aliases.insert(k.to_string(), v.to_string());
        }
    }
    // Version 1: [registries.search] registries = [...], and .insecure / .block.
    if let Some(v1) = doc.get("registries").and_then(Item::as_table_like) {
        let list = |key: &str| -> Result<Vec<String>> {
            match v1
                .get(key)
                .and_then(Item::as_table_like)
                .and_then(|t| t.get("registries"))
            {
                Some(i) => strings(i, &format!("registries.{key}")),
                None => Ok(Vec::new()),
            }
        };
        let search = list("search")?;
        if !search.is_empty() {
            conf.search = Some(search);
        }
        for (key, insecure) in [("insecure", true), ("block", false)] {
            for host in list(key)? {
                let e = conf.registries.entry(host.clone()).or_insert(RegistryConf {
                    prefix: host.clone(),
                    location: host,
                    insecure: false,
                    blocked: false,
                    mirrors: Vec::new(),
                });
                if insecure {
                    e.insecure = true;
                } else {
                    e.blocked = true;
                }
            }
        }
    }
    if let Some(registries) = doc.get("registry") {
        let tables = registries
            .as_array_of_tables()
            .ok_or_else(|| bad(path, "registry: not a list of [[registry]] tables"))?;
        for t in tables.iter() {
            let location = string(t.get("location"), "location")?.unwrap_or_default();
            let prefix = string(t.get("prefix"), "prefix")?.unwrap_or_default();
            let prefix = match (prefix.is_empty(), location.is_empty()) {
                (true, true) => return Err(bad(path, "a [[registry]] with neither prefix nor location")),
                (true, false) => location.clone(),
                (false, true) if !prefix.starts_with("*.") => {
                    return Err(bad(path, format!("[[registry]] {prefix:?}: no location (only a *.domain prefix may go without)")))
                }
                _ => prefix,
            };
            if t.get("pull-from-mirror").is_some() {
                return Err(bad(
                    path,
                    format!("[[registry]] {prefix:?}: pull-from-mirror belongs to a mirror"),
                ));
            }
            let by_digest_only = boolean(t.get("mirror-by-digest-only"), "mirror-by-digest-only")?;
            let mut mirrors = Vec::new();
            if let Some(ms) = t.get("mirror") {
                let ms = ms.as_array_of_tables().ok_or_else(|| {
                    bad(
                        path,
                        format!("[[registry]] {prefix:?}: mirror: not [[registry.mirror]] tables"),
                    )
                })?;
                for m in ms.iter() {
                    let location = string(m.get("location"), "mirror location")?
                        .filter(|l| !l.is_empty())
                        .ok_or_else(|| {
                            bad(
                                path,
                                format!("[[registry]] {prefix:?}: a mirror without a location"),
                            )
                        })?;
                    let per_mirror = string(m.get("pull-from-mirror"), "pull-from-mirror")?;
                    if by_digest_only && per_mirror.as_deref().is_some_and(|p| !p.is_empty()) {
                        return Err(bad(
                            path,
                            format!("[[registry]] {prefix:?}: mirror-by-digest-only and a mirror's pull-from-mirror both set"),
                        ));
                    }
                    let pull_from = match per_mirror.as_deref() {
                        None | Some("") | Some("all") if by_digest_only => {
                            PullFromMirror::DigestOnly
                        }
                        None | Some("") | Some("all") => PullFromMirror::All,
                        Some("digest-only") => PullFromMirror::DigestOnly,
                        Some("tag-only") => PullFromMirror::TagOnly,
                        Some(p) => {
                            return Err(bad(
                                path,
                                format!("pull-from-mirror {p:?}: not all, digest-only or tag-only"),
                            ))
                        }
                    };
                    mirrors.push(Mirror {
                        location: location.trim_end_matches('/').to_string(),
                        insecure: boolean(m.get("insecure"), "mirror insecure")?,
                        pull_from,
                    });
                }
            }
            conf.registries.insert(
                prefix.clone(),
                RegistryConf {
                    location: location.trim_end_matches('/').to_string(),
                    insecure: boolean(t.get("insecure"), "insecure")?,
                    blocked: boolean(t.get("blocked"), "blocked")?,
                    prefix,
                    mirrors,
                },
            );
        }
    }
    Ok(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(files: &[(&str, &str)]) -> (tempfile::TempDir, Paths) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let paths = Paths {
            env_file: None,
            home: Some(dir.path().join("home")),
            system_file: dir.path().join("etc/registries.conf"),
            system_dir: dir.path().join("etc/registries.conf.d"),
        };
        (dir, paths)
    }

    #[test]
    fn no_file_no_configuration() {
        let (_d, paths) = conf(&[]);
        assert!(RegistriesConf::load(&paths).unwrap().is_none());
    }

    #[test]
    fn prefixes_rewrite_and_the_longest_wins() {
        let (_d, paths) = conf(&[(
            "etc/registries.conf",
            r#"
[[registry]]
prefix = "example.com/foo"
location = "internal.local:5000/bar"
insecure = true
[[registry.mirror]]
location = "mirror.local/m"
[[registry.mirror]]
location = "digests.local"
pull-from-mirror = "digest-only"

[[registry]]
location = "example.com"
blocked = true

[[registry]]
prefix = "*.wild.io"
insecure = true
"#,
        )]);
        let c = RegistriesConf::load(&paths).unwrap().unwrap();
        let e = c.endpoints("example.com/foo/app:1", false).unwrap();
        assert_eq!(e.primary, "internal.local:5000/bar/app:1");
        assert!(e.insecure);
        assert_eq!(e.mirrors, vec![("mirror.local/m/app:1".to_string(), false)]);
        let d = "example.com/foo/app@sha256:".to_string() + &"a".repeat(64);
        let e = c.endpoints(&d, true).unwrap();
        assert_eq!(e.mirrors.len(), 2);
        assert!(e.mirrors[1].0.starts_with("digests.local/app@sha256:"));
        // "example.com/foobar" is not under the prefix "example.com/foo".
        assert!(c.endpoints("example.com/foobar:1", false).is_err());
        assert!(
            c.endpoints("example.com/other:1", false).is_err(),
            "blocked"
        );
        let e = c.endpoints("a.wild.io/x:1", false).unwrap();
        assert_eq!(e.primary, "a.wild.io/x:1");
        assert!(e.insecure);
        assert!(c.find("wild.io/x:1").is_none());
        assert!(c.find("other.org/x:1").is_none());
    }

    #[test]
    fn short_names_aliases_and_search() {
        let (_d, paths) = conf(&[
            (
                "etc/registries.conf",
                "unqualified-search-registries = [\"quay.io\", \"docker.io\"]\n",
            ),
            (
                "etc/registries.conf.d/10-aliases.conf",
                "[aliases]\n\"ubuntu\" = \"docker.io/library/ubuntu\"\n",
            ),
            (
                "home/.config/containers/registries.conf.d/20-mode.conf",
                "short-name-mode = \"permissive\"\n",
            ),
        ]);
        let c = RegistriesConf::load(&paths).unwrap().unwrap();
        assert_eq!(c.files.len(), 3);
        assert_eq!(
            c.resolve_short("ubuntu:24.04").unwrap().unwrap(),
            vec!["docker.io/library/ubuntu:24.04"]
        );
        assert_eq!(
            c.resolve_short("app").unwrap().unwrap(),
            vec!["quay.io/app", "docker.io/library/app"]
        );
        assert!(c.resolve_short("quay.io/app:1").is_none());
        assert!(c.resolve_short("localhost/app").is_none());
        assert!(c.resolve_short("127.0.0.1:5000/app").is_none());
    }

    #[test]
    fn enforcing_refuses_an_ambiguous_short_name() {
        let (_d, paths) = conf(&[(
            "etc/registries.conf",
            "unqualified-search-registries = [\"quay.io\", \"docker.io\"]\n",
        )]);
        let c = RegistriesConf::load(&paths).unwrap().unwrap();
        let e = c.resolve_short("app:1").unwrap().unwrap_err().to_string();
        assert!(
            e.contains("ambiguous") && e.contains("quay.io, docker.io"),
            "{e}"
        );
    }

    #[test]
    fn the_users_file_replaces_the_systems() {
        let (_d, paths) = conf(&[
            (
                "etc/registries.conf",
                "unqualified-search-registries = [\"sys.io\"]\n",
            ),
            (
                "etc/registries.conf.d/a.conf",
                "[aliases]\n\"x\" = \"sys.io/x\"\n",
            ),
            (
                "home/.config/containers/registries.conf",
                "unqualified-search-registries = [\"user.io\"]\n",
            ),
        ]);
        let c = RegistriesConf::load(&paths).unwrap().unwrap();
        assert_eq!(c.search, Some(vec!["user.io".to_string()]));
        assert!(
            c.aliases.is_empty(),
            "the system's drop-ins are not read then"
        );
    }

    #[test]
    fn version_one_lists() {
        let (_d, paths) = conf(&[(
            "etc/registries.conf",
            "[registries.search]\nregistries = ['one.io']\n[registries.insecure]\nregistries = ['plain.local:5000']\n[registries.block]\nregistries = ['bad.io']\n",
        )]);
        let c = RegistriesConf::load(&paths).unwrap().unwrap();
        assert_eq!(c.search, Some(vec!["one.io".to_string()]));
        assert!(c.endpoints("plain.local:5000/a:1", false).unwrap().insecure);
        assert!(c.endpoints("bad.io/a:1", false).is_err());
    }

    #[test]
    fn bad_files_say_where() {
        for text in [
            "unqualified-search-registries = \"one\"\n",
            "short-name-mode = \"lax\"\n",
            "[[registry]]\nprefix = \"a.io\"\n",
            "[[registry]]\nlocation = \"a.io\"\npull-from-mirror = \"all\"\n",
            "[[registry]]\nlocation = \"a.io\"\n[[registry.mirror]]\nlocation = \"m.io\"\npull-from-mirror = \"sometimes\"\n",
            "[aliases]\n\"x\" = \"x\"\n",
            "this is = not toml [",
        ] {
            let (_d, paths) = conf(&[("etc/registries.conf", text)]);
            let e = RegistriesConf::load(&paths).unwrap_err().to_string();
            assert!(e.contains("registries.conf"), "{text}: {e}");
        }
    }
}
