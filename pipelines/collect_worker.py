"""The model actor of activation collection: one model per actor, one shard per call.

``ResidualWorker`` is the callable class handed to Ray Data's ``map_batches``. Each call gets whole
shards (``shard`` index + planned ``input_ids``), runs the LM up to the deepest requested layer in
mini-batches, drops BOS and outlier-norm positions, writes the shard atomically (its statistics and
drop counts in the Parquet footer; :func:`pipelines.store.write_shard` checks the values are finite and
within the store dtype's range first) and returns one small row per shard for the driver to record.
:func:`probe_range` measures the residuals' range on a few contexts, for ``store_dtype: auto``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipelines.store import STORE_DTYPES, RunningStats, StoreError, check_values, write_shard
from sae.hooks import residuals
from sae.lm import load_lm


def actor_threads(threads: int, actors_per_node: int) -> int:
    """Intra-op threads of one model actor on CPU: ``threads``, or this node's cores shared by its actors."""
    if threads > 0:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, actors_per_node))


@dataclass
class WorkerSpec:
    """What an actor needs (plain values: it travels to the actor when the pool starts)."""

    model: str
    layers: list[int]
    dtype: str  # compute dtype
    store_dtype: str
    out: str
    batch_size: int
    contexts_per_shard: int
    outlier_factor: float
    compression: str = "zstd"
    device: str = "cpu"
    threads: int = 0  # intra-op threads on CPU; 0: this node's cores / actors_per_node
    actors_per_node: int = 1

    def cpu_threads(self) -> int:
        return actor_threads(self.threads, self.actors_per_node)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_positions(norms: torch.Tensor, outlier_factor: float) -> tuple[torch.Tensor, int]:
    """Which positions to keep, from residual norms ``[contexts, positions, layers]``.

    Position 0 (BOS) is always dropped; a later position is an outlier when, at any of the layers, its
    norm exceeds ``outlier_factor`` times the median norm of positions 1.. of its context
    (``outlier_factor <= 0`` keeps them all). Returns ``(keep [contexts, positions], n_outliers)``.
    """
    keep = torch.ones(norms.shape[:2], dtype=torch.bool, device=norms.device)
    keep[:, 0] = False
    if outlier_factor <= 0 or norms.shape[1] < 2:
        return keep, 0
    median = norms[:, 1:].median(dim=1).values  # [contexts, layers]
    outlier = (norms > outlier_factor * median[:, None, :]).any(dim=-1)
    outlier[:, 0] = False
    return keep & ~outlier, int(outlier.sum())


class ResidualWorker:
    """Ray Data UDF: ``{"shard": [k], "input_ids": [k, contexts, ctx]}`` -> one result row per shard."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = WorkerSpec(**spec)
        if self.spec.device == "cpu":
            torch.set_num_threads(self.spec.cpu_threads())
        self.model, _ = load_lm(self.spec.model, dtype=self.spec.dtype, device=self.spec.device)
        self.node = _node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.guarded(int(i), ids) for i, ids in zip(batch["shard"], batch["input_ids"], strict=True)]
        return {key: np.asarray([r[key] for r in rows]) for key in rows[0]}

    def guarded(self, index: int, input_ids: np.ndarray) -> dict[str, Any]:
        """:meth:`process`, with a :class:`StoreError` (values refused before writing) returned in the row's
        ``error`` field: Ray Data would hand the driver only its traceback text."""
        try:
            return {**self.process(index, input_ids), "error": ""}
        except StoreError as err:
            blank = {"shard": index, "name": "", "rows": 0, "sha256": "", "tokens": 0, "bos": 0, "outlier": 0}
            return {**blank, "node": self.node, "pid": os.getpid(), "started": 0.0, "finished": 0.0,
                    "forward_s": 0.0, "error": str(err)}  # fmt: skip

    @torch.inference_mode()
    def forward(self, input_ids: np.ndarray) -> tuple[dict[int, torch.Tensor], torch.Tensor, int]:
        """Kept residual rows per layer (float32, on CPU: :meth:`process` checks their range, then casts),
        the keep mask, and the outlier count."""
        spec = self.spec
        ids = torch.tensor(input_ids, dtype=torch.long, device=spec.device)  # a copy: Ray's batch is read-only
        res = residuals(self.model, spec.layers, ids)
        norms = torch.stack([res[layer].float().norm(dim=-1) for layer in spec.layers], dim=-1)
        keep, n_outliers = select_positions(norms, spec.outlier_factor)
        kept = {layer: res[layer][keep].float().cpu() for layer in spec.layers}
        return kept, keep.cpu(), n_outliers

    def process(self, index: int, input_ids: np.ndarray) -> dict[str, Any]:
        """Compute, filter and write shard ``index`` (``input_ids``: ``[contexts, ctx]``)."""
        spec = self.spec
        started = time.time()
        first_context = index * spec.contexts_per_shard
        acts: dict[int, list[np.ndarray]] = {layer: [] for layer in spec.layers}
        token_id, context, position = [], [], []
        outliers = 0
        for start in range(0, len(input_ids), spec.batch_size):
            chunk = input_ids[start : start + spec.batch_size]
            kept, keep, n_out = self.forward(chunk)
            outliers += n_out
            for layer in spec.layers:
                acts[layer].append(kept[layer].numpy())
            rows, pos = keep.nonzero(as_tuple=True)
            token_id.append(chunk[rows.numpy(), pos.numpy()].astype(np.int32))
            context.append(rows.numpy().astype(np.int64) + first_context + start)
            position.append(pos.numpy().astype(np.int16))
        forward_s = time.time() - started
        full = {layer: np.concatenate(parts) for layer, parts in acts.items()}
        check_values(index, full, spec.store_dtype)  # before the cast: float16 would turn overflow into inf
        full = {layer: a.astype(STORE_DTYPES[spec.store_dtype], copy=False) for layer, a in full.items()}
        stats = {}
        for layer, a in full.items():
            s = RunningStats(a.shape[1])
            s.update(a)
            stats[str(layer)] = s.state()
        metadata = {
            "index": index,
            "first_context": first_context,
            "contexts": len(input_ids),
            "context_size": int(input_ids.shape[1]),
            "bos": len(input_ids),
            "outlier": outliers,
            "stats": stats,
        }
        extra = {
            "token_id": np.concatenate(token_id),
            "context": np.concatenate(context),
            "position": np.concatenate(position),
        }
        info = write_shard(
            spec.out, index, full, extra, spec.store_dtype, metadata=metadata, compression=spec.compression
        )
        return {
            "shard": index,
            "name": info.name,
            "rows": info.rows,
            "sha256": info.sha256,
            "tokens": int(input_ids.size),
            "bos": len(input_ids),
            "outlier": outliers,
            "node": self.node,
            "pid": os.getpid(),
            "started": started,
            "finished": time.time(),
            "forward_s": forward_s,
        }


def probe_range(spec: dict[str, Any], input_ids: np.ndarray) -> dict[str, Any]:
    """Per layer, the max ``|value|`` and the non-finite count of the kept residuals of ``input_ids``
    (``[contexts, ctx]``), computed as :class:`ResidualWorker` computes a shard."""
    worker = ResidualWorker(spec)
    peaks: dict[str, float] = {}
    nonfinite: dict[str, int] = {}
    for start in range(0, len(input_ids), worker.spec.batch_size):
        kept, _, _ = worker.forward(input_ids[start : start + worker.spec.batch_size])
        for layer, rows in kept.items():
            finite = torch.isfinite(rows)
            nonfinite[str(layer)] = nonfinite.get(str(layer), 0) + int((~finite).sum())
            peak = float(rows[finite].abs().max()) if finite.any() else 0.0
            peaks[str(layer)] = max(peaks.get(str(layer), 0.0), peak)
    return {"contexts": len(input_ids), "max_abs": peaks, "nonfinite": nonfinite}


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # outside Ray (e.g. a notebook calling the worker directly)
        return "local"


__all__ = ["ResidualWorker", "WorkerSpec", "probe_range", "select_positions"]
