"""The Serve application: ``build_app`` (Serve's import path ``serve.app:build_app``) and ``run_serve`` (what
`pluristeer serve` runs).

``build_app(args)`` takes Serve's application args — ``config`` (a ServeConfig YAML) plus any ServeConfig
field as an override — so both of these work::

    serve run serve.app:build_app config=serve.yaml vectors=opinions-sae-fine
    serve deploy serve/serve_config.yaml        # applications[].args, as in cluster/k8s/rayservice.yaml

The graph: ``PluralAggregator`` (ingress) bound to one ``PerspectiveModel-<slug>`` per perspective of
``perspectives``, a ``PerspectivePool`` for those of ``pool`` and a ``BaseModel`` (``backend: replicas``),
and/or a ``FusedPlural`` (``backend: fused``; ``both`` deploys both).
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve

from common.config import ConfigError
from common.raycluster import init_ray
from common.registry import RegistryClient, RegistryError, parse_key
from serve.aggregator import PluralAggregator
from serve.auth import KeyRing
from serve.config import AGGREGATOR, ALL, BASE, FUSED, POOL, REPLICA_FIELDS, ServeConfig, perspective_deployment
from serve.replicas import BaseModel, FusedPlural, PerspectiveModel, PerspectivePool
from serve.routing import ROUTER_PATH


def config_from_args(args: dict[str, Any] | None) -> ServeConfig:
    """A ServeConfig from Serve application args: ``config`` (YAML path) + field overrides (strings from
    ``serve run ... key=value`` are parsed as YAML values)."""
    data = dict(args or {})
    path = data.pop("config", None)
    merged: dict[str, Any] = {}
    where = "serve app args"
    if path:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value")
        merged.update(loaded or {})
    for key, value in data.items():
        merged[key] = yaml.safe_load(value) if isinstance(value, str) and key not in ("vectors", "model") else value
    return ServeConfig.from_dict(merged, where=where)


def publish_vectors_file(cfg: ServeConfig) -> str | None:
    """Publish ``vectors_file`` as the next version of ``vectors`` unless it already is the latest; returns the
    key published (``None`` if nothing was)."""

    if cfg.vectors_file is None:
        return None
    name, version = parse_key(cfg.vectors)
    if version is not None:
        raise ConfigError("vectors: give a bare name (not name@N) together with vectors_file")
    client = RegistryClient(cfg.registry_dir, address=cfg.ray_address)
    data = Path(cfg.vectors_file).read_bytes()
    if client.latest(name) is not None:
        latest = Path(client.entry(name)["path"])
        if latest.is_file() and latest.read_bytes() == data:
            return None
    return client.publish(cfg.vectors_file, name)


def resolve_perspectives(cfg: ServeConfig) -> list[str]:
    """The perspectives with their own deployment: ``cfg.perspectives`` (checked against the set), else all
    of the set (none when ``pool`` is set)."""
    return resolve(cfg)[0]


def resolve(cfg: ServeConfig) -> tuple[list[str], list[str]]:
    """``(own, pooled)``: the perspectives with their own deployment and those the pool serves."""

    try:
        vs = RegistryClient(cfg.registry_dir, address=cfg.ray_address).get(cfg.vectors)
    except RegistryError as err:
        raise ConfigError(f"vectors: {err}") from None
    for field_name in ("perspectives", "pool"):
        missing = [p for p in getattr(cfg, field_name) if p != ALL and p not in vs.vectors]
        if missing:
            raise ConfigError(f"{field_name}: {missing} are not in {cfg.vectors} (it has {vs.perspectives})")
    own = list(cfg.perspectives or ([] if cfg.pool else vs.perspectives))
    pooled = [p for p in vs.perspectives if p not in own] if cfg.pool == [ALL] else list(cfg.pool)
    if cfg.pool and not pooled:  # the pool's deployment would not exist, and a Serve config naming it fails
        raise ConfigError(f"pool: ['*'] leaves the pool nothing: every perspective of {cfg.vectors} has its own "
                          "deployment (perspectives); drop pool or list fewer perspectives")  # fmt: skip
    if len(own) > cfg.max_perspectives:
        raise ConfigError(
            f"perspectives: {len(own)} with their own deployment, above max_perspectives={cfg.max_perspectives}: "
            "list the ones to deploy in `perspectives`, serve the rest from the pool (`pool: ['*']`) or raise "
            "max_perspectives"
        )
    return own, pooled


def deployment_names(cfg: ServeConfig, perspectives: list[str]) -> list[str]:
    """Every deployment the app has, ingress first (what a Serve config's ``deployments`` may name)."""
    names = [AGGREGATOR]
    if cfg.backend in ("replicas", "both"):
        names += [BASE, *(perspective_deployment(p) for p in perspectives), *([POOL] if cfg.pool else [])]
    if cfg.backend in ("fused", "both"):
        names.append(FUSED)
    return names


def _options(cfg: ServeConfig, name: str) -> dict[str, Any]:
    options = cfg.deployment_options(name)
    if name != AGGREGATOR:
        options.setdefault("logging_config", {"enable_access_log": False})  # a line per decoding step is too many
        if cfg.session_affinity:
            options["request_router_config"] = {"request_router_class": ROUTER_PATH}
    return options


def build(cfg: ServeConfig, perspectives: list[str] | None = None, pooled: list[str] | None = None) -> Any:
    """The bound application for ``cfg`` (``perspectives``, ``pooled``: default :func:`resolve`)."""

    if perspectives is None or (pooled is None and cfg.pool):
        publish_vectors_file(cfg)
        own, found = resolve(cfg)
        perspectives = own if perspectives is None else perspectives
        pooled = found if pooled is None else pooled
    pooled = list(pooled or [])
    spec = cfg.to_dict()
    spec["vectors_file"] = None  # published above: replicas read the registry
    if cfg.registry_dir is None:
        spec["registry_dir"] = str(RegistryClient(None, address=cfg.ray_address).root)
    replica = {k: spec[k] for k in REPLICA_FIELDS}  # the model replicas get their part only

    def bind(deployment: Any, name: str, *args: Any) -> Any:
        options = _options(cfg, name)
        return deployment.options(name=name, **options).bind(replica, *args, threads=cfg.threads_for(options))

    replicas: dict[str, Any] = {}
    base = fused = pool = None
    if cfg.backend in ("replicas", "both"):
        base = bind(BaseModel, BASE)
        replicas = {p: bind(PerspectiveModel, perspective_deployment(p), p) for p in perspectives}
        pool = bind(PerspectivePool, POOL) if pooled else None
    if cfg.backend in ("fused", "both"):
        fused = bind(FusedPlural, FUSED)
    return PluralAggregator.options(name=AGGREGATOR, **_options(cfg, AGGREGATOR)).bind(
        spec, perspectives, replicas, base, fused, pool, pooled
    )


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Serve's application builder (``import_path: serve.app:build_app``)."""
    return build(config_from_args(args))


def cpus_needed(cfg: ServeConfig, perspectives: list[str]) -> float:
    """Logical CPUs the minimum replica counts ask for."""
    total = 0.0
    for name in deployment_names(cfg, perspectives):
        options = cfg.deployment_options(name)
        count = options.get("num_replicas") or options.get("autoscaling_config", {}).get("initial_replicas")
        count = count or options.get("autoscaling_config", {}).get("min_replicas", 1) or 0
        total += float(options.get("ray_actor_options", {}).get("num_cpus", 1)) * int(count)
    return total


def run_serve(cfg: ServeConfig, *, block: bool = True, echo: Any = print) -> Any:
    """Start the app (a local Ray unless ``ray_address``), print its URL and, with ``block``, serve until
    Ctrl-C or SIGTERM, then shut it down (Serve and the local Ray; on a cluster only this app is deleted)."""

    KeyRing.from_env(cfg.api_keys_env, required=cfg.auth)  # fail here, not in a replica
    local = cfg.ray_address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
    if local:  # logical CPUs: the replicas' fractional CPUs may add up to more than a small machine has
        upto = cfg.perspectives or ([] if cfg.pool else [f"p{i}" for i in range(cfg.max_perspectives)])
        init_ray(None, num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed(cfg, upto))))
    else:
        init_ray(cfg.ray_address)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        started = time.perf_counter()
        handle = serve.run(build(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    except KeyboardInterrupt:  # Ctrl-C while starting: as clean as after
        echo("shutting down ...")
        _stop(cfg, local)
        echo("stopped")
        return None
    except BaseException:
        _stop(cfg, local)
        raise
    host = cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1"
    echo(
        f"pluristeer serving {cfg.vectors} ({cfg.backend}) at http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        f"/v1 in {time.perf_counter() - started:.0f} s; Ctrl-C stops it"
    )
    if not block:
        return handle

    def _interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        echo("shutting down ...")
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(cfg, local)
        echo("stopped")
    return None


def _stop(cfg: ServeConfig, local: bool) -> None:
    """Shut Serve and the local Ray down; on a cluster, delete only this app."""

    if local:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(cfg.app_name)


__all__ = [
    "build", "build_app", "config_from_args", "deployment_names", "resolve", "resolve_perspectives", "run_serve",
]  # fmt: skip
