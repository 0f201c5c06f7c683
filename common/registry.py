"""The vector registry (DESIGN §3): a detached, named Ray actor that owns the published vector sets.

The actor ``pluristeer-vectors`` (namespace ``pluristeer``) keeps, per ``name@version``, the durable file
``{root}/{name}/v{version}.safetensors`` (listed in ``{root}/index.json``, both written atomically) and an
object ref to the file's bytes that the actor itself ``ray.put`` — so the object outlives the driver that
published it (an object put by a driver dies with the driver). Versions count 1, 2, ... per name.

If the actor is lost, Ray restarts it (``max_restarts=-1``), or :class:`RegistryClient` recreates it on its
next call; either way it rebuilds its table from ``index.json`` and re-puts objects from the files on
demand. On a multi-node cluster ``root`` must be a location every node can read: a shared or network
filesystem, or an object-store URI (``s3://bucket/registry``, :mod:`sae.storage`). Replicas call
:meth:`RegistryClient.latest` (one small RPC) to notice a new version, or hold a :class:`VectorWatch`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray

from common.raycluster import init_ray
from sae import storage
from sae.lm import cache_dir
from sae.vectorset import VectorSet

REGISTRY_NAME = "pluristeer-vectors"
NAMESPACE = "pluristeer"
INDEX = "index.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(RuntimeError):
    """A registry key does not exist, is malformed, or the registry actor cannot be reached."""


def default_root() -> Path:
    """Where a new registry keeps its files: ``$PLURISTEER_CACHE/registry``."""
    return cache_dir() / "registry"


def parse_key(key: str) -> tuple[str, int | None]:
    """``"name"`` / ``"name@latest"`` -> ``(name, None)``; ``"name@3"`` -> ``(name, 3)``."""
    name, sep, version = key.partition("@")
    if not _NAME.match(name):
        raise RegistryError(f"bad vector-set name {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
    if not sep or version == "latest":
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise RegistryError(f"bad version in {key!r}: expected name@N with N >= 1, or name@latest")
    return name, int(version)


class VectorRegistry:
    """The actor's body (a plain class: it also works in-process, without Ray, for a single user)."""

    def __init__(self, root: str) -> None:
        self.root = root if storage.is_uri(root) else Path(root)
        storage.makedirs(self.root)
        self.entries: dict[str, dict[int, dict[str, Any]]] = {}
        self.refs: dict[tuple[str, int], Any] = {}
        index = storage.join(self.root, INDEX)
        if storage.is_file(index):
            for row in json.loads(storage.read_bytes(index)).get("entries", []):
                self.entries.setdefault(row["name"], {})[int(row["version"])] = row

    def root_dir(self) -> str:
        return str(self.root)

    def _save_index(self) -> None:
        rows = [e for versions in self.entries.values() for _, e in sorted(versions.items())]
        storage.write_json(storage.join(self.root, INDEX), {"entries": rows})

    def publish(self, name: str, data: bytes) -> dict[str, Any]:
        """Store ``data`` (a VectorSet file's bytes) as the next version of ``name``; returns its entry."""
        name, version = parse_key(name)
        if version is not None:
            raise RegistryError("publish takes a bare name; the registry assigns the version")
        vector_set = VectorSet.from_bytes(data, where=f"published {name!r}")
        version = max(self.entries.get(name, {}), default=0) + 1
        path = storage.join(self.root, name, f"v{version}.safetensors")
        storage.write_bytes(path, data)
        meta = asdict(vector_set.meta)
        meta.pop("extra", None)
        entry = {
            "name": name,
            "version": version,
            "key": f"{name}@{version}",
            "path": str(path),
            "bytes": len(data),
            "perspectives": vector_set.perspectives,
            "published": datetime.now(UTC).isoformat(timespec="seconds"),
            "meta": meta,
        }
        self.entries.setdefault(name, {})[version] = entry
        self._save_index()
        self.refs[(name, version)] = self._put(data)
        return entry

    @staticmethod
    def _put(data: bytes) -> Any:
        try:
            return ray.put(data) if ray.is_initialized() else data
        except ImportError:
            return data

    def _entry(self, key: str) -> dict[str, Any]:
        name, version = parse_key(key)
        versions = self.entries.get(name)
        if not versions:
            known = sorted(self.entries) or "none"
            raise RegistryError(f"no vector set named {name!r} in the registry at {self.root} (known: {known})")
        version = max(versions) if version is None else version
        if version not in versions:
            raise RegistryError(f"{name!r} has no version {version}; versions: {sorted(versions)}")
        return versions[version]

    def get(self, key: str) -> dict[str, Any]:
        """The entry of ``key`` (``name``, ``name@latest`` or ``name@N``) with ``ref``: an object ref to the
        file's bytes (re-put from the durable file after a restart)."""
        entry = self._entry(key)
        slot = (entry["name"], entry["version"])
        if slot not in self.refs:
            path = entry["path"]
            if not storage.is_file(path):
                raise RegistryError(f"{entry['key']}: its durable file {storage.display(path)} is gone")
            self.refs[slot] = self._put(storage.read_bytes(path))
        return {**entry, "ref": self.refs[slot]}

    def latest(self, name: str) -> int | None:
        """The newest version of ``name`` (``None`` if never published): the cheap call replicas poll."""
        versions = self.entries.get(parse_key(name)[0])
        return max(versions) if versions else None

    def list(self) -> list[dict[str, Any]]:
        return [
            {k: e[k] for k in ("key", "name", "version", "path", "bytes", "perspectives", "published")}
            | {"mode": e["meta"]["mode"], "granularity": e["meta"]["granularity"], "task": e["meta"]["task"]}
            for _, versions in sorted(self.entries.items())
            for _, e in sorted(versions.items())
        ]

    def loaded(self) -> int:
        """How many versions currently have an object in the object store (for tests and metrics)."""
        return len(self.refs)


def registry_actor(root: str | Path | None = None, *, address: str | None = None) -> Any:
    """The registry actor's handle: the running one, or a new detached one with ``root`` (default
    :func:`default_root`). Raises :class:`RegistryError` if it runs with a different ``root``."""

    init_ray(address)
    wanted = str(storage.absolute(root)) if root is not None else None
    actor_cls = ray.remote(VectorRegistry)
    handle = actor_cls.options(  # type: ignore[attr-defined]
        name=REGISTRY_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
    ).remote(wanted or str(default_root().resolve()))
    actual = ray.get(handle.root_dir.remote())
    if wanted is not None and actual != wanted:
        raise RegistryError(
            f"the registry actor {REGISTRY_NAME!r} already runs with root {actual}, not {wanted}: "
            "use that root (or leave registry_dir unset)"
        )
    return handle


class RegistryClient:
    """What drivers and replicas use: publish, get (as a :class:`VectorSet`), latest, list.

    A call that finds the actor dead (killed, or its node lost) recreates it from the durable index and
    retries once.
    """

    def __init__(self, root: str | Path | None = None, *, address: str | None = None) -> None:
        self.root = root
        self.address = address
        self.actor = registry_actor(root, address=address)
        self.root = ray_get(self.actor.root_dir.remote())

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return ray_get(getattr(self.actor, method).remote(*args))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            self.actor = registry_actor(self.root, address=self.address)
            return ray_get(getattr(self.actor, method).remote(*args))

    def publish(self, vector_set: VectorSet | str | Path, name: str) -> str:
        """Publish a set (or a VectorSet file) as the next version of ``name``; returns ``name@version``."""
        data = vector_set.to_bytes() if isinstance(vector_set, VectorSet) else storage.read_bytes(vector_set)
        return self._call("publish", name, data)["key"]

    def entry(self, key: str) -> dict[str, Any]:
        return self._call("get", key)

    def get(self, key: str) -> VectorSet:
        """The set for ``key`` (``name``, ``name@latest``, ``name@N``), fetched from the object store."""
        entry = self.entry(key)
        data = entry["ref"] if isinstance(entry["ref"], bytes) else ray_get(entry["ref"])
        return VectorSet.from_bytes(data, where=entry["key"])

    def latest(self, name: str) -> int | None:
        return self._call("latest", name)

    def list(self) -> list[dict[str, Any]]:
        return self._call("list")

    def watch(self, name: str, *, interval_s: float = 2.0) -> VectorWatch:
        return VectorWatch(self, name, interval_s=interval_s)


def ray_get(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:  # unwrap our own errors raised inside the actor
        cause = err.as_instanceof_cause()
        if isinstance(cause, RegistryError | ValueError):
            raise RegistryError(str(cause).splitlines()[-1]) from None
        raise


class VectorWatch:
    """The newest version of one name, refreshed when :meth:`current` finds (at most every ``interval_s``)
    that ``latest`` moved on: how a replica picks up a new version without a restart."""

    def __init__(self, client: RegistryClient, name: str, *, interval_s: float = 2.0) -> None:
        self.client = client
        self.name = parse_key(name)[0]
        self.interval_s = interval_s
        self.version: int | None = None
        self.vector_set: VectorSet | None = None
        self._checked = 0.0

    def current(self) -> VectorSet:
        now = time.monotonic()
        if self.vector_set is None or now - self._checked >= self.interval_s:
            self._checked = now
            latest = self.client.latest(self.name)
            if latest is None:
                raise RegistryError(f"nothing published under {self.name!r} yet")
            if latest != self.version:
                self.vector_set = self.client.get(f"{self.name}@{latest}")
                self.version = latest
        assert self.vector_set is not None
        return self.vector_set


__all__ = [
    "NAMESPACE",
    "REGISTRY_NAME",
    "RegistryClient",
    "RegistryError",
    "VectorRegistry",
    "VectorWatch",
    "default_root",
    "parse_key",
    "registry_actor",
]
