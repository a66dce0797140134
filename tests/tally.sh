# tally.sh: sourced by the shell tests. Counts checks and ends with the
# "N passed, M failed" line that ctest's log shows; tally's status fails the test.
pass=0 fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*" >&2; }
check() { local name=$1; shift; if "$@"; then ok; else bad "$name"; fi; } # check NAME CMD...
tally() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; }
expect() { # expect NAME JSON key=value...: each key has that value in a compact JSON object
  local name=$1 json=$2; shift 2
  for kv in "$@"; do
    if [[ $json == *"\"${kv%%=*}\":${kv#*=},"* || $json == *"\"${kv%%=*}\":${kv#*=}}"* ]]; then ok; else bad "$name: want $kv in $json"; fi
  done
}
