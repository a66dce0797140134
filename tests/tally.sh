# tally.sh: sourced by the shell tests. Counts checks and ends with the
# "N passed, M failed" line that ctest's log shows; tally's status fails the test.
pass=0 fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*" >&2; }
check() { local name=$1; shift; if "$@"; then ok; else bad "$name"; fi; } # check NAME CMD...
tally() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; }
