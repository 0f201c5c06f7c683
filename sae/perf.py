"""Hardware utilisation: the device's measured matmul peak, and the FLOPs an SAE training step does.

MFU here is ``tokens/s × flops_per_token / peak``, with the peak measured by a short matmul benchmark on
the device itself (in the dtype the encoder matmul runs in), as nanoGPT reports its own utilisation.
"""

from __future__ import annotations

import time

import torch

from sae.train import SPARSE_ARCHITECTURES, TrainingSAE


def matmul_peak_flops(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, size: int = 2048, seconds: float = 0.5
) -> float:
    """FLOP/s of a square ``size`` matmul in ``dtype`` on ``device`` (best of repeated timings)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
        runs += 1
    return 2 * size**3 / best


def flops_per_token(sae: TrainingSAE) -> float:
    """Useful FLOPs per training token: the dense encoder matmul, plus for TopK-family SAEs the sparse
    decode and the sparse backward (``k`` latents), or for dense SAEs the full forward and backward."""
    d, m = sae.d_in, sae.d_sae
    if sae.architecture in SPARSE_ARCHITECTURES:
        k = sae.spec.k  # BatchTopK: k on average
        # encoder fwd (dense) + value recompute; decoder fwd; decoder bwd (values, weights); encoder bwd (weights)
        return 2 * d * m + 2 * k * d + 2 * k * d + 4 * k * d + 2 * k * d
    return 3 * (2 * d * m) * 2  # two dense matmuls, forward + two backward products each


__all__ = ["flops_per_token", "matmul_peak_flops"]
