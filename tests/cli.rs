//! The binary's command line: config errors name the key and the file, the documented example
//! config starts as it is, `ca init` / `ca show` describe the CA they made, `config check`
//! refuses what `run` refuses with the same words, commands never create a cache where none
//! was, and `ratelimit` exits UNKNOWN on every error.

use std::path::Path;
use std::process::{Command, Output};

fn regproxy(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .args(args)
        .current_dir(cwd)
        .env_remove("REGPROXY_CONFIG")
        .output()
        .expect("running regproxy")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The example config starts as it is: its entries that need a secret are commented out.
/// `config check` passes with no variable set, and `run` with it comes up and listens.
#[test]
fn example_config_checks_and_starts_as_it_is() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/regproxy.toml");
    let example = example.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = regproxy(&["--config", example, "config", "check"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("listen = \"127.0.0.1:3128\""), "{printed}");
    assert!(printed.contains("registry.internal.example"), "{printed}");
    // Nothing is created by a check: no CA, no cache.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // Started as it is, on free ports (flags over the file), it comes up.
    let (listen, admin) = (free_addr(), free_addr());
    let log = dir.path().join("regproxy.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .args([
            "--config",
            example,
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
        ])
        .current_dir(dir.path())
        .env_remove("REGPROXY_CONFIG")
        .env_remove("REGPROXY_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let listening = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("regproxy listening")
    };
    let mut up = false;
    for _ in 0..600 {
        up = listening();
        if up || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        up,
        "regproxy did not come up with the example config:\n{said}"
    );
}

/// A loopback address whose port was free a moment ago.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The cause after a start-up refusal's prefix: what `run` and `config check` must agree on.
fn refusal(out: &Output, prefix: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", text(out)));
    line.to_string()
}

/// For each thing `run` refuses at start, `config check` exits non-zero with the same cause,
/// and `run` says "regproxy could not start", never "regproxy stopped". Neither creates a
/// cache or a CA on the way.
#[test]
fn config_check_refuses_what_run_refuses_with_the_same_words() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("not.pem"), "this is not a certificate\n").unwrap();
    std::fs::create_dir(d.join("ca")).unwrap();
    let out = regproxy(&["ca", "init", "--ca-dir", "ca"], d);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(d.join("secret"), "s3cret\n").unwrap();
    std::fs::set_permissions(d.join("secret"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let unreadable = std::fs::read(d.join("secret")).is_err();
    std::fs::write(
        d.join("creds.toml"),
        "[registries.\"ghcr.io\"]\nusername = \"bot\"\npassword_file = \"missing-token\"\n",
    )
    .unwrap();
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--upstream-ca", "missing.pem"], "missing.pem"),
        (vec!["--upstream-ca", "not.pem"], "not.pem"),
        (vec!["--config", "creds.toml"], "missing-token"),
        (
            vec!["--proxy-credentials-file", "missing-users"],
            "missing-users",
        ),
        (vec!["--ca-dir", "ca-readable"], "chmod 600"),
    ];
    if unreadable {
        // Not as root, who reads any file.
        cases.push((vec!["--proxy-credentials-file", "secret"], "secret"));
    }
    std::fs::create_dir(d.join("ca-readable")).unwrap();
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(d.join("ca").join(f), d.join("ca-readable").join(f)).unwrap();
    }
    std::fs::set_permissions(
        d.join("ca-readable/ca.key"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    for (flags, names) in cases {
        let with = |tail: &[&'static str]| [flags.as_slice(), tail].concat();
        let check = regproxy(&with(&["config", "check"]), d);
        assert!(!check.status.success(), "{flags:?}: {}", text(&check));
        let run = regproxy(
            &with(&[
                "run",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ]),
            d,
        );
        assert!(!run.status.success(), "{flags:?}: {}", text(&run));
        assert!(!text(&run).contains("regproxy stopped"), "{}", text(&run));
        let cause = refusal(&run, "regproxy could not start: ");
        assert!(cause.contains(names), "{flags:?}: {cause}");
        assert_eq!(
            refusal(&check, "regproxy would not start: "),
            cause,
            "{flags:?}"
        );
        assert!(!text(&run).contains("s3cret") && !text(&check).contains("s3cret"));
    }
    assert!(!d.join("cache").exists() && !d.join("certs").exists());
}

/// The cache commands, run where there is no cache, say so and create nothing.
#[test]
fn cache_commands_never_create_a_cache_where_none_was() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let absent = d.join("cache");
    for args in [
        vec!["cache", "ls"],
        vec!["cache", "stats"],
        vec!["cache", "gc"],
        vec!["cache", "verify"],
        vec![
            "cache",
            "rm",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ],
        vec!["cache", "prefetch", "registry.test:5000/a:b"],
    ] {
        let out = regproxy(&args, d);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let want = format!("no cache at {}", absent.display());
        assert!(text(&out).contains(&want), "{args:?}: {}", text(&out));
    }
    // An empty directory is no cache either (prefetch may fill it; nothing else may).
    std::fs::create_dir(d.join("empty")).unwrap();
    let out = regproxy(&["--cache-dir", "empty", "cache", "ls"], d);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no cache at"), "{}", text(&out));
    // containerd-config only looks into a cache that is there.
    let out = regproxy(&["containerd-config"], d);
    assert!(out.status.success(), "{}", text(&out));
    let names: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["empty"], "only what the test made");
    assert_eq!(std::fs::read_dir(d.join("empty")).unwrap().count(), 0);
}

/// `containerd-config --write DIR` writes DIR/HOST/hosts.toml, one file per registry, each a
/// TOML document naming the upstream and the mirror.
#[test]
fn containerd_config_writes_one_hosts_toml_per_registry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = regproxy(
        &[
            "--listen",
            "127.0.0.1:4128",
            "containerd-config",
            "--write",
            "certs.d",
            "docker.io",
            "registry.example:5000",
            "../escape",
        ],
        d,
    );
    assert!(
        !out.status.success(),
        "a path is no registry: {}",
        text(&out)
    );
    let out = regproxy(
        &[
            "--listen",
            "127.0.0.1:4128",
            "containerd-config",
            "--write",
            "certs.d",
            "docker.io",
            "registry.example:5000",
        ],
        d,
    );
    assert!(out.status.success(), "{}", text(&out));
    for (host, server) in [
        ("docker.io", "https://registry-1.docker.io"),
        ("registry.example:5000", "https://registry.example:5000"),
    ] {
        let path = d.join("certs.d").join(host).join("hosts.toml");
        let file = std::fs::read_to_string(&path).unwrap();
        let doc: toml::Table = toml::from_str(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(doc["server"].as_str(), Some(server), "{file}");
        let mirror = &doc["host"]["http://127.0.0.1:4128"];
        assert_eq!(
            mirror["capabilities"].as_array().unwrap().len(),
            2,
            "{file}"
        );
        assert!(text(&out).contains(&format!("certs.d/{host}/hosts.toml")));
    }
}

/// `ratelimit` is a monitoring check: any error (bad arguments, a bad config, no image named,
/// an unreachable registry) is 3, UNKNOWN, said on stdout.
#[test]
fn ratelimit_exits_unknown_on_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let closed = free_addr();
    let port = closed.rsplit(':').next().unwrap();
    let resolve = format!("registry.test:{port}={closed}");
    let registry = format!("registry.test:{port}");
    for args in [
        vec!["ratelimit", "--warn", "many"],
        vec!["ratelimit", "--config", "missing.toml"],
        vec!["ratelimit", "ghcr.io"],
        vec![
            "ratelimit",
            "--resolve",
            &resolve,
            &registry,
            "--image",
            "a/b:c",
        ],
    ] {
        let out = regproxy(&args, d);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", text(&out));
    }
    let out = regproxy(
        &[
            "ratelimit",
            "--resolve",
            &resolve,
            &registry,
            "--image",
            "a/b:c",
        ],
        d,
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with(&format!("UNKNOWN: {registry}: ")),
        "{said}"
    );
}

/// No help text says its default twice.
#[test]
fn help_names_each_default_once() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in [
        vec!["--help"],
        vec!["ratelimit", "--help"],
        vec!["containerd-config", "--help"],
        vec!["cache", "prefetch", "--help"],
        vec!["ca", "init", "--help"],
    ] {
        let out = regproxy(&cmd, dir.path());
        assert!(out.status.success(), "{cmd:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        for line in help.lines() {
            assert!(line.matches("[default: ").count() <= 1, "{cmd:?}: {line}");
        }
    }
    let out = regproxy(&["ratelimit", "--help"], dir.path());
    let help = String::from_utf8_lossy(&out.stdout);
    let registry = help.lines().find(|l| l.contains("[REGISTRY]  ")).unwrap();
    assert!(
        registry.ends_with("Registry host [default: docker.io]"),
        "{registry}"
    );
}

/// List-valued variables take comma-separated values, as the README says.
#[test]
fn list_variables_are_comma_separated() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .args(["config", "check"])
        .current_dir(dir.path())
        .env_remove("REGPROXY_CONFIG")
        .env("REGPROXY_ALLOW_PORT", "5000,5443")
        .env("REGPROXY_INTERCEPT", "a.example,*.b.example")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("allow_port = [443, 5000, 5443]"),
        "{printed}"
    );
    assert!(
        printed.contains("\"a.example\", \"*.b.example\"]"),
        "{printed}"
    );
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(
        readme.contains("REGPROXY_ALLOW_PORT=5000,5443"),
        "documented in the README"
    );
}

#[test]
fn unknown_key_exits_non_zero_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "cache_dirr = \"/tmp/x\"\n").unwrap();
    let out = regproxy(
        &["--config", file.to_str().unwrap(), "config", "check"],
        dir.path(),
    );
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("cache_dirr") && t.contains("bad.toml"), "{t}");
}

#[test]
fn bad_flag_value_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = regproxy(&["--tag-ttl", "soon", "config", "check"], dir.path());
    assert!(!out.status.success());
    assert!(text(&out).contains("tag_ttl"), "{}", text(&out));
    let out = regproxy(&["config", "check"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn ca_init_then_show_describes_the_ca_and_refuses_a_readable_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = ca_dir.to_str().unwrap();
    let out = regproxy(&["ca", "init", "--ca-dir", ca], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.contains("regproxy local CA"), "{shown}");
    assert!(shown.contains("sha256:"), "{shown}");
    let out = regproxy(&["ca", "show", "--ca-dir", ca], dir.path());
    assert!(out.status.success(), "{}", text(&out));

    use std::os::unix::fs::PermissionsExt;
    let key = ca_dir.join("ca.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    // `run` must refuse to start with a group/world-readable key, saying how to fix it.
    let out = regproxy(
        &["run", "--ca-dir", ca, "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("chmod 600"), "{}", text(&out));
}
