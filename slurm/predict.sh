#!/usr/bin/env bash
# Predict on a SLURM cluster: one torchrun agent per node (c10d rendezvous), one worker per GPU.
#
#   sbatch slurm/predict.sh --model MODEL --images INPUT... --out DIR [unetdist predict options]
#   sbatch --nodes=4 --partition=gpu slurm/predict.sh --model runs/nuclei --images '/data/slides/*.ome.tif' --out /data/pred
#
# The counterpart of slurm/train.sh (same conventions: submit from the repository root, #SBATCH lines
# are defaults that sbatch options override). All ranks of all nodes share the work: every input is cut
# into units (a chunk row of a frame), each rank writes its units' chunks into the output stores itself.
#
# Time limits and preemption: a unit's completion record is written after its chunks, so a killed
# prediction loses at most the units in flight. SLURM sends SIGUSR1 300 s before the limit (or
# `scancel -s USR1 -b JOB`); this script then stops the ranks and requeues the job, which continues
# from the units already done (no --overwrite: with it, the partial work would be thrown away). Without
# scontrol it exits 75 (EX_TEMPFAIL): submit the same command again to continue.
#
# Environment knobs (all optional): PYTHON (default .venv/bin/python, else python3), NPROC_PER_NODE
# (default: the GPUs SLURM gave this node, cross-checked with nvidia-smi -L, as in slurm/train.sh), RDZV_PORT (default 20000 + job id % 10000),
# DRY_RUN=1 (print the command and exit). NCCL_* and other variables pass through to every rank.
#
#SBATCH --job-name=unetdist-predict
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

EXIT_RESUMABLE=75

log() { echo "predict.sh [$(date +%FT%T)] $*" >&2; }
die() { log "error: $*"; exit 2; }

stopping=0
srun_pid=""
# shellcheck disable=SC2317  # called by the trap
on_usr1() {
  if [ "$stopping" = 1 ]; then return; fi
  stopping=1
  log "SIGUSR1 (time limit or preemption): stopping; finished units are kept and the next job continues from them"
  if [ -n "$srun_pid" ]; then kill -TERM "$srun_pid" 2>/dev/null || true; fi
}
trap on_usr1 USR1

[ -n "${SLURM_JOB_ID:-}" ] || die "no SLURM_JOB_ID: submit with sbatch (or run torchrun -m unetdist.infer predict without SLURM)"
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f launch/common.sh ] || die "submit from the unetdist repository root (no launch/common.sh in $PWD)"
# shellcheck source=launch/common.sh
. launch/common.sh

[ $# -ge 2 ] || die "usage: sbatch slurm/predict.sh --model MODEL --images INPUT... --out DIR [unetdist predict options]"
case " $* " in *" --out "*|*" --out="*) ;; *) die "give --out DIR (where the outputs go)";; esac

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NNODES=${SLURM_JOB_NUM_NODES:?SLURM_JOB_NUM_NODES is not set}
if [ -n "${NPROC_PER_NODE:-}" ]; then log "$NPROC_PER_NODE process(es) per node, from NPROC_PER_NODE"; else choose_nproc; fi
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
if command -v scontrol >/dev/null; then
  HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
  HEAD=$(hostname)
  log "scontrol not found: using this node ($HEAD) as the rendezvous head"
fi

# No elastic restarts: a failed prediction is not retried blindly (a bad input fails again); resubmitting
# continues from the finished units.
cmd=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
cmd+=("$PYTHON" -m unetdist.parallel.agent  # torchrun that keeps exit 2 (user error) and 75 (resumable)
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE"
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID" --max-restarts=0
  -m unetdist.infer predict "$@")

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) [$SLURM_JOB_NODELIST], $NPROC_PER_NODE process(es) per node"
log "running: $(quote "${cmd[@]}")"
if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi

rc=0
"${cmd[@]}" &
srun_pid=$!
wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # a trapped signal interrupts wait: keep waiting
  rc=0
  wait "$srun_pid" || rc=$?
done
if [ "$stopping" = 0 ] || [ "$rc" = 0 ]; then
  log "prediction ended with exit code $rc"
  exit "$rc"
fi
if command -v scontrol >/dev/null && scontrol requeue "$SLURM_JOB_ID"; then
  log "requeued job $SLURM_JOB_ID: it continues from the finished units"
  exit 0
fi
log "cannot requeue; submit the same command again to continue from the finished units (exit $EXIT_RESUMABLE)"
exit "$EXIT_RESUMABLE"
