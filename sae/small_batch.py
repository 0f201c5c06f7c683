"""Faster linear layers for a forward of a few rows on CPU (a decoding step of 2-4 sequences).

``F.linear(x, W)`` computes ``x @ W.T``; for ``x`` of a few rows the CPU GEMM it calls can be far from the
memory-bound speed that one row (a GEMV) reaches. Computing the same product as ``(W @ x.T).T`` hands the
BLAS a problem with the long dimension first. Measured with MKL on this project's AMD EPYC machines, one
torch thread, float32 (DRAM-resident weights): the embedded model's LM head (49152 x 576) at 4 rows took
18.3 ms with ``F.linear`` and 9.3 ms transposed; its MLP projections (1536 x 576) 0.43 -> 0.30 ms; a whole
decoding step of the model at 2 rows 76.3 -> 60.0 ms, at 4 rows 82.5 -> 66.0 ms, and the fused engine's PD
K=3 step (4 rows above the steering layer) 69.7 -> 58.9 ms (``benchmarks/small_batch.py``). At one row and
at 16 rows the two are alike and at 8 the transposed path was slower (97 -> 108 ms), so only
``2 <= rows <= max_rows`` take it.

Whether it pays depends on the BLAS and the CPU, so :func:`tune` measures a few-row step of the model both
ways and keeps the transposed path only where it is faster. Results differ from ``F.linear`` by float
rounding only (the same products, summed in another order).
"""

from __future__ import annotations

import statistics
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 4  # at 8 rows the transposed path was slower here (benchmarks/small_batch.py)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 2 <= rows <= self._small_batch_rows:
        return F.linear(x, self.weight, self.bias)
    y = (self.weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous()
    if self.bias is not None:
        y += self.bias
    return y.reshape(*x.shape[:-1], self.weight.shape[0])


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


def patch(model: nn.Module, max_rows: int = MAX_ROWS) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the transposed path for ``2..max_rows`` rows; returns how many."""
    if max_rows < 2:
        raise ValueError("max_rows must be >= 2")
    linears = _linears(model)
    for m in linears:
        m._small_batch_rows = max_rows
        m.forward = types.MethodType(_forward, m)
    return len(linears)


def unpatch(model: nn.Module) -> None:
    """Undo :func:`patch`."""
    for m in _linears(model):
        if "forward" in m.__dict__ and getattr(m.forward, "__func__", None) is _forward:
            del m.forward
            del m._small_batch_rows


def patched(model: nn.Module) -> bool:
    return any(getattr(m.forward, "__func__", None) is _forward for m in _linears(model))


@contextmanager
def small_batches(model: nn.Module, max_rows: int = MAX_ROWS) -> Iterator[nn.Module]:
    """``with small_batches(model):`` the transposed path, undone on exit."""
    patch(model, max_rows)
    try:
        yield model
    finally:
        unpatch(model)


@dataclass(frozen=True)
class Tuning:
    used: bool  # the transposed path is on
    plain_ms: float  # median ms of a ``rows``-row one-token forward with F.linear
    transposed_ms: float  # ... and with the transposed path
    rows: int

    def describe(self) -> str:
        ratio = self.plain_ms / self.transposed_ms if self.transposed_ms else float("nan")
        return (f"{self.rows}-row step {self.plain_ms:.1f} ms plain, {self.transposed_ms:.1f} ms transposed "
                f"({ratio:.2f}x): {'on' if self.used else 'off'}")  # fmt: skip


@torch.inference_mode()
def tune(model: nn.Module, rows: int = 4, reps: int = 3, margin: float = 0.05, max_rows: int = MAX_ROWS) -> Tuning:
    """Time a ``rows``-row one-token forward of ``model`` both ways (alternating, ``reps`` each, after a warm-up)
    and leave the transposed path on if its median is more than ``margin`` faster. CPU float32 only: on any
    other device or dtype nothing is changed (``used`` false, no timing)."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or not _linears(model):
        return Tuning(False, 0.0, 0.0, rows)
    ids = torch.zeros(rows, 1, dtype=torch.long)
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        for rep in range(reps + 1):
            for on in (False, True):
                if on:
                    patch(model, max_rows)
                started = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                if rep:  # the first round warms up
                    times[on].append(1000 * (time.perf_counter() - started))
                unpatch(model)
    finally:
        unpatch(model)
    plain, transposed = statistics.median(times[False]), statistics.median(times[True])
    used = transposed < (1 - margin) * plain
    if used:
        patch(model, max_rows)
    return Tuning(used, plain, transposed, rows)


__all__ = ["MAX_ROWS", "Tuning", "patch", "patched", "small_batches", "tune", "unpatch"]
