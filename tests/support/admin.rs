//! The proxy's admin endpoint.

use super::*;

/// The proxy's `/metrics` text.
pub fn metrics(proxy: &Proxy) -> String {
    let (status, text) = raw(
        proxy.admin_addr(),
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
    text
}

/// The value of one sample line (`name{labels} value`), 0 if absent.
pub fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}
