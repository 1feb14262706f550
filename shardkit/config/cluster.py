"""`cluster:` and `storage:`: where Ray runs and where every stage writes."""

from __future__ import annotations

import os

from shardkit.config.base import Strict

# ---- cluster and storage -------------------------------------------------------------------


class ClusterConfig(Strict):
    address: str | None = None
    """None starts an embedded local Ray; `auto` or `ray://host:10001` joins a cluster.
    The RAY_ADDRESS environment variable overrides this."""
    num_cpus: float | None = None
    """CPUs of the embedded instance (default: all of this machine's)."""
    object_store_memory_mb: int | None = None
    ship_code: bool = False
    """Send this project's packages to the cluster's workers (runtime_env py_modules) instead
    of expecting them installed on every node."""
    env: dict[str, str] = {}
    """Environment variables set on every Ray worker (the job's runtime_env) and in this
    process where not already set: what workers need to reach storage, e.g.
    AWS_ENDPOINT_URL, AWS_DEFAULT_REGION. No secrets here: see forward_env."""
    forward_env: list[str] = ["AWS_*"]
    """Names (shell patterns) of this process's environment variables copied to every
    worker: credentials stay in the driver's environment, not in pipelines.yaml. Ray keeps a
    job's runtime_env in its cluster metadata, readable by whoever can read the cluster."""
    in_process: bool = False
    """Make shard stages (fetching, captions, features) one shard after another in this
    process, and train as one worker on this machine's GPU (or CPU), without Ray: for one
    GPU box without a Ray install, or a debugger. Curation's dedup and the noun job still
    start Ray."""

    def resolved_address(self) -> str | None:
        return os.environ.get("RAY_ADDRESS") or self.address


class StorageConfig(Strict):
    root: str = "./data"
    """A local folder or any URI fsspec/pyarrow understand (s3://bucket/prefix, gs://...)."""
