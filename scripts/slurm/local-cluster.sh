#!/bin/bash
# local-cluster.sh: a real single-node Slurm cluster on this machine, for
# tests and for trying the scripts here: munged, slurmctld and slurmd with
# every file (config, key, state, logs, sockets) inside DIR, on free loopback
# ports. Needs root and Debian's slurm-wlm and munge (scripts/install-deps.sh).
#   scripts/slurm/local-cluster.sh start DIR   # then: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm/local-cluster.sh stop DIR
set -euo pipefail
cmd=${1:-} D=${2:-}
[ -n "$cmd" ] && [ -n "$D" ] || { sed -n '2,8p' "$0" >&2; exit 2; }
die() { echo "local-cluster: $*" >&2; exit 1; }

stop() {
  [ -f "$D/slurm.conf" ] && SLURM_CONF=$D/slurm.conf scontrol shutdown >/dev/null 2>&1 || true
  for p in slurmd slurmctld munge/munged; do
    [ -f "$D/$p.pid" ] && kill "$(cat "$D/$p.pid")" 2>/dev/null || true
  done
  sleep 0.5
  for p in slurmd slurmctld munge/munged; do
    [ -f "$D/$p.pid" ] && kill -9 "$(cat "$D/$p.pid")" 2>/dev/null || true
    rm -f "$D/$p.pid"
  done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || die "unknown command $cmd"
[ "$(id -u)" = 0 ] || die "needs root (slurmd runs jobs as their users)"
for b in munged slurmctld slurmd sbatch sinfo; do
  command -v "$b" >/dev/null || die "$b not found: install slurm-wlm and munge (scripts/install-deps.sh)"
done
mkdir -p "$D/state" "$D/spool" "$D/log" "$D/munge"
D=$(cd "$D" && pwd)
chmod 700 "$D/munge"
[ -f "$D/munge/munge.key" ] || { dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 2>/dev/null; chmod 400 "$D/munge/munge.key"; }
munged -f --socket="$D/munge/munge.sock" --key-file="$D/munge/munge.key" --log-file="$D/log/munged.log" \
  --pid-file="$D/munge/munged.pid" --seed-file="$D/munge/seed" || die "munged did not start: $(tail -3 "$D/log/munged.log")"
ports=$(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')
read -r p1 p2 <<<"$ports"
host=$(hostname -s)
cpus=$(nproc)
cat >"$D/slurm.conf" <<CONF
ClusterName=blipsearch-local
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldPort=$p1
SlurmdPort=$p2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
PlugStackConfig=/dev/null
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF=$D/slurm.conf
slurmctld -f "$SLURM_CONF" -i || die "slurmctld did not start: $(tail -5 "$D/log/slurmctld.log" 2>/dev/null)"
slurmd -f "$SLURM_CONF" || die "slurmd did not start: $(tail -5 "$D/log/slurmd.log" 2>/dev/null)"
for _ in $(seq 100); do
  if sinfo -h -o %t 2>/dev/null | grep -qx idle; then echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 0.2
done
stop
die "the node did not come up: $(tail -5 "$D/log/slurmctld.log" "$D/log/slurmd.log" 2>/dev/null)"
