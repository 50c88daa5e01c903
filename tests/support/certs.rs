//! Test CAs and server certificates, and the cert dirs clients take.

use std::fs;
use std::path::Path;

use super::*;

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

/// Makes `dir` a directory that holds only `ca.crt`, a copy of `ca_pem` (what skopeo's and
/// podman's `--cert-dir` options want).
pub(super) fn make_cert_dir(dir: &Path, ca_pem: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::copy(ca_pem, dir.join("ca.crt"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", ca_pem.display()));
}
