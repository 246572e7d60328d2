#!/usr/bin/env bash
# Several nodes with c10d rendezvous; run the same command on every node.
#   MASTER_ADDR=node0 NNODES=4 RUN_DIR=/shared/runs/a \
#     bash launch/torchrun_multi_node.sh 8 parallel.ep=8 model=gpu_1b
# RUN_DIR must be on storage every node sees (checkpoints are written by rank 0).
set -euo pipefail
NPROC=${1:?usage: torchrun_multi_node.sh NPROC_PER_NODE [overrides...]}; shift
: "${MASTER_ADDR:?set MASTER_ADDR}" "${NNODES:?set NNODES}" "${RUN_DIR:?set RUN_DIR (shared)}"
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv_id="${RDZV_ID:-moe-train}" \
  -m moe.train hydra.run.dir="$RUN_DIR" resume=auto "$@"
