//! The HTTP clients' common ground: rustls' crypto provider, the system's root certificates
//! (read once per process), and the timeouts every request to a registry is held to.

use oci_client::client::{ClientConfig, ClientProtocol};

use super::{RegistryOptions, CONNECT_TIMEOUT, REQUEST_TIMEOUT};
use std::time::Duration;

/// The timeouts in effect for one registry.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub(super) connect: Duration,
    pub(super) request: Duration,
}

impl Timeouts {
    pub(super) fn of(opts: &RegistryOptions) -> Timeouts {
        Timeouts {
            connect: opts.connect_timeout.unwrap_or(CONNECT_TIMEOUT),
            request: opts.request_timeout.unwrap_or(REQUEST_TIMEOUT),
        }
    }
}

/// Installs ring as rustls' process-wide crypto provider, unless one is already: this crate's
/// HTTP clients (oci-client's, reqwest's) are built without a provider of their own, and every one
/// is made after this call. A program that installs its own provider first keeps it.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means another provider is installed, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The system's root certificates (DER), read once per process: an HTTP client given none
/// reads and parses them itself (a few ms of CPU each, and a pull makes several clients, its
/// mount's daemon more). Only those rustls accepts as roots: one it refuses would fail the
/// client. Empty where none are found: clients then look for themselves, as before.
pub(crate) fn native_roots() -> &'static [Vec<u8>] {
    static ROOTS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut check = rustls::RootCertStore::empty();
        rustls_native_certs::load_native_certs()
            .certs
            .into_iter()
            .filter(|c| check.add(c.clone()).is_ok())
            .map(|c| c.to_vec())
            .collect()
    })
}

pub(super) fn client_config(plain: Vec<String>, t: Timeouts) -> ClientConfig {
    install_crypto_provider();
    let roots = native_roots()
        .iter()
        .map(|der| oci_client::client::Certificate {
            encoding: oci_client::client::CertificateEncoding::Der,
            data: der.clone(),
        })
        .collect();
    ClientConfig {
        protocol: ClientProtocol::HttpsExcept(plain),
        connect_timeout: Some(t.connect),
        read_timeout: Some(t.request),
        tls_certs_only: roots,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_client::Client;

    #[test]
    fn clients_get_the_system_roots_read_once() {
        let roots = native_roots();
        assert!(std::ptr::eq(roots, native_roots()));
        let config = client_config(Vec::new(), Timeouts::of(&RegistryOptions::default()));
        assert_eq!(config.tls_certs_only.len(), roots.len());
        // Every root is one the client takes: building it does not fail (oci-client would
        // fall back to a client without our protocol and timeouts).
        assert!(Client::try_from(config).is_ok());
    }
}
