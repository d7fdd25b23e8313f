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
    line = dry_run("torchrun.sh", dict(env), "explain", "--model", "m")
    assert line.split() == ["torchrun", "--nnodes", "2", "--nproc_per_node", "4", "--max_restarts", "0", "--node_rank",
                            "1", "--master_addr", "node0", "--master_port", "29500", "-m", "eatdist", "explain",
                            "--model", "m"]  # fmt: skip
    # elastic: nodes from 1 to 4 meet at a c10d rendezvous, restarted up to 3 times
    line = dry_run("torchrun.sh", {**env, "NNODES": "1:4", "MAX_RESTARTS": "3", "RDZV_ID": "job7"}, "train")
    assert line.split() == ["torchrun", "--nnodes", "1:4", "--nproc_per_node", "4", "--max_restarts", "3",
                            "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29500", "--rdzv_id", "job7",
                            "-m", "eatdist", "train"]  # fmt: skip


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


@pytest.mark.slow
def test_slurm_dry_run_never_fails_under_load(tmp_path):
    """The main node comes from a long host list under `set -o pipefail`: reading only its first
    line (`| head -n 1`) failed 55 of 300 runs with SIGPIPE under load; 200 parallel runs must all pass."""
    from concurrent.futures import ThreadPoolExecutor

    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\nseq -f 'node-%05g' 0 20000\n")  # more than a pipe buffer holds
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "EATDIST_ON_NODE": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node-[00000-20000]", "SLURM_GPUS_ON_NODE": "4",
           "DRY_RUN": "1"}  # fmt: skip

    def once(_):
        result = subprocess.run(["bash", str(LAUNCH / "slurm.sh"), "train"], env=env, capture_output=True,
                                text=True, cwd=REPO)  # fmt: skip
        return result.returncode, result.stdout

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(once, range(200)))
    failed = [r for r in results if r[0] != 0 or "--main_process_ip node-00000 " not in r[1]]
    assert not failed, f"{len(failed)} of 200 dry runs failed, e.g. {failed[0]}"


def _readme_pipeline_commands():
    """The eatdist command lines of README's "The pipeline" block: (words after 'eatdist', whole line)."""
    import shlex

    text = (REPO / "README.md").read_text()
    section = text[text.index("## The pipeline") :]
    block = section[section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)]
    commands = []
    for line in block.strip().splitlines():
        words = shlex.split(line.split("#")[0])
        if "eatdist" in words and "..." not in words:
            commands.append((words[words.index("eatdist") + 1 :], line))
    return commands


def test_readme_pipeline_commands_parse_and_runs_do_not_collide():
    from eatdist.cli.main import build_parser
    from eatdist.config import load_config

    commands = _readme_pipeline_commands()
    assert len(commands) >= 8
    train_dirs = []
    for words, _line in commands:
        args = build_parser().parse_args(words)
        if args.command == "train":
            train_dirs.append(load_config(args.config, args.overrides).train.output_dir)
    # the 2-process run right after the 1-process one must not find the first run's checkpoints
    assert len(train_dirs) >= 2 and len(set(train_dirs)) == len(train_dirs), train_dirs


def test_every_subcommand_takes_config_and_has_help_texts():
    import argparse

    from eatdist.cli.main import build_parser

    def leaves(parser, path=()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for action in subs:
            for name, sub in action.choices.items():
                yield from leaves(sub, (*path, name))

    found = list(leaves(build_parser()))
    assert {p[0] for p, _ in found} >= {"demo", "synth", "convert", "check", "train", "explain", "evaluate",
                                        "report", "backbones"}  # fmt: skip
    for path, parser in found:
        options = {o for a in parser._actions for o in a.option_strings}
        if path != ("export",):  # export reads no configuration: the package holds it all
            assert "--config" in options, f"eatdist {' '.join(path)} does not take --config"
        undocumented = [a.dest for a in parser._actions if not a.help and a.dest != "help"]
        assert not undocumented, f"eatdist {' '.join(path)}: no help text for {undocumented}"


def test_report_check_and_backbones_accept_config(tmp_path):
    from conftest import write_corpus
    from eatdist.cli.main import main

    corpus = write_corpus(tmp_path / "c", {"train": [4], "val": [4]})
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {corpus.root}\n")
    assert main(["check", "--config", str(config), "--workers", "1"]) == 0
    assert main(["check", f"data.root={corpus.root}", "--workers", "1"]) == 0
    assert main(["backbones", "--config", str(config)]) == 0
    assert main(["report", "--explanations", str(tmp_path / "none"), "--config", str(config), "train.epoch=1"]) == 2
