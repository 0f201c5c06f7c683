"""``pluristeer evaluate --sweep``: pick the steering layer L and coefficient c on the train split.

Each task's training items are split in two halves (seeded, by item): the vectors come from ≤ ``samples``
records per perspective of the first half, and ≤ ``sweep_limit`` records per perspective of the second
half are scored, so the test split is never looked at. At the SAEs' layer, ``steer-8x-fine`` runs at
every coefficient of ``sweep_coeffs``; every layer of ``sweep_layers`` is swept with CAA vectors (they
need no SAE), which shows where in the model steering works. Each setting is compared to zero-shot on the
same records (paired bootstrap). Per task the best c is the one with the best paired difference in the
primary metric (macro-F1, or JSD for distributions); ``sweep.json`` holds it as ``task_coeffs`` for
``pluristeer evaluate --set task_coeffs=...``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import ray

from common.raycluster import init_ray
from pipelines.datasets import load_records
from pipelines.eval_plan import BASELINE, Condition, SteerSpec, TaskData, item_key, plan_hash
from pipelines.eval_report import fmt
from pipelines.evaluate import (
    EvalConfig,
    derive_vectors,
    make_task,
    plan_all,
    resolve_layer,
    run_units,
    score,
    set_digest,
)
from pipelines.metrics import LOWER_IS_BETTER
from sae.atomic import atomic_write_json, atomic_write_text
from sae.lm import load_tokenizer


def sweep_task(cfg: EvalConfig, name: str) -> TaskData:
    """Vectors from one half of ``name``'s training items, scoring on the other half."""

    train = load_records(name, "train")
    keys = sorted({item_key(r) for r in train})
    random.Random(f"{cfg.seed}:sweep:{name}").shuffle(keys)
    first = set(keys[: len(keys) // 2])
    vector_half = [r for r in train if item_key(r) in first]
    held_out = [r for r in train if item_key(r) not in first]
    return make_task(cfg, name, vector_half, held_out, cfg.sweep_limit)


def sweep_conditions(cfg: EvalConfig, layer: int, sae_layer: int | None) -> list[Condition]:
    out = [Condition(BASELINE)]
    if layer == sae_layer:
        out += [Condition(f"steer-8x-fine c={c:g}", steer=SteerSpec("8x-fine", "sae", c)) for c in cfg.sweep_coeffs]
    if layer in cfg.sweep_layers:
        out += [Condition(f"caa-fine c={c:g}", steer=SteerSpec("caa-fine", "caa", c)) for c in cfg.sweep_coeffs]
    return out


def run_sweep(cfg: EvalConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep; writes ``sweep.jsonl``, ``sweep.md`` and ``sweep.json`` to ``cfg.out``."""


    started = time.perf_counter()
    cfg = dataclasses.replace(cfg, work_dir=cfg.work / "sweep")
    tokenizer = load_tokenizer(cfg.model)
    sae_layer = resolve_layer(cfg) if cfg.sae_8x is not None else None
    layers = sorted({*([sae_layer] if sae_layer is not None else []), *cfg.sweep_layers})
    if not layers:
        raise ValueError("the sweep needs sae_8x (coefficients at its layer) or sweep_layers (CAA layers)")
    tasks = [sweep_task(cfg, name) for name in cfg.tasks]
    init_ray(cfg.ray_address)
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    device = "cuda" if use_gpu else "cpu"
    rows: list[dict[str, Any]] = []
    for layer in layers:
        conds = sweep_conditions(cfg, layer, sae_layer)
        conditions = {t.name: conds for t in tasks}
        keys = sorted({c.steer.vectors for c in conds if c.steer is not None})
        sets, _, _ = derive_vectors(cfg, tasks, tokenizer, layer, keys, device, echo=echo)
        units = plan_all(cfg, tasks, tokenizer, conditions)
        spec = {
            "model": cfg.model, "layer": layer, "dtype": cfg.dtype, "device": device,
            "saes": {"8x": str(cfg.sae_8x)} if "8x-fine" in keys else {},
            "vectors": {k: vs.to_bytes() for k, vs in sets.items()}, "batch_size": cfg.batch_size,
            "max_batch_tokens": cfg.max_batch_tokens, "threads": cfg.torch_threads,
            "actors_per_node": cfg.num_actors, "resume": cfg.resume_from_layer,
        }  # fmt: skip
        decisive = {k: v for k, v in spec.items() if k not in ("vectors", "threads", "actors_per_node")}
        digest = plan_hash(units, decisive | {"vectors": {k: set_digest(vs) for k, vs in sets.items()}})
        outputs, _ = run_units(cfg, units, spec, cfg.work / "units" / digest, use_gpu, echo=echo)
        scored, _, _ = score(cfg, tasks, conditions, outputs)
        for r in scored:
            if r["perspective"] == "all":
                rows.append({**r, "layer": layer, "mode": "caa" if r["condition"].startswith("caa") else "sae"})
    best = pick_best(rows, sae_layer)
    result = {"layers": layers, "sae_layer": sae_layer, "best": best, "seconds": round(time.perf_counter() - started)}
    result["task_coeffs"] = {t: b["coeff"] for t, b in best.items() if b["mode"] == "sae"}
    write_sweep(cfg, rows, result, tasks)
    echo(f"sweep: best coefficients {result['task_coeffs']} at layer {sae_layer}; wrote {cfg.out}")
    return result


def _gain(row: dict[str, Any]) -> float:
    metric = "jsd" if row["kind"] == "distribution" else "macro_f1"
    delta = row.get(f"{metric}_delta", float("nan"))
    return -delta if metric in LOWER_IS_BETTER else delta


def pick_best(rows: list[dict[str, Any]], sae_layer: int | None) -> dict[str, dict[str, Any]]:
    """Per task: the SAE coefficient with the best paired gain over zero-shot (ties: the smaller c), and the
    best CAA layer/coefficient."""
    best: dict[str, dict[str, Any]] = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task and r["condition"] != BASELINE]
        for mode in ("sae", "caa"):
            cands = [r for r in mine if r["mode"] == mode and _gain(r) == _gain(r)]
            if not cands:
                continue
            top = max(cands, key=lambda r: (_gain(r), -r["coeff"]))
            key = task if mode == "sae" else f"{task}/caa"
            best[key] = {"mode": mode, "layer": top["layer"], "coeff": top["coeff"], "gain": _gain(top)}
    return best


def write_sweep(cfg: EvalConfig, rows: list[dict[str, Any]], result: dict[str, Any], tasks: list[TaskData]) -> None:
    import json


    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.out / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(cfg.out / "sweep.json", result)
    lines = [
        "# Layer / coefficient sweep (train split, held-out half)",
        "",
        "Vectors from one half of each task's training items, scored on ≤"
        f"{cfg.sweep_limit} records per perspective of the other half; Δ = paired difference to zero-shot "
        "with its 95% bootstrap interval. Primary metric: macro-F1 (classification, higher is better) or JSD "
        "(distributions, lower is better).",
        "",
        "| task | n | layer | mode | c | primary | Δ vs zero-shot |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["task"], r["layer"], r["mode"], r["coeff"] or 0)):
        m = "jsd" if r["kind"] == "distribution" else "macro_f1"
        delta = "" if r["condition"] == BASELINE else fmt(r[f"{m}_delta"], r[f"{m}_delta_lo"], r[f"{m}_delta_hi"], True)
        mode = "—" if r["condition"] == BASELINE else r["mode"]
        lines.append(
            f"| {r['task']} | {r['n']} | {r['layer']} | {mode} | {r['coeff'] if r['coeff'] is not None else '—'} | "
            f"{fmt(r[m], r[f'{m}_lo'], r[f'{m}_hi'])} | {delta} |"
        )
    lines += ["", "Chosen: " + json.dumps(result["best"]), ""]
    sizes = {t.name: t.sizes for t in tasks}
    lines += [f"Scored records per perspective: {json.dumps(sizes)}", ""]
    atomic_write_text(cfg.out / "sweep.md", "\n".join(lines))


__all__ = ["pick_best", "run_sweep", "sweep_conditions", "sweep_task"]
