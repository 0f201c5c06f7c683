"""Training sparse autoencoders in plain PyTorch: several SAEs from one pass over the activations.

- :class:`SAESpec` — one SAE to fit (expansion, architecture, k, learning rate, loss coefficients).
- :class:`Normalizer` — centre and scale the activations (from the store's statistics) so that
  ``E‖x‖² = d_in``; folded into the weights on export, so saved SAEs read raw activations.
- :class:`TrainingSAE` — the trainable module of one SAE (TopK / BatchTopK on the sparse kernels of
  :mod:`sae.kernels`; ReLU+L1 and JumpReLU dense). Its decoder is used row-normalised (``W_dec / ‖W_dec‖``),
  so the gradient never changes decoder norms to first order and exported SAEs have unit-norm decoder rows.
  TopK-family SAEs get the AuxK loss of Gao et al. (2024) on latents dead for ``dead_tokens`` tokens.
- :class:`SAETrainer` — Adam (one parameter group per SAE), warm-up / constant / linear-decay learning
  rate, dead-latent tracking, checkpointable state. It runs as is, under DDP, or under a DeepSpeed
  engine (:meth:`SAETrainer.wrap`); nothing here imports Ray. A non-finite loss or gradient on any rank
  raises :class:`TrainingDivergedError` on every rank *before* the optimiser step, so the weights stay
  those of the last finite step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.kernels import SparsePlan, sparse_decode, topk_encode
from sae.model import ARCHITECTURES, Architecture, SAEConfig, SparseAutoencoder

Precision = Literal["auto", "fp32", "bf16"]
MODEL_FILE = "model.pt"  # a checkpoint's SAE weights (SAETrainer.save)
TRAINER_FILE = "trainer.pt"  # its trainer state, and the optimiser's unless DeepSpeed saves that
SPARSE_ARCHITECTURES = ("topk", "batchtopk")


@dataclass
class SAESpec:
    """One SAE to train. ``lr=None`` scales with width as sparsify does, ``8e-4 / sqrt(d_sae / 2**14)`` (4x its
    constant: tuned for ~1M-token runs with batches of 1-4k tokens; 1.5e-3 at 8x and 7.5e-4 at 32x of d=576)."""

    expansion: float = 8.0
    k: int = 32
    architecture: Architecture = "topk"
    d_sae: int | None = None  # overrides expansion
    lr: float | None = None
    auxk_coefficient: float = 1 / 32  # TopK/BatchTopK: weight of the AuxK loss on dead latents
    sparsity_coefficient: float | None = None  # ReLU: L1 weight (default 1.0); JumpReLU: L0 weight (default 0.02)
    jumprelu_bandwidth: float = 0.05  # straight-through kernel width, in normalised units
    jumprelu_init_threshold: float = 0.1
    batchtopk_max_per_token: int = 4  # BatchTopK picks from each token's top (this × k) latents
    name: str | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.d_sae is None and self.expansion <= 0:
            raise ValueError(f"expansion must be positive, got {self.expansion}")
        if self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")

    def width(self, d_in: int) -> int:
        return int(self.d_sae or round(self.expansion * d_in))

    def label(self, d_in: int) -> str:
        """A directory-safe name: ``topk-8x-k32`` (or the given ``name``)."""
        if self.name:
            return self.name
        ratio = self.width(d_in) / d_in
        size = f"{ratio:g}x" if self.d_sae is None else f"{self.width(d_in)}"
        sparsity = f"-k{self.k}" if self.architecture in SPARSE_ARCHITECTURES else ""
        return f"{self.architecture}-{size}{sparsity}"

    def learning_rate(self, d_in: int) -> float:
        return self.lr if self.lr is not None else 8e-4 / math.sqrt(self.width(d_in) / 2**14)

    def coefficient(self) -> float:
        if self.sparsity_coefficient is not None:
            return self.sparsity_coefficient
        return {"relu": 1.0, "jumprelu": 0.02}.get(self.architecture, 0.0)


@dataclass
class Normalizer:
    """``(x - mean) * scale`` with ``scale`` chosen so that ``E‖x - mean‖² · scale² = d_in``."""

    mean: Tensor
    scale: float

    @classmethod
    def identity(cls, d_in: int) -> Normalizer:
        return cls(torch.zeros(d_in), 1.0)

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> Normalizer:
        """From an activation store's per-layer statistics (``mean``, ``std`` per dimension)."""
        mean = torch.tensor(stats["mean"], dtype=torch.float32)
        var = float(torch.tensor(stats["std"], dtype=torch.float64).pow(2).sum())
        return cls._checked(mean, var)

    @classmethod
    def _checked(cls, mean: Tensor, var: float) -> Normalizer:
        """``scale = sqrt(d / var)``, refusing statistics that are non-finite or zero (large norms are fine:
        the scale is the data's own)."""
        if not (math.isfinite(var) and bool(torch.isfinite(mean).all())):
            raise ValueError(
                f"the activation statistics are not finite (total variance {var}): the store holds inf/NaN values"
            )
        if var <= 0:
            raise ValueError("the activation statistics have zero variance: is the store empty?")
        return cls(mean, math.sqrt(mean.numel() / var))

    @classmethod
    def from_sample(cls, x: Tensor) -> Normalizer:
        x = x.double()
        mean = x.mean(0)
        var = float((x - mean).pow(2).sum(-1).mean())
        return cls._checked(mean.float(), var)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) * self.scale

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "scale": self.scale}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Normalizer:
        return cls(torch.tensor(raw["mean"], dtype=torch.float32), float(raw["scale"]))


@dataclass
class StepOutput:
    """What one SAE's forward gives the trainer (all tensors; ``fired`` is a ``[d_sae]`` bool mask)."""

    loss: Tensor
    fvu: Tensor
    auxk: Tensor
    sparsity: Tensor
    l0: Tensor
    mse: Tensor  # mean squared error per element, normalised units
    fired: Tensor


def low_precision_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The dtype of the encoder matmul (None: float32): ``auto`` picks bf16 on CUDA and on AMX/AVX512-BF16 CPUs."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_has_fast_bf16() else None


def _cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 (``torch.backends.cpu.get_cpu_capability`` says only AVX512)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class TrainingDivergedError(RuntimeError):
    """An SAE's loss or gradient became non-finite: training stops (the weights are the last finite step's)."""

    def __init__(
        self, step: int, names: list[str], last_loss: dict[str, float | None], what: str, detail: str = ""
    ) -> None:
        self.step, self.names, self.last_loss, self.what = step, names, last_loss, what
        last = ", ".join(f"{n}: {last_loss.get(n)}" for n in names)
        super().__init__(
            f"training diverged at step {step}: non-finite {what} of SAE {', '.join(names)} "
            f"(last finite loss {last}); lower lr, check the store's values, or train with precision=fp32"
            + (f"; {detail}" if detail else "")
        )


class _JumpStep(torch.autograd.Function):
    """Heaviside step ``H(pre - θ)`` with a rectangle-kernel straight-through gradient for ``θ``."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - threshold).abs() < eps / 2).to(grad.dtype) / eps
        return None, -(grad * kernel).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre - θ)``; the gradient reaches ``pre`` where active and ``θ`` through the kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - threshold).abs() < eps / 2).to(grad.dtype) / eps
        return grad * (pre > threshold), -(grad * threshold * kernel).sum(0), None


class TrainingSAE(nn.Module):
    """The trainable form of one SAE, on normalised activations.

    Parameters: ``encoder [d_sae, d_in]`` (one row per latent, the transpose of sae-lens's ``W_enc``),
    ``b_enc``, ``W_dec [d_sae, d_in]`` (used row-normalised), ``b_dec``; ``log_threshold`` for JumpReLU.
    BatchTopK keeps a running ``threshold`` buffer for inference.
    """

    def __init__(
        self,
        spec: SAESpec,
        d_in: int,
        *,
        generator: torch.Generator | None = None,
        precision: Precision = "auto",
        backend: Literal["auto", "csr", "dense"] = "auto",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.d_in = d_in
        self.d_sae = spec.width(d_in)
        self.architecture = spec.architecture
        if self.architecture in SPARSE_ARCHITECTURES and not 0 < spec.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae={self.d_sae}, got {spec.k}")
        self.precision = precision
        self.backend = backend
        w = torch.randn(self.d_sae, d_in, generator=generator)
        w /= w.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())
        # Encoder = decoder transposed (OpenAI's TopK init); dense SAEs start with small activations
        # (sae-lens / Anthropic: decoder norm 0.1, folded here into the encoder).
        self.encoder = nn.Parameter(w * (1.0 if self.architecture in SPARSE_ARCHITECTURES else 0.1))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if self.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((self.d_sae,), math.log(spec.jumprelu_init_threshold)))
        self.register_buffer("threshold", torch.zeros(()))  # BatchTopK: running batch threshold
        self.register_buffer("threshold_seen", torch.zeros((), dtype=torch.int64))

    # -- forward -----------------------------------------------------------------------------------
    def _lp(self, device: torch.device) -> torch.dtype | None:
        return low_precision_dtype(self.precision, device)  # type: ignore[arg-type]

    def _backend(self, device: torch.device) -> Literal["csr", "dense"]:
        if self.backend != "auto":
            return self.backend  # type: ignore[return-value]
        return "csr" if device.type == "cpu" else "dense"

    def inv_norm(self) -> Tensor:
        return self.W_dec.norm(dim=-1).clamp_min(1e-8).reciprocal()

    def forward(self, x: Tensor, dead: Tensor | None = None) -> StepOutput:
        """One training forward on normalised ``x [rows, d_in]``; ``dead`` is a ``[d_sae]`` bool mask."""
        total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        inv_norm = self.inv_norm()
        zero = x.new_zeros(())
        recon, fired, l0, sparsity = self._reconstruct(x, inv_norm)
        err = x - recon
        fvu = err.pow(2).sum() / total_var
        auxk = zero
        if self.architecture in SPARSE_ARCHITECTURES and dead is not None and self.spec.auxk_coefficient > 0:
            auxk = self._auxk(x, err.detach(), dead, inv_norm, total_var)
        var_per_token = total_var / x.shape[0]
        loss = fvu + self.spec.auxk_coefficient * auxk + self.spec.coefficient() * sparsity / var_per_token
        return StepOutput(
            loss=loss,
            fvu=fvu.detach(),
            auxk=auxk.detach(),
            sparsity=sparsity.detach(),
            l0=l0,
            mse=err.detach().pow(2).mean(),
            fired=fired,
        )

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The reconstruction of normalised ``x`` (in eval mode BatchTopK uses its learned threshold)."""
        return self._reconstruct(x, self.inv_norm())[0]

    def _reconstruct(self, x: Tensor, inv_norm: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(reconstruction, fired [d_sae] mask, L0, sparsity penalty)`` of normalised ``x``."""
        zero = x.new_zeros(())
        if self.architecture == "topk" or (self.architecture == "batchtopk" and self.training):
            plan = SparsePlan(self.d_sae, self._backend(x.device), self._lp(x.device))
            vals, idx = self._sparse_encode(x, plan)
            recon = sparse_decode(vals * inv_norm[idx], idx, self.W_dec, plan) + self.b_dec
            active = vals > 0
            fired = torch.zeros(self.d_sae, dtype=vals.dtype, device=x.device)
            fired.index_add_(0, idx.reshape(-1), active.reshape(-1).to(vals.dtype))  # no host sync
            return recon, fired > 0, active.sum() / x.shape[0], zero
        lp = self._lp(x.device)
        sparsity = zero
        with torch.autocast(x.device.type, dtype=lp or torch.float32, enabled=lp is not None):
            pre = F.linear(x - self.b_dec, self.encoder, self.b_enc).float()
            if self.architecture == "relu":
                z = pre.relu()
                sparsity = (z * (1 / inv_norm)).sum(-1).mean()  # L1 of activations times decoder norms
            elif self.architecture == "batchtopk":  # inference rule
                z = pre.relu() * (pre > self.threshold)
            else:
                threshold = self.log_threshold.exp()
                z = _JumpReLU.apply(pre, threshold, self.spec.jumprelu_bandwidth)
                sparsity = _JumpStep.apply(pre, threshold, self.spec.jumprelu_bandwidth).sum(-1).mean()
            recon = (z * inv_norm) @ self.W_dec + self.b_dec
        active = z > 0
        return recon.float(), active.any(0), active.sum() / x.shape[0], sparsity

    def _sparse_encode(self, x: Tensor, plan: SparsePlan) -> tuple[Tensor, Tensor]:
        lp = self._lp(x.device)
        if self.architecture == "topk":
            return topk_encode(x, self.encoder, self.b_enc, self.b_dec, self.spec.k, plan, lp)
        # BatchTopK: each token's top (m·k) candidates, then the batch's top (rows·k) among them.
        width = min(self.spec.batchtopk_max_per_token * self.spec.k, self.d_sae)
        vals, idx = topk_encode(x, self.encoder, self.b_enc, self.b_dec, width, plan, lp)
        n_keep = min(x.shape[0] * self.spec.k, vals.numel())
        with torch.no_grad():
            cut = vals.detach().reshape(-1).kthvalue(vals.numel() - n_keep + 1).values
            cut = cut.clamp_min(torch.finfo(vals.dtype).tiny)
            keep = vals.detach() >= cut
            if self.training:  # a running mean over the first 100 batches, then an EMA with rate 1/100
                rate = 1.0 / (self.threshold_seen.clamp_max(99).to(vals.dtype) + 1)
                self.threshold.add_(rate * (cut - self.threshold))
                self.threshold_seen.add_(1)
        return vals * keep, idx

    def _auxk(self, x: Tensor, err: Tensor, dead: Tensor, inv_norm: Tensor, total_var: Tensor) -> Tensor:
        """AuxK: the top ``d_in/2`` dead latents reconstruct the live latents' error (Gao et al., 2024)."""
        dead_idx = dead.nonzero().squeeze(1)
        n_dead = int(dead_idx.numel())
        if n_dead == 0:
            return x.new_zeros(())
        k_aux = min(self.d_in // 2, n_dead)
        scale = min(n_dead / (self.d_in // 2), 1.0)
        lp = self._lp(x.device)
        with torch.autocast(x.device.type, dtype=lp or torch.float32, enabled=lp is not None):
            pre = F.linear(x - self.b_dec, self.encoder[dead_idx], self.b_enc[dead_idx])
            vals, pos = pre.float().topk(k_aux, dim=-1, sorted=False)
            z = torch.zeros(x.shape[0], n_dead, device=x.device, dtype=torch.float32).scatter(1, pos, vals.relu())
            e_hat = (z * inv_norm[dead_idx]) @ self.W_dec[dead_idx]
        return scale * (e_hat.float() - err).pow(2).sum() / total_var

    # -- export --------------------------------------------------------------------------------------
    @torch.no_grad()
    def to_inference(self, normalizer: Normalizer, metadata: dict[str, Any] | None = None) -> SparseAutoencoder:
        """A :class:`SparseAutoencoder` on raw activations: the normalisation and decoder norms folded in.

        With ``x_n = (x - μ)·c``: ``W_enc = encoderᵀ``, ``b_enc / c``, ``b_dec / c + μ``, unit-norm
        ``W_dec`` rows, thresholds ``/ c``. Feature activations come out ``1/c`` times the normalised
        ones (in residual-stream units), so TopK selection, ReLU and JumpReLU gates are unchanged.
        """
        c = normalizer.scale
        cfg = SAEConfig(
            d_in=self.d_in,
            d_sae=self.d_sae,
            architecture=self.architecture,
            k=self.spec.k,
            metadata=dict(metadata or {}),
        )
        sae = SparseAutoencoder(cfg)
        sae.W_enc.copy_(self.encoder.T.float())
        sae.b_enc.copy_(self.b_enc.float() / c)
        sae.W_dec.copy_(self.W_dec.float() * self.inv_norm().float()[:, None])
        sae.b_dec.copy_(self.b_dec.float() / c + normalizer.mean.to(self.b_dec.device))
        if self.architecture == "jumprelu":
            sae.threshold.copy_(self.log_threshold.exp().float() / c)
        elif self.architecture == "batchtopk":
            sae.threshold.fill_(float(self.threshold) / c)
        return sae.cpu()


class SAEBundle(nn.Module):
    """Several SAEs trained on the same batches: one module for DDP / DeepSpeed to wrap."""

    def __init__(self, saes: dict[str, TrainingSAE]) -> None:
        super().__init__()
        self.saes = nn.ModuleDict(saes)

    def forward(self, x: Tensor, dead: dict[str, Tensor] | None = None) -> dict[str, StepOutput]:
        dead = dead or {}
        return {name: sae(x, dead.get(name)) for name, sae in self.saes.items()}


@dataclass
class TrainerConfig:
    """Optimisation settings shared by the SAEs of one run."""

    batch_size: int = 4096  # tokens per optimiser step, all ranks together
    total_tokens: int = 1_000_000
    warmup: float = 0.02  # fraction of steps with a linear warm-up
    decay: float = 0.2  # fraction of steps at the end with a linear decay to 0
    betas: tuple[float, float] = (0.9, 0.999)
    dead_tokens: int = 250_000  # a latent that has not fired for this many tokens is dead
    precision: Precision = "auto"  # encoder matmul in bf16 where the hardware has fast bf16
    backend: Literal["auto", "csr", "dense"] = "auto"
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)


def lr_factor(step: int, total: int, warmup: float, decay: float) -> float:
    """Linear warm-up over ``warmup·total`` steps, constant, linear decay to 0 over the last ``decay·total``."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    decay_start = total - int(decay * total)
    if step >= decay_start and decay > 0:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside a DDP / DeepSpeed wrapper (or ``module`` itself)."""
    return getattr(module, "module", module)


class SAETrainer:
    """Trains the SAEs of ``specs`` together on normalised batches; see the module docstring."""

    def __init__(
        self,
        specs: list[SAESpec],
        d_in: int,
        config: TrainerConfig,
        *,
        normalizer: Normalizer | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not specs:
            raise ValueError("give at least one SAESpec")
        names = [s.label(d_in) for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"SAE names must be unique, got {names}: set SAESpec.name")
        self.specs = dict(zip(names, specs, strict=True))
        self.d_in = d_in
        self.config = config
        self.device = torch.device(device)
        self.normalizer = normalizer or Normalizer.identity(d_in)
        saes = {}
        for i, (name, spec) in enumerate(self.specs.items()):
            gen = torch.Generator().manual_seed(config.seed * 1000 + i)
            saes[name] = TrainingSAE(spec, d_in, generator=gen, precision=config.precision, backend=config.backend)
        self.model = SAEBundle(saes).to(self.device)
        self.base_lrs = [spec.learning_rate(d_in) for spec in self.specs.values()]
        groups = [
            {"params": list(sae.parameters()), "lr": lr} for sae, lr in zip(saes.values(), self.base_lrs, strict=True)
        ]
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(groups, betas=config.betas, eps=1e-8, fused=fused)
        self.engine: Any = None  # a DeepSpeed engine or a DDP module, see wrap()
        self.step = 0
        self.tokens = 0
        self.last_loss: dict[str, float | None] = dict.fromkeys(self.specs)  # the last finite loss per SAE
        self.since_fired = {n: torch.zeros(s.d_sae, dtype=torch.int64, device=self.device) for n, s in saes.items()}

    @property
    def saes(self) -> dict[str, TrainingSAE]:
        return dict(unwrap_model(self.model).saes.items())  # type: ignore[arg-type]

    def wrap(self, engine: Any, optimizer: Any | None = None) -> None:
        """Run forward/backward/step through ``engine``: a DeepSpeed engine (with its ``optimizer``) or a
        ``DistributedDataParallel`` around :attr:`model`."""
        self.engine = engine
        if optimizer is not None:
            self.optimizer = optimizer

    def dead_masks(self) -> dict[str, Tensor]:
        return {n: c >= self.config.dead_tokens for n, c in self.since_fired.items()}

    def train_step(self, batch: Tensor) -> dict[str, StepOutput]:
        """One optimiser step on this rank's raw batch ``[rows, d_in]``; returns each SAE's outputs."""
        factor = lr_factor(self.step, self.config.total_steps, self.config.warmup, self.config.decay)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        x = self.normalizer(batch.to(self.device, torch.float32, non_blocking=True))
        module = self.engine if self.engine is not None else self.model
        outs: dict[str, StepOutput] = module(x, self.dead_masks())
        loss = sum(o.loss for o in outs.values())
        if hasattr(self.engine, "backward"):  # DeepSpeed (its gradients are partitioned: the loss is checked)
            self.engine.backward(loss)
            self._check_finite(outs, with_grads=False)
            self.engine.step()
        else:
            loss.backward()  # type: ignore[union-attr]
            self._check_finite(outs, with_grads=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        rows = batch.shape[0]
        world = 1
        fired = torch.cat([o.fired for o in outs.values()]).to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX)
        start = 0
        for counter in self.since_fired.values():
            mask = fired[start : start + counter.numel()].bool()
            start += counter.numel()
            counter.add_(rows * world).masked_fill_(mask, 0)
        self.step += 1
        self.tokens += rows * world
        return outs

    def _check_finite(self, outs: dict[str, StepOutput], *, with_grads: bool) -> None:
        """Raise :class:`TrainingDivergedError` when a loss (or gradient norm) is non-finite on any rank.

        One small all-reduce (a sum: NaN and inf survive it) and one host sync per step; every rank sees
        the same values, so all stop at the same step, before the optimiser changes the weights."""
        values = [o.loss.detach().float() for o in outs.values()]
        if with_grads:
            saes = self.saes
            for name in outs:
                grads = [p.grad for p in saes[name].parameters() if p.grad is not None]
                values.append(torch.stack(torch._foreach_norm(grads)).norm() if grads else values[0].new_zeros(()))
        status = torch.stack(values)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(status)
        host = status.tolist()
        names = list(outs)
        losses = host[: len(names)]
        bad_loss = [n for n, v in zip(names, losses, strict=True) if not math.isfinite(v)]
        bad_grad = [n for n, v in zip(names, host[len(names) :], strict=False) if not math.isfinite(v)]
        if bad_loss or bad_grad:
            if with_grads:  # no step happens: drop the non-finite gradients so that a later step starts clean
                self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if bad_loss else "gradient"
            raise TrainingDivergedError(self.step + 1, bad_loss or bad_grad, dict(self.last_loss), what)
        for name, v in zip(names, losses, strict=True):
            self.last_loss[name] = v / world

    def metrics(self, outs: dict[str, StepOutput]) -> dict[str, float]:
        """Loggable floats (syncs the device): per SAE ``{name}/loss``, ``fvu``, ``explained_variance``,
        ``mse`` (raw units), ``l0``, ``dead_fraction``, ``auxk``, and ``lr``."""
        out: dict[str, float] = {}
        dead = self.dead_masks()
        for i, (name, o) in enumerate(outs.items()):
            out[f"{name}/loss"] = float(o.loss.detach())
            out[f"{name}/fvu"] = float(o.fvu)
            out[f"{name}/explained_variance"] = 1.0 - float(o.fvu)
            out[f"{name}/mse"] = float(o.mse) / self.normalizer.scale**2
            out[f"{name}/l0"] = float(o.l0)
            out[f"{name}/dead_fraction"] = float(dead[name].float().mean())
            out[f"{name}/auxk"] = float(o.auxk)
            out[f"{name}/lr"] = float(self.optimizer.param_groups[i]["lr"])
        return out

    # -- checkpoints --------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        """Everything but the weights and optimiser moments (DeepSpeed saves those itself)."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "since_fired": {n: c.cpu() for n, c in self.since_fired.items()},
            "normalizer": self.normalizer.to_dict(),
            "specs": {n: asdict(s) for n, s in self.specs.items()},
            "config": asdict(self.config),
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        if set(state["specs"]) != set(self.specs):
            raise ValueError(f"checkpoint holds SAEs {sorted(state['specs'])}, this run trains {sorted(self.specs)}")
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        for name, counter in state["since_fired"].items():
            self.since_fired[name] = counter.to(self.device)
        self.normalizer = Normalizer.from_dict(state["normalizer"])

    def save(self, directory: Path, *, optimizer: bool = True) -> None:
        """Write the one checkpoint format: ``model.pt`` (the SAEs' weights) and ``trainer.pt``
        (:meth:`trainer_state`, with the optimiser's state under ``"optimizer"`` unless ``optimizer=False``:
        DeepSpeed saves its own). :func:`read_checkpoint` and :meth:`restore` read it back."""
        torch.save(unwrap_model(self.model).state_dict(), directory / MODEL_FILE)
        state = self.trainer_state()
        if optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        torch.save(state, directory / TRAINER_FILE)

    def restore(self, model_state: dict[str, Any], trainer_state: dict[str, Any]) -> None:
        """Continue from a checkpoint (:func:`read_checkpoint`): weights, trainer state, and the optimiser's
        state when the checkpoint holds it (a DeepSpeed engine restores its own)."""
        unwrap_model(self.model).load_state_dict(model_state)
        if "optimizer" in trainer_state:
            self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.load_trainer_state(trainer_state)

    def export(self, metadata: dict[str, Any] | None = None) -> dict[str, SparseAutoencoder]:
        """The trained SAEs on raw activations (normalisation folded in), by name."""
        return {name: sae.to_inference(self.normalizer, metadata) for name, sae in self.saes.items()}


def read_checkpoint(directory: Path, device: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model state, trainer state)`` of a checkpoint that :meth:`SAETrainer.save` wrote."""
    model_state = torch.load(directory / MODEL_FILE, map_location=device, weights_only=True)
    return model_state, torch.load(directory / TRAINER_FILE, map_location=device, weights_only=True)


__all__ = [
    "Normalizer",
    "SAEBundle",
    "SAESpec",
    "SAETrainer",
    "StepOutput",
    "TrainerConfig",
    "TrainingDivergedError",
    "TrainingSAE",
    "low_precision_dtype",
    "lr_factor",
    "read_checkpoint",
    "unwrap_model",
]
