//! Where a blob's bytes really are. Registries backed by object storage (S3, GCS) or fronted by
//! a CDN answer a blob GET with a redirect to a signed URL; through oci-client every Range
//! request pays that hop again (the registry round trip, its auth, then the storage). A lazy
//! mount sends many ranges per blob, so the target is learned once per blob and the ranges go
//! straight there until it stops working (signed URLs expire), when it is learned again.
//!
//! Only what can be probed cheaply is cached: an anonymous or basic-auth registry answering
//! the probe with a redirect. Anything else (bearer tokens, no redirect, an error) goes
//! through oci-client as before. Credentials are never sent to the redirect target.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{BlobStream, RangeBody};
use crate::Digest;

/// A learned target is re-learned after this long (signed URLs last longer than this).
const TTL: Duration = Duration::from_secs(300);

#[derive(Clone)]
enum Target {
    /// The registry serves the blob itself (or could not be probed): use oci-client.
    Registry,
    /// Being probed: use oci-client meanwhile.
    Probing,
    /// Redirected here, learned at this time.
    Url(String, Instant),
}

/// Learned redirect targets, per blob.
pub struct Redirects {
    client: reqwest::Client,
    /// `http(s)://host` of the registry.
    base: String,
    repository: String,
    basic: Option<(String, String)>,
    targets: Mutex<HashMap<Digest, Target>>,
}

impl Redirects {
    /// For blobs of `repository` at `base` (`http://host:port` or `https://host`).
    pub fn new(
        base: String,
        repository: String,
        basic: Option<(String, String)>,
        connect_timeout: Duration,
    ) -> Redirects {
        super::install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout);
        let roots = super::native_roots();
        if !roots.is_empty() {
            builder = builder.tls_certs_only(
                roots
                    .iter()
                    .filter_map(|der| reqwest::Certificate::from_der(der).ok()),
            );
        }
        let client = builder.build().unwrap_or_default();
        Redirects {
            client,
            base,
            repository,
            basic,
            targets: Mutex::new(HashMap::new()),
        }
    }

    /// The client it asks with (it follows no redirect).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `http(s)://host[:port]` of the registry.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Target>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where to send ranges of `digest`: `None` means through the registry (oci-client). An
    /// unknown blob is probed in the background — its first ranges go through the registry
    /// meanwhile — so learning costs no read a round trip.
    async fn target(self: &std::sync::Arc<Self>, digest: &Digest) -> Option<String> {
        {
            let mut map = self.lock();
            match map.get(digest) {
                Some(Target::Registry) | Some(Target::Probing) => return None,
                Some(Target::Url(u, at)) if at.elapsed() < TTL => return Some(u.clone()),
                _ => {
                    map.insert(*digest, Target::Probing);
                }
            }
        }
        let me = self.clone();
        let digest = *digest;
        tokio::spawn(async move {
            let learned = me.probe(&digest).await;
            me.lock().insert(digest, learned);
        });
        None
    }

    async fn probe(&self, digest: &Digest) -> Target {
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repository);
        let mut req = self.client.get(&url).header("Range", "bytes=0-0");
        if let Some((u, p)) = &self.basic {
            req = req.basic_auth(u, Some(p));
        }
        match req.send().await {
            Ok(r) if r.status().is_redirection() => r
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .and_then(|l| reqwest::Url::parse(&url).ok()?.join(l).ok())
                .map(|u| Target::Url(u.to_string(), Instant::now())),
            _ => None,
        }
        .unwrap_or(Target::Registry)
    }

    /// Fetches `len` bytes from `offset` straight from the learned target, if there is one
    /// (`None`: go through the registry). A target that fails is forgotten.
    pub async fn range(
        self: &std::sync::Arc<Self>,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Option<RangeBody> {
        let url = self.target(digest).await?;
        let end = offset + len - 1;
        let resp = self
            .client
            .get(&url)
            .header("Range", format!("bytes={offset}-{end}"))
            .send()
            .await;
        let ok = |s: reqwest::StatusCode| s.as_u16() == 206 || s.as_u16() == 200;
        match resp {
            Ok(r) if ok(r.status()) => {
                let partial = r.status().as_u16() == 206;
                let stream: BlobStream = r
                    .bytes_stream()
                    .map(|b| b.map_err(std::io::Error::other))
                    .boxed();
                Some(if partial {
                    RangeBody::Partial(stream)
                } else {
                    RangeBody::Full(stream)
                })
            }
            other => {
                tracing::debug!(
                    "redirect target for {digest} failed ({:?}): asking the registry again",
                    other.map(|r| r.status())
                );
                self.lock().remove(digest);
                None
            }
        }
    }
}
