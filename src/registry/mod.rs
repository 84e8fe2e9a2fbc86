//! Talking to an OCI Distribution registry: resolving a reference to a manifest (through an
//! index to the wanted platform) and streaming blobs. Built on `oci-client`'s raw-manifest and
//! streaming-blob calls — never its `pull()`, which buffers whole layers in memory.
//!
//! Registries on `localhost`, `127.0.0.0/8` and `::1` are spoken to over plain HTTP, as Docker
//! does; [`RegistryOptions::insecure`] adds others.

mod anonymous;
pub mod conf;
mod held;
mod identity;
pub mod manifest;
mod redirect;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
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

/// The timeouts in effect for one registry.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    connect: Duration,
    request: Duration,
}

impl Timeouts {
    fn of(opts: &RegistryOptions) -> Timeouts {
        Timeouts {
            connect: opts.connect_timeout.unwrap_or(CONNECT_TIMEOUT),
            request: opts.request_timeout.unwrap_or(REQUEST_TIMEOUT),
        }
    }
}

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

fn client_config(plain: Vec<String>, t: Timeouts) -> ClientConfig {
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
fn quick_reference(s: &str) -> Option<Reference> {
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

/// The auth to send, or a Docker identity token to exchange for it.
fn credentials_for(registry: &str, creds: &Credentials) -> (RegistryAuth, Option<String>) {
    let auth = match creds {
        Credentials::Anonymous => RegistryAuth::Anonymous,
        Credentials::Basic { username, password } => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        Credentials::Auto => {
            let key = if registry == "docker.io" || registry == "index.docker.io" {
                "https://index.docker.io/v1/"
            } else {
                registry
            };
            match docker_credential::get_credential(key) {
                Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => {
                    RegistryAuth::Basic(u, p)
                }
                Ok(docker_credential::DockerCredential::IdentityToken(t)) => {
                    return (RegistryAuth::Anonymous, Some(t));
                }
                Err(_) => RegistryAuth::Anonymous,
            }
        }
    };
    (auth, None)
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

    /// Streams a blob. The caller verifies the digest (the store does, while writing).
    pub async fn blob_stream(&self, digest: &Digest) -> Result<BlobStream> {
        for m in &self.mirrors {
            match m.blob_stream_here(digest).await {
                Ok(s) => return Ok(s),
                Err(e) => tracing::debug!("mirror {}: {e}", m.reference.registry()),
            }
        }
        self.blob_stream_here(digest).await
    }

    async fn blob_stream_here(&self, digest: &Digest) -> Result<BlobStream> {
        let once = || self.answered("a blob request", self.blob_stream_once(digest));
        match once().await {
            Err(Error::Unauthorized { .. }) if self.renew().await? => once().await,
            r => r,
        }
    }

    async fn blob_stream_once(&self, digest: &Digest) -> Result<BlobStream> {
        // Blob calls take no auth argument: the client holds the registry's, if it wants any.
        let client = self.blob_client().await?;
        let d = digest.to_string();
        // Asked for as the range from byte 0 on, which oci-client does not hash: the store
        // checks the digest while it writes the blob, and oci-client's second sha256 of every
        // blob was ~6% of a pull's CPU. A registry that ignores ranges answers 200, and
        // oci-client checks that one as well; one that refuses the range (416: an empty blob)
        // gets the plain request.
        let sized = match client
            .pull_blob_stream_partial(&self.reference, d.as_str(), 0, None)
            .await
        {
            Ok(BlobResponse::Partial(s) | BlobResponse::Full(s)) => s,
            Err(OciDistributionError::ServerError { code: 416, .. }) => client
                .pull_blob_stream(&self.reference, d.as_str())
                .await
                .map_err(|e| self.err(e))?,
            Err(e) => return Err(self.err(e)),
        };
        // oci-client checks the digest of a whole answer too and reports a mismatch as a last
        // stream error; our own check (while storing) reports it with the layer named, so end
        // the stream there.
        Ok(sized
            .stream
            .take_while(|r| {
                let client_digest_check = r.as_ref().err().is_some_and(|e| {
                    e.get_ref()
                        .and_then(|i| i.downcast_ref::<DigestError>())
                        .is_some_and(|d| matches!(d, DigestError::VerificationError { .. }))
                });
                std::future::ready(!client_digest_check)
            })
            .boxed())
    }
}

/// What a Range request got back.
#[doc(hidden)]
pub enum RangeBody {
    /// `206`: just the range asked for.
    Partial(BlobStream),
    /// `200`: the registry ignored the Range and sends the whole blob.
    Full(BlobStream),
}

/// A blob's bytes as they arrive.
#[doc(hidden)]
pub type BlobStream = futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>;

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

    /// Requests `len` bytes of a blob from `offset` (the caller verifies them).
    ///
    /// A lazy mount sends many of these. With stored credentials oci-client asks the registry
    /// for a token before each one, and for a registry that needs no auth, gets none and asks
    /// again next time: a round trip per read. So a registry that serves an anonymous client
    /// without a token (probed once, by a separate client) gets requests without auth.
    ///
    /// A mirror that answers a range with the whole blob does not hold the blob yet: a
    /// pull-through cache (the Distribution registry's proxy mode) then fetches it from the
    /// origin to store it, and streams another copy from the origin to the client. That answer
    /// is dropped at once (the cache's own copy goes on), the range is asked of the next mirror
    /// or the registry itself, and the mirror is not asked for that blob again for a while
    /// (see [`held`]): a cache then costs the origin one copy of each blob.
    pub async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<RangeBody> {
        for m in &self.mirrors {
            match m.blob_range_if_held(digest, offset, len, false).await {
                Ok(Some(s)) => return Ok(s),
                Ok(None) => {}
                Err(e) => tracing::debug!("mirror {}: {e}", m.reference.registry()),
            }
        }
        match self.blob_range_here(digest, offset, len).await {
            Ok(body) => Ok(body),
            Err(e) => {
                // The registry failed: a mirror's whole blob beats nothing (one that ignores
                // ranges, or a cache still filling).
                for m in &self.mirrors {
                    if let Ok(body) = m.blob_range_here(digest, offset, len).await {
                        return Ok(body);
                    }
                }
                Err(e)
            }
        }
    }

    /// The range from this mirror if it holds the blob (`None`: it does not, yet). `patient`:
    /// for background work, which gives the mirror the whole request timeout to answer, not
    /// [`MIRROR_ANSWER`].
    async fn blob_range_if_held(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        patient: bool,
    ) -> Result<Option<RangeBody>> {
        let cell = self.holding.cell(digest);
        let mut verdict = cell.lock().await;
        if verdict.holds() {
            drop(verdict);
            return match self.mirror_range(digest, offset, len, patient).await {
                Ok(RangeBody::Partial(s)) => Ok(Some(RangeBody::Partial(s))),
                // Evicted from the cache since, or the mirror failed: asked again later.
                Ok(RangeBody::Full(_)) => {
                    cell.lock().await.not_yet();
                    Ok(None)
                }
                Err(e) => {
                    cell.lock().await.not_yet();
                    Err(e)
                }
            };
        }
        if verdict.wait() {
            return Ok(None);
        }
        // Unknown (or asked long enough ago): one request at a time finds out, so that
        // concurrent reads do not each start a copy from the origin.
        let answer = match self.mirror_range(digest, offset, len, patient).await {
            Ok(a) => a,
            Err(e) => {
                verdict.not_yet(); // failing or slow: left alone for a while too
                return Err(e);
            }
        };
        match answer {
            RangeBody::Partial(s) => {
                *verdict = held::Verdict::Holds;
                Ok(Some(RangeBody::Partial(s)))
            }
            RangeBody::Full(whole) => {
                drop(whole); // closes the connection: the cache's copy to us stops
                verdict.not_yet();
                tracing::info!(
                    "mirror {} does not hold blob {} yet (it answered a range with the whole \
                     blob): asking elsewhere",
                    self.reference.registry(),
                    digest.short()
                );
                Ok(None)
            }
        }
    }

    /// A range from this mirror, given [`MIRROR_ANSWER`] to answer: a read waiting on it has
    /// the registry to turn to.
    async fn mirror_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        patient: bool,
    ) -> Result<RangeBody> {
        if patient {
            return self.blob_range_here(digest, offset, len).await;
        }
        match tokio::time::timeout(MIRROR_ANSWER, self.blob_range_here(digest, offset, len)).await {
            Ok(r) => r,
            Err(_) => Err(Error::registry_transient(
                self.reference.whole(),
                format!("no answer to a range request within {MIRROR_ANSWER:?}"),
            )),
        }
    }

    /// The whole blob from a mirror that holds it, else from the registry, except where a
    /// mirror is fetching it: then `None`, to ask again later (a lazy layer's completion, which
    /// is in no hurry, waits for the cache rather than have the origin send the blob twice).
    /// Mirrors are asked for one byte first: only a mirror that holds a blob answers a range
    /// with just that range.
    pub async fn blob_stream_held(&self, digest: &Digest) -> Result<Option<BlobStream>> {
        let mut fetching = None;
        for m in &self.mirrors {
            match m.blob_range_if_held(digest, 0, 1, true).await {
                Ok(Some(_probe)) => match m.blob_stream_here(digest).await {
                    Ok(s) => return Ok(Some(s)),
                    Err(e) => tracing::debug!("mirror {}: {e}", m.reference.registry()),
                },
                Ok(None) => fetching = Some(m.reference.registry().to_string()),
                Err(e) => tracing::debug!("mirror {}: {e}", m.reference.registry()),
            }
        }
        if let Some(mirror) = fetching {
            tracing::debug!("mirror {mirror} does not hold blob {} yet", digest.short());
            return Ok(None);
        }
        self.blob_stream_here(digest).await.map(Some)
    }

    async fn blob_range_here(&self, digest: &Digest, offset: u64, len: u64) -> Result<RangeBody> {
        let once = || self.answered("a range request", self.blob_range_once(digest, offset, len));
        match once().await {
            Err(Error::Unauthorized { .. }) if self.renew().await? => once().await,
            r => r,
        }
    }

    async fn blob_range_once(&self, digest: &Digest, offset: u64, len: u64) -> Result<RangeBody> {
        if !matches!(self.auth, RegistryAuth::Bearer(_)) && self.identity.is_none() {
            if let Some(body) = self.redirects.range(digest, offset, len).await {
                return Ok(body);
            }
        }
        let client = self.blob_client().await?;
        let d = digest.to_string();
        let body = client
            .pull_blob_stream_partial(&self.reference, d.as_str(), offset, Some(len))
            .await
            .map_err(|e| self.err(e))?;
        Ok(match body {
            BlobResponse::Partial(s) => RangeBody::Partial(s.stream.boxed()),
            BlobResponse::Full(s) => RangeBody::Full(s.stream.boxed()),
        })
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

/// The same repository and tag or digest on another registry host.
fn rehost(reference: &Reference, host: &str) -> Reference {
    retarget(reference, host, reference.repository())
}

/// The tag or digest of `reference` in another repository (a mirror's).
fn retarget(reference: &Reference, host: &str, repository: &str) -> Reference {
    match reference.digest() {
        Some(d) => Reference::with_digest(host.to_string(), repository.to_string(), d.to_string()),
        None => Reference::with_tag(
            host.to_string(),
            repository.to_string(),
            reference.tag().unwrap_or("latest").to_string(),
        ),
    }
}

/// Checks credentials against `registry` (`host[:port]`): a manifest request for a repository
/// that need not exist answers 401 to bad credentials and 404 to good ones.
pub async fn verify_login(registry: &str, opts: &RegistryOptions) -> Result<()> {
    // The probe's name and URL are ours, not the user's: errors name the registry instead.
    let probe_name = format!("{registry}/bux-fuse/login-check:probe");
    let probe = parse_reference(&probe_name)
        .map_err(|_| Error::registry(registry, "not a registry host[:port]"))?;
    match Registry::new(&probe, opts).manifest(&probe).await {
        Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
        Err(Error::Unauthorized { .. }) => Err(Error::Unauthorized {
            reference: registry.to_string(),
            detail: "the registry refused these credentials (wrong user name or password)".into(),
        }),
        Err(e) => {
            let said = e
                .to_string()
                .replace("/v2/bux-fuse/login-check/manifests/probe", "/v2/")
                .replace(&probe_name, registry)
                .replace(&probe.whole(), registry);
            let prefix = format!("{registry}: ");
            let said = said.strip_prefix(&prefix).unwrap_or(&said);
            let said = said.strip_prefix("registry error: ").unwrap_or(said);
            // (No source: its words name the probe, which `said` has replaced.)
            Err(Error::Registry {
                reference: registry.to_string(),
                detail: said.to_string(),
                status: e.status(),
                transient: e.is_transient(),
                source: None,
            })
        }
    }
}

/// Stores credentials for `registry` in Docker's `config.json` (`$DOCKER_CONFIG`, else
/// `~/.docker`), keeping everything else in the file; returns the file's path.
pub fn save_docker_login(
    registry: &str,
    username: &str,
    password: &str,
) -> Result<std::path::PathBuf> {
    use base64::Engine as _;
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".docker")
        });
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let path = dir.join("config.json");
    let mut config: serde_json::Value = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::InvalidManifest {
            what: path.display().to_string(),
            detail: e.to_string(),
        })?,
        Err(_) => serde_json::json!({}),
    };
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    if !config["auths"].is_object() {
        config["auths"] = serde_json::json!({});
    }
    config["auths"][registry] = serde_json::json!({ "auth": auth });
    let bytes = serde_json::to_vec_pretty(&config)
        .map_err(|e| Error::io("encoding config.json", e.into()))?;
    crate::store::write_atomic_mode(&path, &bytes, 0o600)?;
    Ok(path)
}

/// Turns oci-client's errors into ours, naming the image.
fn map_error(reference: &str, e: OciDistributionError) -> Error {
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
pub(crate) fn transient_status(code: u16) -> bool {
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
pub(crate) fn transient_io(kind: std::io::ErrorKind) -> bool {
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
    fn clients_get_the_system_roots_read_once() {
        let roots = native_roots();
        assert!(std::ptr::eq(roots, native_roots()));
        let config = client_config(Vec::new(), Timeouts::of(&RegistryOptions::default()));
        assert_eq!(config.tls_certs_only.len(), roots.len());
        // Every root is one the client takes: building it does not fail (oci-client would
        // fall back to a client without our protocol and timeouts).
        assert!(Client::try_from(config).is_ok());
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
