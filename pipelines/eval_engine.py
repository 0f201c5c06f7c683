"""The evaluation engine: one code path for ``evaluate``, the sweep and ``recommend``.

:meth:`Engine.run` takes tasks (:class:`pipelines.eval_plan.TaskData`), their conditions, a steering layer
and the SAEs there, and returns every answer:

1. Vectors: ≤ ``samples`` feedback pairs per perspective of each task's vector pool are read out once per
   (task, layer) (a Ray task per task, prefix-shared pairs; cached in the work directory) and turned into
   fine and coarse SAE vectors and CAA vectors (:mod:`pipelines.vectors`, :mod:`sae.vectors`).
2. Units of a few items each stream through a pool of model actors (Ray Data ``map_batches`` with an
   :class:`pipelines.eval_worker.EvalWorker` per actor, as collection does); steered rows resume from the
   unsteered forward at the layer. The actor spec and the plan hash are built here only.
3. A finished unit is written to ``<work>/units/<plan hash>/`` at once, so an interrupted run resumes where it
   stopped, and a rerun of the same plan reuses every unit.

:func:`score` turns answers into metrics per condition × task × perspective with bootstrap intervals and
paired differences to zero-shot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import torch
from transformers import AutoConfig

from common.raycluster import init_ray
from pipelines.eval_config import EvalConfig
from pipelines.eval_plan import (
    BASELINE,
    Condition,
    TaskData,
    Unit,
    gold_of,
    output_id,
    plan_hash,
    plan_units,
    unit_tokens,
)
from pipelines.eval_report import CLAIMS, PRIMARY, verdict
from pipelines.eval_worker import EvalWorker
from pipelines.metrics import Outcomes, js_distance, summarize
from pipelines.prompts import build_prompt, encode_prompts, feedback_text
from pipelines.records import PerspectiveRecord
from pipelines.vectors import POOLED, Readouts, VectorConfig, pooled_samples, select_samples, vector_sets
from sae.atomic import atomic_write_json
from sae.lm import load_lm, load_tokenizer, resolve_model
from sae.model import SparseAutoencoder
from sae.vectors import differences, mean_by_group, paired_readouts


def sae_label(vectors: str) -> str:
    """The SAE label of a vector-set key: ``"8x-fine"`` -> ``"8x"`` (``caa-fine``: ``"caa"``)."""
    return vectors.rsplit("-", 1)[0]


# -- vectors --------------------------------------------------------------------------------------------
def feedback_prompts(task: TaskData, tokenizer: Any, records: dict[str, list[PerspectiveRecord]]):
    """``(perspective, with-feedback prompt, without prompt)`` per sample (the task's prompt context kept)."""
    out = []
    for p, rs in records.items():
        for r in rs:
            text, _ = feedback_text(task.prompt, r, "auto")  # type: ignore[misc]
            with_fb = build_prompt(tokenizer, task.prompt, r, "with-feedback", feedback=text, context=task.context)
            without = build_prompt(tokenizer, task.prompt, r, "zero-shot", context=task.context)
            out.append((p, with_fb, without))
    return out


def _readouts_task(model: str, layer: int, dtype: str, device: str, threads: int, pairs, positions, pad_id: int):
    """A Ray task: the paired readouts of one task's feedback pairs (numpy out)."""
    if device == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    lm, _ = load_lm(model, dtype=dtype, device=device)
    h_with, h_without, tokens = paired_readouts(lm, layer, pairs, positions, pad_id=pad_id)
    return h_with.numpy(), h_without.numpy(), tokens


def set_digest(vs: Any) -> str:
    """A hash of a vector set's vectors and metadata, its creation time and the run's name left out (reruns
    rebuild the sets; a rerun writing its results elsewhere, or under another name, reuses the units)."""
    meta = {k: v for k, v in dataclasses.asdict(vs.meta).items() if k != "created"}
    meta["extra"] = {k: v for k, v in meta["extra"].items() if k != "evaluate"}
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for p, v in vs.vectors.items():
        h.update(p.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Vectors:
    sets: dict[str, Any]  # "task/key" -> VectorSet
    paths: dict[str, Path]  # "task/key" -> its file in the work directory
    info: dict[str, Any]  # readout tokens, samples per perspective


@dataclass
class EngineRun:
    """What one :meth:`Engine.run` returns."""

    outputs: dict[str, dict[str, Any]]  # output id -> {"probs", "coverage"}
    stats: dict[str, Any]  # units run / reused, tokens, seconds
    vectors: Vectors
    digest: str  # the plan hash (the units' cache directory)
    units: list[Unit] = field(default_factory=list)


class Engine:
    """Vectors, units and the actor pool for every run of one config (see the module docstring)."""

    def __init__(self, cfg: EvalConfig, *, echo: Callable[[str], None] = print) -> None:
        self.cfg, self.echo = cfg, echo
        self.tokenizer = load_tokenizer(cfg.model)
        self.model_name = resolve_model(cfg.model).name
        self._device: str | None = None
        self._n_layers: int | None = None

    @property
    def device(self) -> str:
        """``cuda`` when asked for or when the cluster has GPUs (``auto``), else ``cpu``; starts Ray."""
        if self._device is None:
            init_ray(self.cfg.ray_address)
            auto_gpu = self.cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
            self._device = "cuda" if self.cfg.device == "cuda" or auto_gpu else "cpu"
        return self._device

    def plan(self, tasks: Sequence[TaskData], conditions: Mapping[str, Sequence[Condition]]) -> list[Unit]:
        """The units of every task, numbered across tasks."""
        cfg, units = self.cfg, []
        for task in tasks:
            units += plan_units(task, conditions[task.name], self.tokenizer, items_per_unit=cfg.items_per_unit,
                                k_shots=cfg.k_shots, seed=cfg.seed, start=len(units), top_k=cfg.pd_top_k,
                                tau=cfg.pd_tau)  # fmt: skip
        return units

    def planned_tokens(self, units: Sequence[Unit], layer: int) -> dict[str, int]:
        """What ``units`` cost at ``layer``: ``full`` prompt tokens, ``resumed`` steered tokens (run from the
        layer on) and their sum in ``equivalent`` full-forward tokens."""
        if self._n_layers is None:
            self._n_layers = int(AutoConfig.from_pretrained(resolve_model(self.cfg.model).path).num_hidden_layers)
        counts = [unit_tokens(u, self.tokenizer, layer, self._n_layers) for u in units]
        return {k: sum(c[k] for c in counts) for k in ("full", "resumed", "equivalent")}

    # -- vectors ----------------------------------------------------------------------------------------
    def derive_vectors(
        self, tasks: Sequence[TaskData], layer: int, keys: Sequence[str], saes: Mapping[str, Path], work: Path
    ) -> Vectors:
        """The vector sets ``keys`` (``8x-fine``, ``caa-fine``, ...) of every task at ``layer``; ``saes`` maps
        each SAE label of ``keys`` to its directory. Readouts are cached in ``work`` (keyed by the prompts,
        model and layer), so reruns and the SAE/CAA sets of a task share one model pass."""
        cfg, tokenizer = self.cfg, self.tokenizer
        labels = sorted({sae_label(k) for k in keys})
        loaded = {label: SparseAutoencoder.load(saes[label]) for label in labels if label != "caa"}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        pooled = [k.endswith(POOLED) for k in keys]  # per-perspective readouts unless only pooled sets are asked for
        variants = [POOLED] if pooled and all(pooled) else ["perspective", POOLED] if any(pooled) else ["perspective"]
        jobs, plans = {}, {}
        for task in tasks:
            for variant in variants:
                if variant == POOLED:  # the reference's rule: one vector from the first items, all perspectives
                    chosen = {POOLED: pooled_samples(task.vector_pool, samples=cfg.samples, seed=cfg.seed)}
                else:
                    chosen = select_samples(
                        task.vector_pool, task.prompt, samples=cfg.samples, seed=cfg.seed,
                        perspectives=list(task.perspectives), where=f"the {task.name} training records",
                    )  # fmt: skip
                prompts = feedback_prompts(task, tokenizer, chosen)
                ids_w, pos_w = encode_prompts(tokenizer, [w for _, w, _ in prompts])
                ids_o, pos_o = encode_prompts(tokenizer, [o for _, _, o in prompts])
                key = hashlib.sha256(json.dumps([self.model_name, layer, ids_w, ids_o]).encode()).hexdigest()[:16]
                cache = work / "readouts" / f"{task.name}-L{layer}-{key}.npz"
                plans[task.name, variant] = (task, prompts, cache, {p: len(v) for p, v in chosen.items()})
                if not cache.exists():
                    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(1, len(tasks)))
                    remote = ray.remote(_readouts_task).options(
                        num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus if self.device == "cuda" else 0
                    )
                    pairs = list(zip(ids_w, ids_o, strict=True))
                    positions = list(zip(pos_w, pos_o, strict=True))
                    jobs[task.name, variant] = remote.remote(cfg.model, layer, cfg.dtype, self.device, threads, pairs,
                                                             positions, pad_id)  # fmt: skip
        started = time.perf_counter()
        tokens = 0
        for plan, ref in jobs.items():
            h_w, h_o, n = ray.get(ref)
            tokens += n
            cache = plans[plan][2]
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, h_with=h_w, h_without=h_o)
            os.replace(tmp, cache)
        if jobs:
            self.echo(f"vectors: read out {tokens:,} tokens of feedback pairs in {time.perf_counter() - started:.1f} s")
        out = Vectors({}, {}, {"readout_tokens": tokens, "samples": {}})
        for (name, variant), (task, prompts, cache, counts) in plans.items():
            out.info["samples"][name if variant != POOLED else f"{name}/{POOLED}"] = counts
            data = np.load(cache)
            h_w, h_o = torch.from_numpy(data["h_with"]), torch.from_numpy(data["h_without"])
            groups = [p for p, _, _ in prompts]
            for label in labels:
                mode = "caa" if label == "caa" else "sae"
                sae = loaded.get(label)
                fine, n = mean_by_group(differences(h_w, h_o, mode=mode, sae=sae), groups)  # type: ignore[arg-type]
                if variant == POOLED:  # the one pooled vector steers every perspective
                    fine, n = {p: fine[POOLED] for p in task.perspectives}, {p: n[POOLED] for p in task.perspectives}
                vc = VectorConfig(
                    sae=None if sae is None else saes[label], mode=mode, task=name,
                    granularity="fine" if label == "caa" or variant == POOLED else "both", publish=False, track=False,
                )  # fmt: skip
                extra = {"evaluate": cfg.run_name, "samples": counts, "context": task.context, "sampling": variant}
                built = vector_sets(vc, Readouts(fine, n, 0, 0, 0), model=self.model_name, layer=layer, sae=sae,
                                    extra=extra)  # fmt: skip
                for granularity, vs in built.items():
                    key = f"{label}-{POOLED if variant == POOLED else granularity}"
                    if key in keys:
                        out.sets[f"{name}/{key}"] = vs
                        out.paths[f"{name}/{key}"] = vs.save(work / "vectors" / f"{name}-{key}-L{layer}.safetensors")
        return out

    # -- units ------------------------------------------------------------------------------------------
    def actor_spec(self, layer: int, saes: Mapping[str, Path], vectors: Vectors) -> tuple[dict[str, Any], str]:
        """``(spec, digest)``: what every actor gets, and the hash of what decides the units' results."""
        cfg = self.cfg
        labels = sorted({sae_label(k.split("/", 1)[1]) for k in vectors.sets} - {"caa"})
        device = self.device  # starts Ray: with every readout cached, nothing before this has
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        spec = {
            "model": cfg.model, "layer": layer, "dtype": cfg.dtype, "device": device,
            "saes": {label: str(saes[label]) for label in labels},
            "vectors": {k: vs.to_bytes() for k, vs in vectors.sets.items()}, "batch_size": cfg.batch_size,
            "max_batch_tokens": cfg.max_batch_tokens, "threads": cfg.torch_threads,
            "actors_per_node": math.ceil(cfg.num_actors / max(1, alive)), "resume": cfg.resume_from_layer,
        }  # fmt: skip
        decisive = {k: v for k, v in spec.items() if k not in ("vectors", "threads", "actors_per_node")}
        decisive["vectors"] = {k: set_digest(vs) for k, vs in vectors.sets.items()}
        return spec, decisive

    def run(
        self,
        tasks: Sequence[TaskData],
        conditions: Mapping[str, Sequence[Condition]],
        layer: int,
        saes: Mapping[str, Path],
        work: Path,
        *,
        tracker: Any = None,
    ) -> EngineRun:
        """Every answer the conditions need on the tasks at ``layer`` (finished units in ``work`` reused)."""
        keys = sorted({c.steer.vectors for cs in conditions.values() for c in cs if c.steer is not None})
        vectors = self.derive_vectors(tasks, layer, keys, saes, work)
        units = self.plan(tasks, conditions)
        spec, decisive = self.actor_spec(layer, saes, vectors)
        digest = plan_hash(units, decisive)
        outputs, stats = self.run_units(units, spec, work / "units" / digest, tracker=tracker)
        return EngineRun(outputs, stats, vectors, digest, units)

    def _stream(self, spec: dict[str, Any], units: list[Unit]) -> Iterator[dict[str, Any]]:
        """Run ``units`` through the actor pool; yield each result as it finishes."""
        cfg = self.cfg
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        items = [{"unit": u.index, "payload": u.to_json()} for u in units]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            ds = ds.map_batches(
                EvalWorker,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(
                    size=min(cfg.num_actors, len(units)), max_tasks_in_flight_per_actor=2
                ),
                fn_constructor_kwargs={"spec": spec},
                num_cpus=cfg.actor_cpus,
                num_gpus=cfg.actor_gpus if self.device == "cuda" else None,
                max_restarts=3,
                max_task_retries=3,
            )
        for row in ds.iter_rows():
            yield json.loads(row["result"])

    def run_units(
        self, units: list[Unit], spec: dict[str, Any], cache_dir: Path, *, tracker: Any = None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Every unit's outputs (finished units in ``cache_dir`` are reused); ``(outputs by id, run stats)``."""
        done: dict[int, dict[str, Any]] = {}
        for u in units:
            path = cache_dir / f"{u.index}.json"
            if path.exists():
                done[u.index] = json.loads(path.read_text())
        todo = [u for u in units if u.index not in done]
        self.echo(f"evaluate: {len(units)} units, {len(done)} already done, {len(todo)} to run on "
                  f"{self.cfg.num_actors} actor(s)")  # fmt: skip
        started = time.perf_counter()
        stats = {"units_run": len(todo), "units_reused": len(done), "tokens_full": 0, "tokens_resumed": 0}
        if todo:
            for k, result in enumerate(self._stream(spec, todo), start=1):
                atomic_write_json(cache_dir / f"{result['unit']}.json", result)
                done[result["unit"]] = result
                s = result["stats"]
                stats["tokens_full"] += s["tokens_full"]
                stats["tokens_resumed"] += s["tokens_resumed"]
                elapsed = time.perf_counter() - started
                rate = stats["tokens_full"] / max(elapsed, 1e-9)
                eta = elapsed / k * (len(todo) - k)
                self.echo(f"evaluate: unit {k}/{len(todo)} ({result['task']}) {s['seconds']:.1f} s; "
                          f"{rate:,.0f} prompt tok/s; ETA {eta / 60:.1f} min")  # fmt: skip
                if tracker is not None:
                    tracker.log({"units_done": k, "prompt_tokens_per_s": rate})
        stats["seconds"] = time.perf_counter() - started
        outputs = {oid: out for result in done.values() for oid, out in result["outputs"].items()}
        return outputs, stats


# -- scoring --------------------------------------------------------------------------------------------
def outcomes_of(task: TaskData, condition: Condition, outputs: dict[str, dict[str, Any]]):
    """Per-record ``Outcomes`` (+ coverage and the read-out distributions) of one condition on one task."""
    gold, pred, jsd, coverage, probs, top1 = [], [], [], [], [], []
    for r in task.records:
        out = outputs[output_id(task.name, condition, r)]
        g, dist = gold_of(r)
        p = np.asarray(out["probs"], dtype=np.float64)
        gold.append(g)
        pred.append(int(np.argmax(p)))
        coverage.append(out["coverage"])
        probs.append(out["probs"])
        top1.append(out.get("top1"))
        if dist is not None:
            jsd.append(float(js_distance(np.asarray(dist), p)))
    has_top1 = task.kind == "classify" and None not in top1  # units from older runs carry no top-1 readout
    outcome = Outcomes(
        np.asarray(gold), np.asarray(pred), task.n_classes, np.asarray(jsd) if task.kind == "distribution" else None,
        np.asarray(top1, dtype=np.int64) if has_top1 else None,
    )  # fmt: skip
    return outcome, np.asarray(coverage), probs


def seed_for(cfg: EvalConfig, *parts: str) -> int:
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
    cfg: EvalConfig,
    tasks: Sequence[TaskData],
    conditions: Mapping[str, Sequence[Condition]],
    outputs: dict[str, Any],
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
                    outcome.subset(idx), [strata[i] for i in idx],
                    baseline=None if name == BASELINE else base.subset(idx),
                    n_resamples=cfg.bootstrap, seed=seed_for(cfg, task.name, perspective),
                )  # fmt: skip
                rows.append({
                    "run": cfg.run_name, "task": task.name, "kind": task.kind, "condition": name,
                    "perspective": perspective, "n": int(idx.size), "coverage": float(coverage[idx].mean()),
                    "coeff": None if c.steer is None else c.steer.coeff,
                    **flat(summary),
                })  # fmt: skip
            top1 = [None] * len(probs) if outcome.top1 is None else outcome.top1.tolist()
            for r, p, g, t in zip(task.records, probs, outcome.gold.tolist(), top1, strict=True):
                predictions.append({"task": task.name, "condition": name, "id": r.id, "perspective": r.perspective,
                                    "gold": g, "probs": p, **({} if t is None else {"top1": t})})  # fmt: skip
        for claim in CLAIMS:
            if (claim.tasks and task.name not in claim.tasks) or claim.a not in results or claim.b not in results:
                continue
            metric = PRIMARY[task.kind] if claim.metric == "primary" else claim.metric
            summary = summarize(results[claim.a][0], strata, baseline=results[claim.b][0],
                                n_resamples=cfg.bootstrap, seed=seed_for(cfg, task.name, "all"))  # fmt: skip
            if metric not in summary:
                continue
            d = summary[metric]["delta"]
            comparisons.append({
                "claim": claim.text, "task": task.name, "metric": metric, "a": claim.a, "b": claim.b,
                "delta": d.value, "delta_lo": d.lo, "delta_hi": d.hi, "verdict": verdict(d.value, d.lo, d.hi, metric),
            })  # fmt: skip
    return rows, comparisons, predictions


__all__ = ["Engine", "EngineRun", "Vectors", "flat", "outcomes_of", "sae_label", "score", "set_digest"]
