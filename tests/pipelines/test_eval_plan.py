"""Evaluation planning without a model: subsets, conditions, units (shared rows, PD per item)."""

from __future__ import annotations

from collections import Counter

import pytest

from common.config import ConfigError
from pipelines.eval_plan import (
    ALL_CONDITIONS,
    REFERENCE_FROM_POSITION,
    Switches,
    Unit,
    make_conditions,
    plan_units,
    subsample,
)
from pipelines.evaluate import EvalConfig, load_task
from pipelines.records import DataError, item_key
from pipelines.tasks import BUNDLED


@pytest.fixture(scope="module")
def tokenizer():
    from sae.lm import load_tokenizer

    return load_tokenizer("embedded")


def _cfg(**kw) -> EvalConfig:
    return EvalConfig.from_dict({"limit": 3, "max_perspectives": 3, **kw})


def test_subsample_is_seeded_stratified_and_keeps_whole_items(data_root) -> None:
    test = BUNDLED["crehate"].records("test", data_root)
    chosen = ["Australia", "Singapore", "United States"]
    a = subsample(test, chosen, 7, seed=1)
    assert a == subsample(test, chosen, 7, seed=1) and a != subsample(test, chosen, 7, seed=2)
    assert Counter(r.perspective for r in a) == {p: 7 for p in chosen}
    posts = Counter(item_key(r) for r in a)
    assert set(posts.values()) == {3}  # every CREHate post keeps all its evaluated countries
    assert len(subsample(test, chosen, 0, seed=1)) == 3 * 237


def test_conditions_and_their_reference_switches() -> None:
    conds = {c.name: c for c in make_conditions(ALL_CONDITIONS, Switches(coeff=2.0, caa_coeff=5.0))}
    assert len(conds) == 16
    assert conds["steer-32x-coarse"].steer.vectors == "32x-coarse" and conds["steer-32x-coarse"].steer.coeff == 2.0
    assert conds["caa-fine"].steer.mode == "caa" and conds["caa-fine"].steer.coeff == 5.0
    assert conds["residual-8x-fine"].steer.mode == "residual"
    ref = conds["ref-steer-8x-fine"].steer
    assert (ref.keep_error, ref.steer_decode, ref.from_position) == (False, False, REFERENCE_FROM_POSITION)
    assert conds["ref-pd-dvd+steer"].reference_entropy and not conds["pd-dvd+steer"].reference_entropy
    assert conds["pd-cad"].pd_rows == "prompt" and conds["pd-cad+steer"].pd_rows == "steer"
    with pytest.raises(DataError, match="unknown condition"):
        make_conditions(["zero-shot", "steer-16x-fine"], Switches())


def test_units_share_prompts_and_answer_pd_once_per_item(tokenizer, data_root) -> None:
    cfg = _cfg()
    task = load_task(cfg, "crehate")
    conds = cfg.condition_objects("crehate")
    units = plan_units(task, conds, tokenizer, items_per_unit=100)
    assert len(units) == 1
    unit = Unit.from_json(units[0].to_json())
    assert unit == units[0]
    n_posts = len({item_key(r) for r in task.records})
    # per post: the persona prompts of its 3 countries (zero-shot = the PD persona rows), 3 few-shot prompts,
    # and one neutral prompt for PD
    assert len(unit.prompts) == n_posts * 7
    ids = [o["id"] for o in unit.outputs]
    assert len(ids) == len(set(ids))
    per_record = [c for c in conds if c.pd is None]
    assert len(ids) == len(task.records) * len(per_record) + n_posts * (len(conds) - len(per_record))
    steered = Counter(s for _, s, _ in unit.rows if s is not None)
    assert len(steered) == 7  # 4 SAE sets + residual + caa + the reference switches
    pd = next(o for o in unit.outputs if "|pd-dvd+steer|" in o["id"])
    assert len(pd["rows"]) == 3 and pd["decoding"]["mode"] == "dvd" and pd["base"] is not None
    assert all(unit.rows[r][2] in task.pd_set for r in pd["rows"])


def test_tasks_without_a_persona_use_each_perspectives_shots_for_unsteered_pd(tokenizer) -> None:
    cfg = _cfg(conditions=["zero-shot", "pd-mean"])
    task = load_task(cfg, "mislc")
    unit = plan_units(task, cfg.condition_objects("mislc"), tokenizer, items_per_unit=100)[0]
    pd = next(o for o in unit.outputs if "|pd-mean|" in o["id"])
    texts = [unit.prompts[unit.rows[r][0]] for r in pd["rows"]]
    assert len(set(texts)) == 3 and all(t.count("<|im_start|>user") == 4 for t in texts)  # 3 shots + question


def test_crowd_truthfulness_is_scored_as_per_view_distributions(tokenizer) -> None:
    task = load_task(_cfg(), "crowd_truthfulness")
    assert task.kind == "distribution" and all(r.distribution is not None for r in task.records)
    assert all(len(r.options) == 6 for r in task.records) and task.pd_set == task.perspectives


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="tasks: .nope. is neither a bundled task"):
        EvalConfig.load(None, ["tasks=crehate,nope"])
    with pytest.raises(ConfigError, match="conditions: must include 'zero-shot'"):
        EvalConfig.load(None, ["conditions=few-shot"])
    with pytest.raises(ConfigError, match="work_dir: s3://b/w must be a local directory"):
        EvalConfig.load(None, ["out=s3://b/results", "work_dir=s3://b/w?access_key=secret"])
    assert EvalConfig.load(None, ["out=s3://b/results"]).out == "s3://b/results"  # kept whole, not a Path
    cfg = EvalConfig.load(None, ["sae_8x=/x"])
    with pytest.raises(ConfigError, match=r"sae_32x: not set, but conditions \['steer-32x-coarse'"):
        cfg.check_saes(cfg.condition_objects("mislc"))
