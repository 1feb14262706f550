"""Ray start-up: an embedded local instance by default, or an existing cluster."""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import os

from shardkit.config import ClusterConfig

log = logging.getLogger(__name__)

# Workers inherit these: albumentations (pulled in by img2dataset) checks the network for
# updates at import, which hangs or warns on machines without internet.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
PROJECT_PACKAGES = ("shardkit", "synthetic", "curation", "captioning", "analysis", "training")


def _project_modules() -> list:
    modules = []
    for name in PROJECT_PACKAGES:
        if importlib.util.find_spec(name) is not None:
            modules.append(importlib.import_module(name))
    return modules


QUIETED_LOGGERS = {
    # Ray Train's placement-group cleaner asks the State API once a second whether the training
    # controller lives; without a dashboard (we start none) every ask fails and warns: hundreds
    # of lines a run, about a cleanup that only matters if the controller crashes
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}


def worker_setup() -> None:
    """Run in every Ray worker process as it starts (runtime_env's worker_process_setup_hook)."""
    import ray

    # Ray's State API (that cleaner uses it) finds its cluster by RAY_ADDRESS, else by looking
    # for Ray processes on this machine: where two Rays run (a test session beside a demo, two
    # users) it cannot choose, and the cleaner dies with a 30-line traceback. Its own cluster.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    for name, level in QUIETED_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def worker_env(cfg: ClusterConfig) -> dict[str, str]:
    """What every worker's environment gets: ours, cluster.env, and the driver's variables
    that cluster.forward_env names."""
    forwarded = {k: v for k, v in os.environ.items() if any(fnmatch.fnmatchcase(k, p) for p in cfg.forward_env)}
    return {**WORKER_ENV, **cfg.env, **forwarded}


def connect(cfg: ClusterConfig) -> None:
    """Make sure this process is connected to Ray; reuse a connection that already exists
    (the tests' session-wide instance, or a caller that connected first)."""
    import ray

    if ray.is_initialized():
        return
    for key, value in {**WORKER_ENV, **cfg.env}.items():
        os.environ.setdefault(key, value)
    runtime_env: dict = {"env_vars": worker_env(cfg), "worker_process_setup_hook": "shardkit.cluster.worker_setup"}
    address = cfg.resolved_address()
    if address is None:
        log.info("starting an embedded local Ray (%s CPUs)", cfg.num_cpus or os.cpu_count())
        # "local", not None: a bare ray.init() joins the cluster named in Ray's temp folder
        # (ray_current_cluster), which a cluster that died leaves behind
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory_mb * 2**20 if cfg.object_store_memory_mb else None,
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
        )
        return
    if cfg.ship_code:
        runtime_env["py_modules"] = _project_modules()
    log.info("joining the Ray cluster at %s", address)
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)


def total_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def require_gpus(cfg: ClusterConfig, key: str, each: float, setting: str, count: int = 1) -> None:
    """Workers that ask for GPUs a Ray will never have wait forever. Call when connected. An
    embedded Ray is all there is, so too few is an error (one line); a cluster may add GPU
    nodes (an autoscaler), so there it is a warning."""
    import ray

    from shardkit.runner import StageError

    if not each:
        return
    have = float(ray.cluster_resources().get("GPU", 0.0))
    if have >= each:
        return
    if cfg.resolved_address() is None:
        raise StageError(f"{key}.{setting}: {count} worker(s) asking for {each:g} GPU(s) each, and this machine has "
                         f"{have:g}; run it on a GPU machine or cluster (cluster.address), or set {key}.{setting}: 0 "
                         "to run on the CPU")
    log.warning("%s: workers ask for %g GPU(s) each and the cluster has %g now; waiting for GPU nodes to join",
                key, each, have)
