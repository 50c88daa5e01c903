//! Installing the CA into the system trust store (Debian/Ubuntu, RHEL/Fedora, Alpine), which
//! dockerd and containerd read, and removing it again.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A distribution family's trust store: where anchors go and what rebuilds the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustStore {
    /// Where the CA file is put.
    pub anchor: PathBuf,
    /// The command that rebuilds the system bundle.
    pub update: Vec<String>,
}

/// Why the CA could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// No known trust store layout was found.
    #[error("no known system trust store (looked for update-ca-certificates and update-ca-trust); see the README for manual steps")]
    Unknown,
    /// Copying or removing the anchor failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The update command failed.
    #[error("`{command}` failed: {reason}")]
    Update { command: String, reason: String },
}

/// The trust store of this machine, under `root` (`/` normally; a directory in tests).
pub fn detect(root: &Path) -> Result<TrustStore, TrustError> {
    let has = |p: &str| root.join(p.trim_start_matches('/')).exists();
    if has("/etc/pki/ca-trust/source/anchors") {
        return Ok(TrustStore {
            anchor: root.join("etc/pki/ca-trust/source/anchors/regproxy.crt"),
            update: vec!["update-ca-trust".into(), "extract".into()],
        });
    }
    // Debian, Ubuntu and Alpine share the layout and the command.
    if has("/usr/local/share/ca-certificates") || which("update-ca-certificates") {
        let mut update = vec!["update-ca-certificates".to_string()];
        if root != Path::new("/") {
            let at = |p: &str| root.join(p).display().to_string();
            update.extend([
                "--certsconf".into(),
                at("etc/ca-certificates.conf"),
                "--localcertsdir".into(),
                at("usr/local/share/ca-certificates"),
                "--etccertsdir".into(),
                at("etc/ssl/certs"),
                "--hooksdir".into(),
                at("etc/ca-certificates/update.d"),
            ]);
        }
        return Ok(TrustStore {
            anchor: root.join("usr/local/share/ca-certificates/regproxy.crt"),
            update,
        });
    }
    Err(TrustError::Unknown)
}

impl TrustStore {
    /// Copies `ca_crt` in as the anchor and rebuilds the bundle; returns what was done.
    pub fn install(&self, ca_crt: &Path) -> Result<Vec<String>, TrustError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| TrustError::Io { path, source }
        };
        if let Some(dir) = self.anchor.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::copy(ca_crt, &self.anchor).map_err(io(&self.anchor))?;
        let mut done = vec![format!(
            "copied {} to {}",
            ca_crt.display(),
            self.anchor.display()
        )];
        done.push(self.run_update()?);
        Ok(done)
    }

    /// Removes the anchor (if present) and rebuilds the bundle; returns what was done.
    pub fn uninstall(&self) -> Result<Vec<String>, TrustError> {
        let mut done = Vec::new();
        match std::fs::remove_file(&self.anchor) {
            Ok(()) => done.push(format!("removed {}", self.anchor.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                done.push(format!("{} was not installed", self.anchor.display()))
            }
            Err(source) => {
                return Err(TrustError::Io {
                    path: self.anchor.clone(),
                    source,
                })
            }
        }
        let mut update = self.update.clone();
        if update[0] == "update-ca-certificates" {
            // Without --fresh, the removed anchor's link in /etc/ssl/certs stays behind.
            update.push("--fresh".into());
        }
        done.push(run(&update)?);
        Ok(done)
    }

    fn run_update(&self) -> Result<String, TrustError> {
        run(&self.update)
    }
}

fn run(command: &[String]) -> Result<String, TrustError> {
    let line = command.join(" ");
    let out = Command::new(&command[0])
        .args(&command[1..])
        .output()
        .map_err(|e| TrustError::Update {
            command: line.clone(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(TrustError::Update {
            command: line,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(format!("ran {line}"))
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}
