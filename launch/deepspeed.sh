#!/usr/bin/env bash
# The DeepSpeed launcher over the nodes of a hostfile, with parallel.engine=deepspeed
# (ZeRO stage 2 unless parallel.zero_stage=1). Extra arguments are config overrides.
#   From the first node, reaching the others with pdsh + passwordless ssh:
#     RUN_DIR=/shared/runs/a bash launch/deepspeed.sh launch/hostfile parallel.ep=8
#   A hostfile of one host (e.g. "localhost slots=2") starts its processes here, no ssh.
#   Or run it yourself on every node (no ssh), NODE_RANK 0..N-1:
#     NODE_RANK=0 MASTER_ADDR=node0 RUN_DIR=/shared/runs/a \
#       bash launch/deepspeed.sh launch/hostfile parallel.ep=8
# RUN_DIR must be on storage every node sees (checkpoints are written by rank 0).
set -euo pipefail
HOSTFILE=${1:?usage: deepspeed.sh HOSTFILE [overrides...]}; shift
: "${RUN_DIR:?set RUN_DIR (shared by all nodes)}"
ARGS=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
HOSTS=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
if [[ -n "${NODE_RANK:-}" ]]; then
  ARGS+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}")
elif [[ "$HOSTS" == 1 ]]; then
  # One host: start its processes here; DeepSpeed would otherwise ssh into it.
  ARGS+=(--no_ssh --node_rank 0 --master_addr "${MASTER_ADDR:-127.0.0.1}")
fi
# --no_local_rank: the trainer reads LOCAL_RANK from the environment, not from argv.
exec deepspeed "${ARGS[@]}" --no_local_rank --module moe.train \
  parallel.engine=deepspeed hydra.run.dir="$RUN_DIR" resume=auto "$@"
