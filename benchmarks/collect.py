"""Ray collection pipeline vs a bare loop: tokens/s of each, their ratio, and bytes/token written.

The bare loop calls the same model on the same context batches in this process (no Ray, no I/O), with
the same early stop after the deepest layer (``sae.hooks.residuals``) and the same intra-op threads; a
full forward (no early stop) is timed too for reference. The bare loop runs before and after the Ray run
(bracketing load from other processes) and the ratio uses their mean. Ray's rate is reported end to end
(Ray start, actor start and model load included) and in steady state (from the first finished shard to
the last, as the actors time them).

    PYTHONPATH=. python benchmarks/collect.py --model embedded --layers 15 --n-tokens 65536
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.collect import CollectConfig, collect, corpus_dir
from pipelines.contexts import plan_contexts
from pipelines.corpus import iter_documents
from sae.hooks import capture, residuals
from sae.lm import load_lm


def bare_loop(
    model, layers: list[int], contexts: torch.Tensor, batch_size: int, per_shard: int, *, early_stop: bool
) -> tuple[float, list[float]]:
    """Tokens/s of forwards over ``contexts`` in batches (activations read, then dropped), and the
    seconds each shard's worth (``per_shard`` contexts) took."""
    shard_s: list[float] = []
    started = last = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(contexts), batch_size):
            ids = contexts[start : start + batch_size]
            if early_stop:
                residuals(model, layers, ids)
            else:
                with capture(model, layers):
                    model(input_ids=ids, use_cache=False)
            if (start + batch_size) % per_shard == 0:
                now = time.perf_counter()
                shard_s.append(now - last)
                last = now
    return contexts.numel() / (time.perf_counter() - started), shard_s


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--layers", default="15", help="comma-separated, e.g. 6,15")
    parser.add_argument("--n-tokens", type=int, default=65536)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--contexts-per-shard", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument("--store-dtype", default="float16")
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores / actors)")
    parser.add_argument("--out", type=Path, default=None, help="store directory (default: a temp dir, deleted)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    layers = [int(x) for x in args.layers.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or max(1, cores // args.num_actors)
    tmp = Path(tempfile.mkdtemp(prefix="collect-bench-"))
    out = args.out or tmp / "store"
    cfg = CollectConfig(
        model=args.model,
        layers=layers,
        context_size=args.context_size,
        n_tokens=args.n_tokens,
        batch_size=args.batch_size,
        contexts_per_shard=args.contexts_per_shard,
        dtype=args.dtype,
        store_dtype=args.store_dtype,
        out=out,
        num_actors=args.num_actors,
        torch_threads=threads,
        device="cpu",
        wandb=False,
    )
    cfg.validate()

    model, tokenizer = load_lm(args.model, dtype=cfg.dtype)
    torch.set_num_threads(threads)
    n_shards = -(-args.n_tokens // cfg.rows_per_full_shard)
    contexts = torch.from_numpy(
        plan_contexts(tokenizer, iter_documents(corpus_dir(cfg)), cfg.context_size, n_shards * cfg.contexts_per_shard)
    ).long()
    print(f"{args.model} layers {layers}: {len(contexts)} contexts x {cfg.context_size} tokens, {threads} threads")
    k = cfg.contexts_per_shard
    bare_loop(model, layers, contexts[: args.batch_size], args.batch_size, k, early_stop=True)  # warm-up
    print(f"load average before: {os.getloadavg()[0]:.2f} (the machine is shared)")
    bare_before, shards_before = bare_loop(model, layers, contexts, args.batch_size, k, early_stop=True)
    print(f"bare loop (early stop):   {bare_before:8.0f} tok/s")
    full_n = max(k, len(contexts) // 4 // k * k)
    bare_full, _ = bare_loop(model, layers, contexts[:full_n], args.batch_size, k, early_stop=False)
    print(f"bare loop (full forward): {bare_full:8.0f} tok/s  (on {full_n} contexts)")

    import ray

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        result = collect(cfg, echo=lambda line: None)
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    times = sorted(result.shard_times, key=lambda t: t["finished"])
    steady_tokens = sum(t["tokens"] for t in times[1:])
    steady = steady_tokens / (times[-1]["finished"] - times[0]["finished"]) if len(times) > 1 else float("nan")
    intervals = [b["finished"] - a["finished"] for a, b in itertools.pairwise(times)]
    end_to_end = result.tokens_computed / wall
    in_actor = result.tokens_computed / sum(t["forward_s"] for t in times)
    print(f"ray pipeline end to end:  {end_to_end:8.0f} tok/s  ({wall:.1f} s incl. Ray + actor start + model load)")
    print(f"ray pipeline steady:      {steady:8.0f} tok/s  (first to last finished shard)")
    print(f"ray actor compute only:   {in_actor:8.0f} tok/s  (forward + filter + stats, no write)")

    bare_after, shards_after = bare_loop(model, layers, contexts, args.batch_size, k, early_stop=True)
    print(f"bare loop (early stop):   {bare_after:8.0f} tok/s  (again, after the Ray run)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    bare = (bare_before + bare_after) / 2
    # Medians of per-shard times are robust to bursts of load from other processes (1 actor).
    median_ratio = statistics.median(shards_before + shards_after) / statistics.median(intervals or [float("nan")])
    numbers = {
        "bare_tok_s": bare,
        "bare_full_forward_tok_s": bare_full,
        "ray_steady_tok_s": steady,
        "ray_end_to_end_tok_s": end_to_end,
        "ray_actor_compute_tok_s": in_actor,
        "ratio_steady": steady / bare,
        "ratio_end_to_end": end_to_end / bare,
        "ratio_vs_full_forward": steady / bare_full,
        "ratio_median_per_shard": median_ratio,
        "bytes_per_token": result.bytes_per_token,
        "rows": result.manifest.rows,
        "threads": threads,
    }
    print(f"ratio ray/bare (steady):     {numbers['ratio_steady']:.3f}")
    print(f"ratio ray/bare (end to end): {numbers['ratio_end_to_end']:.3f}")
    print(f"ratio ray/bare (median s/shard): {median_ratio:.3f}")
    print(f"ratio ray/bare full forward: {numbers['ratio_vs_full_forward']:.3f}  (early stop vs a full forward)")
    print(f"bytes/token written:         {numbers['bytes_per_token']:.0f}  ({cfg.store_dtype}, {len(layers)} layer(s))")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return numbers


if __name__ == "__main__":
    main()
