#!/usr/bin/env bash
# fms-dyt's Slurm launcher, shared by the sbatch scripts slurm/llama*_*.sh (see docs/slurm.md).
#
# Batch mode, run by an sbatch script inside the job:
#     launch.sh experiment=llama7b_dyt [hydra overrides...]
#   starts one srun task per node (node mode below), keeps the run directory stable across
#   requeues (runs/<job name>-<job id> unless run_dir=... is given), and on SIGUSR1 (from
#   '#SBATCH --signal=B:USR1@<seconds>' or 'scancel --signal=USR1 --batch <job>') asks the trainer
#   to checkpoint and stop, then requeues the job with 'scontrol requeue'. The requeued job runs
#   the same command and train.py resumes from the newest checkpoint in the run directory.
#   A run that fails without having been asked to stop (a rank killed, a node lost, a hung rank
#   found by the watchdog, a node that fails the preflight check) is requeued too, without the node
#   that failed first, up to FMS_DYT_MAX_FAILURES times over the run (python -m fms_dyt.failures
#   decides and records each failure in <run_dir>/failures.jsonl); a configuration error, a
#   diverged run and a full disk are not. A run that finishes is not requeued.
#
# Node mode, one per node:  launch.sh --node [hydra overrides...]
#   runs torchrun with c10d rendezvous on the allocation's first node, one worker per GPU on the
#   node (CPU count when there are none).
#
# Environment knobs:
#   FMS_DYT_NPROC_PER_NODE  workers per node (default: GPUs on the node, else its CPU count)
#   FMS_DYT_RDZV_PORT       rendezvous port on the first node (default: 29500 + job id % 1000)
#   FMS_DYT_RUNS            parent of the default run directories (default: <checkout>/runs)
#   FMS_DYT_PYTHON          python interpreter (default: python3)
#   FMS_DYT_ENV_FILE        a file sourced on every node before torchrun: site NCCL settings
#                           (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...), modules, virtualenvs
#   FMS_DYT_MAX_FAILURES    failures of a run that are requeued (default 3; 0: none)
set -uo pipefail

LAUNCHER=$(readlink -f "${BASH_SOURCE[0]}")
ROOT=$(dirname "$(dirname "$LAUNCHER")")
PYTHON=${FMS_DYT_PYTHON:-python3}
EX_TEMPFAIL=75   # trainer's exit code after a requested stop (docs/architecture.md)

log() { echo "[fms-dyt slurm $(date +%T)${SLURMD_NODENAME:+ $SLURMD_NODENAME}] $*" >&2; }
die() { log "error: $*"; exit 1; }

# Every environment setting of the training processes, in one place.
training_env() {
  export PYTHONUNBUFFERED=1
  # a failed or stuck NCCL collective raises instead of hanging the job until its time limit
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  if [ -n "${FMS_DYT_ENV_FILE:-}" ]; then
    [ -r "$FMS_DYT_ENV_FILE" ] || die "FMS_DYT_ENV_FILE=$FMS_DYT_ENV_FILE is not a readable file"
    # shellcheck disable=SC1090
    source "$FMS_DYT_ENV_FILE"
  fi
}

# Workers per node: GPUs given to this step on this node, else the CPUs.
procs_per_node() {
  if [ -n "${FMS_DYT_NPROC_PER_NODE:-}" ]; then
    [[ $FMS_DYT_NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] \
      || die "FMS_DYT_NPROC_PER_NODE=$FMS_DYT_NPROC_PER_NODE: expected a positive integer"
    echo "$FMS_DYT_NPROC_PER_NODE"
  elif [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]; then
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
  else
    echo "${SLURM_CPUS_ON_NODE:-$(nproc)}"
  fi
}

node_main() {
  training_env
  local nproc master port is_host
  nproc=$(procs_per_node) || exit 1
  master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  port=${FMS_DYT_RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
  # the first node hosts the rendezvous store; don't leave that to hostname matching
  is_host=$([ "${SLURM_NODEID:-0}" = 0 ] && echo 1 || echo 0)
  log "torchrun: node ${SLURM_NODEID:-0}/$SLURM_NNODES, $nproc workers, rendezvous $master:$port"
  # torchrun dies on SIGUSR1, which Slurm delivers to every process of the step: ignoring it here
  # is inherited by torchrun (older versions have no --signals_to_handle); train.py installs its
  # own SIGUSR1 handler, so only the workers act on it.
  trap '' USR1
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$nproc" \
    --rdzv_backend=c10d --rdzv_endpoint="$master:$port" --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_conf="is_host=$is_host" --max_restarts=0 \
    "$ROOT/train.py" "$@"
}

STOP=""     # the signal that asked this job to stop
STEP_PID=""

on_signal() {
  STOP=$1
  log "got SIG$1: asking the trainer to checkpoint and stop"
  # srun passes the signal to every process of the step; the trainer exits after its checkpoint
  [ -n "$STEP_PID" ] && kill -USR1 "$STEP_PID" 2>/dev/null
}

batch_main() {
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with 'sbatch slurm/<run>.sh [overrides]'"
  [ -f "$ROOT/train.py" ] || die "$ROOT/train.py not found: launch.sh must stay in the slurm/ folder of an fms-dyt checkout"
  local args=("$@") a run_dir="" rc r2
  for a in "$@"; do [[ $a == run_dir=* ]] && run_dir=${a#run_dir=}; done
  if [ -z "$run_dir" ]; then
    # job name and id survive requeues, so the requeued job finds its checkpoints here
    run_dir=${FMS_DYT_RUNS:-$ROOT/runs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
    args+=("run_dir=$run_dir")
  fi
  trap 'on_signal USR1' USR1
  # Slurm's own SIGTERM (scancel, time limit, preemption) reaches the trainer directly; keep this
  # shell alive meanwhile, or the step is killed when the batch script ends
  trap 'on_signal TERM' TERM
  log "job $SLURM_JOB_ID (${SLURM_JOB_NAME}) restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST, run_dir=$run_dir"
  log "overrides: ${args[*]}"
  # every rank's account of this attempt goes to <run_dir>/failures/<attempt>/ (fms_dyt/failures.py)
  export FMS_DYT_ATTEMPT="$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"
  local job_log log_offset
  job_log=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdOut=[^ ]*' | cut -d= -f2-)
  log_offset=$(stat -c %s "$job_log" 2>/dev/null || echo 0)
  # a task that fails ends the step on every node at once (Slurm sends SIGCONT, then SIGTERM):
  # the other ranks would otherwise wait for it until their collective timeout
  srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
    bash "$LAUNCHER" --node "${args[@]}" &
  STEP_PID=$!
  [ -n "$STOP" ] && kill -USR1 "$STEP_PID" 2>/dev/null   # a signal that came before srun started
  while :; do
    wait "$STEP_PID"; rc=$?
    # wait returns early (status > 128) when a trapped signal arrives
    if [ "$rc" -gt 128 ] && kill -0 "$STEP_PID" 2>/dev/null; then continue; fi
    if [ "$rc" -gt 128 ]; then wait "$STEP_PID"; r2=$?; [ "$r2" != 127 ] && rc=$r2; fi
    break
  done
  log "training step ended with status $rc"
  if [ "$STOP" = USR1 ] && [ "$rc" != 0 ]; then
    # torchrun reports the trainer's exit 75 as a failure: the stop we asked for is what ended it
    log "requeueing job $SLURM_JOB_ID to resume from the newest checkpoint in $run_dir"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit $EX_TEMPFAIL
    fi
    log "scontrol requeue failed (job submitted with --no-requeue, or requeue disabled here):" \
      "submit the same command again with run_dir=$run_dir to resume"
    exit $EX_TEMPFAIL
  fi
  if [ "$rc" != 0 ] && [ -z "$STOP" ]; then
    # A failure nobody asked for. fms_dyt.failures names the node and the reason, records them and
    # requeues the job when that is worth it; 'scontrol requeue' ends this script with SIGTERM
    # within KillWait, so from here on SIGTERM is ignored (here and in the python it starts) until
    # the excluded node is set on the pending job.
    trap '' TERM
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m fms_dyt.failures decide \
      --run-dir "$run_dir" --job "$SLURM_JOB_ID" --restart "${SLURM_RESTART_COUNT:-0}" --rc "$rc" \
      ${job_log:+--log "$job_log" --log-offset "$log_offset"}
    exit $?
  fi
  exit "$rc"
}

if [ "${1:-}" = --node ]; then
  shift
  node_main "$@"
else
  batch_main "$@"
fi
