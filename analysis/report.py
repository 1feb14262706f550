"""The concept-density report: Markdown + JSON + PNG plots under <storage>/reports/nouns/."""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

from analysis.job import Row
from analysis.nouns import NounCounts
from shardkit import storage

log = logging.getLogger(__name__)

RECORD = "nouns.json"
"""Written last: its presence, with the inputs it records, means the whole report is there."""
FILES = ("nouns.md", "table.png", "top_nouns.png", "nouns_per_caption.png", "zipf.png", RECORD)

# Table 1 of the paper (NLTK noun counts), matched to our rows by source kind and field
PAPER = {
    ("laion", "alt"): {"name": "LAION", "VN": 210_000, "DN": 2_461_000, "VN/DN %": 8.5, "total_nouns": 72.0e6, "average": 6.4},
    ("laion", "dense"): {"name": "LAION-LLaVA", "VN": 85_000, "DN": 646_000, "VN/DN %": 13.3, "total_nouns": 233.9e6, "average": 20.9},
    ("sam", "dense"): {"name": "SAM-LLaVA", "VN": 23_000, "DN": 124_000, "VN/DN %": 18.6, "total_nouns": 327.9e6, "average": 29.3},
}


def human(n: float) -> str:
    """Counts in the paper's units: 72.0M, 210K, 6.4."""
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e5:
        return f"{n / 1e3:.0f}K"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{n:g}"


def paper_row(row: Row) -> dict | None:
    return PAPER.get((row.source, "alt" if row.field == "txt" else "dense"))


def _pyplot():  # noqa: ANN202
    # imported on first plot: a run that finds its report current draws nothing
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:  # noqa: ANN001
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _grid(count: int):  # noqa: ANN202
    plt = _pyplot()
    columns = min(count, 3)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for extra in axes.flat[count:]:
        extra.axis("off")
    return figure, list(axes.flat)


def plot_top_nouns(stats: dict[Row, dict]) -> bytes:
    figure, axes = _grid(len(stats))
    for ax, (row, s) in zip(axes, stats.items()):
        nouns = s["top_nouns"][::-1]
        ax.barh([n for n, _ in nouns], [c for _, c in nouns], color="#4C72B0")
        ax.set_title(row.label, fontsize=10)
        ax.tick_params(labelsize=8)
    figure.suptitle("Top nouns (by lemma)")
    return _png(figure)


def plot_nouns_per_caption(counts: dict[Row, NounCounts]) -> bytes:
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(7, 4))
    for row, c in counts.items():
        xs = sorted(c.per_caption)
        total = max(c.images, 1)
        ax.plot(xs, [c.per_caption[x] / total for x in xs], marker="o", markersize=3, label=row.label)
    ax.set_xlabel("nouns in a caption")
    ax.set_ylabel("share of images")
    ax.set_title("Nouns per caption")
    ax.legend(fontsize=8)
    return _png(figure)


def plot_zipf(counts: dict[Row, NounCounts]) -> bytes:
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(7, 4))
    for row, c in counts.items():
        frequencies = sorted(c.nouns.values(), reverse=True)
        if frequencies:
            ax.loglog(range(1, len(frequencies) + 1), frequencies, label=row.label)
    ax.set_xlabel("rank")
    ax.set_ylabel("occurrences")
    ax.set_title("Noun rank-frequency (Zipf)")
    ax.legend(fontsize=8)
    return _png(figure)


def _table_rows(stats: dict[Row, dict]) -> list[list[str]]:
    lines = []
    for row, s in stats.items():
        lines.append([row.label, f"{human(s['VN'])}/{human(s['DN'])} = {s['VN/DN %']:.1f}%", human(s["total_nouns"]),
                      f"{s['average_nouns_per_image']:.1f}/Img", human(s["images"]), f"{s['words_per_caption']:.1f}",
                      _flagged_cell(row, s["flagged"])])
        paper = paper_row(row)
        if paper:
            lines.append([f"  {paper['name']} (paper)", f"{human(paper['VN'])}/{human(paper['DN'])} = {paper['VN/DN %']}%",
                          human(paper["total_nouns"]), f"{paper['average']}/Img", "", "", ""])
    return lines


HEADER = ["Dataset / field", "VN/DN", "Total Noun", "Average", "Images", "Words/caption", "Flagged"]


def _flagged_cell(row: Row, flagged: dict) -> str:
    """Dense captions the captioning stage marked: how many, and whether they were left out."""
    if row.field == "txt":
        return "–"
    cell = human(flagged["captions"])
    if flagged["excluded"]:
        cell += " (excluded)"
    return cell


def plot_table(stats: dict[Row, dict]) -> bytes:
    plt = _pyplot()
    lines = _table_rows(stats)
    figure, ax = plt.subplots(figsize=(11, 0.45 * (len(lines) + 2)))
    ax.axis("off")
    table = ax.table(cellText=lines, colLabels=HEADER, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    for (r, _), cell in table.get_celld().items():
        if r > 0 and lines[r - 1][0].endswith("(paper)"):
            cell.set_text_props(color="#777777", style="italic")
    ax.set_title("Noun concept statistics (paper's Table 1 form)")
    return _png(figure)


def current_report(root: str, inputs: dict[str, Any]) -> str | None:
    """The Markdown file's URI when the report there is complete and was counted from exactly
    `inputs` (analysis.job.inputs_identity); None when it must be counted (again)."""
    out = storage.join(root, "reports", "nouns")
    if not all(storage.exists(storage.join(out, name)) for name in FILES):
        return None
    try:
        recorded = json.loads(storage.read_text(storage.join(out, RECORD))).get("inputs")
    except (ValueError, AttributeError):
        return None
    same = json.dumps(recorded, sort_keys=True) == json.dumps(inputs, sort_keys=True)
    return storage.join(out, "nouns.md") if same else None


def write_report(root: str, counts: dict[Row, NounCounts], settings: dict, timings: dict,
                 inputs: dict[str, Any] | None = None) -> str:
    """Write the report and return the Markdown file's URI. `inputs` is recorded so that a
    rerun on the same inputs can find the report current (current_report)."""
    cfg = settings["config"]
    stats = {row: c.statistics(cfg["valid_threshold"], cfg["top_nouns"]) for row, c in counts.items()}
    out = storage.join(root, "reports", "nouns")
    plots = {"table.png": plot_table(stats), "top_nouns.png": plot_top_nouns(stats),
             "nouns_per_caption.png": plot_nouns_per_caption(counts), "zipf.png": plot_zipf(counts)}
    for name, data in plots.items():
        storage.atomic_write(storage.join(out, name), data)
    record = {
        "settings": settings, "timings": timings, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": [{"dataset": r.dataset, "field": r.field, "source": r.source, "stage": r.stage_uri,
                  **stats[r], "paper": paper_row(r)} for r in counts],
        "inputs": inputs,
    }
    noun_kind = "NOUN and PROPN" if cfg["include_propn"] else "NOUN only (PROPN not counted)"
    md = [
        "# Concept density of captions (noun statistics)", "",
        f"Nouns are spaCy tokens tagged {noun_kind}, counted by lower-cased lemma, with "
        f"`{settings['spacy_model']}` ({', '.join(settings['components'])}). VN counts distinct nouns seen more "
        f"than {cfg['valid_threshold']} times; DN all distinct nouns; Average is nouns per image, an empty caption "
        "counting zero. Rows marked (paper) are PixArt-α's Table 1 (NLTK counts over millions of images), shown "
        "for the shape of the comparison, not as a target for these sample sizes.", "",
        "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
        *("| " + " | ".join(f"*{c.strip()}*" if line[0].endswith("(paper)") and c else c for c in line) + " |"
          for line in _table_rows(stats)), "",
        "![table](table.png)", "",
    ]
    flagged = {r.label: s["flagged"] for r, s in stats.items() if s["flagged"]["captions"]}
    if flagged:
        md += ["Flagged: dense captions the captioning stage's quality checks marked (empty, cut at the token "
               "limit, repetition loop, prompt echo) — " +
               "; ".join(f"{label}: {f['by_flag']}" for label, f in flagged.items()) + ". " +
               ("They are left out of every count above (`analysis.nouns.exclude_flagged`)."
                if cfg.get("exclude_flagged") else
                "They are counted; `--exclude-flagged` (or `analysis.nouns.exclude_flagged: true`) leaves them out."), ""]
    problems = {r.label: s["problems"] for r, s in stats.items() if s["problems"]}
    if problems:
        md += ["Handled input problems (counted, not fatal): " +
               "; ".join(f"{label}: {p}" for label, p in problems.items()), ""]
    md += ["## Top nouns", "", "![top nouns](top_nouns.png)", "",
           "## Nouns per caption", "", "![nouns per caption](nouns_per_caption.png)", "",
           "## Rank-frequency", "", "![zipf](zipf.png)", "",
           f"Counted in {timings['count_s']} s on Ray (start-up {timings['ray_start_s']} s apart).", ""]
    uri = storage.join(out, "nouns.md")
    storage.atomic_write(uri, "\n".join(md))
    storage.atomic_write(storage.join(out, RECORD), json.dumps(record, indent=1))
    return uri
