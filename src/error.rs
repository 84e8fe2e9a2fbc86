//! The library's typed errors. Every variant names what it was working on (image, layer, entry
//! or file) so that its one-line `Display` is enough to act on.

use std::path::PathBuf;

use crate::Digest;

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in bux-fuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The reference could not be parsed.
    #[error("invalid image reference {reference:?}: {detail}")]
    InvalidReference {
        /// What the user gave.
        reference: String,
        /// Why it is invalid.
        detail: String,
    },
    /// The registry (or the local store, for a pull policy of `never`) has no such image.
    #[error("{reference}: image not found{detail}")]
    NotFound {
        /// The image reference.
        reference: String,
        /// Extra detail (may be empty).
        detail: String,
    },
    /// The registry refused our credentials, or wants some.
    #[error("{reference}: unauthorized: {detail}")]
    Unauthorized {
        /// The image reference.
        reference: String,
        /// The registry's words.
        detail: String,
    },
    /// Any other failure talking to the registry: the connection (refused, reset, timed out,
    /// name not resolved), or an answer that is neither the thing asked for nor "not found" /
    /// "unauthorized". [`Error::is_transient`] says whether trying again later may help;
    /// [`Error::status`] gives the HTTP status when the registry answered; `source()` the
    /// transport's error.
    #[error("{reference}: registry error: {detail}")]
    Registry {
        /// The image reference (or the blob's digest).
        reference: String,
        /// The registry's or the transport's words, causes included.
        detail: String,
        /// The HTTP status of the registry's answer, if it answered.
        status: Option<u16>,
        /// Whether the failure is of the kind that passes: the connection (refused, reset, no
        /// answer within the timeout, name not resolved), 408, 429 or a 5xx status.
        transient: bool,
        /// The transport's error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// A manifest, config or layer of a type bux-fuse cannot serve as a root filesystem.
    #[error("{reference}: unsupported {what} media type {media_type:?}{hint}")]
    UnsupportedMediaType {
        /// The image reference.
        reference: String,
        /// "layer", "config" or "manifest".
        what: &'static str,
        /// The media type found.
        media_type: String,
        /// A hint such as " (a WebAssembly artifact, not a container image)".
        hint: String,
    },
    /// No manifest in an image index matches the wanted platform.
    #[error("{reference}: no image for platform {platform} (index offers: {available})")]
    NoMatchingPlatform {
        /// The image reference.
        reference: String,
        /// The platform wanted.
        platform: String,
        /// The platforms offered.
        available: String,
    },
    /// Content did not hash to what it claimed.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was checked, e.g. "layer sha256:… of reg/img:tag".
        what: String,
        /// The digest promised.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// A manifest or config that is not what the OCI spec says it must be.
    #[error("{what}: invalid: {detail}")]
    InvalidManifest {
        /// What was parsed.
        what: String,
        /// Why it is invalid.
        detail: String,
    },
    /// A layer that cannot be decompressed or parsed, or that holds an unsafe entry.
    #[error("layer {layer}: {detail}")]
    CorruptLayer {
        /// The layer's digest.
        layer: Digest,
        /// What is wrong, naming the entry when there is one.
        detail: String,
    },
    /// A tar entry refused while building the merged tree (unsafe path, bad hardlink, ...).
    #[error("layer {layer}: entry {path:?}: {detail}")]
    BadEntry {
        /// The layer's digest.
        layer: Digest,
        /// The entry's path as written in the tar.
        path: String,
        /// Why it is refused.
        detail: String,
    },
    /// A file of the store is damaged or from an incompatible version.
    #[error("store file {path}: {detail} (`bux-fuse check --repair` removes what is damaged)")]
    CorruptStore {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// An error wrapped with the image it happened to.
    #[error("{reference}: {inner}")]
    Image {
        /// The image reference.
        reference: String,
        /// The underlying error (its message is part of this one's; [`Error::inner`]).
        #[source]
        inner: Box<Error>,
    },
    /// Writing an image's disk ([`crate::disk::export`]) failed; nothing is left at `path`.
    #[error("export to {path}: {detail}")]
    Export {
        /// The file being written.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// Mounting or unmounting failed.
    #[error("mount {path}: {detail}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// Something is mounted at the mount point already (a live mount: one whose server died
    /// is replaced by [`crate::mount()`] by itself).
    #[error("mount {path}: already mounted ({what}): unmount it first")]
    AlreadyMounted {
        /// The mount point.
        path: PathBuf,
        /// What is mounted there ("docker.io/library/debian:12 by myvmm (pid 42)", "a tmpfs
        /// mount").
        what: String,
    },
    /// The image is mounted: removing it would pull its files from under the mount.
    #[error("{reference} is in use by a mount (unmount it first, or --force)")]
    InUse {
        /// The image reference.
        reference: String,
    },
    /// The signature policy (`containers-policy.json(5)`) does not accept the image: nothing
    /// of it was stored. Not transient: the image, its signatures or the policy must change.
    #[error("{reference}: rejected by signature policy {detail}")]
    PolicyRejected {
        /// The image reference.
        reference: String,
        /// The policy file, the scope matched and the rule that refused, with why
        /// (`/etc/containers/policy.json (scope "reg/app": sigstoreSigned: …)`).
        detail: String,
    },
    /// The signature policy file cannot be read or is not one bux-fuse can apply.
    #[error("signature policy {}: {detail}", path.display())]
    InvalidPolicy {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// What a lazy mount served did not match the layer it came from; the image is refused.
    #[error("{reference}: marked bad: {detail} (`bux-fuse rm` it and pull again)")]
    BadImage {
        /// The image reference.
        reference: String,
        /// What did not match.
        detail: String,
    },
    /// An I/O error, with what was being done.
    #[error("{context}: {error}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The OS error (its message is part of this one's; its kind says what happened).
        #[source]
        error: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            error: source,
        }
    }

    /// A registry failure that is not worth retrying as such (a malformed answer, say).
    pub(crate) fn registry(reference: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Registry {
            reference: reference.into(),
            detail: detail.into(),
            status: None,
            transient: false,
            source: None,
        }
    }

    /// A registry failure that may pass (the connection broke, nothing answered in time).
    pub(crate) fn registry_transient(
        reference: impl Into<String>,
        detail: impl Into<String>,
    ) -> Error {
        Error::Registry {
            reference: reference.into(),
            detail: detail.into(),
            status: None,
            transient: true,
            source: None,
        }
    }

    /// Whether the same call may succeed if tried again later, unchanged: the registry could
    /// not be reached or did not answer in time, the connection broke, or it answered 408, 429
    /// or 5xx. Not for "not found", "unauthorized", bad or corrupt content, local disk errors
    /// or a refused mount: those need something changed first.
    ///
    /// A pull already resumes broken downloads by itself ([`crate::PullOptions::stall_timeout`]);
    /// a transient error is what is left when the registry stayed away.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Registry { transient, .. } => *transient,
            Error::Image { inner, .. } => inner.is_transient(),
            _ => false,
        }
    }

    /// The HTTP status the registry answered with, where the error is its answer (404 for
    /// [`Error::NotFound`] from the registry is not reported: the variant says it).
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Registry { status, .. } => *status,
            Error::Image { inner, .. } => inner.status(),
            _ => None,
        }
    }

    /// The error itself, without the image it is wrapped with ([`Error::Image`]): what to
    /// match on.
    pub fn inner(&self) -> &Error {
        match self {
            Error::Image { inner, .. } => inner.inner(),
            e => e,
        }
    }

    /// Wraps this error with the image it happened to (once).
    pub fn for_image(self, reference: &str) -> Error {
        match self {
            e @ (Error::Image { .. }
            | Error::NotFound { .. }
            | Error::Unauthorized { .. }
            | Error::Registry { .. }
            | Error::UnsupportedMediaType { .. }
            | Error::NoMatchingPlatform { .. }) => e,
            e if e.to_string().starts_with(reference) => e,
            e => Error::Image {
                reference: reference.to_string(),
                inner: Box::new(e),
            },
        }
    }
}

/// Adds file context to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    /// Wraps an error with `what` (called only on error).
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

/// An error as one process tells another (a mount's worker its keeper, [`Error::to_wire`]):
/// the variant and its fields, so that a library caller gets from a mount served by a worker
/// process the error it gets from one served in its own (a registry's refusal, a transient
/// failure, a damaged store), not the text of one. Causes (`source`) stay behind: their words
/// are in the details.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Wire {
    NotFound {
        reference: String,
        detail: String,
    },
    Unauthorized {
        reference: String,
        detail: String,
    },
    Registry {
        reference: String,
        detail: String,
        status: Option<u16>,
        transient: bool,
    },
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    InvalidManifest {
        what: String,
        detail: String,
    },
    CorruptLayer {
        layer: Digest,
        detail: String,
    },
    CorruptStore {
        path: PathBuf,
        detail: String,
    },
    BadImage {
        reference: String,
        detail: String,
    },
    Image {
        reference: String,
        inner: Box<Wire>,
    },
    Io {
        context: String,
        /// The OS error number, where there is one (its message comes back with it).
        errno: Option<i32>,
        /// Else its kind, where it is one a caller may match on ([`IO_KINDS`]).
        #[serde(default)]
        io_kind: Option<String>,
        message: String,
    },
}

/// The kinds of an I/O error without an OS error number that keep their kind across processes.
const IO_KINDS: [std::io::ErrorKind; 11] = {
    use std::io::ErrorKind::*;
    [
        NotFound,
        PermissionDenied,
        TimedOut,
        ConnectionRefused,
        ConnectionReset,
        ConnectionAborted,
        UnexpectedEof,
        InvalidData,
        InvalidInput,
        AlreadyExists,
        WouldBlock,
    ]
};

impl Wire {
    fn of(e: &Error) -> Option<Wire> {
        Some(match e {
            Error::NotFound { reference, detail } => Wire::NotFound {
                reference: reference.clone(),
                detail: detail.clone(),
            },
            Error::Unauthorized { reference, detail } => Wire::Unauthorized {
                reference: reference.clone(),
                detail: detail.clone(),
            },
            Error::Registry {
                reference,
                detail,
                status,
                transient,
                ..
            } => Wire::Registry {
                reference: reference.clone(),
                detail: detail.clone(),
                status: *status,
                transient: *transient,
            },
            Error::DigestMismatch {
                what,
                expected,
                actual,
            } => Wire::DigestMismatch {
                what: what.clone(),
                expected: *expected,
                actual: *actual,
            },
            Error::InvalidManifest { what, detail } => Wire::InvalidManifest {
                what: what.clone(),
                detail: detail.clone(),
            },
            Error::CorruptLayer { layer, detail } => Wire::CorruptLayer {
                layer: *layer,
                detail: detail.clone(),
            },
            Error::CorruptStore { path, detail } => Wire::CorruptStore {
                path: path.clone(),
                detail: detail.clone(),
            },
            Error::BadImage { reference, detail } => Wire::BadImage {
                reference: reference.clone(),
                detail: detail.clone(),
            },
            Error::Image { reference, inner } => Wire::Image {
                reference: reference.clone(),
                inner: Box::new(Wire::of(inner)?),
            },
            Error::Io { context, error } => Wire::Io {
                context: context.clone(),
                errno: error.raw_os_error(),
                io_kind: IO_KINDS
                    .contains(&error.kind())
                    .then(|| format!("{:?}", error.kind())),
                message: error.to_string(),
            },
            _ => return None,
        })
    }

    fn into_error(self) -> Error {
        match self {
            Wire::NotFound { reference, detail } => Error::NotFound { reference, detail },
            Wire::Unauthorized { reference, detail } => Error::Unauthorized { reference, detail },
            Wire::Registry {
                reference,
                detail,
                status,
                transient,
            } => Error::Registry {
                reference,
                detail,
                status,
                transient,
                source: None,
            },
            Wire::DigestMismatch {
                what,
                expected,
                actual,
            } => Error::DigestMismatch {
                what,
                expected,
                actual,
            },
            Wire::InvalidManifest { what, detail } => Error::InvalidManifest { what, detail },
            Wire::CorruptLayer { layer, detail } => Error::CorruptLayer { layer, detail },
            Wire::CorruptStore { path, detail } => Error::CorruptStore { path, detail },
            Wire::BadImage { reference, detail } => Error::BadImage { reference, detail },
            Wire::Image { reference, inner } => Error::Image {
                reference,
                inner: Box::new(inner.into_error()),
            },
            Wire::Io {
                context,
                errno,
                io_kind,
                message,
            } => Error::Io {
                context,
                error: match errno {
                    Some(n) => std::io::Error::from_raw_os_error(n),
                    None => {
                        let kind = IO_KINDS
                            .into_iter()
                            .find(|k| io_kind.as_deref() == Some(&format!("{k:?}")))
                            .unwrap_or(std::io::ErrorKind::Other);
                        std::io::Error::new(kind, message)
                    }
                },
            },
        }
    }
}

impl Error {
    /// This error as one line of JSON for another process ([`Error::from_wire`]), if it is
    /// of a kind a caller acts on; `None` for the rest (their text is told instead).
    pub(crate) fn to_wire(&self) -> Option<String> {
        serde_json::to_string(&Wire::of(self)?).ok()
    }

    /// The error [`Error::to_wire`] made, or `None` if `line` is not one.
    pub(crate) fn from_wire(line: &str) -> Option<Error> {
        serde_json::from_str::<Wire>(line)
            .ok()
            .map(Wire::into_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a worker tells its keeper comes back as the variant it was, with what a caller
    /// acts on: transience, status, the OS error.
    #[test]
    fn errors_cross_processes_as_their_variants() {
        let registry = Error::Registry {
            reference: "127.0.0.1:5000/a:1".into(),
            detail: "connection refused".into(),
            status: Some(503),
            transient: true,
            source: None,
        }
        .for_image("127.0.0.1:5000/a:1");
        let back = Error::from_wire(&registry.to_wire().unwrap()).unwrap();
        assert!(matches!(back.inner(), Error::Registry { .. }), "{back:?}");
        assert!(back.is_transient());
        assert_eq!(back.status(), Some(503));
        assert_eq!(back.to_string(), registry.to_string());

        let wrapped = Error::io("reading x", std::io::Error::from_raw_os_error(libc::ENOSPC))
            .for_image("img");
        let back = Error::from_wire(&wrapped.to_wire().unwrap()).unwrap();
        let Error::Io { error, .. } = back.inner() else {
            panic!("{back:?}")
        };
        assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(back.to_string(), wrapped.to_string());
        // Without an OS error, its kind where a caller may match on it.
        let timed_out = Error::io(
            "fetching",
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 5 s"),
        );
        let back = Error::from_wire(&timed_out.to_wire().unwrap()).unwrap();
        let Error::Io { error, .. } = &back else {
            panic!("{back:?}")
        };
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(back.to_string(), timed_out.to_string());

        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let bad = Error::CorruptLayer {
            layer: d,
            detail: "truncated".into(),
        };
        let back = Error::from_wire(&bad.to_wire().unwrap()).unwrap();
        assert!(matches!(back, Error::CorruptLayer { layer, .. } if layer == d));

        // What a caller does not act on goes as text; text is not a wire error.
        let mount = Error::Mount {
            path: "/m".into(),
            detail: "x".into(),
        };
        assert!(mount.to_wire().is_none());
        assert!(Error::from_wire("the image is gone").is_none());
    }
}
