//! oci-client's and reqwest's errors as this crate's: not found, refused, or a registry error
//! that says whether trying again later can help (transient), with the causes spelled out.

use oci_client::errors::{OciDistributionError, OciErrorCode};

use crate::Error;

/// Turns oci-client's errors into ours, naming the image.
pub(super) fn map_error(reference: &str, e: OciDistributionError) -> Error {
    let reference = reference.to_string();
    match e {
        OciDistributionError::AuthenticationFailure(detail) => {
            Error::Unauthorized { reference, detail }
        }
        OciDistributionError::UnauthorizedError { url } => Error::Unauthorized {
            reference,
            detail: format!("the registry refused access to {url}"),
        },
        OciDistributionError::ImageManifestNotFoundError(detail) => Error::NotFound {
            reference,
            detail: format!(" ({detail})"),
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let detail = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                Error::NotFound {
                    reference,
                    detail: format!(" ({detail})"),
                }
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                Error::Unauthorized { reference, detail }
            } else {
                let too_many = codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Toomanyrequests));
                Error::Registry {
                    reference,
                    detail,
                    status: too_many.then_some(429),
                    transient: too_many,
                    source: None,
                }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => Error::NotFound {
            reference,
            detail: String::new(),
        },
        OciDistributionError::ServerError {
            code: 401 | 403,
            message,
            ..
        } => Error::Unauthorized {
            reference,
            detail: message,
        },
        OciDistributionError::ServerError { code, url, message } => Error::Registry {
            reference,
            detail: format!("{url} answered {code}{}", said(&message)),
            status: Some(code),
            transient: transient_status(code),
            source: None,
        },
        OciDistributionError::RequestError(e) => {
            let status = e.status().map(|s| s.as_u16());
            Error::Registry {
                reference,
                detail: with_causes(&e),
                status,
                transient: status.map_or_else(|| transient_request(&e), transient_status),
                source: Some(Box::new(e)),
            }
        }
        OciDistributionError::IoError(e) => Error::Registry {
            reference,
            detail: with_causes(&e),
            status: None,
            transient: transient_io(e.kind()),
            source: Some(Box::new(e)),
        },
        other => Error::Registry {
            reference,
            detail: with_causes(&other),
            status: None,
            transient: false,
            source: Some(Box::new(other)),
        },
    }
}

/// `": message"`, or nothing for an empty message.
fn said(message: &str) -> String {
    let m = message.trim();
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

/// Statuses that say "later": request timeout, too many requests, the server's own trouble.
fn transient_status(code: u16) -> bool {
    code == 408 || code == 429 || (500..600).contains(&code)
}

/// A request that got no answer: nothing listening, the name not resolved, no answer in time,
/// the connection broken while the answer came.
fn transient_request(e: &reqwest::Error) -> bool {
    // A certificate the client does not trust fails the same way next time.
    let said = with_causes(e).to_ascii_lowercase();
    if said.contains("certificate") || said.contains("tls") || said.contains("handshake") {
        return false;
    }
    e.is_connect() || e.is_timeout() || e.is_body() || e.is_request() && !e.is_builder()
}

/// I/O failures of the connection (not of the local disk).
fn transient_io(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        kind,
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | NotConnected
            | BrokenPipe
            | TimedOut
            | UnexpectedEof
            | Interrupted
    )
}

/// What broke a download, with the underlying causes (connection reset, timeout, ...).
#[doc(hidden)]
pub fn describe_io(e: &std::io::Error) -> String {
    with_causes(e)
}

/// An error's message followed by its causes ("error sending request: connection refused"),
/// each said once: reqwest's top message alone hides what went wrong.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = c.source();
    }
    out
}
