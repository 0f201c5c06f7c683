"""Where a batched BaseModel replica's time goes: tokens/s of the unsteered deployment at 1, 4 and 16
concurrent requests against a bare ``generate`` loop at the same batch (one torch thread, this process), and
the replica's own counters over each level: rows per forward, the share of the wall time it ran forwards
(``busy_s``), the time its batcher waited for a batch's sessions to come back (``gathered_s``), milliseconds
per forward, and how many forwards ran on the previous batch's cache as is (``batch_reused``, serve/engine.py).

    PYTHONPATH=. python benchmarks/serve_batching.py --sae DIR [--tokens 32]

What the replica does not spend in forwards (1 - busy) is the step round trips between it and the aggregator.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

COUNTERS = ("batches", "batched_rows", "gathered_s", "busy_s", "forwards", "batch_reused")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", type=Path, required=True, help="derive a 3-perspective VectorSet with this SAE")
    ap.add_argument("--registry-dir", type=Path, default=Path("/tmp/pluristeer-bench-registry"))
    ap.add_argument("--tokens", type=int, default=32, help="generated per request")
    ap.add_argument("--concurrency", default="1,4,16")
    args = ap.parse_args()

    from ray import serve  # after the sys.path fix above (this folder's serve.py would shadow the package)

    from benchmarks.serve import PROMPTS, _chat, _level, bare_loop, start_app
    from sae.lm import load_lm
    from serve.config import BASE, ServeConfig

    url, key, _, _ = start_app(
        sae=args.sae, vectors=None, registry_dir=args.registry_dir, samples=4, replica_cpus=0.25,
        tokens=args.tokens, prefix="batching", pooled=0, gather_s=None,
    )  # fmt: skip
    model, tok = load_lm("embedded")
    prompts = [_chat(tok, p) for p in PROMPTS]
    body = {"max_tokens": args.tokens, "temperature": 0, "ignore_eos": True, "perspectives": [], "backend": "replicas"}
    asyncio.run(_level(url, key, body, prompts, 1, 2))  # warm up
    handle = serve.get_deployment_handle(BASE, app_name=ServeConfig.app_name)
    print(f"{'c':>3s} {'tok/s':>7s} {'bare':>7s} {'ratio':>6s} {'rows/fw':>7s} {'busy':>5s} {'ms/fw':>6s} "
          f"{'gather s':>8s} {'reused':>6s}")  # fmt: skip
    for c in [int(x) for x in args.concurrency.split(",")]:
        n = max(4, 2 * c)
        before = handle.stats.remote().result(timeout_s=60)
        wall = asyncio.run(_level(url, key, body, prompts, c, n)).wall
        after = handle.stats.remote().result(timeout_s=60)
        d = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
        bare = bare_loop(model, tok, prompts, c, args.tokens)
        tps = n * args.tokens / wall
        print(f"{c:3d} {tps:7.1f} {bare:7.1f} {tps / bare:5.2f}x {d['batched_rows'] / max(1, d['batches']):7.2f} "
              f"{d['busy_s'] / wall:5.0%} {1000 * d['busy_s'] / max(1, d['forwards']):6.1f} {d['gathered_s']:8.2f} "
              f"{d['batch_reused']:6d}")  # fmt: skip
    serve.shutdown()


if __name__ == "__main__":
    main()
