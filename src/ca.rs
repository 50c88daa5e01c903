//! The certificate authority: loads or creates the CA, issues a leaf per SNI host on demand and
//! caches the resulting TLS server configuration in memory (a bounded LRU).

use std::fs;
use std::io::Write;
use std::num::NonZeroUsize;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// How long an issued leaf is valid; short, because it is re-issued on demand anyway.
const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// A cached leaf is replaced this long before it expires.
const LEAF_REFRESH_MARGIN: Duration = Duration::from_secs(3600);
/// Leaves start this far in the past so clients with a skewed clock accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// Leaves kept in memory; the least recently used goes first. A leaf is issued only for a host a
/// client CONNECTed to and that is intercepted, so this bounds memory, not correctness.
pub const LEAF_CACHE_CAPACITY: usize = 1000;
/// The subject common name of a generated CA.
pub const CA_COMMON_NAME: &str = "regproxy local CA";

/// Failures loading, creating or using the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Filesystem problem with a CA file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The key file is readable by group or others.
    #[error(
        "CA key {path} has mode {mode:o}, readable by group or others; \
         fix it with `chmod 600 {path}` (or move it away so that a new CA is generated)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    /// Only one of the certificate and the key exists.
    #[error("{present} exists but {missing} does not; provide both, or remove {present} to generate a new CA")]
    Incomplete { present: PathBuf, missing: PathBuf },
    /// A CA file does not parse.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// Certificate generation or signing failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused a generated certificate.
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// Paths of the CA certificate and key inside a CA directory.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.crt"), dir.join("ca.key"))
}

struct CachedLeaf {
    config: Arc<ServerConfig>,
    refresh_at: SystemTime,
}

/// The loaded CA plus the in-memory leaf cache.
pub struct CertAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    // One key for every leaf: issuing a leaf is then one signature, not a key generation.
    leaf_key: KeyPair,
    leaf_key_der: Vec<u8>,
    leaves: Mutex<lru::LruCache<String, CachedLeaf>>,
    issued: AtomicU64,
    generated: bool,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Loads the CA from `dir`, generating and writing a new one if neither file exists.
    pub fn load_or_create(dir: &Path) -> Result<CertAuthority, CaError> {
        if let Some(ca) = Self::existing(dir)? {
            return Ok(ca);
        }
        create(dir)?;
        let (crt, key) = ca_paths(dir);
        let mut ca = Self::load(&crt, &key)?;
        ca.generated = true;
        Ok(ca)
    }

    /// Loads the CA in `dir` if it has one; `None` when neither file exists (one would be
    /// generated). Refuses what [`CertAuthority::load_or_create`] refuses, creating nothing.
    pub fn existing(dir: &Path) -> Result<Option<CertAuthority>, CaError> {
        let (crt, key) = ca_paths(dir);
        match (crt.exists(), key.exists()) {
            (true, true) => Self::load(&crt, &key).map(Some),
            (false, false) => Ok(None),
            (true, false) => Err(CaError::Incomplete {
                present: crt,
                missing: key,
            }),
            (false, true) => Err(CaError::Incomplete {
                present: key,
                missing: crt,
            }),
        }
    }

    /// Loads an existing CA; refuses a key file that group or others can read.
    pub fn load(crt: &Path, key: &Path) -> Result<CertAuthority, CaError> {
        let io = io_at;
        let mode = fs::metadata(key).map_err(io(key))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::KeyPermissions {
                path: key.to_owned(),
                mode,
            });
        }
        let cert_pem = fs::read_to_string(crt).map_err(io(crt))?;
        let key_pem = fs::read_to_string(key).map_err(io(key))?;
        let bad = |path: &Path| {
            let path = path.to_owned();
            move |e: rcgen::Error| CaError::Invalid {
                path,
                reason: e.to_string(),
            }
        };
        let ca_key = KeyPair::from_pem(&key_pem).map_err(bad(key))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, ca_key).map_err(bad(crt))?;
        let cert_der = first_cert_der(&cert_pem).ok_or_else(|| CaError::Invalid {
            path: crt.to_owned(),
            reason: "no PEM CERTIFICATE block".into(),
        })?;
        let leaf_key = KeyPair::generate()?;
        let leaf_key_der = leaf_key.serialize_der();
        Ok(CertAuthority {
            cert_pem,
            cert_der,
            issuer,
            leaf_key,
            leaf_key_der,
            leaves: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(LEAF_CACHE_CAPACITY).unwrap_or(NonZeroUsize::MIN),
            )),
            issued: AtomicU64::new(0),
            generated: false,
        })
    }

    /// Whether this CA was generated by [`CertAuthority::load_or_create`] just now.
    pub fn generated(&self) -> bool {
        self.generated
    }

    /// The SHA-256 fingerprint of the CA certificate, colon-separated hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Number of leaves issued since start.
    pub fn leaves_issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Number of leaves held in the in-memory cache (at most [`LEAF_CACHE_CAPACITY`]).
    pub fn leaves_cached(&self) -> usize {
        self.leaves.lock().len()
    }

    /// The TLS server config presenting a leaf for `host`, issued once and cached until near expiry.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let now = SystemTime::now();
        // The lock is held while issuing so that concurrent handshakes for one host issue once;
        // issuing is a single ECDSA signature, so other hosts wait well under a millisecond.
        let mut leaves = self.leaves.lock();
        if let Some(leaf) = leaves.get(&host) {
            if leaf.refresh_at > now {
                return Ok(leaf.config.clone());
            }
        }
        let config = Arc::new(self.issue(&host, now)?);
        let refresh_at = now + LEAF_VALIDITY - LEAF_REFRESH_MARGIN;
        leaves.put(
            host,
            CachedLeaf {
                config: config.clone(),
                refresh_at,
            },
        );
        Ok(config)
    }

    fn issue(&self, host: &str, now: SystemTime) -> Result<ServerConfig, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match host.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into()?),
        }];
        params.not_before = OffsetDateTime::from(now - CLOCK_SKEW);
        params.not_after = OffsetDateTime::from(now + LEAF_VALIDITY);
        params.serial_number = Some(self.serial(host, now));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&self.leaf_key, &self.issuer)?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        let chain = vec![leaf.der().clone(), self.cert_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key_der.clone()));
        let mut config = ServerConfig::builder_with_provider(crate::tls_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// A serial number unique per issuance (host, time and a counter, hashed; positive, 16 bytes).
    fn serial(&self, host: &str, now: SystemTime) -> SerialNumber {
        let mut h = Sha256::new();
        h.update(host.as_bytes());
        h.update(format!("{now:?}{}", self.issued.load(Ordering::Relaxed)).as_bytes());
        let mut bytes = h.finalize()[..16].to_vec();
        bytes[0] &= 0x7f;
        SerialNumber::from_slice(&bytes)
    }
}

/// Maps an I/O error to one naming `path`.
fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_owned();
    move |source| CaError::Io { path, source }
}

fn first_cert_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()
}

/// Generates a new CA (P-256, ten years) into `dir`, key mode 0600. Fails if either file exists.
pub fn create(dir: &Path) -> Result<(), CaError> {
    let (crt, key) = ca_paths(dir);
    let io = io_at;
    fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "regproxy");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&ca_key)?;
    write_new(&key, ca_key.serialize_pem().as_bytes(), 0o600).map_err(io(&key))?;
    write_new(&crt, cert.pem().as_bytes(), 0o644).map_err(io(&crt))?;
    Ok(())
}

/// Writes a file that must not exist yet, with `mode` from the first byte on.
fn write_new(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// A TLS acceptor presenting an operator's certificate chain and key (PEM): the mirror listener.
pub fn acceptor_from_files(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, CaError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |path: &Path| {
        let path = path.to_owned();
        move |e: rustls::pki_types::pem::Error| CaError::Invalid {
            path,
            reason: e.to_string(),
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(bad(cert))?
        .collect::<Result<_, _>>()
        .map_err(bad(cert))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(bad(key))?;
    let mut config = ServerConfig::builder_with_provider(crate::tls_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// What `regproxy ca show` prints about a CA certificate.
#[derive(Debug)]
pub struct CaInfo {
    /// Subject distinguished name.
    pub subject: String,
    /// SHA-256 fingerprint of the DER certificate, colon-separated hex.
    pub sha256: String,
    /// Not-after time, RFC 3339.
    pub not_after: String,
}

/// The SHA-256 fingerprint of a DER certificate, colon-separated upper-case hex (as
/// `openssl x509 -fingerprint -sha256` prints it).
fn fingerprint(der: &CertificateDer<'_>) -> String {
    Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Describes the CA certificate at `crt`.
pub fn describe(crt: &Path) -> Result<CaInfo, CaError> {
    let pem = fs::read_to_string(crt).map_err(io_at(crt))?;
    let invalid = |reason: String| CaError::Invalid {
        path: crt.to_owned(),
        reason,
    };
    let der = first_cert_der(&pem).ok_or_else(|| invalid("no PEM CERTIFICATE block".into()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| invalid(e.to_string()))?;
    let sha256 = fingerprint(&der);
    let not_after = cert
        .validity()
        .not_after
        .to_datetime()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| cert.validity().not_after.to_string());
    Ok(CaInfo {
        subject: cert.subject().to_string(),
        sha256,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_cache_stays_at_its_capacity_and_keeps_recent_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::load_or_create(dir.path()).unwrap();
        let first = ca.server_config("h0.registry.test").unwrap();
        let n = LEAF_CACHE_CAPACITY * 2 + 100;
        for i in 1..n {
            ca.server_config(&format!("h{i}.registry.test")).unwrap();
            // Keep one host in use: it must survive the churn.
            if i % 100 == 0 {
                ca.server_config("h0.registry.test").unwrap();
            }
            assert!(ca.leaves_cached() <= LEAF_CACHE_CAPACITY);
        }
        assert_eq!(ca.leaves_cached(), LEAF_CACHE_CAPACITY);
        assert_eq!(ca.leaves_issued(), n as u64);
        let again = ca.server_config("h0.registry.test").unwrap();
        assert!(Arc::ptr_eq(&first, &again), "a recently used leaf is kept");
        // An evicted one is issued anew.
        ca.server_config("h1.registry.test").unwrap();
        assert_eq!(ca.leaves_issued(), n as u64 + 1);
    }
}
