#!/usr/bin/env bash
# Train with the DeepSpeed backend through DeepSpeed's own launcher (ssh/pdsh to the hosts of a hostfile).
#
#   HOSTFILE=hostfile NUM_GPUS=8 launch/deepspeed.sh configs/gpu-8x.yaml data.root=/shared/shards
#   NUM_GPUS=2 launch/deepspeed.sh configs/default.yaml        # this machine only (no hostfile)
#
# The hostfile has one line per node, `gpu-node-01 slots=8`; the launcher must reach every node by
# passwordless ssh (even `localhost`) and the repository must sit at the same path everywhere. Without
# HOSTFILE, and with no ./hostfile, the run stays on this machine. It adds
# parallel.backend=deepspeed before your overrides. On SLURM use `sbatch slurm/train.sh CONFIG
# parallel.backend=deepspeed` instead, and on one machine `launch/local.sh CONFIG parallel.backend=deepspeed`
# (torchrun starts the same DeepSpeed trainer).
#
# Variables: HOSTFILE (./hostfile if present)  NUM_GPUS (GPUs per node; default: the hostfile's slots, else the
#   GPUs in CUDA_VISIBLE_DEVICES, passed by index as --include localhost:IDS, else all GPUs, or 1 without GPUs)
#   MASTER_ADDR / MASTER_PORT (default: the first host, 29500)  LAUNCHER (pdsh; or openmpi, mvapich, ...)
#   DEEPSPEED (the repository's .venv/bin/deepspeed, else deepspeed on PATH)  DRY_RUN=1 (print, run nothing)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

log() { echo "$(basename "$0"): $*" >&2; }
# shellcheck source=launch/common.sh
. "$REPO/launch/common.sh"

CONFIG=${1:-$REPO/configs/default.yaml}
if [ $# -gt 0 ]; then shift; fi
case "$CONFIG" in *=*) log "error: the first argument is the config file, got '$CONFIG'"; exit 2;; esac
if [ -z "${HOSTFILE:-}" ] && [ -f hostfile ]; then HOSTFILE=hostfile; fi

if [ -z "${DEEPSPEED:-}" ]; then
  if [ -x "$REPO/.venv/bin/deepspeed" ]; then DEEPSPEED=$REPO/.venv/bin/deepspeed; else DEEPSPEED=deepspeed; fi
fi
cmd=("$DEEPSPEED")
if [ -n "${HOSTFILE:-}" ]; then
  # Each host's GPUs come from the hostfile's slots (this machine's CUDA_VISIBLE_DEVICES says nothing about them).
  cmd+=(--hostfile "$HOSTFILE")
  if [ -n "${NUM_GPUS:-}" ]; then cmd+=(--num_gpus "$NUM_GPUS"); fi
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  # DeepSpeed's launcher drops CUDA_VISIBLE_DEVICES and, given --num_gpus N, uses GPUs 0..N-1: name the
  # visible ones instead (CUDA_VISIBLE_DEVICES=4,5,6,7 -> --include localhost:4,5,6,7), the first NUM_GPUS of them.
  ids=$(echo "$CUDA_VISIBLE_DEVICES" | tr "," "\n" | grep . | head -n "${NUM_GPUS:-1000}" | paste -sd, - || true)
  if ! [[ "$ids" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    log "error: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES is not a list of GPU indices (UUIDs?), which DeepSpeed's" \
      "launcher needs; use indices, or launch/local.sh CONFIG parallel.backend=deepspeed (torchrun keeps the variable)"
    exit 2
  fi
  cmd+=(--include "localhost:$ids")
else
  if [ -z "${NUM_GPUS:-}" ]; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
      NUM_GPUS=$(nvidia-smi -L | grep -c '^GPU' || true)
    fi
    if [ "${NUM_GPUS:-0}" -lt 1 ]; then NUM_GPUS=1; fi
  fi
  cmd+=(--num_gpus "$NUM_GPUS")
fi
if [ -n "${MASTER_ADDR:-}" ]; then cmd+=(--master_addr "$MASTER_ADDR"); fi
if [ -n "${MASTER_PORT:-}" ]; then cmd+=(--master_port "$MASTER_PORT"); fi
if [ -n "${LAUNCHER:-}" ]; then cmd+=(--launcher "$LAUNCHER"); fi
cmd+=(--module unetdist.train --config "$CONFIG" parallel.backend=deepspeed "$@")

if [ -n "${HOSTFILE:-}" ] && [ ! -f "$HOSTFILE" ] && [ "${DRY_RUN:-0}" != 1 ]; then
  log "error: hostfile '$HOSTFILE' not found: write one line per node ('gpu-node-01 slots=8') and set HOSTFILE"
  exit 2
fi
log "running: $(quote "${cmd[@]}")"
if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
exec "${cmd[@]}"
