"""The LAION source's plan and slices: streamed reads give exactly what whole row groups gave,
and the stage sent to every task leaves the list of slices in the driver."""

import pickle

import pyarrow as pa
import pyarrow.parquet as pq

from curation.sources.laion import LaionStage, row_groups_holding
from analysis import growth
from shardkit.config import LaionSource


def _old_rows(stage: LaionStage, uri: str, start: int, stop: int) -> pa.Table:
    """How a task read its slice before (commit 76deb04): its row groups whole, then sliced."""
    with open(uri, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = set(parquet.schema_arrow.names)
        own = (stage.cfg.url_column, stage.cfg.caption_column)
        columns = [*own] + [c for c in stage.cfg.metadata_columns if c in names and c not in own]
        groups = row_groups_holding(parquet, start, stop)
        return parquet.read_row_groups([g for g, _ in groups], columns=columns).slice(start - groups[0][1], stop - start)


def test_streamed_slices_equal_whole_row_group_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(growth, "CHUNK", 1000)  # row groups of 1000 rows
    path = str(tmp_path / "laion.parquet")
    growth.write_laion_parquet(path, 5500)
    assert pq.ParquetFile(path).num_row_groups == 6
    cfg = LaionSource(source="laion", parquet=[path], samples_per_shard=700,
                      metadata_columns=["HEIGHT", "similarity", "LICENSE", "not-there", "URL"])
    stage = LaionStage("x", cfg)
    slices = stage.slices()
    assert [s[1:] for s in slices][:2] == [(0, 700), (700, 1400)] and slices[-1][1:] == (4900, 5500)
    for uri, start, stop in slices + [(path, 999, 1001), (path, 0, 5500), (path, 5499, 5500)]:
        new, old = stage._rows(uri, start, stop), _old_rows(stage, uri, start, stop)
        assert new.schema.equals(old.schema) and new.num_rows == stop - start
        # repr: NaN scores compare unequal to themselves
        assert repr(new.to_pylist()) == repr(old.to_pylist())


def test_the_stage_sent_to_tasks_leaves_the_slices_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(growth, "CHUNK", 1000)
    path = str(tmp_path / "laion.parquet")
    growth.write_laion_parquet(path, 3000)
    stage = LaionStage("x", LaionSource(source="laion", parquet=[path], samples_per_shard=10))
    tasks = stage.tasks()
    assert len(tasks) == stage.plan().num_shards == 300 and "_slices" in stage.__dict__
    sent = pickle.loads(pickle.dumps(stage))
    assert "_slices" not in sent.__dict__ and len(pickle.dumps(stage)) < 2000
    assert repr(sent._rows(*tasks[123].payload).to_pylist()) == repr(stage._rows(*tasks[123].payload).to_pylist())
