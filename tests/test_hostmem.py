"""Freed host memory kept for reuse: repeated forward passes on the CPU fault no page in again."""

from __future__ import annotations

import logging
import sys

import pytest

from conftest import cpu_env, run
from eatdist.hostmem import DEFAULT_MB, ENV, limit_mb

# A forward pass of test_resnet on a batch of 32 at 64 px, ten times after two warm-up passes:
# the median of the page faults of each pass (a pass that grows the heap once for good, which
# happens now and then, is not what is measured). ``SETUP`` runs first, in the same fresh process.
FORWARDS = """
import resource, statistics, sys, timm, torch
{setup}
model = timm.create_model("test_resnet", num_classes=10).eval()
x = torch.randn(32, 3, 64, 64)
faults = []
with torch.inference_mode():
    model(x), model(x)
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""


def faults_per_forward(setup: str, **env: str) -> float:
    result = run([sys.executable, "-c", FORWARDS.format(setup=setup)], env=cpu_env(**env), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_eatdist_command_keeps_freed_memory_so_forward_passes_fault_no_page_in():
    # the command sets it before any subcommand runs (here the cheapest one)
    cli = "from eatdist.cli.main import main\nmain(['backbones'])"
    kept = faults_per_forward(cli)
    left = faults_per_forward(cli, **{ENV: "0"})  # the C library's own behaviour
    direct = faults_per_forward("from eatdist.hostmem import keep_freed_memory\nassert keep_freed_memory()")
    # the batch's activations (a few MB) come back from the kernel, zeroed, on every pass
    assert left > 500, left
    assert kept < 0.02 * left, (kept, left)
    assert direct < 0.02 * left, (direct, left)


def test_the_limit_is_read_from_the_environment(monkeypatch, caplog):
    monkeypatch.delenv(ENV, raising=False)
    assert limit_mb() == DEFAULT_MB
    monkeypatch.setenv(ENV, "64")
    assert limit_mb() == 64
    monkeypatch.setenv(ENV, "lots")
    with caplog.at_level(logging.WARNING, logger="eatdist.hostmem"):
        assert limit_mb() == DEFAULT_MB
    assert f"{ENV}='lots' is not a number of megabytes" in caplog.text
