"""Steering-vector math (DESIGN §1 step 2): readout activations, feature differences, pooling, sparsity.

For feedback pairs ``(with_n, without_n)`` of a perspective ``p`` the vector is the mean difference of the
readout activations, ``v_p = mean_n [f(h_with) - f(h_without)]``, where ``f`` is the SAE encoder (modes
``sae`` and ``residual``: ``v_p`` lives in SAE feature space, ``[d_sae]``) or the identity (mode ``caa``,
the no-SAE baseline: ``v_p`` lives in the residual stream, ``[d_model]``). ``residual`` differs from
``sae`` only in how the vector is applied (``h + c·v @ W_dec``, see :func:`project`).

*Fine* vectors are one per perspective; the *coarse* vector pools every pair of the task, which is the
sample-weighted mean of the fine vectors (:func:`pool`). All of it is batched: the readouts of every
prompt of every perspective run in length-sorted batches through :func:`sae.hooks.residuals`.
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
    "pool",
    "project",
    "readout_residuals",
    "sparsify",
]
