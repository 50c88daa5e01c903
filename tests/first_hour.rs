//! The first hour, as a new user meets it with the README alone: the first start says where the
//! CA is and gives a line that pulls; the README's private-registry example works as written;
//! a missing `--allow-port` or an untrusted CA is named where the user looks (the client's
//! error, the log); `REGPROXY_LOG=debug` shows regproxy's own decisions.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::*;

/// A line as a user pastes it into a shell, run in `cwd` with no proxy variables but those it
/// sets, and skopeo kept off this machine's registries.conf and credentials.
fn paste(line: &str, cwd: &Path) -> Output {
    std::fs::create_dir_all(cwd).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(line).current_dir(cwd);
    proxy_env(&mut cmd, None);
    skopeo_env(&mut cmd);
    run_with_timeout(&mut cmd, CMD_TIMEOUT)
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A registry holding one small image as `repo_tag`, and the OCI layout it came from.
fn registry_with(dir: &TestDir, repo_tag: &str, seed: u64) -> Registry {
    mkimage(dir.join("src"), 1, "64KiB", None, seed);
    let registry = Registry::start(dir.join("registry"));
    push(dir.join("src"), &registry, repo_tag, false);
    registry
}

/// The first start logs the CA's path and fingerprint (as `ca show` prints it), the URL of
/// `/ca.crt`, and a line that, pasted, pulls an image through the proxy; a restart says the CA
/// was loaded, with the same fingerprint.
#[test]
fn the_first_start_says_where_things_are_and_its_line_pulls() {
    let dir = TestDir::new();
    let registry = registry_with(&dir, "test/first:latest", 171);
    let state = dir.join("state");
    let mut proxy = ProxyProcess::start(&state, &registry);
    let out = Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .arg("--ca-dir")
        .arg(state.join("ca"))
        .args(["ca", "show"])
        .env_remove("REGPROXY_CONFIG")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    let sha256 = shown
        .lines()
        .find_map(|l| l.strip_prefix("sha256:"))
        .unwrap_or_else(|| panic!("{shown}"))
        .trim()
        .to_string();

    let log = proxy.log();
    let generated = log
        .lines()
        .find(|l| l.contains("generated a new CA"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(generated.contains(&sha256), "{generated}");
    let ca = state.join("ca/ca.crt").display().to_string();
    assert!(generated.contains(&ca), "{generated}");
    let url = format!("http://{}/ca.crt", proxy.admin_addr());
    assert!(log.contains(&url), "{log}");

    let marker = "to pull through regproxy, run: ";
    let line = log
        .lines()
        .find_map(|l| l.split_once(marker).map(|(_, cmd)| cmd.to_string()))
        .unwrap_or_else(|| panic!("no line to paste in\n{log}"));
    // Tests reach no real registry: the same line, with the test registry's image.
    let line = line.replace(
        "docker://docker.io/library/alpine:3",
        &registry.image("test/first:latest"),
    );
    let cwd = dir.join("user");
    let out = paste(&line, &cwd);
    assert_success(&out, &line);
    assert_same_image(dir.join("src"), cwd.join("alpine"));

    proxy.kill_9();
    let proxy = ProxyProcess::start(&state, &registry);
    let loaded = proxy
        .log()
        .lines()
        .find(|l| l.contains("loaded the CA"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{}", proxy.log()));
    assert!(loaded.contains(&sha256), "{loaded}");
}

/// The README section under `heading`, up to the next heading.
fn readme_section(heading: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in the README"));
    let rest = &readme[start + heading.len()..];
    rest[..rest.find("\n#").unwrap_or(rest.len())].to_string()
}

/// The commands of each ```sh block in `section`, with continuation lines joined.
fn sh_blocks(section: &str) -> Vec<Vec<String>> {
    section
        .split("```sh\n")
        .skip(1)
        .map(|block| {
            let block = &block[..block.find("```").expect("a closed code block")];
            block
                .replace("\\\n", " ")
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .filter(|l| !l.is_empty())
                .collect()
        })
        .collect()
}

/// The README's "private registry on its own port, with its own CA", run with exactly its
/// flags (plus the `--resolve` it gives for a registry on the same machine) against the test
/// registry: its client lines pull the image. Without `--allow-port` the pull fails, and both
/// skopeo's error and regproxy's log name `--allow-port`.
#[test]
fn the_readme_private_registry_example_works_as_written() {
    let dir = TestDir::new();
    let registry = registry_with(&dir, "team/app:1.0", 172);
    let section = readme_section("### A private registry on its own port, with its own CA");
    let blocks = sh_blocks(&section);
    assert_eq!(blocks.len(), 2, "{section}");
    let ca = registry.ca_cert_path().display().to_string();
    let port = registry.port().to_string();
    // The example's names, for the test registry's.
    let ours = |text: &str| {
        text.replace("registry.internal.example", REGISTRY_HOST)
            .replace("/etc/regproxy/internal-ca.pem", &ca)
            .replace("5000", &port)
    };
    let command = ours(&blocks[0].join(" "));
    let mut flags: Vec<String> = command.split(' ').map(str::to_string).collect();
    assert_eq!(flags.remove(0), "regproxy", "{command}");
    let resolve = section
        .split("`--resolve ")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .unwrap_or_else(|| panic!("no --resolve in {section}"));
    flags.extend(["--resolve".to_string(), ours(resolve)]);

    let client = |proxy: &ProxyProcess, cwd: &Path| {
        let tmp = format!("{}/", dir.join("tmp").display());
        let lines = ours(&blocks[1].join("\n"))
            .replace("127.0.0.1:3128", &proxy.addr().to_string())
            .replace("127.0.0.1:3129", &proxy.admin_addr().to_string())
            .replace("/tmp/", &tmp);
        paste(&format!("set -e\n{lines}"), cwd)
    };

    // Without --allow-port.
    let at = flags.iter().position(|f| f == "--allow-port").unwrap();
    let mut without = flags.clone();
    without.drain(at..at + 2);
    let options = ProxyOptions {
        args: without,
        ..ProxyOptions::default()
    };
    let proxy = ProxyProcess::start_bare(&dir.join("state-1"), &options);
    let out = client(&proxy, &dir.join("user-1"));
    assert!(!out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("--allow-port"), "{}", said(&out));
    let refused = proxy
        .log()
        .lines()
        .find(|l| l.contains("CONNECT to port"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{}", proxy.log()));
    assert!(
        refused.contains(&format!("--allow-port {port}")),
        "{refused}"
    );
    drop(proxy);

    // As written.
    let options = ProxyOptions {
        args: flags,
        ..ProxyOptions::default()
    };
    let proxy = ProxyProcess::start_bare(&dir.join("state-2"), &options);
    let out = client(&proxy, &dir.join("user-2"));
    assert_success(&out, "the README's client lines");
    assert_same_image(dir.join("src"), dir.join("tmp/app"));
    assert!(proxy.log().contains("MISS"), "{}", proxy.log());
}

/// A client that does not trust regproxy's CA fails its handshake; regproxy's log says that
/// the client does not trust its CA, names the alert, and gives the fix per client.
#[test]
fn an_untrusting_client_is_told_how_to_trust_the_ca() {
    require_tool("curl");
    let dir = TestDir::new();
    let port = free_port().to_string();
    let options = ProxyOptions {
        args: ["--intercept", REGISTRY_HOST, "--allow-port", &port]
            .map(str::to_string)
            .to_vec(),
        ..ProxyOptions::default()
    };
    let state = dir.join("state");
    let proxy = ProxyProcess::start_bare(&state, &options);
    let host = format!("{REGISTRY_HOST}:{port}");

    // skopeo (Go) and curl (OpenSSL), neither given the CA.
    let mut skopeo = skopeo_command(None);
    skopeo
        .env("HTTPS_PROXY", proxy.url())
        .args(["inspect", &format!("docker://{host}/team/app:1.0")]);
    let out = run_with_timeout(&mut skopeo, CMD_TIMEOUT);
    assert!(!out.status.success(), "{}", said(&out));
    let mut curl = Command::new("curl");
    proxy_env(&mut curl, None);
    curl.args(["-sS", "-m", "30", "-x", &proxy.url()])
        .arg(format!("https://{host}/v2/"));
    let out = run_with_timeout(&mut curl, CMD_TIMEOUT);
    assert!(!out.status.success(), "{}", said(&out));

    let log = proxy.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the client does not trust regproxy's CA"))
        .collect();
    let ca = state.join("ca/ca.crt").display().to_string();
    for w in &warnings {
        for fix in [ca.as_str(), "--cert-dir", "ca install", "--cacert", &host] {
            assert!(w.contains(fix), "{fix:?} not in {w}");
        }
    }
    // Go says bad_certificate (skopeo may try twice); OpenSSL unknown_ca.
    let (go, openssl) = warnings.split_at(warnings.len().saturating_sub(1));
    assert!(!go.is_empty(), "{log}");
    assert!(
        go.iter().all(|w| w.contains("alert=\"bad_certificate\"")),
        "{log}"
    );
    assert!(openssl[0].contains("alert=\"unknown_ca\""), "{log}");
}

/// `REGPROXY_LOG=debug` shows regproxy's own decisions: cache lookups, leading a download,
/// the tag's freshness and revalidation, pulling with injected credentials and answering the
/// registry's challenge. A `HEAD`'s access line names its fields once.
#[test]
fn debug_logs_show_regproxys_decisions() {
    let dir = TestDir::new();
    mkimage(dir.join("src"), 1, "64KiB", None, 173);
    let registry = Registry::start_with_htpasswd(dir.join("registry"), "puller", "pw-173");
    push(dir.join("src"), &registry, "test/dbg:latest", false);
    let config = dir.join("regproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[registries.\"{}\"]\nusername = \"puller\"\npassword = \"pw-173\"\n",
            registry.host()
        ),
    )
    .unwrap();
    let options = ProxyOptions {
        args: vec![
            "--config".into(),
            config.display().to_string(),
            "--tag-ttl".into(),
            "0s".into(),
        ],
        env: vec![("REGPROXY_LOG".into(), "debug".into())],
        ..ProxyOptions::default()
    };
    let proxy = ProxyProcess::start_with(&dir.join("state"), &registry, &options);
    let image = registry.image("test/dbg:latest");
    for n in 1..=2 {
        let dst = oci_ref(dir.join(format!("dst{n}")));
        let out = run_with_timeout(&mut proxy.skopeo_copy(&image, &dst), CMD_TIMEOUT);
        assert_success(&out, "skopeo copy through the proxy");
    }
    let mut curl = Command::new("curl");
    proxy_env(&mut curl, None);
    curl.args(["-sS", "-f", "-I", "-m", "30", "-x", &proxy.url()])
        .args(["-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
        .arg("--cacert")
        .arg(proxy.ca_cert_path())
        .arg(format!(
            "https://{}/v2/test/dbg/manifests/latest",
            registry.host()
        ));
    assert_success(&run_with_timeout(&mut curl, CMD_TIMEOUT), "curl -I");

    // Log lines reach the file in batches, within a moment (regproxy's log writer).
    let head_logged = |log: &str| {
        log.lines()
            .any(|l| l.contains("regproxy::access") && l.contains("method=HEAD"))
    };
    let log = wait_for(
        Duration::from_secs(5),
        || Some(proxy.log()).filter(|l| head_logged(l)),
        || format!("no HEAD access line in\n{}", proxy.log()),
    );
    let ours: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("DEBUG") && l.contains(" regproxy::"))
        .collect();
    for decision in [
        "tag not cached: asking the upstream",
        "cache lookup: not cached",
        "no download in flight: leading one from the upstream",
        "cache lookup: cached",
        "tag stale: revalidating it with a HEAD",
        "revalidated the tag",
        "pulling with the configured credentials",
        "answering the upstream's challenge with the configured credentials",
    ] {
        assert!(
            ours.iter().any(|l| l.contains(decision)),
            "no debug event {decision:?} in\n{}",
            ours.join("\n")
        );
    }
    assert!(!log.contains("pw-173"), "a password in the log");
    let head = log
        .lines()
        .rfind(|l| l.contains("regproxy::access") && l.contains("method=HEAD"))
        .unwrap_or_else(|| panic!("no HEAD access line in\n{log}"));
    for field in ["method=HEAD", "host=", "path="] {
        assert_eq!(head.matches(field).count(), 1, "{field} twice in {head}");
    }
}
