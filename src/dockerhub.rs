//! Docker Hub's several names, in one place: clients and credential stores say `docker.io` (or
//! `index.docker.io`, `registry.hub.docker.com`), its registry API lives on
//! `registry-1.docker.io`, and its official images live under `library/`.

/// The name clients, containerd and credential stores use.
pub const NAME: &str = "docker.io";
/// Where the registry API is.
pub const API_HOST: &str = "registry-1.docker.io";

/// Whether `host` (lower-case, without a port) is one of Docker Hub's names.
pub fn is_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com"
    )
}

/// The host whose API serves `host`: [`API_HOST`] for Docker Hub's names, else `host` itself.
pub fn api_host(host: &str) -> &str {
    if is_hub(host) {
        API_HOST
    } else {
        host
    }
}

/// `alpine` → `library/alpine`: official images have a one-part name that clients may leave
/// unqualified.
pub fn qualified(repo: &str) -> String {
    if repo.contains('/') {
        repo.to_owned()
    } else {
        format!("library/{repo}")
    }
}
