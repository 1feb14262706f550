"""The base of every config section: unknown keys are errors, values are frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config problem, already phrased as `file: key: problem`."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
