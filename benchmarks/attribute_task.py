"""The EAT claim on the synthetic corpus: does the attribute task move attention onto the object?

Writes a corpus whose train backgrounds give the class away (``spurious_rate``; val/test do
not), trains the same model with ``loss.attr_weight`` 0 (the plain classifier) and 1 (EAT),
explains the test split with each and prints test accuracy and where the class heatmaps look,
with the ratio EAT / baseline. An experiment, not a test: numbers vary with seed and budget.

    python benchmarks/attribute_task.py [--workdir runs/attribute_task] [--epochs 6] [--spurious 0.9]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def eatdist(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "eatdist", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/attribute_task")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--spurious", type=float, default=0.9)
    parser.add_argument("--train", type=int, default=4000)
    args = parser.parse_args()
    root = Path(args.workdir)
    data = root / "data"
    eatdist("synth", "--out", str(data), f"synth.spurious_rate={args.spurious}", f"synth.train={args.train}")
    rows = {}
    for name, weight in (("baseline (attr_weight 0)", 0.0), ("EAT (attr_weight 1)", 1.0)):
        run = root / f"attr_weight_{weight:g}"
        eatdist("train", f"data.root={data}", f"train.output_dir={run}", f"loss.attr_weight={weight}",
                f"train.epochs={args.epochs}", "train.explain_split=test")  # fmt: skip
        eatdist("evaluate", "--explanations", str(run / "explanations"), "--data", str(data))
        metrics = json.loads((run / "final_metrics.json").read_text())
        scores = json.loads((run / "explanations" / "evaluation.json").read_text())
        rows[name] = (metrics["test_top1"], scores["class_map_mass_on_object"], scores["class_map_pointing"])
    print(f"\nspurious background rate in train: {args.spurious}; {args.train} train images, {args.epochs} epochs")
    print(f"{'model':26s} {'test top-1':>10s} {'map mass on object':>19s} {'pointing':>9s}")
    for name, (top1, mass, pointing) in rows.items():
        print(f"{name:26s} {top1:10.3f} {mass:19.3f} {pointing:9.3f}")
    base, eat = rows.values()
    print(f"{'ratio EAT / baseline':26s} {eat[0] / base[0]:10.2f} {eat[1] / base[1]:19.2f} {eat[2] / base[2]:9.2f}")


if __name__ == "__main__":
    main()
