"""Joining or starting Ray the same way in every stage: local by default, ``auto`` or ``ray://`` to join."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

from common.config import ConfigError

_ADDRESS = re.compile(r"^(?P<scheme>ray://)?(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sae", "common", "pipelines", "serve", "pluristeer")  # shipped to remote workers as py_modules
ADDRESS_FORMS = "'auto', 'local', 'ray://host:10001' (Ray Client) or 'host:6379' (the head's GCS address)"


class RayAddressError(ConfigError):
    """A Ray address that is malformed or where no Ray cluster answers."""


def check_address(address: str | None, *, connect_timeout_s: float = 3.0) -> str | None:
    """Return ``address`` if it is ``None``, ``auto``, ``local``, ``ray://host:port`` or ``host:port`` and, for
    the last two, something listens on that port; raise :class:`RayAddressError` naming what to fix otherwise.

    ``ray.init`` on an address where nothing listens waits minutes before it fails; this fails in seconds.
    """
    if address is None or address in ("auto", "local"):
        return address
    match = _ADDRESS.match(address.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise RayAddressError(f"ray_address {address!r}: expected {ADDRESS_FORMS}")
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        with socket.create_connection((host, port), timeout=connect_timeout_s):
            pass
    except OSError as err:
        what = "Ray Client server" if match["scheme"] else "Ray head"
        raise RayAddressError(
            f"ray_address {address!r}: no {what} answers at {host}:{port} ({err.strerror or err}); start the "
            "cluster first (`ray start --head` serves the head on 6379 and Ray Client on 10001) and pass the "
            "address it printed, or 'auto' on a cluster node"
        ) from None
    return address.strip()


def init_ray(address: str | None = None, *, num_cpus: int | None = None, **kwargs: Any) -> Any:
    """Connect to Ray (no-op when already connected).

    ``address=None`` starts a local Ray unless ``RAY_ADDRESS`` is set; ``"auto"`` joins the cluster this
    machine belongs to; ``"ray://host:10001"`` joins a remote one through Ray Client; ``"host:6379"`` joins
    through the head's GCS address. The pluristeer packages travel to remote workers as ``py_modules`` when
    the address is remote. A malformed or unreachable address raises :class:`RayAddressError`.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = check_address(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True, **kwargs}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # The dashboard serves the State API (Ray Train's placement-group cleaner polls it) and Ray Jobs;
        # PLURISTEER_RAY_DASHBOARD=0 turns it off for a leaner local Ray (not for `train`: without the State API
        # Ray Train's cleaner takes the live run for dead and removes its placement group).
        if os.environ.get("PLURISTEER_RAY_DASHBOARD", "1") == "0":
            options.setdefault("include_dashboard", False)
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
    if address and address.startswith("ray://"):
        runtime_env = dict(options.pop("runtime_env", None) or {})
        runtime_env.setdefault("py_modules", [str(ROOT / name) for name in PACKAGES])
        options["runtime_env"] = runtime_env
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = "local"  # a Ray of our own, even where `ray start` left a cluster that ray.init() would join
    try:
        return ray.init(address=address, **options)
    except ConnectionError as err:  # 'auto' with no cluster on this machine
        raise RayAddressError(f"ray_address {address!r}: {err}") from None
