//! Test CAs and certificates (ECDSA P-256, PEM), the cert dirs clients take, and the TLS
//! configuration of test servers.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::*;

/// Writes a test CA (`ca.crt`, `ca.key`) and a server certificate signed by it (`server.crt`,
/// `server.key`) for `names` (DNS names or IP addresses) into `dir`. All PEM; ECDSA P-256.
pub fn make_test_certs(dir: &Path, ca_name: &str, names: &[&str]) {
    fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = cert_params(ca_name, &[]);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    write_cert(dir, "ca", &ca.self_signed(&ca_key).unwrap(), &ca_key);
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut server = cert_params(names[0], names);
    server.is_ca = IsCa::NoCa;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    write_cert(dir, "server", &server_cert, &server_key);
}

/// A self-signed certificate for signing (`STEM.crt`, `STEM.key` in `dir`), with common name
/// `cn` and no names: a token signer.
pub(super) fn make_signing_cert(dir: &Path, stem: &str, cn: &str) -> (KeyPair, Certificate) {
    let key = KeyPair::generate().unwrap();
    let mut params = cert_params(cn, &[]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).unwrap();
    write_cert(dir, stem, &cert, &key);
    (key, cert)
}

/// Parameters for a certificate with common name `cn` and subject alternative names `names`,
/// valid from a day ago for 30 days.
fn cert_params(cn: &str, names: &[&str]) -> CertificateParams {
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(30);
    params
}

/// `STEM.crt` (readable by all) and `STEM.key` (by the owner only) in `dir`.
fn write_cert(dir: &Path, stem: &str, cert: &Certificate, key: &KeyPair) {
    write_file(
        &dir.join(format!("{stem}.crt")),
        cert.pem().as_bytes(),
        0o644,
    );
    write_file(
        &dir.join(format!("{stem}.key")),
        key.serialize_pem().as_bytes(),
        0o600,
    );
}

/// Makes `dir` a directory that holds only `ca.crt`, a copy of `ca_pem` (what skopeo's and
/// podman's `--cert-dir` options want).
pub(super) fn make_cert_dir(dir: &Path, ca_pem: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::copy(ca_pem, dir.join("ca.crt"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", ca_pem.display()));
}

/// A TLS server configuration with the `server.crt` and `server.key` that [`make_test_certs`]
/// wrote to `dir`, and no ALPN.
pub(super) fn server_tls_config(dir: &Path) -> rustls::ServerConfig {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap()
}
