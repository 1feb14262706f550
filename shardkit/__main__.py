"""`python -m shardkit {config,validate,status}`: inspect the config and stage outputs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from shardkit import storage
from shardkit.cli import config_from_args, dispatch, run_main
from shardkit.shards import StageOutput
from shardkit.validate import validate_stage

log = logging.getLogger("shardkit")


def _stage_uri(args: argparse.Namespace) -> str:
    if args.path:
        return args.path
    config = config_from_args(args)
    config.dataset(args.dataset)
    return StageOutput.of(config.storage.root, args.dataset, args.stage).uri


def _validate(args: argparse.Namespace) -> int:
    uri = _stage_uri(args)
    problems = validate_stage(uri, decode=not args.no_decode)
    for problem in problems[: args.max_problems]:
        log.error("%s", problem)
    if len(problems) > args.max_problems:
        log.error("... and %d more problems", len(problems) - args.max_problems)
    if problems:
        log.error("%s: INVALID (%d problems)", uri, len(problems))
        return 1
    summary = StageOutput(uri).read_summary() or {}
    log.info("%s: valid (%s shards, %s samples)", uri, summary.get("shards_complete"), summary.get("samples_out"))
    return 0


def _config(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    json.dump(config.model_dump(mode="json"), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _status(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    for name in config.datasets:
        root = storage.join(config.storage.root, name)
        for stage in _stages_under(root):
            output = StageOutput(storage.join(root, stage))
            plan = output.read_plan()
            done = len(output.complete_shards())
            log.info("%-20s %-28s %d/%d shards%s", name, stage, done, plan.num_shards,
                     "" if done >= plan.num_shards else "  (incomplete)")
    return 0


def _stages_under(dataset_root: str, prefix: str = "") -> list[str]:
    """Stage folders are those holding a plan; captions/<name> nests one level."""
    found = []
    for name in storage.list_names(storage.join(dataset_root, prefix) if prefix else dataset_root):
        if name.startswith("_") or name.endswith(".tar"):
            continue
        rel = f"{prefix}/{name}" if prefix else name
        if StageOutput(storage.join(dataset_root, rel)).read_plan() is not None:
            found.append(rel)
        elif not prefix:
            found += _stages_under(dataset_root, rel)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate", help="check a stage output against the shard format")
    check.add_argument("dataset", nargs="?", help="dataset name from the config")
    check.add_argument("stage", nargs="?", default="shards", help="stage folder (default: shards)")
    check.add_argument("--path", help="a stage folder or URI instead of dataset/stage")
    check.add_argument("--no-decode", action="store_true", help="skip decoding images")
    check.add_argument("--max-problems", type=int, default=50)

    def validate(args: argparse.Namespace) -> int:
        if not (args.path or args.dataset):
            parser.error("validate needs a dataset name or --path")
        return _validate(args)

    check.set_defaults(handler=validate)
    show = commands.add_parser("config", help="validate the config and print it resolved")
    show.set_defaults(handler=_config)
    status = commands.add_parser("status", help="which stages of which datasets are complete")
    status.set_defaults(handler=_status)
    return dispatch(parser, [check, show, status], argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
