"""The model deployments (DESIGN §4): ``PerspectiveModel`` (one steered perspective, bound once per perspective),
``PerspectivePool`` (any perspective of the set on any replica: a hundred perspectives on a few replicas),
``BaseModel`` (unsteered) and ``FusedPlural`` (every perspective as rows of one batch on one model).

Each replica loads the model once, follows its vector set in the registry (a new version is picked up
between steps, no restart), and answers ``step`` calls with next-token logits — or runs a whole generation
(``decode``, streamed) — through a :class:`serve.engine.StepEngine` (per-session KV caches; a miss replays
the prefix; the pool and the fused deployment use :class:`serve.fused.FusedEngine`, a session's rows
sharing the blocks below the steering layer, where the model passes its check) fed by a
:class:`serve.batcher.ContinuousBatcher` (concurrent sessions' steps share a forward).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import numpy as np
import ray
import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from common.registry import RegistryClient, VectorWatch, parse_key
from sae import small_batch
from sae.lm import load_lm, resolve_device
from sae.model import SparseAutoencoder
from sae.vectorset import sae_fingerprint
from serve.batcher import ContinuousBatcher
from serve.config import BASE, FUSED, PERSPECTIVE, POOL, ReplicaConfig
from serve.engine import Row, RowOut, SessionCache, Steering, StepEngine, kv_layer_kinds
from serve.fused import FusedEngine, self_check
from serve.generation import GenParams, StepLogits, TokenEvent, plural_decode, sampler, sampler_state

log = logging.getLogger("ray.serve")


def session_key(session: str | None, perspective: str | None) -> str | None:
    """The cache key of one row of a session: ``"{session}/{perspective}"`` (``-`` for unsteered)."""
    return None if session is None else f"{session}/{perspective if perspective is not None else '-'}"


def replica_id() -> str | None:
    """This Serve replica's id, the last part of its actor's name (``SERVE_REPLICA::app#deployment#<id>``, in
    the ``serve`` namespace); ``None`` outside a replica."""
    try:
        return serve.get_replica_context().replica_tag
    except RayServeException:
        return None


def process_memory() -> int:
    """Resident memory of this process in bytes."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil ships with Ray
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class VectorSource:
    """The current vector set of a registry key and the SAE it needs: ``name`` / ``name@latest`` follow new
    versions (polled every ``poll_s``), ``name@N`` stays at N. The SAE is ``sae_dir`` if given, else the
    one the set records (reloaded when a new version records another)."""

    def __init__(self, cfg: ReplicaConfig, device: str) -> None:

        self.cfg = cfg
        self.device = device
        self.client = RegistryClient(cfg.registry_dir, address=cfg.ray_address)
        name, version = parse_key(cfg.vectors)
        self.pinned = version
        self.watch = None if version is not None else VectorWatch(self.client, name, interval_s=cfg.vector_poll_s)
        self._fixed = self.client.get(cfg.vectors) if version is not None else None
        self.sae: Any = None
        self._sae_fingerprint: str | None = None
        self._version: Any = None
        self._steering: Steering | None = None

    def current(self) -> Steering:
        if self.watch is not None:
            vs, version = self.watch.current(), self.watch.version
        else:
            vs, version = self._fixed, self.pinned
        if self._steering is None or version != self._version:
            self._load_sae(vs)
            self._version = version
            self._steering = Steering(
                vs, version, self.sae, self.cfg.coeff, self.cfg.steer_mode, self.cfg.keep_error,
                self.cfg.steer_decode, self.cfg.from_position,
            )  # fmt: skip
        return self._steering

    def _load_sae(self, vs: Any) -> None:

        if vs.meta.mode == "caa":
            self.sae = None
            return
        if self.sae is not None and self._sae_fingerprint == vs.meta.sae_fingerprint:
            return
        path = self.cfg.sae or vs.meta.sae_path
        if path is None:
            raise RuntimeError(f"{self.cfg.vectors}: the set records no SAE path; set `sae` in the serve config")
        self.sae = SparseAutoencoder.load(path, device=self.device)
        self._sae_fingerprint = sae_fingerprint(self.sae)


class ModelServer:
    """The body of every model deployment: model, engine, batcher. ``perspective`` fixes the steering of a
    ``PerspectiveModel``; ``pooled`` serves every perspective of the set (``PerspectivePool``, rows name
    their perspective); neither, with ``fused=False``, is the unsteered ``BaseModel``."""

    def __init__(
        self,
        cfg: dict[str, Any],
        perspective: str | None = None,
        *,
        fused: bool = False,
        pooled: bool = False,
        threads: int = 1,
    ):

        self.cfg = ReplicaConfig.from_dict(cfg)
        torch.set_num_threads(max(1, threads))
        self.perspective = perspective
        self.fused = fused
        self.pooled = pooled
        if fused or pooled:
            self.name = FUSED if fused else POOL
        else:
            self.name = BASE if perspective is None else f"{PERSPECTIVE}[{perspective}]"
        device = str(resolve_device(self.cfg.device))
        started = time.perf_counter()
        self.model, tokenizer = load_lm(self.cfg.model, dtype=self.cfg.dtype, device=device)
        self.matmul = small_batch.tune(self.model) if self.cfg.tune_matmul else None
        if self.matmul is not None and self.matmul.plain_ms:
            log.info("%s: small-batch matmul: %s", self.name, self.matmul.describe())
        steered = fused or pooled or perspective is not None
        self.source = VectorSource(self.cfg, device) if steered else None
        if self.source is not None:
            steering = self.source.current()
            if perspective is not None and perspective not in steering.vector_set.vectors:
                raise ValueError(
                    f"perspective {perspective!r} is not in {self.cfg.vectors} "
                    f"(it has {steering.vector_set.perspectives})"
                )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.engine = StepEngine(
            self.model,
            steering=self.source.current if self.source is not None else (lambda: None),
            cache=SessionCache(self.cfg.max_sessions, self.cfg.session_ttl_s),
            max_rows=self.cfg.max_batch_rows,
            max_tokens=self.cfg.max_batch_tokens,
            pad_id=pad,
        )
        if self.source is not None:
            self.engine.step([Row(None, [pad], perspective)])  # checks the set against model and SAE once
        self.kv_layers = kv_layer_kinds(self.model, pad)  # [] for plain full-attention caches
        unsliced = [kind for kind in self.kv_layers if kind != "DynamicSlidingWindowLayer"]
        if unsliced:
            log.warning(
                "%s: this model's KV cache has %s layers, which sessions cannot keep: every step replays the "
                "session's prefix (correct, but slower with every token)", self.name, ", ".join(unsliced)
            )  # fmt: skip
        elif self.kv_layers:
            log.warning(
                "%s: sliding-window attention (window %s): a session's KV cache is kept while it is shorter than "
                "the window; longer sessions replay their prefix at every step", self.name, self.engine.window
            )  # fmt: skip
        self.shared_trunk = False
        if fused or pooled:  # a session's rows share the blocks below the steering layer, if this model allows it
            problem = (
                f"its KV cache has {', '.join(self.kv_layers)} layers"
                if self.kv_layers
                else self_check(self.model, self.source.current, pad)  # type: ignore[union-attr]
            )
            if problem is None:
                self.shared_trunk = True
                self.engine = FusedEngine(  # type: ignore[assignment]
                    self.model,
                    steering=self.source.current,  # type: ignore[union-attr]
                    cache=self.engine.cache,
                    max_rows=self.cfg.max_batch_rows,
                    max_tokens=self.cfg.max_batch_tokens,
                    pad_id=pad,
                )
            else:
                log.warning("%s: rows run unshared (the shared-trunk check failed: %s)", self.name, problem)
        self.batcher: ContinuousBatcher[list[Row], list[RowOut]] = ContinuousBatcher(
            self._run, max_rows=self.cfg.max_batch_rows, size=len, gather_s=self.cfg.batch_gather_s
        )
        self.decodes = 0  # generations run here whole (``decode``)
        self.load_seconds = time.perf_counter() - started
        log.info("%s: model loaded on %s in %.1f s", self.name, device, self.load_seconds)

    def _run(self, items: list[list[Row]]) -> list[list[RowOut]]:
        flat = self.engine.step([row for item in items for row in item])
        out, start = [], 0
        for item in items:
            out.append(flat[start : start + len(item)])
            start += len(item)
        return out

    def _version(self) -> Any:
        return None if self.source is None else self.source._version

    async def step(self, ids: list[int], *, session: str | None = None) -> dict[str, Any]:
        """Next-token logits after ``ids`` for this replica's perspective (``PerspectiveModel``, ``BaseModel``)."""
        (out,) = await self.batcher.submit([Row(session_key(session, self.perspective), ids, self.perspective)])
        return {"logits": out.logits, "ran": out.ran, "hit": out.hit, "version": self._version()}

    async def step_rows(self, ids: list[int], perspectives: list[str | None], *, session: str | None = None):
        """``FusedPlural``, ``PerspectivePool``: next-token logits ``[rows, vocab]`` after ``ids`` for each of
        ``perspectives`` (one forward for the rows; the fused engine also shares their lower blocks)."""
        outs = await self._submit_rows(ids, perspectives, session)
        return {
            "logits": np.stack([o.logits for o in outs]),
            "ran": [o.ran for o in outs],
            "hit": [o.hit for o in outs],
            "version": self._version(),
        }

    async def _submit_rows(self, ids: list[int], perspectives: Sequence[str | None], session: str | None):
        """One step of a session's rows through the batcher (grouped, so the fused engine shares their trunk)."""
        group = session if session is not None else uuid.uuid4().hex
        return await self.batcher.submit([Row(session_key(session, p), ids, p, group) for p in perspectives])

    async def decode(
        self, params: GenParams, *, session: str, resumed: bool = False, state: bytes | None = None
    ) -> AsyncIterator[tuple[TokenEvent, bytes | None]]:
        """The whole generation on this replica (streamed, ``handle.options(stream=True)``): its token events,
        each with the sampler's state after it (``None`` when greedy) for a caller that resumes it elsewhere.

        The steps go through this replica's batcher as ``step`` calls do, so concurrent generations share its
        forwards with no round trip between steps. ``resumed``: the generation started elsewhere and goes on
        here (``params.ids`` ends with its tokens so far, ``state`` is its sampler's), so a first step that
        finds no KV cache counts as a replay. The session's caches are dropped when the stream ends, is
        cancelled or fails."""
        rows = self._rows(params)
        k = len(params.perspectives)
        g = sampler(params, state)
        sampled = params.temperature > 0
        self.decodes += 1

        async def step_fn(ids: list[int], first: bool) -> StepLogits:
            outs = await self._submit_rows(ids, rows, session)
            logits = torch.from_numpy(np.stack([o.logits for o in outs]))
            replays = 0 if first and not resumed else sum(not o.hit for o in outs)
            versions = dict.fromkeys(params.perspectives, self._version())
            info = {"replays": replays, "ran": sum(o.ran for o in outs), "versions": versions}
            return StepLogits(logits[:k] if k else None, logits[k] if params.needs_base else None, info)

        try:
            async with aclosing(plural_decode(step_fn, params, g)) as events:
                async for event in events:
                    yield event, sampler_state(g) if sampled else None
        finally:
            self._drop(session, rows)

    def _rows(self, params: GenParams) -> list[str | None]:
        """The rows a generation needs of this replica: its perspectives, then the unsteered row if needed."""
        rows: list[str | None] = [*params.perspectives, *([None] if params.needs_base else [])]
        if not (self.fused or self.pooled) and rows != [self.perspective]:
            have = "the unsteered row" if self.perspective is None else f"perspective {self.perspective!r}"
            raise ValueError(f"{self.name} serves {have} alone; asked for {params.perspectives} "
                             f"{'with' if params.needs_base else 'without'} the unsteered row")  # fmt: skip
        return rows

    async def release(self, session: str, perspectives: list[str] | None = None) -> int:
        """Drop a finished session's caches (best effort; the TTL drops what is never released); a pool is
        told the session's ``perspectives`` (default: every one of the set)."""
        return self._drop(session, self._perspectives() if perspectives is None else perspectives)

    def _drop(self, session: str, perspectives: Sequence[str | None]) -> int:
        keys = [session_key(session, p) for p in perspectives] + [f"{session}/#fused"]
        return sum(self.engine.cache.drop(k) for k in keys if k is not None)

    def _perspectives(self) -> list[str | None]:
        if not (self.fused or self.pooled):
            return [self.perspective]
        return [*self.source.current().vector_set.perspectives, None]  # type: ignore[union-attr]

    async def stats(self) -> dict[str, Any]:
        """Memory and counters of this replica (what the benchmark and ``/metrics`` report)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        sae = self.source.sae if self.source is not None else None
        return {
            "deployment": self.name,
            "perspectives": 0 if self.source is None else len(self.source.current().vector_set.vectors),
            "pid": os.getpid(),
            "replica": replica_id(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "rss_bytes": process_memory(),
            "param_bytes": params,
            "sae_bytes": 0 if sae is None else sum(t.numel() * t.element_size() for t in sae.parameters()),
            "sessions": self.engine.cache.sessions,
            "cached_rows": len(self.engine.cache),
            "cache_bytes": self.engine.cache.nbytes(),
            "load_seconds": self.load_seconds,
            "threads": torch.get_num_threads(),
            "shared_trunk": self.shared_trunk,
            "small_batch_matmul": self.matmul is not None and self.matmul.used,
            "kv_layers": self.kv_layers,
            "version": self._version(),
            "batches": self.batcher.batches,
            "batched_items": self.batcher.items,
            "batched_rows": self.batcher.rows,
            "gathered_s": self.batcher.gathered_s,
            "busy_s": self.batcher.busy_s,
            "decodes": self.decodes,
            **self.engine.counters,
        }


@serve.deployment(name=BASE)
class BaseModel(ModelServer):
    """The unsteered model."""

    def __init__(self, cfg: dict[str, Any], threads: int = 1) -> None:
        super().__init__(cfg, None, threads=threads)


@serve.deployment(name=PERSPECTIVE)
class PerspectiveModel(ModelServer):
    """One perspective, steered; bound once per perspective as ``PerspectiveModel-<slug>``."""

    def __init__(self, cfg: dict[str, Any], perspective: str, threads: int = 1) -> None:
        super().__init__(cfg, perspective, threads=threads)


@serve.deployment(name=POOL)
class PerspectivePool(ModelServer):
    """Any perspective of the set, on any replica: the model and SAE once per replica, every vector of the
    set beside them (a few KB each). Steps name their perspectives (``step_rows``, ``decode``); a session's
    rows share the blocks below the steering layer (as ``FusedPlural``'s do); the session router
    (:mod:`serve.routing`) keeps a session's steps on the replica holding its KV caches."""

    def __init__(self, cfg: dict[str, Any], threads: int = 1) -> None:
        super().__init__(cfg, None, pooled=True, threads=threads)


@serve.deployment(name=FUSED)
class FusedPlural(ModelServer):
    """All perspectives (and the unsteered row) as rows of one batch on one model."""

    def __init__(self, cfg: dict[str, Any], threads: int = 1) -> None:
        super().__init__(cfg, None, fused=True, threads=threads)


__all__ = [
    "BaseModel", "FusedPlural", "ModelServer", "PerspectiveModel", "PerspectivePool", "VectorSource", "process_memory",
    "replica_id",
]  # fmt: skip
