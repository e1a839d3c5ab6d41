#!/usr/bin/env bash
# Runs a command inside the real-KVM lab VM of ../shared/tools/kvm-lab.sh
# (QEMU TCG with AMD-V exposed, so /dev/kvm works inside), with one fix:
# the lab guest is told the host's TSC frequency (tsc_early_khz), because
# under TCG on a loaded host its kernel otherwise fails to calibrate the TSC
# against the emulated PIT now and then and hangs before its first output
# (seen here every time on a busy 2-core host). The shared tool builds and
# caches the lab image; this script only boots it.
# Usage: scripts/kvm-lab.sh SHARE_DIR COMMAND   (SHARE_DIR is copied to /work)
set -euo pipefail
share=$1; shift
cmd=$*
here=$(cd "$(dirname "$0")" && pwd)
lab=$here/../../shared/tools/kvm-lab.sh
C=${FERRY_LAB_CACHE:-/var/cache/ferry-lab}
if [ ! -f "$C/rootfs.img" ] || [ ! -f "$C/initrd.gz" ]; then
  # The shared tool builds the image first, then boots; only the build is
  # needed here, so its boot is given little time.
  echo "kvm-lab: building the lab image with $lab (once, minutes)" >&2
  timeout 1200 bash "$lab" --share "$(mktemp -d)" -- true >/dev/null 2>&1 || true
  pkill -f 'cpu max,[+]svm' 2>/dev/null || true
fi
[ -f "$C/rootfs.img" ] && [ -f "$C/initrd.gz" ] || { echo "kvm-lab: no lab image in $C" >&2; exit 125; }
kernel=$(ls "$C"/kernel/boot/vmlinuz-* | head -1)
khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
R=$(mktemp -d /var/tmp/ferry-kvm-lab.XXXX)
trap 'pkill -f "$R/work.img" 2>/dev/null || true; rm -rf "$R"' EXIT
mkdir -p "$R/work"
cp -a "$share/." "$R/work/"
printf '%s\n' "$cmd" > "$R/work/.lab-cmd"
mkfs.ext4 -q -F -d "$R/work" "$R/work.img" "$(( $(du -sm "$R/work" | cut -f1) + 1024 ))M" >/dev/null
timeout "${FERRY_LAB_TIMEOUT:-900}" qemu-system-x86_64 -M microvm,acpi=on -accel tcg,thread=multi \
  -cpu max,+svm -m 3072 -smp 2 -nodefaults -no-user-config -display none -serial stdio -no-reboot \
  -kernel "$kernel" -initrd "$C/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 tsc_early_khz=$khz tsc=reliable" \
  -drive id=root,file="$C/rootfs.img",format=raw,if=none,snapshot=on -device virtio-blk-device,drive=root \
  -drive id=work,file="$R/work.img",format=raw,if=none -device virtio-blk-device,drive=work \
  </dev/null | tee "$R/console.log" | sed -n '/@@LAB-BEGIN@@/,/@@LAB-EXIT/{/@@LAB-/d;p}'
rc=$(sed -n 's/.*@@LAB-EXIT \([0-9]*\)@@.*/\1/p' "$R/console.log" | tail -1)
if [ -z "$rc" ]; then
  echo "kvm-lab: the lab VM stopped before the command finished; last console lines:" >&2
  tail -5 "$R/console.log" >&2
  exit 125
fi
exit "$rc"
