"""A static HTML viewer of one stage of a dataset (`python -m analysis view DATASET`).

It reads each tar of the viewed stage once, and shard i of every `captions/<captioner>/`
stage of the dataset beside it (same keys, same order: joined by key), and writes:

    <storage>/reports/view/<dataset>/[<stage>/]   (the stage folder only for stages other than shards)
      index.html                  the page: HTML, CSS and script, no data
      view.json                   what it was made from (a rerun on the same inputs writes nothing)
      data/<version>/manifest.js  counts, fields, facets and each data page's facet counts
      data/<version>/page-00000.js  a page of samples' metadata (captions, noun spans, scores,
                                  flags, failures), loaded by a <script> tag only when needed
      data/<version>/sheet-00000.jpg  that page's thumbnails, one sprite sheet

Data pages are JavaScript (`VIEW.page(i, [...])`), not JSON, because a page opened from disk
(file://) may load scripts and images but may not fetch files. The page first loads the
manifest and data page 0; more pages load as one scrolls, and a search scans them in order
(a facet filter, e.g. one flag, loads only the pages the manifest says have it). A new write
goes to a new data/<version>/ folder and index.html is replaced last, so an open page never
sees half of a rewrite; older versions are removed afterwards.

While reading each tar it builds the tar's byte-offset index (shardkit/shard_index.py) and
writes it beside the shard if absent or stale; `--serve` serves the page on 127.0.0.1 and
each sample's full-size image through those indices, one ranged read, no whole tar.

Nouns are highlighted with the noun report's spaCy model and definition (analysis/nouns.py:
`load_nlp`, tokens tagged NOUN, or PROPN with `include_propn`, whose lemma has a letter),
computed here in batches (`nlp.pipe`) and stored as character spans (UTF-16 units, as the
browser counts them).
"""

from __future__ import annotations

import bisect
import http.server
import importlib.metadata
import io
import json
import logging
import math
import re
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

from PIL import Image

from analysis.nouns import load_nlp
from shardkit import shard_index, storage
from shardkit.config import ConfigError, NounsConfig, PipelinesConfig
from shardkit.shards import CAPTION, IMAGE, META, IndexedSample, StageOutput, scan_shard

log = logging.getLogger(__name__)

VIEWER_VERSION = 1
"""Part of what a view is made from: a change in what the writer produces rewrites views."""
THUMB = 128
PAGE_SIZE = 100
DISPLAY_CHARS = 4000
"""A caption longer than this is shown (and analysed) up to here, with its full length noted."""
META_CHARS = 4000
"""The sample's json is shown in full up to this size, else cut."""
CAPTIONS_DIR = "captions"


@dataclass
class Source:
    """One stage the view reads: the viewed stage, a captioner's stage, or where images are."""

    stage: str
    output: StageOutput
    role: str  # "main", "captions" or "images"
    captioner: str | None = None
    complete: set[int] = field(default_factory=set)


def view_uri(root: str, dataset: str, stage: str) -> str:
    base = storage.join(root, "reports", "view", dataset)
    return base if stage == "shards" else storage.join(base, stage)


def find_sources(config: PipelinesConfig, dataset: str, stage: str) -> list[Source]:
    """The viewed stage first, then every captioner's stage of the dataset (other than the
    viewed one), then `shards/` for the images when the viewed stage has none (features)."""
    config.dataset(dataset)
    stage = stage.strip("/")
    root = config.storage.root
    main = StageOutput.of(root, dataset, stage)
    plan = main.read_plan()
    if plan is None:
        raise ConfigError(f"{dataset}: no stage {stage!r} at {main.uri} (no _plan.json); run it first")
    sources = [Source(stage, main, "main", stage.split("/", 1)[1] if stage.startswith(CAPTIONS_DIR + "/") else None,
                      main.complete_shards())]
    if not sources[0].complete:
        raise ConfigError(f"{dataset}/{stage}: no complete shard yet")
    for name in storage.list_names(storage.join(root, dataset, CAPTIONS_DIR)):
        if storage.TEMP_MARKER in name or f"{CAPTIONS_DIR}/{name}" == stage:
            continue
        output = StageOutput.of(root, dataset, f"{CAPTIONS_DIR}/{name}")
        if output.read_plan() is not None:
            sources.append(Source(f"{CAPTIONS_DIR}/{name}", output, "captions", name, output.complete_shards()))
    if IMAGE not in plan.fields and stage != "shards":
        shards = StageOutput.of(root, dataset, "shards")
        if shards.read_plan() is not None:
            sources.append(Source("shards", shards, "images", None, shards.complete_shards()))
    return sources


def inputs_identity(config: PipelinesConfig, dataset: str, sources: list[Source], settings: dict) -> dict:
    cfg = config.analysis.nouns
    spacy = {}
    for name in ["spacy", *cfg.spacy_models]:
        try:
            spacy[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            spacy[name] = None
    return {"viewer_version": VIEWER_VERSION, "dataset": dataset, "settings": settings,
            "nouns": cfg.model_dump(mode="json"), "spacy": spacy,
            "stages": [{"stage": s.stage, "role": s.role, "identity": s.output.identity()} for s in sources]}


# ---- nouns ---------------------------------------------------------------------------------

def _utf16(text: str) -> Any:
    """Code-point offset -> UTF-16 offset (the browser's string indices)."""
    if text.isascii():
        return lambda i: i
    astral = [i for i, ch in enumerate(text) if ord(ch) > 0xFFFF]
    return lambda i: i + bisect.bisect_left(astral, i)


def noun_spans(texts: list[str], nlp, cfg: NounsConfig) -> list[list[list[int]]]:  # noqa: ANN001
    """For each text, the [start, end) spans of its nouns in UTF-16 units, by the noun
    report's definition (analysis/nouns.py count_texts)."""
    tags = {"NOUN", "PROPN"} if cfg.include_propn else {"NOUN"}
    distinct = list(dict.fromkeys(t[:cfg.max_caption_chars] for t in texts if t.strip()))  # each text once
    spans: dict[str, list[list[int]]] = {}
    for text, doc in zip(distinct, nlp.pipe(distinct, batch_size=cfg.batch_size)):
        to16 = _utf16(text)
        spans[text] = [[to16(t.idx), to16(t.idx + len(t.text))] for t in doc
                       if t.pos_ in tags and any(ch.isalpha() for ch in t.lemma_)]
    return [list(spans.get(t[:cfg.max_caption_chars], [])) for t in texts]


# ---- thumbnails ----------------------------------------------------------------------------

def thumbnail(data: bytes, size: int) -> Image.Image:
    """At most size x size. A JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8)
    still at least that size (draft), then reduced bilinearly by less than 2x: a third of the
    time of PIL's default thumbnail, half that of a full decode."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))
        image.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        if image.mode != "RGB":
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                flat = Image.new("RGB", image.size, (128, 128, 128))
                flat.paste(image, mask=image.getchannel("A"))
                return flat
            return image.convert("RGB")
        return image.copy()


def sheet(thumbs: list[Image.Image | None], size: int) -> tuple[bytes, list[list[int] | None]]:
    """The thumbnails on one JPEG, row by row; each one's [x, y, w, h] there."""
    cols = max(1, math.ceil(math.sqrt(len(thumbs))))
    rows = max(1, math.ceil(len(thumbs) / cols))
    canvas = Image.new("RGB", (cols * size, rows * size), (40, 40, 40))
    boxes: list[list[int] | None] = []
    for n, thumb in enumerate(thumbs):
        if thumb is None:
            boxes.append(None)
            continue
        x, y = (n % cols) * size, (n // cols) * size
        canvas.paste(thumb, (x, y))
        boxes.append([x, y, thumb.width, thumb.height])
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=80, optimize=False)
    return buffer.getvalue(), boxes


# ---- rows ----------------------------------------------------------------------------------

def _text(data: bytes | None) -> tuple[str | None, bool]:
    if data is None:
        return None, False
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _numbers(meta: dict) -> dict[str, float]:
    """Numeric values of the json: top-level numbers (LAION's AESTHETIC_SCORE, similarity,
    sizes, ...) and every number inside the `scores` object, by dotted path
    (`scores.<scorer>.aesthetic`, `scores.<scorer>.clip_similarity.<field>`)."""
    found = {}

    def walk(prefix: str, value: Any, depth: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[prefix] = value
        elif isinstance(value, dict) and depth < 4:
            for name, inner in value.items():
                walk(f"{prefix}.{name}", inner, depth + 1)

    for key, value in meta.items():
        if key == "scores":
            walk(key, value, 0)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[key] = value
    return found


def _caption_info(info: dict) -> str:
    parts = []
    if "tokens" in info:
        parts.append(f"{info['tokens']} tokens")
    if info.get("finish_reason"):
        parts.append(str(info["finish_reason"]))
    if info.get("retried"):
        parts.append("retried")
    if info.get("alt_text_removed"):
        parts.append(f"removed from alt text: {', '.join(map(str, info['alt_text_removed']))}")
    return ", ".join(parts)


@dataclass
class Pending:
    """A row of a data page before nouns and thumbnails are added."""

    row: dict
    image: bytes | None = None


class ViewWriter:
    def __init__(self, config: PipelinesConfig, dataset: str, stage: str = "shards", limit: int | None = None,
                 thumb: int = THUMB, page_size: int = PAGE_SIZE):
        self.config, self.dataset, self.stage = config, dataset, stage.strip("/")
        self.limit, self.thumb, self.page_size = limit, thumb, page_size
        self.sources = find_sources(config, dataset, self.stage)
        self.main = self.sources[0]
        self.captioners = [s for s in self.sources if s.role == "captions"]
        self.images = next((s for s in self.sources if s.role == "images"), None)
        self.uri = view_uri(config.storage.root, dataset, self.stage)
        self.settings = {"stage": self.stage, "limit": limit, "thumb": thumb, "page_size": page_size}
        self.timings: dict[str, float] = {"read_s": 0.0, "nouns_s": 0.0, "thumbs_s": 0.0, "write_s": 0.0}
        self.indices_written = 0

    # ---- reading ---------------------------------------------------------------------------
    def _scan(self, source: Source, shard: int, wanted) -> Iterator[IndexedSample]:  # noqa: ANN001
        """A shard's samples, read once; its offset index written beside it if it has none."""
        shard_uri = source.output.shard_uri(shard)
        have = shard_index.read_index(source.output.uri, shard)
        builder = shard_index.IndexBuilder(shard_uri, shard) if have is None else None
        for sample in scan_shard(shard_uri, wanted):
            yield builder.add(sample) if builder else sample
        if builder is not None:
            shard_index.write_index(source.output.uri, builder.index())
            self.indices_written += 1

    def _index(self, source: Source, shard: int) -> shard_index.ShardIndex:
        index = shard_index.read_index(source.output.uri, shard)
        if index is None:
            index = shard_index.build_index(source.output.uri, shard)
            shard_index.write_index(source.output.uri, index)
            self.indices_written += 1
        return index

    @staticmethod
    def _fetch(source: Source, shard: int, index: shard_index.ShardIndex, key: str) -> dict[str, bytes] | None:
        if key not in index.samples:
            return None
        return {name: shard_index.read_field(source.output.uri, shard, key, name, index)
                for name in (IMAGE, CAPTION) if name in index.samples[key]}

    def _failures(self, source: Source, shard: int) -> list:
        return source.output.record(shard).failures

    def rows(self) -> Iterator[Pending]:
        """The view's rows in shard order: each sample of the viewed stage, joined by key with
        every captioner's caption, and each sample the viewed stage failed (no image)."""
        main, count = self.main, 0
        for shard in sorted(main.complete):
            started = time.perf_counter()
            joined: dict[str, dict] = {}
            for source in self.captioners:
                if shard not in source.complete:
                    continue
                name = f"{source.captioner}.txt"
                for sample in self._scan(source, shard, lambda f, name=name: f in (name, META)):
                    joined.setdefault(sample.key, {})[source.captioner] = sample.fields
                for failure in self._failures(source, shard):
                    joined.setdefault(failure.key, {}).setdefault("_failures", []).append(
                        [source.stage, failure.reason, failure.detail])
            # a stage without images (features) shows shards/' images: fetched by byte offset,
            # one sample at a time, never a whole shard of images held
            images = None
            if self.images is not None and shard in self.images.complete:
                images = self._index(self.images, shard)
            self.timings["read_s"] += time.perf_counter() - started

            for sample in self._scan(main, shard, lambda f: f in (IMAGE, META) or f.endswith("txt")):
                if self.limit is not None and count >= self.limit:
                    break
                started = time.perf_counter()
                from_images = self._fetch(self.images, shard, images, sample.key) if images else None
                row, image = self._row(shard, sample, joined.get(sample.key, {}), from_images)
                self.timings["read_s"] += time.perf_counter() - started
                count += 1
                yield Pending(row, image)
            else:
                for failure in self._failures(main, shard):
                    if self.limit is not None and count >= self.limit:
                        break
                    count += 1
                    fails = [[main.stage, failure.reason, failure.detail]]
                    yield Pending({"k": failure.key, "s": shard, "gone": True, "t": {}, "num": {}, "flags": {},
                                   "fail": fails, "fx": ["failed", f"failed:{main.stage}",
                                                          f"fail:{main.stage}:{failure.reason}", "noimage"]})
            if self.limit is not None and count >= self.limit:
                return

    def _row(self, shard: int, sample: IndexedSample, joined: dict, from_images: dict | None
             ) -> tuple[dict, bytes | None]:
        fields = sample.fields
        problems = []
        try:
            meta = json.loads(fields[META]) if META in fields else {}
            if not isinstance(meta, dict):
                meta, problems = {}, ["json is not an object"]
        except ValueError as exc:
            meta, problems = {}, [f"json does not parse: {exc}"]
        texts: dict[str, str | None] = {}
        alt, bad = _text(fields.get(CAPTION))
        if alt is None and from_images is not None:
            alt, bad = _text(from_images.get(CAPTION))
        texts[CAPTION] = alt
        if bad:
            problems.append("txt is not UTF-8")
        flags: dict[str, list[str]] = {}
        info: dict[str, str] = {}
        fx: list[str] = []
        failures = list(joined.get("_failures", []))
        captioned = {}
        if self.main.captioner:
            captioned[self.main.captioner] = (fields, meta)
        for captioner, cfields in joined.items():
            if captioner == "_failures":
                continue
            try:
                cmeta = json.loads(cfields.get(META, b"{}"))
            except ValueError:
                cmeta = {}
            captioned[captioner] = (cfields, cmeta if isinstance(cmeta, dict) else {})
        for source in ([self.main] if self.main.captioner else []) + self.captioners:
            name = source.captioner
            if name not in captioned:
                texts[f"{name}.txt"] = None
                if shard in source.complete:
                    fx.append(f"nocaption:{name}")
                continue
            cfields, cmeta = captioned[name]
            text, bad = _text(cfields.get(f"{name}.txt"))
            texts[f"{name}.txt"] = text
            if bad:
                problems.append(f"{name}.txt is not UTF-8")
            cinfo = cmeta.get("captioners", {}).get(name, {}) if isinstance(cmeta.get("captioners"), dict) else {}
            if isinstance(cinfo, dict):
                found = cinfo.get("flags")
                flags[name] = [str(f) for f in found] if isinstance(found, list) else []
                info[name] = _caption_info(cinfo)
        for name, found in flags.items():
            if found:
                fx += ["flagged", f"flagged:{name}"] + [f"flag:{name}:{f}" for f in found]
        if failures:
            fx.append("failed")
            for stage, reason, _ in failures:
                fx += [f"failed:{stage}", f"fail:{stage}:{reason}"]
        image = fields.get(IMAGE)
        image_stage = self.main.stage
        if image is None and from_images is not None:
            image, image_stage = from_images.get(IMAGE), self.images.stage
        meta_text = json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        row = {
            "k": sample.key, "s": shard,
            "t": {k: v for k, v in texts.items()},
            "num": _numbers(meta), "flags": flags, "info": info, "fail": failures, "fx": sorted(set(fx)),
            "f": sorted(sample.offsets),
            "m": meta_text if len(meta_text) <= META_CHARS else meta_text[:META_CHARS] + f"\n… ({len(meta_text)} characters)",
        }
        if image is not None:
            row["src"] = image_stage
            row["wh"] = [meta.get("width"), meta.get("height")]
        if problems:
            row["problems"] = problems
        return row, image

    # ---- writing ---------------------------------------------------------------------------
    def _thumbs(self, images: list[bytes | None]) -> tuple[bytes, list[list[int] | None], dict[int, str], float]:
        """A page's sprite sheet, each thumbnail's box on it, and the images that did not decode."""
        started = time.perf_counter()
        thumbs: list[Image.Image | None] = []
        errors: dict[int, str] = {}
        for n, data in enumerate(images):
            thumb = None
            if data is not None:
                try:
                    thumb = thumbnail(data, self.thumb)
                except Exception as exc:  # noqa: BLE001 - any decoder error is shown, not fatal
                    errors[n] = f"{type(exc).__name__}: {exc}"[:200]
            thumbs.append(thumb)
        data, boxes = sheet(thumbs, self.thumb)
        return data, boxes, errors, time.perf_counter() - started

    def _finish_page(self, page: list[Pending], nlp) -> tuple[list[dict], bytes]:  # noqa: ANN001
        # (sequential: a thread for the thumbnails beside spaCy was measured no faster on 2 vCPUs,
        # spaCy holding the GIL most of the time)
        started = time.perf_counter()
        cfg = self.config.analysis.nouns
        where, texts = [], []
        for pending in page:
            row = pending.row
            row["n"] = {}
            for name, text in row["t"].items():
                if text is None:
                    continue
                if len(text) > DISPLAY_CHARS:
                    row.setdefault("cut", {})[name] = len(text)
                    text = row["t"][name] = text[:DISPLAY_CHARS]
                where.append((row, name))
                texts.append(text)
        for (row, name), spans in zip(where, noun_spans(texts, nlp, cfg)):
            if spans:
                row["n"][name] = spans
        self.timings["nouns_s"] += time.perf_counter() - started
        data, boxes, errors, seconds = self._thumbs([p.image for p in page])
        self.timings["thumbs_s"] += seconds
        for n, (pending, box) in enumerate(zip(page, boxes)):
            row = pending.row
            if box is not None:
                row["img"] = box
            elif not row.get("gone"):
                row["fx"] = sorted(set(row["fx"]) | {"noimage"})
            if n in errors:
                row["imgErr"] = errors[n]
        return [p.row for p in page], data

    def write(self, force: bool = False) -> tuple[str, bool]:
        """Write the view; (index.html's URI, whether anything was written)."""
        inputs = inputs_identity(self.config, self.dataset, self.sources, self.settings)
        record_uri = storage.join(self.uri, "view.json")
        index_html = storage.join(self.uri, "index.html")
        if not force and storage.exists(record_uri) and storage.exists(index_html):
            try:
                if json.loads(storage.read_text(record_uri)).get("inputs") == inputs:
                    log.info("view: %s is current (made from these stages as they are now); not writing again",
                             index_html)
                    return index_html, False
            except ValueError:
                pass
        started = time.perf_counter()
        nlp = load_nlp(tuple(self.config.analysis.nouns.spacy_models))
        now = time.time_ns()  # names sort by the time they were made (to the nanosecond)
        version = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now // 10**9))}-{now % 10**9:09d}-{uuid.uuid4().hex[:4]}"
        data_uri = storage.join(self.uri, "data", version)
        pages: list[dict] = []
        facets: dict[str, int] = {}
        numeric: dict[str, list[float]] = {}
        totals = {"rows": 0, "samples": 0, "gone": 0}
        page: list[Pending] = []

        def flush() -> None:
            rows, sheet_bytes = self._finish_page(page, nlp)
            t0 = time.perf_counter()
            number = len(pages)
            storage.atomic_write(storage.join(data_uri, f"sheet-{number:05d}.jpg"), sheet_bytes)
            payload = json.dumps(rows, ensure_ascii=True, separators=(",", ":"))
            storage.atomic_write(storage.join(data_uri, f"page-{number:05d}.js"), f"VIEW.page({number},{payload});\n")
            counts: dict[str, int] = {}
            for row in rows:
                for key in row["fx"]:
                    counts[key] = counts.get(key, 0) + 1
                for name, value in row["num"].items():
                    bounds = numeric.setdefault(name, [value, value])
                    bounds[0], bounds[1] = min(bounds[0], value), max(bounds[1], value)
            for key, n in counts.items():
                facets[key] = facets.get(key, 0) + n
            pages.append({"n": len(rows), "first": rows[0]["k"], "fx": counts})
            page.clear()
            self.timings["write_s"] += time.perf_counter() - t0

        for pending in self.rows():
            totals["rows"] += 1
            totals["gone" if pending.row.get("gone") else "samples"] += 1
            page.append(pending)
            if len(page) >= self.page_size:
                flush()
        if page:
            flush()
        manifest = self._manifest(pages, facets, numeric, totals, nlp, version)
        t0 = time.perf_counter()
        storage.atomic_write(storage.join(data_uri, "manifest.js"),
                             "VIEW.manifest(" + json.dumps(manifest, ensure_ascii=True, separators=(",", ":")) + ");\n")
        storage.atomic_write(index_html, page_html(f"data/{version}/", manifest))
        self.timings["write_s"] += time.perf_counter() - t0
        self.timings["total_s"] = time.perf_counter() - started
        storage.atomic_write(record_uri, json.dumps(
            {"inputs": inputs, "version": version, "rows": totals, "pages": len(pages),
             "stages": {s.stage: s.output.uri for s in self.sources},
             "timings": {k: round(v, 3) for k, v in self.timings.items()},
             "indices_written": self.indices_written}, indent=1, sort_keys=True))
        for old in storage.list_names(storage.join(self.uri, "data")):
            if old < version:  # earlier writes only (names start with the time): not a concurrent later one
                storage.remove_tree(storage.join(self.uri, "data", old))
        log.info("view: %d samples (+%d failed in %s) on %d data pages in %.1f s (read %.1f, nouns %.1f, "
                 "thumbnails %.1f, write %.1f); %d shard indices written: %s",
                 totals["samples"], totals["gone"], self.stage, len(pages), self.timings["total_s"],
                 self.timings["read_s"], self.timings["nouns_s"], self.timings["thumbs_s"], self.timings["write_s"],
                 self.indices_written, index_html)
        return index_html, True

    def _manifest(self, pages, facets, numeric, totals, nlp, version) -> dict:  # noqa: ANN001
        captioners = ([self.main.captioner] if self.main.captioner else []) + [s.captioner for s in self.captioners]
        labels: list[dict] = []

        def add(key: str, label: str) -> None:
            if facets.get(key):
                labels.append({"key": key, "label": label, "count": facets[key]})

        add("flagged", "flagged by any captioner")
        for name in captioners:
            add(f"flagged:{name}", f"{name}: flagged")
            prefix = f"flag:{name}:"
            for key in sorted(k for k in facets if k.startswith(prefix)):
                add(key, f"{name}: flag {key[len(prefix):]}")
        add("failed", "failed in any stage")
        for source in self.sources:
            add(f"failed:{source.stage}", f"failed in {source.stage}")
            prefix = f"fail:{source.stage}:"
            for key in sorted(k for k in facets if k.startswith(prefix)):
                add(key, f"{source.stage}: {key[len(prefix):]}")
        for name in captioners:
            add(f"nocaption:{name}", f"no {name} caption")
        add("noimage", "no image")
        cfg = self.config.analysis.nouns
        return {
            "dataset": self.dataset, "stage": self.stage, "version": version,
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
            "rows": totals["rows"], "samples": totals["samples"], "gone": totals["gone"],
            "limit": self.limit, "pageSize": self.page_size, "thumb": self.thumb, "pages": pages,
            "fields": [CAPTION] + [f"{c}.txt" for c in captioners], "captioners": captioners,
            "facets": labels, "numeric": {k: numeric[k] for k in sorted(numeric)},
            "stages": [{"stage": s.stage, "role": s.role, "complete": len(s.complete)} for s in self.sources],
            "nouns": f"{nlp.meta['lang']}_{nlp.meta['name']} {nlp.meta['version']}, "
                     f"{'NOUN and PROPN' if cfg.include_propn else 'NOUN'} by the noun report's definition",
        }


def write_view(config: PipelinesConfig, dataset: str, stage: str = "shards", limit: int | None = None,
               force: bool = False, thumb: int = THUMB, page_size: int = PAGE_SIZE) -> tuple[str, bool]:
    return ViewWriter(config, dataset, stage, limit, thumb, page_size).write(force)


# ---- serving -------------------------------------------------------------------------------

_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "json": "application/json",
          "jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
          "txt": "text/plain; charset=utf-8"}


def make_server(view_folder: str, host: str = "127.0.0.1", port: int = 0) -> http.server.ThreadingHTTPServer:
    """A server for a written view: its files, and `/_member?stage=&shard=&key=&field=`, one
    field of one sample read from its tar by byte offset (the shard's index)."""
    record = json.loads(storage.read_text(storage.join(view_folder, "view.json")))
    stages: dict[str, str] = record["stages"]

    @lru_cache(maxsize=256)
    def index_of(stage: str, shard: int) -> shard_index.ShardIndex:
        return shard_index.ensure_index(stages[stage], shard)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("serve: " + fmt, *args)

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            url = urllib.parse.urlsplit(self.path)
            try:
                if url.path == "/_member":
                    query = dict(urllib.parse.parse_qsl(url.query))
                    stage, shard, key, name = query["stage"], int(query["shard"]), query["key"], query["field"]
                    if stage not in stages:
                        raise KeyError(stage)
                    data = shard_index.read_field(stages[stage], shard, key, name, index_of(stage, shard))
                    return self._send(200, data, _TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream"))
                parts = [p for p in urllib.parse.unquote(url.path).split("/") if p] or ["index.html"]
                if not all(_SAFE.match(p) and p not in (".", "..") for p in parts) or parts[0] == "view.json":
                    return self._send(404, b"not found", "text/plain")
                uri = storage.join(view_folder, *parts)
                if not storage.exists(uri):
                    return self._send(404, b"not found", "text/plain")
                return self._send(200, storage.read_bytes(uri), _TYPES.get(parts[-1].rsplit(".", 1)[-1], "application/octet-stream"))
            except (KeyError, ValueError):
                return self._send(404, b"no such member", "text/plain")
            except (BrokenPipeError, ConnectionResetError):
                return None

    return http.server.ThreadingHTTPServer((host, port), Handler)


def serve(view_folder: str, port: int = 0) -> int:
    server = make_server(view_folder, port=port)
    host, bound = server.server_address[:2]
    print(f"serving {view_folder} at http://{host}:{bound}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# ---- the page ------------------------------------------------------------------------------

def page_html(base: str, manifest: dict) -> str:
    title = f"{manifest['dataset']} / {manifest['stage']}"
    escaped = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (_PAGE.replace("@TITLE@", escaped)
            .replace("@BASE@", json.dumps(base))
            .replace("@MANIFEST@", base + "manifest.js"))


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>@TITLE@ — pixart-data viewer</title>
<style>
:root { --thumb: 128px; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 8px 16px; z-index: 2; }
h1 { font-size: 18px; margin: 0 0 4px; }
#summary { color: #555; font-size: 13px; }
#controls { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin-top: 6px; }
#controls input[type=search] { width: 24em; padding: 4px 6px; }
#controls input[type=number] { width: 7em; }
#count { font-weight: 600; margin-left: auto; }
main { padding: 8px 16px; }
.sample { display: flex; gap: 12px; background: #fff; border: 1px solid #e3e3e3; border-radius: 4px;
          padding: 8px; margin-bottom: 8px; }
.sample.gone { background: #fff4f4; }
.thumb { flex: 0 0 var(--thumb); height: var(--thumb); display: flex; align-items: center; justify-content: center;
         background: #eee; color: #888; font-size: 12px; text-align: center; cursor: zoom-in; }
.thumb div { background-repeat: no-repeat; }
.body { flex: 1; min-width: 0; }
.key { font-family: ui-monospace, monospace; font-size: 12px; color: #666; }
.caps { display: grid; grid-template-columns: max-content 1fr; column-gap: 12px; row-gap: 3px; margin: 3px 0; }
.cap { display: contents; }
.cap .label { font-size: 12px; color: #777; padding-top: 2px; }
.cap .content { white-space: pre-wrap; overflow-wrap: anywhere; min-width: 0; }
.cap .missing { color: #aaa; font-style: italic; }
mark.noun { background: #fff0a8; padding: 0 1px; border-radius: 2px; }
.chip { display: inline-block; font-size: 12px; padding: 0 6px; margin: 2px 4px 0 0; border-radius: 9px; background: #eef; }
.flag { background: #ffe0b3; }
.failure { background: #ffd0d0; }
.problem { background: #f4d0ff; }
details { font-size: 12px; color: #555; margin-top: 4px; }
details pre { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 20em; overflow: auto; background: #f6f6f6; padding: 6px; }
#more { display: block; margin: 12px auto; }
#overlay { position: fixed; inset: 0; background: rgba(0,0,0,.8); display: none; align-items: center; justify-content: center;
           flex-direction: column; color: #fff; z-index: 5; cursor: zoom-out; }
#overlay img { max-width: 92vw; max-height: 86vh; background: #333; }
#overlay .zoom { transform-origin: center; }
#error { color: #b00; }
</style></head>
<body>
<header>
  <h1>@TITLE@</h1>
  <div id="summary">loading…</div>
  <div id="controls">
    <input id="q" type="search" placeholder="search captions and keys (all words)" autocomplete="off">
    <select id="q-field" title="where to search"><option value="">everywhere</option></select>
    <select id="facet" title="filter"><option value="">all samples</option></select>
    <select id="num" title="numeric field"><option value="">score…</option></select>
    <input id="num-min" type="number" step="any" placeholder="min">
    <input id="num-max" type="number" step="any" placeholder="max">
    <span id="count"></span>
  </div>
  <div id="error"></div>
</header>
<main><div id="rows"></div><button id="more" hidden>more</button></main>
<div id="overlay"><div id="overlay-body"></div><p id="overlay-note"></p></div>
<script>
"use strict";
const BASE = @BASE@;
const BATCH = 50;     // rows rendered at a time
const PREFETCH = 3;   // data pages requested ahead of the one being scanned
const SIZES = new Set(["width", "height", "original_width", "original_height"]);
const V = { m: null, pages: new Map(), waiting: new Map(), gen: 0, results: [], shown: 0,
            plan: null, busy: null, filter: null };
window.VIEW = {
  manifest(m) { V.m = m; },
  page(i, rows) {
    V.pages.set(i, rows);
    const w = V.waiting.get(i);
    if (w) { V.waiting.delete(i); w.resolve(rows); }
  },
};
// for tests and the benchmark: where the page is (done: count known, rows rendered)
window.VIEW_STATE = { ready: false, done: false, total: 0, matched: 0, rendered: 0, pagesLoaded: 0, filter: null };
const $ = (id) => document.getElementById(id);
const pad = (i) => String(i).padStart(5, "0");
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function loadPage(i) {
  if (V.pages.has(i)) return Promise.resolve(V.pages.get(i));
  if (V.waiting.has(i)) return V.waiting.get(i).promise;
  let resolve, reject;
  const promise = new Promise((a, b) => { resolve = a; reject = b; });
  V.waiting.set(i, { promise, resolve, reject });
  const s = document.createElement("script");
  s.src = BASE + "page-" + pad(i) + ".js";
  s.onload = () => { s.remove(); VIEW_STATE.pagesLoaded = V.pages.size;
                     if (V.waiting.has(i)) { V.waiting.delete(i); reject(new Error("page " + i + " did not register")); } };
  s.onerror = () => { s.remove(); V.waiting.delete(i); reject(new Error("could not load " + s.src)); };
  document.head.appendChild(s);
  return promise;
}
function highlighted(text, spans) {
  const frag = document.createDocumentFragment();
  let at = 0;
  for (const [s, e] of spans || []) {
    if (s < at || e > text.length) continue;
    if (s > at) frag.append(text.slice(at, s));
    frag.append(el("mark", "noun", text.slice(s, e)));
    at = e;
  }
  if (at < text.length) frag.append(text.slice(at));
  return frag;
}
function fmt(v) { return Number.isInteger(v) ? String(v) : v.toPrecision(4).replace(/\.?0+$/, ""); }
function thumbOf(row) {
  const box = el("div", "thumb");
  if (row.img) {
    const [x, y, w, h] = row.img;
    const d = el("div");
    d.style.width = w + "px"; d.style.height = h + "px";
    d.style.backgroundImage = "url(" + BASE + "sheet-" + pad(row.p) + ".jpg)";
    d.style.backgroundPosition = (-x) + "px " + (-y) + "px";
    box.append(d);
    box.addEventListener("click", () => openImage(row));
  } else {
    box.textContent = row.gone ? "not in this stage" : (row.imgErr ? "image does not decode" : "no image");
    box.style.cursor = "default";
  }
  return box;
}
function openImage(row) {
  const body = $("overlay-body"), note = $("overlay-note");
  body.textContent = ""; note.textContent = "";
  if (location.protocol.startsWith("http") && row.src) {
    const img = el("img");
    img.alt = row.k;
    img.src = "/_member?" + new URLSearchParams({ stage: row.src, shard: row.s, key: row.k, field: "jpg" });
    body.append(img);
    note.textContent = row.k + " — full size, read from " + row.src + " shard " + row.s + " by byte offset";
  } else {
    const t = thumbOf(row); t.classList.add("zoom"); t.style.transform = "scale(3)"; t.style.margin = "200px";
    body.append(t);
    note.textContent = row.k + " — thumbnail; `python -m analysis view ... --serve` shows the full image";
  }
  $("overlay").style.display = "flex";
}
function rowOf(row) {
  const r = el("div", "sample" + (row.gone ? " gone" : ""));
  r.dataset.key = row.k;
  r.append(thumbOf(row));
  const b = el("div", "body");
  const head = el("div", "key", row.k + " · shard " + row.s + (row.wh && row.wh[0] ? " · " + row.wh[0] + "×" + row.wh[1] : ""));
  b.append(head);
  const caps = el("div", "caps");
  for (const name of V.m.fields) {
    if (!(name in row.t) && row.gone) continue;
    const line = el("div", "cap"), content = el("div", "content");
    line.dataset.field = name;
    line.append(el("span", "label", name), content);
    const text = row.t[name];
    if (text === null || text === undefined) content.append(el("span", "missing", "(none)"));
    else if (text === "") content.append(el("span", "missing", "(empty)"));
    else {
      const span = el("span", "text");
      span.append(highlighted(text, (row.n || {})[name]));
      content.append(span);
      if (row.cut && row.cut[name]) content.append(el("span", "missing", " … (" + row.cut[name] + " characters)"));
    }
    const cap = name.endsWith(".txt") ? name.slice(0, -4) : null;
    if (cap && row.flags[cap]) for (const f of row.flags[cap]) content.append(" ", el("span", "chip flag", f));
    if (cap && row.info && row.info[cap]) content.append(" ", el("span", "chip", row.info[cap]));
    caps.append(line);
  }
  b.append(caps);
  const chips = el("div");
  for (const [stage, reason, detail] of row.fail || []) {
    const c = el("span", "chip failure", "failed in " + stage + ": " + reason + (detail ? " (" + detail + ")" : ""));
    chips.append(c);
  }
  for (const p of row.problems || []) chips.append(el("span", "chip problem", p));
  if (row.imgErr) chips.append(el("span", "chip problem", row.imgErr));
  for (const [k, v] of Object.entries(row.num || {})) {
    if (!SIZES.has(k)) chips.append(el("span", "chip num", k + " " + fmt(v)));  // sizes are in the row's head
  }
  b.append(chips);
  if (row.m) {
    const d = el("details");
    d.append(el("summary", null, "json" + (row.f ? " · fields: " + row.f.join(", ") : "")));
    d.addEventListener("toggle", () => {
      if (!d.open || d.querySelector("pre")) return;
      let text = row.m;
      try { text = JSON.stringify(JSON.parse(row.m), null, 1); } catch (e) { /* cut: shown as it is */ }
      d.append(el("pre", null, text));
    });
    b.append(d);
  }
  r.append(b);
  return r;
}
function currentFilter() {
  const q = $("q").value.trim().toLowerCase();
  const lo = $("num-min").value, hi = $("num-max").value;
  return { terms: q ? q.split(/\s+/) : [], field: $("q-field").value, facet: $("facet").value,
           num: $("num").value, lo: lo === "" ? null : Number(lo), hi: hi === "" ? null : Number(hi) };
}
function ranged(f) { return f.num && (f.lo !== null || f.hi !== null); }
function matches(row, f) {
  if (f.facet && !row.fx.includes(f.facet)) return false;
  if (ranged(f)) {
    const v = row.num[f.num];
    if (v === undefined || (f.lo !== null && v < f.lo) || (f.hi !== null && v > f.hi)) return false;
  }
  if (f.terms.length) {
    let hay;
    if (f.field === "__key") hay = row.k;
    else if (f.field) hay = (row.t[f.field] || "");
    else hay = row.k + "\n" + Object.values(row.t).filter((t) => t).join("\n");
    hay = hay.toLowerCase();
    for (const t of f.terms) if (!hay.includes(t)) return false;
  }
  return true;
}
function plan(f) {
  const pages = [];
  V.m.pages.forEach((p, i) => { if (!f.facet || (p.fx[f.facet] || 0) > 0) pages.push(i); });
  let exact = null;
  if (!f.terms.length && !ranged(f)) exact = f.facet ? pages.reduce((n, i) => n + V.m.pages[i].fx[f.facet], 0) : V.m.rows;
  return { pages, next: 0, exact, done: pages.length === 0 };
}
function scanNext(gen) {
  // one page at a time, whoever asks (the background count and "more" share it)
  if (V.busy) return V.busy;
  const p = V.plan, i = p.pages[p.next];
  for (const ahead of p.pages.slice(p.next + 1, p.next + 1 + PREFETCH)) loadPage(ahead).catch(() => {});
  V.busy = loadPage(i).then((rows) => {
    V.busy = null;
    if (gen !== V.gen) return;
    p.next += 1;
    if (p.next >= p.pages.length) p.done = true;
    for (const row of rows) { row.p = i; if (matches(row, V.filter)) V.results.push(row); }
  }, (e) => { V.busy = null; throw e; });
  return V.busy;
}
function render() {
  const box = $("rows");
  while (VIEW_STATE.rendered < Math.min(V.shown, V.results.length)) {
    box.append(rowOf(V.results[VIEW_STATE.rendered]));
    VIEW_STATE.rendered += 1;
  }
  const p = V.plan, known = p.exact !== null ? p.exact : (p.done ? V.results.length : null);
  const total = V.m.rows;
  const filtered = V.filter.terms.length || V.filter.facet || ranged(V.filter);
  let text;
  if (!filtered) text = total + " samples";
  else if (known !== null) text = known + " of " + total + " samples match";
  else text = "≥" + V.results.length + " of " + total + " match (searching " + p.next + "/" + p.pages.length + " pages)";
  $("count").textContent = text;
  VIEW_STATE.matched = known !== null ? known : V.results.length;
  VIEW_STATE.done = known !== null && (p.done || VIEW_STATE.rendered >= Math.min(V.shown, known));
  $("more").hidden = VIEW_STATE.rendered >= (known !== null ? known : Infinity) && p.done;
}
async function fill(gen) {
  // load pages until there are enough results for what should be shown (or none are left)
  while (gen === V.gen && V.results.length < V.shown && !V.plan.done) await scanNext(gen);
  if (gen === V.gen) render();
}
async function run() {
  const gen = ++V.gen;
  V.filter = currentFilter();
  V.plan = plan(V.filter);
  V.results = []; V.shown = BATCH; VIEW_STATE.rendered = 0; VIEW_STATE.done = false;
  VIEW_STATE.filter = V.filter;
  $("rows").textContent = "";
  try {
    await fill(gen);
    // searching: go on through every page for the exact count, rendering nothing more
    while (gen === V.gen && V.plan.exact === null && !V.plan.done) { await scanNext(gen); if (gen === V.gen) render(); }
    if (gen === V.gen) render();
  } catch (e) { $("error").textContent = String(e); throw e; }
}
function more() { V.shown += BATCH; fill(V.gen); }
function summary() {
  const m = V.m, s = $("summary");
  const parts = [m.samples + " samples", m.gone ? m.gone + " failed in " + m.stage : null,
                 m.captioners.length ? "captioners: " + m.captioners.join(", ") : "no captions",
                 m.limit ? "first " + m.limit + " rows" : null, "nouns: " + m.nouns, "written " + m.written];
  s.textContent = parts.filter((x) => x).join(" · ");
}
function setup() {
  if (!V.m) { $("summary").textContent = "manifest did not load"; return; }
  summary();
  for (const name of V.m.fields) $("q-field").append(new Option(name, name));
  $("q-field").append(new Option("key", "__key"));
  for (const f of V.m.facets) $("facet").append(new Option(f.label + " (" + f.count + ")", f.key));
  for (const [name, [lo, hi]] of Object.entries(V.m.numeric)) $("num").append(new Option(name + " [" + fmt(lo) + ", " + fmt(hi) + "]", name));
  let timer = null;
  const later = () => { clearTimeout(timer); timer = setTimeout(run, 120); };
  $("q").addEventListener("input", later);
  for (const id of ["q-field", "facet", "num"]) $(id).addEventListener("change", run);
  for (const id of ["num-min", "num-max"]) $(id).addEventListener("input", later);
  $("more").addEventListener("click", more);
  $("overlay").addEventListener("click", () => { $("overlay").style.display = "none"; });
  new IntersectionObserver((seen) => { if (seen.some((e) => e.isIntersecting) && !$("more").hidden) more(); })
    .observe($("more"));
  VIEW_STATE.total = V.m.rows;
  run().then(() => { VIEW_STATE.ready = true; });
}
</script>
<script src="@MANIFEST@"></script>
<script>setup();</script>
</body></html>
"""
