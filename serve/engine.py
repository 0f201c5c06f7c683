"""The step engine of a model replica (pure torch, no Ray): next-token logits for a batch of rows, with a KV
cache per session.

A row is ``(key, ids, perspective)``: the full token ids of one sequence so far, the session key its KV
cache is kept under (``None``: run it uncached) and the perspective that steers it (``None``: unsteered).
Each call of :meth:`StepEngine.step` answers every row with the logits after its last token:

- a row whose session holds a cached prefix of ``ids`` (same steering vector version) runs only the new
  tokens on top of that cache — one token per decoding step;
- any other row (a new session, an evicted or expired one, a replica that restarted, a vector that moved
  to a new version) *replays*: its whole prefix runs again. So the caller never depends on which replica,
  or which incarnation of it, answers a step.

Rows run as few batched forwards: all one-token decode rows together (their caches left-padded to one
length), and the replays together. Sessions live in a :class:`SessionCache` (LRU, bounded, with a TTL).

A decode step of exactly the sessions of the previous batched forward (in whatever order they come back)
runs on that forward's batched cache as it is, its rows put back in the cache's order and its attention
mask extended by one column: no per-step copy of every session's keys and values into a new padded cache.
A session's entry is a view into that cache (copied only where its tokens are not one contiguous run), so
any other batch can still be assembled from it. The engine holds the last batch's cache until its next
forward (at most one batch of keys and values beyond what the session cache counts).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sae.decoding import last_logits
from sae.hooks import steer


@dataclass(frozen=True)
class Row:
    key: str | None  # session cache key; None: run uncached
    ids: Sequence[int]  # every token of the sequence so far
    perspective: str | None = None  # steering vector name; None: unsteered
    group: str | None = None  # rows of one session with the same ids (serve.fused shares their lower blocks)


@dataclass
class RowOut:
    logits: np.ndarray  # [vocab] float32: next-token logits after the row's last token
    ran: int  # tokens this row ran through the model in this call (0: answered from the cache)
    hit: bool  # a cached prefix (or the cached answer) was used


@dataclass
class Steering:
    """What steers the rows: a VectorSet (``vectors[perspective]``), its version, the SAE and the options."""

    vector_set: Any  # sae.vectorset.VectorSet
    version: Any
    sae: Any = None
    coeff: float = 1.0
    mode: str | None = None  # default: the set's own mode
    keep_error: bool = True
    steer_decode: bool = True
    from_position: int = 0


@dataclass
class _Entry:
    ids: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer [kv_heads, T, head_dim]
    values: list[torch.Tensor]
    logits: torch.Tensor  # [vocab] after ids
    version: Any
    perspective: str | None
    touched: float
    cache: Any = None  # the batch-1 transformers cache holding keys/values: reused (appended to) as is

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class _Batch:
    """The last batched forward: its transformers cache ``[rows, kv_heads, T, head_dim]`` per layer, its
    attention mask ``[rows, T]`` and the entry each row stored (in row order)."""

    cache: Any
    mask: torch.Tensor
    entries: tuple[_Entry, ...]


class SessionCache:
    """Per-session KV caches: least recently used session first out beyond ``max_sessions``, dropped after
    ``ttl_s`` without use. A key is ``"{session}/{row}"`` (the rows of one session — its perspectives, the
    unsteered row, the fused trunk — share the part before the first ``/``; a key without one is a session of
    its own): the bound counts sessions, not rows, and evicting a session drops all of its rows, so a PD
    request over K perspectives takes one place, not K + 1. Thread-safe (the engine runs on a worker thread,
    releases come from the event loop)."""

    def __init__(self, max_sessions: int = 64, ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        if max_sessions < 0 or ttl_s <= 0:
            raise ValueError("max_sessions must be >= 0 and ttl_s > 0")
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._rows: dict[str, set[str]] = {}  # session -> its keys
        self._lock = threading.Lock()
        self.evicted = 0  # sessions
        self.expired = 0  # rows

    @staticmethod
    def session_of(key: str) -> str:
        return key.split("/", 1)[0]

    def _remove(self, key: str) -> _Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            session = self.session_of(key)
            rows = self._rows[session]
            rows.discard(key)
            if not rows:
                del self._rows[session]
        return entry

    def _touch(self, key: str) -> None:
        """Make ``key``'s session the most recently used (all of its rows, ``key`` last)."""
        for k in self._rows[self.session_of(key)]:
            if k != key:
                self._entries.move_to_end(k)
        self._entries.move_to_end(key)

    def get(self, key: str) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self.clock() - entry.touched > self.ttl_s:
                self._remove(key)
                self.expired += 1
                return None
            self._touch(key)
            return entry

    def put(self, key: str, entry: _Entry) -> None:
        if self.max_sessions == 0:
            return
        with self._lock:
            entry.touched = self.clock()
            self._entries[key] = entry
            self._rows.setdefault(self.session_of(key), set()).add(key)
            self._touch(key)
            while len(self._rows) > self.max_sessions:
                oldest = self.session_of(next(iter(self._entries)))
                for k in list(self._rows[oldest]):
                    self._remove(k)
                self.evicted += 1

    def drop(self, key: str) -> bool:
        with self._lock:
            return self._remove(key) is not None

    def sweep(self) -> int:
        """Drop expired rows; returns how many."""
        now = self.clock()
        with self._lock:
            old = [k for k, e in self._entries.items() if now - e.touched > self.ttl_s]
            for k in old:
                self._remove(k)
            self.expired += len(old)
            return len(old)

    @property
    def sessions(self) -> int:
        """Sessions with at least one cached row (``len()`` counts rows)."""
        return len(self._rows)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())


def _sliceable_kv_layers(cache: Any, window: int | None) -> bool:
    """Whether every layer of a transformers cache is a dynamic layer we can slice: plain (full attention), or
    sliding-window when the engine knows a window no larger than the layer's (its ``window`` rule applies)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    def ok(layer: Any) -> bool:
        if type(layer) is DynamicSlidingWindowLayer:
            return window is not None and window <= layer.sliding_window
        return type(layer) is DynamicLayer

    return all(ok(layer) for layer in getattr(cache, "layers", [None]))


@torch.no_grad()
def kv_layer_kinds(model: nn.Module, pad_id: int = 0) -> list[str]:
    """The kinds of KV-cache layer ``model`` makes other than plain full-attention ones: empty, or
    ``DynamicSlidingWindowLayer`` (Gemma 3, Mistral: sessions are kept only while shorter than the window, see
    :class:`StepEngine`), or a kind the engines cannot slice (every step replays the session's prefix)."""
    from transformers.cache_utils import DynamicLayer

    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([[pad_id, pad_id]], device=device), use_cache=True)
    kinds = {type(layer).__name__ for layer in getattr(out.past_key_values, "layers", [None])}
    return sorted(kinds - {DynamicLayer.__name__})


def sliding_window(model: nn.Module) -> int | None:
    """The attention window of ``model``'s sliding-window layers (``None``: it has none)."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


class EngineBase:
    """What both step engines (this one and :class:`serve.fused.FusedEngine`) hold: the model, how to get
    the current steering, the session cache, the bounds of one forward, counters, and the row checks."""

    def __init__(
        self,
        model: nn.Module,
        *,
        steering: Callable[[], Steering | None],
        cache: SessionCache | None = None,
        max_rows: int = 32,
        max_tokens: int = 8192,
        pad_id: int = 0,
    ) -> None:
        self.model = model
        self.steering = steering
        self.cache = cache if cache is not None else SessionCache()
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.pad_id = pad_id
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.counters = {"rows": 0, "forwards": 0, "tokens": 0, "hits": 0, "replays": 0}

    def _check_row(self, row: Row, s: Steering | None) -> None:
        """A row's token ids are in the vocabulary and its perspective is in the current set."""
        if not row.ids:
            raise ValueError("a row needs at least one token")
        if min(row.ids) < 0 or max(row.ids) >= self.vocab:
            raise ValueError(f"token ids must be in [0, {self.vocab})")
        if s is not None and row.perspective is not None and row.perspective not in s.vector_set.vectors:
            raise ValueError(f"unknown perspective {row.perspective!r}; this set has {s.vector_set.perspectives}")


class StepEngine(EngineBase):
    """Batched next-token logits with per-session KV caches for one model (see the module docstring).

    ``steering`` is called once per :meth:`step` and returns the current :class:`Steering` (or ``None`` for
    an unsteered model); a new ``version`` makes every cached session replay once. ``max_rows`` and
    ``max_tokens`` bound one forward (rows, and padded tokens of a replay batch).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        steering: Callable[[], Steering | None] = lambda: None,
        cache: SessionCache | None = None,
        max_rows: int = 32,
        max_tokens: int = 8192,
        pad_id: int = 0,
    ) -> None:
        super().__init__(model, steering=steering, cache=cache, max_rows=max_rows, max_tokens=max_tokens, pad_id=pad_id)
        self.device = next(model.parameters()).device
        self._checked: Any = object()
        # With sliding-window layers a session is kept while it is at most window - 2 tokens long: a decode step
        # then spans at most window - 1 cache slots, so no padding of a batch can push a key out of a window
        # that its true distance keeps it in (and the model's own sliding layers never crop what we slice).
        self.window = sliding_window(model)
        self._batch: _Batch | None = None  # the last batched forward, for the next step of the same sessions
        self.counters["batch_reused"] = 0

    # -- steering ------------------------------------------------------------------------------------
    def _current(self) -> Steering | None:
        s = self.steering()
        if s is not None and s.version != self._checked:
            s.vector_set.check(self.model, sae=s.sae)  # fingerprints the SAE: once per version, not per step
            self._checked = s.version
        return s

    def _context(self, s: Steering | None, perspectives: list[str | None]):
        if s is None or all(p is None for p in perspectives):
            if any(p is not None for p in perspectives):
                raise ValueError("this model is unsteered: it has no perspectives")
            return nullcontext()
        vs = s.vector_set
        mode = s.mode or vs.meta.mode
        return steer(
            self.model,
            vs.meta.layer,
            vs.rows(perspectives),
            mode=mode,
            sae=s.sae,
            coeff=s.coeff,
            keep_error=s.keep_error,
            steer_decode=s.steer_decode,
            from_position=s.from_position,
        )

    # -- the step --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, rows: Sequence[Row]) -> list[RowOut]:
        """Next-token logits for every row (see the module docstring)."""
        s = self._current()
        version = None if s is None else s.version
        out: list[RowOut | None] = [None] * len(rows)
        decode: list[tuple[int, Row, _Entry | None, list[int]]] = []
        replay: list[tuple[int, Row, _Entry | None, list[int]]] = []
        for i, row in enumerate(rows):
            self._check_row(row, s)
            ids = list(row.ids)
            entry = self.cache.get(row.key) if row.key is not None else None
            if entry is not None and (
                entry.version != version
                or entry.perspective != row.perspective
                or len(entry.ids) > len(ids)
                or tuple(ids[: len(entry.ids)]) != entry.ids
            ):
                entry = None
            if entry is not None and len(entry.ids) == len(ids):  # asked again (a retried call): cached answer
                out[i] = RowOut(entry.logits.numpy(), 0, True)
                self.counters["hits"] += 1
                continue
            if entry is not None and self.window is not None and len(ids) - len(entry.ids) > 1:
                entry = None  # several new tokens: a padded batch could span more than the window; replay
            if entry is not None:
                self.counters["hits"] += 1
                (decode if len(ids) - len(entry.ids) == 1 else replay).append((i, row, entry, ids[len(entry.ids) :]))
            else:
                replay.append((i, row, None, ids))
                self.counters["replays"] += 1
        replay.sort(key=lambda r: len(r[3]))
        for group in (decode, replay):
            start = 0
            while start < len(group):
                end = start + 1
                while (
                    end < len(group)
                    and end - start < self.max_rows
                    and (end + 1 - start) * max(len(r[3]) for r in group[start : end + 1]) <= self.max_tokens
                ):
                    end += 1
                self._run(group[start:end], out, s, version)
                start = end
        self.counters["rows"] += len(rows)
        return out  # type: ignore[return-value]

    def _run(self, chunk: list[tuple[int, Row, _Entry | None, list[int]]], out: list, s, version) -> None:
        """One forward over ``chunk``: row b is ``[pad][its cached past][pad][its new tokens]``, the past
        left-padded to the longest past ``P``, the new tokens left-padded to the longest ``N``."""
        last, self._batch = self._batch, None
        chunk, sticky = _in_batch_order(chunk, last)
        b_size = len(chunk)
        pasts = [0 if e is None else len(e.ids) for _, _, e, _ in chunk]
        news = [len(n) for _, _, _, n in chunk]
        P, N = max(pasts), max(news)
        ids = torch.full((b_size, N), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b_size, P + N, dtype=torch.long)
        position = torch.zeros(b_size, N, dtype=torch.long)
        for b, ((_, _, _, new), p, n) in enumerate(zip(chunk, pasts, news, strict=True)):
            ids[b, N - n :] = torch.tensor(new)
            mask[b, P - p : P] = 1
            mask[b, P + N - n :] = 1
            position[b, N - n :] = torch.arange(p, p + n)
        cache = None
        reused = b_size == 1 and chunk[0][2] is not None and chunk[0][2].cache is not None
        if reused:  # one session alone: its own cache object, no copy (the forward appends to it)
            cache = chunk[0][2].cache  # type: ignore[union-attr]
        elif sticky:  # the previous batch's sessions again, put in its order: its cache as is (module docstring)
            cache = last.cache  # type: ignore[union-attr]
            mask = torch.cat([last.mask, torch.ones(b_size, 1, dtype=mask.dtype)], dim=1)  # type: ignore[union-attr]
            self.counters["batch_reused"] += 1
        elif P > 0:
            from transformers import DynamicCache

            layers = []
            first = next(e for _, _, e, _ in chunk if e is not None)
            for layer in range(len(first.keys)):
                kv = []
                for which in ("keys", "values"):
                    ref = getattr(first, which)[layer]
                    t = ref.new_zeros(b_size, ref.shape[0], P, ref.shape[2])
                    for b, (_, _, e, _) in enumerate(chunk):
                        if e is not None:
                            t[b, :, P - pasts[b] :] = getattr(e, which)[layer]
                    kv.append(t)
                layers.append(tuple(kv))
            cache = DynamicCache(ddp_cache_data=layers)
        try:
            with self._context(s, [row.perspective for _, row, _, _ in chunk]):
                result = last_logits(
                    self.model,
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=position.to(self.device),
                    past_key_values=cache,
                    use_cache=True,
                )
        except BaseException:
            if reused:  # the cache may hold part of this step now (a batch's entries are views of the old tensors)
                self.cache.drop(chunk[0][1].key)  # type: ignore[arg-type]
            raise
        logits = result.logits[:, -1].float().cpu()
        kv_cache = result.past_key_values
        cacheable = _sliceable_kv_layers(kv_cache, self.window)
        self.counters["forwards"] += 1
        self.counters["tokens"] += sum(news)
        stored: list[_Entry] = []
        width = mask.shape[1]
        for b, ((i, row, _, _), p, n) in enumerate(zip(chunk, pasts, news, strict=True)):
            out[i] = RowOut(logits[b].numpy(), n, p > 0)
            if row.key is None or not cacheable or (self.window is not None and p + n > self.window - 2):
                continue
            start = width - (p + n)  # the row's tokens are the last p + n slots, unless padding splits them
            keep = None if bool(mask[b, start:].all()) else mask[b].nonzero().squeeze(1).to(self.device)
            keys, values = [], []
            for layer in kv_cache.layers:
                k, v = layer.keys[b], layer.values[b]
                keys.append(k[:, start:] if keep is None else k.index_select(-2, keep))
                values.append(v[:, start:] if keep is None else v.index_select(-2, keep))
            own = kv_cache if b_size == 1 else None
            entry = _Entry(tuple(row.ids), keys, values, logits[b], version, row.perspective, time.monotonic(), own)
            self.cache.put(row.key, entry)
            stored.append(entry)
        if b_size > 1 and len(stored) == b_size and self.window is None:
            self._batch = _Batch(kv_cache, mask, tuple(stored))


def _in_batch_order(chunk: list, last: _Batch | None) -> tuple[list, bool]:
    """``(chunk, True)`` in ``last``'s row order when ``chunk`` is one decode token for each of exactly the
    sessions ``last`` stored (in any order: they come back from the batcher as they arrive), else as given."""
    if last is None or len(chunk) < 2 or len(chunk) != len(last.entries):
        return chunk, False
    order = {id(e): j for j, e in enumerate(last.entries)}
    if any(e is None or id(e) not in order or len(n) != 1 for _, _, e, n in chunk):
        return chunk, False
    ranked = sorted(chunk, key=lambda r: order[id(r[2])])
    if any(r[2] is not e for r, e in zip(ranked, last.entries, strict=True)):  # a session listed twice
        return chunk, False
    return ranked, True


__all__ = ["EngineBase", "Row", "RowOut", "SessionCache", "Steering", "StepEngine", "kv_layer_kinds", "sliding_window"]
