#!/usr/bin/env bash
# The README's demo, as root on Debian bookworm:
#  1. build the redis blueprint and boot it; `ferry exec` asks Redis for PONG;
#  2. package the live VM, resume it from the package, write a key, Ctrl-C
#     (suspends back into the package), resume again: the key is still there
#     and the guest never rebooted.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
ferry=target/release/ferry
out=${FERRY_DEMO_DIR:-out}
mkdir -p "$out"
pid=
stop() { # SIGINT to ferry, as Ctrl-C would, and wait for it
  [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  pid=
}
trap stop EXIT
wait_live() { # $1: log file of a ferry boot/run started in the background
  until grep -q '^live in' "$1"; do
    kill -0 "$pid" 2>/dev/null || { echo "demo: ferry failed:" >&2; cat "$1" >&2; exit 1; }
    sleep 0.2
  done
  grep -E '^(accel|resumed in|live in)' "$1"
}
say() { echo; echo "+ $*"; }

if [ ! -f "$out/redis/blueprint.toml" ]; then
  say "$ferry blueprint build --recipe redis --out $out/redis"
  $ferry blueprint build --recipe redis --out "$out/redis"
fi

say "$ferry boot --blueprint $out/redis --name demo-redis"
$ferry boot --blueprint "$out/redis" --name demo-redis >"$out/boot.log" 2>&1 &
pid=$!
wait_live "$out/boot.log"
say "$ferry exec demo-redis -- redis-cli PING"
$ferry exec demo-redis -- redis-cli PING
stop

say "$ferry package --blueprint $out/redis --memory-size 512 --out $out/redis.ferry"
$ferry package --blueprint "$out/redis" --memory-size 512 --out "$out/redis.ferry"

say "$ferry run --package $out/redis.ferry --name r1"
$ferry run --package "$out/redis.ferry" --name r1 >"$out/run.log" 2>&1 &
pid=$!
wait_live "$out/run.log"
$ferry exec r1 -- redis-cli SET greeting "hello from before Ctrl-C"
up=$($ferry exec r1 -- cut -d' ' -f1 /proc/uptime)
echo "guest uptime: $up s"
say "Ctrl-C: suspend into $out/redis.ferry"
stop
grep '^suspended' "$out/run.log"

say "$ferry run --package $out/redis.ferry --name r1   (again)"
$ferry run --package "$out/redis.ferry" --name r1 >"$out/run.log" 2>&1 &
pid=$!
wait_live "$out/run.log"
say "$ferry exec r1 -- redis-cli GET greeting"
$ferry exec r1 -- redis-cli GET greeting
echo "guest uptime: $($ferry exec r1 -- cut -d' ' -f1 /proc/uptime) s (was $up s: no reboot)"
stop
