//! The dashboards and alerts in `contrib/`: Prometheus' own `promtool` checks the rules, runs
//! their unit tests, parses every dashboard query and lints a real `/metrics` scrape; and every
//! metric they name is one that a running regproxy exports.
//!
//! `promtool` comes with Debian's `prometheus` package (scripts/test.sh installs it).

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::*;

const RULES: &str = "contrib/prometheus/regproxy-alerts.yml";
const RULE_TESTS: &str = "contrib/prometheus/regproxy-alerts.test.yml";
const DASHBOARD: &str = "contrib/grafana/regproxy-dashboard.json";

/// Metrics exported only under a configuration the scraped proxy lacks, each with why. Only
/// their absence from the scrape is excused: where exported, they are checked like any other.
const CONDITIONAL: &[(&str, &str)] = &[(
    "regproxy_shared_store_up",
    "the shared store's gauge (1/0) exists only with --shared-store (tests/fleet.rs reads it)",
)];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    require_tool("promtool");
    let out = run_with_timeout(
        Command::new("promtool").args(args).current_dir(dir),
        CMD_TIMEOUT,
    );
    eprintln!(
        "$ promtool {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    let out = promtool(&["check", "rules", RULES], &root());
    assert_success(&out, "promtool check rules");
    let out = promtool(&["test", "rules", RULE_TESTS], &root());
    assert_success(&out, "promtool test rules");
    // Every alert has a unit test that expects it to fire.
    let rules = fs::read_to_string(root().join(RULES)).unwrap();
    let tests = fs::read_to_string(root().join(RULE_TESTS)).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        let fires = format!("alertname: {alert}\n        exp_alerts:\n          - exp_labels");
        assert!(tests.contains(&fires), "no test in which {alert} fires");
    }
}

/// The dashboard's queries, with Grafana's variables given values Prometheus accepts.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = fs::read_to_string(root().join(DASHBOARD)).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("a title").to_owned();
        assert!(ids.insert(panel["id"].as_u64()), "duplicate id: {title}");
        let pos = &panel["gridPos"];
        let (x, w) = (pos["x"].as_u64().unwrap(), pos["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title} is wider than the grid");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("an expr");
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$__range", "6h")
                .replace("$instance", ".*");
            assert!(
                !expr.contains('$'),
                "an unknown variable in {title}: {expr}"
            );
            queries.push((title.clone(), expr));
        }
    }
    queries
}

#[test]
fn every_dashboard_query_parses() {
    let dir = TestDir::new();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (_, expr)) in dashboard_queries().iter().enumerate() {
        let expr = serde_json::to_string(expr).unwrap();
        rules += &format!("      - record: dashboard:query_{n}\n        expr: {expr}\n");
    }
    fs::write(dir.join("dashboard.yml"), rules).unwrap();
    let out = promtool(&["check", "rules", "dashboard.yml"], dir.path());
    assert_success(&out, "promtool check rules (the dashboard's queries)");
}

/// The `regproxy_…` metric names in `text`, and the recorded names (`a:regproxy_b:c`).
fn names(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let words = text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
    let (mut metrics, mut recorded) = (BTreeSet::new(), BTreeSet::new());
    for w in words.filter(|w| w.contains("regproxy_")) {
        if w.contains(':') {
            recorded.insert(w.to_owned());
        } else if w.starts_with("regproxy_") {
            metrics.insert(w.to_owned());
        }
    }
    (metrics, recorded)
}

/// A real scrape of a running proxy, with both cache bounds set.
fn scrape() -> String {
    let proxy = Proxy::start(|c| {
        c.max_cache_size = Some(1 << 30);
        c.min_free_disk = Some(1 << 20);
    });
    metrics(&proxy)
}

#[test]
fn every_metric_the_rules_and_the_dashboard_name_is_exported() {
    let text = scrape();
    let body = text
        .split_once("\r\n\r\n")
        .map_or(text.as_str(), |(_, b)| b);
    let exported: BTreeSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    assert!(exported.contains("regproxy_requests_total"), "{body}");

    let rules = fs::read_to_string(root().join(RULES)).unwrap();
    let dashboard: String = dashboard_queries()
        .into_iter()
        .map(|(_, q)| q + "\n")
        .collect();
    let (mut used, recorded) = names(&rules);
    used.extend(names(&dashboard).0);
    assert!(used.len() >= 15, "{used:?}");
    for name in &used {
        let excused = CONDITIONAL.iter().find(|(n, _)| n == name);
        match excused {
            _ if exported.contains(name.as_str()) => {}
            Some((_, why)) => eprintln!("{name} is not exported here: {why}"),
            None => panic!("{name} is named in contrib/ but regproxy does not export it"),
        }
    }
    // Recorded names are defined by the rules themselves; the dashboard uses none (it works
    // without the rules loaded).
    for name in &recorded {
        assert!(
            rules.contains(&format!("record: {name}")),
            "{name} is never recorded"
        );
    }
    assert!(names(&dashboard).1.is_empty());

    // Prometheus' own linter accepts the exposition.
    require_tool("promtool");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_success(&out, "promtool check metrics");
}
