#!/usr/bin/env bash
# Installs what ferry needs on a Debian bookworm machine, idempotently:
# QEMU 10 and its image tool (from bookworm-backports, see docs/engine.md),
# busybox-static and e2fsprogs for blueprints, debootstrap for Debian-based
# recipes, redis-tools for the demo and tests, iproute2 and iptables for
# networking, kmod and cpio for the KVM lab VM (../shared/tools/kvm-lab.sh),
# curl for the boot service's and the control plane's tests and bench/bootsvc,
# tmux for the `ferry shell` tests and bench/shell (a terminal to type into).
# Needs root.
#
#   scripts/setup.sh            install
#   scripts/setup.sh --dry-run  write the apt files under a temporary
#                               directory and simulate (apt-get -s): shows
#                               what would be installed, changes nothing
#
# QEMU: bookworm's own is 7.2, whose TCG live copy needs a slow workaround.
# Setup adds Debian's bookworm-backports suite with a pin that lets only the
# QEMU packages come from it, and installs qemu-system-x86 and qemu-utils
# from there. With FERRY_QEMU set (a QEMU you chose), it installs no QEMU;
# FERRY_QEMU10=0 keeps bookworm's own 7.2 instead.
# FERRY_DEBIAN_MIRROR overrides the mirror used for backports (default: the
# one the machine's bookworm entry names).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "setup: run as root (apt-get install needs it)" >&2; exit 1; }
dry_run=
[ "${1:-}" = "--dry-run" ] && dry_run=1

# The packages that come from backports. qemu-system-x86 10 needs its own
# common/data packages and SeaBIOS >= 1.16.3 (its microvm firmware); the
# rest of its dependencies are bookworm's.
qemu_pkgs=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils qemu-block-extra seabios)
# The first QEMU whose TCG live copy needs no workaround is 9.0; backports
# has 10.0, which is what ferry is tested on.
qemu_min_major=10
sources_file=/etc/apt/sources.list.d/ferry-bookworm-backports.sources
prefs_file=/etc/apt/preferences.d/ferry-qemu-backports
apt_opts=()
if [ -n "$dry_run" ]; then
  sim=$(mktemp -d /tmp/ferry-setup-dry-run.XXXXXX)
  mkdir -p "$sim/sources.list.d" "$sim/preferences.d" "$sim/lists/partial" "$sim/cache/archives/partial"
  # apt downloads as _apt where it can.
  chmod 755 "$sim" && chown -R _apt "$sim/lists" "$sim/cache" 2>/dev/null || true
  cp /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list "$sim/sources.list.d/" 2>/dev/null || true
  cp /etc/apt/preferences.d/* "$sim/preferences.d/" 2>/dev/null || true
  [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$sim/sources.list"
  sources_file="$sim/sources.list.d/${sources_file##*/}"
  prefs_file="$sim/preferences.d/${prefs_file##*/}"
  apt_opts=(-o "Dir::Etc::sourcelist=$sim/sources.list" -o "Dir::Etc::sourceparts=$sim/sources.list.d"
            -o "Dir::Etc::preferencesparts=$sim/preferences.d" -o "Dir::State::Lists=$sim/lists"
            -o "Dir::Cache=$sim/cache")
  echo "setup: dry run: apt files and package lists under $sim" >&2
fi
aptget() { apt-get "${apt_opts[@]}" "$@"; }

# The major version of `qemu-system-x86_64 --version` ($1: the binary).
# Empty when it does not run (on a fresh machine there is none yet).
qemu_major() {
  { "$1" --version 2>/dev/null || true; } | sed -n '1s/.*version \([0-9]*\)\..*/\1/p'
}

# Writes $2 to file $1 unless it already holds exactly that; says whether
# it changed (exit status 0) or not (1).
write_if_changed() {
  if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then return 1; fi
  printf '%s\n' "$2" >"$1.tmp" && mv "$1.tmp" "$1"
}

# The Debian mirror the machine already uses (deb822 or one-line format).
debian_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u != "" {print u; exit}
               /^$/ {u=""}' "$f")
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  uri=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

pkgs=(busybox-static e2fsprogs debootstrap redis-tools
      iproute2 iptables procps ca-certificates kmod cpio python3 curl tmux
      dnsmasq-base ipxe-qemu)
# dnsmasq-base and ipxe-qemu are for the q35 netboot test and bench
# (FERRY_TEST_NETBOOT=1): dnsmasq-base is the program only, with no system
# service (the test runs it in the VM's namespace); ipxe-qemu is the NIC
# boot ROM (/usr/lib/ipxe/qemu/efi-virtio.rom).
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
want_qemu=
use_backports=
apt_changed=
if [ -n "${FERRY_QEMU:-}" ]; then
  # The user's own QEMU: check it runs, install none.
  major=$(qemu_major "$FERRY_QEMU")
  [ -n "$major" ] || { echo "setup: FERRY_QEMU=$FERRY_QEMU does not run as qemu-system-x86_64 --version" >&2; exit 1; }
  echo "setup: using FERRY_QEMU=$FERRY_QEMU ($("$FERRY_QEMU" --version | head -1)); not installing QEMU" >&2
  [ "$major" -ge 9 ] || echo "setup: note: QEMU before 9.0 needs ferry's slower TCG live-copy workaround (docs/engine.md)" >&2
  qemu_img_dir=$(dirname "$FERRY_QEMU")
  [ -x "$qemu_img_dir/qemu-img" ] || command -v qemu-img >/dev/null \
    || echo "setup: note: no qemu-img beside FERRY_QEMU or on PATH: ferry copies disks instead of making overlays" >&2
else
  want_qemu=1
  pkgs+=(qemu-system-x86 qemu-utils)
  if [ "$codename" = bookworm ] && [ "${FERRY_QEMU10:-}" = 0 ]; then
    # The user asked for bookworm's own 7.2 (ferry then needs its slower
    # TCG live-copy workaround; docs/engine.md). A QEMU already newer stays.
    qemu_min_major=7
    echo "setup: FERRY_QEMU10=0: QEMU from bookworm (7.2 or what is installed); live copies under TCG are slower on 7.2 (docs/engine.md)" >&2
  elif [ "$codename" = bookworm ]; then
    use_backports=1
    mirror=${FERRY_DEBIAN_MIRROR:-$(debian_mirror)}
    # Another entry may already name the suite; then it is used as it is.
    if grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ --exclude="${sources_file##*/}"; then
      echo "setup: bookworm-backports is already an apt source; using it" >&2
      sources_file="an existing entry under /etc/apt"
    elif write_if_changed "$sources_file" "# Added by ferry's scripts/setup.sh: QEMU 10 for bookworm (see $prefs_file).
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"; then
      apt_changed=1
    fi
    # Nothing comes from backports but QEMU and what it needs there.
    if write_if_changed "$prefs_file" "# Added by ferry's scripts/setup.sh: from bookworm-backports, only QEMU.
Package: *
Pin: release n=bookworm-backports
Pin-Priority: -1

Package: ${qemu_pkgs[*]}
Pin: release n=bookworm-backports
Pin-Priority: 990"; then
      apt_changed=1
    fi
  else
    echo "setup: this is Debian '${codename:-unknown}', not bookworm: QEMU comes from its own suite" >&2
  fi
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Installed is not enough for QEMU: bookworm's 7.2, or a qemu-img that a
# 7.2 install removed, means QEMU must be (re)installed.
if [ -n "$want_qemu" ]; then
  major=$(qemu_major "$(command -v qemu-system-x86_64 || echo /nonexistent)")
  if [ "${major:-0}" -lt "$qemu_min_major" ] || ! command -v qemu-img >/dev/null; then
    for p in qemu-system-x86 qemu-utils; do
      [[ " ${missing[*]} " == *" $p "* ]] || missing+=("$p")
    done
  fi
fi

# The guest kernel comes from apt too: its package lists must know it.
if [ -n "$dry_run" ] || [ -n "$apt_changed" ] || [ ${#missing[@]} -gt 0 ] \
   || ! apt-cache "${apt_opts[@]}" show linux-image-cloud-amd64 >/dev/null 2>&1; then
  echo "setup: apt-get update" >&2
  aptget -qq update || echo "setup: apt-get update reported errors (QEMU's source is checked next)" >&2
fi
if [ -n "$use_backports" ]; then
  # apt-get update only warns when a source fails: check the candidate.
  candidate=$(apt-cache "${apt_opts[@]}" policy qemu-system-x86 | sed -n 's/^ *Candidate: //p')
  case "$candidate" in
    *bpo12*) ;;
    *) echo "setup: QEMU $qemu_min_major is not available from apt source 'deb ${mirror} bookworm-backports main' ($sources_file): is the mirror reachable? (or set FERRY_QEMU to a QEMU of your choice and run setup again)" >&2
       exit 1 ;;
  esac
fi
if [ -n "$dry_run" ]; then
  echo "setup: dry run: would install ${missing[*]:-nothing}" >&2
  apt-cache "${apt_opts[@]}" policy "${qemu_pkgs[@]}"
  [ ${#missing[@]} -eq 0 ] || aptget -s install --no-install-recommends "${missing[@]}"
  exit 0
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive aptget -y -qq install --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ -n "$want_qemu" ]; then
  major=$(qemu_major "$(command -v qemu-system-x86_64 || echo /nonexistent)")
  [ "${major:-0}" -ge "$qemu_min_major" ] || {
    echo "setup: qemu-system-x86_64 is ${major:+version $major, }not QEMU $qemu_min_major or later after installing: check 'apt-cache policy qemu-system-x86'" >&2
    exit 1
  }
  command -v qemu-img >/dev/null || {
    echo "setup: qemu-img is missing after installing qemu-utils: check 'apt-cache policy qemu-utils'" >&2
    exit 1
  }
  echo "setup: $(qemu-system-x86_64 --version | head -1)" >&2
fi
# The unprivileged user QEMU runs as when ferry runs as root
# (docs/security.md, "Confined engine"): a system user and group, no login,
# no home. Made once; an existing one is kept.
if ! getent passwd ferry-qemu >/dev/null; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin ferry-qemu
  echo "setup: made the system user ferry-qemu (QEMU runs as it)" >&2
fi
# The netboot test's programs, checked after installing.
[ -n "$dry_run" ] || {
  command -v dnsmasq >/dev/null || { echo "setup: dnsmasq is missing after installing dnsmasq-base" >&2; exit 1; }
  [ -f /usr/lib/ipxe/qemu/efi-virtio.rom ] || { echo "setup: /usr/lib/ipxe/qemu/efi-virtio.rom is missing after installing ipxe-qemu" >&2; exit 1; }
}
command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (rustup) first" >&2; exit 1; }
echo "setup: host ready" >&2
