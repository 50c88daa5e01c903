#!/usr/bin/env bash
# Builds and runs regproxy with its embedded defaults (listen 127.0.0.1:3128, CA in certs/, cache in
# cache/), or with whatever flags follow:   scripts/run.sh [REGPROXY ARGS...]
# On a fresh Debian/Ubuntu machine it first installs a C compiler and, if cargo is missing, Rust
# through rustup.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo=(sudo); fi
if ! command -v cc >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" apt-get install -y -q --no-install-recommends build-essential curl ca-certificates
fi
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  export PATH="$HOME/.cargo/bin:$PATH"
fi
cargo build --release --locked
exec target/release/regproxy "$@"
