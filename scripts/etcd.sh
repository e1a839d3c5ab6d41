#!/usr/bin/env bash
# scripts/etcd.sh path: prints the path of an etcd 3.5 server binary,
# fetching Debian trixie's `etcd-server` first if it is not cached.
#
# Bookworm's etcd (3.4) is older than what recent Kubernetes API servers
# accept, so etcd comes from trixie, but never through the system's apt
# sources: a private sources list, state and cache directory under
# $FERRY_ETCD_CACHE (default ~/.cache/ferry/etcd) are used with
# `apt-get download` and `dpkg-deb -x`, so trixie never becomes a candidate
# for any package of this system. The mirror is the one the system's
# sources already use.
set -euo pipefail

CACHE=${FERRY_ETCD_CACHE:-$HOME/.cache/ferry/etcd}
BIN=$CACHE/root/usr/bin/etcd

die() { printf 'etcd.sh: %s\n' "$*" >&2; exit 1; }

fetch() {
  local mirror apt
  # The first Debian mirror the system uses (deb822 `URIs:` or a `deb`
  # line; comments skipped).
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
    grep -v '^[[:space:]]*#' | grep -oE '^(URIs:|deb) +(\[[^]]*\] +)?https?://[^ ]+/debian/?( |$)' |
    grep -oE 'https?://[^ ]+' | head -1 || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  apt=$CACHE/apt
  mkdir -p "$apt/etc/sources.list.d" "$apt/etc/preferences.d" "$apt/state/lists/partial" \
    "$apt/cache/archives/partial" "$CACHE/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} trixie main" >"$apt/etc/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$apt/etc/sources.list" -o "Dir::Etc::SourceParts=$apt/etc/sources.list.d"
    -o "Dir::Etc::Preferences=$apt/etc/preferences" -o "Dir::Etc::PreferencesParts=$apt/etc/preferences.d"
    -o "Dir::State=$apt/state" -o "Dir::Cache=$apt/cache" -o "APT::Architecture=amd64" -o "APT::Sandbox::User=root")
  apt-get "${opts[@]}" -qq update >&2 || die "apt-get update of the private trixie list failed"
  (cd "$CACHE/debs" && apt-get "${opts[@]}" -qq download etcd-server >&2) || die "apt-get download etcd-server failed"
  rm -rf "$CACHE/root"
  dpkg-deb -x "$(ls -t "$CACHE"/debs/etcd-server_*.deb | head -1)" "$CACHE/root"
  [ -x "$BIN" ] || die "no etcd in the etcd-server package"
}

case "${1:-}" in
  path)
    [ -x "$BIN" ] || fetch
    "$BIN" --version >/dev/null 2>&1 || die "$BIN does not run"
    echo "$BIN"
    ;;
  *) die "usage: scripts/etcd.sh path" ;;
esac
