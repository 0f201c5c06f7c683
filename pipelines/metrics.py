"""Evaluation metrics (DESIGN §5) and seeded bootstrap intervals, in numpy.

Classification (CREHate, MisLC): macro- and micro-F1 (sklearn's semantics: the macro average runs over the
classes present in the gold labels or the predictions; ``zero_division=0``), precision / recall / F1 of the
positive class (index 1: hate, misinformation) and its false-positive rate, ``FP / (FP + TN)`` one-vs-rest.
The reference code's readout for classification is reported beside it (``top1_*``): the single most likely
next token mapped to the label it spells (its first token, as :func:`sae.readout.label_token_ids` gives them);
a top-1 token that spells no label is a wrong answer of no class (it counts against the gold class's recall
and against micro-F1, and the macro average runs over the task's labels only).
Distributions (GlobalOpinionQA, crowd truthfulness): the Jensen–Shannon *distance* between the gold and
the predicted option distributions with the natural log (``scipy.spatial.distance.jensenshannon``'s
default), plus macro-/micro-F1 of the majority label (the argmax of each).

Intervals: percentile bootstrap over records, resampled with replacement within strata (perspectives), so
every resample keeps each perspective's size; the same resample indices give paired differences between
two conditions evaluated on the same records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sae.readout import NO_LABEL

TOP1_METRICS: tuple[str, ...] = ("top1_macro_f1", "top1_micro_f1", "top1_fpr")
CLASSIFY_METRICS: tuple[str, ...] = ("macro_f1", "micro_f1", "fpr", "precision_1", "recall_1", "f1_1", *TOP1_METRICS)
DISTRIBUTION_METRICS: tuple[str, ...] = ("jsd", "macro_f1", "micro_f1")
LOWER_IS_BETTER: frozenset[str] = frozenset({"jsd", "fpr", "top1_fpr"})


def metric_names(kind: str) -> tuple[str, ...]:
    """The metrics reported for a task of kind ``classify`` or ``distribution``."""
    if kind not in ("classify", "distribution"):
        raise ValueError(f"kind must be 'classify' or 'distribution', got {kind!r}")
    return CLASSIFY_METRICS if kind == "classify" else DISTRIBUTION_METRICS


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen–Shannon distance with the natural log, as ``scipy.spatial.distance.jensenshannon``
    computes it (inputs are normalised to sum to 1; zeros are fine)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"distributions differ in shape: {p.shape} vs {q.shape}")
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * np.log(a / b), 0.0)
        return terms.sum(-1)

    return np.sqrt(np.maximum((kl(p, m) + kl(q, m)) / 2, 0.0))


def confusion(gold: np.ndarray, pred: np.ndarray, n_classes: int, idx: np.ndarray | None = None) -> np.ndarray:
    """Confusion counts ``[.., gold, pred]``; with resample indices ``idx [B, n]`` one matrix per resample."""
    gold = np.asarray(gold, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if gold.shape != pred.shape:
        raise ValueError(f"{gold.shape[0]} gold labels but {pred.shape[0]} predictions")
    if gold.size and (min(gold.min(), pred.min()) < 0 or max(gold.max(), pred.max()) >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    codes = gold * n_classes + pred
    cells = n_classes * n_classes
    if idx is None:
        return np.bincount(codes, minlength=cells).reshape(n_classes, n_classes)
    b = idx.shape[0]
    flat = (codes[idx] + np.arange(b)[:, None] * cells).ravel()
    return np.bincount(flat, minlength=b * cells).reshape(b, n_classes, n_classes)


def _div(a: np.ndarray, b: np.ndarray, empty: float = 0.0) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), empty)


def from_confusion(conf: np.ndarray, positive: int = 1, n_labels: int | None = None) -> dict[str, np.ndarray]:
    """Macro/micro-F1 and the positive class's precision, recall, F1 and false-positive rate from confusion
    matrices ``[.., n, n]`` (gold rows, predicted columns). An undefined FPR (no negatives) is NaN.
    ``n_labels``: the macro average runs over the first ``n_labels`` classes only (the rest are "no label")."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    gold_n = conf.sum(-1)
    pred_n = conf.sum(-2)
    f1 = _div(2 * tp, gold_n + pred_n)
    present = (gold_n + pred_n) > 0
    if n_labels is not None:
        present = present & (np.arange(conf.shape[-1]) < n_labels)
    macro = _div((f1 * present).sum(-1), present.sum(-1).astype(np.float64))
    total = conf.sum((-2, -1))
    out = {"macro_f1": macro, "micro_f1": _div(tp.sum(-1), total)}
    if conf.shape[-1] > positive:
        tp1 = tp[..., positive]
        fp1 = pred_n[..., positive] - tp1
        negatives = total - gold_n[..., positive]
        out |= {
            "precision_1": _div(tp1, pred_n[..., positive]),
            "recall_1": _div(tp1, gold_n[..., positive]),
            "f1_1": f1[..., positive],
            "fpr": _div(fp1, negatives, empty=np.nan),
        }
    return out


@dataclass(frozen=True)
class Outcomes:
    """Per-record outcomes of one condition on one task: what the metrics are computed from."""

    gold: np.ndarray  # [n] gold label (classification) or gold majority option (distributions)
    pred: np.ndarray  # [n] predicted label / option (argmax of the read-out distribution)
    n_classes: int
    jsd: np.ndarray | None = None  # [n] per-record JS distance (distribution tasks)
    top1: np.ndarray | None = None  # [n] the label the top-1 token spells, NO_LABEL for none (classification)

    @property
    def kind(self) -> str:
        return "classify" if self.jsd is None else "distribution"

    def values(self, idx: np.ndarray | None = None, positive: int = 1) -> dict[str, np.ndarray]:
        """Every metric of :func:`metric_names` at the point (``idx=None``) or per resample (``idx [B, n]``)."""
        out = from_confusion(confusion(self.gold, self.pred, self.n_classes, idx), positive)
        if self.jsd is not None:
            out["jsd"] = self.jsd.mean() if idx is None else self.jsd[idx].mean(-1)
        if self.kind == "classify":
            out |= self._top1(idx, positive)
        return {k: np.asarray(out[k], dtype=np.float64) for k in metric_names(self.kind)}

    def _top1(self, idx: np.ndarray | None, positive: int) -> dict[str, np.ndarray]:
        """The ``top1_*`` metrics; NaN where the outputs carry no top-1 readout (units from older runs)."""
        if self.top1 is None:
            nan = np.full(() if idx is None else idx.shape[0], np.nan)
            return {m: nan for m in TOP1_METRICS}
        n = self.n_classes
        pred = np.where(self.top1 == NO_LABEL, n, self.top1)  # "no label" is an extra column
        conf = confusion(self.gold, pred, n + 1, idx)
        out = from_confusion(conf, positive, n_labels=n)
        return {"top1_macro_f1": out["macro_f1"], "top1_micro_f1": out["micro_f1"], "top1_fpr": out["fpr"]}

    def subset(self, idx: np.ndarray) -> Outcomes:
        """These outcomes on the records ``idx``."""
        return Outcomes(
            self.gold[idx], self.pred[idx], self.n_classes,
            None if self.jsd is None else self.jsd[idx], None if self.top1 is None else self.top1[idx],
        )  # fmt: skip


def resample_indices(strata: Sequence[str], n_resamples: int, seed: int) -> np.ndarray:
    """``[n_resamples, n]`` bootstrap indices, drawn with replacement within each stratum (seeded)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(list(strata))
    out = np.empty((n_resamples, len(labels)), dtype=np.int64)
    for value in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == value)
        out[:, members] = rng.choice(members, size=(n_resamples, len(members)), replace=True)
    return out


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float
    hi: float


def summarize(
    outcomes: Outcomes,
    strata: Sequence[str],
    *,
    baseline: Outcomes | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Estimate]]:
    """``{metric: {"value": Estimate, "delta": Estimate}}``: each metric with its bootstrap interval, and
    (with ``baseline``, the same records under another condition) the paired difference ``this − baseline``."""
    n = len(outcomes.gold)
    if len(strata) != n:
        raise ValueError(f"{len(strata)} strata labels for {n} records")
    if baseline is not None and len(baseline.gold) != n:
        raise ValueError("the baseline must hold the same records")
    idx = resample_indices(strata, n_resamples, seed)
    point, boot = outcomes.values(), outcomes.values(idx)
    out: dict[str, dict[str, Estimate]] = {}
    base_point = baseline.values() if baseline is not None else None
    base_boot = baseline.values(idx) if baseline is not None else None
    for name in metric_names(outcomes.kind):
        entry = {"value": Estimate(float(point[name]), *_interval(boot[name], level))}
        if base_point is not None and base_boot is not None:
            delta = float(point[name] - base_point[name])
            entry["delta"] = Estimate(delta, *_interval(boot[name] - base_boot[name], level))
        out[name] = entry
    return out


__all__ = [
    "CLASSIFY_METRICS",
    "DISTRIBUTION_METRICS",
    "LOWER_IS_BETTER",
    "NO_LABEL",
    "TOP1_METRICS",
    "Estimate",
    "Outcomes",
    "confusion",
    "from_confusion",
    "js_distance",
    "metric_names",
    "resample_indices",
    "summarize",
]
