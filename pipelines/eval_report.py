"""Evaluation outputs: the per-task Markdown tables, the paper's findings checked with paired intervals, plots.

Rows (one per condition × task × perspective, plus ``all``) carry each metric as ``{name}``,
``{name}_lo``, ``{name}_hi`` and, against zero-shot on the same records, ``{name}_delta`` (+ ``_lo``/``_hi``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.metrics import LOWER_IS_BETTER, metric_names
from sae import storage

PRIMARY = {"classify": "macro_f1", "distribution": "jsd"}
LABELS = {
    "macro_f1": "macro-F1",
    "micro_f1": "micro-F1",
    "fpr": "FPR",
    "precision_1": "P(1)",
    "recall_1": "R(1)",
    "f1_1": "F1(1)",
    "jsd": "JSD",
    "top1_macro_f1": "top-1 macro-F1",
    "top1_micro_f1": "top-1 micro-F1",
    "top1_fpr": "top-1 FPR",
}


@dataclass(frozen=True)
class Claim:
    """One of the paper's findings, as a paired comparison ``a − b`` of ``metric`` on the tasks."""

    text: str
    a: str
    b: str
    metric: str  # "primary": macro-F1 (classification) or JSD (distributions)
    tasks: tuple[str, ...] = ()  # empty: every task


CLAIMS: tuple[Claim, ...] = (
    Claim("SAE steering (~50 samples) beats zero-shot prompting", "steer-8x-fine", "zero-shot", "primary"),
    Claim("SAE steering beats few-shot prompting", "steer-8x-fine", "few-shot", "primary"),
    Claim(
        "fine-grained vectors beat coarse-grained (legal and opinion tasks)",
        "steer-8x-fine",
        "steer-8x-coarse",
        "primary",
    ),
    Claim("the 8x SAE beats the 32x SAE in macro-F1", "steer-8x-fine", "steer-32x-fine", "macro_f1"),
    Claim("the 8x SAE beats the 32x SAE in micro-F1", "steer-8x-fine", "steer-32x-fine", "micro_f1"),
    Claim("steering lowers the false-positive rate", "steer-8x-fine", "zero-shot", "fpr", ("crehate", "mislc")),
    Claim(
        "steering + PD (dvd) lowers the false-positive rate", "pd-dvd+steer", "zero-shot", "fpr", ("crehate", "mislc")
    ),
    Claim(
        "PD (dvd) without steering lowers the false-positive rate", "pd-dvd", "zero-shot", "fpr", ("crehate", "mislc")
    ),
    Claim(
        "steering lowers the JS distance on GlobalOpinionQA", "steer-8x-fine", "zero-shot", "jsd", ("globalopinionqa",)
    ),
    Claim(
        "steering with the reference's pooled vector lowers the JS distance on GlobalOpinionQA",
        "steer-8x-pooled",
        "zero-shot",
        "jsd",
        ("globalopinionqa",),
    ),
    Claim(
        "steering + PD (dvd) lowers the JS distance on GlobalOpinionQA",
        "pd-dvd+steer",
        "zero-shot",
        "jsd",
        ("globalopinionqa",),
    ),
    Claim(
        "PD (dvd) without steering lowers the JS distance on GlobalOpinionQA",
        "pd-dvd",
        "zero-shot",
        "jsd",
        ("globalopinionqa",),
    ),
)


def verdict(delta: float, lo: float, hi: float, metric: str) -> str:
    """Whether a paired difference ``a − b`` goes the paper's way (``a`` better), with its 95% interval."""
    better = -delta if metric in LOWER_IS_BETTER else delta
    if delta != delta:  # NaN
        return "undefined"
    significant = lo > 0 or hi < 0
    if better > 0:
        return "reproduced" if significant else "same direction, not significant"
    if better < 0:
        return "opposite, significant" if significant else "opposite direction, not significant"
    return "no difference"


def fmt(value: float, lo: float | None = None, hi: float | None = None, signed: bool = False) -> str:
    if value != value:
        return "–"
    s = f"{value:+.3f}" if signed else f"{value:.3f}"
    if lo is None or hi is None or lo != lo:
        return s
    return f"{s} [{lo:+.3f}, {hi:+.3f}]" if signed else f"{s} [{lo:.3f}, {hi:.3f}]"


def task_table(task: str, kind: str, rows: Sequence[dict[str, Any]], conditions: Sequence[str]) -> str:
    """The Markdown table of one task (pooled over perspectives): each metric with its 95% interval, and
    the primary metric's paired difference to zero-shot."""
    by_condition = {r["condition"]: r for r in rows if r["task"] == task and r["perspective"] == "all"}
    metrics = metric_names(kind)
    primary = PRIMARY[kind]
    head = ["condition", "n", *[LABELS[m] for m in metrics], f"Δ{LABELS[primary]} vs zero-shot", "coverage"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in conditions:
        r = by_condition.get(c)
        if r is None:
            continue
        cells = [c, str(r["n"])]
        cells += [fmt(r[m], r[f"{m}_lo"], r[f"{m}_hi"]) for m in metrics]
        d = f"{primary}_delta"
        cells.append("" if c == "zero-shot" else fmt(r[d], r[f"{d}_lo"], r[f"{d}_hi"], signed=True))
        cells.append(f"{r['coverage']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def perspective_table(task: str, kind: str, rows: Sequence[dict[str, Any]], conditions: Sequence[str]) -> str:
    """The primary metric per perspective (columns) and condition (rows), point estimates."""
    primary = PRIMARY[kind]
    mine = [r for r in rows if r["task"] == task and r["perspective"] != "all"]
    perspectives = list(dict.fromkeys(r["perspective"] for r in mine))
    value = {(r["condition"], r["perspective"]): r[primary] for r in mine}
    head = ["condition", *perspectives]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in conditions:
        if (c, perspectives[0] if perspectives else "") not in value:
            continue
        lines.append("| " + " | ".join([c, *[fmt(value.get((c, p), float("nan"))) for p in perspectives]]) + " |")
    return "\n".join(lines)


def findings(comparisons: Sequence[dict[str, Any]]) -> str:
    """The paper's claims as a Markdown table of paired differences with verdicts."""
    head = ["finding", "task", "metric", "a − b", "Δ [95% CI]", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in comparisons:
        lines.append(
            "| " + " | ".join([
                c["claim"], c["task"], LABELS[c["metric"]], f"{c['a']} − {c['b']}",
                fmt(c["delta"], c["delta_lo"], c["delta_hi"], signed=True), c["verdict"],
            ]) + " |"
        )  # fmt: skip
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: storage.Location) -> storage.Location:
    """Write ``fig`` as a PNG at ``path`` (a local path or a URI) whole, then close it."""
    fig.tight_layout()
    try:
        return storage.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_conditions(
    task: str, kind: str, rows: Sequence[dict[str, Any]], conditions: Sequence[str], path: storage.Location
) -> storage.Location:
    """Bars of the primary metric (and FPR for classification) per condition with 95% intervals."""
    plt = _pyplot()
    pooled = {r["condition"]: r for r in rows if r["task"] == task and r["perspective"] == "all"}
    names = [c for c in conditions if c in pooled]
    metrics = [PRIMARY[kind]] + (["fpr"] if kind == "classify" else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        vals = [pooled[c][m] for c in names]
        err = [
            [max(pooled[c][m] - pooled[c][f"{m}_lo"], 0) for c in names],
            [max(pooled[c][f"{m}_hi"] - pooled[c][m], 0) for c in names],
        ]
        colors = ["#888888" if c in ("zero-shot", "few-shot") else "#3b75af" if "pd" not in c else "#e07b39"
                  for c in names]  # fmt: skip
        ax.bar(range(len(names)), vals, yerr=err, capsize=3, color=colors)
        if "zero-shot" in pooled:
            ax.axhline(pooled["zero-shot"][m], color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        direction = "lower is better" if m in LOWER_IS_BETTER else "higher is better"
        ax.set_title(f"{task}: {LABELS[m]} ({direction}), 95% bootstrap CI", fontsize=9)
    return _save(plt, fig, path)


def plot_perspectives(
    task: str, kind: str, rows: Sequence[dict[str, Any]], conditions: Sequence[str], path: storage.Location
) -> storage.Location:
    """The primary metric per perspective (e.g. per-country JSD) for a few conditions, with 95% intervals."""
    plt = _pyplot()
    m = PRIMARY[kind]
    mine = [r for r in rows if r["task"] == task and r["perspective"] != "all"]
    perspectives = list(dict.fromkeys(r["perspective"] for r in mine))
    index = {(r["condition"], r["perspective"]): r for r in mine}
    shown = [c for c in conditions if any((c, p) in index for p in perspectives)]
    width = 0.8 / max(len(shown), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(perspectives) * max(len(shown), 1) / 2), 4.5))
    for k, c in enumerate(shown):
        xs = [i + k * width for i in range(len(perspectives))]
        rs = [index.get((c, p)) for p in perspectives]
        vals = [r[m] if r else float("nan") for r in rs]
        err = [
            [max(r[m] - r[f"{m}_lo"], 0) if r else 0 for r in rs],
            [max(r[f"{m}_hi"] - r[m], 0) if r else 0 for r in rs],
        ]
        ax.bar(xs, vals, width=width, yerr=err, capsize=2, label=c)
    ax.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(perspectives))], perspectives,
                  rotation=45, ha="right", fontsize=8)  # fmt: skip
    direction = "lower is better" if m in LOWER_IS_BETTER else "higher is better"
    ax.set_title(f"{task}: {LABELS[m]} per perspective ({direction}), 95% bootstrap CI", fontsize=9)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


__all__ = ["CLAIMS", "PRIMARY", "Claim", "findings", "perspective_table", "plot_conditions", "plot_perspectives",
           "task_table", "verdict"]  # fmt: skip
