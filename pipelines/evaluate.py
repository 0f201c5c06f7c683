"""``pluristeer evaluate``: the experiment protocol of DESIGN §5, end to end, on Ray.

1. Tasks (:mod:`pipelines.tasks`: the bundled ones and any perspective JSONL): each task's test records
   (``limit`` > 0: a seeded subsample stratified by perspective), the evaluated perspectives and the K
   perspectives of pluralistic decoding (:mod:`pipelines.eval_plan`).
2. Vectors from the train split, units through a pool of model actors, finished units kept so a rerun
   resumes: :class:`pipelines.eval_engine.Engine` (shared with the sweep and ``recommend``).
3. Scoring: per condition × task × perspective (and pooled), metrics with seeded stratified bootstrap
   intervals and paired differences to zero-shot (:mod:`pipelines.metrics`); the paper's findings as
   paired comparisons (:mod:`pipelines.eval_report`).
4. Output in ``out``: ``rows.jsonl``, ``predictions.jsonl``, ``table.md``, PNG plots, ``config.yaml``,
   ``run.json`` (git commit, timings, token counts, sizes); the same in a W&B run with the SAEs and
   VectorSets as artifacts.

``pluristeer evaluate --sweep`` runs the layer/coefficient sweep on the train split instead (:mod:`pipelines.sweep`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import wandb

from pipelines.eval_config import EvalConfig
from pipelines.eval_engine import Engine, score
from pipelines.eval_plan import TaskData, choose_perspectives, subsample, vector_keys
from pipelines.eval_report import findings, perspective_table, plot_conditions, plot_perspectives, task_table
from pipelines.records import DataError, PerspectiveRecord
from pipelines.tasks import Task, get_task
from pipelines.tracking import Tracker
from sae import storage
from sae.model import WEIGHTS_FILE, SparseAutoencoder


# -- tasks ----------------------------------------------------------------------------------------------
def resolve_task(cfg: EvalConfig, name: str) -> Task:
    """The registry's task ``name`` with this config's templates, split fraction and seed."""
    definition = cfg.crehate_definition if name == "crehate" else None
    return get_task(name, templates=cfg.templates, test_fraction=cfg.test_fraction, seed=cfg.seed,
                    definition=definition)  # fmt: skip


def load_task(cfg: EvalConfig, name: str | Task) -> TaskData:
    """The test records of task ``name`` (or of an already resolved task; subsampled with ``cfg.limit``) and
    what prompts need from train."""
    task = name if isinstance(name, Task) else resolve_task(cfg, name)
    limit = int(cfg.task_limits.get(task.name, cfg.limit)) if cfg.limit else 0
    return make_task(cfg, task, task.records("train"), task.records("test"), limit)


def make_task(
    cfg: EvalConfig, task: Task, train: list[PerspectiveRecord], test: list[PerspectiveRecord], limit: int
) -> TaskData:
    """A :class:`TaskData` scoring ``test``, with vectors and few-shot examples from ``train``."""
    if not test:
        raise DataError(f"{task.name}: no records to evaluate (the split is empty)")
    scored, shots_source = task.scored(test), task.scored(train)
    chosen = choose_perspectives(train, scored, cfg.max_perspectives, cfg.perspectives.get(task.name, []))
    if not chosen:
        raise DataError(f"{task.name}: no perspective has both training and evaluation records")
    shots: dict[str, list[PerspectiveRecord]] = defaultdict(list)
    for r in shots_source:
        shots[r.perspective].append(r)
    available: dict[str, int] = defaultdict(int)
    for r in scored:
        if r.perspective in chosen:
            available[r.perspective] += 1
    k = cfg.pd_k_classify if task.kind == "classify" else cfg.pd_k_distribution
    return TaskData(
        name=task.name,
        kind=task.kind,
        prompt=task.prompt,
        records=subsample(scored, chosen, limit, cfg.seed),
        shots_pool=dict(shots),
        vector_pool=train,
        perspectives=chosen,
        pd_set=chosen[: min(k, len(chosen))],
        available={p: available[p] for p in chosen},
        context=task.context,
        alpha=cfg.alpha_for(task.name, task.alpha),
    )


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
    """The steering layer: the SAEs' ``hook_layer`` (they must agree) or ``cfg.layer``."""
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


def sae_facts(saes: dict[str, Path]) -> dict[str, Any]:
    """Path, weights hash and training metrics of each SAE a run steered with."""
    out: dict[str, Any] = {}
    for label, path in sorted(saes.items()):
        training = storage.join(path, "training.json")
        metrics = storage.read_json(training).get("final_metrics") if storage.exists(training) else None
        out[label] = {"path": str(path), "sha256": storage.sha256(storage.join(path, WEIGHTS_FILE)), "metrics": metrics}
    return out


def _log_sae_artifact(tracker: Any, path: Path, name: str) -> None:
    """An SAE directory as a W&B artifact by reference (checksummed, not copied)."""
    if tracker.run is None:
        return
    if storage.is_uri(path):
        tracker.summary({f"artifact/{name}": storage.display(path)})
        return
    artifact = wandb.Artifact(name=name, type="sae", metadata={"path": str(path.resolve())})
    artifact.add_reference(f"file://{path.resolve()}")
    tracker.run.log_artifact(artifact)


def run_evaluate(cfg: EvalConfig, *, echo: Callable[[str], None] = print) -> EvalResult:
    """The whole protocol (see the module docstring); returns the rows, the comparisons and run facts."""
    started = time.perf_counter()
    git = git_commit()  # at the start: the code that runs, whatever happens to the tree meanwhile
    conditions = {name: cfg.condition_objects(name) for name in cfg.task_names}
    cfg.check_saes([c for cs in conditions.values() for c in cs])  # before the layer: name the missing SAE
    layer = resolve_layer(cfg)
    resolved = [resolve_task(cfg, name) for name in cfg.tasks]
    tasks = [load_task(cfg, task) for task in resolved]
    engine = Engine(cfg, echo=echo)
    units = engine.plan(tasks, conditions)
    planned = engine.planned_tokens(units, layer)
    sizes = {t.name: {"evaluated": t.sizes, "available": t.available, "pd_set": t.pd_set} for t in tasks}
    splits = {t.name: {"source": t.source, **t.split_rule} for t in resolved}
    for t in tasks:
        echo(f"evaluate: {t.name}: {len(t.records)} records, perspectives {t.sizes}, PD over {t.pd_set}")
    echo(f"evaluate: {len(units)} units, {planned['full']:,} prompt tokens + {planned['resumed']:,} steered tokens "
         f"resumed after layer {layer} (≈{planned['equivalent']:,} full-forward tokens)")  # fmt: skip
    if cfg.dry_run:
        return EvalResult(cfg.out, [], [], {"planned_tokens": planned, "sizes": sizes, "units": len(units)})
    keys = vector_keys([c for cs in conditions.values() for c in cs])
    with Tracker(
        "evaluate", cfg.to_dict(), cfg.work, name=cfg.run_name, mode=None if cfg.track else "disabled"
    ) as tracker:
        result = engine.run(tasks, conditions, layer, cfg.named_saes, cfg.work, tracker=tracker)
        rows, comparisons, predictions = score(cfg, tasks, conditions, result.outputs)
        wall = time.perf_counter() - started
        used = {label: path for label, path in cfg.named_saes.items() if any(k.startswith(f"{label}-") for k in keys)}
        run = {
            "git": git, "command": "pluristeer evaluate", "wall_seconds": round(wall, 1),
            "unit_seconds": round(result.stats["seconds"], 1), "planned_tokens": planned,
            "unit_stats": result.stats, "layer": layer, "plan_hash": result.digest, "sizes": sizes,
            "splits": splits, "vectors": result.vectors.info, "device": engine.device, "num_actors": cfg.num_actors,
            "saes": sae_facts(used),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "ray": ray.__version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }  # fmt: skip
        files = write_outputs(cfg, tasks, conditions, rows, comparisons, predictions, run)
        tracker.summary({f"{r['task']}/{r['condition']}/{k}": r[k] for r in rows if r["perspective"] == "all"
                         for k in ("macro_f1", "jsd", "fpr") if k in r})  # fmt: skip
        tracker.summary({"wall_seconds": wall})
        if tracker.run is not None:
            columns = sorted({k for r in rows for k in r})
            tracker.run.log({"rows": wandb.Table(columns=columns, data=[[r.get(k) for k in columns] for r in rows])})
            images = [Path(p) for p in files if not storage.is_uri(p) and str(p).endswith(".png")]  # local only
            tracker.run.log({p.stem: wandb.Image(str(p)) for p in images})
            for label, path in used.items():
                _log_sae_artifact(tracker, path if storage.is_uri(path) else Path(path), f"sae-{label}-L{layer}")
            for key, path in result.vectors.paths.items():
                tracker.log_artifact(path, name=key.replace("/", "-"), type="vectors")
            tracker.log_artifact(cfg.out, name=f"results-{cfg.run_name}", type="results")
    echo(f"evaluate: wrote {storage.display(cfg.out)} in {wall / 60:.1f} min")
    return EvalResult(cfg.out, rows, comparisons, run)


def write_outputs(cfg, tasks, conditions, rows, comparisons, predictions, run) -> list[storage.Location]:
    """rows.jsonl, predictions.jsonl, table.md, plots, config.yaml, run.json in ``cfg.out`` (a directory or a
    URI), each written whole."""
    out = cfg.out
    files = [
        storage.write_text(storage.join(out, "rows.jsonl"), "".join(json.dumps(r) + "\n" for r in rows)),
        storage.write_text(storage.join(out, "predictions.jsonl"), "".join(json.dumps(p) + "\n" for p in predictions)),
        storage.write_text(storage.join(out, "config.yaml"), cfg.to_yaml()),
        storage.write_json(storage.join(out, "run.json"), run),
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
        files.append(plot_conditions(t.name, t.kind, rows, names, storage.join(out, f"{t.name}-conditions.png")))
        shown = [c for c in ("zero-shot", "few-shot", "steer-8x-fine", "pd-dvd", "pd-dvd+steer") if c in names]
        files.append(plot_perspectives(t.name, t.kind, rows, shown, storage.join(out, f"{t.name}-perspectives.png")))
    files.append(storage.write_text(storage.join(out, "table.md"), "\n".join(lines) + "\n"))
    return files


__all__ = ["EvalConfig", "EvalResult", "load_task", "make_task", "resolve_layer", "resolve_task", "run_evaluate"]
