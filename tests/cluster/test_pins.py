from __future__ import annotations

from pathlib import Path

import pytest

from cluster.pins import (
    ClusterConfigError,
    cli_commands,
    image_problems,
    json_path,
    pinned,
    project_pins,
    raise_problems,
)


def test_pins_come_from_pyproject_and_lock() -> None:
    pins = project_pins()
    assert (pins.version, pins.ray, pins.torch, pins.python) == ("0.1.0", "2.60.0", "2.13.0", "3.11")
    assert {"sae", "pipelines", "serve"} <= set(pins.packages)  # what `pip install .` installs
    name, target = pins.script
    assert name == "pluristeer" and target.endswith("cli:app")  # the console script and its Typer app
    commands = cli_commands(pins)
    assert {"collect", "train", "evaluate"} <= set(commands) and "--address" in commands["train"]


def test_pins_need_one_console_script(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nversion = "1"\nrequires-python = ">=3.11"\n')
    (tmp_path / "requirements.lock").write_text("ray==2.60.0\ntorch==2.13.0\n")
    with pytest.raises(ClusterConfigError, match=r"\[project.scripts\] must name one console script"):
        project_pins(tmp_path)


def test_pins_need_a_python_lower_bound(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nversion = "1"\nrequires-python = "<3.12"\n')
    (tmp_path / "requirements.lock").write_text("ray==2.60.0\ntorch==2.13.0\n")
    with pytest.raises(ClusterConfigError, match="requires-python"):
        project_pins(tmp_path)


def test_image_policy() -> None:
    pins = project_pins()
    assert image_problems("pluristeer/pluristeer:0.1.0-cuda", "x", pins) == []
    assert image_problems("123.dkr.ecr.us-west-2.amazonaws.com/pluristeer/pluristeer:0.1.0-cpu", "x", pins) == []
    assert "no tag" in image_problems("pluristeer/pluristeer", "x", pins)[0]
    assert "not the pluristeer image" in image_problems("rayproject/ray:2.60.0", "x", pins)[0]
    assert "must be one of" in image_problems("pluristeer/pluristeer:latest", "x", pins)[0]
    assert "must be one of" in image_problems("pluristeer/pluristeer:0.0.9-cpu", "x", pins)[0]


def test_pinned() -> None:
    assert pinned("fluent/fluent-bit:3.2.1") and pinned("a/b@sha256:" + "0" * 64)
    assert not pinned("fluent/fluent-bit") and not pinned("fluent/fluent-bit:latest") and not pinned("host:5000/b")


def test_json_path_and_raise() -> None:
    assert json_path(["spec", "workerGroupSpecs", 0, "template"]) == "spec.workerGroupSpecs[0].template"
    assert json_path([]) == "(top level)"
    raise_problems([])
    with pytest.raises(ClusterConfigError, match="a\nb"):
        raise_problems(["a", "b"])
