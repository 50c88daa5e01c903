//! regproxy under test: [`Proxy`] in process (own thread and runtime), [`ProxyProcess`] the
//! binary as a child process.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

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

/// Where a proxy's cache at `cache_dir` keeps a verified object (cacache's content layout).
pub fn cached_object(cache_dir: &Path, digest: &str) -> PathBuf {
    let hex = &digest["sha256:".len()..];
    cache_dir
        .join("content-v2/sha256")
        .join(&hex[0..2])
        .join(&hex[2..4])
        .join(&hex[4..])
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
        Self::start_inner(&state, Some(tmp), None, customize)
    }

    /// Like [`Proxy::start`], on a listener bound already (fleet members must know each
    /// other's addresses before any of them starts).
    pub fn start_on(listener: TcpListener, customize: impl FnOnce(&mut Config)) -> Proxy {
        let tmp = TestDir::new();
        let state = tmp.path().to_path_buf();
        Self::start_inner(&state, Some(tmp), Some(listener), customize)
    }

    /// Starts a proxy whose CA and cache live in `state_dir/ca` and `state_dir/cache`: a second
    /// proxy started on the same dir reuses the first one's CA and cache.
    pub fn start_in(state_dir: impl AsRef<Path>, customize: impl FnOnce(&mut Config)) -> Proxy {
        Self::start_inner(state_dir.as_ref(), None, None, customize)
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
        listener: Option<TcpListener>,
        customize: impl FnOnce(&mut Config),
    ) -> Proxy {
        init_tracing();
        let listener = listener
            .unwrap_or_else(|| TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0"));
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
            if ca_written(&ca) {
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

/// Whether the proxy has written its CA certificate to `path` (whole).
fn ca_written(path: &Path) -> bool {
    fs::read_to_string(path).is_ok_and(|pem| pem.contains("-----END CERTIFICATE-----"))
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

/// The `regproxy` binary as a child process, so that a test can kill -9 it: CA and cache in
/// `STATE/ca` and `STATE/cache` (a restart on the same state reuses both), log appended to
/// `STATE/regproxy.log`, reaching `registry`. Killed on drop.
pub struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    state: PathBuf,
}

impl ProxyProcess {
    /// Starts `regproxy run` and waits until it has written its CA and accepts connections.
    pub fn start(state: &Path, registry: &Registry) -> ProxyProcess {
        Self::start_with(state, registry, &ProxyOptions::default())
    }

    /// [`ProxyProcess::start`] with a descriptor limit and extra flags.
    pub fn start_with(state: &Path, registry: &Registry, options: &ProxyOptions) -> ProxyProcess {
        let mut options = options.clone();
        options.args.splice(0..0, registry.proxy_args());
        Self::start_bare(state, &options)
    }

    /// `regproxy run` with only the listeners, the state directories and `options`: nothing
    /// makes it reach a registry unless `options.args` do.
    pub fn start_bare(state: &Path, options: &ProxyOptions) -> ProxyProcess {
        fs::create_dir_all(state).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
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
        // The log says when it is listening; only a test's own REGPROXY_LOG changes that.
        cmd.env_remove("REGPROXY_CONFIG")
            .env_remove("REGPROXY_LOG")
            .arg("run")
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .arg("--ca-dir")
            .arg(state.join("ca"))
            .arg("--cache-dir")
            .arg(state.join("cache"))
            .args(&options.args);
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        let log = state.join("regproxy.log");
        let starts = || {
            let text = fs::read_to_string(&log).unwrap_or_default();
            text.matches("regproxy listening").count()
        };
        let before = starts();
        let child = log_output(&mut cmd, &log)
            .spawn()
            .expect("starting the regproxy binary");
        let mut proxy = ProxyProcess {
            child,
            addr,
            admin,
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
                // Listening, with everything it says at start written.
                let up = ca_written(&ca)
                    && starts() > before
                    && TcpStream::connect(addr).is_ok()
                    && TcpStream::connect(admin).is_ok();
                up.then_some(())
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
            .args(copy_args(
                false,
                vec![
                    "--src-cert-dir".into(),
                    self.cert_dir().display().to_string(),
                ],
                src,
                dst,
            ));
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

/// What [`ProxyProcess::start_with`] adds to the defaults.
#[derive(Debug, Default, Clone)]
pub struct ProxyOptions {
    /// `RLIMIT_NOFILE` (soft and hard) for the process, set with `prlimit`.
    pub nofile: Option<u64>,
    /// Extra flags for `regproxy run` (`--max-connections`, `--idle-timeout`, …).
    pub args: Vec<String>,
    /// Extra environment variables (`REGPROXY_LOG`, …).
    pub env: Vec<(String, String)>,
}

impl ProxyProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The admin endpoint's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
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
