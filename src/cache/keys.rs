//! The keys regproxy writes in cacache's index, in one place: what each names, and how the
//! `cache` commands read them back.

use super::digest::Digest;

const OBJECT: &str = "regproxy:object:";
const TAG: &str = "regproxy:tag:";
const SOURCE: &str = "regproxy:from:";
const PUBLIC: &str = "regproxy:public:";

/// A verified object: its metadata (media type, size).
pub fn object(digest: &Digest) -> String {
    format!("{OBJECT}{digest}")
}

/// The digest an object key names.
pub fn object_digest(key: &str) -> Option<&str> {
    key.strip_prefix(OBJECT)
}

/// A tag's records (one per Accept class), for `HOST/REPO:TAG`.
pub fn tag(name: &str) -> String {
    format!("{TAG}{name}")
}

/// [`tag`] of `HOST/REPO:TAG` from its parts, built with one allocation (once per tag request).
pub fn tag_of(host: &str, repo: &str, tag: &str) -> String {
    joined(TAG, host, repo, tag)
}

/// `HOST/REPO:TAG` from its parts, built with one allocation.
pub fn image_name(host: &str, repo: &str, tag: &str) -> String {
    joined("", host, repo, tag)
}

/// `PREFIXHOST/REPO:TAG`.
fn joined(prefix: &str, host: &str, repo: &str, tag: &str) -> String {
    let mut name = String::with_capacity(prefix.len() + host.len() + repo.len() + tag.len() + 2);
    for part in [prefix, host, "/", repo, ":", tag] {
        name.push_str(part);
    }
    name
}

/// The `HOST/REPO:TAG` a tag key names.
pub fn tag_name(key: &str) -> Option<&str> {
    key.strip_prefix(TAG)
}

/// The origins (`HOST/REPO`) that served an object's bytes.
pub fn sources(digest: &Digest) -> String {
    format!("{SOURCE}{digest}")
}

/// The digest a sources key names.
pub fn sources_digest(key: &str) -> Option<&str> {
    key.strip_prefix(SOURCE)
}

/// The record that `repo` on `host` serves anonymous clients.
pub fn public(host: &str, repo: &str) -> String {
    format!("{PUBLIC}{host}/{repo}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key built from its parts is the key of the joined name, and names it again.
    #[test]
    fn a_tag_key_from_parts_is_the_tag_key() {
        let key = tag_of("registry.test:5000", "library/alpine", "3.20");
        assert_eq!(key, tag("registry.test:5000/library/alpine:3.20"));
        let name = image_name("registry.test:5000", "library/alpine", "3.20");
        assert_eq!(key, tag(&name));
        assert_eq!(
            tag_name(&key),
            Some("registry.test:5000/library/alpine:3.20")
        );
    }
}
