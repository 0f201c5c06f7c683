"""Pluralistic decoding (DESIGN §1 step 4), pure torch: combine K perspectives' next-token logits.

With steered logits ``ℓ_i`` (i = 1..K) and unsteered logits ``ℓ_0``, and ``log p = log_softmax(ℓ)``:

- ``mean``: average the perspectives' log-probabilities, ``mean_i log p_i``.
- ``cad``: average the contrastive terms ``c_i = (1+α) log p_i − α log p_0`` (uniform weights).
- ``dvd``: weight the contrastive terms by ``w = softmax_i(H_i / τ)``, where ``H_i = −Σ_{top-k} p_i log p_i``
  is perspective i's entropy over its ``top_k`` most likely tokens.

Every mode returns normalised log-probabilities ``[B, vocab]``; with ``ℓ_i = ℓ_0`` (a zero vector) each
one returns ``log p_0``. Where ``ℓ_0`` is ``-inf`` (a masked token) the contrastive term falls back to
``log p_i``. As in the reference, a higher entropy gives a higher weight.

``reference=True`` reproduces the reference implementation (chufeiluo/SAE-PD, ``src/utils.py``
``dvd_decoding``) exactly: ``H_i`` is computed on the *raw* logits of the ``top_k`` tokens of
``softmax(ℓ_i/τ)`` as ``−Σ exp(ℓ) · clip(ℓ, −100, 0)`` (≈ 0 whenever the logits are positive, so the
weights come out nearly uniform), the weights are ``softmax(H)`` in float16 (τ plays no part), the terms are
``where(ℓ_0 > −100, (1+α)ℓ_i − αℓ_0, ℓ_i)`` on raw logits, combined by a float16 matmul, and positions
where the result is ≤ −100 take ``ℓ_0``. Reference ``cad`` is the same with uniform weights in fp32
(``src/cd.py`` ``cad_decode``); reference ``mean`` averages probabilities rather than log-probabilities (the
reference's ``avg_strat='logit'`` averages the perspectives' distributions). Reference outputs are raw
scores, not normalised.

:func:`plural_generate` runs the K steered rows and the unsteered row of every prompt as one batch per
step with a KV cache (the fused path), combining them with :func:`combine` at each step.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

DecodingMode = Literal["mean", "cad", "dvd"]
DECODING_MODES: tuple[str, ...] = ("mean", "cad", "dvd")


@dataclass(frozen=True)
class Decoding:
    """Pluralistic-decoding settings. Reference values: α = 0.2 (0.1 for misinformation), τ = 0.4, top-k 20."""

    mode: DecodingMode = "dvd"
    alpha: float = 0.2
    tau: float = 0.4
    top_k: int = 20  # dvd: tokens in each entropy; sampling: tokens sampled from
    reference: bool = False

    def __post_init__(self) -> None:
        if self.mode not in DECODING_MODES:
            raise ValueError(f"decoding mode must be one of {DECODING_MODES}, got {self.mode!r}")
        if not self.alpha >= 0:
            raise ValueError(f"decoding alpha must be >= 0, got {self.alpha}")
        if not self.tau > 0:
            raise ValueError(f"decoding tau must be > 0, got {self.tau}")
        if self.top_k < 1:
            raise ValueError(f"decoding top_k must be >= 1, got {self.top_k}")

    @property
    def needs_base(self) -> bool:
        """Whether the unsteered logits take part (``cad``, ``dvd``)."""
        return self.mode != "mean"


def _check(steered: torch.Tensor, base: torch.Tensor | None, decoding: Decoding) -> None:
    if steered.dim() != 3:
        raise ValueError(f"steered logits must be [K, batch, vocab], got shape {tuple(steered.shape)}")
    if decoding.needs_base:
        if base is None:
            raise ValueError(f"decoding mode {decoding.mode!r} needs the unsteered logits")
        if base.shape != steered.shape[1:]:
            raise ValueError(f"unsteered logits {tuple(base.shape)} do not match steered {tuple(steered.shape)}")


def topk_entropy(logprobs: torch.Tensor, top_k: int) -> torch.Tensor:
    """``−Σ p log p`` over the ``top_k`` most likely tokens of each distribution (last dim)."""
    top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1).values
    return -(top.exp() * top).sum(-1)


def dvd_weights(steered: torch.Tensor, decoding: Decoding) -> torch.Tensor:
    """Per-perspective weights ``[K, batch]`` (each column sums to 1) for ``dvd``."""
    if decoding.reference:
        k = min(decoding.top_k, steered.shape[-1])
        index = (steered / decoding.tau).softmax(-1).topk(k, dim=-1).indices
        raw = steered.gather(-1, index)
        h = -(raw.exp() * raw.clip(-100, 0)).sum(-1)
        return h.to(torch.float16).softmax(dim=0)
    h = topk_entropy(steered.float().log_softmax(-1), decoding.top_k)
    return (h / decoding.tau).softmax(dim=0)


def _contrast(steered: torch.Tensor, base: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1+α)·s_i − α·b`` where ``b`` is finite, else ``s_i``."""
    return torch.where(torch.isfinite(base)[None], (1 + alpha) * steered - alpha * base[None], steered)


def _reference(steered: torch.Tensor, base: torch.Tensor | None, d: Decoding) -> torch.Tensor:
    if d.mode == "mean":
        return steered.softmax(-1).mean(0).log()
    assert base is not None
    merged = torch.where(base[None] > -100, (1 + d.alpha) * steered - d.alpha * base[None], steered)
    if d.mode == "cad":
        return merged.mean(0)
    weights = dvd_weights(steered, d)  # [K, B] float16
    rows = []
    for b in range(steered.shape[1]):  # per item, as the reference: a [K] @ [K, V] float16 matmul
        combined = torch.matmul(weights[:, b], merged[:, b].to(torch.float16)).unsqueeze(0)
        rows.append(torch.where(combined > -100, combined, base[b]).squeeze(0))
    return torch.stack(rows)


def combine(steered: torch.Tensor, base: torch.Tensor | None, decoding: Decoding) -> torch.Tensor:
    """Combine steered logits ``[K, batch, vocab]`` (and unsteered ``[batch, vocab]``) into ``[batch, vocab]``
    log-probabilities (raw scores under ``reference=True``)."""
    _check(steered, base, decoding)
    if decoding.reference:
        return _reference(steered, base, decoding)
    logp = steered.float().log_softmax(-1)
    if decoding.mode == "mean":
        return logp.mean(0).log_softmax(-1)
    assert base is not None
    terms = _contrast(logp, base.float().log_softmax(-1), decoding.alpha)
    if decoding.mode == "cad":
        return terms.mean(0).log_softmax(-1)
    weights = dvd_weights(steered, decoding)
    return (weights[..., None] * terms).sum(0).log_softmax(-1)


# -- offline generation: the fused path --------------------------------------------------------------
def last_logits(model: nn.Module, **inputs: Any) -> Any:
    """``model(**inputs)``, computing the LM head for the last position only where the model supports it
    (``logits_to_keep``: the head over every prompt position would cost as much as a quarter of the model)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1
    return model(**inputs)


@dataclass
class PluralOutput:
    tokens: list[list[int]]  # generated ids per prompt (up to and including EOS)
    texts: list[str]
    scores: torch.Tensor | None = None  # [batch, steps, vocab] combined scores, if asked for


def _pick(scores: torch.Tensor, top_k: int, do_sample: bool, temperature: float, g: torch.Generator | None):
    if not do_sample:
        return scores.argmax(-1)
    top = scores.float().topk(min(top_k, scores.shape[-1]), dim=-1)
    probs = (top.values / temperature).softmax(-1)
    choice = torch.multinomial(probs.cpu(), 1, generator=g).to(scores.device)
    return top.indices.gather(-1, choice).squeeze(-1)


@torch.inference_mode()
def plural_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    vector_set: Any,
    perspectives: Sequence[str],
    decoding: Decoding = Decoding(),
    sae: Any = None,
    *,
    coeff: float = 1.0,
    steer_mode: str | None = None,
    keep_error: bool = True,
    steer_decode: bool = True,
    from_position: int = 0,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    add_special_tokens: bool = False,
    return_scores: bool = False,
) -> PluralOutput:
    """Generate from each prompt with the K ``perspectives`` of ``vector_set`` combined by ``decoding``.

    Each prompt becomes K steered rows (+ one unsteered row for ``cad``/``dvd``) of a single batch; every
    step is one forward over all rows with a shared KV cache, and all rows of a prompt append the token
    chosen from the combined distribution (greedy, or sampled from its ``top_k`` tokens at
    ``temperature``). ``prompts`` are complete model inputs (e.g. from :mod:`pipelines.prompts`), so no
    special tokens are added unless ``add_special_tokens``. ``vector_set`` (a :class:`sae.vectorset.VectorSet`)
    is checked against the model, its layer and ``sae``.
    """
    from transformers import DynamicCache

    if not perspectives:
        raise ValueError("plural_generate needs at least one perspective")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), add_special_tokens=add_special_tokens, padding=True, return_tensors="pt")
    if getattr(tokenizer, "padding_side", "left") != "left" and bool((enc["attention_mask"][:, -1] == 0).any()):
        raise ValueError("plural_generate needs a left-padding tokenizer (load_lm sets padding_side='left')")
    k = len(perspectives)
    per_prompt = k + (1 if decoding.needs_base else 0)
    ids = enc["input_ids"].to(device).repeat_interleave(per_prompt, 0)
    mask = enc["attention_mask"].to(device).repeat_interleave(per_prompt, 0)
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as transformers' generate does
    rows: list[str | None] = [*perspectives, *([None] * (per_prompt - k))] * len(prompts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    batch = len(prompts)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    chosen: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    cache = DynamicCache(config=model.config)
    step_ids = ids
    with vector_set.steer(
        model,
        rows,
        sae=sae,
        coeff=coeff,
        mode=steer_mode,
        keep_error=keep_error,
        steer_decode=steer_decode,
        from_position=from_position,
    ):
        for _ in range(max_new_tokens):
            out = last_logits(
                model,
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1].float().view(batch, per_prompt, -1)
            combined = combine(logits[:, :k].transpose(0, 1), logits[:, k] if per_prompt > k else None, decoding)
            nxt = _pick(combined, decoding.top_k, do_sample, temperature, g)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            chosen.append(nxt)
            if return_scores:
                scores.append(combined.cpu())
            if eos is not None:
                done |= nxt == eos
            if bool(done.all()):
                break
            step_ids = nxt.repeat_interleave(per_prompt)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            position = position[:, -1:] + 1
    table = torch.stack(chosen, dim=1).cpu() if chosen else torch.zeros(batch, 0, dtype=torch.long)
    tokens: list[list[int]] = []
    for row in table.tolist():
        cut = row.index(eos) + 1 if eos is not None and eos in row else len(row)
        tokens.append(row[:cut])
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return PluralOutput(tokens, texts, torch.stack(scores, dim=1) if return_scores else None)


@torch.inference_mode()
def plural_next_token(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vector_set: Any,
    perspectives: Sequence[str],
    decoding: Decoding = Decoding(),
    sae: Any = None,
    *,
    coeff: float = 1.0,
    steer_mode: str | None = None,
    keep_error: bool = True,
    from_position: int = 0,
) -> torch.Tensor:
    """The combined next-token distribution ``[batch, vocab]`` at the end of each (left-padded) prompt: one
    fused forward over ``batch × (K [+1])`` rows. What classification and opinion readouts use."""
    if not perspectives:
        raise ValueError("plural_next_token needs at least one perspective")
    k = len(perspectives)
    per_prompt = k + (1 if decoding.needs_base else 0)
    device = next(model.parameters()).device
    ids = input_ids.to(device).repeat_interleave(per_prompt, 0)
    mask = attention_mask.to(device).repeat_interleave(per_prompt, 0)
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    rows: list[str | None] = [*perspectives, *([None] * (per_prompt - k))] * input_ids.shape[0]
    with vector_set.steer(
        model, rows, sae=sae, coeff=coeff, mode=steer_mode, keep_error=keep_error, from_position=from_position
    ):
        logits = last_logits(model, input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False)
        logits = logits.logits[:, -1]
    logits = logits.float().view(input_ids.shape[0], per_prompt, -1)
    return combine(logits[:, :k].transpose(0, 1), logits[:, k] if per_prompt > k else None, decoding)


__all__ = [
    "DECODING_MODES",
    "Decoding",
    "PluralOutput",
    "combine",
    "dvd_weights",
    "last_logits",
    "plural_generate",
    "plural_next_token",
    "topk_entropy",
]
