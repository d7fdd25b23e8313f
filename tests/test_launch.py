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


def test_slurm_script_forwards_preemption_and_requeues(tmp_path):
    """The batch script gets SIGUSR1 (SLURM's --signal): the rank under srun and the launcher gets
    it, stops with code 75, and the job is requeued; a requeued train run adds --resume."""
    import signal
    import subprocess
    import sys
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    # srun runs the per-node script in place (one node); scontrol records what it is asked.
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\n[ "$1" = show ] && echo node0 && exit 0\necho "$@" >> {log}\n')
    # the "launcher" starts one rank that saves and exits 75 on SIGUSR1, as eatdist train does
    rank = "import signal, sys, time\nsignal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\ntime.sleep(60)\n"
    (bin_dir / "accelerate").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n{sys.executable} -c '{rank}'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "node0", "SLURM_GPUS_ON_NODE": "1"}  # fmt: skip
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sh"), "train", "x=1"], env=env, cwd=REPO,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 30
    while not (log.is_file() and "launch" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the rank is up
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75 and "requeueing job 77" in err
    assert "requeue 77" in log.read_text()
    line = dry_run("slurm.sh", {**env, "EATDIST_ON_NODE": "1", "SLURM_RESTART_COUNT": "1"}, "train", "x=1")
    assert line.split()[-3:] == ["train", "x=1", "--resume"]
