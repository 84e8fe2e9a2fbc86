//! Reading blobs: whole (a pull's layers, from the first mirror that has them) or by range (a
//! lazy mount's reads), with mirrors that are still fetching a blob passed over.

use futures_util::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::secrets::RegistryAuth;

use super::{held, Registry, MIRROR_ANSWER};
use crate::{Digest, Error, Result};

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
}
