"""Typed stage configs: dataclasses loaded from YAML or dicts, overridden from the CLI, validated on load.

Every field is checked against its annotation (``int``, ``float``, ``str``, ``bool``, ``Path`` (a URI
such as ``s3://bucket/prefix`` stays a string), ``Literal[...]``, ``list[...]``, ``X | None``); a config's
own ``validate`` adds range checks. Errors name the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from sae.storage import is_uri

T = TypeVar("T", bound="StageConfig")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, Sequence):
        return f"list of {_type_name(get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` as type ``tp`` or raise :class:`ConfigError` naming ``name``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return coerce(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{name}: must be one of {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple, Sequence):
        (item,) = get_args(tp)[:1]
        if isinstance(value, str) and "," in value:  # "--set layers=4,8" from the CLI
            try:
                value = [yaml.safe_load(v) for v in value.split(",")]
            except yaml.YAMLError:
                raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}") from None
        if not isinstance(value, list | tuple):
            value = [value]
        return [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN passes every `x > 0` check by failing none of the `x <= 0` ones
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if tp is Path:
        if is_uri(value):  # s3://, gs://, file://: kept as a string (Path would fold "//" into "/")
            return value
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{name}: expected a path, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


@dataclasses.dataclass
class StageConfig:
    """Base of every stage config. Subclasses are plain dataclasses with defaults for every field.

    ``RENAMED`` maps a field's old name to its new one: a config that still uses the old name gets an error
    saying so, not silence."""

    RENAMED: ClassVar[dict[str, str]] = {}

    def validate(self) -> None:
        """Range checks beyond types; raise :class:`ConfigError`. Overridden by stages."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "config") -> T:
        data = dict(data or {})
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        renamed = [f"{old}: renamed to {cls.RENAMED[old]}" for old in sorted(data) if old in cls.RENAMED]
        if renamed:
            raise ConfigError(f"{where}: " + "; ".join(renamed))
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; {cls.__name__} takes {sorted(fields)}")
        kwargs = {name: coerce(value, hints[name], f"{where}: {name}") for name, value in data.items()}
        missing = [
            n
            for n, f in fields.items()
            if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{where}: missing required field(s) {missing}")
        cfg = cls(**kwargs)
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

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (for ``validate``)."""
    if not condition:
        raise ConfigError(message)


__all__ = ["ConfigError", "StageConfig", "check", "coerce"]
