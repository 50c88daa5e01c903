//! Configuration: one TOML file, `REGPROXY_*` environment variables and flags, merged into a
//! validated [`Config`]. Precedence is flag > environment > file > built-in default.
//!
//! Every key is declared once, as a row of the `keys!` table below: its flag, variable, file
//! key, help, checked type, how its layers combine and its default. The table generates
//! [`Settings`] (one layer, as clap and serde read it), [`Config`] and what `config check` prints.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::cache::shared::StoreSettings;
pub use crate::cache::shared::StoreUrl;

use crate::credentials::RegistryConfig;

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
        #[source]
        reason: ValueError,
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

/// Why one value is refused; [`ConfigError::Invalid`] adds the key and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// Not `IP:PORT`.
    #[error("{0}; expected IP:PORT such as 127.0.0.1:3128")]
    Addr(#[source] std::net::AddrParseError),
    /// Not a duration humantime reads, or a sum past `Duration`'s range.
    #[error("{0}; expected a duration such as 30s or 5m")]
    Duration(#[source] humantime::DurationError),
    /// A size whose number does not parse.
    #[error("expected a number with a unit such as 50GiB")]
    SizeNumber(#[source] std::num::ParseFloatError),
    /// A size with a unit that is not one of the documented ones.
    #[error("unknown unit {0:?}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")]
    SizeUnit(String),
    /// A size past `u64::MAX` bytes.
    #[error("{0:?} is more than {max} bytes", max = u64::MAX)]
    SizeOverflow(String),
    /// A `--tag-ttl-rule` without `=`.
    #[error("expected PATTERN=DURATION, e.g. docker.io/library/*=1h")]
    TtlRule,
    /// A `--tag-ttl-rule` with nothing before `=`.
    #[error("empty pattern")]
    EmptyPattern,
    /// An `intercept` entry that cannot be a host name or pattern.
    #[error("expected a host name or a *.suffix pattern")]
    HostPattern,
    /// Zero where at least one is needed.
    #[error("must be at least 1")]
    Zero,
    /// A log format other than `text` or `json`.
    #[error("expected text or json")]
    LogFormat,
    /// A `--resolve` entry without `=`.
    #[error("expected HOST:PORT=IP:PORT")]
    Resolve,
    /// A `--resolve` entry without `:PORT` before `=`.
    #[error("expected HOST:PORT before '='")]
    ResolveFrom,
    /// A `--resolve` entry with an empty host.
    #[error("empty host")]
    EmptyHost,
    /// A port that is not a number from 0 to 65535.
    #[error("bad port {port:?}")]
    Port {
        port: String,
        #[source]
        source: std::num::ParseIntError,
    },
    /// A `--resolve` address that is not `IP:PORT`.
    #[error("{source} in {to:?}; expected IP:PORT")]
    ResolveTo {
        to: String,
        #[source]
        source: std::net::AddrParseError,
    },
    /// A network whose address is not an IP address.
    #[error("{0}")]
    Ip(#[source] std::net::AddrParseError),
    /// A network whose prefix is not a number.
    #[error("bad prefix {prefix:?}")]
    Prefix {
        prefix: String,
        #[source]
        source: std::num::ParseIntError,
    },
    /// A prefix longer than the address.
    #[error("prefix {prefix} is longer than {max}")]
    PrefixLength { prefix: u8, max: u8 },
    /// One of a pair of keys given without the other.
    #[error("missing; {needed_by} needs it")]
    Missing { needed_by: &'static str },
    /// A count outside 1 to 16.
    #[error("must be from 1 to 16")]
    OneToSixteen,
    /// Not `s3://BUCKET[/PREFIX]`.
    #[error("expected s3://BUCKET[/PREFIX]")]
    StoreScheme,
    /// A bucket name S3 would refuse.
    #[error("bucket {0:?}: 3 to 63 lower-case letters, digits, '-' and '.'")]
    Bucket(String),
    /// A URL that is not `http(s)://HOST[:PORT]`.
    #[error("expected http://HOST[:PORT] or https://HOST[:PORT]")]
    HttpUrl,
    /// Not `HOST:PORT`.
    #[error("expected HOST:PORT")]
    HostPort,
    /// A fleet without the secret its members know each other by.
    #[error("a fleet needs peer_secret_file: peers never answer unauthenticated peer requests")]
    NoPeerSecret,
    /// A fleet member that does not say which member it is.
    #[error("a fleet needs advertise: this node's URL as the others reach it")]
    NoAdvertise,
    /// An advertised URL missing from the static member list.
    #[error("advertise must be one of the peer URLs (the list includes this node)")]
    NotAMember,
    /// A listener beyond loopback that names no clients.
    #[error(
        "listening beyond loopback needs allow_cidr and/or proxy_credentials_file, or anyone who \
         can reach it may use it"
    )]
    OpenProxy,
}

/// Output format of the log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable key=value lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Generates [`Settings`], [`Config`], the merging of layers and the `config check` lines from one
/// row per key:
///
/// ```text
/// /// Help, one line (--help shows it, with "[default: TEXT]" added when there is a default)
/// #[arg(env = "REGPROXY_KEY", value_name = "NAME")]    (more clap attributes as needed)
/// key: RAW => field: TYPE = MODE(PARSE, ...) [then FINISH] [, default "TEXT"];
/// ```
///
/// `key` is the file key, `--key` (dashes for underscores) the flag. `RAW` is a value as clap and
/// serde read it (`Vec<_>` for a repeatable key); `field: TYPE` is the checked [`Config`] field.
/// `MODE` says how the layers combine ([`One`], [`Opt`], [`List`]), `PARSE` checks one value
/// (a failure names the key), `FINISH` tidies a whole list, and a default is written as a user
/// would write it. A row without `=> ...` is a key that [`Settings::resolve`] combines by hand
/// (and [`Config::show_part`] prints). `Settings { .. }` and `Config { .. }` add fields that are
/// not keys of their own.
macro_rules! keys {
    (
        $(
            #[doc = $doc:literal]
            #[arg($($arg:tt)*)]
            $key:ident: $raw:ty $(=> $field:ident: $ty:ty = $mode:ident($($how:expr),*)
                $(then $finish:path)? $(, default $default:literal)?)?;
        )*
        Settings { $($(#[$sattr:meta])* $sfield:ident: $sty:ty,)* }
        Config { $(#[doc = $cdoc:literal] $cfield:ident: $cty:ty,)* }
    ) => {
        /// One layer of settings, as written in the file or given by flags and environment.
        ///
        /// The same struct is parsed by clap (flags with `REGPROXY_*` fallbacks) and by serde (the
        /// TOML file), so a key has one name everywhere: `--cache-dir`, `REGPROXY_CACHE_DIR`,
        /// `cache_dir`.
        #[derive(Debug, Default, Clone, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $(
                #[doc = $doc]
                #[arg(global = true, long, $($arg)*)]
                $($(#[arg(help = concat!($doc, " [default: ", $default, "]").trim_start())])?)?
                pub $key: Option<$raw>,
            )*
            $($(#[$sattr])* pub $sfield: $sty,)*
        }

        /// The effective, validated configuration the proxy runs with.
        #[derive(Debug, Clone)]
        pub struct Config {
            $($(
                #[doc = $doc]
                $(#[doc = concat!("[default: ", $default, "]")])?
                pub $field: $ty,
            )?)*
            $(#[doc = $cdoc] pub $cfield: $cty,)*
        }

        /// Every key, in the order `--help` and `config check` show them.
        const KEYS: &[&str] = &[$(stringify!($key)),*];

        impl Settings {
            /// `self` (flags and environment) over `file` over the defaults, key by key; the
            /// fields that are not keys come from [`Settings::resolve`].
            #[allow(clippy::let_and_return)]
            fn merge(self, file: Settings, $($cfield: $cty),*) -> Result<Config, ConfigError> {
                Ok(Config {
                    $($($field: {
                        let v = $mode::merge(
                            stringify!($key), self.$key, file.$key, $($how),* $(, $default)?
                        )?;
                        $(let v = $finish(v);)?
                        v
                    },)?)*
                    $($cfield,)*
                })
            }
        }

        impl Config {
            /// A key's value as `config check` prints it; `None` leaves the key out.
            fn show(&self, key: &str) -> Option<String> {
                match key {
                    $($(stringify!($key) => $mode::show(&self.$field),)?)*
                    _ => self.show_part(key),
                }
            }
        }
    };
}

keys! {
    /// Proxy listen address
    #[arg(env = "REGPROXY_LISTEN", value_name = "ADDR")]
    listen: String => listen: SocketAddr = One(parse_addr), default "127.0.0.1:3128";
    /// Admin endpoint listen address
    #[arg(env = "REGPROXY_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: String => admin_listen: SocketAddr = One(parse_addr), default "127.0.0.1:3129";
    /// Directory holding ca.crt and ca.key
    #[arg(env = "REGPROXY_CA_DIR", value_name = "DIR")]
    ca_dir: PathBuf => ca_dir: PathBuf = One(as_is), default "certs";
    /// Cache directory
    #[arg(env = "REGPROXY_CACHE_DIR", value_name = "DIR")]
    cache_dir: PathBuf => cache_dir: PathBuf = One(as_is), default "cache";
    /// Extra host pattern to intercept (exact or *.suffix); adds to the default list
    #[arg(env = "REGPROXY_INTERCEPT", value_name = "PATTERN", value_delimiter = ',')]
    intercept: Vec<String> => intercept: Vec<String> =
        List(parse_pattern, DEFAULT_INTERCEPT) then unique;
    /// Resolve override HOST:PORT=IP:PORT
    #[arg(env = "REGPROXY_RESOLVE", value_name = "HOST:PORT=IP:PORT", value_delimiter = ',')]
    resolve: Vec<String> => resolve: Vec<(String, SocketAddr)> = List(parse_resolve, &[]);
    /// Extra PEM root CA file for upstream TLS
    #[arg(env = "REGPROXY_UPSTREAM_CA", value_name = "FILE", value_delimiter = ',')]
    upstream_ca: Vec<PathBuf> => upstream_ca: Vec<PathBuf> = List(as_is, &[]);
    /// Extra port CONNECT may reach, besides 443
    #[arg(env = "REGPROXY_ALLOW_PORT", value_name = "PORT", value_delimiter = ',')]
    allow_port: Vec<u16> => allow_port: Vec<u16> = List(as_is, &["443"]) then sorted;
    /// How long a tag stays fresh, e.g. 5m
    #[arg(env = "REGPROXY_TAG_TTL", value_name = "DURATION")]
    tag_ttl: String => tag_ttl: Duration = One(parse_duration), default "5m";
    /// Tag freshness for matching repositories, PATTERN=DURATION (PATTERN is host/repo, `*` matches anything; first match wins), e.g. docker.io/library/*=1h
    #[arg(env = "REGPROXY_TAG_TTL_RULE", value_name = "PATTERN=DURATION", value_delimiter = ',')]
    tag_ttl_rule: Vec<String> => tag_ttl_rules: Vec<(String, Duration)> =
        List(parse_ttl_rule, &[]);
    /// Cache size bound, e.g. 50GiB [default: unbounded]
    #[arg(env = "REGPROXY_MAX_CACHE_SIZE", value_name = "SIZE")]
    max_cache_size: String => max_cache_size: Option<u64> = Opt(parse_size);
    /// Free space to leave on the cache's file system, e.g. 5GiB [default: none]
    #[arg(env = "REGPROXY_MIN_FREE_DISK", value_name = "SIZE")]
    min_free_disk: String => min_free_disk: Option<u64> = Opt(parse_size);
    /// Log format: text or json
    #[arg(env = "REGPROXY_LOG_FORMAT", value_name = "FORMAT")]
    log_format: String => log_format: LogFormat = One(parse_log_format), default "text";
    /// Upstream connect timeout, e.g. 10s
    #[arg(env = "REGPROXY_CONNECT_TIMEOUT", value_name = "DURATION")]
    connect_timeout: String => connect_timeout: Duration = One(parse_duration), default "10s";
    /// Idle time after which client and pooled upstream connections close
    #[arg(env = "REGPROXY_IDLE_TIMEOUT", value_name = "DURATION")]
    idle_timeout: String => idle_timeout: Duration = One(parse_duration), default "90s";
    /// Time an upstream may take to start answering before it counts as down
    #[arg(env = "REGPROXY_UPSTREAM_TIMEOUT", value_name = "DURATION")]
    upstream_timeout: String => upstream_timeout: Duration = One(parse_duration), default "60s";
    /// Upstream of mirror requests without ?ns= (docker's registry-mirrors)
    #[arg(env = "REGPROXY_MIRROR_DEFAULT", value_name = "HOST")]
    mirror_default: String => mirror_default: String = One(lowercase), default "docker.io";
    /// Separate listener for mirror mode (the proxy listener serves /v2/ too)
    #[arg(env = "REGPROXY_MIRROR_LISTEN", value_name = "ADDR")]
    mirror_listen: String => mirror_listen: Option<SocketAddr> = Opt(parse_addr);
    /// PEM certificate for TLS on --mirror-listen (with --mirror-tls-key)
    #[arg(env = "REGPROXY_MIRROR_TLS_CERT", value_name = "FILE")]
    mirror_tls_cert: PathBuf;
    /// PEM key for TLS on --mirror-listen
    #[arg(env = "REGPROXY_MIRROR_TLS_KEY", value_name = "FILE")]
    mirror_tls_key: PathBuf;
    /// A docker config.json to take upstream credentials from (auths, credHelpers, credsStore)
    #[arg(env = "REGPROXY_DOCKER_CONFIG", value_name = "FILE")]
    docker_config: PathBuf => docker_config: Option<PathBuf> = Opt(as_is);
    /// Client network allowed to use the proxy, CIDR; repeatable [default: anyone who can connect]
    #[arg(env = "REGPROXY_ALLOW_CIDR", value_name = "CIDR", value_delimiter = ',')]
    allow_cidr: Vec<String> => allow_cidr: Vec<Cidr> = List(Cidr::parse, &[]);
    /// File of user:password lines; clients must send Proxy-Authorization: Basic with one
    #[arg(env = "REGPROXY_PROXY_CREDENTIALS_FILE", value_name = "FILE")]
    proxy_credentials_file: PathBuf => proxy_credentials_file: Option<PathBuf> = Opt(as_is);
    /// Destination network reachable although refused by default (loopback, link-local, unspecified, multicast), CIDR; repeatable
    #[arg(env = "REGPROXY_ALLOW_DESTINATION", value_name = "CIDR", value_delimiter = ',')]
    allow_destination: Vec<String> => allow_destination: Vec<Cidr> = List(Cidr::parse, &[]);
    /// Destination network never reached (wins over --allow-destination and --resolve), CIDR; repeatable
    #[arg(env = "REGPROXY_DENY_DESTINATION", value_name = "CIDR", value_delimiter = ',')]
    deny_destination: Vec<String> => deny_destination: Vec<Cidr> = List(Cidr::parse, &[]);
    /// Client connections held at once; more wait to be accepted
    #[arg(env = "REGPROXY_MAX_CONNECTIONS", value_name = "N")]
    max_connections: usize => max_connections: usize = One(at_least_one), default "4096";
    /// Upstream connections at once for one large blob, each fetching a ranged piece (1: one connection per blob)
    #[arg(env = "REGPROXY_BLOB_CONNECTIONS", value_name = "N")]
    blob_connections: usize => blob_connections: usize = One(one_to_sixteen), default "4";
    /// Grace time for in-flight transfers on SIGTERM/SIGINT
    #[arg(env = "REGPROXY_SHUTDOWN_GRACE", value_name = "DURATION")]
    shutdown_grace: String => shutdown_grace: Duration = One(parse_duration), default "30s";
    /// Shared object-store tier for a fleet, s3://BUCKET[/PREFIX] [default: off]
    #[arg(env = "REGPROXY_SHARED_STORE", value_name = "s3://BUCKET[/PREFIX]")]
    shared_store: String => shared_store: Option<StoreUrl> = Opt(parse_store_url);
    /// S3 endpoint of the shared store, e.g. http://127.0.0.1:3900 for Garage or MinIO [default: AWS]
    #[arg(env = "REGPROXY_SHARED_STORE_ENDPOINT", value_name = "URL")]
    shared_store_endpoint: String => shared_store_endpoint: Option<String> = Opt(parse_url);
    /// Region of the shared store (Garage uses garage)
    #[arg(env = "REGPROXY_SHARED_STORE_REGION", value_name = "NAME")]
    shared_store_region: String => shared_store_region: String = One(as_is), default "us-east-1";
    /// Access key id of the shared store [default: $AWS_ACCESS_KEY_ID]
    #[arg(env = "REGPROXY_ACCESS_KEY_ID", value_name = "ID")]
    access_key_id: String => access_key_id: Option<String> = Opt(as_is);
    /// File holding the shared store's secret access key [default: $AWS_SECRET_ACCESS_KEY]
    #[arg(env = "REGPROXY_SECRET_ACCESS_KEY_FILE", value_name = "FILE")]
    secret_access_key_file: PathBuf => secret_access_key_file: Option<PathBuf> = Opt(as_is);
    /// A fleet member's URL, e.g. http://10.0.0.5:3128; repeatable, this node included
    #[arg(env = "REGPROXY_PEER", value_name = "URL", value_delimiter = ',')]
    peer: Vec<String> => peers: Vec<String> = List(parse_url, &[]) then sorted;
    /// This node's URL as the other fleet members reach it
    #[arg(env = "REGPROXY_ADVERTISE", value_name = "URL")]
    advertise: String => advertise: Option<String> = Opt(parse_url);
    /// DNS name whose addresses are the fleet (a Kubernetes headless Service), HOST:PORT
    #[arg(env = "REGPROXY_PEERS_DNS", value_name = "HOST:PORT")]
    peers_dns: String => peers_dns: Option<(String, u16)> = Opt(parse_host_port);
    /// File holding the secret fleet members authenticate each other with
    #[arg(env = "REGPROXY_PEER_SECRET_FILE", value_name = "FILE")]
    peer_secret_file: PathBuf => peer_secret_file: Option<PathBuf> = Opt(as_is);

    Settings {
        /// Upstream credentials per registry (config file only: [registries."HOST"])
        #[arg(skip)]
        registries: Option<BTreeMap<String, RegistryConfig>>,
    }
    Config {
        /// Certificate and key (PEM) for TLS on the mirror listener; plain HTTP without them.
        mirror_tls: Option<(PathBuf, PathBuf)>,
        /// Upstream credentials per registry host (`[registries."HOST"]` in the file).
        registries: BTreeMap<String, RegistryConfig>,
    }
}

/// A key with one value: the flag's (or the environment's), else the file's, else the default.
struct One;

impl One {
    fn merge<R: Raw + Borrow<Q>, Q: ?Sized, T>(
        key: &'static str,
        flag: Option<R>,
        file: Option<R>,
        parse: impl Fn(&Q) -> Result<T, ValueError>,
        default: &str,
    ) -> Result<T, ConfigError> {
        check(key, flag.or(file).unwrap_or_else(|| raw(default)), parse)
    }

    fn show(value: &impl Show) -> Option<String> {
        Some(value.show())
    }
}

/// A key that may be unset: the flag's (or the environment's), else the file's, else none.
struct Opt;

impl Opt {
    fn merge<R: Raw + Borrow<Q>, Q: ?Sized, T>(
        key: &'static str,
        flag: Option<R>,
        file: Option<R>,
        parse: impl Fn(&Q) -> Result<T, ValueError>,
    ) -> Result<Option<T>, ConfigError> {
        flag.or(file).map(|r| check(key, r, parse)).transpose()
    }

    fn show<T: Show>(value: &Option<T>) -> Option<String> {
        value.as_ref().map(Show::show)
    }
}

/// A repeatable key: the default entries, then the file's, then the flags' (or the environment's,
/// comma-separated).
struct List;

impl List {
    fn merge<R: Raw + Borrow<Q>, Q: ?Sized, T>(
        key: &'static str,
        flag: Option<Vec<R>>,
        file: Option<Vec<R>>,
        parse: impl Fn(&Q) -> Result<T, ValueError>,
        default: &[&str],
    ) -> Result<Vec<T>, ConfigError> {
        let defaults = default.iter().map(|d| raw(d));
        defaults
            .chain(file.into_iter().flatten())
            .chain(flag.into_iter().flatten())
            .map(|r| check(key, r, &parse))
            .collect()
    }

    fn show<T: Show>(values: &[T]) -> Option<String> {
        let shown: Vec<String> = values.iter().map(Show::show).collect();
        Some(format!("[{}]", shown.join(", ")))
    }
}

/// Parses one value of `key`; a failure names the key and quotes the value.
fn check<R: Raw + Borrow<Q>, Q: ?Sized, T>(
    key: &'static str,
    raw: R,
    parse: impl Fn(&Q) -> Result<T, ValueError>,
) -> Result<T, ConfigError> {
    parse(raw.borrow()).map_err(|reason| invalid(key, &raw.text(), reason))
}

/// A value as clap and serde hand it over, before it is checked.
trait Raw: FromStr {
    /// The value as an error message quotes it.
    fn text(&self) -> String;
}

/// A built-in default, written as a user would write it.
fn raw<R: Raw>(text: &str) -> R {
    text.parse()
        .unwrap_or_else(|_| panic!("built-in default {text:?} does not parse"))
}

/// How `config check` writes a value: as the file takes it.
trait Show {
    fn show(&self) -> String;
}

/// A TOML string (Rust's escapes are TOML's for what these values hold).
fn quote(s: impl std::fmt::Display) -> String {
    format!("{:?}", s.to_string())
}

/// Implements `TRAIT::METHOD(&self) -> String` for each `TYPE: |self| BODY`.
macro_rules! to_text {
    ($tr:ident::$method:ident { $($ty:ty: |$v:pat_param| $body:expr;)* }) => {$(
        impl $tr for $ty {
            fn $method(&self) -> String {
                let $v = self;
                $body
            }
        }
    )*};
}

to_text!(Raw::text {
    String: |s| s.clone();
    PathBuf: |p| p.display().to_string();
    u16: |n| n.to_string();
    usize: |n| n.to_string();
});

to_text!(Show::show {
    String: |s| quote(s);
    SocketAddr: |a| quote(a);
    Cidr: |c| quote(c);
    PathBuf: |p| quote(p.display());
    Duration: |d| quote(humantime::format_duration(*d));
    u64: |size| quote(size); // a size in bytes: a string in the file, as `50GiB` is
    u16: |n| n.to_string();
    usize: |n| n.to_string();
    LogFormat: |f| quote(if *f == LogFormat::Json { "json" } else { "text" });
    (String, SocketAddr): |(host, addr)| quote(format!("{host}={addr}"));
    (String, Duration): |(p, d)| quote(format!("{p}={}", humantime::format_duration(*d)));
    (String, u16): |(host, port)| quote(format!("{host}:{port}"));
    StoreUrl: |u| quote(u);
});

/// Parses `s3://BUCKET` or `s3://BUCKET/PREFIX`.
pub fn parse_store_url(s: &str) -> Result<StoreUrl, ValueError> {
    let rest = s.strip_prefix("s3://").ok_or(ValueError::StoreScheme)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
        return Err(ValueError::Bucket(bucket.to_owned()));
    }
    Ok(StoreUrl {
        bucket: bucket.to_owned(),
        prefix: prefix.trim_matches('/').to_owned(),
    })
}

/// Parses an `http://` or `https://` URL with a host (an endpoint or a peer), without a
/// trailing slash.
fn parse_url(s: &str) -> Result<String, ValueError> {
    let uri: http::Uri = s.parse().map_err(|_| ValueError::HttpUrl)?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.host().map_or(true, str::is_empty) {
        return Err(ValueError::HttpUrl);
    }
    Ok(s.trim_end_matches('/').to_owned())
}

/// Parses `HOST:PORT`.
fn parse_host_port(s: &str) -> Result<(String, u16), ValueError> {
    let (host, port) = s.rsplit_once(':').ok_or(ValueError::HostPort)?;
    let port = port.parse().map_err(|source| ValueError::Port {
        port: port.to_owned(),
        source,
    })?;
    if host.is_empty() {
        return Err(ValueError::EmptyHost);
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// An IP network, `ADDR/PREFIX` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or `192.0.2.7`.
    pub fn parse(s: &str) -> Result<Cidr, ValueError> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = a.trim().parse().map_err(ValueError::Ip)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse().map_err(|source| ValueError::Prefix {
                prefix: p.to_owned(),
                source,
            })?
        };
        if prefix > max {
            return Err(ValueError::PrefixLength { prefix, max });
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
    /// What [`Settings::resolve`] makes of no settings at all.
    fn default() -> Self {
        Settings::default()
            .resolve(Settings::default())
            .expect("the built-in defaults are valid")
    }
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
    pub fn resolve(mut self, mut file: Settings) -> Result<Config, ConfigError> {
        let mirror_tls = match (
            self.mirror_tls_cert.take().or(file.mirror_tls_cert.take()),
            self.mirror_tls_key.take().or(file.mirror_tls_key.take()),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (c, _) => {
                let (key, needed_by) = if c.is_some() {
                    ("mirror_tls_key", "mirror_tls_cert")
                } else {
                    ("mirror_tls_cert", "mirror_tls_key")
                };
                return Err(invalid(key, "", ValueError::Missing { needed_by }));
            }
        };
        let registries = file.registries.take().unwrap_or_default();
        self.merge(file, mirror_tls, registries)
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
                    return Err(invalid(key, &addr.to_string(), ValueError::OpenProxy));
                }
            }
        }
        Ok(())
    }

    /// Refuses a fleet that could not work: members that cannot tell which one they are, or
    /// that have no secret to know each other by.
    pub fn check_fleet(&self) -> Result<(), ConfigError> {
        let fleet = !self.peers.is_empty() || self.peers_dns.is_some();
        if !fleet {
            return Ok(());
        }
        let peers = self.peers.join(",");
        if self.peer_secret_file.is_none() {
            return Err(invalid("peer", &peers, ValueError::NoPeerSecret));
        }
        let Some(me) = &self.advertise else {
            return Err(invalid("peer", &peers, ValueError::NoAdvertise));
        };
        if self.peers_dns.is_none() && !self.peers.contains(me) {
            return Err(invalid("advertise", me, ValueError::NotAMember));
        }
        Ok(())
    }

    /// The shared store's settings, when there is one.
    pub fn shared_store_settings(&self) -> Option<StoreSettings> {
        Some(StoreSettings {
            url: self.shared_store.clone()?,
            endpoint: self.shared_store_endpoint.clone(),
            region: self.shared_store_region.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key_file: self.secret_access_key_file.clone(),
        })
    }

    /// Renders the effective config as TOML (there are no secrets in it yet; masked ones print `***`).
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for key in KEYS {
            if let Some(value) = self.show(key) {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
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
                kv("password_file", quote(f.display()));
            }
            if let Some(e) = &r.password_env {
                kv("password_env", quote(e));
            }
        }
        out
    }

    /// The keys [`Settings::resolve`] combines by hand, as `config check` prints them.
    fn show_part(&self, key: &str) -> Option<String> {
        let (cert, tls_key) = self.mirror_tls.as_ref()?;
        match key {
            "mirror_tls_cert" => Some(cert.show()),
            "mirror_tls_key" => Some(tls_key.show()),
            _ => None,
        }
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
fn parse_ttl_rule(s: &str) -> Result<(String, Duration), ValueError> {
    let (pattern, ttl) = s.rsplit_once('=').ok_or(ValueError::TtlRule)?;
    if pattern.is_empty() {
        return Err(ValueError::EmptyPattern);
    }
    Ok((pattern.to_owned(), parse_duration(ttl)?))
}

/// An `intercept` entry: a host name or a pattern, in lower case.
fn parse_pattern(p: &str) -> Result<String, ValueError> {
    let bad = p.is_empty() || p.contains(char::is_whitespace) || p.contains(':') || p.contains('/');
    if bad {
        return Err(ValueError::HostPattern);
    }
    Ok(p.to_ascii_lowercase())
}

/// Drops repeated entries, keeping the first.
fn unique(mut v: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    v.retain(|p| seen.insert(p.clone()));
    v
}

/// Sorts and drops repeated entries.
fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort_unstable();
    v.dedup();
    v
}

/// A value taken as it is (paths, ports).
fn as_is<T: Clone>(v: &T) -> Result<T, ValueError> {
    Ok(v.clone())
}

fn lowercase(s: &str) -> Result<String, ValueError> {
    Ok(s.to_ascii_lowercase())
}

fn at_least_one(n: &usize) -> Result<usize, ValueError> {
    match n {
        0 => Err(ValueError::Zero),
        n => Ok(*n),
    }
}

fn one_to_sixteen(n: &usize) -> Result<usize, ValueError> {
    match n {
        1..=16 => Ok(*n),
        _ => Err(ValueError::OneToSixteen),
    }
}

fn invalid(key: &'static str, value: &str, reason: ValueError) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason,
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, ValueError> {
    s.parse().map_err(ValueError::Addr)
}

/// Parses a duration such as `90s`, `5m` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    // humantime panics when a term carries the running total just past u64::MAX seconds
    // ("18446744073709551615s 1000000000ns"; humantime#66). A term alone starts from zero and
    // cannot, so the terms are parsed one by one and their sum is checked here.
    let mut total = Duration::ZERO;
    for term in duration_terms(s) {
        let d = humantime::parse_duration(term).map_err(ValueError::Duration)?;
        total = total.checked_add(d).ok_or(ValueError::Duration(
            humantime::DurationError::NumberOverflow,
        ))?;
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

fn parse_log_format(s: &str) -> Result<LogFormat, ValueError> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(ValueError::LogFormat),
    }
}

/// Parses `HOST:PORT=IP:PORT`.
pub fn parse_resolve(s: &str) -> Result<(String, SocketAddr), ValueError> {
    let (from, to) = s.split_once('=').ok_or(ValueError::Resolve)?;
    let (host, port) = from.rsplit_once(':').ok_or(ValueError::ResolveFrom)?;
    port.parse::<u16>().map_err(|source| ValueError::Port {
        port: port.to_owned(),
        source,
    })?;
    if host.is_empty() {
        return Err(ValueError::EmptyHost);
    }
    let addr = to.parse().map_err(|source| ValueError::ResolveTo {
        to: to.to_owned(),
        source,
    })?;
    Ok((format!("{}:{port}", host.to_ascii_lowercase()), addr))
}

/// Parses a size such as `50GiB`, `512MiB`, `10GB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(ValueError::SizeNumber)?;
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
        u => return Err(ValueError::SizeUnit(u.to_owned())),
    };
    let too_big = || ValueError::SizeOverflow(t.to_owned());
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

    /// The public names follow one rule: `key`, `--key` with dashes, `REGPROXY_KEY`.
    #[test]
    fn every_key_is_a_flag_and_a_variable_of_the_same_name() {
        use clap::Args;
        let cmd = Settings::augment_args(clap::Command::new("t"));
        let args: Vec<_> = cmd.get_arguments().collect();
        assert_eq!(args.len(), KEYS.len());
        for (arg, key) in args.iter().zip(KEYS) {
            assert_eq!(arg.get_id(), key);
            assert_eq!(arg.get_long(), Some(key.replace('_', "-").as_str()));
            let env = format!("REGPROXY_{}", key.to_ascii_uppercase());
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(&env)));
            assert!(arg.is_global_set(), "{key}");
        }
    }

    /// What `config check` prints is a config file that gives the same configuration.
    #[test]
    fn config_check_output_reads_back_as_the_same_config() {
        let full = r#"
            listen = "127.0.0.1:4000"
            intercept = ["Reg.Example", "docker.io"]
            resolve = ["r.test:5000=127.0.0.1:5001"]
            upstream_ca = ["/a.pem"]
            allow_port = [5000, 80]
            tag_ttl = "90s"
            tag_ttl_rule = ["ghcr.io/*=1h 30m"]
            max_cache_size = "1.5GiB"
            min_free_disk = "5GB"
            log_format = "json"
            mirror_default = "GHCR.io"
            mirror_listen = "127.0.0.1:5000"
            mirror_tls_cert = "/m.crt"
            mirror_tls_key = "/m.key"
            docker_config = "/d.json"
            allow_cidr = ["10.0.0.0/8"]
            proxy_credentials_file = "/users"
            allow_destination = ["::1"]
            deny_destination = ["10.0.0.0/8"]
            max_connections = 7
            shutdown_grace = "1s"
            [registries."ghcr.io/org"]
            username = "u"
            password = "hunter2"
        "#;
        for text in ["", full] {
            let settings: Settings = toml::from_str(text).unwrap();
            let shown = settings.resolve(Settings::default()).unwrap().to_toml();
            let again: Settings = toml::from_str(&shown).unwrap();
            let reshown = again.resolve(Settings::default()).unwrap().to_toml();
            assert_eq!(shown, reshown);
            assert_eq!(
                text.is_empty(),
                !shown.contains("mirror_tls_key = \"/m.key\"")
            );
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
