"""What every cluster check shares: the version pins, the image policy, the external tools, error reporting."""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
import yaml

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
IMAGE_REPO = "pluristeer/pluristeer"
GPU_RESOURCE = "nvidia.com/gpu"


class ClusterConfigError(ValueError):
    """A cluster config, manifest or Dockerfile breaks a rule; the message lists every problem."""


@dataclass(frozen=True)
class Pins:
    """What everything must agree on: package version, Ray, torch, Python, the packages ``pip install .``
    installs, and the console script (its name and the ``module:attribute`` of its Typer app)."""

    version: str
    ray: str
    torch: str
    python: str
    packages: tuple[str, ...]  # from [tool.setuptools.packages.find] include
    script: tuple[str, str]  # the one entry of [project.scripts]


def project_pins(repo: Path = REPO) -> Pins:
    """Read the pins from ``pyproject.toml`` and ``requirements.lock``."""
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    project = pyproject["project"]
    lock = {}
    for line in (repo / "requirements.lock").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            lock[name.lower()] = version
    python = re.search(r">=\s*(\d+\.\d+)", project["requires-python"])
    if python is None:
        raise ClusterConfigError(f"pyproject.toml: requires-python {project['requires-python']!r} has no lower bound")
    find = pyproject.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    packages = tuple(p.rstrip("*") for p in find.get("include", []) if "." not in p.rstrip("*"))
    scripts = list(project.get("scripts", {}).items())
    if len(scripts) != 1:
        raise ClusterConfigError(f"pyproject.toml: [project.scripts] must name one console script, got {scripts}")
    return Pins(project["version"], lock["ray"], lock["torch"], python.group(1), packages, scripts[0])


def cli_commands(pins: Pins) -> dict[str, set[str]]:
    """The commands of the console script's Typer app and the options each one takes."""
    module, _, attribute = pins.script[1].partition(":")
    group = typer.main.get_command(getattr(importlib.import_module(module), attribute))
    commands = getattr(group, "commands", {})
    return {name: {opt for p in cmd.params for opt in p.opts} for name, cmd in commands.items()}


def tool(name: str, package: str) -> str:
    """The path of the command-line tool ``name`` (the venv's first), or an error saying what to install."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ClusterConfigError(f"{name} not found: pip install {package} (a dev dependency in pyproject.toml)")
    return found


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ClusterConfigError("\n".join(problems))


def json_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def pinned(image: str) -> bool:
    """Tagged with something other than ``latest`` (or pinned by digest)."""
    return "@sha256:" in image or (":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"))


def image_problems(image: Any, where: str, pins: Pins, variants: tuple[str, ...] = ("cpu", "cuda")) -> list[str]:
    """Our image, tagged ``<package version>-<variant>`` (a registry prefix is allowed)."""
    if not isinstance(image, str) or ":" not in image.rsplit("/", 1)[-1]:
        return [f"{where}: image {image!r} has no tag; use {IMAGE_REPO}:{pins.version}-<variant>"]
    name, tag = image.rsplit(":", 1)
    if not (name == IMAGE_REPO or name.endswith("/" + IMAGE_REPO)):
        return [f"{where}: image {image!r} is not the pluristeer image ({IMAGE_REPO})"]
    allowed = [f"{pins.version}-{v}" for v in variants]
    if tag not in allowed:
        return [f"{where}: image tag {tag!r} must be one of {allowed} (pyproject version {pins.version})"]
    return []


def load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ClusterConfigError(f"{path}: not valid YAML: {err}") from None
