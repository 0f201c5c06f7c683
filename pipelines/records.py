"""Perspective records (DESIGN §3): what every loader yields, and the JSONL format users bring.

One row: ``{"id", "task": "classify"|"distribution", "text", "options": [...], "perspective",
"label" | "distribution", "feedback"?, "meta"?}``. ``label`` is an index into ``options`` (JSONL may
also give the option text); ``distribution`` has one probability per option.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sae.atomic import atomic_write_text

Task = Literal["classify", "distribution"]
TASKS: tuple[str, ...] = ("classify", "distribution")
_FIELDS = {"id", "task", "text", "options", "perspective", "label", "distribution", "feedback", "meta"}


class DataError(ValueError):
    """A data file or row is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class PerspectiveRecord:
    id: str
    task: Task
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

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
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


def record_from_dict(row: Any, *, where: str) -> PerspectiveRecord:
    """Validate one row; ``where`` ("file:line") prefixes every error message."""

    def fail(name: str, problem: str) -> DataError:
        return DataError(f"{where}: field {name!r}: {problem}")

    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - _FIELDS)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    for name in ("id", "task", "text", "options", "perspective"):
        if name not in row or row[name] in (None, ""):
            raise fail(name, "is required")
    rid = row["id"]
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        raise fail("id", f"must be a string or integer, got {rid!r}")
    task = row["task"]
    if task not in TASKS:
        raise fail("task", f"must be one of {TASKS}, got {task!r}")
    for name in ("text", "perspective"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise fail(name, "must be a non-empty string")
    options = row["options"]
    if (
        not isinstance(options, list)
        or len(options) < 2
        or not all(isinstance(o, str) and o.strip() for o in options)
        or len(set(options)) != len(options)
    ):
        raise fail("options", "must be a list of at least 2 distinct non-empty strings")
    label: int | None = None
    distribution: tuple[float, ...] | None = None
    if task == "classify":
        if "label" not in row:
            raise fail("label", "is required when task is 'classify'")
        raw = row["label"]
        if isinstance(raw, str) and raw in options:
            label = options.index(raw)
        elif isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(options):
            label = raw
        else:
            raise fail("label", f"must be an option or an index 0..{len(options) - 1}, got {raw!r}")
    else:
        raw = row.get("distribution")
        if not isinstance(raw, list) or len(raw) != len(options):
            raise fail("distribution", f"must be a list of {len(options)} probabilities (one per option)")
        if not all(isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p) and p >= 0 for p in raw):
            raise fail("distribution", "must hold finite non-negative numbers")
        total = float(sum(raw))
        if abs(total - 1.0) > 0.02:
            raise fail("distribution", f"must sum to 1 (±0.02), sums to {total:.4f}")
        distribution = tuple(float(p) / total for p in raw)
    feedback = row.get("feedback")
    if feedback is not None and not isinstance(feedback, str):
        raise fail("feedback", "must be a string or absent")
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise fail("meta", "must be an object or absent")
    return PerspectiveRecord(
        id=str(rid),
        task=task,
        text=row["text"],
        options=tuple(options),
        perspective=row["perspective"],
        label=label,
        distribution=distribution,
        feedback=feedback or None,
        meta=meta,
    )


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
