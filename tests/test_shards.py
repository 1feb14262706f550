import io
import json
import os
import subprocess
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


def _tarfile_bytes(samples) -> bytes:
    """What tarfile writes for the same members (PAX format, mode 0o444, mtime 0), in our order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            order = [f for f in ("jpg", "json", "txt") if f in sample.fields] + sorted(
                f for f in sample.fields if f not in ("jpg", "json", "txt"))
            for name in order:
                info = tarfile.TarInfo(f"{sample.key}.{name}")
                info.size, info.mode = len(sample.fields[name]), 0o444
                tar.addfile(info, io.BytesIO(sample.fields[name]))
    return _without_device_numbers(buffer.getvalue())


def _without_device_numbers(data: bytes) -> bytes:
    """Every header's devmajor/devminor emptied, its checksum made again: tarfile before Python
    3.11's later releases wrote "0000000" there for regular files too, then left them empty."""
    out, pos = bytearray(data), 0
    while pos < len(out) and any(out[pos:pos + 512]):
        header = out[pos:pos + 512]
        header[329:345] = bytes(16)
        header[148:156] = b" " * 8
        header[148:155] = b"%06o\x00" % sum(header)
        out[pos:pos + 512] = header
        size = int(bytes(header[124:136]).strip(b"\x00 ") or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    return bytes(out)


@pytest.mark.parametrize("count", [0, 1, 7])
def test_the_writer_writes_what_tarfile_writes(tmp_path, count):
    samples = _samples(count)
    if count:
        # an empty member, one of exactly a block, a multiple of blocks plus one byte, and a
        # name past ustar's 100 characters (tarfile's PAX extended header)
        samples[0] = Sample(samples[0].key, {**samples[0].fields, "empty": b"", "block": b"x" * 512, "odd": b"y" * 1025})
        samples.append(Sample("k" * 120, {"jpg": b"z" * 700, "txt": b"long name"}))
    uri = str(tmp_path / "00000.tar")
    write_shard(uri, samples)
    data = (tmp_path / "00000.tar").read_bytes()
    assert data == _tarfile_bytes(samples)
    assert len(data) % tarfile.RECORDSIZE == 0
    assert [(s.key, s.fields) for s in read_shard(uri)] == [(s.key, s.fields) for s in samples]
    listed = subprocess.run(["tar", "-tf", uri], check=True, capture_output=True, text=True).stdout.split()
    with tarfile.open(uri) as tar:  # GNU tar reads it as tarfile does
        assert listed == tar.getnames() and len(listed) == sum(len(s.fields) for s in samples)


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
