#!/bin/bash
# test_offline: change detection that cannot be fooled into forgetting.
# A photo that failed for a reason that passes (permission denied, vanished,
# changed while read) is retried on the next run; a permanent failure is not
# retried until its content changes, even when size and mtime were restored;
# every run reports the failed photos of the whole index. Rows under a folder
# that could not be read, under a missing root or under a drive that is not
# mounted (its mount point on another device than recorded, or an empty
# root) are kept offline, out of query results, and come back without model
# work; --prune-offline deletes them. Permissions need a non-root user: as
# root the tools run as nobody, and the test fails if it cannot switch.
set -u
BIN=$(cd "${BLIP_BIN:-build}" && pwd)
DATA=$(cd "${BLIP_TEST_DATA:-tests/data}" && pwd)
MODEL=$DATA/blip-tiny
T=$(mktemp -d /tmp/blip_test_offline.XXXXXX)
SHM=$(mktemp -d /dev/shm/blip_test_offline.XXXXXX)
trap 'chmod -R u+rwX "$T" 2>/dev/null; rm -rf "$T" "$SHM"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/tally.sh"
asuser() { if [[ $(id -u) == 0 ]]; then setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$@"; else "$@"; fi; }
idx() { asuser "$BIN/blip-index" --db "$T/db" --model "$MODEL" --json "$@" 2>>"$T/idx.err"; }
dump() { asuser "$BIN/blip-index" --db "$T/db" --dump; }
paths() { asuser "$BIN/blip-query" --db "$T/db" --model "$MODEL" --paths -n 50 "a dog on a beach" 2>/dev/null; }

L=$T/lib
mkdir -p "$L/a" "$L/b" "$T/lib2"
"$BIN/gen_photos" "$L/a" 6 --size 64x64 >/dev/null || bad "gen_photos"
"$BIN/gen_photos" "$L/b" 5 --size 64x64 --seed 2 --ext png >/dev/null
"$BIN/gen_photos" "$T/lib2" 3 --size 64x64 --seed 3 >/dev/null
"$BIN/gen_photos" "$SHM" 4 --size 64x64 --seed 4 >/dev/null
ln -s "$SHM" "$L/usb" # a folder on another device: a drive mounted inside the library
[[ $(stat -c %d "$SHM") != $(stat -c %d "$T") ]] && ok || bad "/dev/shm is on the device of /tmp: no second device"
chmod 755 "$T"
[[ $(id -u) == 0 ]] && chown -R nobody:nogroup "$T" "$SHM"
asuser sh -c 'test "$(id -u)" != 0' && ok || bad "could not drop privileges to nobody"

out=$(idx "$L" "$T/lib2") || bad "first run: $(cat "$T/idx.err")"
expect first "$out" added=18 failed=0 offline=0
dump >"$T/dump0"

# ---- transient failures are retried ----
# New photos of a size no row has: nothing reads them before the decoder does.
newphoto() { "$BIN/gen_photos" "$L/a" 1 --size 64x64 --seed "$1" --start "$1" >/dev/null && head -c "$2" /dev/urandom >>"$L/a/img000$1.jpg"; }
newphoto 50 12345
chmod 000 "$L/a/img00050.jpg"
out=$(idx "$L" "$T/lib2")
expect unreadable "$out" added=0 failed=1
chmod 644 "$L/a/img00050.jpg" # readable again, same size and mtime
out=$(idx "$L" "$T/lib2")
expect readable-again "$out" retried=1 updated=1 failed=0
asuser "$BIN/blip-index" --db "$T/db" --errors --model "$MODEL" "$L" "$T/lib2" 2>/dev/null | grep -q img00050 &&
  bad "a file unreadable once stays an error" || ok
# faulty FILE SYSCALLS ERRNO: one run where those calls on FILE fail (LeakSanitizer cannot run under ptrace)
faulty() {
  ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 \
    asuser strace -f -qq -o /dev/null -P "$1" -e trace="$2" -e inject="$2":error="$3" \
    "$BIN/blip-index" --db "$T/db" --model "$MODEL" --json "$L" "$T/lib2" 2>/dev/null
}
# vanished while being indexed (ENOENT at open), back since with the same size and mtime
newphoto 51 23456
out=$(faulty "$L/a/img00051.jpg" openat ENOENT)
expect vanished "$out" added=0 failed=1
out=$(idx "$L" "$T/lib2")
expect vanished-back "$out" retried=1 updated=1 failed=0
# an I/O error while decoding (which the decoder reports as a corrupt file)
newphoto 52 34567
out=$(faulty "$L/a/img00052.jpg" read,pread64 EIO)
expect eio "$out" added=0 failed=1
out=$(idx "$L" "$T/lib2")
expect eio-back "$out" retried=1 updated=1 failed=0
rm "$L/a/img00050.jpg" "$L/a/img00051.jpg" "$L/a/img00052.jpg"
out=$(idx "$L" "$T/lib2")
expect removed "$out" deleted=3 failed=0

# ---- a permanent failure is not retried until its content changes ----
cp -p "$L/a/img00004.jpg" "$T/good.jpg"
{ head -c 64 /dev/zero; tail -c +65 "$T/good.jpg"; } >"$L/a/img00004.jpg" # same size: an unsupported file
touch -r "$T/good.jpg" "$L/a/img00004.jpg"
touch -d "2001-01-01" "$L/a/img00004.jpg" # changed mtime: decoded (and fails) once
out=$(idx "$L" "$T/lib2")
expect corrupt "$out" updated=0 failed=1
out=$(idx "$L" "$T/lib2")
expect corrupt-rerun "$out" retried=0 updated=0 added=0 failed=1 # reported on every run, not re-decoded
cp "$T/good.jpg" "$L/a/img00004.jpg" && touch -d "2001-01-01" "$L/a/img00004.jpg" # restored: same size and mtime
out=$(idx "$L" "$T/lib2")
expect restored "$out" updated=1 failed=0

# ---- a folder that cannot be read keeps its rows, offline ----
dump >"$T/dump1"
chmod 000 "$L/b"
out=$(idx "$L" "$T/lib2")
expect unreadable-folder "$out" deleted=0 offline=5 added=0
paths >"$T/p1"
[[ $(grep -c "/lib/b/" "$T/p1") == 0 && $(wc -l <"$T/p1") == 13 ]] && ok || bad "offline photos in results: $(cat "$T/p1")"
asuser "$BIN/blip-index" --db "$T/db" --check >/dev/null 2>&1 && ok || bad "--check with offline rows"
chmod 755 "$L/b"
out=$(idx "$L" "$T/lib2")
expect folder-back "$out" deleted=0 offline=0 added=0 updated=0 unchanged=18
dump >"$T/dump2"
cmp -s "$T/dump1" "$T/dump2" && ok || bad "rows changed across an unreadable run"
[[ $(paths | wc -l) == 18 ]] && ok || bad "back-online photos missing from results"

# ---- a missing root (a drive's folder that is not there) ----
mv "$T/lib2" "$T/lib2.away"
out=$(idx "$L" "$T/lib2"); rc=$?
[[ $rc == 0 ]] && ok || bad "missing root: rc $rc"
expect missing-root "$out" deleted=0 offline=3
mv "$T/lib2.away" "$T/lib2"
out=$(idx "$L" "$T/lib2")
expect root-back "$out" deleted=0 offline=0 added=0
asuser "$BIN/blip-index" --db "$T/db" --model "$MODEL" "$T/nosuchdir" >/dev/null 2>"$T/typo.err"; rc=$?
[[ $rc == 1 ]] && grep -q "No such file" "$T/typo.err" && ok || bad "a root never indexed and missing: rc $rc"

# ---- an unmounted drive: its mount point is an empty folder on the parent's device ----
rm "$L/usb" && mkdir "$L/usb" && [[ $(id -u) == 0 ]] && chown nobody:nogroup "$L/usb"
out=$(idx "$L" "$T/lib2")
expect unmounted "$out" deleted=0 offline=4
grep -q "another device" "$T/idx.err" && ok || bad "no word about the unmounted drive"
rmdir "$L/usb" && ln -s "$SHM" "$L/usb"
out=$(idx "$L" "$T/lib2")
expect remounted "$out" deleted=0 offline=0 added=0 unchanged=18
# the drive back under another device number, one photo deleted meanwhile: a deletion, not an absence
mkdir "$T/usb2" && cp -p "$SHM"/*.jpg "$T/usb2/" && rm "$T/usb2/img00000.jpg"
[[ $(id -u) == 0 ]] && chown -R nobody:nogroup "$T/usb2"
rm "$L/usb" && ln -s "$T/usb2" "$L/usb"
out=$(idx "$L" "$T/lib2")
expect renumbered "$out" deleted=1 offline=0 added=0 unchanged=17
rm "$L/usb" && ln -s "$SHM" "$L/usb" && rm "$SHM/img00000.jpg"

# ---- an empty root (an empty mount point given as the root) ----
mv "$T/lib2" "$T/lib2.full" && mkdir "$T/lib2" && [[ $(id -u) == 0 ]] && chown nobody:nogroup "$T/lib2"
out=$(idx "$L" "$T/lib2")
expect empty-root "$out" deleted=0 offline=3

# ---- --prune-offline deletes what cannot be seen ----
out=$(idx --prune-offline "$L" "$T/lib2")
expect prune "$out" deleted=3 offline=0
[[ $(dump | grep -c "/lib2/") == 0 ]] && ok || bad "--prune-offline left rows"

tally
