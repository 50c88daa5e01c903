//! A string that must never be printed: passwords, tokens. Its `Debug` and `Display` are `***`.

use std::fmt;

/// A secret value; read it only with [`Secret::expose`], where it is put on the wire.
#[derive(Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for an `Authorization` header or a token request; never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `Basic base64(user:password)`, for an `Authorization` or `Proxy-Authorization` header.
pub fn basic(user: &str, password: &Secret) -> Secret {
    use base64::Engine as _;
    let raw = format!("{user}:{}", password.expose());
    Secret::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(basic("a", &Secret::new("b")).expose(), "Basic YTpi");
    }
}
