#!/usr/bin/env bash
# Builds ferry, its static guest agent and the static guest binaries recipes
# name (ferry-web, for the `web` recipe).
#   scripts/build.sh          release build: target/release/ferry
#   scripts/build.sh --debug  debug build:   target/debug/ferry
# The guest binaries always land in target/agent/x86_64-unknown-linux-gnu/agent/,
# where ferry finds them. They are linked statically (+crt-static) so that
# they run in any guest; they have their own target dir so that the different
# RUSTFLAGS do not make cargo rebuild the rest of the workspace every time.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
[ "${1:-}" = "--debug" ] && profile=dev
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --profile agent -p ferry-agent -p ferry-web \
  --target x86_64-unknown-linux-gnu --target-dir target/agent
cargo build -q --profile "$profile" -p ferry-cli
