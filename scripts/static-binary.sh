#!/usr/bin/env bash
# Builds the release binary statically linked against musl: one file that runs on any x86_64
# Linux, with no libc to match (the usual way Rust tools are shipped).
#   scripts/static-binary.sh            # -> target/x86_64-unknown-linux-musl/release/regproxy
# Needs rustup's x86_64-unknown-linux-musl target (added here if missing; rustup downloads it)
# and musl-gcc for ring's C and assembly parts (Debian: musl-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-musl
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi
command -v musl-gcc >/dev/null || { echo "static-binary.sh: musl-gcc not found (Debian: apt-get install musl-tools)" >&2; exit 1; }

# mimalloc (the static build's allocator, see Cargo.toml) commits its arenas up front by default:
# with 8 clients pulling a 200 MiB blob, that alone raised the peak RSS by about 40%.
CC_x86_64_unknown_linux_musl=musl-gcc \
  CFLAGS_x86_64_unknown_linux_musl="-DMI_DEFAULT_ARENA_EAGER_COMMIT=0" \
  cargo build --release --locked --target "$target"
bin=target/$target/release/regproxy

# A static executable has no interpreter and needs no shared library.
if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
  echo "static-binary.sh: $bin is dynamically linked" >&2
  exit 1
fi
"$bin" --version
echo "$bin: $(file -b "$bin" 2>/dev/null || echo static)"
