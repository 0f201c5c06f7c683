"""Residual-stream hooks that always unpatch: ``capture`` reads blocks' outputs, ``steer`` edits them.

Layer ``i`` means the output of decoder block ``i`` (``resid_post`` in TransformerLens terms), found by
:func:`decoder_layers` in any Llama-, Qwen-, Gemma-, Mistral-, GPT-2- or GPT-NeoX-style model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, Protocol

import torch
from torch import nn

from sae.model import SparseAutoencoder

SteerMode = Literal["sae", "residual", "caa"]
STEER_MODES: tuple[str, ...] = ("sae", "residual", "caa")

# Attribute paths of the decoder-block list in common families, tried before the generic search.
_KNOWN_PATHS = (
    "model.layers",  # Llama, Qwen2/3, Gemma 1-3, Mistral, Phi-3, OLMo
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-style)
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
)


class SAELike(Protocol):
    """What ``steer`` needs from an SAE (ours or sae-lens's)."""

    W_dec: torch.Tensor

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor: ...


def _get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of ``model``, whatever the architecture family."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path in _KNOWN_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0 and (n is None or len(found) == n):
            return found
    # Generic: the largest ModuleList of same-class blocks (of the configured length when known).
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or (n is not None and len(module) != n):
            continue
        if best is None or sum(p.numel() for p in module.parameters()) > sum(p.numel() for p in best.parameters()):
            best = module
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return best


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def resolve_layer(model: nn.Module, layer: int) -> int:
    """Normalise a layer index (negative counts from the end) and check its range."""
    n = num_layers(model)
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} is out of range: {type(model).__name__} has {n} blocks (0..{n - 1})")
    return layer % n


def _ours(fn):
    """Tag a hook function as pluristeer's (tests check that none is left behind)."""
    fn.pluristeer_hook = True
    return fn


def active_hooks(model: nn.Module) -> int:
    """How many pluristeer hooks are registered on ``model`` right now (0 outside a context)."""
    return sum(getattr(h, "pluristeer_hook", False) for m in model.modules() for h in m._forward_hooks.values())


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index,return-value]


def _replace_hidden(output: object, hidden: torch.Tensor) -> object:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden  # type: ignore[index]


@contextmanager
def capture(model: nn.Module, layers: Sequence[int], *, detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Record the residual stream after each block in ``layers`` during the forwards run in the body.

    Yields a dict ``{layer: Tensor[batch, seq, d_model]}`` holding the latest forward's output (keys are
    the layer numbers as given). Hooks are removed on exit, also when the body raises.
    """
    blocks = decoder_layers(model)
    out: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(key: int):
        @_ours
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            hidden = _hidden(output)
            out[key] = hidden.detach() if detach else hidden

        return hook

    try:
        for layer in layers:
            handles.append(blocks[resolve_layer(model, layer)].register_forward_hook(make_hook(layer)))
        yield out
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised by a hook once the deepest captured layer has run: the rest of the model is skipped."""


@torch.inference_mode()
def residuals(
    model: nn.Module,
    layers: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **model_kwargs: object,
) -> dict[int, torch.Tensor]:
    """One forward that stops after the deepest of ``layers``; returns ``{layer: [batch, seq, d_model]}``.

    Skipping the blocks above the deepest layer (and the LM head) saves their compute: reading layer 15
    of a 30-block model costs about half a forward. ``model_kwargs`` go to the model (``position_ids``,
    ``past_key_values`` with ``use_cache=True`` to extend a KV cache); no cache is built by default.
    """
    blocks = decoder_layers(model)
    deepest = blocks[max(resolve_layer(model, layer) for layer in layers)]

    @_ours
    def stop(_module: nn.Module, _inputs: object, _output: object) -> None:
        raise _StopForward

    with capture(model, layers) as acts:
        handle = deepest.register_forward_hook(stop)  # registered after capture's hooks: runs last
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, **{"use_cache": False, **model_kwargs})
        except _StopForward:
            pass
        finally:
            handle.remove()
    return dict(acts)


def _as_rows(
    vectors: torch.Tensor | Sequence[torch.Tensor | None], dim: int | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(V [rows, d] or [d], mask [rows] or None)``; rows given as ``None`` are masked out."""
    if isinstance(vectors, torch.Tensor):
        if vectors.dim() not in (1, 2):
            raise ValueError(f"steering vectors must be [d] or [batch, d], got shape {tuple(vectors.shape)}")
        return vectors, None
    rows = list(vectors)
    present = [v for v in rows if v is not None]
    if not present:
        return None, None
    d = present[0].shape[-1]
    if any(v.shape != (d,) for v in present) or (dim is not None and d != dim):
        raise ValueError(f"every steering vector must have shape [{dim or d}]")
    V = torch.stack([v if v is not None else torch.zeros_like(present[0]) for v in rows])
    mask = torch.tensor([v is not None for v in rows])
    return V, mask


@contextmanager
def steer(
    model: nn.Module,
    layer: int,
    vectors: torch.Tensor | Sequence[torch.Tensor | None],
    *,
    mode: SteerMode = "sae",
    sae: SAELike | None = None,
    coeff: float = 1.0,
    keep_error: bool = True,
    steer_decode: bool = True,
    from_position: int = 0,
) -> Iterator[None]:
    """Steer the residual stream after block ``layer`` while the body runs (forward or ``generate``).

    ``vectors`` is one vector for every row (``[d]``), one per row (``[batch, d]``), or a list with one
    entry per row where ``None`` leaves that row untouched. The space of ``d`` depends on ``mode``:

    - ``sae``: SAE features (``d_sae``); ``h -> dec(enc(h) + c·v) + (h - dec(enc(h)))``, the error term
      dropped when ``keep_error=False`` (what the reference code does).
    - ``residual``: SAE features projected through the decoder, ``h -> h + c·(v @ W_dec)``. With an affine
      decoder this equals ``sae`` with ``keep_error=True`` up to float error, at a fraction of the cost, so
      ``sae`` with ``keep_error=True`` on a :class:`~sae.model.SparseAutoencoder` runs as ``residual``.
    - ``caa``: a residual-space vector (``d_model``), ``h -> h + c·v``.

    Every position is steered at prefill and at each cached decode step; ``steer_decode=False`` skips
    single-token steps (the reference code's behaviour). Positions before ``from_position`` (counted
    from each row's first real token, as the model's ``position_ids`` are) are left alone; the reference
    uses 50. Hooks are removed on exit, also when the body raises.
    """
    if mode not in STEER_MODES:
        raise ValueError(f"mode must be one of {STEER_MODES}, got {mode!r}")
    if mode in ("sae", "residual") and sae is None:
        raise ValueError(f"mode {mode!r} needs an SAE")
    block = decoder_layers(model)[resolve_layer(model, layer)]
    d_model = getattr(model.config, "hidden_size", None)
    expected = d_model if mode == "caa" else sae.W_dec.shape[0]  # type: ignore[union-attr]
    V, mask = _as_rows(vectors, expected)
    if V is not None and expected is not None and V.shape[-1] != expected:
        space = "d_model" if mode == "caa" else "d_sae"
        raise ValueError(f"mode {mode!r} takes vectors of size {space}={expected}, got {V.shape[-1]}")

    delta: torch.Tensor | None = None  # residual-space shift, precomputed for residual/caa modes
    if mode == "sae" and keep_error and type(sae).decode is SparseAutoencoder.decode:
        # dec(enc(h) + c·v) + h - dec(enc(h)) = h + c·(v @ W_dec) exactly for this affine decoder: the encode
        # and both decodes cancel, so skip them (the result differs by float rounding only)
        mode = "residual"
    if V is not None and mode == "residual":
        delta = coeff * (V.to(sae.W_dec.dtype) @ sae.W_dec)  # type: ignore[union-attr]
    elif V is not None and mode == "caa":
        delta = coeff * V

    def rows_of(t: torch.Tensor, batch: int) -> torch.Tensor:
        if t.dim() == 1:
            return t.expand(batch, -1)
        if t.shape[0] != batch:
            raise ValueError(f"{t.shape[0]} steering rows given for a batch of {batch}")
        return t

    @_ours
    def hook(_module: nn.Module, _args: tuple, kwargs: dict, output: object) -> object:
        h = _hidden(output)
        batch, seq = h.shape[0], h.shape[1]
        if V is None or (seq == 1 and not steer_decode):
            return None
        if mode == "sae":
            feats = sae.encode(h.to(sae.W_dec.dtype))  # type: ignore[union-attr]
            recon = sae.decode(feats)  # type: ignore[union-attr]
            shift = coeff * rows_of(V.to(feats), batch)[:, None, :]
            new = sae.decode(feats + shift)  # type: ignore[union-attr]
            if keep_error:
                new = new + (h.to(new.dtype) - recon)
            new = new.to(h.dtype)
        else:
            new = h + rows_of(delta.to(h), batch)[:, None, :]  # type: ignore[union-attr]
        keep = torch.ones(batch, seq, 1, dtype=torch.bool, device=h.device)
        if mask is not None:
            keep = keep & mask.to(h.device)[:, None, None]
        if from_position > 0:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.arange(seq, device=h.device)[None, :]
            keep = keep & (pos.to(h.device) >= from_position).expand(batch, seq)[..., None]
        return _replace_hidden(output, torch.where(keep, new, h))

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
