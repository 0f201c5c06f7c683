from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines import datasets as ds
from pipelines.records import DataError
from pipelines.tasks import BUNDLED, get_task


def test_globalopinionqa_counts_and_split(data_root: Path) -> None:
    every = ds.load_globalopinionqa(data_root)
    train = ds.load_globalopinionqa(data_root, "train")
    test = ds.load_globalopinionqa(data_root, "test")
    assert len(every) == 5752
    assert len({r.text for r in every}) == 1270
    assert len(ds.perspectives(every)) == 130
    assert len(train) == 200 and len(test) == 5552
    assert not {r.id for r in train} & {r.id for r in test}
    assert [r.id for r in train] == [r.id for r in ds.load_globalopinionqa(data_root, "train")]  # seeded
    assert all(abs(sum(r.distribution or ()) - 1) < 1e-9 for r in every)
    assert {len(r.options) for r in every} == {2, 3, 4, 5}


def test_crehate_counts_follow_the_authors_split(data_root: Path) -> None:
    sizes = {split: len(ds.load_crehate(data_root, split)) for split in ("train", "valid", "test", "all")}
    assert sizes == {"train": 1106 * 5, "valid": 237 * 5, "test": 237 * 5, "all": 1580 * 5}
    test = ds.load_crehate(data_root, "test")
    assert set(ds.perspectives(test)) == set(ds.CREHATE_COUNTRIES.values())
    assert {r.label for r in test} == {0, 1}


def test_mislc_counts_labels_and_feedback(data_root: Path) -> None:
    every = ds.load_mislc(data_root)
    assert len(every) == 669  # 670 claims, one without a legal label
    labels = [r.options[r.label] for r in every if r.label is not None]
    assert (labels.count("No"), labels.count("Yes"), labels.count("Unsure")) == (468, 98, 103)
    assert len(ds.perspectives(every)) == 10
    assert sum(r.feedback is not None for r in every) >= 270
    train, test = ds.load_mislc(data_root, "train"), ds.load_mislc(data_root, "test")
    assert len(train) + len(test) == 669 and not {r.id for r in train} & {r.id for r in test}
    assert len(train) == pytest.approx(0.3 * 669, abs=2)


def test_crowd_truthfulness_counts_and_statement_split(data_root: Path) -> None:
    every = ds.load_crowd_truthfulness(data_root)
    assert len(every) == 600 + 1791
    assert len(ds.load_crowd_truthfulness(data_root, include_gold=True)) == 800 + 2189
    assert set(ds.perspectives(every)) == {"Liberal", "Very liberal", "Moderate", "Conservative", "Very conservative"}
    assert sum(r.feedback is not None for r in every) == 600  # only the CIKM study asked for justifications
    train, test = ds.load_crowd_truthfulness(data_root, "train"), ds.load_crowd_truthfulness(data_root, "test")
    assert len(train) + len(test) == len(every)
    assert not {r.meta["statement_id"] for r in train} & {r.meta["statement_id"] for r in test}


def test_aggregate_builds_per_view_distributions(data_root: Path) -> None:
    judgments = ds.load_crowd_truthfulness(data_root)
    dists = ds.aggregate(judgments)
    assert sum(r.meta["n"] for r in dists) == len(judgments)
    first = dists[0]
    rows = [
        j
        for j in judgments
        if j.meta["statement_id"] == first.meta["statement_id"] and j.perspective == first.perspective
    ]
    assert first.distribution is not None and abs(sum(first.distribution) - 1) < 1e-9
    assert first.distribution[rows[0].label] >= 1 / len(rows)  # type: ignore[index]


def test_definitions_and_protected_groups(data_root: Path) -> None:
    assert len(ds.load_definitions(data_root)) == 11
    assert len(ds.load_protected_groups(data_root)) == 23


def test_data_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, data_root: Path, tmp_path: Path) -> None:
    monkeypatch.setenv(ds.DATA_ENV, str(data_root))
    assert len(BUNDLED["crehate"].records("test")) == 1185
    monkeypatch.delenv(ds.DATA_ENV)
    assert Path(ds.__file__).resolve().parents[2] / "shared" / "data" == ds.DEFAULT_DATA  # ../shared/data
    monkeypatch.setattr(ds, "DEFAULT_DATA", data_root)
    assert ds.data_dir() == data_root  # the default, without the variable
    monkeypatch.setattr(ds, "DEFAULT_DATA", tmp_path / "nope")
    with pytest.raises(DataError, match="PLURISTEER_DATA") as info:
        BUNDLED["crehate"].records("test")
    assert "../shared/data" in str(info.value) and str(tmp_path / "nope") in str(info.value)
    with pytest.raises(DataError, match=r"--set corpus=DIR"):
        ds.data_dir(flag="--set corpus=DIR")
    with pytest.raises(DataError, match="neither a bundled task"):
        get_task("nope")


def _copy(data_root: Path, tmp_path: Path, sub: str) -> Path:
    shutil.copytree(data_root / sub, tmp_path / sub)
    for f in (tmp_path / sub).iterdir():
        f.chmod(0o644)
    return tmp_path / sub


def test_malformed_crehate_row_names_file_line_and_field(data_root: Path, tmp_path: Path) -> None:
    folder = _copy(data_root, tmp_path, "crehate")
    path = folder / "CREHate_test.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[3] = lines[3].replace("0.0", "maybe", 1) if "0.0" in lines[3] else lines[3].replace("1.0", "maybe", 1)
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"CREHate_test\.csv:4: field '\w+_Hate': expected 0 or 1"):
        ds.load_crehate(tmp_path, "test")


def test_malformed_mislc_label_is_rejected(data_root: Path, tmp_path: Path) -> None:
    folder = _copy(data_root, tmp_path, "mislc")
    path = folder / "mislc_670.csv"
    path.write_text(path.read_text(encoding="utf-8").replace(",yes,", ",perhaps,", 1), encoding="utf-8")
    with pytest.raises(DataError, match=r"mislc_670\.csv:\d+: field 'legal_label'"):
        ds.load_mislc(tmp_path)


def test_malformed_globalopinionqa_item_is_rejected(data_root: Path, tmp_path: Path) -> None:
    folder = _copy(data_root, tmp_path, "globalopinionqa")
    path = folder / "distributional_test_globalopinionqa_small.json"
    items = json.loads(path.read_text(encoding="utf-8"))
    items[0]["gold_distribution"][0] += 9
    path.write_text(json.dumps(items), encoding="utf-8")
    with pytest.raises(DataError, match=r"item 0: field 'distribution': must sum to 1"):
        ds.load_globalopinionqa(tmp_path)


def test_missing_column_is_reported(data_root: Path, tmp_path: Path) -> None:
    folder = _copy(data_root, tmp_path, "crowd_truthfulness")
    path = folder / "CIKM2020_covid_S6.csv"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("doc_truthfulness_value", "truth_value", 1), encoding="utf-8")
    with pytest.raises(DataError, match=r"CIKM2020_covid_S6\.csv:1: missing column\(s\) \['doc_truthfulness_value'\]"):
        ds.load_crowd_truthfulness(tmp_path)
