from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

STAGES = ("collect", "train", "vectors", "evaluate", "serve", "demo")


def _cli() -> list[str]:
    exe = shutil.which("pluristeer") or str(Path(sys.executable).parent / "pluristeer")
    assert Path(exe).exists(), "the pluristeer console script is not installed (pip install -e .)"
    return [exe]


def test_help_lists_the_stages() -> None:
    out = subprocess.run([*_cli(), "--help"], capture_output=True, text=True, check=True).stdout
    for stage in STAGES:
        assert stage in out


def test_data_command_prints_counts(data_root: Path) -> None:
    env = {**os.environ, "PLURISTEER_DATA": str(data_root), "COLUMNS": "200"}
    out = subprocess.run([*_cli(), "data"], capture_output=True, text=True, check=True, env=env).stdout
    assert "globalopinionqa" in out and "5552" in out and "1185" in out


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PLURISTEER_DATA"}
    proc = subprocess.run(
        [*_cli(), "data", "--data-dir", str(tmp_path / "nope")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unreachable_object_store_is_a_one_line_error_naming_the_uri() -> None:
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x"}
    env["AWS_SECRET_ACCESS_KEY"] = "y"
    started = time.monotonic()
    proc = subprocess.run(
        [*_cli(), "train", "--set", "store=s3://bucket/store", "--set", "out=s3://bucket/train"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "s3://bucket/store/manifest.json" in proc.stderr and "AWS_ENDPOINT_URL" in proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - started < 30
