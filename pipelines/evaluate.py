"""``pluristeer evaluate``: the experiment protocol of DESIGN §5, end to end, on Ray.

1. Tasks: each data set's test records (``limit`` > 0: a seeded subsample stratified by perspective), the
   evaluated perspectives and the K perspectives of pluralistic decoding (:mod:`pipelines.eval_plan`).
2. Vectors: ≤ ``samples`` feedback pairs per perspective from the train split are read out once per task
   (a Ray task per data set, prefix-shared pairs) and turned into 8x / 32x fine and coarse SAE vectors and
   CAA vectors (:mod:`pipelines.vectors`, :mod:`sae.vectors`); VectorSet files in the work directory.
3. Units of a few items each stream through a pool of model actors (Ray Data ``map_batches`` with an
   :class:`pipelines.eval_worker.EvalWorker` per actor, as collection does); a finished unit is written to
   the work directory at once, so an interrupted run resumes where it stopped.
4. Scoring: per condition × task × perspective (and pooled), metrics with seeded stratified bootstrap
   intervals and paired differences to zero-shot (:mod:`pipelines.metrics`); the paper's findings as
   paired comparisons (:mod:`pipelines.eval_report`).
5. Output in ``out``: ``rows.jsonl``, ``predictions.jsonl``, ``table.md``, PNG plots, ``config.yaml``,
   ``run.json`` (git commit, timings, token counts, sizes); the same in a W&B run with the SAEs and
   VectorSets as artifacts.

``sweep=True`` runs the layer/coefficient sweep on the train split instead (:func:`run_sweep`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import ray.data

from common.config import ConfigError, StageConfig, check
from common.raycluster import init_ray
from pipelines.datasets import aggregate, data_dir, load_definitions, load_records
from pipelines.eval_plan import (
    ALL_CONDITIONS,
    BASELINE,
    Condition,
    Switches,
    TaskData,
    Unit,
    choose_perspectives,
    gold_of,
    make_conditions,
    output_id,
    plan_hash,
    plan_units,
    subsample,
    unit_tokens,
    vector_keys,
)
from pipelines.eval_report import (
    CLAIMS,
    PRIMARY,
    findings,
    perspective_table,
    plot_conditions,
    plot_perspectives,
    task_table,
    verdict,
)
from pipelines.eval_worker import EvalWorker
from pipelines.metrics import Outcomes, js_distance, summarize
from pipelines.prompts import build_prompt, encode_prompts, feedback_text
from pipelines.records import DataError, PerspectiveRecord
from pipelines.tracking import Tracker
from pipelines.vectors import Readouts, VectorConfig, select_samples, vector_sets
from sae.atomic import atomic_write_json, atomic_write_text, sha256_file
from sae.lm import load_lm, load_tokenizer, resolve_model
from sae.model import WEIGHTS_FILE, SparseAutoencoder
from sae.vectors import differences, mean_by_group, paired_readouts

TASKS: tuple[str, ...] = ("globalopinionqa", "crehate", "mislc", "crowd_truthfulness")
KINDS = {"globalopinionqa": "distribution", "crehate": "classify", "mislc": "classify",
         "crowd_truthfulness": "distribution"}  # fmt: skip


@dataclass
class EvalConfig(StageConfig):
    """Settings of ``pluristeer evaluate`` (YAML + ``--set field=value``)."""

    model: str = "embedded"
    sae_8x: Path | None = None  # SAE directories (sae-lens layout); the steering layer is their hook_layer
    sae_32x: Path | None = None
    layer: int | None = None  # default: the SAEs' hook_layer (needed when no SAE is used)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    conditions: list[str] = field(default_factory=lambda: list(ALL_CONDITIONS))
    limit: int = 0  # test records per perspective (seeded, stratified); 0: the full test sets
    task_limits: dict = field(default_factory=dict)  # task -> its own limit, used only when limit > 0
    max_perspectives: int = 10  # evaluated perspectives per task (most training samples first); 0: all
    perspectives: dict = field(default_factory=dict)  # task -> explicit list of perspectives
    samples: int = 50  # feedback pairs per perspective for the vectors (train split)
    k_shots: int = 3
    pd_k_classify: int = 3  # perspectives combined by pluralistic decoding
    pd_k_distribution: int = 6
    pd_alpha: float = 0.2
    pd_alpha_mislc: float = 0.1
    pd_tau: float = 0.4
    pd_top_k: int = 20
    coeff: float = 1.0  # steering coefficient c
    task_coeffs: dict = field(default_factory=dict)  # task -> c (e.g. from the sweep)
    caa_coeff: float | None = None  # default: coeff
    keep_error: bool = True  # reference-fidelity switches for every steering condition (ref-* set their own)
    steer_decode: bool = True
    from_position: int = 0
    reference_entropy: bool = False  # PD conditions use the reference's DVD entropy
    crehate_definition: str | None = None  # a legal definition (e.g. TOS_yt) put before every CREHate post
    bootstrap: int = 1000
    seed: int = 42
    items_per_unit: int = 8
    batch_size: int = 16
    max_batch_tokens: int = 4096
    resume_from_layer: bool = True  # steered rows reuse the unsteered forward up to the steering layer
    num_actors: int = 1
    actor_cpus: float = 0.5  # Ray CPUs reserved per actor (fractional; its torch threads are separate)
    actor_gpus: float = 1.0  # per actor when running on GPU
    torch_threads: int = 0  # per actor on CPU; 0: the node's cores / actors per node
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: str = "float32"
    ray_address: str | None = None
    out: Path = Path("results/run")
    work_dir: Path | None = None  # vectors, readouts and finished units; default runs/evaluate/<out name>
    name: str | None = None  # run name (W&B); default: out's name
    track: bool = True  # W&B run (offline unless WANDB_API_KEY)
    dry_run: bool = False  # plan and count tokens only
    # sweep (on the train split): SAE coefficients, and CAA layers
    sweep_coeffs: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0])
    sweep_layers: list[int] = field(default_factory=list)  # extra layers swept with CAA vectors (no SAE needed)
    sweep_limit: int = 20  # held-out training records per perspective scored by the sweep

    def validate(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        check(not unknown, f"tasks: unknown {unknown}; known: {list(TASKS)}")
        check(bool(self.tasks), "tasks: give at least one task")
        bad = sorted(set(self.conditions) - set(ALL_CONDITIONS))
        check(not bad, f"conditions: unknown {bad}; known: {list(ALL_CONDITIONS)}")
        check(BASELINE in self.conditions, f"conditions: must include {BASELINE!r} (the paired baseline)")
        check(self.limit >= 0, "limit: must be >= 0 (0: the full test sets)")
        check(self.max_perspectives >= 0, "max_perspectives: must be >= 0 (0: all)")
        check(self.samples >= 1, "samples: must be >= 1")
        check(self.k_shots >= 1, "k_shots: must be >= 1")
        check(self.pd_k_classify >= 1 and self.pd_k_distribution >= 1, "pd_k_*: must be >= 1")
        check(self.bootstrap >= 100, "bootstrap: use at least 100 resamples (1000 recommended)")
        check(self.items_per_unit >= 1 and self.batch_size >= 1, "items_per_unit, batch_size: must be >= 1")
        check(self.num_actors >= 1, "num_actors: must be >= 1")
        check(self.actor_cpus >= 0 and self.actor_gpus >= 0, "actor_cpus, actor_gpus: must be >= 0")
        check(self.from_position >= 0, "from_position: must be >= 0")
        for task in self.task_coeffs:
            check(task in TASKS, f"task_coeffs: unknown task {task!r}")
        for task, n in self.task_limits.items():
            check(task in TASKS and isinstance(n, int) and n > 0, f"task_limits: {task}: {n} (a task and a limit > 0)")
        for task in self.perspectives:
            check(task in TASKS, f"perspectives: unknown task {task!r}")

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

    @property
    def work(self) -> Path:
        return self.work_dir or Path("runs/evaluate") / self.out.name

    @property
    def run_name(self) -> str:
        return self.name or self.out.name


# -- tasks ----------------------------------------------------------------------------------------------
def load_task(cfg: EvalConfig, name: str) -> TaskData:
    """The test records of ``name`` (subsampled with ``cfg.limit``) and what prompts need from train."""

    limit = int(cfg.task_limits.get(name, cfg.limit)) if cfg.limit else 0
    return make_task(cfg, name, load_records(name, "train"), load_records(name, "test"), limit)


def make_task(
    cfg: EvalConfig, name: str, train: list[PerspectiveRecord], test: list[PerspectiveRecord], limit: int
) -> TaskData:
    """A :class:`TaskData` scoring ``test``, with vectors and few-shot examples from ``train``."""

    vector_pool = train
    shots_source = train
    if name == "crowd_truthfulness":  # judgments -> per-(statement, view) distributions
        test = aggregate(test)
        shots_source = aggregate(train)
    chosen = choose_perspectives(train, test, cfg.max_perspectives, cfg.perspectives.get(name, []))
    if not chosen:
        raise DataError(f"{name}: no perspective has both training and evaluation records")
    shots: dict[str, list[PerspectiveRecord]] = defaultdict(list)
    for r in shots_source:
        shots[r.perspective].append(r)
    available: dict[str, int] = defaultdict(int)
    for r in test:
        if r.perspective in chosen:
            available[r.perspective] += 1
    k = cfg.pd_k_classify if KINDS[name] == "classify" else cfg.pd_k_distribution
    context = None
    if name == "crehate" and cfg.crehate_definition:
        definitions = load_definitions(data_dir())
        if cfg.crehate_definition not in definitions:
            raise DataError(f"crehate_definition: {cfg.crehate_definition!r} is not one of {sorted(definitions)}")
        context = f"Hate speech policy: {definitions[cfg.crehate_definition]}"
    return TaskData(
        name=name,
        kind=KINDS[name],
        records=subsample(test, chosen, limit, cfg.seed),
        shots_pool=dict(shots),
        vector_pool=vector_pool,
        perspectives=chosen,
        pd_set=chosen[: min(k, len(chosen))],
        available={p: available[p] for p in chosen},
        context=context,
        alpha=cfg.pd_alpha_mislc if name == "mislc" else cfg.pd_alpha,
    )


# -- vectors --------------------------------------------------------------------------------------------
def feedback_prompts(cfg: EvalConfig, task: TaskData, tokenizer: Any, records: dict[str, list[PerspectiveRecord]]):
    """``(perspective, with-feedback prompt, without prompt)`` per sample (the task's prompt context kept)."""

    out = []
    for p, rs in records.items():
        for r in rs:
            text, _ = feedback_text(task.name, r, "auto")  # type: ignore[misc]
            with_fb = build_prompt(tokenizer, task.name, r, "with-feedback", feedback=text, context=task.context)
            without = build_prompt(tokenizer, task.name, r, "zero-shot", context=task.context)
            out.append((p, with_fb, without))
    return out


def select_vector_samples(cfg: EvalConfig, task: TaskData) -> dict[str, list[PerspectiveRecord]]:
    """≤ ``cfg.samples`` training records per evaluated perspective (seeded; rationales first)."""

    vc = VectorConfig(mode="caa", data=task.name, perspectives=list(task.perspectives), samples=cfg.samples,
                      seed=cfg.seed, publish=False, track=False)  # fmt: skip
    return select_samples(vc, task.vector_pool)


def _readouts_task(model: str, layer: int, dtype: str, device: str, threads: int, pairs, positions, pad_id: int):
    """A Ray task: the paired readouts of one task's feedback pairs (numpy out)."""
    import torch

    if device == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    lm, _ = load_lm(model, dtype=dtype, device=device)
    h_with, h_without, tokens = paired_readouts(lm, layer, pairs, positions, pad_id=pad_id)
    return h_with.numpy(), h_without.numpy(), tokens


def derive_vectors(
    cfg: EvalConfig,
    tasks: Sequence[TaskData],
    tokenizer: Any,
    layer: int,
    keys: Sequence[str],
    device: str,
    *,
    echo: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, Path], dict[str, Any]]:
    """``({"task/key": VectorSet}, {"task/key": file}, info)`` for the vector sets ``keys`` of every task.

    Readouts are cached in the work directory (keyed by the prompts, model and layer), so reruns and the
    8x/32x/CAA sets of a task share one model pass."""
    import torch

    saes = {size: SparseAutoencoder.load(getattr(cfg, f"sae_{size}")) for size in {k.split("-")[0] for k in keys}
            if size != "caa"}  # fmt: skip
    model_name = resolve_model(cfg.model).name
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    jobs, plans = {}, {}
    for task in tasks:
        chosen = select_vector_samples(cfg, task)
        prompts = feedback_prompts(cfg, task, tokenizer, chosen)
        ids_w, pos_w = encode_prompts(tokenizer, [w for _, w, _ in prompts])
        ids_o, pos_o = encode_prompts(tokenizer, [o for _, _, o in prompts])
        key = hashlib.sha256(json.dumps([model_name, layer, ids_w, ids_o]).encode()).hexdigest()[:16]
        cache = cfg.work / "readouts" / f"{task.name}-L{layer}-{key}.npz"
        plans[task.name] = (prompts, cache, {p: len(v) for p, v in chosen.items()})
        if not cache.exists():
            threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(1, len(tasks)))
            remote = ray.remote(_readouts_task).options(
                num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus if device == "cuda" else 0
            )
            pairs = list(zip(ids_w, ids_o, strict=True))
            positions = list(zip(pos_w, pos_o, strict=True))
            jobs[task.name] = remote.remote(cfg.model, layer, cfg.dtype, device, threads, pairs, positions, pad_id)
    started = time.perf_counter()
    tokens = 0
    for name, ref in jobs.items():
        h_w, h_o, n = ray.get(ref)
        tokens += n
        cache = plans[name][1]
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, h_with=h_w, h_without=h_o)
        os.replace(tmp, cache)
    if jobs:
        echo(f"vectors: read out {tokens:,} tokens of feedback pairs in {time.perf_counter() - started:.1f} s")
    sets: dict[str, Any] = {}
    paths: dict[str, Path] = {}
    info: dict[str, Any] = {"readout_tokens": tokens, "samples": {}}
    for task in tasks:
        prompts, cache, counts = plans[task.name]
        info["samples"][task.name] = counts
        data = np.load(cache)
        h_w, h_o = torch.from_numpy(data["h_with"]), torch.from_numpy(data["h_without"])
        groups = [p for p, _, _ in prompts]
        for size in sorted({k.split("-")[0] for k in keys}):
            mode = "caa" if size == "caa" else "sae"
            sae = saes.get(size)
            fine, n = mean_by_group(differences(h_w, h_o, mode=mode, sae=sae), groups)  # type: ignore[arg-type]
            vc = VectorConfig(
                sae=None if sae is None else getattr(cfg, f"sae_{size}"), mode=mode, data=task.name,
                granularity="fine" if size == "caa" else "both", publish=False, track=False,
            )  # fmt: skip
            extra = {"evaluate": cfg.run_name, "samples": counts, "context": task.context}
            built = vector_sets(vc, Readouts(fine, n, 0, 0, 0), model=model_name, layer=layer, sae=sae, extra=extra)
            for granularity, vs in built.items():
                key = f"{size}-{granularity}"
                if key in keys:
                    sets[f"{task.name}/{key}"] = vs
                    paths[f"{task.name}/{key}"] = vs.save(
                        cfg.work / "vectors" / f"{task.name}-{key}-L{layer}.safetensors"
                    )
    return sets, paths, info


# -- running units --------------------------------------------------------------------------------------
def _stream(cfg: EvalConfig, spec: dict[str, Any], units: list[Unit], use_gpu: bool) -> Iterator[dict[str, Any]]:
    """Run ``units`` through the actor pool; yield each result as it finishes."""
    import warnings

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    items = [{"unit": u.index, "payload": u.to_json()} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ds.map_batches(
            EvalWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(units)), max_tasks_in_flight_per_actor=2),
            fn_constructor_kwargs={"spec": spec},
            num_cpus=cfg.actor_cpus,
            num_gpus=cfg.actor_gpus if use_gpu else None,
            max_restarts=3,
            max_task_retries=3,
        )
    for row in ds.iter_rows():
        yield json.loads(row["result"])


def run_units(
    cfg: EvalConfig,
    units: list[Unit],
    spec: dict[str, Any],
    cache_dir: Path,
    use_gpu: bool,
    *,
    echo: Callable[[str], None] = print,
    tracker: Any = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every unit's outputs (finished units in ``cache_dir`` are reused); ``(outputs by id, run stats)``."""
    done: dict[int, dict[str, Any]] = {}
    for u in units:
        path = cache_dir / f"{u.index}.json"
        if path.exists():
            done[u.index] = json.loads(path.read_text())
    todo = [u for u in units if u.index not in done]
    echo(f"evaluate: {len(units)} units, {len(done)} already done, {len(todo)} to run on {cfg.num_actors} actor(s)")
    started = time.perf_counter()
    stats = {"units_run": len(todo), "units_reused": len(done), "tokens_full": 0, "tokens_resumed": 0}
    if todo:
        for k, result in enumerate(_stream(cfg, spec, todo, use_gpu), start=1):
            atomic_write_json(cache_dir / f"{result['unit']}.json", result)
            done[result["unit"]] = result
            s = result["stats"]
            stats["tokens_full"] += s["tokens_full"]
            stats["tokens_resumed"] += s["tokens_resumed"]
            elapsed = time.perf_counter() - started
            rate = stats["tokens_full"] / max(elapsed, 1e-9)
            eta = elapsed / k * (len(todo) - k)
            echo(f"evaluate: unit {k}/{len(todo)} ({result['task']}) {s['seconds']:.1f} s; "
                 f"{rate:,.0f} prompt tok/s; ETA {eta / 60:.1f} min")  # fmt: skip
            if tracker is not None:
                tracker.log({"units_done": k, "prompt_tokens_per_s": rate})
    stats["seconds"] = time.perf_counter() - started
    outputs = {oid: out for result in done.values() for oid, out in result["outputs"].items()}
    return outputs, stats


# -- scoring --------------------------------------------------------------------------------------------
def outcomes_of(task: TaskData, condition: Condition, outputs: dict[str, dict[str, Any]]):
    """Per-record ``Outcomes`` (+ coverage and the read-out distributions) of one condition on one task."""

    gold, pred, jsd, coverage, probs = [], [], [], [], []
    for r in task.records:
        out = outputs[output_id(task.name, condition, r)]
        g, dist = gold_of(r)
        p = np.asarray(out["probs"], dtype=np.float64)
        gold.append(g)
        pred.append(int(np.argmax(p)))
        coverage.append(out["coverage"])
        probs.append(out["probs"])
        if dist is not None:
            jsd.append(float(js_distance(np.asarray(dist), p)))
    outcome = Outcomes(
        np.asarray(gold), np.asarray(pred), task.n_classes, np.asarray(jsd) if task.kind == "distribution" else None
    )
    return outcome, np.asarray(coverage), probs


def _subset(o: Any, idx: np.ndarray) -> Any:

    return Outcomes(o.gold[idx], o.pred[idx], o.n_classes, None if o.jsd is None else o.jsd[idx])


def _seed(cfg: EvalConfig, *parts: str) -> int:
    return random.Random(":".join([str(cfg.seed), *parts])).randrange(2**31)


def flat(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric, entry in summary.items():
        v = entry["value"]
        out |= {metric: v.value, f"{metric}_lo": v.lo, f"{metric}_hi": v.hi}
        if "delta" in entry:
            d = entry["delta"]
            out |= {f"{metric}_delta": d.value, f"{metric}_delta_lo": d.lo, f"{metric}_delta_hi": d.hi}
    return out


def score(
    cfg: EvalConfig, tasks: Sequence[TaskData], conditions: dict[str, list[Condition]], outputs: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(rows, comparisons, predictions)``: metrics per condition × task × perspective (+ ``all``) with
    intervals and paired differences to zero-shot; the paper's claims; every record's read-out."""

    rows, comparisons, predictions = [], [], []
    for task in tasks:
        by_name = {c.name: c for c in conditions[task.name]}
        results = {name: outcomes_of(task, c, outputs) for name, c in by_name.items()}
        strata = [r.perspective for r in task.records]
        groups = {"all": np.arange(len(task.records))}
        for p in task.perspectives:
            groups[p] = np.asarray([i for i, s in enumerate(strata) if s == p], dtype=np.int64)
        base = results[BASELINE][0]
        for name, (outcome, coverage, probs) in results.items():
            c = by_name[name]
            for perspective, idx in groups.items():
                if idx.size == 0:
                    continue
                summary = summarize(
                    _subset(outcome, idx), [strata[i] for i in idx],
                    baseline=None if name == BASELINE else _subset(base, idx),
                    n_resamples=cfg.bootstrap, seed=_seed(cfg, task.name, perspective),
                )  # fmt: skip
                rows.append({
                    "run": cfg.run_name, "task": task.name, "kind": task.kind, "condition": name,
                    "perspective": perspective, "n": int(idx.size), "coverage": float(coverage[idx].mean()),
                    "coeff": None if c.steer is None else c.steer.coeff,
                    **flat(summary),
                })  # fmt: skip
            for r, p, g in zip(task.records, probs, outcome.gold.tolist(), strict=True):
                predictions.append({"task": task.name, "condition": name, "id": r.id, "perspective": r.perspective,
                                    "gold": g, "probs": p})  # fmt: skip
        for claim in CLAIMS:
            if (claim.tasks and task.name not in claim.tasks) or claim.a not in results or claim.b not in results:
                continue
            metric = PRIMARY[task.kind] if claim.metric == "primary" else claim.metric
            summary = summarize(results[claim.a][0], strata, baseline=results[claim.b][0],
                                n_resamples=cfg.bootstrap, seed=_seed(cfg, task.name, "all"))  # fmt: skip
            if metric not in summary:
                continue
            d = summary[metric]["delta"]
            comparisons.append({
                "claim": claim.text, "task": task.name, "metric": metric, "a": claim.a, "b": claim.b,
                "delta": d.value, "delta_lo": d.lo, "delta_hi": d.hi, "verdict": verdict(d.value, d.lo, d.hi, metric),
            })  # fmt: skip
    return rows, comparisons, predictions


# -- the run --------------------------------------------------------------------------------------------
def git_commit() -> dict[str, Any]:
    """The repository's HEAD commit and whether the working tree had changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def resolve_layer(cfg: EvalConfig) -> int:

    layers = {}
    for size in ("8x", "32x"):
        path = getattr(cfg, f"sae_{size}")
        if path is not None:
            layer = SparseAutoencoder.load(path).cfg.metadata.get("hook_layer")
            if layer is not None:
                layers[size] = int(layer)
    if len(set(layers.values())) > 1:
        raise DataError(f"sae_8x and sae_32x were trained on different layers: {layers}")
    if cfg.layer is not None and layers and cfg.layer not in layers.values():
        raise DataError(f"layer: {cfg.layer} was asked for, but the SAEs were trained on layer {layers}")
    layer = cfg.layer if cfg.layer is not None else next(iter(layers.values()), None)
    if layer is None:
        raise DataError("layer: not set and no SAE records a hook_layer; pass --set layer=N")
    return layer


@dataclass
class EvalResult:
    out: Path
    rows: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    run: dict[str, Any]


def sae_facts(cfg: EvalConfig, keys: Sequence[str]) -> dict[str, Any]:
    """Path, weights hash and training metrics of each SAE the run steered with."""

    out: dict[str, Any] = {}
    for size in sorted({k.split("-")[0] for k in keys} - {"caa"}):
        path = Path(getattr(cfg, f"sae_{size}"))
        training = path / "training.json"
        metrics = json.loads(training.read_text()).get("final_metrics") if training.exists() else None
        out[size] = {"path": str(path), "sha256": sha256_file(path / WEIGHTS_FILE), "metrics": metrics}
    return out


def set_digest(vs: Any) -> str:
    """A hash of a vector set's vectors and metadata, its creation time left out (reruns rebuild the sets)."""
    meta = {k: v for k, v in dataclasses.asdict(vs.meta).items() if k != "created"}
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for p, v in vs.vectors.items():
        h.update(p.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def _log_sae_artifact(tracker: Any, path: Path, name: str) -> None:
    """An SAE directory as a W&B artifact by reference (checksummed, not copied)."""
    if tracker.run is None:
        return
    import wandb

    artifact = wandb.Artifact(name=name, type="sae", metadata={"path": str(path.resolve())})
    artifact.add_reference(f"file://{path.resolve()}")
    tracker.run.log_artifact(artifact)


def plan_all(cfg: EvalConfig, tasks: Sequence[TaskData], tokenizer: Any, conditions: dict[str, list[Condition]]):
    units: list[Unit] = []
    for task in tasks:
        units += plan_units(task, conditions[task.name], tokenizer, items_per_unit=cfg.items_per_unit,
                            k_shots=cfg.k_shots, seed=cfg.seed, start=len(units), top_k=cfg.pd_top_k,
                            tau=cfg.pd_tau)  # fmt: skip
    return units


def run_evaluate(cfg: EvalConfig, *, echo: Callable[[str], None] = print) -> EvalResult:
    """The whole protocol (see the module docstring); returns the rows, the comparisons and run facts."""
    from transformers import AutoConfig

    started = time.perf_counter()
    git = git_commit()  # at the start: the code that runs, whatever happens to the tree meanwhile
    tokenizer = load_tokenizer(cfg.model)
    n_layers = int(AutoConfig.from_pretrained(resolve_model(cfg.model).path).num_hidden_layers)
    conditions = {name: cfg.condition_objects(name) for name in cfg.tasks}
    cfg.check_saes([c for cs in conditions.values() for c in cs])  # before the layer: name the missing SAE
    layer = resolve_layer(cfg)
    tasks = [load_task(cfg, name) for name in cfg.tasks]
    units = plan_all(cfg, tasks, tokenizer, conditions)
    counts = [unit_tokens(u, tokenizer, layer, n_layers) for u in units]
    planned = {k: sum(c[k] for c in counts) for k in ("full", "resumed", "equivalent")}
    sizes = {t.name: {"evaluated": t.sizes, "available": t.available, "pd_set": t.pd_set} for t in tasks}
    for t in tasks:
        echo(f"evaluate: {t.name}: {len(t.records)} records, perspectives {t.sizes}, PD over {t.pd_set}")
    echo(f"evaluate: {len(units)} units, {planned['full']:,} prompt tokens + {planned['resumed']:,} steered tokens "
         f"resumed after layer {layer} (≈{planned['equivalent']:,} full-forward tokens)")  # fmt: skip
    if cfg.dry_run:
        return EvalResult(cfg.out, [], [], {"planned_tokens": planned, "sizes": sizes, "units": len(units)})

    init_ray(cfg.ray_address)

    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    device = "cuda" if use_gpu else "cpu"
    keys = vector_keys([c for cs in conditions.values() for c in cs])
    t_vec = time.perf_counter()
    sets, vector_paths, vector_info = derive_vectors(cfg, tasks, tokenizer, layer, keys, device, echo=echo)
    vector_seconds = time.perf_counter() - t_vec
    spec = {
        "model": cfg.model, "layer": layer, "dtype": cfg.dtype, "device": device,
        "saes": {k.split("-")[0]: str(getattr(cfg, f"sae_{k.split('-')[0]}")) for k in keys if not k.startswith("caa")},
        "vectors": {k: vs.to_bytes() for k, vs in sets.items()}, "batch_size": cfg.batch_size,
        "max_batch_tokens": cfg.max_batch_tokens, "threads": cfg.torch_threads,
        "actors_per_node": math.ceil(cfg.num_actors / max(1, sum(1 for n in ray.nodes() if n.get("Alive")))),
        "resume": cfg.resume_from_layer,
    }  # fmt: skip
    decisive = {k: v for k, v in spec.items() if k not in ("vectors", "threads", "actors_per_node")}
    decisive["vectors"] = {k: set_digest(vs) for k, vs in sets.items()}
    digest = plan_hash(units, decisive)
    cfg.out.mkdir(parents=True, exist_ok=True)
    with Tracker(
        "evaluate", cfg.to_dict(), cfg.work, name=cfg.run_name, mode=None if cfg.track else "disabled"
    ) as tracker:
        outputs, unit_stats = run_units(cfg, units, spec, cfg.work / "units" / digest, use_gpu, echo=echo,
                                        tracker=tracker)  # fmt: skip
        rows, comparisons, predictions = score(cfg, tasks, conditions, outputs)
        wall = time.perf_counter() - started
        run = {
            "git": git, "command": "pluristeer evaluate", "wall_seconds": round(wall, 1),
            "vector_seconds": round(vector_seconds, 1), "unit_seconds": round(unit_stats["seconds"], 1),
            "planned_tokens": planned, "unit_stats": unit_stats, "layer": layer, "plan_hash": digest,
            "sizes": sizes, "vectors": vector_info, "device": device, "num_actors": cfg.num_actors,
            "saes": sae_facts(cfg, keys),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "ray": ray.__version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }  # fmt: skip
        files = write_outputs(cfg, tasks, conditions, rows, comparisons, predictions, run)
        tracker.summary({f"{r['task']}/{r['condition']}/{k}": r[k] for r in rows if r["perspective"] == "all"
                         for k in ("macro_f1", "jsd", "fpr") if k in r})  # fmt: skip
        tracker.summary({"wall_seconds": wall})
        if tracker.run is not None:
            import wandb

            columns = sorted({k for r in rows for k in r})
            tracker.run.log({"rows": wandb.Table(columns=columns, data=[[r.get(k) for k in columns] for r in rows])})
            tracker.run.log({p.stem: wandb.Image(str(p)) for p in files if p.suffix == ".png"})
            for size in sorted({k.split("-")[0] for k in keys} - {"caa"}):
                _log_sae_artifact(tracker, Path(getattr(cfg, f"sae_{size}")), f"sae-{size}-L{layer}")
            for key, path in vector_paths.items():
                tracker.log_artifact(path, name=key.replace("/", "-"), type="vectors")
            tracker.log_artifact(cfg.out, name=f"results-{cfg.run_name}", type="results")
    echo(f"evaluate: wrote {cfg.out} in {wall / 60:.1f} min")
    return EvalResult(cfg.out, rows, comparisons, run)


def write_outputs(cfg, tasks, conditions, rows, comparisons, predictions, run) -> list[Path]:
    """rows.jsonl, predictions.jsonl, table.md, plots, config.yaml, run.json in ``cfg.out``."""

    out = cfg.out
    files = [
        atomic_write_text(out / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
        atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions)),
        atomic_write_text(out / "config.yaml", cfg.to_yaml()),
        atomic_write_json(out / "run.json", run),
    ]
    names = list(cfg.conditions)
    lines = [
        f"# Evaluation `{cfg.run_name}`",
        "",
        f"Model `{cfg.model}`, layer {run['layer']}, git `{run['git']['commit']}`"
        f"{' (dirty tree)' if run['git']['dirty'] else ''}; wall time {run['wall_seconds'] / 60:.1f} min. "
        f"Each cell: the point estimate and its 95% bootstrap interval ({cfg.bootstrap} resamples within "
        f"perspectives, seed {cfg.seed}); Δ: the paired difference to zero-shot on the same records. "
        "`coverage`: the mean probability mass the options got before renormalisation.",
        "",
        "## The paper's findings",
        "",
        findings(comparisons),
    ]
    for t in tasks:
        limit = cfg.task_limits.get(t.name, cfg.limit)
        sample = "the full test set" if not cfg.limit else f"a seeded subsample of ≤{limit} records per perspective"
        sizes = ", ".join(f"{p} {n}/{t.available[p]}" for p, n in t.sizes.items())
        coeff = next((c.steer.coeff for c in conditions[t.name] if c.steer is not None), None)
        lines += [
            "", f"## {t.name} ({t.kind})", "",
            f"{len(t.records)} records ({sample}; evaluated/available per perspective: {sizes}). "
            f"Steering coefficient {coeff}; PD over {t.pd_set} "
            f"(α = {t.alpha}, τ = {cfg.pd_tau}, top-k {cfg.pd_top_k}).",
            "", task_table(t.name, t.kind, rows, names), "",
            "Per perspective (primary metric, point estimates):", "",
            perspective_table(t.name, t.kind, rows, names),
        ]  # fmt: skip
        files.append(plot_conditions(t.name, t.kind, rows, names, out / f"{t.name}-conditions.png"))
        shown = [c for c in ("zero-shot", "few-shot", "steer-8x-fine", "pd-dvd", "pd-dvd+steer") if c in names]
        files.append(plot_perspectives(t.name, t.kind, rows, shown, out / f"{t.name}-perspectives.png"))
    files.append(atomic_write_text(out / "table.md", "\n".join(lines) + "\n"))
    return files


__all__ = ["TASKS", "EvalConfig", "EvalResult", "load_task", "run_evaluate", "score"]
