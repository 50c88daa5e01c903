//! The status page on the admin listener: `/` is one HTML page from the binary (its CSS and
//! script inline, no other asset), whose script fetches `/status.json` every few seconds and
//! fills the page with DOM text nodes, so that names that came from the network are never
//! parsed as markup. A Content-Security-Policy lets only that script run.
//!
//! Every figure comes from live state: the metrics, the downloads in flight, the cache's bounds
//! and, for the images, a walk of the cache that runs on the blocking pool, one at a time, and
//! is reused until the cache changed and enough time passed (see [`Images::current`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::cache::evict::free_space;
use crate::cache::ops::{self, Image};
use crate::metrics::{Live, RateLimit};
use crate::Shared;

/// The page: markup, inline `<style>` and inline `<script>`.
const PAGE: &str = include_str!("status/page.html");
/// Rows of each table: the page is a glance, `/metrics` and `cache ls` have the rest.
const ROWS: usize = 10;
/// The image walk is redone no sooner than this after the last one…
const MIN_WALK_INTERVAL: Duration = Duration::from_secs(2);
/// …nor sooner than this many times its own duration (so at most 5 % of one thread's time)…
const WALK_COST_FACTOR: u32 = 20;
/// …and, when nothing seems to have changed, only this often (a tag moved to a cached digest).
const MAX_WALK_AGE: Duration = Duration::from_secs(60);

/// The page and the headers that go with it.
pub struct Page {
    /// The HTML.
    pub html: &'static str,
    /// Its Content-Security-Policy: the inline script and style by hash, fetches to this origin.
    pub csp: String,
}

/// The page, with its policy computed once.
pub fn page() -> &'static Page {
    static PAGE_ONCE: OnceLock<Page> = OnceLock::new();
    PAGE_ONCE.get_or_init(|| Page {
        html: PAGE,
        csp: policy(PAGE),
    })
}

/// A CSP that allows exactly the page's inline `<script>` and `<style>` elements.
fn policy(html: &str) -> String {
    let hash = |tag: &str| {
        let body = inline(html, tag).unwrap_or_default();
        let sum = Sha256::digest(body.as_bytes());
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(sum)
        )
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("script"),
        hash("style")
    )
}

/// The text of the first `<TAG>…</TAG>` element.
fn inline<'a>(html: &'a str, tag: &str) -> Option<&'a str> {
    let start = html.find(&format!("<{tag}>"))? + tag.len() + 2;
    let len = html[start..].find(&format!("</{tag}>"))?;
    Some(&html[start..start + len])
}

/// What `/status.json` says.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    version: &'static str,
    uptime_seconds: u64,
    /// Requests answered from the cache over those that needed upstream bytes too; `None`
    /// before any.
    hit_ratio: Option<f64>,
    served_from_cache: u64,
    fetched_upstream: u64,
    bytes_from_cache: u64,
    bytes_from_upstream: u64,
    registries: Vec<RegistryRow>,
    largest: Vec<ImageRow>,
    most_used: Vec<ImageRow>,
    images: usize,
    images_age_seconds: u64,
    downloads: Vec<DownloadRow>,
    downloads_total: usize,
    cache: CacheRow,
}

#[derive(Debug, Serialize)]
struct RegistryRow {
    host: String,
    requests: u64,
    from_cache: u64,
    upstream_requests: u64,
    upstream_errors: u64,
    ratelimit_remaining: Option<u64>,
    ratelimit_limit: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
struct ImageRow {
    name: String,
    bytes: u64,
    objects: usize,
    pulls: u64,
    last_used_seconds_ago: u64,
}

#[derive(Debug, Serialize)]
struct DownloadRow {
    digest: String,
    origin: Option<String>,
    received: u64,
    length: Option<u64>,
}

#[derive(Debug, Serialize)]
struct CacheRow {
    bytes: u64,
    entries: u64,
    max_bytes: Option<u64>,
    min_free_bytes: Option<u64>,
    disk_free_bytes: Option<u64>,
}

/// The status page's state that outlives a request: when the admin listener started, and the
/// last walk of the cache's images.
pub struct Status {
    started: Instant,
    images: Images,
}

impl Default for Status {
    fn default() -> Status {
        Status {
            started: Instant::now(),
            images: Images::default(),
        }
    }
}

impl Status {
    /// The figures now.
    pub async fn snapshot(&self, shared: &Shared) -> Snapshot {
        let metrics = &shared.metrics;
        let live = live(shared).await;
        let (walk, walked) = self.images.current(shared).await;
        let (served, fetched) = metrics.served_and_fetched();
        let pulls = metrics.pulls();
        let rows = walk
            .iter()
            .map(|image| ImageRow {
                name: image.name.clone(),
                bytes: image.bytes,
                objects: image.objects,
                pulls: pulls.get(&image.name).copied().unwrap_or(0),
                last_used_seconds_ago: ops::age(image.accessed),
            })
            .collect();
        let (largest, most_used) = top(rows);
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            hit_ratio: (served + fetched > 0).then(|| served as f64 / (served + fetched) as f64),
            served_from_cache: served,
            fetched_upstream: fetched,
            bytes_from_cache: metrics.bytes_from_cache.load(Ordering::Relaxed),
            bytes_from_upstream: metrics.bytes_from_upstream.load(Ordering::Relaxed),
            registries: registries(shared),
            largest,
            most_used,
            images: walk.len(),
            images_age_seconds: walked.elapsed().as_secs(),
            downloads_total: live.downloads as usize,
            downloads: downloads(shared),
            cache: CacheRow {
                bytes: metrics.cache_bytes.load(Ordering::Relaxed),
                entries: metrics.cache_entries.load(Ordering::Relaxed),
                max_bytes: live.max_bytes,
                min_free_bytes: live.min_free,
                disk_free_bytes: live.disk_free,
            },
        }
    }
}

/// The figures `/metrics` and the page read at request time.
pub async fn live(shared: &Shared) -> Live {
    let bounds = shared.config.cache_bounds();
    let dir = shared.cache.store.dir().to_owned();
    // statvfs may block on a slow file system: not on the runtime's threads.
    let disk_free = tokio::task::spawn_blocking(move || free_space(&dir))
        .await
        .ok()
        .flatten();
    Live {
        leaves: shared.ca.leaves_issued(),
        downloads: shared.cache.flights.downloads() as u64,
        max_bytes: bounds.max_size,
        min_free: bounds.min_free,
        disk_free,
    }
}

/// The [`ROWS`] largest images, and the [`ROWS`] most pulled since start (those pulled at all).
fn top(mut rows: Vec<ImageRow>) -> (Vec<ImageRow>, Vec<ImageRow>) {
    let mut used: Vec<ImageRow> = rows.iter().filter(|r| r.pulls > 0).cloned().collect();
    used.sort_by(|a, b| (b.pulls, b.bytes, &a.name).cmp(&(a.pulls, a.bytes, &b.name)));
    used.truncate(ROWS);
    rows.sort_by(|a, b| (b.bytes, &a.name).cmp(&(a.bytes, &b.name)));
    rows.truncate(ROWS);
    (rows, used)
}

fn registries(shared: &Shared) -> Vec<RegistryRow> {
    let rl = |r: Option<RateLimit>, f: fn(RateLimit) -> u64| r.map(f);
    shared
        .metrics
        .registries()
        .into_iter()
        .map(|(host, f)| RegistryRow {
            host,
            requests: f.requests,
            from_cache: f.from_cache,
            upstream_requests: f.upstream,
            upstream_errors: f.upstream_errors,
            ratelimit_remaining: rl(f.ratelimit, |r| r.remaining),
            ratelimit_limit: rl(f.ratelimit, |r| r.limit),
        })
        .collect()
}

/// Downloads in flight, those furthest along first, at most [`ROWS`].
fn downloads(shared: &Shared) -> Vec<DownloadRow> {
    let mut all = shared.cache.flights.in_flight();
    all.sort_by_cached_key(|f| (std::cmp::Reverse(f.received), f.digest.to_string()));
    all.truncate(ROWS);
    all.into_iter()
        .map(|f| DownloadRow {
            digest: f.digest.to_string(),
            origin: f.origin.map(|o| o.to_string()),
            received: f.received,
            length: f.length,
        })
        .collect()
}

/// The last walk of the cache's images, and what the cache looked like then.
#[derive(Default)]
struct Images {
    last: tokio::sync::Mutex<Option<Walk>>,
}

struct Walk {
    images: Arc<Vec<Image>>,
    at: Instant,
    took: Duration,
    // The cache's entry and byte gauges when walked: a change means new or removed objects.
    gauges: (u64, u64),
}

impl Images {
    /// The images and when they were walked: the last walk, or a new one when the cache changed
    /// and the last is older than [`MIN_WALK_INTERVAL`] and [`WALK_COST_FACTOR`] times its
    /// duration, or is older than [`MAX_WALK_AGE`]. Concurrent callers wait for one walk.
    async fn current(&self, shared: &Shared) -> (Arc<Vec<Image>>, Instant) {
        let metrics = &shared.metrics;
        let gauges = (
            metrics.cache_entries.load(Ordering::Relaxed),
            metrics.cache_bytes.load(Ordering::Relaxed),
        );
        let mut last = self.last.lock().await;
        if let Some(walk) = last.as_ref().filter(|w| !w.stale(gauges)) {
            return (walk.images.clone(), walk.at);
        }
        let store = shared.cache.store.clone();
        let start = Instant::now();
        let images = tokio::task::spawn_blocking(move || ops::images(&store))
            .await
            .unwrap_or_default();
        let walk = Walk {
            images: Arc::new(images),
            at: start,
            took: start.elapsed(),
            gauges,
        };
        let out = (walk.images.clone(), walk.at);
        *last = Some(walk);
        out
    }
}

impl Walk {
    fn stale(&self, gauges: (u64, u64)) -> bool {
        let age = self.at.elapsed();
        let rested = age >= MIN_WALK_INTERVAL.max(self.took * WALK_COST_FACTOR);
        age >= MAX_WALK_AGE || (rested && gauges != self.gauges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_hashes_the_inline_script_and_style() {
        let html = "<style>a{}</style><script>go()</script>";
        let csp = policy(html);
        let want = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b"go()"));
        assert!(
            csp.contains(&format!("script-src 'sha256-{want}'")),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(inline(PAGE, "script").is_some_and(|s| s.len() > 100));
        assert!(inline(PAGE, "style").is_some_and(|s| s.len() > 100));
    }

    /// Names from the network reach the page only as text nodes.
    #[test]
    fn the_page_never_parses_data_as_markup() {
        let script = inline(PAGE, "script").unwrap();
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!script.contains(sink), "the page uses {sink}");
        }
        assert!(!PAGE.contains("src=\"http") && !PAGE.contains("href=\"http"));
    }

    fn row(name: &str, bytes: u64, pulls: u64) -> ImageRow {
        ImageRow {
            name: name.into(),
            bytes,
            objects: 1,
            pulls,
            last_used_seconds_ago: 0,
        }
    }

    #[test]
    fn top_orders_by_size_and_by_pulls() {
        let rows = vec![row("a", 10, 0), row("b", 30, 1), row("c", 20, 5)];
        let (largest, used) = top(rows);
        let names = |v: &[ImageRow]| v.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&largest), ["b", "c", "a"]);
        assert_eq!(names(&used), ["c", "b"]);
    }
}
