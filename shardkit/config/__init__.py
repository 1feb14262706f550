"""pipelines.yaml, loaded once into typed, validated objects.

Every section forbids unknown keys: a typo in a config must stop the job before it starts,
not run it with a default the user did not mean. Errors name the file, the dotted key and
the problem on one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, field_validator, model_validator

# One module per section of the file; everything is importable from here, as before the split.
from shardkit.config.analysis import AnalysisConfig, NounsConfig, ScorerConfig, TinyClipConfig
from shardkit.config.base import ConfigError, Strict
from shardkit.config.captioners import (
    ALT_TEXT_PROMPT, PAPER_PROMPT, CaptionBackendName, CaptionerConfig, CaptionQualityConfig, GenerationConfig,
    HfGenerateConfig, QualityFlag, TinyModelConfig, VllmConfig,
)
from shardkit.config.cluster import ClusterConfig, StorageConfig
from shardkit.config.datasets import (
    LAION_METADATA_COLUMNS, SOURCE_KINDS, SOURCES, DatasetConfig, FilterConfig, FolderSource, GenerateConfig,
    LaionSource, ResizeConfig, SamSource, SourceBase, SyntheticSource,
)
from shardkit.config.reproduce import CurveEvalConfig, ExperimentConfig, ReproduceConfig
from shardkit.config.training import (
    BucketsConfig, FeaturesConfig, LabelConfig, SelectCondition, StageConfig, TextEncoderConfig, TinyEncoderConfig,
    TrainingConfig, VaeConfig,
)

__all__ = [
    "ALT_TEXT_PROMPT", "LAION_METADATA_COLUMNS", "PAPER_PROMPT", "SOURCES", "SOURCE_KINDS", "AnalysisConfig",
    "BucketsConfig", "CaptionBackendName", "CaptionQualityConfig", "CaptionerConfig", "ClusterConfig", "ConfigError",
    "CurveEvalConfig", "DatasetConfig", "ExperimentConfig", "FeaturesConfig", "FilterConfig", "FolderSource",
    "GenerateConfig", "GenerationConfig", "HfGenerateConfig", "LabelConfig", "LaionSource", "NounsConfig",
    "PipelinesConfig", "QualityFlag", "ReproduceConfig", "ResizeConfig", "SamSource", "ScorerConfig",
    "SelectCondition", "SourceBase", "StageConfig", "StorageConfig", "Strict", "SyntheticSource",
    "TextEncoderConfig", "TinyClipConfig", "TinyEncoderConfig", "TinyModelConfig", "TrainingConfig", "VaeConfig",
    "VllmConfig", "apply_override", "load_config", "parse_config",
]

# ---- the whole file ------------------------------------------------------------------------


class PipelinesConfig(Strict):
    cluster: ClusterConfig = ClusterConfig()
    storage: StorageConfig = StorageConfig()
    datasets: dict[str, DatasetConfig] = {}
    captioners: dict[str, CaptionerConfig] = {}
    scorers: dict[str, ScorerConfig] = {}
    analysis: AnalysisConfig = AnalysisConfig()
    reproduce: ReproduceConfig = ReproduceConfig()
    training: TrainingConfig = TrainingConfig()

    @field_validator("datasets", "captioners", "scorers")
    @classmethod
    def _names_are_path_safe(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            # names become folder names and field suffixes (`<key>.<captioner>.txt`)
            if not name or name[0] in "._" or any(c in name for c in "/\\ \t"):
                raise ValueError(f"name {name!r} must not be empty, start with '.' or '_', or contain '/', '\\' or spaces")
        return value

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise ConfigError(
                f"datasets: no dataset {name!r}; defined: {', '.join(self.datasets) or 'none'}"
            )
        return self.datasets[name]

    @model_validator(mode="after")
    def _references_exist(self) -> "PipelinesConfig":
        t = self.training
        for name, f in t.features.items():
            for kind, ref, known in (("dataset", f.dataset, self.datasets), ("text_encoder", f.text_encoder, t.text_encoders),
                                     ("vae", f.vae, t.vaes)):
                if ref is not None and ref not in known:
                    raise ValueError(f"training.features.{name}.{kind}: no {kind} {ref!r}; defined: {', '.join(known) or 'none'}")
            if f.label is not None and f.label.classes == "folders" and (
                    f.label.field != "folder" or not isinstance(self.datasets.get(f.dataset), FolderSource)):
                raise ValueError(f"training.features.{name}.label: classes: folders needs field: folder and a "
                                 f"folder dataset; {f.dataset} is a {getattr(self.datasets.get(f.dataset), 'source', '?')} source")
            if f.caption not in (None, "txt") and f.caption not in self.captioners:
                raise ValueError(f"training.features.{name}.caption: {f.caption!r} is neither 'txt' nor a captioner")
            if f.scores is not None:
                if f.scores not in self.scorers:
                    raise ValueError(f"training.features.{name}.scores: no scorer {f.scores!r}; "
                                     f"defined: {', '.join(self.scorers) or 'none'}")
                wanted = "shards" if f.caption in (None, "txt") else f"captions/{f.caption}"
                if self.scorers[f.scores].input != wanted:
                    raise ValueError(f"training.features.{name}.scores: scorer {f.scores} reads "
                                     f"{self.scorers[f.scores].input}, but this feature set's captions come from {wanted}")
        for name, scorer in self.scorers.items():
            captioner = scorer.input.removeprefix("captions/")
            if scorer.input != "shards" and captioner not in self.captioners:
                raise ValueError(f"scorers.{name}.input: no captioner {captioner!r}; defined: {', '.join(self.captioners) or 'none'}")
        for name, stage in t.stages.items():
            if stage.features not in t.features:
                raise ValueError(f"training.stages.{name}.features: no feature set {stage.features!r}; "
                                 f"defined: {', '.join(t.features) or 'none'}")
            features = t.features[stage.features]
            if stage.conditioning == "class" and features.label is None:
                raise ValueError(f"training.stages.{name}: class conditioning needs a feature set with `label`; "
                                 f"{stage.features} has none")
            if stage.conditioning == "text" and features.caption is None:
                raise ValueError(f"training.stages.{name}: text conditioning needs a feature set with `caption`; "
                                 f"{stage.features} has none")
            if stage.init_stage is not None and stage.init_stage not in t.stages:
                raise ValueError(f"training.stages.{name}.init_stage: no stage {stage.init_stage!r}; "
                                 f"defined: {', '.join(t.stages)}")
            if stage.init_stage == name:
                raise ValueError(f"training.stages.{name}.init_stage: a stage cannot start from itself")
        for name, experiment in self.reproduce.experiments.items():
            for arm, stages in experiment.arms.items():
                where = f"reproduce.experiments.{name}.arms.{arm}"
                unknown = [s for s in stages if s not in t.stages]
                if unknown:
                    raise ValueError(f"{where}: no stage {unknown[0]!r}; defined: {', '.join(t.stages) or 'none'}")
                for before, after in zip(stages, stages[1:]):
                    if t.stages[after].init_stage != before:
                        raise ValueError(f"{where}: {after} must start from {before} (init_stage), so that the "
                                         "arm's compute is its stages' sum")
                last = t.stages[stages[-1]]
                if last.conditioning != "text" or not last.export_every:
                    raise ValueError(f"{where}: its last stage {stages[-1]} must be text-conditioned and set "
                                     "export_every (the curve's points)")
        return self

    def scorer(self, name: str) -> ScorerConfig:
        if name not in self.scorers:
            raise ConfigError(f"scorers: no scorer {name!r}; defined: {', '.join(self.scorers) or 'none'}")
        return self.scorers[name]

    def captioner(self, name: str) -> CaptionerConfig:
        if name not in self.captioners:
            raise ConfigError(
                f"captioners: no captioner {name!r}; defined: {', '.join(self.captioners) or 'none'}"
            )
        return self.captioners[name]


# ---- loading -------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `dotted.key=value` (value parsed as YAML) to the raw config dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key.path=value")
    path, value_text = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {path}: {'.'.join(keys[:depth + 1])} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(value_text)


def _substitute(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        for name, value in values.items():
            node = node.replace("${" + name + "}", value)
        return node
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    return node


def _describe_error(err: dict[str, Any]) -> str:
    parts = list(err["loc"])
    # pydantic puts the union member's tag in the path (datasets.sam.laion.url): drop it
    if len(parts) > 2 and parts[0] == "datasets" and parts[2] in SOURCE_KINDS:
        del parts[2]
    loc = ".".join(str(part) for part in parts)
    kind = err["type"]
    if kind == "union_tag_invalid":
        expected = err["ctx"]["expected_tags"].replace("'", "")
        return f"{loc}.source: unknown source {err['ctx']['tag']!r}; expected one of {expected}"
    if kind == "union_tag_not_found":
        return f"{loc}: missing 'source'; expected one of {', '.join(SOURCE_KINDS)}"
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: missing required key"
    message = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def parse_config(raw: Any, source_name: str = "pipelines.yaml", config_dir: str | None = None) -> PipelinesConfig:
    """`${storage}` stands for storage.root and `${config_dir}` for the config file's folder
    (absolute, so that workers running elsewhere find, e.g., the models shipped beside it)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source_name}: the top level must be a mapping")
    storage = raw.get("storage") or {}
    root = storage.get("root", StorageConfig().root) if isinstance(storage, dict) else "./data"
    if isinstance(root, str) and "://" not in root:
        # workers (Ray Train's above all) run in other folders: a relative root must not move
        root = os.path.abspath(root)
        if isinstance(storage, dict):
            raw = {**raw, "storage": {**storage, "root": root}}
    try:
        values = {"storage": str(root).rstrip("/"), "config_dir": os.path.abspath(config_dir or ".")}
        return PipelinesConfig.model_validate(_substitute(raw, values))
    except ValidationError as exc:
        # pydantic reports every union member's errors for a discriminated union; the first
        # error is the one that names the key, which is what a user needs to fix it
        first = _describe_error(exc.errors()[0])
        more = len(exc.errors()) - 1
        raise ConfigError(f"{source_name}: {first}" + (f" (and {more} more)" if more else "")) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelinesConfig:
    """Load pipelines.yaml (or CONFIG / the given path) with `key=value` overrides applied."""
    path = Path(path or os.environ.get("CONFIG") or "pipelines.yaml")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}{problem}") from None
    raw = raw if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides:
        try:
            apply_override(raw, assignment)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return parse_config(raw, source_name=str(path), config_dir=str(path.resolve().parent))
