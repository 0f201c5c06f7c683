"""The fan-out client (serve/fanout.py) without HTTP or a cluster: deployments are in-process objects with a
Serve handle's surface (``handle.method.remote(...)`` -> an awaitable with ``cancel()``), so retries, deadlines,
upstream errors, replays and session release are driven directly. The same client over real Serve handles is
in test_app.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import numpy as np
import pytest
import ray
import torch

from sae.decoding import Decoding
from serve.errors import ApiError
from serve.fanout import Fanout
from serve.generation import GenParams

VOCAB = 7


class Response:
    """An awaitable call result that can be cancelled, like Serve's ``DeploymentResponse``."""

    def __init__(self, coro: Any) -> None:
        self.task = asyncio.ensure_future(coro)
        self.cancelled = False

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


class Method:
    def __init__(self, fn: Callable[..., Any], log: list[tuple[str, tuple, dict]], name: str) -> None:
        self.fn, self.log, self.name = fn, log, name
        self.responses: list[Response] = []

    def remote(self, *args: Any, **kwargs: Any) -> Response:
        self.log.append((self.name, args, kwargs))
        r = Response(self.fn(*args, **kwargs))
        self.responses.append(r)
        return r


class Deployment:
    """A model deployment whose step logits favour token ``favourite``; ``failures`` first calls raise what a
    lost replica raises; ``hang`` never answers; ``crash`` raises in the replica (a RayTaskError)."""

    def __init__(self, favourite: int, failures: int = 0, hang: bool = False, crash: bool = False) -> None:
        self.favourite, self.failures, self.hang, self.crash = favourite, failures, hang, crash
        self.calls: list[tuple[str, tuple, dict]] = []
        self.cached: set[str] = set()
        self.step = Method(self._step, self.calls, "step")
        self.release = Method(self._release, self.calls, "release")

    async def _step(self, ids: list[int], *, session: str | None = None) -> dict[str, Any]:
        if self.hang:
            await asyncio.sleep(3600)
        if self.failures:
            self.failures -= 1
            raise ray.exceptions.ActorUnavailableError("replica lost", None)
        if self.crash:
            raise ray.exceptions.RayTaskError("step", "Traceback ...\nValueError: bad row", ValueError("bad row"))
        hit = session in self.cached
        self.cached.add(session or "")
        logits = np.full(VOCAB, -4.0, dtype=np.float32)
        logits[(self.favourite + len(ids)) % VOCAB] = 4.0
        return {"logits": logits, "ran": 1 if hit else len(ids), "hit": hit, "version": 3}

    async def _release(self, *, session: str) -> int:
        had = session in self.cached
        self.cached.discard(session)
        return int(had)

    def steps(self) -> list[tuple[str, tuple, dict]]:
        return [c for c in self.calls if c[0] == "step"]


def _client(deployments: dict[str, Deployment], base: Deployment, **kw: Any) -> Fanout:
    kw = {"step_timeout_s": 5.0, "request_timeout_s": 10.0, **kw}
    return Fanout(deployments, base, None, **kw)


def _params(perspectives: list[str], max_tokens: int = 4) -> GenParams:
    return GenParams(ids=[1, 2], perspectives=perspectives, decoding=Decoding("mean"), max_tokens=max_tokens,
                     temperature=0.0, eos=None)  # fmt: skip


def _count(client: Fanout, name: str, outcome: str) -> float:
    return client.metrics.calls.labels(name, outcome)._value.get()


def test_a_generation_fans_out_retries_a_lost_replica_and_releases_its_session() -> None:
    a, b, base = Deployment(0, failures=2), Deployment(0), Deployment(5)
    client = _client({"a": a, "b": b}, base)

    async def run() -> Any:
        out = await client.generate(_params(["a", "b"]), "replicas", tokenizer=_Tok(), stops=[])
        await client.drain()
        return out

    out = asyncio.run(run())
    assert [e.token for e in out.events] == [(0 + n) % VOCAB for n in (2, 3, 4, 5)]  # both perspectives agree
    assert out.finish_reason == "length" and out.info["vector_versions"] == {"a": 3, "b": 3}
    assert out.info["replays"] == 0  # the retried first step is the session's first: nothing to replay
    assert _count(client, "PerspectiveModel-a", "retry") == 2 and _count(client, "PerspectiveModel-a", "ok") == 4
    assert len(b.steps()) == 4 and len(a.steps()) == 6
    sessions = {c[2]["session"] for d in (a, b) for c in d.steps()}
    assert len(sessions) == 1  # every step of the generation carries one session id
    (session,) = sessions
    for d in (a, b):  # mean decoding needs no unsteered row: base is not called nor released
        assert ("release", (), {"session": session}) in d.calls and not d.cached
    assert not base.calls


def test_a_lost_cache_is_a_replay_and_a_client_that_leaves_still_releases() -> None:
    a, base = Deployment(1), Deployment(5)
    client = _client({"a": a}, base)

    async def run() -> list[int]:
        tokens = []
        async with aclosing(client.decode(_params(["a"], max_tokens=10), "replicas")) as events:
            async for event in events:
                tokens.append(event.token)
                if len(tokens) == 2:
                    a.cached.clear()  # the replica restarted: the next step replays the prefix
                if len(tokens) == 4:
                    break  # the HTTP client went away
        await client.drain()
        return tokens

    tokens = asyncio.run(run())
    assert len(tokens) == 4
    assert client.metrics.replays.labels("PerspectiveModel-a")._value.get() == 1
    assert [c[0] for c in a.calls].count("release") == 1 and not a.cached


def test_a_step_past_the_deadline_is_a_504_and_cancels_the_call() -> None:
    a, base = Deployment(0, hang=True), Deployment(5)
    client = _client({"a": a}, base, step_timeout_s=0.2, request_timeout_s=0.7)

    async def run() -> None:
        await client.generate(_params(["a"]), "replicas", tokenizer=_Tok(), stops=[])

    with pytest.raises(ApiError) as err:
        asyncio.run(run())
    assert err.value.status == 504 and "PerspectiveModel-a" in err.value.message
    responses = a.step.responses
    assert len(responses) >= 2 and all(r.cancelled for r in responses)  # retried within the deadline, each cancelled
    assert _count(client, "PerspectiveModel-a", "timeout") == len(responses)


def test_an_error_in_the_replica_is_a_502_naming_the_deployment() -> None:
    client = _client({"a": Deployment(0, crash=True)}, Deployment(5))
    with pytest.raises(ApiError) as err:
        asyncio.run(client.logits("replicas", [1], ["a"], True, "s1", client.deadline(), True))
    assert err.value.status == 502 and err.value.message.startswith("PerspectiveModel-a failed")
    assert "bad row" in err.value.message
    assert _count(client, "PerspectiveModel-a", "error") == 1


def test_the_unsteered_row_comes_from_the_base_deployment() -> None:
    a, base = Deployment(0), Deployment(5)
    client = _client({"a": a}, base)
    logits = asyncio.run(client.logits("replicas", [1, 2, 3], ["a"], True, None, client.deadline(), True))
    assert logits.steered is not None and logits.base is not None
    assert logits.steered.shape == (1, VOCAB) and int(logits.base.argmax()) == (5 + 3) % VOCAB
    assert torch.equal(logits.steered[0].argmax(), torch.tensor(3))


class _Tok:
    """Token ids as letters (what TextStream needs of a tokenizer)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


class _Stream:
    """A streamed call's answer, like Serve's ``DeploymentResponseGenerator``: ``await anext`` / ``cancel()``.
    After ``die_after`` items it raises what a lost replica raises, and its replica-side generator is closed
    (the replica's memory, the session's KV cache with it, is gone)."""

    def __init__(self, agen: Any, die_after: int | None) -> None:
        self.agen, self.die_after, self.sent = agen, die_after, 0
        self.closing: asyncio.Future | None = None

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        if self.die_after is not None and self.sent == self.die_after:
            await self.agen.aclose()
            raise ray.exceptions.ActorUnavailableError("replica lost", None)
        self.sent += 1
        return await self.agen.__anext__()

    def cancel(self) -> None:
        self.closing = asyncio.ensure_future(self.agen.aclose())


class _OnReplica:
    """A deployment handle over an in-process ``ModelServer``: ``step``/``release`` as calls, ``decode`` as a
    stream (``options(stream=True)``) whose first ``die_after`` items are all the first replica sends."""

    def __init__(self, server: Any, die_after: int | None = None) -> None:
        self.server, self.die_after, self.log = server, die_after, []
        self.streams: list[_Stream] = []
        self.step = Method(server.step, self.log, "step")
        self.release = Method(server.release, self.log, "release")

    def options(self, *, stream: bool) -> _OnReplica:
        assert stream
        return self

    @property
    def decode(self) -> _OnReplica:
        return self

    def remote(self, params: GenParams, **kw: Any) -> _Stream:
        self.log.append(("decode", (params,), kw))
        s = _Stream(self.server.decode(params, **kw), self.die_after if not self.streams else None)
        self.streams.append(s)
        return s


def test_a_generation_decoded_on_a_replica_that_dies_goes_on_elsewhere_drawing_the_same_tokens(embedded) -> None:
    """The unsteered model in process (``ModelServer``, no Serve): a sampled generation decoded on the replica
    (streamed) draws the tokens the aggregator's step-by-step loop draws with the same seed; cut after 3 tokens
    by a lost replica, it goes on from its fourth with the sampler's state, and still draws the same tokens;
    the resumption is one replay; every run leaves no KV cache behind."""
    from serve.replicas import ModelServer

    server = ModelServer({"vectors": "unused", "model": "embedded"})
    tok = embedded[1]
    ids = tok("The history of bread", add_special_tokens=False)["input_ids"]
    params = GenParams(ids=ids, perspectives=[], decoding=Decoding("mean", top_k=20), max_tokens=8, temperature=0.9,
                       seed=5, eos=None)  # fmt: skip

    def run(handle: _OnReplica, on_replica: bool) -> tuple[Any, Fanout]:
        client = Fanout({}, handle, None, step_timeout_s=30, request_timeout_s=60, decode_on_replica=on_replica)

        async def go() -> Any:
            out = await client.generate(params, "replicas", tokenizer=_Tok(), stops=[])
            await client.drain()
            await asyncio.sleep(0.05)  # cancelled streams close
            return out

        return asyncio.run(go()), client

    stepped, _ = run(_OnReplica(server), on_replica=False)
    whole, _ = run(whole_handle := _OnReplica(server), on_replica=True)
    cut, client = run(cut_handle := _OnReplica(server, die_after=3), on_replica=True)
    tokens = [e.token for e in stepped.events]
    assert len(tokens) == 8 and len(set(tokens)) > 1
    assert [e.token for e in whole.events] == tokens and [e.token for e in cut.events] == tokens
    assert [c[0] for c in whole_handle.log] == ["decode"]  # one call for the whole generation, no release
    (first, second) = [c for c in cut_handle.log if c[0] == "decode"]
    assert second[1][0].ids == ids + tokens[:3] and second[1][0].max_tokens == 5 and second[2]["resumed"]
    assert second[2]["state"] is not None and second[2]["session"] == first[2]["session"]
    assert cut.info["replays"] == 1 and client.metrics.replays.labels("BaseModel")._value.get() == 1
    assert _count(client, "BaseModel", "retry") == 1 and _count(client, "BaseModel", "ok") == 8
    assert len(server.engine.cache) == 0 and server.decodes == 3


def test_a_replica_asked_for_rows_it_does_not_serve_refuses(embedded) -> None:
    from serve.replicas import ModelServer

    server = ModelServer({"vectors": "unused", "model": "embedded"})
    params = GenParams(ids=[1, 2], perspectives=["a"], decoding=Decoding("mean"), max_tokens=2, temperature=0)

    async def go() -> None:
        async for _ in server.decode(params, session="s"):
            pass

    with pytest.raises(ValueError, match="serves the unsteered row alone; asked for"):
        asyncio.run(go())
