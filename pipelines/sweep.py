"""``pluristeer evaluate --sweep``: pick the steering layer L and coefficient c on the train split.

A client of the evaluation engine (:class:`pipelines.eval_engine.Engine`): per layer it runs the sweep's
conditions and scores them against zero-shot on the same records (paired bootstrap). The records come from
:func:`holdout_task`: the vectors from one part of the task's training records, the scores from another
(the task's ``valid`` split where it has one, else the other half of its training items, seeded), so the
test split is never looked at.

Swept: every SAE (``sae_8x``, ``sae_32x`` and ``sweep_saes``, each at its own ``hook_layer``) with fine vectors
at every coefficient of ``sweep_coeffs``, and CAA vectors (no SAE needed) at every layer of ``sweep_layers``.
Per task the best setting is the one with the best paired difference in the primary metric (macro-F1, or
JSD for distributions; ties: the smaller c); ``sweep.json`` holds the 8x SAE's as ``task_coeffs`` for
``pluristeer evaluate --set task_coeffs=...`` and the best layer overall as ``best``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.config import ConfigError
from pipelines.eval_config import EvalConfig
from pipelines.eval_engine import Engine, score
from pipelines.eval_plan import BASELINE, Condition, SteerSpec, TaskData
from pipelines.eval_report import fmt
from pipelines.evaluate import make_task, resolve_task
from pipelines.metrics import LOWER_IS_BETTER
from pipelines.records import item_key
from pipelines.tasks import Task
from sae import storage
from sae.model import SparseAutoencoder


@dataclass(frozen=True)
class SAEEntry:
    label: str  # how its vector sets and conditions name it: 8x, 32x, or 8x@L24 for a sweep_saes entry
    path: Path
    layer: int


def sae_catalog(cfg: EvalConfig) -> list[SAEEntry]:
    """Every SAE the config names, with its layer (``hook_layer``); labels are unique."""
    out: list[SAEEntry] = []
    for label, path in [*cfg.named_saes.items(), *((None, p) for p in cfg.sweep_saes)]:
        sae = SparseAutoencoder.load(path)
        layer = sae.cfg.metadata.get("hook_layer")
        if layer is None:
            raise ConfigError(f"{path}: the SAE records no hook_layer, so its layer is unknown")
        if label is None:
            label = f"{round(sae.cfg.d_sae / sae.cfg.d_in)}x@L{layer}"
            taken = {e.label for e in out}
            base, n = label, 2
            while label in taken:
                label, n = f"{base}#{n}", n + 1
        out.append(SAEEntry(label, path if storage.is_uri(path) else Path(path), int(layer)))
    return out


def holdout_task(cfg: EvalConfig, name: str | Task, limit: int) -> TaskData:
    """Task ``name`` for selection on training data only: vectors (and few-shot examples) from one part of it,
    ≤ ``limit`` records per perspective scored from another: the task's ``valid`` split where it has one,
    else the other half of its training items (seeded, by item)."""
    task = name if isinstance(name, Task) else resolve_task(cfg, name)
    train = task.records("train")
    if "valid" in task.splits:
        return make_task(cfg, task, train, task.records("valid"), limit)
    keys = sorted({item_key(r) for r in train})
    random.Random(f"{cfg.seed}:sweep:{task.name}").shuffle(keys)
    first = set(keys[: len(keys) // 2])
    vector_half = [r for r in train if item_key(r) in first]
    held_out = [r for r in train if item_key(r) not in first]
    return make_task(cfg, task, vector_half, held_out, limit)


def sweep_conditions(cfg: EvalConfig, layer: int, saes: list[SAEEntry]) -> list[Condition]:
    out = [Condition(BASELINE)]
    for e in saes:
        if e.layer == layer:
            out += [Condition(f"steer-{e.label}-fine c={c:g}", steer=SteerSpec(f"{e.label}-fine", "sae", c))
                    for c in cfg.sweep_coeffs]  # fmt: skip
    if layer in cfg.sweep_layers:
        out += [Condition(f"caa-fine c={c:g}", steer=SteerSpec("caa-fine", "caa", c)) for c in cfg.sweep_coeffs]
    return out


def dry_run(
    engine: Engine, tasks: list[TaskData], layers: list[int], conditions: Callable[[int], list[Condition]], stage: str
) -> dict[int, dict[str, int]]:
    """What a sweep or recommend run over ``layers`` would compute (``conditions(layer)`` for every task), per
    layer, echoed; nothing runs."""
    planned = {}
    for layer in layers:
        conds = conditions(layer)
        units = engine.plan(tasks, {t.name: conds for t in tasks})
        planned[layer] = engine.planned_tokens(units, layer)
        p = planned[layer]
        engine.echo(
            f"{stage}: layer {layer}: {len(conds)} conditions, {len(units)} units, {p['full']:,} prompt "
            f"tokens + {p['resumed']:,} steered tokens resumed (≈{p['equivalent']:,} full-forward tokens)"
        )
    total = sum(p["equivalent"] for p in planned.values())
    engine.echo(f"{stage}: dry run: ≈{total:,} full-forward tokens over layers {layers}; nothing was run")
    return planned


def run_sweep(cfg: EvalConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep; writes ``sweep.jsonl``, ``sweep.md`` and ``sweep.json`` to ``cfg.out`` (a directory or a URI)."""
    started = time.perf_counter()
    cfg = replace(cfg, work_dir=cfg.work / "sweep")
    saes = sae_catalog(cfg)
    layers = sorted({*(e.layer for e in saes), *cfg.sweep_layers})
    if not layers:
        raise ConfigError("the sweep needs an SAE (sae_8x, sae_32x or sweep_saes) or sweep_layers (CAA layers)")
    tasks = [holdout_task(cfg, name, cfg.sweep_limit) for name in cfg.tasks]
    engine = Engine(cfg, echo=echo)
    if cfg.dry_run:
        return {"layers": layers, "planned_tokens": dry_run(engine, tasks, layers, lambda layer: sweep_conditions(
            cfg, layer, saes), "sweep")}  # fmt: skip
    rows: list[dict[str, Any]] = []
    for layer in layers:
        conds = sweep_conditions(cfg, layer, saes)
        conditions = {t.name: conds for t in tasks}
        result = engine.run(tasks, conditions, layer, {e.label: e.path for e in saes}, cfg.work)
        scored, _, _ = score(cfg, tasks, conditions, result.outputs)
        steers = {c.name: c.steer for c in conds if c.steer is not None}
        for r in scored:
            if r["perspective"] == "all":
                spec = steers.get(r["condition"])
                mode = "caa" if spec is not None and spec.mode == "caa" else "sae"
                rows.append({**r, "layer": layer, "mode": mode, "sae": None if spec is None else spec.sae})
    best = pick_best(rows)
    result = {"layers": layers, "saes": {e.label: {"path": str(e.path), "layer": e.layer} for e in saes},
              "best": best, "seconds": round(time.perf_counter() - started)}  # fmt: skip
    by_8x = pick_best([r for r in rows if r["sae"] in (None, "8x")])
    result["task_coeffs"] = {t: b["coeff"] for t, b in by_8x.items() if b["mode"] == "sae"}
    write_sweep(cfg, rows, result, tasks)
    echo(
        f"sweep: best {json.dumps(best)}; coefficients for sae_8x {result['task_coeffs']}; "
        f"wrote {storage.display(cfg.out)}"
    )
    return result


def gain(row: dict[str, Any]) -> float:
    """The paired difference to zero-shot in the primary metric, signed so that larger is better."""
    metric = "jsd" if row["kind"] == "distribution" else "macro_f1"
    delta = row.get(f"{metric}_delta", float("nan"))
    return -delta if metric in LOWER_IS_BETTER else delta


def pick_best(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: the SAE setting (SAE, layer, c) with the best paired gain over zero-shot (ties: the smaller
    c), and the best CAA layer/coefficient (``task/caa``)."""
    best: dict[str, dict[str, Any]] = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task and r["condition"] != BASELINE]
        for mode in ("sae", "caa"):
            cands = [r for r in mine if r["mode"] == mode and gain(r) == gain(r)]
            if not cands:
                continue
            top = max(cands, key=lambda r: (gain(r), -r["coeff"]))
            key = task if mode == "sae" else f"{task}/caa"
            best[key] = {"mode": mode, "sae": top.get("sae"), "layer": top["layer"], "coeff": top["coeff"],
                         "gain": gain(top)}  # fmt: skip
    return best


def write_sweep(cfg: EvalConfig, rows: list[dict[str, Any]], result: dict[str, Any], tasks: list[TaskData]) -> None:
    storage.write_text(storage.join(cfg.out, "sweep.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    storage.write_json(storage.join(cfg.out, "sweep.json"), result)
    lines = [
        "# Layer / coefficient sweep (train split, held out)",
        "",
        "Vectors from one part of each task's training records, scored on "
        f"{f'≤{cfg.sweep_limit}' if cfg.sweep_limit else 'all'} records per perspective of another "
        "(the valid split, or the other half of "
        "the training items); Δ = paired difference to zero-shot with its 95% bootstrap interval. Primary "
        "metric: macro-F1 (classification, higher is better) or JSD (distributions, lower is better).",
        "",
        "| task | n | layer | mode | SAE | c | primary | Δ vs zero-shot |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["task"], r["layer"], r["mode"], r["sae"] or "", r["coeff"] or 0)):
        m = "jsd" if r["kind"] == "distribution" else "macro_f1"
        base = r["condition"] == BASELINE
        delta = "" if base else fmt(r[f"{m}_delta"], r[f"{m}_delta_lo"], r[f"{m}_delta_hi"], True)
        lines.append(
            f"| {r['task']} | {r['n']} | {r['layer']} | {'—' if base else r['mode']} | {r['sae'] or '—'} | "
            f"{r['coeff'] if r['coeff'] is not None else '—'} | {fmt(r[m], r[f'{m}_lo'], r[f'{m}_hi'])} | {delta} |"
        )
    lines += ["", "Chosen: " + json.dumps(result["best"]), ""]
    sizes = {t.name: t.sizes for t in tasks}
    lines += [f"Scored records per perspective: {json.dumps(sizes)}", ""]
    storage.write_text(storage.join(cfg.out, "sweep.md"), "\n".join(lines))


__all__ = ["SAEEntry", "gain", "holdout_task", "pick_best", "run_sweep", "sae_catalog", "sweep_conditions"]
