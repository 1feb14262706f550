import os


from curation.sample import make_sample
from shardkit.shards import (
    Sample, ShardRecord, StageOutput, StagePlan, make_key, read_shard, summarise, write_shard,
)
from shardkit.validate import validate_stage
from tests.imaging import jpeg_bytes


def _build(tmp_path, stage="shards", input_stage=None, samples=None, record_out=None):
    output = StageOutput.of(str(tmp_path), "ds", stage)
    plan = StagePlan("ds", stage, num_shards=1, input_stage=input_stage)
    output.write_plan(plan)
    samples = samples if samples is not None else [
        make_sample(make_key(0, i), jpeg_bytes(i), width=16, height=12, original_width=16, original_height=12,
                    source="test", origin=f"mem://{i}", caption="a caption")
        for i in range(3)
    ]
    write_shard(output.shard_uri(0), samples)
    output.write_record(ShardRecord(0, len(samples), record_out if record_out is not None else len(samples), 0.1))
    output.write_summary(summarise(plan, output.records(), 0.1))
    return output


def test_a_well_formed_stage_has_no_problems(tmp_path):
    assert validate_stage(_build(tmp_path).uri) == []


def _problems(output):
    return [p.what for p in validate_stage(output.uri)]


def test_each_kind_of_damage_is_reported(tmp_path):
    good = make_sample(make_key(0, 0), jpeg_bytes(0), width=16, height=12, original_width=16,
                       original_height=12, source="test", origin="mem://0")
    wrong_size = good.with_meta({**good.meta, "width": 99})
    wrong_hash = Sample(make_key(0, 1), {**good.fields, "jpg": jpeg_bytes(1)})
    no_caption = Sample(make_key(0, 2), {k: v for k, v in good.fields.items() if k != "txt"})
    not_an_image = make_sample(make_key(0, 3), b"<html>", width=1, height=1, original_width=1,
                               original_height=1, source="test", origin="mem://3")
    bad_utf8 = Sample(make_key(0, 4), {**good.fields, "txt": b"\xff\xfe"})
    output = _build(tmp_path, samples=[wrong_size, wrong_hash, no_caption, not_an_image, bad_utf8], record_out=4)
    problems = _problems(output)
    assert "json says 99x12, image is 16x12" in problems
    assert "sha256 in json does not match the image bytes" in problems
    assert "missing field .txt" in problems
    assert any(p.startswith("image does not decode") for p in problems)
    assert ".txt is not UTF-8" in problems
    assert "record says 4 samples, tar has 5" in problems


def test_incomplete_and_interrupted_outputs_are_reported(tmp_path):
    output = _build(tmp_path)
    os.remove(output.record_uri(0))
    (tmp_path / "ds" / "shards" / ".00001.tar.tmp-1234").write_bytes(b"partial")
    problems = _problems(output)
    assert "incomplete: no record" in problems
    assert any(p.startswith("temporary files left") for p in problems)
    assert validate_stage(str(tmp_path / "nothing"))[0].what.startswith("no _plan.json")


def test_a_later_stage_must_keep_its_inputs_keys_in_order(tmp_path):
    source = _build(tmp_path)
    inputs = list(read_shard(source.shard_uri(0)))
    captioned = [Sample(s.key, {**s.fields, "tiny.txt": b"dense"}) for s in inputs]
    ok = _build(tmp_path, stage="captions/tiny", input_stage="shards", samples=[captioned[0], captioned[2]])
    assert validate_stage(ok.uri) == []
    swapped = _build(tmp_path, stage="captions/other", input_stage="shards", samples=[captioned[2], captioned[0]])
    assert _problems(swapped) == ["keys are not those of input stage 'shards' in order"]
