# bench/lib.sh: what the bench scripts share. Sourced, never run:
#   . "$(dirname "$0")/lib.sh"
# Set BENCH_SAYS_AS before sourcing to change the prefix of say and die
# (default "bench").

BENCH_SAYS_AS=${BENCH_SAYS_AS:-bench}

# A line to standard error, for the person watching.
say() { printf '%s: %s\n' "$BENCH_SAYS_AS" "$*" >&2; }

# A one-line error, and the end of the script (its cleanup trap runs).
die() {
  printf '%s: error: %s\n' "$BENCH_SAYS_AS" "$*" >&2
  exit 1
}

# The time in milliseconds, in NOW: no subshell, so a timed span does not
# include the fork of one.
ms_now() { NOW=$((${EPOCHREALTIME/./} / 1000)); }

# The time in milliseconds, printed (for $(now_ms) where a fork's cost
# does not matter).
now_ms() { echo $((${EPOCHREALTIME/./} / 1000)); }

# median [-p DIGITS] NUMBER...: the middle value; for an even count the
# mean of the middle two, truncated to an integer, or with -p printed
# with DIGITS decimals. "?" when no numbers are given.
median() {
  local digits=
  if [ "${1:-}" = -p ]; then
    digits=$2
    shift 2
  fi
  [ "$#" -gt 0 ] || {
    echo "?"
    return
  }
  printf '%s\n' "$@" | sort -g | awk -v d="$digits" '
    { a[NR] = $1 }
    END {
      m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
      if (d == "") print int(m); else printf("%." d "f\n", m)
    }'
}

# range NUMBER...: "lowest-highest".
range() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "-" hi }'; }
