"""Sparse TopK kernels: encode with one dense matmul, decode and back-propagate through the active latents only.

A TopK SAE touches ``k`` of ``d_sae`` latents per token, so everything after the encoder matmul can be sparse:

- :func:`topk_select` picks the exact top ``k`` of each row (a two-stage search over strided groups on CPU);
- :class:`SparsePlan` holds the ``[rows, K]`` latent indices of a batch and computes ``Gᵀ @ dense`` products
  (the weight gradients of both encoder and decoder) as one CSR sparse matmul, sorting the indices once;
- :func:`topk_encode` and :func:`sparse_decode` are autograd functions with hand-written backward passes:
  the encoder's weight gradient is ``Gᵀ @ x`` over the active entries (no dense ``[rows, d_sae]`` gradient),
  the decoder is an embedding-bag over the active rows of ``W_dec``.

EleutherAI's sparsify uses the same idea (fused encoder + embedding-bag decoder); here the weight gradients
are CSR matmuls, the encoder matmul may run in bfloat16 (AMX on recent Xeons, tensor cores on GPUs) with the
selected values recomputed exactly in float32, and the two kernels share one sort of the indices.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["csr", "dense"]
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


def topk_select(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The exact top ``k`` values of each row of ``pre [rows, m]`` and their column indices (unsorted).

    For wide rows on CPU, a two-stage search is faster than ``torch.topk``: split the columns into ``s``
    strided groups, keep the ``k`` groups with the largest maxima, and select among their ``k·s`` members.
    It is exact: any element of the top ``k`` has at most ``k - 1`` larger elements, so at most ``k - 1``
    other groups can have a larger maximum than its group's.
    """
    rows, m = pre.shape
    stride = 8
    if pre.device.type != "cpu" or m % stride or m // stride < 4 * k:
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return values, indices
    groups = m // stride
    group_max = pre.view(rows, stride, groups).amax(1)  # group j holds columns j, j + groups, j + 2·groups, ...
    top_groups = group_max.topk(k, dim=-1, sorted=False).indices  # [rows, k]
    offsets = torch.arange(stride, device=pre.device).mul_(groups).view(1, stride, 1)
    columns = (top_groups.unsqueeze(1) + offsets).view(rows, stride * k)
    values, pos = pre.gather(1, columns).topk(k, dim=-1, sorted=False)
    return values, columns.gather(1, pos)


class SparsePlan:
    """The latent indices ``idx [rows, K]`` of one batch, and products with their transpose.

    ``transposed_matmul(values, dense)`` returns ``out [num_latents, d]`` with
    ``out[idx[n, j]] += values[n, j] * dense[n]`` for every entry: the weight gradient of an encoder or
    decoder whose only non-zero activations are at ``idx``. The CSR structure is built once per batch.
    """

    def __init__(self, num_latents: int, backend: Backend = "csr", dense_dtype: torch.dtype | None = None) -> None:
        self.num_latents = num_latents
        self.backend = backend
        self.dense_dtype = dense_dtype  # the "dense" backend's matmul dtype (e.g. bf16 on GPUs); None: as given
        self.idx: Tensor | None = None
        self._order: Tensor | None = None
        self._crow: Tensor | None = None
        self._cols: Tensor | None = None

    def set(self, idx: Tensor) -> None:
        self.idx = idx
        self._order = self._crow = self._cols = None

    def _structure(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._order is None:
            assert self.idx is not None, "SparsePlan.set(idx) was not called"
            width = self.idx.shape[1]
            flat = self.idx.reshape(-1)
            order = torch.argsort(flat)
            counts = torch.bincount(flat, minlength=self.num_latents)
            crow = torch.zeros(self.num_latents + 1, dtype=torch.int64, device=flat.device)
            torch.cumsum(counts, 0, out=crow[1:])
            self._order, self._crow, self._cols = order, crow, torch.div(order, width, rounding_mode="floor")
        return self._order, self._crow, self._cols  # type: ignore[return-value]

    def transposed_matmul(self, values: Tensor, dense: Tensor) -> Tensor:
        """``Gᵀ @ dense`` where ``G [rows, num_latents]`` holds ``values`` at ``idx``."""
        assert self.idx is not None, "SparsePlan.set(idx) was not called"
        rows = self.idx.shape[0]
        values = values.to(dense.dtype)
        if self.backend == "dense":
            dtype = self.dense_dtype or dense.dtype
            g = torch.zeros(rows, self.num_latents, dtype=dtype, device=dense.device)
            g.scatter_(1, self.idx, values.to(dtype))
            return (g.T @ dense.to(dtype)).to(dense.dtype)
        order, crow, cols = self._structure()
        gt = torch.sparse_csr_tensor(
            crow, cols, values.reshape(-1)[order], size=(self.num_latents, rows), check_invariants=False
        )
        return torch.sparse.mm(gt, dense)


def gather_dot(dense: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """``out[n, j] = dense[n] · weight[idx[n, j]]`` without materialising ``weight[idx]``."""
    rows, width = idx.shape
    flat = idx.reshape(-1)
    offsets = torch.arange(0, rows * width, width, device=idx.device)
    bags = torch.arange(rows, device=idx.device).repeat_interleave(width)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        dense.contiguous(), weight, flat, offsets, bags, 0, -1
    )
    return out.view(rows, width)


class _TopKEncode(torch.autograd.Function):
    """``vals, idx = TopK(relu((x - b_dec) @ weightᵀ + b_enc))`` with a sparse backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        k: int,
        plan: SparsePlan,
        low_precision: torch.dtype | None,
    ) -> tuple[Tensor, Tensor]:
        xc = x - b_dec
        if low_precision is not None:
            pre = F.linear(xc.to(low_precision), weight.to(low_precision))
            _, idx = topk_select(pre, k)
            vals = gather_dot(xc, weight, idx) + b_enc[idx]  # exact float32 values of the selected latents
        else:
            pre = torch.addmm(b_enc, xc, weight.T)
            vals, idx = topk_select(pre, k)
        del pre
        vals = vals.relu_()
        plan.set(idx)
        ctx.plan = plan
        ctx.save_for_backward(xc, weight, vals)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals: Tensor, _grad_idx: Tensor | None):  # type: ignore[override]
        xc, weight, vals = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        g = grad_vals * (vals > 0)
        grad_weight = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[1]:
            grad_weight = plan.transposed_matmul(g, xc).to(weight.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_b_enc = torch.zeros(weight.shape[0], dtype=g.dtype, device=g.device)
            grad_b_enc.index_add_(0, plan.idx.reshape(-1), g.reshape(-1))  # type: ignore[union-attr]
            if ctx.needs_input_grad[3]:
                grad_b_dec = -(grad_b_enc @ weight)
        return None, grad_weight, grad_b_enc, grad_b_dec, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``out[n] = Σ_j vals[n, j] · W_dec[idx[n, j]]`` (an embedding bag) with a sparse backward."""

    @staticmethod
    def forward(ctx, vals: Tensor, idx: Tensor, W_dec: Tensor, plan: SparsePlan) -> Tensor:  # type: ignore[override]
        out = F.embedding_bag(idx, W_dec, per_sample_weights=vals.to(W_dec.dtype), mode="sum")
        ctx.plan = plan
        ctx.save_for_backward(vals, idx, W_dec)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        vals, idx, W_dec = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_vals = gather_dot(grad_out, W_dec, idx).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            if plan.idx is not idx:
                plan = SparsePlan(W_dec.shape[0], plan.backend, plan.dense_dtype)
                plan.set(idx)
            grad_W = plan.transposed_matmul(vals, grad_out).to(W_dec.dtype)
        return grad_vals, None, grad_W, None


def topk_encode(
    x: Tensor,
    weight: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    plan: SparsePlan,
    low_precision: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """TopK encoder over ``weight [d_sae, d_in]`` (rows are latents); returns ``(vals, idx)`` of shape
    ``[rows, k]``. ``low_precision`` (e.g. ``torch.bfloat16``) runs the dense matmul in that dtype and
    recomputes the selected values in float32."""
    return _TopKEncode.apply(x, weight, b_enc, b_dec, k, plan, low_precision)  # type: ignore[return-value]


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, plan: SparsePlan) -> Tensor:
    """``Σ_j vals[:, j] · W_dec[idx[:, j]]``: decode from the active latents only (no ``b_dec``)."""
    return _SparseDecode.apply(vals, idx, W_dec, plan)  # type: ignore[return-value]


__all__ = ["SparsePlan", "gather_dot", "sparse_decode", "topk_encode", "topk_select"]
