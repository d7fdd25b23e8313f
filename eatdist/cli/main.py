"""The ``eatdist`` command: one console script, one short function per subcommand."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from eatdist import dist
from eatdist.errors import EatdistError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (defaults: the synthetic recipe)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def cmd_synth(args: argparse.Namespace) -> int:
    from eatdist.config import load_config
    from eatdist.data.synth import generate

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.synth.out
    info = generate(cfg.synth, out, progress=dist.rank() == 0)
    counts = ", ".join(f"{split} {info.num_samples(split)}" for split in info.splits)
    print(f"synthetic corpus in {out}: {info.num_classes} classes, {info.num_attributes} attributes; {counts}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from eatdist.config import load_config
    from eatdist.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    try:
        trainer.fit(resume=args.resume)
    finally:
        trainer.close()
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from eatdist.config import load_config
    from eatdist.explain.job import run_explain

    cfg = load_config(args.config, args.overrides)
    try:
        summary = run_explain(args.model, args.input, args.output, cfg.explain)
    finally:
        dist.destroy_process_group()
    if summary is not None:
        print(
            f"explained {summary['explained']} images from {summary['input_shards']} shards into {summary['output']}"
            f"; {summary['undecodable']} undecodable (listed in {summary['output']}/explain_summary.json)"
        )
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from eatdist.models.registry import list_backbones, list_timm_models, load_failures

    for name in list_backbones(load=True):
        print(name)
    timm_models = list_timm_models(args.timm or "*")
    if args.timm:
        for name in timm_models:
            print(f"timm/{name}")
    else:
        print(f"(plus {len(timm_models)} timm models, e.g. resnet50; list them with --timm PATTERN)")
    for failure in load_failures():
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if load_failures() else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from eatdist.cli.demo import run_demo

    return run_demo(args.workdir, args.processes, args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eatdist",
        description="Explainable attribute-based multi-task image classification, trained and explained at scale.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic corpus → 2-process training → 2-process explanation")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--processes", type=int, default=2)
    _config_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="write the synthetic attribute corpus")
    p.add_argument("--out", help="output folder (default: synth.out)")
    _config_args(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train an EAT model (under any launcher)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("explain", help="explain image shards into explanation shards (under any launcher)")
    p.add_argument("--model", required=True, help="model package folder (a run's model/)")
    p.add_argument("--input", required=True, help="input shards: a folder, a glob or a file")
    p.add_argument("--output", required=True, help="folder for the explanation shards")
    _config_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("backbones", help="list registered backbones and plugin failures")
    p.add_argument("--timm", metavar="PATTERN", help="also list timm models matching PATTERN")
    p.set_defaults(func=cmd_backbones)
    return parser


def _setup_logging(verbose: bool) -> None:
    rank = dist.rank()
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    prefix = f"[rank {rank}] " if dist.world_size() > 1 else ""
    logging.basicConfig(level=level, format=f"{prefix}%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("PIL", "matplotlib", "urllib3", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line ``eatdist: error: ...`` and return 2."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EatdistError as exc:
        prefix = f"[rank {dist.rank()}] " if dist.world_size() > 1 else ""
        # An error raised in a DataLoader worker arrives with the worker's traceback in its
        # message; its last line is the error itself.
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if "Original Traceback" in str(exc):
            message = message.split(": ", 1)[-1]
        print(f"{prefix}eatdist: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eatdist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
