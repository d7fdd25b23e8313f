"""The ``eatdist`` command: one console script, one short function per subcommand."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from eatdist import dist
from eatdist.cli.errors import EXIT_CODES, EXIT_INTERRUPTED, describe, print_error
from eatdist.errors import EatdistError
from eatdist.hostmem import keep_freed_memory
from eatdist.store import require_local

if TYPE_CHECKING:
    from eatdist.data.convert import ConvertOptions


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (defaults: the synthetic recipe)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _convert_args(p: argparse.ArgumentParser, test_split: bool) -> None:
    p.add_argument("src", metavar="SRC", help="the dataset as downloaded and unpacked")
    p.add_argument("--out", required=True, metavar="DIR", help="corpus folder to write")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard")
    p.add_argument("--max-side", type=int, metavar="N", help="re-encode larger images as JPEG of this longest side")
    p.add_argument("--workers", type=int, metavar="N", help="converter processes (default: the CPU count, at most 8)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="share of each class for val")
    if test_split:
        p.add_argument("--test-fraction", type=float, default=0.1, metavar="F", help="share of each class for test")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the split and the shard order")
    _config_args(p)


def cmd_synth(args: argparse.Namespace) -> int:
    from eatdist.config import load_config
    from eatdist.data.synth import generate

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.synth.out
    require_local(out, "--out" if args.out else "synth.out", "the corpus is written to a local folder")
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
        if trainer.fit(resume=args.resume) is None:
            from eatdist.train.preempt import EXIT_PREEMPTED

            return EXIT_PREEMPTED
        if cfg.train.explain_split:
            from eatdist.explain.job import run_explain

            run = trainer.run_dir
            shards = trainer.info.shard_paths(cfg.train.explain_split)
            summary = run_explain(run / "model", shards, run / "explanations", cfg.explain)
            if summary is not None:
                print(f"explained {summary['explained']} {cfg.train.explain_split} images into {run / 'explanations'}")
    finally:
        trainer.close()
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from eatdist.config import load_config
    from eatdist.explain.job import job_status, run_explain

    if args.engine is not None:
        args.overrides.append(f"explain.engine={args.engine}")
    if args.status:
        text, complete = job_status(args.status)
        print(text)
        return 0 if complete else 1
    missing = [f"--{k}" for k in ("model", "input", "output") if getattr(args, k) is None]
    if missing:
        raise EatdistError(f"explain needs {', '.join(missing)} (or --status DIR)")
    cfg = load_config(args.config, args.overrides)
    try:
        summary = run_explain(args.model, args.input, args.output, cfg.explain)
    finally:
        dist.destroy_process_group()
    if summary is None:  # another rank prints the job's summary
        return 0
    mine = summary["by_this_process"]
    done_before = " (the job was complete before this run)" if mine["shards"] == 0 else ""
    renamed = f" {summary['renamed']} under a safe key (a dot in the key)," if summary.get("renamed") else ""
    print(
        f"explained {summary['explained']} images from {summary['input_shards']} shards into {summary['output']}"
        f" ({mine['images']} by this process{done_before}); {summary['undecodable']} undecodable,{renamed}"
        f" {len(summary['truncated_shards'])} truncated shard(s) (listed in {summary['output']}/explain_summary.json)"
    )
    if summary["incomplete_shards"]:
        print(f"eatdist: error: {len(summary['incomplete_shards'])} shard(s) not explained (see the log); "
              "a rerun retries only those", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _convert_options(args: argparse.Namespace, test_fraction: float) -> ConvertOptions:
    from eatdist.config import load_config
    from eatdist.data.convert import ConvertOptions, default_workers

    load_config(args.config, args.overrides)  # a converter's options are its own; a wrong key is still an error

    return ConvertOptions(
        out=require_local(args.out, "--out", "the corpus is written to a local folder"),
        shard_size=args.shard_size,
        max_side=args.max_side,
        workers=args.workers or default_workers(),
        val_fraction=args.val_fraction,
        test_fraction=test_fraction,
        seed=args.seed,
    )


def cmd_convert_cub(args: argparse.Namespace) -> int:
    from eatdist.data.convert import convert_cub

    subset: Literal["all", "common"] = "common" if args.attr_subset in ("common", "112") else "all"
    result = convert_cub(
        args.src,
        _convert_options(args, test_fraction=0.0),
        certainty=args.certainty,
        attr_subset=subset,
        min_classes=args.attr_min_classes,
    )
    print(result.summary())
    return 0


def cmd_convert_sun(args: argparse.Namespace) -> int:
    from eatdist.data.convert import convert_sun

    print(convert_sun(args.src, _convert_options(args, args.test_fraction)).summary())
    return 0


def cmd_convert_awa2(args: argparse.Namespace) -> int:
    from eatdist.data.convert import convert_awa2

    print(convert_awa2(args.src, _convert_options(args, args.test_fraction)).summary())
    return 0


def cmd_convert_folder(args: argparse.Namespace) -> int:
    from eatdist.data.convert import convert_folder

    print(convert_folder(args.src, args.attributes, _convert_options(args, args.test_fraction)).summary())
    return 0


def _positional_or_override(args: argparse.Namespace, name: str) -> None:
    """Move an override that argparse took for the optional positional ``name`` back to the overrides."""
    value = getattr(args, name)
    if value is not None and "=" in value and "://" not in value and not Path(value).exists():
        args.overrides.insert(0, value)
        setattr(args, name, None)


def cmd_check(args: argparse.Namespace) -> int:
    from eatdist.config import load_config
    from eatdist.data.check import check_corpus
    from eatdist.data.convert import default_workers

    _positional_or_override(args, "root")
    cfg = load_config(args.config, args.overrides)
    report = check_corpus(args.root or cfg.data.root, workers=args.workers or default_workers())
    print(report.summary())
    return 0 if report.ok else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from eatdist.config import load_config
    from eatdist.explain.evaluate import EVALUATION_FILE, evaluate_explanations

    cfg = load_config(args.config, args.overrides)
    result = evaluate_explanations(args.explanations, args.data or cfg.data.root)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:{width}s}  {value}")
    print(f"(written to {str(args.explanations).rstrip('/')}/{EVALUATION_FILE})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from eatdist.config import load_config
    from eatdist.explain.report import write_report

    load_config(args.config, args.overrides)  # nothing in it shapes the page, but a wrong key is still an error
    print(f"report: {write_report(args.explanations, args.out, args.samples)}")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from eatdist.config import load_config
    from eatdist.models.registry import check_plugins, list_backbones, list_timm_models, load_failures, name_clashes

    load_config(args.config, args.overrides)
    for name in list_backbones(load=True):
        print(name)
    timm_models = list_timm_models(args.timm or "*")
    if args.timm:
        for name in timm_models:
            print(f"timm/{name}")
    else:
        print(f"(plus {len(timm_models)} timm models, e.g. resnet50; list them with --timm PATTERN)")
    failed = [f"FAILED: {failure}" for failure in load_failures()]
    clashes = [f"CLASH: {clash}" for clash in name_clashes()]
    if args.check:  # a clash hides a plugin: a finding of --check, a warning otherwise
        for result in check_plugins():
            print(f"check: {result}")
            if not result.ok:
                failed.append(f"FAILED: {result}")
    for line in failed + clashes:
        print(line, file=sys.stderr)
    return 1 if failed or (args.check and clashes) else 0


def cmd_export(args: argparse.Namespace) -> int:
    from eatdist.models.export import export_package

    require_local(args.out, "--out", "the exporters write a local file or folder")
    out = export_package(args.model, args.format, args.out, opset=args.opset, repo=args.repo)
    if args.format == "hub":
        from eatdist.models.hub import repo_name

        repo = args.repo or repo_name(args.model)
        print(f"Hub folder of {args.model} in {out}: publish it with 'hf upload {repo} {out}'")
        return 0
    print(f"exported {args.model} as {args.format} to {out} (metadata: {out}.json); dynamic batch size")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from eatdist.cli.demo import run_demo

    require_local(args.workdir, "--workdir", "the demo writes its corpus, run and explanations to a local folder")
    return run_demo(args.workdir, args.processes, args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eatdist",
        description="Explainable attribute-based multi-task image classification, trained and explained at scale.",
        epilog=EXIT_CODES,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic corpus → 2-process training → 2-process explanation")
    p.add_argument("--workdir", default="runs/demo", metavar="DIR", help="folder for corpus, run and explanations")
    p.add_argument(
        "--processes", type=int, default=2, metavar="N", help="processes for training and explanation (default 2)"
    )
    _config_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="write the synthetic attribute corpus")
    p.add_argument("--out", help="output folder (default: synth.out)")
    _config_args(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="convert a downloaded dataset (CUB, SUN, AwA2, image folder) into shards")
    datasets = p.add_subparsers(dest="dataset", required=True, metavar="{cub,sun,awa2,folder}")
    c = datasets.add_parser("cub", help="CUB-200-2011: SRC is the unpacked CUB_200_2011 folder")
    _convert_args(c, test_split=False)
    c.add_argument("--certainty", action="store_true", help="weigh labels by annotator certainty; mask 'not visible'")
    c.add_argument(
        "--attr-subset",
        choices=("all", "common", "112"),
        default="all",
        help="common (or 112): attributes present in at least --attr-min-classes classes, by class majority",
    )
    c.add_argument(
        "--attr-min-classes", type=int, default=10, metavar="N", help="classes an attribute needs for --attr-subset"
    )
    c.set_defaults(func=cmd_convert_cub)
    c = datasets.add_parser("sun", help="SUN Attribute: SRC holds the .mat files and images/")
    _convert_args(c, test_split=True)
    c.set_defaults(func=cmd_convert_sun)
    c = datasets.add_parser("awa2", help="Animals with Attributes 2: SRC is Animals_with_Attributes2/")
    _convert_args(c, test_split=True)
    c.set_defaults(func=cmd_convert_awa2)
    c = datasets.add_parser("folder", help="an image folder tree SRC/<class>/<image> plus an attribute CSV")
    _convert_args(c, test_split=True)
    c.add_argument("--attributes", required=True, metavar="CSV", help="attribute values per image or per class")
    c.set_defaults(func=cmd_convert_folder)

    p = sub.add_parser("check", help="verify every sample of a corpus against dataset.json")
    p.add_argument(
        "root", nargs="?", metavar="DIR", help="corpus folder or URL holding dataset.json (default: data.root)"
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="shards checked in parallel (default: the CPU count, at most 8)"
    )
    _config_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="train an EAT model (under any launcher)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "explain",
        help="explain image shards into explanation shards (any number of processes, under a launcher or not)",
    )
    p.add_argument("--model", help="model package: a folder (a run's model/) or hf-hub:org/name")
    p.add_argument("--input", help="input shards: a folder, a glob or a file")
    p.add_argument(
        "--output",
        help="folder or URL (s3://, gs://, ...) for the explanation shards, shared by every process of the job",
    )
    p.add_argument(
        "--engine",
        choices=("claims", "ray"),
        help="who schedules the shards: claims (processes claim them in the output; the default) or ray "
        "(this process drives a Ray cluster); sets explain.engine",
    )
    p.add_argument(
        "--status",
        metavar="OUT",
        help="print the job in OUT (a folder or URL): shards done, claimed (by whom, heartbeat age), remaining; "
        "exit 0 when complete",
    )
    _config_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("evaluate", help="score explanation shards against their corpus (accuracy, maps on objects)")
    p.add_argument("--explanations", required=True, metavar="OUT", help="output (folder or URL) of 'eatdist explain'")
    p.add_argument("--data", metavar="DIR", help="folder of the input shards, same names (default: data.root)")
    _config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="an HTML page of explanation shards: overlays, texts, scores")
    p.add_argument("--explanations", required=True, metavar="OUT", help="output (folder or URL) of 'eatdist explain'")
    p.add_argument("--out", metavar="FILE", help="page to write, a file or URL (default: OUT/report.html)")
    p.add_argument(
        "--samples", type=int, default=240, metavar="N", help="explained images shown (a sample of larger jobs)"
    )
    _config_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "export",
        help="export a model package to ONNX or TorchScript (outputs: class logits, attribute logits, features), "
        "or as a folder for the Hugging Face Hub",
    )
    p.add_argument("--model", required=True, metavar="PKG", help="model package: a folder or hf-hub:org/name")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "hub"), help="format to write")
    p.add_argument(
        "--out", required=True, metavar="FILE", help="file to write (metadata goes to FILE.json); hub: a folder"
    )
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: the exporter's)")
    p.add_argument("--repo", metavar="ORG/NAME", help="hub: the repository the card names (default: --model's own)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "backbones",
        help="list registered backbones, plugin failures and name clashes",
        description="List the backbones registered in the entry-point group eatdist.backbones. When two packages "
        "register the same name, eatdist's own entry point wins, else the package whose name sorts first.",
    )
    p.add_argument("--timm", metavar="PATTERN", help="also list timm models matching PATTERN")
    p.add_argument(
        "--check",
        action="store_true",
        help="build each plugin backbone on a tiny input and report contract violations (exit 1 if any)",
    )
    _config_args(p)
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
    """Run the CLI and return its exit code (see :data:`eatdist.cli.errors.EXIT_CODES`).

    A user error (an :class:`EatdistError`, an OS error about a path such as a full disk or a
    read-only folder, either raised in a DataLoader worker, or a collective broken because
    another rank failed) prints one line ``[rank N] eatdist: error: ...`` and returns 2; Ctrl-C
    returns 130. Anything else is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    keep_freed_memory()  # before any loader worker is forked: they inherit it
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print_error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        described = describe(exc)
        if described is None:
            raise
        message, code = described
        print_error(message)
        return code


if __name__ == "__main__":
    sys.exit(main())
