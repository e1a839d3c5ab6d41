#!/usr/bin/env bash
# Builds ferry and its static guest agent.
#   scripts/build.sh          release build: target/release/ferry
#   scripts/build.sh --debug  debug build:   target/debug/ferry
# The agent always lands in target/agent/x86_64-unknown-linux-gnu/agent/,
# where ferry finds it. It is linked statically (+crt-static) so that it runs
# in any guest; it has its own target dir so that the different RUSTFLAGS
# do not make cargo rebuild the rest of the workspace every time.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
[ "${1:-}" = "--debug" ] && profile=dev
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --profile agent -p ferry-agent \
  --target x86_64-unknown-linux-gnu --target-dir target/agent
cargo build -q --profile "$profile" -p ferry-cli
