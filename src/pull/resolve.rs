//! From a reference to a manifest: through an image index to the wanted platform, with the
//! config fetched, verified and stored.

use super::{off_thread, platform_warning, LayerJob, Progress, PullOptions, Resolved};
use crate::index::Compression;
use crate::registry::manifest::{self, ManifestOrIndex, Platform};
use crate::source::Source;
use crate::{Digest, Error, Result, Store};

/// Largest manifest or config accepted (real ones are a few KiB).
const MAX_JSON_BLOB: u64 = 16 << 20;

impl Store {
    /// Resolves the manifest (through an index to the wanted platform) and stores the config.
    pub(crate) async fn resolve(
        &self,
        reg: &Source,
        name: &str,
        opts: &PullOptions,
    ) -> Result<Resolved> {
        let name = name.to_string();
        let want = opts.platform.clone().unwrap_or_else(Platform::host);

        // Manifest, through an index if there is one.
        let (mut bytes, mut digest) = reg.top_manifest().await?;
        crate::policy::check(&opts.signature_policy, reg, &name, &bytes, &digest, &want).await?;
        let mut parsed = parse_manifest(&bytes, &name)?;
        let single_platform = !parsed.is_index();
        if parsed.is_index() {
            let entries = parsed.manifests.clone().unwrap_or_default();
            let chosen =
                manifest::select(&entries, &want).ok_or_else(|| Error::NoMatchingPlatform {
                    reference: name.clone(),
                    platform: want.to_string(),
                    available: manifest::offered(&entries),
                })?;
            self.put_blob_off_thread(digest, bytes.clone(), "image index")
                .await?;
            digest = parse_digest(&chosen.digest, &name)?;
            bytes = reg.manifest_by_digest(&digest).await?;
            parsed = parse_manifest(&bytes, &name)?;
            if parsed.is_index() {
                return Err(Error::InvalidManifest {
                    what: format!("manifest {digest}"),
                    detail: "an index nested in an index".into(),
                });
            }
        }
        let config_desc = parsed
            .config
            .clone()
            .ok_or_else(|| Error::InvalidManifest {
                what: format!("manifest {digest}"),
                detail: "no config".into(),
            })?;
        if !manifest::IMAGE_CONFIGS.contains(&config_desc.media_type.as_str()) {
            return Err(Error::UnsupportedMediaType {
                reference: name.clone(),
                what: "config",
                hint: manifest::media_type_hint(&config_desc.media_type).into(),
                media_type: config_desc.media_type,
            });
        }
        let layers = parsed.layers.clone().unwrap_or_default();
        let mut jobs = Vec::with_capacity(layers.len());
        for desc in &layers {
            let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| {
                Error::UnsupportedMediaType {
                    reference: name.clone(),
                    what: "layer",
                    hint: manifest::media_type_hint(&desc.media_type).into(),
                    media_type: desc.media_type.clone(),
                }
            })?;
            jobs.push((
                desc.clone(),
                parse_digest(&desc.digest, &name)?,
                compression,
            ));
        }
        opts.emit(Progress::Resolved {
            reference: name.clone(),
            manifest: digest,
            layers: jobs.iter().map(|(d, g, _)| (*g, d.size)).collect(),
        });

        // Config.
        let config_digest = parse_digest(&config_desc.digest, &name)?;
        if config_desc.size > MAX_JSON_BLOB {
            return Err(Error::InvalidManifest {
                what: format!("config {config_digest}"),
                detail: format!("claims {} bytes", config_desc.size),
            });
        }
        if !self.blob_path(&config_digest).exists() {
            let bytes = reg.small_blob(&config_digest, MAX_JSON_BLOB).await?;
            self.put_blob_off_thread(config_digest, bytes, "config")
                .await?;
        }
        let config = self.read_config(&config_digest)?;
        // An image of one platform is what it is: said, as Docker says it, when it is not
        // the platform asked for (an index offers the one asked for, or the pull fails).
        if single_platform {
            let have = Platform {
                os: config.os.clone(),
                architecture: config.architecture.clone(),
                variant: config.variant.clone(),
            };
            if let Some(message) = platform_warning(&have, opts) {
                opts.emit(Progress::Warning {
                    reference: name.clone(),
                    message,
                });
            }
        }
        if config.rootfs.diff_ids.len() != jobs.len() {
            return Err(Error::InvalidManifest {
                what: format!("config {config_digest}"),
                detail: format!(
                    "{} diff_ids for {} layers",
                    config.rootfs.diff_ids.len(),
                    jobs.len()
                ),
            });
        }
        let jobs: Vec<LayerJob> = jobs
            .into_iter()
            .zip(&config.rootfs.diff_ids)
            .map(|((desc, digest, compression), diff)| {
                Ok(LayerJob {
                    desc,
                    digest,
                    compression,
                    diff_id: parse_digest(diff, &name)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Resolved {
            name,
            bytes,
            digest,
            config_digest,
            config,
            jobs,
        })
    }

    /// [`Store::put_blob`] on the blocking pool (it syncs the file).
    async fn put_blob_off_thread(
        &self,
        digest: Digest,
        bytes: Vec<u8>,
        what: &'static str,
    ) -> Result<()> {
        let store = self.clone();
        off_thread("store task", move || {
            store.put_blob(&digest, &bytes, what).map(|_| ())
        })
        .await
    }
}

fn parse_manifest(bytes: &[u8], name: &str) -> Result<ManifestOrIndex> {
    let m: ManifestOrIndex = serde_json::from_slice(bytes).map_err(|e| Error::InvalidManifest {
        what: format!("manifest of {name}"),
        detail: format!("not valid JSON: {e}"),
    })?;
    if let Some(mt) = &m.media_type {
        if !manifest::ACCEPT.contains(&mt.as_str()) {
            return Err(Error::UnsupportedMediaType {
                reference: name.to_string(),
                what: "manifest",
                hint: manifest::media_type_hint(mt).into(),
                media_type: mt.clone(),
            });
        }
    }
    Ok(m)
}

fn parse_digest(s: &str, name: &str) -> Result<Digest> {
    s.parse().map_err(|e| Error::InvalidManifest {
        what: format!("manifest of {name}"),
        detail: format!("{e}"),
    })
}
