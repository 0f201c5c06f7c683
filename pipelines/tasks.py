"""The task registry: everything pluristeer knows about a task, in one record (DESIGN §2).

A **task** is what vectors are derived for and what is evaluated and recommended on: its records and their
split rule, the **kind** that is scored (``classify``: labels, macro-F1 and FPR; ``distribution``: option
distributions, JS distance), the prompt (:class:`pipelines.prompts.PromptSpec`: question, feedback, persona,
read-out as option letters or label words), the PD contrast weight α and an optional aggregation of the
records before scoring. A **data set** is the files a bundled task's loader reads (:mod:`pipelines.datasets`).

The four bundled tasks are entries of :data:`BUNDLED`; **any ``.jsonl`` file** of perspective records
(:mod:`pipelines.records`) is a task too, named by its file's stem (``tasks=[my.jsonl, crehate]``). A JSONL
task's split: a record's ``meta.split`` (``train``/``valid``/``test``) where given; the others are split by
:func:`assign_splits` (seeded, by item, stratified by perspective; ``test_fraction`` of each perspective's
records to test). ``vectors``, ``evaluate``, ``sweep`` and ``recommend`` all resolve tasks here, so the
vectors never see a test record.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from common.config import ConfigError
from pipelines.datasets import (
    aggregate,
    data_dir,
    load_crehate,
    load_crowd_truthfulness,
    load_definitions,
    load_globalopinionqa,
    load_mislc,
)
from pipelines.prompts import LETTERS, PromptSpec, generic_spec, letter_block
from pipelines.records import SPLITS, DataError, Kind, PerspectiveRecord, item_key, read_jsonl

MIN_TRAIN_RECORDS = 2  # per perspective: a vector (and a few-shot prompt) needs at least this many


@dataclass(frozen=True)
class Task:
    """One task (see the module docstring)."""

    name: str
    kind: Kind  # what is scored: classify (label per record) or distribution (option distribution)
    prompt: PromptSpec
    loader: Callable[..., list[PerspectiveRecord]] = field(repr=False)  # (split, data dir or None) -> records
    alpha: float = 0.2  # PD contrast weight (the reference: 0.2, 0.1 for misinformation)
    aggregate: Callable[[list[PerspectiveRecord]], list[PerspectiveRecord]] | None = field(default=None, repr=False)
    splits: tuple[str, ...] = ("train", "test")
    split_rule: dict[str, Any] = field(default_factory=dict)  # how the split was made (recorded in run.json)
    source: str = "bundled"  # "bundled", or the JSONL file
    context: str | None = None  # prompt context put before every question (CREHate: a legal definition)

    def records(self, split: str, data: str | Path | None = None) -> list[PerspectiveRecord]:
        """The task's records of ``split`` (``train``, ``valid``, ``test`` or ``all``), as loaded; ``data``: the
        data directory of a bundled task (default: ``$PLURISTEER_DATA``)."""
        if split != "all" and split not in self.splits:
            raise DataError(f"task {self.name!r} has no {split!r} split (it has {list(self.splits)})")
        return self.loader(split, data)

    def scored(self, records: list[PerspectiveRecord]) -> list[PerspectiveRecord]:
        """The records as they are scored (crowd truthfulness: judgments -> per-view distributions)."""
        return self.aggregate(records) if self.aggregate is not None else records

    @property
    def bundled(self) -> bool:
        return self.source == "bundled"


# -- the bundled tasks ----------------------------------------------------------------------------------
def _mislc_answer(r: PerspectiveRecord) -> str:
    return {
        "No": "This claim does not contain misinformation.",
        "Yes": "This claim contains misinformation.",
        "Unsure": "It is unclear whether this claim contains misinformation.",
    }.get(r.answer, f"The answer is {r.answer}.")


def _crehate_answer(r: PerspectiveRecord) -> str:
    verdict = "consider" if r.answer == "Yes" else "do not consider"
    return f"People from {r.perspective} {verdict} this post hate speech."


def _opinion_answer(r: PerspectiveRecord) -> str:
    dist = r.distribution or ()
    i = r.options.index(r.answer)
    share = f" ({100 * dist[i]:.0f}% of respondents)" if dist else ""
    return f'Most people in {r.perspective} answered "{LETTERS[i]}. {r.answer}"{share}.'


def _truth_answer(r: PerspectiveRecord) -> str:
    return f"I think this statement is {r.answer}."


def _gqa_question(r: PerspectiveRecord) -> str:
    # The data's text already holds "Question: ...\nOptions: A. ... \nAnswer:"; the answer prefix is ours.
    return re.sub(r"\s*Answer:\s*$", "", r.text.strip())


COUNTRY_PERSONA = "You are from the country of {perspective}."
PROMPTS: dict[str, PromptSpec] = {
    "mislc": PromptSpec(
        "mislc",
        lambda r: f"Claim: {r.text}\n\nDoes this claim contain misinformation? Answer Yes, No, or Unsure.",
        _mislc_answer,
    ),
    "crehate": PromptSpec(
        "crehate",
        lambda r: f"Post: {r.text}\n\nIs this post hate speech? Answer Yes or No.",
        _crehate_answer,
        persona=COUNTRY_PERSONA,
    ),
    "globalopinionqa": PromptSpec(
        "globalopinionqa",
        _gqa_question,
        _opinion_answer,
        persona=COUNTRY_PERSONA,
        feedback_tag="Passage",
        feedback_first=True,
        letters=True,
    ),
    "crowd_truthfulness": PromptSpec(
        "crowd_truthfulness",
        lambda r: f"Statement: {r.text}\n\nHow truthful is this statement?\n{letter_block(r.options)}",
        _truth_answer,
        persona="You describe your political views as {perspective}.",
        letters=True,
    ),
}


def _bundled_loader(
    load: Callable[..., list[PerspectiveRecord]], split: str, data: str | Path | None = None
) -> list[PerspectiveRecord]:
    return load(data_dir(data), split)


BUNDLED: dict[str, Task] = {
    "globalopinionqa": Task(
        "globalopinionqa",
        "distribution",
        PROMPTS["globalopinionqa"],
        partial(_bundled_loader, load_globalopinionqa),
        split_rule={"rule": "200 items train (seed 42), the rest test (the reference's split)"},
    ),
    "crehate": Task(
        "crehate",
        "classify",
        PROMPTS["crehate"],
        partial(_bundled_loader, load_crehate),
        splits=("train", "valid", "test"),
        split_rule={"rule": "the authors' train/valid/test split"},
    ),
    "mislc": Task(
        "mislc",
        "classify",
        PROMPTS["mislc"],
        partial(_bundled_loader, load_mislc),
        alpha=0.1,
        split_rule={"rule": "30% of claims train, stratified by label (seed 42)"},
    ),
    "crowd_truthfulness": Task(
        "crowd_truthfulness",
        "distribution",
        PROMPTS["crowd_truthfulness"],
        partial(_bundled_loader, load_crowd_truthfulness),
        aggregate=aggregate,
        split_rule={"rule": "30% of statements train (seed 42); judgments aggregated per (statement, view)"},
    ),
}


# -- any JSONL file ------------------------------------------------------------------------------------
def assign_splits(records: Sequence[PerspectiveRecord], test_fraction: float, seed: int) -> dict[str, str]:
    """``{record id: split}``: ``meta.split`` where a record gives one; the rest by item (the records of one
    text and option list stay together), seeded, so that about ``test_fraction`` of each perspective's
    records are in test. Perspectives with the fewest records are placed first."""
    out = {r.id: r.split for r in records if r.split is not None}
    items: dict[str, list[PerspectiveRecord]] = defaultdict(list)
    for r in records:
        items[item_key(r)].append(r)
    item_of = {r.id: item_key(r) for r in records}
    placed: dict[str, str] = {}  # item -> split, for items some record of which was given one
    for r in records:
        if r.id in out:
            placed.setdefault(item_of[r.id], out[r.id])
    by_perspective: dict[str, list[PerspectiveRecord]] = defaultdict(list)
    for r in records:
        by_perspective[r.perspective].append(r)
    rng = random.Random(f"{seed}:split")
    for p in sorted(by_perspective, key=lambda p: (len(by_perspective[p]), p)):
        mine = by_perspective[p]
        target = round(test_fraction * len(mine))
        in_test = sum(1 for r in mine if out.get(r.id, placed.get(item_of[r.id])) == "test")
        free = sorted({item_of[r.id] for r in mine if r.id not in out and item_of[r.id] not in placed})
        rng.shuffle(free)
        for key in free:
            n = sum(1 for r in items[key] if r.perspective == p)
            placed[key] = "test" if in_test < target else "train"
            in_test += n if placed[key] == "test" else 0
    for r in records:
        out.setdefault(r.id, placed.get(item_of[r.id], "train"))
    return out


def jsonl_task(
    path: str | Path, *, templates: dict[str, str] | None = None, test_fraction: float = 0.3, seed: int = 42
) -> Task:
    """The task of a perspective JSONL file (named by its stem): validated records, their split, the
    generic prompt of their kind (or the given templates). Raises :class:`DataError` naming the file (and
    record or perspective) for a file that is missing, mixes kinds, leaves a perspective with fewer than
    :data:`MIN_TRAIN_RECORDS` training records, or has no test record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task {str(path)!r}: no such .jsonl file")
    records = list(read_jsonl(path))
    if not records:
        raise DataError(f"{path}: no records")
    kind = records[0].kind
    odd = next((r for r in records if r.kind != kind), None)
    if odd is not None:
        raise DataError(
            f"{path}: record {odd.id!r}: field 'kind': {odd.kind!r}, but the file's first record is {kind!r} "
            "(one task has one kind: put the others in a file of their own)"
        )
    splits = assign_splits(records, test_fraction, seed)
    by_split: dict[str, list[PerspectiveRecord]] = defaultdict(list)
    for r in records:
        by_split[splits[r.id]].append(r)
    counts = {s: dict(sorted(Counter(r.perspective for r in by_split[s]).items())) for s in SPLITS if by_split[s]}
    train = counts.get("train", {})
    few = sorted(p for p in {r.perspective for r in records} if train.get(p, 0) < MIN_TRAIN_RECORDS)
    if few:
        shown = ", ".join(f"{p!r} ({train.get(p, 0)})" for p in few[:5])
        raise DataError(
            f"{path}: perspective(s) {shown} have fewer than {MIN_TRAIN_RECORDS} train records: add records, give "
            "them meta.split 'train', or lower test_fraction"
        )
    if not by_split["test"]:
        raise DataError(f"{path}: the test split is empty: give some records meta.split 'test' or raise test_fraction")
    given = sum(1 for r in records if r.split is not None)
    rule = {
        "rule": "meta.split" if given == len(records) else ("seeded by item, stratified by perspective"
                                                           + (" (meta.split where given)" if given else "")),
        "test_fraction": test_fraction, "seed": seed, "given_by_meta": given, "counts": counts,
    }  # fmt: skip
    present = tuple(s for s in SPLITS if by_split[s])
    return Task(
        name=path.stem, kind=kind, prompt=generic_spec(path.stem, kind, templates),
        loader=lambda split, _data=None: list(records) if split == "all" else list(by_split.get(split, [])),
        splits=present, split_rule=rule, source=str(path),
    )  # fmt: skip


def task_name(name: str) -> str:
    """The name a task goes by: a bundled task's own, a JSONL file's stem."""
    return Path(name).stem if name.endswith(".jsonl") else name


def get_task(
    name: str,
    *,
    templates: dict[str, dict[str, str]] | None = None,
    test_fraction: float = 0.3,
    seed: int = 42,
    definition: str | None = None,
) -> Task:
    """The task ``name``: a bundled one, or a path to a ``.jsonl`` file. ``templates`` maps task names to
    prompt templates (JSONL tasks); ``definition`` names a legal hate-speech definition put before every
    CREHate post."""
    templates = templates or {}
    if name.endswith(".jsonl"):
        return jsonl_task(name, templates=templates.get(task_name(name)), test_fraction=test_fraction, seed=seed)
    if name not in BUNDLED:
        raise DataError(f"task {name!r} is neither a bundled task {sorted(BUNDLED)} nor a path to a .jsonl file")
    task = BUNDLED[name]
    if definition is not None:
        if name != "crehate":
            raise ConfigError(f"crehate_definition: applies to crehate only, not {name!r}")
        definitions = load_definitions(data_dir())
        if definition not in definitions:
            raise DataError(f"crehate_definition: {definition!r} is not one of {sorted(definitions)}")
        task = replace(task, context=f"Hate speech policy: {definitions[definition]}")
    return task


def check_task_settings(tasks: Sequence[str], templates: dict[str, Any], test_fraction: float) -> None:
    """Config checks shared by every stage that takes tasks: names, templates, the split fraction."""
    names = [task_name(t) for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"tasks: two tasks share the name {twice[0]!r} (a JSONL task is named by its file's stem)")
    for t in tasks:
        if not t.endswith(".jsonl") and t not in BUNDLED:
            raise ConfigError(f"tasks: {t!r} is neither a bundled task {sorted(BUNDLED)} nor a path to a .jsonl file")
        if t.endswith(".jsonl") and not Path(t).is_file():
            raise ConfigError(f"tasks: {t!r}: no such .jsonl file")
    for name, spec in templates.items():
        if name not in names:
            raise ConfigError(f"templates: {name!r} is not one of the tasks {names}")
        if name in BUNDLED:
            raise ConfigError(f"templates: {name!r} is a bundled task with its own prompt (templates: JSONL tasks)")
        if not isinstance(spec, dict):
            raise ConfigError(f"templates.{name}: expected a mapping of question/feedback/persona templates")
        generic_spec(name, "classify", spec)  # raises ConfigError naming a missing or unknown placeholder
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction: must be in (0, 1), got {test_fraction}")


__all__ = ["BUNDLED", "PROMPTS", "Task", "assign_splits", "check_task_settings", "get_task", "jsonl_task", "task_name"]
