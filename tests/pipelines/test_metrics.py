"""Metrics against hand-computed examples, and the bootstrap's seeding, strata and pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from pipelines.metrics import NO_LABEL, Outcomes, confusion, from_confusion, js_distance, resample_indices, summarize


def test_classification_metrics_match_a_hand_computed_example() -> None:
    # gold:  1 1 1 0 0 0 0 2      pred: 1 1 0 1 0 0 2 2
    gold = np.array([1, 1, 1, 0, 0, 0, 0, 2])
    pred = np.array([1, 1, 0, 1, 0, 0, 2, 2])
    m = {k: float(v) for k, v in from_confusion(confusion(gold, pred, 3)).items()}
    # class 0: tp 2, fp 1, fn 2 -> F1 4/7; class 1: tp 2, fp 1, fn 1 -> 4/6; class 2: tp 1, fp 1, fn 0 -> 2/3
    assert m["macro_f1"] == pytest.approx((4 / 7 + 2 / 3 + 2 / 3) / 3)
    assert m["micro_f1"] == pytest.approx(5 / 8)
    assert m["precision_1"] == pytest.approx(2 / 3)
    assert m["recall_1"] == pytest.approx(2 / 3)
    assert m["f1_1"] == pytest.approx(2 / 3)
    # one-vs-rest for class 1: negatives are the 5 records whose gold is not 1; one of them is predicted 1
    assert m["fpr"] == pytest.approx(1 / 5)


def test_top1_metrics_count_a_non_label_answer_as_wrong_and_average_over_the_labels() -> None:
    """gold 1 1 0 0 0, top-1 1 - 1 0 - (- spells no label): class 0 tp 1, fn 2, fp 0 -> F1 2/4; class 1 tp 1,
    fn 1, fp 1 -> F1 2/4; the no-label column is not averaged; micro 2/5; FPR(1) 1 of 3 negatives."""
    gold = np.array([1, 1, 0, 0, 0])
    o = Outcomes(gold, gold.copy(), 2, top1=np.array([1, NO_LABEL, 1, 0, NO_LABEL]))
    v = {k: float(x) for k, x in o.values().items()}
    assert v["top1_macro_f1"] == pytest.approx(0.5)
    assert v["top1_micro_f1"] == pytest.approx(2 / 5)
    assert v["top1_fpr"] == pytest.approx(1 / 3)
    assert v["macro_f1"] == 1.0  # the label-mass readout (pred) is scored separately
    boot = o.values(resample_indices(["a"] * 5, 50, 0))
    assert boot["top1_micro_f1"].shape == (50,)
    assert set(np.round(boot["top1_micro_f1"] * 5).tolist()) <= {0, 1, 2, 3, 4, 5}  # k of 5 right each time
    assert math.isnan(float(Outcomes(gold, gold, 2).values()["top1_macro_f1"]))  # no top-1 readout recorded
    assert float(o.subset(np.array([0, 3])).values()["top1_micro_f1"]) == 1.0


def test_macro_f1_averages_only_the_classes_that_occur() -> None:
    """sklearn's semantics: a class absent from both gold and predictions is not averaged (3 options, 2 seen)."""
    gold, pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    m = from_confusion(confusion(gold, pred, 3))
    assert float(m["macro_f1"]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert float(from_confusion(confusion(np.array([0, 0]), np.array([0, 0]), 2))["fpr"]) == 0.0
    assert math.isnan(float(from_confusion(confusion(np.array([1, 1]), np.array([1, 0]), 2))["fpr"]))


def test_js_distance_uses_the_natural_log_as_scipy_does() -> None:
    assert js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(math.sqrt(math.log(2)))
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = (KL(p||m) + KL(q||m)) / 2
    kl_p = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_q = math.log(1 / 0.75)
    assert js_distance(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(math.sqrt((kl_p + kl_q) / 2))
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(5), 20), rng.dirichlet(np.ones(5), 20)
    np.testing.assert_allclose(js_distance(p, q), [jensenshannon(a, b) for a, b in zip(p, q, strict=True)], atol=1e-12)


def test_resamples_are_seeded_and_keep_each_stratum_inside_itself() -> None:
    strata = ["a"] * 3 + ["b"] * 5
    idx = resample_indices(strata, 50, seed=7)
    np.testing.assert_array_equal(idx, resample_indices(strata, 50, seed=7))
    assert not np.array_equal(idx, resample_indices(strata, 50, seed=8))
    assert set(idx[:, :3].ravel()) <= {0, 1, 2} and set(idx[:, 3:].ravel()) <= {3, 4, 5, 6, 7}


def test_resampled_values_equal_the_metric_of_each_resample() -> None:
    rng = np.random.default_rng(1)
    gold, pred = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    o = Outcomes(gold, pred, 3)
    idx = resample_indices(["x"] * 40, 5, seed=0)
    boot = o.values(idx)
    for b in range(5):
        one = Outcomes(gold[idx[b]], pred[idx[b]], 3).values()
        for k in one:
            assert boot[k][b] == pytest.approx(float(one[k]), nan_ok=True)


def test_summary_intervals_and_paired_differences() -> None:
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 2, 200)
    better = np.where(rng.random(200) < 0.9, gold, 1 - gold)  # 90% right
    worse = np.where(rng.random(200) < 0.6, gold, 1 - gold)  # 60% right
    strata = ["p", "q"] * 100
    s = summarize(Outcomes(gold, better, 2), strata, baseline=Outcomes(gold, worse, 2), n_resamples=1000, seed=0)
    v, d = s["micro_f1"]["value"], s["micro_f1"]["delta"]
    assert v.lo <= v.value <= v.hi and v.hi - v.lo < 0.15
    assert d.value == pytest.approx(float(np.mean(better == gold) - np.mean(worse == gold)))
    assert d.lo > 0  # the better classifier is significantly better
    same = summarize(Outcomes(gold, worse, 2), strata, baseline=Outcomes(gold, worse, 2), n_resamples=200, seed=0)
    assert same["macro_f1"]["delta"].lo == same["macro_f1"]["delta"].hi == 0.0
    jsd = summarize(Outcomes(gold, worse, 2, jsd=np.linspace(0, 1, 200)), strata, n_resamples=200, seed=0)
    assert jsd["jsd"]["value"].value == pytest.approx(0.5) and "delta" not in jsd["jsd"]
