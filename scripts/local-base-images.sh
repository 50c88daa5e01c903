#!/usr/bin/env bash
# Makes the Dockerfile's two base images locally, for a Docker engine that cannot pull from
# Docker Hub (the test suite's, or an air-gapped build host):
#   debian:bookworm-slim  Debian's debootstrap (minbase), imported with `docker import`;
#   rust:1-bookworm       the same plus gcc and libc6-dev, and this machine's Rust toolchain
#                         (`rustc --print sysroot`) with cargo on PATH, as the official image has.
# The Dockerfile then builds unchanged. Needs root (debootstrap, chroot) and Debian's mirror.
#
#   scripts/local-base-images.sh WORKDIR        # `docker` as DOCKER_HOST (or the default) says
#
# WORKDIR keeps the root file systems and debootstrap's downloads; remove it afterwards.
set -euo pipefail

work=${1:?usage: local-base-images.sh WORKDIR}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
for tool in debootstrap rustc "$docker"; do
  command -v "$tool" >/dev/null || { echo "local-base-images.sh: $tool not found" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "local-base-images.sh: debootstrap needs root" >&2; exit 1; }

mkdir -p "$work/debs"
slim=$work/slim
rust=$work/rust

# --- debian:bookworm-slim ---------------------------------------------------------------------
if [ ! -e "$slim/etc/debian_version" ]; then
  rm -rf "$slim"
  debootstrap --variant=minbase --cache-dir="$(realpath "$work/debs")" bookworm "$slim" "$mirror"
fi
# As in Docker's images: no package lists or caches in the image; apt-get update fetches them.
rm -rf "$slim/var/lib/apt/lists/"* "$slim/var/cache/apt/"*.bin
tar --numeric-owner -C "$slim" -c . \
  | "$docker" import --change 'CMD ["bash"]' - debian:bookworm-slim

# --- rust:1-bookworm --------------------------------------------------------------------------
rm -rf "$rust"
cp -a "$slim" "$rust"
cp /etc/resolv.conf "$rust/etc/resolv.conf"
chroot "$rust" apt-get update -q
chroot "$rust" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends gcc libc6-dev ca-certificates
# This host's own CAs (a TLS-inspecting proxy's, say), so that cargo in the build stage reaches
# crates.io as cargo on this host does. Only the build image gets them, never the runtime one.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$rust/usr/local/share/ca-certificates/"
  chroot "$rust" update-ca-certificates
fi
rm -rf "$rust/var/lib/apt/lists/"* "$rust/var/cache/apt/archives/"*.deb

# The toolchain without its documentation, where the official image keeps it.
sysroot=$(rustc --print sysroot)
mkdir -p "$rust/usr/local/rustup/toolchain" "$rust/usr/local/cargo/bin"
cp -a "$sysroot/bin" "$sysroot/lib" "$rust/usr/local/rustup/toolchain/"
for bin in "$rust"/usr/local/rustup/toolchain/bin/*; do
  ln -s "/usr/local/rustup/toolchain/bin/$(basename "$bin")" "$rust/usr/local/cargo/bin/"
done
tar --numeric-owner -C "$rust" -c . \
  | "$docker" import \
      --change 'ENV CARGO_HOME=/usr/local/cargo' \
      --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' \
      - rust:1-bookworm
echo "local-base-images.sh: made debian:bookworm-slim and rust:1-bookworm ($(rustc --version))"
