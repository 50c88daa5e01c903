//! Running commands (with timeouts, `require_tool`), waiting for things, free ports, temporary
//! directories and files.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Timeout for one skopeo (or other client) command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a registry or a proxy may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) const INSTALL_HINT: &str = "run scripts/test.sh (installs docker-registry and skopeo)";

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

/// Closes `cmd`'s stdin and appends its stdout and stderr to the file `log` (created if missing).
pub(super) fn log_output<'c>(cmd: &'c mut Command, log: &Path) -> &'c mut Command {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
}

pub(super) fn write_file(path: &Path, data: &[u8], mode: u32) {
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
