# regproxy container image: a multi-stage build, small non-root runtime.
#
#   docker build -t regproxy .
#   docker run -d --name regproxy -p 127.0.0.1:3128:3128 -p 127.0.0.1:3129:3129 \
#       -v regproxy-ca:/var/lib/regproxy -v regproxy-cache:/var/cache/regproxy \
#       --stop-timeout 45 regproxy
#   curl -fsS http://127.0.0.1:3129/ca.crt -o regproxy-ca.crt    # the CA clients must trust
#
# Stop with more time than --shutdown-grace (30s): `docker stop -t 45`, or `--stop-timeout 45`
# at run time, or `stop_grace_period: 45s` in compose (Docker's default is 10s).

# --- build -----------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies first, against an empty crate: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

COPY src ./src
# COPY keeps the context's modification times, which may be older than the empty crate's build:
# touch the sources so cargo rebuilds regproxy itself.
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked \
    && install -m 0755 target/release/regproxy /usr/local/bin/regproxy

# --- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: the system roots that upstream registries are verified against.
# curl: the HEALTHCHECK below. Unpinned on purpose: bookworm's security updates move versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

# A fixed, non-root UID/GID (10001) so that volumes and runAsNonRoot policies can rely on it.
# /var/lib/regproxy/ca holds the CA (ca.key must stay 0600); /var/cache/regproxy the cache.
RUN groupadd --system --gid 10001 regproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/regproxy --shell /usr/sbin/nologin regproxy \
    && mkdir -p /var/lib/regproxy/ca /var/cache/regproxy \
    && chown -R 10001:10001 /var/lib/regproxy /var/cache/regproxy \
    && chmod 0700 /var/lib/regproxy /var/lib/regproxy/ca /var/cache/regproxy

COPY --from=build /usr/local/bin/regproxy /usr/local/bin/regproxy

# Inside a container regproxy listens on all of the container's interfaces, and a listener
# beyond loopback must name its clients: by default loopback and the private ranges that
# container networks use (published ports arrive from the bridge's gateway). Narrow it with
# -e REGPROXY_ALLOW_CIDR=… or add -e REGPROXY_PROXY_CREDENTIALS_FILE=…; never publish 3128 to
# an untrusted network.
ENV REGPROXY_LISTEN=0.0.0.0:3128 \
    REGPROXY_ALLOW_CIDR=127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16 \
    REGPROXY_ADMIN_LISTEN=0.0.0.0:3129 \
    REGPROXY_CA_DIR=/var/lib/regproxy/ca \
    REGPROXY_CACHE_DIR=/var/cache/regproxy

# The CA must outlive the container (clients trust it); the cache is worth keeping.
VOLUME ["/var/lib/regproxy", "/var/cache/regproxy"]

# 3128: the proxy (HTTPS_PROXY=http://HOST:3128); 3129: /healthz, /readyz, /metrics, /ca.crt.
EXPOSE 3128 3129

USER 10001:10001

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:3129/healthz"]

# SIGTERM drains in-flight transfers for --shutdown-grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["regproxy"]
CMD ["run"]
