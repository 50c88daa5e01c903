//! What regproxy tells people so that they know what to do next: at start, where its CA is and
//! one command that pulls through the proxy; when a client rejects an intercepted host's
//! certificate, that it does not trust the CA and how to make each kind of client trust it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use rustls::AlertDescription;

use crate::config::Config;
use crate::Shared;

/// Logs the CA's path and fingerprint, where clients download it, and a command that pulls an
/// image through the proxy listening on `proxy`: what a first start must say.
pub fn at_start(shared: &Shared, proxy: SocketAddr) {
    let ca = ca_file(&shared.config);
    let sha256 = shared.ca.fingerprint();
    if shared.ca.generated() {
        tracing::info!(ca = %ca.display(), sha256, "generated a new CA; clients must trust it");
    } else {
        tracing::info!(ca = %ca.display(), sha256, "loaded the CA; clients must trust it");
    }
    let url = ca_url(&shared.config);
    let dir = std::path::absolute(&shared.config.ca_dir).unwrap_or(shared.config.ca_dir.clone());
    tracing::info!(
        "clients download the CA from {url}; docker and containerd trust this machine's store: \
         sudo regproxy --ca-dir {} ca install",
        dir.display()
    );
    tracing::info!("to pull through regproxy, run: {}", try_it(&url, proxy));
}

/// One line a user can paste: fetch the CA, then pull an image with skopeo through the proxy.
fn try_it(ca_url: &str, proxy: SocketAddr) -> String {
    format!(
        "mkdir -p regproxy-ca && curl -fsS {ca_url} -o regproxy-ca/ca.crt && \
         HTTPS_PROXY=http://{} skopeo copy --src-cert-dir regproxy-ca \
         docker://docker.io/library/alpine:3 oci:alpine:3",
        reachable(proxy)
    )
}

/// The CA certificate's path, absolute when it can be made so.
fn ca_file(config: &Config) -> PathBuf {
    let (crt, _) = crate::ca::ca_paths(&config.ca_dir);
    std::path::absolute(&crt).unwrap_or(crt)
}

/// `http://ADMIN/ca.crt`, as a client on this machine reaches it.
fn ca_url(config: &Config) -> String {
    format!("http://{}/ca.crt", reachable(config.admin_listen))
}

/// Where a client reaches a listener bound to `addr`: loopback for an unspecified address.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// The TLS alert a client sent because it rejected the leaf certificate, in the protocol's own
/// words, if `e` (a failed handshake) is that.
pub fn distrust(e: &std::io::Error) -> Option<&'static str> {
    let alert = match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => alert,
        _ => return None,
    };
    // Go sends bad_certificate, OpenSSL and NSS unknown_ca, Java certificate_unknown.
    match alert {
        AlertDescription::BadCertificate => Some("bad_certificate"),
        AlertDescription::UnknownCA => Some("unknown_ca"),
        AlertDescription::CertificateUnknown => Some("certificate_unknown"),
        _ => None,
    }
}

/// How to make the clients that pull from `host` trust regproxy's CA, client by client.
pub fn trust_fix(config: &Config, host: &str) -> String {
    format!(
        "give it {ca} (also at {url}): skopeo and podman: --cert-dir DIR (skopeo copy: \
         --src-cert-dir DIR) with the file as DIR/ca.crt, or /etc/containers/certs.d/{host}/ca.crt; \
         docker and containerd: `regproxy --ca-dir {dir} ca install`, then restart them; \
         curl: --cacert FILE; others: \"Trusting the CA\" in regproxy's README",
        ca = ca_file(config).display(),
        url = ca_url(config),
        dir = config.ca_dir.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_address_is_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:3128".parse().unwrap();
        assert_eq!(reachable(any).to_string(), "127.0.0.1:3128");
        let any6: SocketAddr = "[::]:3129".parse().unwrap();
        assert_eq!(reachable(any6).to_string(), "[::1]:3129");
        let named: SocketAddr = "10.1.2.3:3128".parse().unwrap();
        assert_eq!(reachable(named), named);
    }

    #[test]
    fn only_certificate_alerts_mean_distrust() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let alert = |a| io(rustls::Error::AlertReceived(a));
        assert_eq!(
            distrust(&alert(AlertDescription::UnknownCA)),
            Some("unknown_ca")
        );
        assert_eq!(
            distrust(&alert(AlertDescription::BadCertificate)),
            Some("bad_certificate")
        );
        assert_eq!(distrust(&alert(AlertDescription::HandshakeFailure)), None);
        assert_eq!(distrust(&io(rustls::Error::DecryptError)), None);
        assert_eq!(distrust(&std::io::Error::other("reset")), None);
    }
}
