#!/usr/bin/env bash
# Train on this machine alone: one process per visible GPU (or NPROC_PER_NODE processes; 1 on CPU),
# under torchrun --standalone with elastic restarts, so a crashed worker resumes from the newest
# checkpoint by itself. Takes what launch/torchrun.sh takes; prints the exact command it runs.
#
#   launch/local.sh configs/default.yaml train.steps=100
#   NPROC_PER_NODE=2 MAX_RESTARTS=2 launch/local.sh configs/default.yaml
set -euo pipefail
unset MASTER_ADDR MASTER_PORT RDZV_ENDPOINT NODE_RANK
NNODES=1 exec "$(dirname "$0")/torchrun.sh" "$@"
