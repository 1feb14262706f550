"""One Markdown page of what `make demo` did: `<storage>/reports/demo/README.md`.

    python -m analysis.demo_report begin                  # marks the start of a demo run
    python -m analysis.demo_report timed NAME -- CMD...   # runs CMD, records how long it took
    python -m analysis.demo_report write [--extra-grid TITLE=PATH] [--extra-markdown PATH]

`begin` and `timed` append JSON lines to `<storage>/reports/demo/timings.jsonl`; `write`
reads that, the noun report, the caption shards, the generated sources' ground truth and
the training runs, and writes the page with its images beside it (relative links). Every
section reads files the demo leaves behind; a section whose step has not run says so, so
the page can be written after any subset of the demo.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import difflib
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from shardkit import storage
from shardkit.cli import config_from_args, dispatch, run_main
from shardkit.config import PipelinesConfig
from shardkit.shards import CAPTION, IMAGE, StageOutput
from training.layout import RunLayout, runs_root

log = logging.getLogger("analysis.demo_report")

TIMINGS = "timings.jsonl"
PAGE = "README.md"
IMAGES = "images"
"""Everything the page links lives under this sub-folder, rewritten whole by each `write`."""
DEFAULT_EXAMPLES = ("sample-laion=6", "sample-sam=4")
THUMBNAIL_SIDE = 192
GRID_MIN_HEIGHT = 160
"""The demo's grids are 64-128 px tall: shown enlarged (nearest neighbour) to be seen at all."""
EXACT_RATE_LIMIT = 5000
"""Samples read for the dataset-wide exact-match rate: enough for the demo, bounded for real data."""
NOUN_PLOTS = ("table.png", "top_nouns.png", "nouns_per_caption.png", "zipf.png")
_GRID = re.compile(r"^step_(\d+)(?:_(\d+)x(\d+))?\.png$")


def demo_folder(root: str) -> str:
    return storage.join(root, "reports", "demo")


# ---- timings -------------------------------------------------------------------------------

def _now() -> str:
    # local time with its offset: readable on the page, and still comparable across zones
    return dt.datetime.now().astimezone().isoformat(timespec="milliseconds")


def read_jsonl(uri: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line a killed writer left half-written is skipped."""
    if not storage.exists(uri):
        return []
    records = []
    for number, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON; skipped", uri, number)
    return records


def append_jsonl(uri: str, record: dict[str, Any]) -> None:
    line = json.dumps(record, sort_keys=True) + "\n"
    if storage.is_local(uri):
        # one write of one line in append mode: two demo steps never interleave within a line
        fs, path = storage.filesystem(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
        return
    # object stores cannot append: rewrite the (small) file whole
    existing = storage.read_text(uri) if storage.exists(uri) else ""
    storage.atomic_write(uri, existing + line)


def current_run(records: list[dict[str, Any]]) -> str | None:
    """The id of the latest `begin`: steps recorded after it belong to that demo run."""
    return next((r["run"] for r in reversed(records) if r.get("event") == "begin"), None)


def begin(root: str) -> str:
    started = _now()
    append_jsonl(storage.join(demo_folder(root), TIMINGS), {"event": "begin", "run": started, "started": started})
    log.info("demo run %s begins; timings in %s", started, demo_folder(root))
    return started


def _wait(process: subprocess.Popen) -> int:
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            # Ctrl-C reaches the whole process group, the child too: let it finish its own
            # clean-up (a checkpoint, a shard) as a shell would, then record what it returned
            log.warning("interrupted: waiting for the command to exit")


def run_timed(root: str, name: str, command: Sequence[str]) -> int:
    """Run `command` with this process's stdin/stdout/stderr, append how long it took and
    its exit status, and return that status (128 + N when a signal N ended it, as a shell says)."""
    uri = storage.join(demo_folder(root), TIMINGS)
    run = current_run(read_jsonl(uri))
    started, clock = _now(), time.monotonic()
    signal_number = None
    try:
        code = _wait(subprocess.Popen(list(command)))
    except OSError as exc:
        log.error("%s: cannot run %s: %s", name, command[0], exc)
        code = 127  # the shell's "command not found"
    if code < 0:
        signal_number, code = -code, 128 - code
    seconds = round(time.monotonic() - clock, 2)
    record = {"event": "step", "run": run, "name": name, "started": started, "seconds": seconds,
              "returncode": code, "command": list(command)}
    if signal_number is not None:
        record["signal"] = signal_number
    append_jsonl(uri, record)
    log.info("%s: %.1f s, exit status %d", name, seconds, code)
    return code


@dataclasses.dataclass
class RunTimes:
    """One demo run's steps, the latest record of each (a step rerun after a failure replaces
    its earlier record)."""

    run: str | None
    steps: dict[str, dict[str, Any]]

    @property
    def total(self) -> float:
        return sum(r["seconds"] for r in self.steps.values())

    @property
    def wall(self) -> float | None:
        """From the `begin` mark to the end of the last step: includes what ran untimed between."""
        if not self.run or not self.steps:
            return None
        start = dt.datetime.fromisoformat(self.run)
        ends = [dt.datetime.fromisoformat(r["started"]) + dt.timedelta(seconds=r["seconds"]) for r in self.steps.values()]
        return max(ends).timestamp() - start.timestamp()


def group_runs(records: list[dict[str, Any]]) -> list[RunTimes]:
    """Demo runs in the order they began; steps timed before any `begin` form a run of their own."""
    runs: dict[str | None, RunTimes] = {}
    for record in records:
        run = record.get("run")
        if record.get("event") == "begin" or (record.get("event") == "step" and run not in runs):
            runs.setdefault(run, RunTimes(run, {}))
        if record.get("event") == "step":
            runs[run].steps.pop(record["name"], None)  # re-insert: the order is the latest run's
            runs[run].steps[record["name"]] = record
    return list(runs.values())


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _short_command(command: Sequence[str]) -> str:
    # the venv's interpreter path is noise on the page; `python` says the same
    words = ["python" if w == sys.executable or w.endswith(("/bin/python", "/bin/python3")) else w for w in command]
    text = shlex.join(words)
    return text if len(text) <= 90 else text[:87] + "..."


def _status(record: dict[str, Any] | None) -> str:
    if record is None:
        return "not run"
    if record["returncode"] == 0:
        return "ok"
    return f"**failed** (exit {record['returncode']})"


def timings_section(runs: list[RunTimes]) -> list[str]:
    md = ["## What ran and how long", ""]
    runs = [r for r in runs if r.steps]
    if not runs:
        return md + ["Not run: no timings recorded. `make demo` records them through "
                     "`python -m analysis.demo_report begin` and `... timed NAME -- CMD`.", ""]
    latest, first = runs[-1], runs[0]
    names = list(latest.steps) + [n for r in runs for n in r.steps if n not in latest.steps]
    names = list(dict.fromkeys(names))
    compare = len(runs) > 1
    header = ["Step", "Command", "This run"] + (["First run"] if compare else []) + ["Status"]
    md += [f"This run began {latest.run or 'without a begin mark'}"
           + (f"; {len(runs)} demo runs are recorded, the first began {first.run}." if compare else "."), ""]
    if compare:
        md += ["A later run reuses every stage already complete (shards, captions, features, trained "
               "stages are skipped or resumed), so its column shows what that costs; the first run's shows "
               "the work itself.", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        mine, theirs = latest.steps.get(name), first.steps.get(name)
        shown = mine or theirs
        cells = [f"`{name}`", f"`{_short_command(shown.get('command', []))}`" if shown.get("command") else "",
                 duration(mine["seconds"]) if mine else "not run"]
        if compare:
            cells.append(duration(theirs["seconds"]) if theirs else "not run")
        md.append("| " + " | ".join(cells + [_status(mine)]) + " |")
    totals = ["**Total**", "sum of the steps", f"**{duration(latest.total)}**"]
    if compare:
        totals.append(f"**{duration(first.total)}**")
    md += ["| " + " | ".join(totals + [""]) + " |", ""]
    wall = latest.wall
    if wall is not None:
        md += [f"Wall clock from `begin` to the end of the last step of this run: {duration(wall)}.", ""]
    return md


# ---- concept density (the noun report) -----------------------------------------------------

def _field_label(name: str) -> str:
    if name == CAPTION:
        return "alt text (`txt`)"
    return f"dense captions (`{name.removesuffix('.txt')}`)"


def _number(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _paper_number(value: Any) -> str:
    from analysis.report import human  # the paper's units (2.5M, 210K), as the noun report writes them

    return human(value) if isinstance(value, (int, float)) else "—"


NOUN_HEADER = ["Dataset", "Field", "VN", "DN", "VN/DN", "Total nouns", "Nouns/image", "Images", "Words/caption",
               "Flagged", "Top nouns"]


def _flagged(row: dict[str, Any]) -> str:
    """Dense captions the captioning stage's quality checks marked, by flag."""
    flagged = row.get("flagged") or {}
    if row.get("field") == "txt" or not flagged:
        return "—"
    by_flag = ", ".join(f"{name} {count}" for name, count in flagged.get("by_flag", {}).items())
    return f"{flagged['captions']}" + (f" ({by_flag})" if by_flag else "") + (" excluded" if flagged.get("excluded") else "")


def _noun_row(row: dict[str, Any]) -> list[str]:
    top = ", ".join(f"{noun} ({count})" for noun, count in (row.get("top_nouns") or [])[:5])
    return [row.get("dataset", "?"), _field_label(row.get("field", "?")), _number(row.get("VN")), _number(row.get("DN")),
            f"{row['VN/DN %']:.1f}%" if row.get("VN/DN %") is not None else "—", _number(row.get("total_nouns")),
            _number(row.get("average_nouns_per_image"), 2), _number(row.get("images")),
            _number(row.get("words_per_caption"), 1), _flagged(row), top]


def _paper_row(paper: dict[str, Any]) -> list[str]:
    cells = ["", f"{paper['name']} (paper)", _paper_number(paper.get("VN")), _paper_number(paper.get("DN")),
             f"{paper['VN/DN %']}%", _paper_number(paper.get("total_nouns")), f"{paper.get('average')}", "", "", "", ""]
    return [f"*{c}*" if c else c for c in cells]


def nouns_section(root: str, files: dict[str, bytes]) -> list[str]:
    md = ["## Concept density: nouns per caption", ""]
    nouns_dir = storage.join(root, "reports", "nouns")
    record_uri = storage.join(nouns_dir, "nouns.json")
    if not storage.exists(record_uri):
        return md + ["Not run: no noun report (`make nouns`, i.e. `python -m analysis nouns`).", ""]
    record = json.loads(storage.read_text(record_uri))
    rows = record.get("rows", [])
    threshold = rows[0].get("valid_threshold", "?") if rows else "?"
    md += [f"From the noun report written {record.get('written', '?')} "
           f"(spaCy `{record.get('settings', {}).get('spacy_model', '?')}`; full report: [nouns.md](../nouns/nouns.md)). "
           f"VN: distinct nouns seen more than {threshold} times; DN: all distinct nouns; nouns per image counts an "
           "empty caption as zero. Italic rows are PixArt-α's Table 1 over millions of images: the shape of the "
           "comparison (dense captions carry more nouns per image than alt text), not a target at this size.", ""]
    if not rows:
        md += ["The noun report holds no rows (no dataset had captions).", ""]
    else:
        md += ["| " + " | ".join(NOUN_HEADER) + " |", "|" + "---|" * len(NOUN_HEADER)]
        for row in rows:
            md.append("| " + " | ".join(_cell(c) for c in _noun_row(row)) + " |")
            if row.get("paper"):
                md.append("| " + " | ".join(_cell(c) for c in _paper_row(row["paper"])) + " |")
        md.append("")
    for name in NOUN_PLOTS:
        uri = storage.join(nouns_dir, name)
        if storage.exists(uri):
            rel = f"{IMAGES}/nouns/{name}"
            files[rel] = storage.read_bytes(uri)
            md += [f"![{name.removesuffix('.png').replace('_', ' ')}]({rel})", ""]
        else:
            md += [f"Not run: the noun report has no `{name}`.", ""]
    return md


# ---- caption examples ----------------------------------------------------------------------

def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell."""
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
            .replace("\r", " ").replace("\n", " ").strip())


def load_ground_truth(config: PipelinesConfig, dataset: str) -> dict[str, str]:
    """file name in the source -> exact scene description, for sources the scene generator
    made (their `scenes.jsonl`); empty for real data, where no ground truth exists."""
    from synthetic.generated import is_generated, source_folder

    cfg = config.dataset(dataset)
    if not is_generated(cfg):
        return {}
    path = os.path.join(source_folder(cfg), "scenes.jsonl")
    if not os.path.exists(path):
        log.info("%s: no %s; captions are shown without ground truth", dataset, path)
        return {}
    truth = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            truth[row["file_name"]] = row["description"]
    return truth


def truth_for(meta: dict[str, Any], truth: dict[str, str]) -> str | None:
    """The sample's scene description: in its own json (the synthetic source), or looked up
    in the source's scenes by its origin: the URL's path (LAION rows, `images/000001.jpg`)
    or the tar member after `#` (SA-1B, `sa_1.jpg`)."""
    if isinstance(meta.get("description"), str):
        return meta["description"]
    origin = meta.get("origin", "")
    if not truth or not origin:
        return None
    if "#" in origin:
        return truth.get(origin.rsplit("#", 1)[1])
    # the loopback server's address can change between runs: match the path's tail only
    parts = origin.split("://", 1)[-1].split("/")[1:]
    return next((truth[tail] for tail in ("/".join(parts[i:]) for i in range(len(parts))) if tail in truth), None)


def _word(word: str) -> str:
    # "right" and "right," are the same word to a reader: punctuation and case do not count
    return word.strip(".,;:").lower()


def marked_differences(caption: str, truth: str) -> tuple[str, str]:
    """Both texts as table cells, with what differs in bold: in the caption, the words it got
    wrong or made up; in the ground truth, the words the caption got wrong or left out."""
    ours, theirs = caption.split(), truth.split()
    matcher = difflib.SequenceMatcher(a=[_word(w) for w in ours], b=[_word(w) for w in theirs], autojunk=False)
    marked: tuple[list[str], list[str]] = ([], [])
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        for out, words in ((marked[0], ours[a0:a1]), (marked[1], theirs[b0:b1])):
            text = _cell(" ".join(words))
            if text:
                out.append(text if op == "equal" else f"**{text}**")
    return " ".join(marked[0]), " ".join(marked[1])


def thumbnail(image_bytes: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        out = io.BytesIO()
        image.save(out, format="PNG")
    return out.getvalue()


def exact_rate(stage: StageOutput, field: str, truth: dict[str, str], limit: int = EXACT_RATE_LIMIT) -> tuple[int, int]:
    """(exact, compared) over the stage's first `limit` samples that have ground truth."""
    exact = compared = 0
    for sample in itertools.islice(stage.samples(), limit):
        expected = truth_for(sample.meta, truth)
        if expected is not None:
            compared += 1
            exact += sample.text(field).strip() == expected
    return exact, compared


def examples_section(config: PipelinesConfig, captioner: str | None, wanted: list[tuple[str, int]],
                     files: dict[str, bytes]) -> list[str]:
    md = ["## Caption examples", ""]
    if captioner is None:
        return md + ["Not run: the config defines no captioner.", ""]
    md += [f"The first samples of each dataset's `captions/{captioner}` stage: the image (thumbnail), its "
           f"alt text (LAION's `TEXT`, the shard's `txt`; SA-1B has none), the dense caption `{captioner}` "
           "wrote, and, since the images are generated, the exact description of the scene they were drawn "
           "from. Where they differ, bold marks the caption's wrong or invented words and the description's "
           "words the caption got wrong or left out.", ""]
    for dataset, count in wanted:
        md += examples_of(config, dataset, captioner, count, files)
    return md


def examples_of(config: PipelinesConfig, dataset: str, captioner: str, count: int, files: dict[str, bytes]) -> list[str]:
    md = [f"### {dataset}", ""]
    if dataset not in config.datasets:
        return md + [f"Not run: no dataset `{dataset}` in the config.", ""]
    stage = StageOutput.of(config.storage.root, dataset, f"captions/{captioner}")
    if stage.read_plan() is None or not stage.complete_shards():
        return md + [f"Not run: `{dataset}` has no `{captioner}` captions yet "
                     f"(`make caption DATASET={dataset} CAPTIONER={captioner}`).", ""]
    field = f"{captioner}.txt"
    truth = load_ground_truth(config, dataset)
    no_alt_text = "— (SA-1B has no alt text)" if config.dataset(dataset).source == "sam" else "— (empty)"
    md += ["| Image | Alt text | Dense caption | Ground truth | Match |", "|---|---|---|---|---|"]
    shown = exact = 0
    for sample in itertools.islice(stage.samples(), count):
        rel = f"{IMAGES}/examples/{dataset}-{sample.key}.png"
        files[rel] = thumbnail(sample.fields[IMAGE])
        caption, expected = sample.text(field).strip(), truth_for(sample.meta, truth)
        alt = _cell(sample.text(CAPTION)) or no_alt_text
        if expected is None:
            cells = [_cell(caption), "— (none known)", "—"]
        elif caption == expected:
            exact += 1
            cells = [_cell(caption), _cell(expected), "✅ exact"]
        else:
            cells = [*marked_differences(caption, expected), "❌ differs"]
        md.append(f"| ![{sample.key}]({rel}) | {alt} | " + " | ".join(cells) + " |")
        shown += 1
    md.append("")
    if truth or shown:
        all_exact, compared = exact_rate(stage, field, truth)
        if compared:
            md += [f"{exact} of the {shown} shown captions equal the ground truth exactly; over the stage's "
                   f"{compared} captioned samples with a known scene, {all_exact} "
                   f"({100 * all_exact / compared:.0f}%) do.", ""]
    return md


# ---- training runs -------------------------------------------------------------------------

def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def latest_grids(samples_dir: str) -> tuple[int, list[str]] | None:
    """The highest step's grid files, the first sample size's grid first."""
    if not os.path.isdir(samples_dir):
        return None
    found: dict[int, list[tuple[int, str]]] = {}
    for name in os.listdir(samples_dir):
        match = _GRID.match(name)
        if match:
            found.setdefault(int(match.group(1)), []).append((0 if match.group(2) is None else 1, name))
    if not found:
        return None
    step = max(found)
    return step, [name for _, name in sorted(found[step])]


@dataclasses.dataclass
class RunFacts:
    """What a run folder says about the run, each fact from the file the trainer wrote it to."""

    stage: dict[str, Any]
    """The stage config it trained with (its last checkpoint's), else today's config."""
    steps_done: int | None
    losses: tuple[float, float] | None
    start: dict[str, Any] | None
    train_seconds: float | None
    """Time in the training loop, from the trainer's own rates (see training_seconds)."""


def run_facts(config: PipelinesConfig, run_dir: str, name: str) -> RunFacts:
    layout = RunLayout.of(run_dir)
    checkpoints = layout.checkpoints
    metas = []
    if os.path.isdir(checkpoints):
        steps = sorted(n for n in os.listdir(checkpoints) if re.fullmatch(r"step_\d+", n))
        metas = [m for m in (_read_json(os.path.join(checkpoints, n, "meta.json")) for n in steps[-1:]) if m]
    stage = (metas[0].get("stage") if metas else None) or (
        config.training.stages[name].model_dump(mode="json") if name in config.training.stages else {})
    metrics = read_jsonl(layout.metrics)
    worker = _read_json(layout.worker_note(0))  # written when training ends
    steps_done = (worker or {}).get("step") or (metas[0].get("step") if metas else None) or (
        metrics[-1].get("step") if metrics else None)
    losses = (metrics[0]["loss"], metrics[-1]["loss"]) if metrics and "loss" in metrics[0] else None
    return RunFacts(stage, steps_done, losses, _read_json(layout.start),
                    training_seconds(metrics, stage))


def training_seconds(metrics: list[dict[str, Any]], stage: dict[str, Any]) -> float | None:
    """Seconds the run spent training, summed over its logged windows: each window's images
    (steps x batch x accumulation x workers) over the rate the trainer measured for it. Taken
    from the run itself, not from the demo's timings: a second demo run skips a trained stage
    in seconds, and a resumed one trained across several sessions."""
    per_step = stage.get("batch_size", 0) * stage.get("grad_accum", 1) * stage.get("workers", 1)
    total, previous = 0.0, 0
    for entry in metrics:
        rate, step = entry.get("images_per_s"), entry.get("step", previous)
        if not rate or not per_step:
            return None
        total += (step - previous) * per_step / rate
        previous = step
    return total if metrics else None


def trained_on(config: PipelinesConfig, stage: dict[str, Any]) -> str:
    """What the stage learnt from, in words: `the demo's dense captions (synthetic-captioner) of sample-sam, 64 px`."""
    features = config.training.features.get(stage.get("features", ""))
    if features is None:
        return f"feature set `{stage.get('features', '?')}`"
    if stage.get("conditioning") == "class" or features.caption is None:
        what = f"class labels ({len(features.label.classes)} classes) of {features.dataset}" if features.label else \
            f"class labels of {features.dataset}"
    elif features.caption == CAPTION:
        # a synthetic source may put the scene's exact description in `txt` rather than alt text
        source = config.datasets.get(features.dataset)
        exact = getattr(source, "source", None) == "synthetic" and getattr(source, "caption", None) == "description"
        what = f"the exact scene descriptions of {features.dataset}" if exact else f"the alt text of {features.dataset}"
    else:
        what = f"the demo's dense captions (`{features.caption}`) of {features.dataset}"
    extras = [f"{features.resolution} px"]
    if features.select:
        extras.append("selected by " + ", ".join(_condition(c) for c in features.select))
    if features.buckets:
        extras.append("aspect-ratio buckets")
    return f"{what} ({', '.join(extras)})"


STARTS = {"registry": "started from random weights", "dit_import": "started from {init}'s DiT, reparameterised into PixArt",
          "pixart": "started from {init}'s PixArt weights", "dit": "started from the DiT in {init}",
          "checkpoint": "started from checkpoint {init}"}
"""training/start.py's `from` values, in words."""


def started_from(start: dict[str, Any], root: str) -> str:
    init = start.get("init") or ""
    if init.startswith(root.rstrip("/") + "/"):
        init = init[len(root.rstrip("/")) + 1:]  # runs/stage1/pipeline reads better than a full path
    return STARTS.get(start["from"], "started from {init} (" + start["from"] + ")").format(init=f"`{init}`")


def _condition(cond) -> str:  # noqa: ANN001 - shardkit.config.SelectCondition
    parts = [f"{cond.field} ≥ {cond.min:g}" if cond.min is not None else "",
             f"{cond.field} ≤ {cond.max:g}" if cond.max is not None else ""]
    return " and ".join(p for p in parts if p)


def enlarged(png: bytes) -> tuple[bytes, int]:
    """The grid scaled by a whole factor (nearest neighbour: no invented detail) to be visible."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        factor = max(1, math.ceil(GRID_MIN_HEIGHT / image.height))
        if factor == 1:
            return png, 1
        out = io.BytesIO()
        image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(out, format="PNG")
    return out.getvalue(), factor


def _run_names(config: PipelinesConfig, runs_dir: str) -> list[str]:
    present = sorted(n for n in os.listdir(runs_dir) if os.path.isdir(os.path.join(runs_dir, n))) \
        if os.path.isdir(runs_dir) else []
    # the config's stage order is the paper's order (stage1 -> 2 -> 3); anything else after
    return [n for n in config.training.stages if n in present] + [n for n in present if n not in config.training.stages]


def grids_section(config: PipelinesConfig, files: dict[str, bytes]) -> list[str]:
    md = ["## Sample grids of the demo's training runs", ""]
    runs_dir = runs_root(config.storage.root)
    names = _run_names(config, runs_dir)
    if not names:
        return md + ["Not run: no training runs under `runs/` (`make train-stage1`, ...).", ""]
    md += ["Each grid is one row, one image per validation prompt, left to right, sampled from the EMA weights "
           "at the step named. These are tiny models trained for a few dozen steps on a few hundred images, so "
           "expect noise or colour blobs: they show that every stage trains, samples and exports, not what "
           "PixArt-α learns.", ""]
    for name in names:
        md += run_grids(config, os.path.join(runs_dir, name), name, files)
    return md


def run_grids(config: PipelinesConfig, run_dir: str, name: str, files: dict[str, bytes]) -> list[str]:
    samples = RunLayout.of(run_dir).samples
    grids = latest_grids(samples)
    facts = run_facts(config, run_dir, name)
    target = facts.stage.get("steps")
    step_text = f"{facts.steps_done} steps" if facts.steps_done is not None else "steps unknown"
    if facts.steps_done is not None and target and facts.steps_done < target:
        step_text += f" (of {target}: unfinished)"
    took = f" — what ≈{duration(facts.train_seconds)} of training learns" if facts.train_seconds \
        else " — what a short demo run learns"
    md = [f"### {name}: {step_text} on {trained_on(config, facts.stage)}{took}", ""]
    if grids is None:
        return md + [f"Not run: `runs/{name}/samples/` holds no grids yet.", ""]
    grid_step, grid_names = grids
    details = [f"grid at step {grid_step}", f"{facts.stage.get('sample_steps', '?')} sampling steps",
               f"guidance {facts.stage.get('guidance_scale', '?')}"]
    if facts.losses:
        details.append(f"loss {facts.losses[0]:.3f} → {facts.losses[1]:.3f}")
    if facts.start and facts.start.get("from"):
        details.append(started_from(facts.start, config.storage.root))
    md += ["; ".join(details) + ".", ""]
    for grid in grid_names:
        data, factor = enlarged(Path(samples, grid).read_bytes())
        rel = f"{IMAGES}/grids/{name}-{grid}"
        files[rel] = data
        shown = f" (shown at {factor}×, nearest neighbour)" if factor > 1 else ""
        md += [f"![{name} {grid}]({rel})", "", f"`{grid}`{shown}", ""]
    prompts = facts.stage.get("validation_prompts") or []
    label = "Classes" if facts.stage.get("conditioning") == "class" else "Prompts"
    md += [f"{label}, left to right:", ""] + [f"{i}. {_cell(p)}" for i, p in enumerate(prompts, 1)] + [""]
    return md


# ---- a longer-trained checkpoint's material, given on the command line ---------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "grid"


def shipped_section(root: str, folder: str, files: dict[str, bytes]) -> list[str]:
    """The shipped checkpoint: its grid of the validation prompts (drawn by `python -m training
    samples` into <storage>/samples/<name>/) and its card, which states how it was trained and
    the alignment rates `make eval` measured."""
    name = Path(folder).name
    md = [f"### `{folder}`", ""]
    grid, prompts = Path(root) / "samples" / name / "grid.png", Path(root) / "samples" / name / "prompts.json"
    if grid.is_file() and prompts.is_file():
        rel = f"{IMAGES}/extra/{_slug(name)}-grid.png"
        files[rel], factor = enlarged(grid.read_bytes())
        settings = json.loads(prompts.read_text())
        md += [f"![samples of {name}]({rel})", "", "Prompts, left to right:", ""]
        md += [f"{i}. {_cell(p)}" for i, p in enumerate(settings["prompts"], 1)]
        shown = f", shown {factor}x (nearest neighbour)" if factor > 1 else ""
        md += ["", f"{settings['steps']} sampling steps, guidance {settings['guidance_scale']}, seed {settings['seed']}{shown}.", ""]
    else:
        md += [f"Not run: no samples in `{grid.parent}` (`python -m training samples {folder} --stage stage2-long`).", ""]
    card = Path(folder) / "README.md"
    if card.is_file():
        body = card.read_text(encoding="utf-8").split("\n", 1)[1]  # its title is the heading above
        md += [re.sub(r"^(#+) ", r"\1## ", line) for line in body.strip("\n").splitlines()] + [""]
    else:
        md += [f"Not found: `{card}`.", ""]
    return md


def extras_section(extra_grids: list[tuple[str, str]], extra_markdown: list[str], files: dict[str, bytes],
                   root: str = "", shipped: list[str] = ()) -> list[str]:
    md = ["## A longer-trained checkpoint", ""]
    for folder in shipped:
        md += shipped_section(root, folder, files)
    if shipped:
        return md + extras_section(extra_grids, extra_markdown, files)[2:] if extra_grids or extra_markdown else md
    if not extra_grids and not extra_markdown:
        return md + ["Not run: no longer-trained checkpoint's grids were given "
                     "(`python -m analysis.demo_report write --extra-grid TITLE=PATH --extra-markdown PATH`).", ""]
    for number, (title, path) in enumerate(extra_grids, 1):
        md += [f"### {title}", ""]
        if not os.path.isfile(path):
            md += [f"Not found: `{path}`.", ""]
            continue
        rel = f"{IMAGES}/extra/{number:02d}-{_slug(title)}{Path(path).suffix.lower() or '.png'}"
        files[rel] = Path(path).read_bytes()
        md += [f"![{_cell(title)}]({rel})", ""]
    for path in extra_markdown:
        if not os.path.isfile(path):
            md += [f"Not found: `{path}`.", ""]
            continue
        md += [Path(path).read_text(encoding="utf-8").rstrip("\n"), ""]
    return md


# ---- the page ------------------------------------------------------------------------------

VIEW_DEPTH = 3
"""reports/view/<dataset>/[<stage>/<name>/]: how deep a view folder can lie."""


def find_views(root: str) -> list[tuple[str, dict[str, Any]]]:
    """(path under reports/view/, its view.json) of every written viewer page, in name order."""
    base = storage.join(root, "reports", "view")
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(rel: str, depth: int) -> None:
        folder = storage.join(base, rel) if rel else base
        names = storage.list_names(folder)
        if rel and "view.json" in names and "index.html" in names:
            record = _read_json(storage.join(folder, "view.json"))
            if record is not None:
                found.append((rel, record))
        if depth < VIEW_DEPTH:
            for name in sorted(names):
                if name not in ("data", "view.json", "index.html") and storage.TEMP_MARKER not in name:
                    walk(f"{rel}/{name}" if rel else name, depth + 1)

    walk("", 0)
    return found


def views_section(root: str) -> list[str]:
    md = ["## Browse the data", ""]
    views = find_views(root)
    if not views:
        return md + ["Not run: no viewer page (`make view DATASET=x`, i.e. `python -m analysis view x`).", ""]
    md += ["Static pages (no server needed; open them in a browser): thumbnails beside alt text, every "
           "captioner's caption with its nouns marked, scores, quality flags and failures, with search and "
           "filters (the repository's docs/viewer.md says how they are made).", "",
           "| Dataset | Stage | Samples | Failed | Page |", "|---|---|---|---|---|"]
    for rel, record in views:
        dataset, _, stage = rel.partition("/")
        rows = record.get("rows") or {}
        md.append(f"| {dataset} | {stage or 'shards'} | {_number(rows.get('samples'))} | {_number(rows.get('gone'))} "
                  f"| [{rel}/index.html](../view/{rel}/index.html) |")
    return md + [""]


def scores_section(config: PipelinesConfig) -> list[str]:
    md = ["## Scores", ""]
    rows = []
    for dataset in config.datasets:
        for scorer in config.scorers:
            summary = _read_json(storage.join(config.storage.root, dataset, "scores", scorer, "_summary.json"))
            if summary is not None:
                rows.append((dataset, scorer, summary))
    if not rows:
        return md + ["Not run: no scores (`make score DATASET=x`, i.e. `python -m analysis score x`).", ""]
    md += ["Per-sample CLIP image-caption similarity and an aesthetic score (`python -m analysis score`; "
           "docs/scoring.md). The demo's scorer is trained here on the synthetic domain: its aesthetic score "
           "is a synthetic rule (shapes that fill the frame and stand out from the background), not beauty.", "",
           "| Dataset | Scorer | Samples | Failures | Aesthetic mean | CLIP similarity mean, by caption field |",
           "|---|---|---|---|---|---|"]
    for dataset, scorer, summary in rows:
        similarity = ", ".join(f"{name} {value:.3f}" for name, value in (summary.get("clip_similarity_mean") or {}).items())
        md.append(f"| {dataset} | {scorer} | {_number(summary.get('samples_out'))} | {_number(summary.get('failures'))} "
                  f"| {_number(summary.get('aesthetic_mean'), 2)} | {similarity or '—'} |")
    return md + [""]


def _guarded(title: str, build: Callable[[], list[str]]) -> list[str]:
    """A section that fails on an unexpected file says so on the page; the rest still gets written."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - one unreadable input must not cost the whole page
        log.exception("%s: section could not be built", title)
        return [f"## {title}", "", f"Could not be built: `{type(exc).__name__}: {_cell(str(exc))[:300]}`.", ""]


def build_page(config: PipelinesConfig, captioner: str | None, examples: list[tuple[str, int]],
               extra_grids: list[tuple[str, str]], extra_markdown: list[str],
               shipped: Sequence[str] = ()) -> tuple[str, dict[str, bytes]]:
    """The page's Markdown and the files it links (paths relative to the page)."""
    root = config.storage.root
    files: dict[str, bytes] = {}
    runs = group_runs(read_jsonl(storage.join(demo_folder(root), TIMINGS)))
    md = ["# What the demo did", "",
          f"Written {_now()} from `{root}`. Each section reads what a step of `make demo` left there; "
          "a step that has not run is named as such.", ""]
    md += _guarded("What ran and how long", lambda: timings_section(runs))
    md += _guarded("Concept density: nouns per caption", lambda: nouns_section(root, files))
    md += _guarded("Caption examples", lambda: examples_section(config, captioner, examples, files))
    md += _guarded("Scores", lambda: scores_section(config))
    md += _guarded("Browse the data", lambda: views_section(root))
    md += _guarded("Sample grids of the demo's training runs", lambda: grids_section(config, files))
    md += _guarded("A longer-trained checkpoint",
                   lambda: extras_section(extra_grids, extra_markdown, files, root, list(shipped)))
    return "\n".join(md), files


def write_page(root: str, markdown: str, files: dict[str, bytes]) -> str:
    """Replace the page's image folder whole (no stale images from an earlier write), then the page."""
    folder = demo_folder(root)
    fs, images = storage.filesystem(storage.join(folder, IMAGES))
    if fs.exists(images):
        fs.rm(images, recursive=True)
    for rel, data in sorted(files.items()):
        storage.atomic_write(storage.join(folder, rel), data)
    uri = storage.join(folder, PAGE)
    storage.atomic_write(uri, markdown + "\n")
    return uri


# ---- command line --------------------------------------------------------------------------

def _pair(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{what}: expected {text!r} as NAME=VALUE")
    return key.strip(), value.strip()


def _example(text: str) -> tuple[str, int]:
    dataset, count = _pair(text, "--examples")
    if not count.isdigit():
        raise argparse.ArgumentTypeError(f"--examples {text}: the count must be a whole number")
    return dataset, int(count)


def _begin(args: argparse.Namespace) -> int:
    begin(config_from_args(args).storage.root)
    return 0


def _timed(args: argparse.Namespace) -> int:
    return run_timed(config_from_args(args).storage.root, args.name, args.command_line)


def _write(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    captioner = args.captioner or next(iter(config.captioners), None)
    markdown, files = build_page(config, captioner, args.examples or [_example(e) for e in DEFAULT_EXAMPLES],
                                 args.extra_grid, args.extra_markdown, args.shipped)
    uri = write_page(config.storage.root, markdown, files)
    log.info("demo report: %s (%d images)", uri, len(files))
    print(uri)  # the one line a script (or a reader of make's output) wants
    return 0


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Our own arguments, and the command after the first `--` (None when there is no `--`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, None
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    own, command = split_command(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m analysis.demo_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="subcommand", required=True)
    start = commands.add_parser("begin", help="mark the start of a demo run (timings after it belong to it)")
    timed = commands.add_parser("timed", help="run `-- CMD...`, record its time and exit status, return that status")
    timed.add_argument("name", help="the step's name on the page, e.g. curate")
    write = commands.add_parser("write", help="write <storage>/reports/demo/README.md and print its path")
    write.add_argument("--captioner", help="whose captions to show (default: the config's first captioner)")
    write.add_argument("--examples", action="append", type=_example, default=[], metavar="DATASET=N",
                       help=f"datasets and how many samples to show (default: {' '.join(DEFAULT_EXAMPLES)})")
    write.add_argument("--extra-grid", action="append", type=lambda t: _pair(t, "--extra-grid"), default=[],
                       metavar="TITLE=PATH", help="an image to include under its title (repeatable)")
    write.add_argument("--extra-markdown", action="append", default=[], metavar="PATH",
                       help="a Markdown file to include verbatim (repeatable)")
    write.add_argument("--shipped", action="append", default=[], metavar="FOLDER",
                       help="a shipped pipeline folder: its samples (python -m training samples) and card")

    def checked(handler: Callable[[argparse.Namespace], int], takes_command: bool) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            if takes_command != (command is not None) or (command is not None and not command):
                parser.error("`timed NAME -- CMD...` needs a command after `--`; the other subcommands take none")
            args.command_line = command
            return handler(args)
        return run

    for sub, handler in ((start, _begin), (timed, _timed), (write, _write)):
        sub.set_defaults(handler=checked(handler, sub is timed))
    return dispatch(parser, [start, timed, write], own)

if __name__ == "__main__":
    sys.exit(run_main(main))
