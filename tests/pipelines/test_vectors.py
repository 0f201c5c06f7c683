"""Vector derivation on the embedded model with the TEST FIXTURE SAE (tests/sae_fixture.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from common.config import ConfigError
from pipelines.datasets import load_globalopinionqa
from pipelines.prompts import build_prompt
from pipelines.tasks import BUNDLED, PROMPTS
from pipelines.vectors import (
    VectorConfig,
    config_pairs,
    derive_fine,
    feedback_pairs,
    pooled_samples,
    select_samples,
    vector_sets,
)
from sae.decoding import Decoding, last_logits, plural_next_token
from sae.lm import model_name
from sae.readout import label_token_ids, option_probs
from sae.vectors import pool
from sae.vectorset import VectorSet, VectorSetMeta, sae_fingerprint

ANNOTATORS = 3
SAMPLES = 20
HELD_OUT = 10


@pytest.fixture(scope="module")
def mislc(embedded, embedded_sae, data_root):
    """MisLC vectors of the 3 annotators with most training samples (20 pairs each), fine and coarse."""
    model, tok = embedded
    cfg = VectorConfig(
        sae=embedded_sae.path, task="mislc", samples=SAMPLES, max_perspectives=ANNOTATORS, publish=False, track=False
    )
    samples = select_samples(
        BUNDLED["mislc"].records("train", data_root), PROMPTS["mislc"], samples=SAMPLES, seed=cfg.seed,
        max_perspectives=ANNOTATORS,
    )  # fmt: skip
    pairs = feedback_pairs(cfg, tok, samples, PROMPTS["mislc"])
    assert pairs == config_pairs(cfg, tok)  # the config's own path gives the same pairs
    readouts = derive_fine(cfg, model, tok, embedded_sae.sae, embedded_sae.layer, pairs)
    sets = vector_sets(cfg, readouts, model=model_name(model), layer=15, sae=embedded_sae.sae, extra={})
    return cfg, samples, pairs, readouts, sets


def test_pairs_are_drawn_per_perspective_with_rationales_first(mislc) -> None:
    _, samples, pairs, readouts, _ = mislc
    assert len(samples) == ANNOTATORS and all(len(v) <= SAMPLES for v in samples.values())
    assert readouts.counts == {p: len(v) for p, v in samples.items()}
    for records in samples.values():
        kinds = [r.feedback is not None for r in records]
        assert kinds == sorted(kinds, reverse=True)  # every record with a rationale comes before any without
    assert {x.source for x in pairs} == {"rationale", "answer"}
    assert readouts.prompts <= 2 * len(pairs) and readouts.skipped == 0


def test_coarse_equals_the_sample_weighted_mean_of_fine(mislc) -> None:
    _, _, _, readouts, sets = mislc
    counts = readouts.counts
    weighted = sum(readouts.fine[p] * n for p, n in counts.items()) / sum(counts.values())
    for p in counts:
        torch.testing.assert_close(sets["coarse"][p], weighted, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sets["fine"][p], readouts.fine[p])
    torch.testing.assert_close(pool(readouts.fine, counts), weighted, atol=1e-6, rtol=1e-5)
    assert sets["coarse"].meta.granularity == "coarse" and sets["coarse"].meta.n_samples == counts


def _label_probs(model, tok, texts, vector_set=None, perspective=None, sae=None, coeff=2.0):
    ids = label_token_ids(tok, ("No", "Yes", "Unsure"))
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        if vector_set is None:
            logits = last_logits(model, **batch).logits[:, -1]
        else:
            with vector_set.steer(model, perspective, sae=sae, coeff=coeff):
                logits = last_logits(model, **batch).logits[:, -1]
    return option_probs(logits, ids)[0]


def test_mislc_vectors_raise_the_annotators_majority_label_on_held_out_claims(
    mislc, embedded, embedded_sae, data_root
) -> None:
    """Stated direction: every chosen annotator labels most training claims "No" (no misinformation), and
    steering held-out claims with their fine vector (c = 2) raises P("No") on average, by > 0.02."""
    _, samples, _, _, sets = mislc
    model, tok = embedded
    test = BUNDLED["mislc"].records("test", data_root)
    shifts = []
    for p, records in samples.items():
        assert sum(r.label == 0 for r in records) > len(records) / 2  # "No" is this annotator's majority label
        held_out = [r for r in test if r.perspective == p][:HELD_OUT]
        texts = [build_prompt(tok, PROMPTS["mislc"], r).text for r in held_out]
        base = _label_probs(model, tok, texts)
        steered = _label_probs(model, tok, texts, sets["fine"], p, embedded_sae.sae)
        shifts.append(steered[:, 0] - base[:, 0])
    shift = torch.cat(shifts)
    assert shift.mean() > 0.02, f"mean change of P(No) {shift.mean():+.3f}"
    assert sum(s.mean() > 0 for s in shifts) >= ANNOTATORS - 1  # and for (almost) every annotator


def test_zero_vectors_in_every_mode_leave_the_embedded_model_unchanged(embedded, embedded_sae, data_root) -> None:
    model, tok = embedded
    records = BUNDLED["mislc"].records("test", data_root)[:2]
    batch = tok([build_prompt(tok, PROMPTS["mislc"], r).text for r in records], return_tensors="pt", padding=True)
    with torch.inference_mode():
        base = last_logits(model, **batch).logits[:, -1].float()
    for mode, dim in (("sae", embedded_sae.sae.d_sae), ("residual", embedded_sae.sae.d_sae), ("caa", 576)):
        meta = VectorSetMeta(
            model=model_name(model), layer=15, mode=mode, granularity="fine", task="mislc",
            n_samples={"a": 1, "b": 1}, readout="last", dim=dim,
            sae_fingerprint=None if mode == "caa" else sae_fingerprint(embedded_sae.sae),
        )  # fmt: skip
        zero = VectorSet({"a": torch.zeros(dim), "b": torch.zeros(dim)}, meta)
        with torch.inference_mode(), zero.steer(model, ["a", "b"], sae=embedded_sae.sae, coeff=8.0):
            steered = last_logits(model, **batch).logits[:, -1].float()
        torch.testing.assert_close(steered, base, atol=2e-3, rtol=1e-4)
        if mode != "sae":
            continue
        for decoding in ("mean", "cad", "dvd"):  # the fused pluralistic path, through the SAE
            combined = plural_next_token(
                model, batch["input_ids"], batch["attention_mask"], zero, ["a", "b"], Decoding(decoding),
                embedded_sae.sae, coeff=8.0,
            )  # fmt: skip
            torch.testing.assert_close(combined, base.log_softmax(-1), atol=2e-3, rtol=1e-4)


def test_config_validation_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sae: an SAE directory is required"):
        VectorConfig.load(None, ["mode=sae"])
    with pytest.raises(ConfigError, match="granularity: must be one of"):
        VectorConfig.load(None, ["mode=caa", "granularity=medium"])
    cfg = VectorConfig.load(None, ["mode=caa", "task=crehate", "perspectives=Singapore,Australia", "topk=16"])
    assert cfg.perspectives == ["Singapore", "Australia"] and cfg.set_name("fine") == "crehate-caa-fine"


def test_pooled_sampling_follows_the_reference_rule_for_globalopinionqa(data_root: Path) -> None:
    """The reference's GlobalOpinionQA vector: the first 50 of the 200 training items in the order the seeded
    draw (random.Random(42).sample over the sorted item ids) picked them, pooled over countries, each with one
    answer sampled from its own country's distribution."""
    every = load_globalopinionqa(data_root)
    order = random.Random(42).sample(sorted(r.id for r in every), 200)
    train = load_globalopinionqa(data_root, "train")
    assert {r.id for r in train} == set(order)
    shuffled = list(reversed(train))  # the input order must not matter
    picked = pooled_samples(shuffled, samples=50, seed=42)
    assert [r.id for r in picked] == order[:50]
    assert len({r.perspective for r in picked}) > 5  # pooled over countries, not one country's items
    by_id = {r.id: r for r in train}
    for r in picked:
        dist = by_id[r.id].distribution
        assert r.label is not None and r.distribution is None and dist[r.label] > 0  # one sampled answer
    assert [r.label for r in pooled_samples(train, samples=50, seed=42)] == [r.label for r in picked]  # seeded
    labels = [r.label for r in pooled_samples(train, samples=50, seed=7)]
    assert labels != [r.label for r in picked]  # sampled, not the mode: another seed answers differently
    modes = [by_id[r.id].options.index(by_id[r.id].answer) for r in picked]
    assert [r.label for r in picked] != modes
