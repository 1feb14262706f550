import subprocess
import sys

import pytest

from shardkit.config import (
    PAPER_PROMPT, ConfigError, LaionSource, SamSource, SyntheticSource, load_config, parse_config,
)
from tests.conftest import REPO


def test_repository_config_loads_with_every_section():
    config = load_config(REPO / "pipelines.yaml")
    assert isinstance(config.datasets["sample-laion"], LaionSource)
    assert isinstance(config.datasets["sample-sam"], SamSource)
    assert isinstance(config.datasets["sample-synthetic"], SyntheticSource)
    assert config.cluster.address is None
    # ${config_dir} is the config file's folder: the shipped captioner is found from any worker
    assert config.captioner("synthetic-captioner").model == str(REPO / "captioning" / "models" / "synthetic-captioner")
    llava = config.captioner("llava-1.5-7b")
    assert llava.model == "llava-hf/llava-1.5-7b-hf" and llava.prompt == PAPER_PROMPT
    # ${storage} is substituted in source paths
    root = config.storage.root
    assert root.startswith("/")  # a relative root is made absolute: workers run elsewhere
    assert config.datasets["sample-laion"].parquet == [f"{root}/sources/sample-laion/sample-laion.parquet"]


@pytest.mark.parametrize("raw, message", [
    ({"datasets": {"sam": {"source": "sma"}}},
     "pipelines.yaml: datasets.sam.source: unknown source 'sma'; expected one of laion, sam, folder, synthetic"),
    ({"datasets": {"sam": {"source": "sam", "links": "x", "linkz": "y"}}},
     "pipelines.yaml: datasets.sam.linkz: unknown key"),
    ({"datasets": {"s": {"source": "synthetic", "count": "many"}}},
     "pipelines.yaml: datasets.s.count: Input should be a valid integer, unable to parse string as an integer"),
    ({"datasets": {"s": {"count": 3}}},
     "pipelines.yaml: datasets.s: missing 'source'; expected one of laion, sam, folder, synthetic"),
    ({"clustr": {}}, "pipelines.yaml: clustr: unknown key"),
    ({"captioners": {"c": {"prompt": "hi"}}}, "pipelines.yaml: captioners.c.model: missing required key"),
    ({"datasets": {"s": {"source": "sam"}}}, "pipelines.yaml: datasets.s: give exactly one of 'links' or 'tars'"),
    ({"datasets": {"a/b": {"source": "synthetic"}}},
     "pipelines.yaml: datasets: name 'a/b' must not be empty, start with '.' or '_', or contain '/', '\\' or spaces"),
])
def test_errors_name_the_file_the_key_and_the_problem(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value) == message


def test_missing_dataset_is_named(write_config):
    config = load_config(write_config({"a": {"source": "synthetic"}}))
    with pytest.raises(ConfigError, match=r"datasets: no dataset 'b'; defined: a"):
        config.dataset("b")


def test_duplicate_keys_and_yaml_syntax_are_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("storage:\n  root: a\nstorage:\n  root: b\n")
    with pytest.raises(ConfigError, match=r"p.yaml: line 3: .*duplicate key 'storage'"):
        load_config(path)
    path.write_text("datasets: [\n")
    with pytest.raises(ConfigError, match=r"p.yaml: line \d+"):
        load_config(path)


def test_overrides_are_typed_and_validated(write_config):
    path = write_config({"s": {"source": "synthetic", "count": 10}})
    config = load_config(path, ["datasets.s.count=25", "cluster.address=auto", "datasets.s.filters.min_side=32"])
    assert config.datasets["s"].count == 25
    assert config.datasets["s"].filters.min_side == 32
    assert config.cluster.address == "auto"
    with pytest.raises(ConfigError, match=r"datasets.s.cont: unknown key"):
        load_config(path, ["datasets.s.cont=3"])
    with pytest.raises(ConfigError, match=r"datasets.s.count is not a section"):
        load_config(path, ["datasets.s.count.x=3"])


def test_config_env_var_and_ray_address_env(write_config, monkeypatch):
    path = write_config({}, cluster={"address": None})
    monkeypatch.setenv("CONFIG", str(path))
    config = load_config()
    assert config.storage.root.endswith("data")
    assert config.cluster.resolved_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert config.cluster.resolved_address() == "ray://head:10001"


def test_broken_config_stops_the_cli_with_one_line(write_config):
    path = write_config({"sam": {"source": "sma"}})
    result = subprocess.run([sys.executable, "-m", "shardkit", "config", "--config", str(path)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: datasets.sam.source: unknown source 'sma'; expected one of laion, sam, folder, synthetic"
    ]
    assert result.stdout == ""
