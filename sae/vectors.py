"""Steering-vector math (DESIGN §1 step 2): readout activations, feature differences, pooling, sparsity.

For feedback pairs ``(with_n, without_n)`` of a perspective ``p`` the vector is the mean difference of the
readout activations, ``v_p = mean_n [f(h_with) - f(h_without)]``, where ``f`` is the SAE encoder (modes
``sae`` and ``residual``: ``v_p`` lives in SAE feature space, ``[d_sae]``) or the identity (mode ``caa``,
the no-SAE baseline: ``v_p`` lives in the residual stream, ``[d_model]``). ``residual`` differs from
``sae`` only in how the vector is applied (``h + c·v @ W_dec``, see :func:`project`).

*Fine* vectors are one per perspective; the *coarse* vector pools every pair of the task, which is the
sample-weighted mean of the fine vectors (:func:`pool`). All of it is batched: the readouts of every
prompt of every perspective run in length-sorted batches that stop after the readout layer
(:func:`readout_residuals`), and :func:`paired_readouts` runs the prefix a (with, without) pair shares
only once, through a KV cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from sae.hooks import SAELike, residuals

VectorMode = Literal["sae", "residual", "caa"]
VECTOR_MODES: tuple[str, ...] = ("sae", "residual", "caa")
Granularity = Literal["fine", "coarse"]
GRANULARITIES: tuple[str, ...] = ("fine", "coarse")


def _pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


@torch.inference_mode()
def readout_residuals(
    model: nn.Module,
    layer: int,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[int],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    max_batch_tokens: int = 8192,
) -> torch.Tensor:
    """The residual after block ``layer`` at one position per sequence: ``[len(sequences), d_model]`` (fp32).

    ``positions[i]`` indexes the unpadded ``sequences[i]`` (negative counts from the end, ``-1`` = last
    token). Sequences are sorted by length and left-padded into batches of at most ``batch_size`` rows and
    ``max_batch_tokens`` padded tokens; each batch is one forward that stops after ``layer``.
    """
    if len(sequences) != len(positions):
        raise ValueError(f"{len(sequences)} sequences but {len(positions)} readout positions")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("every sequence needs at least one token")
    for i, (s, p) in enumerate(zip(sequences, positions, strict=True)):
        if not -len(s) <= p < len(s):
            raise ValueError(f"readout position {p} is outside sequence {i} of length {len(s)}")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: torch.Tensor | None = None
    start = 0
    while start < len(order):
        end = start + 1
        while (
            end < len(order)
            and end - start < batch_size
            and (end - start + 1) * len(sequences[order[end]]) <= max_batch_tokens
        ):
            end += 1
        chunk = order[start:end]
        ids, mask = _pad_left([sequences[i] for i in chunk], pad_id)
        hidden = residuals(model, [layer], ids.to(device), mask.to(device))[layer]
        width = ids.shape[1]
        index = torch.tensor([width - len(sequences[i]) + (positions[i] % len(sequences[i])) for i in chunk])
        rows = hidden[torch.arange(len(chunk)), index.to(hidden.device)].float().cpu()
        if out is None:
            out = torch.empty(len(sequences), rows.shape[-1])
        out[torch.tensor(chunk)] = rows
        start = end
    assert out is not None
    return out


def _run_to(model: nn.Module, layer: int, **inputs: object) -> torch.Tensor:
    """The output of block ``layer`` for one forward (with whatever cache it is given); later blocks never run."""
    return residuals(model, [layer], **inputs)[layer]  # type: ignore[arg-type]


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def paired_readouts(
    model: nn.Module,
    layer: int,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    positions: Sequence[tuple[int, int]],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    max_batch_tokens: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Readouts of ``(with, without)`` prompt pairs, running each pair's shared token prefix only once.

    The prefix runs into a KV cache (stopping after ``layer``), the cache is duplicated, and only the two
    suffixes run on top of it. Returns ``(h_with, h_without, tokens computed)``; equal, up to float error,
    to :func:`readout_residuals` of every prompt, at the cost of ``prefix + both suffixes`` tokens per pair
    instead of ``2 x prefix + both suffixes``. Pairs with no usable shared prefix run whole.
    """
    from transformers import DynamicCache

    if len(pairs) != len(positions):
        raise ValueError(f"{len(pairs)} pairs but {len(positions)} readout position pairs")
    pos = [(pw % len(w), po % len(o)) for (w, o), (pw, po) in zip(pairs, positions, strict=True)]
    # the prefix must end before both readout tokens, so each readout lies in its own suffix
    shared = [min(_shared_prefix(w, o), pw, po) for (w, o), (pw, po) in zip(pairs, pos, strict=True)]
    h_with = torch.empty(0)
    h_without = torch.empty(0)
    whole = [i for i, s in enumerate(shared) if s == 0]
    tokens = 0
    if whole:
        seqs = [pairs[i][k] for i in whole for k in (0, 1)]
        rows = readout_residuals(
            model, layer, seqs, [pos[i][k] for i in whole for k in (0, 1)], pad_id=pad_id,
            batch_size=batch_size, max_batch_tokens=max_batch_tokens,
        )  # fmt: skip
        tokens += sum(len(s) for s in seqs)
    device = next(model.parameters()).device
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if whole:
        results.update({i: (rows[2 * j], rows[2 * j + 1]) for j, i in enumerate(whole)})
    todo = sorted((i for i, s in enumerate(shared) if s > 0), key=lambda i: max(len(pairs[i][0]), len(pairs[i][1])))
    start = 0
    while start < len(todo):
        end = start + 1
        while (
            end < len(todo)
            and 2 * (end - start + 1) <= batch_size
            and 2 * (end - start + 1) * max(len(pairs[todo[end]][0]), len(pairs[todo[end]][1])) <= max_batch_tokens
        ):
            end += 1
        chunk = todo[start:end]
        prefix_ids, prefix_mask = _pad_left([pairs[i][0][: shared[i]] for i in chunk], pad_id)
        cache = DynamicCache(config=model.config)
        _run_to(
            model, layer, input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
            position_ids=(prefix_mask.cumsum(-1) - 1).clamp_min(0).to(device), past_key_values=cache, use_cache=True,
        )  # fmt: skip
        cache.batch_repeat_interleave(2)
        suffixes = [pairs[i][k][shared[i] :] for i in chunk for k in (0, 1)]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(suffixes):  # right-padded: causal attention never lets a real token see the pads
            ids[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[r, : len(s)] = 1
        starts = torch.tensor([shared[i] for i in chunk]).repeat_interleave(2)
        hidden = _run_to(
            model,
            layer,
            input_ids=ids.to(device),
            attention_mask=torch.cat([prefix_mask.repeat_interleave(2, 0), mask], dim=-1).to(device),
            position_ids=(starts[:, None] + torch.arange(width)[None]).to(device),
            past_key_values=cache,
            use_cache=True,
        )
        for j, i in enumerate(chunk):
            w = hidden[2 * j, pos[i][0] - shared[i]].float().cpu()
            o = hidden[2 * j + 1, pos[i][1] - shared[i]].float().cpu()
            results[i] = (w, o)
        tokens += sum(shared[i] for i in chunk) + sum(len(s) for s in suffixes)
        start = end
    if results:
        h_with = torch.stack([results[i][0] for i in range(len(pairs))])
        h_without = torch.stack([results[i][1] for i in range(len(pairs))])
    return h_with, h_without, tokens


@torch.inference_mode()
def encode(sae: SAELike, h: torch.Tensor, *, batch_size: int = 4096) -> torch.Tensor:
    """SAE feature activations of residuals ``h [n, d_model]`` in batches: ``[n, d_sae]`` fp32 on CPU."""
    device = sae.W_dec.device
    parts = [sae.encode(chunk.to(device, sae.W_dec.dtype)).float().cpu() for chunk in h.split(batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, sae.W_dec.shape[0])


def differences(
    h_with: torch.Tensor, h_without: torch.Tensor, *, mode: VectorMode, sae: SAELike | None = None
) -> torch.Tensor:
    """Per-pair differences ``f(h_with) - f(h_without)``: SAE features for ``sae``/``residual``, raw for ``caa``."""
    if h_with.shape != h_without.shape:
        raise ValueError(f"with/without readouts differ in shape: {tuple(h_with.shape)} vs {tuple(h_without.shape)}")
    if mode not in VECTOR_MODES:
        raise ValueError(f"mode must be one of {VECTOR_MODES}, got {mode!r}")
    if mode == "caa":
        return (h_with - h_without).float()
    if sae is None:
        raise ValueError(f"mode {mode!r} needs an SAE")
    return encode(sae, h_with) - encode(sae, h_without)


def mean_by_group(diffs: torch.Tensor, groups: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Fine vectors: the mean of ``diffs`` rows per group, and the number of rows of each group."""
    if diffs.shape[0] != len(groups):
        raise ValueError(f"{diffs.shape[0]} difference rows but {len(groups)} group labels")
    names = list(dict.fromkeys(groups))
    index = torch.tensor([names.index(g) for g in groups])
    sums = torch.zeros(len(names), diffs.shape[1], dtype=torch.float64).index_add_(0, index, diffs.double())
    counts = torch.bincount(index, minlength=len(names))
    means = (sums / counts[:, None]).float()
    return {n: means[i] for i, n in enumerate(names)}, {n: int(counts[i]) for i, n in enumerate(names)}


def pool(vectors: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> torch.Tensor:
    """The coarse vector: the sample-weighted mean ``Σ n_p v_p / Σ n_p`` of fine vectors (= the mean of all pairs)."""
    if not vectors:
        raise ValueError("no vectors to pool")
    missing = sorted(set(vectors) - set(counts))
    if missing:
        raise ValueError(f"no sample counts for {missing}")
    total = sum(counts[p] for p in vectors)
    if total <= 0:
        raise ValueError("the sample counts sum to 0")
    acc = sum(vectors[p].double() * counts[p] for p in vectors)
    return (acc / total).float()  # type: ignore[union-attr]


def sparsify(vector: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` entries of largest magnitude, zero the rest (``k <= 0`` or ``k >= d``: unchanged)."""
    if k <= 0 or k >= vector.shape[-1]:
        return vector.clone()
    keep = vector.abs().topk(k, dim=-1).indices
    return torch.zeros_like(vector).scatter_(-1, keep, vector.gather(-1, keep))


def project(vector: torch.Tensor, sae: SAELike) -> torch.Tensor:
    """A feature-space vector ``[.., d_sae]`` as a residual-stream shift ``v @ W_dec`` (``[.., d_model]``).

    ``steer(mode="residual")`` adds exactly this; with a linear decoder it equals ``sae`` steering with
    the error term kept.
    """
    return vector.to(sae.W_dec.dtype).to(sae.W_dec.device) @ sae.W_dec


def derive(
    h_with: torch.Tensor,
    h_without: torch.Tensor,
    groups: Sequence[str],
    *,
    mode: VectorMode,
    sae: SAELike | None = None,
    granularity: Granularity = "fine",
    topk: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Steering vectors from paired readouts: ``{perspective: vector}`` and ``{perspective: n pairs}``.

    ``fine``: one vector per group. ``coarse``: every group gets the pooled vector (so a coarse set is
    applied the same way as a fine one). ``topk > 0`` sparsifies each vector after pooling.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    fine, counts = mean_by_group(differences(h_with, h_without, mode=mode, sae=sae), groups)
    if granularity == "coarse":
        pooled = pool(fine, counts)
        fine = {p: pooled for p in fine}
    return {p: sparsify(v, topk) for p, v in fine.items()}, counts


__all__ = [
    "GRANULARITIES",
    "VECTOR_MODES",
    "Granularity",
    "VectorMode",
    "derive",
    "differences",
    "encode",
    "mean_by_group",
    "paired_readouts",
    "pool",
    "project",
    "readout_residuals",
    "sparsify",
]
