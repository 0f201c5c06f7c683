"""Joining or starting Ray the same way in every stage: local by default, ``auto`` or ``ray://`` to join."""

from __future__ import annotations

import os
from typing import Any


def init_ray(address: str | None = None, *, num_cpus: int | None = None, **kwargs: Any) -> Any:
    """Connect to Ray (no-op when already connected).

    ``address=None`` starts a local Ray unless ``RAY_ADDRESS`` is set; ``"auto"`` joins the cluster this
    machine belongs to; ``"ray://host:10001"`` joins a remote one through Ray Client. The pluristeer
    packages travel to remote workers as ``py_modules`` when the address is remote.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True, **kwargs}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # The dashboard serves the State API (Ray Train's placement-group cleaner polls it) and Ray Jobs;
        # PLURISTEER_RAY_DASHBOARD=0 turns it off for a leaner local Ray.
        if os.environ.get("PLURISTEER_RAY_DASHBOARD", "1") == "0":
            options.setdefault("include_dashboard", False)
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
    if address and address.startswith("ray://"):
        import pipelines
        import sae
        import serve

        runtime_env = dict(options.pop("runtime_env", None) or {})
        runtime_env.setdefault("py_modules", [sae, pipelines, serve])
        options["runtime_env"] = runtime_env
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = "local"  # a Ray of our own, even where `ray start` left a cluster that ray.init() would join
    return ray.init(address=address, **options)
