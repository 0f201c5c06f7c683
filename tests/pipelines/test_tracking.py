from __future__ import annotations

from pathlib import Path

import pytest
import wandb

from pipelines.tracking import Tracker, wandb_mode


def test_mode_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_offline_run_records_config_metrics_and_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    artifact = tmp_path / "vectors.safetensors"
    artifact.write_bytes(b"not really tensors")
    with Tracker("test", {"layer": 15, "model": "embedded"}, tmp_path, name="unit") as tracker:
        tracker.log({"loss": 1.5}, step=0)
        tracker.log({"loss": 0.5}, step=1)
        tracker.summary({"final_loss": 0.5})
        tracker.log_artifact(artifact, name="vectors", type="vector-set")
        run_dir = tracker.run_dir
    # finish() returns once the exit record is acknowledged; the transaction log's last block reaches the file when
    # the service closes the stream, which raced this read on a slow machine (a 7-byte header): teardown waits for it
    wandb.teardown()
    assert run_dir is not None and run_dir.parent == tmp_path / "wandb"
    (log,) = run_dir.glob("run-*.wandb")
    blob = log.read_bytes()
    for needle in (b"loss", b"final_loss", b"vector-set", b"embedded"):
        assert needle in blob


def test_disabled_mode_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with Tracker("test", {}, tmp_path / "runs") as tracker:
        tracker.log({"loss": 1.0})
        assert tracker.run_dir is None
    assert not (tmp_path / "runs").exists()
