"""What ``pluristeer evaluate`` computes: tasks, conditions, test subsets and the work units (no model here).

A *task* is a data set with its test records (optionally subsampled: seeded, stratified by perspective),
the training records few-shot prompts draw from, the evaluated perspectives and the K perspectives that
pluralistic decoding (PD) combines. A *condition* says how a record is answered. Every answer is a
next-token read-out (:func:`sae.readout.option_probs`) of one model row, or a PD combination of K
rows; a *row* is a prompt, unsteered or with one steering vector.

Conditions (DESIGN §5):

- ``zero-shot``: the task prompt with the record's persona; ``few-shot``: k solved examples of the same
  perspective from the train split first (seeded per record).
- ``steer-{8x,32x}-{fine,coarse}``: the zero-shot prompt steered at layer L with the perspective's SAE
  vector (fine) or the task's pooled vector (coarse); ``residual-8x-fine`` applies the 8x fine vector as
  ``h + c·v W_dec``; ``caa-fine`` adds the mean residual difference (no SAE).
- ``pd-{mean,cad,dvd}``: PD without steering: the K rows are the item's prompt with each PD perspective's
  persona (tasks without a persona, MisLC: that perspective's own k-shot prompt), the unsteered row is the
  neutral prompt (no persona). ``pd-{mean,cad,dvd}+steer``: the K rows are the neutral prompt steered with
  each PD perspective's 8x fine vector. One PD answer per item, scored against every perspective's label.
- ``ref-steer-8x-fine`` and ``ref-pd-dvd+steer``: the reference implementation's behaviour (SAE error
  term dropped, no steering of single-token steps, steering from position 50; reference DVD entropy).
- ``steer-{8x,32x}-pooled`` (not in the default list): the reference's GlobalOpinionQA sampling, one vector
  from the first ``samples`` training items pooled over perspectives, one sampled answer each
  (:func:`pipelines.vectors.pooled_samples`), steering every perspective.

Each unit holds a few items with every row and answer they need, so the rows a unit shares (a prompt's
unsteered forward is the prefix of all its steered variants, and the base row of PD) run once.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.prompts import Prompt, PromptSpec, build_prompt, labels_of
from pipelines.records import DataError, PerspectiveRecord, item_key

ALL_CONDITIONS: tuple[str, ...] = (
    "zero-shot",
    "few-shot",
    "steer-8x-fine",
    "steer-8x-coarse",
    "steer-32x-fine",
    "steer-32x-coarse",
    "residual-8x-fine",
    "caa-fine",
    "pd-mean",
    "pd-cad",
    "pd-dvd",
    "pd-mean+steer",
    "pd-cad+steer",
    "pd-dvd+steer",
    "ref-steer-8x-fine",
    "ref-pd-dvd+steer",
)
# known but not run by default: the reference's pooled sampling (GlobalOpinionQA's fidelity run adds them)
OPTIONAL_CONDITIONS: tuple[str, ...] = ("steer-8x-pooled", "steer-32x-pooled")
KNOWN_CONDITIONS: tuple[str, ...] = (*ALL_CONDITIONS, *OPTIONAL_CONDITIONS)
BASELINE = "zero-shot"
REFERENCE_FROM_POSITION = 50  # the reference hook steers positions >= 50 only


@dataclass(frozen=True)
class SteerSpec:
    """How a row is steered: which vector set (``{sae}-{granularity}`` or ``caa-fine``), mode, switches."""

    vectors: str  # "8x-fine", "8x-coarse", "32x-fine", "32x-coarse", "8x-pooled", "caa-fine"
    mode: str  # sae | residual | caa
    coeff: float
    keep_error: bool = True
    steer_decode: bool = True
    from_position: int = 0

    @property
    def sae(self) -> str | None:
        return None if self.mode == "caa" else self.vectors.rsplit("-", 1)[0]

    @property
    def name(self) -> str:
        return (
            f"{self.vectors}:{self.mode}:c{self.coeff:g}:e{int(self.keep_error)}:d{int(self.steer_decode)}"
            f":p{self.from_position}"
        )


@dataclass(frozen=True)
class Condition:
    name: str
    prompt: str = "zero-shot"  # zero-shot | few-shot (single-row conditions)
    steer: SteerSpec | None = None
    pd: str | None = None  # mean | cad | dvd
    pd_rows: str | None = None  # "prompt" (perspective-prompted, unsteered) | "steer"
    reference_entropy: bool = False


@dataclass(frozen=True)
class Switches:
    """Steering settings shared by every steering condition (the ``ref-*`` conditions override them)."""

    coeff: float = 1.0
    caa_coeff: float | None = None
    keep_error: bool = True
    steer_decode: bool = True
    from_position: int = 0
    reference_entropy: bool = False


def make_conditions(names: Sequence[str], s: Switches) -> list[Condition]:
    """The :class:`Condition` of each name in ``names`` (see the module docstring)."""
    unknown = [n for n in names if n not in KNOWN_CONDITIONS]
    if unknown:
        raise DataError(f"unknown condition(s) {unknown}; known: {list(KNOWN_CONDITIONS)}")

    def spec(vectors: str, mode: str = "sae", ref: bool = False) -> SteerSpec:
        coeff = s.caa_coeff if mode == "caa" and s.caa_coeff is not None else s.coeff
        if ref:
            return SteerSpec(vectors, mode, coeff, False, False, REFERENCE_FROM_POSITION)
        return SteerSpec(vectors, mode, coeff, s.keep_error, s.steer_decode, s.from_position)

    out = []
    for name in names:
        if name in ("zero-shot", "few-shot"):
            out.append(Condition(name, prompt=name))
        elif name.startswith("steer-"):
            out.append(Condition(name, steer=spec(name.removeprefix("steer-"))))
        elif name == "residual-8x-fine":
            out.append(Condition(name, steer=spec("8x-fine", "residual")))
        elif name == "caa-fine":
            out.append(Condition(name, steer=spec("caa-fine", "caa")))
        elif name == "ref-steer-8x-fine":
            out.append(Condition(name, steer=spec("8x-fine", ref=True)))
        elif name == "ref-pd-dvd+steer":
            out.append(Condition(name, steer=spec("8x-fine", ref=True), pd="dvd", pd_rows="steer",
                                 reference_entropy=True))  # fmt: skip
        else:  # pd-{mode} or pd-{mode}+steer
            mode, _, steered = name.removeprefix("pd-").partition("+")
            out.append(
                Condition(name, steer=spec("8x-fine") if steered else None, pd=mode,
                          pd_rows="steer" if steered else "prompt", reference_entropy=s.reference_entropy)
            )  # fmt: skip
    return out


def vector_keys(conditions: Sequence[Condition]) -> list[str]:
    """The vector sets the conditions use (``8x-fine``, ``caa-fine``, ...)."""
    return sorted({c.steer.vectors for c in conditions if c.steer is not None})


# -- tasks --------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """One task as a run evaluates it: the scored records and what their prompts need."""

    name: str
    kind: str  # classify | distribution
    prompt: PromptSpec
    records: list[PerspectiveRecord]  # the evaluated test records
    shots_pool: dict[str, list[PerspectiveRecord]]  # perspective -> solved training records (few-shot)
    vector_pool: list[PerspectiveRecord]  # training records the vectors are derived from
    perspectives: list[str]  # evaluated, most training samples first
    pd_set: list[str]  # the K perspectives PD combines
    available: dict[str, int]  # test records per evaluated perspective before subsampling
    context: str | None = None  # prompt context (a hate-speech definition)
    alpha: float = 0.2  # PD contrast weight

    @property
    def sizes(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for r in self.records:
            counts[r.perspective] += 1
        return {p: counts[p] for p in self.perspectives}

    @property
    def n_classes(self) -> int:
        return max(len(r.options) for r in self.records)


def choose_perspectives(
    train: Sequence[PerspectiveRecord], test: Sequence[PerspectiveRecord], max_perspectives: int, explicit=()
) -> list[str]:
    """The evaluated perspectives: ``explicit``, else those with training and test records, most training
    records first (ties by name), at most ``max_perspectives`` (0: all)."""
    n_train: dict[str, int] = defaultdict(int)
    for r in train:
        n_train[r.perspective] += 1
    in_test = {r.perspective for r in test}
    if explicit:
        missing = [p for p in explicit if p not in in_test or p not in n_train]
        if missing:
            raise DataError(f"perspectives {missing} need both training and test records")
        return list(explicit)
    chosen = sorted((p for p in n_train if p in in_test), key=lambda p: (-n_train[p], p))
    return chosen[:max_perspectives] if max_perspectives else chosen


def subsample(records: Sequence[PerspectiveRecord], perspectives: Sequence[str], limit: int, seed: int):
    """Whole items in a seeded order until every perspective has ``limit`` records (0: every record of the
    evaluated perspectives). Items keep all their evaluated perspectives' records, so the perspectives of
    one item share its prompts; a perspective with fewer records keeps them all."""
    keep = set(perspectives)
    items: dict[str, list[PerspectiveRecord]] = defaultdict(list)
    for r in records:
        if r.perspective in keep:
            items[item_key(r)].append(r)
    if not limit:
        return [r for group in items.values() for r in group]
    order = sorted(items)
    random.Random(f"{seed}:subsample").shuffle(order)
    counts: dict[str, int] = defaultdict(int)
    out: list[PerspectiveRecord] = []
    for key in order:
        wanted = [r for r in items[key] if counts[r.perspective] < limit]
        if not wanted:
            continue
        out.extend(wanted)
        for r in wanted:
            counts[r.perspective] += 1
        if all(counts[p] >= limit for p in perspectives):
            break
    return out


def shots_for(task: TaskData, record: PerspectiveRecord, perspective: str, k: int, seed: int):
    """``k`` solved training records of ``perspective`` for ``record`` (seeded; never the same item)."""
    pool = [s for s in task.shots_pool.get(perspective, []) if item_key(s) != item_key(record)]
    pool.sort(key=lambda s: s.id)
    rng = random.Random(f"{seed}:shots:{record.id}:{perspective}")
    return rng.sample(pool, min(k, len(pool)))


# -- units ----------------------------------------------------------------------------------------------
@dataclass
class Unit:
    """A batch of items with every prompt, row and answer they need (plain data, JSON in and out)."""

    index: int
    task: str
    prompts: list[str] = field(default_factory=list)
    templated: bool = True
    rows: list[tuple[int, str | None, str | None]] = field(default_factory=list)  # (prompt, steer, perspective)
    steers: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)  # id, rows, base, decoding, labels

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Unit:
        raw = json.loads(text)
        raw["rows"] = [tuple(r) for r in raw["rows"]]
        return cls(**raw)


class UnitBuilder:
    """Collects distinct prompts and rows of one unit; outputs refer to rows by index."""

    def __init__(self, index: int, task: str) -> None:
        self.unit = Unit(index, task)
        self._prompt: dict[str, int] = {}
        self._row: dict[tuple[int, str | None, str | None], int] = {}

    def row(self, prompt: Prompt, steer: SteerSpec | None = None, perspective: str | None = None) -> int:
        self.unit.templated = prompt.templated
        p = self._prompt.setdefault(prompt.text, len(self._prompt))
        if p == len(self.unit.prompts):
            self.unit.prompts.append(prompt.text)
        if steer is not None:
            self.unit.steers.setdefault(steer.name, asdict(steer))
        key = (p, None if steer is None else steer.name, None if steer is None else perspective)
        if key not in self._row:
            self._row[key] = len(self.unit.rows)
            self.unit.rows.append(key)
        return self._row[key]

    def output(self, oid: str, rows: list[int], labels: Sequence[str], base: int | None = None, decoding=None):
        self.unit.outputs.append({"id": oid, "rows": rows, "base": base, "decoding": decoding, "labels": list(labels)})


def output_id(task: str, condition: Condition, record: PerspectiveRecord) -> str:
    """Which answer a (record, condition) reads: per record, or per item for PD."""
    if condition.pd is not None:
        return f"{task}|{condition.name}|{item_key(record)}"
    return f"{task}|{condition.name}|{record.id}"


def plan_units(
    task: TaskData,
    conditions: Sequence[Condition],
    tokenizer: Any,
    *,
    items_per_unit: int = 8,
    k_shots: int = 3,
    seed: int = 42,
    start: int = 0,
    top_k: int = 20,
    tau: float = 0.4,
) -> list[Unit]:
    """The units of ``task`` (numbered from ``start``): ``items_per_unit`` items each."""
    items: dict[str, list[PerspectiveRecord]] = defaultdict(list)
    for r in task.records:
        items[item_key(r)].append(r)
    keys = list(items)
    spec = task.prompt
    units = []
    for u, first in enumerate(range(0, len(keys), items_per_unit)):
        b = UnitBuilder(start + u, task.name)
        for key in keys[first : first + items_per_unit]:
            group = items[key]
            head = group[0]
            labels = labels_of(spec, head)

            def prompt(record: PerspectiveRecord, persona: bool | str = True, shots=()) -> Prompt:
                condition = "few-shot" if shots else "zero-shot"
                return build_prompt(
                    tokenizer, spec, record, condition, shots=shots, persona=persona, context=task.context
                )

            for c in conditions:
                if c.pd is not None:
                    neutral = prompt(head, persona=False)
                    base = b.row(neutral)
                    if c.pd_rows == "steer":
                        rows = [b.row(neutral, c.steer, p) for p in task.pd_set]
                    elif spec.persona:
                        rows = [b.row(prompt(head, persona=p)) for p in task.pd_set]
                    else:  # no persona in this task: each perspective speaks through its own k-shot prompt
                        rows = [b.row(prompt(head, shots=shots_for(task, head, p, k_shots, seed))) for p in task.pd_set]
                    decoding = {
                        "mode": c.pd, "alpha": task.alpha, "tau": tau, "top_k": top_k,
                        "reference": c.reference_entropy,
                    }  # fmt: skip
                    b.output(output_id(task.name, c, head), rows, labels, base, decoding)
                    continue
                for r in group:
                    if c.prompt == "few-shot":
                        shots = shots_for(task, r, r.perspective, k_shots, seed)
                        row = b.row(prompt(r, shots=shots)) if shots else b.row(prompt(r))
                    else:
                        row = b.row(prompt(r), c.steer, r.perspective if c.steer else None)
                    b.output(output_id(task.name, c, r), [row], labels)
        units.append(b.unit)
    return units


def unit_tokens(unit: Unit, tokenizer: Any, layer: int, n_layers: int) -> dict[str, int]:
    """Token counts of a unit: full forwards (distinct prompts) and steered rows resumed after ``layer``
    (``equivalent`` counts a resumed token as the share of blocks it runs)."""
    lengths = [len(tokenizer(t, add_special_tokens=not unit.templated)["input_ids"]) for t in unit.prompts]
    full = sum(lengths)
    resumed = sum(lengths[p] for p, s, _ in unit.rows if s is not None)
    share = (n_layers - layer - 1) / n_layers
    return {"full": full, "resumed": resumed, "equivalent": int(full + share * resumed)}


def plan_hash(units: Sequence[Unit], extra: dict[str, Any]) -> str:
    """A hash of everything that decides the units' results (reruns reuse finished units of the same plan)."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for u in units:
        h.update(u.to_json().encode())
    return h.hexdigest()[:16]


def gold_of(record: PerspectiveRecord) -> tuple[int, list[float] | None]:
    """The gold label index (distribution: its most common option) and the gold distribution, if any."""
    if record.distribution is not None:
        dist = list(record.distribution)
        return max(range(len(dist)), key=dist.__getitem__), dist
    assert record.label is not None
    return record.label, None


__all__ = [
    "ALL_CONDITIONS",
    "BASELINE",
    "KNOWN_CONDITIONS",
    "OPTIONAL_CONDITIONS",
    "Condition",
    "SteerSpec",
    "Switches",
    "TaskData",
    "Unit",
    "choose_perspectives",
    "gold_of",
    "item_key",
    "make_conditions",
    "output_id",
    "plan_hash",
    "plan_units",
    "shots_for",
    "subsample",
    "unit_tokens",
    "vector_keys",
]
