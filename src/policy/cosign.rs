//! Cosign signatures, as `cosign sign --key` (and `skopeo copy --sign-by-sigstore-private-key`)
//! store them in a registry, checked with the public keys of a `sigstoreSigned` requirement.
//!
//! Where: for an image manifest (or index) of digest `sha256:<hex>`, the manifest tagged
//! `sha256-<hex>.sig` in the same repository (cosign's tag convention), and the manifests that
//! refer to it with `artifactType` [`ARTIFACT_TYPE`] (OCI 1.1 referrers, as `cosign sign
//! --registry-referrers-mode=oci-1-1` writes them; the referrers API, else its tag schema
//! `sha256-<hex>`, which is what Debian's docker-registry 2.8 offers).
//!
//! What: each layer of such a manifest of media type [`SIMPLESIGNING`] is a signature: the
//! layer blob is the payload (fetched by its digest and checked against it), the annotation
//! [`SIGNATURE_ANNOTATION`] the base64 of an ECDSA P-256 SHA-256 signature (ASN.1 DER) of the
//! payload's bytes. The payload is "simple signing" JSON: `critical.type` = `cosign container
//! image signature`, `critical.image.docker-manifest-digest` = the digest signed,
//! `critical.identity.docker-reference` = the identity claimed. A signature is accepted when a
//! key verifies it, it names the digest it was found for, and its identity passes the
//! requirement's `signedIdentity`. Rekor bundles and Fulcio certificates are not read.

use base64::Engine;
use serde_json::Value;

use super::{DockerRef, KeySource, SignedIdentity};
use crate::registry::manifest::{self, Platform};
use crate::registry::Registry;
use crate::source::Source;
use crate::{Digest, Error, Result};

/// Media type of a signature layer (its blob is the payload).
pub const SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Annotation of a signature layer: base64 of the signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `artifactType` of a signature manifest found as a referrer.
pub const ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// `critical.type` of a cosign payload.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";
/// Largest payload read (real ones are a few hundred bytes).
const MAX_PAYLOAD: u64 = 1 << 20;
/// Most signatures looked at for one digest (each costs a request).
const MAX_SIGNATURES: usize = 32;

/// DER prefix of a SubjectPublicKeyInfo of an uncompressed P-256 point: SEQUENCE { SEQUENCE {
/// id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) }, the 65-byte point following.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// The OID of id-ecPublicKey, to tell another curve from another key type.
const EC_PUBLIC_KEY_OID: [u8; 9] = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// An ECDSA P-256 public key.
#[derive(Debug, Clone)]
pub(crate) struct PublicKey {
    point: Vec<u8>,
    name: String,
}

impl PublicKey {
    /// Reads a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) of an ECDSA P-256 key; `name` says
    /// which key in messages.
    pub(crate) fn from_pem(pem: &[u8], name: &str) -> std::result::Result<PublicKey, String> {
        let text = std::str::from_utf8(pem).map_err(|_| format!("key {name}: not PEM text"))?;
        let begin = "-----BEGIN PUBLIC KEY-----";
        let end = "-----END PUBLIC KEY-----";
        let start = text.find(begin).ok_or_else(|| {
            format!("key {name}: no \"{begin}\" block (a public key as `cosign generate-key-pair` or `openssl ec -pubout` writes it)")
        })?;
        let body = &text[start + begin.len()..];
        let stop = body
            .find(end)
            .ok_or_else(|| format!("key {name}: no \"{end}\""))?;
        let b64: String = body[..stop].split_whitespace().collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("key {name}: bad base64 in PEM: {e}"))?;
        if der.len() == P256_SPKI_PREFIX.len() + 65
            && der[..P256_SPKI_PREFIX.len()] == P256_SPKI_PREFIX
            && der[P256_SPKI_PREFIX.len()] == 0x04
        {
            return Ok(PublicKey {
                point: der[P256_SPKI_PREFIX.len()..].to_vec(),
                name: name.to_string(),
            });
        }
        let kind = if der
            .windows(EC_PUBLIC_KEY_OID.len())
            .any(|w| w == EC_PUBLIC_KEY_OID)
        {
            "an EC key of another curve, or a compressed point"
        } else {
            "not an EC key (RSA or Ed25519?)"
        };
        Err(format!(
            "key {name}: {kind}; only ECDSA P-256 keys (what cosign makes) are supported"
        ))
    }

    /// Reads the key a policy names.
    fn load(source: &KeySource) -> std::result::Result<PublicKey, String> {
        match source {
            KeySource::Path(p) => {
                let pem = std::fs::read(p).map_err(|e| {
                    format!(
                        "cannot read key {}: {}",
                        p.display(),
                        crate::registry::describe_io(&e)
                    )
                })?;
                PublicKey::from_pem(&pem, &p.display().to_string())
            }
            KeySource::Data(pem, i) => PublicKey::from_pem(pem, &format!("keyData #{}", i + 1)),
        }
    }

    /// Whether `sig` (ASN.1 DER) is this key's signature of `msg`.
    pub(crate) fn verifies(&self, msg: &[u8], sig: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &self.point,
        )
        .verify(msg, sig)
        .is_ok()
    }
}

/// One signature found: where, the payload's digest, the annotation's text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature {
    /// The digest it was found for (the payload must name it).
    subject: Digest,
    /// "sha256-….sig" or "referrer sha256:…", for messages.
    found_in: String,
    payload: Digest,
    signature: Option<String>,
}

/// The signatures of one image, fetched once for all the requirements of a scope.
pub(crate) struct Found<'a> {
    src: &'a Source,
    reg: &'a Registry,
    /// The digests signatures are looked up for: the reference's, the platform manifest's.
    candidates: Vec<Digest>,
    /// The platform manifest: its digest, and its bytes when they are `top`.
    platform: Option<(Digest, Option<Vec<u8>>)>,
    signatures: Option<Vec<Signature>>,
    /// The manifest a pinned manifest was made from, looked up once: Ok(digest) or why not.
    pinned: Option<std::result::Result<Digest, String>>,
    pinned_signatures: Vec<Signature>,
    payloads: std::collections::HashMap<Digest, std::result::Result<Vec<u8>, String>>,
}

impl<'a> Found<'a> {
    /// For the image whose top manifest (or index) is `top`; `want` picks the platform.
    pub(crate) fn new(
        src: &'a Source,
        top: &[u8],
        top_digest: &Digest,
        want: &Platform,
    ) -> Result<Found<'a>> {
        let Source::Registry(reg, _) = src else {
            unreachable!("signatures are read from registries only")
        };
        let mut candidates = vec![*top_digest];
        let mut platform = Some((*top_digest, Some(top.to_vec())));
        if let Ok(parsed) = serde_json::from_slice::<manifest::ManifestOrIndex>(top) {
            if parsed.is_index() {
                let entries = parsed.manifests.unwrap_or_default();
                platform = manifest::select(&entries, want)
                    .and_then(|d| d.digest.parse::<Digest>().ok())
                    .map(|d| (d, None));
                if let Some((d, _)) = &platform {
                    if d != top_digest {
                        candidates.push(*d);
                    }
                }
            }
        }
        Ok(Found {
            src,
            reg,
            candidates,
            platform,
            signatures: None,
            pinned: None,
            pinned_signatures: Vec::new(),
            payloads: Default::default(),
        })
    }

    /// `Ok(Ok(()))` when a signature satisfies the requirement, `Ok(Err(why))` when none does,
    /// `Err` when the registry could not be asked.
    pub(crate) async fn verify(
        &mut self,
        keys: &[KeySource],
        identity: &SignedIdentity,
        intended: &DockerRef,
    ) -> Result<std::result::Result<(), String>> {
        let mut loaded = Vec::new();
        for k in keys {
            match PublicKey::load(k) {
                Ok(k) => loaded.push(k),
                Err(why) => return Ok(Err(why)),
            }
        }
        if self.signatures.is_none() {
            let mut all = Vec::new();
            for c in self.candidates.clone() {
                all.extend(self.signatures_of(&c).await?);
            }
            self.signatures = Some(all);
        }
        let mut reasons = Vec::new();
        let sigs = self.signatures.clone().unwrap_or_default();
        for s in &sigs {
            match self.check(s, &loaded, identity, intended).await? {
                Ok(()) => return Ok(Ok(())),
                Err(why) => reasons.push(why),
            }
        }
        // A manifest pinned by push-index: the signature of the manifest it was made from.
        if self.pinned.is_none() {
            let p = self.pinned_subject().await?;
            if let Ok(d) = &p {
                self.pinned_signatures = self.signatures_of(d).await?;
            }
            self.pinned = Some(p);
        }
        if let Some(Ok(subject)) = &self.pinned {
            let subject = *subject;
            for s in &self.pinned_signatures.clone() {
                match self.check(s, &loaded, identity, intended).await? {
                    Ok(()) => return Ok(Ok(())),
                    Err(why) => reasons.push(format!(
                        "{why} (of {}, the manifest pinned by push-index)",
                        subject.short()
                    )),
                }
            }
        }
        if let Some(Err(why)) = &self.pinned {
            if !why.is_empty() {
                reasons.push(why.clone());
            }
        }
        if reasons.is_empty() {
            let mut looked: Vec<String> = self.candidates.iter().map(|d| d.to_string()).collect();
            if let Some(Ok(d)) = &self.pinned {
                looked.push(format!("{d} (the manifest pinned by push-index)"));
            }
            return Ok(Err(format!(
                "no signature of {} (neither a sha256-<hex>.sig tag nor a cosign referrer)",
                looked.join(" or ")
            )));
        }
        reasons.dedup();
        Ok(Err(reasons.join("; ")))
    }

    /// The signatures stored for `subject` (tag convention, then referrers), deduplicated.
    async fn signatures_of(&self, subject: &Digest) -> Result<Vec<Signature>> {
        let r = self.reg.reference();
        let tag = format!("sha256-{}.sig", subject.hex());
        let tagged = oci_client::Reference::with_tag(
            r.registry().into(),
            r.repository().into(),
            tag.clone(),
        );
        let mut out = Vec::new();
        match self.reg.manifest(&tagged).await {
            Ok((bytes, _)) => out.extend(layers(&bytes, subject, &tag)),
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let referrers = match self.reg.referrers(subject, ARTIFACT_TYPE).await {
            Ok(r) => r,
            Err(Error::NotFound { .. }) => Vec::new(),
            Err(e) if e.is_transient() => return Err(e),
            // A registry that refuses the question (rather than answering 404, as the spec
            // says one without the API does) has no referrers to offer.
            Err(e) => {
                tracing::debug!("referrers of {subject}: {e}");
                Vec::new()
            }
        };
        for d in referrers.into_iter().take(MAX_SIGNATURES) {
            let bytes = match self.src.manifest_by_digest(&d).await {
                Ok(b) => b,
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            out.extend(layers(&bytes, subject, &format!("referrer {}", d.short())));
        }
        let mut unique: Vec<Signature> = Vec::new();
        for s in out {
            if !unique
                .iter()
                .any(|u| u.payload == s.payload && u.signature == s.signature)
            {
                unique.push(s);
            }
        }
        unique.truncate(MAX_SIGNATURES);
        Ok(unique)
    }

    async fn payload(&mut self, d: &Digest) -> Result<std::result::Result<Vec<u8>, String>> {
        if let Some(p) = self.payloads.get(d) {
            return Ok(p.clone());
        }
        let got = match self.src.small_blob(d, MAX_PAYLOAD).await {
            Ok(b) => Ok(b),
            Err(e @ Error::Registry { .. }) if e.is_transient() => return Err(e),
            Err(Error::DigestMismatch { actual, .. }) => Err(format!(
                "payload {} does not match its digest (the registry sent {})",
                d.short(),
                actual.short()
            )),
            Err(e) => Err(format!("payload {}: {e}", d.short())),
        };
        self.payloads.insert(*d, got.clone());
        Ok(got)
    }

    /// Whether one signature satisfies the requirement, and if not why.
    async fn check(
        &mut self,
        s: &Signature,
        keys: &[PublicKey],
        identity: &SignedIdentity,
        intended: &DockerRef,
    ) -> Result<std::result::Result<(), String>> {
        let at = &s.found_in;
        let Some(b64) = &s.signature else {
            return Ok(Err(format!(
                "signature in {at}: no {SIGNATURE_ANNOTATION} annotation"
            )));
        };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
            return Ok(Err(format!("signature in {at}: not base64")));
        };
        let payload = match self.payload(&s.payload).await? {
            Ok(p) => p,
            Err(why) => return Ok(Err(format!("signature in {at}: {why}"))),
        };
        if !keys.iter().any(|k| k.verifies(&payload, &sig)) {
            let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
            return Ok(Err(format!(
                "signature in {at} does not verify with key {}",
                names.join(" or ")
            )));
        }
        let claims = match Claims::parse(&payload) {
            Ok(c) => c,
            Err(why) => return Ok(Err(format!("signature in {at}: payload {why}"))),
        };
        if claims.digest != s.subject.to_string() {
            return Ok(Err(format!(
                "signature in {at} is for digest {}, not {}",
                claims.digest, s.subject
            )));
        }
        if !identity.accepts(intended, &claims.reference) {
            return Ok(Err(format!(
                "signature in {at} is for identity {:?}, not accepted for {intended} ({})",
                claims.reference,
                identity.name()
            )));
        }
        Ok(Ok(()))
    }

    /// The manifest a `push-index` pinned manifest was made from, when the platform manifest
    /// is one: `Ok(digest)` when it is that manifest but for the annotation naming the index,
    /// `Err(why)` when it claims to be and is not, `Err("")` when it is not a pinned manifest.
    async fn pinned_subject(&mut self) -> Result<std::result::Result<Digest, String>> {
        let Some((digest, bytes)) = self.platform.clone() else {
            return Ok(Err(String::new()));
        };
        let bytes = match bytes {
            Some(b) => b,
            None => match self.src.manifest_by_digest(&digest).await {
                Ok(b) => b,
                Err(e) if e.is_transient() => return Err(e),
                Err(_) => return Ok(Err(String::new())),
            },
        };
        let Ok(mut pinned) = serde_json::from_slice::<Value>(&bytes) else {
            return Ok(Err(String::new()));
        };
        let Some(index) = pinned["annotations"][crate::publish::ANNOTATION_INDEX]
            .as_str()
            .and_then(|s| s.parse::<Digest>().ok())
        else {
            return Ok(Err(String::new()));
        };
        let what = format!("pinned manifest {}", digest.short());
        let index_bytes = match self.src.manifest_by_digest(&index).await {
            Ok(b) => b,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => return Ok(Err(format!("{what}: its index {}: {e}", index.short()))),
        };
        let index_json: Value = serde_json::from_slice(&index_bytes).unwrap_or(Value::Null);
        if index_json["artifactType"].as_str() != Some(crate::publish::ARTIFACT_TYPE) {
            return Ok(Err(format!(
                "{what}: {} is not a bux-fuse index",
                index.short()
            )));
        }
        let Some(subject) = index_json["subject"]["digest"]
            .as_str()
            .and_then(|s| s.parse::<Digest>().ok())
        else {
            return Ok(Err(format!("{what}: its index names no subject")));
        };
        let original = match self.src.manifest_by_digest(&subject).await {
            Ok(b) => b,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                return Ok(Err(format!(
                    "{what}: its original {}: {e}",
                    subject.short()
                )))
            }
        };
        let Ok(mut original) = serde_json::from_slice::<Value>(&original) else {
            return Ok(Err(format!(
                "{what}: its original {} is not JSON",
                subject.short()
            )));
        };
        strip_pin(&mut pinned);
        strip_pin(&mut original);
        if pinned != original {
            return Ok(Err(format!(
                "{what} differs from {} (the manifest its index names) beyond the index annotation",
                subject.short()
            )));
        }
        Ok(Ok(subject))
    }
}

/// A manifest without the `push-index` annotation (and without an annotation map left empty).
fn strip_pin(v: &mut Value) {
    if let Some(a) = v.get_mut("annotations").and_then(Value::as_object_mut) {
        a.remove(crate::publish::ANNOTATION_INDEX);
        if a.is_empty() {
            v.as_object_mut().map(|o| o.remove("annotations"));
        }
    }
}

/// The signature layers of a signature manifest.
fn layers(bytes: &[u8], subject: &Digest, found_in: &str) -> Vec<Signature> {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return Vec::new();
    };
    let Some(layers) = v["layers"].as_array() else {
        return Vec::new();
    };
    layers
        .iter()
        .filter(|l| l["mediaType"].as_str() == Some(SIMPLESIGNING))
        .filter_map(|l| {
            Some(Signature {
                subject: *subject,
                found_in: found_in.to_string(),
                payload: l["digest"].as_str()?.parse().ok()?,
                signature: l["annotations"][SIGNATURE_ANNOTATION]
                    .as_str()
                    .map(str::to_string),
            })
        })
        .collect()
}

/// What a payload claims.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Claims {
    pub(crate) reference: String,
    pub(crate) digest: String,
}

impl Claims {
    /// Parses a payload as containers/image does: `critical` with exactly `type`, `identity`
    /// (`docker-reference`) and `image` (`docker-manifest-digest`); `optional` anything.
    pub(crate) fn parse(payload: &[u8]) -> std::result::Result<Claims, String> {
        let v: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
        let top = v.as_object().ok_or("not a JSON object")?;
        for k in top.keys() {
            if k != "critical" && k != "optional" {
                return Err(format!("has an unknown field {k:?}"));
            }
        }
        let c = top
            .get("critical")
            .and_then(Value::as_object)
            .ok_or("has no \"critical\" object")?;
        for k in c.keys() {
            if !["type", "identity", "image"].contains(&k.as_str()) {
                return Err(format!("has an unknown field critical.{k}"));
            }
        }
        match c.get("type").and_then(Value::as_str) {
            Some(PAYLOAD_TYPE) => {}
            Some(t) => return Err(format!("is of type {t:?}, not {PAYLOAD_TYPE:?}")),
            None => return Err("has no critical.type".into()),
        }
        let one = |obj: &str, key: &str| -> std::result::Result<String, String> {
            let o = c
                .get(obj)
                .and_then(Value::as_object)
                .ok_or(format!("has no critical.{obj}"))?;
            if o.len() != 1 {
                return Err(format!("critical.{obj} has fields other than {key:?}"));
            }
            o.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or(format!("has no critical.{obj}.{key}"))
        };
        Ok(Claims {
            reference: one("identity", "docker-reference")?,
            digest: one("image", "docker-manifest-digest")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl ecparam -name prime256v1 -genkey | openssl ec -pubout`.
    const P256: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEhHo24s4XNrmXiJ5O+J1WkewcJ2c6
O8XsCH58629bM+LSjgiZpXcCRKQ+KI7foIDGeDJYLrP7EVuwUaGfs0IceQ==
-----END PUBLIC KEY-----
";
    /// An Ed25519 key.
    const ED25519: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA3c6hZNwQcQi4Gt6a9CAMU6F1O1Sh8qM+5BA/9nGDKkU=
-----END PUBLIC KEY-----
";
    /// A P-384 key.
    const P384: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE5pM6DfJywDQgS1RghsJsSI8vsjPPogNZ
BLB3Ha4jO/5DOiQ2XJaKtPpzs7ickf+FRWkBLK9aWBZzw3aLBjKdd2sXHKwpvmpS
7Kn0JrLt9JgUAl1GK8rBegsFUd1XRfUc
-----END PUBLIC KEY-----
";

    #[test]
    fn keys() {
        assert!(PublicKey::from_pem(P256.as_bytes(), "k").is_ok());
        let e = PublicKey::from_pem(ED25519.as_bytes(), "/e.pub").unwrap_err();
        assert!(e.contains("/e.pub") && e.contains("not an EC key"), "{e}");
        let e = PublicKey::from_pem(P384.as_bytes(), "k").unwrap_err();
        assert!(e.contains("another curve"), "{e}");
        let e = PublicKey::from_pem(b"hello", "k").unwrap_err();
        assert!(e.contains("no \"-----BEGIN PUBLIC KEY-----\""), "{e}");
    }

    #[test]
    fn payloads() {
        let good = br#"{"critical":{"identity":{"docker-reference":"r/a:v1"},"image":{"docker-manifest-digest":"sha256:00"},"type":"cosign container image signature"},"optional":null}"#;
        assert_eq!(
            Claims::parse(good).unwrap(),
            Claims {
                reference: "r/a:v1".into(),
                digest: "sha256:00".into()
            }
        );
        let wrong_type = br#"{"critical":{"identity":{"docker-reference":"r/a"},"image":{"docker-manifest-digest":"sha256:00"},"type":"atomic container signature"}}"#;
        assert!(Claims::parse(wrong_type).unwrap_err().contains("atomic"));
        let extra = br#"{"critical":{"identity":{"docker-reference":"r/a"},"image":{"docker-manifest-digest":"sha256:00"},"type":"cosign container image signature","x":1}}"#;
        assert!(Claims::parse(extra).is_err());
    }
}
