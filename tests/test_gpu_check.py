"""The prepared GPU check runs every step end to end on a CPU (CPU_DRY_RUN=1), so it is ready when a GPU is lent."""

import subprocess

import pytest

from conftest import REPO, cpu_env


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_prints_their_figures():
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], env=cpu_env(CPU_DRY_RUN="1"), cwd=REPO,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    for step in ("env", "train", "explain", "resume"):
        assert f"--- step {step}: ok" in out
    summary = out.split("=== summary", 1)[1]
    assert "train img/s: hand-written Accelerate+timm" in summary and "ratio x" in summary
    assert "heads img/s: linear" in summary and "of the linear head's" in summary
    assert "explain (pictures on the GPU when there is one)" in summary
    assert "explain (pictures in CPU processes)" in summary
    assert "explain (inputs decoded on the GPU, nvJPEG)" in summary
    # default and all parts, all parts drawn in CPU processes, then default parts of inputs decoded on the device
    assert summary.count("throughput x") == 4
    assert "resume: killed with SIGKILL after checkpoint step-" in summary and "all steps ok" in summary
    unknown = subprocess.run(["bash", "benchmarks/gpu_check.sh"], env=cpu_env(CPU_DRY_RUN="1", STEPS="nope"), cwd=REPO,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert unknown.returncode == 2 and "no step 'nope'" in unknown.stdout
