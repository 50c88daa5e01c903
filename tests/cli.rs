//! The binary's command line: config errors name the key and the file, the documented example
//! config is valid, and `ca init` / `ca show` describe the CA they made.

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

#[test]
fn example_config_is_valid_and_check_prints_it() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/regproxy.toml");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regproxy"));
    cmd.args(["--config", example.to_str().unwrap(), "config", "check"])
        .current_dir(dir.path())
        .env("DOCKERHUB_TOKEN", "example-token");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("example-token"));
    // The credentials it names are checked: without the variable, config check fails.
    let out = regproxy(
        &["--config", example.to_str().unwrap(), "config", "check"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("DOCKERHUB_TOKEN"), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("listen = \"127.0.0.1:3128\""), "{printed}");
    assert!(printed.contains("registry.internal.example"), "{printed}");
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
