//! Headless Chromium (Debian's `chromium`): a page's DOM after its scripts ran, and screenshots.

use std::path::Path;
use std::process::Command;

use super::*;

/// Chromium with the flags for a test: headless, no sandbox (root in CI), nothing fetched from
/// the network on its own, and a fresh profile under `dir` for each run.
fn chromium(dir: &Path) -> Command {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    require_tool("chromium");
    let profile = dir.join(format!(
        "chromium-profile-{}",
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let mut cmd = Command::new("chromium");
    proxy_env(&mut cmd, None);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        // Virtual time: the page's first fetches and renders run, then the DOM is taken; no
        // wall-clock wait is involved.
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// The serialized DOM of `url` once its scripts had their virtual time.
pub fn dump_dom(url: &str, dir: &Path) -> String {
    let out = run_with_timeout(chromium(dir).arg("--dump-dom").arg(url), CMD_TIMEOUT);
    assert_success(&out, "chromium --dump-dom");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A PNG screenshot of `url` at `width`×`height` into `png`.
pub fn screenshot(url: &str, dir: &Path, png: &Path, width: u32, height: u32) {
    let out = run_with_timeout(
        chromium(dir)
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--screenshot={}", png.display()))
            .arg(url),
        CMD_TIMEOUT,
    );
    assert_success(&out, "chromium --screenshot");
    let data = std::fs::read(png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert!(
        data.starts_with(b"\x89PNG\r\n\x1a\n") && data.len() > 10_000,
        "not a screenshot: {} bytes",
        data.len()
    );
}

/// The opening tag of the first element whose text contains `marker` (`id="x"`,
/// `data-digest="…"`): `<tag attr="…" …>`.
pub fn opening_tag<'a>(dom: &'a str, marker: &str) -> Option<&'a str> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

/// The value of `attr` in an opening tag.
pub fn attr(tag: &str, attr: &str) -> Option<String> {
    let key = format!(" {attr}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(
        tag[start..start + len]
            .replace("&amp;", "&")
            .replace("&quot;", "\""),
    )
}

/// The `data-n` figure of the element with `id`.
pub fn figure(dom: &str, id: &str) -> Option<String> {
    attr(opening_tag(dom, &format!("id=\"{id}\""))?, "data-n")
}

/// The text of the `<tr>` that opens with `marker` (`data-image="…"`), through its `</tr>`.
pub fn row<'a>(dom: &'a str, marker: &str) -> Option<&'a str> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind("<tr")?;
    let end = at + dom[at..].find("</tr>")?;
    Some(&dom[start..end])
}

/// The `data-n` of the cell with `class` in a row from [`row`].
pub fn cell(row: &str, class: &str) -> Option<String> {
    attr(opening_tag(row, &format!("class=\"{class}\""))?, "data-n")
}
