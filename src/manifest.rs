//! What a manifest or an index refers to, read with oci-spec's types: the manifests an index
//! lists (with their platforms), and the config and layers a manifest needs. Docker's manifest
//! lists and schema 2 manifests have the same shape and read the same way.

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

/// One object a manifest or an index refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref {
    /// Its digest, `sha256:…`.
    pub digest: String,
    /// Its size as the referrer says.
    pub size: u64,
    /// For an index's entries: `os/architecture[/variant]`.
    pub platform: Option<Platform>,
}

/// A platform as an index names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `v8`, when given.
    pub variant: Option<String>,
}

/// What an object refers to, if it is a manifest or an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refs {
    /// An index (or a Docker manifest list): one manifest per platform.
    Index(Vec<Ref>),
    /// A manifest: its config, then its layers.
    Manifest(Vec<Ref>),
}

impl Refs {
    /// Reads `data` as an index or a manifest; `None` for anything else (a layer, say).
    pub fn of(data: &[u8]) -> Option<Refs> {
        // An index has `manifests` and a manifest `layers`: each parse fails on the other.
        if let Ok(index) = serde_json::from_slice::<ImageIndex>(data) {
            return Some(Refs::Index(index.manifests().iter().map(to_ref).collect()));
        }
        let manifest = serde_json::from_slice::<ImageManifest>(data).ok()?;
        let blobs = std::iter::once(manifest.config()).chain(manifest.layers());
        Some(Refs::Manifest(blobs.map(to_ref).collect()))
    }

    /// Every object referred to, whatever the kind.
    pub fn all(&self) -> &[Ref] {
        match self {
            Refs::Index(r) | Refs::Manifest(r) => r,
        }
    }
}

fn to_ref(d: &Descriptor) -> Ref {
    Ref {
        digest: d.digest().to_string(),
        size: d.size(),
        platform: d.platform().as_ref().map(|p| Platform {
            os: p.os().to_string(),
            architecture: p.architecture().to_string(),
            variant: p.variant().clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn reads_indexes_docker_lists_and_manifests() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests":[{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"{D1}","size":7,
            "platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}]}}"#
        );
        let Some(Refs::Index(entries)) = Refs::of(index.as_bytes()) else {
            panic!("not read as an index");
        };
        assert_eq!(entries[0].digest, D1);
        let platform = entries[0].platform.clone().unwrap();
        assert_eq!(
            (platform.os.as_str(), platform.architecture.as_str()),
            ("linux", "arm64")
        );
        assert_eq!(platform.variant.as_deref(), Some("v8"));
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":3}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D2}","size":9}}]}}"#
        );
        let refs = Refs::of(manifest.as_bytes()).unwrap();
        assert!(matches!(refs, Refs::Manifest(_)));
        let digests: Vec<&str> = refs.all().iter().map(|r| r.digest.as_str()).collect();
        assert_eq!(digests, [D1, D2]);
        assert_eq!(Refs::of(b"\x1f\x8b not json"), None);
        assert_eq!(Refs::of(br#"{"layers":"not a list"}"#), None);
    }
}
