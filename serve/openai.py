"""OpenAI response shaping: pure functions from generation results to the API's JSON bodies and SSE events.

Nothing here touches HTTP, Ray or a model: every function takes the generation results
(:class:`serve.generation.Generated`, :class:`serve.generation.TokenEvent`) and ``piece``, the tokenizer's
id -> text of one token, and returns plain ``dict``/``str`` values the routes (:mod:`serve.aggregator`) send.
The bodies follow OpenAI's ``text_completion``, ``chat.completion`` and ``chat.completion.chunk`` objects,
plus a ``pluristeer`` extension (perspectives, decoding, backend, vector versions, replays) and per-token
``distributions`` (combined and per perspective) when log-probabilities are asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from sae.decoding import Decoding
from serve.errors import ApiError
from serve.generation import Generated, TokenEvent

Piece = Callable[[int], str]


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def validation_error(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """A 422's message and ``param`` from pydantic's ``errors()``: the first 8 problems, each naming its field."""
    problems = []
    for e in errors[:8]:
        where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
        problems.append(f"{where}: {e.get('msg', 'invalid')}")
    first = errors[0].get("loc", ()) if errors else ()
    param = ".".join(str(x) for x in first[1:]) or None
    return "; ".join(problems) or "invalid request body", param


def usage(runs: Sequence[Generated]) -> dict[str, int]:
    prompt = sum(len(r.ids) for r in runs)
    completion = sum(len(r.events) for r in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def extension(
    perspectives: list[str], decoding: Decoding, backend: str, vectors: str, runs: Sequence[Generated]
) -> dict[str, Any]:
    """The ``pluristeer`` member of a completion: what was combined, how, and from which vector versions."""
    versions: dict[str, Any] = {}
    for r in runs:
        versions.update(r.info.get("vector_versions", {}))
    return {
        "perspectives": perspectives,
        "decoding": asdict(decoding),
        "backend": backend,
        "vectors": vectors,
        "vector_versions": versions,
        "replays": sum(r.info.get("replays", 0) for r in runs),
    }


def distributions(events: Sequence[TokenEvent], piece: Piece) -> list[dict[str, Any]]:
    """Per generated token: its combined log-probability, the combined and per-perspective top-n, DVD weights."""

    def top(pairs: list[tuple[int, float]]) -> list[dict[str, Any]]:
        return [{"token": piece(t), "id": t, "logprob": lp} for t, lp in pairs]

    return [
        {
            "token": piece(e.token),
            "id": e.token,
            "logprob": e.logprob,
            "combined": top(e.top),
            "perspectives": {p: top(v) for p, v in e.per_perspective.items()},
            **({"weights": e.weights} if e.weights is not None else {}),
        }
        for e in events
    ]


def completion_logprobs(run: Generated, piece: Piece) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens = [piece(e.token) for e in run.events]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in run.events],
        "top_logprobs": [{piece(t): lp for t, lp in e.top} for e in run.events],
        "text_offset": offsets,
    }


def chat_logprob(e: TokenEvent, n: int, piece: Piece) -> dict[str, Any]:
    """One entry of a chat completion's ``logprobs.content``."""

    def item(t: int, lp: float) -> dict[str, Any]:
        text = piece(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:n]]}


def completion_body(
    head: dict[str, Any], runs: Sequence[Generated], logprobs: int | None, piece: Piece, ext: dict[str, Any]
) -> dict[str, Any]:
    """A ``text_completion``: one choice per prompt; ``logprobs`` (``None``: not asked) adds both log-prob views."""
    choices = []
    for i, run in enumerate(runs):
        choice: dict[str, Any] = {"index": i, "text": run.text, "logprobs": None, "finish_reason": run.finish_reason}
        if logprobs is not None:
            choice["logprobs"] = completion_logprobs(run, piece)
            choice["distributions"] = distributions(run.events, piece)
        choices.append(choice)
    return {**head, "choices": choices, "usage": usage(runs), "pluristeer": ext}


def chat_body(
    head: dict[str, Any], run: Generated, logprobs: bool, top_logprobs: int, piece: Piece, ext: dict[str, Any]
) -> dict[str, Any]:
    """A ``chat.completion`` with one assistant message."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": run.text},
        "logprobs": None,
        "finish_reason": run.finish_reason,
    }
    if logprobs:
        choice["logprobs"] = {"content": [chat_logprob(e, top_logprobs, piece) for e in run.events]}
        choice["distributions"] = distributions(run.events, piece)
    return {**head, "choices": [choice], "usage": usage([run]), "pluristeer": ext}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def stream_chunk(head: dict[str, Any], delta: str | None, finish: str | None, *, chat: bool, first: bool = False):
    """One streamed chunk: a chat delta (``first``: the assistant role) or a completion text piece."""
    if chat:
        d: dict[str, Any] = {} if delta is None else {"content": delta}
        if first:
            d = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    return sse({**head, "choices": [choice]})


def stream_usage(head: dict[str, Any], prompt: int, completion: int) -> str:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    totals = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return sse({**head, "choices": [], "usage": totals})


def stream_error(err: ApiError) -> str:
    """An error after the stream started (the status line is sent already)."""
    return sse(error_body(err.status, err.message, err.kind, err.param))


STREAM_DONE = sse("[DONE]")

__all__ = [
    "STREAM_DONE",
    "chat_body",
    "chat_logprob",
    "completion_body",
    "completion_logprobs",
    "distributions",
    "error_body",
    "extension",
    "sse",
    "stream_chunk",
    "stream_error",
    "stream_usage",
    "usage",
    "validation_error",
]
