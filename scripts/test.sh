#!/usr/bin/env bash
# Runs every test: installs what the end-to-end tests need (Debian/Ubuntu), then cargo test.
#   scripts/test.sh [CARGO TEST ARGS...]     e.g. scripts/test.sh --test pull
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A needs=(
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [openssl]=openssl
  [curl]=curl
  [python3]=python3
  [htpasswd]=apache2-utils
  [systemd-analyze]=systemd
  [update-ca-certificates]=ca-certificates
  [podman]=podman
  [containerd]=containerd
  [ctr]=containerd
  [dockerd]=docker.io
  [chromium]=chromium
  [promtool]=prometheus
  [debootstrap]=debootstrap
)
missing=()
for cmd in "${!needs[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${needs[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: missing ${missing[*]} and no apt-get; install them by hand" >&2
    exit 1
  fi
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
      echo "test.sh: need root or sudo to install ${missing[*]}" >&2; exit 1
    fi
  fi
  echo "test.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  mapfile -t missing < <(printf "%s\n" "${missing[@]}" | sort -u)
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Garage, the S3-compatible store of the shared-tier tests: built once per machine (about 10
# minutes on 2 cores), from crates.io like everything else here.
GARAGE_VERSION=2.5.0
if ! command -v garage >/dev/null 2>&1 || ! garage --version 2>/dev/null | grep -q ":$GARAGE_VERSION "; then
  echo "test.sh: building garage $GARAGE_VERSION (once per machine)" >&2
  cargo install garage --version "$GARAGE_VERSION" --locked --no-default-features \
    --features bundled-libs,lmdb
fi

# CI has 2 cores; each e2e test runs a registry, a proxy and skopeo.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
exec cargo test --locked --all-targets "$@"
