"""The activation store (DESIGN §3): Parquet shards + ``manifest.json``, written atomically, read back
as torch batches (shuffled within a window, split across training ranks) or as a Ray Dataset.

Shard columns: ``layer_{L}`` (fixed-size list of ``d_model`` floats, fp16 or fp32) per layer, plus
``token_id`` (int32), ``context`` (int64, global context index) and ``position`` (int16) so rows can be
traced back to their text. Shards are named ``shard-{index:05d}.parquet``; the manifest lists the
complete ones with their row count and sha256, so a rerun skips them.

Numerics: :func:`write_shard` refuses activations with non-finite values or with values beyond the store
dtype's range (a float16 cast would turn them into inf silently), and readers refuse non-finite rows, naming
the shard. Parquet and numpy have no bfloat16, so a store holds float16 or float32.

``root`` may be a plain path or a URI (``s3://bucket/prefix``, :mod:`sae.storage`): a shard is written to a
local temp file and published whole (rename, or one upload), the manifest after it, so a reader or a
resumed run only ever sees complete shards.
"""

from __future__ import annotations

import fnmatch
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae import storage
from sae.storage import Location

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
SHARD_METADATA_KEY = "pluristeer"


def dtype_max(dtype: str) -> float:
    """The largest finite value of store dtype ``dtype`` (65,504 for float16)."""
    return float(np.finfo(STORE_DTYPES[dtype]).max)


class StoreError(ValueError):
    """An activation store is missing, incomplete, corrupt, or does not match what was asked for."""


def layer_column(layer: int) -> str:
    return f"layer_{layer}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


@dataclass
class ShardInfo:
    index: int
    name: str
    rows: int
    sha256: str


@dataclass
class Manifest:
    """What a store holds and how it was made. ``config`` is the collect config that made it."""

    model: str
    layers: list[int]
    d_model: int
    dtype: str
    context_size: int
    hook: str = "resid_post"
    revision: str | None = None
    n_tokens: int = 0  # rows requested; equals the sum of shard rows once complete
    positions_dropped: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # per layer: mean, std, mean_norm
    config: dict[str, Any] = field(default_factory=dict)
    dtype_choice: dict[str, Any] = field(default_factory=dict)  # how store_dtype=auto chose dtype (measured range)
    format_version: int = FORMAT_VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must agree on."""
        return {
            k: getattr(self, k) for k in ("model", "revision", "layers", "d_model", "dtype", "context_size", "hook")
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = MANIFEST) -> Manifest:
        if not isinstance(raw, dict):
            raise StoreError(f"{where}: malformed manifest (expected a JSON object, got {type(raw).__name__})")
        try:
            shards = [ShardInfo(**s) for s in raw.get("shards", [])]
            manifest = cls(**{**raw, "shards": shards})
        except TypeError as err:
            raise StoreError(f"{where}: malformed manifest ({err})") from None
        manifest._check(where)
        return manifest

    def _check(self, where: str) -> None:
        """Types and ranges of a manifest read from disk (a hand-edited or corrupt one fails here, by field)."""

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise StoreError(f"{where}: malformed manifest: {what}; rerun collect into a new directory")

        def count(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        need(
            count(self.format_version) and self.format_version <= FORMAT_VERSION,
            f"format_version {self.format_version!r} is not one this pluristeer reads (<= {FORMAT_VERSION})",
        )
        need(isinstance(self.model, str), f"model must be a string, got {self.model!r}")
        need(
            isinstance(self.layers, list) and bool(self.layers) and all(count(x) for x in self.layers),
            f"layers must be a list of layer indices, got {self.layers!r}",
        )
        need(count(self.d_model) and self.d_model > 0, f"d_model must be a positive integer, got {self.d_model!r}")
        need(self.dtype in STORE_DTYPES, f"dtype must be one of {sorted(STORE_DTYPES)}, got {self.dtype!r}")
        need(count(self.context_size), f"context_size must be an integer, got {self.context_size!r}")
        need(count(self.n_tokens), f"n_tokens must be an integer, got {self.n_tokens!r}")
        for s in self.shards:
            need(count(s.index) and s.name == shard_name(s.index), f"shard {s.name!r} is not named {shard_name(0)}")
            need(count(s.rows) and isinstance(s.sha256, str), f"shard {s.name}: rows or sha256 is not valid")


def _root(root: Location) -> Location:
    return root if storage.is_uri(root) else Path(root)


def read_manifest(root: Location) -> Manifest:
    path = storage.join(root, MANIFEST)
    try:
        raw = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise StoreError(f"{storage.display(root)} is not an activation store: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{storage.display(path)}: not valid JSON ({err})") from None
    return Manifest.from_dict(raw, storage.display(path))


def read_shard_table(path: Location, columns: Sequence[str] | None = None, **kwargs: Any) -> pa.Table:
    """``pq.read_table`` of one shard file, local or in an object store."""
    fs, where = storage.resolve(path)
    return pq.read_table(where, columns=None if columns is None else list(columns), filesystem=fs, **kwargs)


class RunningStats:
    """Per-dimension mean/std and mean L2 norm of a stream of ``[rows, d]`` arrays (float64 sums)."""

    def __init__(self, d: int) -> None:
        self.n = 0
        self.sum = np.zeros(d, dtype=np.float64)
        self.sumsq = np.zeros(d, dtype=np.float64)
        self.norm_sum = 0.0

    def update(self, x: np.ndarray) -> None:
        x64 = x.astype(np.float64, copy=False)
        self.n += x64.shape[0]
        self.sum += x64.sum(0)
        self.sumsq += (x64 * x64).sum(0)
        self.norm_sum += float(np.sqrt((x64 * x64).sum(1)).sum())

    def merge(self, other: RunningStats) -> None:
        self.n += other.n
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.norm_sum += other.norm_sum

    def state(self) -> dict[str, Any]:
        """The exact sums (JSON-safe), to store beside a shard and merge later with :meth:`from_state`."""
        return {"n": self.n, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist(), "norm_sum": self.norm_sum}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunningStats:
        out = cls(len(state["sum"]))
        out.n = int(state["n"])
        out.sum = np.asarray(state["sum"], dtype=np.float64)
        out.sumsq = np.asarray(state["sumsq"], dtype=np.float64)
        out.norm_sum = float(state["norm_sum"])
        return out

    def to_dict(self) -> dict[str, Any]:
        n = max(self.n, 1)
        mean = self.sum / n
        std = np.sqrt(np.maximum(self.sumsq / n - mean * mean, 0.0))
        return {"n": self.n, "mean": mean.tolist(), "std": std.tolist(), "mean_norm": self.norm_sum / n}


class StoreWriter:
    """Creates a store or resumes one: shards are written atomically and recorded in the manifest.

    Only one process (the driver) records shards; workers may call :func:`write_shard` themselves and
    hand back the :class:`ShardInfo`. A shard file on disk that the manifest does not list is treated as
    not done (it may be a leftover of a crash) and is rewritten.
    """

    def __init__(self, root: Location, manifest: Manifest) -> None:
        self.root = _root(root)
        storage.makedirs(self.root)
        if storage.exists(storage.join(self.root, MANIFEST)):
            existing = read_manifest(self.root)
            if existing.identity() != manifest.identity():
                raise StoreError(
                    f"{self.root} already holds a store made with {existing.identity()}, not "
                    f"{manifest.identity()}: choose another output directory or delete it"
                )
            if existing.n_tokens != manifest.n_tokens and existing.complete:
                raise StoreError(
                    f"{self.root} is a complete store of {existing.n_tokens} tokens; asked for {manifest.n_tokens}"
                )
            existing.n_tokens = manifest.n_tokens
            existing.config = manifest.config
            self.manifest = existing
        else:
            self.manifest = manifest
            self._save()

    def done(self) -> dict[int, ShardInfo]:
        """Shards already recorded (and still on disk with the recorded size of rows)."""
        present = set(storage.listdir(self.root))
        return {s.index: s for s in self.manifest.shards if s.name in present}

    def record(self, info: ShardInfo, *, save: bool = True) -> None:
        self.manifest.shards = sorted(
            [s for s in self.manifest.shards if s.index != info.index] + [info], key=lambda s: s.index
        )
        if save:
            self._save()

    def forget(self, indices: Sequence[int], *, save: bool = True) -> None:
        """Drop shards from the manifest (their files become leftovers for :meth:`remove_leftovers`)."""
        drop = set(indices)
        self.manifest.shards = [s for s in self.manifest.shards if s.index not in drop]
        if save:
            self._save()

    def remove_leftovers(self) -> list[str]:
        """Delete shard files and temp files that the manifest does not list; returns their names."""
        listed = {s.name for s in self.manifest.shards}
        removed = []
        names = storage.listdir(self.root)
        for pattern in ("shard-*.parquet", ".shard-*.tmp"):
            for name in fnmatch.filter(names, pattern):
                if name not in listed:
                    storage.delete(storage.join(self.root, name))
                    removed.append(name)
        return removed

    def finalize(self, stats: dict[str, dict[str, Any]], positions_dropped: dict[str, Any]) -> Manifest:
        self.manifest.stats = stats
        self.manifest.positions_dropped = positions_dropped
        self.manifest.complete = True
        self._save()
        return self.manifest

    def _save(self) -> None:
        storage.write_json(storage.join(self.root, MANIFEST), self.manifest.to_dict())


def check_values(index: int, acts: dict[int, np.ndarray], dtype: str) -> None:
    """Refuse shard ``index`` before it is written: a non-finite value, or ``|value|`` beyond ``dtype``'s range,
    at any layer is a :class:`StoreError` naming the layer, the max ``|value|`` and the fix."""
    limit = dtype_max(dtype)
    for layer, a in sorted(acts.items()):
        a32 = np.asarray(a, dtype=np.float32)
        finite = np.isfinite(a32)
        if not finite.all():
            raise StoreError(
                f"shard {index}, layer {layer}: {int((~finite).sum())} non-finite values (inf/NaN) in the model's "
                "residuals before storing: the forward overflowed; collect with --set dtype=float32"
            )
        peak = float(np.abs(a32).max()) if a32.size else 0.0
        if peak > limit:
            raise StoreError(
                f"shard {index}, layer {layer}: max |value| {peak:,.0f} is beyond {dtype}'s range ({limit:,.0f}) "
                f"and would be stored as inf: collect into a new directory with --set store_dtype=float32 "
                f"(or store_dtype=auto, which measures the range first)"
            )


def check_finite(rows: np.ndarray, where: str | Path, column: str) -> np.ndarray:
    """``rows`` if every value is finite, else a :class:`StoreError` naming the shard and column."""
    bad = ~np.isfinite(rows)
    if bad.any():
        raise StoreError(
            f"{where}: column {column} holds {int(bad.sum())} non-finite values (inf/NaN) in "
            f"{int(bad.any(axis=-1).sum())} rows: the store is unusable for training; recollect it "
            "(pluristeer collect checks the range before writing; --set store_dtype=float32 for large residuals)"
        )
    return rows


def write_shard(
    root: Location,
    index: int,
    acts: dict[int, np.ndarray],
    extra: dict[str, np.ndarray],
    dtype: str,
    *,
    metadata: dict[str, Any] | None = None,
    compression: str = "zstd",
) -> ShardInfo:
    """Write shard ``index`` atomically: ``acts[layer]`` is ``[rows, d_model]``; ``extra`` holds the
    ``token_id``/``context``/``position`` columns; ``metadata`` (JSON-safe) goes into the Parquet footer
    (read it back with :func:`read_shard_metadata`). Returns its :class:`ShardInfo`."""
    if dtype not in STORE_DTYPES:
        raise StoreError(f"dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    check_values(index, acts, dtype)
    rows = {a.shape[0] for a in acts.values()} | {len(v) for v in extra.values()}
    if len(rows) != 1:
        raise StoreError(f"shard {index}: columns have different row counts {sorted(rows)}")
    columns: dict[str, pa.Array] = {}
    for layer, a in sorted(acts.items()):
        flat = np.ascontiguousarray(a, dtype=STORE_DTYPES[dtype]).reshape(-1)
        columns[layer_column(layer)] = pa.FixedSizeListArray.from_arrays(pa.array(flat), a.shape[1])
    for name, values in extra.items():
        columns[name] = pa.array(values)
    table = pa.table(columns)
    if metadata is not None:
        table = table.replace_schema_metadata({SHARD_METADATA_KEY: json.dumps(metadata)})
    name = shard_name(index)
    # Dictionary encoding never pays for activations and costs ~3x the write time.
    # Page checksums let every read detect a flipped bit (readers verify them, see ActivationStore.read_shard).
    written = storage.write_file(
        storage.join(root, name),
        lambda tmp: pq.write_table(table, tmp, compression=compression, use_dictionary=False, write_page_checksum=True),
    )
    return ShardInfo(index=index, name=name, rows=rows.pop(), sha256=written.sha256)


def read_shard_metadata(path: Location) -> dict[str, Any]:
    """The JSON metadata :func:`write_shard` stored in a shard's footer ({} when there is none)."""
    fs, where = storage.resolve(path)
    try:
        raw = (pq.read_schema(where, filesystem=fs).metadata or {}).get(SHARD_METADATA_KEY.encode())
    except (pa.ArrowInvalid, OSError) as err:
        raise StoreError(f"{storage.display(path)}: cannot read shard (truncated or corrupt?): {err}") from None
    return json.loads(raw) if raw else {}


def _to_numpy(column: pa.ChunkedArray, d: int) -> np.ndarray:
    width = getattr(column.type, "list_size", None)
    if width != d:
        raise StoreError(f"an activation column holds {column.type} where the manifest says {d} floats per row")
    values = column.combine_chunks().values
    return values.to_numpy(zero_copy_only=False).reshape(-1, d)


class ActivationStore:
    """Read side of a complete store."""

    def __init__(self, root: Location, *, allow_incomplete: bool = False) -> None:
        self.root = _root(root)
        self.manifest = read_manifest(self.root)
        if not self.manifest.complete and not allow_incomplete:
            raise StoreError(
                f"{self.root} is incomplete ({self.manifest.rows} of {self.manifest.n_tokens} rows): rerun collect"
            )
        present = set(storage.listdir(self.root))
        for s in self.manifest.shards:
            if s.name not in present:
                raise StoreError(f"{storage.display(self.root)}: shard {s.name} listed in the manifest is missing")

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.layers)

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    def __len__(self) -> int:
        return self.manifest.rows

    def _check_layer(self, layer: int) -> str:
        if layer not in self.manifest.layers:
            raise StoreError(f"{self.root} holds layers {self.manifest.layers}, not {layer}")
        return layer_column(layer)

    def verify(self) -> None:
        """Check every shard's sha256 and row count against the manifest."""
        for s in self.manifest.shards:
            path = storage.join(self.root, s.name)
            if storage.sha256(path) != s.sha256:
                raise StoreError(f"{storage.display(path)}: sha256 mismatch (corrupt or modified shard)")
            fs, where = storage.resolve(path)
            if (n := pq.read_metadata(where, filesystem=fs).num_rows) != s.rows:
                raise StoreError(f"{storage.display(path)}: {n} rows, manifest says {s.rows}")

    def read_shard(self, shard: ShardInfo, columns: Sequence[str]) -> pa.Table:
        """Columns of one shard, its page checksums verified and its row count checked against the manifest."""
        path = storage.join(self.root, shard.name)
        try:
            table = read_shard_table(path, columns, page_checksum_verification=True)
        except (pa.ArrowInvalid, OSError) as err:
            raise StoreError(f"{path}: cannot read shard (truncated or corrupt?): {err}") from None
        if table.num_rows != shard.rows:
            raise StoreError(f"{path}: {table.num_rows} rows, the manifest says {shard.rows} (corrupt or modified?)")
        for name in columns:
            if name.startswith("layer_") and getattr(table.schema.field(name).type, "list_size", None) != self.d_model:
                raise StoreError(
                    f"{path}: column {name} is {table.schema.field(name).type}, not {self.d_model} floats per row "
                    "as the manifest says (corrupt or modified?)"
                )
        return table

    def read(self, layer: int, *, limit: int | None = None) -> torch.Tensor:
        """All rows of ``layer`` (up to ``limit``) as one float32 tensor ``[rows, d_model]``."""
        column = self._check_layer(layer)
        parts, total = [], 0
        for s in self.manifest.shards:
            rows = _to_numpy(self.read_shard(s, [column]).column(column), self.d_model)
            parts.append(check_finite(rows, storage.join(self.root, s.name), column))
            total += parts[-1].shape[0]
            if limit is not None and total >= limit:
                break
        out = np.concatenate(parts) if parts else np.zeros((0, self.d_model))
        return torch.from_numpy(out[:limit].astype(np.float32))

    def read_column(self, name: str) -> np.ndarray:
        """A scalar column (``token_id``, ``context``, ``position``) over all shards."""
        return np.concatenate([self.read_shard(s, [name]).column(name).to_numpy() for s in self.manifest.shards])

    def rank_rows(self, rank: int, world_size: int, *, drop_last: bool = True) -> int:
        """Rows rank ``rank`` of ``world_size`` reads per epoch (equal on every rank when ``drop_last``)."""
        if not 0 <= rank < world_size:
            raise StoreError(f"rank {rank} is outside world_size {world_size}")
        base, extra = divmod(len(self), world_size)
        return base + (0 if drop_last or rank >= extra else 1)

    def batches_per_epoch(self, batch_size: int, *, world_size: int = 1, drop_last: bool = True) -> int:
        """Batches each rank gets from :meth:`iter_batches` (with ``drop_last``, the same on every rank)."""
        rows = self.rank_rows(0, world_size, drop_last=drop_last)
        return rows // batch_size if drop_last else -(-rows // batch_size)

    def _rank_slices(
        self, rank: int, world_size: int, order: list[ShardInfo], drop_last: bool
    ) -> list[tuple[ShardInfo, int, int]]:
        """``(shard, start, stop)`` row ranges of rank ``rank``: a contiguous, equal share of ``order``."""
        sizes = [self.rank_rows(r, world_size, drop_last=drop_last) for r in range(world_size)]
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        out, offset = [], 0
        for s in order:
            a, b = max(lo, offset), min(hi, offset + s.rows)
            if a < b:
                out.append((s, a - offset, b - offset))
            offset += s.rows
        return out

    def iter_batches(
        self,
        layer: int,
        batch_size: int,
        *,
        shuffle_window: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        drop_last: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Float32 batches ``[batch_size, d_model]`` of ``layer`` for training rank ``rank`` of
        ``world_size``: shards are put in a seeded per-epoch order and every rank reads an equal,
        contiguous share of the rows (so with ``drop_last`` every rank yields the same number of
        batches, :meth:`batches_per_epoch`, whatever ``world_size``); rows are shuffled within a window
        of ``shuffle_window`` rows (0: no shuffling, shards in order)."""
        column = self._check_layer(layer)
        if batch_size < 1:
            raise StoreError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise StoreError(f"rank {rank} is outside world_size {world_size}")
        rng = random.Random(seed * 1_000_003 + epoch)
        shards = list(self.manifest.shards)
        if shuffle_window:
            rng.shuffle(shards)
        buffer = np.zeros((0, self.d_model), dtype=np.float32)
        window = max(shuffle_window, batch_size)
        np_rng = np.random.default_rng(rng.getrandbits(63))
        for s, start, stop in self._rank_slices(rank, world_size, shards, drop_last):
            rows = _to_numpy(self.read_shard(s, [column]).column(column), self.d_model)[start:stop]
            check_finite(rows, storage.join(self.root, s.name), column)
            buffer = np.concatenate([buffer, rows.astype(np.float32)])
            if shuffle_window and len(buffer) >= window:
                buffer = buffer[np_rng.permutation(len(buffer))]
            while len(buffer) >= window:
                yield torch.from_numpy(buffer[:batch_size].copy())
                buffer = buffer[batch_size:]
        if shuffle_window:
            buffer = buffer[np_rng.permutation(len(buffer))]
        while len(buffer) >= batch_size or (len(buffer) and not drop_last):
            yield torch.from_numpy(buffer[:batch_size].copy())
            buffer = buffer[batch_size:]

    def ray_dataset(self, layers: Sequence[int] | None = None):
        """The store as a Ray Dataset (one row per token; a ``layer_{L}`` column per layer)."""
        import ray.data

        columns = [self._check_layer(layer) for layer in (layers or self.layers)]
        fs, _ = storage.resolve(self.root)
        paths = [storage.resolve(storage.join(self.root, s.name))[1] for s in self.manifest.shards]
        return ray.data.read_parquet(paths, columns=columns, filesystem=fs)

    def stats(self, layer: int) -> dict[str, Any]:
        key = str(layer)
        if key not in self.manifest.stats:
            raise StoreError(f"{self.root}: no statistics for layer {layer}")
        return self.manifest.stats[key]

    def bytes_per_token(self) -> float:
        total = sum(storage.size(storage.join(self.root, s.name)) for s in self.manifest.shards)
        return total / max(len(self), 1)


__all__ = [
    "ActivationStore",
    "Manifest",
    "RunningStats",
    "ShardInfo",
    "StoreError",
    "StoreWriter",
    "check_finite",
    "check_values",
    "dtype_max",
]
