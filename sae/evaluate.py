"""SAE evaluation: reconstruction metrics on activations, and CE loss recovered with the SAE spliced in.

- :func:`reconstruction_metrics` — MSE, explained variance (``1 - SSE / SST`` around the data mean), L0,
  and the fraction of latents that never fire, over batches of raw activations. Also the explained variance
  over the *other* dimensions when a few hold much of the variance (``dominant_dims``: each with ≥
  ``DOMINANT_FACTOR`` × the mean variance per dimension, as in models whose residual stream has a huge-norm
  dimension): there the headline EV is mostly that dimension's and says little about the rest, which is what
  steering moves.
- :func:`ce_loss_recovered` — next-token loss of the LM clean, with the SAE's reconstruction replacing the
  residual after block ``layer``, and with that residual zeroed: ``(zero - sae) / (zero - clean)``.
  Position 0 (the attention sink, which SAEs are not trained on) is left untouched in both edits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.hooks import decoder_layers, resolve_layer

DOMINANT_FACTOR = 20.0
"""A dimension whose variance is at least this multiple of the mean variance per dimension is dominant."""


@torch.no_grad()
def reconstruction_metrics(sae: Any, batches: Iterable[Tensor], *, device: str | torch.device = "cpu") -> dict:
    """Metrics of ``sae`` (anything with ``encode``/``decode``: ours or sae-lens's) on raw activation
    ``batches`` (``[rows, d_in]`` each)."""
    n, l0 = 0, 0.0
    s1 = s2 = sse = fired = None  # per dimension (float64) / per latent
    for batch in batches:
        x = batch.to(device, torch.float32)
        z = sae.encode(x)
        recon = sae.decode(z)
        err, xd = (recon - x).double().pow(2).sum(0), x.double()
        sse = err if sse is None else sse + err
        s1 = xd.sum(0) if s1 is None else s1 + xd.sum(0)
        s2 = xd.pow(2).sum(0) if s2 is None else s2 + xd.pow(2).sum(0)
        active = z != 0
        l0 += float(active.sum())
        fired = active.any(0) if fired is None else fired | active.any(0)
        n += x.shape[0]
    if n == 0 or s1 is None or s2 is None or sse is None or fired is None:
        raise ValueError("reconstruction_metrics got no activations")
    d = s1.numel()
    sst = s2 - s1.pow(2) / n  # per dimension, around the data mean
    total = float(sst.sum())
    is_dominant = sst >= DOMINANT_FACTOR * total / d
    dominant, rest = is_dominant.nonzero().flatten(), ~is_dominant
    rest_sst = float(sst[rest].sum())
    return {
        "tokens": n,
        "mse": float(sse.sum()) / (n * d),
        "explained_variance": 1.0 - float(sse.sum()) / total,
        "explained_variance_rest": 1.0 - float(sse[rest].sum()) / rest_sst if rest_sst > 0 else float("nan"),
        "dominant_dims": [int(i) for i in dominant],
        "dominant_share": float(sst[dominant].sum()) / total,
        "l0": l0 / n,
        "dead_fraction": 1.0 - float(fired.float().mean()),
    }


def _hidden(output: object) -> Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index,return-value]


@contextmanager
def splice(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor], *, from_position: int = 1) -> Iterator[None]:
    """Replace the residual after block ``layer`` by ``fn(h)`` at positions ``>= from_position``."""
    block = decoder_layers(model)[resolve_layer(model, layer)]

    def hook(_module: nn.Module, _inputs: object, output: object) -> object:
        h = _hidden(output)
        new = h.clone()
        new[:, from_position:] = fn(h[:, from_position:].float()).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new  # type: ignore[index]

    hook.pluristeer_hook = True  # type: ignore[attr-defined]
    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    batch_size: int = 8,
    layer: int | None = None,
    edit: Callable[[Tensor], Tensor] | None = None,
    from_position: int = 1,
) -> tuple[float, int]:
    """Mean next-token cross-entropy of ``model`` on ``input_ids`` (padding excluded) and the token count;
    with ``layer`` and ``edit``, the residual after that block is replaced by ``edit(h)`` (see :func:`splice`)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device) if attention_mask is not None else None
            if layer is not None and edit is not None:
                with splice(model, layer, edit, from_position=from_position):
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            else:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits = logits[:, :-1].float()
            target = ids[:, 1:]
            valid = mask[:, 1:].bool() if mask is not None else torch.ones_like(target, dtype=torch.bool)
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            total += float(losses[valid.reshape(-1)].sum())
            count += int(valid.sum())
    if count == 0:
        raise ValueError("lm_loss got no target tokens")
    return total / count, count


def reconstruct_fn(sae: Any) -> Callable[[Tensor], Tensor]:
    """``h -> decode(encode(h))`` over the last dimension of any shape."""

    def run(h: Tensor) -> Tensor:
        flat = h.reshape(-1, h.shape[-1])
        return sae.decode(sae.encode(flat)).reshape(h.shape)

    return run


@torch.no_grad()
def ce_loss_recovered(
    model: nn.Module,
    sae: Any,
    layer: int,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    batch_size: int = 8,
    from_position: int = 1,
    baseline: dict[str, float] | None = None,
) -> dict[str, float]:
    """LM loss clean, with ``sae(h)`` spliced in at ``layer``, and with ``h`` zeroed; and the fraction of
    the zero-ablation loss increase that the SAE recovers, ``(zero - sae) / (zero - clean)``. Pass the
    ``baseline`` of a previous call (``ce_clean``, ``ce_zero``) to skip those two passes."""
    opts = {"batch_size": batch_size, "from_position": from_position}
    if baseline is None:
        clean, count = lm_loss(model, input_ids, attention_mask, **opts)  # type: ignore[arg-type]
        zero, _ = lm_loss(model, input_ids, attention_mask, layer=layer, edit=torch.zeros_like, **opts)  # type: ignore[arg-type]
        baseline = {"ce_clean": clean, "ce_zero": zero, "ce_tokens": count}
    spliced, count = lm_loss(model, input_ids, attention_mask, layer=layer, edit=reconstruct_fn(sae), **opts)  # type: ignore[arg-type]
    clean, zero = baseline["ce_clean"], baseline["ce_zero"]
    gap = zero - clean
    return {
        "ce_clean": clean,
        "ce_sae": spliced,
        "ce_zero": zero,
        "ce_loss_recovered": (zero - spliced) / gap if gap != 0 else float("nan"),
        "ce_tokens": count,
    }


__all__ = ["DOMINANT_FACTOR", "ce_loss_recovered", "lm_loss", "reconstruct_fn", "reconstruction_metrics", "splice"]
