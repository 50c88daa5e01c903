//! Configuration: one TOML file, `REGPROXY_*` environment variables and flags, merged into a
//! validated [`Config`]. Precedence is flag > environment > file > built-in default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Hosts intercepted by default: the public registries and the auth hosts they send clients to.
pub const DEFAULT_INTERCEPT: &[&str] = &[
    "docker.io",
    "registry-1.docker.io",
    "auth.docker.io",
    "index.docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "k8s.gcr.io",
    "gcr.io",
    "*.gcr.io",
    "*.pkg.dev",
    "public.ecr.aws",
    "*.dkr.ecr.*.amazonaws.com",
    "mcr.microsoft.com",
    "registry.gitlab.com",
    "nvcr.io",
    "docker.elastic.co",
    "registry.access.redhat.com",
    "registry.redhat.io",
    "registry.suse.com",
    "cgr.dev",
];

/// A configuration problem, naming the key (and file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("invalid value for `{key}`: {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Output format of the log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable key=value lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The effective, validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the proxy listener.
    pub listen: SocketAddr,
    /// Address of the admin endpoint (health, metrics, CA download).
    pub admin_listen: SocketAddr,
    /// Directory holding `ca.crt` and `ca.key`.
    pub ca_dir: PathBuf,
    /// Directory of the on-disk cache.
    pub cache_dir: PathBuf,
    /// Host patterns whose TLS is terminated: exact names or `*.suffix` (a `*` matches one or more labels).
    pub intercept: Vec<String>,
    /// Resolve overrides: `host:port` to the socket address to connect to instead.
    pub resolve: Vec<(String, SocketAddr)>,
    /// Extra PEM root certificates trusted for upstream TLS, besides the platform's.
    pub upstream_ca: Vec<PathBuf>,
    /// Ports that CONNECT may reach (443 is always included).
    pub allow_port: Vec<u16>,
    /// How long a tag → digest mapping is fresh.
    pub tag_ttl: Duration,
    /// Per-registry or per-repository freshness: `host/repo` glob (`*` matches anything) and its
    /// time; the first match wins over `tag_ttl`.
    pub tag_ttl_rules: Vec<(String, Duration)>,
    /// Upper bound of the cache size in bytes, if any.
    pub max_cache_size: Option<u64>,
    /// Free space the cache leaves on its file system, if any.
    pub min_free_disk: Option<u64>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Timeout for establishing an upstream TCP+TLS connection.
    pub connect_timeout: Duration,
    /// How long an idle client connection (no request) or pooled upstream connection is kept.
    pub idle_timeout: Duration,
    /// How long an upstream may take to answer a request (the response head) or a manifest body.
    pub upstream_timeout: Duration,
    /// How long in-flight transfers may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    /// The upstream of mirror requests that name none (`?ns=`): docker's `registry-mirrors`.
    pub mirror_default: String,
    /// A separate listener for mirror mode, if any (the proxy listener serves it too).
    pub mirror_listen: Option<SocketAddr>,
    /// Certificate and key (PEM) for TLS on the mirror listener; plain HTTP without them.
    pub mirror_tls: Option<(PathBuf, PathBuf)>,
    /// Upstream credentials per registry host (`[registries."HOST"]` in the file).
    pub registries: std::collections::BTreeMap<String, crate::credentials::RegistryConfig>,
    /// A docker `config.json` to take upstream credentials from.
    pub docker_config: Option<PathBuf>,
    /// Client networks allowed to use the proxy (empty: anyone who can connect).
    pub allow_cidr: Vec<Cidr>,
    /// A file of `user:password` lines; clients must send one as `Proxy-Authorization: Basic`.
    pub proxy_credentials_file: Option<PathBuf>,
    /// Destinations reachable although refused by default (loopback, link-local, ...).
    pub allow_destination: Vec<Cidr>,
    /// Destinations never reached; wins over `allow_destination` and `resolve`.
    pub deny_destination: Vec<Cidr>,
    /// Client connections each client listener (proxy, mirror) holds at once; more wait to be
    /// accepted.
    pub max_connections: usize,
}

/// An IP network, `ADDR/PREFIX` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or `192.0.2.7`.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = a.trim().parse().map_err(|e| format!("{e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse().map_err(|_| format!("bad prefix {p:?}"))?
        };
        if prefix > max {
            return Err(format!("prefix {prefix} is longer than {max}"));
        }
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is in the network (IPv4-mapped IPv6 clients match IPv4 networks).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(ip, V4),
            v4 => v4,
        };
        let (net, ip, bits) = match (self.addr, ip) {
            (V4(n), V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
            (V6(n), V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (net >> shift) == (ip >> shift)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 3128)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 3129)),
            ca_dir: PathBuf::from("certs"),
            cache_dir: PathBuf::from("cache"),
            intercept: DEFAULT_INTERCEPT.iter().map(|s| s.to_string()).collect(),
            resolve: Vec::new(),
            upstream_ca: Vec::new(),
            allow_port: vec![443],
            tag_ttl: Duration::from_secs(300),
            tag_ttl_rules: Vec::new(),
            max_cache_size: None,
            min_free_disk: None,
            log_format: LogFormat::Text,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            upstream_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            mirror_default: "docker.io".into(),
            mirror_listen: None,
            mirror_tls: None,
            registries: Default::default(),
            docker_config: None,
            allow_cidr: Vec::new(),
            proxy_credentials_file: None,
            allow_destination: Vec::new(),
            deny_destination: Vec::new(),
            max_connections: 4096,
        }
    }
}

/// One layer of settings, as written in the file or given by flags and environment.
///
/// The same struct is parsed by clap (flags with `REGPROXY_*` fallbacks) and by serde (the TOML
/// file), so a key has one name everywhere: `--cache-dir`, `REGPROXY_CACHE_DIR`, `cache_dir`.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Proxy listen address [default: 127.0.0.1:3128]
    #[arg(global = true, long, env = "REGPROXY_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin endpoint listen address [default: 127.0.0.1:3129]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_ADMIN_LISTEN",
        value_name = "ADDR"
    )]
    pub admin_listen: Option<String>,
    /// Directory holding ca.crt and ca.key [default: certs]
    #[arg(global = true, long, env = "REGPROXY_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Cache directory [default: cache]
    #[arg(global = true, long, env = "REGPROXY_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Extra host pattern to intercept (exact or *.suffix); adds to the default list
    #[arg(
        global = true,
        long,
        env = "REGPROXY_INTERCEPT",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub intercept: Option<Vec<String>>,
    /// Resolve override HOST:PORT=IP:PORT
    #[arg(
        global = true,
        long,
        env = "REGPROXY_RESOLVE",
        value_name = "HOST:PORT=IP:PORT",
        value_delimiter = ','
    )]
    pub resolve: Option<Vec<String>>,
    /// Extra PEM root CA file for upstream TLS
    #[arg(
        global = true,
        long,
        env = "REGPROXY_UPSTREAM_CA",
        value_name = "FILE",
        value_delimiter = ','
    )]
    pub upstream_ca: Option<Vec<PathBuf>>,
    /// Extra port CONNECT may reach, besides 443
    #[arg(
        global = true,
        long,
        env = "REGPROXY_ALLOW_PORT",
        value_name = "PORT",
        value_delimiter = ','
    )]
    pub allow_port: Option<Vec<u16>>,
    /// How long a tag stays fresh, e.g. 5m [default: 5m]
    #[arg(global = true, long, env = "REGPROXY_TAG_TTL", value_name = "DURATION")]
    pub tag_ttl: Option<String>,
    /// Tag freshness for matching repositories, PATTERN=DURATION (PATTERN is host/repo, `*`
    /// matches anything; first match wins), e.g. docker.io/library/*=1h
    #[arg(
        global = true,
        long,
        env = "REGPROXY_TAG_TTL_RULE",
        value_name = "PATTERN=DURATION",
        value_delimiter = ','
    )]
    pub tag_ttl_rule: Option<Vec<String>>,
    /// Cache size bound, e.g. 50GiB [default: unbounded]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_MAX_CACHE_SIZE",
        value_name = "SIZE"
    )]
    pub max_cache_size: Option<String>,
    /// Free space to leave on the cache's file system, e.g. 5GiB [default: none]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_MIN_FREE_DISK",
        value_name = "SIZE"
    )]
    pub min_free_disk: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_LOG_FORMAT",
        value_name = "FORMAT"
    )]
    pub log_format: Option<String>,
    /// Upstream connect timeout, e.g. 10s [default: 10s]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_CONNECT_TIMEOUT",
        value_name = "DURATION"
    )]
    pub connect_timeout: Option<String>,
    /// Idle time after which client and pooled upstream connections close [default: 90s]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_IDLE_TIMEOUT",
        value_name = "DURATION"
    )]
    pub idle_timeout: Option<String>,
    /// Time an upstream may take to start answering before it counts as down [default: 60s]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_UPSTREAM_TIMEOUT",
        value_name = "DURATION"
    )]
    pub upstream_timeout: Option<String>,
    /// Upstream of mirror requests without ?ns= (docker's registry-mirrors) [default: docker.io]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_MIRROR_DEFAULT",
        value_name = "HOST"
    )]
    pub mirror_default: Option<String>,
    /// Separate listener for mirror mode (the proxy listener serves /v2/ too)
    #[arg(
        global = true,
        long,
        env = "REGPROXY_MIRROR_LISTEN",
        value_name = "ADDR"
    )]
    pub mirror_listen: Option<String>,
    /// PEM certificate for TLS on --mirror-listen (with --mirror-tls-key)
    #[arg(
        global = true,
        long,
        env = "REGPROXY_MIRROR_TLS_CERT",
        value_name = "FILE"
    )]
    pub mirror_tls_cert: Option<PathBuf>,
    /// PEM key for TLS on --mirror-listen
    #[arg(
        global = true,
        long,
        env = "REGPROXY_MIRROR_TLS_KEY",
        value_name = "FILE"
    )]
    pub mirror_tls_key: Option<PathBuf>,
    /// Upstream credentials per registry (config file only: [registries."HOST"])
    #[arg(skip)]
    pub registries: Option<std::collections::BTreeMap<String, crate::credentials::RegistryConfig>>,
    /// A docker config.json to take upstream credentials from (auths, credHelpers, credsStore)
    #[arg(
        global = true,
        long,
        env = "REGPROXY_DOCKER_CONFIG",
        value_name = "FILE"
    )]
    pub docker_config: Option<PathBuf>,
    /// Client network allowed to use the proxy, CIDR; repeatable [default: anyone who can connect]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_ALLOW_CIDR",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub allow_cidr: Option<Vec<String>>,
    /// File of user:password lines; clients must send Proxy-Authorization: Basic with one
    #[arg(
        global = true,
        long,
        env = "REGPROXY_PROXY_CREDENTIALS_FILE",
        value_name = "FILE"
    )]
    pub proxy_credentials_file: Option<PathBuf>,
    /// Destination network reachable although refused by default (loopback, link-local,
    /// unspecified, multicast), CIDR; repeatable
    #[arg(
        global = true,
        long,
        env = "REGPROXY_ALLOW_DESTINATION",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub allow_destination: Option<Vec<String>>,
    /// Destination network never reached (wins over --allow-destination and --resolve), CIDR;
    /// repeatable
    #[arg(
        global = true,
        long,
        env = "REGPROXY_DENY_DESTINATION",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub deny_destination: Option<Vec<String>>,
    /// Client connections held at once; more wait to be accepted [default: 4096]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_MAX_CONNECTIONS",
        value_name = "N"
    )]
    pub max_connections: Option<usize>,
    /// Grace time for in-flight transfers on SIGTERM/SIGINT [default: 30s]
    #[arg(
        global = true,
        long,
        env = "REGPROXY_SHUTDOWN_GRACE",
        value_name = "DURATION"
    )]
    pub shutdown_grace: Option<String>,
}

impl Settings {
    /// Reads a TOML settings file; unknown keys are an error naming the key and the file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| {
            // Not e.to_string(): it quotes the offending line, which may hold a password.
            let at = e.span().map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            });
            ConfigError::Parse {
                path: path.to_owned(),
                message: format!("{}{}", e.message(), at.unwrap_or_default()),
            }
        })
    }

    /// Builds the effective config: `self` (flags and environment) over `file` over defaults.
    pub fn resolve(self, file: Settings) -> Result<Config, ConfigError> {
        let d = Config::default();
        let scalar = |a: Option<String>, b: Option<String>| a.or(b);
        let list = |a: Option<Vec<String>>, b: Option<Vec<String>>| {
            b.into_iter().chain(a).flatten().collect::<Vec<_>>()
        };
        let mut intercept = d.intercept;
        intercept.extend(list(self.intercept, file.intercept));
        let mut allow_port = d.allow_port;
        allow_port.extend(file.allow_port.into_iter().chain(self.allow_port).flatten());
        allow_port.sort_unstable();
        allow_port.dedup();
        let mirror_tls = match (
            self.mirror_tls_cert.or(file.mirror_tls_cert),
            self.mirror_tls_key.or(file.mirror_tls_key),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (c, _) => {
                let (key, have) = if c.is_some() {
                    ("mirror_tls_key", "mirror_tls_cert")
                } else {
                    ("mirror_tls_cert", "mirror_tls_key")
                };
                return Err(invalid(key, "", format!("missing; {have} needs it")));
            }
        };
        Ok(Config {
            listen: parse_or(
                "listen",
                scalar(self.listen, file.listen),
                d.listen,
                parse_addr,
            )?,
            admin_listen: parse_or(
                "admin_listen",
                scalar(self.admin_listen, file.admin_listen),
                d.admin_listen,
                parse_addr,
            )?,
            ca_dir: self.ca_dir.or(file.ca_dir).unwrap_or(d.ca_dir),
            cache_dir: self.cache_dir.or(file.cache_dir).unwrap_or(d.cache_dir),
            intercept: validate_patterns(intercept)?,
            resolve: list(self.resolve, file.resolve)
                .iter()
                .map(|r| parse_resolve(r).map_err(|reason| invalid("resolve", r, reason)))
                .collect::<Result<_, _>>()?,
            upstream_ca: file
                .upstream_ca
                .into_iter()
                .chain(self.upstream_ca)
                .flatten()
                .collect(),
            allow_port,
            tag_ttl: parse_or(
                "tag_ttl",
                scalar(self.tag_ttl, file.tag_ttl),
                d.tag_ttl,
                parse_duration,
            )?,
            tag_ttl_rules: list(self.tag_ttl_rule, file.tag_ttl_rule)
                .iter()
                .map(|r| parse_ttl_rule(r).map_err(|reason| invalid("tag_ttl_rule", r, reason)))
                .collect::<Result<_, _>>()?,
            max_cache_size: match scalar(self.max_cache_size, file.max_cache_size) {
                None => None,
                Some(v) => Some(parse_size(&v).map_err(|r| invalid("max_cache_size", &v, r))?),
            },
            min_free_disk: match scalar(self.min_free_disk, file.min_free_disk) {
                None => None,
                Some(v) => Some(parse_size(&v).map_err(|r| invalid("min_free_disk", &v, r))?),
            },
            log_format: parse_or(
                "log_format",
                scalar(self.log_format, file.log_format),
                d.log_format,
                parse_log_format,
            )?,
            connect_timeout: parse_or(
                "connect_timeout",
                scalar(self.connect_timeout, file.connect_timeout),
                d.connect_timeout,
                parse_duration,
            )?,
            idle_timeout: parse_or(
                "idle_timeout",
                scalar(self.idle_timeout, file.idle_timeout),
                d.idle_timeout,
                parse_duration,
            )?,
            upstream_timeout: parse_or(
                "upstream_timeout",
                scalar(self.upstream_timeout, file.upstream_timeout),
                d.upstream_timeout,
                parse_duration,
            )?,
            shutdown_grace: parse_or(
                "shutdown_grace",
                scalar(self.shutdown_grace, file.shutdown_grace),
                d.shutdown_grace,
                parse_duration,
            )?,
            mirror_default: scalar(self.mirror_default, file.mirror_default)
                .unwrap_or(d.mirror_default)
                .to_ascii_lowercase(),
            mirror_listen: match scalar(self.mirror_listen, file.mirror_listen) {
                None => None,
                Some(v) => Some(parse_addr(&v).map_err(|r| invalid("mirror_listen", &v, r))?),
            },
            mirror_tls,
            registries: file.registries.unwrap_or_default(),
            docker_config: self.docker_config.or(file.docker_config),
            allow_cidr: list(self.allow_cidr, file.allow_cidr)
                .iter()
                .map(|c| Cidr::parse(c).map_err(|r| invalid("allow_cidr", c, r)))
                .collect::<Result<_, _>>()?,
            proxy_credentials_file: self.proxy_credentials_file.or(file.proxy_credentials_file),
            allow_destination: list(self.allow_destination, file.allow_destination)
                .iter()
                .map(|c| Cidr::parse(c).map_err(|r| invalid("allow_destination", c, r)))
                .collect::<Result<_, _>>()?,
            deny_destination: list(self.deny_destination, file.deny_destination)
                .iter()
                .map(|c| Cidr::parse(c).map_err(|r| invalid("deny_destination", c, r)))
                .collect::<Result<_, _>>()?,
            max_connections: match self.max_connections.or(file.max_connections) {
                None => d.max_connections,
                Some(0) => {
                    return Err(invalid("max_connections", "0", "must be at least 1".into()))
                }
                Some(n) => n,
            },
        })
    }
}

impl Config {
    /// Refuses a listener beyond loopback that names no clients: not an open proxy by accident.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        let wide = |a: &SocketAddr| !a.ip().is_loopback();
        let named = !self.allow_cidr.is_empty() || self.proxy_credentials_file.is_some();
        for (key, addr) in [
            ("listen", Some(self.listen)),
            ("mirror_listen", self.mirror_listen),
        ] {
            if let Some(addr) = addr.filter(wide) {
                if !named {
                    return Err(invalid(
                        key,
                        &addr.to_string(),
                        "listening beyond loopback needs allow_cidr and/or proxy_credentials_file, \
                         or anyone who can reach it may use it"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Renders the effective config as TOML (there are no secrets in it yet; masked ones print `***`).
    pub fn to_toml(&self) -> String {
        let quote = |s: &str| format!("{s:?}");
        let list = |v: Vec<String>| format!("[{}]", v.join(", "));
        let mut out = String::new();
        let mut kv = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        kv("listen", quote(&self.listen.to_string()));
        kv("admin_listen", quote(&self.admin_listen.to_string()));
        kv("ca_dir", quote(&self.ca_dir.display().to_string()));
        kv("cache_dir", quote(&self.cache_dir.display().to_string()));
        kv(
            "intercept",
            list(self.intercept.iter().map(|s| quote(s)).collect()),
        );
        kv(
            "resolve",
            list(
                self.resolve
                    .iter()
                    .map(|(h, a)| quote(&format!("{h}={a}")))
                    .collect(),
            ),
        );
        kv(
            "upstream_ca",
            list(
                self.upstream_ca
                    .iter()
                    .map(|p| quote(&p.display().to_string()))
                    .collect(),
            ),
        );
        kv(
            "allow_port",
            list(self.allow_port.iter().map(|p| p.to_string()).collect()),
        );
        kv(
            "tag_ttl",
            quote(&humantime::format_duration(self.tag_ttl).to_string()),
        );
        kv(
            "tag_ttl_rule",
            list(
                self.tag_ttl_rules
                    .iter()
                    .map(|(p, d)| quote(&format!("{p}={}", humantime::format_duration(*d))))
                    .collect(),
            ),
        );
        if let Some(max) = self.max_cache_size {
            kv("max_cache_size", quote(&max.to_string()));
        }
        if let Some(min) = self.min_free_disk {
            kv("min_free_disk", quote(&min.to_string()));
        }
        kv(
            "log_format",
            quote(if self.log_format == LogFormat::Json {
                "json"
            } else {
                "text"
            }),
        );
        kv(
            "connect_timeout",
            quote(&humantime::format_duration(self.connect_timeout).to_string()),
        );
        kv(
            "idle_timeout",
            quote(&humantime::format_duration(self.idle_timeout).to_string()),
        );
        kv(
            "upstream_timeout",
            quote(&humantime::format_duration(self.upstream_timeout).to_string()),
        );
        kv("mirror_default", quote(&self.mirror_default));
        if let Some(addr) = self.mirror_listen {
            kv("mirror_listen", quote(&addr.to_string()));
        }
        if let Some((cert, key)) = &self.mirror_tls {
            kv("mirror_tls_cert", quote(&cert.display().to_string()));
            kv("mirror_tls_key", quote(&key.display().to_string()));
        }
        if let Some(p) = &self.docker_config {
            kv("docker_config", quote(&p.display().to_string()));
        }
        kv(
            "allow_cidr",
            list(
                self.allow_cidr
                    .iter()
                    .map(|c| quote(&c.to_string()))
                    .collect(),
            ),
        );
        if let Some(p) = &self.proxy_credentials_file {
            kv("proxy_credentials_file", quote(&p.display().to_string()));
        }
        for (key, nets) in [
            ("allow_destination", &self.allow_destination),
            ("deny_destination", &self.deny_destination),
        ] {
            kv(
                key,
                list(nets.iter().map(|c| quote(&c.to_string())).collect()),
            );
        }
        kv("max_connections", self.max_connections.to_string());
        kv(
            "shutdown_grace",
            quote(&humantime::format_duration(self.shutdown_grace).to_string()),
        );
        for (host, r) in &self.registries {
            out.push_str(&format!("\n[registries.{}]\n", quote(host)));
            let mut kv = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
            if let Some(u) = &r.username {
                kv("username", quote(u));
            }
            if r.password.is_some() {
                kv("password", quote("***"));
            }
            if let Some(f) = &r.password_file {
                kv("password_file", quote(&f.display().to_string()));
            }
            if let Some(e) = &r.password_env {
                kv("password_env", quote(e));
            }
        }
        out
    }

    /// How long a tag of `repo` on `host` stays fresh: the first matching rule, else `tag_ttl`.
    pub fn tag_ttl_for(&self, host: &str, repo: &str) -> Duration {
        let name = format!("{host}/{repo}");
        self.tag_ttl_rules
            .iter()
            .find(|(pattern, _)| glob(pattern.as_bytes(), name.as_bytes()))
            .map_or(self.tag_ttl, |(_, ttl)| *ttl)
    }

    /// The bounds the cache is kept within.
    pub fn cache_bounds(&self) -> crate::cache::evict::Bounds {
        crate::cache::evict::Bounds {
            max_size: self.max_cache_size,
            min_free: self.min_free_disk,
        }
    }

    /// Whether TLS to `host` is terminated and the registry API served inside.
    pub fn intercepts(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.intercept.iter().any(|p| pattern_matches(p, &host))
    }
}

/// Matches `host` against an exact name or a pattern where each `*` stands for one or more labels.
fn pattern_matches(pattern: &str, host: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern.eq_ignore_ascii_case(host),
        Some((prefix, rest)) => {
            if !host.starts_with(&prefix.to_ascii_lowercase()) {
                return false;
            }
            let tail = &host[prefix.len()..];
            // `*` consumes at least one character and never swallows a dot-less empty label.
            (1..=tail.len()).any(|i| tail.is_char_boundary(i) && pattern_matches(rest, &tail[i..]))
        }
    }
}

/// `*` matches any run of characters (slashes included); everything else matches itself.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

/// Parses `PATTERN=DURATION`.
fn parse_ttl_rule(s: &str) -> Result<(String, Duration), String> {
    let (pattern, ttl) = s
        .rsplit_once('=')
        .ok_or("expected PATTERN=DURATION, e.g. docker.io/library/*=1h")?;
    if pattern.is_empty() {
        return Err("empty pattern".into());
    }
    Ok((pattern.to_owned(), parse_duration(ttl)?))
}

fn validate_patterns(patterns: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for p in &patterns {
        let bad =
            p.is_empty() || p.contains(char::is_whitespace) || p.contains(':') || p.contains('/');
        if bad {
            return Err(invalid(
                "intercept",
                p,
                "expected a host name or a *.suffix pattern".into(),
            ));
        }
    }
    let mut out: Vec<String> = patterns
        .into_iter()
        .map(|p| p.to_ascii_lowercase())
        .collect();
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Ok(out)
}

fn invalid(key: &'static str, value: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason,
    }
}

fn parse_or<T>(
    key: &'static str,
    value: Option<String>,
    default: T,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => parse(&v).map_err(|reason| invalid(key, &v, reason)),
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("{e}; expected IP:PORT such as 127.0.0.1:3128"))
}

/// Parses a duration such as `90s`, `5m` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let fail = |e: humantime::DurationError| format!("{e}; expected a duration such as 30s or 5m");
    // humantime panics when a term carries the running total just past u64::MAX seconds
    // ("18446744073709551615s 1000000000ns"; humantime#66). A term alone starts from zero and
    // cannot, so the terms are parsed one by one and their sum is checked here.
    let mut total = Duration::ZERO;
    for term in duration_terms(s) {
        let d = humantime::parse_duration(term).map_err(fail)?;
        total = total
            .checked_add(d)
            .ok_or_else(|| fail(humantime::DurationError::NumberOverflow))?;
    }
    Ok(total)
}

/// Splits `1h 30m` or `1h30m` into terms where humantime starts a new number: at the first
/// character after a unit that is neither a unit letter nor a blank.
fn duration_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut start, mut in_unit) = (0, false);
    for (i, c) in s.char_indices() {
        if c.is_ascii_alphabetic() || c == '\u{b5}' {
            in_unit = true;
        } else if in_unit && !c.is_whitespace() {
            terms.push(&s[start..i]);
            (start, in_unit) = (i, false);
        }
    }
    terms.push(&s[start..]);
    terms
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".into()),
    }
}

/// Parses `HOST:PORT=IP:PORT`.
pub fn parse_resolve(s: &str) -> Result<(String, SocketAddr), String> {
    let (from, to) = s.split_once('=').ok_or("expected HOST:PORT=IP:PORT")?;
    let (host, port) = from
        .rsplit_once(':')
        .ok_or("expected HOST:PORT before '='")?;
    port.parse::<u16>()
        .map_err(|_| format!("bad port {port:?}"))?;
    if host.is_empty() {
        return Err("empty host".into());
    }
    let addr = to
        .parse()
        .map_err(|e| format!("{e} in {to:?}; expected IP:PORT"))?;
    Ok((format!("{}:{port}", host.to_ascii_lowercase()), addr))
}

/// Parses a size such as `50GiB`, `512MiB`, `10GB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| "expected a number with a unit such as 50GiB".to_string())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        "t" | "tb" => 1000 * 1000 * 1000 * 1000,
        "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown unit {u:?}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            ))
        }
    };
    let too_big = || format!("{t:?} is more than {} bytes", u64::MAX);
    // A whole number is counted exactly (an f64 is not, past 2^53); past u64::MAX is an error,
    // where the float-to-int cast would quietly give u64::MAX.
    if !num.contains('.') {
        let n: u64 = num.parse().map_err(|_| too_big())?;
        return n.checked_mul(mult).ok_or_else(too_big);
    }
    let bytes = n * mult as f64;
    if bytes >= u64::MAX as f64 {
        return Err(too_big());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*.gcr.io", "eu.gcr.io"));
        assert!(!pattern_matches("*.gcr.io", "gcr.io"));
        assert!(pattern_matches(
            "*.dkr.ecr.*.amazonaws.com",
            "1234.dkr.ecr.eu-west-1.amazonaws.com"
        ));
        assert!(pattern_matches("docker.io", "DOCKER.IO"));
        assert!(!pattern_matches("docker.io", "evil-docker.io"));
    }

    #[test]
    fn precedence_flag_over_file_over_default() {
        let file = Settings {
            listen: Some("127.0.0.1:1".into()),
            tag_ttl: Some("1m".into()),
            ..Default::default()
        };
        let flags = Settings {
            listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        let c = flags.resolve(file).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.tag_ttl, Duration::from_secs(60));
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        std::fs::write(&p, "listen = \"127.0.0.1:1\"\nlisten_addr = 3\n").unwrap();
        let e = Settings::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("listen_addr") && e.contains("r.toml") && e.contains("line 2"),
            "{e}"
        );
        std::fs::write(
            &p,
            "[registries.\"x\"]\nusername = \"u\"\npasword = \"hunter2\"\n",
        )
        .unwrap();
        let e = Settings::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("pasword") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Settings {
            tag_ttl: Some("soon".into()),
            ..Default::default()
        }
        .resolve(Settings::default())
        .unwrap_err()
        .to_string();
        assert!(e.contains("tag_ttl"), "{e}");
        assert_eq!(parse_size("50GiB").unwrap(), 50 << 30);
        assert_eq!(
            parse_resolve("Registry.test:5000=127.0.0.1:5001")
                .unwrap()
                .0,
            "registry.test:5000"
        );
        assert!(parse_resolve("registry.test=127.0.0.1:1").is_err());
        assert!(parse_ttl_rule("docker.io/*").is_err());
    }

    #[test]
    fn cidrs_and_exposure() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("192.0.2.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        let open = Settings {
            listen: Some("0.0.0.0:3128".into()),
            ..Default::default()
        }
        .resolve(Settings::default())
        .unwrap();
        let e = open.check_exposure().unwrap_err().to_string();
        assert!(e.contains("listen") && e.contains("allow_cidr"), "{e}");
        let named = Settings {
            listen: Some("0.0.0.0:3128".into()),
            allow_cidr: Some(vec!["10.0.0.0/8".into()]),
            ..Default::default()
        }
        .resolve(Settings::default())
        .unwrap();
        assert!(named.check_exposure().is_ok());
    }

    #[test]
    fn destinations_and_max_connections_from_file_env_and_flags() {
        let file = Settings {
            allow_destination: Some(vec!["127.0.0.0/8".into()]),
            deny_destination: Some(vec!["10.0.0.0/8".into()]),
            max_connections: Some(100),
            ..Default::default()
        };
        let flags = Settings {
            deny_destination: Some(vec!["192.168.0.0/16".into()]),
            ..Default::default()
        };
        let c = flags.resolve(file).unwrap();
        assert_eq!(
            c.allow_destination,
            vec![Cidr::parse("127.0.0.0/8").unwrap()]
        );
        assert_eq!(c.deny_destination.len(), 2);
        assert_eq!(c.max_connections, 100);
        let toml = c.to_toml();
        assert!(
            toml.contains("allow_destination = [\"127.0.0.0/8\"]")
                && toml.contains("deny_destination = [\"10.0.0.0/8\", \"192.168.0.0/16\"]")
                && toml.contains("max_connections = 100"),
            "{toml}"
        );
        let d = Settings::default().resolve(Settings::default()).unwrap();
        assert_eq!(d.max_connections, 4096);
        for bad in [
            Settings {
                allow_destination: Some(vec!["127.0.0.0/40".into()]),
                ..Default::default()
            },
            Settings {
                max_connections: Some(0),
                ..Default::default()
            },
        ] {
            let e = bad.resolve(Settings::default()).unwrap_err().to_string();
            assert!(
                e.contains("allow_destination") || e.contains("max_connections"),
                "{e}"
            );
        }
    }

    #[test]
    fn tag_ttl_rules_first_match_wins() {
        let c = Settings {
            tag_ttl_rule: Some(vec![
                "docker.io/library/*=1h".into(),
                "docker.io/*=10m".into(),
            ]),
            ..Default::default()
        }
        .resolve(Settings::default())
        .unwrap();
        assert_eq!(
            c.tag_ttl_for("docker.io", "library/alpine"),
            Duration::from_secs(3600)
        );
        assert_eq!(
            c.tag_ttl_for("docker.io", "grafana/grafana"),
            Duration::from_secs(600)
        );
        assert_eq!(c.tag_ttl_for("ghcr.io", "a/b"), Duration::from_secs(300));
    }

    #[test]
    fn sizes_past_u64_are_errors_and_whole_sizes_exact() {
        // Each of these gave Ok(u64::MAX) through the float-to-int cast.
        assert!(parse_size("17179869184GiB").is_err());
        assert!(parse_size("18446744074.0g").is_err());
        assert!(parse_size("100000000000000000000").is_err());
        // And this gave 9007199254740992: an f64 has 53 bits.
        assert_eq!(parse_size("9007199254740993"), Ok(9_007_199_254_740_993));
        assert_eq!(parse_size("16777215TiB"), Ok(16_777_215 << 40));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size(" 5 gb "), Ok(5_000_000_000));
    }

    #[test]
    fn durations_past_the_range_are_errors_not_panics() {
        // Both panicked inside humantime ("overflow in Duration::new").
        assert!(parse_duration("18446744073709551615s 1000000000ns").is_err());
        assert!(parse_duration("18446744073709551615s 500ms 500ms").is_err());
        assert_eq!(
            parse_duration("18446744073709551614s 1000ms"),
            Ok(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2\u{b5}s"), Ok(Duration::from_micros(2)));
        for bad in ["", " ", "5", "5m x", "5m.5s", "5m -3s", "1h 30", "soon"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    use proptest::prelude::*;

    /// Every size unit `parse_size` documents, with its multiplier.
    const SIZE_UNITS: &[(&str, u64)] = &[
        ("", 1),
        ("b", 1),
        ("k", 1000),
        ("kb", 1000),
        ("kib", 1 << 10),
        ("m", 1000 * 1000),
        ("mb", 1000 * 1000),
        ("mib", 1 << 20),
        ("g", 1000 * 1000 * 1000),
        ("gb", 1000 * 1000 * 1000),
        ("gib", 1 << 30),
        ("t", 1000 * 1000 * 1000 * 1000),
        ("tb", 1000 * 1000 * 1000 * 1000),
        ("tib", 1 << 40),
    ];

    /// Duration units (humantime's) and their length in nanoseconds.
    const DURATION_UNITS: &[(&str, u128)] = &[
        ("ns", 1),
        ("us", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("sec", 1_000_000_000),
        ("m", 60_000_000_000),
        ("min", 60_000_000_000),
        ("h", 3_600_000_000_000),
        ("hours", 3_600_000_000_000),
        ("d", 86_400_000_000_000),
        ("w", 604_800_000_000_000),
        ("M", 2_630_016_000_000_000),
        ("y", 31_557_600_000_000_000),
    ];

    /// Counts that sit on the edges: small, at a unit boundary, near and at `u64::MAX`.
    fn count() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..2000,
            any::<u64>(),
            prop::sample::select(vec![
                999,
                1000,
                999_999,
                1_000_000,
                999_999_999,
                1_000_000_000,
                (1 << 53) + 1,
                u64::MAX / 1000,
                u64::MAX / (1 << 40),
                u64::MAX / (1 << 40) + 1,
                u64::MAX - 1,
                u64::MAX,
            ]),
        ]
    }

    /// What `N` of a duration unit is: humantime counts sub-second units in `u64` nanoseconds and
    /// longer ones in `u64` seconds, and refuses what does not fit.
    fn duration_of(n: u64, unit_ns: u128) -> Option<Duration> {
        let ns = u128::from(n) * unit_ns;
        if unit_ns < 1_000_000_000 {
            u64::try_from(ns).ok().map(Duration::from_nanos)
        } else {
            u64::try_from(ns / 1_000_000_000)
                .ok()
                .map(Duration::from_secs)
        }
    }

    fn mixed_case(s: &str, flips: &[bool]) -> String {
        s.chars()
            .zip(flips.iter().chain(std::iter::repeat(&false)))
            .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn size_and_duration_parsers_never_panic(
            s in prop_oneof![
                any::<String>(),
                "[0-9. ]{0,25}[a-zA-Z ]{0,5}",
                "([0-9]{1,21}(\\.[0-9]{0,3})? ?[a-zA-Zµ]{0,6} ?){1,4}",
            ],
        ) {
            let _ = parse_size(&s);
            let _ = parse_duration(&s);
            let _ = parse_ttl_rule(&s);
            let _ = parse_resolve(&s);
            let _ = Cidr::parse(&s);
        }

        /// `N{unit}` is exactly N × unit, or an error when that passes `u64::MAX`: never rounded,
        /// wrapped or clamped.
        #[test]
        fn sizes_are_exact_or_an_overflow_error(
            n in count(),
            unit in prop::sample::select(SIZE_UNITS),
            flips in prop::collection::vec(any::<bool>(), 3),
            space in prop::sample::select(vec!["", " "]),
        ) {
            let (name, mult) = unit;
            let text = format!("{n}{space}{}", mixed_case(name, &flips));
            match n.checked_mul(mult) {
                Some(bytes) => prop_assert_eq!(parse_size(&text), Ok(bytes), "{}", text),
                None => prop_assert!(parse_size(&text).is_err(), "{} gave {:?}", text, parse_size(&text)),
            }
        }

        /// A fraction of a unit is within a rounding step of the exact value; past `u64::MAX` it
        /// is an error.
        #[test]
        fn fractional_sizes_are_close_or_an_overflow_error(
            whole in prop_oneof![0u64..10_000, any::<u64>().prop_map(|n| n >> 20)],
            tenths in 0u64..10,
            unit in prop::sample::select(SIZE_UNITS),
        ) {
            let (name, mult) = unit;
            let text = format!("{whole}.{tenths}{name}");
            let exact = (u128::from(whole) * 10 + u128::from(tenths)) * u128::from(mult) / 10;
            match parse_size(&text) {
                Ok(bytes) => {
                    let error = u128::from(bytes).abs_diff(exact);
                    prop_assert!(error <= 1 + exact / (1 << 50), "{} gave {} (exact {})", text, bytes, exact);
                }
                Err(_) => prop_assert!(exact + exact / (1 << 50) >= u128::from(u64::MAX), "{}", text),
            }
        }

        #[test]
        fn numbers_past_u64_are_errors(digits in "[1-9][0-9]{20,30}", unit in prop::sample::select(SIZE_UNITS)) {
            let (size, duration) = (format!("{digits}{}", unit.0), format!("{digits}s"));
            prop_assert!(parse_size(&size).is_err(), "{}", size);
            prop_assert!(parse_duration(&duration).is_err(), "{}", duration);
        }

        /// `N{unit}` durations, alone or added up, are the exact sum or an overflow error.
        #[test]
        fn durations_are_exact_sums_or_an_overflow_error(
            terms in prop::collection::vec((count(), prop::sample::select(DURATION_UNITS)), 1..4),
            sep in prop::sample::select(vec!["", " ", "  "]),
        ) {
            let text = terms
                .iter()
                .map(|(n, (unit, _))| format!("{n}{unit}"))
                .collect::<Vec<_>>()
                .join(sep);
            // Without a separator the terms still split: each starts with a digit.
            let want = terms.iter().try_fold(Duration::ZERO, |sum, (n, (_, ns))| {
                sum.checked_add(duration_of(*n, *ns)?)
            });
            match want {
                Some(d) => prop_assert_eq!(parse_duration(&text), Ok(d), "{}", text),
                None => prop_assert!(parse_duration(&text).is_err(), "{}", text),
            }
        }

        /// A running total at the very end of `Duration`'s range, pushed over by sub-second
        /// terms: an error or the exact sum, never a panic.
        #[test]
        fn durations_at_the_edge_of_the_range(
            below in 0u64..2,
            terms in prop::collection::vec(
                (
                    prop::sample::select(vec![1u64, 500, 999, 1000, 999_999, 1_000_000, 999_999_999, 1_000_000_000]),
                    prop::sample::select(DURATION_UNITS[..3].to_vec()),
                ),
                1..4,
            ),
        ) {
            let mut text = format!("{}s", u64::MAX - below);
            let mut want = Some(Duration::from_secs(u64::MAX - below));
            for (n, (unit, ns)) in &terms {
                text.push_str(&format!(" {n}{unit}"));
                want = want.and_then(|w| w.checked_add(duration_of(*n, *ns)?));
            }
            match want {
                Some(d) => prop_assert_eq!(parse_duration(&text), Ok(d), "{}", text),
                None => prop_assert!(parse_duration(&text).is_err(), "{}", text),
            }
        }

        #[test]
        fn cidrs_contain_their_own_address(ip in any::<std::net::IpAddr>(), prefix in 0u8..=128) {
            // An IPv4-mapped network never matches: clients are compared as IPv4 (left alone).
            prop_assume!(!matches!(ip, std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()));
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let net = Cidr::parse(&format!("{ip}/{prefix}"));
            prop_assert_eq!(net.is_ok(), prefix <= max);
            if let Ok(net) = net {
                prop_assert!(net.contains(ip));
                prop_assert_eq!(Cidr::parse(&net.to_string()), Ok(net));
            }
        }
    }
}
