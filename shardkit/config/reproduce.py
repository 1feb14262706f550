"""`reproduce:`: the paper's claims in miniature (make reproduce)."""

from __future__ import annotations

from pydantic import Field, model_validator

from shardkit.config.base import Strict

# ---- make reproduce ------------------------------------------------------------------------


class CurveEvalConfig(Strict):
    """How each exported point of a learning curve is scored (analysis/alignment.py)."""
    prompts: int = Field(60, gt=0)
    """Held-out prompts per category: the same prompts at every point and in every arm."""
    seeds: int = Field(1, gt=0)
    steps: int = Field(20, gt=0)
    guidance_scale: float = Field(4.5, ge=1)
    suite_seed: int = 0


class ExperimentConfig(Strict):
    claim: str
    """The paper's claim, as the report states it; the first arm is the one it favours."""
    arms: dict[str, list[str]]
    """Label -> training stages run in that order, each starting from the one before
    (init_stage); the last one is text-conditioned and exports the curve's points
    (export_every). An arm's compute is the sum of its stages' images."""

    @model_validator(mode="after")
    def _two_arms(self) -> "ExperimentConfig":
        if len(self.arms) != 2 or any(not stages for stages in self.arms.values()):
            raise ValueError("an experiment compares exactly two arms, each of one or more stages")
        return self


class ReproduceConfig(Strict):
    eval: CurveEvalConfig = CurveEvalConfig()
    experiments: dict[str, ExperimentConfig] = {}
