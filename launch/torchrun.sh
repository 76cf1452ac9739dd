#!/usr/bin/env bash
# Train on N nodes without SLURM (cloud VMs, bare metal): run this once on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.5 launch/torchrun.sh configs/gpu-8x.yaml data.root=/shared/shards  # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.5 launch/torchrun.sh configs/gpu-8x.yaml data.root=/shared/shards  # node 1
#   NNODES=2 RDZV_ENDPOINT=head:29500 RDZV_ID=run42 launch/torchrun.sh CONFIG ...   # any order, no node ranks
#   launch/torchrun.sh CONFIG ...                                                    # one node (= launch/local.sh)
#
# All nodes meet through torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT (or RDZV_ENDPOINT);
# with NODE_RANK given, node 0 hosts the rendezvous store and the others never try to. The first
# argument is the config file, the rest are section.key=value overrides; relative paths start at the
# current folder.
#
# Variables (all optional but the ones a multi-node run needs):
#   NNODES (1)  NODE_RANK  MASTER_ADDR  MASTER_PORT (29500)  RDZV_ENDPOINT (host:port)  RDZV_ID (unetdist;
#   must differ between jobs that share an endpoint)  NPROC_PER_NODE (visible GPUs, or 1 without GPUs)
#   LOCAL_ADDR (this node's address, when its hostname does not resolve to an address others can reach)
#   MAX_RESTARTS (3: elastic restarts of the whole group after a worker dies; training resumes from the
#   newest complete checkpoint)  SHUTDOWN_TIMEOUT (240)  PYTHON (the repository's .venv/bin/python, else python3)
#   DRY_RUN=1 (print the command, run nothing)
#
# SIGUSR1 to the agent (this script's process) stops training cleanly: every rank finishes its step, a
# checkpoint is written, and the script exits 75 (resumable); run the same command again to continue.
# A configuration error (exit 2) is never restarted: the script exits 2 after one attempt. Other failures
# are restarted up to MAX_RESTARTS times, then the script exits 1.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

log() { echo "$(basename "$0"): $*" >&2; }
# shellcheck source=launch/common.sh
. "$REPO/launch/common.sh"

CONFIG=${1:-$REPO/configs/default.yaml}
if [ $# -gt 0 ]; then shift; fi
case "$CONFIG" in *=*) log "error: the first argument is the config file, got '$CONFIG'"; exit 2;; esac

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

visible_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU' || true
  else
    echo 0
  fi
}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(visible_gpus)
  if [ "$NPROC_PER_NODE" -lt 1 ]; then NPROC_PER_NODE=1; fi
fi
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-3}

# Elastic restarts hang or fail on stale keys when workers share the agent's rendezvous store
# (torch 2.13; pytorch issue 135712): give the workers their own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# unetdist.parallel.agent is torchrun (same options) that exits 2 without restarting on a configuration
# error and 75 (resumable) when its workers stopped with a checkpoint after SIGUSR1.
cmd=("$PYTHON" -m unetdist.parallel.agent --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE")
if [ -n "${RDZV_ENDPOINT:-}" ] || [ -n "${MASTER_ADDR:-}" ]; then
  endpoint=${RDZV_ENDPOINT:-$MASTER_ADDR:${MASTER_PORT:-29500}}
  cmd+=(--rdzv_backend=c10d --rdzv_endpoint="$endpoint" --rdzv_id="${RDZV_ID:-unetdist}")
  if [ -n "${NODE_RANK:-}" ]; then
    if [ "$NODE_RANK" = 0 ]; then cmd+=(--rdzv_conf=is_host=1); else cmd+=(--rdzv_conf=is_host=0); fi
  fi
elif [ "$NNODES" != 1 ]; then
  log "error: NNODES=$NNODES needs MASTER_ADDR (with NODE_RANK) or RDZV_ENDPOINT, the same on every node"
  exit 2
else
  cmd+=(--standalone)
fi
if [ -n "${LOCAL_ADDR:-}" ]; then cmd+=(--local-addr="$LOCAL_ADDR"); fi
cmd+=(--max-restarts="$MAX_RESTARTS"
  --signals-to-handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" --shutdown-timeout="${SHUTDOWN_TIMEOUT:-240}"
  -m unetdist.train --config "$CONFIG" "$@")

log "running: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 $(quote "${cmd[@]}")"
if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
exec "${cmd[@]}"
