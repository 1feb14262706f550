"""Runs a stage: one Ray task per shard, complete shards skipped, progress and a summary.

A stage says what its shards are (`tasks`) and how to make one (`run_shard`); the runner
does the rest the same way for every stage. The worker writes the tar and then the record,
so a killed driver or worker loses at most the shards in flight, and a rerun redoes only
those. One Ray task per shard keeps scheduling overhead (~1 ms a task) negligible against
thousands of images a shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from shardkit import cluster, storage
from shardkit.config import ClusterConfig
from shardkit.shards import RECORDS, Failure, Sample, ShardRecord, ShardWriter, StageOutput, StagePlan, read_shard, summarise

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    pass


LOST_WORKER_RETRIES = 3
"""How many times a shard is made again when the process making it is lost (a killed node,
an actor out of restarts), on top of Ray's own retries."""


@dataclass(frozen=True)
class PoolSpec:
    """Run the stage's shards on long-lived actors instead of tasks: for stages that hold a
    model, so it is loaded once per actor, not once per shard."""
    actors: int
    num_cpus: float
    num_gpus: float = 0.0
    max_restarts: int = 3
    """A killed actor is restarted (reloading its model) and its shard retried on it."""
    config_key: str = ""
    """The config entry these numbers come from (`captioners.llava-1.5-7b`), for messages."""


@dataclass(frozen=True)
class ShardTask:
    index: int
    payload: Any = None
    """Whatever the stage needs to make this shard (an input shard URI, a parquet slice...)."""


class ShardStage(Protocol):
    """What a stage provides to the runner. Instances are sent to Ray workers: keep them
    small and picklable (configs and paths, not models or open files). Optional members:
    `pool` (a PoolSpec: run on actors), `setup()` (called once in each actor before its
    first shard, e.g. to load a model) and `progress_counters` (record counters shown as
    rates in the progress line, e.g. tokens)."""

    task_cpus: float

    def plan(self) -> StagePlan: ...

    def tasks(self) -> list[ShardTask]: ...

    def run_shard(self, task: ShardTask, shard_uri: str) -> ShardRecord: ...


def map_shard_in_batches(index: int, source_uri: str, shard_uri: str, batch_size: int,
                         process: Callable[[Any, int, list[Failure], dict[str, int]], list[Sample]],
                         prepare: Callable[[list[Sample], int, list[Failure], dict[str, int]], Any] | None = None,
                         ahead: int = 0) -> ShardRecord:
    """The body of a model stage's shard: input shard `index` in batches through
    `process(batch, batch_number, failures, counters)`, the results streamed into one shard.

    With `prepare`, each batch goes through `prepare(samples, number, failures, counters)`
    first and `process` gets what it returns. With `ahead` > 0, reading and preparing run in a
    thread up to that many batches in front of `process`, so the model never waits on JPEG
    decoding or preprocessing. Where the time went is counted in milliseconds: read_ms and
    prepare_ms (in that thread), wait_ms (process waiting for a batch), process_ms, write_ms, and
    close_ms: the flush, fsync and rename that make the finished tar durable before its record."""
    started = time.monotonic()
    failures: list[Failure] = []
    counters: dict[str, int] = {}
    early_failures: list[Failure] = []
    early_counters: dict[str, int] = {}
    samples_in = 0

    def prepared_batches() -> Iterator[tuple[int, Any]]:
        nonlocal samples_in
        reader = read_shard(source_uri)
        for number in itertools.count():
            with timed_ms(early_counters, "read_ms"):
                chunk = list(itertools.islice(reader, batch_size))
            if not chunk:
                return
            samples_in += len(chunk)
            with timed_ms(early_counters, "prepare_ms"):
                batch = prepare(chunk, number, early_failures, early_counters) if prepare else chunk
            yield number, batch

    batches = _run_ahead(prepared_batches(), ahead, counters) if ahead > 0 else prepared_batches()
    with ShardWriter(shard_uri) as writer:
        for number, batch in batches:
            with timed_ms(counters, "process_ms"):
                out = process(batch, number, failures, counters)
            with timed_ms(counters, "write_ms"):
                for sample in out:
                    writer.write(sample)
    counters["close_ms"] = int(round(writer.close_seconds * 1000))
    for name, value in early_counters.items():
        counters[name] = counters.get(name, 0) + value
    return ShardRecord(index, samples_in=samples_in, samples_out=writer.count, seconds=time.monotonic() - started,
                       failures=sorted(early_failures + failures, key=lambda f: f.key),
                       counters=dict(sorted(counters.items())))


@contextlib.contextmanager
def timed_ms(counters: dict[str, int], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        counters[name] = counters.get(name, 0) + int(round((time.perf_counter() - started) * 1000))


_END = object()


def _run_ahead(items: Iterator[Any], depth: int, counters: dict[str, int]) -> Iterator[Any]:
    """`items`, produced in a thread up to `depth` ahead of the consumer. An exception in the
    producer is raised in the consumer; a consumer that stops early stops the producer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((_END, exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            with timed_ms(counters, "wait_ms"):
                item, error = slots.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)


def _remove_temporaries(output: StageOutput, whose: str) -> None:
    """A writer killed between its temporary file and the rename leaves one behind, beside the
    shards or the records; validate reports them."""
    removed = sum(storage.remove_leftover_temporaries(folder) for folder in (output.uri, storage.join(output.uri, RECORDS)))
    if removed:
        log.info("removed %d temporary files left by %s", removed, whose)


def same_config(previous: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether an existing output was made with the current config. Keys on one side only are
    passed over: a setting added to the config schema later (with a default that keeps the
    old behaviour) must not make every existing output invalid, nor one a stage stopped
    recording. Every key present in both must agree."""
    for key in previous.keys() & current.keys():
        a, b = previous[key], current[key]
        if isinstance(a, dict) and isinstance(b, dict):
            if not same_config(a, b):
                return False
        elif a != b:
            return False
    return True


class StaleRunError(StageError):
    pass


def _run_one(stage: ShardStage, task: ShardTask, output: StageOutput) -> ShardRecord:
    """Make one shard under a staging name, then publish it and its record only if this run
    still owns the stage: a task orphaned by a killed driver may outlive it, and must not
    overwrite what the rerun wrote (a fencing token: the rerun's id in `_run`)."""
    run_id = output.run_id
    staged = output.shard_uri(task.index) + f"{storage.TEMP_MARKER}{run_id}-staged"
    record = stage.run_shard(task, staged)
    if output.read_fence() != run_id:
        fs, path = storage.filesystem(staged)
        fs.rm(path)
        raise StaleRunError(f"shard {task.index}: a newer run owns {output.uri}; result dropped")
    fs, path = storage.filesystem(staged)
    fs.mv(path, storage.filesystem(output.shard_uri(task.index))[1])
    output.write_record(record)
    return record


class _ShardActor:
    def __init__(self, stage: ShardStage) -> None:
        self.stage = stage
        if hasattr(stage, "setup"):
            stage.setup()

    def run(self, task: ShardTask, output: StageOutput) -> ShardRecord:
        return _run_one(self.stage, task, output)


class _Progress:
    def __init__(self, label: str, total: int, counters: tuple[str, ...] = (), interval_s: float = 5.0):
        self.label, self.total, self.interval_s = label, total, interval_s
        self.done = self.samples = self.failures = 0
        self.counters = dict.fromkeys(counters, 0)
        self.start = self.last = time.monotonic()

    def update(self, record: ShardRecord) -> None:
        self.done += 1
        self.samples += record.samples_out
        self.failures += len(record.failures)
        for name in self.counters:
            self.counters[name] += record.counters.get(name, 0)
        now = time.monotonic()
        if now - self.last >= self.interval_s or self.done == self.total:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            rates = "".join(f", {n / elapsed:.1f} {name}/s" for name, n in self.counters.items())
            log.info("%s: shards %d/%d, %d samples (%.1f/s%s), %d failures",
                     self.label, self.done, self.total, self.samples, self.samples / elapsed, rates, self.failures)


def run_stage(stage: ShardStage, output: StageOutput, cluster_cfg: ClusterConfig,
              restart: bool = False, max_in_flight: int | None = None) -> dict[str, Any]:
    """Make every missing shard of `output`, then write and return the stage summary."""
    started = time.monotonic()
    plan = stage.plan()
    if restart and storage.exists(output.uri):
        fs, path = storage.filesystem(output.uri)
        fs.rm(path, recursive=True)
    previous = output.read_plan()
    if previous is not None and (previous.num_shards != plan.num_shards or not same_config(previous.config, plan.config)):
        raise StageError(
            f"{output.uri} was made with another config ({previous.num_shards} shards, "
            f"{previous.config}); rerun with --restart to rebuild it"
        )
    storage.makedirs(output.uri)
    _remove_temporaries(output, "an interrupted run")
    output.write_plan(plan)
    output = dataclasses.replace(output, run_id=uuid.uuid4().hex[:12])
    output.write_fence()

    done = output.complete_shards()
    pending = [t for t in stage.tasks() if t.index not in done]
    label = f"{plan.dataset}/{plan.stage}"
    if not pending:
        log.info("%s: all %d shards already complete", label, plan.num_shards)
    else:
        log.info("%s: %d of %d shards to make (%d already complete)",
                 label, len(pending), plan.num_shards, len(done))
        run = _run_pending_here if cluster_cfg.in_process else _run_pending
        run(stage, output, cluster_cfg, pending, label, max_in_flight)
        # every shard of this run is settled: what is left was written by a worker that died
        # (its shard was redone elsewhere), and would make the finished stage look invalid
        _remove_temporaries(output, "workers that died during this run")

    summary = summarise(plan, output.iter_records(), time.monotonic() - started)
    output.write_summary(summary)
    if summary["shards_missing"]:
        raise StageError(f"{label}: shards {summary['shards_missing']} failed; rerun to retry them")
    return summary


def _run_pending_here(stage: ShardStage, output: StageOutput, _cluster_cfg: ClusterConfig,
                      pending: list[ShardTask], label: str, _max_in_flight: int | None) -> None:
    """cluster.in_process: the same shards, one after another in this process, the model
    (if the stage holds one) loaded once."""
    if hasattr(stage, "setup"):
        stage.setup()
    progress = _Progress(label, len(pending), tuple(getattr(stage, "progress_counters", ())))
    for task in pending:
        try:
            progress.update(_run_one(stage, task, output))
        except Exception as exc:  # noqa: BLE001 - one bad shard must not stop the others
            log.error("%s: shard %05d failed: %s", label, task.index, exc)


def _run_pending(stage: ShardStage, output: StageOutput, cluster_cfg: ClusterConfig,
                 pending: list[ShardTask], label: str, max_in_flight: int | None) -> None:
    import ray

    cluster.connect(cluster_cfg)
    pool: PoolSpec | None = getattr(stage, "pool", None)
    stage_ref = ray.put(stage)
    if pool is None:
        # max_retries covers a worker process dying (OOM, kill); an exception from the
        # stage's own code is not retried: it would fail the same way again
        remote = ray.remote(_run_one).options(num_cpus=stage.task_cpus, max_retries=2)
        limit = max_in_flight or max(2, int(2 * cluster.total_cpus() / max(stage.task_cpus, 0.01)))
        submit = lambda task, _slot: remote.remote(stage_ref, task, output)  # noqa: E731
        slots = list(range(limit))
    else:
        cluster.require_gpus(cluster_cfg, pool.config_key or "the stage", pool.num_gpus, "num_gpus", pool.actors)
        actor_class = ray.remote(_ShardActor).options(
            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, max_restarts=pool.max_restarts,
            max_task_retries=pool.max_restarts)
        # the stage goes inline, not by object reference: a restarted actor must still find it
        slots = [actor_class.remote(stage) for _ in range(min(pool.actors, len(pending)))]
        submit = lambda task, actor: actor.run.remote(task, output)  # noqa: E731
    progress = _Progress(label, len(pending), tuple(getattr(stage, "progress_counters", ())))
    queue = list(reversed(pending))
    in_flight: dict[Any, tuple[ShardTask, Any]] = {}
    lost: dict[int, int] = {}
    try:
        while queue or in_flight:
            while queue and slots:
                task, slot = queue.pop(), slots.pop()
                in_flight[submit(task, slot)] = (task, slot)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            task, slot = in_flight.pop(ready[0])
            try:
                progress.update(ray.get(ready[0]))
            except ray.exceptions.RayTaskError as exc:  # the stage's own error: it would fail the same way again
                log.error("%s: shard %05d failed: %s", label, task.index, exc)
            except ray.exceptions.RayError as exc:
                # the worker, its actor or its node was lost (a killed node's actor can surface
                # as "temporarily unavailable" with no retry left): the shard is made again
                lost[task.index] = lost.get(task.index, 0) + 1
                if lost[task.index] > LOST_WORKER_RETRIES:
                    log.error("%s: shard %05d failed: its worker was lost %d times: %s", label, task.index,
                              lost[task.index], exc)
                else:
                    log.warning("%s: shard %05d: its worker was lost (%s); making it again", label, task.index,
                                type(exc).__name__)
                    queue.append(task)
                if pool is not None and isinstance(exc, ray.exceptions.ActorDiedError):
                    slot = actor_class.remote(stage)  # gone for good (restarts spent): a new actor takes its place
            slots.append(slot)
    finally:
        if pool is not None:
            for actor in set(slots) | {slot for _, slot in in_flight.values()}:
                ray.kill(actor)
