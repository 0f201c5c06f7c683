"""Perspective records (DESIGN §3): what every loader yields, and the JSONL format users bring.

One row: ``{"id", "kind": "classify"|"distribution", "text", "options": [...], "perspective",
"label" | "distribution", "feedback"?, "meta"?}``. ``label`` is an index into ``options`` (JSONL may
also give the option text); ``distribution`` has one probability per option. ``meta.split`` (``train``,
``valid`` or ``test``), where given, puts the record in that split (:mod:`pipelines.tasks`). ``"task"`` is the
older name of ``"kind"`` and is still read.

Rows are validated by a pydantic model (:class:`RecordRow`, ``extra="forbid"``); every error names the
file, line and field.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, field_validator, model_validator

from sae.atomic import atomic_write_text

Kind = Literal["classify", "distribution"]
KINDS: tuple[str, ...] = ("classify", "distribution")
SPLITS: tuple[str, ...] = ("train", "valid", "test")


RANK = "rank"  # meta key: a training record's place in its data set's seeded draw (GlobalOpinionQA's 200)


class DataError(ValueError):
    """A data file or row is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class PerspectiveRecord:
    id: str
    kind: Kind
    text: str
    options: tuple[str, ...]
    perspective: str
    label: int | None = None
    distribution: tuple[float, ...] | None = None
    feedback: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def answer(self) -> str:
        """The option this perspective gives (the label, or the distribution's mode)."""
        if self.label is not None:
            return self.options[self.label]
        assert self.distribution is not None
        return self.options[max(range(len(self.options)), key=self.distribution.__getitem__)]

    @property
    def split(self) -> str | None:
        """The split the record names in ``meta.split``, if any."""
        return self.meta.get("split")

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "text": self.text,
            "options": list(self.options),
            "perspective": self.perspective,
        }
        if self.label is not None:
            row["label"] = self.label
        if self.distribution is not None:
            row["distribution"] = list(self.distribution)
        if self.feedback is not None:
            row["feedback"] = self.feedback
        if self.meta:
            row["meta"] = self.meta
        return row


def _nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


class RecordRow(BaseModel):
    """One JSONL row as users write it; :meth:`record` turns it into a :class:`PerspectiveRecord`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: StrictStr | StrictInt
    kind: Kind
    text: StrictStr
    options: list[StrictStr]
    perspective: StrictStr
    label: StrictStr | StrictInt | None = None
    distribution: list[float] | None = None
    feedback: StrictStr | None = None
    meta: dict[str, Any] | None = None

    _text = field_validator("text", "perspective")(_nonempty)

    @field_validator("options")
    @classmethod
    def _options(cls, options: list[str]) -> list[str]:
        if len(options) < 2 or not all(o.strip() for o in options) or len(set(options)) != len(options):
            raise ValueError("must be a list of at least 2 distinct non-empty strings")
        return options

    @field_validator("distribution", mode="before")
    @classmethod
    def _numbers(cls, raw: Any) -> Any:
        if isinstance(raw, list) and not all(
            isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p) and p >= 0 for p in raw
        ):
            raise ValueError("must hold finite non-negative numbers")
        return raw

    @field_validator("meta")
    @classmethod
    def _meta(cls, meta: dict[str, Any] | None) -> dict[str, Any] | None:
        split = (meta or {}).get("split")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return meta

    @model_validator(mode="after")
    def _answer(self) -> RecordRow:
        n = len(self.options)
        if self.kind == "classify":
            raw = self.label
            if raw is None:
                raise _FieldError("label", "is required when kind is 'classify'")
            if not ((isinstance(raw, str) and raw in self.options) or (isinstance(raw, int) and 0 <= raw < n)):
                raise _FieldError("label", f"must be an option or an index 0..{n - 1}, got {raw!r}")
        else:
            if self.distribution is None or len(self.distribution) != n:
                raise _FieldError("distribution", f"must be a list of {n} probabilities (one per option)")
            total = float(sum(self.distribution))
            if abs(total - 1.0) > 0.02:
                raise _FieldError("distribution", f"must sum to 1 (±0.02), sums to {total:.4f}")
        return self

    def record(self) -> PerspectiveRecord:
        label = None
        if self.kind == "classify":
            label = self.options.index(self.label) if isinstance(self.label, str) else self.label
        distribution = None
        if self.distribution is not None and self.kind == "distribution":
            total = float(sum(self.distribution))
            distribution = tuple(float(p) / total for p in self.distribution)
        return PerspectiveRecord(
            id=str(self.id), kind=self.kind, text=self.text, options=tuple(self.options),
            perspective=self.perspective, label=label, distribution=distribution, feedback=self.feedback or None,
            meta=dict(self.meta or {}),
        )  # fmt: skip


class _FieldError(ValueError):
    """A cross-field problem, reported under ``name`` (pydantic would report it under the whole row)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(problem)
        self.name, self.problem = name, problem


_PROBLEMS = {  # pydantic's error types -> how this project says them
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "list_type": "must be a list",
    "dict_type": "must be an object or absent",
    "literal_error": "must be one of {allowed}",
}


def record_from_dict(row: Any, *, where: str) -> PerspectiveRecord:
    """Validate one row; ``where`` ("file:line") prefixes every error message."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row = dict(row)
    if "task" in row and "kind" not in row:  # the older name of the field
        row["kind"] = row.pop("task")
        named = {"kind": "task"}
    else:
        named = {}
    unknown = sorted(set(row) - set(RecordRow.model_fields))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(RecordRow.model_fields)}")
    for name in ("text", "perspective", "id"):
        if row.get(name) == "":
            raise DataError(f"{where}: field {name!r}: is required")
    try:
        return RecordRow.model_validate(row).record()
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        ctx = first.get("ctx") or {}
        cause = ctx.get("error")
        if isinstance(cause, _FieldError):
            name, problem = cause.name, cause.problem
        else:
            name = str(first["loc"][0]) if first["loc"] else "row"
            problem = _PROBLEMS.get(first["type"], "").format(allowed=ctx.get("expected", KINDS))
            if not problem:
                problem = str(cause) if cause is not None else first["msg"]
            if name in ("id", "label") and first["type"] in ("string_type", "int_type"):
                problem = {"id": "must be a string or integer", "label": "must be an option or an index"}[name]
                problem += f", got {row.get(name)!r}"
            if name in ("distribution",) and first["type"] in ("list_type", "float_type", "float_parsing"):
                problem = "must be a list of probabilities (one per option)"
        raise DataError(f"{where}: field {named.get(name, name)!r}: {problem}") from None


def item_key(record: PerspectiveRecord) -> str:
    """Records of the same item (one post / question / claim / statement, several perspectives) share it."""
    return hashlib.sha1(json.dumps([record.text, list(record.options)]).encode()).hexdigest()[:16]


def read_jsonl(path: str | Path) -> Iterator[PerspectiveRecord]:
    """Yield validated records from a JSONL file; blank lines are skipped, ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            record = record_from_dict(row, where=where)
            if record.id in seen:
                raise DataError(f"{where}: field 'id': duplicate id {record.id!r}")
            seen.add(record.id)
            yield record


def write_jsonl(path: str | Path, records: Iterable[PerspectiveRecord]) -> Path:
    """Write records as JSONL, atomically."""
    text = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)
    return atomic_write_text(path, text)
