#!/usr/bin/env bash
# The README's demo, as root on Debian bookworm:
#  1. build the redis blueprint and boot it; `ferry exec` asks Redis for PONG;
#  2. package the live VM, resume it from the package, write a key, Ctrl-C
#     (suspends back into the package), resume again: the key is still there
#     and the guest never rebooted;
#  3. serve the package from a registry; peer A resumes it from there (its
#     disk arrives lazily); peer B live-migrates it from A; peer A2 migrates
#     it back. Each peer is its own "host" here (own state dir, own network
#     namespaces) on loopback; the client follows the VM from port to port.
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

# --- 3. registry -> peer -> migrate -> migrate back ---------------------------
token=demo-token-0123456789
peers=()
stop_all() {
  stop
  for p in "${peers[@]}"; do kill -INT "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  peers=()
}
trap stop_all EXIT
wait_serving() { # $1: log of a peer
  until grep -q '^serving VM' "$1" 2>/dev/null; do
    kill -0 "${peers[-1]}" 2>/dev/null || { echo "demo: ferry peer failed:" >&2; cat "$1" "$1.err" >&2; exit 1; }
    sleep 0.2
  done
  grep -E '^(resumed in|migrated|disk:|network:|live in)' "$1"
}
peer() { # $1: host name, $2: source, $3: listen port, $4: exposed port
  say "[$1] $ferry peer --from $2 --listen 127.0.0.1:$3 --expose 127.0.0.1:$4:6379 --token ..."
  FERRY_STATE=$out/host-$1 FERRY_NET_PREFIX=demo$1 \
    $ferry peer --from "$2" --name kv --token "$token" --listen "127.0.0.1:$3" \
    --expose "127.0.0.1:$4:6379" --save "$out/$1.ferry" >"$out/peer-$1.log" 2>"$out/peer-$1.log.err" &
  peers+=($!)
  wait_serving "$out/peer-$1.log"
}

say "$ferry registry --package $out/redis.ferry --listen 127.0.0.1:7070 --token ..."
$ferry registry --package "$out/redis.ferry" --listen 127.0.0.1:7070 --token "$token" >"$out/registry.log" 2>&1 &
peers+=($!)
until grep -q '^listening on' "$out/registry.log"; do sleep 0.1; done

peer a http://127.0.0.1:7070/ 7101 16401
say "redis-cli -p 16401 SET moved 'written on A'"
redis-cli -p 16401 SET moved "written on A"
up=$(redis-cli -p 16401 INFO server | sed -n 's/^uptime_in_seconds:\([0-9]*\).*/\1/p')

peer b 127.0.0.1:7101 7102 16402
grep '^moved' "$out/peer-a.log"
say "redis-cli -p 16402 GET moved   (on B now)"
redis-cli -p 16402 GET moved
redis-cli -p 16402 SET back "written on B"

peer a2 127.0.0.1:7102 7103 16403
grep '^moved' "$out/peer-b.log"
say "redis-cli -p 16403 MGET moved back   (back on A)"
redis-cli -p 16403 MGET moved back
echo "redis uptime: $(redis-cli -p 16403 INFO server | sed -n 's/^uptime_in_seconds:\([0-9]*\).*/\1/p') s (was $up s on A: the same process, never restarted)"
stop_all

