//! Name resolution with operator overrides, refusing the proxy's own listen address and the
//! destinations that would make the proxy a springboard (loopback, link-local, ...).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::Cidr;

/// Resolves `host:port` through the override table first, then the system resolver.
#[derive(Debug, Clone)]
pub struct Resolver {
    overrides: HashMap<String, SocketAddr>,
    own: SocketAddr,
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

/// Why an address is refused by default: it reaches this machine or its link, not a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restricted {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 169.254.0.0/16 (cloud metadata lives there), fe80::/10.
    LinkLocal,
    /// 0.0.0.0/8 ("this network"; 0.0.0.0 reaches the local host), ::.
    Unspecified,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
}

impl std::fmt::Display for Restricted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Restricted::Loopback => "loopback",
            Restricted::LinkLocal => "link-local (cloud metadata lives there)",
            Restricted::Unspecified => "unspecified (reaches this host)",
            Restricted::Multicast => "multicast",
            Restricted::Broadcast => "broadcast",
        })
    }
}

/// The IPv4 address an IPv6 address stands for (mapped `::ffff:a.b.c.d`, deprecated compatible
/// `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`), or the address itself: one address, one verdict.
pub fn normalize(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let seg = v6.segments();
    let low = Ipv4Addr::from((u32::from(seg[6]) << 16) | u32::from(seg[7]));
    let high_zero = seg[..6].iter().all(|s| *s == 0);
    // `::` and `::1` share the compatible form's prefix but are IPv6's own unspecified and loopback.
    if high_zero && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST {
        return IpAddr::V4(low);
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(low);
    }
    ip
}

/// The reason `ip` (normalized first) is refused by default, or `None` for an ordinary address.
/// Private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) are ordinary: internal registries live there.
pub fn classify(ip: IpAddr) -> Option<Restricted> {
    match normalize(ip) {
        IpAddr::V4(v4) => {
            let first = v4.octets()[0];
            if first == 0 {
                Some(Restricted::Unspecified)
            } else if v4.is_loopback() {
                Some(Restricted::Loopback)
            } else if v4.is_link_local() {
                Some(Restricted::LinkLocal)
            } else if v4.is_multicast() {
                Some(Restricted::Multicast)
            } else if v4.is_broadcast() {
                Some(Restricted::Broadcast)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some(Restricted::Unspecified)
            } else if v6.is_loopback() {
                Some(Restricted::Loopback)
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some(Restricted::LinkLocal)
            } else if v6.is_multicast() {
                Some(Restricted::Multicast)
            } else {
                None
            }
        }
    }
}

impl Resolver {
    /// A resolver with the given overrides that refuses to hand out `own` (the proxy's listener)
    /// and, until [`Resolver::with_destinations`] says otherwise, the [`classify`]d addresses.
    pub fn new(overrides: &[(String, SocketAddr)], own: SocketAddr) -> Resolver {
        Resolver {
            overrides: overrides.iter().cloned().collect(),
            own,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }

    /// Adds the operator's destination policy: `deny` refuses (and wins over everything else),
    /// `allow` lifts the default refusal.
    pub fn with_destinations(mut self, allow: &[Cidr], deny: &[Cidr]) -> Resolver {
        self.allow = allow.to_vec();
        self.deny = deny.to_vec();
        self
    }

    /// All addresses for `host:port`, or an error naming why there are none.
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let addrs: Vec<SocketAddr> = if let Some(a) = self.overrides.get(&format!("{host}:{port}"))
        {
            vec![*a]
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            vec![SocketAddr::new(ip, port)]
        } else {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("DNS lookup of {host} failed: {e}")))?
                .collect()
        };
        if addrs.iter().any(|a| self.is_own(a)) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{host}:{port} is this proxy's own listen address"),
            ));
        }
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no addresses"),
            ));
        }
        // Checked on the addresses, not the name: a name that resolves to 127.0.0.1 is loopback.
        // Refused ones are dropped, so a name resolving to a mix never reaches the refused part.
        let mut refusal = None;
        let permitted: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.refusal(a) {
                None => true,
                Some(why) => {
                    refusal.get_or_insert(why);
                    false
                }
            })
            .collect();
        match refusal {
            Some(why) if permitted.is_empty() => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("destination {host}:{port} refused: {why}"),
            )),
            _ => Ok(permitted),
        }
    }

    /// Why `a` may not be reached, if it may not. An explicit deny wins over everything, also
    /// over a `--resolve` override (the more specific statement of the operator's intent); an
    /// allow or an override target lifts the default refusal.
    fn refusal(&self, a: &SocketAddr) -> Option<String> {
        let ip = normalize(a.ip());
        if let Some(net) = self.deny.iter().find(|n| n.contains(ip)) {
            return Some(format!("{ip} is in deny_destination {net}"));
        }
        let named = self
            .overrides
            .values()
            .any(|o| normalize(o.ip()) == ip && o.port() == a.port());
        if named || self.allow.iter().any(|n| n.contains(ip)) {
            return None;
        }
        classify(ip).map(|why| {
            format!("{ip} is {why}; allow it with --allow-destination if it is meant to be reached")
        })
    }

    fn is_own(&self, a: &SocketAddr) -> bool {
        if a.port() != self.own.port() {
            return false;
        }
        let (own, ip) = (normalize(self.own.ip()), normalize(a.ip()));
        // Connecting to an unspecified address reaches the local host; a listener on an
        // unspecified address is reached through loopback.
        let unspecified = classify(ip) == Some(Restricted::Unspecified);
        ip == own
            || (unspecified && (own.is_loopback() || own.is_unspecified()))
            || (own.is_unspecified() && ip.is_loopback())
    }
}

/// Connects to the first reachable address of `host:port` within `timeout`.
pub async fn connect(
    resolver: &Resolver,
    host: &str,
    port: u16,
    timeout: std::time::Duration,
) -> io::Result<tokio::net::TcpStream> {
    let attempt = async {
        let mut last = None;
        for addr in resolver.resolve(host, port).await? {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => {
                    last = Some(io::Error::new(
                        e.kind(),
                        format!("connect to {host}:{port} ({addr}): {e}"),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no address")))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {host}:{port} timed out after {timeout:?}"),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classify_refuses_local_and_link_destinations_after_normalizing() {
        use Restricted::*;
        for (addr, want) in [
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.9", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::127.0.0.1", Some(Loopback)),
            ("64:ff9b::7f00:1", Some(Loopback)),
            ("169.254.169.254", Some(LinkLocal)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("::ffff:0.0.0.0", Some(Unspecified)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            // Ordinary: public, and private ranges where internal registries live.
            ("10.1.2.3", None),
            ("172.16.0.1", None),
            ("192.168.1.1", None),
            ("fd00::1", None),
            ("8.8.8.8", None),
            ("2001:db8::1", None),
            ("fec0::1", None),
            ("::ffff:8.8.8.8", None),
        ] {
            assert_eq!(classify(ip(addr)), want, "{addr}");
        }
    }

    #[test]
    fn normalize_maps_ipv4_in_ipv6_only() {
        assert_eq!(normalize(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(normalize(ip("::1")), ip("::1"));
        assert_eq!(normalize(ip("::")), ip("::"));
        assert_eq!(normalize(ip("2001:db8::1")), ip("2001:db8::1"));
    }

    fn own() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 3128))
    }

    async fn verdict(r: &Resolver, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let answer = r.resolve(host, port).await;
        if let Err(e) = &answer {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        }
        answer
    }

    #[tokio::test]
    async fn policy_deny_over_allow_and_override_over_default() {
        let cidr = |s: &str| Cidr::parse(s).unwrap();
        let target = SocketAddr::from(([127, 0, 0, 1], 5000));
        let plain = Resolver::new(&[("registry.test:5000".into(), target)], own());
        // A --resolve override is the operator's permission for that destination.
        assert_eq!(
            verdict(&plain, "registry.test", 5000).await.unwrap(),
            vec![target]
        );
        assert!(verdict(&plain, "127.0.0.1", 5000).await.is_ok());
        let e = verdict(&plain, "127.0.0.1", 5001)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("loopback") && e.contains("--allow-destination"),
            "{e}"
        );
        let e = verdict(&plain, "[::ffff:169.254.169.254]", 80)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("169.254.169.254 is link-local"), "{e}");
        assert!(verdict(&plain, "10.0.0.1", 443).await.is_ok());

        let allowed = plain.clone().with_destinations(&[cidr("127.0.0.0/8")], &[]);
        assert!(verdict(&allowed, "127.0.0.2", 5001).await.is_ok());
        // The own listen address stays refused whatever is allowed, in every spelling.
        for host in [
            "127.0.0.1",
            "0.0.0.0",
            "[::ffff:127.0.0.1]",
            "[::ffff:0.0.0.0]",
        ] {
            let e = verdict(&allowed, host, 3128).await.unwrap_err().to_string();
            assert!(e.contains("own listen address"), "{host}: {e}");
        }

        let denied = Resolver::new(&[("registry.test:5000".into(), target)], own())
            .with_destinations(
                &[cidr("127.0.0.0/8")],
                &[cidr("10.0.0.0/8"), cidr("127.0.0.1")],
            );
        let e = verdict(&denied, "10.9.9.9", 443)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("deny_destination 10.0.0.0/8"), "{e}");
        // Deny wins over allow and over a --resolve override.
        assert!(verdict(&denied, "registry.test", 5000).await.is_err());
        assert!(verdict(&denied, "127.0.0.2", 5000).await.is_ok());
    }
}
