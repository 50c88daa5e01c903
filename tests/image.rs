//! The container image: the repository's `Dockerfile`, unchanged, built by a real dockerd, then
//! run; skopeo pulls through the container from the test registry.
//!
//! Docker Hub is out of reach here, so the Dockerfile's two base images are made first by
//! `scripts/local-base-images.sh` (Debian's debootstrap + `docker import`, this machine's Rust
//! toolchain in the build image). The container runs on the host's network (the test's dockerd
//! has no bridge), on ports of its own given through the image's `REGPROXY_*` variables.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use support::*;

const IMAGE: &str = "regproxy:image-test";
const NAME: &str = "regproxy-image-test";
/// debootstrap and apt downloads, and a release build of regproxy on two cores.
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `docker ARGS` on `dockerd` with a longer timeout than a client command's.
fn docker_long(dockerd: &Dockerd, args: &[&str]) -> Output {
    let mut cmd = Command::new("docker");
    cmd.arg("-H")
        .arg(dockerd.host())
        .env("DOCKER_BUILDKIT", "0")
        .args(args);
    run_with_timeout(&mut cmd, BUILD_TIMEOUT)
}

fn inspect(dockerd: &Dockerd, format: &str, what: &str) -> String {
    let out = dockerd.docker(&["inspect", "--format", format, what]);
    assert_success(&out, "docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes the container however the test ends: its dockerd is killed on drop, and a container
/// on the host's network would outlive it, holding its ports.
struct Removed<'a>(&'a Dockerd);

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let _ = self.0.docker(&["rm", "-f", NAME]);
    }
}

#[test]
fn the_dockerfile_builds_and_its_container_serves_a_pull() {
    require_tool("debootstrap");
    let dir = TestDir::new();
    let dockerd = Dockerd::start_with_driver(dir.path(), None, &[], "overlay2");

    let mut bases = Command::new(root().join("scripts/local-base-images.sh"));
    bases
        .arg(dir.join("bases"))
        .env("DOCKER_HOST", dockerd.host());
    let out = run_with_timeout(&mut bases, BUILD_TIMEOUT);
    assert_success(&out, "scripts/local-base-images.sh");
    let _ = std::fs::remove_dir_all(dir.join("bases"));

    // The Dockerfile as users build it; its build steps fetch crates and Debian packages.
    let context = root().display().to_string();
    let out = docker_long(
        &dockerd,
        &["build", "--network", "host", "-t", IMAGE, &context],
    );
    assert_success(&out, "docker build");
    assert_eq!(inspect(&dockerd, "{{.Config.User}}", IMAGE), "10001:10001");
    let health = inspect(&dockerd, "{{json .Config.Healthcheck.Test}}", IMAGE);
    assert!(health.contains("http://127.0.0.1:3129/healthz"), "{health}");

    let registry = Registry::start(dir.join("registry"));
    let oci = dir.join("oci");
    mkimage(&oci, 2, "1MiB", None, 41);
    push(&oci, &registry, "test/img:1", false);

    let (port, admin) = (free_port(), free_port());
    let listen = format!("REGPROXY_LISTEN=127.0.0.1:{port}");
    let admin_listen = format!("REGPROXY_ADMIN_LISTEN=127.0.0.1:{admin}");
    let ca = format!("{}:/upstream/ca.crt:ro", registry.ca_cert_path().display());
    let resolve = format!("{}=127.0.0.1:{}", registry.host(), registry.port());
    let allow_port = registry.port().to_string();
    let _removed = Removed(&dockerd);
    let out = dockerd.docker(&[
        "run",
        "-d",
        "--name",
        NAME,
        "--network",
        "host",
        "-e",
        &listen,
        "-e",
        &admin_listen,
        "-v",
        &ca,
        IMAGE,
        "run",
        "--intercept",
        "registry.test",
        "--resolve",
        &resolve,
        "--upstream-ca",
        "/upstream/ca.crt",
        "--allow-port",
        &allow_port,
    ]);
    assert_success(&out, "docker run");

    let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    wait_for(
        START_TIMEOUT,
        || std::net::TcpStream::connect(admin_addr).ok(),
        || text(&dockerd.docker(&["logs", NAME])),
    );
    let (status, body) = raw(
        admin_addr,
        b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    // The image's own health check (curl, in the image) reaches it too.
    let healthz = format!("http://127.0.0.1:{admin}/healthz");
    let out = dockerd.docker(&["exec", NAME, "curl", "-fsS", &healthz]);
    assert_success(&out, "curl in the container");
    let out = dockerd.docker(&["exec", NAME, "id", "-u"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10001");

    // The CA the container made, from its admin endpoint, is what the client trusts.
    let (status, response) = raw(
        admin_addr,
        b"GET /ca.crt HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{response}");
    let pem = response.split_once("\r\n\r\n").unwrap().1;
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let certs = dir.join("client-certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca.crt"), pem).unwrap();

    let proxy_url = format!("http://127.0.0.1:{port}");
    let pulled = dir.join("pulled");
    let out = run_with_timeout(
        skopeo_command(None)
            .env("HTTPS_PROXY", &proxy_url)
            .env("https_proxy", &proxy_url)
            .args(["copy", "--preserve-digests", "--src-cert-dir"])
            .arg(&certs)
            .arg(registry.image("test/img:1"))
            .arg(oci_ref(&pulled)),
        CMD_TIMEOUT,
    );
    assert_success(&out, "skopeo copy through the container");
    assert_same_image(&oci, &pulled);
    let (_, metrics) = raw(
        admin_addr,
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    let misses = format!(
        "regproxy_requests_total{{registry=\"{}\",outcome=\"MISS\"}}",
        registry.host()
    );
    assert!(sample(&metrics, &misses) >= 3, "{metrics}");

    // SIGTERM (the image's STOPSIGNAL) ends it cleanly.
    let out = dockerd.docker(&["stop", "-t", "45", NAME]);
    assert_success(&out, "docker stop");
    assert_eq!(inspect(&dockerd, "{{.State.ExitCode}}", NAME), "0");
}
