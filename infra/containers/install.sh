#!/usr/bin/env bash
# Install what `make images` and `make containers-up` need when it is missing: podman and buildah (no Docker
# engine is needed), mmdebstrap (bootstraps the Debian base locally: nothing is pulled from a registry),
# runc, and the rootful networking parts. Debian/Ubuntu, as root; otherwise it says what to install.
# `make test` never calls this.
set -euo pipefail
PACKAGES=(podman buildah mmdebstrap runc uidmap fuse-overlayfs slirp4netns netavark aardvark-dns
          containernetworking-plugins)
missing=()
for tool in podman buildah mmdebstrap runc; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "containers: missing ${missing[*]}; install them with: sudo apt-get install -y ${PACKAGES[*]}" >&2
  exit 1
fi
echo "containers: apt-get install ${PACKAGES[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null
