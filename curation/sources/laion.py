"""The `laion` source: url + caption parquet files, downloaded through img2dataset.

We drive img2dataset's own Downloader (its thread pool, retries and per-URL status) from our
Ray tasks, one task per parquet slice, instead of calling `img2dataset.download` with its
Ray distributor. The reasons:
- shard i of our output must be exactly slice i of the input, with our keys, so that every
  later stage lines up and a rerun skips complete shards; img2dataset numbers shards its own
  way and its incremental mode judges completeness by file presence;
- our image policy (header-checked pixel bound, EXIF orientation, 16-bit and CMYK handling,
  hashes for dedup computed from the same decode) goes in as its `resizer`, and our writer
  as its `sample_writer_class`, so nothing is decoded twice or written twice;
- unsafe URLs are removed before img2dataset sees them, and its urllib fetches run under our
  guarded opener (curation/urls.py), installed as urllib's for the shard: it re-checks every
  redirect target and every connection's peer address against the allowlist, and bounds
  each image by `deadline_s` (connect, redirects, headers and body) and
  `max_download_bytes` (img2dataset's own `.read()` is cut at the cap, never held whole).
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.fetch import Candidate, FetchStage, ShardBuilder
from curation.urls import FetchLimits, PrivateAllowlist, check_url, guarded_urlopen
from shardkit import storage
from shardkit.inputs import MissingInput
from shardkit.runner import ShardTask
from shardkit.shards import make_key

log = logging.getLogger(__name__)

KEY_COLUMN = "__sample_key__"


_OWN_REASON = re.compile(r"(unsafe_url:[a-z_]+|deadline|too_large): ")


def failure_reason(message: str) -> str:
    """A short category for an img2dataset error message (the message itself is kept as
    the failure's detail)."""
    own = _OWN_REASON.match(message)
    if own:  # the guarded opener's refusals; before the needles, which a URL could contain
        return own.group(1)
    http = re.search(r"HTTP Error (\d{3})", message)
    if http:
        return f"http_{http.group(1)}"
    lowered = message.lower()
    for needle, reason in (("timed out", "timeout"), ("refused", "connection_refused"),
                           ("name or service not known", "dns"), ("nodename nor servname", "dns"),
                           ("ssl", "ssl"), ("incompleteread", "truncated_download"),
                           ("remote end closed", "connection_closed"), ("reset by peer", "connection_reset")):
        if needle in lowered:
            return reason
    first = message.split(":", 1)[0].strip()
    # our image policy's reasons come through img2dataset as "<reason>: <detail>"
    return first if re.fullmatch(r"[a-z_]+", first) else "download_error"


class _Collector:
    """img2dataset's sample_writer_class protocol; hands every result to the shard builder
    instead of writing files (img2dataset instantiates it itself, hence the class attribute)."""

    sink: list[tuple[Any, dict[str, Any]]]

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):  # noqa: ANN001
        pass

    def write(self, img_str, key, caption, meta) -> None:  # noqa: ANN001
        self.sink.append((img_str, dict(meta)))

    def close(self) -> None:
        pass


def row_groups_holding(parquet, start: int, stop: int) -> list[tuple[int, int]]:  # noqa: ANN001 - pq.ParquetFile
    """(row group, its first row) of the groups that hold rows [start, stop)."""
    groups, offset = [], 0
    for g in range(parquet.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append((g, offset))
        offset += n
    return groups


class LaionStage(FetchStage):
    @property
    def allowlist(self) -> PrivateAllowlist:
        return PrivateAllowlist.parse(self.cfg.allowed_private, everything=self.cfg.allow_private_urls)

    @property
    def limits(self) -> FetchLimits:
        return FetchLimits(deadline_s=self.cfg.deadline_s, max_bytes=self.cfg.max_download_bytes)

    def slices(self) -> list[tuple[str, int, int]]:
        per = self.cfg.samples_per_shard
        out = []
        for uri in self.cfg.parquet:
            fs, path = storage.filesystem(uri)
            files = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
            if not files:
                raise MissingInput(
                    f"datasets.{self.dataset}.parquet", f"no parquet file matches {uri}",
                    "get LAION-style metadata parquet files (a URL and a TEXT column per image; e.g. "
                    "laion/relaion2B-en-research-safe on the Hugging Face hub, or your own img2dataset input) "
                    f"and put them there, or set datasets.{self.dataset}.parquet to their paths, a glob or URIs")
            for file_path in files:
                with fs.open(file_path, "rb") as f:
                    rows = pq.ParquetFile(f).metadata.num_rows
                file_uri = file_path if storage.is_local(uri) else f"{uri.split('://')[0]}://{file_path}"
                out += [(file_uri, start, min(start + per, rows)) for start in range(0, rows, per)]
        return out

    def __getstate__(self) -> dict:
        # the runner sends the stage to every task, and each task carries its own slice: the
        # list of every slice (one per shard, so growing with the dataset) stays in the driver
        state = dict(self.__dict__)
        state.pop("_slices", None)
        return state

    def _rows(self, uri: str, start: int, stop: int) -> pa.Table:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            for column in (self.cfg.url_column, self.cfg.caption_column):
                if column not in names:
                    raise ValueError(f"{uri}: no column {column!r} (columns: {sorted(names)})")
            columns = [self.cfg.url_column, self.cfg.caption_column] + [
                c for c in self.cfg.metadata_columns if c in names and c not in (self.cfg.url_column, self.cfg.caption_column)]
            # only the row groups that hold this slice, streamed batch by batch up to its end: a
            # row group can hold a million rows (pyarrow's default) and a task wants a thousand;
            # a whole group decoded at once cost a worker ~500 MB and seconds per shard
            groups = row_groups_holding(parquet, start, stop)
            batches, position = [], groups[0][1]
            for batch in parquet.iter_batches(batch_size=max(1024, min(1 << 16, stop - start)),
                                              row_groups=[g for g, _ in groups], columns=columns):
                lo, hi = max(start, position), min(stop, position + batch.num_rows)
                if hi > lo:
                    batches.append(batch.slice(lo - position, hi - lo))
                position += batch.num_rows
                if position >= stop:
                    break
            return pa.Table.from_batches(batches, schema=pa.schema([parquet.schema_arrow.field(c) for c in columns]))

    def collect(self, task: ShardTask, builder: ShardBuilder) -> None:
        uri, start, stop = task.payload
        table = self._rows(uri, start, stop).to_pylist()
        wanted: list[Candidate] = []
        allowlist = self.allowlist
        for index, row in enumerate(table):
            key = make_key(task.index, index)
            url = row.pop(self.cfg.url_column)
            caption = row.pop(self.cfg.caption_column)
            # LAION has NaN where a score is unknown; JSON has no NaN, so it becomes null
            meta = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            candidate = Candidate(key, origin=str(url), caption="" if caption is None else str(caption), meta=meta)
            unsafe = check_url(str(url or ""), allow_private=allowlist)
            if unsafe:
                builder.fail(key, *unsafe)
            elif builder.prefilter(candidate):
                wanted.append(candidate)
        if wanted:
            self._download(task.index, wanted, builder)

    def _download(self, shard: int, wanted: list[Candidate], builder: ShardBuilder) -> None:
        # imported here, in the worker that downloads: it costs seconds (torch, wandb,
        # albumentations), which a run that finds its shards complete never needs;
        # albumentations asks the network for a newer version at import unless told not to
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from img2dataset.downloader import Downloader

        by_key = {c.key: c for c in wanted}
        results: list[tuple[Any, dict[str, Any]]] = []
        collector = type("Collector", (_Collector,), {"sink": results})
        with tempfile.TemporaryDirectory(prefix="laion-shard-") as workdir:
            feather = os.path.join(workdir, f"{shard:05d}.feather")
            table = pa.table({"url": [c.origin for c in wanted], "caption": [c.caption for c in wanted],
                              KEY_COLUMN: [c.key for c in wanted]})
            with pa.OSFile(feather, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            downloader = Downloader(
                sample_writer_class=collector, resizer=self.policy.as_img2dataset_resizer(),
                thread_count=self.cfg.threads, save_caption=True, extract_exif=False, output_folder=workdir,
                column_list=["url", "caption", KEY_COLUMN], timeout=self.cfg.timeout_s,
                number_sample_per_shard=max(len(wanted), 10), oom_shard_count=5, compute_hash=None,
                verify_hash_type=None, encode_format="jpg", retries=self.cfg.retries, user_agent_token=None,
                disallowed_header_directives=None,
            )
            with guarded_urlopen(self.allowlist, self.limits):
                downloader.download_shard((shard, feather))
        for image, meta in results:
            candidate = by_key.pop(meta[KEY_COLUMN])
            if image is None:
                message = meta.get("error_message") or "unknown error"
                builder.fail(candidate.key, failure_reason(message), message)
            else:
                candidate.processed = image.processed
                builder.add(candidate, prefiltered=True)
        for candidate in by_key.values():  # img2dataset swallowed an exception for these
            builder.fail(candidate.key, "download_error", "no result from the downloader")
