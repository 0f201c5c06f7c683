"""The fan-out client: the aggregator's calls to the model deployments, apart from HTTP.

:class:`Fanout` holds the deployment handles — one per perspective with its own deployment, the shared
``PerspectivePool`` for the pooled ones, plus ``BaseModel`` (``replicas`` backend) and/or ``FusedPlural``
(``fused``) — and runs one generation:

- a request that one deployment answers alone — unsteered (``BaseModel``), one perspective without the
  unsteered row (its ``PerspectiveModel``), pooled perspectives only (``PerspectivePool``, the unsteered row
  included) or the fused backend — runs whole on one of its replicas (``ModelServer.decode``, with
  ``decode_on_replica``), its tokens streamed back: the replica's batcher gets each session's next step
  as soon as the last forward ends, with no round trip, so concurrent sessions keep sharing its forwards. A
  stream whose replica died or went silent goes on from its last token on the next replica, with the
  sampler's state, so the tokens are those an unbroken run draws;
- any other request (PD over perspectives on their own deployments) runs step by step here. Every step fans
  out to the K perspectives' deployments (and ``BaseModel`` where the mode needs the unsteered logits)
  concurrently — the pooled perspectives among the K as one ``step_rows`` call to the pool, their rows one
  forward on one replica (or, without ``decode_on_replica``, one ``step_rows`` call to ``FusedPlural``);
- each call (and each stream) carries the session id, so the replica keeps the session's KV cache and
  Serve's router sends the session's next step back to it (:mod:`serve.routing`);
- a call whose replica died (``RayActorError``, ``ActorUnavailableError``) or that got no answer within
  ``step_timeout_s`` is retried, with backoff, until the request's deadline (then :class:`ApiError` 504);
  the replica that answers replays the prefix, counted as a replay. A call that raised in the replica is a
  502 naming the deployment;
- when the generation ends (finished, failed or abandoned by the client) the session is released on every
  deployment it used, best effort (the replicas' TTL drops what a lost release leaves); a replica that ran
  the generation whole drops it itself when its stream ends or is cancelled.

A handle is anything with Serve's ``DeploymentHandle`` surface used here: ``handle.<method>.remote(...)``
returning an awaitable response with ``cancel()``, and ``handle.options(stream=True).decode.remote(...)``
returning an async iterator with ``cancel()``; tests drive the client with Serve handles or with plain
objects of that shape, no HTTP involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

import numpy as np
import ray
import torch

from serve.config import BASE, FUSED, POOL, perspective_deployment
from serve.errors import ApiError
from serve.generation import Generated, GenParams, StepLogits, TextStream, TokenEvent, plural_decode
from serve.metrics import Metrics

log = logging.getLogger("ray.serve")
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


async def _wait(response: Any) -> Any:
    return await response


async def _next(stream: Any) -> Any:
    return await stream.__anext__()


async def _quiet(response: Any) -> None:
    with contextlib.suppress(Exception):  # releasing is best effort: the TTL drops what is left
        await response


class Fanout:
    """Calls to the model deployments for one aggregator replica (see the module docstring).

    ``replicas`` maps perspective -> its ``PerspectiveModel`` handle; ``pool`` is the ``PerspectivePool``
    handle serving the perspectives in ``pooled``; ``base`` / ``fused`` may be ``None`` when that backend is
    not deployed. ``metrics`` receives per-deployment calls, latency, tokens, replays.
    """

    def __init__(
        self,
        replicas: dict[str, Any],
        base: Any = None,
        fused: Any = None,
        *,
        pool: Any = None,
        pooled: Sequence[str] = (),
        step_timeout_s: float,
        request_timeout_s: float,
        metrics: Metrics | None = None,
        decode_on_replica: bool = False,
    ) -> None:
        self.replicas = dict(replicas)
        self.base, self.fused = base, fused
        self.pool, self.pooled = pool, frozenset(pooled)
        if self.pooled and pool is None:
            raise ValueError("pooled perspectives need the pool's handle")
        both = sorted(self.pooled & set(self.replicas))
        if both:
            raise ValueError(f"perspectives {both} are both pooled and deployed on their own")
        self.step_timeout_s, self.request_timeout_s = step_timeout_s, request_timeout_s
        self.metrics = metrics if metrics is not None else Metrics()
        self.decode_on_replica = decode_on_replica
        self._tasks: set[asyncio.Task] = set()

    @property
    def backends(self) -> list[str]:
        return [b for b, ok in (("replicas", self.base is not None), ("fused", self.fused is not None)) if ok]

    def deadline(self) -> float:
        """The monotonic time a request started now must finish by."""
        return time.monotonic() + self.request_timeout_s

    # -- one call ---------------------------------------------------------------------------------------------
    async def call(self, handle: Any, method: str, name: str, deadline: float, *args: Any, **kwargs: Any) -> Any:
        """``handle.method.remote(*args, **kwargs)``, retried while its replica is lost (until ``deadline``)."""
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(504, f"timed out waiting for {name}", kind="timeout_error")
            started = time.perf_counter()
            response = getattr(handle, method).remote(*args, **kwargs)
            try:
                result = await asyncio.wait_for(_wait(response), min(self.step_timeout_s, left))
            except RETRYABLE as err:
                outcome, why = "retry", type(err).__name__
            except TimeoutError:
                response.cancel()
                outcome, why = "timeout", "no answer"
            except ray.exceptions.RayTaskError as err:
                raise self._failed(name, err) from None
            else:
                self.metrics.calls.labels(name, "ok").inc()
                self.metrics.call_seconds.labels(name).observe(time.perf_counter() - started)
                return result
            attempt += 1
            await self._backoff(name, outcome, attempt, f"{name}.{method}: {why} (attempt {attempt}); retrying")

    def _failed(self, name: str, err: Exception) -> ApiError:
        """The 502 for a call that raised in its replica, naming the deployment and the error's last line."""
        self.metrics.calls.labels(name, "error").inc()
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return ApiError(502, f"{name} failed: {cause}", kind="upstream_error")

    async def _backoff(self, name: str, outcome: str, attempt: int, message: str) -> None:
        """Count a lost call (``outcome``: retry or timeout), log it, and wait before the next attempt."""
        self.metrics.calls.labels(name, outcome).inc()
        log.warning("%s", message)
        await asyncio.sleep(min(0.05 * 2**attempt, 1.0))

    # -- one decoding step ------------------------------------------------------------------------------------
    async def logits(
        self,
        backend: str,
        ids: list[int],
        perspectives: Sequence[str],
        needs_base: bool,
        session: str | None,
        deadline: float,
        first: bool,
    ) -> StepLogits:
        """Next-token logits after ``ids``: ``[K, vocab]`` steered and (``needs_base``) the unsteered row.
        A step other than the ``first`` that found no KV cache counts as a replay."""
        k = len(perspectives)
        if backend == "fused":
            rows: list[str | None] = [*perspectives, *([None] if needs_base else [])]
            r = await self.call(self.fused, "step_rows", FUSED, deadline, ids, rows, session=session)
            logits = torch.from_numpy(r["logits"].copy())  # Ray hands back read-only arrays
            results = [
                (FUSED, {"ran": ran, "hit": hit, "version": r["version"]})
                for ran, hit in zip(r["ran"], r["hit"], strict=True)
            ]
            steered, base = (logits[:k] if k else None), (logits[k] if needs_base else None)
        else:
            own = [p for p in perspectives if p not in self.pooled]
            pooled = [p for p in perspectives if p in self.pooled]
            targets = [(self.replicas[p], perspective_deployment(p)) for p in own]
            targets += [(self.base, BASE)] if needs_base else []
            calls = [self.call(h, "step", name, deadline, ids, session=session) for h, name in targets]
            if pooled:
                calls.append(self.call(self.pool, "step_rows", POOL, deadline, ids, pooled, session=session))
            answers = await asyncio.gather(*calls)
            rows = {p: (name, a, a["logits"]) for p, (_, name), a in zip(own, targets, answers, strict=False)}
            if pooled:
                r = answers[-1]
                for j, p in enumerate(pooled):
                    rows[p] = (POOL, {"ran": r["ran"][j], "hit": r["hit"][j], "version": r["version"]}, r["logits"][j])
            results = [(rows[p][0], rows[p][1]) for p in perspectives]
            steered = torch.from_numpy(np.stack([rows[p][2] for p in perspectives])) if k else None
            base = None
            if needs_base:
                results.append((BASE, answers[len(own)]))
                base = torch.from_numpy(answers[len(own)]["logits"].copy())
        replays = 0
        for name, r in results:
            self.metrics.deployment_tokens.labels(name).inc(r["ran"])
            if not first and not r["hit"]:
                replays += 1
                self.metrics.replays.labels(name).inc()
        versions = {p: results[i][1]["version"] for i, p in enumerate(perspectives)}
        return StepLogits(steered, base, {"replays": replays, "versions": versions})

    def release(self, session: str, backend: str, perspectives: Sequence[str], needs_base: bool) -> None:
        """Drop ``session``'s KV caches on every deployment it used, in the background (best effort)."""
        calls: list[tuple[Any, dict[str, Any]]] = []
        if backend == "fused":
            calls.append((self.fused, {}))
        else:
            calls += [(self.replicas[p], {}) for p in perspectives if p not in self.pooled]
            pooled = [p for p in perspectives if p in self.pooled]
            calls += [(self.pool, {"perspectives": pooled})] if pooled else []
            calls += [(self.base, {})] if needs_base else []
        for h, extra in calls:
            task = asyncio.get_running_loop().create_task(_quiet(h.release.remote(session=session, **extra)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the background releases started so far (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- whole generations ------------------------------------------------------------------------------------
    async def decode(self, params: GenParams, backend: str) -> AsyncIterator[TokenEvent]:
        """The generation's token events, one session from the first step to the release."""
        session = uuid.uuid4().hex
        deadline = self.deadline()
        started = time.perf_counter()

        async def step_fn(ids: list[int], first: bool) -> StepLogits:
            return await self.logits(backend, ids, params.perspectives, params.needs_base, session, deadline, first)

        target = self.one_deployment(backend, params) if self.decode_on_replica else None
        try:
            if target is not None:
                events = self._decode_on(*target, params, session, deadline)
            else:
                events = plural_decode(step_fn, params)
            async with aclosing(events):
                async for event in events:
                    self.metrics.tokens.labels("completion", backend).inc()
                    yield event
        finally:
            if target is None:  # a replica that ran the generation dropped the session's caches itself
                self.release(session, backend, params.perspectives, params.needs_base)
            self.metrics.generation_seconds.labels(backend).observe(time.perf_counter() - started)

    def one_deployment(self, backend: str, params: GenParams) -> tuple[Any, str] | None:
        """The deployment that answers every row of ``params`` alone (the fused one; the base for an unsteered
        request; a perspective's own, without the unsteered row; the pool, for pooled perspectives only, the
        unsteered row included), with its name; ``None`` when the rows come from several."""
        if backend == "fused":
            return self.fused, FUSED
        chosen = params.perspectives
        if not chosen:
            return self.base, BASE
        if all(p in self.pooled for p in chosen):
            return self.pool, POOL
        if len(chosen) == 1 and not params.needs_base:
            return self.replicas[chosen[0]], perspective_deployment(chosen[0])
        return None

    async def _decode_on(
        self, handle: Any, name: str, params: GenParams, session: str, deadline: float
    ) -> AsyncIterator[TokenEvent]:
        """The generation run whole on one replica of ``handle`` and streamed back (``ModelServer.decode``).

        A stream whose replica died, or that sent nothing for ``step_timeout_s``, goes on from its last token
        on whichever replica answers next (the prompt plus the tokens so far, the sampler's state), counted
        as a resumption; that replica replays the prefix. An error raised in the replica is a 502."""
        tokens: list[int] = []
        state: bytes | None = None
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(504, f"timed out waiting for {name}", kind="timeout_error")
            rest = dataclasses.replace(params, ids=params.ids + tokens, max_tokens=params.max_tokens - len(tokens))
            stream = handle.options(stream=True).decode.remote(rest, session=session, resumed=bool(tokens), state=state)
            finished = False
            try:
                while True:
                    started = time.perf_counter()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ApiError(504, f"timed out waiting for {name}", kind="timeout_error")
                    try:
                        event, state = await asyncio.wait_for(_next(stream), min(self.step_timeout_s, left))
                    except StopAsyncIteration:
                        raise ApiError(502, f"{name} ended the generation early", kind="upstream_error") from None
                    self.metrics.calls.labels(name, "ok").inc()
                    self.metrics.call_seconds.labels(name).observe(time.perf_counter() - started)
                    self.metrics.deployment_tokens.labels(name).inc(event.info.get("ran", 0))
                    self.metrics.replays.labels(name).inc(event.info.get("replays", 0))
                    tokens.append(event.token)
                    if event.finish_reason:
                        finished = True
                    yield event
                    if finished:
                        return
            except RETRYABLE as err:
                outcome, why = "retry", type(err).__name__
            except TimeoutError:
                outcome, why = "timeout", "no token"
            except ray.exceptions.RayTaskError as err:
                raise self._failed(name, err) from None
            finally:
                if not finished:
                    stream.cancel()
            attempt += 1
            await self._backoff(
                name, outcome, attempt, f"{name}.decode: {why} after {len(tokens)} tokens (attempt {attempt}); resuming"
            )

    async def generate(self, params: GenParams, backend: str, tokenizer: Any, stops: Sequence[str]) -> Generated:
        """The whole generation, cut at the first of ``stops``."""
        stream = TextStream(tokenizer, stops)
        events: list[TokenEvent] = []
        finish = "length"
        replays, versions = 0, {}
        self.metrics.tokens.labels("prompt", backend).inc(len(params.ids))
        async with aclosing(self.decode(params, backend)) as gen:
            async for event in gen:
                events.append(event)
                stream.add(event.token)
                replays += event.info.get("replays", 0)
                versions = event.info.get("versions", versions)
                if stream.stopped:
                    finish = "stop"
                    break
                finish = event.finish_reason or finish
        return Generated(params.ids, stream.text, finish, events, {"replays": replays, "vector_versions": versions})

    # -- replica stats ----------------------------------------------------------------------------------------
    async def stats(
        self, timeout_s: float = 5.0, skip: Callable[[str], bool] | None = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """``(deployment, stats)`` of one replica of every deployment that answers within ``timeout_s``;
        ``skip(name)`` true leaves a deployment out (one that may be at zero replicas: a call would wake it)."""
        targets = [(perspective_deployment(p), h) for p, h in self.replicas.items()]
        targets += [(POOL, self.pool)] if self.pool is not None else []
        targets += [(BASE, self.base)] if self.base is not None else []
        targets += [(FUSED, self.fused)] if self.fused is not None else []
        if skip is not None:
            targets = [(n, h) for n, h in targets if not skip(n)]

        async def one(name: str, handle: Any) -> tuple[str, dict[str, Any]] | None:
            try:
                return name, await asyncio.wait_for(_wait(handle.stats.remote()), timeout_s)
            except Exception:  # a replica that is down does not fail the scrape
                return None

        return [r for r in await asyncio.gather(*(one(n, h) for n, h in targets)) if r is not None]


__all__ = ["RETRYABLE", "Fanout"]
