"""The model deployments on a real Serve app, scaled: a ``PerspectivePool`` of 2 replicas serving 120
perspectives of one VectorSet, and the autoscaler seen at work on per-perspective deployments.

The model is a tiny random Llama (the embedded tokenizer, ``tiny_lm_dir``) and the SAE a random TopK one of
its width, so that replicas start in seconds on 2 cores; the numbers compared are logits of the same
computation (pool vs. its own deployment vs. offline), which a wrong routing or a wrong vector would change.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
import torch

from sae.decoding import Decoding, plural_next_token
from sae.lm import load_lm, model_name
from sae.model import SAEConfig, SparseAutoencoder
from sae.vectorset import VectorSet, VectorSetMeta, sae_fingerprint
from serve.config import POOL

KEY = "test-key-pool-51c2"
NAME = "tiny-many"
BUSY, IDLE = "Busyland", "Quietland"
N_POOLED = 118
LAYER = 2
APP = "pluristeer"


@dataclass
class App:
    url: str
    registry: Path
    pooled: list[str]
    vectors: VectorSet
    sae: SparseAutoencoder
    model: Any
    tok: Any

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vectors(model: Any, sae: SparseAutoencoder, names: list[str]) -> VectorSet:
    g = torch.Generator().manual_seed(0)
    vectors = {}
    for name in names:  # a few active latents each, as derived vectors are
        v = torch.zeros(sae.d_sae)
        v[torch.randperm(sae.d_sae, generator=g)[:6]] = 3.0 * torch.rand(6, generator=g) + 1.0
        vectors[name] = v
    meta = VectorSetMeta(
        model=model_name(model), layer=LAYER, mode="sae", granularity="fine", task="chat",
        n_samples=dict.fromkeys(vectors, 1), readout="last", dim=sae.d_sae, sae_fingerprint=sae_fingerprint(sae),
    )  # fmt: skip
    return VectorSet(vectors, meta)


def replicas(name: str, *, any_state: bool = False) -> int:
    """RUNNING replicas of deployment ``name`` (Serve's own status); with ``any_state`` also those starting,
    stopping or being recovered."""
    from ray import serve

    app = serve.status().applications.get(APP)
    dep = None if app is None else app.deployments.get(name)
    if dep is None:
        return 0
    return int(sum(dep.replica_states.values()) if any_state else dep.replica_states.get("RUNNING", 0))


def _wait(what: str, ok: Any, timeout_s: float, poll_s: float = 0.25) -> float:
    started = time.monotonic()
    while not ok():
        assert time.monotonic() - started < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(poll_s)
    return time.monotonic() - started


AUTOSCALE = {  # small delays and a short look-back so the test is bounded
    "metrics_interval_s": 0.5, "look_back_period_s": 2.0, "upscale_delay_s": 1.0, "downscale_delay_s": 2.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def app(tiny_lm_dir: Path, tmp_path_factory) -> Iterator[App]:
    from ray import serve

    from common.registry import RegistryClient
    from serve.app import build
    from serve.config import ServeConfig

    model, tok = load_lm(str(tiny_lm_dir))
    sae = SparseAutoencoder(SAEConfig(d_in=model.config.hidden_size, d_sae=256, k=8))
    sae_dir = sae.save(tmp_path_factory.mktemp("sae") / "sae")
    pooled = [f"Country {i:03d}" for i in range(N_POOLED)]
    vs = _vectors(model, sae, [BUSY, IDLE, *pooled])
    vs.meta.sae_path = str(sae_dir)
    patch = pytest.MonkeyPatch()
    patch.setenv("PLURISTEER_API_KEYS", KEY)  # before ray.init: the replicas inherit it
    for where in ("HANDLE", "REPLICA"):  # Serve pushes autoscaling metrics every 10 s by default
        patch.setenv(f"RAY_SERVE_{where}_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="pluristeer-replica-tests")
    try:
        registry = tmp_path_factory.mktemp("registry")
        RegistryClient(registry).publish(vs, NAME)
        port = _free_port()
        cpus = {"ray_actor_options": {"num_cpus": 0.1}}
        cfg = ServeConfig.from_dict(
            {
                "vectors": NAME, "registry_dir": str(registry), "model": str(tiny_lm_dir), "backend": "replicas",
                "perspectives": [BUSY, IDLE], "pool": ["*"], "port": port, "max_perspectives": 4,
                "max_tokens_limit": 24, "max_prompt_tokens": 128, "aggregator_cpus": 0.2,
                "deployments": {
                    "PluralAggregator": {"num_replicas": 1},
                    "BaseModel": {"num_replicas": 1, **cpus},
                    "PerspectivePool": {"num_replicas": 2, **cpus},
                    f"PerspectiveModel-{BUSY.lower()}": {
                        **cpus, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3,
                                                       "target_ongoing_requests": 1, **AUTOSCALE},
                    },
                    f"PerspectiveModel-{IDLE.lower()}": {
                        **cpus, "autoscaling_config": {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 2,
                                                       "target_ongoing_requests": 1, **AUTOSCALE},
                    },
                },
            }
        )  # fmt: skip
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.perf_counter()
        serve.run(build(cfg), name=APP, route_prefix="/")
        print(f"serve app (7 replicas) up in {time.perf_counter() - started:.1f} s")
        yield App(f"http://127.0.0.1:{port}", registry, pooled, vs, sae, model, tok)
    finally:
        serve.shutdown()
        ray.shutdown()
        patch.undo()


def _handle(name: str) -> Any:
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP)


def _metric(app: App, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(app.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_two_pool_replicas_serve_120_perspectives_as_their_own_deployments_would(app: App) -> None:
    ids = app.tok("The weather in my country is", add_special_tokens=False)["input_ids"]
    assert replicas("PerspectivePool") == 2
    stats = _handle("PerspectivePool").stats.remote().result(timeout_s=60)
    assert stats["perspectives"] == N_POOLED + 2 and stats["deployment"] == "PerspectivePool"
    # any pool replica serves any perspective of the set, with the logits of that perspective's own deployment
    own = _handle(f"PerspectiveModel-{BUSY.lower()}").step.remote(ids).result(timeout_s=60)
    rows = [BUSY, app.pooled[7], app.pooled[99]]
    for _ in range(3):  # without a session: spread over both replicas
        pool = _handle("PerspectivePool").step_rows.remote(ids, rows).result(timeout_s=60)
        np.testing.assert_allclose(pool["logits"][0], own["logits"], atol=1e-4, rtol=1e-4)
        assert np.abs(pool["logits"][1] - pool["logits"][2]).max() > 1e-3, "perspectives should differ"
    # over HTTP, PD over K pooled perspectives anywhere in the set: each row equals the offline steered model
    chosen = [app.pooled[3], app.pooled[58], app.pooled[117], BUSY]
    r = app.post("/v1/distribution", {"prompt": app.tok.decode(ids), "options": ["A", "B", "C"],
                                      "perspectives": chosen, "decoding": {"mode": "mean"}})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    from sae.readout import label_token_ids, option_probs

    labels = label_token_ids(app.tok, ["A", "B", "C"])
    x = torch.tensor([ids])
    for p in chosen:
        offline = plural_next_token(app.model, x, torch.ones_like(x), app.vectors, [p], Decoding("mean"), app.sae)
        want = option_probs(offline, labels)[0][0]
        torch.testing.assert_close(torch.tensor(body["perspectives"][p]["probs"]), want, atol=1e-4, rtol=1e-4)
    listed = httpx.get(app.url + "/v1/perspectives", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    where = {p["id"]: p["deployment"] for p in listed["data"]}
    assert len(where) == N_POOLED + 2 and where[app.pooled[0]] == "PerspectivePool"
    assert where[BUSY] == f"PerspectiveModel-{BUSY.lower()}"


def test_pooled_generations_keep_each_session_on_its_replica(app: App) -> None:
    """12 generations of 10 tokens, each PD over 3 pooled perspectives (+ the unsteered row), 4 at a time
    over 2 pool replicas: all complete, and no step after the first missed its KV cache (no session moved)."""
    before = _metric(app, "pluristeer_deployment_tokens_total", deployment="PerspectivePool")

    def one(i: int) -> httpx.Response:
        chosen = [app.pooled[(7 * i + j * 31) % N_POOLED] for j in range(3)]
        return app.post("/v1/completions", {"prompt": f"Tell me about place {i}", "max_tokens": 10, "temperature": 0,
                                            "ignore_eos": True, "perspectives": chosen})  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(12)))
    assert [r.status_code for r in answers] == [200] * 12, [r.text for r in answers if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 10 for r in answers)
    assert all(r.json()["pluristeer"].get("replays", 0) == 0 for r in answers)
    assert _metric(app, "pluristeer_replays_total", deployment="PerspectivePool") == 0
    ran = _metric(app, "pluristeer_deployment_tokens_total", deployment="PerspectivePool") - before
    assert ran >= 12 * 3 * 10, ran  # prefills + one token per step per row, all on the pool


def test_which_perspectives_the_pool_serves(app: App) -> None:
    from common.config import ConfigError
    from serve.app import resolve
    from serve.config import ServeConfig

    base = {"vectors": NAME, "registry_dir": str(app.registry), "max_perspectives": 4}
    own, pooled = resolve(ServeConfig.from_dict({**base, "perspectives": [BUSY], "pool": ["*"]}))
    assert own == [BUSY] and pooled == [IDLE, *app.pooled]
    assert resolve(ServeConfig.from_dict({**base, "pool": [app.pooled[5]]})) == ([], [app.pooled[5]])
    with pytest.raises(ConfigError, match=r"pool: \['Atlantis'\] are not in"):
        resolve(ServeConfig.from_dict({**base, "pool": ["Atlantis"]}))
    with pytest.raises(ConfigError, match="serve the rest from the pool"):
        resolve(ServeConfig.from_dict(base))  # 120 deployments of their own: above max_perspectives
    everyone = {**base, "max_perspectives": 200, "perspectives": [BUSY, IDLE, *app.pooled], "pool": ["*"]}
    with pytest.raises(ConfigError, match=r"pool: \['\*'\] leaves the pool nothing"):
        resolve(ServeConfig.from_dict(everyone))


@pytest.mark.hostile
def test_a_perspective_the_pool_lacks_is_a_422_naming_it(app: App) -> None:
    r = app.post("/v1/completions", {"prompt": "x", "perspectives": [app.pooled[1], "Atlantis"]})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "Atlantis" in message and "/v1/perspectives" in message
    r = app.post("/v1/completions", {"prompt": "x"})  # the default (all 120) is above K
    assert r.status_code == 422 and "at most 4" in r.json()["error"]["message"]


def test_load_on_one_perspective_scales_it_up_and_down_while_an_idle_one_stays_at_zero(app: App) -> None:
    """A load ramp on BUSY (target 1 ongoing request per replica): its deployment goes 1 -> >= 2 replicas and back
    to 1 after the load; IDLE (min_replicas 0) has no replica in any state during the load, and its first request
    afterwards is served (a cold start); a /metrics scrape meanwhile does not wake it. Zero failed requests; the
    replica counts over time are printed."""
    busy, idle = f"PerspectiveModel-{BUSY.lower()}", f"PerspectiveModel-{IDLE.lower()}"
    # no replica of IDLE in any state (its initial replica may still be starting on the loaded cores)
    _wait("the idle perspective to scale to zero", lambda: replicas(idle, any_state=True) == 0, 120)
    timeline: list[tuple[float, int, int]] = []
    stop_sampling = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop_sampling.is_set():
            timeline.append((time.monotonic() - t0, replicas(busy), replicas(idle, any_state=True)))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    load_on = threading.Event()
    load_on.set()
    failures: list[str] = []
    done = [0]

    def client(i: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            while load_on.is_set():
                r = c.post(
                    app.url + "/v1/completions",
                    json={
                        "prompt": f"Load {i}",
                        "max_tokens": 16,
                        "temperature": 0,
                        "ignore_eos": True,
                        "perspectives": [BUSY],
                        "decoding": {"mode": "mean"},
                    },
                )
                if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != 16:
                    failures.append(r.text[:300])
                done[0] += 1

    clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for c in clients:
            c.start()
        # a Prometheus scrape while IDLE is at zero: refreshes the running replicas' gauges, does not wake IDLE
        assert _metric(app, "pluristeer_replica_rss_bytes", deployment=busy) > 0
        up = _wait("the busy perspective to scale up", lambda: replicas(busy) >= 2, 150)
    finally:
        load_on.clear()
        for c in clients:
            c.join(timeout=120)
    down = _wait("the busy perspective to scale back down", lambda: replicas(busy) == 1, 150)
    stop_sampling.set()
    sampler.join()
    started = time.perf_counter()
    r = app.post("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                     "perspectives": [IDLE], "decoding": {"mode": "mean"}})  # fmt: skip
    cold = time.perf_counter() - started
    print(f"scaled up after {up:.1f} s of load, down {down:.1f} s after it; {done[0]} requests; cold start "
          f"{cold:.1f} s")  # fmt: skip
    print("t (s)  busy  idle\n" + "\n".join(f"{t:5.1f} {b:5d} {i:5d}" for t, b, i in timeline[::4]))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    assert not failures, failures[:3]
    assert done[0] >= 8
    assert max(b for _, b, _ in timeline) >= 2 and timeline[0][1] == 1
    assert all(i == 0 for _, _, i in timeline), "the idle perspective must not scale up under another's load"
    assert replicas(idle) >= 1  # woken by its request


def test_a_new_vector_version_reaches_every_pool_replica_without_a_restart(app: App) -> None:
    from common.registry import RegistryClient

    target = app.pooled[10]
    ids = app.tok("A new version", add_special_tokens=False)["input_ids"]
    pool = _handle("PerspectivePool")
    before = pool.step_rows.remote(ids, [target]).result(timeout_s=60)
    pids = set()
    for _ in range(20):
        pids.add(pool.stats.remote().result(timeout_s=60)["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2
    scaled = {p: v * (4.0 if p == target else 1.0) for p, v in app.vectors.vectors.items()}
    changed = VectorSet(scaled, app.vectors.meta)
    assert RegistryClient(app.registry).publish(changed, NAME) == f"{NAME}@2"
    seen: dict[int, Any] = {}

    def both_at_2() -> bool:
        st = pool.stats.remote().result(timeout_s=60)
        seen[st["pid"]] = st["version"]
        return set(seen) == pids and all(v == 2 for v in seen.values())

    _wait("both pool replicas to follow version 2", both_at_2, 30, poll_s=0.1)
    for _ in range(6):  # whichever replica answers: the new vector
        after = pool.step_rows.remote(ids, [target]).result(timeout_s=60)
        assert after["version"] == 2 and np.abs(after["logits"][0] - before["logits"][0]).max() > 1e-3


def _pool_actors() -> dict[str, str]:
    """Serve replica id -> actor name, for every live ``PerspectivePool`` replica of this module's app."""
    prefix = f"SERVE_REPLICA::{APP}#{POOL}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return {name[len(prefix) :]: name for name in names if name.startswith(prefix)}


def _pool_healthy(count: int) -> bool:
    from ray import serve

    app = serve.status().applications.get(APP)
    dep = None if app is None else app.deployments.get(POOL)
    return dep is not None and dep.status == "HEALTHY" and replicas(POOL) == replicas(POOL, any_state=True) == count


@pytest.mark.fault
def test_a_pool_replica_killed_while_it_holds_sessions_loses_no_request(app: App) -> None:
    """8 generations of 24 tokens, each PD over 3 pooled perspectives, run at once over the 2 pool replicas. Once
    a replica holds their sessions and has run 3 more batches (the sessions past their first step), it is killed
    (``ray.kill``, no restart: Serve replaces it). Every request completes with HTTP 200 and all 24 tokens; at
    least one replayed its prefix on the other replica (the kill hit a live session); the pool is back at 2
    running replicas, healthy, the killed one gone."""
    pool = _handle(POOL)
    actors = _pool_actors()
    assert len(actors) == 2, actors
    baseline: dict[str, int] = {}  # KV-cached sessions per replica before the load (earlier tests' leftovers)
    for _ in range(40):
        st = pool.stats.remote().result(timeout_s=60)
        baseline[st["replica"]] = st["sessions"]
        if len(baseline) == 2:
            break
    assert set(baseline) == set(actors), (baseline, actors)

    def one(i: int) -> httpx.Response:
        chosen = [app.pooled[(11 * i + j * 37) % N_POOLED] for j in range(3)]
        return app.post("/v1/completions", {"prompt": f"A long story about place {i}", "max_tokens": 24,
                                            "temperature": 0, "ignore_eos": True, "perspectives": chosen})  # fmt: skip

    with ThreadPoolExecutor(8) as workers:
        futures = [workers.submit(one, i) for i in range(8)]
        first_seen: dict[str, int] = {}  # replica -> its batch count when it first held this load's sessions
        victim = None
        deadline = time.monotonic() + 60
        while victim is None:
            assert time.monotonic() < deadline and not all(f.done() for f in futures), "no replica held a session"
            st = pool.stats.remote().result(timeout_s=60)
            if st["sessions"] > baseline[st["replica"]]:
                seen = first_seen.setdefault(st["replica"], st["batches"])
                if st["batches"] >= seen + 3:
                    victim, held = st["replica"], st["sessions"] - baseline[st["replica"]]
        ray.kill(ray.get_actor(actors[victim], namespace="serve"), no_restart=True)
        unfinished = sum(not f.done() for f in futures)
        answers = [f.result() for f in futures]
    print(f"killed pool replica {victim} holding {held} sessions; {unfinished} of 8 requests unfinished")
    assert [r.status_code for r in answers] == [200] * 8, [r.text[:300] for r in answers if r.status_code != 200]
    bodies = [r.json() for r in answers]
    assert [b["usage"]["completion_tokens"] for b in bodies] == [24] * 8
    assert all(b["choices"][0]["finish_reason"] == "length" for b in bodies)
    replays = [b["pluristeer"]["replays"] for b in bodies]
    assert sum(r > 0 for r in replays) >= 1, f"no request replayed ({replays}): the kill hit no live session"
    waited = _wait("the pool back at 2 healthy replicas", lambda: _pool_healthy(2) and len(_pool_actors()) == 2, 60)
    assert victim not in _pool_actors()
    print(f"replays per request {replays}; the pool was back at 2 replicas {waited:.1f} s after the last answer")
