"""``init_ray``: a local run starts its own Ray and never joins one it happens to find on the machine."""

from __future__ import annotations

from typing import Any

import pytest

from common.raycluster import init_ray


@pytest.mark.fault
def test_a_local_run_never_joins_another_ray_on_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.init(address=None)`` joins the newest cluster in /tmp/ray/ray_current_cluster (another user's
    `ray start` or test cluster); init_ray asks for ``"local"`` instead, and honours RAY_ADDRESS / an address."""
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(None, num_cpus=2)
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] == 2
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    init_ray(None)
    assert calls[-1]["address"] is None  # ray.init reads RAY_ADDRESS itself
    init_ray("auto")
    assert calls[-1]["address"] == "auto"
