"""The VectorSet file (DESIGN §3): one ``.safetensors`` with a tensor per perspective and JSON metadata.

Tensors are named by perspective (``[d_sae]`` for modes ``sae``/``residual``, ``[d_model]`` for ``caa``);
the safetensors header carries ``{"pluristeer": <json>}`` with the model, layer, SAE path, file hash and
decoder fingerprint, mode, granularity, samples per perspective, readout rule, task and creation time.
A set refuses (:class:`VectorSetMismatch`) to steer a model, layer or SAE it was not made for. A file
may be a local path or a URI (``s3://bucket/vectors/crehate-fine.safetensors``), written whole.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from sae import storage
from sae.hooks import SAELike, resolve_layer, steer
from sae.lm import model_name
from sae.model import WEIGHTS_FILE
from sae.vectors import GRANULARITIES, VECTOR_MODES

META_KEY = "pluristeer"
FORMAT_VERSION = 1


class VectorSetError(ValueError):
    """A VectorSet file is missing, corrupt, or inconsistent."""


class VectorSetMismatch(VectorSetError):
    """A VectorSet was applied to a model, layer or SAE other than the one it was made for."""


def sae_fingerprint(sae: SAELike) -> str:
    """A hash of the SAE decoder (``W_dec`` as contiguous fp32): identifies an SAE in memory or on disk."""
    w = sae.W_dec.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(struct.pack("<2q", *w.shape))
    digest.update(w.numpy().tobytes())
    return digest.hexdigest()[:32]


def sae_file_hash(sae_dir: storage.Location) -> str:
    """sha256 of an SAE directory's weights file (local path or URI)."""
    return storage.sha256(storage.join(sae_dir, WEIGHTS_FILE))


@dataclass
class VectorSetMeta:
    model: str
    layer: int
    mode: str
    granularity: str
    task: str
    n_samples: dict[str, int]
    readout: str
    dim: int
    sae_path: str | None = None
    sae_sha256: str | None = None
    sae_fingerprint: str | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)  # config, feedback sources, sparsity, timings
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("model", "task", "readout"):
            if not isinstance(getattr(self, name), str):
                raise VectorSetError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("layer", "dim", "format_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise VectorSetError(f"{name} must be a non-negative integer, got {value!r}")
        if self.format_version > FORMAT_VERSION:
            raise VectorSetError(
                f"format_version {self.format_version} is newer than this pluristeer reads ({FORMAT_VERSION})"
            )
        if not isinstance(self.n_samples, dict) or not isinstance(self.extra, dict):
            raise VectorSetError("n_samples and extra must be JSON objects")
        if self.mode not in VECTOR_MODES:
            raise VectorSetError(f"mode must be one of {VECTOR_MODES}, got {self.mode!r}")
        if self.granularity not in GRANULARITIES:
            raise VectorSetError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.mode != "caa" and self.sae_fingerprint is None:
            raise VectorSetError(f"a {self.mode!r} vector set must record its SAE (sae_fingerprint)")

    def to_json(self) -> str:
        return json.dumps(asdict(self))  # unsorted: n_samples keeps the perspectives' order

    @classmethod
    def from_json(cls, text: str, where: str) -> VectorSetMeta:
        try:
            raw = json.loads(text)
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, VectorSetError) as err:
            raise VectorSetError(f"{where}: malformed vector-set metadata ({err})") from None


@dataclass
class VectorSet:
    """``vectors[perspective]`` (1-D fp32 tensors of length ``meta.dim``) plus :class:`VectorSetMeta`."""

    vectors: dict[str, torch.Tensor]
    meta: VectorSetMeta

    def __post_init__(self) -> None:
        if not self.vectors:
            raise VectorSetError("a vector set needs at least one perspective")
        for name, v in self.vectors.items():
            if v.dim() != 1 or v.shape[0] != self.meta.dim:
                raise VectorSetError(f"vector {name!r} has shape {tuple(v.shape)}, expected [{self.meta.dim}]")
            if not bool(torch.isfinite(v).all()):
                raise VectorSetError(f"vector {name!r} contains NaN or infinite values")
        self.vectors = {k: v.detach().float().cpu().contiguous() for k, v in self.vectors.items()}

    @property
    def perspectives(self) -> list[str]:
        return list(self.vectors)

    def __getitem__(self, perspective: str) -> torch.Tensor:
        if perspective not in self.vectors:
            raise KeyError(f"no vector for perspective {perspective!r}; this set has {self.perspectives}")
        return self.vectors[perspective]

    def rows(self, perspectives: Sequence[str | None]) -> list[torch.Tensor | None]:
        """One entry per batch row: the perspective's vector, or ``None`` (an unsteered row)."""
        return [None if p is None else self[p] for p in perspectives]

    # -- file format -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return save_bytes(self.vectors, metadata={META_KEY: self.meta.to_json()})

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "<bytes>") -> VectorSet:
        try:
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + n])
            tensors = load_bytes(data)
        except Exception as err:  # struct/json/safetensors errors all mean "not a readable file"
            raise VectorSetError(f"{where} is not a readable safetensors file (truncated?): {err}") from None
        text = (header.get("__metadata__") or {}).get(META_KEY)
        if text is None:
            raise VectorSetError(f"{where} has no {META_KEY!r} metadata: not a pluristeer vector set")
        meta = VectorSetMeta.from_json(text, where)
        # safetensors does not keep tensor order: restore the perspectives' order from the metadata
        order = [p for p in meta.n_samples if p in tensors] + sorted(set(tensors) - set(meta.n_samples))
        try:
            return cls(vectors={p: tensors[p] for p in order}, meta=meta)
        except VectorSetError as err:
            raise VectorSetError(f"{where}: {err}") from None

    def save(self, path: storage.Location) -> storage.Location:
        """Write the set atomically to ``path`` (a ``.safetensors`` file: a local path or a URI)."""
        return storage.write_bytes(path if storage.is_uri(path) else Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: storage.Location) -> VectorSet:
        path = path if storage.is_uri(path) else Path(path)
        if not storage.is_file(path):
            raise VectorSetError(f"vector set {storage.display(path)} does not exist")
        return cls.from_bytes(storage.read_bytes(path), where=storage.display(path))

    # -- applying it -------------------------------------------------------------------------------
    def check(self, model: nn.Module | None = None, *, layer: int | None = None, sae: SAELike | None = None) -> None:
        """Raise :class:`VectorSetMismatch` unless this set was made for ``model``, ``layer`` and ``sae``."""
        m = self.meta
        if model is not None:
            name = model_name(model)
            if name != m.model:
                raise VectorSetMismatch(f"this vector set was made for model {m.model!r}, not {name!r}")
            if layer is None:
                layer = m.layer
            if resolve_layer(model, layer) != resolve_layer(model, m.layer):
                raise VectorSetMismatch(f"this vector set was made for layer {m.layer}, not {layer}")
            if m.mode == "caa":
                d_model = getattr(model.config, "hidden_size", m.dim)
                if d_model != m.dim:
                    raise VectorSetMismatch(f"caa vectors have size {m.dim}, the model's d_model is {d_model}")
        elif layer is not None and layer != m.layer:
            raise VectorSetMismatch(f"this vector set was made for layer {m.layer}, not {layer}")
        if m.mode != "caa":
            if sae is None:
                raise VectorSetMismatch(f"a {m.mode!r} vector set needs its SAE ({m.sae_path})")
            if sae.W_dec.shape[0] != m.dim:
                raise VectorSetMismatch(f"this vector set has d_sae={m.dim}, the SAE given has {sae.W_dec.shape[0]}")
            if sae_fingerprint(sae) != m.sae_fingerprint:
                raise VectorSetMismatch(
                    f"this vector set was made with the SAE at {m.sae_path} (fingerprint {m.sae_fingerprint}); "
                    "the SAE given is a different one"
                )

    @contextmanager
    def steer(
        self,
        model: nn.Module,
        perspectives: Sequence[str | None] | str,
        *,
        sae: SAELike | None = None,
        coeff: float = 1.0,
        mode: str | None = None,
        keep_error: bool = True,
        steer_decode: bool = True,
        from_position: int = 0,
    ) -> Iterator[None]:
        """Steer ``model`` at this set's layer while the body runs: one perspective for every row, or one
        entry per batch row (``None`` = unsteered). ``mode`` defaults to the set's own (``sae`` vectors may
        also be applied as ``residual`` and vice versa; ``caa`` vectors only as ``caa``)."""
        self.check(model, sae=sae)
        mode = mode or self.meta.mode
        if (mode == "caa") != (self.meta.mode == "caa"):
            raise VectorSetMismatch(f"a {self.meta.mode!r} vector set cannot be applied in mode {mode!r}")
        vectors: torch.Tensor | list[torch.Tensor | None]
        vectors = self[perspectives] if isinstance(perspectives, str) else self.rows(perspectives)
        with steer(
            model,
            self.meta.layer,
            vectors,
            mode=mode,  # type: ignore[arg-type]
            sae=sae,
            coeff=coeff,
            keep_error=keep_error,
            steer_decode=steer_decode,
            from_position=from_position,
        ):
            yield


__all__ = ["VectorSet", "VectorSetError", "VectorSetMeta", "VectorSetMismatch", "sae_fingerprint"]
