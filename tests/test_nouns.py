"""Noun statistics, checked exactly on captions whose nouns are known, through the Ray job."""

from __future__ import annotations

import json
import logging
import os

import pytest

from analysis.__main__ import main as analysis_main
from analysis.job import count_rows, find_rows
from analysis.nouns import NounCounts, count_texts, load_nlp
from curation.sample import make_sample
from shardkit.config import load_config
from shardkit.shards import CAPTION, IMAGE, META, Sample, ShardRecord, StageOutput, StagePlan, make_key, summarise, write_shard
from tests.imaging import jpeg_bytes

CAPTIONS = (["There is a dog."] * 5 + ["There are two dogs."] * 6 + ["Two cats sleep on a sofa."] * 10
            + ["A photo of Paris."] * 3 + ["John sees a bird."] + [""] * 4)


def _write_stage(root: str, dataset: str, captions: list[bytes | None], per_shard: int) -> StageOutput:
    """A `shards/` stage made by hand: None leaves the caption field out of the sample."""
    output = StageOutput.of(root, dataset, "shards")
    shards = [captions[i:i + per_shard] for i in range(0, len(captions), per_shard)]
    plan = StagePlan(dataset, "shards", num_shards=len(shards))
    output.write_plan(plan)
    for index, chunk in enumerate(shards):
        samples = []
        for i, text in enumerate(chunk):
            base = make_sample(make_key(index, i), jpeg_bytes(i), width=16, height=12, original_width=16,
                               original_height=12, source="folder", origin=f"mem://{index}/{i}")
            fields = {IMAGE: base.fields[IMAGE], META: base.fields[META]}
            if text is not None:
                fields[CAPTION] = text
            samples.append(Sample(base.key, fields))
        write_shard(output.shard_uri(index), samples)
        output.write_record(ShardRecord(index, len(chunk), len(chunk), 0.0))
    output.write_summary(summarise(plan, output.records(), 0.0))
    return output


def _config(write_config, tmp_path, **nouns):
    return load_config(write_config({"known": {"source": "folder", "path": str(tmp_path)},
                                     "other": {"source": "folder", "path": str(tmp_path)}},
                                    analysis={"nouns": nouns}))


@pytest.mark.parametrize("propn", [False, True])
def test_every_statistic_exactly(ray_session, write_config, tmp_path, propn):
    config = _config(write_config, tmp_path, include_propn=propn)
    _write_stage(config.storage.root, "known", [c.encode() for c in CAPTIONS], per_shard=7)
    [row] = find_rows(config, ["known"])
    counts, _ = count_rows(config, [row])
    stats = counts[row].statistics(valid_threshold=10, top=3)
    expected_nouns = {"dog": 11, "cat": 10, "sofa": 10, "photo": 3, "bird": 1}  # dogs -> dog by lemma
    if propn:
        expected_nouns |= {"paris": 3, "john": 1}
    assert dict(counts[row].nouns) == expected_nouns
    assert stats["images"] == 29 and stats["captions"] == 25
    assert stats["DN"] == len(expected_nouns)
    assert stats["VN"] == 1  # dog (11 > 10) is valid; cat and sofa (exactly 10) are not
    assert stats["total_nouns"] == sum(expected_nouns.values())
    assert stats["average_nouns_per_image"] == round(sum(expected_nouns.values()) / 29, 3)
    assert stats["top_nouns"][0] == ("dog", 11)
    two = 10 + (4 if propn else 0)
    assert dict(counts[row].per_caption) == {0: 4, 1: 25 - two, 2: two}
    assert stats["VN/DN %"] == round(100 / len(expected_nouns), 2)


def test_threshold_boundary_moves_with_the_setting(ray_session, write_config, tmp_path):
    counts = NounCounts()
    counts.nouns.update({"dog": 11, "cat": 10, "sofa": 9})
    assert counts.statistics(valid_threshold=10, top=1)["VN"] == 1
    assert counts.statistics(valid_threshold=9, top=1)["VN"] == 2
    assert counts.statistics(valid_threshold=8, top=1)["VN"] == 3


def test_results_do_not_depend_on_how_shards_split_the_work(ray_session, write_config, tmp_path):
    config = _config(write_config, tmp_path)
    _write_stage(config.storage.root, "known", [c.encode() for c in CAPTIONS], per_shard=29)
    _write_stage(config.storage.root, "other", [c.encode() for c in CAPTIONS], per_shard=3)
    rows = find_rows(config)
    counts, _ = count_rows(config, rows)
    one_task, ten_tasks = (counts[r] for r in rows)
    nlp = load_nlp(tuple(config.analysis.nouns.spacy_models))
    in_process = count_texts(CAPTIONS, nlp, include_propn=False, batch_size=4, max_chars=20_000)
    for other in (ten_tasks, in_process):
        assert (other.nouns, other.per_caption, other.images, other.captions, other.words) == \
               (one_task.nouns, one_task.per_caption, one_task.images, one_task.captions, one_task.words)


def test_bad_input_is_handled_and_reported(ray_session, write_config, tmp_path):
    config = _config(write_config, tmp_path, max_caption_chars=20_000)
    captions = [b"", "Das ist ein Hund.".encode(), b"\xff\xfe caf\xe9", ("dog " * 100_000).encode(),
                None, None, "A cat.".encode()]
    _write_stage(config.storage.root, "known", captions, per_shard=4)
    assert analysis_main(["nouns", "--config", str(tmp_path / "pipelines.yaml"), "--datasets", "known"]) == 0
    report = json.loads((tmp_path / "data" / "reports" / "nouns" / "nouns.json").read_text())
    [row] = report["rows"]
    assert row["problems"] == {"not_utf8": 1, "cut_long": 1, "missing_field": 2}
    assert row["images"] == 7 and row["captions"] == 4
    # the cut caption still counts, up to the cut (5,000 "dog"s; the tagger may read one otherwise)
    assert 4_990 <= dict(row["top_nouns"])["dog"] <= 5_000
    for name in ("nouns.md", "table.png", "top_nouns.png", "nouns_per_caption.png", "zipf.png"):
        assert (tmp_path / "data" / "reports" / "nouns" / name).stat().st_size > 0


def test_report_puts_the_papers_rows_beside_ours(ray_session, write_config, tmp_path):
    config = load_config(write_config({"web": {"source": "laion", "parquet": str(tmp_path / "x.parquet")}}))
    _write_stage(config.storage.root, "web", [c.encode() for c in CAPTIONS], per_shard=10)
    assert analysis_main(["nouns", "--config", str(tmp_path / "pipelines.yaml")]) == 0
    markdown = (tmp_path / "data" / "reports" / "nouns" / "nouns.md").read_text()
    assert "| web / txt | 1/5 = 20.0% | 35 | 1.2/Img | 29 |" in markdown
    assert "*LAION (paper)* | *210K/2.5M = 8.5%* | *72.0M* | *6.4/Img*" in markdown
    assert "NOUN only (PROPN not counted)" in markdown


def test_a_rerun_on_the_same_inputs_keeps_the_report_and_any_change_recounts(ray_session, write_config, tmp_path,
                                                                             caplog):
    caplog.set_level(logging.INFO, logger="analysis")
    config = _config(write_config, tmp_path)
    known = _write_stage(config.storage.root, "known", [c.encode() for c in CAPTIONS], per_shard=10)
    record = tmp_path / "data" / "reports" / "nouns" / "nouns.json"

    def run(*extra: str) -> tuple[dict, int]:
        caplog.clear()
        assert analysis_main(["nouns", "--config", str(tmp_path / "pipelines.yaml"), *extra]) == 0
        return json.loads(record.read_text()), record.stat().st_mtime_ns

    first, written = run()
    assert first["inputs"]["rows"][0]["output"] == known.identity()
    assert "not counting again" not in caplog.text
    assert run() == (first, written)  # neither counted nor written again
    assert "not counting again" in caplog.text

    # a setting, a shard touched after the fact, a new caption field: each counts again
    threshold_5, changed = run("--set", "analysis.nouns.valid_threshold=5")
    assert changed != written and (threshold_5["rows"][0]["VN"], first["rows"][0]["VN"]) == (3, 1)
    back, written = run()
    assert back["rows"][0]["VN"] == 1 and written != changed
    stat = os.stat(known.shard_uri(1))
    os.utime(known.shard_uri(1), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run()[1] != written and "not counting again" not in caplog.text
    _write_stage(config.storage.root, "other", [c.encode() for c in CAPTIONS[:5]], per_shard=5)
    both, written = run()
    assert [(r["dataset"], r["images"]) for r in both["rows"]] == [("known", 29), ("other", 5)]
    assert run() == (both, written) and "not counting again" in caplog.text


def _write_captioned_stage(root: str, dataset: str, captions: list[tuple[str, list[str]]]) -> StageOutput:
    """A `captions/dense` stage made by hand: each caption with the quality flags the
    captioning stage would have recorded in the sample's json."""
    output = StageOutput.of(root, dataset, "captions/dense")
    plan = StagePlan(dataset, "captions/dense", num_shards=1, input_stage="shards")
    output.write_plan(plan)
    samples = []
    for i, (text, flags) in enumerate(captions):
        base = make_sample(make_key(0, i), jpeg_bytes(i), width=16, height=12, original_width=16,
                           original_height=12, source="folder", origin=f"mem://0/{i}", extra={"captioners": {"dense": {"flags": flags}}})
        samples.append(Sample(base.key, {**base.fields, "dense.txt": text.encode()}))
    write_shard(output.shard_uri(0), samples)
    output.write_record(ShardRecord(0, len(samples), len(samples), 0.0))
    output.write_summary(summarise(plan, output.records(), 0.0))
    return output


def test_flagged_captions_are_reported_and_can_be_left_out(ray_session, write_config, tmp_path):
    captions = [("Two cats sleep on a sofa.", []), ("A dog and a bird.", []),
                ("a cat a cat a cat a cat a cat a cat", ["repetition", "length"]), ("", ["empty"])]
    config = _config(write_config, tmp_path)
    _write_captioned_stage(config.storage.root, "known", captions)
    [row] = find_rows(config, ["known"], ["dense"])
    counts, _ = count_rows(config, [row])
    stats = counts[row].statistics(valid_threshold=10, top=3)
    assert stats["flagged"] == {"captions": 2, "by_flag": {"empty": 1, "length": 1, "repetition": 1}, "excluded": 0}
    assert stats["images"] == 4 and dict(counts[row].nouns)["cat"] == 7

    excluded = _config(write_config, tmp_path, exclude_flagged=True)
    counts, _ = count_rows(excluded, [row])
    stats = counts[row].statistics(valid_threshold=10, top=3)
    assert stats["flagged"]["excluded"] == 2
    assert stats["images"] == 2 and dict(counts[row].nouns) == {"cat": 1, "sofa": 1, "dog": 1, "bird": 1}
    # through the command line, into the report
    assert analysis_main(["nouns", "--config", str(tmp_path / "pipelines.yaml"), "--fields", "dense", "--exclude-flagged"]) == 0
    markdown = (tmp_path / "data" / "reports" / "nouns" / "nouns.md").read_text()
    assert "| known / dense.txt |" in markdown and "| 2 (excluded) |" in markdown
    assert "left out of every count above" in markdown


def _old_gather_counts(count, jobs, rows):
    """How counts were merged before (commit 76deb04): one task per shard, every result
    merged in the driver as it finished."""
    import ray

    remote = ray.remote(count)
    pending = {remote.remote(*args): row for row, args in jobs}
    counts = {row: NounCounts() for row in rows}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        counts[pending.pop(ready[0])].merge(ray.get(ready[0]))
    return counts


def test_merging_on_workers_gives_the_driver_merge_exactly(ray_session, monkeypatch):
    from analysis import job
    from analysis.growth import synthetic_counts

    monkeypatch.setattr(job, "SHARDS_PER_TASK_MAX", 3)  # several shards a task, several levels of merges
    monkeypatch.setattr(job, "TASKS_PER_SLOT", 1)
    monkeypatch.setattr(job, "MERGE_FAN_IN", 2)
    rows = ["alt text", "dense", "empty"]
    jobs = [(rows[i % 2], (i, 50 + i, 3000, 6.0, i % 2)) for i in range(41)]
    old = _old_gather_counts(synthetic_counts, jobs, rows)
    new = job.gather_counts(synthetic_counts, jobs, rows, task_cpus=1.0)
    assert list(new) == rows
    for row in rows:
        a, b = old[row], new[row]
        assert (a.images, a.captions, a.words, a.nouns, a.per_caption, a.problems, a.flagged, a.flags, a.excluded) == \
               (b.images, b.captions, b.words, b.nouns, b.per_caption, b.problems, b.flagged, b.flags, b.excluded)
        in_order = NounCounts()  # and the nouns come in the order of a merge in shard order
        for r, args in jobs:
            if r == row:
                in_order.merge(synthetic_counts(*args))
        assert list(b.nouns) == list(in_order.nouns)
    assert new["empty"].images == 0 and not new["empty"].nouns
