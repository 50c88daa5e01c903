//! Upstream credentials per registry: from the config file (`[registries."HOST"]`, with the
//! secret inline, in a file or in an environment variable) and from a docker `config.json`
//! (`auths`, `credHelpers`, `credsStore`, run as docker runs them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde::Deserialize;

use crate::secret::Secret;

/// One registry's credentials as the config file gives them.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The user (or `oauth2accesstoken`, `AWS`, … as the registry wants).
    pub username: Option<String>,
    /// The password or token, inline (prefer a file or an environment variable).
    pub password: Option<Secret>,
    /// A file holding the password or token (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable holding the password or token.
    pub password_env: Option<String>,
}

/// A username and its secret, for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The user.
    pub username: String,
    /// The password or token.
    pub password: Secret,
}

/// Why credentials could not be loaded; names the registry, file or helper, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// A `[registries."HOST"]` entry is incomplete or its secret unreadable.
    #[error("registries.{host:?}: {reason}")]
    Registry { host: String, reason: String },
    /// The docker config file cannot be read or parsed.
    #[error("docker config {path}: {reason}")]
    DockerConfig { path: PathBuf, reason: String },
    /// An `auths` entry of the docker config file gives no usable login.
    #[error("docker config {path}: {reason}")]
    DockerAuth {
        path: PathBuf,
        #[source]
        reason: AuthEntryError,
    },
    /// A credential helper failed.
    #[error("credential helper docker-credential-{helper} for {host}: {reason}")]
    Helper {
        helper: String,
        host: String,
        reason: String,
    },
}

/// What is wrong with a docker config `auths` entry. Without the decoder's error as a source:
/// it would quote a byte, or the bytes, of the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthEntryError {
    /// `auth` is not base64.
    #[error("an auths entry's auth is not base64")]
    NotBase64,
    /// `auth` decodes to bytes that are not UTF-8.
    #[error("an auths entry's auth is not text")]
    NotText,
    /// `auth` decodes to text without `:`.
    #[error("an auths entry's auth is not user:password")]
    NoColon,
    /// Neither `auth`, nor `username` and `password`, nor `identitytoken`.
    #[error("an auths entry has neither auth nor username and password")]
    Empty,
}

/// Credentials by scope: a canonical registry host, or a host and a repository prefix
/// (`ghcr.io/org-a`), as the config names them.
#[derive(Debug, Clone, Default)]
pub struct Logins {
    by_scope: BTreeMap<String, Login>,
}

impl Logins {
    /// Loads the config file's registries, then fills in what the docker config has for others.
    pub fn load(
        registries: &BTreeMap<String, RegistryConfig>,
        docker_config: Option<&Path>,
    ) -> Result<Logins, CredentialsError> {
        let mut logins = Logins::default();
        if let Some(path) = docker_config {
            for (host, login) in from_docker_config(path)? {
                logins.by_scope.insert(host, login);
            }
        }
        for (scope, entry) in registries {
            let login = from_entry(scope, entry)?;
            logins.by_scope.insert(canonical_scope(scope), login);
        }
        Ok(logins)
    }

    /// The credentials configured for `authority` (`host` or `host:port`) as a whole.
    pub fn for_host(&self, authority: &str) -> Option<&Login> {
        self.by_scope.get(&canonical(authority))
    }

    /// The credentials for `repo` on `authority` and the scope they are configured for: the
    /// longest repository prefix that matches, else the host's own.
    pub fn for_repo(&self, authority: &str, repo: &str) -> Option<(&str, &Login)> {
        let host = canonical(authority);
        let mut best: Option<(&str, &Login)> = None;
        for (scope, login) in &self.by_scope {
            let Some(rest) = scope.strip_prefix(host.as_str()) else {
                continue;
            };
            let prefix = match rest.strip_prefix('/') {
                Some(p) => p,
                None if rest.is_empty() => "",
                None => continue,
            };
            let matches = prefix.is_empty()
                || repo == prefix
                || repo
                    .strip_prefix(prefix)
                    .is_some_and(|r| r.starts_with('/'));
            if matches && best.map_or(true, |(b, _)| b.len() < scope.len()) {
                best = Some((scope.as_str(), login));
            }
        }
        best
    }
}

/// A user of the proxy, as its credentials file names it, and which injected credentials (by
/// their config scope, e.g. `ghcr.io/org-a`) it may use: all of them when not restricted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUser {
    /// The user name.
    pub name: String,
    /// The scopes whose credentials are injected for this user; `None` for every scope.
    pub inject: Option<Vec<String>>,
}

impl ProxyUser {
    /// Whether injected credentials configured for `scope` may be used for this user.
    pub fn may_use(&self, scope: &str) -> bool {
        self.inject.as_ref().map_or(true, |allowed| {
            allowed.iter().any(|a| canonical_scope(a) == scope)
        })
    }
}

/// How often credentials are read again (files, environment, docker config and its helpers),
/// so that rotated secrets and expiring helper tokens are picked up while the proxy runs.
pub const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(300);
/// The soonest credentials are read again after an upstream refused them.
const REFRESH_AFTER_REFUSAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The credentials in force, read again from their sources while the proxy runs.
#[derive(Debug)]
pub struct Credentials {
    registries: BTreeMap<String, RegistryConfig>,
    docker_config: Option<PathBuf>,
    current: parking_lot::RwLock<Arc<Logins>>,
    loaded_at: parking_lot::Mutex<std::time::Instant>,
}

impl Credentials {
    /// Loads the credentials; a failure here is a start-up error.
    pub fn load(
        registries: &BTreeMap<String, RegistryConfig>,
        docker_config: Option<&Path>,
    ) -> Result<Credentials, CredentialsError> {
        let logins = Logins::load(registries, docker_config)?;
        Ok(Credentials {
            registries: registries.clone(),
            docker_config: docker_config.map(Path::to_owned),
            current: parking_lot::RwLock::new(Arc::new(logins)),
            loaded_at: parking_lot::Mutex::new(std::time::Instant::now()),
        })
    }

    /// The credentials in force now.
    pub fn current(&self) -> Arc<Logins> {
        self.current.read().clone()
    }

    /// The credentials injected for `repo` on `authority` for `user` (any user when `None`),
    /// with the scope they are configured for.
    pub fn injected(
        &self,
        authority: &str,
        repo: &str,
        user: Option<&ProxyUser>,
    ) -> Option<(String, Login)> {
        let logins = self.current();
        let (scope, login) = logins.for_repo(authority, repo)?;
        user.map_or(true, |u| u.may_use(scope))
            .then(|| (scope.to_owned(), login.clone()))
    }

    /// Reads every source again (blocking: files, helpers); on failure the credentials in force
    /// stay, and the error says why.
    pub fn reload(&self) -> Result<(), CredentialsError> {
        *self.loaded_at.lock() = std::time::Instant::now();
        let fresh = Logins::load(&self.registries, self.docker_config.as_deref())?;
        *self.current.write() = Arc::new(fresh);
        Ok(())
    }

    /// Reads the sources again after an upstream refused the credentials in force, unless that
    /// was done moments ago; whether it was done.
    pub async fn reload_after_refusal(self: &Arc<Self>) -> bool {
        {
            // Checked and claimed at once: concurrent refusals read the sources once.
            let mut loaded_at = self.loaded_at.lock();
            if loaded_at.elapsed() < REFRESH_AFTER_REFUSAL {
                return false;
            }
            *loaded_at = std::time::Instant::now();
        }
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.reload()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "credentials could not be read again; keeping those in force");
                false
            }
            Err(_) => false,
        }
    }

    /// Reads the sources again every [`REFRESH_EVERY`] until `stop`.
    pub async fn keep_fresh(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.reload()).await {
                Ok(Ok(())) => tracing::debug!("credentials read again"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "credentials could not be read again; keeping those in force")
                }
                Err(_) => {}
            }
        }
    }
}

/// `HOST` or `HOST/PREFIX` with the host canonical and the prefix without outer slashes.
pub fn canonical_scope(scope: &str) -> String {
    let bare = scope
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let (host, prefix) = bare.split_once('/').unwrap_or((bare, ""));
    let host = canonical(host);
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        host
    } else {
        format!("{host}/{prefix}")
    }
}

/// One name per registry: Docker Hub's aliases become `docker.io`, schemes and paths go.
pub fn canonical(host: &str) -> String {
    let h = host
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if crate::dockerhub::is_hub(&h) {
        crate::dockerhub::NAME.into()
    } else {
        h
    }
}

fn from_entry(host: &str, e: &RegistryConfig) -> Result<Login, CredentialsError> {
    let bad = |reason: String| CredentialsError::Registry {
        host: host.to_owned(),
        reason,
    };
    let username = e
        .username
        .clone()
        .ok_or_else(|| bad("username is missing".into()))?;
    let sources = [
        e.password.is_some(),
        e.password_file.is_some(),
        e.password_env.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(bad(
            "give exactly one of password, password_file, password_env".into(),
        ));
    }
    let password = if let Some(p) = &e.password {
        p.expose().to_owned()
    } else if let Some(path) = &e.password_file {
        std::fs::read_to_string(path)
            .map_err(|err| bad(format!("password_file {}: {err}", path.display())))?
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    } else {
        let var = e.password_env.clone().unwrap_or_default();
        std::env::var(&var).map_err(|_| bad(format!("password_env {var} is not set")))?
    };
    Ok(Login {
        username,
        password: Secret::new(password),
    })
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    #[serde(rename = "identitytoken")]
    identity_token: Option<String>,
}

fn from_docker_config(path: &Path) -> Result<Vec<(String, Login)>, CredentialsError> {
    let bad = |reason: String| CredentialsError::DockerConfig {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    // serde_json's message says where, not what: the file's content never reaches the error.
    let config: DockerConfig =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let mut out = Vec::new();
    for (key, auth) in &config.auths {
        let host = canonical(key);
        if let Some(helper) = config.cred_helpers.get(key).or(config.creds_store.as_ref()) {
            if auth.auth.is_none() && auth.username.is_none() {
                out.push((host.clone(), run_helper(helper, key)?));
                continue;
            }
        }
        let login = from_auth(auth).map_err(|reason| CredentialsError::DockerAuth {
            path: path.to_owned(),
            reason,
        })?;
        out.push((host, login));
    }
    for (key, helper) in &config.cred_helpers {
        if !config.auths.contains_key(key) {
            out.push((canonical(key), run_helper(helper, key)?));
        }
    }
    Ok(out)
}

fn from_auth(auth: &DockerAuth) -> Result<Login, AuthEntryError> {
    use base64::Engine as _;
    if let Some(encoded) = &auth.auth {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| AuthEntryError::NotBase64)?;
        let raw = String::from_utf8(raw).map_err(|_| AuthEntryError::NotText)?;
        let (user, password) = raw.split_once(':').ok_or(AuthEntryError::NoColon)?;
        return Ok(Login {
            username: user.to_owned(),
            password: Secret::new(password),
        });
    }
    match (&auth.username, &auth.password, &auth.identity_token) {
        (Some(u), Some(p), _) => Ok(Login {
            username: u.clone(),
            password: Secret::new(p.clone()),
        }),
        (_, _, Some(t)) => Ok(Login {
            username: "<token>".into(),
            password: Secret::new(t.clone()),
        }),
        _ => Err(AuthEntryError::Empty),
    }
}

/// Runs `docker-credential-HELPER get` with the registry on stdin, as docker does.
fn run_helper(helper: &str, registry: &str) -> Result<Login, CredentialsError> {
    use std::io::Write;
    let bad = |reason: String| CredentialsError::Helper {
        helper: helper.to_owned(),
        host: registry.to_owned(),
        reason,
    };
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| bad(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(registry.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| bad(e.to_string()))?;
    if !out.status.success() {
        // Its output may hold secrets or echo them: only the status is reported.
        return Err(bad(format!("exited with {}", out.status)));
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let answer: Answer = serde_json::from_slice(&out.stdout)
        .map_err(|_| bad("answered something that is not its JSON".into()))?;
    Ok(Login {
        username: answer.username,
        password: Secret::new(answer.secret),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_sources_and_docker_config() {
        let inline: RegistryConfig =
            toml::from_str("username = \"u\"\npassword = \"inline-secret\"").unwrap();
        assert!(!format!("{inline:?}").contains("inline-secret"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut regs = BTreeMap::new();
        regs.insert(
            "ghcr.io".to_string(),
            RegistryConfig {
                username: Some("bot".into()),
                password_file: Some(file),
                ..Default::default()
            },
        );
        let docker = dir.path().join("config.json");
        std::fs::write(
            &docker,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpodW50ZXIy"}}}"#,
        )
        .unwrap();
        let logins = Logins::load(&regs, Some(&docker)).unwrap();
        assert_eq!(
            logins.for_host("ghcr.io").unwrap().password.expose(),
            "from-file"
        );
        let hub = logins.for_host("registry-1.docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.expose()),
            ("user", "hunter2")
        );

        std::fs::write(&docker, "{not json").unwrap();
        let e = Logins::load(&BTreeMap::new(), Some(&docker))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json") && !e.contains("not json"), "{e}");
        let mut only_user = BTreeMap::new();
        only_user.insert(
            "quay.io".to_string(),
            RegistryConfig {
                username: Some("u".into()),
                ..Default::default()
            },
        );
        assert!(Logins::load(&only_user, None).is_err());
    }

    #[test]
    fn failing_helper_is_named_without_its_output() {
        let e = run_helper("regproxy-test-missing-helper", "example.test")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("docker-credential-regproxy-test-missing-helper"),
            "{e}"
        );
    }

    use base64::Engine as _;
    use proptest::prelude::*;

    /// Loads `bytes` as the docker config, through a real file as `run` does.
    fn load_docker_config(bytes: &[u8]) -> Result<Logins, CredentialsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, bytes).unwrap();
        Logins::load(&BTreeMap::new(), Some(&path))
    }

    /// JSON shaped like a docker config, with anything where the values go. No `credHelpers` or
    /// `credsStore`: those run programs.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let key = prop_oneof![
            prop::sample::select(vec![
                "auths",
                "auth",
                "username",
                "password",
                "identitytoken",
                "https://index.docker.io/v1/",
                "ghcr.io",
                "",
                "HttpHeaders",
            ])
            .prop_map(str::to_owned),
            "[a-zA-Z0-9.:/]{0,12}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[A-Za-z0-9+/=: ]{0,24}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// How an `auths` entry carries its login.
    #[derive(Debug, Clone)]
    enum Form {
        Auth { padded: bool },
        Fields,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_bytes_load_or_fail_cleanly(bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            any::<String>().prop_map(String::into_bytes),
        ]) {
            let _ = load_docker_config(&bytes);
        }

        #[test]
        fn any_json_loads_or_fails_cleanly(v in json(), wrap in any::<bool>()) {
            let v = if wrap { serde_json::json!({ "auths": v }) } else { v };
            let _ = load_docker_config(v.to_string().as_bytes());
        }

        /// Every `auths` entry comes back as the user and password it encodes, under its host
        /// however the key spells it; a password may hold colons, a user cannot.
        #[test]
        fn auths_entries_decode_back(
            entries in prop::collection::btree_map(
                "[a-z0-9]{1,8}(\\.[a-z]{2,4}){0,2}(:[0-9]{1,5})?",
                ("[^:]{0,12}", any::<String>(), prop_oneof![
                    any::<bool>().prop_map(|padded| Form::Auth { padded }),
                    Just(Form::Fields),
                ]),
                1..5,
            ),
            decorate in any::<bool>(),
        ) {
            let mut auths = serde_json::Map::new();
            for (host, (user, password, form)) in &entries {
                let key = if decorate { format!("https://{host}/v1/") } else { host.clone() };
                let entry = match form {
                    Form::Auth { padded } => {
                        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                        let b64 = if *padded { format!(" {b64}\n") } else { b64 };
                        serde_json::json!({ "auth": b64 })
                    }
                    Form::Fields => serde_json::json!({ "username": user, "password": password }),
                };
                auths.insert(key, entry);
            }
            let config = serde_json::json!({ "auths": auths });
            let logins = load_docker_config(config.to_string().as_bytes()).unwrap();
            for (host, (user, password, _)) in &entries {
                let login = logins.for_host(&host.to_ascii_uppercase()).unwrap();
                prop_assert_eq!(&login.username, user);
                prop_assert_eq!(login.password.expose(), password.as_str());
            }
        }
    }
}
