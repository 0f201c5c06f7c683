"""Loaders: each data set in the data directory -> perspective records, with the seeded splits of DESIGN §5.

The data directory is an argument, the ``PLURISTEER_DATA`` environment variable, or ``../shared/data`` beside
the checkout (:data:`DEFAULT_DATA`). Loaders:

- ``globalopinionqa``: one distribution record per (question, country); 200 items (seed 42) train.
- ``crehate``: one classify record per (post, annotator country); the authors' train/valid/test split.
- ``mislc``: one classify record per claim (no/yes/unsure), perspective = legal annotator, feedback =
  the legal rationale; stratified seeded split.
- ``crowd_truthfulness``: one classify record per worker judgment (6 levels), perspective = the worker's
  political view, feedback = the written justification; split by statement. :func:`aggregate` turns
  judgments into per-(statement, view) distribution records.

The task registry (:mod:`pipelines.tasks`) names these loaders' tasks; a perspective JSONL is a task there too.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pipelines.records import RANK, DataError, PerspectiveRecord, record_from_dict

DATA_ENV = "PLURISTEER_DATA"
Split = Literal["train", "valid", "test", "all"]
SPLITS: tuple[str, ...] = ("train", "valid", "test", "all")
SEED = 42

CREHATE_COUNTRIES = {
    "United_States": "United States",
    "Australia": "Australia",
    "United_Kingdom": "United Kingdom",
    "South_Africa": "South Africa",
    "Singapore": "Singapore",
}
YES_NO = ("No", "Yes")
MISLC_OPTIONS = ("No", "Yes", "Unsure")  # reference LABEL_MAPPINGS['mislc'] = {no: 0, yes: 1, unsure: 2}
TRUTH_LEVELS = ("pants-on-fire", "false", "mostly-false", "half-true", "mostly-true", "true")


# The default data directory: ../shared/data beside the repository checkout (as the README says).
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_dir(path: str | Path | None = None, *, flag: str | None = None) -> Path:
    """The data directory: ``path`` if given, else ``$PLURISTEER_DATA``, else :data:`DEFAULT_DATA`
    (``../shared/data`` beside the checkout); it must exist. ``flag`` names the calling stage's own option
    for the error message (e.g. ``--set corpus=DIR``)."""
    how = f"set {DATA_ENV}=/path/to/data" + (f" or pass {flag}" if flag else " (data and demo: --data-dir)")
    if path is not None:
        chosen, origin = Path(path), "--data-dir"
    elif os.environ.get(DATA_ENV):
        chosen, origin = Path(os.environ[DATA_ENV]), DATA_ENV
    else:
        chosen, origin = DEFAULT_DATA, "the default, ../shared/data beside the checkout"
    root = chosen.expanduser()
    if not root.is_dir():
        raise DataError(f"no data directory: {root} ({origin}) does not exist; {how}")
    return root


def _need(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise DataError(f"{path}: missing; is {root} the pluristeer data directory?")
    return path


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield ``("file:line", row)``; checks the header has ``required`` columns."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {missing}")
        for row in reader:
            yield f"{path}:{reader.line_num}", row


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise DataError(f"split must be one of {allowed}, got {split!r}")


def _split_ids(keys: list[str], train: int | float, seed: int, strata: dict[str, str] | None = None) -> list[str]:
    """Seeded choice of training keys: ``train`` items (int) or a fraction, stratified when given; in the order
    they were drawn."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(set(keys)):
        groups[strata[key] if strata else ""].append(key)
    rng = random.Random(seed)
    chosen: list[str] = []
    total = sum(len(g) for g in groups.values())
    for name in sorted(groups):
        group = groups[name]
        share = train if isinstance(train, float) else train / total
        chosen.extend(rng.sample(group, round(share * len(group))))
    return chosen


def _pick(records: list[PerspectiveRecord], key: Callable[[PerspectiveRecord], str], train_keys: set[str], split: str):
    if split == "all":
        return records
    return [r for r in records if (key(r) in train_keys) == (split == "train")]


def load_globalopinionqa(root: Path, split: Split = "all", *, train_size: int = 200, seed: int = SEED):
    """5,752 (question, country) items; ``train`` = ``train_size`` items sampled with ``seed`` (the
    reference samples 200 items as its steering pool), ``test`` = the rest."""
    _check_split(split, ("train", "test", "all"))
    path = _need(root, "globalopinionqa/distributional_test_globalopinionqa_small.json")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of items")
    records = []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object")
        for name in ("question", "options", "attribute", "gold_distribution", "id"):
            if name not in item:
                raise DataError(f"{where}: field {name!r}: is required")
        row = {
            "id": item["id"],
            "kind": "distribution",
            "text": item["question"],
            "options": item["options"],
            "perspective": item["attribute"],
            "distribution": item["gold_distribution"],
        }
        records.append(record_from_dict(row, where=where))
    # the draw order of the training items is the reference's: its vectors use the first 50 of the 200
    order = _split_ids([r.id for r in records], train_size, seed)
    rank = {key: i for i, key in enumerate(order)}
    records = [replace(r, meta={**r.meta, RANK: rank[r.id]}) if r.id in rank else r for r in records]
    return _pick(records, lambda r: r.id, set(order), split)


def load_crehate(root: Path, split: Split = "all"):
    """CREHate: 1,580 posts × 5 annotator countries; the authors' split 1,106 / 237 / 237 posts."""
    _check_split(split, SPLITS)
    name = "CREHate_final_annotations.csv" if split == "all" else f"CREHate_{split}.csv"
    path = _need(root, f"crehate/{name}")
    columns = tuple(f"{c}_Hate" for c in CREHATE_COUNTRIES)
    records = []
    for where, row in _csv_rows(path, ("ID", "Text", *columns)):
        for code, country in CREHATE_COUNTRIES.items():
            raw = row[f"{code}_Hate"]
            try:
                label = int(float(raw))
            except ValueError:
                raise DataError(f"{where}: field '{code}_Hate': expected 0 or 1, got {raw!r}") from None
            record = {
                "id": f"{row['ID']}:{code}",
                "kind": "classify",
                "text": row["Text"],
                "options": list(YES_NO),
                "perspective": country,
                "label": label,
                "meta": {"post_id": row["ID"]},
            }
            records.append(record_from_dict(record, where=where))
    return records


def load_mislc(root: Path, split: Split = "all", *, train_fraction: float = 0.3, seed: int = SEED):
    """MisLC: 670 claims, 669 with a legal label (one has none and is skipped); labels no/yes/unsure;
    perspective = the legal annotator; feedback = the annotator's legal rationale where given.
    ``train`` = ``train_fraction`` of claims, stratified by label, seeded."""
    _check_split(split, ("train", "test", "all"))
    path = _need(root, "mislc/mislc_670.csv")
    index = {o.lower(): i for i, o in enumerate(MISLC_OPTIONS)}
    records = []
    for where, row in _csv_rows(path, ("id", "claim", "legal_label", "legal_annotator_id", "comments")):
        raw = row["legal_label"].strip().lower()
        if not raw:
            continue  # one claim carries no legal label
        if raw not in index:
            raise DataError(f"{where}: field 'legal_label': expected one of {sorted(index)}, got {raw!r}")
        record = {
            "id": row["id"],
            "kind": "classify",
            "text": row["claim"].strip(),
            "options": list(MISLC_OPTIONS),
            "perspective": f"annotator-{row['legal_annotator_id']}",
            "label": index[raw],
            "feedback": row["comments"].strip() or None,
            "meta": {"legal_issues": row.get("legal_issues", ""), "category": row.get("category", "")},
        }
        records.append(record_from_dict(record, where=where))
    strata = {r.id: str(r.label) for r in records}
    train_keys = set(_split_ids(list(strata), train_fraction, seed, strata))
    return _pick(records, lambda r: r.id, train_keys, split)


def load_crowd_truthfulness(
    root: Path, split: Split = "all", *, train_fraction: float = 0.3, seed: int = SEED, include_gold: bool = False
):
    """Worker judgments of statements' truthfulness on PolitiFact's 6 levels.

    CIKM 2020 (COVID-19): 800 judgments, 600 without the 2 gold-check statements; SIGIR 2020
    (PolitiFact + ABC): 2,189, 1,791 without gold questions. Gold checks are dropped unless
    ``include_gold``. Split by statement: ``train_fraction`` of statements, seeded.
    """
    _check_split(split, ("train", "test", "all"))
    records = []
    cikm = _need(root, "crowd_truthfulness/CIKM2020_covid_S6.csv")
    cikm_cols = ("unit_id", "doc_name", "doc_statement", "q_0_political_views_answer", "doc_truthfulness_value")
    for where, row in _csv_rows(cikm, (*cikm_cols, "doc_truthfulness_justification")):
        gold = row["doc_name"] in ("HIGH", "LOW")
        if gold and not include_gold:
            continue
        statement = f"cikm:{row['doc_name']}" if not gold else f"cikm:{row['doc_name']}:{row['doc_statement']}"
        records.append(
            _judgment(
                where,
                row["unit_id"],
                statement,
                row["doc_statement"],
                row["q_0_political_views_answer"],
                row["doc_truthfulness_value"],
                row["doc_truthfulness_justification"],
                "cikm2020",
                gold,
            )
        )
    sigir = _need(root, "crowd_truthfulness/SIGIR2020_politifact_abc_S6.csv")
    for where, row in _csv_rows(
        sigir, ("unit_id", "statement_id", "statement", "S6_political_views", "S6_truth_level", "source")
    ):
        gold = row["source"] == "gold_question"
        if gold and not include_gold:
            continue
        records.append(
            _judgment(
                where,
                row["unit_id"],
                f"sigir:{row['statement_id']}",
                row["statement"],
                row["S6_political_views"],
                row["S6_truth_level"],
                "",
                "sigir2020",
                gold,
            )
        )
    statements = sorted({r.meta["statement_id"] for r in records})
    train_keys = set(_split_ids(statements, train_fraction, seed))
    return _pick(records, lambda r: r.meta["statement_id"], train_keys, split)


def _judgment(where, worker, statement_id, text, view, level, justification, source, gold) -> PerspectiveRecord:
    try:
        label = int(float(level))
    except ValueError:
        raise DataError(f"{where}: field 'truth level': expected 0..5, got {level!r}") from None
    if not view.strip():
        raise DataError(f"{where}: field 'political views': is required")
    return record_from_dict(
        {
            "id": f"{statement_id}:{worker}",
            "kind": "classify",
            "text": text.strip(),
            "options": list(TRUTH_LEVELS),
            "perspective": view.strip(),
            "label": label,
            "feedback": justification.strip() or None,
            "meta": {"statement_id": statement_id, "worker": worker, "source": source, "gold": gold},
        },
        where=where,
    )


def aggregate(judgments: list[PerspectiveRecord], *, key: str = "statement_id") -> list[PerspectiveRecord]:
    """Per-(statement, perspective) distribution records from classify judgments (crowd truthfulness).

    ``meta`` keeps the number of judgments and their feedback texts.
    """
    groups: dict[tuple[str, str], list[PerspectiveRecord]] = defaultdict(list)
    for r in judgments:
        if r.label is None:
            raise DataError(f"record {r.id}: aggregate needs classify records with a label")
        groups[(r.meta[key], r.perspective)].append(r)
    out = []
    for (sid, view), rows in sorted(groups.items()):
        counts = [0.0] * len(rows[0].options)
        for r in rows:
            counts[r.label] += 1  # type: ignore[index]
        out.append(
            PerspectiveRecord(
                id=f"{sid}|{view}",
                kind="distribution",
                text=rows[0].text,
                options=rows[0].options,
                perspective=view,
                distribution=tuple(c / len(rows) for c in counts),
                meta={key: sid, "n": len(rows), "feedback": [r.feedback for r in rows if r.feedback]},
            )
        )
    return out


def load_definitions(root: Path) -> dict[str, str]:
    """The 11 legal and platform hate-speech definitions, ``{term: text}`` (prompt context)."""
    path = _need(root, "legal_hatespeech_definitions/definitions.csv")
    out = {}
    for where, row in _csv_rows(path, ("term", "text")):
        if not row["term"].strip() or not row["text"].strip():
            raise DataError(f"{where}: field 'term'/'text': must be non-empty")
        out[row["term"].strip()] = row["text"].strip()
    return out


def load_protected_groups(root: Path) -> list[str]:
    path = _need(root, "legal_hatespeech_definitions/protected_groups.csv")
    return [row["protected_group"].strip() for _, row in _csv_rows(path, ("protected_group",))]


def perspectives(records: list[PerspectiveRecord]) -> dict[str, int]:
    """``{perspective: number of records}``, most frequent first."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[r.perspective] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
