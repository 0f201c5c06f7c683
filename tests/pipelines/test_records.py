from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.records import DataError, PerspectiveRecord, read_jsonl, write_jsonl

GOOD = [
    {
        "id": "a",
        "kind": "classify",
        "text": "Is this hateful?",
        "options": ["No", "Yes"],
        "perspective": "US",
        "label": "Yes",
        "feedback": "It targets a group.",
    },
    {
        "id": 2,
        "kind": "distribution",
        "text": "Q?",
        "options": ["A", "B", "C"],
        "perspective": "Peru",
        "distribution": [0.2, 0.3, 0.5],
        "meta": {"source": "survey"},
    },
]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = list(read_jsonl(_write(tmp_path / "in.jsonl", GOOD)))
    assert records[0].label == 1 and records[0].answer == "Yes"
    assert records[1].id == "2" and records[1].answer == "C"
    write_jsonl(tmp_path / "out.jsonl", records)
    again = list(read_jsonl(tmp_path / "out.jsonl"))
    assert [r.to_dict() for r in again] == [r.to_dict() for r in records]
    assert list(read_jsonl(tmp_path / "out.jsonl"))[1].meta == {"source": "survey"}


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({**GOOD[0], "kind": "rank"}, "kind", "must be one of"),
        ({**{k: v for k, v in GOOD[0].items() if k != "kind"}, "task": "rank"}, "task", "must be one of"),
        ({**GOOD[1], "meta": {"split": "dev"}}, "meta", "split must be one of"),
        ({**GOOD[0], "label": "Maybe"}, "label", "must be an option or an index"),
        ({**GOOD[0], "label": 2}, "label", "must be an option or an index"),
        ({**GOOD[0], "options": ["Yes"]}, "options", "at least 2"),
        ({**GOOD[1], "distribution": [0.5, 0.5]}, "distribution", "3 probabilities"),
        ({**GOOD[1], "distribution": [0.5, 0.5, 0.5]}, "distribution", "must sum to 1"),
        ({**GOOD[1], "distribution": [-0.5, 0.5, 1.0]}, "distribution", "non-negative"),
        ({k: v for k, v in GOOD[0].items() if k != "text"}, "text", "is required"),
        ({**GOOD[0], "feedback": 3}, "feedback", "must be a string"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path: Path, row: dict, field: str, problem: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [GOOD[1], row])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: field '{field}': .*{problem}"):
        list(read_jsonl(path))


def test_the_older_field_name_task_is_read_as_kind(tmp_path: Path) -> None:
    old = {("task" if k == "kind" else k): v for k, v in GOOD[0].items()}
    (record,) = read_jsonl(_write(tmp_path / "old.jsonl", [old]))
    assert record.kind == "classify" and record.to_dict()["kind"] == "classify"


def test_invalid_json_duplicates_and_unknown_fields(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not valid JSON"):
        list(read_jsonl(_write(tmp_path / "bad.jsonl", ["{oops"])))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'id': duplicate"):
        list(read_jsonl(_write(tmp_path / "bad.jsonl", [GOOD[0], GOOD[0]])))
    with pytest.raises(DataError, match=r"bad\.jsonl:1: unknown field\(s\) \['colour'\]"):
        list(read_jsonl(_write(tmp_path / "bad.jsonl", [{**GOOD[0], "colour": "red"}])))
    with pytest.raises(DataError, match="no such file"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_record_answer_for_distribution() -> None:
    r = PerspectiveRecord(
        id="x", kind="distribution", text="t", options=("a", "b"), perspective="p", distribution=(0.4, 0.6)
    )
    assert r.answer == "b"
