"""The dataset viewer: a hand-made dataset (shards + a captioner's stage, with flags, scores
and failures), the real entry point, the byte-offset indices, and the page in a real headless
Chromium (Debian's `chromium`; `make test` installs it when run as root)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from analysis.__main__ import main as analysis_main
from analysis.browser import INSTALL_HINT, Chromium, find_chromium
from analysis.nouns import count_texts, load_nlp
from analysis.viewer import make_server, noun_spans, write_view
from curation.sample import make_sample
from shardkit import shard_index, storage
from shardkit.cli import run_main
from shardkit.config import load_config
from shardkit.shards import (
    CAPTION, IMAGE, META, Failure, Sample, ShardRecord, StageOutput, StagePlan, encode_meta, make_key,
    read_shard, summarise, write_shard,
)
from tests.imaging import jpeg_bytes

REPO = Path(__file__).resolve().parents[1]
CAPTIONER = "cap"
PER_SHARD = 10
SHARDS = 3
HOSTILE = '<img src=x onerror="window.__pwned=1"> a cat </script><script>window.__pwned=2</script>'
ALT = ["a red dog on the grass", "two cats on a sofa", "SALE!!! best price", "", "\U0001F436 dog park at noon",
       HOSTILE, "a blue square", "the dog and the ball", "photo", "circle"]
DENSE = ["There is a dog beside a tree.", "Two cats sleep on a sofa near a window.", "A red square on a white background.",
         "A green circle.", "A dog runs in a park.", "A cat sits on a table.", "A blue square and a star.",
         "A dog plays with a ball on the grass.", "A yellow ring.", "A circle and a triangle."]
SHARD_FAILURES = {1: [Failure("0000100098", "http_404", "HTTP Error 404"), Failure("0000100099", "decode", "truncated")]}
CAPTION_FAILURES = {0: ["0000000004"]}  # the captioner failed this sample
FLAGS = {"0000000002": ["repetition"], "0000100002": ["repetition"], "0000200002": ["repetition", "length"],
         "0000100003": ["empty"]}


def _alt(shard: int, i: int) -> bytes:
    if (shard, i) == (2, 8):
        return b"caf\xe9 au lait"  # not UTF-8: shown with a replacement character
    return ALT[i].encode()


def _score(shard: int, i: int) -> float:
    return round(shard * 2 + i * 0.5, 2)


def _write_dataset(root: str, dataset: str = "web") -> dict:
    """shards/ (with failures) and captions/cap/ (with flags and a failure), by hand."""
    shards = StageOutput.of(root, dataset, "shards")
    captions = StageOutput.of(root, dataset, f"captions/{CAPTIONER}")
    shards.write_plan(StagePlan(dataset, "shards", num_shards=SHARDS))
    captions.write_plan(StagePlan(dataset, f"captions/{CAPTIONER}", num_shards=SHARDS, input_stage="shards",
                                  fields=["jpg", "json", "txt", f"{CAPTIONER}.txt"]))
    expected = {"samples": [], "captions": {}, "alt": {}}
    for shard in range(SHARDS):
        base, captioned = [], []
        for i in range(PER_SHARD):
            key = make_key(shard, i)
            image = jpeg_bytes(i + shard, size=(40 + 8 * i, 30 + 4 * shard))
            sample = make_sample(key, image, width=40 + 8 * i, height=30 + 4 * shard, original_width=400,
                                 original_height=300, source="laion", origin=f"http://127.0.0.1/{key}.jpg",
                                 extra={"AESTHETIC_SCORE": _score(shard, i), "scores": {"s": {"aesthetic": 0.25 + i / 100, "clip_similarity": {"txt": 0.5}}},
                                        "LICENSE": "?"})
            sample = Sample(key, {**sample.fields, CAPTION: _alt(shard, i)})
            base.append(sample)
            expected["samples"].append(key)
            expected["alt"][key] = _alt(shard, i).decode("utf-8", errors="replace")
            if key in CAPTION_FAILURES.get(shard, []):
                continue
            meta = sample.meta
            meta["captioners"] = {CAPTIONER: {"backend": "hf", "model": "m", "tokens": 12, "finish_reason": "stop",
                                              "flags": FLAGS.get(key, [])}}
            text = DENSE[i]
            expected["captions"][key] = text
            captioned.append(Sample(key, {**sample.fields, META: encode_meta(meta), f"{CAPTIONER}.txt": text.encode()}))
        write_shard(shards.shard_uri(shard), base)
        failures = SHARD_FAILURES.get(shard, [])
        shards.write_record(ShardRecord(shard, len(base) + len(failures), len(base), 0.1, failures))
        write_shard(captions.shard_uri(shard), captioned)
        cap_failures = [Failure(k, "generate_error", "CUDA out of memory") for k in CAPTION_FAILURES.get(shard, [])]
        captions.write_record(ShardRecord(shard, len(base), len(captioned), 0.1, cap_failures))
    shards.write_summary(summarise(shards.read_plan(), shards.records(), 0.0))
    captions.write_summary(summarise(captions.read_plan(), captions.records(), 0.0))
    expected["gone"] = [f.key for fs in SHARD_FAILURES.values() for f in fs]
    expected["rows"] = len(expected["samples"]) + len(expected["gone"])
    return expected


def _matching(expected: dict, word: str) -> int:
    """Rows whose key, alt text or caption holds `word` (what the search box should find)."""
    found = 0
    for key in expected["samples"]:
        hay = "\n".join([key, expected["alt"][key], expected["captions"].get(key, "")]).lower()
        found += word in hay
    return found + sum(word in k for k in expected["gone"])


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module; None when there is none (the tests then fail)."""
    if not find_chromium():
        yield None
        return
    with Chromium() as chromium:
        yield chromium


def _require(browser: Chromium | None) -> Chromium:
    if browser is None:  # a failure, never a skip: `make test` installs it
        pytest.fail("Chromium is not installed, and the viewer's tests need a real browser. " + INSTALL_HINT)
    return browser


@pytest.fixture
def dataset(write_config, tmp_path):
    config_path = write_config({"web": {"source": "folder", "path": str(tmp_path)}})
    config = load_config(str(config_path))
    expected = _write_dataset(config.storage.root)
    return config, config_path, expected


def _rows_on_store(index_html: str) -> list[dict]:
    folder = index_html.rsplit("/", 1)[0]
    record = json.loads(storage.read_text(f"{folder}/view.json"))
    rows = []
    for page in range(record["pages"]):
        text = storage.read_text(f"{folder}/data/{record['version']}/page-{page:05d}.js")
        rows += json.loads(text[text.index(",") + 1:text.rindex(")")])
    return rows


def _page_rows(folder: Path) -> list[dict]:
    record = json.loads((folder / "view.json").read_text())
    rows = []
    for path in sorted((folder / "data" / record["version"]).glob("page-*.js")):
        text = path.read_text()
        rows += json.loads(text[text.index(",") + 1:text.rindex(")")])
    return rows


def test_view_in_a_real_browser(dataset, browser, tmp_path):
    chromium = _require(browser)
    config, config_path, expected = dataset
    started = time.monotonic()
    assert analysis_main(["view", "web", "--config", str(config_path), "--page-size", "8"]) == 0
    folder = tmp_path / "data" / "reports" / "view" / "web"
    index_html = folder / "index.html"
    assert index_html.is_file()
    record = json.loads((folder / "view.json").read_text())
    data = folder / "data" / record["version"]
    assert len(list(data.glob("page-*.js"))) == 4 and len(list(data.glob("sheet-*.jpg"))) == 4  # 32 rows, 8 a page
    assert record["rows"] == {"rows": expected["rows"], "samples": 30, "gone": 2}
    write_s = time.monotonic() - started

    page = chromium.page()
    load_s = page.goto(index_html.as_uri())
    page.wait_for("VIEW_STATE.ready && VIEW_STATE.done")
    # the first screenful came from the manifest and the data pages it needed, not all of them at once
    assert page.evaluate("document.querySelectorAll('.sample').length") == expected["rows"]
    assert page.evaluate("document.getElementById('count').textContent") == f"{expected['rows']} samples"
    assert page.evaluate("document.querySelectorAll('.sample.gone').length") == 2

    # nouns highlighted, at the right characters also after an emoji (UTF-16 offsets)
    marks = page.evaluate("[...document.querySelectorAll('[data-key=\"0000000004\"] [data-field=txt] mark')].map(m => m.textContent)")
    assert marks == ["dog", "park", "noon"]
    marks = page.evaluate("[...document.querySelectorAll('[data-key=\"0000000000\"] [data-field=\"cap.txt\"] mark')].map(m => m.textContent)")
    assert marks == ["dog", "tree"]
    # hostile alt text is text, never markup
    assert page.evaluate("window.__pwned === undefined")
    shown = page.evaluate("document.querySelector('[data-key=\"0000000005\"] [data-field=txt] .text').textContent")
    assert shown == HOSTILE
    # failures with their reasons, flags, scores
    gone = page.evaluate("document.querySelector('[data-key=\"0000100098\"]').textContent")
    assert "failed in shards: http_404" in gone and "HTTP Error 404" in gone
    assert "failed in captions/cap: generate_error" in page.evaluate(
        "document.querySelector('[data-key=\"0000000004\"]').textContent")
    assert page.evaluate("document.querySelector('[data-key=\"0000200002\"]').textContent").count("repetition") == 1
    assert "AESTHETIC_SCORE 4.5" in page.evaluate("document.querySelector('[data-key=\"0000200001\"]').textContent")
    scored = page.evaluate("document.querySelector('[data-key=\"0000200001\"]').textContent")
    assert "scores.s.aesthetic 0.26" in scored and "scores.s.clip_similarity.txt 0.5" in scored
    # thumbnails are cut out of the sprite sheets at each sample's own size
    size = page.evaluate("(() => { const d = document.querySelector('[data-key=\"0000100009\"] .thumb div'); "
                         "return [d.style.width, d.style.height, getComputedStyle(d).backgroundImage.includes('sheet-')]; })()")
    assert size == ["112px", "34px", True]
    page.screenshot(str(tmp_path / "viewer.png"))

    # search: typing narrows to what holds the words (key, alt text, captions), across pages
    page.type_into("#q", "dog")
    page.wait_for("VIEW_STATE.done && VIEW_STATE.filter && VIEW_STATE.filter.terms.join(' ') === 'dog'")
    want = _matching(expected, "dog")
    assert 0 < want < expected["rows"]
    assert page.evaluate("document.querySelectorAll('.sample').length") == want
    assert page.evaluate("document.getElementById('count').textContent") == f"{want} of {expected['rows']} samples match"
    page.type_into("#q", "dog ball")
    page.wait_for("VIEW_STATE.done && VIEW_STATE.filter.terms.join(' ') === 'dog ball'")
    assert page.evaluate("document.querySelectorAll('.sample').length") == 3  # "the dog and the ball" in each shard
    page.evaluate("(() => { const s = document.getElementById('q-field'); s.value = 'txt'; s.dispatchEvent(new Event('change')); })()")
    page.wait_for("VIEW_STATE.done && VIEW_STATE.filter.field === 'txt'")
    assert page.evaluate("document.querySelectorAll('.sample').length") == 3
    page.type_into("#q", "")
    page.evaluate("(() => { const s = document.getElementById('q-field'); s.value = ''; s.dispatchEvent(new Event('change')); })()")

    # filter by a captioner's flag: only the flagged samples, counted from the manifest
    options = page.evaluate("[...document.querySelectorAll('#facet option')].map(o => o.value)")
    assert {"flagged", "flag:cap:repetition", "flag:cap:empty", "flag:cap:length", "failed", "fail:shards:http_404",
            "fail:captions/cap:generate_error", "nocaption:cap"} <= set(options)
    page.evaluate("(() => { const s = document.getElementById('facet'); s.value = 'flag:cap:repetition'; "
                  "s.dispatchEvent(new Event('change')); })()")
    page.wait_for("VIEW_STATE.done && VIEW_STATE.filter.facet === 'flag:cap:repetition'")
    keys = page.evaluate("[...document.querySelectorAll('.sample')].map(e => e.dataset.key)")
    assert keys == sorted(k for k, f in FLAGS.items() if "repetition" in f)
    assert page.evaluate("document.getElementById('count').textContent") == f"3 of {expected['rows']} samples match"
    page.evaluate("(() => { const s = document.getElementById('facet'); s.value = 'failed'; s.dispatchEvent(new Event('change')); })()")
    page.wait_for("VIEW_STATE.done && VIEW_STATE.filter.facet === 'failed'")
    assert page.evaluate("document.querySelectorAll('.sample').length") == 3  # two gone in shards, one caption failure

    # a score range
    page.evaluate("(() => { const s = document.getElementById('facet'); s.value = ''; s.dispatchEvent(new Event('change')); "
                  "const n = document.getElementById('num'); n.value = 'AESTHETIC_SCORE'; n.dispatchEvent(new Event('change')); })()")
    page.type_into("#num-min", "6")
    page.wait_for("VIEW_STATE.done && VIEW_STATE.filter.lo === 6")
    want = sum(_score(s, i) >= 6 for s in range(SHARDS) for i in range(PER_SHARD))
    assert page.evaluate("document.querySelectorAll('.sample').length") == want
    page.drain()
    assert page.errors() == []
    shot = tmp_path / "viewer-filtered.png"
    page.screenshot(str(shot))
    for png in (tmp_path / "viewer.png", shot):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    print(f"view written in {write_s:.1f} s, page loaded in {load_s * 1000:.0f} ms")


def test_indices_noun_spans_and_rerun(dataset, tmp_path):
    config, _, expected = dataset
    index_html, written = write_view(config, "web", page_size=8)
    assert written
    # an offset index beside every shard of both stages, and every member read back by offset
    for stage in ("shards", f"captions/{CAPTIONER}"):
        output = StageOutput.of(config.storage.root, "web", stage)
        for shard in range(SHARDS):
            index = shard_index.read_index(output.uri, shard)
            assert index is not None
            samples = list(read_shard(output.shard_uri(shard)))
            assert list(index.samples) == [s.key for s in samples]
            for sample in samples:
                for name, data in sample.fields.items():
                    assert shard_index.read_field(output.uri, shard, sample.key, name, index) == data
            assert shard_index.build_index(output.uri, shard).samples == index.samples  # the header-only build agrees
    # the spans are the noun report's nouns: as many as count_texts counts, on the same texts
    rows = _page_rows(Path(index_html).parent)
    cfg = config.analysis.nouns
    nlp = load_nlp(tuple(cfg.spacy_models))
    for name in ("txt", f"{CAPTIONER}.txt"):
        texts = [r["t"].get(name) for r in rows if not r.get("gone") and r["t"].get(name)]
        spans = sum(len(r.get("n", {}).get(name, [])) for r in rows)
        assert spans == count_texts(texts, nlp, cfg.include_propn, cfg.batch_size, cfg.max_caption_chars).total_nouns
    assert noun_spans(["\U0001F436\U0001F436 a dog"], nlp, cfg) == [[[7, 10]]]  # two surrogate pairs before it

    # the rerun on the same inputs writes nothing; a changed stage is written again
    assert write_view(config, "web", page_size=8) == (index_html, False)
    captions = StageOutput.of(config.storage.root, "web", f"captions/{CAPTIONER}")
    record = captions.record(2)
    record.seconds = 9.0
    captions.write_record(record)
    assert write_view(config, "web", page_size=8)[1]
    assert len(list((Path(index_html).parent / "data").iterdir())) == 1  # the older version removed

    # a replaced tar makes its index stale, and it is made again
    shards = StageOutput.of(config.storage.root, "web", "shards")
    samples = list(read_shard(shards.shard_uri(0)))[:3]
    write_shard(shards.shard_uri(0), samples)
    assert shard_index.read_index(shards.uri, 0) is None
    assert list(shard_index.ensure_index(shards.uri, 0).samples) == [s.key for s in samples]
    assert shard_index.read_index(shards.uri, 0) is not None


def test_limit_other_stage_and_errors(dataset, tmp_path):
    config, config_path, expected = dataset
    index_html, _ = write_view(config, "web", stage=f"captions/{CAPTIONER}", limit=12, page_size=5)
    assert index_html.endswith("/reports/view/web/captions/cap/index.html")
    rows = _page_rows(Path(index_html).parent)
    # shard 0's captioned samples, then the one its captioner failed (no caption, its reason), then shard 1's
    captioned = [k for k in expected["samples"] if k in expected["captions"]]
    assert [r["k"] for r in rows] == captioned[:9] + ["0000000004"] + captioned[9:11]
    assert rows[9]["gone"] and rows[9]["fail"] == [["captions/cap", "generate_error", "CUDA out of memory"]]
    assert all(r["t"]["cap.txt"] == expected["captions"][r["k"]] for r in rows if not r.get("gone"))
    assert all(r["t"]["txt"] == expected["alt"][r["k"]] for r in rows if not r.get("gone"))
    assert rows[2]["flags"] == {"cap": ["repetition"]}
    # a stage without images (features): its rows show shards/' images, fetched by byte offset
    features = StageOutput.of(config.storage.root, "web", "features/f")
    features.write_plan(StagePlan("web", "features/f", num_shards=SHARDS, input_stage=f"captions/{CAPTIONER}",
                                  fields=["json", "txt", "vae.npy"]))
    for shard in (0, 1):
        kept = [s for s in read_shard(StageOutput.of(config.storage.root, "web", f"captions/{CAPTIONER}").shard_uri(shard))]
        write_shard(features.shard_uri(shard), [Sample(s.key, {META: s.fields[META], CAPTION: s.fields[f"{CAPTIONER}.txt"],
                                                               "vae.npy": b"\0" * 64}) for s in kept])
        features.write_record(ShardRecord(shard, len(kept), len(kept), 0.0))
    index_html, _ = write_view(config, "web", stage="features/f", page_size=50)
    rows = _page_rows(Path(index_html).parent)
    assert len(rows) == 19 and all(r.get("img") and r["src"] == "shards" for r in rows)
    assert rows[0]["t"]["txt"] == DENSE[0] and rows[0]["t"]["cap.txt"] == DENSE[0] and rows[0]["f"] == ["json", "txt", "vae.npy"]
    assert shard_index.read_index(StageOutput.of(config.storage.root, "web", "shards").uri, 1) is not None

    # unknown dataset or stage: one line, exit 2
    assert run_main(analysis_main, ["view", "nope", "--config", str(config_path)]) == 2
    assert run_main(analysis_main, ["view", "web", "--stage", "features/x", "--config", str(config_path)]) == 2


def test_serve_reads_full_images_by_offset(dataset, browser, tmp_path):
    chromium = _require(browser)
    config, config_path, expected = dataset
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "analysis", "view", "web", "--config", str(config_path),
                               "--serve", "--port", "0", "--limit", "15"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
            url = match.group(1) if match else None
        assert url, "".join(lines)
        original = next(s for s in read_shard(StageOutput.of(config.storage.root, "web", "shards").shard_uri(1))
                        if s.key == "0000100003")
        with urllib.request.urlopen(url + "_member?stage=shards&shard=1&key=0000100003&field=jpg", timeout=10) as r:
            assert r.read() == original.fields[IMAGE] and r.headers["Content-Type"] == "image/jpeg"
        for bad in ("view.json", "../pipelines.yaml", "_member?stage=..%2F..&shard=1&key=x&field=jpg",
                    "_member?stage=shards&shard=1&key=nokey&field=jpg"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(url + bad, timeout=10)
            assert err.value.code == 404

        page = chromium.page()
        page.goto(url)
        page.wait_for("VIEW_STATE.ready && VIEW_STATE.done")
        assert page.evaluate("document.querySelectorAll('.sample').length") == 15
        page.evaluate("document.querySelector('[data-key=\"0000100003\"] .thumb').click()")
        natural = page.wait_for("(() => { const i = document.querySelector('#overlay img'); "
                                "return i && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null; })()")
        assert natural == [64, 34]
        page.screenshot(str(tmp_path / "served.png"))
        page.drain()
        assert page.errors() == []
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_object_storage(s3_bucket, write_config, tmp_path):
    """The same on an S3 API server (moto's, on loopback): indices by ranged reads, the page
    written to the store, and served from there."""
    config = load_config(str(write_config({"web": {"source": "folder", "path": str(tmp_path)}},
                                          storage={"root": f"{s3_bucket}/data"})))
    expected = _write_dataset(config.storage.root)
    index_html, written = write_view(config, "web", limit=12)
    assert written and index_html == f"{s3_bucket}/data/reports/view/web/index.html" and storage.exists(index_html)
    shards = StageOutput.of(config.storage.root, "web", "shards")
    index = shard_index.read_index(shards.uri, 0)
    sample = next(iter(read_shard(shards.shard_uri(0))))
    assert shard_index.read_field(shards.uri, 0, sample.key, IMAGE, index) == sample.fields[IMAGE]
    assert shard_index.build_index(shards.uri, 0).samples == index.samples
    assert write_view(config, "web", limit=12)[1] is False
    server = make_server(index_html.rsplit("/", 1)[0])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = "http://127.0.0.1:%d/" % server.server_address[1]
        assert b"web / shards" in urllib.request.urlopen(url, timeout=10).read()
        with urllib.request.urlopen(url + f"_member?stage=shards&shard=0&key={sample.key}&field=jpg", timeout=10) as r:
            assert r.read() == sample.fields[IMAGE]
    finally:
        server.shutdown()
        server.server_close()
    assert len(_rows_on_store(index_html)) == 12 and expected["rows"] == 32
