//! Test support for regproxy's end-to-end tests: a real registry (Debian's `docker-registry`,
//! distribution 2.8) over TLS on loopback, synthetic OCI images, the proxy on its own thread, and
//! skopeo as the client. Everything is synchronous: tests are plain `#[test]` functions.
//!
//! Use from an integration test with `mod support;` and `use support::*;`.
//!
//! Every external command runs with a timeout, so no test hangs forever. A missing tool is a panic
//! that says how to get it (there is no skip): run `scripts/test.sh`.
//!
//! Debugging: `REGPROXY_KEEP_TEST_DIRS=1` keeps the temporary directories (registry log, proxy cache,
//! OCI layouts) and prints where they are; `RUST_LOG` sets the proxy's log filter (default
//! `regproxy=debug,warn`), printed by the test harness for failing tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};

pub use regproxy::Config;

/// Timeout for one skopeo (or other client) command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a registry or a proxy may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

const INSTALL_HINT: &str = "run scripts/test.sh (installs docker-registry and skopeo)";

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Panics unless `tool` is an executable in PATH.
pub fn require_tool(tool: &str) {
    static FOUND: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let found = FOUND.get_or_init(Default::default);
    if found.lock().unwrap().iter().any(|t| t == tool) {
        return;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let present = std::env::split_paths(&path).any(|dir| {
        let p = dir.join(tool);
        fs::metadata(&p)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
            .unwrap_or(false)
    });
    if !present {
        panic!("`{tool}` not found in PATH: {INSTALL_HINT}");
    }
    found.lock().unwrap().push(tool.to_string());
}

/// Runs `cmd` to completion (stdin closed, stdout and stderr captured), killing it and panicking
/// with whatever it printed if it takes longer than `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e} ({INSTALL_HINT})"));
    let out = read_in_background(child.stdout.take().unwrap());
    let err = read_in_background(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child process") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            );
            panic!(
                "timed out after {timeout:?}: {desc}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn read_in_background(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Panics with the command's output unless it exited with status 0.
#[track_caller]
pub fn assert_success(out: &Output, what: &str) {
    if !out.status.success() {
        panic!(
            "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what()` after `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    what: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?}: {}", what());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------------------------

/// A temporary directory, removed on drop unless `REGPROXY_KEEP_TEST_DIRS` is set (then its path
/// is printed).
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("regproxy-test-")
            .tempdir()
            .expect("creating a temp dir");
        TestDir { dir: Some(dir) }
    }
    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path().join(p)
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("REGPROXY_KEEP_TEST_DIRS").is_some() {
            let path = self.dir.take().unwrap().keep();
            eprintln!("kept test dir {}", path.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// Writes a test CA (`ca.crt`, `ca.key`) and a server certificate signed by it (`server.crt`,
/// `server.key`) for `names` (DNS names or IP addresses) into `dir`. All PEM; ECDSA P-256.
pub fn make_test_certs(dir: &Path, ca_name: &str, names: &[&str]) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    fs::create_dir_all(dir).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (not_before, not_after) = (
        now - time::Duration::days(1),
        now + time::Duration::days(30),
    );

    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    write_file(&dir.join("ca.crt"), ca_cert.pem().as_bytes(), 0o644);
    write_file(
        &dir.join("ca.key"),
        ca_key.serialize_pem().as_bytes(),
        0o600,
    );
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    server.distinguished_name = DistinguishedName::new();
    server.distinguished_name.push(DnType::CommonName, names[0]);
    server.is_ca = IsCa::NoCa;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    server.not_before = not_before;
    server.not_after = not_after;
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    write_file(&dir.join("server.crt"), server_cert.pem().as_bytes(), 0o644);
    write_file(
        &dir.join("server.key"),
        server_key.serialize_pem().as_bytes(),
        0o600,
    );
}

fn write_file(path: &Path, data: &[u8], mode: u32) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    f.write_all(data).unwrap();
}

/// Makes `dir` a directory that holds only `ca.crt`, a copy of `ca_pem` (what skopeo's and
/// podman's `--cert-dir` options want).
fn make_cert_dir(dir: &Path, ca_pem: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::copy(ca_pem, dir.join("ca.crt"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", ca_pem.display()));
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// The host name clients use for the test registry; nothing resolves it but the proxy under test.
pub const REGISTRY_HOST: &str = "registry.test";

/// One request in the registry's access log (every request the registry answered, including
/// 401 challenges and unrouted 404s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    pub method: String,
    /// Path and query, as the client sent them (`/v2/test/img/blobs/sha256:…`).
    pub uri: String,
    pub status: u16,
    /// The client's User-Agent (the proxy's own, for upstream requests it makes).
    pub user_agent: String,
}

impl AccessEntry {
    /// Whether this is a `GET` of the blob `digest` (any repository).
    pub fn is_blob_get(&self, digest: &str) -> bool {
        self.method == "GET"
            && self
                .uri
                .split('?')
                .next()
                .unwrap_or("")
                .ends_with(&format!("/blobs/{digest}"))
    }
}

/// Debian's `docker-registry` (distribution 2.8) serving TLS on 127.0.0.1:PORT with a certificate
/// for `registry.test` and 127.0.0.1, signed by its own test CA. Killed on drop.
pub struct Registry {
    dir: PathBuf,
    _tmp: Option<TestDir>,
    port: u16,
    child: Option<Child>,
    creds: Option<(String, String)>,
    auth_yaml: Option<String>,
}

impl Registry {
    /// Starts a registry with `auth_yaml` (an `auth:` section, e.g. token auth) in its config;
    /// `creds` are what pushes and direct inspection use (e.g. the token server's user).
    pub fn start_with_auth(
        dir: impl AsRef<Path>,
        creds: Option<(String, String)>,
        auth_yaml: String,
    ) -> Registry {
        Self::start_full(dir.as_ref().to_path_buf(), creds, Some(auth_yaml), None)
    }

    /// Starts a registry whose files (certs, config.yml, data/, registry.log) live in `dir`
    /// (created if missing).
    pub fn start(dir: impl AsRef<Path>) -> Registry {
        Self::start_inner(dir.as_ref().to_path_buf(), None, None)
    }

    /// Starts a registry in a fresh temporary directory.
    pub fn start_temp() -> Registry {
        let tmp = TestDir::new();
        let dir = tmp.join("registry");
        Self::start_inner(dir, None, Some(tmp))
    }

    /// Starts a registry that demands HTTP Basic auth with `user`/`password` (htpasswd, bcrypt).
    pub fn start_with_htpasswd(dir: impl AsRef<Path>, user: &str, password: &str) -> Registry {
        Self::start_inner(
            dir.as_ref().to_path_buf(),
            Some((user.to_string(), password.to_string())),
            None,
        )
    }

    fn start_inner(
        dir: PathBuf,
        creds: Option<(String, String)>,
        tmp: Option<TestDir>,
    ) -> Registry {
        Self::start_full(dir, creds, None, tmp)
    }

    fn start_full(
        dir: PathBuf,
        creds: Option<(String, String)>,
        auth_yaml: Option<String>,
        tmp: Option<TestDir>,
    ) -> Registry {
        require_tool("docker-registry");
        require_tool("curl");
        fs::create_dir_all(dir.join("data")).unwrap();
        make_test_certs(
            &dir,
            "regproxy test registry CA",
            // registry-1.docker.io: mirror tests stand this registry in for Docker Hub.
            &[
                REGISTRY_HOST,
                "127.0.0.1",
                "localhost",
                "registry-1.docker.io",
            ],
        );
        make_cert_dir(&dir.join("certs.d"), &dir.join("ca.crt"));
        if let (Some((user, password)), None) = (&creds, &auth_yaml) {
            let line = htpasswd_line(user, password);
            write_file(&dir.join("htpasswd"), format!("{line}\n").as_bytes(), 0o644);
        }
        let mut reg = Registry {
            dir,
            _tmp: tmp,
            port: 0,
            child: None,
            creds,
            auth_yaml,
        };
        // The port was free when we looked; another process may take it before the registry binds
        // it, so retry with a new one a few times.
        for attempt in 1..=5 {
            reg.port = free_port();
            reg.write_config();
            match reg.spawn_and_wait() {
                Ok(()) => return reg,
                Err(log) if attempt < 5 && log.contains("address already in use") => continue,
                Err(log) => panic!(
                    "docker-registry did not come up on 127.0.0.1:{} ({}):\n{log}",
                    reg.port,
                    reg.dir.display()
                ),
            }
        }
        unreachable!()
    }

    fn write_config(&self) {
        let dir = self.dir.display();
        let mut yml = format!(
            "version: 0.1
log:
  level: info
  formatter: json
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {dir}/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: regproxy-test-secret
  tls:
    certificate: {dir}/server.crt
    key: {dir}/server.key
",
            port = self.port
        );
        if let Some(auth) = &self.auth_yaml {
            yml.push_str(auth);
        } else if self.creds.is_some() {
            yml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: registry-test\n    path: {dir}/htpasswd\n"
            ));
        }
        write_file(&self.dir.join("config.yml"), yml.as_bytes(), 0o644);
    }

    /// Spawns the registry and waits until `/v2/` answers; on failure returns the log.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_path = self.log_path();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.join("config.yml"))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run docker-registry: {e} ({INSTALL_HINT})"));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("exited with {status}\n{}", self.log()));
            }
            if let Some(code) = self.ping() {
                if code == "200" || code == "401" {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "/v2/ did not answer within {START_TIMEOUT:?}\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The HTTP status of `GET https://registry.test:PORT/v2/` (resolved to 127.0.0.1), if any.
    fn ping(&self) -> Option<String> {
        let out = run_with_timeout(
            Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-m",
                    "2",
                    "--cacert",
                ])
                .arg(self.ca_cert_path())
                .arg("--resolve")
                .arg(format!("{REGISTRY_HOST}:{}:127.0.0.1", self.port))
                .arg(format!("https://{}/v2/", self.host()))
                .env_remove("https_proxy")
                .env_remove("HTTPS_PROXY"),
            Duration::from_secs(10),
        );
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (code != "000" && !code.is_empty()).then_some(code)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    /// `registry.test:PORT`: the name clients use through the proxy.
    pub fn host(&self) -> String {
        format!("{REGISTRY_HOST}:{}", self.port)
    }
    /// `127.0.0.1:PORT`: for direct access, which needs no name resolution.
    pub fn direct_host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// `docker://registry.test:PORT/REPO_TAG`: a skopeo reference through the proxy.
    pub fn image(&self, repo_tag: &str) -> String {
        format!("docker://{}/{repo_tag}", self.host())
    }
    /// `docker://127.0.0.1:PORT/REPO_TAG`: a skopeo reference straight to the registry.
    pub fn direct_image(&self, repo_tag: &str) -> String {
        format!("docker://{}/{repo_tag}", self.direct_host())
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The registry's test CA (PEM): what the proxy must trust upstream.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// A directory holding only the registry CA as `ca.crt` (for `skopeo --*-cert-dir`).
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.join("certs.d")
    }
    /// `Some((user, password))` for a registry started with htpasswd.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }
    /// `user:password`, the form skopeo's `--creds` options take.
    pub fn creds_arg(&self) -> Option<String> {
        self.creds.as_ref().map(|(u, p)| format!("{u}:{p}"))
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("registry.log")
    }
    /// The whole log (application JSON lines and combined-format access lines), across restarts.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the registry (its data stays). Upstream-down tests use this.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the registry again on the same port with the same data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "registry is already running");
        if let Err(log) = self.spawn_and_wait() {
            panic!(
                "docker-registry did not come back on 127.0.0.1:{}:\n{log}",
                self.port
            );
        }
    }

    /// Every request the registry has answered since it was first started (across restarts), in
    /// order, parsed from distribution's access log lines (see [`parse_access_log`]). Waits until the log
    /// has stopped growing for 100 ms first, because the registry writes a line just after the
    /// response has gone out.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        let mut last = self.log();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            thread::sleep(Duration::from_millis(100));
            let now = self.log();
            if now.len() == last.len() || Instant::now() >= deadline {
                last = now;
                break;
            }
            last = now;
        }
        parse_access_log(&last)
    }

    /// How many successful (2xx) `GET`s of the blob `digest` the registry has answered.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|e| e.is_blob_get(digest) && (200..300).contains(&e.status))
            .count()
    }

    /// Makes a proxy config reach this registry as `registry.test:PORT`: intercept
    /// `registry.test`, resolve it to 127.0.0.1:PORT, trust the registry CA upstream, allow CONNECT
    /// to PORT.
    pub fn configure_proxy(&self, config: &mut Config) {
        config.intercept.push(REGISTRY_HOST.to_string());
        config
            .resolve
            .push((self.host(), SocketAddr::from(([127, 0, 0, 1], self.port))));
        config.upstream_ca.push(self.ca_cert_path());
        config.allow_port.push(self.port);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses the access lines of distribution's log into entries; other lines (the JSON application
/// log) are skipped. The access log is Apache "combined" format, one line per request:
/// `127.0.0.1 - - [25/Nov/2026:12:04:02 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "skopeo/1.9.3"`.
/// (The JSON "response completed" lines miss requests that fail authorization, so they are not
/// used.)
pub fn parse_access_log(log: &str) -> Vec<AccessEntry> {
    log.lines()
        .filter(|l| !l.starts_with('{'))
        .filter_map(parse_access_line)
        .collect()
}

fn parse_access_line(line: &str) -> Option<AccessEntry> {
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut request = request.split(' ');
    let (method, uri) = (request.next()?, request.next()?);
    let mut rest = rest.splitn(3, ' ');
    let status = rest.next()?.parse().ok()?;
    let _size = rest.next()?;
    // `"REFERER" "USER AGENT"`
    let user_agent = rest
        .next()?
        .rsplit_once(" \"")
        .map(|(_, ua)| ua.trim_end_matches('"'))
        .unwrap_or_default();
    Some(AccessEntry {
        method: method.to_string(),
        uri: uri.to_string(),
        status,
        user_agent: user_agent.to_string(),
    })
}

/// One htpasswd line with a bcrypt hash: `htpasswd` (apache2-utils) when present, else Python's
/// crypt module.
fn htpasswd_line(user: &str, password: &str) -> String {
    let out = if Command::new("htpasswd")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
    {
        run_with_timeout(
            Command::new("htpasswd").args(["-nbB", user, password]),
            Duration::from_secs(30),
        )
    } else {
        require_tool("python3");
        run_with_timeout(
            Command::new("python3").args([
                "-W",
                "ignore",
                "-c",
                "import crypt,sys; print(sys.argv[1] + ':' + crypt.crypt(sys.argv[2], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1024)))",
                user,
                password,
            ]),
            Duration::from_secs(30),
        )
    };
    assert_success(&out, "making an htpasswd line (install apache2-utils)");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// Writes a synthetic OCI layout to `out_dir` (tag `latest`) with `tests/support/mkimage.py`:
/// `layers` layers of `size` each (`"512KiB"`, `"1MiB"`), deterministic per `seed`; with
/// `platforms` (`"linux/amd64,linux/arm64"`) an index over one image per platform. Returns the
/// digest of the top manifest or index.
pub fn mkimage(
    out_dir: impl AsRef<Path>,
    layers: usize,
    size: &str,
    platforms: Option<&str>,
    seed: u64,
) -> String {
    require_tool("python3");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/mkimage.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(out_dir.as_ref()).args([
        "--layers",
        &layers.to_string(),
        "--size",
        size,
        "--seed",
        &seed.to_string(),
    ]);
    if let Some(p) = platforms {
        cmd.args(["--platforms", p]);
    }
    let out = run_with_timeout(&mut cmd, CMD_TIMEOUT);
    assert_success(&out, "mkimage.py");
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        digest.starts_with("sha256:"),
        "mkimage.py printed {digest:?}"
    );
    digest
}

/// `oci:DIR:latest`
pub fn oci_ref(dir: impl AsRef<Path>) -> String {
    format!("oci:{}:latest", dir.as_ref().display())
}

/// Pushes the OCI layout `oci_dir` (tag `latest`) straight to the registry (by IP, no proxy) as
/// `repo_tag` (`"test/img:latest"`), digests preserved; `all` copies every image of an index.
pub fn push(oci_dir: impl AsRef<Path>, registry: &Registry, repo_tag: &str, all: bool) {
    let mut args: Vec<String> = vec!["copy".into()];
    if all {
        args.push("--all".into());
    }
    args.push("--preserve-digests".into());
    args.push("--dest-cert-dir".into());
    args.push(registry.cert_dir().display().to_string());
    if let Some(c) = registry.creds_arg() {
        args.push("--dest-creds".into());
        args.push(c);
    }
    args.push(oci_ref(oci_dir));
    args.push(registry.direct_image(repo_tag));
    let out = skopeo(&args, None);
    assert_success(
        &out,
        &format!("pushing {repo_tag} to {}", registry.direct_host()),
    );
}

/// `sha256:HEX` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The digest that the OCI layout's `index.json` names for its (first) image: the manifest or
/// index digest.
pub fn oci_index_digest(dir: impl AsRef<Path>) -> String {
    let path = dir.as_ref().join("index.json");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["manifests"][0]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no digest in {text}"))
        .to_string()
}

/// The blobs of an OCI layout: digest → size. Panics if a blob's content does not hash to its name.
pub fn oci_blobs(dir: impl AsRef<Path>) -> BTreeMap<String, u64> {
    let blobs = dir.as_ref().join("blobs/sha256");
    let mut map = BTreeMap::new();
    for entry in fs::read_dir(&blobs).unwrap_or_else(|e| panic!("reading {}: {e}", blobs.display()))
    {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let mut f = fs::File::open(entry.path()).unwrap();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        let actual = hex::encode(h.finalize());
        assert_eq!(
            actual,
            name,
            "blob {} does not match its digest",
            entry.path().display()
        );
        map.insert(format!("sha256:{name}"), size);
    }
    map
}

/// The layer digests of the image manifest `digest` in an OCI layout.
pub fn oci_layers(dir: impl AsRef<Path>, manifest_digest: &str) -> Vec<String> {
    let hex = manifest_digest
        .strip_prefix("sha256:")
        .expect("a sha256 digest");
    let path = dir.as_ref().join("blobs/sha256").join(hex);
    let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    v["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("{} has no layers", path.display()))
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// Asserts that two OCI layouts hold the same image: the same top digest and the same blobs,
/// each matching its digest.
#[track_caller]
pub fn assert_same_image(expected: impl AsRef<Path>, actual: impl AsRef<Path>) {
    let (e, a) = (expected.as_ref(), actual.as_ref());
    assert_eq!(
        oci_index_digest(a),
        oci_index_digest(e),
        "top digest of {} vs {}",
        a.display(),
        e.display()
    );
    assert_eq!(
        oci_blobs(a),
        oci_blobs(e),
        "blobs of {} vs {}",
        a.display(),
        e.display()
    );
}

// ---------------------------------------------------------------------------------------------
// Proxy
// ---------------------------------------------------------------------------------------------

fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("regproxy=debug,warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// regproxy running on its own thread (own tokio runtime) on 127.0.0.1:N, with its CA and cache in
/// temporary directories. Stopped on drop.
pub struct Proxy {
    _tmp: Option<TestDir>,
    addr: SocketAddr,
    admin_addr: SocketAddr,
    ca_dir: PathBuf,
    cache_dir: PathBuf,
    cert_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<Result<(), String>>>,
    stop_timeout: Duration,
}

impl Proxy {
    /// Starts a proxy with a fresh CA and cache; `customize` may change any field of the config
    /// (already set: `listen` (the bound port), `admin_listen` (a free port), `ca_dir` and
    /// `cache_dir` (temporary), `shutdown_grace` (5 s)).
    pub fn start(customize: impl FnOnce(&mut Config)) -> Proxy {
        let tmp = TestDir::new();
        let state = tmp.path().to_path_buf();
        Self::start_inner(&state, Some(tmp), customize)
    }

    /// Starts a proxy whose CA and cache live in `state_dir/ca` and `state_dir/cache`: a second
    /// proxy started on the same dir reuses the first one's CA and cache.
    pub fn start_in(state_dir: impl AsRef<Path>, customize: impl FnOnce(&mut Config)) -> Proxy {
        Self::start_inner(state_dir.as_ref(), None, customize)
    }

    /// A proxy that intercepts `registry.test` and reaches `registry` (see
    /// [`Registry::configure_proxy`]).
    pub fn for_registry(registry: &Registry) -> Proxy {
        Self::start(|c| registry.configure_proxy(c))
    }

    /// Like [`Proxy::for_registry`], then `customize`.
    pub fn for_registry_with(registry: &Registry, customize: impl FnOnce(&mut Config)) -> Proxy {
        Self::start(|c| {
            registry.configure_proxy(c);
            customize(c)
        })
    }

    fn start_inner(
        state: &Path,
        tmp: Option<TestDir>,
        customize: impl FnOnce(&mut Config),
    ) -> Proxy {
        init_tracing();
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config {
            listen: addr,
            // Bound below, before the proxy starts: a port chosen here could be taken meanwhile.
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ca_dir: state.join("ca"),
            cache_dir: state.join("cache"),
            shutdown_grace: Duration::from_secs(5),
            ..Config::default()
        };
        customize(&mut config);
        let admin = std::net::TcpListener::bind(config.admin_listen)
            .unwrap_or_else(|e| panic!("binding the admin listener {}: {e}", config.admin_listen));
        admin.set_nonblocking(true).unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (ca_dir, cache_dir) = (config.ca_dir.clone(), config.cache_dir.clone());
        let stop_timeout = config.shutdown_grace + Duration::from_secs(15);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name(format!("regproxy-{}", addr.port()))
            .spawn(move || -> Result<(), String> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| format!("building a tokio runtime: {e}"))?;
                let result = rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .map_err(|e| format!("tokio listener: {e}"))?;
                    let admin = tokio::net::TcpListener::from_std(admin)
                        .map_err(|e| format!("tokio admin listener: {e}"))?;
                    let shutdown = async move {
                        let _ = rx.await;
                    };
                    regproxy::serve(listener, admin, config, shutdown)
                        .await
                        .map_err(|e| format!("regproxy::serve: {e:?}"))
                });
                rt.shutdown_timeout(Duration::from_secs(5));
                result
            })
            .unwrap();
        let mut proxy = Proxy {
            _tmp: tmp,
            addr,
            admin_addr,
            cert_dir: state.join("client-certs"),
            ca_dir,
            cache_dir,
            shutdown: Some(tx),
            thread: Some(thread),
            stop_timeout,
        };
        let ca = proxy.ca_cert_path();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if proxy.thread.as_ref().unwrap().is_finished() {
                let result = proxy.thread.take().unwrap().join();
                panic!(
                    "the proxy stopped while starting: {}",
                    describe_exit(result)
                );
            }
            if fs::read_to_string(&ca).is_ok_and(|pem| pem.contains("-----END CERTIFICATE-----")) {
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the proxy did not write {} within {START_TIMEOUT:?}",
                    ca.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_dir_all(&proxy.cert_dir);
        make_cert_dir(&proxy.cert_dir, &ca);
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("the proxy does not accept on {addr}: {e}"));
        // The admin listener is bound just after the CA is written.
        wait_for(
            START_TIMEOUT,
            || TcpStream::connect(admin_addr).ok(),
            || format!("the admin endpoint does not accept on {admin_addr}"),
        );
        proxy
    }

    /// The admin endpoint's address (`config.admin_listen`; a free port unless customized).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `http://127.0.0.1:N`: what `HTTPS_PROXY` takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// The proxy's CA certificate (PEM), which clients must trust.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.ca_dir.join("ca.crt")
    }
    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }
    /// A directory holding only the proxy's CA as `ca.crt` (for `skopeo --*-cert-dir`).
    pub fn cert_dir(&self) -> &Path {
        &self.cert_dir
    }
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Signals shutdown and waits for `run` to return; panics if it returned an error, panicked
    /// or did not stop within `shutdown_grace` + 15 s.
    pub fn stop(&mut self) {
        if let Err(e) = self.stop_inner() {
            panic!("{e}");
        }
    }

    fn stop_inner(&mut self) -> Result<(), String> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let deadline = Instant::now() + self.stop_timeout;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the proxy on {} did not stop within {:?}",
                    self.addr, self.stop_timeout
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        match thread.join() {
            Ok(Ok(())) => Ok(()),
            other => Err(format!(
                "the proxy on {} stopped badly: {}",
                self.addr,
                describe_exit(other)
            )),
        }
    }
}

fn describe_exit(result: thread::Result<Result<(), String>>) -> String {
    match result {
        Ok(Ok(())) => "run returned Ok".to_string(),
        Ok(Err(e)) => e,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("the proxy thread panicked: {msg}")
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

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
    let env = skopeo_env_dir();
    let mut cmd = Command::new("skopeo");
    proxy_env(&mut cmd, proxy);
    cmd.env("CONTAINERS_REGISTRIES_CONF", env.join("registries.conf"))
        .env("REGISTRY_AUTH_FILE", env.join("auth.json"))
        .arg("--insecure-policy");
    cmd
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
    let mut args: Vec<String> = vec!["copy".into()];
    if all {
        args.push("--all".into());
    }
    args.push("--preserve-digests".into());
    args.push("--src-cert-dir".into());
    args.push(proxy.cert_dir().display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(src.into());
    args.push(dst.into());
    skopeo(&args, Some(proxy))
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
// Raw HTTP and TLS through the proxy, and tiny scripted HTTPS upstreams
// ---------------------------------------------------------------------------------------------

pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub fn dial(proxy: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(proxy).expect("connect to proxy");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Reads an HTTP response head byte by byte (so nothing after it is consumed); returns status and head.
pub fn read_head(s: &mut impl Read) -> (u16, String) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => panic!(
                "connection ended inside the response head: {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, head)
}

/// Sends raw bytes, reads the whole answer (the request must ask for Connection: close).
pub fn raw(proxy: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = dial(proxy);
    s.write_all(request).unwrap();
    read_response(s)
}

/// Reads a whole response to the end of the stream: its status and its text.
pub fn read_response(mut s: impl Read) -> (u16, String) {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text)
}

pub fn connect(proxy: SocketAddr, target: &str) -> (u16, TcpStream) {
    let mut s = dial(proxy);
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let (status, _) = read_head(&mut s);
    (status, s)
}

pub fn tls_config(ca_pem: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// CONNECTs to `target`, does TLS trusting `ca_pem` with SNI `name`, returns the TLS stream.
pub fn tls_via(
    proxy: SocketAddr,
    target: &str,
    name: &str,
    ca_pem: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    tls_via_as(proxy, None, target, name, ca_pem)
}

/// [`tls_via`] as a proxy user (`user:password`, sent as `Proxy-Authorization: Basic`).
pub fn tls_via_as(
    proxy: SocketAddr,
    user: Option<&str>,
    target: &str,
    name: &str,
    ca_pem: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use base64::Engine as _;
    let mut tcp = dial(proxy);
    let auth = user.map_or(String::new(), |u| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(u);
        format!("Proxy-Authorization: Basic {b64}\r\n")
    });
    write!(
        tcp,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n"
    )
    .unwrap();
    let (status, _) = read_head(&mut tcp);
    assert_eq!(status, 200, "CONNECT {target}");
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(tls_config(ca_pem), server_name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .unwrap_or_else(|e| panic!("TLS to {name} via CONNECT {target}: {e}"));
    }
    tls
}

/// GET `path` over `tls`, returning status and body.
pub fn https_get(mut tls: impl Read + Write, host: &str, path: &str) -> (u16, String) {
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_response(tls)
}

/// A one-request-per-connection HTTPS server on 127.0.0.1 for `names`, with a certificate from
/// its own test CA (written to `dir`, `ca.crt` is what the proxy must trust). Each connection is
/// served on its own thread: `answer` gets the request head and writes the whole raw response
/// (slowly, wrongly or cut short, as a test needs). Returns the port and the heads seen so far.
pub fn tiny_https(
    dir: &Path,
    names: &[&str],
    answer: impl Fn(&str, &mut dyn Write) + Send + Sync + 'static,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    make_test_certs(dir, "tiny test CA", names);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (record, answer) = (seen.clone(), Arc::new(answer));
    thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, record, answer) = (config.clone(), record.clone(), answer.clone());
            thread::spawn(move || {
                tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tls.read_exact(&mut b).is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                record.lock().unwrap().push(head.clone());
                answer(&head, &mut tls);
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.conn.complete_io(&mut tls.sock);
            });
        }
    });
    (port, seen)
}

/// A response read off a stream: status, head text, body bytes, and whether the body was
/// complete (as long as its `Content-Length`, and no error cut it).
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
    pub complete: bool,
}

impl RawResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Sends `request` (which should say `Connection: close`) over `s` and reads the response to the
/// end of the stream.
pub fn request(mut s: impl Read + Write, request: &str) -> RawResponse {
    s.write_all(request.as_bytes()).unwrap();
    let (status, head) = read_head(&mut s);
    let mut body = Vec::new();
    let clean = s.read_to_end(&mut body).is_ok();
    let resp = RawResponse {
        status,
        head,
        body,
        complete: false,
    };
    let complete = clean
        && resp
            .header("content-length")
            .map_or(true, |l| l.parse::<usize>().ok() == Some(resp.body.len()));
    RawResponse { complete, ..resp }
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
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
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

mod token;
#[allow(unused_imports)]
pub use token::*;

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
        require_tool("dockerd");
        require_tool("docker");
        // Short paths: dockerd's unix sockets live under exec-root and must fit in 108 bytes.
        let short = tempfile::Builder::new()
            .prefix("rpd")
            .tempdir_in("/tmp")
            .unwrap();
        let log = log_dir.join("dockerd.log");
        let out = fs::File::create(&log).unwrap();
        let mut cmd = Command::new("dockerd");
        proxy_env(&mut cmd, proxy);
        cmd.args(["--iptables=false", "--bridge=none", "--storage-driver=vfs"])
            .args(extra)
            .arg("--data-root")
            .arg(short.path().join("data"))
            .arg("--exec-root")
            .arg(short.path().join("exec"))
            .arg("--pidfile")
            .arg(short.path().join("d.pid"))
            .arg("-H")
            .arg(format!("unix://{}", short.path().join("d.sock").display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd.spawn().expect("starting dockerd");
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
        cmd.arg("-H")
            .arg(format!(
                "unix://{}",
                self.short.path().join("d.sock").display()
            ))
            .args(args);
        run_with_timeout(&mut cmd, CMD_TIMEOUT)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// the admin endpoint
// ---------------------------------------------------------------------------------------------

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

/// `len` bytes that do not repeat (xorshift from `seed`): blobs no compression or dedup shortens.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------------------
// The binary as a child process
// ---------------------------------------------------------------------------------------------

impl Registry {
    /// The flags that make the `regproxy` binary reach this registry as `registry.test:PORT`:
    /// what [`Registry::configure_proxy`] does to a [`Config`].
    pub fn proxy_args(&self) -> Vec<String> {
        vec![
            "--intercept".into(),
            REGISTRY_HOST.into(),
            "--resolve".into(),
            format!("{}=127.0.0.1:{}", self.host(), self.port),
            "--upstream-ca".into(),
            self.ca_cert_path().display().to_string(),
            "--allow-port".into(),
            self.port.to_string(),
        ]
    }
}

/// The `regproxy` binary as a child process, so that a test can kill -9 it: CA and cache in
/// `STATE/ca` and `STATE/cache` (a restart on the same state reuses both), log appended to
/// `STATE/regproxy.log`, reaching `registry`. Killed on drop.
pub struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    state: PathBuf,
}

impl ProxyProcess {
    /// Starts `regproxy run` and waits until it has written its CA and accepts connections.
    pub fn start(state: &Path, registry: &Registry) -> ProxyProcess {
        Self::start_with(state, registry, &ProxyOptions::default())
    }

    /// [`ProxyProcess::start`] with a descriptor limit and extra flags.
    pub fn start_with(state: &Path, registry: &Registry, options: &ProxyOptions) -> ProxyProcess {
        fs::create_dir_all(state).unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.join("regproxy.log"))
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let bin = env!("CARGO_BIN_EXE_regproxy");
        let mut cmd = match options.nofile {
            // prlimit sets the limit on itself and execs the binary: the child's pid is
            // regproxy's, so /proc/PID tells about the proxy, not a wrapper.
            Some(n) => {
                require_tool("prlimit");
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        let child = cmd
            .env_remove("REGPROXY_CONFIG")
            .arg("run")
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--ca-dir")
            .arg(state.join("ca"))
            .arg("--cache-dir")
            .arg(state.join("cache"))
            .args(registry.proxy_args())
            .args(&options.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the regproxy binary");
        let mut proxy = ProxyProcess {
            child,
            addr,
            state: state.to_path_buf(),
        };
        let ca = state.join("ca/ca.crt");
        wait_for(
            START_TIMEOUT,
            || {
                if let Some(status) = proxy.child.try_wait().unwrap() {
                    panic!(
                        "regproxy exited while starting ({status}):\n{}",
                        proxy.log()
                    );
                }
                let written = fs::read_to_string(&ca)
                    .is_ok_and(|pem| pem.contains("-----END CERTIFICATE-----"));
                (written && TcpStream::connect(addr).is_ok()).then_some(())
            },
            || {
                let log = fs::read_to_string(state.join("regproxy.log")).unwrap_or_default();
                format!("regproxy on {addr}:\n{log}")
            },
        );
        make_cert_dir(&proxy.cert_dir(), &ca);
        proxy
    }

    /// `http://127.0.0.1:N`: what `HTTPS_PROXY` takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// A directory holding only the proxy's CA as `ca.crt` (for `skopeo --*-cert-dir`).
    pub fn cert_dir(&self) -> PathBuf {
        self.state.join("client-certs")
    }
    /// The log of every run on this state directory.
    pub fn log(&self) -> String {
        fs::read_to_string(self.state.join("regproxy.log")).unwrap_or_default()
    }

    /// `skopeo copy --preserve-digests` from `src` to `dst` through this proxy, trusting only
    /// its CA (see [`skopeo_command`]); not started, so that a test may run or spawn it.
    pub fn skopeo_copy(&self, src: &str, dst: &str) -> Command {
        let mut cmd = skopeo_command(None);
        cmd.env("HTTPS_PROXY", self.url())
            .env("https_proxy", self.url())
            .args(["copy", "--preserve-digests", "--src-cert-dir"])
            .arg(self.cert_dir())
            .args([src, dst]);
        cmd
    }

    /// SIGKILL, then reap: nothing of the process runs on, nothing is flushed or cleaned up.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a graceful shutdown), then waits for the exit status within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let out = run_with_timeout(Command::new("kill").args(["-TERM", &pid]), timeout);
        assert_success(&out, "kill -TERM regproxy");
        wait_for(
            timeout,
            || self.child.try_wait().unwrap(),
            || "regproxy to exit after SIGTERM".to_string(),
        )
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// Makes a proxy config intercept `name` and reach it at 127.0.0.1:`port`, trusting `ca` for
/// upstream TLS (a test server such as [`tiny_https`]).
pub fn reach_test_host(config: &mut Config, name: &str, port: u16, ca: PathBuf) {
    config.intercept.push(name.into());
    config.allow_port.push(port);
    config.resolve.push((
        format!("{name}:{port}"),
        SocketAddr::from(([127, 0, 0, 1], port)),
    ));
    config.upstream_ca.push(ca);
}

/// What [`ProxyProcess::start_with`] adds to the defaults.
#[derive(Debug, Default, Clone)]
pub struct ProxyOptions {
    /// `RLIMIT_NOFILE` (soft and hard) for the process, set with `prlimit`.
    pub nofile: Option<u64>,
    /// Extra flags for `regproxy run` (`--max-connections`, `--idle-timeout`, …).
    pub args: Vec<String>,
}

impl ProxyProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The proxy's CA certificate (PEM).
    pub fn ca_cert_path(&self) -> PathBuf {
        self.state.join("ca/ca.crt")
    }

    /// CPU time (user + system) the process has used so far, from `/proc/PID/stat`.
    pub fn cpu_time(&self) -> Duration {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // The command name (field 2) may hold spaces; the fields after it are plain numbers:
        // state is field 3, utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
    }

    /// How many file descriptors the process holds now.
    pub fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// `sysconf(_SC_CLK_TCK)`, the unit of the times in `/proc/PID/stat`.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = run_with_timeout(Command::new("getconf").arg("CLK_TCK"), CMD_TIMEOUT);
        assert_success(&out, "getconf CLK_TCK");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    })
}

// ---------------------------------------------------------------------------------------------
// containerd with regproxy as its hosts.toml mirror
// ---------------------------------------------------------------------------------------------

/// Writes `DIR/HOST:PORT/hosts.toml` for `registry` as `regproxy containerd-config` prints it:
/// `proxy` as a plain-HTTP mirror (containerd adds `?ns=HOST:PORT`), so nobody needs to trust
/// regproxy's CA. Returns `DIR`, what `ctr --hosts-dir` takes.
pub fn write_mirror_hosts(dir: &Path, proxy: &Proxy, registry: &Registry) -> PathBuf {
    let host_dir = dir.join(registry.host());
    fs::create_dir_all(&host_dir).unwrap();
    let out = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_regproxy"))
            .env_remove("REGPROXY_CONFIG")
            .args(["--listen", &proxy.addr().to_string()])
            .args(["containerd-config", &registry.host()]),
        CMD_TIMEOUT,
    );
    assert_success(&out, "regproxy containerd-config");
    let toml = String::from_utf8(out.stdout).unwrap();
    assert!(
        toml.contains(&format!("[host.\"http://{}\"]", proxy.addr())),
        "{toml}"
    );
    fs::write(host_dir.join("hosts.toml"), &toml).unwrap();
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
