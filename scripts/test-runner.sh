#!/usr/bin/env bash
# Cargo's runner for test binaries under scripts/test.sh: runs one test
# binary with a time limit, so that a test that hangs outside the VM tests'
# own limit (ferry-test-support's watchdog) still ends the run. `timeout`
# runs it in a process group of its own and kills the group: the ferry and
# QEMU processes its tests started go too.
limit=${FERRY_TEST_BINARY_LIMIT_S:-1800}
timeout --kill-after=10 "$limit" "$@"
rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "scripts/test-runner.sh: $(basename "$1") exceeded its limit of ${limit} s (FERRY_TEST_BINARY_LIMIT_S) and was killed" >&2
fi
exit "$rc"
