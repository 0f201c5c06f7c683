from __future__ import annotations

import pytest

from cluster.validate import main


def test_main_checks_everything_in_the_repo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main() == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "ok  ray_config.yaml (1 checked)",
        "ok  cluster/k8s (7 checked)",
        "ok  cluster/Dockerfile* (2 checked)",
    ]
