//! Publishing a layer index next to an image (`bux-fuse push-index`) and finding it again, so
//! that a lazy mount elsewhere can start before the layers are downloaded.
//!
//! What is pushed, for an image with manifest `M`:
//! * one blob per layer: its [`PublishedLayer`] (file table, checkpoints, chunk digests);
//! * an **index manifest** `I`, an OCI 1.1 artifact (`artifactType`
//!   [`ARTIFACT_TYPE`]) listing those blobs, each annotated with its layer's digest, with
//!   `subject: M`; it is also listed under the referrers tag schema (`sha256-<hex of M>`), so
//!   registries without the referrers API (Debian's docker-registry 2.8) find it too;
//! * a **pinned manifest** `M'`: `M` with the annotation [`ANNOTATION_INDEX`]` = I`, tagged
//!   (by default under the image's own tag). Its layers and config are `M`'s, so every runtime
//!   runs it unchanged; its digest covers `I`, which covers every chunk digest: a lazy mount of
//!   `M'` serves only bytes vouched for by the digest the user named.
//!
//! An index found only as a referrer of `M` is not covered by `M`'s digest (anyone who can push
//! to the repository can add one): it is used only when pinned in the local store (pushed from
//! it) or when the caller trusts it explicitly.

use serde_json::json;

use crate::index::blob::LocalBlob;
use crate::index::published::{PublishedLayer, MEDIA_TYPE, WINDOWS_MEDIA_TYPE};
use crate::index::{Compression, LayerIndex};
use crate::registry::manifest::{ManifestOrIndex, OCI_INDEX, OCI_MANIFEST};
use crate::registry::{self, Registry, RegistryOptions};
use crate::source::Location;
use crate::{Digest, Error, Result, Store};

/// `artifactType` of an index manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.bux-fuse.index.v1";
/// Annotation on a pinned image manifest: the digest of its index manifest.
pub const ANNOTATION_INDEX: &str = "dev.bux-fuse.index";
/// Annotation on each blob of an index manifest: the layer it indexes.
pub const ANNOTATION_LAYER: &str = "dev.bux-fuse.layer";
const EMPTY_JSON: &[u8] = b"{}";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// How to publish.
#[derive(Debug, Clone, Default)]
pub struct PushIndexOptions {
    /// Credentials and plain-HTTP registries.
    pub registry: RegistryOptions,
    /// Tag for the pinned manifest (default: the image's own tag).
    pub tag: Option<String>,
}

/// What [`Store::push_index`] published.
#[derive(Debug, Clone)]
pub struct PushedIndex {
    /// The pinned image: `registry/repository:tag`.
    pub reference: String,
    /// Its manifest digest (mount `reference@digest` to pin exactly this).
    pub manifest_digest: Digest,
    /// The index manifest.
    pub index_digest: Digest,
    /// Layers indexed.
    pub layers: usize,
    /// Layers left out (zstd), with why: a lazy mount pulls those whole.
    pub skipped: Vec<(Digest, String)>,
}

/// Where a lazy mount found an image's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IndexSource {
    /// Named by the manifest itself (covered by its digest), or pinned in the local store.
    Pinned(Digest),
    /// Found as a referrer only.
    Referrer(Digest),
}

impl Store {
    fn pin_path(&self, manifest: &Digest) -> std::path::PathBuf {
        self.root().join("pins").join(manifest.hex())
    }

    /// The index pinned locally for this manifest (by a `push-index` from this store).
    pub(crate) fn pinned_index(&self, manifest: &Digest) -> Option<Digest> {
        std::fs::read_to_string(self.pin_path(manifest))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn pin(&self, manifest: &Digest, index: &Digest) -> Result<()> {
        let dir = self.root().join("pins");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating pins", e))?;
        crate::store::write_atomic(&self.pin_path(manifest), index.to_string().as_bytes())
    }

    /// Publishes the index of the stored image `reference` to its registry (see the module
    /// docs). Gzip and plain-tar layers are indexed; zstd layers are listed in `skipped`.
    pub async fn push_index(
        &self,
        reference: &str,
        opts: &PushIndexOptions,
    ) -> Result<PushedIndex> {
        let loc = Location::parse(reference)?;
        let name = loc.key();
        let Location::Registry(whole) = &loc else {
            return Err(Error::InvalidReference {
                reference: name,
                detail: "push-index publishes to a registry; this is a local source".into(),
            });
        };
        let record = self.image(&name)?.ok_or_else(|| Error::NotFound {
            reference: name.clone(),
            detail: " in the local store (pull it first)".into(),
        })?;
        let r = registry::parse_reference(whole)?;
        let reg = Registry::new(&r, &opts.registry);
        let manifest_bytes = std::fs::read(self.blob_path(&record.manifest_digest))
            .map_err(|e| Error::io(format!("reading manifest {}", record.manifest_digest), e))?;
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&manifest_bytes).map_err(|e| Error::InvalidManifest {
                what: format!("manifest {}", record.manifest_digest),
                detail: e.to_string(),
            })?;
        let manifest_type = manifest["mediaType"]
            .as_str()
            .unwrap_or(OCI_MANIFEST)
            .to_string();
        // The subject is the image without any earlier pin, so re-publishing stays stable.
        let had_pin = manifest["annotations"]
            .as_object_mut()
            .is_some_and(|a| a.remove(ANNOTATION_INDEX).is_some());
        let subject = match had_pin {
            true => {
                let bytes =
                    serde_json::to_vec(&manifest).map_err(|e| Error::io("json", e.into()))?;
                reg.push_manifest(
                    &r.clone_with_digest(Digest::of(&bytes).to_string()),
                    bytes.clone(),
                    &manifest_type,
                )
                .await?;
                (Digest::of(&bytes), bytes.len())
            }
            _ => (record.manifest_digest, manifest_bytes.len()),
        };

        let mut layers = Vec::new();
        let mut indexed = 0;
        let mut skipped = Vec::new();
        for l in &record.layers {
            let idx = LayerIndex::load(&self.layer_index_path(l))?;
            if idx.compression == Compression::Zstd {
                skipped.push((
                    l.digest,
                    "zstd layer (publish it as zstd:chunked)".to_string(),
                ));
                continue;
            }
            let blob_path = self.blob_path(&l.digest);
            let blob = LocalBlob::open(&blob_path).map_err(|e| {
                Error::io(
                    format!(
                        "layer {} is not fully local (mount it with --wait-complete first)",
                        l.digest
                    ),
                    e,
                )
            })?;
            let mut published = PublishedLayer::build(&idx, &blob)?;
            if let Some(windows) = published.split_windows() {
                let d = Digest::of(&windows);
                let size = windows.len();
                reg.push_blob(&d, windows).await?;
                layers.push(json!({
                    "mediaType": WINDOWS_MEDIA_TYPE,
                    "digest": d.to_string(),
                    "size": size,
                    "annotations": { ANNOTATION_LAYER: l.digest.to_string() },
                }));
            }
            let bytes = published.encode()?;
            let d = Digest::of(&bytes);
            let size = bytes.len();
            reg.push_blob(&d, bytes).await?;
            indexed += 1;
            layers.push(json!({
                "mediaType": MEDIA_TYPE,
                "digest": d.to_string(),
                "size": size,
                "annotations": { ANNOTATION_LAYER: l.digest.to_string() },
            }));
        }
        // The read trace recorded here, if any: lazy mounts elsewhere fetch it first.
        if let Ok(trace) = std::fs::read(self.trace_path(&record.manifest_digest)) {
            if crate::trace::parse(&trace).is_ok() {
                let d = Digest::of(&trace);
                let size = trace.len();
                reg.push_blob(&d, trace).await?;
                layers.push(json!({
                    "mediaType": crate::trace::MEDIA_TYPE,
                    "digest": d.to_string(),
                    "size": size,
                }));
            }
        }
        reg.push_blob(&Digest::of(EMPTY_JSON), EMPTY_JSON.to_vec())
            .await?;
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": { "mediaType": EMPTY_MEDIA_TYPE, "digest": Digest::of(EMPTY_JSON).to_string(), "size": 2 },
            "layers": layers,
            "subject": { "mediaType": manifest_type, "digest": subject.0.to_string(), "size": subject.1 },
        }))
        .map_err(|e| Error::io("json", e.into()))?;
        let index_digest = Digest::of(&index);
        reg.push_manifest(
            &r.clone_with_digest(index_digest.to_string()),
            index.clone(),
            OCI_MANIFEST,
        )
        .await?;
        self.add_referrer(&reg, &r, &subject.0, &index_digest, index.len())
            .await?;

        // The pinned manifest: the same image, naming its index.
        if !manifest["annotations"].is_object() {
            manifest["annotations"] = json!({});
        }
        manifest["annotations"][ANNOTATION_INDEX] = json!(index_digest.to_string());
        let pinned = serde_json::to_vec(&manifest).map_err(|e| Error::io("json", e.into()))?;
        let pinned_digest = Digest::of(&pinned);
        let tag = opts
            .tag
            .clone()
            .or_else(|| r.tag().map(str::to_string))
            .unwrap_or_else(|| "latest".into());
        let target =
            registry::parse_reference(&format!("{}/{}:{tag}", r.registry(), r.repository()))?;
        if opts.tag.is_none() {
            // Retagging an image index with one platform's manifest would drop the others.
            if let Ok((top, _)) = reg.manifest(&target).await {
                if serde_json::from_slice::<ManifestOrIndex>(&top).is_ok_and(|m| m.is_index()) {
                    return Err(Error::InvalidReference {
                        reference: name,
                        detail: format!(
                            "{tag} names a multi-platform index: give the pinned image its own \
                             tag with --tag"
                        ),
                    });
                }
            }
        }
        reg.push_manifest(&target, pinned.clone(), &manifest_type)
            .await?;
        self.put_blob(&pinned_digest, &pinned, "pinned manifest")?;
        self.pin(&subject.0, &index_digest)?;
        self.pin(&pinned_digest, &index_digest)?;
        Ok(PushedIndex {
            reference: target.whole(),
            manifest_digest: pinned_digest,
            index_digest,
            layers: indexed,
            skipped,
        })
    }

    /// Adds `index` to the referrers tag schema of `subject`, keeping what is listed there.
    async fn add_referrer(
        &self,
        reg: &Registry,
        r: &oci_client::Reference,
        subject: &Digest,
        index: &Digest,
        size: usize,
    ) -> Result<()> {
        let tag = registry::parse_reference(&format!(
            "{}/{}:sha256-{}",
            r.registry(),
            r.repository(),
            subject.hex()
        ))?;
        let mut list = match reg.manifest(&tag).await {
            Ok((bytes, _)) => {
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_else(|_| json!({}))
            }
            Err(Error::NotFound { .. }) => json!({}),
            Err(e) => return Err(e),
        };
        if !list["manifests"].is_array() {
            list = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [] });
        }
        let entries = list["manifests"].as_array_mut().expect("checked above");
        if !entries
            .iter()
            .any(|m| m["digest"] == json!(index.to_string()))
        {
            entries.push(json!({
                "mediaType": OCI_MANIFEST,
                "digest": index.to_string(),
                "size": size,
                "artifactType": ARTIFACT_TYPE,
            }));
        }
        let bytes = serde_json::to_vec(&list).map_err(|e| Error::io("json", e.into()))?;
        reg.push_manifest(&tag, bytes, OCI_INDEX).await
    }
}

/// Finds the index of the image with manifest `digest` (`bytes`): named by the manifest,
/// pinned in the store, or (last) listed as a referrer.
pub(crate) async fn find_index(
    store: &Store,
    reg: &Registry,
    digest: &Digest,
    bytes: &[u8],
) -> Result<Option<IndexSource>> {
    #[derive(serde::Deserialize)]
    struct Annotated {
        #[serde(default)]
        annotations: Option<std::collections::BTreeMap<String, String>>,
    }
    let named = serde_json::from_slice::<Annotated>(bytes)
        .ok()
        .and_then(|m| m.annotations?.get(ANNOTATION_INDEX)?.parse().ok());
    if let Some(d) = named {
        return Ok(Some(IndexSource::Pinned(d)));
    }
    if let Some(d) = store.pinned_index(digest) {
        return Ok(Some(IndexSource::Pinned(d)));
    }
    match reg.referrers(digest, ARTIFACT_TYPE).await {
        Ok(found) => Ok(found.first().copied().map(IndexSource::Referrer)),
        Err(e) => {
            tracing::debug!("looking up referrers: {e}");
            Ok(None)
        }
    }
}

/// The read trace listed in an index manifest: (digest, size).
pub(crate) fn index_trace(bytes: &[u8]) -> Option<(Digest, u64)> {
    let m: ManifestOrIndex = serde_json::from_slice(bytes).ok()?;
    m.layers?
        .iter()
        .find(|l| l.media_type == crate::trace::MEDIA_TYPE)
        .and_then(|l| Some((l.digest.parse().ok()?, l.size)))
}

/// The index blobs of an index manifest: (layer digest, index blob digest, size).
pub(crate) fn index_layers(bytes: &[u8]) -> Result<Vec<(Digest, Digest, u64)>> {
    let m: ManifestOrIndex = serde_json::from_slice(bytes).map_err(|e| Error::InvalidManifest {
        what: "bux-fuse index manifest".into(),
        detail: e.to_string(),
    })?;
    let mut out = Vec::new();
    for l in m.layers.unwrap_or_default() {
        if l.media_type != MEDIA_TYPE {
            continue;
        }
        let layer = l
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_LAYER))
            .and_then(|d| d.parse().ok());
        if let (Some(layer), Ok(d)) = (layer, l.digest.parse()) {
            out.push((layer, d, l.size));
        }
    }
    Ok(out)
}
