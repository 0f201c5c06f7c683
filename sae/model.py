"""Sparse autoencoders (inference side) and their sae-lens on-disk format.

One module serves every architecture: ``topk`` (default), ``batchtopk`` (a TopK trained over the batch,
run at inference as a JumpReLU with a learned global threshold), ``relu`` (ReLU + L1, sae-lens
"standard") and ``jumprelu``. Weights follow sae-lens names and shapes (``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``), so ``sae_lens.SAE.load_from_disk`` reads what :meth:`save` writes. An SAE
directory may be a local path or a URI (``s3://bucket/saes/L15-topk-8x``, :mod:`sae.storage`); each file
is published whole, ``cfg.json`` last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from torch import nn

from sae import storage

Architecture = Literal["topk", "batchtopk", "relu", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "relu", "jumprelu")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# sae-lens names for our architectures ("standard" is its ReLU + L1 SAE).
_TO_SAELENS = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu"}


class SAEFormatError(ValueError):
    """An SAE directory is missing, truncated or inconsistent."""


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: Architecture = "topk"
    k: int = 32
    apply_b_dec_to_input: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)  # model_name, hook_name, hook_layer, ...

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae={self.d_sae} for {self.architecture}, got {self.k}")

    @property
    def expansion(self) -> float:
        return self.d_sae / self.d_in


class SparseAutoencoder(nn.Module):
    """``encode``, ``decode`` and ``forward`` (reconstruction) of an SAE on raw residual activations."""

    def __init__(self, cfg: SAEConfig, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype), requires_grad=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm decoder rows, encoder initialised as the decoder's transpose (as in OpenAI's TopK)."""
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator, dtype=self.W_dec.dtype)
            w /= w.norm(dim=-1, keepdim=True)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations ``[..., d_sae]``."""
        pre = self.pre_acts(x.to(self.W_enc.dtype))
        arch = self.cfg.architecture
        if arch == "topk":
            values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        if arch == "relu":
            return pre.relu()
        return pre.relu() * (pre > self.threshold)  # jumprelu, and batchtopk at inference

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- sae-lens format ---------------------------------------------------------------------------
    def saelens_cfg(self) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {
            "architecture": _TO_SAELENS[cfg.architecture],
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {**cfg.metadata, "pluristeer": {"architecture": cfg.architecture, "k": cfg.k}},
        }
        if cfg.architecture == "topk":
            out["k"] = cfg.k
            out["rescale_acts_by_decoder_norm"] = False
        return out

    def state_for_disk(self) -> dict[str, torch.Tensor]:
        tensors = {n: getattr(self, n).detach().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if self.cfg.architecture in ("jumprelu", "batchtopk"):
            tensors["threshold"] = self.threshold.detach().cpu().contiguous()
        return tensors

    def save(self, path: storage.Location) -> storage.Location:
        """Write ``sae_weights.safetensors`` then ``cfg.json`` (each whole, atomically) into directory ``path``
        (a local path or a URI)."""
        path = path if storage.is_uri(path) else Path(path)
        storage.makedirs(path)
        storage.atomic_write(storage.join(path, WEIGHTS_FILE), lambda p: save_file(self.state_for_disk(), p))
        storage.write_json(storage.join(path, CFG_FILE), self.saelens_cfg())
        return path

    @classmethod
    def load(cls, path: storage.Location, *, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """Load an SAE directory in sae-lens layout (ours, sae-lens's, Llama-Scope-style TopK/JumpReLU), from a
        local path or a URI."""
        path = path if storage.is_uri(path) else Path(path)
        cfg_path, weights_path = storage.join(path, CFG_FILE), storage.join(path, WEIGHTS_FILE)
        for p in (cfg_path, weights_path):
            if not storage.is_file(p):
                raise SAEFormatError(f"{storage.display(path)} is not an SAE directory: {storage.name(p)} is missing")
        try:
            raw = json.loads(storage.read_bytes(cfg_path))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SAEFormatError(f"{storage.display(cfg_path)} is not valid JSON: {err}") from err
        try:
            if storage.is_uri(weights_path):
                tensors = load_safetensors(storage.read_bytes(weights_path))
            else:
                tensors = load_file(str(weights_path))
        except storage.StorageError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise SAEFormatError(
                f"{storage.display(weights_path)} cannot be read (truncated or corrupt?): {err}"
            ) from err
        if not isinstance(raw, dict):
            raise SAEFormatError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
        _check_tensors(tensors, str(weights_path))
        cfg = config_from_saelens(raw, tensors, where=str(cfg_path))
        sae = cls(cfg, dtype=tensors["W_enc"].dtype)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
                if name in tensors:
                    want = tuple(getattr(sae, name).shape)
                    if tuple(tensors[name].shape) != want:
                        raise SAEFormatError(
                            f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {want}"
                        )
                    getattr(sae, name).copy_(tensors[name])
            if raw.get("rescale_acts_by_decoder_norm"):
                sae.fold_decoder_norms()
        return sae.to(device)

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Rescale so every decoder row has unit norm without changing any output: latent ``i`` is multiplied
        by ``‖W_dec[i]‖`` on the way in and divided by it on the way out. Makes a sae-lens TopK SAE trained
        with ``rescale_acts_by_decoder_norm`` (which selects on norm-scaled pre-activations) a plain TopK one."""
        norms = self.W_dec.norm(dim=-1).clamp_min(1e-12)
        self.W_enc.mul_(norms)
        self.b_enc.mul_(norms)
        self.threshold.mul_(norms)
        self.W_dec.div_(norms[:, None])


def _check_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    """The weights a loaded SAE needs: present, 2-D/1-D as sae-lens has them, floating point and finite."""
    dims = {"W_enc": 2, "b_enc": 1, "W_dec": 2, "b_dec": 1, "threshold": 1}
    for name, ndim in dims.items():
        if name not in tensors:
            if name == "threshold":
                continue
            raise SAEFormatError(f"{where}: the weights have no tensor {name!r}")
        t = tensors[name]
        if t.dim() != ndim:
            raise SAEFormatError(f"{where}: {name} has shape {tuple(t.shape)}; expected {ndim} dimension(s)")
        if not t.is_floating_point():
            raise SAEFormatError(f"{where}: {name} has dtype {t.dtype}; expected floating point weights")
        if not bool(torch.isfinite(t).all()):
            raise SAEFormatError(f"{where}: {name} contains NaN or infinite values (a corrupt or diverged SAE)")


def config_from_saelens(raw: dict[str, Any], tensors: dict[str, torch.Tensor], *, where: str) -> SAEConfig:
    """Read an sae-lens ``cfg.json`` (v6 ``architecture`` or older ``activation_fn*`` keys)."""
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if key not in tensors:
            raise SAEFormatError(f"{where}: the weights have no tensor {key!r}")
    if not isinstance(raw.get("metadata") or {}, dict):
        raise SAEFormatError(f"{where}: metadata must be a JSON object, got {raw['metadata']!r}")
    ours = (raw.get("metadata") or {}).get("pluristeer")
    if ours is not None and not isinstance(ours, dict):
        raise SAEFormatError(f"{where}: metadata.pluristeer must be a JSON object, got {ours!r}")
    d_in, d_sae = tensors["W_enc"].shape
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise SAEFormatError(
            f"{where}: normalize_activations={raw['normalize_activations']!r} is not supported; "
            "fold the normalisation into the weights (sae-lens: fold_activation_norm_scaling_factor) first"
        )
    arch = raw.get("architecture")
    act = raw.get("activation_fn") or raw.get("activation_fn_str")
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
    if ours and ours.get("architecture") in ARCHITECTURES:
        architecture = ours["architecture"]
        k = ours.get("k", k)
    elif arch == "topk" or act == "topk":
        architecture = "topk"
    elif arch == "jumprelu" or "threshold" in tensors:
        architecture = "jumprelu"
    elif arch in ("standard", None) and act in ("relu", None):
        architecture = "relu"
    else:
        raise SAEFormatError(f"{where}: unsupported SAE architecture {arch or act!r}; we load {ARCHITECTURES}")
    if raw.get("rescale_acts_by_decoder_norm") and architecture != "topk":
        raise SAEFormatError(f"{where}: rescale_acts_by_decoder_norm=true is only supported for topk SAEs")
    metadata = {k_: v for k_, v in (raw.get("metadata") or {}).items() if k_ != "pluristeer"}
    for key in ("model_name", "hook_name", "hook_layer"):  # pre-v6 sae-lens kept these at the top
        if key in raw and key not in metadata:
            metadata[key] = raw[key]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int | float) or int(k) != k):
        raise SAEFormatError(f"{where}: k must be an integer, got {k!r}")
    try:
        return SAEConfig(
            d_in=int(d_in),
            d_sae=int(d_sae),
            architecture=architecture,
            k=int(k) if k else 32,
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            metadata=metadata,
        )
    except ValueError as err:
        raise SAEFormatError(f"{where}: {err}") from None
