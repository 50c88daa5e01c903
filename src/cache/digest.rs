//! OCI content digests (`sha256:<hex>`, `sha512:<hex>`): parsing, hashing and the matching
//! cacache integrity, so that a cached file's address is the digest itself.

use std::fmt;

use cacache::{Algorithm, Integrity};
use sha2::Digest as _;

/// A validated digest: a supported algorithm and lower-case hex of the right length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest {
    alg: Alg,
    hex: String,
}

/// The digest algorithms the OCI spec registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    /// SHA-256, what every registry uses.
    Sha256,
    /// SHA-512.
    Sha512,
}

/// What is wrong with a digest; the message is fit for a 400 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// No `alg:` before the hex.
    #[error("digest {0:?} has no algorithm")]
    NoAlgorithm(String),
    /// An algorithm the OCI spec does not register.
    #[error("digest algorithm {0:?} is not supported (use sha256 or sha512)")]
    Algorithm(String),
    /// Hex of the wrong length or case.
    #[error("digest {digest:?}: expected {want} lower-case hex characters after {}:", alg.name())]
    Hex {
        /// The whole digest as given.
        digest: String,
        /// Its algorithm.
        alg: Alg,
        /// How many hex characters that algorithm has.
        want: usize,
    },
}

impl Digest {
    /// Parses `alg:hex`; the error says what is wrong, for a 400 body.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::NoAlgorithm(s.to_owned()))?;
        let (alg, want) = match alg {
            "sha256" => (Alg::Sha256, 64),
            "sha512" => (Alg::Sha512, 128),
            _ => return Err(DigestError::Algorithm(alg.to_owned())),
        };
        let lower_hex = hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if hex.len() != want || !lower_hex {
            return Err(DigestError::Hex {
                digest: s.to_owned(),
                alg,
                want,
            });
        }
        Ok(Digest {
            alg,
            hex: hex.to_owned(),
        })
    }

    /// The digest of `data` with SHA-256.
    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest {
            alg: Alg::Sha256,
            hex: hex::encode(sha2::Sha256::digest(data)),
        }
    }

    /// The algorithm.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// A streaming hasher for this digest's algorithm.
    pub fn hasher(&self) -> Hasher {
        match self.alg {
            Alg::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Alg::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// The cacache integrity with the same hash, which makes cacache's content path the digest.
    pub fn integrity(&self) -> Integrity {
        let alg = match self.alg {
            Alg::Sha256 => Algorithm::Sha256,
            Alg::Sha512 => Algorithm::Sha512,
        };
        // `parse` validated the hex, so from_hex cannot fail; the fallback only keeps this total.
        Integrity::from_hex(&self.hex, alg).unwrap_or_else(|_| Integrity::from(self.to_string()))
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Digest, DigestError> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

impl Alg {
    /// The algorithm's name in digests and in cacache's content path.
    pub fn name(self) -> &'static str {
        match self {
            Alg::Sha256 => "sha256",
            Alg::Sha512 => "sha512",
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Pieces rather than `write!`: digests are formatted into headers of every answer.
        f.write_str(self.alg.name())?;
        f.write_str(":")?;
        f.write_str(&self.hex)
    }
}

/// A running hash of bytes as they stream past.
pub enum Hasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// Whether what was fed hashes to `digest`.
    pub fn matches(self, digest: &Digest) -> bool {
        let hex = match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        };
        hex == digest.hex
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(d.to_string(), format!("sha256:{}", "a".repeat(64)));
        assert!(Digest::parse("md5:abc").is_err());
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse(&format!("sha512:{}", "0".repeat(128))).is_ok());
    }

    #[test]
    fn hasher_matches_and_integrity_is_the_same_hash() {
        let d = Digest::sha256_of(b"hello");
        let mut h = d.hasher();
        h.update(b"hel");
        h.update(b"lo");
        assert!(h.matches(&d));
        assert_eq!(d.integrity(), Integrity::from(b"hello"));
    }

    use proptest::prelude::*;

    /// A well-formed digest: a supported algorithm and lower-case hex of its length.
    fn valid_digest() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}")),
            "[0-9a-f]{128}".prop_map(|h| format!("sha512:{h}")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn parse_is_total_and_ok_only_for_what_display_gives_back(s in any::<String>()) {
            if let Ok(d) = Digest::parse(&s) {
                prop_assert_eq!(d.to_string(), s);
            }
        }

        #[test]
        fn near_misses_never_panic_and_are_exact(
            alg in "sha256|sha512|SHA256|md5|sha256 |",
            hex in "[0-9a-fA-F:g é]{0,130}",
        ) {
            let s = format!("{alg}:{hex}");
            let want = match alg.as_str() {
                "sha256" => 64,
                "sha512" => 128,
                _ => usize::MAX,
            };
            let ok = hex.len() == want && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            prop_assert_eq!(Digest::parse(&s).is_ok(), ok, "{:?}", s);
        }

        #[test]
        fn valid_digests_round_trip(s in valid_digest()) {
            let d = Digest::parse(&s).unwrap();
            prop_assert_eq!(d.to_string(), s.clone());
            prop_assert_eq!(format!("{}:{}", d.alg().name(), d.hex()), s.clone());
            let json = serde_json::to_string(&d).unwrap();
            prop_assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d.clone());
            // The cacache address is the same hash, whatever the algorithm.
            prop_assert_eq!(d.integrity().to_hex().1, d.hex().to_owned());
        }

        #[test]
        fn one_changed_character_is_rejected(s in valid_digest(), at in any::<prop::sample::Index>(), c in "[g-zA-F:/. ]") {
            let (prefix, hex) = s.split_once(':').unwrap();
            let i = at.index(hex.len());
            let broken = format!("{prefix}:{}{c}{}", &hex[..i], &hex[i + 1..]);
            prop_assert!(Digest::parse(&broken).is_err(), "{:?}", broken);
            let shorter = format!("{prefix}:{}", &hex[1..]);
            prop_assert!(Digest::parse(&shorter).is_err());
            let longer = format!("{s}0");
            prop_assert!(Digest::parse(&longer).is_err());
        }
    }
}
