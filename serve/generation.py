"""The aggregator's decoding loop, apart from HTTP and Ray: step by step, ask for the K perspectives' (and the
unsteered) next-token logits, combine them (:func:`sae.decoding.combine`), pick a token, repeat.

``step_fn(ids, first)`` is whatever fetches the logits — the per-perspective replicas fanned out
concurrently, or the fused replica — and returns :class:`StepLogits`. Picking is
:func:`sae.decoding.plural_generate`'s (greedy, or sampling from the ``top_k`` most likely tokens at
``temperature`` with a seeded generator), so a served request and ``plural_generate`` with the same
settings choose the same tokens. :class:`TextStream` turns tokens into text deltas for streaming:
incomplete UTF-8 and possible starts of stop sequences are held back.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sae.decoding import Decoding, _pick, combine, dvd_weights


@dataclass
class StepLogits:
    steered: torch.Tensor | None  # [K, vocab] float32 (None when K = 0)
    base: torch.Tensor | None  # [vocab] (None when the mode does not need it)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. versions, replays, from the backend


@dataclass
class GenParams:
    ids: list[int]
    perspectives: list[str]
    decoding: Decoding
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    eos: int | None = None
    ignore_eos: bool = False
    top_n: int = 0  # log-probabilities to report per token (combined and per perspective)

    @property
    def needs_base(self) -> bool:
        return not self.perspectives or self.decoding.needs_base


@dataclass
class TokenEvent:
    token: int
    logprob: float  # of the chosen token under the combined distribution
    finish_reason: str | None  # "stop" (EOS), "length", or None
    top: list[tuple[int, float]] = field(default_factory=list)  # combined top-n
    per_perspective: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    weights: dict[str, float] | None = None  # dvd weights
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Generated:
    """One finished (not streamed) generation: prompt ids, text (cut at a stop sequence), why it ended, its
    token events and ``info`` (``replays``, ``vector_versions``)."""

    ids: list[int]
    text: str
    finish_reason: str
    events: list[TokenEvent] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def combined_scores(logits: StepLogits, perspectives: Sequence[str], decoding: Decoding) -> torch.Tensor:
    """``[vocab]`` combined scores (log-probabilities; raw scores under ``reference``)."""
    if not perspectives:
        assert logits.base is not None
        return logits.base.float().log_softmax(-1)
    assert logits.steered is not None
    base = logits.base[None] if logits.base is not None and decoding.needs_base else None
    return combine(logits.steered[:, None], base, decoding)[0]


def _nucleus(scores: torch.Tensor, top_k: int, top_p: float, temperature: float, g: torch.Generator) -> int:
    top = scores.float().topk(min(top_k, scores.shape[-1]))
    probs = (top.values / temperature).softmax(-1)
    keep = probs.cumsum(-1) - probs < top_p  # the smallest prefix whose mass reaches top_p
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    choice = torch.multinomial(probs / probs.sum(), 1, generator=g)
    return int(top.indices[choice])


def _top(logp: torch.Tensor, n: int) -> list[tuple[int, float]]:
    if n <= 0:
        return []
    top = logp.topk(min(n, logp.shape[-1]))
    return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def sampler(params: GenParams, state: bytes | None = None) -> torch.Generator:
    """The generator a generation samples with: seeded by ``params.seed`` (random if unset), or set to
    ``state`` (:func:`sampler_state` of a generation cut short, so that the rest draws what it would have)."""
    g = torch.Generator()
    if state is not None:
        g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    else:
        g.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return g


def sampler_state(g: torch.Generator) -> bytes:
    """``g``'s state, to resume a generation elsewhere (:func:`sampler`); a few KB."""
    return g.get_state().numpy().tobytes()


async def plural_decode(
    step_fn: Callable[[list[int], bool], Awaitable[StepLogits]],
    params: GenParams,
    generator: torch.Generator | None = None,
) -> AsyncIterator[TokenEvent]:
    """Yield one :class:`TokenEvent` per generated token until EOS or ``max_tokens``; sampling draws from
    ``generator`` (default: :func:`sampler` of ``params``), which it advances."""
    do_sample = params.temperature > 0
    g = generator if generator is not None else sampler(params)
    tokens: list[int] = []
    for step in range(params.max_tokens):
        logits = await step_fn(params.ids + tokens, step == 0)
        scores = combined_scores(logits, params.perspectives, params.decoding)
        if params.ignore_eos and params.eos is not None:
            scores = scores.clone()
            scores[params.eos] = float("-inf")
        if do_sample and params.top_p < 1.0:
            token = _nucleus(scores, params.decoding.top_k, params.top_p, params.temperature, g)
        else:
            token = int(_pick(scores[None], params.decoding.top_k, do_sample, params.temperature or 1.0, g)[0])
        tokens.append(token)
        logp = scores.float().log_softmax(-1)
        event = TokenEvent(token, float(logp[token]), None, info=logits.info)
        if params.top_n > 0:
            event.top = _top(logp, params.top_n)
            if logits.steered is not None:
                each = logits.steered.float().log_softmax(-1)
                event.per_perspective = {p: _top(each[i], params.top_n) for i, p in enumerate(params.perspectives)}
                if params.decoding.mode == "dvd":
                    w = dvd_weights(logits.steered[:, None], params.decoding)[:, 0].float()
                    event.weights = {p: float(w[i]) for i, p in enumerate(params.perspectives)}
        if params.eos is not None and token == params.eos and not params.ignore_eos:
            event.finish_reason = "stop"
        elif step == params.max_tokens - 1:
            event.finish_reason = "length"
        yield event
        if event.finish_reason:
            return


class TextStream:
    """Token ids -> text deltas, cut at the first stop sequence (which is not returned)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        return text if cut < 0 else text[:cut]

    def add(self, token: int) -> str:
        """Append ``token``; return the text that is now safe to send (sets :attr:`stopped` at a stop)."""
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self.flush(full[:cut])
        end = len(full) - self.hold
        while end > self.sent and full[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
            end -= 1
        delta = full[self.sent : max(end, self.sent)]
        self.sent += len(delta)
        return delta

    def flush(self, text: str | None = None) -> str:
        text = self.text if text is None else text
        delta = text[self.sent :]
        self.sent = len(text)
        return delta


__all__ = [
    "GenParams", "Generated", "StepLogits", "TextStream", "TokenEvent", "combined_scores", "plural_decode", "sampler",
    "sampler_state",
]  # fmt: skip
