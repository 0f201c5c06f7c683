"""``pluristeer recommend``: which steering works for these perspectives, chosen on the train split only.

Per task, on a held-out part of the training records (:func:`pipelines.sweep.holdout_task`: vectors and
few-shot examples from one part, scores from the other, the test split never read), every *candidate* is
scored against zero-shot on the same records:

- prompting: ``zero-shot``, ``few-shot``; pluralistic decoding over persona prompts: ``pd-{mean,cad,dvd}``;
- CAA (mean residual difference, no SAE) at every layer considered × ``sweep_coeffs``;
- SAE steering with each SAE (``sae_8x``, ``sae_32x``, ``sweep_saes``; each at its own ``hook_layer``) ×
  ``sweep_coeffs`` × fine/coarse vectors; PD over steered rows ``pd-{mean,cad,dvd}+steer`` with its fine
  vectors at each coefficient.

One :class:`pipelines.eval_engine.Engine` run per layer (the steered rows of a record resume from its
unsteered forward at that layer, so the zero-shot row is shared by every steered candidate there).

**The decision.** Candidates are ranked by the paired difference Δ to zero-shot in the primary metric
(macro-F1, or JSD for distributions) with 95% bootstrap intervals. Picking the largest of m noisy
differences favours noise, so a candidate is *recommended* only when its Δ interval at the family-wise
level — Bonferroni over the m candidates compared, ``1 − 0.05/m`` — lies above zero, and when it keeps at
least half of zero-shot's *coverage* (the probability mass the options get before renormalisation: a
steered model that stops answering with the options is broken for generation even where its argmax is
right); the best-ranked such candidate wins. When none qualifies, the recommendation says so and is the
unsteered model. With fewer than 10 held-out records per perspective the intervals are rough, and the
report says that too.

Outputs in ``out``: ``recommend.md``, ``recommend.json`` and per task ``serve-<task>.yaml`` (``pluristeer
serve -c``) with the winner's vectors rebuilt from *all* training records of the task
(``<task>-<set>-L<layer>.safetensors``; the coefficient was chosen with vectors from part of them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from common.config import ConfigError
from pipelines.eval_config import EvalConfig
from pipelines.eval_engine import Engine, outcomes_of, seed_for
from pipelines.eval_plan import BASELINE, Condition, SteerSpec, TaskData
from pipelines.eval_report import LABELS, PRIMARY, fmt
from pipelines.evaluate import git_commit, resolve_task
from pipelines.metrics import LOWER_IS_BETTER, Estimate, summarize
from pipelines.records import PerspectiveRecord
from pipelines.sweep import SAEEntry, dry_run, holdout_task, sae_catalog
from sae import storage
from sae.decoding import DECODING_MODES

FAMILY_LEVEL = 0.95  # the recommended candidate's Δ interval holds at this level over all candidates
MIN_COVERAGE = 0.5  # a candidate's option mass must keep this share of zero-shot's to be recommended
FEW_RECORDS = 10  # fewer held-out records per perspective than this: the intervals are rough (said so)


@dataclass(frozen=True)
class Candidate:
    """One way of answering, as a condition of the engine plus what the recommendation reports of it."""

    condition: Condition
    method: str  # zero-shot | few-shot | pd | caa | sae | pd+steer
    layer: int | None = None  # steering layer (None: unsteered)
    sae: str | None = None  # the SAE's label (8x, 32x, 8x@L24)
    granularity: str | None = None  # fine | coarse
    decoding: str | None = None  # PD mode

    @property
    def name(self) -> str:
        return self.condition.name

    @property
    def coeff(self) -> float | None:
        return None if self.condition.steer is None else self.condition.steer.coeff


def candidates(cfg: EvalConfig, layer: int, saes: Sequence[SAEEntry], *, unsteered: bool) -> list[Candidate]:
    """The candidates run at ``layer``: zero-shot always (the paired baseline), the unsteered ones when
    ``unsteered``, CAA and every SAE trained at ``layer`` at every coefficient."""

    def spec(vectors: str, mode: str, c: float) -> SteerSpec:
        return SteerSpec(vectors, mode, c, cfg.keep_error, cfg.steer_decode, cfg.from_position)

    out = [Candidate(Condition(BASELINE), "zero-shot")]
    if unsteered:
        out.append(Candidate(Condition("few-shot", prompt="few-shot"), "few-shot"))
        out += [Candidate(Condition(f"pd-{m}", pd=m, pd_rows="prompt"), "pd", decoding=m) for m in DECODING_MODES]
    for c in cfg.sweep_coeffs:
        out.append(Candidate(Condition(f"caa-fine c={c:g} @L{layer}", steer=spec("caa-fine", "caa", c)), "caa", layer,
                             granularity="fine"))  # fmt: skip
    for e in saes:
        if e.layer != layer:
            continue
        for c in cfg.sweep_coeffs:
            for g in ("fine", "coarse"):
                cond = Condition(f"steer-{e.label}-{g} c={c:g} @L{layer}", steer=spec(f"{e.label}-{g}", "sae", c))
                out.append(Candidate(cond, "sae", layer, e.label, g))
            for m in DECODING_MODES:
                cond = Condition(f"pd-{m}+steer-{e.label} c={c:g} @L{layer}", steer=spec(f"{e.label}-fine", "sae", c),
                                 pd=m, pd_rows="steer")  # fmt: skip
                out.append(Candidate(cond, "pd+steer", layer, e.label, "fine", m))
    return out


def gain_of(metric: str, est: Estimate) -> tuple[float, float, float]:
    """A paired difference as a gain (larger is better): ``(gain, lo, hi)``."""
    if metric in LOWER_IS_BETTER:
        return -est.value, -est.hi, -est.lo
    return est.value, est.lo, est.hi


def rank(cfg: EvalConfig, task: TaskData, found: list[tuple[Candidate, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every candidate's primary metric (95% interval) and paired Δ to zero-shot (95% and family-wise
    intervals), best first; ``recommended`` marks those whose family-wise Δ interval lies above zero."""
    metric = PRIMARY[task.kind]
    strata = [r.perspective for r in task.records]
    base = next(outputs for c, outputs in found if c.name == BASELINE)
    baseline, base_coverage, _ = outcomes_of(task, Condition(BASELINE), base)
    floor = MIN_COVERAGE * float(np.mean(base_coverage))
    m = max(1, len(found) - 1)
    family = 1 - (1 - FAMILY_LEVEL) / m
    resamples = max(cfg.bootstrap, math.ceil(20 / (1 - family)))  # ≥ 10 resamples in each tail
    seed = seed_for(cfg, task.name, "recommend")
    rows = []
    for cand, outputs in found:
        outcome, coverage, _ = outcomes_of(task, cand.condition, outputs)
        is_base = cand.name == BASELINE
        s95 = summarize(outcome, strata, baseline=None if is_base else baseline, n_resamples=cfg.bootstrap, seed=seed)
        row: dict[str, Any] = {
            "candidate": cand.name, "method": cand.method, "layer": cand.layer, "sae": cand.sae,
            "granularity": cand.granularity, "coeff": cand.coeff, "decoding": cand.decoding, "n": len(task.records),
            "coverage": float(np.mean(coverage)), "metric": metric,
            "value": s95[metric]["value"].value, "lo": s95[metric]["value"].lo, "hi": s95[metric]["value"].hi,
        }  # fmt: skip
        if is_base:
            row |= {"gain": 0.0, "gain_lo": 0.0, "gain_hi": 0.0, "gain_family_lo": 0.0, "covered": True,
                    "recommended": False}  # fmt: skip
        else:
            fam = summarize(outcome, strata, baseline=baseline, n_resamples=resamples, seed=seed, level=family)
            g, lo, hi = gain_of(metric, s95[metric]["delta"])
            _, flo, _ = gain_of(metric, fam[metric]["delta"])
            covered = row["coverage"] >= floor
            row |= {"gain": g, "gain_lo": lo, "gain_hi": hi, "gain_family_lo": flo, "covered": covered,
                    "recommended": bool(flo > 0 and covered)}  # fmt: skip
        rows.append(row)
    order = {"zero-shot": 0, "few-shot": 1, "caa": 2, "sae": 3, "pd": 4, "pd+steer": 5}  # ties: the simpler one
    rows.sort(key=lambda r: (-r["gain"] if r["gain"] == r["gain"] else math.inf, order[r["method"]], r["coeff"] or 0))
    for i, r in enumerate(rows, start=1):
        r["rank"] = i
    return rows


def winner_of(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best-ranked recommended candidate, or ``None`` (nothing beats zero-shot at the family level)."""
    return next((r for r in rows if r["recommended"]), None)


# -- serving the winner -----------------------------------------------------------------------------------
def serve_settings(
    cfg: EvalConfig,
    task: TaskData,
    win: dict[str, Any] | None,
    best_steered: dict[str, Any] | None,
    vectors: storage.Location,
    saes: dict[str, Path] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """``(ServeConfig fields, comment lines)`` serving the recommendation with the VectorSet file ``vectors``
    (the winner's; with no steered winner, the best-ranked steered candidate's, at coefficient 0); ``saes``:
    the SAE directories by label (written as absolute paths, so the config works from any directory)."""
    shown = win if win is not None and win["coeff"] is not None else best_steered
    assert shown is not None
    mode = "caa" if shown["method"] == "caa" else "sae"
    key = f"{task.name}-{'caa' if mode == 'caa' else shown['sae']}-{shown['granularity']}".replace("@", "-")
    fields: dict[str, Any] = {
        "vectors": key, "vectors_file": str(storage.absolute(vectors)), "model": cfg.model,
        "perspectives": list(task.perspectives), "steer_mode": mode, "coeff": float(shown["coeff"]),
        "keep_error": cfg.keep_error, "steer_decode": cfg.steer_decode, "from_position": cfg.from_position,
        "decoding_mode": (win or {}).get("decoding") or "dvd", "alpha": task.alpha, "tau": cfg.pd_tau,
        "top_k": cfg.pd_top_k, "dtype": cfg.dtype,
    }  # fmt: skip
    if mode == "sae" and saes and shown["sae"] in saes:
        fields["sae"] = str(storage.absolute(saes[shown["sae"]]))
    notes = [f"pluristeer recommend for task {task.name!r} (train split only; see recommend.md)."]
    if win is None:
        fields["coeff"] = 0.0
        notes += [
            "Nothing beat zero-shot at the family-wise 95% level: coefficient 0 serves the unsteered model.",
            f"The best-ranked steering was {shown['candidate']!r}; set coeff to {shown['coeff']:g} to try it.",
        ]
    elif win["coeff"] is None:
        fields["coeff"] = 0.0
        how = "k solved examples in the prompt" if win["method"] == "few-shot" else "persona prompts combined by PD"
        notes += [
            f"The recommendation is {win['candidate']!r} ({how}): no steering, so coefficient 0 (unsteered).",
            "Serving does not build those prompts: send them in the request.",
        ]
    else:
        notes.append(f"Recommended: {win['candidate']!r} (Δ {win['gain']:+.3f} in {LABELS[win['metric']]} gain).")
        if win["method"] == "pd+steer":
            notes.append("Ask for PD with `perspectives` and `decoding` in the request (default mode set below).")
    notes.append(f"Start: PLURISTEER_API_KEYS=<key> pluristeer serve -c serve-{task.name}.yaml")
    return fields, notes


# -- the run ----------------------------------------------------------------------------------------------
def run_recommend(cfg: EvalConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Rank the candidates per task on held-out training records and write the recommendation (module
    docstring); returns what ``recommend.json`` holds."""
    started = time.perf_counter()
    git = git_commit()
    cfg = dataclasses.replace(cfg, work_dir=cfg.work / "recommend")
    saes = sae_catalog(cfg)
    layers = sorted({*(e.layer for e in saes), *cfg.sweep_layers, *([cfg.layer] if cfg.layer is not None else [])})
    if not layers:
        raise ConfigError("recommend needs a layer: an SAE (sae_8x, sae_32x, sweep_saes), sweep_layers or layer")
    resolved = [resolve_task(cfg, name) for name in cfg.tasks]
    tasks = [holdout_task(cfg, task, cfg.sweep_limit) for task in resolved]
    train = {task.name: task.records("train") for task in resolved}
    for t in tasks:
        echo(f"recommend: {t.name}: {len(t.records)} held-out training records {t.sizes}; "
             f"vectors from {len(t.vector_pool)} others")  # fmt: skip
    engine = Engine(cfg, echo=echo)

    def at(layer: int) -> list[Candidate]:  # the unsteered candidates run once, with the first layer
        return candidates(cfg, layer, saes, unsteered=layer == layers[0])

    if cfg.dry_run:
        plan = dry_run(engine, tasks, layers, lambda layer: [c.condition for c in at(layer)], "recommend")
        return {"layers": layers, "planned_tokens": plan}
    paths = {e.label: e.path for e in saes}
    found: dict[str, list[tuple[Candidate, dict[str, Any]]]] = {t.name: [] for t in tasks}
    stats: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        cands = at(layer)
        result = engine.run(tasks, {t.name: [c.condition for c in cands] for t in tasks}, layer, paths, cfg.work)
        stats[f"L{layer}"] = {k: round(v, 1) if isinstance(v, float) else v for k, v in result.stats.items()}
        for t in tasks:
            found[t.name] += [(c, result.outputs) for c in cands if i == 0 or c.name != BASELINE]
    report: dict[str, Any] = {
        "git": git, "config": cfg.to_dict(), "layers": layers, "saes": {e.label: str(e.path) for e in saes},
        "coeffs": list(cfg.sweep_coeffs), "family_level": FAMILY_LEVEL, "tasks": {},
    }  # fmt: skip
    for t in tasks:
        rows = rank(cfg, t, found[t.name])
        win = winner_of(rows)
        best_steered = next((r for r in rows if r["coeff"] is not None), None)
        entry: dict[str, Any] = {
            "kind": t.kind, "metric": PRIMARY[t.kind], "held_out": t.sizes, "vector_records": len(t.vector_pool),
            "candidates": len(rows) - 1, "winner": None if win is None else win["candidate"],
            "beats_zero_shot": win is not None, "few_records": min(t.sizes.values()) < FEW_RECORDS, "ranking": rows,
        }  # fmt: skip
        served = win if win is not None and win["coeff"] is not None else best_steered
        if served is not None:
            vectors = final_vectors(cfg, engine, t, train[t.name], served, paths)
            fields, notes = serve_settings(cfg, t, win, best_steered, vectors, paths)
            text = "".join(f"# {line}\n" for line in notes) + yaml.safe_dump(fields, sort_keys=False)
            entry["serve_config"] = str(storage.write_text(storage.join(cfg.out, f"serve-{t.name}.yaml"), text))
            entry["vectors_file"] = str(vectors)
        report["tasks"][t.name] = entry
        echo(summary_line(t.name, rows, win))
        if entry["few_records"]:
            echo(f"recommend: {t.name}: warning: fewer than {FEW_RECORDS} held-out records per perspective "
                 f"({t.sizes}): the intervals are rough; bring more records")  # fmt: skip
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["engine"] = stats
    storage.write_json(storage.join(cfg.out, "recommend.json"), report)
    written = storage.write_text(storage.join(cfg.out, "recommend.md"), markdown(cfg, report))
    echo(f"recommend: wrote {storage.display(written)} in {report['seconds'] / 60:.1f} min")
    return report


def final_vectors(
    cfg: EvalConfig,
    engine: Engine,
    task: TaskData,
    train: list[PerspectiveRecord],
    served: dict[str, Any],
    saes: dict[str, Path],
) -> storage.Location:
    """The served candidate's VectorSet rebuilt from ``train`` (every training record of the task), in
    ``cfg.out``; ``saes``: the SAE directories by label."""
    label = "caa" if served["method"] == "caa" else served["sae"]
    key = f"{label}-{served['granularity']}"
    whole = dataclasses.replace(task, vector_pool=train)
    built = engine.derive_vectors([whole], served["layer"], [key], saes, cfg.work / "final")
    name = f"{task.name}-{key.replace('@', '-')}-L{served['layer']}.safetensors"
    return built.sets[f"{task.name}/{key}"].save(storage.join(cfg.out, name))


def summary_line(task: str, rows: list[dict[str, Any]], win: dict[str, Any] | None) -> str:
    top = rows[0]
    if win is None:
        return (f"recommend: {task}: nothing beats zero-shot significantly over {len(rows) - 1} candidates "
                f"(best {top['candidate']!r}, Δ {top['gain']:+.3f} [{top['gain_lo']:+.3f}, {top['gain_hi']:+.3f}]); "
                "recommended: the unsteered model")  # fmt: skip
    return (f"recommend: {task}: {win['candidate']!r} (Δ {win['gain']:+.3f} [{win['gain_lo']:+.3f}, "
            f"{win['gain_hi']:+.3f}], family-wise lower bound {win['gain_family_lo']:+.3f})")  # fmt: skip


def markdown(cfg: EvalConfig, report: dict[str, Any]) -> str:
    level = f"{FAMILY_LEVEL:.0%}"
    lines = [
        "# Recommendation (train split only)",
        "",
        f"Model `{cfg.model}`; layers {report['layers']}; SAEs {json.dumps(report['saes'])}; coefficients "
        f"{report['coeffs']}; git `{report['git']['commit']}`; {report['seconds'] / 60:.1f} min.",
        "Vectors and few-shot examples come from one part of each task's training records, the scores from "
        "another; the test split is not read. Δ: the paired difference to zero-shot on the same records, as a "
        "gain (larger is better; for JSD, lower JSD is a positive gain), with its 95% bootstrap interval. A "
        f"candidate is recommended only when its Δ interval at the family-wise {level} level (Bonferroni over "
        "the candidates compared) lies above zero.",
    ]
    for task, entry in report["tasks"].items():
        metric = LABELS[entry["metric"]]
        lines += ["", f"## {task} ({entry['kind']}; {metric})", ""]
        if entry["winner"] is None:
            lines.append(f"**Nothing beats zero-shot significantly** over {entry['candidates']} candidates: "
                         "the recommendation is the unsteered model.")  # fmt: skip
        else:
            lines.append(f"**Recommended: `{entry['winner']}`.**")
        if "serve_config" in entry:
            lines.append(f"Serve it: `PLURISTEER_API_KEYS=<key> pluristeer serve -c {entry['serve_config']}`.")
        if entry["few_records"]:
            lines.append(f"⚠ Fewer than {FEW_RECORDS} held-out records per perspective: the intervals are rough "
                         "(a percentile bootstrap on so few records under-covers); bring more records.")  # fmt: skip
        lines += [
            "",
            f"Held-out records per perspective: {json.dumps(entry['held_out'])}; vectors from "
            f"{entry['vector_records']} records. ✓: recommended; coverage ✗: the options' probability mass fell "
            f"below {MIN_COVERAGE:g}× zero-shot's, so it is not recommended whatever its Δ.",
            "",
            f"| rank | candidate | {metric} [95%] | Δ gain vs zero-shot [95%] | family-wise lower bound | coverage |",
            "|---|---|---|---|---|---|",
        ]
        for r in entry["ranking"]:
            base = r["candidate"] == BASELINE
            mark = " **✓**" if r["recommended"] else ("" if r["covered"] else " (coverage ✗)")
            gain = "—" if base else fmt(r["gain"], r["gain_lo"], r["gain_hi"], True)
            family = "—" if base else f"{r['gain_family_lo']:+.3f}"
            lines.append(f"| {r['rank']} | {r['candidate']}{mark} | {fmt(r['value'], r['lo'], r['hi'])} | {gain} | "
                         f"{family} | {r['coverage']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


__all__ = ["Candidate", "candidates", "rank", "run_recommend", "serve_settings", "winner_of"]
