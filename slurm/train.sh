#!/usr/bin/env bash
# Train on a SLURM cluster: one torchrun agent per node (c10d rendezvous), one worker per GPU.
#
#   sbatch slurm/train.sh [CONFIG] [section.key=value ...]
#   sbatch --nodes=4 --partition=gpu --account=proj slurm/train.sh configs/gpu-8x.yaml data.root=/shared/shards
#
# Submit from the repository root (the job runs in $SLURM_SUBMIT_DIR). Everything else comes from
# SLURM's environment: node count, GPUs per node, head node, rendezvous id and port. The #SBATCH
# lines are defaults; options on the sbatch command line override them (see slurm/README.md).
# DeepSpeed is a config key (parallel.backend=deepspeed), not another script.
#
# Preemption and time limits: SLURM sends SIGUSR1 300 s before the limit (or `scancel -s USR1 -b JOB`).
# This script forwards it to the torchrun agents, which forward it to their workers and then wait
# (up to SHUTDOWN_TIMEOUT s) instead of restarting them; every rank finishes its step, rank 0 writes
# a checkpoint, and the job requeues itself. The requeued job (same id, SLURM_RESTART_COUNT+1) resumes
# from that checkpoint (run.resume=auto) into the same TensorBoard run. Without scontrol it says so
# and exits 75 (EX_TEMPFAIL: resumable; submit again).
#
# Environment knobs (all optional): PYTHON (default .venv/bin/python, else python3), NPROC_PER_NODE
# (default: the GPUs SLURM gave this node, checked against nvidia-smi -L; see below), RDZV_PORT (default 20000 + job id % 10000),
# MAX_RESTARTS (elastic restarts after a worker dies, default 3), SHUTDOWN_TIMEOUT (default 240),
# DRY_RUN=1 (print the command and exit). NCCL_* and other variables pass through to every rank.
#
#SBATCH --job-name=unetdist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

EXIT_RESUMABLE=75

log() { echo "train.sh [$(date +%FT%T)] $*" >&2; }
die() { log "error: $*"; exit 2; }

preempted=0
srun_pid=""
# shellcheck disable=SC2317  # called by the trap
on_usr1() {
  if [ "$preempted" = 1 ]; then return; fi
  preempted=1
  log "SIGUSR1 (time limit or preemption): asking every rank to finish its step and write a checkpoint"
  if [ -n "$srun_pid" ]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi
}
trap on_usr1 USR1

[ -n "${SLURM_JOB_ID:-}" ] || die "no SLURM_JOB_ID: submit with sbatch (or use launch/torchrun.sh without SLURM)"
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f launch/common.sh ] || die "submit from the unetdist repository root (no launch/common.sh in $PWD)"
# shellcheck source=launch/common.sh
. launch/common.sh

CONFIG=${1:-configs/default.yaml}
if [ $# -gt 0 ]; then shift; fi
case "$CONFIG" in *=*) die "the first argument is the config file, got '$CONFIG' (sbatch slurm/train.sh CONFIG key=value ...)";; esac
[ -f "$CONFIG" ] || die "config file '$CONFIG' not found (relative paths start at $PWD)"

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NNODES=${SLURM_JOB_NUM_NODES:?SLURM_JOB_NUM_NODES is not set}
# GPUs per node, said out loud: SLURM_GPUS_ON_NODE (GPUs tracked by SLURM), else SLURM_GPUS_PER_NODE
# (--gpus-per-node: "8", "h100:8", "a100:2,v100:2"), else the CUDA_VISIBLE_DEVICES SLURM set; cross-checked
# with `nvidia-smi -L` on this node (fewer GPUs there than SLURM claims: use those; none from SLURM: use them).
count_gpus_per_node() {  # "[type:]count[,[type:]count...]" -> total count, or nothing
  local total=0 part n
  for part in ${1//,/ }; do
    n=${part##*:}; n=${n%%(*}
    [[ "$n" =~ ^[0-9]+$ ]] || return 0
    total=$((total + n))
  done
  echo "$total"
}
choose_nproc() {
  local slurm="" from="" smi=""
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then slurm=$SLURM_GPUS_ON_NODE; from="SLURM_GPUS_ON_NODE=$SLURM_GPUS_ON_NODE"
  elif [ -n "${SLURM_GPUS_PER_NODE:-}" ] && slurm=$(count_gpus_per_node "$SLURM_GPUS_PER_NODE") && [ -n "$slurm" ]; then
    from="SLURM_GPUS_PER_NODE=$SLURM_GPUS_PER_NODE"
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    slurm=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true); from="CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  fi
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    smi=$(nvidia-smi -L | grep -c '^GPU' || true)
  fi
  if [ -n "$slurm" ] && [ -n "$smi" ] && [ "$smi" -lt "$slurm" ]; then
    log "warning: $from but nvidia-smi -L lists $smi GPU(s) on $(hostname): starting $smi process(es) per node"
    NPROC_PER_NODE=$smi
  elif [ -n "$slurm" ] && [ "$slurm" -gt 0 ]; then
    NPROC_PER_NODE=$slurm
    log "$NPROC_PER_NODE process(es) per node, from $from${smi:+ (nvidia-smi -L lists $smi)}"
  elif [ -n "$smi" ] && [ "$smi" -gt 0 ]; then
    NPROC_PER_NODE=$smi
    log "warning: SLURM gives no GPU count (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE unset): using the $smi GPU(s)" \
      "nvidia-smi -L lists on $(hostname); request GPUs with --gpus-per-node, or set NPROC_PER_NODE"
  else
    NPROC_PER_NODE=1
    log "warning: no GPUs found (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, CUDA_VISIBLE_DEVICES unset, no nvidia-smi):" \
      "starting 1 process per node; request GPUs with --gpus-per-node, or set NPROC_PER_NODE"
  fi
}
if [ -n "${NPROC_PER_NODE:-}" ]; then log "$NPROC_PER_NODE process(es) per node, from NPROC_PER_NODE"; else choose_nproc; fi
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

if command -v scontrol >/dev/null; then
  HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
  HEAD=$(hostname)  # the batch script runs on the allocation's first node
  log "scontrol not found: using this node ($HEAD) as the rendezvous head"
fi
if [ "$NNODES" -gt 1 ]; then
  head_addr=$(getent ahosts "$HEAD" | awk 'NR == 1 { print $1 }')
  case "$head_addr" in
    "") die "head node '$HEAD' does not resolve on $(hostname)";;
    127.*|::1) die "head node '$HEAD' resolves to the loopback address $head_addr, so the other $((NNODES - 1))" \
      "node(s) cannot reach it. Fix the node's /etc/hosts (Debian maps the own hostname to 127.0.1.1) or DNS.";;
  esac
  log "head node $HEAD ($head_addr)"
fi

export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # elastic restarts hang or fail on stale keys otherwise (pytorch issue 135712)
# One agent per node. When the first agent ends, the others get 60 s to end too (a stop for preemption ends
# them all within seconds); then srun kills the rest, so a dead node cannot leave ranks hanging in a collective.
# Not --kill-on-bad-exit=1: after a stop signal every agent exits non-zero, and rank 0 must not be killed
# while it closes its TensorBoard file.
cmd=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --wait=60)
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
cmd+=("$PYTHON" -m unetdist.parallel.agent  # torchrun that keeps exit 2 (config error: no restart) and 75 (resumable)
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE"
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID"
  --max-restarts="${MAX_RESTARTS:-3}"
  --signals-to-handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" --shutdown-timeout="${SHUTDOWN_TIMEOUT:-240}"
  -m unetdist.train --config "$CONFIG" "$@")

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) [$SLURM_JOB_NODELIST], $NPROC_PER_NODE process(es) per node"
nccl=$(env | grep -E '^NCCL_' | tr '\n' ' ' || true)
if [ -n "$nccl" ]; then log "passing through: $nccl"; fi
log "running: $(quote "${cmd[@]}")"
if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi

rc=$EXIT_RESUMABLE  # stays so if the signal comes before srun starts
if [ "$preempted" = 0 ]; then
  rc=0
  "${cmd[@]}" &
  srun_pid=$!
  if [ "$preempted" = 1 ]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi
  wait "$srun_pid" || rc=$?
  while kill -0 "$srun_pid" 2>/dev/null; do  # a trapped signal interrupts wait: keep waiting
    rc=0
    wait "$srun_pid" || rc=$?
  done
fi

if [ "$preempted" = 0 ] || [ "$rc" = 0 ]; then  # 0: training was over before the signal mattered
  log "training ended with exit code $rc"
  exit "$rc"
fi
log "stopped for preemption (srun exit code $rc); the newest checkpoint is complete"
if ! command -v scontrol >/dev/null; then
  log "scontrol not found (a container?): cannot requeue; the run is resumable: submit the same command again (exit $EXIT_RESUMABLE)"
  exit "$EXIT_RESUMABLE"
fi
log "requeueing job $SLURM_JOB_ID: it will resume from the newest checkpoint"  # before: the requeue ends this script
if scontrol requeue "$SLURM_JOB_ID"; then
  exit 0
fi
log "scontrol requeue $SLURM_JOB_ID failed; the run is resumable: submit the same command again (exit $EXIT_RESUMABLE)"
exit "$EXIT_RESUMABLE"
