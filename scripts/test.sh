#!/usr/bin/env bash
# The README's test command: sets up the host, checks formatting and lints,
# and runs every test (unit tests and real-QEMU tests, one VM at a time).
# Set FERRY_KVM_LAB=1 to also run the real-KVM test in the lab VM (slow).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh --debug
cargo fmt --all -- --check
cargo clippy -q --all-targets -- -D warnings
export FERRY_AGENT=$PWD/target/agent/x86_64-unknown-linux-gnu/agent/ferry-agent
extra=()
[ "${FERRY_KVM_LAB:-}" = 1 ] && extra=(--include-ignored)
# VM tests also serialise themselves with a lock; one thread keeps the
# output readable and the two cores for the guests.
cargo test --workspace -- --test-threads=1 "${extra[@]}"
