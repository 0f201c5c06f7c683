from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from common.config import ConfigError, StageConfig, check


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
