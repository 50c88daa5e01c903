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
    /// Objects whose pieces failed, fetched whole again for the rest.
    pub piece_fallbacks: AtomicU64,
    /// Bytes of verified objects on disk.
    pub cache_bytes: AtomicU64,
    /// Number of verified objects on disk.
    pub cache_entries: AtomicU64,
    /// Client connections open now.
    pub open_connections: AtomicI64,
    /// Blind tunnels open now.
    pub open_tunnels: AtomicI64,
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

    /// The Prometheus text exposition (version 0.0.4); `leaves` is the CA's issuance count.
    pub fn render(&self, leaves: u64) -> String {
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
        let help = "Objects whose ranged pieces failed, fetched whole again for the rest";
        r.register("piece_fallbacks", help, counter(&self.piece_fallbacks));
        let help = "Bytes of verified objects in the cache";
        r.register("cache_bytes", help, gauge(&self.cache_bytes));
        let help = "Verified objects in the cache";
        r.register("cache_entries", help, gauge(&self.cache_entries));
        let help = "Leaf certificates issued";
        r.register("leaves_issued", help, ConstCounter::new(leaves));
        let help = "Client connections open";
        r.register("open_connections", help, open(&self.open_connections));
        let help = "Blind tunnels open";
        r.register("open_tunnels", help, open(&self.open_tunnels));

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
        let text = m.render(0);
        let series = text
            .lines()
            .filter(|l| l.starts_with("regproxy_requests_total{"))
            .count();
        assert!(series <= super::MAX_SERIES + 1, "{series} series");
        assert!(text.contains("registry=\"other\""));
        m.request("h0.example", "HIT", 1);
        assert!(m
            .render(0)
            .contains("registry=\"h0.example\",outcome=\"HIT\""));
    }

    use super::*;

    /// Dashboards and alerts name these: the 0.0.4 text keeps `_total` in HELP and TYPE too,
    /// as the hand-written renderer did, and has no OpenMetrics `# EOF`.
    #[test]
    fn family_lines_are_as_before() {
        let m = Metrics::default();
        m.upstream("docker.io", "200");
        let text = m.render(0);
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
        assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE")).count(), 16);
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
        let text = m.render(3);
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
