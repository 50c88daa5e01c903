//! Real clients through regproxy, named the documented way (`HTTPS_PROXY` plus trust in the
//! proxy's CA): podman, containerd's `ctr`, and dockerd.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

/// A registry with a two-layer image and a proxy in front of it.
fn setup(dir: &TestDir, seed: u64) -> (Registry, Proxy, String) {
    let src = dir.join("src");
    let digest = mkimage(&src, 2, "128KiB", None, seed);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/client:latest", false);
    let proxy = Proxy::for_registry(&registry);
    (registry, proxy, digest)
}

fn miss_count(proxy: &Proxy) -> usize {
    let (_, text) = raw(
        proxy.admin_addr(),
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    text.lines()
        .filter(|l| l.starts_with("regproxy_requests_total{") && l.contains("outcome=\"MISS\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
        .sum()
}

#[test]
fn podman_pulls_through_the_proxy() {
    require_tool("podman");
    let dir = TestDir::new();
    let (registry, proxy, digest) = setup(&dir, 71);
    let conf = dir.join("registries.conf");
    std::fs::write(&conf, "# empty\n").unwrap();
    let image = format!("{}/test/client:latest", registry.host());
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        proxy_env(&mut cmd, Some(&proxy));
        cmd.env("CONTAINERS_REGISTRIES_CONF", &conf)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--runroot")
            .arg(dir.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        run_with_timeout(&mut cmd, CMD_TIMEOUT)
    };
    let cert_dir = proxy.cert_dir().display().to_string();
    let out = podman(&["pull", "--cert-dir", &cert_dir, &image]);
    assert_success(&out, "podman pull");
    let out = podman(&["image", "inspect", "--format", "{{.Digest}}", &image]);
    assert_success(&out, "podman image inspect");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    assert!(miss_count(&proxy) >= 3, "the pull went through the cache");
}

#[test]
fn ctr_pulls_through_the_proxy() {
    require_tool("ctr");
    let dir = TestDir::new();
    let (registry, proxy, digest) = setup(&dir, 72);
    let containerd = Containerd::start(&dir.join("containerd"));
    // hosts.toml: the registry's name, trusting the proxy's CA (it answers for that name).
    let hosts = dir.join("hosts").join(registry.host());
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"https://{h}\"\n[host.\"https://{h}\"]\n  ca = {:?}\n",
            proxy.ca_cert_path().display().to_string(),
            h = registry.host()
        ),
    )
    .unwrap();
    let image = format!("{}/test/client:latest", registry.host());
    let mut cmd = Command::new("ctr");
    proxy_env(&mut cmd, Some(&proxy));
    cmd.arg("-a")
        .arg(&containerd.socket)
        .args(["images", "pull", "--hosts-dir"])
        .arg(dir.join("hosts"))
        .arg(&image);
    assert_success(&run_with_timeout(&mut cmd, CMD_TIMEOUT), "ctr images pull");
    let mut cmd = Command::new("ctr");
    cmd.arg("-a").arg(&containerd.socket).args(["images", "ls"]);
    let out = run_with_timeout(&mut cmd, CMD_TIMEOUT);
    assert_success(&out, "ctr images ls");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&image) && l.contains(&digest)),
        "{listing}"
    );
    assert!(miss_count(&proxy) >= 3, "the pull went through the cache");
}

/// dockerd with `HTTPS_PROXY` in its environment and the proxy's CA in
/// `/etc/docker/certs.d/HOST:PORT/`, as the README documents.
#[test]
fn dockerd_pulls_through_the_proxy() {
    require_tool("dockerd");
    require_tool("docker");
    let dir = TestDir::new();
    let (registry, proxy, digest) = setup(&dir, 73);
    let certs = Path::new("/etc/docker/certs.d").join(registry.host());
    std::fs::create_dir_all(&certs).expect("writing /etc/docker/certs.d needs root");
    std::fs::copy(proxy.ca_cert_path(), certs.join("ca.crt")).unwrap();
    // Removes the CA directory again, whatever happens.
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(certs);
    let dockerd = Dockerd::start(dir.path(), Some(&proxy), &[]);
    let docker = |args: &[&str]| dockerd.docker(args);
    let info = String::from_utf8_lossy(&docker(&["info"]).stdout).into_owned();
    assert!(
        info.contains(&format!("HTTPS Proxy: {}", proxy.url())),
        "{info}"
    );
    let image = format!("{}/test/client:latest", registry.host());
    assert_success(&docker(&["pull", &image]), "docker pull");
    let out = docker(&[
        "image",
        "inspect",
        "--format",
        "{{index .RepoDigests 0}}",
        &image,
    ]);
    assert_success(&out, "docker image inspect");
    assert!(String::from_utf8_lossy(&out.stdout)
        .trim()
        .ends_with(&digest));
    assert!(miss_count(&proxy) >= 3, "the pull went through the cache");
}
