#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine, for fms-dyt's Slurm tests (tests/test_slurm.py).
# The tests never run this (it installs packages and writes /etc): .ci/run does, or you do.
#
#   bash .ci/slurm_cluster.sh up       install Debian's slurmctld/slurmd/slurm-client/munge if missing,
#                                      start munged + slurmctld + one slurmd per emulated node, wait
#                                      until every node is idle. Safe to run again: a cluster already
#                                      running with the same settings is left alone.
#   bash .ci/slurm_cluster.sh down     stop the daemons (by their pid files) and clear Slurm's state.
#   bash .ci/slurm_cluster.sh status   exit 0 when the cluster answers and all nodes are idle.
#
# Needs root and no systemd. Settings (environment):
#   FMS_DYT_SLURM_NODES=2        emulated compute nodes node1..nodeN: one slurmd each, ports 17001..
#   FMS_DYT_SLURM_GPUS=8         fake GPUs per node (character devices aliasing /dev/null), so the
#                                paper's '#SBATCH --gres=gpu:8' is accepted and jobs get
#                                CUDA_VISIBLE_DEVICES; there is still no CUDA.
#   FMS_DYT_SLURM_CPUS=$(nproc)  CPUs each node claims (the nodes share this machine's cores)
#   FMS_DYT_SLURM_MEM_MB=4000    memory each node claims
#   FMS_DYT_SLURM_PARTITION=debug
# Exit codes: 0 ok, 2 Slurm cannot be installed or started here, 1 other errors.
set -euo pipefail

NODES=${FMS_DYT_SLURM_NODES:-2}
GPUS=${FMS_DYT_SLURM_GPUS:-8}
CPUS=${FMS_DYT_SLURM_CPUS:-$(nproc)}
MEM=${FMS_DYT_SLURM_MEM_MB:-4000}
PARTITION=${FMS_DYT_SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
FAKE_GPU_DIR=/var/lib/fms-dyt-fakegpu
HOST=$(hostname -s)

log() { echo "[slurm_cluster $(date +%T)] $*" >&2; }
unavailable() { log "Slurm unavailable: $*"; exit 2; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || unavailable "no apt-get on this machine"
  log "apt-get install slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  local apt_log=/var/log/fms-dyt-slurm-apt.log
  apt-get update -qq >"$apt_log" 2>&1 || log "apt-get update failed, trying the cached package lists"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >>"$apt_log" 2>&1 \
    || { tail -20 "$apt_log" >&2; unavailable "apt-get install failed (log: $apt_log)"; }
}

start_munge() {
  # postinst normally creates the key; a minimal image may not have run it
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 0700 /etc/munge; chmod 0600 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge     # systemd-tmpfiles would create /run/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 0755 /run/munge
  if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged || unavailable "munged does not start"
  fi
  for _ in $(seq 50); do
    munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  unavailable "munge does not answer"
}

# The wanted slurm.conf on stdout; compared with the installed one to decide whether to restart.
render_conf() {
  local gres=""
  [ "$GPUS" -gt 0 ] && gres="Gres=gpu:$GPUS"
  cat <<EOF
# written by fms-dyt .ci/slurm_cluster.sh: $NODES emulated nodes on one host
ClusterName=fmsdyt
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# no cgroups in a container: track processes by parentage, no binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd (sacct unavailable): finished jobs stay visible to scontrol for MinJobAge seconds
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.txt
MinJobAge=3600
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# believe the CPU/GPU counts below although this host has fewer
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
GresTypes=gpu
NodeName=node[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-$((17000 + NODES)) CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM $gres State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

running() {
  pid_alive /run/slurmctld.pid || return 1
  local i
  for i in $(seq "$NODES"); do pid_alive "/run/slurmd-node$i.pid" || return 1; done
}

nodes_idle() {
  local states
  states=$(sinfo -h -o '%T' 2>/dev/null | sort -u | tr -d '\n') || return 1
  [ "$states" = idle ]
}

down() {
  local f p
  for f in /run/slurmd-*.pid /run/slurmctld.pid; do
    [ -s "$f" ] || continue
    p=$(cat "$f")
    if kill "$p" 2>/dev/null; then
      for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      log "stopped pid $p ($f)"
    fi
    rm -f "$f"
  done
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
}

up() {
  if [ "$(id -u)" != 0 ]; then
    nodes_idle && { log "not root: using the cluster already running"; return 0; }
    unavailable "starting a cluster needs root"
  fi
  install_packages
  start_munge
  mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
  local want
  want=$(render_conf)
  if running && [ -f "$CONF" ] && [ "$want" = "$(cat "$CONF")" ]; then
    log "already running with these settings"
  else
    running && log "settings changed: restarting"
    down
    # the emulated node names must resolve (torchrun's rendezvous host is the first node)
    if ! getent hosts node1 >/dev/null; then
      echo "127.0.0.1 $(seq -f 'node%g' -s ' ' "$NODES")" >> /etc/hosts \
        || unavailable "cannot add node1..node$NODES to /etc/hosts"
    fi
    rm -f "$GRES_CONF"
    if [ "$GPUS" -gt 0 ]; then
      mkdir -p "$FAKE_GPU_DIR"      # Slurm only accepts device files as GPUs: alias /dev/null (1,3)
      for i in $(seq 0 $((GPUS - 1))); do
        [ -c "$FAKE_GPU_DIR/gpu$i" ] || mknod "$FAKE_GPU_DIR/gpu$i" c 1 3 \
          || unavailable "cannot create the fake GPU device $FAKE_GPU_DIR/gpu$i"
      done
      echo "NodeName=node[1-$NODES] Name=gpu File=$FAKE_GPU_DIR/gpu[0-$((GPUS - 1))]" > "$GRES_CONF"
    fi
    echo "$want" > "$CONF"
    for i in $(seq "$NODES"); do mkdir -p "/var/spool/slurmd/node$i"; done
    /usr/sbin/slurmctld || unavailable "slurmctld does not start (see /var/log/slurm/slurmctld.log)"
    for i in $(seq "$NODES"); do
      /usr/sbin/slurmd -N "node$i" || unavailable "slurmd node$i does not start (see /var/log/slurm/)"
    done
  fi
  for _ in $(seq 120); do nodes_idle && break; sleep 0.5; done
  if ! nodes_idle; then
    # a node left DOWN by an earlier crash: ReturnToService does not cover every case
    scontrol update NodeName="node[1-$NODES]" State=RESUME 2>/dev/null || true
    for _ in $(seq 20); do nodes_idle && break; sleep 0.5; done
  fi
  nodes_idle || { sinfo -N >&2 || true; unavailable "nodes did not become idle"; }
  sinfo -N -o '%N %P %T %c %m %G' >&2
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) running && nodes_idle ;;
  *) echo "usage: $0 [up|down|status]" >&2; exit 1 ;;
esac
