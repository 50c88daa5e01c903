//! Counters and gauges for the admin endpoint's `/metrics`, in the Prometheus text format.
//! Labels are registry hosts, outcomes and statuses: never paths, users or tokens.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

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
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let registry = label(&map, registry);
        *map.entry((registry, outcome)).or_default() += 1;
        if outcome == "HIT" {
            self.bytes_from_cache.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts one upstream response (`status` is the code, or `error` when none came).
    pub fn upstream(&self, registry: &str, status: &str) {
        let mut map = self
            .upstream_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let registry = label(&map, registry);
        *map.entry((registry, status.to_owned())).or_default() += 1;
    }

    /// Records the rate-limit headers of an upstream response, if it carried them.
    pub fn ratelimit(&self, registry: &str, headers: &http::HeaderMap) {
        if let Some(rl) = parse_ratelimit(headers) {
            let mut map = self.ratelimit.lock().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(registry) || map.len() < MAX_SERIES {
                map.insert(registry.to_owned(), rl);
            }
        }
    }

    /// The last rate-limit state `registry` reported.
    pub fn ratelimit_of(&self, registry: &str) -> Option<RateLimit> {
        let map = self.ratelimit.lock().unwrap_or_else(|p| p.into_inner());
        map.get(registry).copied()
    }

    /// The Prometheus text exposition; `leaves` is the CA's issuance count.
    pub fn render(&self, leaves: u64) -> String {
        let mut out = String::new();
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        family(
            &mut out,
            "regproxy_requests_total",
            "counter",
            "Requests answered, by registry and outcome.",
        );
        for ((registry, outcome), n) in requests {
            let _ = writeln!(
                out,
                "regproxy_requests_total{{registry=\"{}\",outcome=\"{outcome}\"}} {n}",
                esc(&registry)
            );
        }
        let upstream = self
            .upstream_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        family(
            &mut out,
            "regproxy_upstream_requests_total",
            "counter",
            "Upstream responses, by registry and status.",
        );
        for ((registry, status), n) in upstream {
            let _ = writeln!(
                out,
                "regproxy_upstream_requests_total{{registry=\"{}\",status=\"{}\"}} {n}",
                esc(&registry),
                esc(&status)
            );
        }
        let limits = self
            .ratelimit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        family(
            &mut out,
            "regproxy_ratelimit_remaining",
            "gauge",
            "Pulls left in the window, as the upstream last reported.",
        );
        for (registry, rl) in &limits {
            let _ = writeln!(
                out,
                "regproxy_ratelimit_remaining{{registry=\"{}\"}} {}",
                esc(registry),
                rl.remaining
            );
        }
        family(
            &mut out,
            "regproxy_ratelimit_limit",
            "gauge",
            "Pulls allowed per window, as the upstream last reported.",
        );
        for (registry, rl) in &limits {
            let _ = writeln!(
                out,
                "regproxy_ratelimit_limit{{registry=\"{}\"}} {}",
                esc(registry),
                rl.limit
            );
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let scalars: [(&str, &str, &str, i64); 10] = [
            (
                "regproxy_bytes_from_cache_total",
                "counter",
                "Body bytes served from the cache.",
                load(&self.bytes_from_cache) as i64,
            ),
            (
                "regproxy_bytes_from_upstream_total",
                "counter",
                "Bytes downloaded from upstreams into the cache.",
                load(&self.bytes_from_upstream) as i64,
            ),
            (
                "regproxy_singleflight_joins_total",
                "counter",
                "Requests that joined a download in flight.",
                load(&self.joins) as i64,
            ),
            (
                "regproxy_evictions_total",
                "counter",
                "Objects evicted to keep the cache within bounds.",
                load(&self.evictions) as i64,
            ),
            (
                "regproxy_passthrough_total",
                "counter",
                "Objects streamed past the cache, verified but not stored, for want of disk room.",
                load(&self.passthrough) as i64,
            ),
            (
                "regproxy_cache_bytes",
                "gauge",
                "Bytes of verified objects in the cache.",
                load(&self.cache_bytes) as i64,
            ),
            (
                "regproxy_cache_entries",
                "gauge",
                "Verified objects in the cache.",
                load(&self.cache_entries) as i64,
            ),
            (
                "regproxy_leaves_issued_total",
                "counter",
                "Leaf certificates issued.",
                leaves as i64,
            ),
            (
                "regproxy_open_connections",
                "gauge",
                "Client connections open.",
                self.open_connections.load(Ordering::Relaxed),
            ),
            (
                "regproxy_open_tunnels",
                "gauge",
                "Blind tunnels open.",
                self.open_tunnels.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in scalars {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
        assert_eq!(
            m.ratelimit_of("docker.io"),
            Some(RateLimit {
                limit: 100,
                remaining: 76,
                window: Some(21600)
            })
        );
    }
}
