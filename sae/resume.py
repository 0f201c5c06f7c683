"""Run a prompt once up to layer L, then finish it many times from the cached residual (one per steering).

Steering edits the residual after block L, so every steered variant of a prompt shares blocks ``0..L``
with the unsteered forward. :func:`forward_capture` runs the prompt once (next-token logits plus the
residual after L); inside :func:`skipping`, blocks ``0..L`` are replaced by pass-throughs, so
:func:`resume_logits` feeds the cached residual as ``inputs_embeds`` and only blocks ``L+1..`` run. A
``steer(model, L, ...)`` entered *inside* ``skipping`` hooks the pass-through at L, so it edits the cached
residual exactly as it would edit block L's output. For SmolLM2 at L = 15 a steered variant costs about
half a forward.

This relies on the model feeding ``inputs_embeds`` straight into block 0 (Llama, Qwen, Mistral, ...;
not Gemma, which scales embeddings, nor GPT-2, which adds positions): :func:`resume_supported` checks it
on the model at hand by comparing against a full forward, and callers fall back to full forwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sae.hooks import decoder_layers, resolve_layer


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding), as ``generate`` computes them."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _last_logits(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """Next-token logits, computing the LM head for the last position only where the model allows it."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1
    return model(**inputs).logits[:, -1].float()


@torch.inference_mode()
def forward_capture(
    model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward of left-padded prompts: ``(residual after block layer [B, T, d], next-token logits
    [B, vocab] fp32)``. Positions follow the attention mask, so the result does not depend on padding."""
    block = decoder_layers(model)[resolve_layer(model, layer)]
    seen: list[torch.Tensor] = []

    def grab(_m: nn.Module, _i: object, output: object) -> None:
        seen.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[arg-type,index]

    handle = block.register_forward_hook(grab)
    try:
        logits = _last_logits(
            model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
            use_cache=False,
        )  # fmt: skip
    finally:
        handle.remove()
    return seen[-1], logits


class _Passthrough(nn.Module):
    """Stands in for a decoder block: returns the hidden states it is given."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def skipping(model: nn.Module, layer: int) -> Iterator[None]:
    """While the body runs, blocks ``0..layer`` are pass-throughs: feed the residual after ``layer`` as
    ``inputs_embeds`` (:func:`resume_logits`). The original blocks are put back on exit."""
    blocks = decoder_layers(model)
    last = resolve_layer(model, layer)
    saved = [blocks[i] for i in range(last + 1)]
    try:
        for i in range(last + 1):
            blocks[i] = _Passthrough()
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


@torch.inference_mode()
def resume_logits(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[B, vocab]`` (fp32) from residuals ``hidden [B, T, d]`` (left-padded, inside
    :func:`skipping`)."""
    dtype = next(model.parameters()).dtype
    return _last_logits(
        model, inputs_embeds=hidden.to(dtype), attention_mask=attention_mask,
        position_ids=position_ids(attention_mask), use_cache=False,
    )  # fmt: skip


@torch.inference_mode()
def resume_supported(model: nn.Module, layer: int, *, atol: float = 1e-3) -> bool:
    """Whether resuming from ``layer`` reproduces a full forward on this model (checked once, then cached)."""
    cache: dict[int, bool] = model.__dict__.setdefault("_pluristeer_resume_ok", {})
    key = resolve_layer(model, layer)
    if key not in cache:
        device = next(model.parameters()).device
        vocab = int(getattr(model.config, "vocab_size", 100))
        ids = torch.arange(3, 3 + 12, device=device).remainder(vocab).view(2, 6)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        hidden, full = forward_capture(model, layer, ids, mask)
        try:
            with skipping(model, layer):
                resumed = resume_logits(model, hidden, mask)
            cache[key] = bool(torch.allclose(resumed, full, atol=atol, rtol=1e-3))
        except Exception:  # an architecture whose blocks or embeddings do not fit the pass-through scheme
            cache[key] = False
    return cache[key]


def pad_left(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``[T_i, d]`` residual rows with zeros into ``([B, T, d], mask [B, T])``."""
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, width - r.shape[0] :] = r
        mask[i, width - r.shape[0] :] = 1
    return out, mask


__all__ = ["forward_capture", "pad_left", "position_ids", "resume_logits", "resume_supported", "skipping"]
