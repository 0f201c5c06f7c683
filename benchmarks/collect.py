"""Ray collection pipeline vs a bare loop: tokens/s of each, their ratio, and bytes/token written.

The bare loop calls the same model on the same context batches in this process (no Ray, no I/O), with
the same early stop after the deepest layer (``sae.hooks.residuals``) and the same intra-op threads; a
full forward (no early stop) is timed too for reference. The bare loop and the Ray run alternate
in rounds (load from other processes on a shared machine drifts) and the ratio is the median
over rounds. Ray's rate is reported end to end (Ray start, actor start and model load included) and in
steady state (from the first finished shard to the last), with the share of that time the actor spent
in the forward (the rest is Ray dispatch and shard writing).

    PYTHONPATH=. python benchmarks/collect.py --model embedded --layers 15 --n-tokens 16256 --rounds 3
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
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.collect import CollectConfig, collect, corpus_dir
from pipelines.contexts import plan_contexts
from pipelines.corpus import iter_documents
from sae.hooks import capture, residuals
from sae.lm import load_lm


def bare_loop(
    model, layers: list[int], contexts: torch.Tensor, batch_size: int, *, early_stop: bool
) -> tuple[float, list[float]]:
    """Tokens/s of forwards over ``contexts`` in batches (activations read, then dropped), overall and
    per batch."""
    per_batch: list[float] = []
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(contexts), batch_size):
            ids = contexts[start : start + batch_size]
            t0 = time.perf_counter()
            if early_stop:
                residuals(model, layers, ids)
            else:
                with capture(model, layers):
                    model(input_ids=ids, use_cache=False)
            per_batch.append(ids.numel() / (time.perf_counter() - t0))
    return contexts.numel() / (time.perf_counter() - started), per_batch


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
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare / Ray rounds")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    layers = [int(x) for x in args.layers.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or max(1, cores // args.num_actors)
    tmp = Path(tempfile.mkdtemp(prefix="collect-bench-"))
    cfg = CollectConfig(
        model=args.model,
        layers=layers,
        context_size=args.context_size,
        n_tokens=args.n_tokens,
        batch_size=args.batch_size,
        contexts_per_shard=args.contexts_per_shard,
        dtype=args.dtype,
        store_dtype=args.store_dtype,
        out=tmp / "store",
        num_actors=args.num_actors,
        torch_threads=threads,
        device="cpu",
        wandb=False,
    )
    cfg.validate()

    model, tokenizer = load_lm(args.model, dtype=cfg.dtype)
    torch.set_num_threads(threads)
    k = cfg.contexts_per_shard
    n_shards = -(-args.n_tokens // cfg.rows_per_full_shard)
    contexts = torch.from_numpy(
        plan_contexts(tokenizer, iter_documents(corpus_dir(cfg)), cfg.context_size, n_shards * k)
    ).long()
    print(f"{args.model} layers {layers}: {len(contexts)} contexts x {cfg.context_size} tokens, {threads} threads")
    print(f"load average: {os.getloadavg()[0]:.2f} (the machine is shared: rounds alternate bare and Ray)")
    bare_loop(model, layers, contexts[: args.batch_size], args.batch_size, early_stop=True)  # warm-up
    full_n = max(k, len(contexts) // 4 // k * k)
    bare_full, _ = bare_loop(model, layers, contexts[:full_n], args.batch_size, early_stop=False)
    bare_early, _ = bare_loop(model, layers, contexts[:full_n], args.batch_size, early_stop=True)
    print(f"bare full forward {bare_full:.0f} tok/s vs early stop {bare_early:.0f} tok/s (on {full_n} contexts)")

    import ray

    rounds = []
    for r in range(args.rounds):
        bare, bare_rates = bare_loop(model, layers, contexts, args.batch_size, early_stop=True)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            started = time.perf_counter()
            result = collect(replace(cfg, out=tmp / f"store-{r}"), echo=lambda line: None)
            wall = time.perf_counter() - started
        finally:
            ray.shutdown()
        times = sorted(result.shard_times, key=lambda t: t["finished"])
        intervals = [b["finished"] - a["finished"] for a, b in itertools.pairwise(times)]
        steady = sum(t["tokens"] for t in times[1:]) / sum(intervals)
        rounds.append(
            {
                "bare_tok_s": bare,
                "ray_steady_tok_s": steady,
                "ray_end_to_end_tok_s": result.tokens_computed / wall,
                "ray_compute_tok_s": result.tokens_computed / sum(t["forward_s"] for t in times),
                "ratio_steady": steady / bare,
                "ratio_median_shard": statistics.median(
                    b["tokens"] / (b["finished"] - a["finished"]) for a, b in itertools.pairwise(times)
                )
                / statistics.median(bare_rates),
                "ratio_end_to_end": result.tokens_computed / wall / bare,
                "ray_busy": sum(t["forward_s"] for t in times[1:]) / sum(intervals),
                "bytes_per_token": result.bytes_per_token,
                "load": os.getloadavg()[0],
            }
        )
        row = rounds[-1]
        print(
            f"round {r}: bare {bare:6.0f} tok/s | ray steady {steady:6.0f}, end to end "
            f"{row['ray_end_to_end_tok_s']:.0f} ({wall:.0f} s with start-up) | ratio {row['ratio_steady']:.3f} "
            f"(median/shard {row['ratio_median_shard']:.3f}) | actor busy {100 * row['ray_busy']:.1f}% "
            f"| load {row['load']:.1f}"
        )
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    summary.update({"bare_full_forward_tok_s": bare_full, "bare_early_stop_tok_s": bare_early, "threads": threads})
    print(f"ratio ray/bare steady (median of {len(rounds)} rounds): {summary['ratio_steady']:.3f}")
    print(f"ratio ray/bare end to end incl. start-up:            {summary['ratio_end_to_end']:.3f}")
    print(f"actor busy in the forward (1 - Ray/I-O overhead):   {100 * summary['ray_busy']:.1f}%")
    print(f"ray steady vs bare full forward:                     {summary['ray_steady_tok_s'] / bare_full:.3f}")
    print(f"bytes/token written: {summary['bytes_per_token']:.0f} ({cfg.store_dtype}, {len(layers)} layer(s))")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
