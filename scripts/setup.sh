#!/usr/bin/env bash
# Installs what ferry needs on a Debian bookworm machine, idempotently:
# QEMU and its image tool, busybox-static and e2fsprogs for blueprints,
# debootstrap for Debian-based recipes, redis-tools for the demo and tests,
# iproute2 and iptables for networking, kmod and cpio for the KVM lab VM
# (../shared/tools/kvm-lab.sh). Needs root.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "setup: run as root (apt-get install needs it)" >&2; exit 1; }
pkgs=(qemu-system-x86 qemu-utils busybox-static e2fsprogs debootstrap redis-tools
      iproute2 iptables procps ca-certificates kmod cpio python3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The guest kernel comes from apt too: its package lists must know it.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  echo "setup: apt-get update" >&2
  apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (rustup) first" >&2; exit 1; }
echo "setup: host ready" >&2
