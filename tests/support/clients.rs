//! The clients: skopeo, containerd and `ctr`, dockerd.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use super::*;

/// Files that keep skopeo away from the machine's own configuration: an empty registries.conf
/// and an empty auth file (written once under the cargo target tmpdir).
fn skopeo_env_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skopeo-env");
        fs::create_dir_all(&dir).unwrap();
        for (name, content) in [
            (
                "registries.conf",
                "# empty: tests use fully qualified names\n",
            ),
            ("auth.json", "{\"auths\":{}}\n"),
        ] {
            // Write-then-rename: other test binaries may be doing the same at the same time.
            let tmp = dir.join(format!(".{name}.{}", std::process::id()));
            fs::write(&tmp, content).unwrap();
            fs::rename(&tmp, dir.join(name)).unwrap();
        }
        dir
    })
}

/// Sets a client's proxy variables: `HTTPS_PROXY` to `proxy` (if any), nothing inherited.
pub fn proxy_env(cmd: &mut Command, proxy: Option<&Proxy>) {
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    if let Some(p) = proxy {
        cmd.env("HTTPS_PROXY", p.url()).env("https_proxy", p.url());
    }
}

/// A `skopeo --insecure-policy` command with a hermetic environment, talking through `proxy`
/// (`HTTPS_PROXY`/`https_proxy` set to its URL, `NO_PROXY` cleared) or with no proxy at all.
pub fn skopeo_command(proxy: Option<&Proxy>) -> Command {
    require_tool("skopeo");
    let mut cmd = Command::new("skopeo");
    proxy_env(&mut cmd, proxy);
    skopeo_env(&mut cmd).arg("--insecure-policy");
    cmd
}

/// Keeps a command that runs skopeo (itself, or a shell line that does) away from the machine's
/// registries.conf and credentials.
pub fn skopeo_env(cmd: &mut Command) -> &mut Command {
    let env = skopeo_env_dir();
    cmd.env("CONTAINERS_REGISTRIES_CONF", env.join("registries.conf"))
        .env("REGISTRY_AUTH_FILE", env.join("auth.json"))
}

/// Runs `skopeo ARGS` (see [`skopeo_command`]) with [`CMD_TIMEOUT`]; does not check the status.
pub fn skopeo<S: AsRef<std::ffi::OsStr>>(args: &[S], proxy: Option<&Proxy>) -> Output {
    let mut cmd = skopeo_command(proxy);
    cmd.args(args);
    run_with_timeout(&mut cmd, CMD_TIMEOUT)
}

/// `skopeo copy [--all] --preserve-digests --src-cert-dir PROXY_CERTS [EXTRA…] SRC DST` through
/// `proxy`; does not check the status.
pub fn try_skopeo_copy_via(
    proxy: &Proxy,
    src: &str,
    dst: &str,
    all: bool,
    extra: &[&str],
) -> Output {
    let mut options = vec![
        "--src-cert-dir".into(),
        proxy.cert_dir().display().to_string(),
    ];
    options.extend(extra.iter().map(|s| s.to_string()));
    skopeo(&copy_args(all, options, src, dst), Some(proxy))
}

/// `copy [--all] --preserve-digests OPTIONS… SRC DST`: the arguments of a skopeo copy.
pub(super) fn copy_args(all: bool, options: Vec<String>, src: &str, dst: &str) -> Vec<String> {
    let mut args = vec!["copy".to_string()];
    if all {
        args.push("--all".into());
    }
    args.push("--preserve-digests".into());
    args.extend(options);
    args.extend([src.to_string(), dst.to_string()]);
    args
}

/// Copies `src` (`docker://registry.test:PORT/…`) to `dst` (`oci:DIR:latest`) through `proxy`,
/// trusting only the proxy's CA; panics with skopeo's output if it fails.
pub fn skopeo_copy_via(proxy: &Proxy, src: &str, dst: &str, all: bool) -> Output {
    let out = try_skopeo_copy_via(proxy, src, dst, all, &[]);
    assert_success(
        &out,
        &format!("skopeo copy {src} {dst} via {}", proxy.url()),
    );
    out
}

/// The raw manifest (or index) bytes of `image` (`docker://registry.test:PORT/…`), fetched through
/// `proxy` with `skopeo inspect --raw`.
pub fn inspect_raw_via(proxy: &Proxy, image: &str) -> Vec<u8> {
    let cert_dir = proxy.cert_dir().display().to_string();
    let out = skopeo(
        &["inspect", "--raw", "--cert-dir", &cert_dir, image],
        Some(proxy),
    );
    assert_success(
        &out,
        &format!("skopeo inspect --raw {image} via {}", proxy.url()),
    );
    out.stdout
}

/// The raw manifest (or index) bytes of `repo_tag`, fetched straight from the registry.
pub fn inspect_raw_direct(registry: &Registry, repo_tag: &str) -> Vec<u8> {
    let cert_dir = registry.cert_dir().display().to_string();
    let image = registry.direct_image(repo_tag);
    let mut args = vec![
        "inspect".to_string(),
        "--raw".into(),
        "--cert-dir".into(),
        cert_dir,
    ];
    if let Some(c) = registry.creds_arg() {
        args.push("--creds".into());
        args.push(c);
    }
    args.push(image.clone());
    let out = skopeo(&args, None);
    assert_success(&out, &format!("skopeo inspect --raw {image}"));
    out.stdout
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// A private containerd (own root, state and socket) for one test; killed on drop.
pub struct Containerd {
    child: Child,
    pub socket: std::path::PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        require_tool("containerd");
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\n[grpc]\n  address = {:?}\n[ttrpc]\n  address = {:?}\n",
                dir.join("root").display().to_string(),
                dir.join("state").display().to_string(),
                socket.display().to_string(),
                dir.join("ttrpc.sock").display().to_string(),
            ),
        )
        .unwrap();
        let child = log_output(
            Command::new("containerd").arg("--config").arg(&config),
            &dir.join("containerd.log"),
        )
        .spawn()
        .expect("starting containerd");
        wait_for(
            START_TIMEOUT,
            || socket.exists().then_some(()),
            || std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default(),
        );
        Containerd { child, socket }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// dockerd
// ---------------------------------------------------------------------------------------------

/// A private dockerd (own data root, exec root and socket; no iptables, no bridge, vfs) for one
/// test, with `extra` arguments and `HTTPS_PROXY` set to `proxy` if given. Killed on drop.
pub struct Dockerd {
    child: Child,
    short: tempfile::TempDir,
    log: PathBuf,
}

impl Dockerd {
    pub fn start(log_dir: &Path, proxy: Option<&Proxy>, extra: &[String]) -> Dockerd {
        Self::start_with_driver(log_dir, proxy, extra, "vfs")
    }

    /// [`Dockerd::start`] on another storage driver: `overlay2` for builds, whose every step
    /// `vfs` would copy whole.
    pub fn start_with_driver(
        log_dir: &Path,
        proxy: Option<&Proxy>,
        extra: &[String],
        driver: &str,
    ) -> Dockerd {
        require_tool("dockerd");
        require_tool("docker");
        // Short paths: dockerd's unix sockets live under exec-root and must fit in 108 bytes.
        let short = tempfile::Builder::new()
            .prefix("rpd")
            .tempdir_in("/tmp")
            .unwrap();
        let log = log_dir.join("dockerd.log");
        let mut cmd = Command::new("dockerd");
        proxy_env(&mut cmd, proxy);
        cmd.args(["--iptables=false", "--bridge=none"])
            .arg(format!("--storage-driver={driver}"))
            .args(extra)
            .arg("--data-root")
            .arg(short.path().join("data"))
            .arg("--exec-root")
            .arg(short.path().join("exec"))
            .arg("--pidfile")
            .arg(short.path().join("d.pid"))
            .arg("-H")
            .arg(format!("unix://{}", short.path().join("d.sock").display()));
        let child = log_output(&mut cmd, &log)
            .spawn()
            .expect("starting dockerd");
        let dockerd = Dockerd { child, short, log };
        wait_for(
            Duration::from_secs(60),
            || dockerd.docker(&["info"]).status.success().then_some(()),
            || fs::read_to_string(&dockerd.log).unwrap_or_default(),
        );
        dockerd
    }

    /// Runs `docker ARGS` against this daemon.
    pub fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("docker");
        cmd.arg("-H").arg(self.host()).args(args);
        run_with_timeout(&mut cmd, CMD_TIMEOUT)
    }

    /// `unix://SOCKET`: what `docker -H` and `DOCKER_HOST` take.
    pub fn host(&self) -> String {
        format!("unix://{}", self.short.path().join("d.sock").display())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM first: dockerd unmounts its data root when it shuts down. A killed dockerd
        // leaves that mount behind, and with it every layer it pulled (GiBs under /tmp per test).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever dockerd left mounted under its directories (its data root, the netns under
        // its exec root), deepest first, so that the temp dir can go.
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut left: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(self.short.path()))
            .collect();
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in left {
            let _ = Command::new("umount")
                .args(["--lazy", mount])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// containerd with regproxy as its hosts.toml mirror
// ---------------------------------------------------------------------------------------------

/// Writes `DIR/HOST:PORT/hosts.toml` for `registry` with `regproxy containerd-config --write`:
/// `proxy` as a plain-HTTP mirror (containerd adds `?ns=HOST:PORT`), so nobody needs to trust
/// regproxy's CA. Returns `DIR`, what `ctr --hosts-dir` takes.
pub fn write_mirror_hosts(dir: &Path, proxy: &Proxy, registry: &Registry) -> PathBuf {
    let out = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_regproxy"))
            .env_remove("REGPROXY_CONFIG")
            .args(["--listen", &proxy.addr().to_string()])
            .args(["containerd-config", "--write"])
            .arg(dir)
            .arg(registry.host()),
        CMD_TIMEOUT,
    );
    assert_success(&out, "regproxy containerd-config --write");
    let toml = fs::read_to_string(dir.join(registry.host()).join("hosts.toml")).unwrap();
    assert!(
        toml.contains(&format!("[host.\"http://{}\"]", proxy.addr())),
        "{toml}"
    );
    dir.to_path_buf()
}

/// `ctr images pull --hosts-dir HOSTS [EXTRA…] IMAGE` on `containerd`, with no proxy variables;
/// does not check the status.
pub fn ctr_pull(containerd: &Containerd, hosts: &Path, image: &str, extra: &[&str]) -> Output {
    require_tool("ctr");
    let mut cmd = Command::new("ctr");
    proxy_env(&mut cmd, None);
    cmd.arg("-a")
        .arg(&containerd.socket)
        .args(["images", "pull", "--hosts-dir"])
        .arg(hosts)
        .args(extra)
        .arg(image);
    run_with_timeout(&mut cmd, CMD_TIMEOUT)
}

impl Containerd {
    /// The digest `ctr images ls` lists for `image`, if it holds that image.
    pub fn image_digest(&self, image: &str) -> Option<String> {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(&self.socket).args(["images", "ls"]);
        let out = run_with_timeout(&mut cmd, CMD_TIMEOUT);
        assert_success(&out, "ctr images ls");
        // REF TYPE DIGEST SIZE PLATFORMS LABELS
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut fields = l.split_whitespace();
            (fields.next() == Some(image))
                .then(|| fields.nth(1).map(str::to_string))
                .flatten()
        })
    }
}
