"""Typed stage configs: dataclasses validated by pydantic, loaded from YAML or dicts, overridden from the CLI.

A stage config is a plain dataclass with a default for every field, subclassing :class:`StageConfig` and the
shared sections it uses (:class:`RaySection`, :class:`ActorPool`, :class:`Tracking`). Each field's annotation
is its contract, checked by pydantic in strict mode (``extra="forbid"``, no NaN or infinity, no ``"3"`` for an
``int``, no ``1`` for a ``bool``; only an integral float is read as an ``int`` and a number as a ``str``): a
type (``int``, ``float``, ``str``, ``bool``, :data:`PathOrURI`, ``Literal[...]``, ``list[...]``,
``dict[str, ...]``, ``X | None``) and range constraints (``Annotated[int, Field(ge=1)]``; :data:`Count`,
:data:`NonNegInt`, :data:`Positive`, :data:`NonNegFloat`, :data:`Fraction`, :data:`Retries`). A constraint's
``description`` is the hint an error repeats (``"0: dense"``). What one field cannot say (relations between
fields, files that must exist) is the config's own ``validate``.

Pydantic's errors are translated into one line per problem that names the file (or the class), the field and
what is allowed: ``train.yaml: batch_size: must be >= 1, got 0``. From the command line (``--set``), a
comma-separated value of a list field is split (``layers=4,8``) and a single value is a list of one.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Required, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, PlainValidator, TypeAdapter, ValidationError, with_config
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from sae.storage import is_uri

T = TypeVar("T", bound="StageConfig")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


def _path_or_uri(value: Any) -> Path | str:
    if is_uri(value):  # s3://, gs://, file://: kept as a string (Path would fold "//" into "/")
        return value
    if isinstance(value, str | Path):
        return Path(value)
    raise PydanticCustomError("path_type", "expected a path or a URI (s3://bucket/prefix), got {got}", {"got": value})


# A local path (a Path) or a URI such as s3://bucket/prefix (kept as the string).
PathOrURI = Annotated[Path | str, PlainValidator(_path_or_uri)]
Count = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1, description="a fraction in [0, 1)")]
Retries = Annotated[int, Field(ge=-1, description="-1: unlimited")]
# One process's torch device (a stage that is not an actor pool, where Ray assigns the GPUs).
TorchDevice = Annotated[
    str, Field(pattern=r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
]
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Reads fp32 / fp16 / bf16 as their full names (put it in the Annotated of a Literal of dtype names).
DTYPE_NAMES = BeforeValidator(lambda v: DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v)
ComputeDtype = Annotated[Literal["float32", "float16", "bfloat16"], DTYPE_NAMES]  # a torch dtype by name
Resources = dict[str, Annotated[float, Field(ge=0, description="custom Ray resources: amounts >= 0")]]


# -- the shared sections -------------------------------------------------------------------------------
@dataclasses.dataclass
class RaySection:
    """Where a stage's Ray work runs (every stage)."""

    ray_address: str | None = None  # None: a local Ray; "auto" or "ray://host:10001" joins a cluster


@dataclasses.dataclass
class ActorPool:
    """The model actors of a data-parallel stage (collect, evaluate): how many, and what each reserves."""

    num_actors: Count = 1  # model actors (one model each)
    actor_cpus: NonNegFloat = 0.5  # Ray CPUs reserved per actor (fractional: the forward's threads are separate)
    actor_gpus: NonNegFloat = 1.0  # GPUs per actor when running on GPU
    torch_threads: Annotated[int, Field(ge=0, description="0: the node's cores / actors per node")] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the cluster has GPUs


@dataclasses.dataclass
class Tracking:
    """Experiment tracking (every stage that runs a job)."""

    track: bool = True  # log to W&B (offline unless WANDB_API_KEY is set)


# -- the engine ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class StageConfig:
    """Base of every stage config. Subclasses are plain dataclasses with defaults for every field.

    ``RENAMED`` maps a field's old name to its new one: a config that still uses the old name gets an error
    saying so, not silence."""

    RENAMED: ClassVar[dict[str, str]] = {}

    def validate(self) -> None:
        """Checks across fields, beyond what the annotations say; raise :class:`ConfigError`."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "config") -> T:
        data = dict(data or {})
        renamed = [f"{old}: renamed to {cls.RENAMED[old]}" for old in sorted(data) if old in cls.RENAMED]
        if renamed:
            raise ConfigError(f"{where}: " + "; ".join(renamed))
        lists = _list_fields(cls)
        for name in data.keys() & lists:
            data[name] = _as_list(data[name], f"{where}: {name}")
        try:
            cfg = cls(**_adapter(cls).validate_python(data))
        except ValidationError as err:
            raise ConfigError(f"{where}: " + _explain(cls, err)) from None
        try:
            cfg.validate()
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        return cfg

    @classmethod
    def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
        """Read YAML ``path`` (optional), apply ``key=value`` overrides, validate."""
        data: dict[str, Any] = {}
        where = cls.__name__
        if path is not None:
            where = str(path)
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except yaml.YAMLError as err:
                raise ConfigError(f"{path} is not valid YAML: {err}") from None
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping of field: value, got {type(loaded).__name__}")
            data.update(loaded or {})
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r} must look like field=value")
            try:
                data[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as err:
                raise ConfigError(
                    f"override {item!r}: the value is not valid YAML ({err.__class__.__name__})"
                ) from None
        return cls.from_dict(data, where=where)

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, list | tuple):
                return [plain(x) for x in v]
            return v

        names = [f.name for f in dataclasses.fields(self)]
        own = vars(type(self)).get("__annotations__", {})  # the stage's own fields first, then its sections'
        return {name: plain(getattr(self, name)) for name in sorted(names, key=lambda n: n not in own)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (for ``validate``)."""
    if not condition:
        raise ConfigError(message)


# -- pydantic's side -----------------------------------------------------------------------------------
# Strict types (no "3" for an int, no 1 for a bool, no True for a number), no NaN or infinity, no unknown fields.
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value  # YAML's 1.0e6 for an int


def _number_text(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value  # name: 2024


def _yaml_type(tp: Any) -> Any:
    """``tp`` with the conversions a YAML or ``--set`` value may need added to its ``int`` and ``str`` (and a
    plain ``Path`` read as :data:`PathOrURI`)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is int:
        return Annotated[int, BeforeValidator(_integral)]
    if tp is str:
        return Annotated[str, BeforeValidator(_number_text)]
    if tp is Path:
        return PathOrURI
    if origin is Annotated:
        if any(isinstance(m, PlainValidator) for m in tp.__metadata__):
            return tp
        return Annotated[(_yaml_type(args[0]), *tp.__metadata__)]  # type: ignore[return-value]
    if origin in (Union, types.UnionType):
        return Union[tuple(_yaml_type(a) for a in args)]  # noqa: UP007
    if origin in (list, Sequence):
        return list[_yaml_type(args[0])]  # type: ignore[misc]
    if origin is dict:
        return dict[args[0], _yaml_type(args[1])]  # type: ignore[misc]
    return tp


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    """Strict validation of a mapping of ``cls``'s fields (the values ``cls(**...)`` is then built from)."""
    hints = _hints(cls)
    fields = {
        f.name: _yaml_type(hints[f.name])
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        else Required[_yaml_type(hints[f.name])]
        for f in dataclasses.fields(cls)
    }
    return TypeAdapter(with_config(_STRICT)(TypedDict(f"{cls.__name__}Fields", fields, total=False)))  # type: ignore[operator]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _unwrap(tp: Any) -> Any:
    """``tp`` without ``Annotated`` and ``| None``."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
            rest = [a for a in get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp


@functools.cache
def _list_fields(cls: type) -> frozenset[str]:
    return frozenset(name for name, tp in _hints(cls).items() if get_origin(_unwrap(tp)) in (list, Sequence))


def _as_list(value: Any, name: str) -> Any:
    """``"4,8"`` -> ``[4, 8]`` (``--set layers=4,8``), a single value -> a list of it, ``None`` kept."""
    if isinstance(value, str) and "," in value:
        try:
            return [yaml.safe_load(v) for v in value.split(",")]
        except yaml.YAMLError:
            raise ConfigError(f"{name}: expected a comma-separated list, got {value!r}") from None
    if value is None or isinstance(value, list):
        return value
    return list(value) if isinstance(value, tuple) else [value]


_EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _hint(cls: type, name: str) -> str:
    """The first constraint ``description`` in field ``name``'s type (its items' too), or ``""``."""
    pending = [_hints(cls).get(name, Any)]
    while pending:
        tp = pending.pop(0)
        if get_origin(tp) is Annotated:
            for meta in tp.__metadata__:
                if isinstance(meta, FieldInfo) and meta.description:
                    return meta.description
        pending.extend(get_args(tp))
    return ""


def _explain(cls: type, err: ValidationError) -> str:
    """One message per problem, in this project's words: ``field: what is wrong, got value``."""
    problems, unknown, missing = [], [], []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        kind, got = e["type"], e.get("input")
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            unknown.append(loc[0])
            continue
        if kind in ("missing", "missing_argument"):
            missing.append(loc[0])
            continue
        name = loc[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:] if p != "[key]")
        ctx = e.get("ctx") or {}
        if kind in _BOUNDS:
            bound = next(iter(ctx.values()))
            bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
            hint = _hint(cls, loc[0])
            text = f"must be {_BOUNDS[kind]} {bound}, got {got!r}" + (f" ({hint})" if hint else "")
        elif kind == "string_pattern_mismatch":
            text = f"must be {_hint(cls, loc[0]) or 'like ' + str(ctx['pattern'])}, got {got!r}"
        elif kind == "literal_error":
            options = str(ctx.get("expected", "")).replace(" or ", " | ").replace(", ", " | ")
            text = f"must be one of {options}, got {got!r}"
        elif kind in _EXPECTED:
            text = f"{_EXPECTED[kind]}, got {got!r}"
        elif kind == "value_error" and "error" in ctx:
            text = str(ctx["error"])
        else:
            text = e["msg"][:1].lower() + e["msg"][1:]
        problems.append(f"{name}: {text}")
    fields = [f.name for f in dataclasses.fields(cls)]
    if unknown:
        problems.insert(0, f"unknown field(s) {sorted(unknown)}; {cls.__name__} takes {sorted(fields)}")
    if missing:
        problems.insert(0, f"missing required field(s) {missing}")
    return "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")


__all__ = [
    "DTYPE_ALIASES",
    "DTYPE_NAMES",
    "ActorPool",
    "ComputeDtype",
    "ConfigError",
    "Count",
    "Fraction",
    "NonNegFloat",
    "NonNegInt",
    "PathOrURI",
    "Positive",
    "RaySection",
    "Resources",
    "Retries",
    "StageConfig",
    "TorchDevice",
    "Tracking",
    "check",
]
