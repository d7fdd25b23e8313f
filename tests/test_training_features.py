"""EMA, best-epoch package, trackers (MLflow read back) and per-attribute tables, through real runs."""

import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import REPO, cpu_env, run, write_corpus
from eatdist.models.package import read_meta

pytestmark = pytest.mark.slow

ARGS = ["train", "model.backbone=test_resnet", "data.image_size=32", "data.batch_size=8", "data.num_workers=1",
        "train.epochs=3", "train.log_every=1", "train.ema=true", "train.ema_decay=0.99", "train.keep_best=val_top1",
        "train.log_with=[tensorboard,mlflow]", "train.log_images=2", "loss.label_smoothing=0.1",
        "optim.sched=step", "optim.decay_epochs=1", "optim.decay_rate=0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c"), {"train": [64, 64], "val": [24], "test": [16]})


@pytest.fixture(autouse=True)
def _mlflow_file_store(monkeypatch):
    """The test reads MLflow's file store back, which MLflow 3 opens only on request."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def env():
    extra = cpu_env()
    extra.pop("MLFLOW_TRACKING_URI", None)
    return extra


def command(corpus, out, *extra):
    return [sys.executable, "-m", "eatdist", *ARGS, f"data.root={corpus.root}", f"train.output_dir={out}", *extra]


def records(out, kind):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "reference"
    result = run(command(corpus, out), env=env(), timeout=400)
    assert result.returncode == 0
    return out, result.stdout


def test_ema_weights_are_exported_and_differ_from_the_raw_weights(reference):
    out, _ = reference
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    raw, ema = load_file(last / "model.safetensors"), load_file(last / "ema.safetensors")
    exported = load_file(out / "model" / "model.safetensors")
    assert set(exported) == set(ema)
    for name, value in exported.items():
        assert value.equal(ema[name].float())
    changed = [n for n, v in raw.items() if v.is_floating_point() and not v.equal(ema[n])]
    assert len(changed) > len(raw) // 2  # the average is not the last weights


def test_best_epoch_package_is_chosen_by_the_metric(reference):
    out, stdout = reference
    epochs = records(out, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    scores = [r["val_top1"] for r in epochs]
    best_epoch = scores.index(max(scores)) + 1  # the first epoch reaching the maximum
    meta = read_meta(out / "model_best")
    assert meta.metrics["epoch"] == best_epoch and meta.metrics["val_top1"] == max(scores)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["best_epoch"] == best_epoch
    if best_epoch == 3:
        assert (out / "model_best" / "model.safetensors").read_bytes() == (
            out / "model" / "model.safetensors"
        ).read_bytes()
    assert f"test: top-1 {final['test_top1']:.4f}  attribute accuracy {final['test_attr_acc']:.4f}" in stdout
    assert "worst attributes:" in stdout


def test_per_attribute_tables_add_up_to_the_aggregate_accuracy(reference):
    out, _ = reference
    final = json.loads((out / "final_metrics.json").read_text())
    for split in ("val", "test"):
        table = final["attribute_metrics"][split]
        rows = table["attributes"]
        assert len(rows) == len(read_meta(out / "model").attributes)
        accuracy = sum(r["correct"] for r in rows) / sum(r["count"] for r in rows)
        assert accuracy == pytest.approx(final[f"{split}_attr_acc"], abs=1e-9)
        assert sum(g["count"] for g in table["groups"]) == sum(r["count"] for r in rows)
        assert final[f"{split}_attr_mean_auc"] == table["mean_auc"] and 0 <= table["mean_ap"] <= 1
    assert final["val_loss"] > 0 and "lr" in final


MLFLOW_READ = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
runs = [r for e in client.search_experiments() if e.name == "eatdist" for r in client.search_runs([e.experiment_id])]
history = lambda run, key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
print(json.dumps([{
    "metrics": {k: history(r, k) for k in sys.argv[2:]},
    "params": r.data.params,
    "images": [a.path for a in client.list_artifacts(r.info.run_id, "images")],
} for r in runs]))
"""


def mlflow_runs(out, *keys):
    """MLflow's record of the run in `out`, read in a child process: MLflow's client leaves threads
    behind, and a later test's fork from a threaded pytest process can hang."""
    uri = (out / "mlruns").resolve().as_uri()
    result = run([sys.executable, "-c", MLFLOW_READ, uri, *keys], env=env(), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_mlflow_and_tensorboard_receive_the_metrics(reference):
    out, _ = reference
    assert list((out / "tensorboard" / "eatdist").glob("events.out.tfevents.*"))
    keys = ("val_top1", "val_loss", "lr", "images_per_s")
    (mlrun,) = mlflow_runs(out, *(f"epoch/{k}" for k in keys), "step/loss")
    epochs = records(out, "epoch")
    for key in keys:
        assert [tuple(m) for m in mlrun["metrics"][f"epoch/{key}"]] == [
            (r["step"], pytest.approx(r[key])) for r in epochs
        ]
    assert len(mlrun["metrics"]["step/loss"]) == len(records(out, "step")) == 48
    assert mlrun["params"]["train.ema"] == "True" and mlrun["params"]["loss.label_smoothing"] == "0.1"
    assert len(mlrun["images"]) >= 2  # explained validation images


def test_preempted_run_resumes_to_the_same_ema_and_best_packages(corpus, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    proc = subprocess.Popen(command(corpus, out), env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and len(records(out, "step")) >= 22):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert run([*command(corpus, out), "--resume"], env=env(), timeout=400).returncode == 0
    for folder in ("model", "model_best"):
        assert (out / folder / "model.safetensors").read_bytes() == (ref / folder / "model.safetensors").read_bytes()
    assert [(r["step"], r["loss"]) for r in records(out, "step")] == [
        (r["step"], r["loss"]) for r in records(ref, "step")
    ]
    assert len(mlflow_runs(out)) == 1  # the resumed run logs on to the same MLflow run
