"""Build a small activation store for SAE-training tests and benchmarks (not the collection product).

Packs corpus text into contexts, reads the residual stream at ``layer`` with :func:`sae.hooks.residuals`,
drops position 0 and rows whose norm exceeds ``outlier`` × the batch median (SmolLM2's attention-sink
position is ~100× the median), and writes Parquet shards with :mod:`pipelines.store`. ``pipelines.collect``
(Ray Data) is the real collection stage; this is a single-process stand-in for development.

    PYTHONPATH=. python benchmarks/make_store.py --out /tmp/store-L15 --layer 15 --tokens 200000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.contexts import iter_contexts
from pipelines.corpus import iter_documents
from pipelines.store import ActivationStore, Manifest, RunningStats, StoreWriter, write_shard
from sae.hooks import residuals


def make_store(
    model: Any,
    tokenizer: Any,
    out: str | Path,
    *,
    layer: int,
    n_tokens: int,
    corpus: str | Path,
    context_size: int = 128,
    batch_size: int = 16,
    shard_rows: int = 50_000,
    outlier: float = 10.0,
    dtype: str = "float16",
    skip_contexts: int = 0,
    model_name: str = "model",
) -> ActivationStore:
    """Write (or finish) a store of ``n_tokens`` rows of layer ``layer`` at ``out``."""
    d_model = int(model.config.hidden_size)
    manifest = Manifest(
        model=model_name, layers=[layer], d_model=d_model, dtype=dtype, context_size=context_size, n_tokens=n_tokens
    )
    writer = StoreWriter(out, manifest)
    if writer.manifest.complete:
        return ActivationStore(out)
    stats = RunningStats(d_model)
    contexts = iter_contexts(tokenizer, iter_documents(corpus), context_size)  # as collection packs
    for _ in range(skip_contexts):
        next(contexts)
    rows: list[np.ndarray] = []
    extra: dict[str, list[np.ndarray]] = {"token_id": [], "context": [], "position": []}
    pending, written, shard, dropped, ctx_index = 0, 0, 0, 0, skip_contexts
    start = time.perf_counter()

    def flush() -> None:
        nonlocal rows, extra, pending, written, shard
        acts = np.concatenate(rows)
        cols = {k: np.concatenate(v) for k, v in extra.items()}
        writer.record(write_shard(out, shard, {layer: acts}, cols, dtype))
        stats.update(acts.astype(np.float32))
        written += len(acts)
        shard += 1
        rows, extra, pending = [], {"token_id": [], "context": [], "position": []}, 0

    while written + pending < n_tokens:
        batch = [c for _, c in zip(range(batch_size), contexts, strict=False)]
        if not batch:
            raise ValueError(f"the corpus {corpus} ran out after {written + pending} tokens")
        ids = torch.from_numpy(np.stack(batch).astype(np.int64))
        h = residuals(model, [layer], ids)[layer][:, 1:].float()  # drop position 0
        norms = h.norm(dim=-1)
        keep = norms <= outlier * norms.median()
        dropped += int((~keep).sum())
        pos = torch.arange(1, context_size).expand(len(batch), -1)
        ctx = (torch.arange(len(batch)) + ctx_index)[:, None].expand(-1, context_size - 1)
        ctx_index += len(batch)
        take = min(int(keep.sum()), n_tokens - written - pending)
        rows.append(h[keep][:take].numpy().astype(dtype))
        extra["token_id"].append(ids[:, 1:][keep][:take].numpy().astype(np.int32))
        extra["context"].append(ctx[keep][:take].numpy().astype(np.int64))
        extra["position"].append(pos[keep][:take].numpy().astype(np.int16))
        pending += take
        if pending >= shard_rows or written + pending >= n_tokens:
            flush()
            rate = written / (time.perf_counter() - start)
            print(f"[make_store] {written}/{n_tokens} rows ({rate:.0f} tok/s)", flush=True)
    writer.finalize({str(layer): stats.to_dict()}, {"position_0": True, "outlier_factor": outlier, "outliers": dropped})
    return ActivationStore(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--skip-contexts", type=int, default=0)
    parser.add_argument("--corpus", default=None, help="default: $PLURISTEER_DATA/corpus")
    args = parser.parse_args()
    from pipelines.datasets import data_dir
    from sae.lm import load_lm, model_name

    model, tok = load_lm(args.model)
    corpus = args.corpus or str(data_dir() / "corpus")
    make_store(
        model,
        tok,
        args.out,
        layer=args.layer,
        n_tokens=args.tokens,
        corpus=corpus,
        context_size=args.context_size,
        skip_contexts=args.skip_contexts,
        model_name=model_name(model),
    )


if __name__ == "__main__":
    main()
