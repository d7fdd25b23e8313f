"""Every file in launch/ is loaded or dry-run here, so none rots."""

import json
import subprocess

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from conftest import REPO

LAUNCH = REPO / "launch"


@pytest.mark.parametrize("path", sorted(LAUNCH.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert config.num_processes == raw["num_processes"] and config.num_machines == raw["num_machines"]
    if raw["distributed_type"] == "DEEPSPEED":
        ds_file = REPO / raw["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        stage = int(path.name[4])  # zeroN[_multinode].yaml
        assert ds["zero_optimization"]["stage"] == stage
        # nothing left for Accelerate to size from a transformers hidden_size
        assert "auto" not in json.dumps(ds["zero_optimization"])
        assert "optimizer" not in ds and "scheduler" not in ds  # eatdist's own AdamW and schedule
        assert "mixed_precision" not in raw  # Accelerate refuses it beside a DeepSpeed file


def test_every_launch_file_is_covered():
    known = {".yaml", ".json", ".sh", ".md"}
    assert {p.suffix for p in LAUNCH.iterdir()} <= known
    used = {raw["deepspeed_config"]["deepspeed_config_file"] for p in LAUNCH.glob("*.yaml")
            if "deepspeed_config" in (raw := yaml.safe_load(p.read_text()))}  # fmt: skip
    assert {f"launch/{p.name}" for p in LAUNCH.glob("*.json")} == used


def dry_run(script, env, *args):
    result = subprocess.run(["bash", str(LAUNCH / script), *args], env={"PATH": env.pop("PATH"), "DRY_RUN": "1", **env},
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_slurm_script_derives_the_rendezvous(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho gpu-node-07\necho gpu-node-08\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "EATDIST_ON_NODE": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_GPUS_ON_NODE": "8",
           "ACCELERATE_CONFIG": "launch/zero2_multinode.yaml"}  # fmt: skip
    line = dry_run("slurm.sh", env, "train", "--config", "configs/synthetic.yaml")
    assert line.split() == ["accelerate", "launch", "--config_file", "launch/zero2_multinode.yaml", "--num_machines",
                            "2", "--machine_rank", "1", "--num_processes", "16", "--main_process_ip", "gpu-node-07",
                            "--main_process_port", "24242", "-m", "eatdist", "train", "--config",
                            "configs/synthetic.yaml"]  # fmt: skip


def test_torchrun_script(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "NNODES": "2", "NODE_RANK": "1", "MAIN_ADDR": "node0", "NPROC_PER_NODE": "4"}
    line = dry_run("torchrun.sh", env, "explain", "--model", "m")
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 4 --master_addr node0" in line and line.strip().endswith(
        "-m eatdist explain --model m"
    )


def test_gpu_smoke_script_commands_parse(tmp_path):
    from eatdist.cli.main import build_parser

    lines = dry_run("gpu_smoke.sh", {"PATH": "/usr/bin:/bin", "WORK": str(tmp_path)}).splitlines()
    assert len(lines) == 4
    for line in lines:
        words = line.split()
        if "--config_file" in words:
            assert (REPO / words[words.index("--config_file") + 1]).is_file()
        args = words[words.index("eatdist") + 1 :]
        parsed = build_parser().parse_args([a.replace("\\", "") for a in args])
        assert parsed.command in {"synth", "train", "explain"}


def test_readme_rows_name_existing_files():
    text = (LAUNCH / "README.md").read_text()
    for name in [p.name for p in LAUNCH.iterdir() if p.name != "README.md"]:
        assert name in text, f"launch/README.md does not mention {name}"
