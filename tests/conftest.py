"""Shared fixtures: one real local Ray for the session, generated sources, temp configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance for the whole session. Two CPUs on any machine, so that
    the fractional-CPU settings the code uses are exercised as on a 2-vCPU box."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a pipelines.yaml under tmp_path (storage there too) and return its path."""

    def write(datasets: dict | None = None, **sections) -> Path:
        raw = {"storage": {"root": str(tmp_path / "data")}, "datasets": datasets or {}, **sections}
        path = tmp_path / "pipelines.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write
