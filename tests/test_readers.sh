#!/bin/bash
# test_readers: blip-query beside a writer. A candidate deleted or replaced
# between the search and its metadata is skipped (single queries and --stdin
# sessions), also for real with a blip-index process deleting and re-adding
# photos during a session; a --stdin session notices blip-index --rebuild and
# answers from the new index; a read-only index directory (or one owned by
# another user) can be queried; a reader opening while a writer holds the
# database lock waits for it instead of failing.
set -u
BIN=$(cd "${BLIP_BIN:-build}" && pwd)
DATA=$(cd "${BLIP_TEST_DATA:-tests/data}" && pwd)
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_readers.XXXXXX)
trap 'chmod -R u+w "$T" 2>/dev/null; rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
QUERY="a dog running on a beach"

L=$T/lib
mkdir -p "$L/a" "$L/b"
"$BIN/gen_photos" "$L/a" 8 --size 64x64 >/dev/null || bad "gen_photos"
"$BIN/gen_photos" "$L/b" 6 --size 64x64 --seed 2 --ext png >/dev/null
"$BIN/blip-index" --db "$T/db" --model "$MODEL" "$L" 2>/dev/null || bad "index"
q() { "$BIN/blip-query" --db "$T/db" --model "$MODEL" "$@"; }
# jcount FILE: results in a --json array
jcount() { python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$1"; }

# ---- a candidate that left SQLite after the FAISS snapshot was taken ----
# Deleting rows behind the cache's back (no generation bump) leaves the
# reader's FAISS index holding their ids: exactly what a reader sees when a
# writer commits between its search and its metadata lookup.
cp -r "$T/db" "$T/dbv"
sqlite3 "$T/dbv/index.sqlite" "DELETE FROM images WHERE id IN (SELECT id FROM images ORDER BY id LIMIT 3)" ||
  bad "sqlite3 delete"
"$BIN/blip-query" --db "$T/dbv" --model "$MODEL" --json -n 14 "$QUERY" >"$T/v.json" 2>"$T/v.err"; rc=$?
[[ $rc == 0 && $(jcount "$T/v.json") == 11 ]] && ok || bad "vanished candidates (rerank): rc $rc $(cat "$T/v.err")"
"$BIN/blip-query" --db "$T/dbv" --model "$MODEL" --json -n 14 --rerank 0 "$QUERY" >"$T/v0.json" 2>"$T/v0.err"; rc=$?
[[ $rc == 0 && $(jcount "$T/v0.json") == 11 ]] && ok || bad "vanished candidates (ITC only): rc $rc $(cat "$T/v0.err")"
"$BIN/blip-query" --db "$T/dbv" --model "$MODEL" --json -n 4 --rerank 0 "$QUERY" >"$T/v4.json" 2>/dev/null
[[ $(jcount "$T/v4.json") == 4 ]] && ok || bad "vanished candidates make the result short of -n"
grep -q "vanished" "$T/v.err" "$T/v0.err" && bad "vanished reported as an error" || ok
printf '%s\nred car\n' "$QUERY" | "$BIN/blip-query" --db "$T/dbv" --model "$MODEL" --stdin --json -n 14 \
  >"$T/vs.jsonl" 2>"$T/vs.err"; rc=$?
[[ $rc == 0 && $(wc -l <"$T/vs.jsonl") == 2 ]] && ok || bad "--stdin session with vanished candidates: rc $rc $(cat "$T/vs.err")"

# ---- for real: a writer deletes and re-adds photos while a session queries ----
# The session runs one query per line; the writer moves lib/a out of the
# library and back, each blip-index run committing deletions (then additions).
cp -r "$T/db" "$T/dbr"
nq=300
( for i in $(seq $nq); do echo "$QUERY $i"; done ) |
  "$BIN/blip-query" --db "$T/dbr" --model "$MODEL" --stdin --paths -n 14 --rerank 14 >"$T/r.out" 2>"$T/r.err" &
qpid=$!
writes=0
while kill -0 $qpid 2>/dev/null; do
  mv "$L/a" "$T/a.away" && "$BIN/blip-index" --db "$T/dbr" --model "$MODEL" "$L" 2>/dev/null || bad "writer (delete)"
  mv "$T/a.away" "$L/a" && "$BIN/blip-index" --db "$T/dbr" --model "$MODEL" "$L" 2>/dev/null || bad "writer (add)"
  writes=$((writes + 2))
done
wait $qpid; rc=$?
answers=$(grep -c '^$' "$T/r.out")
[[ $rc == 0 && $answers == "$nq" ]] && ok || bad "session beside a writer: rc $rc, $answers/$nq answers: $(tail -3 "$T/r.err")"
(( writes >= 2 )) && ok || bad "no write happened during the session"
echo "  $nq queries beside $writes writer commits"

# ---- blip-index --rebuild under a running --stdin session ----
cp -r "$T/db" "$T/dbb"
coproc QS { "$BIN/blip-query" --db "$T/dbb" --model "$MODEL" --stdin --paths -n 20 2>"$T/b.err"; }
qs_pid=$QS_PID qs_in=${QS[1]} qs_out=${QS[0]}
ask() { # ask QUERY: one --paths answer (lines up to the blank one) into $ans
  ans=""
  echo "$1" >&"$qs_in" 2>/dev/null || return
  local line
  while IFS= read -r -t 60 line <&"$qs_out" && [[ -n $line ]]; do ans+="$line"$'\n'; done
}
ask "$QUERY"
[[ $(grep -c "/lib/a/" <<<"$ans") == 8 && $(grep -c "/lib/b/" <<<"$ans") == 6 ]] && ok || bad "before the rebuild: $ans"
"$BIN/blip-index" --db "$T/dbb" --model "$MODEL" --rebuild "$L/b" 2>/dev/null || bad "rebuild"
ask "$QUERY"
[[ $(grep -c "/lib/a/" <<<"$ans") == 0 && $(grep -c "/lib/b/" <<<"$ans") == 6 ]] && ok ||
  bad "session answers from the discarded index after --rebuild: $ans"
mkdir -p "$T/other" # rebuilt with other weights: the session says so instead of mixing models
cp "$MODEL/config.json" "$MODEL/vocab.txt" "$T/other/" && cp "$MODEL/model-f16.safetensors" "$T/other/model.safetensors"
"$BIN/blip-index" --db "$T/dbb" --model "$T/other" --rebuild "$L/b" 2>/dev/null || bad "rebuild, other model"
ask "$QUERY"
eval "exec $qs_in>&-"
wait $qs_pid; rc=$?
[[ $rc == 2 && -z $ans ]] && grep -q "reopening the rebuilt index.*was indexed with model" "$T/b.err" && ok ||
  bad "rebuilt with another model: rc $rc $(cat "$T/b.err")"

# ---- a read-only index directory, and one owned by another user ----
# Root ignores permissions, so as root the reader runs as nobody; a test that
# cannot drop privileges fails instead of passing vacuously.
asuser() { if [[ $(id -u) == 0 ]]; then setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$@"; else "$@"; fi; }
chmod 755 "$T"
cp -r "$T/db" "$T/dbro"
q --paths -n 5 "$QUERY" >"$T/ro.want" || bad "query for reference"
if [[ $(id -u) == 0 ]]; then
  asuser sh -c 'test "$(id -u)" != 0 && ! test -w "$1"' sh "$T/dbro" && ok || bad "could not drop privileges to nobody"
  # owned by root, writable only by root: another user's index
  asuser "$BIN/blip-query" --db "$T/dbro" --model "$MODEL" --paths -n 5 "$QUERY" >"$T/ro1" 2>"$T/ro1.err"; rc=$?
  [[ $rc == 0 ]] && cmp -s "$T/ro1" "$T/ro.want" && ok || bad "another user's index: rc $rc $(cat "$T/ro1.err")"
fi
chmod -R a-w "$T/dbro"
asuser "$BIN/blip-query" --db "$T/dbro" --model "$MODEL" --paths -n 5 "$QUERY" >"$T/ro2" 2>"$T/ro2.err"; rc=$?
[[ $rc == 0 ]] && cmp -s "$T/ro2" "$T/ro.want" && ok || bad "read-only index: rc $rc $(cat "$T/ro2.err")"
printf '%s\nred car\n' "$QUERY" | asuser "$BIN/blip-query" --db "$T/dbro" --model "$MODEL" --stdin --paths -n 5 \
  >"$T/ro3" 2>"$T/ro3.err"; rc=$?
[[ $rc == 0 && $(grep -c '^$' "$T/ro3") == 2 ]] && ok || bad "read-only index, --stdin: rc $rc $(cat "$T/ro3.err")"
asuser "$BIN/blip-index" --db "$T/dbro" --check >/dev/null 2>"$T/ro4.err" && ok || bad "read-only --check: $(cat "$T/ro4.err")"
[[ $(ls "$T/dbro") == $(ls "$T/db" | grep -v -e '-wal$' -e '-shm$') ]] && ok || bad "a reader wrote into the index: $(ls "$T/dbro")"
chmod -R u+w "$T/dbro"

# the owner updates a read-only index while a session reads it (immutable: it must reopen to see the change)
cp -r "$T/db" "$T/dbim" && chmod -R a-w "$T/dbim"
coproc QI { asuser "$BIN/blip-query" --db "$T/dbim" --model "$MODEL" --stdin --paths -n 50 2>"$T/im.err"; }
qs_pid=$QI_PID qs_in=${QI[1]} qs_out=${QI[0]}
ask "$QUERY"
[[ $(grep -c . <<<"$ans") == 14 ]] && ok || bad "read-only session: $ans $(cat "$T/im.err")"
mkdir -p "$L/c" && "$BIN/gen_photos" "$L/c" 3 --size 64x64 --seed 5 >/dev/null
chmod -R u+w "$T/dbim" && "$BIN/blip-index" --db "$T/dbim" --model "$MODEL" "$L" 2>/dev/null || bad "owner's update"
chmod -R a-w "$T/dbim"
ask "$QUERY"
[[ $(grep -c . <<<"$ans") == 17 && $(grep -c "/lib/c/" <<<"$ans") == 3 ]] && ok ||
  bad "read-only session misses the owner's update: $ans $(cat "$T/im.err")"
eval "exec $qs_in>&-"
wait $qs_pid || bad "read-only session exit $(cat "$T/im.err")"
chmod -R u+w "$T/dbim"

# ---- a reader opening while a writer holds the database lock ----
# A writer's connection can hold SQLite's EXCLUSIVE file lock (the last
# connection's checkpoint on close holds it; so does exclusive locking mode);
# a reader whose first statement meets it must wait (busy timeout), not fail
# with "database is locked". A helper holds the lock for 3 s, and the reader
# starts only once the lock is held.
cp -r "$T/db" "$T/dbl"
q --paths -n 5 "$QUERY" >"$T/lk.want" 2>/dev/null
python3 - "$T/dbl/index.sqlite" >"$T/lk.hold" 2>&1 <<'PY' &
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA locking_mode=EXCLUSIVE")  # keeps the EXCLUSIVE lock until the connection closes
c.execute("BEGIN EXCLUSIVE")
c.execute("UPDATE meta SET value=value WHERE key='generation'")
print("held", flush=True)
time.sleep(3)
c.execute("COMMIT")
c.close()
PY
hpid=$!
for _ in $(seq 600); do grep -q held "$T/lk.hold" && break; kill -0 $hpid 2>/dev/null || break; sleep 0.05; done
grep -q held "$T/lk.hold" && ok || bad "lock holder did not start: $(cat "$T/lk.hold")"
"$BIN/blip-query" --db "$T/dbl" --model "$MODEL" --paths -n 5 "$QUERY" >"$T/lk1" 2>"$T/lk1.err"; rc=$?
wait $hpid || bad "lock holder failed: $(cat "$T/lk.hold")"
[[ $rc == 0 ]] && cmp -s "$T/lk1" "$T/lk.want" && ok || bad "reader beside a held write lock: rc $rc $(cat "$T/lk1.err")"

tally
