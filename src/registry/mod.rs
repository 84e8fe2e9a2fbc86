//! Talking to an OCI Distribution registry: resolving a reference to a manifest (through an
//! index to the wanted platform) and streaming blobs. Built on `oci-client`'s raw-manifest and
//! streaming-blob calls — never its `pull()`, which buffers whole layers in memory.
//!
//! Registries on `localhost`, `127.0.0.0/8` and `::1` are spoken to over plain HTTP, as Docker
//! does; [`RegistryOptions::insecure`] adds others.

mod anonymous;
mod blobs;
mod client;
pub mod conf;
mod errors;
mod held;
mod identity;
mod login;
pub mod manifest;
mod redirect;
mod reference;

pub use blobs::{BlobStream, RangeBody};
pub use client::install_crypto_provider;
pub(crate) use client::native_roots;
use client::{client_config, Timeouts};
pub use errors::describe_io;
use errors::map_error;
use login::credentials_for;
pub use login::{save_docker_login, verify_login};
#[cfg(test)]
pub(crate) use reference::sample_references;
pub use reference::{is_loopback, parse_reference};
use reference::{rehost, retarget};

use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use std::time::Duration;

use crate::{Digest, Error, Result};

/// Who we are to the registry.
#[derive(Debug, Clone, Default)]
pub enum Credentials {
    /// Docker's `config.json` (`$DOCKER_CONFIG`, credential helpers), else anonymous.
    #[default]
    Auto,
    /// No credentials.
    Anonymous,
    /// A user name and password (or token).
    Basic {
        /// User name.
        username: String,
        /// Password or token.
        password: String,
    },
}

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Credentials.
    pub credentials: Credentials,
    /// Extra `host[:port]`s to speak plain HTTP to.
    pub insecure: Vec<String>,
    /// Mirrors (`host[:port]`, same repository paths) tried first for anything named by
    /// digest — blobs, and manifests by digest — falling back to the registry itself. Whatever
    /// they serve is verified as if it came from the registry. (Pull-through caches and P2P
    /// distribution serve fleets this way.)
    pub mirrors: Vec<String>,
    /// How long to wait for a connection (default [`CONNECT_TIMEOUT`]).
    pub connect_timeout: Option<Duration>,
    /// How long the registry may take to answer a request, and to send more of an answer
    /// that has started (default [`REQUEST_TIMEOUT`]). Past it the call fails with a
    /// transient [`Error::Registry`]; a layer download resumes instead, up to
    /// [`crate::PullOptions::stall_timeout`].
    pub request_timeout: Option<Duration>,
}

/// How long a mirror may take to answer a lazy read's range request before the registry is
/// asked instead (reads wait 5 s by default).
const MIRROR_ANSWER: Duration = Duration::from_secs(2);

/// How long a connection to a registry may take by default (a registry that is up accepts in
/// milliseconds; one that is down should not hold a VM's start for long).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a registry may take to answer by default (or to send the next bytes of an answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A registry client for one repository.
#[doc(hidden)]
pub struct Registry {
    /// Replaced when an identity token's access token is renewed (oci-client keeps the auth
    /// it was first given per registry).
    client: std::sync::RwLock<Client>,
    auth: RegistryAuth,
    reference: Reference,
    /// Registries spoken to over plain HTTP (to make a probe client like `client`).
    plain: Vec<String>,
    /// Whether requests need auth at all (see [`anonymous`]).
    needs_auth: tokio::sync::OnceCell<bool>,
    /// A client that never holds auth, for a registry that wants none (made on first use).
    bare: std::sync::OnceLock<Client>,
    /// Clients for the mirrors, tried in order.
    mirrors: Vec<Registry>,
    /// A Docker identity token (an OAuth2 refresh token) from config.json, exchanged for the
    /// access tokens below on first use instead of being sent itself.
    identity: Option<String>,
    /// Access tokens got for `identity`: to pull, and to push (renewed when refused: they
    /// expire, and a lazy mount outlives them).
    exchanged: [tokio::sync::Mutex<Option<(RegistryAuth, std::time::Instant)>>; 2],
    /// Redirect targets of blobs, learned once each (see [`redirect`]).
    redirects: std::sync::Arc<redirect::Redirects>,
    timeouts: Timeouts,
    /// A mirror asked for tags too (a registries.conf mirror), not only for digests.
    serves_tags: bool,
    /// As a mirror: which blobs it holds, as far as its answers told.
    holding: held::Holding,
}

impl Registry {
    /// A client for the repository of `reference`.
    pub fn new(reference: &Reference, opts: &RegistryOptions) -> Registry {
        let registry = reference.registry().to_string();
        let mut plain: Vec<String> = opts.insecure.clone();
        if is_loopback(&registry) || plain.contains(&registry) {
            plain.push(registry.clone());
            plain.push(reference.resolve_registry().to_string());
        }
        let timeouts = Timeouts::of(opts);
        let mirror_opts = RegistryOptions {
            credentials: Credentials::Auto,
            insecure: opts.insecure.clone(),
            mirrors: Vec::new(),
            ..opts.clone()
        };
        let mirrors = opts
            .mirrors
            .iter()
            .filter(|m| **m != registry)
            .map(|m| Registry::new(&rehost(reference, m), &mirror_opts))
            .collect();
        let (auth, identity) = credentials_for(&registry, &opts.credentials);
        let scheme = if plain.contains(&registry) {
            "http"
        } else {
            "https"
        };
        let redirects = std::sync::Arc::new(redirect::Redirects::new(
            format!("{scheme}://{}", reference.resolve_registry()),
            reference.repository().to_string(),
            match &auth {
                RegistryAuth::Basic(u, p) => Some((u.clone(), p.clone())),
                _ => None,
            },
            timeouts.connect,
        ));
        Registry {
            client: std::sync::RwLock::new(Client::new(client_config(plain.clone(), timeouts))),
            redirects,
            auth,
            reference: reference.clone(),
            plain,
            needs_auth: tokio::sync::OnceCell::new(),
            bare: std::sync::OnceLock::new(),
            mirrors,
            identity,
            exchanged: Default::default(),
            timeouts,
            serves_tags: false,
            holding: Default::default(),
        }
    }

    /// A client to pull `reference` (the name the store keys it by) from where
    /// registries.conf sends it ([`conf`]): its registry's `location`, with the mirrors the
    /// `[[registry]]` lists asked first (for tags too, as podman does) and then those of
    /// [`RegistryOptions::mirrors`]. A blocked registry is refused.
    pub fn for_pull(reference: &Reference, opts: &RegistryOptions) -> Result<Registry> {
        let Some(conf) = conf::global()? else {
            return Ok(Registry::new(reference, opts));
        };
        let whole = reference.whole();
        let ends = conf.endpoints(&whole, reference.digest().is_some())?;
        let primary = parse_reference(&ends.primary)?;
        let with_insecure = |host: &str, insecure: bool| {
            let mut o = opts.clone();
            if insecure {
                o.insecure.push(host.to_string());
            }
            o
        };
        let mut reg = Registry::new(&primary, &with_insecure(primary.registry(), ends.insecure));
        let mut mirrors = Vec::new();
        for (location, insecure) in &ends.mirrors {
            let m = parse_reference(location)?;
            let mut mirror = Registry::new(
                &m,
                &RegistryOptions {
                    credentials: Credentials::Auto,
                    mirrors: Vec::new(),
                    ..with_insecure(m.registry(), *insecure)
                },
            );
            mirror.serves_tags = true;
            mirrors.push(mirror);
        }
        mirrors.append(&mut reg.mirrors);
        reg.mirrors = mirrors;
        Ok(reg)
    }

    /// `call`, or a transient error once the registry has taken longer than the request
    /// timeout to answer it (a server that accepts and never answers holds nothing).
    async fn answered<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeouts.request, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::Registry {
                reference: self.reference.whole(),
                detail: format!(
                    "no answer to {what} from {} within {} s",
                    self.reference.registry(),
                    self.timeouts.request.as_secs_f64()
                ),
                status: None,
                transient: true,
                source: Some(Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut))),
            }),
        }
    }

    /// The auth for pulls (`push`: for pushes): the configured one, or an access token got for
    /// the identity token.
    async fn auth(&self, push: bool) -> Result<RegistryAuth> {
        let Some(identity) = &self.identity else {
            return Ok(self.auth.clone());
        };
        let mut slot = self.exchanged[push as usize].lock().await;
        if let Some((token, _)) = &*slot {
            return Ok(token.clone());
        }
        let token = self.exchange(identity, push).await?;
        *slot = Some((token.clone(), std::time::Instant::now()));
        Ok(token)
    }

    async fn exchange(&self, identity: &str, push: bool) -> Result<RegistryAuth> {
        let scheme = if self.plain.iter().any(|p| p == self.reference.registry()) {
            "http"
        } else {
            "https"
        };
        identity::exchange(
            &format!("{scheme}://{}", self.reference.resolve_registry()),
            self.reference.registry(),
            self.reference.repository(),
            push,
            identity,
        )
        .await
        .map(RegistryAuth::Bearer)
    }

    /// After a refusal: a new access token for the identity token, if there is one (the old
    /// one expired). Returns whether there is something new to try.
    async fn renew(&self) -> Result<bool> {
        let Some(identity) = &self.identity else {
            return Ok(false);
        };
        let mut slot = self.exchanged[0].lock().await;
        // Concurrent fetches refused at once: the first renews, the others retry with it.
        if slot
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < std::time::Duration::from_secs(2))
        {
            return Ok(true);
        }
        let token = self.exchange(identity, false).await?;
        // oci-client falls back to the auth it was first given: a new client takes the new
        // token.
        let fresh = Client::new(client_config(self.plain.clone(), self.timeouts));
        fresh
            .store_auth_if_needed(self.reference.resolve_registry(), &token)
            .await;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        *slot = Some((token, std::time::Instant::now()));
        Ok(true)
    }

    /// The oci-client in use (cheap to clone: its state is shared).
    fn client(&self) -> Client {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn err(&self, e: OciDistributionError) -> Error {
        map_error(&self.reference.whole(), e)
    }

    /// Fetches the manifest (or index) `reference` names; returns its bytes and digest. A
    /// reference by digest is checked against the bytes received.
    pub async fn manifest(&self, reference: &Reference) -> Result<(Vec<u8>, Digest)> {
        for m in &self.mirrors {
            if reference.digest().is_some() || m.serves_tags {
                let there = retarget(reference, m.reference.registry(), m.reference.repository());
                match m.manifest_here(&there).await {
                    Ok(found) => return Ok(found),
                    Err(e) => tracing::debug!("mirror {}: {e}", m.reference.registry()),
                }
            }
        }
        self.manifest_here(reference).await
    }

    async fn manifest_here(&self, reference: &Reference) -> Result<(Vec<u8>, Digest)> {
        let once = || self.answered("a manifest request", self.manifest_once(reference));
        match once().await {
            Err(Error::Unauthorized { .. }) if self.renew().await? => once().await,
            r => r,
        }
    }

    async fn manifest_once(&self, reference: &Reference) -> Result<(Vec<u8>, Digest)> {
        let auth = self.auth(false).await?;
        let direct = match self.plain_manifest_url(reference) {
            Some(url) => {
                let client = self.redirects.client();
                anonymous::manifest(client, &url, manifest::ACCEPT, manifest::MAX_MANIFEST).await
            }
            None => None,
        };
        let bytes = match direct {
            Some(bytes) => bytes::Bytes::from(bytes),
            None => {
                // Whether the registry wants auth at all is learned meanwhile (for the
                // requests that follow); not waited for once the answer is here.
                let client = self.client();
                let call = client.pull_manifest_raw(reference, &auth, manifest::ACCEPT);
                let probe = self.needs_auth();
                tokio::pin!(call, probe);
                let mut probing = self.needs_auth.get().is_none();
                loop {
                    tokio::select! {
                        r = &mut call => break r.map_err(|e| self.err(e))?.0,
                        _ = &mut probe, if probing => probing = false,
                    }
                }
            }
        };
        if bytes.len() as u64 > manifest::MAX_MANIFEST {
            return Err(Error::InvalidManifest {
                what: format!("manifest of {}", reference.whole()),
                detail: format!(
                    "{} bytes, more than the {} accepted",
                    bytes.len(),
                    manifest::MAX_MANIFEST
                ),
            });
        }
        let actual = Digest::of(&bytes);
        if let Some(want) = reference.digest() {
            let want: Digest = want.parse().map_err(|e| Error::InvalidReference {
                reference: reference.whole(),
                detail: format!("{e}"),
            })?;
            if want != actual {
                return Err(Error::DigestMismatch {
                    what: format!("manifest of {}", reference.whole()),
                    expected: want,
                    actual,
                });
            }
        }
        Ok((bytes.to_vec(), actual))
    }
}

impl Registry {
    /// The repository reference this client was made for.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// Whether requests to this registry need auth at all (probed once, see [`anonymous`]).
    async fn needs_auth(&self) -> bool {
        *self
            .needs_auth
            .get_or_init(|| async {
                if !matches!(self.auth, RegistryAuth::Anonymous) || self.identity.is_some() {
                    return true;
                }
                anonymous::challenged(
                    self.redirects.client(),
                    self.redirects.base(),
                    self.timeouts.request,
                )
                .await
            })
            .await
    }

    /// Learns ahead what the first blob request needs (whether the registry wants auth, the
    /// client that follows from it), so that a lazy mount's first read does not wait for it.
    #[doc(hidden)]
    pub async fn warm_up(&self) {
        let _ = self.blob_client().await;
    }

    /// The client for blob requests: one sending auth if the registry wants any, else one
    /// that holds none (oci-client would ask for a token before each request).
    async fn blob_client(&self) -> Result<Client> {
        let auth = self.auth(false).await?;
        if self.needs_auth().await {
            let client = self.client();
            client
                .store_auth_if_needed(self.reference.resolve_registry(), &auth)
                .await;
            return Ok(client);
        }
        Ok(self
            .bare
            .get_or_init(|| Client::new(client_config(self.plain.clone(), self.timeouts)))
            .clone())
    }

    /// Where a plain GET finds the manifest `reference` names, when the registry is known to
    /// want no auth (see [`anonymous`]).
    fn plain_manifest_url(&self, reference: &Reference) -> Option<String> {
        if self.needs_auth.get() != Some(&false)
            || reference.resolve_registry() != self.reference.resolve_registry()
            || reference.namespace().is_some()
        {
            return None;
        }
        let at = match reference.digest() {
            Some(d) => d,
            None => reference.tag().unwrap_or("latest"),
        };
        Some(format!(
            "{}/v2/{}/manifests/{at}",
            self.redirects.base(),
            reference.repository()
        ))
    }

    /// Digests of the manifests that refer to `subject` with this artifact type (referrers API,
    /// else the `sha256-<hex>` tag schema); empty when there are none.
    pub async fn referrers(&self, subject: &Digest, artifact_type: &str) -> Result<Vec<Digest>> {
        let r = self.reference.clone_with_digest(subject.to_string());
        let index = self
            .blob_client()
            .await?
            .pull_referrers(&r, Some(artifact_type))
            .await
            .map_err(|e| self.err(e))?;
        Ok(index
            .manifests
            .iter()
            .filter(|m| m.artifact_type.as_deref() == Some(artifact_type))
            .filter_map(|m| m.digest.parse().ok())
            .collect())
    }

    /// Uploads a blob (skipped when the registry has it).
    pub async fn push_blob(&self, digest: &Digest, bytes: Vec<u8>) -> Result<()> {
        self.client()
            .auth(
                &self.reference,
                &self.auth(true).await?,
                oci_client::RegistryOperation::Push,
            )
            .await
            .map_err(|e| self.err(e))?;
        let d = digest.to_string();
        if self
            .client()
            .blob_exists(&self.reference, &d)
            .await
            .unwrap_or(false)
        {
            return Ok(());
        }
        self.client()
            .push_blob(&self.reference, bytes, &d)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Uploads a manifest under `reference` (a tag or a digest of this repository).
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> Result<()> {
        self.client()
            .auth(
                reference,
                &self.auth(true).await?,
                oci_client::RegistryOperation::Push,
            )
            .await
            .map_err(|e| self.err(e))?;
        let ct = http::HeaderValue::from_str(media_type).map_err(|e| Error::InvalidManifest {
            what: "manifest".into(),
            detail: e.to_string(),
        })?;
        self.client()
            .push_manifest_raw(reference, bytes, ct)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}
