#!/usr/bin/env bash
# GPU smoke test, one GPU, a few minutes: a real backbone (resnet50, 224 px, bf16) on the
# synthetic corpus, trained ~300 steps under DDP and under ZeRO-2, then one shard explained.
# Prints images/s for training (per run) and explanation.
#
#   bash launch/gpu_smoke.sh            # from the repository root, with eatdist installed
#   WORK=/scratch/smoke STEPS_EPOCHS=2 bash launch/gpu_smoke.sh
#   DRY_RUN=1 bash launch/gpu_smoke.sh  # print the commands only
set -euo pipefail
WORK=${WORK:-runs/gpu_smoke}
EPOCHS=${STEPS_EPOCHS:-3}   # 3 epochs x 100 steps of 64 images
run() { if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}

run eatdist synth --out "$WORK/data" synth.image_size=224 synth.train=6400 synth.val=640 synth.test=640 \
    synth.shard_size=640 synth.workers=8
common=(model.backbone=resnet50 "model.backbone_args={}" data.root="$WORK/data" data.image_size=224
        data.batch_size=64 data.num_workers=6 train.epochs="$EPOCHS" train.mixed_precision=bf16
        model.channels_last=true train.final_test=false)
run accelerate launch --config_file launch/ddp_1node.yaml --num_processes 1 \
    -m eatdist train "${common[@]}" train.output_dir="$WORK/ddp"
run accelerate launch --config_file launch/zero2.yaml --num_processes 1 \
    -m eatdist train "${common[@]}" train.output_dir="$WORK/zero2"
start=$(date +%s.%N)
run eatdist explain --model "$WORK/ddp/model" --input "$WORK/data/test-000000.tar" --output "$WORK/explained" \
    explain.batch_size=128
end=$(date +%s.%N)
[ -n "${DRY_RUN:-}" ] && exit 0
python - "$WORK" "$start" "$end" <<'PY'
import json, sys
from pathlib import Path
work, start, end = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
for run in ("ddp", "zero2"):
    epochs = [json.loads(l) for l in (work / run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in l]
    last = [e for e in epochs if e["kind"] == "epoch"][-1]
    print(f"train {run:6s}: {last['images_per_s']:8.1f} images/s  val top-1 {last['val_top1']:.3f}")
summary = json.loads((work / "explained" / "explain_summary.json").read_text())
print(f"explain     : {summary['explained'] / (end - start):8.1f} images/s (incl. start-up, {summary['explained']} images)")
PY
