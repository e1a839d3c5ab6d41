#!/usr/bin/env bash
# The README's demo: build the redis blueprint, boot it, and ask Redis for a
# PONG through the guest agent. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
ferry=target/release/ferry
out=${FERRY_DEMO_DIR:-out}
if [ ! -f "$out/redis/blueprint.toml" ]; then
  $ferry blueprint build --recipe redis --out "$out/redis"
fi
name=demo-redis
$ferry boot --blueprint "$out/redis" --name "$name" &
boot=$!
trap 'kill -INT $boot 2>/dev/null; wait $boot 2>/dev/null || true' EXIT
until $ferry exec "$name" -- true 2>/dev/null; do
  kill -0 $boot 2>/dev/null || { echo "demo: ferry boot failed" >&2; exit 1; }
  sleep 0.5
done
echo "+ ferry exec $name -- redis-cli PING"
$ferry exec "$name" -- redis-cli PING
echo "+ ferry exec $name -- redis-cli SET greeting 'hello from ferry'"
$ferry exec "$name" -- redis-cli SET greeting "hello from ferry"
$ferry exec "$name" -- redis-cli GET greeting
echo "demo: stopping the VM (Ctrl-C to ferry boot)"
