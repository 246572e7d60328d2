#!/usr/bin/env bash
# One node, all its GPUs (or CPU processes with gloo): experts split over EP ranks,
# data-parallel over the rest. Extra arguments are config overrides.
#   bash launch/torchrun_single_node.sh 8 parallel.ep=8 model=gpu_1b train.dtype=bfloat16
set -euo pipefail
NPROC=${1:?usage: torchrun_single_node.sh NPROC [overrides...]}; shift
RUN_DIR=${RUN_DIR:-outputs/$(date +%Y-%m-%d_%H-%M-%S)}
exec torchrun --standalone --nproc_per_node="$NPROC" -m moe.train \
  hydra.run.dir="$RUN_DIR" resume=auto "$@"
