"""`python -m analysis nouns [--datasets a,b] [--fields txt,tiny-llava]`: the noun report.
`python -m analysis view DATASET [--stage shards] [--serve] [--limit N]`: a static page of a stage.
`python -m analysis score DATASETS [--scorer NAME]`: CLIP similarity and aesthetic scores (docs/scoring.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from analysis.job import count_rows, find_rows, inputs_identity
from analysis.nouns import load_nlp
from analysis.report import current_report, write_report
from shardkit.cli import config_from_args, dispatch, run_main
from shardkit.config import ConfigError

log = logging.getLogger("analysis")


def _split(value: str | None) -> list[str] | None:
    return [v for v in value.replace(",", " ").split() if v] if value else None


def _nouns(args: argparse.Namespace) -> int:
    if args.exclude_flagged:
        args.overrides.append("analysis.nouns.exclude_flagged=true")
    config = config_from_args(args)
    datasets = _split(args.datasets)
    for name in datasets or []:
        config.dataset(name)
    rows = find_rows(config, datasets, _split(args.fields))
    if not rows:
        raise ConfigError("no complete caption fields found: curate (and caption) datasets first")
    cfg = config.analysis.nouns
    inputs = inputs_identity(config, rows)
    current = current_report(config.storage.root, inputs)
    if current is not None:
        log.info("nouns: %s is current (counted from these %d caption fields' shards with this config); "
                 "not counting again", current, len(rows))
        return 0
    nlp = load_nlp(tuple(cfg.spacy_models))
    counts, timings = count_rows(config, rows)
    for row in [r for r, c in counts.items() if c.captions == 0]:
        # SA-1B ships no captions: a row of zeros says nothing about concept density
        log.info("%s: no captions at all; left out of the report", row.label)
        del counts[row]
    settings = {"spacy_model": f"{nlp.meta['lang']}_{nlp.meta['name']} {nlp.meta['version']}",
                "components": list(nlp.pipe_names), "config": cfg.model_dump()}
    uri = write_report(config.storage.root, counts, settings, timings, inputs)
    for row, c in counts.items():
        s = c.statistics(cfg.valid_threshold, 5)
        log.info("%-34s VN/DN %d/%d = %.1f%%, total %d, average %.1f/img, %d images",
                 row.label, s["VN"], s["DN"], s["VN/DN %"], s["total_nouns"], s["average_nouns_per_image"], s["images"])
    log.info("report: %s", uri)
    return 0


def _view(args: argparse.Namespace) -> int:
    from analysis.viewer import serve, write_view

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    if not 16 <= args.thumb <= 512 or args.page_size < 1:
        raise ConfigError("--thumb must be 16 to 512 pixels and --page-size at least 1")
    config = config_from_args(args)
    index_html, _ = write_view(config, args.dataset, args.stage, limit=args.limit, force=args.force,
                               thumb=args.thumb, page_size=args.page_size)
    print(index_html, flush=True)
    if args.serve:
        return serve(index_html.rsplit("/", 1)[0], port=args.port)
    return 0


def _score(args: argparse.Namespace) -> int:
    from analysis.scoring import score

    config = config_from_args(args)
    if not config.scorers:
        raise ConfigError("scorers: none defined")
    name = args.scorer or next(iter(config.scorers))
    config.scorer(name)
    datasets = _split(args.datasets) or []
    for dataset in datasets:
        config.dataset(dataset)
    for dataset in datasets:
        score(config, dataset, name, restart=args.restart)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    nouns = commands.add_parser("nouns", help="noun statistics of every caption field (the paper's Table 1)")
    nouns.add_argument("--datasets", help="comma-separated (default: every dataset with captions)")
    nouns.add_argument("--fields", help="comma-separated caption fields, e.g. txt,tiny-llava (default: all)")
    nouns.add_argument("--exclude-flagged", action="store_true",
                       help="leave out dense captions the captioning stage's quality checks marked")
    nouns.set_defaults(handler=_nouns)
    view = commands.add_parser("view", help="a static HTML page of one stage of a dataset (docs/viewer.md)")
    view.add_argument("dataset")
    view.add_argument("--stage", default="shards", help="shards (default), captions/<captioner>, features/<name>, ...")
    view.add_argument("--limit", type=int, default=None, help="only the first N samples, in shard order")
    view.add_argument("--serve", action="store_true",
                      help="then serve it on 127.0.0.1, with full-size images read from the tars by byte offset")
    view.add_argument("--port", type=int, default=0, help="with --serve (default: a free port, printed)")
    view.add_argument("--force", action="store_true", help="write it even if it is current")
    view.add_argument("--thumb", type=int, default=128, help="thumbnail size in pixels (default 128)")
    view.add_argument("--page-size", type=int, default=100, help="samples per lazily loaded data page (default 100)")
    view.set_defaults(handler=_view)
    scoring = commands.add_parser("score", help="CLIP similarity and aesthetic scores into scores/<scorer> (docs/scoring.md)")
    scoring.add_argument("datasets", help="comma-separated")
    scoring.add_argument("--scorer", default=None, help="default: the first scorer in the config")
    scoring.add_argument("--restart", action="store_true", help="discard existing scores and start over")
    scoring.set_defaults(handler=_score)
    return dispatch(parser, [nouns, view, scoring], argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
