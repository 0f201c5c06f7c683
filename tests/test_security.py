"""Security checks of the source (docs/reliability.md §Security): only safetensors/JSON/Parquet/YAML (safe) are
loaded from disk, keys are kept as digests only, and the API binds to loopback unless configured otherwise."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.security

PACKAGES = ("sae", "pipelines", "serve")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve", "jsonpickle"}


def _sources() -> list[Path]:
    files = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
    assert len(files) > 30, files  # the scan really saw the packages
    return files


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def unsafe_loads(path: Path) -> list[str]:
    """Every place in ``path`` that could unpickle or execute data: pickle-family imports, ``torch.load``
    without ``weights_only=True``, ``np.load(allow_pickle=True)``, ``yaml.load``/``unsafe_load`` and the
    builtins ``eval``/``exec``."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.load") or name == "torch.serialization.load":
                if not _is_true(_keyword(node, "weights_only")):
                    found.append(f"{where} torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                allow = _keyword(node, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{where} np.load with allow_pickle")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                found.append(f"{where} {name} (use yaml.safe_load)")
            elif name in ("eval", "exec", "compile", "__import__"):
                found.append(f"{where} {name}(...)")
    return found


def test_the_scanner_finds_each_unsafe_pattern(tmp_path: Path) -> None:
    """The scanner itself: every pattern it looks for is reported, safe calls are not."""
    bad = REPO / "tests" / f"_unsafe_probe_{tmp_path.name}.py"  # inside REPO: paths are reported relative to it
    bad.write_text(
        "import pickle\nfrom cloudpickle import loads\nimport numpy as np, torch, yaml\n"
        "torch.load('a')\ntorch.load('a', weights_only=False)\nnp.load('a', allow_pickle=True)\n"
        "yaml.load(open('a'))\neval('1')\n"
        "torch.load('a', weights_only=True)\nnp.load('a')\nyaml.safe_load('a')\nmodel.eval()\n"
    )
    try:
        found = unsafe_loads(bad)
    finally:
        bad.unlink()
    lines = sorted(int(f.split(":")[1].split()[0]) for f in found)
    assert lines == [1, 2, 4, 5, 6, 7, 8], found


def test_no_source_file_can_unpickle_or_eval_data() -> None:
    found = [hit for path in _sources() for hit in unsafe_loads(path)]
    assert not found, "unsafe loading in the packages:\n" + "\n".join(found)


def test_keyring_keeps_only_digests() -> None:
    from serve.auth import KeyRing

    key = "sk-secret-0123456789"
    ring = KeyRing([key, ""])
    assert len(ring) == 1 and ring.allows(f"Bearer {key}") and ring.allows(f"bearer  {key} ")
    assert not ring.allows(key) and not ring.allows("Bearer ") and not ring.allows(None)
    assert not ring.allows(f"Basic {key}") and not ring.allows(f"Bearer {key}x")
    held = repr(ring) + repr(vars(ring))
    assert key not in held and key.encode() not in b"".join(ring._digests)


def test_the_api_binds_to_loopback_unless_configured() -> None:
    from serve.config import ServeConfig

    assert ServeConfig.from_dict({"vectors": "x"}).host == "127.0.0.1"
    local = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    assert local["http_options"]["host"] == "127.0.0.1"
    # run_serve hands cfg.host to Serve's proxy (the real bind is checked in tests/serve/test_cli.py)
    tree = ast.parse((REPO / "serve" / "app.py").read_text())
    starts = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _dotted(n.func) == "serve.start"]
    assert starts and all("cfg.host" in ast.unparse(n) for n in starts)
