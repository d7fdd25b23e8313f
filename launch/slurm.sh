#!/usr/bin/env bash
# eatdist on a SLURM cluster: N nodes x G GPUs, one `accelerate launch` per node.
#
#   sbatch --nodes 4 --gpus-per-node 8 launch/slurm.sh train --config configs/cub_resnet50.yaml
#   ACCELERATE_CONFIG=launch/zero2_multinode.yaml sbatch --nodes 2 launch/slurm.sh train ...
#   sbatch --nodes 4 launch/slurm.sh explain --model runs/cub/model --input '/data/cub/*.tar' --output /data/expl
#
# The batch step runs this script once per node through srun; each node derives the rendezvous
# from SLURM's environment: node 0 of the job's node list is the main node, the port comes from
# the job id, and the machine rank is SLURM_NODEID. DRY_RUN=1 prints the command instead.
#SBATCH --job-name=eatdist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=eatdist-%j.out
set -euo pipefail

if [ -z "${EATDIST_ON_NODE:-}" ]; then
    # The batch step: start this script once on every node.
    export EATDIST_ON_NODE=1
    exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$0" "$@"
fi

: "${SLURM_NNODES:?not inside a SLURM allocation}" "${SLURM_NODEID:?}" "${SLURM_JOB_ID:?}" "${SLURM_JOB_NODELIST:?}"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}
[ "$GPUS_PER_NODE" -ge 1 ] || { echo "slurm.sh: no GPUs found; set GPUS_PER_NODE" >&2; exit 2; }
MAIN_ADDR=${MAIN_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
CONFIG=${ACCELERATE_CONFIG:-launch/ddp_multinode.yaml}

cmd=(accelerate launch --config_file "$CONFIG"
     --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID"
     --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))"
     --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
     -m eatdist "$@")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"; echo
else
    exec "${cmd[@]}"
fi
