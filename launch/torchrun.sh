#!/usr/bin/env bash
# eatdist under torchrun, without Accelerate's launcher (DDP: gloo on CPUs, NCCL on GPUs; DeepSpeed
# needs accelerate launch with a zero*.yaml). One call per node:
#
#   bash launch/torchrun.sh train --config configs/synthetic.yaml          # this machine: its GPUs, or 2 CPU processes
#   NNODES=2 NODE_RANK=0 MAIN_ADDR=node0 bash launch/torchrun.sh train --config configs/cub_resnet50.yaml
#   NNODES=2 NODE_RANK=1 MAIN_ADDR=node0 bash launch/torchrun.sh train --config configs/cub_resnet50.yaml
#   bash launch/torchrun.sh explain --model runs/cub/model --input '/data/cub/*.tar' --output /data/expl
#
# Fault tolerance: MAX_RESTARTS=N restarts the worker group up to N times when a worker dies; a
# restarted `train` continues from the run's latest step checkpoint by itself. NNODES=MIN:MAX
# (e.g. 1:4) makes the job elastic: a c10d rendezvous at MAIN_ADDR:MAIN_PORT under RDZV_ID (the
# same on every node, new for every job), nodes may leave and join, and the restarted group, of
# whatever size, continues the epoch without reading a sample twice. NODE_RANK is then not used.
#
# NPROC_PER_NODE defaults to the GPUs present (or 2 CPU processes without GPUs, gloo).
# DRY_RUN=1 prints the command instead.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ID=${RDZV_ID:-eatdist}
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)}
if [[ "$NNODES" == *:* ]]; then
    rendezvous=(--rdzv_backend c10d --rdzv_endpoint "$MAIN_ADDR:$MAIN_PORT" --rdzv_id "$RDZV_ID")
else
    rendezvous=(--node_rank "$NODE_RANK" --master_addr "$MAIN_ADDR" --master_port "$MAIN_PORT")
fi
cmd=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --max_restarts "$MAX_RESTARTS"
     "${rendezvous[@]}" -m eatdist "$@")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"; echo
else
    exec "${cmd[@]}"
fi
