#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests marked `slurm` (tests/test_slurm_cluster.py).
#
#   bash launch/testing/slurm-cluster.sh up       # install slurm-wlm + munge if missing, start, wait for idle
#   export SLURM_CONF=/tmp/skipsync-slurm/slurm.conf   # what `up` prints; sinfo, sbatch, ... need it
#   bash launch/testing/slurm-cluster.sh status   # the daemons and the node
#   bash launch/testing/slurm-cluster.sh down     # cancel every job, wait for them, stop the daemons
#
# munged, slurmctld and slurmd run as root, as plain background daemons: no systemd, no cgroups
# (proctrack/linuxproc, task/none), no accounting. Everything they write (config, munge key and
# socket, state, spool, logs, pid files) lives in the state directory, so /etc is never touched and
# `down` stops exactly the daemons `up` recorded. The node gets fake GPUs (gres entries on character
# devices made with mknod, copies of /dev/null) so that `--gpus-per-node=2` works as on a GPU
# cluster; where mknod is refused the node has none.
#
# Environment (all optional):
#   SKIPSYNC_SLURM_DIR        state directory                (default /tmp/skipsync-slurm)
#   SKIPSYNC_SLURM_PARTITION  the one partition's name       (default debug)
#   SKIPSYNC_SLURM_PORT       slurmctld's port, slurmd's + 1 (default 6817)
#   SKIPSYNC_SLURM_GPUS       fake GPUs on the node, 0 for none (default 2)
#   SKIPSYNC_SLURM_TIMEOUT    seconds `up` waits for the node to be idle and `down` for jobs to end
#                             (default 60)
#
# Exit codes: 0 done; 77 no cluster can be had here (not root, no apt-get, install failed), which
# .ci/run reports and the tests turn into a skip; 1 anything else (a daemon failed: see the logs);
# `status` exits 3 when the cluster is down.
set -euo pipefail

STATE="${SKIPSYNC_SLURM_DIR:-/tmp/skipsync-slurm}"
PARTITION="${SKIPSYNC_SLURM_PARTITION:-debug}"
PORT="${SKIPSYNC_SLURM_PORT:-6817}"
TIMEOUT="${SKIPSYNC_SLURM_TIMEOUT:-60}"
GPUS="${SKIPSYNC_SLURM_GPUS:-2}"
EXIT_UNAVAILABLE=77
export SLURM_CONF="$STATE/slurm.conf"
PIDS="$STATE/daemons.pid"  # "name pid" per line, written by `up`, the only processes `down` stops
NODE="$(hostname -s)"

say() { echo "slurm-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }
unavailable() { say "unavailable: $*"; exit "$EXIT_UNAVAILABLE"; }

# ---------------------------------------------------------------------------- install

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sinfo >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || unavailable "slurm-wlm and munge are not installed and there is no apt-get"
  say "installing slurm-wlm and munge with apt-get"
  local log="$STATE/apt.log"
  # An old or empty package list finds nothing: update once, then install.
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
       >"$log" 2>&1; then
    tail -n 5 "$log" >&2
    unavailable "apt-get could not install slurm-wlm and munge (log: $log)"
  fi
}

# ---------------------------------------------------------------------------- config

# Fake GPUs: /dev/null-like character devices, since slurmd only checks that gres files exist.
make_fake_gpus() {
  ((GPUS > 0)) || return 1
  mkdir -p "$STATE/dev"
  local i
  for ((i = 0; i < GPUS; i++)); do
    [[ -c "$STATE/dev/nvidia$i" ]] || mknod "$STATE/dev/nvidia$i" c 1 3 2>/dev/null || return 1
  done
}

write_config() {
  local cpus mem_mb gres_line="" gres_types=""
  cpus="$(nproc)"
  # A bit under the machine's memory (95 %), so slurmd never reports less than configured.
  mem_mb="$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.95 }' /proc/meminfo)"
  if make_fake_gpus; then
    gres_types="GresTypes=gpu"
    gres_line=" Gres=gpu:$GPUS"
    printf 'NodeName=%s Name=gpu File=%s/dev/nvidia[0-%d]\n' "$NODE" "$STATE" $((GPUS - 1)) >"$STATE/gres.conf"
  else
    ((GPUS == 0)) || say "mknod refused: the node has no GPUs"
    : >"$STATE/gres.conf"
  fi
  cat >"$SLURM_CONF" <<EOF
# Written by launch/testing/slurm-cluster.sh: a one-node test cluster, daemons as root.
ClusterName=skipsync
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
# munged's socket is ours; credentials expire after 10 s (not 120) so a requeued job restarts quickly.
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket.2,cred_expire=10
CredType=cred/munge
# No systemd, no cgroups: processes are tracked by parentage and tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
ReturnToService=2
# scancel sends SIGTERM, then SIGKILL after KillWait seconds.
KillWait=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pidfile
SlurmdPidFile=$STATE/slurmd.pidfile
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
$gres_types
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb$gres_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

# ---------------------------------------------------------------------------- daemons

# A recorded pid counts only while it is alive and still the daemon it was (pids are reused).
alive() {
  local name=$1 pid=$2
  [[ -r "/proc/$pid/comm" ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]
}

recorded() {  # prints "name pid" for every recorded daemon that is still running
  [[ -f "$PIDS" ]] || return 0
  local name pid
  while read -r name pid; do
    if alive "$name" "$pid"; then echo "$name $pid"; fi
  done <"$PIDS"
}

# The daemons fork into the background themselves and write their pid files; copy each into $PIDS.
record_from_pidfile() {
  local name=$1 pidfile=$2 pid="" i
  for ((i = 0; i < 100; i++)); do
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && alive "$name" "$pid"; then
      echo "$name $pid" >>"$PIDS"
      return
    fi
    sleep 0.1
  done
  die "$name did not start (log: $3)"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | sed -n 1p; }

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) state=""
  while ((SECONDS < deadline)); do
    state="$(node_state || true)"
    [[ "$state" == idle || "$state" == mixed || "$state" == allocated ]] && return
    sleep 0.2
  done
  die "node $NODE not idle after ${TIMEOUT}s (state: '${state:-no answer from slurmctld}'; logs in $STATE)"
}

# TERM the named recorded daemons together, wait up to 10 s for them, then KILL what is left.
stop_named() {
  local name n pid i left
  for name in "$@"; do
    while read -r n pid; do
      if [[ "$n" == "$name" ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
    done < <(recorded)
  done
  for ((i = 0; i < 100; i++)); do
    left="$(recorded | awk -v names=" $* " 'index(names, " " $1 " ") { print $2 }')"
    [[ -z "$left" ]] && return
    sleep 0.1
  done
  say "still running after 10 s, killing: $left"
  for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
}

stop_recorded() {
  # Together: each takes 1.5-2 s to stop, and with no job left they have nothing to tell each other.
  stop_named slurmd slurmctld munged
  rm -f "$PIDS"
}

ms() { date +%s%3N; }
elapsed() { local t=$(($(ms) - $1)); printf '%d.%03d s' $((t / 1000)) $((t % 1000)); }

cmd_up() {
  local start
  start="$(ms)"
  [[ "$(id -u)" -eq 0 ]] || unavailable "the test cluster's daemons run as root; run this as root"
  mkdir -p "$STATE"
  chmod 700 "$STATE"  # the munge key and a root-run cluster's config: root's alone
  if [[ "$(recorded | wc -l)" -eq 3 ]]; then
    wait_idle
    say "already up (partition $PARTITION, node $NODE); export SLURM_CONF=$SLURM_CONF"
    return
  fi
  install_packages
  stop_recorded  # a half-up cluster from before: start afresh
  rm -rf "$STATE/ctld" "$STATE/spool" "$STATE/munge"
  mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/munge"
  chmod 700 "$STATE/munge"
  : >"$PIDS"
  write_config

  # A fresh key per cluster: only our munged and our Slurm daemons share it.
  rm -f "$STATE/munge/munge.key"
  mungekey --create --keyfile="$STATE/munge/munge.key" >/dev/null
  chmod 600 "$STATE/munge/munge.key"
  munged --force --socket="$STATE/munge/munge.socket.2" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munged.log" \
    --seed-file="$STATE/munge/munged.seed" || die "munged did not start (log: $STATE/munged.log)"
  record_from_pidfile munged "$STATE/munge/munged.pid" "$STATE/munged.log"
  : >"$STATE/slurmctld.log"
  : >"$STATE/slurmd.log"
  slurmctld -f "$SLURM_CONF" || die "slurmctld did not start (log: $STATE/slurmctld.log)"
  record_from_pidfile slurmctld "$STATE/slurmctld.pidfile" "$STATE/slurmctld.log"
  slurmd -f "$SLURM_CONF" || die "slurmd did not start (log: $STATE/slurmd.log)"
  record_from_pidfile slurmd "$STATE/slurmd.pidfile" "$STATE/slurmd.log"
  wait_idle
  say "up in $(elapsed "$start"): partition $PARTITION, node $NODE ($(sinfo -h -o '%c CPUs, %m MB, %G')); export SLURM_CONF=$SLURM_CONF"
}

cmd_down() {
  local start
  start="$(ms)"
  [[ "$(id -u)" -eq 0 ]] || unavailable "the test cluster's daemons run as root; run this as root"
  if [[ -z "$(recorded)" ]]; then
    rm -f "$PIDS"
    say "not up"
    return
  fi
  # A running job's slurmstepd outlives slurmd: end the jobs while the daemons can still do it.
  if [[ -n "$(recorded | awk '$1 == "slurmctld"')" ]]; then
    scancel --full --quiet --partition="$PARTITION" 2>/dev/null || true
    local deadline=$((SECONDS + TIMEOUT))
    while [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; do
      ((SECONDS < deadline)) || { say "jobs still queued after ${TIMEOUT}s: $(squeue -h -o '%i %T' | tr '\n' ' ')"; break; }
      sleep 0.2
    done
  fi
  stop_recorded
  say "down in $(elapsed "$start")"
}

cmd_status() {
  local r
  r="$(recorded)"
  if [[ -z "$r" ]]; then
    echo "down"
    return 3
  fi
  echo "$r" | sed 's/^/daemon /'
  sinfo -N -o '%N %P %T %c %m %G' 2>&1 || true
  squeue 2>&1 || true
  echo "export SLURM_CONF=$SLURM_CONF"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
