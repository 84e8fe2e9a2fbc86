//! Credentials: what to send a registry (Docker's `config.json` and credential helpers, or what
//! the caller gave), checking them (`verify_login`, for `bux-fuse login`), and storing them
//! where Docker does.

use oci_client::secrets::RegistryAuth;

use super::{parse_reference, Credentials, Registry, RegistryOptions};
use crate::{Error, Result};

/// The auth to send, or a Docker identity token to exchange for it.
pub(super) fn credentials_for(
    registry: &str,
    creds: &Credentials,
) -> (RegistryAuth, Option<String>) {
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
