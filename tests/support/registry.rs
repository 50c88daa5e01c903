//! The real registry (Debian's `docker-registry`, distribution 2.8), its access log, and the
//! images pushed to it: `mkimage`, `push`, OCI layout helpers.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::*;

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
    /// Body bytes the registry wrote (`-`, as for a HEAD, is 0).
    pub bytes: u64,
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
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(self.dir.join("config.yml"))
            .current_dir(&self.dir);
        let child = log_output(&mut cmd, &self.log_path())
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

    /// How many bytes of the blob `digest` the registry has sent in successful (2xx) `GET`s,
    /// whole or ranged: its size once if every byte crossed once.
    pub fn blob_bytes(&self, digest: &str) -> u64 {
        self.access_log()
            .iter()
            .filter(|e| e.is_blob_get(digest) && (200..300).contains(&e.status))
            .map(|e| e.bytes)
            .sum()
    }

    /// Makes a proxy config reach this registry as `registry.test:PORT`: intercept
    /// `registry.test`, resolve it to 127.0.0.1:PORT, trust the registry CA upstream, allow CONNECT
    /// to PORT.
    pub fn configure_proxy(&self, config: &mut Config) {
        reach_test_host(config, REGISTRY_HOST, self.port, self.ca_cert_path());
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
    let bytes = rest.next()?.parse().unwrap_or(0);
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
        bytes,
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
    let mut options = vec![
        "--dest-cert-dir".into(),
        registry.cert_dir().display().to_string(),
    ];
    if let Some(c) = registry.creds_arg() {
        options.extend(["--dest-creds".into(), c]);
    }
    let (src, dst) = (oci_ref(oci_dir), registry.direct_image(repo_tag));
    let out = skopeo(&copy_args(all, options, &src, &dst), None);
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
