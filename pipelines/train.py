"""``pluristeer train``: fit SAEs (8x, 32x, ... from one pass) on an activation store with Ray Train.

A :class:`ray.train.torch.TorchTrainer` runs :func:`train_worker` on ``workers`` processes: each reads
an equal share of the store's rows (:meth:`ActivationStore.iter_batches`), and the SAEs of
:class:`sae.train.SAETrainer` train on the same batches under DDP (gloo on CPU, NCCL on GPU) or DeepSpeed
(ZeRO stage 0-2; on CPU through gloo). Every ``checkpoint_every`` steps the workers report a checkpoint,
so a killed worker restarts from it (``max_failures``), and rerunning the same command (same ``name`` and
``out``) resumes an interrupted run. Rank 0 logs loss, MSE, explained variance, L0, dead fraction,
tokens/s and MFU to W&B. At the end the driver writes one sae-lens directory per SAE into ``out``
(normalisation folded in) with ``training.json``, and evaluates each on held-out corpus text (MSE,
explained variance, L0, dead fraction, CE loss recovered).

Numerics: the driver refuses a store whose shards hold non-finite values (from the shard footers'
statistics, before Ray starts; the readers check every batch too). A non-finite loss or gradient stops the
run (:class:`sae.train.TrainingDivergedError` on every rank at the same step): the workers report the last
finite state as a checkpoint, the driver raises the error naming the step, the SAE and its last finite loss,
and no SAE is exported. An SAE whose CE loss recovered is far below its explained variance is flagged in
``training.json`` (``warnings``) and in the command's summary.

``store`` and ``out`` may be URIs (``s3://bucket/prefix``, :mod:`sae.storage`): the workers stream
shards from the object store, Ray Train keeps its checkpoints there (``RunConfig.storage_filesystem``),
and the SAE directories are uploaded file by file (W&B's offline runs stay local, under ``./runs``).
"""

from __future__ import annotations

import math
import os
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from pydantic import Field
from ray.train.torch import TorchConfig, TorchTrainer

from common.config import (
    ConfigError,
    Count,
    Fraction,
    NonNegFloat,
    NonNegInt,
    PathOrURI,
    Positive,
    RaySection,
    Resources,
    Retries,
    StageConfig,
    Tracking,
    check,
)
from common.raycluster import init_ray
from pipelines.contexts import plan_contexts
from pipelines.corpus import SOURCES, iter_documents
from pipelines.datasets import data_dir
from pipelines.store import MANIFEST, ActivationStore, StoreError, read_shard_metadata
from pipelines.tracking import Tracker
from sae import storage
from sae.evaluate import ce_loss_recovered, reconstruction_metrics
from sae.hooks import residuals
from sae.lm import EMBEDDED, load_lm
from sae.perf import flops_per_token, matmul_peak_flops
from sae.train import (
    Normalizer,
    SAESpec,
    SAETrainer,
    TrainerConfig,
    TrainingDivergedError,
    low_precision_dtype,
    read_checkpoint,
)

DEEPSPEED_TAG = "deepspeed"
TRAINING_FILE = "training.json"
DIVERGED = "diverged"  # the key of the workers' last report when training stopped on a non-finite value
# An SAE is flagged when its CE loss recovered is this far below its explained variance (a healthy SAE's
# CE loss recovered is at or above its EV: 0.985 at EV 0.82 on the embedded model).
CE_GAP_FLAG = 0.25
# ... and when its explained variance over the non-dominant dimensions (sae.evaluate) is this far below the
# headline one (Gemma 3 270M at layer 9: one dimension holds 60% of the variance, EV 0.87 but 0.65 elsewhere).
EV_REST_FLAG = 0.1


@dataclass
class TrainConfig(StageConfig, RaySection, Tracking):
    """Configuration of ``pluristeer train`` (YAML fields; override with ``--set field=value``)."""

    RENAMED: ClassVar[dict[str, str]] = {"output_dir": "out", "tokens": "n_tokens"}

    store: PathOrURI = Path("runs/store")  # activation store (pluristeer collect's output): a directory or a URI
    layer: int | None = None  # None: the store's only layer
    expansions: list[float] = field(default_factory=lambda: [8.0, 32.0])  # one SAE per expansion
    k: Count = 32
    architecture: Literal["topk", "batchtopk", "relu", "jumprelu"] = "topk"
    saes: list[dict] = field(default_factory=list)  # explicit SAESpec mappings; replace expansions/k/architecture
    lr: Positive | None = None  # None: 8e-4 / sqrt(d_sae / 2^14) per SAE
    batch_size: Count = 2048  # tokens per step, all workers together
    n_tokens: NonNegInt = 0  # tokens to train on; 0: epochs × the store's rows
    epochs: Positive = 1.0
    shuffle_window: Annotated[int, Field(ge=0, description="0: no shuffling")] = 65536
    warmup: Fraction = 0.02  # of the steps
    decay: Fraction = 0.2  # of the steps
    dead_tokens: Count = 250_000
    auxk_coefficient: NonNegFloat = 1 / 32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    workers: Count = 1
    cpus_per_worker: Positive = 1.0
    worker_resources: Resources = field(default_factory=dict)  # custom Ray resources per worker (placement)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # of the workers' bundles
    use_gpu: bool = False
    deepspeed: bool = False
    zero_stage: Literal[0, 1, 2] = 1
    checkpoint_every: Count = 100  # steps
    keep_checkpoints: Count = 2
    max_failures: Retries = 3
    log_every: Count = 10  # steps
    out: PathOrURI = Path("runs/train")  # or a URI (s3://bucket/prefix): SAE directories and checkpoints
    name: str | None = None  # Ray Train run name; None: derived from the store and layer
    seed: int = 0
    eval_tokens: NonNegInt = 16384  # held-out corpus tokens for the final evaluation; 0: skip it
    eval_model: str | None = None  # LM for CE loss recovered; None: the store's model
    corpus: PathOrURI | None = None  # held-out text; None: $PLURISTEER_DATA/corpus
    heldout: Literal["tail", "after_store"] = "tail"  # the corpus's last documents, or the contexts after the store's
    inject_failure_at_step: NonNegInt = 0  # testing: the last worker kills itself once at this step
    inject_nan_at_step: NonNegInt = 0  # testing: the last worker's batch at this step holds a NaN (0: off)

    def validate(self) -> None:
        check(
            self.batch_size % self.workers == 0,
            f"batch_size ({self.batch_size}) must be divisible by workers ({self.workers})",
        )
        reserved = sorted(set(self.worker_resources) & {"CPU", "GPU"})
        check(not reserved, f"worker_resources: set {reserved} through cpus_per_worker / use_gpu instead")
        check(self.saes != [] or self.expansions != [], "give expansions (e.g. [8, 32]) or saes")
        self.specs()

    def specs(self) -> list[SAESpec]:
        """The SAEs to train, from ``saes`` or from ``expansions`` × ``k`` × ``architecture``."""
        if self.saes:
            out = []
            for i, raw in enumerate(self.saes):
                try:
                    out.append(SAESpec(**raw))
                except (TypeError, ValueError) as err:
                    fields = sorted(SAESpec.__dataclass_fields__)
                    raise ConfigError(f"saes[{i}]: {err}; an SAE spec takes {fields}") from None
            return out
        try:
            return [
                SAESpec(
                    expansion=e,
                    k=self.k,
                    architecture=self.architecture,
                    lr=self.lr,
                    auxk_coefficient=self.auxk_coefficient,
                )
                for e in self.expansions
            ]
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def trainer_config(self, store_rows: int) -> TrainerConfig:
        tokens = self.n_tokens or int(self.epochs * store_rows)
        if tokens < self.batch_size:
            raise ConfigError(f"tokens ({tokens}) is less than one batch ({self.batch_size}): lower batch_size")
        return TrainerConfig(
            batch_size=self.batch_size,
            total_tokens=tokens,
            warmup=self.warmup,
            decay=self.decay,
            dead_tokens=self.dead_tokens,
            precision=self.precision,
            seed=self.seed,
        )

    def run_name(self, layer: int) -> str:
        return self.name or f"sae-{storage.name(self.store)}-L{layer}"


@dataclass
class TrainResult:
    """What :func:`run_train` returns: the SAE directories, their metrics, and the Ray checkpoint."""

    sae_dirs: dict[str, storage.Location]
    metrics: dict[str, dict[str, Any]]
    checkpoint: str | None
    steps: int
    tokens: int
    report: dict[str, Any] = field(default_factory=dict)  # the last metrics the workers reported
    warnings: dict[str, list[str]] = field(default_factory=dict)  # per SAE: what looks wrong (see flag_metrics)


# -- data ----------------------------------------------------------------------------------------------
def _store_and_layer(cfg: TrainConfig) -> tuple[ActivationStore, int]:
    store = ActivationStore(cfg.store)
    layer = cfg.layer
    if layer is None:
        if len(store.layers) != 1:
            raise ConfigError(f"{cfg.store} holds layers {store.layers}: set layer to one of them")
        layer = store.layers[0]
    if layer not in store.layers:
        raise ConfigError(f"layer {layer} is not in {cfg.store}, which holds layers {store.layers}")
    per_rank, per_batch = len(store) // cfg.workers, cfg.batch_size // cfg.workers
    if per_rank < per_batch:
        raise ConfigError(
            f"{cfg.store} holds {len(store)} rows: with workers={cfg.workers} each reads {per_rank}, less than "
            f"one per-worker batch of {per_batch}; lower batch_size or workers"
        )
    return store, layer


def check_store_finite(store: ActivationStore, layer: int) -> None:
    """Refuse a store whose shards hold non-finite values at ``layer`` (their footers' sums are then
    non-finite): a :class:`StoreError` naming the first such shard. Footers only: no activations are read."""
    for shard in store.manifest.shards:
        path = storage.join(store.root, shard.name)
        stats = read_shard_metadata(path).get("stats", {}).get(str(layer))
        if stats is None:
            continue  # a shard without statistics (not written by collect): the readers check its rows
        if not all(math.isfinite(v) for v in (*stats["sum"], *stats["sumsq"], stats["norm_sum"])):
            raise StoreError(
                f"{path}: layer {layer} holds non-finite values (inf/NaN): this store cannot "
                "be trained on; recollect it (store_dtype=auto, or --set store_dtype=float32 for large residuals)"
            )


def _normalizer(store: ActivationStore, layer: int) -> Normalizer:
    try:
        stats = store.stats(layer)
    except StoreError:
        return Normalizer.from_sample(store.read(layer, limit=65536))
    try:
        return Normalizer.from_stats(stats)
    except ValueError as err:
        raise StoreError(f"{store.root}: layer {layer}: {err}") from None


def stream_batches(
    store: ActivationStore, layer: int, batch_size: int, cfg: TrainConfig, rank: int, world: int, skip: int = 0
) -> Iterator[torch.Tensor]:
    """This rank's batches over epochs without end (epoch ``e`` reshuffles with seed ``(seed, e)``),
    the first ``skip`` dropped (a resumed run continues where its checkpoint was), read ahead in a thread."""

    def endless() -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            n = 0
            for batch in store.iter_batches(
                layer,
                batch_size,
                shuffle_window=cfg.shuffle_window,
                seed=cfg.seed,
                rank=rank,
                world_size=world,
                epoch=epoch,
            ):
                n += 1
                yield batch
            if n == 0:
                raise StoreError(f"rank {rank}: its shards of {store.root} hold less than one batch of {batch_size}")
            epoch += 1

    it = endless()
    for _ in range(skip):
        next(it)
    return _prefetch(it, depth=4)


def _prefetch(it: Iterator[torch.Tensor], depth: int) -> Iterator[torch.Tensor]:
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer
            q.put(err)

    threading.Thread(target=work, daemon=True, name="store-prefetch").start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# -- the worker loop -------------------------------------------------------------------------------------
def deepspeed_config(cfg: TrainConfig, local_batch: int) -> dict[str, Any]:
    """DeepSpeed settings: fp32 master weights and a client Adam (the SAE kernels pick their own matmul
    precision), ZeRO ``zero_stage``."""
    return {
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _save_checkpoint(trainer: SAETrainer, engine: Any, directory: Path, rank: int) -> bool:
    """Write this rank's part of a checkpoint into ``directory``; True if it wrote anything. Rank 0 writes
    :meth:`SAETrainer.save`'s format; under DeepSpeed every rank also writes its shard (the optimiser's)."""
    deepspeed = engine is not None and hasattr(engine, "save_checkpoint")
    if deepspeed:
        engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, client_state={"trainer": trainer.trainer_state()})
    if rank == 0:
        trainer.save(directory, optimizer=not deepspeed)
    return deepspeed or rank == 0


def _load_checkpoint(trainer: SAETrainer, engine: Any, directory: Path) -> None:
    if engine is not None and hasattr(engine, "load_checkpoint"):
        _, client = engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False)
        if client is None:
            raise StoreError(f"{directory} holds no DeepSpeed checkpoint (was the run started without deepspeed?)")
        trainer.load_trainer_state(client["trainer"])
        return
    model_state, state = read_checkpoint(directory, trainer.device)
    if "optimizer" not in state:  # DeepSpeed keeps it in its own shards
        raise StoreError(f"{directory} holds a DeepSpeed checkpoint: resume it with deepspeed=true")
    trainer.restore(model_state, state)


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker training loop that :class:`TorchTrainer` runs (one process per worker)."""

    cfg = TrainConfig.from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    store, layer = _store_and_layer(cfg)
    tcfg = cfg.trainer_config(len(store))
    trainer = SAETrainer(cfg.specs(), store.d_model, tcfg, normalizer=_normalizer(store, layer), device=device)
    local_batch = cfg.batch_size // world
    worker_nodes = _worker_nodes(world)
    engine = None
    if cfg.deepspeed:
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            model=trainer.model, optimizer=trainer.optimizer, config=deepspeed_config(cfg, local_batch)
        )
        trainer.wrap(engine, optimizer)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        engine = DistributedDataParallel(trainer.model, device_ids=[device] if device.type == "cuda" else None)
        trainer.wrap(engine)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            _load_checkpoint(trainer, engine, Path(directory))
    resumed_from = trainer.step
    total = tcfg.total_steps
    batches = stream_batches(store, layer, local_batch, cfg, rank, world, skip=trainer.step)

    tracker = None
    lp = low_precision_dtype(tcfg.precision, device)
    peak = matmul_peak_flops(device, lp or torch.float32)
    flops = sum(flops_per_token(s) for s in trainer.saes.values())
    if rank == 0 and cfg.track:
        tracker = Tracker("train", cfg.to_dict(), cfg.out, name=f"{cfg.run_name(layer)}-r{resumed_from}")
    marker = storage.join(cfg.out, f".{cfg.run_name(layer)}.failure-injected")
    clock, clock_tokens = time.perf_counter(), trainer.tokens
    try:
        while trainer.step < total:
            batch = next(batches)
            if trainer.step + 1 == cfg.inject_nan_at_step and rank == world - 1:
                batch = batch.clone()
                batch[0, 0] = float("nan")
            try:
                outs = trainer.train_step(batch)
            except TrainingDivergedError as err:  # every rank stops here at the same step
                _report_divergence(trainer, engine, rank, err)
                return
            if trainer.step == cfg.inject_failure_at_step and rank == world - 1 and not storage.exists(marker):
                storage.write_bytes(marker, b"")
                time.sleep(5)  # let the controller collect the last reports (it polls every 2 s) before dying
                os.kill(os.getpid(), signal.SIGKILL)
            last = trainer.step == total
            save = last or trainer.step % cfg.checkpoint_every == 0
            if not (save or trainer.step % cfg.log_every == 0):
                continue
            elapsed = time.perf_counter() - clock
            tokens_per_s = (trainer.tokens - clock_tokens) / max(elapsed, 1e-9)
            clock, clock_tokens = time.perf_counter(), trainer.tokens
            metrics = {
                **trainer.metrics(outs),
                "step": trainer.step,
                "tokens": trainer.tokens,
                "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops / (peak * world),
                "peak_flops": peak,
                "resumed_from_step": resumed_from,
            }
            if tracker is not None:
                tracker.log(metrics, step=trainer.step)
            metrics["worker_nodes"] = worker_nodes  # after W&B: where the ranks run, for the driver's record
            if not save:
                ray.train.report(metrics)
                continue
            with tempfile.TemporaryDirectory(prefix="sae-ckpt-") as tmp:
                wrote = _save_checkpoint(trainer, engine, Path(tmp), rank)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None,
                    checkpoint_dir_name=f"step-{trainer.step:08d}",
                )
    finally:
        if tracker is not None:
            tracker.finish()


def _report_divergence(trainer: SAETrainer, engine: Any, rank: int, err: TrainingDivergedError) -> None:
    """The last report of a diverged run: the error's facts, and a checkpoint of the last finite state (no
    optimiser step was taken), so the run's checkpoint stays a good one and a rerun can resume from it."""
    facts = {"step": err.step, "names": err.names, "last_loss": err.last_loss, "what": err.what}
    with tempfile.TemporaryDirectory(prefix="sae-ckpt-") as tmp:
        wrote = _save_checkpoint(trainer, engine, Path(tmp), rank)
        ray.train.report(
            {DIVERGED: facts, "step": trainer.step, "tokens": trainer.tokens},
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None,
            checkpoint_dir_name=f"step-{trainer.step:08d}-last-finite",
        )


def _ray_storage(output: storage.Location) -> dict[str, Any]:
    """``RunConfig`` storage arguments for Ray Train's checkpoints under ``output/ray``: a local path, or
    the object store's path with its ``pyarrow`` filesystem (Ray takes the path without ``s3://`` then)."""
    target = storage.join(output, "ray")
    if not storage.is_uri(target):
        return {"storage_path": str(target)}
    filesystem, path = storage.resolve(target)
    return {"storage_path": path, "storage_filesystem": filesystem}


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (one all-gather over the process group)."""
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


# -- the driver ------------------------------------------------------------------------------------------
def run_train(cfg: TrainConfig) -> TrainResult:
    """Train, export and evaluate the SAEs of ``cfg``; see the module docstring."""

    store, layer = _store_and_layer(cfg)
    cfg.trainer_config(len(store))  # fail early on a too-small store
    check_store_finite(store, layer)
    _normalizer(store, layer)  # statistics that cannot normalise fail here, not in every worker
    output = storage.absolute(cfg.out)
    storage.makedirs(output)
    init_ray(cfg.ray_address)
    cfg_dict = {**cfg.to_dict(), "store": str(storage.absolute(cfg.store)), "out": str(output)}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg_dict},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.worker_resources},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name(layer),
            **_ray_storage(output),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
        ),
    )
    result = trainer.fit()
    final = dict(result.metrics or {})
    if DIVERGED in final:
        facts = final[DIVERGED]
        where = result.checkpoint.path if result.checkpoint is not None else "none"
        raise TrainingDivergedError(
            int(facts["step"]),
            list(facts["names"]),
            dict(facts["last_loss"]),
            facts["what"],
            detail=f"no SAE was exported; the last finite state is the checkpoint {where}",
        )
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as directory:
        model_state, trainer_state = read_checkpoint(Path(directory))
    sae_dirs, metrics = export_saes(TrainConfig.from_dict(cfg_dict), store, layer, model_state, trainer_state, final)
    return TrainResult(
        warnings={name: flag_metrics(m["eval"]) for name, m in metrics.items()},
        sae_dirs=sae_dirs,
        metrics=metrics,
        checkpoint=_checkpoint_location(output, result.checkpoint.path),
        steps=int(trainer_state["step"]),
        tokens=int(trainer_state["tokens"]),
        report=final,
    )


def _checkpoint_location(output: storage.Location, path: str) -> str:
    """Ray's checkpoint path as the user wrote the output: with the URI's scheme for an object store."""
    return f"{str(output).split('://', 1)[0]}://{path}" if storage.is_uri(output) else path


def _pythonpath() -> str:
    """This checkout first on the workers' ``PYTHONPATH`` (a no-op where pluristeer is installed)."""
    root = str(Path(__file__).resolve().parents[1])
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != "."]
    return os.pathsep.join([root, *rest])


def export_saes(
    cfg: TrainConfig,
    store: ActivationStore,
    layer: int,
    model_state: dict[str, Any],
    trainer_state: dict[str, Any],
    final_metrics: dict[str, Any],
) -> tuple[dict[str, storage.Location], dict[str, dict[str, Any]]]:
    """Write one sae-lens directory per SAE (``cfg.json``, ``sae_weights.safetensors``, ``training.json``)
    and evaluate them; returns their paths and metrics by name."""
    tcfg = cfg.trainer_config(len(store))
    trainer = SAETrainer(cfg.specs(), store.d_model, tcfg, normalizer=Normalizer.from_dict(trainer_state["normalizer"]))
    trainer.restore(model_state, {k: v for k, v in trainer_state.items() if k != "optimizer"})
    manifest = store.manifest
    metadata = {
        "model_name": manifest.model,
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "hook_layer": layer,
        "context_size": manifest.context_size,
        "dataset_path": str(store.root),
        "prepend_bos": False,
    }
    saes = trainer.export(metadata)
    evaluation = evaluate_on_heldout(cfg, store, layer, saes) if cfg.eval_tokens else {}
    dirs: dict[str, storage.Location] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for name, sae in saes.items():
        path = storage.join(cfg.out, f"L{layer}-{name}")
        sae.save(path)
        train_metrics = {k.split("/", 1)[1]: v for k, v in final_metrics.items() if k.startswith(f"{name}/")}
        metrics[name] = {"train": train_metrics, "eval": evaluation.get(name, {})}
        warnings = flag_metrics(metrics[name]["eval"])
        storage.write_json(
            storage.join(path, TRAINING_FILE),
            {
                "config": cfg.to_dict(),
                "spec": asdict(trainer.specs[name]),
                "layer": layer,
                "steps": trainer.step,
                "tokens": trainer.tokens,
                "normalizer_scale": trainer.normalizer.scale,
                "final_metrics": metrics[name],
                "warnings": warnings,
                "throughput": {k: final_metrics[k] for k in ("tokens_per_s", "mfu") if k in final_metrics},
                "worker_nodes": final_metrics.get("worker_nodes", []),
                "store": {
                    "path": str(store.root),
                    "manifest_sha256": storage.sha256(storage.join(store.root, MANIFEST)),
                    "rows": len(store),
                    "model": manifest.model,
                },
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        dirs[name] = path
    if cfg.track:
        _log_final(cfg, layer, dirs, metrics)
    return dirs, metrics


def flag_metrics(evaluation: dict[str, Any]) -> list[str]:
    """What looks wrong in an SAE's held-out metrics: a CE loss recovered far below its explained variance
    (the SAE reconstructs the variance but not what the model reads: typically a few huge-norm
    dimensions dominate the variance, see README "Your own model")."""
    ev, ce = evaluation.get("explained_variance"), evaluation.get("ce_loss_recovered")
    rest, dims = evaluation.get("explained_variance_rest"), evaluation.get("dominant_dims") or []
    out = []
    numbers = isinstance(ev, float) and isinstance(ce, float) and math.isfinite(ev) and math.isfinite(ce)
    if numbers and ev - ce > CE_GAP_FLAG:
        out.append(
            f"CE loss recovered {ce:.3f} is far below explained variance {ev:.3f}: the SAE reconstructs the "
            "residuals' variance but not what the model reads from them; its steering will mostly add noise"
        )
    if isinstance(ev, float) and isinstance(rest, float) and math.isfinite(rest) and ev - rest > EV_REST_FLAG:
        share = evaluation.get("dominant_share", float("nan"))
        out.append(
            f"explained variance {ev:.3f} is mostly that of dimension(s) {dims[:8]} ({share:.0%} of the variance); "
            f"over the other dimensions, which steering moves, it is {rest:.3f}"
        )
    return out


def _log_final(
    cfg: TrainConfig, layer: int, dirs: dict[str, storage.Location], metrics: dict[str, dict[str, Any]]
) -> None:

    with Tracker("train", cfg.to_dict(), cfg.out, name=f"{cfg.run_name(layer)}-final") as tracker:
        flat = {f"{n}/{part}/{k}": v for n, m in metrics.items() for part, d in m.items() for k, v in d.items()}
        tracker.summary({k: v for k, v in flat.items() if isinstance(v, int | float)})
        for name, path in dirs.items():
            tracker.log_artifact(path, name=f"sae-L{layer}-{name}", type="sae")


# -- held-out evaluation ---------------------------------------------------------------------------------
def heldout_input_ids(
    tokenizer: Any,
    corpus: str | Path,
    n_tokens: int,
    context_size: int,
    *,
    skip_contexts: int | None = None,
    sources: Sequence[str] = SOURCES,
) -> torch.Tensor:
    """``[contexts, context_size]`` token ids of text the SAEs have not seen, packed as collection packs
    (:mod:`pipelines.contexts`: documents joined by EOS, windows of ``context_size - 1`` tokens after a BOS).

    ``skip_contexts=None``: packed from the *last* documents of the corpus (collection reads it from the
    start). Otherwise the contexts that follow the first ``skip_contexts`` ones of the same plan: the very
    contexts collection would have planned next (same ``sources``), so the same distribution as the store's."""
    need = math.ceil(n_tokens / (context_size - 1))
    if skip_contexts is not None:
        planned = plan_contexts(tokenizer, iter_documents(corpus, sources), context_size, skip_contexts + need)
        contexts = planned[skip_contexts:]
    else:
        tail: list[str] = []
        tokens = 0
        for doc in reversed(list(iter_documents(corpus, sources))):
            tail.append(doc)
            tokens += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1
            if tokens >= (need + 1) * (context_size - 1):
                break
        contexts = plan_contexts(tokenizer, reversed(tail), context_size, need)
    if len(contexts) == 0:
        raise StoreError(f"the corpus {corpus} has no unused context of {context_size} tokens")
    return torch.from_numpy(contexts.astype(np.int64))


def evaluate_saes(
    model: Any, saes: dict[str, Any], layer: int, input_ids: torch.Tensor, *, outlier: float = 10.0
) -> dict[str, dict[str, float]]:
    """Per SAE: reconstruction metrics on the held-out residuals (position 0 and norm outliers dropped,
    as in collection) and CE loss recovered on the same tokens."""

    acts = []
    for start in range(0, input_ids.shape[0], 8):
        h = residuals(model, [layer], input_ids[start : start + 8])[layer][:, 1:].float()
        h = h.reshape(-1, h.shape[-1])
        norms = h.norm(dim=-1)
        acts.append(h[norms <= outlier * norms.median()])
    out: dict[str, dict[str, float]] = {}
    baseline = None
    for name, sae in saes.items():
        rec = reconstruction_metrics(sae, [a for a in acts])
        ce = ce_loss_recovered(model, sae, layer, input_ids, baseline=baseline)
        baseline = {k: ce[k] for k in ("ce_clean", "ce_zero", "ce_tokens")}
        out[name] = {**rec, **ce}
    return out


def evaluate_on_heldout(
    cfg: TrainConfig, store: ActivationStore, layer: int, saes: dict[str, Any]
) -> dict[str, dict[str, float]]:

    model_id = cfg.eval_model or store.manifest.model
    if model_id.startswith(f"{EMBEDDED}:"):
        model_id = EMBEDDED
    model, tokenizer = load_lm(model_id)
    corpus = cfg.corpus or data_dir(flag="--set corpus=DIR (a folder of .txt files) or --set eval_tokens=0") / "corpus"
    sources = store.manifest.config.get("sources") or list(SOURCES)  # what collection read, so after_store follows
    skip = None
    if cfg.heldout == "after_store":
        skip = int(store.read_column("context").max()) + 1
    ids = heldout_input_ids(
        tokenizer, corpus, cfg.eval_tokens, store.manifest.context_size, skip_contexts=skip, sources=sources
    )
    outlier = float(store.manifest.positions_dropped.get("outlier_factor", 10.0))
    return evaluate_saes(model, saes, layer, ids, outlier=outlier)


__all__ = [
    "TrainConfig",
    "TrainResult",
    "check_store_finite",
    "deepspeed_config",
    "evaluate_saes",
    "export_saes",
    "flag_metrics",
    "heldout_input_ids",
    "run_train",
    "stream_batches",
    "train_worker",
]
