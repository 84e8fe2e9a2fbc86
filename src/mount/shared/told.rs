//! What a server process is told on its stdin by the process that starts it (a mount's keeper
//! its workers; a client the image server's supervisor, and the supervisor each worker): the
//! registry options and how to fetch, for an image whose layers are fetched lazily.
//! Credentials stay off command lines, and out of the library's public types' serialisations.

use std::time::Duration;

use super::kept::Kind;
use crate::MountOptions;

/// What a server process is told (see the module docs). A field a process of another version
/// leaves out takes the default; an empty stdin (a process of an earlier version told nothing)
/// means the defaults.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub(crate) struct Told {
    pub(crate) credentials: Option<(String, String)>,
    pub(crate) anonymous: bool,
    pub(crate) insecure: Vec<String>,
    pub(crate) mirrors: Vec<String>,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) request_timeout: Option<Duration>,
    pub(crate) read_deadline: Duration,
    pub(crate) prefetch: crate::mount::Prefetch,
    pub(crate) record_trace: bool,
    /// The tree is the lower layer of root's kernel overlay (a writable mount): the image's own
    /// `trusted.overlay.*` xattrs are shown escaped, as the overlay expects.
    pub(crate) overlay_lower: bool,
    /// A user's writable mount reads image files through the user's image server (the
    /// keeper's call: not for an image fetched lazily, nor while reads are recorded).
    pub(crate) read_through: bool,
    /// The reference the image was mounted by (for the image server: what its record is, and
    /// so which registry and repository it fetches from; one manifest may be stored under
    /// several references).
    pub(crate) reference: Option<String>,
}

/// What the environment says that decides how a fetch goes, besides the options: where
/// credentials are looked up (Docker's config, credential helpers on `PATH`), where
/// `registries.conf` is read (mirrors, remaps, insecure hosts), proxies and trusted
/// certificates. (Where files are, not what they say.) A server is started with its first
/// mount's environment.
const FETCH_ENV: &[&str] = &[
    "CONTAINERS_REGISTRIES_CONF",
    "DOCKER_CONFIG",
    "HOME",
    "PATH",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

impl Default for Told {
    fn default() -> Told {
        Told::of(&MountOptions::default(), Kind::Image, false)
    }
}

impl Told {
    pub(crate) fn of(opts: &MountOptions, what: Kind, read_through: bool) -> Told {
        use crate::registry::Credentials;
        let r = &opts.registry;
        let credentials = match &r.credentials {
            Credentials::Basic { username, password } => Some((username.clone(), password.clone())),
            _ => None,
        };
        Told {
            credentials,
            anonymous: matches!(r.credentials, Credentials::Anonymous),
            insecure: r.insecure.clone(),
            mirrors: r.mirrors.clone(),
            connect_timeout: r.connect_timeout,
            request_timeout: r.request_timeout,
            read_deadline: opts.read_deadline,
            prefetch: opts.prefetch,
            record_trace: opts.record_trace,
            overlay_lower: opts.writable && matches!(what, Kind::Image),
            read_through,
            reference: None,
        }
    }

    pub(crate) fn registry(&self) -> crate::RegistryOptions {
        use crate::registry::Credentials;
        crate::RegistryOptions {
            credentials: match (&self.credentials, self.anonymous) {
                (Some((username, password)), _) => Credentials::Basic {
                    username: username.clone(),
                    password: password.clone(),
                },
                (None, true) => Credentials::Anonymous,
                (None, false) => Credentials::Auto,
            },
            insecure: self.insecure.clone(),
            mirrors: self.mirrors.clone(),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
        }
    }
}

impl Told {
    /// What `input` says: the defaults if it is empty.
    pub(crate) fn read(input: &[u8]) -> serde_json::Result<Told> {
        match input.is_empty() {
            true => Ok(Told::default()),
            false => serde_json::from_slice(input),
        }
    }

    /// Read whole from standard input (see [`Told::read`]).
    pub(crate) fn from_stdin() -> std::io::Result<Told> {
        let mut input = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut input)?;
        Told::read(&input).map_err(std::io::Error::other)
    }

    /// What decides where from and as whom a server fetches, as bytes to hash: a mount may
    /// stand on the server of an image fetched lazily only if it would fetch as that server
    /// does (the same reference, credentials, registries, deadlines and environment), else the
    /// first mount's credentials would fetch for whoever mounts next. `None` if it cannot be
    /// said (then it matches nothing).
    pub(crate) fn fetch_identity(&self) -> Option<Vec<u8>> {
        let env: Vec<(&str, Option<std::ffi::OsString>)> = FETCH_ENV
            .iter()
            .map(|v| (*v, std::env::var_os(v)))
            .collect();
        let env: Vec<(&str, Option<&[u8]>)> = env
            .iter()
            .map(|(k, v)| (*k, v.as_ref().map(|v| v.as_encoded_bytes())))
            .collect();
        let who = (
            &self.reference,
            &self.credentials,
            self.anonymous,
            &self.insecure,
            &self.mirrors,
            self.connect_timeout,
            self.request_timeout,
            self.read_deadline,
            env,
        );
        serde_json::to_vec(&who).ok()
    }

    /// The options of a mount serving with what it was told.
    pub(crate) fn mount_options(&self, cache_bytes: usize) -> MountOptions {
        MountOptions {
            cache_bytes,
            registry: self.registry(),
            read_deadline: self.read_deadline,
            prefetch: self.prefetch,
            record_trace: self.record_trace,
            ..MountOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Credentials;

    #[test]
    fn who_a_server_fetches_as_is_the_credentials_and_registry_settings_not_the_prefetch() {
        let base = MountOptions::default();
        let id = |opts: &MountOptions| Told::of(opts, Kind::Image, false).fetch_identity().unwrap();
        let mut other = base.clone();
        other.prefetch = crate::mount::Prefetch::None;
        other.writable = true;
        assert_eq!(
            id(&base),
            id(&other),
            "prefetch and writability are the mount's own"
        );
        let mut differ: Vec<MountOptions> = Vec::new();
        for user in ["alice", "bob"] {
            let mut o = base.clone();
            o.registry.credentials = Credentials::Basic {
                username: user.into(),
                password: "secret".into(),
            };
            differ.push(o);
        }
        let mut o = base.clone();
        o.registry.credentials = Credentials::Anonymous;
        differ.push(o);
        let mut o = base.clone();
        o.registry.mirrors = vec!["127.0.0.1:5001".into()];
        differ.push(o);
        let mut o = base.clone();
        o.registry.insecure = vec!["127.0.0.1:5000".into()];
        differ.push(o);
        let mut o = base.clone();
        o.read_deadline += Duration::from_secs(1);
        differ.push(o);
        let mut ids: Vec<Vec<u8>> = differ.iter().map(id).collect();
        ids.push(id(&base));
        // The same image by two references: two registries or repositories.
        for r in ["127.0.0.1:5000/a/app:v1", "127.0.0.1:5001/a/app:v1"] {
            let mut t = Told::of(&base, Kind::Image, false);
            t.reference = Some(r.into());
            ids.push(t.fetch_identity().unwrap());
        }
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "each fetches as somebody else");
    }
}
