"""The activation store on a local S3 server vs on local disk: collection and SAE-training throughput of the
same runs, side by side, printed as ratios (S3 / local; the goal is >= 0.9x for both).

The S3 server is ``moto[server]`` on 127.0.0.1 (tests/s3_server.py), a single Python process on the same
cores as the work, so it is a pessimistic stand-in for a real object store. Each round runs the local and
the S3 variant back to back (their order alternating between rounds, since load from other processes on a
shared machine drifts); ratios are medians over rounds.

- collect: ``pluristeer collect`` into ``out`` = a local directory / ``s3://bucket/store-r``; the rate is
  the steady-state tokens/s (first finished shard to last, as benchmarks/collect.py) and end to end.
- stream: the training reader alone (``ActivationStore.iter_batches``, one epoch, shuffled as training
  reads it) in this process: what the medium can feed; training is I/O-bound only where this is slower
  than training's own rate.
- train: ``pluristeer train`` (Ray Train, ``workers`` ranks) reading the store written by the same round's
  collect, its checkpoints and SAE directories on the same medium; the rate is the workers' last reported
  tokens/s (the last ``log_every`` steps: noisy on a shared machine) and tokens over the driver's wall time.
  A checkpoint is uploaded synchronously inside ``ray.train.report``: with ``--checkpoint-every`` small,
  the intervals that hold one also time the upload (an 8x SAE on d=576 with Adam state is ~64 MB).

    PYTHONPATH=. python benchmarks/storage.py --n-tokens 16256 --rounds 2
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.collect import CollectConfig, collect
from pipelines.store import ActivationStore
from pipelines.train import TrainConfig, run_train
from sae import storage
from tests.s3_server import S3Server


def _collect(args: argparse.Namespace, out: storage.Location) -> dict[str, float]:
    cfg = CollectConfig(
        model=args.model,
        layers=[args.layer],
        context_size=args.context_size,
        n_tokens=args.n_tokens,
        batch_size=args.batch_size,
        contexts_per_shard=args.contexts_per_shard,
        store_dtype=args.store_dtype,
        out=out,  # type: ignore[arg-type]
        torch_threads=args.threads,
        device="cpu",
        wandb=False,
    )
    cfg.validate()
    started = time.perf_counter()
    result = collect(cfg, echo=lambda line: None)
    wall = time.perf_counter() - started
    times = sorted(result.shard_times, key=lambda t: t["finished"])
    intervals = [b["finished"] - a["finished"] for a, b in itertools.pairwise(times)]
    return {
        "steady_tok_s": sum(t["tokens"] for t in times[1:]) / sum(intervals),
        "end_to_end_tok_s": result.tokens_computed / wall,
        "wall_s": wall,
        "bytes_per_token": result.bytes_per_token,
    }


def _stream(args: argparse.Namespace, store: storage.Location) -> dict[str, float]:
    started = time.perf_counter()
    rows = sum(len(b) for b in ActivationStore(store).iter_batches(args.layer, args.train_batch, shuffle_window=8192))
    return {"tok_s": rows / (time.perf_counter() - started)}


def _train(args: argparse.Namespace, store: storage.Location, out: storage.Location) -> dict[str, float]:
    cfg = TrainConfig.from_dict(
        {
            "store": str(store),
            "expansions": [args.expansion],
            "k": 32,
            "batch_size": args.train_batch,
            "n_tokens": args.train_tokens,
            "shuffle_window": 8192,
            "workers": args.workers,
            "checkpoint_every": args.checkpoint_every,
            "log_every": args.log_every,
            "out": str(out),
            "eval_tokens": 0,
            "track": False,
        }
    )
    started = time.perf_counter()
    result = run_train(cfg)
    wall = time.perf_counter() - started
    return {"worker_tok_s": float(result.report["tokens_per_s"]), "end_to_end_tok_s": result.tokens / wall}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n-tokens", type=int, default=16256)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--contexts-per-shard", type=int, default=16)
    parser.add_argument("--store-dtype", default="float16")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per actor (0: all cores)")
    parser.add_argument("--expansion", type=float, default=8.0)
    parser.add_argument("--train-batch", type=int, default=1024)
    parser.add_argument("--train-tokens", type=int, default=40960, help="a multiple of log-every x train-batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps (100: the product's default)")
    parser.add_argument("--log-every", type=int, default=10, help="steps; the rate is the last interval's")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rounds: list[dict[str, float]] = []
    with S3Server() as server:
        os.environ.update(server.env)  # before Ray starts: its workers inherit the endpoint and credentials
        bucket = server.create_bucket("storage-bench")
        print(f"S3 server (moto) at {server.endpoint}; local disk under {tmp}; load {os.getloadavg()[0]:.2f}")
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            for r in range(args.rounds):
                media = {"local": tmp / f"r{r}", "s3": f"{bucket}/r{r}"}
                order = ["local", "s3"] if r % 2 == 0 else ["s3", "local"]
                row: dict[str, float] = {}
                for medium in order:
                    got = _collect(args, storage.join(media[medium], "store"))
                    row.update({f"collect_{medium}_{k}": v for k, v in got.items()})
                for medium in order:
                    got = _stream(args, storage.join(media[medium], "store"))
                    row.update({f"stream_{medium}_{k}": v for k, v in got.items()})
                for medium in order:
                    root = media[medium]
                    got = _train(args, storage.join(root, "store"), storage.join(root, "train"))
                    row.update({f"train_{medium}_{k}": v for k, v in got.items()})
                for stage, rate in (("collect", "steady_tok_s"), ("collect", "end_to_end_tok_s"), ("stream", "tok_s"),
                                    ("train", "worker_tok_s"), ("train", "end_to_end_tok_s")):  # fmt: skip
                    row[f"ratio_{stage}_{rate}"] = row[f"{stage}_s3_{rate}"] / row[f"{stage}_local_{rate}"]
                row["load"] = os.getloadavg()[0]
                rounds.append(row)
                print(
                    f"round {r} ({' then '.join(order)}): collect steady local {row['collect_local_steady_tok_s']:.0f}"
                    f" / s3 {row['collect_s3_steady_tok_s']:.0f} tok/s (x{row['ratio_collect_steady_tok_s']:.3f}); "
                    f"stream local {row['stream_local_tok_s']:.0f} / s3 {row['stream_s3_tok_s']:.0f} tok/s "
                    f"(x{row['ratio_stream_tok_s']:.3f}); "
                    f"train local {row['train_local_worker_tok_s']:.0f} / s3 {row['train_s3_worker_tok_s']:.0f} tok/s"
                    f" (x{row['ratio_train_worker_tok_s']:.3f}) | load {row['load']:.1f}"
                )
        finally:
            ray.shutdown()
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"S3/local ratios, medians of {len(rounds)} rounds (goal >= 0.9):")
    print(f"  collect, steady state:                  {summary['ratio_collect_steady_tok_s']:.3f}")
    print(f"  collect, end to end incl. start-up:     {summary['ratio_collect_end_to_end_tok_s']:.3f}")
    print(f"  the training reader alone:              {summary['ratio_stream_tok_s']:.3f}")
    print(f"  train, workers' tokens/s:               {summary['ratio_train_worker_tok_s']:.3f}")
    print(f"  train, end to end incl. Ray Train start: {summary['ratio_train_end_to_end_tok_s']:.3f}")
    print(f"bytes/token of the store: {summary['collect_local_bytes_per_token']:.0f} ({args.store_dtype})")
    if args.json:
        report = {"summary": summary, "rounds": rounds, "args": vars(args)}
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
