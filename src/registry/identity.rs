//! Docker identity tokens: what `docker login` stores as `identitytoken` in `config.json` for
//! registries that log in through OAuth2 (Azure Container Registry, some self-hosted token
//! servers). It is a refresh token, never sent to the registry itself: it is exchanged at the
//! registry's token endpoint (`grant_type=refresh_token`) for an access token of one scope.

use crate::{Error, Result};

/// The access token for `repository` (pull, or pull and push) at the registry whose base URL
/// is `base` (`scheme://host[:port]`), in exchange for the refresh token `identity`.
pub(super) async fn exchange(
    base: &str,
    registry: &str,
    repository: &str,
    push: bool,
    identity: &str,
) -> Result<String> {
    let err = |detail: String| Error::Unauthorized {
        reference: registry.to_string(),
        detail,
    };
    super::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| err(format!("making an HTTP client: {e}")))?;
    let ping = http
        .get(format!("{base}/v2/"))
        .send()
        .await
        .map_err(|e| err(format!("asking {base}/v2/ where to authenticate: {e}")))?;
    let challenge = ping
        .headers()
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|h| h.to_str().ok())
        .and_then(parse_bearer_challenge)
        .ok_or_else(|| {
            err(
                "config.json has an identity token for this registry, but the registry \
                 names no token endpoint (no Bearer challenge)"
                    .into(),
            )
        })?;
    let scope = format!(
        "repository:{repository}:{}",
        if push { "pull,push" } else { "pull" }
    );
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", identity),
        ("client_id", "bux-fuse"),
        ("scope", scope.as_str()),
    ];
    if let Some(service) = &challenge.service {
        form.push(("service", service));
    }
    let body: String = form
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let res = http
        .post(&challenge.realm)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        .map_err(|e| {
            err(format!(
                "exchanging the identity token at {}: {e}",
                challenge.realm
            ))
        })?;
    let status = res.status();
    if !status.is_success() {
        return Err(err(format!(
            "the token endpoint {} refused the identity token from Docker's config.json \
             (HTTP {status}): log in again",
            challenge.realm
        )));
    }
    let reply: serde_json::Value = res
        .json()
        .await
        .map_err(|e| err(format!("reading the token endpoint's answer: {e}")))?;
    reply
        .get("access_token")
        .or_else(|| reply.get("token"))
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| {
            err(format!(
                "the token endpoint {} sent no access token",
                challenge.realm
            ))
        })
}

/// A `WWW-Authenticate: Bearer realm="…",service="…",…` challenge.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    realm: String,
    service: Option<String>,
}

fn parse_bearer_challenge(header: &str) -> Option<Challenge> {
    let rest = header.trim().strip_prefix("Bearer ")?;
    let (mut realm, mut service) = (None, None);
    // key="value" pairs separated by commas; values are quoted and may hold commas.
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            after.split_once(',').unwrap_or((after, ""))
        };
        match key.trim() {
            "realm" => realm = Some(value.to_string()),
            "service" => service = Some(value.to_string()),
            _ => {}
        }
        s = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        realm: realm?,
        service,
    })
}

/// `application/x-www-form-urlencoded` escaping.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_and_form_escaping() {
        assert_eq!(
            parse_bearer_challenge(
                r#"Bearer realm="https://auth.example/token",service="reg, one",scope="repository:a:pull""#
            ),
            Some(Challenge {
                realm: "https://auth.example/token".into(),
                service: Some("reg, one".into()),
            })
        );
        assert_eq!(
            parse_bearer_challenge(r#"Bearer service="x""#),
            None,
            "no realm"
        );
        assert_eq!(parse_bearer_challenge(r#"Basic realm="x""#), None);
        assert_eq!(urlencode("a b/c:d,e=f&"), "a%20b%2Fc%3Ad%2Ce%3Df%26");
    }
}
