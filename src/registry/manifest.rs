//! Manifests, indexes and image configs as the OCI image spec and Docker's v2 schema 2 write
//! them, parsed leniently (unknown fields ignored) and checked strictly where it matters.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Largest manifest or index accepted (real ones are a few KiB; the distribution server caps
/// them at 4 MiB too).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// What we send as `Accept` for manifests.
pub const ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
/// Config media types of container images.
pub const IMAGE_CONFIGS: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[doc(hidden)]
pub struct Descriptor {
    /// Media type (may be absent in old Docker lists).
    #[serde(default)]
    pub media_type: String,
    /// `sha256:...`
    pub digest: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: u64,
    /// Platform (index entries only).
    #[serde(default)]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default)]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

impl Descriptor {
    /// The `org.opencontainers.image.ref.name` annotation (a tag in an OCI layout).
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations
            .as_ref()?
            .get("org.opencontainers.image.ref.name")
            .map(String::as_str)
    }
}

/// An image manifest or an index, told apart by which fields it has.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
#[doc(hidden)]
pub struct ManifestOrIndex {
    /// Declared media type (optional in OCI).
    #[serde(default)]
    pub media_type: Option<String>,
    /// Config (manifests).
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Layers (manifests).
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
    /// Manifests (indexes).
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
}

impl ManifestOrIndex {
    /// Whether this is an index / manifest list.
    pub fn is_index(&self) -> bool {
        matches!(self.media_type.as_deref(), Some(OCI_INDEX | DOCKER_LIST))
            || (self.manifests.is_some() && self.layers.is_none())
    }
}

/// `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `v8` for arm64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the running host.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "powerpc64" => "ppc64",
            "loongarch64" => "loong64",
            other => other,
        };
        // 32-bit arm images differ by variant (v6 binaries run on v7, not the reverse): pick
        // ours rather than the index's first linux/arm entry.
        let variant = (arch == "arm").then(|| {
            if cfg!(target_feature = "v7") {
                "v7"
            } else {
                "v6"
            }
            .to_string()
        });
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: arch.to_string(),
            variant,
        }
    }

    /// Whether an index entry's platform satisfies this wanted one (a wanted variant must
    /// match; without one, any variant does).
    pub fn matches(&self, offered: &Platform) -> bool {
        self.os == offered.os
            && self.architecture == offered.architecture
            && match &self.variant {
                None => true,
                Some(v) => {
                    offered.variant.as_deref() == Some(v.as_str())
                    // arm64 images often omit the implied v8.
                    || (v == "v8" && offered.variant.is_none() && self.architecture == "arm64")
                }
            }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform {
                    os: os.to_string(),
                    architecture: arch.to_string(),
                    variant: Some(variant.to_string()),
                })
            }
            _ => Err(format!(
                "invalid platform {s:?}: expected os/arch[/variant]"
            )),
        }
    }
}

/// Picks the manifest for `want` from an index's entries.
#[doc(hidden)]
pub fn select<'a>(entries: &'a [Descriptor], want: &Platform) -> Option<&'a Descriptor> {
    entries
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
}

/// The platforms an index offers, for error messages.
#[doc(hidden)]
pub fn offered(entries: &[Descriptor]) -> String {
    let list: Vec<String> = entries
        .iter()
        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// The parts of an image config that a VM runtime needs (`krun_set_exec` and friends).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `os` of the image.
    #[serde(default)]
    pub os: String,
    /// `architecture` of the image.
    #[serde(default)]
    pub architecture: String,
    /// CPU `variant` (`v8`, `v7`), when the config states one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The runtime configuration.
    #[serde(default)]
    pub config: RuntimeConfig,
    /// The layers' uncompressed digests, bottom first.
    #[serde(default)]
    pub rootfs: RootFs,
}

/// `config` of an image config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    /// Entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Cmd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Environment, `KEY=value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// User.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Exposed ports (keys only matter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<serde_json::Map<String, serde_json::Value>>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    /// Uncompressed digests of the layers.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// A hint for well-known non-image artifacts.
#[doc(hidden)]
pub fn media_type_hint(media_type: &str) -> &'static str {
    if media_type.contains("wasm") {
        " (a WebAssembly artifact, not a container image)"
    } else if media_type.contains("helm") {
        " (a Helm chart, not a container image)"
    } else if media_type.contains("schemaVersion=1") || media_type.contains("v1+prettyjws") {
        " (Docker schema 1 manifests are not supported)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(p: &str) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{p}"),
            size: 1,
            platform: Some(p.parse().unwrap()),
            annotations: None,
        }
    }

    #[test]
    fn selects_platforms() {
        let idx = vec![
            entry("linux/arm/v6"),
            entry("linux/arm/v7"),
            entry("linux/arm64"),
            entry("linux/amd64"),
        ];
        let pick = |w: &str| select(&idx, &w.parse().unwrap()).map(|d| d.digest.clone());
        assert_eq!(pick("linux/amd64").as_deref(), Some("sha256:linux/amd64"));
        assert_eq!(pick("linux/arm/v7").as_deref(), Some("sha256:linux/arm/v7"));
        assert_eq!(
            pick("linux/arm64/v8").as_deref(),
            Some("sha256:linux/arm64")
        );
        assert_eq!(pick("linux/s390x"), None);
        assert!("linux".parse::<Platform>().is_err());
        assert!(offered(&idx).contains("linux/arm/v6"));
    }

    #[test]
    fn tells_index_from_manifest() {
        let m: ManifestOrIndex = serde_json::from_str(
            r#"{"schemaVersion":2,"config":{"digest":"sha256:a","size":1},"layers":[]}"#,
        )
        .unwrap();
        assert!(!m.is_index());
        let i: ManifestOrIndex =
            serde_json::from_str(r#"{"schemaVersion":2,"manifests":[]}"#).unwrap();
        assert!(i.is_index());
    }
}
