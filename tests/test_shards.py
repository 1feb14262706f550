import io
import json
import os
import tarfile

import pytest

from curation.sample import make_sample
from shardkit.shards import (
    Failure, Sample, ShardFormatError, ShardRecord, ShardWriter, StageOutput, StagePlan, make_key,
    read_shard, summarise, write_shard,
)


def _samples(n, shard=0):
    return [
        make_sample(make_key(shard, i), f"image-{i}".encode(), width=1, height=1, original_width=2,
                    original_height=2, source="test", origin=f"mem://{i}", caption=f"caption {i} é",
                    extra={"i": i})
        for i in range(n)
    ]


def test_round_trip_keeps_every_byte_and_the_order(tmp_path):
    samples = _samples(5)
    samples[2] = Sample(samples[2].key, {**samples[2].fields, "tiny.txt": b"dense caption"})
    uri = str(tmp_path / "00000.tar")
    assert write_shard(uri, samples) == 5
    back = list(read_shard(uri))
    assert [s.key for s in back] == [s.key for s in samples]
    assert [s.fields for s in back] == [s.fields for s in samples]
    assert back[2].text("tiny.txt") == "dense caption"
    assert back[0].meta["sha256"] and back[0].text() == "caption 0 é"
    with tarfile.open(uri) as tar:  # base fields first, readable by any tar tool
        assert tar.getnames()[:3] == ["0000000000.jpg", "0000000000.json", "0000000000.txt"]


def test_same_samples_give_the_same_bytes(tmp_path):
    write_shard(str(tmp_path / "a.tar"), _samples(3))
    write_shard(str(tmp_path / "b.tar"), _samples(3))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_a_failed_write_leaves_nothing_under_the_final_name(tmp_path):
    uri = str(tmp_path / "00000.tar")
    with pytest.raises(RuntimeError):
        with ShardWriter(uri) as writer:
            writer.write(_samples(1)[0])
            raise RuntimeError("killed mid-shard")
    assert os.listdir(tmp_path) == []


def test_duplicate_keys_and_bad_names_are_refused(tmp_path):
    with pytest.raises(ShardFormatError, match="duplicate key"):
        write_shard(str(tmp_path / "x.tar"), _samples(2) + _samples(1))
    with pytest.raises(ShardFormatError, match="key"):
        Sample("a.b", {"jpg": b""})
    with pytest.raises(ShardFormatError, match="field"):
        Sample("a", {"../jpg": b""})


@pytest.mark.parametrize("member", ["../evil.jpg", "/abs.jpg", "dir/x.jpg", "link.jpg"])
def test_reading_refuses_members_that_could_escape(tmp_path, member):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(member)
        if member == "link.jpg":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ShardFormatError, match="refused member"):
        list(read_shard(str(path)))


def test_stage_output_tracks_completion_by_records(tmp_path):
    output = StageOutput.of(str(tmp_path), "ds", "captions/tiny")
    assert output.uri == f"{tmp_path}/ds/captions/tiny"
    assert not output.is_complete()
    output.write_plan(StagePlan("ds", "captions/tiny", num_shards=2, input_stage="shards"))
    write_shard(output.shard_uri(0), _samples(2))
    write_shard(output.shard_uri(1), _samples(2, shard=1))
    output.write_record(ShardRecord(0, 3, 2, 0.5, [Failure("0000000002", "decode", "bad")], {"tokens": 7}))
    assert output.shard_indices() == [0, 1] and output.complete_shards() == {0}
    assert not output.is_complete()  # shard 1's tar exists but has no record: not done
    output.write_record(ShardRecord(1, 2, 2, 0.25, counters={"tokens": 3}))
    assert output.is_complete()
    assert [s.key for s in output.samples()] == [make_key(0, 0), make_key(0, 1), make_key(1, 0), make_key(1, 1)]
    summary = summarise(output.read_plan(), output.records(), wall_seconds=2.0)
    assert summary["samples_in"] == 5 and summary["samples_out"] == 4
    assert summary["failures_by_reason"] == {"decode": 1}
    assert summary["counters"] == {"tokens": 10}
    assert summary["shards_missing"] == []
    record = ShardRecord.from_json(json.loads(json.dumps(output.records()[0].to_json())))
    assert record.failures == [Failure("0000000002", "decode", "bad")]


def test_stage_identity_follows_what_a_reader_would_see(tmp_path):
    output = StageOutput.of(str(tmp_path), "ds", "shards")
    output.write_plan(StagePlan("ds", "shards", num_shards=2))
    for index in (0, 1):
        write_shard(output.shard_uri(index), _samples(2, shard=index))
    output.write_record(ShardRecord(0, 2, 2, 0.5))
    partial = output.identity()
    output.write_record(ShardRecord(1, 2, 2, 0.25))
    complete = output.identity()
    assert complete != partial  # a shard finished
    # what a rerun of a complete stage rewrites (same plan, summary, fence) changes nothing
    output.write_plan(StagePlan("ds", "shards", num_shards=2))
    output.write_summary(summarise(output.read_plan(), output.records(), 1.0))
    output.write_fence()
    assert output.identity() == complete
    # a tar replaced after its record, with other samples, or only touched, does
    write_shard(output.shard_uri(1), _samples(3, shard=1))
    assert output.identity() != complete
    write_shard(output.shard_uri(1), _samples(2, shard=1))
    stat = os.stat(output.shard_uri(1))
    os.utime(output.shard_uri(1), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = output.identity()
    assert touched != complete and output.identity() == touched
