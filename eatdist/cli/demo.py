"""``eatdist demo``: the whole pipeline on the synthetic corpus, with real multi-process launches."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from eatdist.config import load_config
from eatdist.data.shards import iter_shard
from eatdist.data.synth import generate
from eatdist.errors import EatdistError
from eatdist.explain.evaluate import evaluate_explanations
from eatdist.explain.report import write_report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(processes: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Return the ``accelerate launch`` command and environment running ``eatdist ARGS``.

    Uses GPUs when there are at least ``processes`` of them, else CPU processes with gloo.
    """
    env = dict(os.environ)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    if processes > 1:
        cmd.append("--multi_gpu")
    if torch.cuda.device_count() < processes:
        # accelerate's --cpu starts a single process; this variable keeps --multi_gpu's N processes.
        env["ACCELERATE_USE_CPU"] = "1"
        if processes == 1:
            cmd.append("--cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return cmd + ["-m", "eatdist"] + args, env


def _run(step: str, cmd: list[str], env: dict[str, str]) -> None:
    print(f"\n=== {step}: {' '.join(cmd[2:])}", flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise EatdistError(f"demo step '{step}' failed with exit code {result.returncode} (see the output above)")


def _export_overlays(explain_dir: Path, target: Path, count: int = 6) -> list[tuple[Path, str]]:
    target.mkdir(parents=True, exist_ok=True)
    shown: list[tuple[Path, str]] = []
    for shard in sorted(explain_dir.glob("*.tar")):
        for sample in iter_shard(shard):
            ext = next(k for k in sample if k.startswith("overlay."))
            path = target / f"{sample['__key__'].replace('/', '_')}.{ext.split('.', 1)[1]}"
            path.write_bytes(sample[ext])
            shown.append((path, sample["txt"].decode()))
            if len(shown) == count:
                return shown
    return shown


# The demo's recipe on top of the defaults (configs/synthetic.yaml spells out the same): output
# stride 8 gives 8 x 8 maps on 64 px images, fine enough to see the object (stride 16: 4 x 4);
# it costs about 2.5x the compute per image, paid back by fewer images and epochs. The spatial
# attribute head with the class pooled through its maps, and off-prototype entries weighted 5x,
# make the attributes follow the image rather than the class (docs/attributes.md).
DEMO_RECIPE = [
    "model.backbone_args={output_stride: 8}",
    "synth.train=5000",
    "train.epochs=6",
    "model.attr_head=spatial",
    "model.class_pool=attributes",
    "loss.off_prototype_weight=10",
    "loss.localisation_weight=1",
]
# The demo is for people: its explanations hold every picture (bulk jobs default to none).
DEMO_OUTPUTS = "explain.outputs=[json, txt, heatmaps.npy, image, overlay, attr_maps]"


def run_demo(workdir: str, processes: int, config: str | None, overrides: list[str]) -> int:
    """Synthesise, train with ``processes`` processes, explain the test split, print a summary.

    Without ``config`` the demo's recipe (:data:`DEMO_RECIPE`) comes before ``overrides``.
    """
    start = time.time()
    root = Path(workdir)
    data, run, explained = root / "data", root / "train", root / "explanations"
    overrides = (DEMO_RECIPE if config is None else []) + list(overrides)
    cfg = load_config(config, overrides)  # fail fast on a bad config, before any work
    for stale in (run, explained, root / "overlays"):
        shutil.rmtree(stale, ignore_errors=True)
    print(f"=== synth: {cfg.synth.train + cfg.synth.val + cfg.synth.test} images into {data}", flush=True)
    generate(cfg.synth, data)
    common = (["--config", config] if config else []) + list(overrides)
    cmd, env = launch_command(processes, ["train", *common, f"data.root={data}", f"train.output_dir={run}"])
    _run("train", cmd, env)
    cmd, env = launch_command(
        processes,
        [
            "explain",
            "--model",
            str(run / "model"),
            "--input",
            str(data / "test-*.tar"),
            "--output",
            str(explained),
            DEMO_OUTPUTS,
            *common,
        ],
    )
    _run("explain", cmd, env)
    metrics = json.loads((run / "final_metrics.json").read_text())
    summary = json.loads((explained / "explain_summary.json").read_text())
    overlays = _export_overlays(explained, root / "overlays")
    scores = evaluate_explanations(explained, data)
    page = write_report(explained)
    print("\n=== eatdist demo summary")
    print(f"test class top-1:        {metrics['test_top1']:.3f}")
    print(f"test attribute accuracy: {metrics['test_attr_acc']:.3f}")
    on, off = metrics.get("test_attr_acc_on_prototype"), metrics.get("test_attr_acc_off_prototype")
    if on is not None and off is not None:
        print(f"  where the image matches its class {on:.3f}; where it departs {off:.3f} "
              f"(unusual attributes detected {metrics['test_off_prototype_detected']:.3f})")  # fmt: skip
    if scores.get("off_prototype_named") is not None:
        print(f"unusual attributes named: {scores['off_prototype_named']:.3f} of {scores['off_prototype_shown']} on "
              f"correct predictions; named but scored absent: {scores['named_attributes_scored_absent']}")  # fmt: skip
    print(
        f"class heatmap on object: {scores['class_map_mass_on_object']:.3f} of its mass inside the box "
        f"(object area {scores['object_area_fraction']:.3f}); peak inside {scores['class_map_pointing']:.3f}"
    )
    if scores.get("attribute_map_pointing") is not None:
        print(f"attribute maps:          peak in its region {scores['attribute_map_pointing']:.3f}, "
              f"mass in its region {scores['attribute_map_mass_on_box']:.3f}")  # fmt: skip
    print(
        f"all-zero maps:           {scores['zero_class_maps']} class maps, "
        f"{scores['zero_attribute_maps']} of {scores['attribute_maps']} attribute maps"
    )
    print(f"model package:           {run / 'model'}")
    print(f"explanation shards:      {explained} ({summary['explained']} images, {summary['undecodable']} undecodable)")
    print(f"overlay images:          {root / 'overlays'}")
    print(f"report page:             {page}")
    for path, text in overlays[:3]:
        print(f"  {path.name}: {text}")
    print(f"metrics log:             {run / 'metrics.jsonl'} (TensorBoard: {run / 'tensorboard'})")
    print(f"total time:              {time.time() - start:.0f} s")
    return 0
