//! Counters and gauges for the admin endpoint's `/metrics`, in the Prometheus text format.
//! Labels are registry hosts, outcomes and statuses: never paths, users or tokens.
//!
//! The numbers live in plain atomics and maps (the cap on series needs the maps); on each
//! scrape they are read into prometheus-client's constant metrics, and its encoder writes the
//! exposition.

use parking_lot::{Mutex, MutexGuard};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Every number regproxy exports.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, &'static str), u64>>,
    upstream_requests: Mutex<BTreeMap<(String, String), u64>>,
    ratelimit: Mutex<BTreeMap<String, RateLimit>>,
    // Tags resolved, by `host/repo:tag`: the status page's "most used". Never exported as
    // labels (repositories are not metric labels).
    pulls: Mutex<BTreeMap<String, u64>>,
    /// Body bytes sent to clients from cached (complete) objects.
    pub bytes_from_cache: AtomicU64,
    /// Bytes downloaded from upstreams into the cache.
    pub bytes_from_upstream: AtomicU64,
    /// Requests that joined a download already in flight.
    pub joins: AtomicU64,
    /// Objects removed to keep the cache within its bounds.
    pub evictions: AtomicU64,
    /// Objects streamed past the cache (verified, not stored) because the disk had no room.
    pub passthrough: AtomicU64,
    /// Ranged pieces of large objects fetched upstream on connections of their own.
    pub pieces: AtomicU64,
    /// Objects whose pieces (the first one too) failed, fetched in one request for the rest.
    pub piece_fallbacks: AtomicU64,
    /// Bytes of verified objects on disk.
    pub cache_bytes: AtomicU64,
    /// Number of verified objects on disk.
    pub cache_entries: AtomicU64,
    /// Client connections open now.
    pub open_connections: AtomicI64,
    /// Blind tunnels open now.
    pub open_tunnels: AtomicI64,
    /// Whether a shared store is configured (its gauge is shown only then).
    pub shared_store_configured: std::sync::atomic::AtomicBool,
    /// 1 while the shared store answers, 0 while its breaker is open.
    pub shared_store_up: AtomicU64,
    /// Objects read from the shared store.
    pub shared_store_reads: AtomicU64,
    /// Objects uploaded to the shared store.
    pub shared_store_uploads: AtomicU64,
    /// Writes to the shared store queued or running.
    pub shared_store_pending: AtomicI64,
    /// Uploads dropped: the queue was full or the store down.
    pub shared_store_dropped: AtomicU64,
    /// Failed or timed-out calls to the shared store.
    pub shared_store_errors: AtomicU64,
    /// Objects fetched from the fleet member that owns them.
    pub peer_fetches: AtomicU64,
}

/// The rate-limit state an upstream last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per window.
    pub limit: u64,
    /// Requests left in the window.
    pub remaining: u64,
    /// Window length in seconds, when given.
    pub window: Option<u64>,
}

/// Series kept per family; further hosts (clients name them, e.g. by tunnelling anywhere) are
/// counted under [`OTHER`], so that no client grows the metrics without bound.
const MAX_SERIES: usize = 1024;
/// The label of the hosts beyond [`MAX_SERIES`].
const OTHER: &str = "other";
/// Images whose pulls are counted; further ones are not (clients name them).
const MAX_IMAGES: usize = 4096;

/// Outcomes answered from the cache, and those that needed the upstream's bytes: the hit ratio
/// is the first over both (as `cache stats` and the contrib dashboards compute it).
pub const SERVED_FROM_CACHE: [&str; 3] = ["HIT", "REVALIDATED", "STALE"];
/// See [`SERVED_FROM_CACHE`].
pub const FETCHED_UPSTREAM: [&str; 2] = ["MISS", "JOINED"];

/// Figures known at scrape time rather than counted: the CA's issuance count, the downloads in
/// flight, the cache's bounds and the free space of its file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    /// Leaf certificates issued.
    pub leaves: u64,
    /// Downloads in flight.
    pub downloads: u64,
    /// `--max-cache-size`, if set.
    pub max_bytes: Option<u64>,
    /// `--min-free-disk`, if set.
    pub min_free: Option<u64>,
    /// Free bytes on the cache's file system, if known.
    pub disk_free: Option<u64>,
}

/// One registry host's figures since start, for the status page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryFigures {
    /// Requests answered, every outcome but tunnels.
    pub requests: u64,
    /// Of those, answered from the cache ([`SERVED_FROM_CACHE`]).
    pub from_cache: u64,
    /// Upstream responses, any status.
    pub upstream: u64,
    /// Upstream responses that were 5xx, timeouts or errors.
    pub upstream_errors: u64,
    /// The rate limit the upstream last reported.
    pub ratelimit: Option<RateLimit>,
}

/// `registry`, or [`OTHER`] once `map` holds [`MAX_SERIES`] series of other hosts.
fn label<V>(map: &BTreeMap<(String, V), u64>, registry: &str) -> String {
    let known = map.keys().any(|(r, _)| r == registry);
    if known || map.len() < MAX_SERIES {
        registry.to_owned()
    } else {
        OTHER.to_owned()
    }
}

impl Metrics {
    /// Counts one answered request on `registry` with `outcome` (HIT, MISS, …, TUNNEL).
    pub fn request(&self, registry: &str, outcome: &'static str, bytes: u64) {
        let mut map = lock(&self.requests);
        let registry = label(&map, registry);
        *map.entry((registry, outcome)).or_default() += 1;
        if outcome == "HIT" {
            self.bytes_from_cache.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts one upstream response (`status` is the code, or `error` when none came).
    pub fn upstream(&self, registry: &str, status: &str) {
        let mut map = lock(&self.upstream_requests);
        let registry = label(&map, registry);
        *map.entry((registry, status.to_owned())).or_default() += 1;
    }

    /// Records the rate-limit headers of an upstream response, if it carried them.
    pub fn ratelimit(&self, registry: &str, headers: &http::HeaderMap) {
        if let Some(rl) = parse_ratelimit(headers) {
            let mut map = lock(&self.ratelimit);
            if map.contains_key(registry) || map.len() < MAX_SERIES {
                map.insert(registry.to_owned(), rl);
            }
        }
    }

    /// Counts one tag resolved (`GET` or `HEAD` of a manifest by tag that succeeded).
    pub fn pulled(&self, host: &str, repo: &str, tag: &str) {
        let name = crate::cache::keys::image_name(host, repo, tag);
        let mut map = lock(&self.pulls);
        if let Some(n) = map.get_mut(&name) {
            *n += 1;
        } else if map.len() < MAX_IMAGES {
            map.insert(name, 1);
        }
    }

    /// Tags resolved since start, by `host/repo:tag`.
    pub fn pulls(&self) -> BTreeMap<String, u64> {
        lock(&self.pulls).clone()
    }

    /// Requests answered from the cache and requests that needed upstream bytes, since start.
    pub fn served_and_fetched(&self) -> (u64, u64) {
        let map = lock(&self.requests);
        let sum = |outcomes: &[&str]| -> u64 {
            map.iter()
                .filter(|((_, o), _)| outcomes.contains(o))
                .map(|(_, n)| n)
                .sum()
        };
        (sum(&SERVED_FROM_CACHE), sum(&FETCHED_UPSTREAM))
    }

    /// Figures per registry host (tunnelled hosts are not registries).
    pub fn registries(&self) -> BTreeMap<String, RegistryFigures> {
        let mut out: BTreeMap<String, RegistryFigures> = BTreeMap::new();
        for ((host, outcome), n) in lock(&self.requests).iter() {
            if *outcome == "TUNNEL" {
                continue;
            }
            let f = out.entry(host.clone()).or_default();
            f.requests += n;
            if SERVED_FROM_CACHE.contains(outcome) {
                f.from_cache += n;
            }
        }
        for ((host, status), n) in lock(&self.upstream_requests).iter() {
            let f = out.entry(host.clone()).or_default();
            f.upstream += n;
            if !status.starts_with(['1', '2', '3', '4']) {
                f.upstream_errors += n;
            }
        }
        for (host, rl) in lock(&self.ratelimit).iter() {
            out.entry(host.clone()).or_default().ratelimit = Some(*rl);
        }
        out
    }

    /// The Prometheus text exposition (version 0.0.4), with the figures only known at scrape.
    pub fn render(&self, live: &Live) -> String {
        let requests = lock(&self.requests)
            .iter()
            .map(|((registry, outcome), n)| {
                let labels = [
                    ("registry", registry.clone()),
                    ("outcome", (*outcome).into()),
                ];
                (labels, ConstCounter::new(*n))
            })
            .collect();
        let upstream = lock(&self.upstream_requests)
            .iter()
            .map(|((registry, status), n)| {
                let labels = [("registry", registry.clone()), ("status", status.clone())];
                (labels, ConstCounter::new(*n))
            })
            .collect();
        let limits = lock(&self.ratelimit).clone();
        let ratelimit = |value: fn(&RateLimit) -> u64| {
            let series = limits.iter().map(|(registry, rl)| {
                ([("registry", registry.clone())], ConstGauge::new(value(rl)))
            });
            Series(series.collect())
        };
        let counter = |a: &AtomicU64| ConstCounter::new(a.load(Ordering::Relaxed));
        let gauge = |a: &AtomicU64| ConstGauge::new(a.load(Ordering::Relaxed));
        let open = |a: &AtomicI64| ConstGauge::new(a.load(Ordering::Relaxed));
        // Unset bounds are families without samples: dashboards and alerts find the name.
        let optional = |v: Option<u64>| Optional(v.map(ConstGauge::new));

        // Counters are registered without `_total`: the encoder appends it (and a full stop
        // to each help text).
        let mut r = Registry::with_prefix("regproxy");
        let help = "Requests answered, by registry and outcome";
        r.register("requests", help, Series(requests));
        let help = "Upstream responses, by registry and status";
        r.register("upstream_requests", help, Series(upstream));
        let help = "Pulls left in the window, as the upstream last reported";
        r.register("ratelimit_remaining", help, ratelimit(|rl| rl.remaining));
        let help = "Pulls allowed per window, as the upstream last reported";
        r.register("ratelimit_limit", help, ratelimit(|rl| rl.limit));
        let help = "Body bytes served from the cache";
        r.register("bytes_from_cache", help, counter(&self.bytes_from_cache));
        let help = "Bytes downloaded from upstreams into the cache";
        r.register(
            "bytes_from_upstream",
            help,
            counter(&self.bytes_from_upstream),
        );
        let help = "Requests that joined a download in flight";
        r.register("singleflight_joins", help, counter(&self.joins));
        let help = "Objects evicted to keep the cache within bounds";
        r.register("evictions", help, counter(&self.evictions));
        let help =
            "Objects streamed past the cache, verified but not stored, for want of disk room";
        r.register("passthrough", help, counter(&self.passthrough));
        let help =
            "Ranged pieces of large objects fetched upstream, each on a connection of its own";
        r.register("upstream_pieces", help, counter(&self.pieces));
        let help = "Objects whose ranged pieces (the first one too) failed, fetched in one request for the rest";
        r.register("piece_fallbacks", help, counter(&self.piece_fallbacks));
        let help = "Bytes of verified objects in the cache";
        r.register("cache_bytes", help, gauge(&self.cache_bytes));
        let help = "Verified objects in the cache";
        r.register("cache_entries", help, gauge(&self.cache_entries));
        let help = "Most bytes of objects the cache keeps (--max-cache-size); absent when unset";
        r.register("cache_max_bytes", help, optional(live.max_bytes));
        let help =
            "Least free bytes kept on the cache's file system (--min-free-disk); absent when unset";
        r.register("cache_min_free_bytes", help, optional(live.min_free));
        let help = "Free bytes on the cache's file system";
        r.register("disk_free_bytes", help, optional(live.disk_free));
        let help = "Downloads from upstreams in flight";
        r.register("downloads_in_flight", help, ConstGauge::new(live.downloads));
        let help = "Leaf certificates issued";
        r.register("leaves_issued", help, ConstCounter::new(live.leaves));
        let help = "Client connections open";
        r.register("open_connections", help, open(&self.open_connections));
        let help = "Blind tunnels open";
        r.register("open_tunnels", help, open(&self.open_tunnels));
        if self.shared_store_configured.load(Ordering::Relaxed) {
            let help = "1 while the shared store answers, 0 while pulls go on without it";
            r.register("shared_store_up", help, gauge(&self.shared_store_up));
        }
        let help = "Objects read from the shared store";
        r.register(
            "shared_store_reads",
            help,
            counter(&self.shared_store_reads),
        );
        let help = "Objects uploaded to the shared store";
        r.register(
            "shared_store_uploads",
            help,
            counter(&self.shared_store_uploads),
        );
        let help = "Writes to the shared store queued or running";
        r.register(
            "shared_store_pending",
            help,
            open(&self.shared_store_pending),
        );
        let help = "Uploads to the shared store dropped: queue full or store down";
        r.register(
            "shared_store_dropped",
            help,
            counter(&self.shared_store_dropped),
        );
        let help = "Failed or timed-out calls to the shared store";
        r.register(
            "shared_store_errors",
            help,
            counter(&self.shared_store_errors),
        );
        let help = "Objects fetched from the fleet member that owns them";
        r.register("peer_fetches", help, counter(&self.peer_fetches));

        let mut out = String::new();
        prometheus_text::encode(&mut out, &r).expect("encoding into a String cannot fail");
        out
    }
}

/// One family's series, in the order given (sorted, as the maps hold them). Unlike
/// prometheus-client's `Family`, it keeps that order and shows HELP and TYPE when empty.
#[derive(Debug)]
struct Series<L, M>(Vec<(L, M)>);

impl<L: EncodeLabelSet, M: EncodeMetric + TypedMetric> EncodeMetric for Series<L, M> {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        for (labels, metric) in &self.0 {
            metric.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

/// One sample, or none (HELP and TYPE are written either way).
#[derive(Debug)]
struct Optional<M>(Option<M>);

impl<M: EncodeMetric + TypedMetric> EncodeMetric for Optional<M> {
    fn encode(&self, encoder: MetricEncoder) -> std::fmt::Result {
        match &self.0 {
            Some(metric) => metric.encode(encoder),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

/// Locks `m`, going on past a panic elsewhere: counts stay usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

/// Parses `ratelimit-limit: 100;w=21600` and `ratelimit-remaining: 76;w=21600`.
pub fn parse_ratelimit(headers: &http::HeaderMap) -> Option<RateLimit> {
    let field = |name: &str| -> Option<(u64, Option<u64>)> {
        let v = headers.get(name)?.to_str().ok()?;
        let mut parts = v.split(';');
        let n = parts.next()?.trim().parse().ok()?;
        let w = parts
            .filter_map(|p| p.trim().strip_prefix("w="))
            .find_map(|w| w.parse().ok());
        Some((n, w))
    };
    let (limit, w1) = field("ratelimit-limit")?;
    let (remaining, w2) = field("ratelimit-remaining")?;
    Some(RateLimit {
        limit,
        remaining,
        window: w1.or(w2),
    })
}

/// Decrements a gauge when dropped: for "open now" counts that must survive early returns.
pub struct Open<'a>(&'a AtomicI64);

impl<'a> Open<'a> {
    /// Increments `gauge` until the guard is dropped.
    pub fn new(gauge: &'a AtomicI64) -> Open<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Open(gauge)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    /// Hosts named by clients (tunnels to anywhere) cannot grow the metrics without bound.
    #[test]
    fn client_chosen_hosts_are_capped() {
        let m = Metrics::default();
        for n in 0..5000 {
            m.request(&format!("h{n}.example"), "TUNNEL", 0);
            m.upstream(&format!("h{n}.example"), "200");
        }
        let text = m.render(&Live::default());
        let series = text
            .lines()
            .filter(|l| l.starts_with("regproxy_requests_total{"))
            .count();
        assert!(series <= super::MAX_SERIES + 1, "{series} series");
        assert!(text.contains("registry=\"other\""));
        m.request("h0.example", "HIT", 1);
        assert!(m
            .render(&Live::default())
            .contains("registry=\"h0.example\",outcome=\"HIT\""));
    }

    use super::*;

    /// Dashboards and alerts name these: the 0.0.4 text keeps `_total` in HELP and TYPE too,
    /// as the hand-written renderer did, and has no OpenMetrics `# EOF`.
    #[test]
    fn family_lines_are_as_before() {
        let m = Metrics::default();
        m.upstream("docker.io", "200");
        let text = m.render(&Live::default());
        for line in [
            "# HELP regproxy_requests_total Requests answered, by registry and outcome.",
            "# TYPE regproxy_requests_total counter",
            "# TYPE regproxy_ratelimit_remaining gauge",
            "regproxy_upstream_requests_total{registry=\"docker.io\",status=\"200\"} 1",
            "# TYPE regproxy_open_tunnels gauge",
            "regproxy_open_tunnels 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("_total_total"),
            "{text}"
        );
        assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE")).count(), 26);
    }

    /// The status page's figures are the counters', grouped by registry; tunnels are no registry.
    #[test]
    fn registry_figures_and_pulls() {
        let m = Metrics::default();
        m.request("r.test", "HIT", 10);
        m.request("r.test", "MISS", 0);
        m.request("r.test", "JOINED", 0);
        m.request("r.test", "FORWARD", 0);
        m.request("elsewhere.test", "TUNNEL", 0);
        m.upstream("r.test", "200");
        m.upstream("r.test", "503");
        m.upstream("r.test", "error");
        m.pulled("r.test", "a/b", "1");
        m.pulled("r.test", "a/b", "1");
        let regs = m.registries();
        assert_eq!(regs.keys().collect::<Vec<_>>(), ["r.test"]);
        let r = &regs["r.test"];
        assert_eq!((r.requests, r.from_cache), (4, 1));
        assert_eq!((r.upstream, r.upstream_errors), (3, 2));
        assert_eq!(m.served_and_fetched(), (1, 2));
        assert_eq!(m.pulls().get("r.test/a/b:1"), Some(&2));
        let text = m.render(&Live {
            max_bytes: Some(5),
            ..Live::default()
        });
        assert!(
            text.lines().any(|l| l == "regproxy_cache_max_bytes 5"),
            "{text}"
        );
        assert!(!text
            .lines()
            .any(|l| l.starts_with("regproxy_cache_min_free_bytes ")));
    }

    #[test]
    fn renders_and_parses_ratelimits() {
        let m = Metrics::default();
        m.request("docker.io", "HIT", 10);
        m.request("docker.io", "HIT", 5);
        m.upstream("docker.io", "200");
        let mut h = http::HeaderMap::new();
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        m.ratelimit("docker.io", &h);
        let text = m.render(&Live {
            leaves: 3,
            ..Live::default()
        });
        assert!(
            text.contains("regproxy_requests_total{registry=\"docker.io\",outcome=\"HIT\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("regproxy_bytes_from_cache_total 15"),
            "{text}"
        );
        assert!(
            text.contains("regproxy_ratelimit_remaining{registry=\"docker.io\"} 76"),
            "{text}"
        );
        assert!(text.contains("regproxy_leaves_issued_total 3"), "{text}");
    }
}
