"""The task registry: bundled tasks, any JSONL file as a task, its split rule, prompt templates, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from common.config import ConfigError
from pipelines.eval_config import EvalConfig
from pipelines.prompts import build_prompt
from pipelines.records import DataError, item_key
from pipelines.tasks import BUNDLED, assign_splits, get_task, jsonl_task
from pipelines.vectors import VectorConfig
from sae.lm import load_tokenizer


def user_rows(perspectives=("north", "south", "east"), n: int = 10, kind: str = "classify") -> list[dict]:
    rows = []
    for p in perspectives:
        for i in range(n):
            row = {"id": f"{p}-{i}", "kind": kind, "text": f"Statement {i} as seen from the {p}.",
                   "options": ["agree", "disagree"], "perspective": p}  # fmt: skip
            if kind == "classify":
                row["label"] = "agree" if (i + len(p)) % 2 else "disagree"
            else:
                row["distribution"] = [0.7, 0.3] if i % 2 else [0.2, 0.8]
            rows.append(row)
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bundled_tasks_are_registry_entries() -> None:
    assert set(BUNDLED) == {"globalopinionqa", "crehate", "mislc", "crowd_truthfulness"}
    assert BUNDLED["mislc"].alpha == 0.1 and BUNDLED["crehate"].alpha == 0.2
    assert BUNDLED["crowd_truthfulness"].kind == "distribution" and BUNDLED["crowd_truthfulness"].aggregate
    assert BUNDLED["crehate"].splits == ("train", "valid", "test")
    assert get_task("crehate") is BUNDLED["crehate"]


def test_a_jsonl_file_is_a_task_named_by_its_stem(tmp_path: Path) -> None:
    task = get_task(str(write(tmp_path / "my-views.jsonl", user_rows())))
    assert task.name == "my-views" and task.kind == "classify" and task.source.endswith("my-views.jsonl")
    train, test = task.records("train"), task.records("test")
    assert len(train) + len(test) == 30 and not {r.id for r in train} & {r.id for r in test}
    assert Counter(r.perspective for r in test) == {"north": 3, "south": 3, "east": 3}  # 30% of each
    assert task.split_rule["counts"]["test"] == {"east": 3, "north": 3, "south": 3}
    again = get_task(str(tmp_path / "my-views.jsonl"))
    assert [r.id for r in again.records("test")] == [r.id for r in test]  # seeded
    other = get_task(str(tmp_path / "my-views.jsonl"), seed=7)
    assert [r.id for r in other.records("test")] != [r.id for r in test]


def test_meta_split_is_honoured_and_the_rest_is_split_by_the_rule(tmp_path: Path) -> None:
    rows = user_rows()
    for r in rows[:4]:
        r["meta"] = {"split": "test"}
    rows[4]["meta"] = {"split": "valid"}
    task = jsonl_task(write(tmp_path / "u.jsonl", rows))
    test_ids = {r.id for r in task.records("test")}
    assert {r["id"] for r in rows[:4]} <= test_ids
    assert [r.id for r in task.records("valid")] == [rows[4]["id"]]
    assert task.splits == ("train", "valid", "test") and task.split_rule["given_by_meta"] == 5
    given = [r | {"meta": {"split": "test" if i % 3 == 0 else "train"}} for i, r in enumerate(rows)]
    task = jsonl_task(write(tmp_path / "all.jsonl", given))
    assert task.split_rule["rule"] == "meta.split" and len(task.records("test")) == 10


def test_items_shared_by_perspectives_stay_in_one_split() -> None:
    from pipelines.records import record_from_dict

    rows = [{"id": f"{p}-{i}", "kind": "classify", "text": f"item {i}", "options": ["a", "b"], "perspective": p,
             "label": i % 2} for p in ("x", "y") for i in range(20)]  # fmt: skip
    records = [record_from_dict(r, where="t") for r in rows]
    splits = assign_splits(records, 0.3, seed=1)
    by_item: dict[str, set[str]] = {}
    for r in records:
        by_item.setdefault(item_key(r), set()).add(splits[r.id])
    assert all(len(s) == 1 for s in by_item.values())
    assert Counter(splits[r.id] for r in records if r.perspective == "x")["test"] == 6


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rows: rows[:2] + [r for r in rows if r["perspective"] != "north"], r"perspective\(s\) 'north' \(1\)"),
        (lambda rows: [r | {"meta": {"split": "train"}} for r in rows], "the test split is empty"),
        (lambda rows: [*rows[:1], rows[1] | {"label": "maybe"}, *rows[2:]], r"u\.jsonl:2: field 'label'"),
        (
            lambda rows: [*rows[:-1], {**rows[-1], "kind": "distribution", "distribution": [0.5, 0.5]}],
            "field 'kind': 'distribution', but the file's first record is 'classify'",
        ),
    ],
)
def test_bad_user_data_gets_an_error_naming_file_and_field(tmp_path: Path, mutate, message: str) -> None:
    path = write(tmp_path / "u.jsonl", mutate(user_rows()))
    with pytest.raises(DataError, match=message):
        get_task(str(path))


def test_a_distribution_that_does_not_sum_to_one_names_its_line(tmp_path: Path) -> None:
    rows = user_rows(kind="distribution")
    rows[5]["distribution"] = [0.7, 0.7]
    with pytest.raises(DataError, match=r"u\.jsonl:6: field 'distribution': must sum to 1"):
        get_task(str(write(tmp_path / "u.jsonl", rows)))


def test_task_names_and_templates_are_checked_in_the_config(tmp_path: Path) -> None:
    path = write(tmp_path / "mine.jsonl", user_rows())
    with pytest.raises(ConfigError, match="tasks: 'nope' is neither a bundled task"):
        EvalConfig.from_dict({"tasks": ["nope"]})
    with pytest.raises(ConfigError, match="no such .jsonl file"):
        EvalConfig.from_dict({"tasks": [str(tmp_path / "missing.jsonl")]})
    with pytest.raises(ConfigError, match=r"templates\.mine\.question: the template has no placeholder \{options\}"):
        EvalConfig.from_dict({"tasks": [str(path)], "templates": {"mine": {"question": "Q: {text}"}}})
    with pytest.raises(ConfigError, match=r"templates\.mine\.feedback: unknown placeholder \{why\}"):
        EvalConfig.from_dict({"tasks": [str(path)], "templates": {"mine": {"feedback": "{feedback} {why}"}}})
    with pytest.raises(ConfigError, match="templates: 'crehate' is a bundled task"):
        EvalConfig.from_dict({"tasks": ["crehate"], "templates": {"crehate": {"question": "{text} {options}"}}})
    with pytest.raises(ConfigError, match="test_fraction: must be in"):
        EvalConfig.from_dict({"tasks": [str(path)], "test_fraction": 1.0})
    with pytest.raises(ConfigError, match="pd_alpha_mislc: renamed to task_alphas"):
        EvalConfig.from_dict({"pd_alpha_mislc": 0.1})
    with pytest.raises(ConfigError, match="data: renamed to task"):
        VectorConfig.from_dict({"mode": "caa", "data": "crehate"})
    cfg = EvalConfig.from_dict({"tasks": [str(path), "mislc"], "task_coeffs": {"mine": 2.0}})
    assert cfg.task_names == ["mine", "mislc"]


def test_generic_and_templated_prompts(tmp_path: Path) -> None:
    tok = load_tokenizer("embedded")
    path = write(tmp_path / "mine.jsonl", user_rows())
    record = get_task(str(path)).records("train")[0]
    generic = build_prompt(tok, get_task(str(path)).prompt, record, "with-feedback", feedback="because")
    assert "A. agree\nB. disagree" in generic.text and "Thinking: because" in generic.text
    assert generic.labels == ("A", "B") and record.perspective in generic.text
    templates = {"mine": {"question": "Claim: {text}\nChoose: {options}", "feedback": "Reason: {feedback}",
                          "persona": "You speak for the {perspective}."}}  # fmt: skip
    task = get_task(str(path), templates=templates)
    p = build_prompt(tok, task.prompt, record, "with-feedback", feedback="because")
    assert f"Claim: {record.text}\nChoose: A. agree" in p.text and "Reason: because" in p.text
    assert f"You speak for the {record.perspective}." in p.text
