"""Bounded load against a local pluristeer app: loopback only, a fixed number of requests, at most
``--concurrency`` in flight, and a time cap after which no new request starts; it stops by itself.

It reports the sustained concurrency (requests in flight, averaged over the run), latency p50/p99 of the
successful requests, errors (anything but the expected answer: goal 0), the 422s it provokes on purpose, and
each model replica's resident memory and KV-cached sessions before and after the run (from ``/metrics``): a
replica that keeps sessions or grows with every request leaks.

    # start an app of its own (local Ray, both backends, 3 perspectives from GlobalOpinionQA):
    PYTHONPATH=. python benchmarks/load.py --sae /tmp/acc/train/L15-topk-8x-k32 --requests 120 --concurrency 8
    # or load a running one (its keys in PLURISTEER_API_KEYS):
    PYTHONPATH=. python benchmarks/load.py --url http://127.0.0.1:8000 --key "$KEY" --requests 120

The request mix (fixed, seeded): plural completions on both backends, streamed chat, one-perspective and
unsteered completions, option distributions, and one request in ten that must be refused with 422.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# `python benchmarks/load.py` puts benchmarks/ first on sys.path, where serve.py would shadow the serve package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
QUESTIONS = [
    "Should cities ban cars from their centres?",
    "Is it better to save money or to spend it on experiences?",
    "How important is religion in daily life?",
    "Should the voting age be lowered to sixteen?",
    "Is working from home good for society?",
    "What makes a good neighbour?",
]


@dataclass
class LoadReport:
    url: str
    requests: int  # asked for
    started: int  # sent before the time cap
    ok: int  # the expected answer (200, or 422 where a refusal was the point)
    rejected_as_expected: int
    errors: int
    error_samples: list[str]
    wall_s: float
    sustained_concurrency: float  # time-averaged requests in flight
    peak_concurrency: int
    p50_s: float
    p99_s: float
    requests_per_s: float
    completion_tokens: int
    by_kind: dict[str, int]
    warmup: int = 0  # requests sent (one of each kind) before memory_before was taken
    memory_before: dict[str, dict[str, float]] = field(default_factory=dict)
    memory_after: dict[str, dict[str, float]] = field(default_factory=dict)
    rss_timeline_mib: list[tuple[float, float]] = field(default_factory=list)  # (s into the run, all replicas)

    def growth_mib(self) -> dict[str, float]:
        """Resident-memory growth of each model deployment over the run (MiB)."""
        return {
            d: (self.memory_after[d]["rss_bytes"] - m["rss_bytes"]) / 2**20
            for d, m in self.memory_before.items()
            if d in self.memory_after
        }

    def sessions_after(self) -> float:
        return sum(m["sessions"] for m in self.memory_after.values())


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load {url}: this generator only targets loopback ({', '.join(LOOPBACK)})")


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def request_mix(n: int, perspectives: list[str], max_tokens: int, seed: int = 0) -> list[tuple[str, str, dict, int]]:
    """``n`` requests ``(kind, path, body, expected status)``: a fixed, seeded mix over every endpoint."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        gen = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        kind = ["plural-replicas", "plural-fused", "chat-stream", "one-perspective", "distribution", "unsteered",
                "plural-replicas", "plural-fused", "chat-stream", "bad"][i % 10]  # fmt: skip
        if kind == "plural-replicas":
            body = {**gen, "prompt": q, "backend": "replicas", "decoding": {"mode": rng.choice(["mean", "cad", "dvd"])}}
        elif kind == "plural-fused":
            body = {**gen, "prompt": q, "backend": "fused", "decoding": {"mode": "dvd"}}
        elif kind == "chat-stream":
            body = {**gen, "messages": _chat(q), "stream": True, "stream_options": {"include_usage": True}}
        elif kind == "one-perspective":
            body = {**gen, "prompt": q, "perspectives": [rng.choice(perspectives)], "decoding": {"mode": "mean"}}
        elif kind == "distribution":
            body = {"messages": _chat(q + " Answer A (yes) or B (no)."), "options": ["A", "B"]}
        elif kind == "unsteered":
            body = {**gen, "prompt": q, "perspectives": []}
        else:  # refused: an unknown perspective, a NaN-free but out-of-range number, or a wrong type
            body = rng.choice([{**gen, "prompt": q, "perspectives": ["Atlantis"]}, {**gen, "prompt": q, "top_p": 0},
                               {**gen, "prompt": 7}])  # fmt: skip
        path = {"chat-stream": "/v1/chat/completions", "distribution": "/v1/distribution"}.get(kind, "/v1/completions")
        out.append((kind, path, body, 422 if kind == "bad" else 200))
    return out


async def scrape(client: Any, url: str) -> dict[str, dict[str, float]]:
    """Per model deployment: resident memory (the largest replica) and KV-cached sessions (all replicas)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = await client.get(url + "/metrics", timeout=60)
    r.raise_for_status()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name in ("pluristeer_replica_rss_bytes", "pluristeer_replica_sessions"):
                entry = out.setdefault(s.labels["deployment"], {"rss_bytes": 0.0, "sessions": 0.0})
                if s.name.endswith("rss_bytes"):
                    entry["rss_bytes"] = max(entry["rss_bytes"], s.value)
                else:
                    entry["sessions"] += s.value
    return out


async def _one(client: Any, url: str, path: str, body: dict, expect: int) -> tuple[bool, int, str]:
    """Send one request; ``(as expected, completion tokens, error text)``."""
    if body.get("stream"):
        tokens, done = 0, False
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != expect:
                return False, 0, f"{path}: HTTP {r.status_code} {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return False, 0, f"{path}: stream error {event['error']}"
                    tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
        return done, tokens, "" if done else f"{path}: stream ended without [DONE]"
    r = await client.post(url + path, json=body)
    if r.status_code != expect:
        return False, 0, f"{path}: HTTP {r.status_code} (expected {expect}) {r.text[:200]}"
    tokens = (r.json().get("usage") or {}).get("completion_tokens", 0) if expect == 200 else 0
    return True, tokens, ""


async def run_load(
    url: str,
    key: str,
    *,
    requests: int = 100,
    concurrency: int = 8,
    time_cap_s: float = 300.0,
    max_tokens: int = 8,
    perspectives: list[str] | None = None,
    seed: int = 0,
    settle_s: float = 15.0,
    warmup: int = 10,
    sample_s: float = 10.0,
) -> LoadReport:
    """Run the load (see the module docstring) and return its :class:`LoadReport`."""
    import httpx

    check_loopback(url)
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(headers=headers, timeout=time_cap_s + 60, limits=limits) as client:
        if perspectives is None:
            listed = await client.get(url + "/v1/perspectives", timeout=60)
            listed.raise_for_status()
            perspectives = [p["id"] for p in listed.json()["data"]]
        mix = request_mix(requests, perspectives, max_tokens, seed)
        # Warm-up, one request of each kind: weights are memory-mapped and paged in on first use, so memory
        # taken before any request would count that as growth.
        warm = request_mix(warmup, perspectives, max_tokens, seed + 1) if warmup else []
        for _, path, body, expect in warm:
            await _one(client, url, path, body, expect)
        before = await scrape(client, url)
        todo = list(reversed(mix))
        latencies: list[float] = []
        errors: list[str] = []
        counts = {"ok": 0, "rejected": 0, "started": 0, "tokens": 0, "in_flight": 0, "peak": 0}
        by_kind: dict[str, int] = {}
        busy = 0.0
        started = time.perf_counter()
        cap = started + time_cap_s

        async def worker() -> None:
            nonlocal busy
            while todo and time.perf_counter() < cap:
                kind, path, body, expect = todo.pop()
                counts["started"] += 1
                counts["in_flight"] += 1
                counts["peak"] = max(counts["peak"], counts["in_flight"])
                t0 = time.perf_counter()
                try:
                    good, tokens, problem = await _one(client, url, path, body, expect)
                except Exception as err:  # a connection error or timeout is an error, not a crash of the run
                    good, tokens, problem = False, 0, f"{path}: {type(err).__name__}: {err}"
                elapsed = time.perf_counter() - t0
                busy += elapsed
                counts["in_flight"] -= 1
                if good:
                    counts["ok"] += 1
                    counts["tokens"] += tokens
                    by_kind[kind] = by_kind.get(kind, 0) + 1
                    if expect == 422:
                        counts["rejected"] += 1
                    else:
                        latencies.append(elapsed)
                else:
                    errors.append(problem)

        timeline: list[tuple[float, float]] = []

        async def monitor() -> None:  # resident memory of all model replicas while the load runs
            while True:
                with contextlib.suppress(Exception):
                    sample = await scrape(client, url)
                    total = sum(m["rss_bytes"] for m in sample.values()) / 2**20
                    timeline.append((round(time.perf_counter() - started, 1), round(total, 1)))
                await asyncio.sleep(sample_s)

        watcher = asyncio.create_task(monitor())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        watcher.cancel()
        wall = time.perf_counter() - started
        after = await scrape(client, url)
        deadline = time.perf_counter() + settle_s  # sessions are released asynchronously after each request
        while sum(m["sessions"] for m in after.values()) > sum(m["sessions"] for m in before.values()):
            if time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.5)
            after = await scrape(client, url)

    ordered = sorted(latencies) or [float("nan")]

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return LoadReport(
        url=url, requests=requests, started=counts["started"], ok=counts["ok"],
        rejected_as_expected=counts["rejected"], errors=len(errors), error_samples=errors[:5], wall_s=wall,
        sustained_concurrency=busy / wall if wall else 0.0, peak_concurrency=counts["peak"], p50_s=pct(0.5),
        p99_s=pct(0.99), requests_per_s=counts["started"] / wall if wall else 0.0,
        completion_tokens=counts["tokens"], by_kind=by_kind, warmup=len(warm), memory_before=before,
        memory_after=after, rss_timeline_mib=timeline,
    )  # fmt: skip


def render(report: LoadReport) -> str:
    lines = [
        f"load against {report.url}: {report.started} of {report.requests} requests started, "
        f"{report.ok} answered as expected ({report.rejected_as_expected} of them refused with 422 on purpose), "
        f"{report.errors} errors, in {report.wall_s:.1f} s",
        f"  sustained concurrency {report.sustained_concurrency:.2f} (peak {report.peak_concurrency}); "
        f"latency p50 {report.p50_s:.2f} s, p99 {report.p99_s:.2f} s; {report.requests_per_s:.2f} req/s; "
        f"{report.completion_tokens} completion tokens",
        f"  answered by kind: {report.by_kind}",
        f"  model replicas (after a warm-up of {report.warmup} requests): resident MiB before -> after (growth), "
        "KV-cached sessions before -> after",
    ]
    growth = report.growth_mib()
    for dep, m in sorted(report.memory_before.items()):
        a = report.memory_after.get(dep, {"rss_bytes": float("nan"), "sessions": float("nan")})
        lines.append(
            f"    {dep:34s} {m['rss_bytes'] / 2**20:7.0f} -> {a['rss_bytes'] / 2**20:7.0f} ({growth.get(dep, 0):+6.1f})"
            f"   {m['sessions']:.0f} -> {a['sessions']:.0f}"
        )
    if report.rss_timeline_mib:
        shown = ", ".join(f"{t:.0f}s {m:.0f}" for t, m in report.rss_timeline_mib)
        lines.append(f"  all model replicas, resident MiB during the run: {shown}")
    lines += [f"  error: {e}" for e in report.error_samples]
    return "\n".join(lines)


def _serve_benchmark() -> Any:
    """benchmarks/serve.py as a module (for its app start-up); benchmarks/ is not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_serve", _HERE / "serve.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _start_app(args: argparse.Namespace) -> tuple[str, str]:
    """A local Ray + Serve app (both backends, 3 perspectives; benchmarks/serve.py's); returns its URL and key."""
    url, key, *_ = _serve_benchmark().start_app(
        sae=args.sae, vectors=args.vectors, registry_dir=args.registry_dir, samples=8,
        replica_cpus=args.replica_cpus, tokens=args.tokens, prefix="load",
    )  # fmt: skip
    return url, key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running app on loopback (default: start one)")
    ap.add_argument("--key", default=os.environ.get("PLURISTEER_API_KEYS", "").split(",")[0].strip())
    ap.add_argument("--sae", type=Path, help="start an app with a 3-perspective GlobalOpinionQA set from this SAE")
    ap.add_argument("--vectors", help="or start an app serving this registry key")
    ap.add_argument("--registry-dir", type=Path, default=Path("/tmp/pluristeer-load-registry"))
    ap.add_argument("--replica-cpus", type=float, default=0.25)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--time-cap", type=float, default=600.0, help="seconds; no request starts after it")
    ap.add_argument("--tokens", type=int, default=8, help="max_tokens of each generation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=10, help="requests before the 'before' memory reading")
    ap.add_argument("--out", type=Path, help="also write the report as JSON")
    args = ap.parse_args()
    if args.url is None and (args.sae is None) == (args.vectors is None):
        ap.error("give --url, or exactly one of --sae and --vectors to start an app")
    if args.url is not None:
        check_loopback(args.url)
        url, key = args.url, args.key
    else:
        url, key = _start_app(args)
    try:
        report = asyncio.run(
            run_load(url, key, requests=args.requests, concurrency=args.concurrency, time_cap_s=args.time_cap,
                     max_tokens=args.tokens, seed=args.seed, warmup=args.warmup)
        )  # fmt: skip
    finally:
        if args.url is None:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    print(render(report))
    if args.out:
        args.out.write_text(json.dumps({**asdict(report), "growth_mib": report.growth_mib()}, indent=2))
    # an error is a failed run; memory is reported, not judged (a first-use allocation is not a leak)
    sys.exit(1 if report.errors else 0)


if __name__ == "__main__":
    main()
