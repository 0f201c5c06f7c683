"""Autoscaling benchmark (loopback only, bounded): a load ramp on one perspective of a real Serve app.

Two perspectives have their own deployment: ``busy`` (autoscaled 1..``--max-replicas``) takes a ramp of
concurrent generations (``--ramp`` levels, ``--step-s`` each, over HTTP), ``idle`` (``min_replicas: 0``)
takes nothing until the end, when one request wakes it from zero (the cold start). Printed: replica counts
over time (running, and running + starting: what the autoscaler decided), per-level p50/p99 latency and
tokens/s, failed requests (must be 0: the run exits 1 otherwise), the time to scale up and down, the cold
start; written: a PNG of replicas and latency over time (and ``--out`` JSON).

    PYTHONPATH=. python benchmarks/autoscale.py                       # embedded model, a random SAE
    PYTHONPATH=. python benchmarks/autoscale.py --sae DIR --ramp 1,4,8 --step-s 20 --png /tmp/autoscale.png

The vectors are random sparse ones over the SAE (the cost of steering does not depend on their values).
Serve's autoscaling metrics are pushed every 0.5 s here (``RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S``;
Serve's default is 10 s, which a cold start from zero also waits for).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent  # `python benchmarks/autoscale.py`: benchmarks/ must not shadow serve/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

APP = "pluristeer"
BUSY, IDLE = "busy", "idle"
AUTOSCALE = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0, "upscale_delay_s": 1.0, "downscale_delay_s": 3.0}


@dataclass
class Run:
    timeline: list[tuple[float, int, int, int, int]] = field(default_factory=list)  # t, busy run/all, idle, load
    latencies: list[tuple[float, float, int]] = field(default_factory=list)  # t done, seconds, level
    failures: list[str] = field(default_factory=list)
    levels: dict[int, tuple[float, float]] = field(default_factory=dict)  # level -> (start, end) times
    cold_start_s: float | None = None
    scaled_up_s: float | None = None
    scaled_down_s: float | None = None


def _vectors(model: Any, sae: Any, layer: int) -> Any:
    import torch

    from sae.lm import model_name
    from sae.vectorset import VectorSet, VectorSetMeta, sae_fingerprint

    g = torch.Generator().manual_seed(0)
    vectors = {}
    for p in (BUSY, IDLE):
        v = torch.zeros(sae.d_sae)
        v[torch.randperm(sae.d_sae, generator=g)[:8]] = 4.0
        vectors[p] = v
    meta = VectorSetMeta(
        model=model_name(model), layer=layer, mode="sae", granularity="fine", task="chat",
        n_samples=dict.fromkeys(vectors, 1), readout="last", dim=sae.d_sae, sae_fingerprint=sae_fingerprint(sae),
    )  # fmt: skip
    return VectorSet(vectors, meta)


def counts(name: str) -> tuple[int, int]:
    """``(running, running + starting)`` replicas of deployment ``name``."""
    from ray import serve

    app = serve.status().applications.get(APP)
    dep = None if app is None else app.deployments.get(name)
    if dep is None:
        return 0, 0
    states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
    running = states.get("RUNNING", 0)
    return running, running + states.get("STARTING", 0) + states.get("UPDATING", 0)


def start(args: argparse.Namespace, workdir: Path) -> str:
    import ray
    import torch
    from ray import serve

    from common.registry import RegistryClient
    from sae.lm import load_lm
    from sae.model import SAEConfig, SparseAutoencoder
    from serve.app import build
    from serve.config import ServeConfig

    model, _ = load_lm(args.model)
    if args.sae is not None:
        sae = SparseAutoencoder.load(args.sae)
        sae_dir = args.sae
        layer = args.layer if args.layer is not None else sae.cfg.metadata.get("hook_layer")
        if layer is None:
            raise SystemExit(f"--sae {args.sae}: it records no hook_layer; give --layer")
        layer = int(layer)
    else:
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(d_in=model.config.hidden_size, d_sae=8 * model.config.hidden_size, k=32))
        sae_dir = sae.save(workdir / "sae")
        layer = args.layer if args.layer is not None else model.config.num_hidden_layers // 2
    vs = _vectors(model, sae, layer)
    vs.meta.sae_path = str(sae_dir)
    del model
    os.environ["PLURISTEER_API_KEYS"] = key = "bench-" + os.urandom(8).hex()
    for where in ("HANDLE", "REPLICA"):
        os.environ[f"RAY_SERVE_{where}_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
    RegistryClient(workdir / "registry").publish(vs, "autoscale")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cpus = {"ray_actor_options": {"num_cpus": args.replica_cpus}}
    target = {"target_ongoing_requests": args.target, **AUTOSCALE}
    cfg = ServeConfig.from_dict(
        {
            "vectors": "autoscale", "registry_dir": str(workdir / "registry"), "model": args.model,
            "backend": "replicas", "perspectives": [BUSY, IDLE], "port": port, "torch_threads": 1,
            "max_tokens_limit": max(16, args.tokens), "aggregator_cpus": 0.25,
            "deployments": {
                "PluralAggregator": {"num_replicas": 1},
                "BaseModel": {"num_replicas": 1, **cpus},
                f"PerspectiveModel-{BUSY}": {**cpus, "autoscaling_config": {
                    "min_replicas": 1, "max_replicas": args.max_replicas, **target}},
                f"PerspectiveModel-{IDLE}": {**cpus, "autoscaling_config": {
                    "min_replicas": 0, "initial_replicas": 1, "max_replicas": 2, **target}},
            },
        }
    )  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.perf_counter()
    serve.run(build(cfg), name=APP, route_prefix="/")
    print(f"app up in {time.perf_counter() - started:.0f} s on 127.0.0.1:{port} ({args.model}, {os.cpu_count()} CPUs)")
    return f"http://127.0.0.1:{port}|{key}"


async def ramp(url: str, key: str, args: argparse.Namespace, run: Run, t0: float, level: list[int]) -> None:
    import httpx

    body = {"max_tokens": args.tokens, "temperature": 0, "ignore_eos": True, "perspectives": [BUSY],
            "decoding": {"mode": "mean"}}  # fmt: skip
    limits = httpx.Limits(max_connections=max(int(x) for x in args.ramp.split(",")) + 4)

    async def worker(client: httpx.AsyncClient, i: int, active: int, until: float) -> None:
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                r = await client.post(url + "/v1/completions", json={**body, "prompt": f"Tell a story, {i}."})
                ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == args.tokens
                if not ok:
                    run.failures.append(f"{r.status_code}: {r.text[:200]}")
            except Exception as err:  # a refused connection is a failed request too
                run.failures.append(f"{type(err).__name__}: {err}")
                continue
            run.latencies.append((time.monotonic() - t0, time.perf_counter() - started, active))

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=300, limits=limits) as client:
        for active in (int(x) for x in args.ramp.split(",")):
            level[0] = active
            begin = time.monotonic()
            await asyncio.gather(*(worker(client, i, active, begin + args.step_s) for i in range(active)))
            run.levels[active] = (begin - t0, time.monotonic() - t0)
    level[0] = 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--sae", type=Path, help="an SAE directory (default: a random TopK SAE, 8x, k=32)")
    ap.add_argument("--layer", type=int, help="steering layer (default: the SAE's hook layer, or the middle)")
    ap.add_argument("--ramp", default="1,2,4,8", help="concurrent generations, one level after the other")
    ap.add_argument("--step-s", type=float, default=15.0, help="seconds at each level")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--target", type=float, default=1.0, help="target_ongoing_requests per replica")
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--replica-cpus", type=float, default=0.25)
    ap.add_argument("--cooldown-cap-s", type=float, default=90.0, help="longest wait for the scale-down")
    ap.add_argument("--png", type=Path, default=Path("autoscale.png"))
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    args = ap.parse_args()

    import ray
    from ray import serve

    run = Run()
    with tempfile.TemporaryDirectory(prefix="pluristeer-autoscale-") as tmp:
        url, key = start(args, Path(tmp)).split("|")
        try:
            busy, idle = f"PerspectiveModel-{BUSY}", f"PerspectiveModel-{IDLE}"
            deadline = time.monotonic() + 60
            while counts(idle)[0] > 0 and time.monotonic() < deadline:  # the idle perspective goes to zero
                time.sleep(0.5)
            t0 = time.monotonic()
            level, stop = [0], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    b, i = counts(busy), counts(idle)
                    run.timeline.append((time.monotonic() - t0, b[0], b[1], i[0], level[0]))
                    time.sleep(0.5)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            asyncio.run(ramp(url, key, args, run, t0, level))
            load_end = time.monotonic()
            up = next((t for t, b, _, _, _ in run.timeline if b >= 2), None)
            run.scaled_up_s = up
            while counts(busy)[0] > 1 and time.monotonic() - load_end < args.cooldown_cap_s:
                time.sleep(0.5)
            if counts(busy)[0] <= 1:
                run.scaled_down_s = time.monotonic() - load_end
            import httpx

            started = time.perf_counter()
            r = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=300,
                           json={"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                 "perspectives": [IDLE], "decoding": {"mode": "mean"}})  # fmt: skip
            run.cold_start_s = time.perf_counter() - started
            if r.status_code != 200:
                run.failures.append(f"cold start: {r.status_code}: {r.text[:200]}")
            time.sleep(1.0)
            stop.set()
            sampler.join()
        finally:
            serve.shutdown()
            ray.shutdown()
    report(run, args)
    return 1 if run.failures or run.scaled_up_s is None else 0


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def report(run: Run, args: argparse.Namespace) -> None:
    print("\n  t (s)  load  busy running/decided  idle running")
    last = None
    for t, b, bd, i, lv in run.timeline:
        row = (b, bd, i, lv)
        if row != last:
            print(f"  {t:6.1f} {lv:5d} {b:8d}/{bd:<8d} {i:8d}")
            last = row
    print(f"\n  {'level':>5s} {'requests':>8s} {'p50 s':>7s} {'p99 s':>7s} {'tok/s':>7s} {'busy replicas (mean)':>20s}")
    summary = {}
    for lv, (begin, end) in run.levels.items():
        lat = [s for t, s, a in run.latencies if a == lv]
        reps = [b for t, b, _, _, _ in run.timeline if begin <= t <= end]
        tps = len(lat) * args.tokens / max(end - begin, 1e-9)
        summary[lv] = {"requests": len(lat), "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "tps": tps,
                       "replicas": statistics.mean(reps) if reps else float("nan")}  # fmt: skip
        m = summary[lv]
        print(f"  {lv:5d} {m['requests']:8d} {m['p50']:7.2f} {m['p99']:7.2f} {m['tps']:7.1f} {m['replicas']:20.2f}")
    every = [s for _, s, _ in run.latencies]
    print(f"\n  all: {len(every)} requests, p50 {_pct(every, 0.5):.2f} s, p99 {_pct(every, 0.99):.2f} s; "
          f"failed requests: {len(run.failures)}")  # fmt: skip
    fmt = lambda x: "never" if x is None else f"{x:.1f} s"  # noqa: E731
    print(f"  busy reached 2 running replicas at t = {fmt(run.scaled_up_s)}; back to 1 {fmt(run.scaled_down_s)} "
          f"after the load; idle cold start from zero: {fmt(run.cold_start_s)}")  # fmt: skip
    for failure in run.failures[:5]:
        print("  FAILED:", failure)
    _plot(run, args.png)
    print(f"  wrote {args.png}")
    if args.out:
        args.out.write_text(json.dumps({"timeline": run.timeline, "latencies": run.latencies, "levels": summary,
                                        "failures": run.failures, "cold_start_s": run.cold_start_s,
                                        "scaled_up_s": run.scaled_up_s, "scaled_down_s": run.scaled_down_s},
                                       indent=1))  # fmt: skip


def _plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = [row[0] for row in run.timeline]
    top.step(t, [row[1] for row in run.timeline], where="post", label="busy: running replicas")
    top.step(t, [row[2] for row in run.timeline], where="post", linestyle="--", label="busy: running + starting")
    top.step(t, [row[3] for row in run.timeline], where="post", label="idle: running replicas")
    top.step(t, [row[4] for row in run.timeline], where="post", color="grey", alpha=0.5, label="concurrent requests")
    top.set_ylabel("count")
    top.legend(loc="upper left", fontsize=8)
    bottom.scatter([x[0] for x in run.latencies], [x[1] for x in run.latencies], s=6)
    bottom.set_ylabel("request latency (s)")
    bottom.set_xlabel("time since the load started (s)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)  # written whole or not at all


if __name__ == "__main__":
    raise SystemExit(main())
