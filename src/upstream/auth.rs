//! Registry authentication as the distribution token spec describes it: parsing
//! `WWW-Authenticate` challenges and fetching a bearer token from the realm.

use std::collections::BTreeMap;

use http::{header, Request, Uri};
use http_body_util::{BodyExt, Limited};

use super::{Upstream, UpstreamError};
use crate::body;

/// A parsed `WWW-Authenticate` challenge: its scheme and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic`, lower-case.
    pub scheme: String,
    /// `realm`, `service`, `scope`, … (names lower-case).
    pub params: BTreeMap<String, String>,
}

/// What is malformed in a `WWW-Authenticate` challenge (it quotes the header: a challenge holds
/// no secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    /// The scheme is missing or not a token.
    #[error("WWW-Authenticate has no valid scheme: {0:?}")]
    Scheme(String),
    /// A parameter without `=`.
    #[error("WWW-Authenticate parameter without '=': {0:?}")]
    NoEquals(String),
    /// A quoted value that never ends.
    #[error("WWW-Authenticate has an unterminated quote: {0:?}")]
    Unterminated(String),
}

/// Parses `Bearer realm="…",service="…",scope="…"` (or `Basic realm="…"`); the error names
/// what is malformed.
pub fn parse_challenge(value: &str) -> Result<Challenge, ChallengeError> {
    let value = value.trim();
    let (scheme, mut rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ChallengeError::Scheme(value.to_owned()));
    }
    let mut params = BTreeMap::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if rest.is_empty() {
            break;
        }
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| ChallengeError::NoEquals(rest.to_owned()))?;
        let (val, after) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted
                .find('"')
                .ok_or_else(|| ChallengeError::Unterminated(value.to_owned()))?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            after.split_once(',').unwrap_or((after, ""))
        };
        params.insert(name.trim().to_ascii_lowercase(), val.trim().to_owned());
        rest = after;
    }
    Ok(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// A bearer token and how long it is valid.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token itself.
    pub value: crate::secret::Secret,
    /// Seconds it is valid (the spec's default is 60 when the server says nothing).
    pub expires_in: u64,
}

/// Fetches a token for `scope` from a bearer challenge's realm; `basic` is an
/// `Authorization: Basic …` value when credentials are known, else the token is anonymous.
pub async fn fetch_token(
    upstream: &Upstream,
    challenge: &Challenge,
    scope: &str,
    basic: Option<&str>,
) -> Result<Token, UpstreamError> {
    let bad = |why: String| UpstreamError::Auth(why);
    let realm = challenge
        .params
        .get("realm")
        .ok_or_else(|| bad("bearer challenge without realm".into()))?;
    let sep = if realm.contains('?') { '&' } else { '?' };
    let mut url = format!("{realm}{sep}scope={}", encode(scope));
    if let Some(service) = challenge.params.get("service") {
        url.push_str(&format!("&service={}", encode(service)));
    }
    let uri: Uri = url
        .parse()
        .map_err(|e| bad(format!("token realm {realm:?} is not a URL: {e}")))?;
    if basic.is_some() && uri.scheme_str() != Some("https") {
        return Err(bad(format!(
            "refusing to send credentials to a non-https token realm {realm:?}"
        )));
    }
    let mut req = Request::get(uri)
        .body(body::empty())
        .map_err(|e| bad(e.to_string()))?;
    if let Some(b) = basic {
        let value = b
            .parse()
            .map_err(|_| bad("credentials are not header text".into()))?;
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let resp = upstream.send(req).await?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| bad(format!("token endpoint body: {e}")))?
        .to_bytes();
    if !status.is_success() {
        return Err(bad(format!("token endpoint answered {status}")));
    }
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| bad("token endpoint answered something that is not JSON".into()))?;
    let value = json
        .get("token")
        .or_else(|| json.get("access_token"))
        .and_then(|t| t.as_str())
        .ok_or_else(|| bad("token endpoint answer has no token".into()))?;
    let expires_in = json
        .get("expires_in")
        .and_then(|e| e.as_u64())
        .unwrap_or(60);
    Ok(Token {
        value: crate::secret::Secret::new(value),
        expires_in,
    })
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["scope"], "repository:library/alpine:pull");
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#).unwrap().scheme,
            "basic"
        );
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_err());
        assert!(parse_challenge(r#"Bearer realm"#).is_err());
        assert_eq!(encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }

    use proptest::prelude::*;

    /// A parameter value as a server would send it: quoted (any text but a quote or backslash,
    /// separators included) or a bare token.
    #[derive(Debug, Clone)]
    enum Value {
        Quoted(String),
        Token(String),
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            // Leading and trailing blanks are trimmed by the parser, so they are not generated.
            "([^\"\\\\\\s]([^\"\\\\]{0,30}[^\"\\\\\\s])?)?".prop_map(Value::Quoted),
            "[A-Za-z0-9!#$%&'*+.^_`|~/:-]{1,20}".prop_map(Value::Token),
        ]
    }

    fn params() -> impl Strategy<Value = Vec<(String, Value)>> {
        prop::collection::btree_map("[a-z][a-z0-9_]{0,8}", value(), 0..5)
            .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Never panics; what it accepts has a lower-case token scheme and lower-case names.
        #[test]
        fn any_value_parses_or_fails_cleanly(
            v in prop_oneof![
                any::<String>(),
                "[A-Za-z]{0,6}[ ,]{0,2}([a-z]{0,3}=?\"?[a-z,= ]{0,4}\"?[ ,]{0,2}){0,4}",
            ],
        ) {
            if let Ok(c) = parse_challenge(&v) {
                prop_assert!(!c.scheme.is_empty());
                prop_assert!(c.scheme.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-'));
                for name in c.params.keys() {
                    prop_assert_eq!(name.clone(), name.to_ascii_lowercase());
                }
            }
        }

        #[test]
        fn built_challenges_parse_back(
            scheme in "[A-Za-z][A-Za-z0-9-]{0,10}",
            params in params(),
            sep in prop::sample::select(vec![",", ", ", " ,", ",,"]),
            upper in any::<bool>(),
        ) {
            let rendered: Vec<String> = params
                .iter()
                .map(|(name, v)| {
                    let name = if upper { name.to_ascii_uppercase() } else { name.clone() };
                    match v {
                        Value::Quoted(q) => format!("{name}=\"{q}\""),
                        Value::Token(t) => format!("{name}={t}"),
                    }
                })
                .collect();
            let header = format!("{scheme} {}", rendered.join(sep));
            let c = parse_challenge(&header).unwrap();
            prop_assert_eq!(c.scheme, scheme.to_ascii_lowercase());
            let want: BTreeMap<String, String> = params
                .into_iter()
                .map(|(n, v)| match v {
                    Value::Quoted(q) => (n, q),
                    Value::Token(t) => (n, t),
                })
                .collect();
            prop_assert_eq!(c.params, want, "{}", header);
        }

        #[test]
        fn an_unterminated_quote_is_an_error(scheme in "[A-Za-z]{1,8}", name in "[a-z]{1,8}", v in "[^\"]{0,20}") {
            let header = format!("{scheme} {name}=\"{v}");
            prop_assert!(parse_challenge(&header).is_err(), "{}", header);
        }
    }
}
