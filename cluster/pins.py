"""What every cluster check shares: the version pins, the image policy, error reporting."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
IMAGE_REPO = "pluristeer/pluristeer"
GPU_RESOURCE = "nvidia.com/gpu"


class ClusterConfigError(ValueError):
    """A cluster config, manifest or Dockerfile breaks a rule; the message lists every problem."""


@dataclass(frozen=True)
class Pins:
    """The versions everything must agree on: package, Ray, torch, Python."""

    version: str
    ray: str
    torch: str
    python: str


def project_pins(repo: Path = REPO) -> Pins:
    """Read the pins from ``pyproject.toml`` and ``requirements.lock``."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    lock = {}
    for line in (repo / "requirements.lock").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            lock[name.lower()] = version
    python = re.search(r">=\s*(\d+\.\d+)", project["requires-python"])
    if python is None:
        raise ClusterConfigError(f"pyproject.toml: requires-python {project['requires-python']!r} has no lower bound")
    return Pins(version=project["version"], ray=lock["ray"], torch=lock["torch"], python=python.group(1))


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ClusterConfigError("\n".join(problems))


def json_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


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
