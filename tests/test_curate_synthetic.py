"""The stage runner on a real local Ray, through the synthetic source."""

import os

import pytest

from curation.curate import curate, shards_output
from shardkit.config import load_config
from shardkit.runner import ShardTask, StageError, run_stage
from shardkit.shards import StageOutput, read_shard
from shardkit.validate import validate_stage
from synthetic.scenes import Scene, describe

DATASET = {"syn": {"source": "synthetic", "count": 23, "seed": 3, "samples_per_shard": 10, "caption": "alt_text"}}


def test_synthetic_dataset_is_curated_into_valid_shards(ray_session, write_config):
    config = load_config(write_config(DATASET))
    summary = curate(config, "syn")
    assert summary["shards"] == 3 and summary["samples_out"] == 23 and summary["failures"] == 0
    output = shards_output(config, "syn")
    assert validate_stage(output.uri) == []
    samples = list(output.samples())
    assert [len(list(read_shard(output.shard_uri(i)))) for i in range(3)] == [10, 10, 3]
    first = samples[0].meta
    assert first["source"] == "synthetic" and first["origin"] == "synthetic://3/0"
    # the ground truth travels with the sample, and its description is the exact caption
    assert describe(Scene.from_dict(first["scene"])) == first["description"]
    assert len({s.meta["sha256"] for s in samples}) == 23


def test_rerun_skips_complete_shards_and_remakes_missing_ones(ray_session, write_config):
    config = load_config(write_config(DATASET))
    curate(config, "syn")
    output = shards_output(config, "syn")
    before = {i: open(output.shard_uri(i), "rb").read() for i in range(3)}
    stamps = {i: os.stat(output.record_uri(i)).st_mtime_ns for i in range(3)}
    fetched = StageOutput.of(config.storage.root, "syn", "fetched")
    os.remove(fetched.record_uri(1))  # as if the job had been killed while making shard 1
    os.remove(output.record_uri(1))
    summary = curate(config, "syn")
    assert summary["samples_out"] == 23  # the summary covers earlier runs' shards too
    assert os.stat(output.record_uri(0)).st_mtime_ns == stamps[0]  # untouched
    assert os.stat(output.record_uri(1)).st_mtime_ns != stamps[1]  # remade
    assert {i: open(output.shard_uri(i), "rb").read() for i in range(3)} == before  # deterministic


def test_a_changed_config_does_not_mix_with_old_output(ray_session, write_config):
    path = write_config(DATASET)
    curate(load_config(path), "syn")
    changed = load_config(path, ["datasets.syn.seed=4"])
    with pytest.raises(StageError, match="rerun with --restart"):
        curate(changed, "syn")
    summary = curate(changed, "syn", restart=True)
    assert summary["samples_out"] == 23
    assert next(shards_output(changed, "syn").samples()).meta["origin"] == "synthetic://4/0"


class _FlakyStage:
    """Wraps the synthetic stage so that one shard raises: the others must still finish."""

    def __init__(self, inner, bad_shard):
        self.inner, self.bad_shard, self.task_cpus = inner, bad_shard, 0.5

    def plan(self):
        return self.inner.plan()

    def tasks(self):
        return self.inner.tasks()

    def run_shard(self, task: ShardTask, shard_uri: str):
        if task.index == self.bad_shard and not os.environ.get("FLAKY_FIXED"):
            raise OSError("disk on fire")
        return self.inner.run_shard(task, shard_uri)


def test_one_failing_shard_does_not_sink_the_others(ray_session, write_config):
    from curation.sources.synthetic import SyntheticStage

    config = load_config(write_config(DATASET))
    output = StageOutput.of(config.storage.root, "syn", "fetched")
    stage = _FlakyStage(SyntheticStage("syn", config.dataset("syn")), bad_shard=1)
    with pytest.raises(StageError, match=r"shards \[1\] failed; rerun to retry them"):
        run_stage(stage, output, config.cluster)
    assert output.complete_shards() == {0, 2}
    assert output.read_summary()["shards_missing"] == [1]
    summary = run_stage(stage.inner, output, config.cluster)
    assert summary["shards_missing"] == [] and summary["samples_out"] == 23


def test_a_task_orphaned_by_an_older_run_cannot_overwrite_the_newer_runs_output(ray_session, write_config):
    import dataclasses

    from curation.sources.synthetic import SyntheticStage
    from shardkit.runner import StaleRunError, _run_one

    config = load_config(write_config(DATASET))
    curate(config, "syn")
    fetched = StageOutput.of(config.storage.root, "syn", "fetched")
    before = open(fetched.shard_uri(1), "rb").read()
    stale = dataclasses.replace(fetched, run_id="an-old-run")  # the current fence is the last run's id
    stage = SyntheticStage("syn", load_config(write_config(DATASET), ["datasets.syn.seed=99"]).dataset("syn"))
    with pytest.raises(StaleRunError):
        _run_one(stage, stage.tasks()[1], stale)
    assert open(fetched.shard_uri(1), "rb").read() == before
    assert not [n for n in os.listdir(fetched.uri) if "staged" in n]


def test_a_curated_synthetic_stage_travels_as_its_scenes_and_renders_back_byte_identical(ray_session, write_config,
                                                                                          tmp_path):
    from synthetic import portable

    config = load_config(write_config(DATASET))
    curate(config, "syn")
    output = shards_output(config, "syn")
    archive = str(tmp_path / "syn.tar.xz")
    assert portable.pack(output.uri, archive) == 23
    assert os.path.getsize(archive) < sum(os.path.getsize(output.shard_uri(i)) for i in range(3)) / 3
    rebuilt = StageOutput(str(tmp_path / "rebuilt"))
    assert portable.unpack(archive, rebuilt.uri) == {"samples": 23, "mismatched": 0}
    # the stage travels without its input (`fetched`), which validation would look for beside it
    assert rebuilt.is_complete() and [p for p in validate_stage(rebuilt.uri) if "input shard" not in p.what] == []
    assert [(s.key, s.fields) for s in rebuilt.samples()] == [(s.key, s.fields) for s in output.samples()]
    with pytest.raises(portable.PortableError, match="exists"):
        portable.unpack(archive, rebuilt.uri)
    os.remove(output.record_uri(2))
    with pytest.raises(portable.PortableError, match="not a complete stage"):
        portable.pack(output.uri, str(tmp_path / "partial.tar.xz"))
