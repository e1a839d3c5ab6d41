#!/usr/bin/env bash
# The README's test command: sets up the host, checks formatting and lints,
# and runs every test (unit tests and real-QEMU tests, one VM at a time).
# Set FERRY_KVM_LAB=1 to also run the real-KVM test in the lab VM (slow).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh --debug
# The operator tests' real API server: kube-apiserver and kubectl built from
# k8s.io/kubernetes (the first time: minutes; then cached in
# ~/.cache/ferry/kube) and etcd from Debian trixie. Without Go the operator
# tests skip, saying so.
kube_rc=0
scripts/kube-apiserver.sh build >/dev/null || kube_rc=$?
if [ "$kube_rc" = 4 ]; then
  echo "scripts/test.sh: Go is missing: the operator tests (tests/operator.rs) will skip" >&2
elif [ "$kube_rc" != 0 ]; then
  exit "$kube_rc"
fi
# The tests' section cache (packages' sections extracted by digest) takes
# every new package's memory and disk: about 2.5 GiB a run, kept for the
# next. Past 6 GiB its oldest entries go, down to 3 GiB; a test that needs
# one again extracts it from its package.
sections=${FERRY_TEST_CACHE:-target/test-fixtures/cache}/sections
if [ -d "$sections" ]; then
  used_kib=$(du -sk "$sections" | cut -f1)
  if [ "$used_kib" -gt $((6 * 1024 * 1024)) ]; then
    while IFS= read -r f && [ "$used_kib" -gt $((3 * 1024 * 1024)) ]; do
      kib=$(du -k "$f" | cut -f1)
      rm -f -- "$f" && used_kib=$((used_kib - kib))
    done < <(ls -tr -d "$sections"/*)
    echo "scripts/test.sh: pruned the tests' section cache to $((used_kib / 1024)) MiB ($sections)" >&2
  fi
fi
cargo fmt --all -- --check
cargo clippy -q --all-targets -- -D warnings
export FERRY_AGENT=$PWD/target/agent/x86_64-unknown-linux-gnu/agent/ferry-agent
extra=()
[ "${FERRY_KVM_LAB:-}" = 1 ] && extra=(--include-ignored)
# Time limits, so that a hung test fails the run instead of hanging it:
# - each VM test: FERRY_TEST_TIME_LIMIT_S (600 s), counted from when it holds
#   the VM lock (ferry-test-support's watchdog names the test, kills what it
#   started and fails its test binary);
# - each test binary, so every other test too: FERRY_TEST_BINARY_LIMIT_S
#   (1800 s), through scripts/test-runner.sh as cargo's runner;
# - the whole run: FERRY_TEST_TOTAL_LIMIT_S (3600 s).
export FERRY_TEST_TIME_LIMIT_S=${FERRY_TEST_TIME_LIMIT_S:-600}
export FERRY_TEST_BINARY_LIMIT_S=${FERRY_TEST_BINARY_LIMIT_S:-1800}
total=${FERRY_TEST_TOTAL_LIMIT_S:-3600}
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/scripts/test-runner.sh
# fault-injection: the test-only FERRY_FAULT hook (crates/ferry-cli/src/cli/render.rs).
# VM tests also serialise themselves with a lock; one thread keeps the
# output readable and the two cores for the guests.
rc=0
timeout --kill-after=30 "$total" cargo test --workspace --features ferry-cli/fault-injection -- --test-threads=1 "${extra[@]}" || rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "scripts/test.sh: the test run exceeded its limit of ${total} s (FERRY_TEST_TOTAL_LIMIT_S)" >&2
fi
exit "$rc"
