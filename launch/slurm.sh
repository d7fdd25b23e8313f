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
#
# Preemption: SLURM sends SIGUSR1 to this batch script 180 s before the time limit (--signal);
# the script forwards it (and SIGTERM) to every rank, each rank stops at the same step boundary,
# saves a checkpoint and exits with code 75, and the job requeues itself. A requeued `train`
# run continues from its latest checkpoint (--resume is added when SLURM_RESTART_COUNT > 0).
#SBATCH --job-name=eatdist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=eatdist-%j.out
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
set -euo pipefail

# run_forwarding TARGET CMD...: run CMD in the background and pass SIGUSR1/SIGTERM on as SIGUSR1
# to CMD itself (TARGET=self: srun forwards signals to its tasks) or to CMD's children
# (TARGET=children: the launcher's ranks, so that torchrun does not kill them before they save).
# bash runs traps only between commands, hence `wait`. Returns CMD's exit code; sets PREEMPTED.
PREEMPTED=""
run_forwarding() {
    local target=$1 rc=0
    shift
    "$@" &
    local child=$!
    if [ "$target" = self ]; then
        trap 'PREEMPTED=1; kill -USR1 "$child" 2>/dev/null || true' USR1 TERM
    else
        trap 'PREEMPTED=1; pkill -USR1 -P "$child" 2>/dev/null || true' USR1 TERM
    fi
    wait "$child" || rc=$?
    while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done
    trap - USR1 TERM
    return "$rc"
}

if [ -z "${EATDIST_ON_NODE:-}" ]; then
    # The batch step: start this script once on every node; srun forwards signals to its tasks.
    export EATDIST_ON_NODE=1
    rc=0
    run_forwarding self srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$0" "$@" || rc=$?
    if [ -n "$PREEMPTED" ] || [ "$rc" -eq 75 ]; then
        echo "slurm.sh: preempted; requeueing job $SLURM_JOB_ID (it resumes from its checkpoint)" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$rc"
fi

: "${SLURM_NNODES:?not inside a SLURM allocation}" "${SLURM_NODEID:?}" "${SLURM_JOB_ID:?}" "${SLURM_JOB_NODELIST:?}"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}
[ "$GPUS_PER_NODE" -ge 1 ] || { echo "slurm.sh: no GPUs found; set GPUS_PER_NODE" >&2; exit 2; }
if [ -z "${MAIN_ADDR:-}" ]; then
    # Read the whole list (no `head`): under pipefail an early-closed pipe fails the script.
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MAIN_ADDR=${hosts%%$'\n'*}
fi
MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
CONFIG=${ACCELERATE_CONFIG:-launch/ddp_multinode.yaml}
args=("$@")
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && [ "${1:-}" = train ] && [[ " $* " != *" --resume "* ]]; then
    args+=(--resume)  # a requeued run continues where it stopped
fi

cmd=(accelerate launch --config_file "$CONFIG"
     --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID"
     --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))"
     --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
     -m eatdist "${args[@]}")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"; echo
else
    run_forwarding children "${cmd[@]}"
fi
