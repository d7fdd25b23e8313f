#!/usr/bin/env bash
# One prepared check on one GPU, in named steps, each under its own time limit (8 minutes in all):
#
#   env       the device, torch and the wheels brought along in .whl/ (benchmarks/gpu_wheels.sh)
#   train     training img/s: eatdist against a hand-written Accelerate + timm loop
#             (resnet50, 224 px, bf16, channels_last), peak device memory; the step time of the
#             synthetic recipe's head (spatial maps + localisation loss) against the linear head's
#   explain   explanation img/s against plain inference (same model, shards, workers): default
#             outputs, then every picture drawn on the GPU and in CPU processes, then with the
#             inputs decoded on the GPU (explain.decode_device=model) as well; peak memory
#   resume    a training run killed (SIGKILL) after its first step checkpoint, resumed to the end
#
#   bash benchmarks/gpu_check.sh                    # every step
#   STEPS="env explain" bash benchmarks/gpu_check.sh
#   CPU_DRY_RUN=1 bash benchmarks/gpu_check.sh      # every step end to end on a CPU, tiny sizes
#   (LIMIT_SCALE=N multiplies every step's limit: 6 in a dry run)
#
# Another check is one more step: a function step_<name> and its name and limit in STEPS_ALL.
# Every figure the steps print is repeated in the summary at the end (lines starting "RESULT").
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
DRY="${CPU_DRY_RUN:-0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
LOG="$WORK/check.log"
PY="${PYTHON:-python}"
[ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$REPO/.venv/bin/python"
# name:limit in seconds; the sum stays within 8 minutes
STEPS_ALL="env:20 train:190 explain:190 resume:80"
STEPS="${STEPS:-env train explain resume}"
# The dry run checks the steps, not the speed: a loaded CPU gets 6x the limits.
SCALE="${LIMIT_SCALE:-$([ "$DRY" = "1" ] && echo 6 || echo 1)}"
export TQDM_DISABLE=1 PYTHONWARNINGS=ignore

if [ "$DRY" = "1" ]; then
    export CUDA_VISIBLE_DEVICES="" ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1
    TRAIN_ARGS=(--backbone test_resnet --size 32 --batch 8 --steps 3 --workers 1 --rounds 1 --heads)
    EXPLAIN_CASE="test_resnet:32:32"
    EXPLAIN_ARGS=(--workers 1 --batch 16 --rounds 1)
    RESUME_MODEL=(model.backbone=test_resnet data.image_size=32 data.batch_size=8 data.num_workers=1 synth.train=48)
else
    TRAIN_ARGS=(--backbone resnet50 --size 224 --batch 128 --steps 24 --workers 12 --rounds 3 --bf16 --channels-last --heads)
    EXPLAIN_CASE="resnet50:224:2048"
    EXPLAIN_ARGS=(--workers 12 --batch 256 --rounds 2 --bf16 --channels-last)
    RESUME_MODEL=(model.backbone=resnet50 data.image_size=224 data.batch_size=64 data.num_workers=8 synth.train=2048
                  train.mixed_precision=bf16 model.channels_last=true)
fi

# Python under the step's time limit (what is left of it).
py() {
    local left=$(( STEP_END - $(date +%s) ))
    if [ "$left" -le 0 ]; then echo "over the step's time limit"; return 124; fi
    timeout -k 10 "$left" "$PY" "$@"
}

step_env() {
    if [ -d "$REPO/.whl" ] && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        "$PY" -m pip install --quiet --no-index --no-deps --target "$WORK/site" "$REPO"/.whl/*.whl || return 1
        echo "installed $(ls "$REPO"/.whl/*.whl | wc -l) wheel(s) from .whl/ into $WORK/site"
    fi
    # The tree first (its code), the wheels after (eatdist's entry points, webdataset, ...).
    export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    py - <<'EOF'
import torch, torchvision, timm, accelerate, webdataset, eatdist
from eatdist.models.registry import is_backbone
print(f"RESULT env: python torch {torch.__version__} torchvision {torchvision.__version__} timm {timm.__version__} "
      f"accelerate {accelerate.__version__}; cuda {torch.cuda.is_available()} "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''}; eatdist from {eatdist.__file__}")
assert is_backbone("resnet50"), "eatdist's timm plugin is not registered (install the eatdist wheel)"
EOF
}

# stderr (progress bars, warnings) goes to a file of the step, shown when the step fails
quiet() { local err="$WORK/$1.err"; shift; "$@" 2>"$err" || { local s=$?; tail -20 "$err"; return $s; }; }

step_train() {
    quiet train py benchmarks/gpu_train.py "${TRAIN_ARGS[@]}" | sed -u 's/^\(train\|heads\) img\/s/RESULT &/'
}

step_explain() {
    local rows=default,all
    quiet explain-gpu py benchmarks/bench_explain.py --cases "$EXPLAIN_CASE" --rows "$rows" --render-device auto \
        "${EXPLAIN_ARGS[@]}" \
        | sed -u 's/^/RESULT explain (pictures on the GPU when there is one): /'
    quiet explain-cpu py benchmarks/bench_explain.py --cases "$EXPLAIN_CASE" --rows all --render-device cpu \
        "${EXPLAIN_ARGS[@]}" \
        | sed -u 's/^/RESULT explain (pictures in CPU processes): /'
    quiet explain-decode py benchmarks/bench_explain.py --cases "$EXPLAIN_CASE" --rows default \
        --render-device auto --decode-device model "${EXPLAIN_ARGS[@]}" \
        | sed -u 's/^/RESULT explain (inputs decoded on the GPU, nvJPEG): /'
}

step_resume() {
    local data="$WORK/resume-data" run="$WORK/resume-run"
    local common=("${RESUME_MODEL[@]}" "data.root=$data" "train.output_dir=$run" train.epochs=2 train.checkpoint_every=4
                  train.log_every=2 train.final_test=false "train.log_with=[]" train.log_images=0 synth.val=32 synth.test=0)
    py -m eatdist synth "${common[@]}" "synth.out=$data" >/dev/null || return 1
    "$PY" -m eatdist train "${common[@]}" > "$WORK/resume-1.log" 2>&1 &  # killed below, so no timeout wrapper
    local pid=$! waited=0
    until compgen -G "$run/checkpoints/step-*" >/dev/null || ! kill -0 "$pid" 2>/dev/null || [ $waited -ge 1200 ]; do
        sleep 0.1; waited=$((waited + 1))
    done
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "the run ended before its first checkpoint could be killed"; tail -5 "$WORK/resume-1.log"; return 1
    fi
    kill -KILL "$pid"; wait "$pid" 2>/dev/null
    local killed_at; killed_at="$(ls "$run/checkpoints" | grep '^step-' | tail -1)"
    local started; started=$(date +%s)
    py -m eatdist train --resume "${common[@]}" > "$WORK/resume-2.log" 2>&1 || { tail -5 "$WORK/resume-2.log"; return 1; }
    [ -f "$run/final_metrics.json" ] || { echo "no final_metrics.json after the resume"; return 1; }
    grep -qi "resum" "$WORK/resume-2.log" || { echo "the second run does not say it resumed"; return 1; }
    echo "RESULT resume: killed with SIGKILL after checkpoint $killed_at, resumed to the end in $(( $(date +%s) - started )) s;" \
         "checkpoints now: $(ls "$run/checkpoints" | grep '^step-' | tr '\n' ' ')"
}

limit_of() { for s in $STEPS_ALL; do [ "${s%%:*}" = "$1" ] && echo "${s##*:}" && return; done; echo 60; }

echo "gpu_check: steps [$STEPS], dry run $DRY, work in $WORK" | tee "$LOG"
failed=()
for name in $STEPS; do
    if ! declare -F "step_$name" >/dev/null; then echo "no step '$name' (steps: $STEPS_ALL)"; exit 2; fi
    limit=$(( $(limit_of "$name") * SCALE ))
    echo "=== step $name (limit ${limit} s)" | tee -a "$LOG"
    started=$(date +%s)
    STEP_END=$(( started + limit ))
    "step_$name" > >(tee -a "$LOG") 2>&1  # in this shell: what a step exports stays for the next
    status=$?
    sleep 0.2  # let tee catch up
    echo "--- step $name: $([ "$status" = 0 ] && echo ok || echo "FAILED ($status)") in $(( $(date +%s) - started )) s" \
        | tee -a "$LOG"
    [ "$status" = 0 ] || failed+=("$name")
done
echo "=== summary"
grep '^RESULT' "$LOG" | sed 's/^RESULT //'
if [ ${#failed[@]} -gt 0 ]; then echo "failed steps: ${failed[*]}"; exit 1; fi
echo "all steps ok"
