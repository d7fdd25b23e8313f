#!/usr/bin/env bash
# eatdist under torchrun, without Accelerate's launcher (DDP only; DeepSpeed needs accelerate
# launch with a zero*.yaml). One call per node:
#
#   NNODES=2 NODE_RANK=0 MAIN_ADDR=node0 bash launch/torchrun.sh train --config configs/cub_resnet50.yaml
#   NNODES=2 NODE_RANK=1 MAIN_ADDR=node0 bash launch/torchrun.sh train --config configs/cub_resnet50.yaml
#   bash launch/torchrun.sh explain --model runs/cub/model --input '/data/cub/*.tar' --output /data/expl
#
# NPROC_PER_NODE defaults to the GPUs present (or 2 CPU processes without GPUs, gloo).
# DRY_RUN=1 prints the command instead.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)}
cmd=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
     --master_addr "$MAIN_ADDR" --master_port "$MAIN_PORT" -m eatdist "$@")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"; echo
else
    exec "${cmd[@]}"
fi
