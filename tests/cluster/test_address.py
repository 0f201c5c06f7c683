"""``--address`` on every CLI stage: it lands in the stage config's ``ray_address``; a malformed or unreachable
address is a one-line error in seconds (``ray.init`` itself waits minutes on an address where nothing listens)."""

from __future__ import annotations

import re
import socket
import time
from typing import Any

import pytest
from typer.testing import CliRunner

from common.raycluster import RayAddressError, check_address, init_ray
from pluristeer.cli import _overrides, app

STAGES = ("collect", "train", "vectors", "evaluate", "serve")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _configs() -> dict[str, tuple[Any, dict[str, Any]]]:
    from pipelines.collect import CollectConfig
    from pipelines.evaluate import EvalConfig
    from pipelines.train import TrainConfig
    from pipelines.vectors import VectorConfig
    from serve.config import ServeConfig

    return {
        "collect": (CollectConfig, {}),
        "train": (TrainConfig, {}),
        "vectors": (VectorConfig, {"mode": "caa"}),
        "evaluate": (EvalConfig, {}),
        "serve": (ServeConfig, {"vectors": "v"}),
    }


@pytest.mark.parametrize("address", ["auto", "ray://head.example:10001", "10.0.0.7:6379", "1:20"])
def test_every_stage_config_gets_the_address(address: str) -> None:
    for stage, (cls, required) in _configs().items():
        overrides = [f"{k}={v}" for k, v in required.items()]
        cfg = cls.load(None, _overrides(overrides, address))
        assert cfg.ray_address == address, stage  # "1:20" stays a string (YAML 1.1 would read 80)
        assert cls.load(None, _overrides(overrides, None)).ray_address is None


def test_address_forms() -> None:
    assert check_address(None) is None and check_address("auto") == "auto" and check_address("local") == "local"
    for bad in ("http://head:8265", "head", "ray://head", "head:99999", "a b:1", ""):
        with pytest.raises(RayAddressError, match="expected 'auto'"):
            check_address(bad)
    port = _closed_port()
    started = time.perf_counter()
    with pytest.raises(RayAddressError, match=f"no Ray head answers at 127.0.0.1:{port}"):
        init_ray(f"127.0.0.1:{port}")
    with pytest.raises(RayAddressError, match="no Ray Client server answers"):
        check_address(f"ray://127.0.0.1:{port}")
    assert time.perf_counter() - started < 30  # not ray.init's minutes of retries
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        listening = f"127.0.0.1:{server.getsockname()[1]}"
        assert check_address(listening) == listening and check_address(f"ray://{listening}") == f"ray://{listening}"


@pytest.mark.parametrize("stage", [*STAGES, "explain"])
def test_a_bad_address_is_a_clear_cli_error(stage: str) -> None:
    runner = CliRunner()
    args = [stage, "some-vectors"] if stage == "explain" else [stage]
    for address, message in (("http://head:8265", "expected 'auto'"), (f"127.0.0.1:{_closed_port()}", "no Ray head")):
        result = runner.invoke(app, [*args, "--address", address])
        assert result.exit_code == 2, (stage, result.output)
        text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # Rich boxes and wraps the message
        assert message in text and "Invalid value for '--address'" in text, text
        assert isinstance(result.exception, SystemExit) and "Traceback" not in text


def test_a_bad_ray_address_from_set_is_a_clear_error_too(tiny_store, tmp_path) -> None:
    result = CliRunner().invoke(
        app, ["train", "--set", f"store={tiny_store}", "--set", f"out={tmp_path}", "--set", "ray_address=head"]
    )
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "ray_address 'head': expected 'auto'" in " ".join(result.output.split())
