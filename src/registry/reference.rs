//! Image references: parsing them (without the grammar's regex where a quick check vouches for
//! the string), telling loopback registries, and the same image named on a mirror's host.

use oci_client::Reference;

use crate::{Error, Result};

/// Parses a reference (`[registry/]repository[:tag][@digest]`), defaulting as Docker does.
#[doc(hidden)]
pub fn parse_reference(s: &str) -> Result<Reference> {
    // The full grammar is a regex that takes tens of milliseconds to compile, once per process
    // (twice per mount: the command and its daemon): built from the parts when the quick
    // normalization vouches for the string.
    if let Some(r) = quick_reference(s) {
        return Ok(r);
    }
    s.parse::<Reference>().map_err(|e| Error::InvalidReference {
        reference: s.to_string(),
        detail: e.to_string(),
    })
}

/// `s` as [`Reference`] parses it, without the regex, when [`crate::source::quick_normalize`]
/// accepts it (`None`: let the parser decide).
pub(super) fn quick_reference(s: &str) -> Option<Reference> {
    let whole = crate::source::quick_normalize(s)?;
    let (name, digest) = match whole.split_once('@') {
        Some((n, d)) => (n, Some(d.to_string())),
        None => (whole.as_str(), None),
    };
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t.to_string())),
        _ => (name, None),
    };
    let (domain, repo) = path.split_once('/')?;
    let (domain, repo) = (domain.to_string(), repo.to_string());
    Some(match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(domain, repo, t, d),
        (Some(t), None) => Reference::with_tag(domain, repo, t),
        (None, Some(d)) => Reference::with_digest(domain, repo, d),
        (None, None) => return None,
    })
}

/// Whether `registry` (`host[:port]`) is on the loopback interface.
#[doc(hidden)]
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(registry)
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The same repository and tag or digest on another registry host.
pub(super) fn rehost(reference: &Reference, host: &str) -> Reference {
    retarget(reference, host, reference.repository())
}

/// The tag or digest of `reference` in another repository (a mirror's).
pub(super) fn retarget(reference: &Reference, host: &str, repository: &str) -> Reference {
    match reference.digest() {
        Some(d) => Reference::with_digest(host.to_string(), repository.to_string(), d.to_string()),
        None => Reference::with_tag(
            host.to_string(),
            repository.to_string(),
            reference.tag().unwrap_or("latest").to_string(),
        ),
    }
}

/// References of every shape (registry with port, nested paths, tags, digests, Docker Hub
/// short names), for tests of the parsers.
#[cfg(test)]
pub(crate) fn sample_references() -> Vec<String> {
    let d = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    vec![
        "debian".to_string(),
        "debian:bookworm".into(),
        "library/debian:12.1".into(),
        "user/app".into(),
        "127.0.0.1:5000/library/debian:bookworm".into(),
        "localhost/app:v1".into(),
        "localhost:5000/a/b/c:tag_1".into(),
        "localhost:5000/a".into(),
        "quay.io/org/app-name.x:V1.2".into(),
        "docker.io/debian".into(),
        "index.docker.io/debian".into(),
        format!("debian@{d}"),
        format!("localhost:5000/a@{d}"),
        format!("reg.io/app:v1@{d}"),
        "my_app__x/y".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries() {
        for (r, want) in [
            ("localhost:5000", true),
            ("127.0.0.1:5000", true),
            ("127.1.2.3", true),
            ("[::1]:5000", true),
            ("docker.io", false),
            ("10.0.0.1:5000", false),
            ("localhost.example.com", false),
        ] {
            assert_eq!(is_loopback(r), want, "{r}");
        }
    }

    #[test]
    fn references_built_without_the_regex_are_the_parsers() {
        for s in sample_references() {
            let full: Reference = s.parse().unwrap();
            let quick = parse_reference(&s).unwrap();
            assert_eq!(
                (
                    quick.registry(),
                    quick.repository(),
                    quick.tag(),
                    quick.digest()
                ),
                (
                    full.registry(),
                    full.repository(),
                    full.tag(),
                    full.digest()
                ),
                "{s}"
            );
            assert_eq!(quick.whole(), full.whole(), "{s}");
        }
        assert!(quick_reference("127.0.0.1:5000/bench/lazy:bookworm").is_some());
    }
}
