from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, get_args, get_type_hints

import pytest
from pydantic import Field

from common.config import (
    ActorPool,
    ComputeDtype,
    ConfigError,
    Count,
    NonNegInt,
    PathOrURI,
    Positive,
    RaySection,
    StageConfig,
    Tracking,
    check,
)


@dataclass
class DemoConfig(StageConfig):
    model: str = "embedded"
    layers: list[int] = field(default_factory=lambda: [15])
    batch_size: int = 32
    lr: float = 1e-3
    dtype: Literal["float32", "float16"] = "float32"
    out: Path = Path("runs/x")
    ray_address: str | None = None
    shuffle: bool = True

    def validate(self) -> None:
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("layers: [3, 9]\nlr: 1\nout: /tmp/o\n")
    cfg = DemoConfig.load(path, ["batch_size=8", "dtype=float16", "layers=4,8", "ray_address=auto"])
    assert cfg.layers == [4, 8] and cfg.lr == 1.0 and cfg.batch_size == 8 and cfg.dtype == "float16"
    assert cfg.out == Path("/tmp/o") and cfg.ray_address == "auto"
    assert DemoConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=eight"], "batch_size: expected an integer, got 'eight'"),
        (["batch_size=0"], "batch_size must be positive"),
        (["dtype=int8"], "dtype: must be one of 'float32' | 'float16'"),
        (["shuffle=3"], "shuffle: expected true or false"),
        (["layers=[1, x]"], r"layers\[1\]: expected an integer"),
        (["colour=red"], r"unknown field\(s\) \['colour'\]"),
        (["novalue"], "must look like field=value"),
    ],
)
def test_errors_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DemoConfig.load(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        DemoConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        DemoConfig.load(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        DemoConfig.load(tmp_path / "bad.yaml")


@dataclass
class PooledConfig(StageConfig, ActorPool, RaySection, Tracking):
    store: PathOrURI = Path("runs/store")
    layers: list[NonNegInt] = field(default_factory=list)
    topk: Annotated[int, Field(ge=0, description="0: dense")] = 0
    batch_size: Count = 8
    lr: Positive | None = None
    limits: dict[str, Count] = field(default_factory=dict)


def test_constraints_are_checked_by_field_with_their_hint() -> None:
    for override, message in [
        ("topk=-1", "PooledConfig: topk: must be >= 0, got -1 (0: dense)"),
        ("batch_size=0", "batch_size: must be >= 1, got 0"),
        ("lr=0", "lr: must be > 0, got 0"),
        ("lr=.nan", "lr: expected a finite number, got nan"),
        ("layers=[1, -2]", "layers[1]: must be >= 0, got -2"),
        ("limits={a: 0}", "limits.a: must be >= 1, got 0"),
        ("num_actors=0", "num_actors: must be >= 1, got 0"),
        ("torch_threads=-1", "torch_threads: must be >= 0, got -1 (0: the node's cores / actors per node)"),
        ("device=tpu", "device: must be one of 'auto' | 'cpu' | 'cuda', got 'tpu'"),
        ("store=7", "store: expected a path or a URI (s3://bucket/prefix), got 7"),
    ]:
        with pytest.raises(ConfigError) as err:
            PooledConfig.load(None, [override])
        assert message in str(err.value), (override, str(err.value))


def test_paths_uris_and_lists_from_the_command_line() -> None:
    cfg = PooledConfig.load(None, ["store=s3://bucket/a//b", "layers=3", "lr=1", "ray_address=auto"])
    assert cfg.store == "s3://bucket/a//b" and cfg.layers == [3] and cfg.lr == 1.0 and cfg.ray_address == "auto"
    assert PooledConfig.load(None, ["store=runs/x", "layers=4,8"]).store == Path("runs/x")
    assert PooledConfig.load(None, ["layers=4,8"]).layers == [4, 8]
    # the stage's own fields come first in what it writes, then its sections'
    assert list(cfg.to_dict())[:6] == ["store", "layers", "topk", "batch_size", "lr", "limits"]
    assert PooledConfig.from_dict(cfg.to_dict()) == cfg


def test_every_stage_shares_one_definition_of_each_section() -> None:
    from pipelines.collect import CollectConfig
    from pipelines.eval_config import EvalConfig
    from pipelines.explain import ExplainConfig
    from pipelines.train import TrainConfig
    from pipelines.vectors import VectorConfig
    from serve.config import ServeConfig

    stages = [CollectConfig, TrainConfig, VectorConfig, EvalConfig, ExplainConfig, ServeConfig]
    assert all(issubclass(s, RaySection) for s in stages)
    assert {s.__name__ for s in stages if issubclass(s, ActorPool)} == {"CollectConfig", "EvalConfig"}
    assert {s.__name__ for s in stages if issubclass(s, Tracking)} == {
        "CollectConfig", "TrainConfig", "VectorConfig", "EvalConfig"
    }  # fmt: skip
    for stage in stages:  # a stage with a section does not redeclare its fields
        own = vars(stage).get("__annotations__", {})
        for section in (s for s in (RaySection, ActorPool, Tracking) if issubclass(stage, s)):
            assert not set(own) & {f.name for f in dataclasses.fields(section)}, (stage.__name__, section.__name__)


def test_the_serve_decoding_modes_are_the_decoding_modules() -> None:
    from sae.decoding import DECODING_MODES
    from serve.config import ServeConfig

    assert get_args(get_type_hints(ServeConfig)["decoding_mode"]) == tuple(DECODING_MODES)


def test_dtype_names_are_the_models_and_aliases_read_as_them() -> None:
    from pipelines.collect import CollectConfig
    from sae.lm import DTYPES

    assert set(get_args(get_args(ComputeDtype)[0])) == {str(t).removeprefix("torch.") for t in DTYPES.values()}
    cfg = CollectConfig.load(None, ["dtype=bf16", "store_dtype=fp16"])
    assert (cfg.dtype, cfg.store_dtype) == ("bfloat16", "float16")


def test_values_keep_their_yaml_types() -> None:
    """No lax conversions: a quoted number is not an int or a float, 1 and "yes" are not booleans, True is not
    a number; only an integral float is an int (YAML's 1.0e6) and a number is a string (name: 2024)."""
    for override, message in [
        ('batch_size="32"', "batch_size: expected an integer, got '32'"),
        ("batch_size=true", "batch_size: expected an integer, got True"),
        ("shuffle=1", "shuffle: expected true or false, got 1"),
        ('shuffle="yes"', "shuffle: expected true or false, got 'yes'"),
        ('lr="0.1"', "lr: expected a number, got '0.1'"),
        ("lr=true", "lr: expected a number, got True"),
        ("model=true", "model: expected a string, got True"),
    ]:
        with pytest.raises(ConfigError) as err:
            DemoConfig.load(None, [override])
        assert message in str(err.value), (override, str(err.value))
    cfg = DemoConfig.load(None, ["batch_size=64.0", "model=2024", "lr=2"])
    assert (cfg.batch_size, cfg.model, cfg.lr) == (64, "2024", 2.0) and isinstance(cfg.batch_size, int)
