//! Registries that serve an anonymous client without any token (a local registry, many
//! private ones). oci-client, holding auth for a registry but no token, asks it for one
//! (`GET /v2/`) before every request, and a registry that wants none gives none: a round trip
//! per request. So whether a registry wants auth is probed once, alongside the first request,
//! and where it wants none, requests go without: blobs through a client that holds no auth,
//! manifests by a plain GET (anything but a `200` goes through oci-client as before, so its
//! errors are said as before).

use std::time::Duration;

use crate::Digest;

/// Whether the registry at `base` (`http(s)://host[:port]`) challenges an anonymous client:
/// its `/v2/` answers with `WWW-Authenticate`. An answer that does not come (within
/// `timeout`) counts as a challenge: requests then go as before.
pub(super) async fn challenged(client: &reqwest::Client, base: &str, timeout: Duration) -> bool {
    let asked = client.get(format!("{base}/v2/")).send();
    match tokio::time::timeout(timeout, asked).await {
        Ok(Ok(r)) => r.headers().contains_key(reqwest::header::WWW_AUTHENTICATE),
        _ => true,
    }
}

/// The manifest at `url` (`…/v2/<repository>/manifests/<tag or digest>`) by a plain GET, as
/// oci-client would ask for it without auth; `None` for any answer but a `200` whose
/// `Docker-Content-Digest` (if any) is the digest of the bytes: the caller asks again through
/// oci-client, which says what went wrong.
pub(super) async fn manifest(
    client: &reqwest::Client,
    url: &str,
    accept: &[&str],
    max: u64,
) -> Option<Vec<u8>> {
    let r = client
        .get(url)
        .header(reqwest::header::ACCEPT, accept.join(", "))
        .send()
        .await
        .ok()?;
    if r.status() != reqwest::StatusCode::OK || r.content_length().is_some_and(|n| n > max) {
        return None;
    }
    let said = r
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().map(str::to_string));
    // Read as it comes, never past `max` (an answer without a length could be endless).
    let mut r = r;
    let mut bytes = Vec::new();
    while let Some(chunk) = r.chunk().await.ok()? {
        if (bytes.len() + chunk.len()) as u64 > max {
            return None;
        }
        bytes.extend_from_slice(&chunk);
    }
    match said {
        None => {}
        Some(Ok(d)) if d.parse::<Digest>().ok() == Some(Digest::of(&bytes)) => {}
        Some(_) => return None,
    }
    Some(bytes)
}
