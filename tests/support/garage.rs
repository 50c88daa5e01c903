//! Garage, a real distributed S3-compatible object store, on loopback: the shared tier of the
//! fleet tests (`scripts/garage.sh` starts it; `scripts/test.sh` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::*;

/// A Garage cluster of one or three nodes with a bucket `regproxy` and a key for it. Stopped on
/// drop.
pub struct Garage {
    dir: PathBuf,
    port: u16,
    nodes: usize,
    /// `AWS_ACCESS_KEY_ID` of the bucket's key.
    pub key_id: String,
    /// Its secret, in a file (as `secret_access_key_file` takes it).
    pub secret_file: PathBuf,
    secret: String,
}

impl Garage {
    /// Starts `nodes` (1 or 3, replication factor `nodes`) in `dir`.
    pub fn start(dir: &Path, nodes: usize) -> Garage {
        require_tool("garage");
        let port = free_ports(nodes);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage.sh");
        let out = run_with_timeout(
            Command::new("bash")
                .arg(&script)
                .arg(dir)
                .arg(port.to_string())
                .arg(nodes.to_string()),
            Duration::from_secs(120),
        );
        let garage_log = std::fs::read_to_string(dir.join("n1.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "garage.sh failed: {}\n{garage_log}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.join("env")).expect("garage.sh writes env");
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("{name} in {env}"))
                .to_owned()
        };
        let secret = var("AWS_SECRET_ACCESS_KEY");
        let secret_file = dir.join("secret");
        std::fs::write(&secret_file, &secret).unwrap();
        Garage {
            dir: dir.to_owned(),
            port,
            nodes,
            key_id: var("AWS_ACCESS_KEY_ID"),
            secret_file,
            secret,
        }
    }

    /// `http://127.0.0.1:PORT`: node 1's S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Points `config` at the bucket, under `prefix`.
    pub fn configure(&self, config: &mut Config, prefix: &str) {
        config.shared_store =
            Some(regproxy::config::parse_store_url(&format!("s3://regproxy/{prefix}")).unwrap());
        config.shared_store_endpoint = Some(self.endpoint());
        config.shared_store_region = "garage".into();
        config.access_key_id = Some(self.key_id.clone());
        config.secret_access_key_file = Some(self.secret_file.clone());
    }

    /// Kills node `n` (1-based).
    pub fn kill_node(&self, n: usize) {
        let pid = std::fs::read_to_string(self.dir.join(format!("n{n}.pid"))).unwrap();
        let _ = Command::new("kill").arg("-9").arg(pid.trim()).status();
    }

    /// Kills every node.
    pub fn stop(&self) {
        for n in 1..=self.nodes {
            self.kill_node(n);
        }
    }

    /// `curl` with this key's signature against node 1, for `PATH` in the bucket (`-X`, data…
    /// in `args`); the response body.
    pub fn curl(&self, path: &str, args: &[&str]) -> Vec<u8> {
        let out = run_with_timeout(
            Command::new("curl")
                .args(["-sS", "--fail", "--aws-sigv4", "aws:amz:garage:s3"])
                .arg("--user")
                .arg(format!("{}:{}", self.key_id, self.secret))
                .args(["-H", "x-amz-content-sha256:UNSIGNED-PAYLOAD"])
                .args(args)
                .arg(format!("{}/regproxy/{path}", self.endpoint())),
            Duration::from_secs(30),
        );
        assert_success(&out, &format!("curl {path}"));
        out.stdout
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A base port with `nodes` pairs free (`base + 10 i` and the one after), below the kernel's
/// ephemeral range: a port picked from that range (as `free_port` does) was taken by another
/// test's connection between the check and Garage's bind, and Garage panics on a port in use.
fn free_ports(nodes: usize) -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .clamp(12_000, 65_535);
    let span = (low - 11_000) / 100 * 100;
    // Spread over processes by pid, and over this process's tests by a counter.
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..200 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = 10_000 + (seed.wrapping_add(n.wrapping_mul(100)) % span) / 100 * 100;
        let all_free = (0..nodes as u32).all(|i| {
            let p = base + 10 * i;
            [p, p + 1].iter().all(|q| {
                u16::try_from(*q)
                    .is_ok_and(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok())
            })
        });
        if all_free {
            return base as u16;
        }
    }
    panic!("no free ports for garage");
}
