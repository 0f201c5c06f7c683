"""The fused step engine: the K steered rows (and the unsteered row) of a session share the model below the
steering layer.

Steering edits the residual stream at the *output* of block ``L``, so blocks ``0..L`` see the same tokens
and compute the same states — and the same KV cache — for every row of a session. Each step therefore runs
in two passes:

1. the *trunk*: one row per session through blocks ``0..L`` (a hook stops the forward there), with a
   batch-1 KV cache per session for those blocks;
2. the *head*: every row of every session through blocks ``L+1..`` and the LM head, starting from the trunk's
   output (blocks ``0..L`` are swapped for stubs that pass it on, the steering hook sits on the stub of
   block ``L``), with a per-session ``rows``-wide KV cache for those blocks.

For SmolLM2 steered at layer 15 of 30, K = 3 with the unsteered row costs about 16 + 14·4 block-rows per
token instead of 30·4. A session's caches are used as they are when it runs alone (no copies), and are
left-padded and stacked when several sessions share a step. The module swap relies on the model calling
its decoder blocks in order and passing hidden states through as a tensor (Llama, Qwen, Mistral, Gemma
in transformers 5): :func:`self_check` compares the result with :class:`serve.engine.StepEngine` once per
replica, and the replica falls back to that engine when they differ.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sae.decoding import last_logits
from sae.hooks import decoder_layers, resolve_layer
from serve.engine import EngineBase, Row, RowOut, SessionCache, Steering, StepEngine


class _Stop(Exception):
    """Raised after the trunk's last block: the rest of the forward is not needed."""


class _Skip(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Inject(nn.Module):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hidden


@dataclass
class _Session:
    ids: tuple[int, ...]
    perspectives: tuple[str | None, ...]
    version: Any
    trunk: Any  # DynamicCache, batch 1, blocks 0..L
    head: Any  # DynamicCache, batch len(perspectives), blocks L+1..
    logits: torch.Tensor  # [rows, vocab] after ids
    touched: float

    @property
    def nbytes(self) -> int:
        total = 0
        for cache, first in ((self.trunk, 0), (self.head, None)):
            for i, layer in enumerate(cache.layers):
                if (first is None and i <= self.layer) or (first is not None and i > self.layer):
                    continue
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total

    layer: int = 0


def _group_key(group: str) -> str:
    return f"{group}/#fused"


class FusedEngine(EngineBase):
    """:class:`serve.engine.StepEngine`'s ``step`` for rows grouped by session (``Row.group``: rows of a group
    have the same ids), computing the blocks below the steering layer once per group."""

    def __init__(
        self,
        model: nn.Module,
        *,
        steering: Callable[[], Steering],
        cache: SessionCache | None = None,
        max_rows: int = 32,
        max_tokens: int = 8192,
        pad_id: int = 0,
    ) -> None:
        super().__init__(model, steering=steering, cache=cache, max_rows=max_rows, max_tokens=max_tokens, pad_id=pad_id)
        self.blocks = decoder_layers(model)
        self._plain = StepEngine(model, steering=steering, cache=SessionCache(0), pad_id=pad_id)  # checks sets

    def step(self, rows: Sequence[Row]) -> list[RowOut]:
        s = self._plain._current()
        assert s is not None, "the fused engine needs a vector set"
        layer = resolve_layer(self.model, s.vector_set.meta.layer)
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            self._check_row(row, s)
            groups.setdefault(row.group if row.group is not None else uuid.uuid4().hex, []).append(i)
        out: list[RowOut | None] = [None] * len(rows)
        decode, replay = [], []
        for group, members in groups.items():
            ids = list(rows[members[0]].ids)
            if any(list(rows[i].ids) != ids for i in members):
                raise ValueError(f"the rows of group {group!r} must have the same token ids")
            perspectives = tuple(rows[i].perspective for i in members)
            cached = rows[members[0]].key is not None
            entry = self.cache.get(_group_key(group)) if cached else None
            if entry is not None and (
                entry.version != s.version
                or entry.perspectives != perspectives
                or len(entry.ids) > len(ids)
                or tuple(ids[: len(entry.ids)]) != entry.ids
            ):
                entry = None
            if entry is not None and len(entry.ids) == len(ids):
                for j, i in enumerate(members):
                    out[i] = RowOut(entry.logits[j].numpy(), 0, True)
                self.counters["hits"] += len(members)
                continue
            if entry is not None and len(ids) - len(entry.ids) == 1:
                decode.append((group, members, ids, entry, perspectives, cached))
                self.counters["hits"] += len(members)
            else:
                replay.append((group, members, ids, None, perspectives, cached))
                self.counters["replays"] += len(members)
        replay.sort(key=lambda g: len(g[2]))
        for batch in (decode, replay):
            start = 0
            while start < len(batch):
                end, n_rows = start + 1, len(batch[start][1])
                while end < len(batch):
                    n_rows += len(batch[end][1])
                    longest = max(len(g[2]) - (len(g[3].ids) if g[3] else 0) for g in batch[start : end + 1])
                    if n_rows > self.max_rows or n_rows * longest > self.max_tokens:
                        break
                    end += 1
                self._run(batch[start:end], out, s, layer)
                start = end
        self.counters["rows"] += len(rows)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _run(self, groups: list, out: list, s: Steering, layer: int) -> None:
        device = next(self.model.parameters()).device
        n_groups = len(groups)
        pasts = [len(g[3].ids) if g[3] is not None else 0 for g in groups]
        news = [len(g[2]) - p for g, p in zip(groups, pasts, strict=True)]
        P, N = max(pasts), max(news)
        ids = torch.full((n_groups, N), self.pad_id, dtype=torch.long)
        mask = torch.zeros(n_groups, P + N, dtype=torch.long)
        position = torch.zeros(n_groups, N, dtype=torch.long)
        for b, (g, p, n) in enumerate(zip(groups, pasts, news, strict=True)):
            ids[b, N - n :] = torch.tensor(g[2][p:])
            mask[b, P - p : P] = 1
            mask[b, P + N - n :] = 1
            position[b, N - n :] = torch.arange(p, p + n)
        alone = n_groups == 1 and groups[0][3] is not None
        trunk = groups[0][3].trunk if alone else self._stack(groups, "trunk", pasts, P, range(layer + 1))
        head = groups[0][3].head if alone else self._stack(groups, "head", pasts, P, range(layer + 1, len(self.blocks)))
        ids, mask, position = ids.to(device), mask.to(device), position.to(device)

        # pass 1: the trunk, one row per session, stopped after block `layer`; pass 2: every row from `layer + 1`
        try:
            return self._passes(groups, out, s, layer, alone, trunk, head, ids, mask, position, pasts, news, P, N)
        except BaseException:
            if alone:  # its caches may hold part of this step now
                self.cache.drop(_group_key(groups[0][0]))
            raise

    def _passes(self, groups, out, s, layer, alone, trunk, head, ids, mask, position, pasts, news, P, N) -> None:
        device = ids.device
        n_groups = len(groups)
        captured: dict[str, torch.Tensor] = {}

        def stop(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        handle = self.blocks[layer].register_forward_hook(stop)
        try:
            self.model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=trunk, use_cache=True)
        except _Stop:
            pass
        finally:
            handle.remove()
        hidden = captured["h"]

        row_group = torch.tensor([b for b, g in enumerate(groups) for _ in g[1]], device=device)
        n_rows = len(row_group)
        proto = trunk.layers[0].keys
        fake = proto.new_zeros(()).expand(n_rows, proto.shape[1], P, proto.shape[3])
        for i in range(layer + 1):  # only the length of blocks 0..layer matters to the mask: no memory
            head.layers[i].keys, head.layers[i].values = fake, fake
            head.layers[i].dtype, head.layers[i].device, head.layers[i].is_initialized = proto.dtype, device, P > 0
        originals = [self.blocks[i] for i in range(layer + 1)]
        perspectives = [p for g in groups for p in g[4]]
        try:
            for i in range(layer):
                self.blocks[i] = _Skip()
            self.blocks[layer] = _Inject(hidden.index_select(0, row_group))
            with self._plain._context(s, perspectives):
                result = last_logits(
                    self.model,
                    input_ids=ids.index_select(0, row_group),
                    attention_mask=mask.index_select(0, row_group),
                    position_ids=position.index_select(0, row_group),
                    past_key_values=head,
                    use_cache=True,
                )
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
        logits = result.logits[:, -1].float().cpu()
        self.counters["forwards"] += 1
        self.counters["tokens"] += sum(len(g[1]) * n for g, n in zip(groups, news, strict=True))

        start = 0
        for b, (g, p, n) in enumerate(zip(groups, pasts, news, strict=True)):
            group, members, full, _, persp, cached = g
            rows = slice(start, start + len(members))
            for j, i in enumerate(members):
                out[i] = RowOut(logits[start + j].numpy(), n, p > 0)
            start += len(members)
            if not cached:
                continue
            if alone or (n_groups == 1 and p == 0):
                g_trunk, g_head = trunk, head
            else:
                keep = torch.cat([torch.arange(P - p, P), torch.arange(P + N - n, P + N)]).to(device)
                g_trunk = self._slice(trunk, slice(b, b + 1), keep, range(layer + 1))
                g_head = self._slice(head, rows, keep, range(layer + 1, len(self.blocks)))
            entry = _Session(tuple(full), persp, s.version, g_trunk, g_head, logits[rows], time.monotonic(), layer)
            self.cache.put(_group_key(group), entry)

    def _stack(self, groups: list, which: str, pasts: list[int], P: int, layers: range) -> Any:
        """A new cache whose ``layers`` hold the groups' ``which`` caches, left-padded to ``P`` and stacked."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        sizes = [1 if which == "trunk" else len(g[1]) for g in groups]
        if P == 0:
            return cache
        ref_entry = next(g[3] for g in groups if g[3] is not None)
        for i in layers:
            ref = getattr(ref_entry, which).layers[i]
            kv = []
            for attr in ("keys", "values"):
                t = getattr(ref, attr).new_zeros(
                    sum(sizes), getattr(ref, attr).shape[1], P, getattr(ref, attr).shape[3]
                )
                at = 0
                for g, p, size in zip(groups, pasts, sizes, strict=True):
                    if g[3] is not None and p > 0:
                        t[at : at + size, :, P - p :] = getattr(getattr(g[3], which).layers[i], attr)
                    at += size
                kv.append(t)
            layer = cache.layers[i]
            layer.keys, layer.values = kv
            layer.dtype, layer.device, layer.is_initialized = kv[0].dtype, kv[0].device, True
        return cache

    def _slice(self, cache: Any, rows: slice, keep: torch.Tensor, layers: range) -> Any:
        from transformers import DynamicCache

        out = DynamicCache(config=self.model.config)
        for i in layers:
            src, dst = cache.layers[i], out.layers[i]
            dst.keys = src.keys[rows].index_select(-2, keep)
            dst.values = src.values[rows].index_select(-2, keep)
            dst.dtype, dst.device, dst.is_initialized = dst.keys.dtype, dst.keys.device, True
        return out


def self_check(model: nn.Module, steering: Callable[[], Steering], pad_id: int) -> str | None:
    """``None`` if :class:`FusedEngine` matches :class:`serve.engine.StepEngine` on this model (a replay, a
    decode step, and two sessions in one step); else what differed."""
    s = steering()
    p = s.vector_set.perspectives[0]
    plain = StepEngine(model, steering=steering, pad_id=pad_id)
    fused = FusedEngine(model, steering=steering, pad_id=pad_id)
    a, b = [11, 12, 13, 14, 15], [21, 22, 23]
    try:
        for step in range(3):
            seq_a, seq_b = a + list(range(40, 40 + step)), b + list(range(50, 50 + step))
            rows = [Row("a/p", seq_a, p, "a"), Row("a/-", seq_a, None, "a")]
            if step > 0:
                rows += [Row("b/p", seq_b, p, "b"), Row("b/-", seq_b, None, "b")]
            want = plain.step(rows)
            got = fused.step(rows)
            for w, g in zip(want, got, strict=True):
                diff = float((torch.from_numpy(w.logits) - torch.from_numpy(g.logits)).abs().max())
                if not diff < 1e-3:
                    return f"logits differ by {diff:.3g} at step {step}"
    except Exception as err:  # a model family the stubs do not fit
        return f"{type(err).__name__}: {err}"
    return None


__all__ = ["FusedEngine", "self_check"]
