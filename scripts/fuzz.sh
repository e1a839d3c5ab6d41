#!/usr/bin/env bash
# Fuzzes ferry's parsers of untrusted input with libFuzzer, on the stable
# toolchain: the targets in fuzz/ (harness: crates/ferry-fuzz) are built
# with LLVM's coverage instrumentation (sancov) and libfuzzer-sys, which
# compiles libFuzzer itself with the machine's C++ compiler. No nightly and
# no cargo-fuzz needed. Installs a C++ compiler if there is none (apt, as
# root), idempotently. docs/security.md says what each target covers.
#
#   scripts/fuzz.sh                    every target, 30 s each (the short run)
#   scripts/fuzz.sh nbd                one target, 30 s
#   scripts/fuzz.sh nbd 600            one target, 600 s
#   scripts/fuzz.sh all 300            every target, 300 s each
#   FERRY_FUZZ_SECONDS=3600 scripts/fuzz.sh   the long run, opt-in
#   scripts/fuzz.sh --list             the targets
#
# Environment:
#   FERRY_FUZZ_SECONDS     seconds per target when not given (default 30)
#   FERRY_FUZZ_TARGET_DIR  where the instrumented build goes
#                          (default fuzz/target; it is not the main build's)
#   FERRY_FUZZ_ARGS        more libFuzzer flags, e.g. "-max_len=65536"
#
# Each target starts from its seeds, fuzz/corpus/<target>/ (never written
# to), with its dictionary fuzz/dict/<target>.dict if there is one (JSON
# syntax, field names, multi-byte UTF-8), and what it learned before, fuzz/work/<target>/ (new inputs, kept
# between runs, not committed). One process, one core. A crash stops that
# target and is written to fuzz/artifacts/<target>/; the script goes on
# with the others, prints a summary line per target (runs, runs a second,
# coverage once the corpus is loaded -> at the end, in edges; features;
# corpus size), and exits 1 if any target crashed. Reproduce a crash with
#   fuzz/target/<triple>/release/<target> fuzz/artifacts/<target>/crash-...
# and, once fixed, keep the input as fuzz/corpus/<target>/crash-<what> so
# that `cargo test -p ferry-fuzz` replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
targets=(package_file package_table agent migration nbd http_range)

if [ "${1:-}" = --list ]; then
  printf '%s\n' "${targets[@]}"
  exit 0
fi
which=${1:-all}
seconds=${2:-${FERRY_FUZZ_SECONDS:-30}}
case "$seconds" in
  '' | *[!0-9]*) echo "fuzz: seconds must be a whole number, not '$seconds'" >&2; exit 2 ;;
esac
if [ "$which" != all ]; then
  found=
  for t in "${targets[@]}"; do [ "$t" = "$which" ] && found=1; done
  [ -n "$found" ] || { echo "fuzz: no target '$which'; targets: ${targets[*]}" >&2; exit 2; }
  targets=("$which")
fi

# libfuzzer-sys compiles libFuzzer (C++).
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null && ! command -v clang++ >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "fuzz: no C++ compiler: install g++ (apt-get install g++)" >&2; exit 1; }
  echo "fuzz: installing g++ (libFuzzer is C++)" >&2
  apt-get -qq update >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi

triple=$(rustc -vV | sed -n 's/^host: //p')
target_dir=${FERRY_FUZZ_TARGET_DIR:-$root/fuzz/target}
# What cargo-fuzz passes, minus the sanitizer (ASan needs nightly; safe
# Rust needs it little): coverage counters and comparison tracing for
# libFuzzer, debug assertions and overflow checks so that arithmetic that
# wraps is a crash, and the `fuzzing` cfg.
flags=(
  --cfg fuzzing
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cdebug-assertions
  -Coverflow-checks
)
echo "fuzz: building the targets ($(rustc --version))" >&2
# --target keeps the flags off build scripts and proc macros.
RUSTFLAGS="${flags[*]}" cargo build -q --release --manifest-path fuzz/Cargo.toml \
  --target "$triple" --target-dir "$target_dir" --bins
bin_dir=$target_dir/$triple/release

crashed=()
summary=()
for t in "${targets[@]}"; do
  work=$root/fuzz/work/$t
  artifacts=$root/fuzz/artifacts/$t
  mkdir -p "$work" "$artifacts"
  log=$root/fuzz/work/$t.log
  echo "fuzz: $t for ${seconds}s (log: ${log#"$root"/})" >&2
  dict=()
  [ -f "$root/fuzz/dict/$t.dict" ] && dict=(-dict="$root/fuzz/dict/$t.dict")
  rc=0
  # shellcheck disable=SC2086 # FERRY_FUZZ_ARGS is a list of flags
  "$bin_dir/$t" "$work" "$root/fuzz/corpus/$t" "${dict[@]}" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" \
    ${FERRY_FUZZ_ARGS:-} >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  # The last status line: "#N <event> cov: C ft: F corp: K/S ...".
  status=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  # Coverage once the corpus was loaded, before any new input.
  start=$(grep -E '^#[0-9]+[[:space:]]+INITED' "$log" | sed -n 's/.* cov: \([0-9]*\).*/\1/p' | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$status")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$status")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$status")
  line=$(printf '%-14s %4ss  %10s runs  %7s/s  cov %5s -> %5s  ft %6s  corpus %5s' \
    "$t" "$seconds" "${runs:-?}" "${rate:-?}" "${start:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")
  if [ "$rc" != 0 ]; then
    crashed+=("$t")
    line="$line  CRASH: $(grep -o "Test unit written to .*" "$log" | tail -1 | sed 's/Test unit written to //')"
    grep -E "panicked at|^thread" "$log" | head -3 >&2 || true
  fi
  summary+=("$line")
done

echo
printf '%s\n' "${summary[@]}"
if [ "${#crashed[@]}" -gt 0 ]; then
  echo "fuzz: crashed: ${crashed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
