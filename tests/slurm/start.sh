#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests (.ci/run starts it; the tests'
# slurm fixture starts it if it is not up): Debian's slurmctld, slurmd and munge, as root, CPU
# only (no gres: run.sh asks for a GPU in the GPU profile only). The configuration is written
# here, into DIR, with ports of its own, so that a machine's own Slurm is left alone; a munged
# already running is used as it is. Idempotent: a cluster already answering is left running.
# Prints the configuration's path: SLURM_CONF=DIR/slurm.conf selects this cluster.
#
#   tests/slurm/start.sh [DIR]        default /tmp/autoresearch-slurm
#   tests/slurm/start.sh --stop [DIR]
set -euo pipefail
stop=0
if [ "${1:-}" = --stop ]; then stop=1; shift; fi
dir=${1:-/tmp/autoresearch-slurm}
conf=$dir/slurm.conf
export SLURM_CONF=$conf

# stop DAEMON: the daemon of this cluster's pid file, if it is still that daemon
stop() {
  local pid
  pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 0
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$1" ] || kill "$pid"
}
# up: the controller answers and the node takes jobs (idle, or busy with some)
up() { [ -f "$conf" ] && timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)$'; }

if [ "$stop" = 1 ]; then stop slurmd; stop slurmctld; exit 0; fi
for tool in munged slurmctld slurmd srun; do
  command -v "$tool" >/dev/null || { echo "start.sh: $tool is not installed (apt-get install slurm-wlm munge)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "start.sh: the test cluster runs as root (SlurmUser=root)" >&2; exit 2; }

if up; then echo "$conf"; exit 0; fi

# munge: the daemon that vouches for users between slurm's processes
if ! timeout 5 munge -n </dev/null >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1k count=1 2>/dev/null; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if id munge >/dev/null 2>&1; then
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged
  else
    munged --force
  fi
fi

host=$(hostname -s)
mkdir -p "$dir/state" "$dir/spool"
cat >"$conf" <<CONF
ClusterName=autoresearch-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
echo 'include /etc/slurm/plugstack.conf.d/*' >"$dir/plugstack.conf"

stop slurmd; stop slurmctld
slurmctld -c   # -c: no jobs or node states from an earlier start
slurmd
for _ in $(seq 100); do
  if up; then echo "$conf"; exit 0; fi
  sleep 0.2
done
echo "start.sh: the cluster did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2
exit 1
