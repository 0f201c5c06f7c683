"""``EvalConfig``: the settings of ``pluristeer evaluate``, ``evaluate --sweep`` and ``recommend`` (YAML +
``--set field=value``). One config for the three, because they are clients of one engine
(:mod:`pipelines.eval_engine`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import Field

from common.config import (
    ActorPool,
    ComputeDtype,
    ConfigError,
    Count,
    NonNegFloat,
    NonNegInt,
    PathOrURI,
    Positive,
    RaySection,
    StageConfig,
    Tracking,
    check,
)
from pipelines.eval_plan import ALL_CONDITIONS, BASELINE, KNOWN_CONDITIONS, Condition, Switches, make_conditions
from pipelines.tasks import BUNDLED, check_task_settings, task_name
from sae import storage


@dataclass
class EvalConfig(StageConfig, ActorPool, RaySection, Tracking):
    """Settings of ``pluristeer evaluate`` / ``recommend``."""

    RENAMED: ClassVar[dict[str, str]] = {"pd_alpha_mislc": "task_alphas"}

    model: str = "embedded"
    sae_8x: PathOrURI | None = None  # SAE directories (sae-lens layout); the steering layer is their hook_layer
    sae_32x: PathOrURI | None = None
    layer: int | None = None  # default: the SAEs' hook_layer (needed when no SAE is used)
    tasks: list[str] = field(default_factory=lambda: list(BUNDLED))  # bundled task names and/or .jsonl files
    templates: dict = field(default_factory=dict)  # JSONL task -> {question, feedback, persona} prompt templates
    test_fraction: float = 0.3  # JSONL tasks: share of each perspective's records in test (where no meta.split)
    conditions: list[str] = field(default_factory=lambda: list(ALL_CONDITIONS))
    limit: Annotated[int, Field(ge=0, description="0: the full test sets")] = 0  # test records per perspective
    task_limits: dict[str, Count] = field(default_factory=dict)  # task -> its own limit, used only when limit > 0
    max_perspectives: Annotated[int, Field(ge=0, description="0: all")] = 10  # per task, most samples first
    perspectives: dict[str, list[str]] = field(default_factory=dict)  # task -> explicit list of perspectives
    samples: Count = 50  # feedback pairs per perspective for the vectors (train split)
    k_shots: Count = 3
    pd_k_classify: Count = 3  # perspectives combined by pluralistic decoding
    pd_k_distribution: Count = 6
    pd_alpha: NonNegFloat | None = None  # PD contrast weight for every task; default: each task's own (0.2, MisLC 0.1)
    task_alphas: dict[str, NonNegFloat] = field(default_factory=dict)  # task -> α
    pd_tau: Positive = 0.4
    pd_top_k: Count = 20
    coeff: float = 1.0  # steering coefficient c
    task_coeffs: dict[str, float] = field(default_factory=dict)  # task -> c (e.g. from the sweep)
    caa_coeff: float | None = None  # default: coeff
    keep_error: bool = True  # reference-fidelity switches for every steering condition (ref-* set their own)
    steer_decode: bool = True
    from_position: NonNegInt = 0
    reference_entropy: bool = False  # PD conditions use the reference's DVD entropy
    crehate_definition: str | None = None  # a legal definition (e.g. TOS_yt) put before every CREHate post
    bootstrap: Annotated[int, Field(ge=100, description="1000 recommended")] = 1000  # resamples
    seed: int = 42
    items_per_unit: Count = 8
    batch_size: Count = 16
    max_batch_tokens: Count = 4096
    resume_from_layer: bool = True  # steered rows reuse the unsteered forward up to the steering layer
    dtype: ComputeDtype = "float32"
    out: PathOrURI = Path("results/run")  # a directory or a URI (s3://bucket/prefix): rows, tables, plots, run.json
    work_dir: PathOrURI | None = None  # vectors, readouts and finished units; default runs/evaluate/<out name>
    name: str | None = None  # run name (W&B); default: out's name
    dry_run: bool = False  # plan and count tokens only
    # the sweep and recommend (on a held-out part of the train split): coefficients, SAEs, CAA layers
    sweep_coeffs: list[Positive] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0])
    sweep_saes: list[PathOrURI] = field(default_factory=list)  # more SAEs (any layers) besides sae_8x / sae_32x
    sweep_layers: list[NonNegInt] = field(default_factory=list)  # extra layers swept with CAA vectors (no SAE needed)
    sweep_limit: Annotated[int, Field(ge=0, description="0: all")] = 20  # held-out training records scored

    def validate(self) -> None:
        check(bool(self.tasks), "tasks: give at least one task")
        check(self.work_dir is None or not storage.is_uri(self.work_dir),
              f"work_dir: {storage.display(self.work_dir or '')} must be a local directory (the resumable units and "
              "vectors live there); only out= may be a URI")  # fmt: skip
        check_task_settings(self.tasks, self.templates, self.test_fraction)
        names = self.task_names
        bad = sorted(set(self.conditions) - set(KNOWN_CONDITIONS))
        check(not bad, f"conditions: unknown {bad}; known: {list(KNOWN_CONDITIONS)}")
        check(BASELINE in self.conditions, f"conditions: must include {BASELINE!r} (the paired baseline)")
        check(bool(self.sweep_coeffs), "sweep_coeffs: give at least one coefficient")
        for key in ("task_coeffs", "task_limits", "perspectives", "task_alphas"):
            for task in getattr(self, key):
                check(task in names, f"{key}: unknown task {task!r}; the tasks are {names}")

    @property
    def task_names(self) -> list[str]:
        return [task_name(t) for t in self.tasks]

    def check_saes(self, conditions: Sequence[Condition]) -> None:
        """Every SAE the conditions steer with is configured."""
        missing = []
        for size in ("8x", "32x"):
            users = sorted({c.name for c in conditions if c.steer is not None and c.steer.sae == size})
            if users and getattr(self, f"sae_{size}") is None:
                missing.append(f"sae_{size}: not set, but conditions {users} steer with it")
        if missing:
            raise ConfigError("; ".join(missing))

    def condition_objects(self, task: str) -> list[Condition]:
        switches = Switches(
            coeff=float(self.task_coeffs.get(task, self.coeff)), caa_coeff=self.caa_coeff, keep_error=self.keep_error,
            steer_decode=self.steer_decode, from_position=self.from_position,
            reference_entropy=self.reference_entropy,
        )  # fmt: skip
        return make_conditions(self.conditions, switches)

    def alpha_for(self, task: str, default: float) -> float:
        if task in self.task_alphas:
            return float(self.task_alphas[task])
        return default if self.pd_alpha is None else self.pd_alpha

    @property
    def named_saes(self) -> dict[str, Path]:
        """The evaluated SAEs by the label their conditions use (``8x``, ``32x``)."""
        return {size: path for size in ("8x", "32x") if (path := getattr(self, f"sae_{size}")) is not None}

    @property
    def work(self) -> Path:
        return self.work_dir or Path("runs/evaluate") / storage.name(self.out)

    @property
    def run_name(self) -> str:
        return self.name or storage.name(self.out)


__all__ = ["EvalConfig"]
