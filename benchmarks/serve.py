"""Serving benchmark: tokens/s and request latency (p50/p99) at 1, 4 and 16 concurrent requests, over HTTP, for

  (a) the unsteered model alone           (BaseModel;                 perspectives: [])
  (b) one steered perspective             (one PerspectiveModel;      perspectives: [p0], mode mean)
  (c) PD, K=3, one replica per perspective (3 PerspectiveModels + BaseModel per step, fanned out; dvd)
  (d) PD, K=3, fused                      (FusedPlural: the 4 rows as one batch; dvd)
  (e) PD, K=3, pooled                     (3 of the ``--pooled`` perspectives on one PerspectivePool replica,
                                           the unsteered row with them; dvd)
  (f) PD, K=6, fused                      (with ``--pooled``: (d)'s 3 and (e)'s 3 as the 7 rows of one batch)

(a), (b), (d), (e) and (f) decode on their one replica (serve/fanout.py), (c) step by step from the aggregator.
Requests are streamed; ratios against (a) from the same run are per request (latency / tokens, prefill
included) and per later token (tpot: the time between streamed tokens after the first; ttft: to the
first), and (a)'s against a bare loop: a plain transformers ``generate`` of the same number of tokens at
batch = concurrency, in this process with one torch thread (what a replica gets). The scenarios and the
bare loop alternate in rounds at each concurrency, and each number is the median over the rounds, so load
from other processes on a shared machine hits them all alike. Also the
memory of each model replica (resident set, weights, KV caches), the pool's with all its perspectives.

    PYTHONPATH=. python benchmarks/serve.py --sae /tmp/acc/train/L15-topk-8x-k32 [--tokens 32 --rounds 3]
    PYTHONPATH=. python benchmarks/serve.py --vectors globalopinionqa-sae-fine --registry-dir ...

Every replica gets ``--replica-cpus`` (default 0.25) and one torch thread; one replica per deployment.
``--gather-s`` sets ``batch_gather_s`` (serve/batcher.py; 0 is the batching before it existed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `python benchmarks/serve.py` puts benchmarks/ first on sys.path, where this file would shadow the serve package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

PROMPTS = [
    "Write a short paragraph about the history of bread.",
    "Explain how a bicycle stays upright.",
    "Describe a walk through a forest in autumn.",
    "What makes a good teacher? Answer in a few sentences.",
    "Summarise the water cycle for a child.",
    "Give advice to someone starting to learn the piano.",
    "Describe the city you would most like to visit and why.",
    "Why do people keep pets? Discuss briefly.",
]


def _derive(sae_dir: Path, perspectives: int, samples: int):
    """A fine VectorSet from ``samples`` GlobalOpinionQA training records per perspective."""
    from pipelines.vectors import VectorConfig, config_pairs, derive_fine, resolve_layer, vector_sets
    from sae.lm import load_lm, model_name
    from sae.model import SparseAutoencoder

    cfg = VectorConfig(sae=sae_dir, task="globalopinionqa", samples=samples, max_perspectives=perspectives,
                       granularity="fine", publish=False, track=False)  # fmt: skip
    model, tok = load_lm("embedded")
    sae = SparseAutoencoder.load(sae_dir)
    layer = resolve_layer(cfg, sae)
    pairs = config_pairs(cfg, tok)
    readouts = derive_fine(cfg, model, tok, sae, layer, pairs)
    return vector_sets(cfg, readouts, model=model_name(model), layer=layer, sae=sae, extra={})["fine"]


def _with_pooled(vs: Any, total: int) -> Any:
    """``vs`` plus random sparse vectors up to ``total`` perspectives (``Pooled 000`` ...): a set the size of
    GlobalOpinionQA's countries, for the pool (the cost of steering does not depend on the values)."""
    import dataclasses

    import torch

    from sae.vectorset import VectorSet

    g = torch.Generator().manual_seed(0)
    vectors = dict(vs.vectors)
    scale = float(max(v.abs().max() for v in vectors.values()))
    for i in range(max(0, total - len(vectors))):
        v = torch.zeros(vs.meta.dim)
        v[torch.randperm(vs.meta.dim, generator=g)[:8]] = scale * torch.rand(8, generator=g)
        vectors[f"Pooled {i:03d}"] = v
    meta = dataclasses.replace(vs.meta, n_samples={p: vs.meta.n_samples.get(p, 1) for p in vectors})
    return VectorSet(vectors, meta)


def bare_loop(model: Any, tok: Any, prompts: list[str], batch: int, tokens: int) -> float:
    """Tokens/s of a plain ``generate`` of ``tokens`` greedy tokens for ``batch`` prompts (one torch thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        enc = tok([prompts[i % len(prompts)] for i in range(batch)], return_tensors="pt", padding=True,
                  add_special_tokens=False)  # fmt: skip
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return batch * tokens / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)


def _chat(tok: Any, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@dataclass
class Level:
    """One level's requests: whole-request seconds, time to the first token, time per later token (from the
    stream: (last token - first token) / (tokens - 1)), and the wall time of the level."""

    latencies: list[float]
    ttft: list[float]
    tpot: list[float]
    wall: float


async def _level(url: str, key: str, body: dict[str, Any], prompts: list[str], concurrency: int, requests: int):
    """``requests`` streamed generations, ``concurrency`` in flight at once (see :class:`Level`)."""
    import httpx

    queue = list(range(requests))
    out = Level([], [], [], 0.0)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            started = time.perf_counter()
            first = last = None
            tokens = 0
            payload = {**body, "prompt": prompts[i % len(prompts)], "stream": True,
                       "stream_options": {"include_usage": True}}  # fmt: skip
            async with client.stream("POST", url + "/v1/completions", json=payload) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"stream error: {chunk['error']}")
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0].get("text"):
                        last = time.perf_counter()
                        first = first or last
            assert tokens == body["max_tokens"], tokens
            out.latencies.append(time.perf_counter() - started)
            if first is not None and last is not None:
                out.ttft.append(first - started)
                out.tpot.append((last - first) / max(1, tokens - 1))

    limits = httpx.Limits(max_connections=concurrency + 4)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        out.wall = time.perf_counter() - started
        return out


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def start_app(
    *,
    sae: Path | None,
    vectors: str | None,
    registry_dir: Path,
    samples: int,
    replica_cpus: float,
    tokens: int,
    prefix: str,
    pooled: int = 0,
    gather_s: float | None = None,
) -> tuple[str, str, list[str], list[str]]:
    """A local Ray + Serve app on loopback (both backends, one replica per deployment, 3 perspectives with
    their own deployment, and with ``pooled`` a PerspectivePool serving the rest of a set of that size)
    serving ``vectors``, or a GlobalOpinionQA set derived from ``sae``; returns its URL, its key, the own
    perspectives and the pooled ones."""
    import ray
    from ray import serve

    from common.registry import RegistryClient
    from serve.app import build, resolve_perspectives
    from serve.config import ServeConfig

    key = f"{prefix}-" + os.urandom(8).hex()
    os.environ["PLURISTEER_API_KEYS"] = key  # before ray.init: the replicas inherit it
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
    name = vectors or f"{prefix}-gqa-fine"
    client = RegistryClient(registry_dir)
    if sae is not None:
        client.publish(_derive(sae, 3, samples), name)
    if pooled:
        name = f"{prefix}-pooled"
        client.publish(_with_pooled(client.get(vectors or f"{prefix}-gqa-fine"), pooled), name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fixed = {"num_replicas": 1, "max_ongoing_requests": 64}
    cfg = ServeConfig.from_dict(
        {
            "vectors": name, "registry_dir": str(registry_dir), "backend": "both", "port": port,
            "replica_cpus": replica_cpus, "aggregator_cpus": 0.25, "torch_threads": 1,
            "max_tokens_limit": max(tokens, 16), "max_perspectives": 6,
            "deployments": {n: fixed for n in ("PluralAggregator", "BaseModel", "PerspectiveModel", "FusedPlural",
                                               "PerspectivePool")},
            **({} if gather_s is None else {"batch_gather_s": gather_s}),
        }
    )  # fmt: skip
    everything = resolve_perspectives(cfg) if not pooled else client.get(name).perspectives
    perspectives = everything[:3]
    cfg = ServeConfig.from_dict({**cfg.to_dict(), "perspectives": perspectives, "pool": ["*"] if pooled else [],
                                 "max_perspectives": 6})  # fmt: skip
    rest = [p for p in everything if p not in perspectives] if pooled else []
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.perf_counter()
    serve.run(build(cfg, perspectives, rest), name=cfg.app_name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    seconds = time.perf_counter() - started
    print(f"app up in {seconds:.0f} s at {url}; perspectives {perspectives} + {len(rest)} pooled; "
          f"{os.cpu_count()} CPUs; batch_gather_s {cfg.batch_gather_s}")  # fmt: skip
    return url, key, perspectives, rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", type=Path, help="derive a 3-perspective VectorSet with this SAE (GlobalOpinionQA)")
    ap.add_argument("--vectors", help="or serve this registry key (needs --registry-dir or a running registry)")
    ap.add_argument("--registry-dir", type=Path, default=Path("/tmp/pluristeer-bench-registry"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="generated per request")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=0, help="per level and scenario (default max(4, 2*c))")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--replica-cpus", type=float, default=0.25)
    ap.add_argument("--pooled", type=int, default=120, help="perspectives in the set the pool serves (0: no pool)")
    ap.add_argument("--gather-s", type=float, help="batch_gather_s of the replicas (default: ServeConfig's)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    if (args.sae is None) == (args.vectors is None):
        ap.error("give exactly one of --sae and --vectors")

    import ray
    from ray import serve

    from sae.lm import load_lm
    from serve.config import BASE, FUSED, POOL, ServeConfig, perspective_deployment

    url, key, perspectives, pooled = start_app(
        sae=args.sae, vectors=args.vectors, registry_dir=args.registry_dir, samples=args.samples,
        replica_cpus=args.replica_cpus, tokens=args.tokens, prefix="bench", pooled=args.pooled,
        gather_s=args.gather_s,
    )  # fmt: skip

    model, tok = load_lm("embedded")
    prompts = [_chat(tok, p) for p in PROMPTS]
    common = {"max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
    scenarios = {
        "a": ("unsteered model", {**common, "perspectives": [], "backend": "replicas"}),
        "b": ("one steered perspective", {**common, "perspectives": perspectives[:1], "backend": "replicas",
                                          "decoding": {"mode": "mean"}}),
        "c": ("PD K=3, replica per perspective", {**common, "perspectives": perspectives, "backend": "replicas",
                                                  "decoding": {"mode": "dvd"}}),
        "d": ("PD K=3, fused", {**common, "perspectives": perspectives, "backend": "fused",
                                "decoding": {"mode": "dvd"}}),
    }  # fmt: skip
    if pooled:
        chosen = [pooled[0], pooled[len(pooled) // 2], pooled[-1]]
        scenarios["e"] = ("PD K=3, pooled", {**common, "perspectives": chosen, "backend": "replicas",
                                             "decoding": {"mode": "dvd"}})  # fmt: skip
        scenarios["f"] = ("PD K=6, fused", {**common, "perspectives": [*perspectives, *chosen], "backend": "fused",
                                            "decoding": {"mode": "dvd"}})  # fmt: skip
    for _, body in scenarios.values():  # warm up every path
        asyncio.run(_level(url, key, body, prompts, 1, 1))
    bare_loop(model, tok, prompts, 1, 4)

    results: dict[str, Any] = {"tokens_per_request": args.tokens, "cpus": os.cpu_count(), "levels": {}}
    for c in [int(x) for x in args.concurrency.split(",")]:
        n = args.requests or max(4, 2 * c)
        per: dict[str, dict[str, list[float]]] = {
            s: {"tps": [], "p50": [], "p99": [], "tok_lat": [], "ttft": [], "tpot": []} for s in scenarios
        }
        bare: list[float] = []
        for _ in range(args.rounds):
            bare.append(bare_loop(model, tok, prompts, c, args.tokens))
            for s, (_, body) in scenarios.items():
                run = asyncio.run(_level(url, key, body, prompts, c, n))
                per[s]["tps"].append(n * args.tokens / run.wall)
                per[s]["p50"].append(_pct(run.latencies, 0.5))
                per[s]["p99"].append(_pct(run.latencies, 0.99))
                per[s]["tok_lat"].append(statistics.median(run.latencies) / args.tokens)
                per[s]["ttft"].append(statistics.median(run.ttft))
                per[s]["tpot"].append(statistics.median(run.tpot))
        level = {s: {k: statistics.median(v) for k, v in m.items()} for s, m in per.items()}
        for s in scenarios:
            level[s]["latency_vs_a"] = level[s]["tok_lat"] / level["a"]["tok_lat"]
            level[s]["tpot_vs_a"] = level[s]["tpot"] / level["a"]["tpot"]
            level[s]["throughput_vs_a"] = level[s]["tps"] / level["a"]["tps"]
        level["bare"] = {"tps": statistics.median(bare)}
        results["levels"][c] = level
        print(f"\nconcurrency {c}: {n} requests x {args.tokens} tokens per scenario, median of {args.rounds} rounds")
        print(f"  bare generate loop at batch {c} (1 thread): {level['bare']['tps']:.1f} tok/s; "
              f"(a) / bare = {level['a']['tps'] / level['bare']['tps']:.2f}x")  # fmt: skip
        print(f"  {'scenario':34s} {'tok/s':>8s} {'p50 s':>7s} {'p99 s':>7s} {'ms/tok':>7s} {'lat/a':>6s} "
              f"{'tps/a':>6s} {'ttft ms':>7s} {'tpot ms':>7s} {'tpot/a':>6s}")  # fmt: skip
        for s, (label, _) in scenarios.items():
            m = level[s]
            print(f"  ({s}) {label:30s} {m['tps']:8.1f} {m['p50']:7.2f} {m['p99']:7.2f} {1000 * m['tok_lat']:7.1f} "
                  f"{m['latency_vs_a']:6.2f} {m['throughput_vs_a']:6.2f} {1000 * m['ttft']:7.0f} "
                  f"{1000 * m['tpot']:7.1f} {m['tpot_vs_a']:6.2f}")  # fmt: skip

    memory = {}
    batching = {}
    for dep in [BASE, *(perspective_deployment(p) for p in perspectives), FUSED, *([POOL] if pooled else [])]:
        stats = serve.get_deployment_handle(dep, app_name=ServeConfig.app_name).stats.remote().result(timeout_s=60)
        keys = ("rss_bytes", "param_bytes", "sae_bytes", "cache_bytes", "sessions", "perspectives")
        memory[dep] = {k: stats[k] for k in keys}
        batching[dep] = stats["batched_rows"] / max(1, stats["batches"])
    results["memory"], results["rows_per_batch"] = memory, batching
    print("\nper model replica: resident / weights / SAE / KV caches (MiB), perspectives held, rows per forward batch")
    for dep, m in memory.items():
        print(f"  {dep:34s} {m['rss_bytes'] / 2**20:7.0f} {m['param_bytes'] / 2**20:7.0f} "
              f"{m['sae_bytes'] / 2**20:5.0f} {m['cache_bytes'] / 2**20:6.1f} {m['perspectives']:5d} "
              f"{batching[dep]:6.1f}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
